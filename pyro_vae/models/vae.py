r"""The variational autoencoder as a Pyro model and guide (Kingma & Welling, 2013).

Generative story (``VAE.model``), for each image n of a data set of size N:

.. math::

    z_n \sim \mathcal{N}(0, I_{z\_dim}), \qquad
    x_n \mid z_n \sim \prod_d \mathrm{Bernoulli}\big(\sigma(f_\theta(z_n)_d)\big)

Amortised variational posterior (``VAE.guide``):

.. math::

    q_\phi(z_n \mid x_n) = \mathcal{N}\big(\mu_\phi(x_n), \operatorname{diag} \sigma_\phi(x_n)^2\big)

Any Pyro ELBO applied to ``(model, guide)`` estimates

.. math::

    \mathcal{L} = \sum_n \mathbb{E}_{q}[\log p_\theta(x_n \mid z_n)]
                  - \mathrm{KL}\big(q_\phi(z_n \mid x_n) \,\|\, p(z_n)\big).

Minibatches are subsamples of the data set: the ``"data"`` plate is told the full size
``num_data`` so Pyro scales the minibatch terms by ``N / B`` and the estimate is of the
whole-data-set objective.

The likelihood is a module of its own (:mod:`pyro_vae.likelihoods`): Bernoulli as written
above, or one for grey data (continuous Bernoulli, Gaussian with a learned scale). The
prior is :meth:`VAE.prior`; a subclass that overrides it (a mixture of Gaussians, a
VampPrior) keeps everything else, docs/extending.md shows one.
"""

from __future__ import annotations

import contextlib
import math
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer.util import is_validation_enabled
from torch import nn

from ..distributions import DiagonalNormal, StandardNormal
from ..likelihoods import BernoulliLikelihood, build_likelihood
from ..networks import build_networks
from ..protocol import LocalFamily, data_plate


