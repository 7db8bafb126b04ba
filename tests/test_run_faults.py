"""Operator faults, injected for real: two writers on one run folder, a full disk or a
file-size limit, torn metrics lines. Nothing is lost, every fault is explained."""

import errno
import json
import os
import resource
import signal
import subprocess
import sys

import pytest
import torch

from pyro_vae import checkpoint, load_run
from pyro_vae.runs import RunDirError, RunLockedError, RunWriteError, read_metrics, run_lock
from pyro_vae.train import train
import pyro_vae.train as train_module

from test_reliability import config, flags, start, wait_for_epochs

pytestmark = pytest.mark.slow  # subprocesses and whole runs: outside `-m "not slow"`

EPOCHS = 3
quiet = dict(progress=False, log=lambda s: None)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """The uninterrupted 3-epoch run every faulty one must end equal to."""
    run = train(config(data_dir, epochs=EPOCHS), tmp_path_factory.mktemp("ref") / "run", **quiet)
    return run.program.state_dict()


def assert_finished_like(run_dir, reference):
    final = load_run(run_dir, device="cpu")
    assert final.epoch == EPOCHS
    for name, value in final.program.state_dict().items():
        assert torch.equal(value, reference[name]), name
    assert [m["epoch"] for m in read_metrics(run_dir)] == list(range(1, EPOCHS + 1))  # each epoch once
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == list(range(1, EPOCHS + 1))  # and whole


def here(args, data_dir, monkeypatch, capsys):
    """``pyro-vae ARGS`` in this process, where no separate process is the point: ``(exit
    status, stdout, stderr)``."""
    from pyro_vae.cli import main

    monkeypatch.setenv("PYRO_VAE_DATA", str(data_dir))
    capsys.readouterr()
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


def cli(args, data_dir, **kw):
    env = {**os.environ, "PYRO_VAE_DATA": str(data_dir), "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, "-m", "pyro_vae", *args], env=env, capture_output=True, text=True,
                          timeout=300, **kw)


def one_epoch(run_dir, data_dir):
    train(config(data_dir, epochs=1), run_dir, **quiet)


# -- one writer per run folder ------------------------------------------------------------


@pytest.mark.slow
def test_a_second_training_on_a_folder_being_trained_stops_at_once(tmp_path, data_dir, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    # far more epochs than it will run: it is still training, whatever the machine's speed,
    # when two more processes start; it is stopped by a signal once they have been refused
    long = [*flags("vae-bernoulli"), "--epochs", "1000"]
    first = start([*long, "--out", str(run_dir)], data_dir)
    assert wait_for_epochs(run_dir, 2, first)  # epoch 1's checkpoint written, for evaluate below
    # The first holds the lock, stopped: a second that waited for the lock would never
    # return, so returning at all shows that it did not wait, however slow the machine is.
    # (The two are run in this process, which is not the trainer's: the lock is the kernel's
    # and knows only processes.)
    os.kill(first.pid, signal.SIGSTOP)
    try:
        for args in (["train", "--resume", str(run_dir), "--no-progress"],
                     ["train", *long, "--out", str(run_dir), "--overwrite"]):
            code, _, err = here(args, data_dir, monkeypatch, capsys)  # this process is another one
            assert code == 1
            assert f"{run_dir} is being trained by another process (pid {first.pid}" in err
        # read-only commands work on the folder meanwhile (from another process than the trainer's)
        assert here(["evaluate", str(run_dir), "--num-samples", "0", "--limit", "10"], data_dir, monkeypatch,
                    capsys)[0] == 0
        assert first.poll() is None
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert wait_for_epochs(run_dir, 3, first)  # it trains on, its files untouched by the refused two
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=300)
    assert first.returncode == 128 + signal.SIGINT, err
    done = [m["epoch"] for m in read_metrics(run_dir)]
    assert done == list(range(1, len(done) + 1)) and len(done) >= 3  # each epoch once, none lost
    assert "is being trained" not in err
    # the kernel released the lock with the process: the folder can be resumed now
    assert here(["train", "--resume", str(run_dir), "--epochs", str(len(done) + 1), "--no-progress"], data_dir,
                monkeypatch, capsys)[0] == 0


