"""Checkpoints: written atomically, loaded without unpickling arbitrary objects.

A checkpoint is a dict of tensors and plain Python values (ints, floats, strings,
lists, dicts) saved with :func:`torch.save` and read back with
``torch.load(..., weights_only=True)``, which refuses anything that could run code.
It is written to a temporary file in the same folder, flushed to disk, and renamed
over the old one, so a crash at any moment leaves either the previous complete
checkpoint or the new complete one.
"""

from __future__ import annotations

import io
import os
import pickle
import re
import tempfile
import time
from pathlib import Path

import torch

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"
DEFAULT_EVERY = "10min"  # within an epoch; every epoch's end is saved anyway
_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable, or does not match what loads it."""


def save(payload: dict, path: str | os.PathLike) -> None:
    """Write ``payload`` to ``path`` atomically (see :func:`atomic_write`).

    The payload is serialised in memory first, so that a failure to write it (a full
    disk, a file-size limit) is the operating system's ``OSError``, naming its cause,
    rather than an error from inside torch's zip writer.
    """
    buffer = io.BytesIO()
    torch.save({"format_version": FORMAT_VERSION, **payload}, buffer)
    atomic_write(path, buffer.getbuffer())


def atomic_write(path: str | os.PathLike, data: bytes | memoryview) -> None:
    """Replace ``path`` by ``data`` all at once: written to a temporary file in the same
    folder, flushed to disk, renamed over ``path``. A crash or a failed write at any moment
    leaves either the old file or the new one, never a torn one; a failure removes the
    temporary file and raises the ``OSError``."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    _fsync_dir(path.parent)


class Every:
    """When training saves a checkpoint within an epoch: every ``N`` steps, or on a clock.

    ``spec`` is an int of steps (``500``), a number with a unit (``"30s"``, ``"10min"``,
    ``"2h"``; ``m`` is minutes), or ``"epoch"`` (at the end of each epoch only, which is
    saved in every case). A crash then loses at most that much work, and the resume from
    a checkpoint written within an epoch is exact, as the one after a signal is.
    """

    def __init__(self, spec: int | str = DEFAULT_EVERY):
        self.spec = str(spec).strip()
        self.steps: int | None = None
        self.seconds: float | None = None
        text = self.spec.lower()
        if text != "epoch":
            match = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)\s*([a-z]*)", text)
            if match is None or (match[2] and match[2] not in _UNITS) or (not match[2] and "." in match[1]):
                raise ValueError(f"checkpoint interval {spec!r}: give a whole number of steps (500), a time "
                                 "with its unit (30s, 10min, 2h), or 'epoch'")
            if match[2]:
                self.seconds = float(match[1]) * _UNITS[match[2]]
            else:
                self.steps = int(match[1])
            if (self.steps or self.seconds or 0) <= 0:
                raise ValueError(f"checkpoint interval {spec!r} must be above 0 (or 'epoch')")
        self.reset()

    @classmethod
    def of(cls, spec: "int | str | Every") -> "Every":
        return spec if isinstance(spec, Every) else cls(spec)

    @property
    def on_clock(self) -> bool:
        return self.seconds is not None

    def reset(self) -> None:
        """A checkpoint was just written: the clock starts again."""
        self._since = time.monotonic()

    def due(self, step: int) -> bool:
        """Whether a checkpoint is due after global step ``step`` (counted from 1 over the whole run)."""
        if self.steps is not None:
            return step % self.steps == 0
        return self.seconds is not None and time.monotonic() - self._since >= self.seconds

    def __repr__(self) -> str:
        return f"Every({self.spec!r})"


def stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """The temporary files that writes killed midway (by SIGKILL, a lost node) left in ``folder``."""
    return sorted(Path(folder).glob(".*.tmp"))


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds objects a safe load refuses (it was not written by pyro_vae, or was "
            f"tampered with); refusing to unpickle it: {err}"
        ) from err
    except Exception as err:  # the safe unpickler fails in many ways on damaged bytes
        raise CheckpointError(f"{path} is truncated or corrupt and cannot be read ({err}); "
                              "delete it or restore it from a copy") from err
    if not isinstance(payload, dict) or "format_version" not in payload:
        raise CheckpointError(f"{path} is not a pyro_vae checkpoint (no format_version)")
    if payload["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format {payload['format_version']}, this pyro_vae reads format "
            f"{FORMAT_VERSION}; use the pyro_vae version that wrote it"
        )
    return payload


def require(payload: dict, keys, path) -> None:
    """Raise a :class:`CheckpointError` naming the entries ``payload`` lacks."""
    missing = sorted(set(keys) - set(payload))
    if missing:
        raise CheckpointError(f"the checkpoint {path} lacks {', '.join(missing)}; it is damaged or from another tool")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