class VAE(nn.Module):
    """A VAE whose ``model`` and ``guide`` are Pyro programs over sites ``"z"`` and ``"x"``.

    :param encoder: module ``x (..., D) -> (loc, scale)`` of q(z|x), each ``(..., z_dim)``.
    :param decoder: module ``z (..., z_dim) -> (..., D)``, the likelihood's parameters.
    :param z_dim: latent dimension.
    :param image_shape: shape of one image, e.g. ``(1, 28, 28)``; ``D`` is its product.
    :param likelihood: module ``decoder output -> distribution of x | z``
        (:mod:`pyro_vae.likelihoods`); Bernoulli by default.
    """

    point_estimate = False  # the guide is a distribution, so the ELBO exists

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        z_dim: int,
        image_shape: Sequence[int] = (1, 28, 28),
        likelihood: nn.Module | None = None,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.z_dim = int(z_dim)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.x_dim = math.prod(self.image_shape)
        self.likelihood = likelihood if likelihood is not None else BernoulliLikelihood(self.x_dim)
        # a likelihood with a learned part (a Gaussian's scale) is registered with Pyro too,
        # so that every engine trains it (pyro.infer.SVI optimises what Pyro sees)
        self._likelihood_learns = any(True for _ in self.likelihood.parameters())
        # 0-dim buffers so the prior lives on the module's device (CPU or CUDA) without
        # allocating per call; the prior itself is written as a distribution below.
        self.register_buffer("prior_loc", torch.zeros(()))
        self.register_buffer("prior_scale", torch.ones(()))

    @property
    def binary_data(self) -> bool:
        """Whether the likelihood scores binary pixels only (grey images get binarised)."""
        return bool(self.likelihood.binary)

    # -- the probabilistic program -------------------------------------------------

    def prior(self) -> dist.TorchDistribution:
        """p(z) = N(0, I): one event of ``z_dim`` dimensions (``Normal(0, 1).expand([z_dim]).to_event(1)``,
        scored as ``-z^2 / 2`` summed, pyro_vae.distributions)."""
        return StandardNormal.of_size(self.z_dim, like=self.prior_loc)

    def model(self, x=None, *, num_data=None, kl_weight=1.0, batch_size=None):
        """p(x, z) = p(z) p(x|z). With ``x=None`` it generates ``batch_size`` images.

        ``kl_weight`` scales the ``"z"`` site (here and in the guide alike), so an ELBO
        estimator sees ``E[log p(x|z)] - kl_weight * KL``: beta-VAE and KL annealing.
        """
        pyro.module("decoder", self.decoder)
        if self._likelihood_learns:
            pyro.module("likelihood", self.likelihood)
        x = self._flatten(x) if x is not None else None
        with self._plate(x, num_data, batch_size):
            with self.latent_weight(kl_weight):
                z = pyro.sample("z", self.prior())
            out = self.decoder(z)
            pyro.sample("x", self.likelihood(out), obs=x)
        return out

    def guide(self, x=None, *, num_data=None, kl_weight=1.0, batch_size=None):
        """q(z|x) = N(loc(x), diag scale(x)^2), sampled by reparameterisation."""
        if x is None:
            raise ValueError("the guide q(z|x) needs the images x it encodes")
        pyro.module("encoder", self.encoder)
        x = self._flatten(x)
        with self._plate(x, num_data, batch_size):
            loc, scale = self.encoder(x)
            with self.latent_weight(kl_weight):
                pyro.sample("z", self.posterior(loc, scale))
        return loc, scale

    def posterior(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.TorchDistribution:
        """The guide's family given the encoder's output: N(loc, diag scale^2), one event
        (``Normal(loc, scale).to_event(1)``, scoring its own draws from their noise,
        pyro_vae.distributions)."""
        return DiagonalNormal.of(loc, scale)

    def latent_weight(self, kl_weight):
        """The handler that weights ``"z"`` in model and guide (:func:`kl_scaled`)."""
        return kl_scaled(kl_weight)

    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        """Raise unless the likelihood can score every image of ``x``."""
        self.likelihood.check_data(self._flatten(x, check=False), what)

    bias_from_data = False  # set by ModelConfig(decoder_bias="data-mean")

    def initialize_from_data(self, images: torch.Tensor) -> None:
        """Before a new run's first step: with ``bias_from_data``, start the decoder's output
        bias at the likelihood's parameter for the training set's mean image (Burda et al.
        2016 did so), so the first steps learn structure rather than the average pixel."""
        if self.bias_from_data:
            start_output_at_mean(self.decoder, self.likelihood, self._flatten(images, check=False))

    # -- views of the same networks, for figures and diagnostics (pyro_vae.views) ----

    def local_family(self):
        """The guide's per-image family, N(loc, diag scale^2) over ``"z"`` (pyro_vae.posterior)."""
        from torch.distributions import constraints

        return LocalFamily("z", self.encode, self.posterior, (constraints.real, constraints.positive))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q(z|x) for a batch of images."""
        return self.encoder(self._flatten(x, check=False))

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """E_q[z|x] for a batch of images."""
        return self.encoder(self._flatten(x, check=False))[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """E[x|z] as images of shape ``(..., *image_shape)``."""
        mean = self.likelihood.mean(self.decoder(z))
        return mean.reshape(*z.shape[:-1], *self.image_shape)

    def sample_prior(self, num: int) -> torch.Tensor:
        """``num`` draws z ~ p(z): ``(num, z_dim)``."""
        return self.prior().sample((num,))

    # -- helpers ---------------------------------------------------------------------

    def _plate(self, x, num_data, batch_size):
        if x is not None:
            return data_plate(x, num_data)
        if batch_size is None:
            raise ValueError("model(x=None) generates data and needs batch_size=...")
        return pyro.plate("data", size=int(batch_size))

    def _flatten(self, x: torch.Tensor, check: bool = True) -> torch.Tensor:
        return flat_images(self, x, check)


def flat_images(program, x: torch.Tensor, check: bool = True) -> torch.Tensor:
    """``x`` as ``(batch, x_dim)``, from ``(batch, *image_shape)`` or already flat, checked by
    ``program.likelihood`` when Pyro's validation is on (``check``); a clear error otherwise."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    shape = tuple(x.shape)
    if shape[1:] == program.image_shape or (x.dim() == 2 and shape[1] == program.x_dim):
        x = x.reshape(shape[0], program.x_dim)
    else:
        raise ValueError(f"x has shape {shape}; expected (batch, {', '.join(map(str, program.image_shape))}) "
                         f"or (batch, {program.x_dim})")
    if check and is_validation_enabled():
        program.likelihood.check_data(x, "x")
    return x


def kl_scaled(kl_weight: float):
    """The handler that weights the ``"z"`` site's log-densities by ``kl_weight``.

    Applied to ``"z"`` in both model and guide, it turns ``log p(z) - log q(z|x)`` into
    ``kl_weight * (log p(z) - log q(z|x))``. Pyro's scale must be positive, so a weight
    of 0 masks the site instead (same effect: the term is dropped). A tensor weight (a
    recorded training step takes it as an input, pyro_vae.capture) always scales.
    """
    if isinstance(kl_weight, torch.Tensor):
        return poutine.scale(scale=kl_weight)
    if kl_weight == 1:
        return contextlib.nullcontext()  # the plain ELBO: no handler to run at every step
    if kl_weight == 0:
        return poutine.mask(mask=False)
    return poutine.scale(scale=kl_weight)


@torch.no_grad()
def start_output_at_mean(decoder: nn.Module, likelihood, images: torch.Tensor) -> None:
    """Set ``decoder.output_bias`` so that, at weights 0, it decodes the mean of ``images`` ``(N, D)``."""
    if getattr(likelihood, "outputs_per_pixel", 1) != 1:  # its own reason: no mean fixes several outputs
        likelihood.output_for_mean(images.double().mean(0))
    bias = getattr(decoder, "output_bias", None)
    if bias is None or bias.shape != images.shape[1:]:
        raise ValueError(f"decoder_bias='data-mean' needs a decoder with one output bias per pixel (the mlp "
                         f"network); {type(decoder).__name__} has none; use decoder_bias='random'")
    bias.copy_(likelihood.output_for_mean(images.double().mean(0)).to(bias.dtype))


def networks_and_likelihood(config, image_shape: Sequence[int]):
    """(encoder, decoder, likelihood) as a :class:`pyro_vae.config.ModelConfig` describes them."""
    encoder, decoder = build_networks(config.network, image_shape, config.z_dim, config.hidden_dims,
                                      config.activation)
    likelihood = build_likelihood(config.likelihood, math.prod(image_shape))
    per_pixel = getattr(likelihood, "outputs_per_pixel", 1)
    if per_pixel > 1:  # (a 256-way categorical: its logits, level by level, as channels of the image)
        shape = (image_shape[0] * per_pixel, *image_shape[1:])
        decoder = build_networks(config.network, shape, config.z_dim, config.hidden_dims, config.activation)[1]
    return encoder, decoder, likelihood


def vae_from_config(config, image_shape: Sequence[int]) -> VAE:
    config.refuse_unused()
    encoder, decoder, likelihood = networks_and_likelihood(config, image_shape)
    vae = VAE(encoder, decoder, config.z_dim, image_shape, likelihood)
    vae.bias_from_data = config.decoder_bias == "data-mean"
    return vae
