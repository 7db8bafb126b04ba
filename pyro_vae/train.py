"""The SVI training loop, run directories, checkpoints and metrics. No argument parsing.

A run directory holds::

    config.json      the RunConfig, 1:1 with the CLI flags
    versions.json    python / torch / pyro / pyro_vae versions and the device
    metrics.jsonl    one JSON object per epoch: train and test ELBO (nats per image), time
    checkpoint.pt    weights, optimiser state, epoch, RNG states (atomic, safe to load)

Each step is one call of :meth:`pyro.infer.SVI.step` on a minibatch drawn from the
device-resident training tensor; the model's ``"data"`` plate is told the training-set
size, so ``loss / N`` estimates the per-image negative ELBO of the whole training set.
"""

from __future__ import annotations

import json
import math
import platform
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import pyro
import torch
from tqdm.auto import tqdm

from . import checkpoint, rng
from .config import RunConfig
from .data import ImageData, TrainingSet, binary_test_set, load_data
from .evaluate import Estimate, elbo_terms
from .baselines import Autoencoder
from .objectives import build_elbo, kl_weight, training_program
from .steps import NonFiniteError, build_engine, keep_freed_memory
from .vae import VAE, build_vae

CONFIG_NAME = "config.json"
VERSIONS_NAME = "versions.json"
METRICS_NAME = "metrics.jsonl"
EVAL_SEED = 12345  # the fixed noise of every per-epoch evaluation
PROGRESS_EVERY = 50  # steps between progress-bar refreshes (the only host syncs of an epoch)
TRAIN_EVAL_IMAGES = 10_000  # the true train ELBO is measured on this many training images


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (unwritable, or holds another run)."""


class TrainingDivergedError(RuntimeError):
    """The loss or a gradient became NaN or infinite; the last good checkpoint is kept."""


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped training after a step; a checkpoint of that step was saved."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


class _StopRequests:
    """While active, SIGINT and SIGTERM ask the loop to stop after the current step
    (a second SIGINT stops at once). Signals can only be caught in the main thread;
    elsewhere this does nothing."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        print(f"\n{signal.Signals(signum).name}: finishing this step, then saving a checkpoint "
              "(press Ctrl-C again to stop at once)", file=sys.stderr)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        return False


@dataclass
class Run:
    """A VAE with the configuration it was trained with and where it lives."""

    vae: VAE
    config: RunConfig
    run_dir: Path
    device: torch.device
    epoch: int  # completed epochs

    @property
    def model(self):
        return self.vae.model

    @property
    def guide(self):
        return self.vae.guide


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but this machine has no CUDA device; use --device cpu")
    return device


