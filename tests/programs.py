"""Programs written as a user would write them: not registered, built in code.

``build_mixture_vae`` is an importable factory (``programs:build_mixture_vae``), for the
tests of runs that load back through the factory they recorded.
"""

import math

import pyro
import pyro.distributions as dist
import torch
from torch import nn

from pyro_vae.models import data_plate
from pyro_vae.models.vae import VAE
from pyro_vae.networks import MLPDecoder, MLPEncoder

SHAPE = (1, 4, 4)
D = math.prod(SHAPE)


class Mixture(nn.Module):
    """A mixture of unit Gaussians with learned weights and means."""

    def __init__(self, components, z_dim):
        super().__init__()
        self.logits = nn.Parameter(torch.zeros(components))
        self.locs = nn.Parameter(torch.randn(components, z_dim))

    def forward(self):
        return dist.MixtureSameFamily(dist.Categorical(logits=self.logits), dist.Normal(self.locs, 1.0).to_event(1))


class MixturePriorVAE(VAE):
    """The VAE with a learned mixture-of-Gaussians prior, registered with Pyro in the model."""

    def __init__(self, components=3, z_dim=2):
        super().__init__(MLPEncoder(D, z_dim, (8,)), MLPDecoder(D, z_dim, (8,)), z_dim, SHAPE)
        self.mixture = Mixture(components, z_dim)

    def prior(self):
        pyro.module("prior", self.mixture)
        return self.mixture()


def build_mixture_vae():
    torch.manual_seed(0)
    return MixturePriorVAE()


class LabelledProgram(nn.Module):
    """p(x | z, y) with the label's embedding added to the decoder's logits, and q(z | x).

    Records whether each call got labels equal to the images' own (the test data makes the
    label a function of the image), so a test can see the labels reach the program."""

    def __init__(self, classes=4, z_dim=2):
        super().__init__()
        self.encoder = MLPEncoder(D, z_dim, (8,))
        self.decoder = MLPDecoder(D, z_dim, (8,))
        self.label_logits = nn.Embedding(classes, D)
        self.calls = []

    def model(self, x, y=None, *, num_data=None):
        pyro.module("program", self)
        self.calls.append((x, y))
        x = x.reshape(x.shape[0], -1)
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            logits = self.decoder(z) + self.label_logits(y)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)

    def guide(self, x, y=None, *, num_data=None):
        pyro.module("program", self)
        x = x.reshape(x.shape[0], -1)
        with data_plate(x, num_data):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def label_of(images):
    """A label that is a function of the image: how many of its first 4 pixels are on."""
    return images.reshape(images.shape[0], -1)[:, :4].sum(-1).long().clamp(max=3)
