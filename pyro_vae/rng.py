"""Seeding: one ``set_seed`` for the run, and a fork for side computations.

Training draws its reparameterisation noise from the global torch RNG seeded by
``set_seed``. Evaluations during training run inside ``forked_rng(seed)``: they get
their own fixed seed (so numbers are comparable epoch to epoch) and leave the
training stream exactly where it was (so a resumed run matches an uninterrupted one).
"""

from __future__ import annotations

import contextlib
import random

import numpy as np
import pyro
import torch


def set_seed(seed: int) -> None:
    pyro.set_rng_seed(int(seed))  # seeds python's random, numpy and torch (CPU and CUDA)


def get_state() -> dict:
    """All RNG states, as plain tensors/ints so ``torch.load(weights_only=True)`` reads them."""
    version, mt, gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": [version, list(mt), gauss],
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *map(_plain, np_state[2:])],
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(mt), gauss))
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def forked_rng(seed: int | None):
    """Run the block with its own seed, then restore every RNG to where it was."""
    if seed is None:
        yield
        return
    saved = get_state()
    try:
        set_seed(seed)
        yield
    finally:
        set_state(saved)


def _plain(v):
    return v.item() if hasattr(v, "item") else v
