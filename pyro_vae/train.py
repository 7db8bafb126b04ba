"""The SVI training loop over any program, and ``train(config)``. No argument parsing.

:func:`fit` trains a program (a :class:`torch.nn.Module` with Pyro ``model`` and
``guide`` methods, :mod:`pyro_vae.models`) on a data set, writing a run directory
(:mod:`pyro_vae.runs`) as it goes; :func:`train` builds the registered program and the
data that a :class:`pyro_vae.config.RunConfig` describes and calls :func:`fit`.

Each step is one call of the chosen engine (:mod:`pyro_vae.steps`) on a minibatch drawn
from the device-resident training tensor, its labels alongside when the program takes
``y``; the model's ``"data"`` plate is told the training-set size, so ``loss / N``
estimates the per-image negative ELBO of the whole training set.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import pyro
import torch
from pyro.infer.util import is_validation_enabled
from tqdm.auto import tqdm

from . import checkpoint, distributed, networks, rng
from .callbacks import Callbacks
from .config import DataConfig, ModelConfig, ProgramRecord, RunConfig, TrainConfig
from .data import UNLABELLED, ImageData, TrainingSet, choose_labelled, hide_labels, load_data, test_set
from .evaluate import Estimate, accuracy, elbo_terms
from .objectives import build_elbo, kl_weight, training_program
from .protocol import ProgramCall
from .runs import (CONFIG_NAME, LABELLED_NAME, LOCK_NAME, METRICS_NAME, VERSIONS_NAME, Run, RunDirError,
                   RunWriteError, append_jsonl, build_program, config_from, load_weights, repair_metrics,
                   resolve_device, run_lock, versions, write_json)
from .steps import NonFiniteError, build_engine, check_learned_tensors, keep_freed_memory, learning_rate

EVAL_SEED = 12345  # the fixed noise of every per-epoch evaluation
CHECK_SEED = 54321  # the noise of the one call that checks the program's learned tensors
PROGRESS_EVERY = 50  # steps between progress-bar refreshes (the only host syncs of an epoch)
TRAIN_EVAL_IMAGES = 10_000  # the true train ELBO is measured on this many training images


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


def train(
    config: RunConfig | None,
    run_dir: str | Path,
    *,
    resume: bool | str = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    program: torch.nn.Module | None = None,
    callbacks=(),
    checkpoint_every: int | str = checkpoint.DEFAULT_EVERY,
) -> Run:
    """Train the program and data set ``config`` describes, writing ``run_dir``; returns the :class:`Run`.

    With ``resume=True`` the configuration and state come from ``run_dir``'s checkpoint;
    ``config`` may then be None, or differ from the stored one in ``train.epochs`` only
    (to train for longer). ``resume="if-present"`` starts the run, or continues it when
    ``run_dir`` holds its checkpoint (one command line for start and restart, as torchrun's
    ``--max-restarts`` and requeueing schedulers need); a folder holding a run of another
    configuration is refused. ``program`` replaces the program the configuration describes:
    for resuming a run of a program built in code that recorded no factory.
    ``callbacks``, ``checkpoint_every``: see :func:`fit`.
    """
    run_dir = Path(run_dir)
    if_present = _if_present(resume, overwrite)
    if if_present:
        resume = (run_dir / checkpoint.CHECKPOINT_NAME).exists()
    every = checkpoint.Every.of(checkpoint_every)  # a bad interval is an error before anything is read or written
    with contextlib.ExitStack() as held:
        if resume and (run_dir / checkpoint.CHECKPOINT_NAME).exists() and _leader():  # (else: refused, untouched)
            held.enter_context(run_lock(run_dir))  # before reading the state it resumes from
        return _train(config, run_dir, resume, overwrite, progress, log, program, callbacks, every, if_present)


def _train(config, run_dir, resume, overwrite, progress, log, program, callbacks, every, if_present) -> Run:
    state = None
    if resume:
        config, state = _stored_run(config, run_dir, if_present)
    elif config is None:
        raise ValueError("train() needs a RunConfig unless resume=True")
    if config.data is None:
        raise RunDirError(f"{run_dir} was trained on data passed to fit() in code, which its configuration does "
                          "not describe; resume it in Python with pyro_vae.fit(program, data, RUN, resume=True)")
    if not resume and _leader():
        _refuse_other_run(run_dir, overwrite)
    rng.set_seed(config.train.seed)  # the program's initial weights come from the run's seed
    if program is None:
        image_shape = state["image_shape"] if state else load_data(config.data, "test", "cpu").image_shape
        program = build_program(config, image_shape, run_dir)
    resume = "if-present" if if_present else resume  # (fit's messages say how to go on)
    return fit(program, config.data, run_dir, settings=config.train, resume=resume, overwrite=overwrite,
               progress=progress, log=log, callbacks=callbacks, checkpoint_every=every, _state=state,
               _record=config.model, _seeded=True)


def fit(
    program: torch.nn.Module,
    data: DataConfig | ImageData | torch.Tensor,
    run_dir: str | Path,
    *,
    test: ImageData | torch.Tensor | None = None,
    settings: TrainConfig | None = None,
    binarize: str | None = None,
    factory: str | None = None,
    resume: bool | str = False,
    overwrite: bool = False,
    progress: bool = True,
    log: Callable[[str], None] = print,
    callbacks=(),
    checkpoint_every: int | str | checkpoint.Every = checkpoint.DEFAULT_EVERY,
    _state: dict | None = None,
    _record: ModelConfig | ProgramRecord | None = None,
    _seeded: bool = False,
) -> Run:
    """Train ``program`` by SVI, writing ``run_dir`` as it goes; returns the trained :class:`Run`.

    :param program: a :class:`torch.nn.Module` with Pyro ``model`` and ``guide`` methods
        (the protocol of :mod:`pyro_vae.protocol`), owning every learned tensor.
    :param data: a :class:`~pyro_vae.config.DataConfig` (a registered data set, recorded in
        the run, binarised when the program's ``binary_data`` says so), or the training
        images themselves (an :class:`~pyro_vae.data.ImageData` with labels, or a tensor
        ``(N, C, H, W)``), used as they are unless ``binarize`` is "dynamic" or "fixed".
    :param test: with images as ``data``, the test images (default: none).
    :param settings: the :class:`~pyro_vae.config.TrainConfig` (defaults when None).
    :param factory: ``"package.module:function"`` (or ``"path/file.py:function"``) that
        returns this program untrained; recorded so every command can load the run.
    :param resume: continue the run in ``run_dir`` from its checkpoint (pass the same
        program and data; ``settings`` may differ in ``epochs`` only); ``"if-present"``:
        continue it if ``run_dir`` holds its checkpoint, else start it.
    :param checkpoint_every: within an epoch, save a checkpoint every this many steps
        (an int), on a clock (``"30s"``, ``"10min"``, ``"2h"``), or never (``"epoch"``);
        every epoch's end is saved in any case (:class:`pyro_vae.checkpoint.Every`).
    :param callbacks: objects with any of ``on_train_start(run)``, ``on_step(run, step,
        loss)`` (``loss`` a device tensor: no host read is added), ``on_epoch_end(run,
        record)`` and ``on_train_end(run)`` (:mod:`pyro_vae.callbacks`; the built-in
        :class:`~pyro_vae.callbacks.TensorBoard` and :class:`~pyro_vae.callbacks.MLflow`);
        a resumed run that has finished its epochs calls the first and the last only.

    The process holds the run folder's lock (:func:`pyro_vae.runs.run_lock`) from the
    moment it writes there until it returns: a second process training into the same
    folder stops at once with an error.
    """
    run_dir = Path(run_dir)
    if_present = _if_present(resume, overwrite)
    if if_present:
        resume = _state is not None or (run_dir / checkpoint.CHECKPOINT_NAME).exists()
    every = checkpoint.Every.of(checkpoint_every)
    with contextlib.ExitStack() as held:
        if resume and run_dir.is_dir() and _leader():
            held.enter_context(run_lock(run_dir))
        return _fit(held, program, data, run_dir, test, settings, binarize, factory, bool(resume), overwrite,
                    progress, log, callbacks, every, if_present, _state, _record, _seeded)


def _fit(held, program, data, run_dir, test, settings, binarize, factory, resume, overwrite, progress, log,
         callbacks, every, if_present, _state, _record, _seeded) -> Run:
    config, state = _run_config(program, data, run_dir, settings, factory, resume, overwrite, if_present, _state,
                                _record)
    training = _Training(held, config, state, run_dir, every, overwrite, if_present)
    training.set_up(program, data, test, binarize, progress, log, callbacks, _seeded)
    training.restore()
    if training.finished():
        training.catch_up_callbacks()
        return Run(training.program, config, run_dir, training.device, state["epoch"])
    training.build_engine()
    with pyro.get_param_store().scope(), _StopRequests() as stop:
        with training.discarded_if_unsaved():
            training.start(stop)
            for epoch in range(training.position["epoch"], config.train.epochs):
                training.run_epoch(epoch)
        training.hooks.call("on_train_end", training.watched)
    return Run(training.program, config, run_dir, training.device, config.train.epochs)


def _run_config(program, data, run_dir, settings, factory, resume, overwrite, if_present, state, record):
    """The run's configuration and, when it resumes, its checkpoint's state: the stored
    configuration (checked against the one asked for), or a new run's (its folder checked)."""
    settings = settings if settings is not None else TrainConfig()
    record = record if record is not None else _program_record(program, factory)
    config = RunConfig(record, data if isinstance(data, DataConfig) else None, settings)
    if resume and state is None:
        config, state = _stored_run(config, run_dir, if_present)
    elif not resume and _leader():
        _refuse_other_run(run_dir, overwrite)
    return config, state


class _Training:
    """One call of :func:`fit`, in the order :func:`_fit` takes its steps: :meth:`set_up`
    (device, data, program), :meth:`restore` (a checkpoint's state), :meth:`build_engine`,
    :meth:`start` (the run folder), then :meth:`run_epoch` for each epoch, each made of
    :meth:`step` and :meth:`end_epoch`. The attributes are the loop's state."""

    def __init__(self, held, config: RunConfig, state: dict | None, run_dir: Path, every: checkpoint.Every,
                 overwrite: bool, if_present: bool):
        self.held, self.config, self.cfg, self.state = held, config, config.train, state
        self.run_dir, self.every, self.overwrite, self.if_present = run_dir, every, overwrite, if_present
        self.made_folder, self.owns_new_folder = not run_dir.exists(), False
        self.saved = None  # what the last good checkpoint holds

    def set_up(self, program, data, test, binarize, progress, log, callbacks, seeded: bool) -> None:
        """The device and processes, the data, and the program on the device: seeded, and
        its learned tensors checked (and created) on a first batch."""
        cfg = self.cfg
        device = resolve_device(cfg.device)
        self.group = group = distributed.from_environment(device)  # None unless torchrun started several processes
        self.device = device = distributed.device_for(group, device)
        self.leader = group is None or group.leader
        if not self.leader:  # rank 0 alone prints and writes
            progress, log = False, _quiet
        self.progress, self.log = progress, log
        self.hooks = Callbacks(callbacks if self.leader else ())  # under torchrun, rank 0 alone calls them
        self.call = ProgramCall(program)
        self._load_data(program, data, test, binarize)
        needs_weight = cfg.beta != 1 or cfg.kl_warmup_epochs > 0
        self.call.kwargs({"x": self.train_data.images[:1]}, num_data=1, kl_weight=0.5 if needs_weight else 1.0)

        if not seeded:  # (train() seeded before it built the program, and the stream goes on from there)
            rng.set_seed(cfg.seed)
        self.program = program = program.to(device)
        initialize = getattr(program, "initialize_from_data", None)
        if self.state is None and initialize is not None:
            # dynamically binarised images are the grey ones in expectation
            initialize(self.training_set.data.images if self.training_set.dynamic else self.training_set.images(0))
        self.n = len(self.training_set)
        self.model, self.guide = training_program(program, cfg.objective)
        first = self.order(0)[: cfg.batch_size] if self.call.semi_supervised else slice(0, cfg.batch_size)
        first_batch = self.batch_of(self.training_set.images(0), self.training_set.labels, first, 1.0)
        # One call shows which tensors Pyro sees, and creates the parameters a program makes on
        # its first call (Pyro's autoguides): before the optimiser is built and before a
        # checkpoint's weights are loaded. It also reads the program's plate depth.
        with pyro.get_param_store().scope(), rng.forked_rng(CHECK_SEED):
            self.depth = check_learned_tensors(program, self.model, self.guide, cfg.engine, **first_batch)

    def _load_data(self, program, data, test, binarize) -> None:
        """The training set and the test images on the device; the test images checked."""
        cfg, device = self.cfg, self.device
        binary = bool(getattr(program, "binary_data", False))
        self.labelled = None  # the positions of the images whose labels --labels N keeps
        if isinstance(data, DataConfig):
            train_data = load_data(data, "train", device)
            self.test_data = test_set(load_data(data, "test", device), binary)
            binarize = data.binarize if binary else None
            if data.labels is not None:
                train_data = self._keep_labels(train_data, data.labels)
        else:
            train_data = _as_image_data(data, "data").to(device)
            self.test_data = _as_image_data(test, "test").to(device) if test is not None else None
        if cfg.batch_size > len(train_data):
            raise ValueError(
                f"batch_size {cfg.batch_size} is larger than the {len(train_data)} training images; "
                "use a smaller --batch-size"
            )
        self.train_data = train_data
        self.training_set = TrainingSet(train_data, binarize, cfg.seed)
        self._check_labels(program, data)
        self.check_data = getattr(program, "check_data", None)
        if self.check_data is not None and self.test_data is not None:
            self.check_data(self.test_data.images, "the test images")

    def _keep_labels(self, train_data: ImageData, count: int) -> ImageData:
        """The training images with the labels of ``count`` of them kept, the rest hidden
        (:data:`~pyro_vae.data.UNLABELLED`): the images the run's checkpoint recorded when it
        resumes, else a balanced choice by the run's seed (:func:`~pyro_vae.data.choose_labelled`)."""
        recorded = None if self.state is None else self.state.get("labelled")
        if recorded is not None:
            self.labelled = torch.as_tensor(recorded, dtype=torch.long)
        else:
            if train_data.labels is None:
                raise ValueError("--labels N keeps the labels of N training images, and this data set has no labels")
            self.labelled = choose_labelled(train_data.labels, count, self.cfg.seed)
        return hide_labels(train_data, self.labelled)

    def _check_labels(self, program, data) -> None:
        """Refuse labels that the program cannot be given: hidden ones for a conditional
        program (it needs every label), ``--labels N`` for a program that takes none."""
        labels, name = self.training_set.labels, type(program).__name__
        hidden = labels is not None and bool((labels == UNLABELLED).any())
        if hidden and self.call.takes["y"]:
            raise ValueError(f"{name} is conditional on every image's label (its model takes y), and some labels of "
                             "the training set are hidden (--labels N); train it with all labels")
        if isinstance(data, DataConfig) and data.labels is not None and not self.call.semi_supervised:
            raise ValueError(f"--labels N hides labels from a semi-supervised program; {name} is not one (its model "
                             "and guide take no num_labelled): leave out --labels, or train --model m2")
        if self.call.semi_supervised and self.group is not None:
            raise ValueError(f"{name} is semi-supervised: its minibatches of labelled and unlabelled images are not "
                             "shared out between processes yet; train it in one process")
        self.num_labelled = self.training_set.parts()[0].numel() if self.call.semi_supervised else 0

    def order(self, epoch: int) -> torch.Tensor:
        """The positions of the images in the epoch's minibatch order."""
        if self.call.semi_supervised:
            return self.training_set.mixed_order(epoch, self.cfg.batch_size)
        return self.training_set.permutation(epoch)

    def batch_of(self, images, labels, idx, weight) -> dict:
        """The keyword arguments of the program's call on the images ``idx`` at KL weight ``weight``
        (a semi-supervised program's: the labels of the first images, labelled, only)."""
        index = idx if isinstance(idx, torch.Tensor) else torch.arange(self.n, device=self.device)[idx]
        y = None if labels is None else labels[idx]
        if not self.call.semi_supervised:
            return self.call.kwargs({"x": images[idx], "y": y, "index": index}, num_data=self.n, kl_weight=weight)
        known = self.training_set.labelled_per_batch(self.cfg.batch_size)
        y = y[:known] if known else None  # (the order puts the labelled images first, labelled_per_batch of them)
        return self.call.kwargs({"x": images[idx], "y": y, "index": index}, num_data=self.n,
                                num_labelled=self.num_labelled, kl_weight=weight)

    def restore(self) -> None:
        """A resumed run's weights, noise streams and folder as its checkpoint left them; every
        rank of a distributed run starting from the same weights."""
        state, run_dir = self.state, self.run_dir
        if state is not None:
            _check_resumable(state, self.config, run_dir)
            load_weights(self.program, state, run_dir)
            rng.set_state(state["rng"])
            _resume_softplus(state, self.device, self.log)
            if self.leader:
                repair_metrics(run_dir / METRICS_NAME, state["epoch"], self.log)
                for stale in checkpoint.stale_temporaries(run_dir):  # writes a kill cut short (under the lock)
                    stale.unlink(missing_ok=True)
        if self.group is not None:
            self.group.broadcast_module_(self.program)  # identical starting points, whatever each rank built
            _rank_streams(self.group, self.cfg.seed, state, self.log)
        self.num_steps = self.training_set.num_steps(self.cfg.batch_size, self.call.semi_supervised)

    def finished(self) -> bool:
        """Whether the resumed run has trained all its epochs already (then it says so)."""
        state = self.state
        if state is not None and state["epoch"] >= self.cfg.epochs:
            self.log(f"{self.run_dir} has finished its {state['epoch']} epoch{'' if state['epoch'] == 1 else 's'}; there is nothing to train. To train "
                     f"longer: pyro-vae train --resume {self.run_dir} --epochs N (N > {state['epoch']})")
            return True
        return False

    def catch_up_callbacks(self) -> None:
        """A finished run resumed with callbacks: ``on_train_start`` then ``on_train_end``, no
        epoch between, so that a logger a kill stopped after the last checkpoint (TensorBoard,
        MLflow) takes the epochs it lacks from metrics.jsonl and closes the run."""
        if self.hooks:
            self.watched = Run(self.program, self.config, self.run_dir, self.device, self.state["epoch"],
                               test=self.test_data)
            self.hooks.call("on_train_start", self.watched)
            self.hooks.call("on_train_end", self.watched)

    def build_engine(self) -> None:
        """The engine that takes the steps (its optimiser's state restored), and where the loop starts."""
        cfg, program, log = self.cfg, self.program, self.log
        # With the program's own data check, each epoch's data is checked whole before its
        # steps, so the steps run with Pyro's validation off: per step it would re-check the
        # same pixels, and on CUDA every check is a host synchronisation.
        validate = is_validation_enabled() if self.check_data is None else False
        if validate:
            log(f"note: {type(program).__name__} has no check_data(x), so every step runs with Pyro's validation on "
                "(and eagerly); define check_data to check each epoch's data once instead")
        self.engine = engine = build_engine(cfg.engine, program, self.model, self.guide,
                                            build_elbo(cfg.estimator, cfg.num_particles, self.depth), cfg.lr,
                                            validate=validate)
        if self.group is not None:
            engine.distribute(self.group, program)
            share = math.ceil(cfg.batch_size / self.group.world_size)
            log(f"distributed: {self.group.world_size} processes ({self.group.backend}), each {share} of every "
                f"{cfg.batch_size} images per step")
        if self.device.type == "cpu":
            keep_freed_memory()
        self.position = {"epoch": 0, "step": 0, "loss_sum": 0.0, "seconds": 0.0}  # where the loop starts
        if self.state is not None:
            engine.load_state_dict(self.state["optim"])
            self.position = self.state["position"]
            log(f"resuming {self.run_dir} after {_where(self.position)} (of {cfg.epochs} epochs)")

    def start(self, stop: _StopRequests) -> None:
        """A new run's folder and files (a resumed run's epochs recorded); the callbacks told."""
        state, run_dir, config = self.state, self.run_dir, self.config
        self.stop = stop
        if state is None and self.leader:
            self.held.enter_context(_new_run_dir(run_dir, self.overwrite))
            self.owns_new_folder = True  # (only now: a folder another process trains is never touched)
            try:
                write_json(run_dir / CONFIG_NAME, config.to_dict())
                write_json(run_dir / VERSIONS_NAME, versions(self.device))
                if self.labelled is not None:
                    checkpoint.atomic_write(run_dir / LABELLED_NAME, labelled_record(self.labelled, self.cfg.seed))
                checkpoint.atomic_write(run_dir / METRICS_NAME, b"")
            except OSError as err:
                raise RunDirError(f"cannot write the new run's files into {run_dir}: {err.strerror or err}; "
                                  "free space or choose another --out") from err
        if state is not None and self.leader:
            _record_epochs(run_dir, config)
        self.saved = state["position"] if state is not None else None  # what the last good checkpoint holds
        self.watched = Run(self.program, config, run_dir, self.device, self.position["epoch"],
                           test=self.test_data)  # what callbacks see
        self.hooks.call("on_train_start", self.watched)

    @contextlib.contextmanager
    def discarded_if_unsaved(self):
        """A new run that fails before its first checkpoint leaves no trace: its files go, and
        its folder, when this call made it (a configuration without a checkpoint holds
        nothing to resume, and would only be mistaken for a run)."""
        try:
            yield
        except BaseException:
            if self.owns_new_folder and self.saved is None:
                with contextlib.suppress(OSError):  # (a folder never made; not empty: someone else's files)
                    for name in (CONFIG_NAME, VERSIONS_NAME, METRICS_NAME, LOCK_NAME):
                        (self.run_dir / name).unlink(missing_ok=True)
                    if self.made_folder:
                        self.run_dir.rmdir()
            raise

    def save_checkpoint(self, position: dict) -> None:
        """The run's state at ``position`` into its checkpoint (rank 0 writes; every rank agrees on it)."""
        self.engine.check()  # never save a state that a deferred check would reject
        group = self.group
        streams = group.gather_rng_states() if group is not None else None
        if not self.leader:
            self.saved = position  # (rank 0 writes it)
            self.every.reset()
            return
        payload = {"config": self.config.to_dict(), "epoch": position["epoch"], "position": position,
                   "model": self.program.state_dict(), "optim": self.engine.state_dict(), "rng": rng.get_state(),
                   "image_shape": list(self.train_data.image_shape), "num_data": self.n}
        if self.labelled is not None:  # the images whose labels the run keeps, restored on resume
            payload["labelled"] = self.labelled
        if self.device.type == "cpu":  # the form its values were computed with, for an exact resume
            payload["softplus"] = networks.cpu_softplus_form()
        if streams is not None:  # every rank's noise stream, for an exact resume at the same world size
            payload["rng_ranks"] = streams
        path = self.run_dir / checkpoint.CHECKPOINT_NAME
        with _writing("the checkpoint", path, position, self.saved, self.run_dir):
            checkpoint.save(payload, path)
        self.saved = position
        self.every.reset()

    def run_epoch(self, epoch: int) -> None:
        """The epoch's steps from where the run stands (a resumed epoch from its step), then its end."""
        cfg, start = self.cfg, self.position
        first = start["step"] if epoch == start["epoch"] else 0
        self.loss_sum = torch.tensor(start["loss_sum"] if first else 0.0, dtype=torch.float64, device=self.device)
        self.seconds = start["seconds"] if first else 0.0
        self.t0 = time.perf_counter()
        images, labels = self.training_set.images(epoch), self.training_set.labels
        perm = self.order(epoch)
        if self.check_data is not None and epoch == start["epoch"]:
            # once: images used as they are stay the same tensor, and every later epoch's
            # dynamic binarisation is binary by construction
            self.check_data(images, f"the training images of epoch {epoch + 1}")
        self.engine.set_lr(learning_rate(cfg.lr, cfg.lr_schedule, epoch))
        self.bar = tqdm(total=self.num_steps, initial=first, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                        disable=not self.progress, file=sys.stderr, mininterval=0.5)
        for step in range(first, self.num_steps):
            self.step(epoch, step, images, labels, perm)
        self.bar.close()
        self.seconds += time.perf_counter() - self.t0
        self.end_epoch(epoch, images, labels)

    def step(self, epoch: int, step: int, images, labels, perm) -> None:
        """One SVI step, then a checkpoint when one is due; on a stop request, the step's
        checkpoint and :class:`TrainingInterrupted` (:meth:`_stop_after`)."""
        cfg, num_steps, group, every, stop = self.cfg, self.num_steps, self.group, self.every, self.stop
        weight = kl_weight(cfg.beta, cfg.kl_warmup_epochs, epoch + (step + 1) / num_steps)
        idx = perm[step * cfg.batch_size : (step + 1) * cfg.batch_size]
        stopping = stop.signum is not None
        agreed = (step + 1) % PROGRESS_EVERY == 0  # a host sync (and, distributed, an agreement) here
        # a checkpoint within the epoch (its end is saved anyway); on a clock, the ranks of a
        # distributed run agree on it, as on a stop
        due = step + 1 < num_steps and every.due(epoch * num_steps + step + 1) and (
            group is None or not every.on_clock or agreed)
        try:
            if group is None:
                loss = self.engine.step(**self.batch_of(images, labels, idx, weight))
            else:
                idx, self.engine.weight = group.shard(idx)
                loss = self.engine.step(**self.batch_of(images, labels, idx, weight)) if idx.numel() \
                    else self.engine.step()
            self.loss_sum += loss
            if self.hooks:
                self.hooks.call("on_step", self.watched, epoch * num_steps + step + 1, loss)
            if agreed:
                self.engine.check()
                mean = float(self.loss_sum) / (step + 1) / self.n  # the epoch's mean so far
                self.bar.set_postfix(loss=f"{mean:.2f}")
            if group is not None:  # the ranks stop (and save on a clock) at the same step
                if agreed:
                    stopping, clock = group.agree([stopping, due and every.on_clock], self.device)
                    due = clock if every.on_clock else due
                else:
                    stopping = False  # distributed, a stop waits for the next agreement
            self.bar.update()
            if stopping:
                self._stop_after(epoch, step)
            if due:
                self.save_checkpoint({"epoch": epoch, "step": step + 1, "loss_sum": float(self.loss_sum),
                                      "seconds": self.seconds + time.perf_counter() - self.t0})
        except NonFiniteError as err:
            raise TrainingDivergedError(_divergence_message(err, epoch, step, self.run_dir)) from None
        except distributed.PeerFailure as err:
            raise TrainingInterrupted(signal.SIGTERM, _peer_message(err, self.saved, self.run_dir,
                                                                    self.if_present)) from None

    def _stop_after(self, epoch: int, step: int) -> None:
        """A stop request: the checkpoint of this step, then :class:`TrainingInterrupted`."""
        stop = self.stop
        stop.signum = stop.signum or signal.SIGTERM
        self.bar.close()
        self.seconds += time.perf_counter() - self.t0
        self.save_checkpoint({"epoch": epoch, "step": step + 1, "loss_sum": float(self.loss_sum),
                              "seconds": self.seconds})
        raise TrainingInterrupted(
            stop.signum,
            f"stopped by {signal.Signals(stop.signum).name} after epoch {epoch + 1}, step {step + 1} "
            f"of {self.num_steps}; the checkpoint in {self.run_dir} holds this step. Continue with: "
            f"{'torchrun ... -m pyro_vae' if self.group else 'pyro-vae'} train --resume {self.run_dir}",
        )

    def end_epoch(self, epoch: int, images, labels) -> None:
        """The epoch's metrics (rank 0 measures and writes them), its checkpoint, its line and callbacks."""
        cfg, program, run_dir = self.cfg, self.program, self.run_dir
        weight = kl_weight(cfg.beta, cfg.kl_warmup_epochs, epoch + 1)  # the weight of the epoch's last step
        record = {"epoch": epoch + 1, "train_objective": -float(self.loss_sum) / self.num_steps / self.n,
                  "kl_weight": weight, "lr": learning_rate(cfg.lr, cfg.lr_schedule, epoch)}
        self.engine.check()
        if self.leader:
            record.update(epoch_metrics(program, "train", images[:TRAIN_EVAL_IMAGES],
                                        None if labels is None else labels[:TRAIN_EVAL_IMAGES], cfg, num_data=self.n))
            if self.test_data is not None and not self.call.takes["index"]:
                record.update(epoch_metrics(program, "test", self.test_data.images, self.test_data.labels, cfg))
            record["seconds"] = self.seconds
            with _writing("the metrics", run_dir / METRICS_NAME, {"epoch": epoch + 1, "step": 0}, self.saved,
                          run_dir):
                append_jsonl(run_dir / METRICS_NAME, record)
        try:
            self.save_checkpoint({"epoch": epoch + 1, "step": 0, "loss_sum": 0.0, "seconds": 0.0})
        except distributed.PeerFailure as err:
            raise TrainingInterrupted(signal.SIGTERM,
                                      _peer_message(err, self.saved, run_dir, self.if_present)) from None
        if self.leader:
            self.log(_epoch_line(record, cfg, program))
        self.watched.epoch = epoch + 1
        self.hooks.call("on_epoch_end", self.watched, record)


def _where(position: dict) -> str:
    """A checkpoint's position in words: "epoch 3" (its end) or "epoch 4, step 120" (within it)."""
    if position["step"]:
        return f"epoch {position['epoch'] + 1}, step {position['step']}"
    return f"epoch {position['epoch']}"


def _if_present(resume, overwrite: bool) -> bool:
    """Whether ``resume`` asks to continue the run only if its folder holds it."""
    if isinstance(resume, str):
        if resume != "if-present":
            raise ValueError(f"resume={resume!r}: give True, False or 'if-present'")
        if overwrite:
            raise ValueError("resume='if-present' continues a run or starts it, and never replaces one; "
                             "leave out overwrite")
        return True
    return False


def _leader() -> bool:
    """Whether this process writes the run: the only one, or rank 0 of torchrun's processes."""
    return int(os.environ.get("RANK", "0")) == 0


def _quiet(line: str) -> None:
    """The log of ranks other than 0."""


def _rank_streams(group, seed: int, state: dict | None, log) -> None:
    """Give each rank its own noise stream: the saved one when the run resumes at the same
    world size, else a stream seeded from the run's seed, the rank and the position."""
    saved = None if state is None else state.get("rng_ranks")
    if saved is not None and len(saved) == group.world_size:
        rng.set_state(saved[group.rank])
        return
    position = 0 if state is None else state["position"]["epoch"] * 1_000_003 + state["position"]["step"]
    rng.set_seed(distributed.rank_seed(seed + position, group.rank))
    if state is not None:
        was = len(saved) if saved is not None else 1
        log(f"note: this run was saved by {was} process(es) and resumes with {group.world_size}; the noise streams "
            "start afresh from here, so the run will not repeat an uninterrupted one draw for draw")


def _peer_message(err, saved, run_dir, if_present: bool) -> str:
    last = "no checkpoint yet" if saved is None else f"the checkpoint after {_where(saved)}"
    said = f"{err}. This process stopped too; {run_dir} keeps {last}."
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) - int(os.environ.get(
        "TORCHELASTIC_RESTART_COUNT", "0"))
    if if_present and restarts > 0:
        return f"{said} torchrun restarts the processes ({restarts} restart(s) left) and they continue from it"
    if if_present:
        return f"{said} Once the cause is fixed, run the same torchrun command again: it continues from there"
    return f"{said} Once the cause is fixed, continue with: torchrun ... -m pyro_vae train --resume {run_dir}"


