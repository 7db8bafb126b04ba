"""Two MNIST-sized programs of the kinds the oracle library holds, with importable
factories, for end-to-end runs of the command line (tests/test_oracle.py)."""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer.autoguide import AutoNormal
from torch import nn

from pyro_vae.models import data_plate
from pyro_vae.networks import MLPDecoder, MLPEncoder

PIXELS, Z = 784, 2


def _flat(x):
    return x.reshape(x.shape[0], -1)


class PerImageAutoNormal(nn.Module):
    """The VAE's model with Pyro's AutoNormal as the guide: one Gaussian per training image."""

    binary_data = True

    def __init__(self):
        super().__init__()
        self.decoder = MLPDecoder(PIXELS, Z, (32,))
        self.guide = AutoNormal(self.model, create_plates=self.plate)

    def plate(self, x, num_data=None, index=None):
        return data_plate(_flat(x), num_data, index)

    def model(self, x, num_data=None, index=None):
        pyro.module("decoder", self.decoder)
        x = _flat(x)
        with self.plate(x, num_data, index):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class Enumerated(nn.Module):
    """y ~ Cat(1/10) beside z, y summed out in the guide by TraceEnum_ELBO."""

    binary_data = True

    def __init__(self):
        super().__init__()
        self.classify = nn.Linear(PIXELS, 10)
        self.encoder = MLPEncoder(PIXELS, Z, (32,))
        self.decoder = MLPDecoder(PIXELS, Z, (32,))
        self.embed = nn.Embedding(10, PIXELS)

    def model(self, x, num_data=None):
        pyro.module("program", self)
        x = _flat(x)
        with data_plate(x, num_data):
            y = pyro.sample("y", dist.Categorical(logits=torch.zeros(10)))
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z) + self.embed(y)).to_event(1), obs=x)

    def guide(self, x, num_data=None):
        pyro.module("program", self)
        x = _flat(x)
        with data_plate(x, num_data):
            pyro.sample("y", dist.Categorical(logits=self.classify(x)), infer={"enumerate": "parallel"})
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


def per_image_autonormal():
    torch.manual_seed(0)
    return PerImageAutoNormal()


def enumerated():
    torch.manual_seed(0)
    return Enumerated()
