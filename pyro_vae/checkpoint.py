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
import tempfile
from pathlib import Path

import torch

FORMAT_VERSION = 1
CHECKPOINT_NAME = "checkpoint.pt"


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
