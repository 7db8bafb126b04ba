"""Run directories: what a run writes, and how a trained run loads back.

A run directory holds::

    config.json      the RunConfig: what trained (model, likelihood, estimator, data, settings)
    versions.json    python / torch / pyro / pyro_vae versions and the device
    metrics.jsonl    one JSON object per epoch: train and test ELBO (nats per image), time
    checkpoint.pt    weights, optimiser state, position, RNG states (atomic, safe to load)

A run of a registered model loads back from its configuration alone. A run of a program
built in code (:func:`pyro_vae.fit`) loads back through the importable factory it
recorded, or from the program the caller passes in (``load_run(RUN, program=...)``);
docs/extending.md shows both.
"""

from __future__ import annotations

import contextlib
import errno
import importlib
import importlib.util
import json
import os
import platform
import re
import socket
import sys
from dataclasses import dataclass
from pathlib import Path

try:
    import fcntl
except ImportError:  # not on Windows: there, runs are not locked
    fcntl = None

import pyro
import torch

from . import checkpoint
from .config import ModelConfig, ProgramRecord, RunConfig

CONFIG_NAME = "config.json"
VERSIONS_NAME = "versions.json"
METRICS_NAME = "metrics.jsonl"
LABELLED_NAME = "labelled.json"  # --labels N: the positions of the training images whose labels the run keeps
LOCK_NAME = ".lock"  # held by the one process that trains into the folder


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (unwritable, holds another run, ...)."""


class RunLockedError(RunDirError):
    """Another process is training into the run directory."""


class RunWriteError(RuntimeError):
    """A file of the run could not be written (full disk, file-size limit, permissions)."""


_HELD: set[Path] = set()  # run folders this process holds the lock of (the lock is re-entrant)


@contextlib.contextmanager
def run_lock(run_dir: Path):
    """Hold the run folder's lock: one writer per run folder.

    An exclusive ``flock`` on ``RUN/.lock``, which also records the holder's pid and
    host. The kernel releases it when the process ends, however it ends, so a killed run
    never leaves a stale lock. A second process that asks for it gets a
    :class:`RunLockedError` at once. Commands that only read a run (evaluate, plot,
    sample) take no lock and work while the run trains.
    """
    key = Path(run_dir).resolve()
    if key in _HELD or fcntl is None:
        yield
        return
    fd = os.open(key / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise
        pid, _, host = holder.partition(" ")
        raise RunLockedError(
            f"{run_dir} is being trained by another process (pid {pid}{' on ' + host if host else ''}); one "
            "process at a time may train into a run folder. Wait for it to finish or stop it, then resume with "
            f"pyro-vae train --resume {run_dir}; evaluate, plot and sample work on it meanwhile"
        ) from None
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError:
        pass  # the pid is for the message only; the lock is what counts
    _HELD.add(key)
    try:
        yield
    finally:
        _HELD.discard(key)
        os.close(fd)  # releases the lock


@dataclass
class Run:
    """A trained program with the configuration it was trained with and where it lives."""

    program: torch.nn.Module
    config: RunConfig
    run_dir: Path
    device: torch.device
    epoch: int  # completed epochs
    test: object = None  # the test images (ImageData) while training, for callbacks; None when loaded

    @property
    def model(self):
        return self.program.model

    @property
    def guide(self):
        return self.program.guide


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} was asked for, but this machine has no CUDA device; use --device cpu")
    return device


def load_run(run_dir: str | Path, device: str = "auto", program: torch.nn.Module | None = None) -> Run:
    """The trained program of ``run_dir`` (its latest checkpoint), on ``device``.

    ``program``: for a run of a program built in code without a recorded factory, an
    untrained instance of the same program; the checkpoint's weights are loaded into it.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        what = "it is a file" if run_dir.exists() else "it does not exist"
        raise RunDirError(f"{run_dir} is not a run directory ({what})")
    if not (run_dir / checkpoint.CHECKPOINT_NAME).exists():
        inside = sorted(str(p.parent) for p in run_dir.glob("*/" + checkpoint.CHECKPOINT_NAME))[:3]
        hint = f"; the runs inside it: {', '.join(inside)}" if inside else ""
        raise RunDirError(f"{run_dir} is not a run directory: it holds no {checkpoint.CHECKPOINT_NAME} (a run "
                          f"directory is what 'pyro-vae train --out DIR' writes, once its first epoch ends){hint}")
    state = checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME)
    checkpoint.require(state, ("config", "model", "image_shape", "epoch"), run_dir / checkpoint.CHECKPOINT_NAME)
    config = config_from(state, run_dir)
    dev = resolve_device(device)
    program = build_program(config, state["image_shape"], run_dir, program)
    load_weights(program, state, run_dir)
    return Run(program.to(dev).eval(), config, run_dir, dev, state["epoch"])


