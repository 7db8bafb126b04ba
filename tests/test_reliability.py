"""Fault injection: SIGKILL at random moments, SIGINT/SIGTERM, NaNs. Nothing is lost."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from dataclasses import replace

import pytest
import torch

from pyro_vae import DataConfig, ModelConfig, RunConfig, TrainConfig, checkpoint, load_run
from pyro_vae.train import train
from pyro_vae.runs import read_metrics
from pyro_vae.train import TrainingDivergedError

from pyro_vae.models import build_model

# the NaN tests make Pyro warn about the NaN they inject
pytestmark = [pytest.mark.filterwarnings("ignore:Encountered NaN"), pytest.mark.slow]

EPOCHS = 5
FLAGS = ["--train-limit", "2000", "--test-limit", "100", "--batch-size", "50", "--z-dim", "20",
         "--hidden-dims", "300", "--eval-batch-size", "500", "--device", "cpu", "--no-progress"]
# the default VAE, and another model and likelihood on another data set: the guarantees
# belong to the loop, not to one program
FLAVOURS = {
    "vae-bernoulli": {},
    "ae-gaussian": {"model": "ae", "likelihood": "gaussian", "dataset": "fashion-mnist"},
}


def config(data_dir, flavour="vae-bernoulli", **train_kw):
    extra = FLAVOURS[flavour]
    return RunConfig(
        ModelConfig(z_dim=20, hidden_dims=(300,), **{k: v for k, v in extra.items() if k != "dataset"}),
        DataConfig(data_dir=str(data_dir), train_limit=2000, test_limit=100, dataset=extra.get("dataset", "mnist")),
        TrainConfig(**{"epochs": EPOCHS, "batch_size": 50, "eval_batch_size": 500, "device": "cpu", **train_kw}),
    )


def flags(flavour):
    return [*FLAGS, *(a for k, v in FLAVOURS[flavour].items() for a in ("--" + k, v))]


def start(args, data_dir):
    env = {**os.environ, "PYRO_VAE_DATA": str(data_dir), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "pyro_vae.cli", "train", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def resume_here(run_dir, data_dir, monkeypatch, capsys) -> int:
    """``pyro-vae train --resume RUN_DIR`` in this process (the faults struck the others)."""
    from pyro_vae.cli import main

    monkeypatch.setenv("PYRO_VAE_DATA", str(data_dir))
    code = main(["train", "--resume", str(run_dir), "--no-progress"])
    assert code == 0, capsys.readouterr().err
    return code


def wait_for_epochs(run_dir, k, proc, timeout=120):
    """Block until metrics.jsonl holds k epochs (or the process ends)."""
    deadline = time.time() + timeout
    path = run_dir / "metrics.jsonl"
    while time.time() < deadline and proc.poll() is None:
        if path.exists() and len(path.read_text().splitlines()) >= k:
            return True
        time.sleep(0.01)
    return False


@pytest.fixture(scope="module", params=list(FLAVOURS))
def flavour(request):
    return request.param


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir, flavour):
    """The uninterrupted run that every interrupted one must reproduce exactly."""
    run = train(config(data_dir, flavour), tmp_path_factory.mktemp("ref") / "run", progress=False,
                log=lambda s: None)
    return run.program.state_dict()


def assert_same_parameters(run_dir, reference):
    final = load_run(run_dir, device="cpu")
    assert final.epoch == EPOCHS
    for name, value in final.program.state_dict().items():
        assert torch.equal(value, reference[name]), name


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_exact(tmp_path, data_dir, reference, flavour, monkeypatch,
                                                        capsys):
    run_dir = tmp_path / "run"
    rnd = random.Random(1234)
    kills = 0
    proc = start([*flags(flavour), "--epochs", str(EPOCHS), "--out", str(run_dir)], data_dir)
    for k in (1, 2, 4):  # kill somewhere inside epoch k + 1 (or while its checkpoint is written)
        assert wait_for_epochs(run_dir, k, proc), proc.communicate()
        time.sleep(rnd.uniform(0.0, 0.4))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += proc.returncode == -signal.SIGKILL
        # whatever the moment, the latest complete checkpoint is intact and loadable
        state = checkpoint.load(run_dir / "checkpoint.pt")
        assert state["epoch"] >= k - 1  # metrics are written just before the checkpoint
        if k < 4:
            proc = start(["--resume", str(run_dir), "--no-progress"], data_dir)
    assert kills >= 2  # the kills landed while training ran
    assert resume_here(run_dir, data_dir, monkeypatch, capsys) == 0  # the last resume, in this process
    assert_same_parameters(run_dir, reference)
    assert [m["epoch"] for m in read_metrics(run_dir)] == list(range(1, EPOCHS + 1))


SIGNALS = {"vae-bernoulli": signal.SIGINT, "ae-gaussian": signal.SIGTERM}  # each signal, with one flavour


@pytest.mark.slow
def test_graceful_interrupt_saves_the_step_and_resumes_exactly(tmp_path, data_dir, reference, flavour, monkeypatch,
                                                               capsys):
    sig = SIGNALS[flavour]
    run_dir = tmp_path / "run"
    proc = start([*flags(flavour), "--epochs", str(EPOCHS), "--out", str(run_dir)], data_dir)
    assert wait_for_epochs(run_dir, 1, proc)
    time.sleep(0.1)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert f"pyro-vae train --resume {run_dir}" in err and signal.Signals(sig).name in err
    state = checkpoint.load(run_dir / "checkpoint.pt")
    assert state["position"]["step"] > 0 or state["epoch"] > 1  # saved mid-epoch, after a finished step
    assert resume_here(run_dir, data_dir, monkeypatch, capsys) == 0
    assert_same_parameters(run_dir, reference)


WRITER = """
import sys, torch
from pyro_vae import checkpoint
for epoch in range(2, 100):
    checkpoint.save({"epoch": epoch, "w": torch.full((10_000_000,), float(epoch))}, sys.argv[1])
    print(epoch, flush=True)  # saved: the rename is done
