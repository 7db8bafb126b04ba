"""Callbacks, and the TensorBoard and MLflow views of a run: what they record is metrics.jsonl."""

import json

import pytest
import torch

from pyro_vae import TrainConfig, fit
from pyro_vae.callbacks import CallbackError, MLflow, TensorBoard, scalars_of
from pyro_vae.data import ImageData
from pyro_vae.runs import read_metrics

from oracle_programs import SHAPE, labels_of, masked_site

pytestmark = pytest.mark.slow  # subprocesses and whole runs: outside `-m "not slow"`

SETTINGS = dict(batch_size=8, device="cpu", eval_batch_size=100, lr=1e-2)
STEPS = 3  # 24 images in batches of 8


def images(n=24, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, *SHAPE), 0.4), generator=gen)


def train(run_dir, epochs, callbacks=(), resume=False):
    x, test = images(), images(8, seed=2)
    return fit(masked_site(), ImageData(x, labels_of(x), binary=True), run_dir, factory="oracle_programs:masked_site",
               test=ImageData(test, labels_of(test), binary=True), settings=TrainConfig(epochs=epochs, **SETTINGS),
               callbacks=callbacks, resume=resume, progress=False, log=lambda line: None)


class Recorder:
    def __init__(self, fail=None):
        self.calls, self.fail = [], fail

    def _note(self, hook, *args):
        self.calls.append((hook, *args))
        if self.fail is not None and self.fail(hook, *args):
            raise ValueError("told to fail")

    def on_train_start(self, run):
        self._note("start", run.epoch, run.run_dir, run.config.train.epochs)

    def on_step(self, run, step, loss):
        assert isinstance(loss, torch.Tensor) and loss.dim() == 0  # handed over as a tensor, unread
        self._note("step", step)

    def on_epoch_end(self, run, record):
        self._note("epoch", run.epoch, dict(record))

    def on_train_end(self, run):
        self._note("end", run.epoch)


def test_hooks_are_called_in_order_with_the_documented_arguments(tmp_path):
    recorder = Recorder()
    train(tmp_path / "run", 2, [recorder])
    records = read_metrics(tmp_path / "run")
    assert recorder.calls == (
        [("start", 0, tmp_path / "run", 2)] + [("step", s) for s in (1, 2, 3)] + [("epoch", 1, records[0])]
        + [("step", s) for s in (4, 5, 6)] + [("epoch", 2, records[1])] + [("end", 2)])
    # a resumed run goes on counting its epochs and steps
    again = Recorder()
    train(tmp_path / "run", 3, [again], resume=True)
    assert again.calls[0][:2] == ("start", 2) and [c[1] for c in again.calls if c[0] == "step"] == [7, 8, 9]
    assert again.calls[-2] == ("epoch", 3, read_metrics(tmp_path / "run")[2]) and again.calls[-1] == ("end", 3)


