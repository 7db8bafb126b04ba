r"""The VAE with a flow guide: inverse autoregressive flow (Kingma et al. 2016).

The model is the VAE's. The guide draws a diagonal Gaussian and pushes it through T
affine autoregressive transforms conditioned on features h(x) of the encoder:

.. math::

    z_0 = \mu(x) + \sigma(x) \odot \epsilon, \qquad
    z_t = m_t(z_{t-1}, h(x)) + s_t(z_{t-1}, h(x)) \odot z_{t-1}, \qquad z = z_T,

with :math:`(m_t, s_t)` from a masked autoregressive network (``pyro.nn.ConditionalAutoRegressiveNN``,
``pyro.distributions.transforms.ConditionalAffineAutoregressive``), so
:math:`\log q(z|x) = \log \mathcal{N}(z_0; \mu, \sigma^2) - \sum_t \sum_d \log s_{t,d}`.
Each transform's last layer starts at zero: at initialisation every transform is the
identity and the guide is the Gaussian one. The flows are submodules of the program, so
every engine trains them and every checkpoint saves them.
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.transforms import ConditionalAffineAutoregressive
from pyro.nn import ConditionalAutoRegressiveNN
from torch import nn
from torch.distributions import constraints

from ..networks import GaussianHead, activation, mlp
from ..protocol import LocalFamily
from .vae import VAE, networks_and_likelihood

POSTERIOR_MEAN_DRAWS = 64  # E_q[z|x] of a flow has no closed form: the mean of this many draws


class FlowEncoder(nn.Module):
    """x (..., D) -> (loc, scale, h): the Gaussian of z_0 and the flow's context features."""

    def __init__(self, x_dim: int, z_dim: int, hidden_dims: Sequence[int], act: str, context_dim: int):
        super().__init__()
        self.body = nn.Sequential(mlp([x_dim, *hidden_dims], act), activation(act))
        self.head = GaussianHead(hidden_dims[-1], z_dim)
        self.context = nn.Linear(hidden_dims[-1], context_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        features = self.body(x)
        loc, scale = self.head(features)
        return loc, scale, self.context(features)


def identity_flow(z_dim: int, context_dim: int, hidden: int) -> ConditionalAffineAutoregressive:
    """An affine autoregressive transform whose last layer is zero: y = x until it learns."""
    net = ConditionalAutoRegressiveNN(z_dim, context_dim, [hidden])
    with torch.no_grad():
        net.layers[-1].weight.zero_()
        net.layers[-1].bias.zero_()
    return ConditionalAffineAutoregressive(net)


class IAFVAE(VAE):
    """The VAE whose guide is a Gaussian followed by ``len(flows)`` IAF transforms."""

    encode = None  # q(z|x) is not a diagonal Gaussian

    def __init__(self, encoder: FlowEncoder, decoder: nn.Module, flows: Sequence[nn.Module], z_dim: int,
                 image_shape: Sequence[int] = (1, 28, 28), likelihood: nn.Module | None = None):
        super().__init__(encoder, decoder, z_dim, image_shape, likelihood)
        self.flows = nn.ModuleList(flows)

    def posterior(self, loc: torch.Tensor, scale: torch.Tensor, context: torch.Tensor) -> dist.TorchDistribution:
        """q(z|x) given the encoder's output: N(loc, diag scale^2) through the flows conditioned on ``context``."""
        base = dist.Normal(loc, scale).to_event(1)
        return dist.TransformedDistribution(base, [flow.condition(context) for flow in self.flows])

    def guide(self, x=None, *, num_data=None, kl_weight=1.0, batch_size=None):
        """z ~ q(z|x), the Gaussian draw pushed through the flows (all reparameterised)."""
        if x is None:
            raise ValueError("the guide q(z|x) needs the images x it encodes")
        pyro.module("encoder", self.encoder)
        pyro.module("flows", self.flows)
        x = self._flatten(x)
        with self._plate(x, num_data, batch_size):
            params = self.encoder(x)
            with self.latent_weight(kl_weight):
                pyro.sample("z", self.posterior(*params))
        return params

    def amortized_parameters(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.encoder(self._flatten(x, check=False))

    def local_family(self):
        """Per image: the Gaussian's (loc, scale) and the flow's context; the flow's weights are shared."""
        return LocalFamily("z", self.amortized_parameters, self.posterior,
                           (constraints.real, constraints.positive, constraints.real))

    @torch.no_grad()
    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """E_q[z|x], the mean of ``POSTERIOR_MEAN_DRAWS`` draws (fixed seed: the same x gives the same value)."""
        gen = torch.Generator(device=x.device).manual_seed(0)
        loc, scale, context = self.amortized_parameters(x)
        eps = torch.randn((POSTERIOR_MEAN_DRAWS, *loc.shape), generator=gen, device=loc.device, dtype=loc.dtype)
        z = loc + scale * eps
        for flow in self.flows:
            z = flow.condition(context)(z)
        return z.mean(0)


def iaf_vae_from_config(config, image_shape: Sequence[int]) -> IAFVAE:
    config.refuse_unused(uses=("flow_steps",))
    if config.network != "mlp":
        raise ValueError(f"model 'vae-iaf' has a fully connected encoder; use --network mlp, not {config.network!r}")
    _, decoder, likelihood = networks_and_likelihood(config, image_shape)
    x_dim = 1
    for s in image_shape:
        x_dim *= int(s)
    hidden = config.hidden_dims[-1]
    encoder = FlowEncoder(x_dim, config.z_dim, config.hidden_dims, config.activation, context_dim=hidden)
    flows = [identity_flow(config.z_dim, hidden, hidden) for _ in range(config.flow_steps)]
    vae = IAFVAE(encoder, decoder, flows, config.z_dim, image_shape, likelihood)
    vae.bias_from_data = config.decoder_bias == "data-mean"
    return vae