def train(
    config: RunConfig | None,
    run_dir: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> Run:
    """Train a VAE by SVI, writing ``run_dir`` as it goes; returns the trained :class:`Run`.

    With ``resume=True`` the configuration and state come from ``run_dir``'s checkpoint;
    ``config`` may then be None, or differ from the stored one in ``train.epochs`` only
    (to train for longer).
    """
    run_dir = Path(run_dir)
    config, state = _prepare_run_dir(config, run_dir, resume, overwrite)
    cfg = config.train
    device = resolve_device(cfg.device)

    train_data = load_data(config, "train", device)
    test_data = binary_test_set(load_data(config, "test", device))
    if cfg.batch_size > len(train_data):
        raise ValueError(
            f"batch_size {cfg.batch_size} is larger than the {len(train_data)} training images; "
            "use a smaller --batch-size"
        )
    training_set = TrainingSet(train_data, config.data.binarize, cfg.seed)

    rng.set_seed(cfg.seed)
    vae = build_run_model(config, train_data.image_shape).to(device)
    if state is not None:
        _check_compatible(state, config, run_dir)
        _load_weights(vae, state, run_dir)
        rng.set_state(state["rng"])
        _truncate_metrics(run_dir / METRICS_NAME, state["epoch"])
        at = state["position"]
        where = f"epoch {at['epoch'] + 1}, step {at['step']}" if at["step"] else f"epoch {at['epoch']}"
        log(f"resuming {run_dir} after {where} (of {cfg.epochs} epochs)")
    else:
        _write_json(run_dir / CONFIG_NAME, config.to_dict())
        _write_json(run_dir / VERSIONS_NAME, versions(device))
        (run_dir / METRICS_NAME).write_text("")

    n = len(training_set)
    num_steps = math.ceil(n / cfg.batch_size)
    model, guide = training_program(vae, cfg.objective)
    # Each epoch's data is checked whole before its steps (below), so the steps run with
    # Pyro's validation off: per step it would re-check the same pixels, and on CUDA
    # every check is a host synchronisation.
    engine = build_engine(cfg.engine, vae, model, guide, build_elbo(cfg.elbo, cfg.num_particles), cfg.lr,
                          validate=False)
    if device.type == "cpu":
        keep_freed_memory()
    position = {"epoch": 0, "step": 0, "loss_sum": 0.0, "seconds": 0.0}
    if state is not None:
        engine.load_state_dict(state["optim"])
        position = state["position"]

    def save_checkpoint(position):
        engine.check()  # never save a state that a deferred check would reject
        payload = {"config": config.to_dict(), "epoch": position["epoch"], "position": position,
                   "model": vae.state_dict(), "optim": engine.state_dict(), "rng": rng.get_state(),
                   "image_shape": list(train_data.image_shape)}
        checkpoint.save(payload, run_dir / checkpoint.CHECKPOINT_NAME)

    with pyro.get_param_store().scope(), _StopRequests() as stop:
        for epoch in range(position["epoch"], cfg.epochs):
            first = position["step"] if epoch == position["epoch"] else 0
            loss_sum = torch.tensor(position["loss_sum"] if first else 0.0, dtype=torch.float64, device=device)
            seconds = position["seconds"] if first else 0.0
            t0 = time.perf_counter()
            images = training_set.images(epoch)
            perm = training_set.permutation(epoch)
            vae.likelihood.check_data(images, f"the training images of epoch {epoch + 1}")
            bar = tqdm(total=num_steps, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       disable=not progress, file=sys.stderr, mininterval=0.5)
            for step in range(first, num_steps):
                weight = _kl_weight(cfg, epoch + (step + 1) / num_steps)
                idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
                try:
                    loss_sum += engine.step(images[idx], num_data=n, kl_weight=weight)
                    if (step + 1) % PROGRESS_EVERY == 0:
                        engine.check()
                        bar.set_postfix(loss=f"{float(loss_sum) / (step + 1) / n:.2f}")  # the epoch's mean so far
                except NonFiniteError as err:
                    raise TrainingDivergedError(
                        f"training stopped at epoch {epoch + 1}, step {step + 1}: {err}. Nothing of this epoch "
                        f"was saved; the checkpoint in {run_dir} (after epoch {epoch}) is intact. "
                        "Lower --lr, or check the data"
                    ) from None
                bar.update()
                if stop.signum is not None:
                    bar.close()
                    seconds += time.perf_counter() - t0
                    save_checkpoint({"epoch": epoch, "step": step + 1, "loss_sum": float(loss_sum), "seconds": seconds})
                    raise TrainingInterrupted(
                        stop.signum,
                        f"stopped by {signal.Signals(stop.signum).name} after epoch {epoch + 1}, step {step + 1} of "
                        f"{num_steps}; the checkpoint in {run_dir} holds this step. "
                        f"Continue with: pyro-vae train --resume {run_dir}",
                    )
            bar.close()
            seconds += time.perf_counter() - t0
            record = {"epoch": epoch + 1, "train_objective": -float(loss_sum) / num_steps / n, "kl_weight": weight}
            engine.check()
            record.update(epoch_metrics(vae, "train", images[:TRAIN_EVAL_IMAGES], cfg))
            record.update(epoch_metrics(vae, "test", test_data.images, cfg))
            record["seconds"] = seconds
            _append_jsonl(run_dir / METRICS_NAME, record)
            save_checkpoint({"epoch": epoch + 1, "step": 0, "loss_sum": 0.0, "seconds": 0.0})
            log(_epoch_line(record, cfg))
    return Run(vae, config, run_dir, device, cfg.epochs)


def build_run_model(config: RunConfig, image_shape) -> VAE:
    """The network a run trains: a :class:`VAE`, or the :class:`Autoencoder` baseline."""
    klass = Autoencoder if config.train.objective == "autoencoder" else VAE
    return build_vae(config.model, image_shape, klass)


def _kl_weight(cfg, progress: float) -> float:
    if cfg.objective == "autoencoder":
        return 0.0
    return kl_weight(cfg.beta, cfg.kl_warmup_epochs, progress)


def epoch_metrics(vae: VAE, split: str, images: torch.Tensor, cfg) -> dict[str, float]:
    """The true ELBO (KL weight 1, whatever the training objective) and its two terms,
    in nats per image, at a fixed evaluation seed. The autoencoder, whose guide is a point
    mass, has no ELBO: only its reconstruction term is reported."""
    with pyro.get_param_store().scope():
        terms = elbo_terms(vae.model, vae.guide, images, cfg.eval_batch_size, seed=EVAL_SEED)
    if cfg.objective == "autoencoder":
        terms = {"log_lik": terms["log_lik"]}
    return {f"{split}_{k}": Estimate.of(v).mean for k, v in terms.items()}


def _epoch_line(record: dict, cfg) -> str:
    parts = [f"epoch {record['epoch']:>3}/{cfg.epochs}"]
    for split in ("train", "test"):
        if f"{split}_elbo" in record:
            parts.append(f"{split} elbo {record[f'{split}_elbo']:9.3f}")
    parts.append(f"(test log-lik {record['test_log_lik']:9.3f}")
    if "test_kl" in record:
        parts[-1] += f", kl {record['test_kl']:7.3f}"
    parts[-1] += ")"
    if record["kl_weight"] != 1.0 or cfg.objective != "elbo":
        parts.append(f"objective {record['train_objective']:9.3f} at kl weight {record['kl_weight']:.3g}")
    parts.append(f"{record['seconds']:6.1f}s")
    return "  ".join(parts)


def load_run(run_dir: str | Path, device: str = "auto") -> Run:
    """The trained model of ``run_dir`` (its latest checkpoint), on ``device``."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is not a run directory (it does not exist)")
    state = checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME)
    checkpoint.require(state, ("config", "model", "image_shape", "epoch"), run_dir / checkpoint.CHECKPOINT_NAME)
    config = _config_from(state, run_dir)
    dev = resolve_device(device)
    vae = build_run_model(config, state["image_shape"])
    _load_weights(vae, state, run_dir)
    return Run(vae.to(dev).eval(), config, run_dir, dev, state["epoch"])


def load_config(run_dir: str | Path) -> RunConfig:
    """The configuration stored in ``run_dir``'s checkpoint."""
    run_dir = Path(run_dir)
    return _config_from(checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME), run_dir)


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_NAME
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def versions(device: torch.device) -> dict[str, str]:
    import torchvision

    from . import __version__

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pyro": pyro.__version__,
        "pyro_vae": __version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# -- run-directory bookkeeping ---------------------------------------------------------