def epoch_metrics(program, split: str, images: torch.Tensor, labels, cfg, num_data: int | None = None
                  ) -> dict[str, float]:
    """The true ELBO (KL weight 1, whatever the training objective) and its two terms,
    in nats per image, at a fixed evaluation seed. A program whose guide is a point mass
    (the autoencoder) has no ELBO: only its reconstruction term is reported.

    ``num_data``: the size of the data set ``images`` open (the training set, of which
    the first images are scored); they are its first positions for a program that
    takes ``index`` (parameters per data point, which test images do not have).

    A program that classifies (the ``predict_class`` view) has its ``accuracy`` reported
    too, where every image of ``images`` has a known label."""
    call = ProgramCall(program)
    known, labels = labels, labels if call.takes["y"] else None
    index = torch.arange(images.shape[0], device=images.device) if call.takes["index"] else None
    # the images were checked when training started; Pyro's validation would check them again at every batch
    validate = is_validation_enabled() and getattr(program, "check_data", None) is None
    with pyro.get_param_store().scope(), pyro.validation_enabled(validate):
        terms = elbo_terms(program.model, program.guide, images, cfg.eval_batch_size, seed=EVAL_SEED, labels=labels,
                           num_data=num_data, index=index)
    if getattr(program, "point_estimate", False):
        terms = {"log_lik": terms["log_lik"]}
    out = {f"{split}_{k}": Estimate.of(v).mean for k, v in terms.items()}
    classifies = getattr(program, "predict_class", None) is not None
    if classifies and known is not None and bool((known != UNLABELLED).all()):
        out[f"{split}_accuracy"] = accuracy(program, images, known, cfg.eval_batch_size).mean
    return out


