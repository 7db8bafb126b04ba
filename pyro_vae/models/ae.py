"""The autoencoder baseline: the VAE's networks and likelihood, with a point-mass guide.

The encoder's mean is used as a point estimate of z (the guide's family is
``Delta(loc(x))``), and the ``"z"`` site is masked in model and guide alike, so SVI
maximises the reconstruction term ``log p(x | z = loc(x))`` alone: a deterministic
autoencoder written in the same model/guide vocabulary, for comparison with the VAE
(``--model ae``). A point mass has no ELBO; its runs report log p(x|z) only.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro import poutine

from .vae import VAE, networks_and_likelihood


class Autoencoder(VAE):
    """Same model and guide as :class:`VAE`; the guide draws ``z = loc(x)``, no sampling, no KL."""

    point_estimate = True
    encode = None  # no Gaussian posterior to view: the guide is a point mass at the encoder's loc
    local_family = None  # nor a family of distributions to optimise per image

    def posterior(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.TorchDistribution:
        return dist.Delta(loc).to_event(1)

    def latent_weight(self, kl_weight):
        return poutine.mask(mask=False)  # no KL term: log p(z) and log q(z|x) are dropped, whatever the weight


def autoencoder_from_config(config, image_shape):
    config.refuse_unused()
    encoder, decoder, likelihood = networks_and_likelihood(config, image_shape)
    ae = Autoencoder(encoder, decoder, config.z_dim, image_shape, likelihood)
    ae.bias_from_data = config.decoder_bias == "data-mean"
    return ae
