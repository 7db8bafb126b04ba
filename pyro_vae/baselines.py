"""Baselines that share the VAE's networks but not its inference.

:class:`Autoencoder`: the encoder's mean is used as a point estimate of z (the guide is
a point mass, ``Delta(loc(x))``) and the KL term is switched off (KL weight 0), so SVI
maximises the reconstruction term ``log p(x | z = loc(x))`` alone: a deterministic
autoencoder written in the same model/guide vocabulary.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist

from .vae import VAE, kl_scaled


class Autoencoder(VAE):
    """Same model as :class:`VAE`; the guide is ``z = loc(x)``, with no sampling."""

    def guide(self, x=None, *, num_data=None, kl_weight=0.0, batch_size=None):
        if x is None:
            raise ValueError("the guide needs the images x it encodes")
        pyro.module("encoder", self.encoder)
        x = self._flatten(x)
        with self._data_plate(x, num_data, batch_size):
            loc, scale = self.encoder(x)
            with kl_scaled(kl_weight):
                pyro.sample("z", dist.Delta(loc).to_event(1))
        return loc, scale