def labelled_record(positions: torch.Tensor, seed: int) -> bytes:
    """``labelled.json``: how many labels the run keeps, its seed, and the images' positions
    in the training set (one line; the checkpoint holds the same positions for a resume)."""
    return (json.dumps({"labels": len(positions), "seed": seed}, indent=2)[:-2]
            + f',\n  "positions": {json.dumps(positions.tolist())}\n}}\n').encode()


def _epoch_line(record: dict, cfg, program) -> str:
    parts = [f"epoch {record['epoch']:>3}/{cfg.epochs}"]
    for split in ("train", "test"):
        if f"{split}_elbo" in record:
            parts.append(f"{split} elbo {record[f'{split}_elbo']:9.3f}")
    split = "test" if "test_elbo" in record or "test_log_lik" in record else "train"
    if f"{split}_log_lik" in record:  # (a model that sums a latent out has no split of its ELBO)
        parts.append(f"({split} log-lik {record[f'{split}_log_lik']:9.3f}")
        if f"{split}_kl" in record:
            parts[-1] += f", kl {record[f'{split}_kl']:7.3f}"
        parts[-1] += ")"
    if "test_accuracy" in record:  # (a program that classifies)
        parts.append(f"test accuracy {record['test_accuracy']:.4f}")
    if not getattr(program, "point_estimate", False):  # what the steps maximised, on the training minibatches
        parts.append(f"train {cfg.objective} ({cfg.estimator}, K={cfg.num_particles}) {record['train_objective']:9.3f}"
                     + (f" at kl weight {record['kl_weight']:.3g}" if record["kl_weight"] != 1.0 else ""))
    parts.append(f"{record['seconds']:6.1f}s")
    return "  ".join(parts)