def build_program(config: RunConfig, image_shape, run_dir: Path, program=None):
    """The untrained program a run's configuration describes (or ``program``, when given)."""
    if program is not None:
        return program
    if isinstance(config.model, ModelConfig):
        from .models import build_model

        return build_model(config.model, image_shape)
    record: ProgramRecord = config.model
    if record.factory is None:
        raise RunDirError(
            f"{run_dir} was trained from a program built in code ({record.program}) that recorded no factory. "
            "Load it in Python with load_run(RUN, program=YourProgram(...)), or give the command "
            "--program module:function (a function that returns the program)")
    return call_factory(record.factory)


def call_factory(spec: str) -> torch.nn.Module:
    """Import ``package.module:function`` (or ``path/to/file.py:function``) and call it."""
    factory = _factory_function(spec)
    program = factory()
    if not isinstance(program, torch.nn.Module):
        raise TypeError(f"the program factory {spec!r} returned a {type(program).__name__}, not a torch.nn.Module")
    return program


def _factory_function(spec: str):
    """The function ``package.module:function`` (or ``path/to/file.py:function``) names, its module imported."""
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"a program factory is 'package.module:function' or 'path/to/file.py:function', got {spec!r}")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise FileNotFoundError(f"no such file {where}")
            module_spec = importlib.util.spec_from_file_location(f"pyro_vae_factory_{path.stem}", path)
            module = sys.modules.get(module_spec.name)
            if getattr(module, "__file__", None) != module_spec.origin:  # imported once per process
                module = importlib.util.module_from_spec(module_spec)
                sys.modules[module_spec.name] = module
                module_spec.loader.exec_module(module)
        else:
            module = _import_here_too(where)
        factory = getattr(module, name)
    except (ImportError, AttributeError, FileNotFoundError) as err:
        raise ValueError(f"cannot load the program factory {spec!r}: {err}") from err
    return factory


def _import_here_too(name: str):
    """``import name``, looking in the current folder too (as ``python -m`` does), so a
    factory in a script beside the runs is found from a console command."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name.split(".")[0] or "" in sys.path or str(Path.cwd()) in sys.path:
            raise
    sys.path.insert(0, str(Path.cwd()))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(Path.cwd()))


def load_config(run_dir: str | Path) -> RunConfig:
    """The configuration stored in ``run_dir``'s checkpoint."""
    run_dir = Path(run_dir)
    return config_from(checkpoint.load(run_dir / checkpoint.CHECKPOINT_NAME), run_dir)


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The run's per-epoch records; a torn last line (a write cut short) is left out."""
    records, _ = _parse_metrics(Path(run_dir) / METRICS_NAME)
    return records


def _parse_metrics(path: Path) -> tuple[list[dict], bool]:
    """The records of ``path``, and whether its last line was torn (cut short mid-write).

    Lines are only ever appended whole or not at all, except when the process dies or
    the disk fills during the append: then the last line lacks its end. A damaged line
    anywhere else is not something this code writes, and is an error.
    """
    if not path.exists():
        return [], False
    text = path.read_text()
    lines = text.split("\n")
    records, torn = [], False
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "epoch" not in record:
                raise ValueError("not an epoch record")
        except ValueError as err:
            if i == len(lines) - 1:  # no newline after it: an append cut short
                torn = True
                continue
            raise RunDirError(f"{path} line {i + 1} is damaged ({err}); restore the file, or delete the line "
                              "(the checkpoint does not depend on it)") from None
        records.append(record)
    return records, torn