def test_the_lock_is_reentrant_in_one_process_and_exclusive_across_processes(tmp_path):
    with run_lock(tmp_path), run_lock(tmp_path):  # fit inside train takes it twice
        other = subprocess.run([sys.executable, "-c", (
            "import sys; from pathlib import Path; from pyro_vae.runs import run_lock\n"
            "with run_lock(Path(sys.argv[1])): pass"), str(tmp_path)], capture_output=True, text=True)
        assert other.returncode == 1 and f"pid {os.getpid()}" in other.stderr
    with run_lock(tmp_path):  # released on exit
        pass


# -- a checkpoint or metrics write that fails --------------------------------------------


def test_checkpoint_write_under_a_file_size_limit_then_resume_is_exact(tmp_path, data_dir, reference, monkeypatch,
                                                                        capsys):
    run_dir = tmp_path / "run"
    one_epoch(run_dir, data_dir)
    limit = (run_dir / "checkpoint.pt").stat().st_size // 2  # metrics lines fit, a checkpoint does not

    def small_files():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    res = cli(["train", "--resume", str(run_dir), "--epochs", str(EPOCHS), "--no-progress"], data_dir,
              preexec_fn=small_files)
    assert res.returncode == 1, res.stderr
    err = res.stderr
    assert "could not write the checkpoint of epoch 2" in err and "File too large" in err
    assert f"(after epoch 1) is intact" in err and f"pyro-vae train --resume {run_dir}" in err
    assert "Traceback" not in err and "enforce fail" not in err
    assert checkpoint.load(run_dir / "checkpoint.pt")["epoch"] == 1  # the previous checkpoint loads
    assert not list(run_dir.glob(".checkpoint.pt.*.tmp"))  # no half-written temporary left behind
    code, _, err = here(["train", "--resume", str(run_dir), "--epochs", str(EPOCHS), "--no-progress"], data_dir,
                        monkeypatch, capsys)  # no limit
    assert code == 0, err
    assert_finished_like(run_dir, reference)