def _divergence_message(err, epoch: int, step: int, run_dir: Path) -> str:
    where = f"training stopped at epoch {epoch + 1}, step {step + 1}: {err}. Nothing of this epoch was saved"
    if epoch == 0:
        return (f"{where}, and no epoch had finished, so nothing of the run was kept in {run_dir}; start again "
                "with a lower --lr, or check the data")
    return f"{where}; the checkpoint in {run_dir} (after epoch {epoch}) is intact. Lower --lr, or check the data"


def _program_record(program, factory: str | None) -> ModelConfig | ProgramRecord:
    """What a run of ``program`` records as its model: the registered configuration it was
    built from, or the class and the factory that rebuilds it."""
    config = getattr(program, "model_config", None)
    if isinstance(config, ModelConfig) and factory is None:
        return config
    likelihood = getattr(getattr(program, "likelihood", None), "name", None)
    klass = type(program)
    return ProgramRecord(f"{klass.__module__}:{klass.__qualname__}", factory, likelihood)


def _as_image_data(data, what: str) -> ImageData:
    if isinstance(data, ImageData):
        return data
    if isinstance(data, torch.Tensor):
        return ImageData(data, None, binary=False)
    raise TypeError(f"{what} must be a DataConfig, an ImageData or a tensor of images (N, C, H, W), "
                    f"got {type(data).__name__}")


