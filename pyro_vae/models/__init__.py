"""Probabilistic programs: the registry of built-in families (one file each in this
folder) and the protocol every trainable program follows.

The protocol (what ``model`` and ``guide`` take, the ``"data"`` plate, the optional
attributes and views) is written down in :mod:`pyro_vae.protocol`, a module below the
programs, the evaluations and the posterior tools alike; its names are re-exported here
(``from pyro_vae.models import ProgramCall, data_plate``)."""

from __future__ import annotations

from typing import Sequence

import torch

from ..catalog import MODELS
from ..protocol import ProgramCall, data_plate  # noqa: F401  (re-exported from their old home)
from . import ae, cvae, iaf, m2, vae, vae2  # noqa: F401  (the built-in families, declared in pyro_vae.catalog)


def build_model(config, image_shape: Sequence[int]) -> torch.nn.Module:
    """The registered program that a :class:`pyro_vae.config.ModelConfig` describes.

    The program remembers its configuration (``program.model_config``), so a run of it
    records what trained and loads back from the registry.
    """
    program = MODELS[config.model](config, tuple(int(s) for s in image_shape))
    program.model_config = config
    return program
