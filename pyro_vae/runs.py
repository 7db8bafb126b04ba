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

import importlib
import importlib.util
import json
import platform
import sys
from dataclasses import dataclass
from pathlib import Path

import pyro
import torch

from . import checkpoint
from .config import ModelConfig, ProgramRecord, RunConfig

CONFIG_NAME = "config.json"
VERSIONS_NAME = "versions.json"
METRICS_NAME = "metrics.jsonl"


class RunDirError(RuntimeError):
    """The run directory cannot be used as asked (unwritable, holds another run, ...)."""


@dataclass
class Run:
    """A trained program with the configuration it was trained with and where it lives."""

    program: torch.nn.Module
    config: RunConfig
    run_dir: Path
    device: torch.device
    epoch: int  # completed epochs

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
        raise RunDirError(f"{run_dir} is not a run directory (it does not exist)")
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
    where, _, name = spec.rpartition(":")
    if not where or not name:
        raise ValueError(f"a program factory is 'package.module:function' or 'path/to/file.py:function', got {spec!r}")
    try:
        if where.endswith(".py"):
            path = Path(where)
            if not path.is_file():
                raise FileNotFoundError(f"no such file {where}")
            module_spec = importlib.util.spec_from_file_location(f"pyro_vae_factory_{path.stem}", path)
            module = importlib.util.module_from_spec(module_spec)
            sys.modules[module_spec.name] = module
            module_spec.loader.exec_module(module)
        else:
            module = _import_here_too(where)
        factory = getattr(module, name)
    except (ImportError, AttributeError, FileNotFoundError) as err:
        raise ValueError(f"cannot load the program factory {spec!r}: {err}") from err
    program = factory()
    if not isinstance(program, torch.nn.Module):
        raise TypeError(f"the program factory {spec!r} returned a {type(program).__name__}, not a torch.nn.Module")
    return program


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


def config_from(state: dict, run_dir: Path) -> RunConfig:
    try:
        return RunConfig.from_dict(state["config"])
    except (KeyError, TypeError, ValueError) as err:
        raise checkpoint.CheckpointError(f"the checkpoint in {run_dir} has an unusable configuration: {err}") from err


def load_weights(program: torch.nn.Module, state: dict, run_dir: Path) -> None:
    try:
        program.load_state_dict(state["model"])
    except (RuntimeError, KeyError) as err:
        raise checkpoint.CheckpointError(
            f"the weights in {run_dir} do not fit the program its configuration describes: {err}"
        ) from err


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def append_jsonl(path: Path, record: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def truncate_metrics(path: Path, epoch: int) -> None:
    """Drop lines of epochs after ``epoch`` (written before a crash beat the checkpoint)."""
    if path.exists():
        keep = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line)["epoch"] <= epoch]
        path.write_text("".join(line + "\n" for line in keep))
