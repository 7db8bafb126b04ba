"""Watching a run learn: callbacks, and the TensorBoard and MLflow views of a run.

A callback is any object with some of these methods; :func:`pyro_vae.fit` (and
``train(config, callbacks=...)``) calls them in this order::

    on_train_start(run)           # once, before the first step (a resumed run: before its next step)
    on_step(run, step, loss)      # after every step
    on_epoch_end(run, record)     # after an epoch's metrics are written and its checkpoint saved
    on_train_end(run)             # once, when the run has trained all its epochs

``run`` is the :class:`pyro_vae.runs.Run` being trained: ``run.program``, ``run.config``,
``run.run_dir``, ``run.device``, ``run.epoch`` (the epochs finished so far) and
``run.test`` (the test images, or None). ``record`` is the epoch's record, the very dict
written to metrics.jsonl, which stays the source of truth: the trackers below are views
of it. ``step`` counts steps from the start of the run (a resumed run goes on counting);
``loss`` is the step's loss as the engine returns it, **a device tensor**: reading it
(``float(loss)``) waits for the device, so a callback that logs every step should read
it only now and then. Under torchrun only rank 0 calls callbacks.

A callback that raises stops training at once with :class:`CallbackError`, which names
the callback and what the run's checkpoint holds; nothing of the unfinished epoch is
saved, and the run resumes from its checkpoint as after any stop.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

HOOKS = ("on_train_start", "on_step", "on_epoch_end", "on_train_end")


class CallbackError(RuntimeError):
    """A callback raised; training stopped (the message says where the run can resume)."""


class Callbacks:
    """Several callbacks called in turn; a hook a callback lacks is skipped."""

    def __init__(self, callbacks=()):
        self.callbacks = list(callbacks or ())
        for callback in self.callbacks:
            if not any(callable(getattr(callback, hook, None)) for hook in HOOKS):
                raise TypeError(f"{type(callback).__name__} is not a callback: it has none of {', '.join(HOOKS)}")
        self.steps = {hook: [getattr(c, hook) for c in self.callbacks if callable(getattr(c, hook, None))]
                      for hook in HOOKS}

    def __bool__(self) -> bool:
        return bool(self.callbacks)

    def call(self, hook: str, run, *args) -> None:
        for fn in self.steps[hook]:
            try:
                fn(run, *args)
            except Exception as err:  # noqa: BLE001 - any failure stops training, named
                owner = type(getattr(fn, "__self__", fn)).__name__
                raise CallbackError(
                    f"callback {owner}.{hook} raised {type(err).__name__}: {err}. Training stopped; "
                    f"{_kept(run)}") from err


def _kept(run) -> str:
    if run.epoch == 0:
        return f"{run.run_dir} holds no finished epoch yet"
    return (f"the checkpoint in {run.run_dir} holds epoch {run.epoch}; continue with: "
            f"pyro-vae train --resume {run.run_dir}")


SCALARS = ("elbo", "log_lik", "kl")  # per split, from the epoch's record
TRAINING = ("train_objective", "kl_weight", "lr", "seconds")


def scalars_of(record: dict) -> dict[str, float]:
    """The record's numbers under TensorBoard/MLflow names: ``train/elbo``, ``test/kl``,
    ``train_objective``, ... (what metrics.jsonl holds, nothing more)."""
    out = {}
    for split in ("train", "test"):
        for name in SCALARS:
            key = f"{split}_{name}"
            if isinstance(record.get(key), (int, float)):
                out[f"{split}/{name}"] = float(record[key])
    for key in TRAINING:
        if isinstance(record.get(key), (int, float)):
            out[key] = float(record[key])
    return out


class TensorBoard:
    """A run's epochs in TensorBoard: ``tensorboard --logdir RUN/tensorboard``.

    Per epoch (the step is the epoch's number): the ELBO, expected log-likelihood and KL
    of each split, the training objective, KL weight, learning rate and seconds; every
    ``images_every`` epochs (and the last) 64 samples from the prior and reconstructions
    of 8 test images, for programs with those views; the configuration as text at the
    start. A resumed run writes on from its checkpoint's epoch, whatever a crash left: the
    epochs the event files hold beyond the checkpoint are purged (TensorBoard's
    ``purge_step``), and those the checkpoint holds but the files lack (a crash after
    the checkpoint, before the flush) are written from metrics.jsonl, so every epoch
    appears once.
    """

    def __init__(self, log_dir: str | Path | None = None, images_every: int = 5):
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: F401
        except ImportError as err:
            raise ImportError("--tensorboard needs the tensorboard package: pip install tensorboard "
                              "(or pip install -e \".[tensorboard]\")") from err
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.images_every = max(1, int(images_every))
        self.writer = None

    def on_train_start(self, run) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = self.log_dir or Path(run.run_dir) / "tensorboard"
        if run.epoch == 0:
            self.writer = SummaryWriter(str(self.log_dir))
            self.writer.add_text("config", "```\n" + json.dumps(run.config.to_dict(), indent=2) + "\n```", 0)
            return
        logged = [step for step in _logged_epochs(self.log_dir) if step <= run.epoch]
        last = max(logged, default=0)
        self.writer = SummaryWriter(str(self.log_dir), purge_step=last + 1)
        for record in _records(run.run_dir):
            if last < record["epoch"] <= run.epoch:
                self._scalars(record)
        self.writer.flush()

    def on_epoch_end(self, run, record: dict) -> None:
        epoch = int(record["epoch"])
        self._scalars(record)
        if epoch % self.images_every == 0 or epoch == run.config.train.epochs:
            self._images(run, epoch)
        self.writer.flush()

    def _scalars(self, record: dict) -> None:
        for name, value in scalars_of(record).items():
            if math.isfinite(value):
                self.writer.add_scalar(name, value, int(record["epoch"]))

    def _images(self, run, epoch: int) -> None:
        import torch

        from . import views
        from .plots import prior_samples, reconstructions

        program = run.program
        with torch.no_grad():
            if views.missing(program, "sample_prior", "decode") is None:
                labels = None if run.test is None else run.test.labels
                self.writer.add_images("samples", prior_samples(program, 64, 0, labels).float().clamp(0, 1).cpu(),
                                       epoch)
            if run.test is not None and views.missing(program, "posterior_mean", "decode", "image_shape") is None:
                x = run.test.images[:8]
                labels = None if run.test.labels is None else run.test.labels[:8]
                recon = reconstructions(program, x, labels).reshape(-1, *program.image_shape)
                pairs = torch.cat([x.reshape(-1, *program.image_shape), recon]).float().clamp(0, 1).cpu()
                self.writer.add_images("reconstructions (top: test x)", pairs, epoch)

    def on_train_end(self, run) -> None:
        if self.writer is not None:
            self.writer.close()


def _logged_epochs(log_dir: Path) -> list[int]:
    """The epochs whose scalars a TensorBoard folder holds (read with TensorBoard's own reader)."""
    if not log_dir.is_dir():
        return []
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    events.Reload()
    tags = events.Tags().get("scalars", [])
    return sorted({e.step for tag in tags if tag.startswith(("train", "test")) for e in events.Scalars(tag)})


def _records(run_dir) -> list[dict]:
    from .runs import read_metrics

    return read_metrics(run_dir)


def log_evaluation(log_dir: str | Path, epoch: int, report: dict) -> None:
    """``pyro-vae evaluate``'s numbers on the whole test set into a run's TensorBoard folder,
    as ``evaluate/<name>`` at the run's epoch (each evaluation adds its points; a purge
    would also drop the epoch's training curves)."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        for name, estimate in report.items():
            writer.add_scalar(f"evaluate/{name}", estimate.mean, epoch)


class MLflow:
    """A run in MLflow: ``pip install -e ".[mlflow]"``, then ``mlflow ui --backend-store-uri
    sqlite:///RUN/mlflow.db`` (the default store: an SQLite file in the run folder, the
    artefacts beside it in ``RUN/mlartifacts``; MLflow 3 keeps its plain file store only
    on request).

    The configuration as parameters (``model.z_dim``, ``train.lr``, ...), every epoch's
    numbers as metrics (step = epoch), and at the end the run folder's config.json,
    metrics.jsonl and figures (PNG) as artefacts. The MLflow run's id is kept in
    ``RUN/mlflow_run_id``, so a resumed run logs into the same MLflow run: epochs that
    MLflow already holds are not logged again, and those it lacks (a crash between the
    checkpoint and the logging) are logged from metrics.jsonl first. (An epoch MLflow got
    and the checkpoint did not keeps its first values: MLflow has no purge.)
    """

    def __init__(self, tracking_uri: str | None = None, experiment: str = "pyro-vae"):
        try:
            import mlflow  # noqa: F401
        except ImportError as err:
            raise ImportError("--mlflow needs the optional extra: pip install -e \".[mlflow]\" "
                              "(or pip install \"pyro-vae[mlflow]\")") from err
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.client = None
        self.run_id = None
        self.logged: set[int] = set()

    def on_train_start(self, run) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        run_dir = Path(run.run_dir).resolve()
        uri = self.tracking_uri or f"sqlite:///{run_dir / 'mlflow.db'}"
        self.client = MlflowClient(tracking_uri=uri)
        id_file = Path(run.run_dir) / "mlflow_run_id"
        if id_file.exists():
            self.run_id = id_file.read_text().strip()
            history = self.client.get_metric_history(self.run_id, "train/elbo")
            self.logged = {int(m.step) for m in history}
            for record in _records(run.run_dir):  # epochs the checkpoint holds that a crash kept from MLflow
                if record["epoch"] <= run.epoch:
                    self.on_epoch_end(run, record)
            return
        experiment = self.client.get_experiment_by_name(self.experiment)
        experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(
            self.experiment, artifact_location=(run_dir / "mlartifacts").as_uri() if self.tracking_uri is None else None)
        self.run_id = self.client.create_run(experiment_id, run_name=Path(run.run_dir).name).info.run_id
        id_file.write_text(self.run_id + "\n")
        params = [mlflow.entities.Param(k, str(v)) for k, v in _flat(run.config.to_dict()).items()]
        for start in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[start : start + 100])

    def on_epoch_end(self, run, record: dict) -> None:
        import time

        import mlflow

        epoch = int(record["epoch"])
        if epoch in self.logged:
            return
        now = int(time.time() * 1000)
        metrics = [mlflow.entities.Metric(k, v, now, epoch) for k, v in scalars_of(record).items() if math.isfinite(v)]
        self.client.log_batch(self.run_id, metrics=metrics)
        self.logged.add(epoch)

    def on_train_end(self, run) -> None:
        run_dir = Path(run.run_dir)
        for name in ("config.json", "metrics.jsonl"):
            if (run_dir / name).exists():
                self.client.log_artifact(self.run_id, str(run_dir / name))
        for png in sorted(run_dir.rglob("*.png")):
            if "mlartifacts" not in png.parts and "tensorboard" not in png.parts:
                folder = png.parent.relative_to(run_dir)
                self.client.log_artifact(self.run_id, str(png), artifact_path=None if folder == Path(".") else
                                         folder.as_posix())
        self.client.set_terminated(self.run_id)


def _flat(d: dict, prefix: str = "") -> dict[str, object]:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        else:
            out[name] = value
    return out