# -- run-directory bookkeeping ---------------------------------------------------------


def _stored_run(config: RunConfig | None, run_dir: Path, if_present: bool = False):
    """The stored configuration and checkpoint of a run to resume; ``config``, when given,
    may differ from the stored one in the number of epochs only."""
    if not (run_dir / checkpoint.CHECKPOINT_NAME).exists():
        raise RunDirError(f"cannot resume: {run_dir} holds no checkpoint ({checkpoint.CHECKPOINT_NAME})")
    state = checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME)
    checkpoint.require(state, ("config", "model", "image_shape", "epoch", "position", "optim", "rng"),
                       run_dir / checkpoint.CHECKPOINT_NAME)
    stored = config_from(state, run_dir)
    if config is not None:
        asked = replace(config, train=replace(config.train, epochs=stored.train.epochs))
        if asked != stored:
            differ = "; ".join(f"{key}: {was!r} there, {now!r} asked" for key, was, now in _differences(stored, asked))
            if if_present:
                raise RunDirError(
                    f"{run_dir} holds another run (its configuration differs: {differ}); nothing was changed. "
                    f"Choose another --out for this one, or continue that run with: pyro-vae train --resume {run_dir}")
            raise RunDirError(f"cannot resume {run_dir} with a different configuration; only the number of epochs "
                              f"may change, and this differs: {differ}")
        stored = replace(stored, train=replace(stored.train, epochs=config.train.epochs))
    return stored, state


