"""Any program trains: user-defined programs through fit(), labels, learned tensors, loading back."""

import json
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae import ProgramRecord, TrainConfig, evaluate_model, fit, load_run
from pyro_vae.data import ImageData
from pyro_vae.models import ProgramCall, data_plate
from pyro_vae.objectives import build_elbo
from pyro_vae.runs import RunDirError, load_config
from pyro_vae.steps import LearnedTensorError, build_engine

from programs import SHAPE, LabelledProgram, MixturePriorVAE, build_mixture_vae, label_of

TESTS = Path(__file__).resolve().parent
SETTINGS = TrainConfig(epochs=2, batch_size=16, device="cpu", eval_batch_size=100, lr=1e-2)
quiet = dict(progress=False, log=lambda line: None)


def binary_images(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *SHAPE), 0.4), generator=gen)


# -- a program defined in a user's script: trains, checkpoints, resumes, evaluates ----------


def test_a_user_program_trains_resumes_and_loads_back(tmp_path):
    data, test = binary_images(64), binary_images(32, seed=2)
    straight = fit(build_mixture_vae(), data, tmp_path / "straight", test=test, settings=SETTINGS,
                   factory="programs:build_mixture_vae", **quiet)
    record = json.loads((tmp_path / "straight" / "config.json").read_text())["model"]
    assert record == {"program": "programs:MixturePriorVAE", "factory": "programs:build_mixture_vae",
                      "likelihood": "bernoulli"}
    one = TrainConfig(**{**SETTINGS.__dict__, "epochs": 1})
    fit(build_mixture_vae(), data, tmp_path / "resumed", test=test, settings=one,
        factory="programs:build_mixture_vae", **quiet)
    resumed = fit(build_mixture_vae(), data, tmp_path / "resumed", test=test, settings=SETTINGS,
                  factory="programs:build_mixture_vae", resume=True, **quiet)
    trained = straight.program.state_dict()
    assert {"mixture.logits", "mixture.locs"} <= set(trained)  # the prior's learned tensors are saved
    assert not torch.equal(trained["mixture.locs"], build_mixture_vae().mixture.locs.detach())  # and trained
    for name, value in resumed.program.state_dict().items():
        assert torch.equal(value, trained[name]), name
    # loaded back through the recorded factory, and from a program passed in
    for loaded in (load_run(tmp_path / "straight"), load_run(tmp_path / "straight", program=MixturePriorVAE())):
        assert isinstance(loaded.program, MixturePriorVAE) and loaded.epoch == 2
        for name, value in loaded.program.state_dict().items():
            assert torch.equal(value, trained[name]), name
    # and it evaluates: the MoG prior has no closed-form KL, the Monte Carlo one is used
    report = evaluate_model(loaded.program, test, num_samples=50)
    assert report["log_px_is50"].mean > report["elbo"].mean


def test_a_run_without_factory_asks_for_the_program(tmp_path):
    fit(MixturePriorVAE(), binary_images(32), tmp_path / "run", settings=SETTINGS, **quiet)
    assert isinstance(load_config(tmp_path / "run").model, ProgramRecord)
    with pytest.raises(RunDirError, match=r"load_run\(RUN, program=YourProgram"):
        load_run(tmp_path / "run")
    assert load_run(tmp_path / "run", program=MixturePriorVAE()).epoch == 2


