"""One command line for start and restart (--resume-if-present), checkpoints within an
epoch (--checkpoint-every), and torchrun's elastic restarts that resume by themselves."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pyro_vae import checkpoint, load_run
from pyro_vae.checkpoint import Every
from pyro_vae.cli import DEFAULT_EVERY, main
from pyro_vae.runs import read_metrics

pytestmark = pytest.mark.slow  # subprocesses and whole runs: outside `-m "not slow"`

REPO = Path(__file__).resolve().parents[1]
TINY = ["--train-limit", "300", "--test-limit", "50", "--batch-size", "50", "--z-dim", "2", "--hidden-dims", "16",
        "--eval-batch-size", "300", "--device", "cpu", "--no-progress"]


# -- when to checkpoint ------------------------------------------------------------------


@pytest.mark.parametrize("spec, steps, seconds", [
    ("500", 500, None), (7, 7, None), ("30s", None, 30.0), ("10min", None, 600.0), ("1.5m", None, 90.0),
    ("2h", None, 7200.0), ("epoch", None, None),
])
def test_checkpoint_intervals_read_as_steps_or_a_clock(spec, steps, seconds):
    every = Every(spec)
    assert (every.steps, every.seconds) == (steps, seconds)
    if steps:
        assert [s for s in range(1, 3 * steps + 1) if every.due(s)] == [steps, 2 * steps, 3 * steps]
    if spec == "epoch":
        assert not any(every.due(s) for s in range(1, 1000))


def test_the_clock_is_due_once_its_time_has_passed_since_the_last_checkpoint(monkeypatch):
    now = [100.0]
    monkeypatch.setattr("pyro_vae.checkpoint.time.monotonic", lambda: now[0])
    every = Every("30s")
    now[0] += 29.9
    assert not every.due(1)
    now[0] += 0.2
    assert every.due(2)
    every.reset()
    assert not every.due(3)


@pytest.mark.parametrize("spec", ["0", "0s", "5x", "1.5", "-3", "", "ten"])
def test_a_bad_interval_is_a_clear_error_before_anything_is_written(spec, tmp_path, capsys):
    with pytest.raises(ValueError, match="checkpoint interval"):
        Every(spec)
    run = tmp_path / "run"
    assert main(["train", *TINY, "--out", str(run), "--checkpoint-every", spec]) == 1
    assert "checkpoint interval" in capsys.readouterr().err
    assert not run.exists()


def test_the_cli_default_interval_is_the_library_one():
    assert DEFAULT_EVERY == checkpoint.DEFAULT_EVERY == Every(DEFAULT_EVERY).spec


# -- one command line for start and restart -------------------------------------------


def snapshot(folder: Path) -> dict:
    """Every file's bytes and modification time (but the lock's, which records who last held it)."""
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.name != ".lock"}


def test_resume_if_present_starts_continues_refuses_and_finishes(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    command = ["train", *TINY, "--data-dir", str(data_dir), "--out", str(run), "--resume-if-present"]
    # an empty (absent) folder: the run starts
    assert main([*command, "--epochs", "1"]) == 0
    assert [m["epoch"] for m in read_metrics(run)] == [1]
    # this run's folder: it continues (asking for one more epoch, as a longer job would)
    assert main([*command, "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert f"resuming {run} after epoch 1 (of 2 epochs)" in out
    assert [m["epoch"] for m in read_metrics(run)] == [1, 2]
    straight = tmp_path / "straight"
    assert main(["train", *TINY, "--data-dir", str(data_dir), "--out", str(straight), "--epochs", "2"]) == 0
    resumed, reference = load_run(run, "cpu").program.state_dict(), load_run(straight, "cpu").program.state_dict()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    # a folder holding a run of another configuration: refused, nothing touched
    before = snapshot(run)
    capsys.readouterr()
    assert main([*command, "--epochs", "2", "--z-dim", "3"]) == 1
    err = capsys.readouterr().err
    assert f"{run} holds another run" in err and "model.z_dim: 2 there, 3 asked" in err
    assert "nothing was changed" in err and f"--resume {run}" in err
    assert snapshot(run) == before
    # the finished run: a clear message, exit 0, nothing trained
    assert main([*command, "--epochs", "2"]) == 0
    assert "has finished its 2 epochs; there is nothing to train" in capsys.readouterr().out
    assert snapshot(run) == before


@pytest.mark.parametrize("extra, message", [
    (["--overwrite"], "never replaces a run"), (["--resume", "RUN"], "does not go with --resume"),
])
def test_resume_if_present_refuses_contradicting_flags(extra, message, tmp_path, capsys):
    run = tmp_path / "run"
    extra = [str(run) if a == "RUN" else a for a in extra]
    assert main(["train", *TINY, "--out", str(run), "--resume-if-present", *extra]) == 1
    assert message in capsys.readouterr().err
    assert not run.exists()


def test_the_python_api_takes_if_present_too(tmp_path, data_dir):
    from pyro_vae.cli import build_parser, config_from_args
    from pyro_vae.train import train

    config = config_from_args(build_parser().parse_args(["train", *TINY, "--data-dir", str(data_dir), "--epochs", "1"]))
    train(config, tmp_path / "run", resume="if-present", progress=False, log=lambda s: None)
    lines = []
    train(config, tmp_path / "run", resume="if-present", progress=False, log=lines.append)
    assert any("has finished its 1 epoch;" in line for line in lines)
    with pytest.raises(ValueError, match="'if-present'"):
        train(config, tmp_path / "run", resume="auto")


# -- a checkpoint within an epoch, then SIGKILL, then resume -----------------------------

KILL_AFTER_A_MIDEPOCH_CHECKPOINT = """
import os, signal, sys
from pyro_vae import checkpoint
from pyro_vae.cli import main
real = checkpoint.save
def save(payload, path):
    real(payload, path)
    if payload["position"]["step"] > 0:  # a checkpoint within an epoch: saved, now die
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save = save
sys.exit(main(sys.argv[1:]))
"""


def test_a_timed_checkpoint_within_an_epoch_then_sigkill_resumes_bit_identical(tmp_path, data_dir, capsys):
    common = [*TINY, "--train-limit", "1000", "--batch-size", "10", "--epochs", "2", "--data-dir", str(data_dir)]
    env = {**os.environ, "PYRO_VAE_DATA": str(data_dir)}
    run = tmp_path / "run"
    killed = subprocess.run([sys.executable, "-c", KILL_AFTER_A_MIDEPOCH_CHECKPOINT, "train", *common, "--out",
                             str(run), "--checkpoint-every", "0.05s"], env=env, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    position = checkpoint.load(run / "checkpoint.pt")["position"]
    assert 0 < position["step"] < 100  # the clock saved within an epoch
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-progress"]) == 0  # here: the kill struck the other process
    assert f"after epoch {position['epoch'] + 1}, step {position['step']}" in capsys.readouterr().out
    straight = tmp_path / "straight"
    assert main(["train", *common, "--out", str(straight), "--checkpoint-every", "epoch"]) == 0
    assert_same_run(run, straight)


def assert_same_run(run: Path, reference: Path) -> None:
    got, want = load_run(run, "cpu"), load_run(reference, "cpu")
    assert got.epoch == want.epoch
    for name, value in want.program.state_dict().items():
        assert torch.equal(got.program.state_dict()[name], value), name
    assert [m["epoch"] for m in read_metrics(run)] == list(range(1, want.epoch + 1))  # each epoch once
    for a, b in zip(read_metrics(run), read_metrics(reference)):
        assert a["train_objective"] == b["train_objective"] and a["test_elbo"] == b["test_elbo"]


# -- torchrun --max-restarts: a lost worker, and the job finishes by itself --------------

TORCHRUN = [*TINY, "--train-limit", "1000", "--batch-size", "20", "--epochs", "3", "--checkpoint-every", "20"]


def torchrun(run: Path, data_dir: Path, faults: str = "", restarts: int = 0) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYRO_VAE_DATA": str(data_dir), "PYRO_VAE_TEST_FAULT": faults}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "--max-restarts", str(restarts), str(REPO / "tests" / "elastic_worker.py"), "train", *TORCHRUN,
               "--out", str(run), "--resume-if-present"]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_torchrun_restarts_killed_workers_and_the_run_finishes_as_if_uninterrupted(tmp_path, data_dir):
    """Two faults in one job, one per attempt (50 steps an epoch, a checkpoint every 20):
    rank 0 dies halfway through writing its second checkpoint (step 40), so the first
    restart resumes from step 20; then rank 1 dies before its 50th step of that attempt
    (global step 70, in epoch 2), so the second restart resumes from the step-60 checkpoint.
    The job then finishes by itself, exactly as a job that was never interrupted."""
    run = tmp_path / "run"
    done = torchrun(run, data_dir, "kill-in-checkpoint:2;kill-at-step:1:50", restarts=2)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert out.count("exitcode: -9") == 2  # each fault struck: a worker died by SIGKILL, twice
    first, second = (out.index(f"resuming {run} {where} (of 3 epochs)")
                     for where in ("after epoch 1, step 20", "after epoch 2, step 10"))
    assert first < second
    assert "Traceback" not in out
    assert not checkpoint.stale_temporaries(run)  # the half-written temporary file was cleared
    uninterrupted = tmp_path / "uninterrupted"
    straight = torchrun(uninterrupted, data_dir)
    assert straight.returncode == 0, straight.stdout + straight.stderr
    assert_same_run(run, uninterrupted)
