"""The two training engines take the same steps; CUDA paths (skipped without a GPU)."""

import pyro
import pytest
import torch

from pyro_vae.config import ModelConfig
from pyro_vae.objectives import build_elbo
from pyro_vae.steps import NonFiniteError, build_engine
from pyro_vae.models import build_model as build_vae

from helpers import random_binary


def run_engine(name, device="cpu", steps=15, seed=0):
    pyro.clear_param_store()
    torch.manual_seed(seed)
    vae = build_vae(ModelConfig(z_dim=4, hidden_dims=(32,)), (1, 28, 28)).to(device)
    engine = build_engine(name, vae, vae.model, vae.guide, build_elbo("trace"), 1e-2, validate=False)
    data = random_binary(64, (1, 28, 28), torch.float32).to(device)
    pyro.set_rng_seed(seed)
    losses = []
    with pyro.get_param_store().scope():
        for i in range(steps):
            losses.append(float(engine.step(x=data[(i % 4) * 16 : (i % 4 + 1) * 16], num_data=64)))
        engine.check()
    return vae, losses


def test_svi_and_module_engines_take_the_same_steps():
    a, la = run_engine("svi")
    b, lb = run_engine("module")
    assert la == pytest.approx(lb, rel=1e-4)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-6), name
    assert la[-1] < la[0]  # and they learn


def test_engines_restore_optimizer_state():
    vae, _ = run_engine("module", steps=3)
    engine = build_engine("module", vae, vae.model, vae.guide, build_elbo("trace"), 1e-2)
    x = random_binary(8, (1, 28, 28), torch.float32)
    engine.step(x=x, num_data=8)
    state = engine.state_dict()
    other = build_engine("module", vae, vae.model, vae.guide, build_elbo("trace"), 1e-2)
    other.load_state_dict(state)
    assert other.state_dict()["state"][0]["step"] == state["state"][0]["step"]


def test_unknown_engine():
    vae = build_vae(ModelConfig(z_dim=2, hidden_dims=(8,)), (1, 28, 28))
    with pytest.raises(ValueError, match="unknown engine 'jax'"):
        build_engine("jax", vae, vae.model, vae.guide, build_elbo(), 1e-3)


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["module", "captured"])
def test_cuda_training_matches_the_cpu_in_distribution_and_defers_checks(name):
    a, la = run_engine(name, "cuda", steps=30)
    b, lb = run_engine(name, "cpu", steps=30)
    assert next(a.parameters()).is_cuda
    # different random streams on the two devices: compare where training got to
    assert abs(sum(la[-5:]) - sum(lb[-5:])) / abs(sum(lb[-5:])) < 0.2
    vae = build_vae(ModelConfig(z_dim=4, hidden_dims=(32,)), (1, 28, 28)).cuda()
    engine = build_engine(name, vae, vae.model, vae.guide, build_elbo(), 1e-2, validate=False)
    assert engine.deferred
    x = random_binary(8, (1, 28, 28), torch.float32).cuda()
    with pyro.get_param_store().scope():
        engine.step(x=x, num_data=8)
        engine.step(x=x, num_data=8)  # captured: this one records and replays
        with torch.no_grad():
            next(vae.decoder.parameters()).fill_(float("nan"))
        engine.step(x=x, num_data=8)  # no exception yet: the check waits on the device
        with pytest.raises(NonFiniteError, match="0 step"):
            engine.check()


@pytest.mark.cuda
def test_cuda_end_to_end_run(tmp_path, data_dir):
    from pyro_vae import DataConfig, RunConfig, TrainConfig, load_run
    from pyro_vae.train import train

    cfg = RunConfig(data=DataConfig(data_dir=str(data_dir), train_limit=1000, test_limit=200),
                    train=TrainConfig(epochs=2, device="cuda"))
    run = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    assert next(run.program.parameters()).is_cuda
    loaded = load_run(tmp_path / "run", device="cuda")
    assert loaded.epoch == 2 and next(loaded.program.parameters()).is_cuda


def test_keep_freed_memory_takes_on_glibc():
    import platform
    import sys

    from pyro_vae.steps import keep_freed_memory

    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert keep_freed_memory() == on_glibc


