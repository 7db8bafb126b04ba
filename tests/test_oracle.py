"""The oracle: pyro_vae scores, trains and reloads the programs of tests/oracle_programs.py
as Pyro itself would, or refuses them at once with the reason.

The rule these tests prove: any program that Pyro's ELBO accepts is trained and scored
as Pyro would, or refused with the reason; never silently wrong.
"""

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO

from pyro_vae.evaluate import batch_elbo_terms
from pyro_vae.scoring import Scorer, ScoringError

from oracle_programs import ESTIMATOR, FACTORIES, PROGRAMS, REFUSED, SHAPE, labels_of

N = 24
PYRO_ELBOS = {"trace": Trace_ELBO, "meanfield": TraceMeanField_ELBO, "traceenum": TraceEnum_ELBO,
              "tracegraph": TraceGraph_ELBO}


def images(n=N, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *SHAPE), 0.4), generator=gen)


def call_args(program, x):
    """The arguments the training loop gives this program for the whole data set as one batch."""
    from pyro_vae.models import ProgramCall

    call = ProgramCall(program)
    return call.kwargs({"x": x, "y": labels_of(x), "index": torch.arange(x.shape[0])}, num_data=x.shape[0])


@pytest.mark.parametrize("name", list(PROGRAMS))
def test_the_reported_elbo_is_pyros_elbo_of_the_data_set(name):
    """On the whole data as one batch, with the same draws, the per-image ELBO times N is
    minus the loss of Pyro's own ELBO (the estimator the scorer splits), to float rounding."""
    program = PROGRAMS[name]()
    x = images()
    kwargs = call_args(program, x)
    scorer = Scorer()
    pyro.set_rng_seed(7)
    terms = scorer.terms(program.model, program.guide, **kwargs)
    elbo = PYRO_ELBOS[scorer.estimator](max_plate_nesting=scorer.max_plate_nesting)
    pyro.set_rng_seed(7)
    assert terms["elbo"].shape == (N,)
    if scorer.model_enumerates:  # scored image by image (one scale per image): Pyro's loss of each image
        for i in range(N):
            one = {k: v[i : i + 1] if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
            loss = elbo.loss(program.model, program.guide, **one)
            assert float(terms["elbo"][i]) * N == pytest.approx(-loss, rel=1e-5)
        assert "log_lik" not in terms  # summed out with the latent: no split
        return
    loss = elbo.loss(program.model, program.guide, **kwargs)
    assert float(terms["elbo"].double().sum()) == pytest.approx(-loss, rel=1e-5, abs=1e-3)
    if "log_lik" in terms:  # the two terms add up to the ELBO, image by image
        torch.testing.assert_close(terms["log_lik"] - terms["kl"], terms["elbo"])


@pytest.mark.parametrize("name", list(REFUSED))
def test_a_program_that_cannot_be_scored_is_refused_with_the_reason(name, tmp_path):
    """Refused when scored (a minibatch of 8 of the 24 images), and by fit before anything is written."""
    from pyro_vae import TrainConfig, fit

    build, reason = REFUSED[name]
    program = build()
    x = images()
    kwargs = call_args(program, x[8:16])
    kwargs.update(num_data=N, **({"index": torch.arange(8, 16)} if "index" in kwargs else {}))
    with pytest.raises(ScoringError, match=reason):
        batch_elbo_terms(program.model, program.guide, **kwargs)
    with pytest.raises(ScoringError, match=reason):
        fit(build(), x, tmp_path / "run", settings=TrainConfig(epochs=1, batch_size=8, device="cpu"), progress=False,
            log=lambda line: None)
    assert not (tmp_path / "run").exists()


# -- training, checkpoints, resume and loading back -----------------------------------------

SETTINGS = dict(epochs=2, batch_size=8, device="cpu", eval_batch_size=100, lr=1e-2)
ENGINES = ("module", "captured", "svi")


def _fit(name, run_dir, engine, epochs=2, resume=False):
    from pyro_vae import TrainConfig, fit
    from pyro_vae.data import ImageData

    x = images()
    data = ImageData(x, labels_of(x), binary=True)
    test = ImageData(images(8, seed=2), labels_of(images(8, seed=2)), binary=True)
    settings = TrainConfig(**{**SETTINGS, "epochs": epochs, "engine": engine,
                              "estimator": ESTIMATOR.get(name, "trace")})
    return fit(PROGRAMS[name](), data, run_dir, test=test, settings=settings, resume=resume,
               factory=f"oracle_programs:{FACTORIES[name]}", progress=False, log=lambda line: None)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_every_engine_trains_the_same_tensors_and_runs_resume_exactly_and_load_back(name, tmp_path):
    import warnings

    from pyro_vae import load_run
    from pyro_vae.runs import read_metrics

    runs = {}
    for engine in ENGINES:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a program the recording cannot take runs eagerly
            runs[engine] = _fit(name, tmp_path / engine, engine)
    trained = runs["module"].program.state_dict()
    untrained = PROGRAMS[name]().state_dict()
    moved = [k for k in trained if k not in untrained or not torch.equal(trained[k], untrained[k])]
    assert set(moved) == set(trained), f"never trained: {set(trained) - set(moved)}"  # lazily made ones too
    for key, value in runs["captured"].program.state_dict().items():  # recorded or eager: the same steps
        assert torch.equal(value, trained[key]), key
    for key, value in runs["svi"].program.state_dict().items():  # Pyro's Adam, one per tensor: to rounding
        torch.testing.assert_close(value, trained[key], rtol=1e-4, atol=1e-5, msg=f"svi: {key}")
    # one epoch, then a resume: the parameters of the uninterrupted run, bit for bit
    _fit(name, tmp_path / "resumed", "module", epochs=1)
    resumed = _fit(name, tmp_path / "resumed", "module", epochs=2, resume=True).program.state_dict()
    for key, value in trained.items():
        assert torch.equal(resumed[key], value), key
    loaded = load_run(tmp_path / "module").program.state_dict()
    for key, value in trained.items():
        assert torch.equal(loaded[key], value), key
    # the epoch records hold the ELBO as this module scores it (Pyro's), finite
    record = read_metrics(tmp_path / "module")[-1]
    assert torch.isfinite(torch.tensor(record["train_elbo"]))


def test_a_recording_that_fails_leaves_no_fake_tensor_in_the_module():
    from pyro_vae.capture import CapturedLoss
    from pyro_vae.objectives import build_elbo
    from oracle_programs import TiedValueReading

    program = TiedValueReading()
    loss = CapturedLoss(build_elbo()(program.model, program.guide), program)
    x = images(8)
    with pyro.validation_enabled(False), pytest.warns(RuntimeWarning, match="could not be recorded"):
        for _ in range(2):  # the first call runs eagerly, the second tries to record
            loss(x=x, num_data=N)
    assert loss.eager_reason is not None
    assert all(type(p) is torch.nn.Parameter for p in program.parameters())
    loss(x=x, num_data=N).backward()  # and the module still trains


def test_evaluation_reports_the_elbo_of_a_global_latent_program_and_says_why_there_is_no_log_px():
    from pyro_vae import evaluate_model

    report = evaluate_model(PROGRAMS["global-latent"](), images(), num_samples=10, mc_repeats=3)
    assert set(report) == {"elbo", "log_lik", "kl"}
    assert report["elbo"].mc_stderr is not None and report["elbo"].mc_stderr > 0
    assert len(report.notes) == 1 and "outside the 'data' plate" in report.notes[0]


@pytest.mark.slow
def test_a_conditional_programs_figures_and_gaps_get_its_labels(tmp_path):
    """Every figure that `plot --kind all` draws, the KL per dimension and the inference gaps
    reach a conditional program with the test images' labels."""
    from pyro_vae.data import ImageData
    from pyro_vae.plots import KINDS, draw_figures
    from pyro_vae.posterior import inference_gaps

    program = PROGRAMS["conditional"]()
    x = images(12, seed=2)
    test = ImageData(x, labels_of(x), binary=True)
    metrics = [{"epoch": 1, "train_elbo": -10.0, "train_log_lik": -9.0, "train_kl": 1.0, "test_elbo": -11.0,
                "test_log_lik": -10.0, "test_kl": 1.0, "train_objective": -10.0, "kl_weight": 1.0, "lr": 1e-3,
                "seconds": 1.0}]
    drawn = draw_figures(KINDS, program, test, metrics, tmp_path, log=lambda line: None)
    assert {p.stem for p in drawn} == set(KINDS)  # none skipped for want of labels
    assert program.view_labels and all(y is not None for y in program.view_labels)
    gaps = inference_gaps(program, x[:4], num_samples=50, elbo_samples=50, max_steps=20, labels=test.labels[:4])
    assert torch.isfinite(gaps.log_px).all()  # (the model needs y: without it, embed(None) would have raised)


@pytest.mark.slow
@pytest.mark.filterwarnings("error:Found non-auxiliary vars")  # q* must not propose an autoguide's own sites
@pytest.mark.parametrize("factory, estimator, split", [("per_image_autonormal", "trace", "train"),
                                                       ("enumerated", "traceenum", "test")])
def test_the_command_line_evaluates_plots_gaps_and_resumes_runs_of_autoguides_and_enumeration(
        factory, estimator, split, tmp_path, data_dir, capsys):
    import json

    from pyro_vae import DataConfig, TrainConfig, fit
    from pyro_vae.cli import main

    import cli_programs

    run = tmp_path / factory
    data = DataConfig(dataset="mnist", data_dir=str(data_dir), train_limit=300, test_limit=60)
    fit(getattr(cli_programs, factory)(), data, run, factory=f"cli_programs:{factory}", progress=False,
        log=lambda line: None, settings=TrainConfig(epochs=1, batch_size=50, lr=1e-2, device="cpu",
                                                    estimator=estimator, engine="module"))
    capsys.readouterr()
    assert main(["evaluate", str(run), "--num-samples", "20", "--limit", "40", "--split", split, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_images"] == 40 and report["log_px_is20"]["mean"] > report["elbo"]["mean"] - 1.0
    assert report["elbo"]["mc_stderr"] is not None
    if split == "train":  # parameters per training image: the test split has no posterior, and says so
        assert main(["evaluate", str(run), "--num-samples", "5", "--limit", "10"]) == 1
        assert "--split train" in capsys.readouterr().err
    assert main(["plot", str(run), "--kind", "all", "--limit", "40"]) == 0
    assert main(["gaps", str(run), "--limit", "10", "--num-samples", "20", "--max-steps", "100", "--split", split,
                 "--json"]) == 0
    gaps = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert gaps["num_images"] == 10 and gaps["log_px"]["mean"] < 0
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert [json.loads(line)["epoch"] for line in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PROGRAMS))
def test_importance_sampled_log_px_lies_above_the_elbo_or_is_refused_with_the_reason(name):
    """Where log p(x) is defined per image, its K = 100 bound lies above the ELBO (the paired
    difference, averaged over 4 ELBO draws, more than 3 standard errors above 0); elsewhere
    importance sampling refuses the program, naming why."""
    from pyro_vae.evaluate import elbo_terms, log_px_importance
    from pyro_vae.models import ProgramCall
    from pyro_vae.objectives import ImportanceWeightError

    from oracle_programs import NO_LOG_PX

    program = PROGRAMS[name]()
    x = images()
    call = ProgramCall(program)
    extra = {"labels": labels_of(x)} if call.takes["y"] else {}
    where = {"index": torch.arange(N)} if call.takes["index"] else {}
    if name in NO_LOG_PX:
        with pytest.raises(ImportanceWeightError, match=NO_LOG_PX[name]):
            log_px_importance(program.model, program.guide, x, num_samples=10, **extra, **where)
        return
    with torch.no_grad():
        log_px = log_px_importance(program.model, program.guide, x, num_samples=100, seed=1, **extra, **where,
                                   num_data=N if where else None)
        elbo = torch.stack([elbo_terms(program.model, program.guide, x, seed=s, **extra, **where)["elbo"]
                            for s in range(4)]).mean(0)
    gap = log_px - elbo
    assert gap.mean() > 3 * gap.std() / N**0.5, (gap.mean(), gap.std())


@pytest.mark.slow
def test_a_run_trained_with_an_estimator_registered_by_its_factory_module_loads_back(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from pyro_vae import TrainConfig, fit

    import own_estimator

    tests = Path(__file__).resolve().parent
    fit(own_estimator.build(), images(), tmp_path / "run", factory="own_estimator:build", progress=False,
        log=lambda line: None, settings=TrainConfig(epochs=1, batch_size=8, device="cpu", estimator="trace-halved"))
    code = ("import sys; from pyro_vae import load_run; run = load_run(sys.argv[1]); "
            "print(run.config.train.estimator, run.epoch)")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True,
                          env={**__import__("os").environ, "PYTHONPATH": str(tests)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["trace-halved", "1"]