def _prepare_run_dir(config, run_dir: Path, resume: bool, overwrite: bool):
    state = None
    if resume:
        if not (run_dir / checkpoint.CHECKPOINT_NAME).exists():
            raise RunDirError(f"cannot resume: {run_dir} holds no checkpoint ({checkpoint.CHECKPOINT_NAME})")
        state = checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME)
        checkpoint.require(state, ("config", "model", "image_shape", "epoch", "position", "optim", "rng"),
                           run_dir / checkpoint.CHECKPOINT_NAME)
        stored = _config_from(state, run_dir)
        if config is not None and replace(config, train=replace(config.train, epochs=stored.train.epochs)) != stored:
            raise RunDirError(
                f"cannot resume {run_dir} with a different configuration; only the number of epochs may change. "
                f"Stored: {stored.to_dict()}"
            )
        if config is not None:
            stored = replace(stored, train=replace(stored.train, epochs=config.train.epochs))
        config = stored
    elif config is None:
        raise ValueError("train() needs a RunConfig unless resume=True")
    elif (run_dir / CONFIG_NAME).exists() and not overwrite:
        raise RunDirError(
            f"{run_dir} already holds a run; resume it (--resume), choose another --out, or pass --overwrite"
        )
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"cannot write to the run directory {run_dir}: {err.strerror or err}; "
                          "choose a writable --out") from err
    if not resume:
        for name in (checkpoint.CHECKPOINT_NAME, METRICS_NAME):
            (run_dir / name).unlink(missing_ok=True)
    return config, state


def _config_from(state: dict, run_dir: Path) -> RunConfig:
    try:
        return RunConfig.from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise checkpoint.CheckpointError(f"the checkpoint in {run_dir} has an unusable configuration: {err}") from err


def _check_compatible(state: dict, config: RunConfig, run_dir: Path) -> None:
    if state["epoch"] > config.train.epochs:
        raise RunDirError(f"{run_dir} already finished {state['epoch']} epochs; ask for more with --epochs")


def _load_weights(vae: VAE, state: dict, run_dir: Path) -> None:
    try:
        vae.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        raise checkpoint.CheckpointError(
            f"the weights in {run_dir} do not fit the network its configuration describes: {err}"
        ) from err


def _write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def _truncate_metrics(path: Path, epoch: int) -> None:
    """Drop lines of epochs after ``epoch`` (written before a crash beat the checkpoint)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] <= epoch]
        path.write_text("".join(line + "\n" for line in keep))