def test_the_module_engines_use_fused_adam():
    vae = build_vae(ModelConfig(z_dim=2, hidden_dims=(8,)), (1, 28, 28))
    for name in ("module", "captured"):
        engine = build_engine(name, vae, vae.model, vae.guide, build_elbo(), 1e-3)
        assert engine.optim.defaults["fused"] is True


@pytest.mark.cuda
def test_cuda_captured_steps_are_the_eager_steps():
    a, la = run_engine("captured", "cuda", steps=20)
    b, lb = run_engine("module", "cuda", steps=20)
    # the same kernels on the same inputs; a tolerance in case a CUDA kernel is not
    # bit-reproducible from run to run
    assert la == pytest.approx(lb, rel=1e-5)
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        assert torch.allclose(p, q, rtol=1e-5, atol=1e-6)


def test_unknown_engine_in_the_config_names_the_choices():
    from pyro_vae.config import TrainConfig

    # the choices come from the engine registry itself: there is no second list to drift
    with pytest.raises(ValueError, match="unknown engine 'jax'; choose one of: captured, module, svi"):
        TrainConfig(engine="jax")


def _tensors(state):
    """Every tensor in an optimiser state (nested dicts and lists), in a fixed order."""
    if isinstance(state, torch.Tensor):
        return [state.clone()]
    if isinstance(state, dict):
        return [t for key in sorted(state, key=str) for t in _tensors(state[key])]
    if isinstance(state, (list, tuple)):
        return [t for item in state for t in _tensors(item)]
    return []


def _snapshot(vae, engine):
    """Copies of the parameters and of the optimiser's state (moments and step counts)."""
    return [p.detach().clone() for p in vae.parameters()] + _tensors(engine.state_dict())


def _assert_same(a, b):
    assert len(a) == len(b) and len(a) > 10  # parameters and Adam's state were captured
    for p, q in zip(a, b):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", ["svi", "module", "captured"])
def test_a_nan_gradient_under_a_finite_loss_stops_before_any_tensor_moves(name):
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = build_vae(ModelConfig(z_dim=4, hidden_dims=(32,)), (1, 28, 28))
    engine = build_engine(name, vae, vae.model, vae.guide, build_elbo(), 1e-2, validate=False)
    x = random_binary(16, (1, 28, 28), torch.float32)
    with pyro.get_param_store().scope():
        for _ in range(3):  # Adam has moments to lose; captured has recorded and replayed
            engine.step(x=x, num_data=64)
        before = _snapshot(vae, engine)
        hook = vae.encoder.body[0][0].weight.register_hook(lambda g: g * float("nan"))
        with pytest.raises(NonFiniteError, match="a gradient holds NaN"):
            engine.step(x=x, num_data=64)
        hook.remove()
        _assert_same(before, _snapshot(vae, engine))


@pytest.mark.parametrize("name", ["module", "captured"])
def test_a_deferred_check_skips_the_bad_update_on_the_device_and_reports_it_later(name):
    # as on CUDA (engine.deferred): the step does not read the flag, fused Adam skips on it
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = build_vae(ModelConfig(z_dim=4, hidden_dims=(32,)), (1, 28, 28))
    engine = build_engine(name, vae, vae.model, vae.guide, build_elbo(), 1e-2, validate=False)
    engine.deferred = True
    x = random_binary(16, (1, 28, 28), torch.float32)
    with pyro.get_param_store().scope():
        for _ in range(3):
            engine.step(x=x, num_data=64)
        engine.check()
        before = _snapshot(vae, engine)
        hook = vae.decoder.net[-1].weight.register_hook(lambda g: g * float("inf"))
        engine.step(x=x, num_data=64)  # no exception: the flag stays on the device
        hook.remove()
        _assert_same(before, _snapshot(vae, engine))  # the poisoned update was not taken
        engine.step(x=x, num_data=64)
        assert not torch.equal(before[0], next(vae.parameters()))  # a good step moves again
        with pytest.raises(NonFiniteError, match="1 step"):
            engine.check()
