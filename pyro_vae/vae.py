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

from .likelihoods import BernoulliLikelihood, build_likelihood
from .networks import build_networks


class VAE(nn.Module):
    """A VAE whose ``model`` and ``guide`` are Pyro programs over sites ``"z"`` and ``"x"``.

    :param encoder: module ``x (..., D) -> (loc, scale)`` of q(z|x), each ``(..., z_dim)``.
    :param decoder: module ``z (..., z_dim) -> (..., D)``, the likelihood's parameters.
    :param z_dim: latent dimension.
    :param image_shape: shape of one image, e.g. ``(1, 28, 28)``; ``D`` is its product.
    :param likelihood: callable ``decoder output -> distribution of x | z``.
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        z_dim: int,
        image_shape: Sequence[int] = (1, 28, 28),
        likelihood=None,
    ):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.z_dim = int(z_dim)
        self.image_shape = tuple(int(s) for s in image_shape)
        self.x_dim = math.prod(self.image_shape)
        self.likelihood = likelihood if likelihood is not None else BernoulliLikelihood()
        # 0-dim buffers so the prior lives on the module's device (CPU or CUDA) without
        # allocating per call; the prior itself is written as a distribution below.
        self.register_buffer("prior_loc", torch.zeros(()))
        self.register_buffer("prior_scale", torch.ones(()))

    # -- the probabilistic program -------------------------------------------------

    def model(self, x=None, *, num_data=None, kl_weight=1.0, batch_size=None):
        """p(x, z) = p(z) p(x|z). With ``x=None`` it generates ``batch_size`` images.

        ``kl_weight`` scales the ``"z"`` site (here and in the guide alike), so an ELBO
        estimator sees ``E[log p(x|z)] - kl_weight * KL``: beta-VAE and KL annealing.
        """
        pyro.module("decoder", self.decoder)
        x = self._flatten(x) if x is not None else None
        with self._data_plate(x, num_data, batch_size):
            with kl_scaled(kl_weight):
                z = pyro.sample("z", dist.Normal(self.prior_loc, self.prior_scale).expand([self.z_dim]).to_event(1))
            out = self.decoder(z)
            pyro.sample("x", self.likelihood(out), obs=x)
        return out

    def guide(self, x=None, *, num_data=None, kl_weight=1.0, batch_size=None):
        """q(z|x) = N(loc(x), diag scale(x)^2), sampled by reparameterisation."""
        if x is None:
            raise ValueError("the guide q(z|x) needs the images x it encodes")
        pyro.module("encoder", self.encoder)
        x = self._flatten(x)
        with self._data_plate(x, num_data, batch_size):
            loc, scale = self.encoder(x)
            with kl_scaled(kl_weight):
                pyro.sample("z", self.posterior(loc, scale))
        return loc, scale

    def posterior(self, loc: torch.Tensor, scale: torch.Tensor) -> dist.TorchDistribution:
        """The guide's family given the encoder's output: N(loc, diag scale^2), one event."""
        return dist.Normal(loc, scale).to_event(1)

    # -- plain-tensor views of the same networks (for figures and evaluation) -------

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loc, scale) of q(z|x) for a batch of images."""
        return self.encoder(self._flatten(x, check=False))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """E[x|z] as images of shape ``(..., *image_shape)``."""
        mean = self.likelihood.mean(self.decoder(z))
        return mean.reshape(*z.shape[:-1], *self.image_shape)

    # -- helpers ---------------------------------------------------------------------

    def _data_plate(self, x, num_data, batch_size):
        batch = x.shape[0] if x is not None else batch_size
        if batch is None:
            raise ValueError("model(x=None) generates data and needs batch_size=...")
        size = batch if num_data is None else int(num_data)
        if size < batch:
            raise ValueError(f"num_data={size} is smaller than the minibatch of {batch} images")
        # An explicit subsample index tells the plate the minibatch size without
        # drawing a random permutation of the whole data set at every step.
        subsample = torch.arange(batch, device=self.prior_loc.device) if size != batch else None
        return pyro.plate("data", size=size, subsample=subsample)

    def _flatten(self, x: torch.Tensor, check: bool = True) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        shape = tuple(x.shape)
        if shape[1:] == self.image_shape or (x.dim() == 2 and shape[1] == self.x_dim):
            x = x.reshape(shape[0], self.x_dim)
        else:
            raise ValueError(
                f"x has shape {shape}; expected (batch, {', '.join(map(str, self.image_shape))}) "
                f"or (batch, {self.x_dim})"
            )
        if check and is_validation_enabled():
            self.likelihood.check_data(x, "x")
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


def build_vae(model_config, image_shape: Sequence[int], klass: type | None = None) -> VAE:
    """The VAE described by a :class:`pyro_vae.config.ModelConfig` (``klass``: a VAE subclass)."""
    encoder, decoder = build_networks(
        model_config.network, image_shape, model_config.z_dim, model_config.hidden_dims, model_config.activation
    )
    klass = klass or VAE
    return klass(encoder, decoder, model_config.z_dim, image_shape, build_likelihood(model_config.likelihood))
