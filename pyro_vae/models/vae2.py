r"""A VAE with two stochastic layers (Burda, Grosse & Salakhutdinov 2016, section 5).

Generative story (``TwoLayerVAE.model``), for each image:

.. math::

    z_2 \sim \mathcal{N}(0, I), \qquad
    z_1 \mid z_2 \sim \mathcal{N}\big(\mu_\theta(z_2), \operatorname{diag}\sigma_\theta(z_2)^2\big), \qquad
    x \mid z_1 \sim \text{the likelihood}(f_\theta(z_1))

Guide (``TwoLayerVAE.guide``), in the opposite direction:

.. math::

    q(z_1, z_2 \mid x) = \mathcal{N}\big(z_1; \mu_\phi(x), \sigma_\phi(x)^2\big)\,
                         \mathcal{N}\big(z_2; \mu_\phi(z_1), \sigma_\phi(z_1)^2\big)

Sites are named after the symbols: ``"z2"``, ``"z1"``, ``"x"``. With ``z_dim = 100``,
``hidden_dims = (200, 200)``, ``z2_dim = 50``, ``z2_hidden_dims = (100, 100)`` and tanh
it is Burda et al.'s architecture: q(z1|x) and p(x|z1) through 200-200 hidden units,
q(z2|z1) and p(z1|z2) through 100-100.

The KL of this program has no closed form per site (p(z1|z2) depends on z2, which the
guide draws from z1), so its ELBO is the Monte Carlo ``log p(x, z1, z2) - log q(z1, z2|x)``
(``--estimator trace``, ``iwae`` or ``iwae-dreg``; ``meanfield`` refuses it).
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from ..distributions import DiagonalNormal, StandardNormal
from ..networks import MLPDecoder, MLPEncoder
from .vae import VAE, networks_and_likelihood


class TwoLayerVAE(VAE):
    """z2 -> z1 -> x, with the guide x -> z1 -> z2; every layer a diagonal Gaussian.

    :param encoder: q(z1|x), ``x (..., D) -> (loc, scale)`` of ``z_dim``.
    :param decoder: p(x|z1), ``z1 (..., z_dim) -> (..., D)``, the likelihood's parameters.
    :param upper_encoder: q(z2|z1), ``z1 -> (loc, scale)`` of ``z2_dim``.
    :param upper_decoder: p(z1|z2), ``z2 -> (loc, scale)`` of ``z_dim``.

    Views for figures: ``posterior_mean(x)`` is E_q[z1|x]; ``sample_prior(n)`` draws z1
    from the model (z2 ~ N(0, I), then z1 | z2), so ``decode(sample_prior(n))`` shows
    samples of the model. There is no ``encode`` (the KL per dimension assumes a N(0, I)
    prior on the encoded latent, which z1 does not have).
    """

    encode = None
    local_family = None  # q(z2|z1) depends on the draw of z1: no per-image family over one site
    prior = None  # the prior of z1 is p(z1|z2), not a fixed distribution (see top_prior)

    def __init__(self, encoder: nn.Module, decoder: nn.Module, upper_encoder: nn.Module, upper_decoder: nn.Module,
                 z_dim: int, z2_dim: int, image_shape: Sequence[int] = (1, 28, 28), likelihood: nn.Module | None = None):
        super().__init__(encoder, decoder, z_dim, image_shape, likelihood)
        self.upper_encoder = upper_encoder
        self.upper_decoder = upper_decoder
        self.z2_dim = int(z2_dim)

    def top_prior(self) -> dist.TorchDistribution:
        """p(z2) = N(0, I)."""
        return StandardNormal.of_size(self.z2_dim, like=self.prior_loc)

    def model(self, x=None, *, num_data=None, kl_weight=1.0, batch_size=None):
        """p(x, z1, z2) = p(z2) p(z1|z2) p(x|z1); ``kl_weight`` weights both latent sites."""
        pyro.module("decoder", self.decoder)
        pyro.module("upper_decoder", self.upper_decoder)
        if self._likelihood_learns:
            pyro.module("likelihood", self.likelihood)
        x = self._flatten(x) if x is not None else None
        with self._plate(x, num_data, batch_size):
            with self.latent_weight(kl_weight):
                z2 = pyro.sample("z2", self.top_prior())
                z1 = pyro.sample("z1", dist.Normal(*self.upper_decoder(z2)).to_event(1))
            out = self.decoder(z1)
            pyro.sample("x", self.likelihood(out), obs=x)
        return out

    def guide(self, x=None, *, num_data=None, kl_weight=1.0, batch_size=None):
        """q(z1, z2|x) = q(z1|x) q(z2|z1), both sampled by reparameterisation."""
        if x is None:
            raise ValueError("the guide q(z1, z2|x) needs the images x it encodes")
        pyro.module("encoder", self.encoder)
        pyro.module("upper_encoder", self.upper_encoder)
        x = self._flatten(x)
        with self._plate(x, num_data, batch_size):
            with self.latent_weight(kl_weight):
                z1 = pyro.sample("z1", DiagonalNormal.of(*self.encoder(x)))
                pyro.sample("z2", DiagonalNormal.of(*self.upper_encoder(z1)))

    @torch.no_grad()
    def sample_prior(self, num: int) -> torch.Tensor:
        """``num`` draws of z1 from the model: z2 ~ N(0, I), z1 ~ p(z1|z2); ``(num, z_dim)``."""
        z2 = self.top_prior().sample((num,))
        return dist.Normal(*self.upper_decoder(z2)).sample()


def two_layer_vae_from_config(config, image_shape: Sequence[int]) -> TwoLayerVAE:
    config.refuse_unused(uses=("z2_dim", "z2_hidden_dims"))
    if config.network != "mlp":
        raise ValueError(f"model 'vae2' is built of fully connected layers; use --network mlp, not {config.network!r}")
    encoder, decoder, likelihood = networks_and_likelihood(config, image_shape)
    upper = tuple(config.z2_hidden_dims)
    upper_encoder = MLPEncoder(config.z_dim, config.z2_dim, upper, config.activation)
    upper_decoder = MLPEncoder(config.z2_dim, config.z_dim, tuple(reversed(upper)), config.activation)
    vae = TwoLayerVAE(encoder, decoder, upper_encoder, upper_decoder, config.z_dim, config.z2_dim, image_shape,
                      likelihood)
    vae.bias_from_data = config.decoder_bias == "data-mean"
    return vae