"""


def kill_while_a_temporary_exists(path, after: int, timeout=60.0):
    """Start a process saving checkpoints to ``path`` over and over (epochs 2, 3, ...);
    once it reports epoch ``after`` saved, SIGKILL it the moment a temporary file of the
    next save is seen in the folder. Returns the temporaries left behind and the epochs
    the writer reported saved."""
    writer = subprocess.Popen([sys.executable, "-c", WRITER, str(path)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    try:
        saved = [int(writer.stdout.readline()) for _ in range(after - 1)]
        while not list(path.parent.glob(f".{path.name}.*.tmp")):
            assert writer.poll() is None and time.monotonic() < deadline, "no temporary file was ever seen"
            time.sleep(0.0005)
    finally:
        writer.kill()
        writer.wait()
    saved += [int(line) for line in writer.stdout.read().split()]
    writer.stdout.close()
    return list(path.parent.glob(f".{path.name}.*.tmp")), saved


def test_sigkill_during_checkpoint_write_keeps_the_previous_one(tmp_path):
    """SIGKILL between a save's temporary file and its rename (the temporary it leaves
    proves the moment) leaves the previous checkpoint, complete."""
    path = tmp_path / "checkpoint.pt"
    for _ in range(3):  # the rare kill that comes just after a rename proves nothing: again
        checkpoint.save({"epoch": 1, "w": torch.full((10_000_000,), 1.0)}, path)
        left, saved = kill_while_a_temporary_exists(path, after=2)
        if left:
            break
    assert len(left) == 1, "the kill never landed inside a write"
    assert saved == [2]  # the writer was inside the save of epoch 3: the file must be epoch 2's, whole
    state = checkpoint.load(path)
    assert state["epoch"] == 2 and torch.equal(state["w"], torch.full((10_000_000,), 2.0))


class PoisonAfter:
    """A forward hook that turns the decoder's output into NaN from the n-th call on."""

    def __init__(self, n, where="output"):
        self.n, self.calls, self.where = n, 0, where

    def __call__(self, module, inputs, output):
        self.calls += 1
        if self.calls >= self.n:
            if self.where == "output":
                return output * float("nan")
            # finite output, NaN gradient: poison only the backward pass
            output.register_hook(lambda g: g * float("nan"))
        return output


@pytest.mark.filterwarnings("ignore:pyro_vae. the model and guide could not be recorded")  # the hook, for captured
@pytest.mark.parametrize("engine", ["svi", "module", "captured"])
@pytest.mark.parametrize("where", ["output", "gradient"])
def test_nan_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, data_dir, engine, where):
    cfg = replace(config(data_dir, epochs=3, engine=engine), data=DataConfig(data_dir=str(data_dir), train_limit=200, test_limit=50))
    # 4 steps per epoch; evaluations take no gradient in the networks and are not counted
    hook = PoisonAfter(6, where)  # training calls only: epoch 2, step 2
    program = build_model(cfg.model, (1, 28, 28))
    program.decoder.register_forward_hook(lambda m, i, o: hook(m, i, o) if o.requires_grad else o)
    with pytest.raises(TrainingDivergedError) as info:
        train(cfg, tmp_path / "run", progress=False, log=lambda s: None, program=program)
    msg = str(info.value)
    assert "epoch 2, step 2" in msg and "after epoch 1" in msg
    assert ("gradient" in msg) == (where == "gradient")
    state = checkpoint.load(tmp_path / "run" / "checkpoint.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert len(read_metrics(tmp_path / "run")) == 1