@pytest.mark.parametrize("what", ["checkpoint", "metrics"])
def test_no_space_left_then_resume_is_exact(tmp_path, data_dir, reference, monkeypatch, what):
    run_dir = tmp_path / "run"
    calls = {"n": 0}

    def full_disk(real):
        def write(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:  # epoch 2's write
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return real(*args, **kwargs)
        return write

    if what == "checkpoint":
        monkeypatch.setattr(checkpoint, "save", full_disk(checkpoint.save))
    else:
        monkeypatch.setattr(train_module, "append_jsonl", full_disk(train_module.append_jsonl))
    with pytest.raises(RunWriteError) as info:
        train(config(data_dir, epochs=EPOCHS), run_dir, **quiet)
    msg = str(info.value)
    assert f"could not write the {what} of epoch 2" in msg and "No space left on device" in msg
    assert "(after epoch 1) is intact" in msg
    monkeypatch.undo()
    assert checkpoint.load(run_dir / "checkpoint.pt")["epoch"] == 1
    train(config(data_dir, epochs=EPOCHS), run_dir, resume=True, **quiet)
    assert_finished_like(run_dir, reference)


def test_a_write_failure_before_any_checkpoint_says_so(tmp_path, data_dir, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "save", full_disk)
    with pytest.raises(RunWriteError, match="no epoch had been saved yet"):
        train(config(data_dir, epochs=1), tmp_path / "run", **quiet)


def test_no_space_for_the_longer_config_of_a_resume_says_so_and_keeps_the_run(tmp_path, data_dir, monkeypatch):
    """A resume with more epochs rewrites config.json; a full disk stops it before any step,
    with the run as it was, and the same resume works once there is space."""
    run_dir = tmp_path / "run"
    train(config(data_dir, epochs=1), run_dir, **quiet)
    before = {name: (run_dir / name).read_bytes() for name in ("config.json", "checkpoint.pt", "metrics.jsonl")}

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(train_module, "write_json", full_disk)
    with pytest.raises(RunDirError) as info:
        train(config(data_dir, epochs=2), run_dir, resume=True, **quiet)
    assert str(info.value) == (f"cannot update {run_dir / 'config.json'}: No space left on device; free space and "
                               "resume again")
    assert {name: (run_dir / name).read_bytes() for name in before} == before
    monkeypatch.undo()
    train(config(data_dir, epochs=2), run_dir, resume=True, **quiet)
    assert json.loads((run_dir / "config.json").read_text())["train"]["epochs"] == 2
    assert checkpoint.load(run_dir / "checkpoint.pt")["epoch"] == 2


# -- torn metrics lines --------------------------------------------------------------------


def test_a_torn_last_metrics_line_is_dropped_on_resume(tmp_path, data_dir, reference):
    run_dir = tmp_path / "run"
    train(config(data_dir, epochs=2), run_dir, **quiet)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 3, "train_objective": -1')  # the process died mid-append
    assert [m["epoch"] for m in read_metrics(run_dir)] == [1, 2]  # readers skip it
    lines = []
    train(config(data_dir, epochs=EPOCHS), run_dir, resume=True, progress=False, log=lines.append)
    assert any("was cut short" in line and "dropped it" in line for line in lines)
    assert_finished_like(run_dir, reference)


PATCHED_CLI = """
import os, signal, sys
from pyro_vae import checkpoint, runs
import pyro_vae.train as train_module
from pyro_vae.cli import main

where = sys.argv[1]
if where == "append":  # die halfway through writing epoch 2's metrics line
    real = train_module.append_jsonl
    count = [0]
    def append(path, record):
        count[0] += 1
        if count[0] == 2:
            fd = os.open(path, os.O_WRONLY | os.O_APPEND)
            os.write(fd, b'{"epoch": 2, "train_obj')
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, record)
    train_module.append_jsonl = append
elif where == "rewrite":  # die while the metrics file is being rewritten on resume
    real = checkpoint.atomic_write
    def atomic_write(path, data):
        if str(path).endswith("metrics.jsonl"):
            import tempfile
            fd, tmp = tempfile.mkstemp(prefix=".metrics.jsonl.", suffix=".tmp", dir=os.path.dirname(path))
            os.write(fd, bytes(data)[: len(data) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        real(path, data)
    checkpoint.atomic_write = atomic_write
sys.exit(main(sys.argv[2:]))
"""


def patched(where, args, data_dir):
    env = {**os.environ, "PYRO_VAE_DATA": str(data_dir)}
    return subprocess.run([sys.executable, "-c", PATCHED_CLI, where, *args], env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_sigkill_during_a_metrics_append_and_during_the_resume_rewrite(tmp_path, data_dir, reference, monkeypatch,
                                                                       capsys):
    run_dir = tmp_path / "run"
    args = ["train", *flags("vae-bernoulli"), "--epochs", str(EPOCHS), "--out", str(run_dir)]
    res = patched("append", args, data_dir)
    assert res.returncode == -signal.SIGKILL
    assert (run_dir / "metrics.jsonl").read_text().endswith('{"epoch": 2, "train_obj')
    assert checkpoint.load(run_dir / "checkpoint.pt")["epoch"] == 1
    # the resume's repair of the torn line is killed in its turn: the file is as it was
    res = patched("rewrite", ["train", "--resume", str(run_dir), "--no-progress"], data_dir)
    assert res.returncode == -signal.SIGKILL
    assert (run_dir / "metrics.jsonl").read_text().endswith('{"epoch": 2, "train_obj')
    code, out, err = here(["train", "--resume", str(run_dir), "--no-progress"], data_dir, monkeypatch, capsys)
    assert code == 0, err
    assert "was cut short" in out
    assert_finished_like(run_dir, reference)