def _differences(stored: RunConfig, asked: RunConfig) -> list[tuple[str, object, object]]:
    """The settings (``section.field``) in which two configurations differ, with both values."""
    was, now = stored.to_dict(), asked.to_dict()
    out = []
    for section in sorted(set(was) | set(now)):
        a, b = was.get(section), now.get(section)
        if not (isinstance(a, dict) and isinstance(b, dict)):
            if a != b:
                out.append((section, a, b))
            continue
        out += [(f"{section}.{k}", a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return out


def _resume_softplus(state: dict, device: torch.device, log) -> None:
    """On the CPU, resume with the softplus form the run was saved with.

    The form is otherwise chosen by timing ``log1p`` once per process, and a measurement
    taken under load can choose the other form; the two agree to float rounding only, so
    a resumed run would no longer end bit-identical to an uninterrupted one. This sets the
    process's form (unless ``$PYRO_VAE_SOFTPLUS`` asks for another, which is said)."""
    was = state.get("softplus")
    if was is None or device.type != "cpu":
        return
    wanted = networks.softplus_setting()
    if wanted == "auto":
        networks.set_cpu_softplus_form(was)
    elif wanted != was:
        log(f"note: this run was saved computing softplus in the {was} form, and ${networks.SOFTPLUS_ENV}={wanted} "
            "resumes it in the other; the values agree to float rounding, so it will not end bit-identical to an "
            "uninterrupted run")


def _record_epochs(run_dir: Path, config: RunConfig) -> None:
    """Keep config.json saying how many epochs the run now trains for, when a resume changed them.

    The checkpoint's copy of the configuration is the one a resume reads; config.json is
    the one people read, and should not say 121 epochs of a run that trains for 3,280."""
    path = run_dir / CONFIG_NAME
    try:
        current = json.loads(path.read_text()) if path.exists() else None
    except (OSError, ValueError):
        current = None  # unreadable: rewritten whole below
    wanted = json.loads(json.dumps(config.to_dict()))  # (tuples as JSON gives them back: lists)
    if current == wanted:
        return
    try:
        write_json(path, wanted)
    except OSError as err:
        raise RunDirError(f"cannot update {path}: {err.strerror or err}; free space and resume again") from err


def _refuse_other_run(run_dir: Path, overwrite: bool) -> None:
    """Refuse a folder that holds another run, unless ``overwrite``; before any data loads.

    A folder whose run never finished an epoch (a configuration, no checkpoint) holds
    nothing to lose, and is reused without ``overwrite``."""
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir} is a file, not a folder; choose another --out")
    if (run_dir / CONFIG_NAME).exists() and (run_dir / checkpoint.CHECKPOINT_NAME).exists() and not overwrite:
        restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        hint = (f" (torchrun restarted this command, restart {restart}: start the job with --resume-if-present "
                "so that its restarts continue the run)") if restart else ""
        raise RunDirError(
            f"{run_dir} already holds a run; resume it (--resume, or --resume-if-present to start or continue it "
            f"with one command line), choose another --out, or pass --overwrite{hint}"
        )


@contextlib.contextmanager
def _new_run_dir(run_dir: Path, overwrite: bool):
    """Create the folder of a new run and hold its lock, or clear the files of the run it
    replaces (checked again under the lock: another process may have started meanwhile)."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"cannot write to the run directory {run_dir}: {err.strerror or err}; "
                          "choose a writable --out") from err
    with run_lock(run_dir):
        _refuse_other_run(run_dir, overwrite)
        for name in (checkpoint.CHECKPOINT_NAME, METRICS_NAME):
            (run_dir / name).unlink(missing_ok=True)
        yield


@contextlib.contextmanager
def _writing(what: str, path: Path, position: dict, saved: dict | None, run_dir: Path):
    """Turn a failed write of a run file into an error that says what failed, in plain
    words, what the last good checkpoint holds and how to go on from it."""
    try:
        yield
    except OSError as err:
        at = _where(position)
        if saved is None:
            kept = "no epoch had been saved yet, so start the run again once the cause is fixed"
        else:
            kept = (f"the checkpoint in {run_dir} (after {_where(saved)}) is intact; once the cause is fixed, continue with: "
                    f"pyro-vae train --resume {run_dir}")
        raise RunWriteError(f"training stopped: could not write {what} of {at} to {path}: "
                            f"{err.strerror or err}. {kept}") from err


def _check_resumable(state: dict, config: RunConfig, run_dir: Path) -> None:
    if state["epoch"] > config.train.epochs:
        raise RunDirError(f"{run_dir} already finished {state['epoch']} epochs, more than the {config.train.epochs} "
                          f"asked for; ask for at least {state['epoch']} with --epochs")