@pytest.mark.slow
def test_the_cli_loads_a_user_program_by_its_factory(tmp_path, data_dir, monkeypatch, capsys):
    """A registered data set recorded in the run, and the program's factory given as a file."""
    import importlib.util

    from pyro_vae import DataConfig
    from pyro_vae.cli import main

    script = tmp_path / "user_program.py"
    script.write_text((TESTS / "programs.py").read_text().replace("SHAPE = (1, 4, 4)", "SHAPE = (1, 28, 28)"))
    monkeypatch.setenv("PYRO_VAE_DATA", str(data_dir))
    spec = importlib.util.spec_from_file_location("user_program", script)  # the user's file, as they import it
    user_program = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(user_program)
    run = str(tmp_path / "run")
    fit(user_program.build_mixture_vae(), DataConfig(train_limit=256, test_limit=64), run,
        settings=TrainConfig(epochs=1, batch_size=64, device="cpu"), progress=False, log=lambda line: None)
    capsys.readouterr()
    assert main(["evaluate", run, "--num-samples", "10"]) == 1
    assert "--program module:function" in capsys.readouterr().err
    assert main(["evaluate", run, "--num-samples", "10", "--json", "--program", f"{script}:build_mixture_vae"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 64
    assert main(["train", "--resume", run, "--epochs", "2", "--no-progress",
                 "--program", f"{script}:build_mixture_vae"]) == 0
    assert len((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()) == 2


# -- labels reach the program -----------------------------------------------------------


@pytest.mark.parametrize("engine", ["svi", "module", "captured"])
def test_labels_reach_a_program_that_takes_y(tmp_path, engine):
    images = binary_images(64)
    program = LabelledProgram()
    fit(program, ImageData(images, label_of(images), True), tmp_path / "run",
        settings=TrainConfig(**{**SETTINGS.__dict__, "engine": engine}), **quiet)
    assert program.calls and all(y is not None and y.dtype == torch.long for _, y in program.calls)
    # each image came with its own label (calls made while recording hold fake tensors, no values)
    real = [(x, y) for x, y in program.calls if type(y) is torch.Tensor]
    assert len(real) >= 2 and all(torch.equal(y, label_of(x)) for x, y in real)
    # the label embedding learned: it moves only when y is used
    assert not torch.equal(program.label_logits.weight, LabelledProgram().label_logits.weight)


def test_the_recording_is_keyed_by_the_batch_shapes_not_the_tensors():
    def steps(engine_name):
        pyro.clear_param_store()
        torch.manual_seed(0)
        program = LabelledProgram()
        engine = build_engine(engine_name, program, program.model, program.guide, build_elbo(), 1e-2,
                              validate=False)
        images = binary_images(40)
        labels = label_of(images)
        pyro.set_rng_seed(1)
        losses = []
        with pyro.get_param_store().scope():
            for lo, hi in [(0, 16), (16, 32), (32, 40), (0, 16), (32, 40)]:
                losses.append(engine.step(x=images[lo:hi].clone(), y=labels[lo:hi].clone(), num_data=40))
        return program, torch.stack(losses), engine

    a, la, captured = steps("captured")
    b, lb, _ = steps("module")
    assert torch.equal(la, lb)  # fresh tensors each step, labels included: replayed, not stale
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    keys = captured.loss_fn.graphs.keys()
    assert sorted(k[0][0][1][0] for k in keys) == [8, 16]  # one recording per batch shape
    assert all([name for name, *_ in k[0]] == ["x", "y"] and k[0][1][2] == torch.long for k in keys)


def test_programs_without_y_get_no_labels():
    call = ProgramCall(MixturePriorVAE())
    x, y = binary_images(4), torch.zeros(4, dtype=torch.long)
    assert set(call.kwargs({"x": x, "y": y}, num_data=10, kl_weight=1.0)) == {"x", "num_data", "kl_weight"}
    assert set(ProgramCall(LabelledProgram()).kwargs({"x": x, "y": y}, num_data=10, kl_weight=1.0)) == \
        {"x", "y", "num_data"}


def test_a_kl_weight_needs_a_program_that_takes_it(tmp_path):
    with pytest.raises(TypeError, match="needs a program whose model and guide take kl_weight"):
        fit(LabelledProgram(), ImageData(binary_images(32), label_of(binary_images(32)), True), tmp_path / "r",
            settings=TrainConfig(**{**SETTINGS.__dict__, "beta": 2.0}), **quiet)
    assert not (tmp_path / "r").exists()


# -- one rule for what is trained and saved ------------------------------------------------


class ParamPrior(MixturePriorVAE):
    """A prior whose location is a pyro.param the module does not own."""

    def prior(self):
        loc = pyro.param("prior_shift", torch.zeros(self.z_dim))
        return dist.Normal(loc, 1.0).to_event(1)


class UnregisteredScale(nn.Module):
    """A learned tensor of the module that Pyro never sees (no pyro.module for it)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Linear(2, 16)
        self.log_scale = nn.Parameter(torch.zeros(()))

    def model(self, x, *, num_data=None):
        pyro.module("net", self.net)
        x = x.reshape(x.shape[0], -1)
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.net(z), self.log_scale.exp()).to_event(1), obs=x)

    def guide(self, x, *, num_data=None):
        with data_plate(x, num_data):
            pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))


def test_a_pyro_param_the_module_does_not_own_is_refused(tmp_path):
    for engine in ("svi", "module", "captured"):
        with pytest.raises(LearnedTensorError, match=r"pyro.param\('prior_shift'\) is not a parameter"):
            fit(ParamPrior(), binary_images(32), tmp_path / engine,
                settings=TrainConfig(**{**SETTINGS.__dict__, "engine": engine}), **quiet)
        assert not (tmp_path / engine).exists()  # refused before the run folder is written


def test_a_parameter_pyro_never_sees_is_refused_by_svi_alone(tmp_path):
    data = binary_images(32)
    with pytest.raises(LearnedTensorError, match="'log_scale' .* engine 'svi'"):
        fit(UnregisteredScale(), data, tmp_path / "svi", settings=TrainConfig(**{**SETTINGS.__dict__, "engine": "svi"}),
            **quiet)
    run = fit(UnregisteredScale(), data, tmp_path / "module", settings=TrainConfig(**{**SETTINGS.__dict__,
                                                                                       "engine": "module"}), **quiet)
    assert float(run.program.log_scale.detach()) != 0.0  # trained, and saved:
    assert torch.equal(load_run(tmp_path / "module", program=UnregisteredScale()).program.log_scale,
                       run.program.log_scale)


def test_a_program_without_num_data_is_refused():
    class NoNumData(nn.Module):
        def model(self, x):
            pass

        def guide(self, x):
            pass

    with pytest.raises(TypeError, match="must take num_data"):
        ProgramCall(NoNumData())


def test_import_pyro_vae_train_gives_the_module():
    import pyro_vae.train

    assert hasattr(pyro_vae.train, "fit") and hasattr(pyro_vae.train, "train")


# -- error paths a user of fit() meets ---------------------------------------------------------


def test_a_model_and_guide_that_disagree_on_y_are_refused():
    class GuideWithoutY(LabelledProgram):
        def guide(self, x, *, num_data=None):
            return super().guide(x, num_data=num_data)

    with pytest.raises(TypeError, match="model takes y but its guide does not"):
        ProgramCall(GuideWithoutY())


@pytest.mark.parametrize("spec,message", [
    ("no_colon_here", "is 'package.module:function'"),
    ("programs:no_such_function", "cannot load the program factory"),
    ("/nowhere/user_program.py:build", "no such file"),
])
def test_a_bad_factory_is_a_clear_error(spec, message):
    from pyro_vae.runs import call_factory

    with pytest.raises(ValueError, match=message):
        call_factory(spec)


def test_the_cli_says_how_to_evaluate_a_run_trained_on_tensors(tmp_path, capsys):
    from pyro_vae.cli import main

    fit(build_mixture_vae(), binary_images(32), tmp_path / "run", settings=SETTINGS,
        factory="programs:build_mixture_vae", **quiet)
    assert main(["evaluate", str(tmp_path / "run"), "--num-samples", "5"]) == 1
    assert "evaluate it in Python" in capsys.readouterr().err
    assert main(["train", "--resume", str(tmp_path / "run"), "--epochs", "3"]) == 1
    assert "resume it in Python with pyro_vae.fit" in capsys.readouterr().err


def test_a_damaged_metrics_line_before_the_last_is_an_error_not_a_silent_drop(tmp_path):
    from pyro_vae.runs import read_metrics

    fit(build_mixture_vae(), binary_images(32), tmp_path / "run", settings=SETTINGS, **quiet)
    path = tmp_path / "run" / "metrics.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("not json\n" + "\n".join(lines[1:]) + "\n")
    with pytest.raises(RunDirError, match="line 1 is damaged"):
        read_metrics(tmp_path / "run")