@pytest.mark.parametrize("when, kept", [("step", 1), ("epoch", 2)])
def test_a_callback_that_raises_stops_training_with_a_resumable_run(tmp_path, when, kept):
    fail = (lambda hook, *a: hook == "step" and a[0] == 5) if when == "step" else \
        (lambda hook, *a: hook == "epoch" and a[0] == 2)
    with pytest.raises(CallbackError, match=rf"Recorder\.on_{'step' if when == 'step' else 'epoch_end'} raised "
                                            rf"ValueError: told to fail.*holds epoch {kept}"):
        train(tmp_path / "run", 3, [Recorder(fail)])
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == list(range(1, kept + 1))
    straight = train(tmp_path / "straight", 3).program.state_dict()
    resumed = train(tmp_path / "run", 3, resume=True).program.state_dict()
    assert all(torch.equal(resumed[k], v) for k, v in straight.items())  # as if nothing had happened
    assert [r["epoch"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_a_finished_run_resumed_with_callbacks_gives_them_the_epochs_a_kill_kept_from_them(tmp_path):
    """Killed after the last epoch's checkpoint, before every logger had it (here MLflow
    fails where a kill would strike): resuming the finished run trains nothing, and each
    logger ends with every epoch once; the callbacks see a start and an end, no epoch."""
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed (CI installs it)")

    class KilledAtTheLastEpoch(MLflow):
        def on_epoch_end(self, run, record):
            if record["epoch"] == 2:
                raise RuntimeError("killed")
            super().on_epoch_end(run, record)

    run_dir = tmp_path / "run"
    with pytest.raises(CallbackError, match="holds epoch 2"):
        train(run_dir, 2, [TensorBoard(), KilledAtTheLastEpoch()])
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{(run_dir / 'mlflow.db').resolve()}")
    run_id = (run_dir / "mlflow_run_id").read_text().strip()
    assert [m.step for m in client.get_metric_history(run_id, "train/elbo")] == [1]
    recorder = Recorder()
    train(run_dir, 2, [TensorBoard(), MLflow(), recorder], resume=True)
    assert recorder.calls == [("start", 2, run_dir, 2), ("end", 2)]
    records = read_metrics(run_dir)
    expected = [scalars_of(r)["train/elbo"] for r in records]
    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train/elbo"))
    assert [s for s, _ in history] == [1, 2] and [v for _, v in history] == pytest.approx(expected, rel=1e-6)
    scalars = _tensorboard_scalars(run_dir / "tensorboard")["train/elbo"]
    assert [s for s, _ in scalars] == [1, 2] and [v for _, v in scalars] == pytest.approx(expected, rel=1e-6)
    assert client.get_run(run_id).info.status == "FINISHED"


def test_an_object_without_hooks_is_refused(tmp_path):
    with pytest.raises(TypeError, match="not a callback"):
        train(tmp_path / "run", 1, [object()])


def _tensorboard_scalars(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_holds_metrics_jsonl_and_each_epoch_once_after_a_crash_and_resume(tmp_path):
    from torch.utils.tensorboard import SummaryWriter

    log_dir = tmp_path / "run" / "tensorboard"
    train(tmp_path / "run", 2, [TensorBoard()])
    # a crash after TensorBoard got epoch 3 but before its checkpoint: a stray point ahead
    stray = SummaryWriter(str(log_dir))
    stray.add_scalar("train/elbo", 12345.0, 3)
    stray.close()
    train(tmp_path / "run", 4, [TensorBoard(images_every=2)], resume=True)
    scalars = _tensorboard_scalars(log_dir)
    records = read_metrics(tmp_path / "run")
    expected = {}
    for record in records:
        for name, value in scalars_of(record).items():
            expected.setdefault(name, []).append((record["epoch"], value))
    assert set(scalars) == set(expected)
    for name, points in expected.items():
        assert [s for s, _ in scalars[name]] == [1, 2, 3, 4], name  # each epoch once, in order
        assert [v for _, v in scalars[name]] == pytest.approx([v for _, v in points], rel=1e-6), name


def test_mlflow_holds_the_configuration_and_metrics_jsonl(tmp_path):
    mlflow = pytest.importorskip("mlflow", reason="the mlflow extra is not installed (CI installs it)")
    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{(tmp_path / 'run' / 'mlflow.db').resolve()}")
    train(tmp_path / "run", 2, [MLflow()])
    train(tmp_path / "run", 3, [MLflow()], resume=True)  # the same MLflow run goes on
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    logged = client.get_run(run_id)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert logged.data.params["train.lr"] == str(config["train"]["lr"])
    assert logged.data.params["model.program"] == config["model"]["program"]
    for name in ("train/elbo", "test/kl", "train_objective"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        expected = [(r["epoch"], scalars_of(r)[name]) for r in read_metrics(tmp_path / "run")]
        assert [s for s, _ in history] == [1, 2, 3]
        assert [v for _, v in history] == pytest.approx([v for _, v in expected], rel=1e-6)
    artifacts = {a.path for a in client.list_artifacts(run_id)}
    assert {"config.json", "metrics.jsonl"} <= artifacts


def test_a_missing_extra_is_an_error_that_names_the_install_command(monkeypatch):
    import builtins

    real = builtins.__import__

    def without_mlflow(name, *args, **kwargs):
        if name == "mlflow" or name.startswith("mlflow."):
            raise ImportError("No module named 'mlflow'")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", without_mlflow)
    with pytest.raises(ImportError, match=r'pip install -e "\.\[mlflow\]"'):
        MLflow()


@pytest.mark.slow
def test_the_command_line_logs_to_tensorboard_and_mlflow(tmp_path, data_dir):
    pytest.importorskip("mlflow", reason="the mlflow extra is not installed (CI installs it)")
    from pyro_vae.cli import main

    run = tmp_path / "run"
    small = ["--data-dir", str(data_dir), "--train-limit", "300", "--test-limit", "100", "--z-dim", "2",
             "--hidden-dims", "32", "--batch-size", "100", "--no-progress"]
    assert main(["train", *small, "--epochs", "1", "--out", str(run), "--tensorboard", "--mlflow"]) == 0
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress", "--tensorboard", "--mlflow"]) == 0
    assert main(["evaluate", str(run), "--num-samples", "10"]) == 0
    scalars = _tensorboard_scalars(run / "tensorboard")
    assert [s for s, _ in scalars["test/elbo"]] == [1, 2]
    assert [s for s, _ in scalars["evaluate/elbo"]] == [2]  # evaluate's numbers at the run's epoch
    assert (run / "mlflow.db").is_file() and (run / "mlflow_run_id").is_file()


@pytest.mark.slow
def test_a_sigkilled_run_resumes_with_each_epoch_once_in_tensorboard_and_mlflow(tmp_path, data_dir):
    """SIGKILL at a random moment after the first epoch (before, during or after an epoch's
    logging), then --resume with the same flags: every epoch once, with metrics.jsonl's values."""
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    pytest.importorskip("mlflow", reason="the mlflow extra is not installed (CI installs it)")
    run = tmp_path / "run"
    small = ["--data-dir", str(data_dir), "--train-limit", "600", "--test-limit", "100", "--z-dim", "2",
             "--hidden-dims", "32", "--batch-size", "100", "--no-progress", "--tensorboard", "--mlflow"]
    cmd = [sys.executable, "-m", "pyro_vae", "train", *small, "--epochs", "4", "--out", str(run)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 1):
        time.sleep(0.05)
    time.sleep(random.Random(0).uniform(0.0, 1.5))
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    from pyro_vae.cli import main

    assert main(["train", "--resume", str(run), "--no-progress", "--tensorboard", "--mlflow"]) == 0
    records = read_metrics(run)
    assert [r["epoch"] for r in records] == [1, 2, 3, 4]
    scalars = _tensorboard_scalars(run / "tensorboard")
    import mlflow

    client = mlflow.tracking.MlflowClient(tracking_uri=f"sqlite:///{(run / 'mlflow.db').resolve()}")
    run_id = (run / "mlflow_run_id").read_text().strip()
    for name in ("train/elbo", "test/elbo", "train_objective"):
        expected = [scalars_of(r)[name] for r in records]
        assert [s for s, _ in scalars[name]] == [1, 2, 3, 4], name
        assert [v for _, v in scalars[name]] == pytest.approx(expected, rel=1e-6), name
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, name))
        assert [s for s, _ in history] == [1, 2, 3, 4], name
