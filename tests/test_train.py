"""Training on real MNIST, checkpoints, resume, and the run directory."""

import json
from dataclasses import replace

import pytest
import torch

from pyro_vae import DataConfig, ModelConfig, RunConfig, TrainConfig, load_run
from pyro_vae.data import binary_test_set, load_data
from pyro_vae.models import build_model
from pyro_vae.runs import read_metrics
from pyro_vae.train import epoch_metrics, train


def small_config(data_dir, **train_kw):
    return RunConfig(
        model=ModelConfig(z_dim=10, hidden_dims=(200,)),
        data=DataConfig(data_dir=str(data_dir), train_limit=3000, test_limit=1000, download=False),
        train=TrainConfig(**{"epochs": 3, "batch_size": 100, "device": "cpu", **train_kw}),
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_dir):
    config = small_config(data_dir)
    run = train(config, tmp_path_factory.mktemp("run"), progress=False, log=lambda s: None)
    return config, run


@pytest.mark.slow
def test_training_improves_the_test_elbo_on_real_mnist(trained):
    config, run = trained
    test_images = binary_test_set(load_data(config.data, "test", "cpu")).images
    torch.manual_seed(config.train.seed)
    untrained = build_model(config.model, (1, 28, 28))
    before = epoch_metrics(untrained, "test", test_images, None, config.train)["test_elbo"]
    metrics = read_metrics(run.run_dir)
    after = metrics[-1]["test_elbo"]
    # an untrained decoder scores about -545 nats per image; 90 steps of SVI on 3000
    # images must win back most of that (a fully trained model reaches about -100)
    assert before < -400
    assert after > before + 250, (before, after)
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    elbos = [m["test_elbo"] for m in metrics]
    assert elbos[0] < elbos[1] < elbos[2]
    for m in metrics:
        assert m["test_elbo"] == pytest.approx(m["test_log_lik"] - m["test_kl"], rel=1e-6)
        assert m["test_kl"] > 0 and m["seconds"] > 0 and m["kl_weight"] == 1.0


def test_run_directory_contents(trained):
    config, run = trained
    names = {p.name for p in run.run_dir.iterdir()}
    assert {"config.json", "versions.json", "metrics.jsonl", "checkpoint.pt"} <= names
    assert RunConfig.from_dict(json.loads((run.run_dir / "config.json").read_text())) == config
    versions = json.loads((run.run_dir / "versions.json").read_text())
    assert {"python", "torch", "pyro", "pyro_vae"} <= set(versions)
    assert not [p for p in names if p.endswith(".tmp")]


def test_checkpoint_round_trip(trained):
    _, run = trained
    loaded = load_run(run.run_dir, device="cpu")
    assert loaded.epoch == 3 and loaded.config == run.config
    for (k, a), (k2, b) in zip(run.program.state_dict().items(), loaded.program.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    x = torch.bernoulli(torch.full((4, 1, 28, 28), 0.3))
    assert torch.equal(run.program.encode(x)[0], loaded.program.encode(x)[0])


@pytest.mark.slow
def test_resume_equals_uninterrupted_run(tmp_path, data_dir):
    config = small_config(data_dir, epochs=3)
    config = replace(config, data=replace(config.data, train_limit=1000, test_limit=200))
    quiet = dict(progress=False, log=lambda s: None)
    straight = train(config, tmp_path / "straight", **quiet)
    first = replace(config, train=replace(config.train, epochs=1))
    train(first, tmp_path / "resumed", **quiet)
    resumed = train(config, tmp_path / "resumed", resume=True, **quiet)  # epochs 1 -> 3
    for (k, a), b in zip(straight.program.state_dict().items(), resumed.program.state_dict().values()):
        assert torch.equal(a, b), k
    drop = lambda ms: [{k: v for k, v in m.items() if k != "seconds"} for m in ms]
    assert drop(read_metrics(tmp_path / "straight")) == drop(read_metrics(tmp_path / "resumed"))


@pytest.mark.slow
def test_a_run_resumes_with_the_softplus_form_it_was_saved_with(tmp_path, data_dir, monkeypatch):
    """The CPU softplus form is measured per process, and the two forms differ by rounding:
    a process that measures the other form must still resume a run bit-exactly."""
    from pyro_vae import networks

    monkeypatch.delenv(networks.SOFTPLUS_ENV, raising=False)
    config = small_config(data_dir, epochs=2)
    config = replace(config, data=replace(config.data, train_limit=600, test_limit=100))
    assert config.model.activation == "softplus"  # (the form matters to the networks, not only the scales)
    quiet = dict(progress=False, log=lambda s: None)
    before = networks.cpu_softplus_form()
    try:
        networks.set_cpu_softplus_form("exp-log")
        straight = train(config, tmp_path / "straight", **quiet)
        train(replace(config, train=replace(config.train, epochs=1)), tmp_path / "resumed", **quiet)
        networks.set_cpu_softplus_form("torch")  # a new process, on a machine that measures log1p fast
        other = train(config, tmp_path / "other", **quiet)
        resumed = train(config, tmp_path / "resumed", resume=True, **quiet)
        assert networks.cpu_softplus_form() == "exp-log"
        notes = []
        monkeypatch.setenv(networks.SOFTPLUS_ENV, "torch")
        train(replace(config, train=replace(config.train, epochs=3)), tmp_path / "resumed", resume=True,
              progress=False, log=notes.append)
    finally:
        networks.set_cpu_softplus_form(before)
    same = [torch.equal(a, b) for a, b in zip(straight.program.state_dict().values(),
                                               resumed.program.state_dict().values())]
    assert all(same)
    assert not all(torch.equal(a, b) for a, b in zip(straight.program.state_dict().values(),
                                                     other.program.state_dict().values()))  # the forms do differ
    assert any("saved computing softplus in the exp-log form, and $PYRO_VAE_SOFTPLUS=torch resumes it" in n
               for n in notes)


def test_objective_knobs_train_and_report_the_true_elbo(tmp_path, data_dir):
    base = small_config(data_dir, epochs=2)
    base = replace(base, data=replace(base.data, train_limit=500, test_limit=200))
    quiet = dict(progress=False, log=lambda s: None)
    beta = train(replace(base, train=replace(base.train, beta=4.0, kl_warmup_epochs=2)), tmp_path / "b", **quiet)
    m = read_metrics(beta.run_dir)
    assert [r["kl_weight"] for r in m] == [pytest.approx(2.0), pytest.approx(4.0)]
    assert m[-1]["test_elbo"] == pytest.approx(m[-1]["test_log_lik"] - m[-1]["test_kl"], rel=1e-6)
    ae = train(replace(base, model=replace(base.model, model="ae")), tmp_path / "ae", **quiet)
    m = read_metrics(ae.run_dir)
    assert "test_elbo" not in m[-1] and "test_kl" not in m[-1] and m[-1]["test_log_lik"] > -300
    assert type(load_run(ae.run_dir).program).__name__ == "Autoencoder"
    kl = train(replace(base, train=replace(base.train, objective="kl-only")), tmp_path / "kl", **quiet)
    # trained on the KL alone, the encoder collapses onto the prior
    assert read_metrics(kl.run_dir)[-1]["test_kl"] < 0.5