def _torchvision_version() -> str:
    """``torchvision.__version__`` (with its build, ``+cpu``) read from its file: importing
    torchvision takes seconds, and a run of a data set it does not read need not pay them."""
    module = sys.modules.get("torchvision")
    if module is not None:
        return module.__version__
    try:
        spec = importlib.util.find_spec("torchvision")
        text = Path(spec.submodule_search_locations[0], "version.py").read_text()
        return re.search(r"^__version__ = '([^']+)'", text, re.M).group(1)
    except (AttributeError, OSError, TypeError):  # another layout: ask torchvision itself
        import torchvision

        return torchvision.__version__


def versions(device: torch.device) -> dict[str, str]:
    from . import __version__

    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": _torchvision_version(),
        "pyro": pyro.__version__,
        "pyro_vae": __version__,
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def config_from(state: dict, run_dir: Path) -> RunConfig:
    """The run's configuration, checked against the registries. The module of a recorded
    factory is imported first: what it registers (an estimator of its own) is then known."""
    factory = state.get("config", {}).get("model", {}).get("factory") if isinstance(state.get("config"), dict) else None
    if isinstance(factory, str):
        try:
            _factory_function(factory)
        except ValueError:
            pass  # reported where the program is built, with the run's folder
    try:
        return RunConfig.from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise checkpoint.CheckpointError(f"the checkpoint in {run_dir} has an unusable configuration: {err}") from err


def load_weights(program: torch.nn.Module, state: dict, run_dir: Path) -> None:
    """Load the checkpoint's weights into ``program``. Parameters the program creates on
    its first call (Pyro's autoguides) are created first, by one call on a batch of one
    blank image of the run's shape, told the training set's size."""
    if not set(state["model"]) <= set(program.state_dict()):
        _create_lazy_parameters(program, state)
    try:
        program.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        raise checkpoint.CheckpointError(
            f"the weights in {run_dir} do not fit the program its configuration describes: {err}"
        ) from err


def _create_lazy_parameters(program: torch.nn.Module, state: dict) -> None:
    from .protocol import ProgramCall
    from .rng import forked_rng
    from .scoring import plate_depth

    call = ProgramCall(program)
    device = next(iter(program.parameters()), torch.zeros(())).device
    x = torch.zeros((1, *state["image_shape"]), device=device)
    one = torch.zeros(1, dtype=torch.long, device=device)
    kwargs = call.kwargs({"x": x, "y": one, "index": one}, num_data=int(state.get("num_data", 1)))
    with pyro.get_param_store().scope(), forked_rng(0), torch.no_grad(), pyro.validation_enabled(False):
        plate_depth(program.model, program.guide, **kwargs)


def write_json(path: Path, obj) -> None:
    checkpoint.atomic_write(path, (json.dumps(obj, indent=2) + "\n").encode())


def append_jsonl(path: Path, record: dict) -> None:
    """Append one line, in one write, flushed to disk before returning."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        data = (json.dumps(record) + "\n").encode()
        written = os.write(fd, data)
        if written != len(data):  # a short write: the disk filled mid-line
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        os.fsync(fd)
    finally:
        os.close(fd)


def repair_metrics(path: Path, epoch: int, log=print) -> None:
    """Make the metrics agree with a checkpoint after ``epoch`` epochs, before resuming.

    Drops the lines of epochs after ``epoch`` (written before a crash beat the
    checkpoint) and a torn last line, with a one-line notice for the latter. The file is
    rewritten atomically, and only when something changes."""
    records, torn = _parse_metrics(path)
    keep = [r for r in records if r["epoch"] <= epoch]
    if torn:
        log(f"note: the last line of {path} was cut short (the process stopped while writing it); dropped it")
    if torn or len(keep) != len(records):
        checkpoint.atomic_write(path, "".join(json.dumps(r) + "\n" for r in keep).encode())
