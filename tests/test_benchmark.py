"""The benchmark script runs end to end (a benchmark, not a timed test: no speed is asserted)."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

from scripts import run_script

pytestmark = pytest.mark.slow  # subprocesses and whole runs: outside `-m "not slow"`


@pytest.mark.slow
def test_benchmark_smoke(tmp_path, data_dir):
    env = {**os.environ, "PYRO_VAE_DATA": str(data_dir)}
    run_script([sys.executable, str(REPO / "experiments" / "benchmark.py"), "--smoke", "--out", str(tmp_path)],
                   check=True, env=env, capture_output=True, text=True)
    report = json.loads((tmp_path / "benchmark-smoke.json").read_text())
    (row,) = report["throughput"]
    assert row["device"] == "cpu" and row["ours_images_per_s"] > 0 and row["reference_images_per_s"] > 0
    assert row["ratio"] == pytest.approx(row["ours_images_per_s"] / row["reference_images_per_s"])
    assert row["ours_peak_mib"] > 0
    names = [row["variant"] for row in report["is_throughput"]]
    assert any("pyro_vae" in n for n in names) and any("hand-written best" in n for n in names)
    assert all(row["images_per_s"] > 0 and 0 < row["matmul_share"] for row in report["is_throughput"])
    (is_run,) = report["importance_sampling"]
    assert is_run["num_images"] == 20 and is_run["log_px_is10"]["mean"] < 0


@pytest.mark.parametrize("exp_log", [False, True])
def test_reference_loss_is_the_same_estimator(exp_log):
    """The hand-written reference (either softplus) computes the same one-sample ELBO as
    pyro_vae's model/guide, with the same gradient."""
    import pyro
    import torch
    from pyro import poutine
    from pyro.infer import Trace_ELBO

    sys.path.insert(0, str(REPO / "experiments"))
    from benchmark import ReferenceVAE

    from pyro_vae.config import ModelConfig
    from pyro_vae.models import build_model as build_vae

    ref = ReferenceVAE(x_dim=784, z_dim=5, hidden=20, exp_log=exp_log).double()
    vae = build_vae(ModelConfig(z_dim=5, hidden_dims=(20,)), (1, 28, 28)).double()
    with torch.no_grad():  # copy the reference's weights into pyro_vae's networks
        pairs = [(vae.encoder.body[0][0], ref.enc[0]), (vae.encoder.head.loc, ref.enc_loc),
                 (vae.encoder.head.raw_scale, ref.enc_scale), (vae.decoder.net[0], ref.dec[0]),
                 (vae.decoder.net[2], ref.dec[2])]
        for ours, theirs in pairs:
            ours.weight.copy_(theirs.weight)
            ours.bias.copy_(theirs.bias)
    x = torch.bernoulli(torch.full((7, 784), 0.2, dtype=torch.float64))
    torch.manual_seed(3)
    expected = ref.loss(x=x, num_data=70)
    torch.manual_seed(3)  # the same noise: Pyro's Normal.rsample draws eps the same way
    loss = Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, num_data=70)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-10)
    expected.backward()
    loss.backward()
    for ours, theirs in pairs:
        assert torch.allclose(ours.weight.grad, theirs.weight.grad, rtol=1e-8, atol=1e-10)


def test_profile_step_smoke():
    res = run_script([sys.executable, str(REPO / "experiments" / "profile_step.py"), "--batch-size", "16",
                          "--steps", "2", "--rounds", "1"], check=True, capture_output=True, text=True)
    lines = res.stdout.splitlines()
    assert lines[0].startswith("batch 16")
    names = [line.split("  ")[0].strip() for line in lines[2:]]
    assert names[0] == "reference" and "ours, validation on" in names


@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:FutureWarning")  # what --jit compares with
def test_profile_step_jit_smoke():
    res = run_script([sys.executable, str(REPO / "experiments" / "profile_step.py"), "--batch-size", "16",
                          "--steps", "2", "--rounds", "1", "--jit"], check=True, capture_output=True, text=True)
    names = [line.split("  ")[0].strip() for line in res.stdout.splitlines()[2:]]
    assert names == ["reference", "ours, JitTrace_ELBO"]


@pytest.mark.parametrize("fast,as_pyro_vae,exp_log", [(False, False, False), (True, False, False),
                                                      (True, False, True), (True, True, True)])
def test_the_handwritten_importance_loops_compute_pyro_vaes_bound_on_the_same_noise(fast, as_pyro_vae, exp_log):
    import torch

    sys.path.insert(0, str(REPO / "experiments"))
    from benchmark import exp_log_softplus, handwritten_log_px

    from pyro_vae.config import ModelConfig
    from pyro_vae.evaluate import log_px_importance
    from pyro_vae.models import build_model as build_vae

    torch.manual_seed(0)
    vae = build_vae(ModelConfig(z_dim=8, hidden_dims=(32,)), (1, 28, 28))
    x = torch.bernoulli(torch.full((10, 784), 0.2))
    ours = log_px_importance(vae.model, vae.guide, x, num_samples=200, batch_size=5, max_elements=400, seed=4)
    torch.manual_seed(4)
    kw = dict(fast=fast, as_pyro_vae=as_pyro_vae, softplus=exp_log_softplus if exp_log else None)
    theirs = handwritten_log_px(vae, x, 200, batch_size=5, rows_per_chunk=400, **kw)
    assert torch.allclose(ours, theirs, rtol=0, atol=2e-3)  # float32 sums of 784 pixels, two ways
    torch.manual_seed(5)  # other noise: another value (the comparison above is not vacuous)
    other = handwritten_log_px(vae, x, 200, batch_size=5, rows_per_chunk=400, **kw)
    assert not torch.allclose(ours, other, rtol=0, atol=2e-3)


@pytest.mark.slow
def test_whole_process_comparison_smoke(tmp_path, data_dir):
    env = {**os.environ, "PYRO_VAE_DATA": str(data_dir)}
    run_script([sys.executable, str(REPO / "experiments" / "whole_process.py"), "--epochs", "1", "--repeats", "1",
                    "--limit", "1000", "--out", str(tmp_path)], check=True, env=env, capture_output=True, text=True)
    report = json.loads((tmp_path / "whole-process.json").read_text())
    for side in ("pyro-vae train", "hand-written"):
        (run,) = report["runs"][side]
        assert run["wall_seconds"] > run["train_seconds"] > 0
        assert -600 < run["final_test_elbo"] < -100  # both trained and evaluated something (one epoch, 1,000 images)
    assert report["ratio_wall"] == pytest.approx(report["medians"]["hand-written"]["wall_seconds"]
                                                 / report["medians"]["pyro-vae train"]["wall_seconds"])
