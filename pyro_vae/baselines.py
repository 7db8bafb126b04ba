"""Baselines that share the VAE's networks but not its inference.

:class:`Autoencoder`: the encoder's mean is used as a point estimate of z (the guide's
family is a point mass, ``Delta(loc(x))``) and it is trained with KL weight 0 (the
training loop sees to that for ``--objective autoencoder``), so SVI maximises the
reconstruction term ``log p(x | z = loc(x))`` alone: a deterministic autoencoder written
in the same model/guide vocabulary.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch

from .vae import VAE


class Autoencoder(VAE):
    """Same model and guide as :class:`VAE`; the guide draws ``z = loc(x)``, no sampling."""

    def posterior(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.TorchDistribution:
        return dist.Delta(loc).to_event(1)
