"""The oracle's library: small Pyro programs unlike the built-in VAE, each a valid program
that Pyro's own ELBO scores. tests/test_oracle.py checks that pyro_vae reports, trains
and reloads each as Pyro would, or refuses it at once with the reason.

Each entry of ``PROGRAMS`` builds a fresh, seeded program; ``ESTIMATOR`` names the
registered estimator that trains it. A new kind of program found to be mis-scored
becomes a new entry here.
"""

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import config_enumerate
from pyro.infer.autoguide import (AutoDiagonalNormal, AutoMultivariateNormal, AutoNormal, AutoNormalMessenger,
                                  AutoRegressiveMessenger)
from torch import nn

from pyro_vae.models import data_plate
from pyro_vae.models.vae import VAE
from pyro_vae.networks import MLPDecoder, MLPEncoder

SHAPE = (1, 4, 4)
D = math.prod(SHAPE)
Z = 2


def _flat(x):
    return x.reshape(x.shape[0], -1)


class _Networks(nn.Module):
    """An encoder and a decoder; ``check_data`` so every engine runs (and records) the steps."""

    def __init__(self, z_dim=Z):
        super().__init__()
        self.encoder = MLPEncoder(D, z_dim, (8,))
        self.decoder = MLPDecoder(D, z_dim, (8,))

    def check_data(self, x, what="data"):
        if not ((x == 0) | (x == 1)).all():
            raise ValueError(f"{what} must be binary")


class _Encoded(_Networks):
    """The amortised Gaussian guide q(z | x)."""

    def guide(self, x, *, num_data=None):
        pyro.module("encoder", self.encoder)
        x = _flat(x)
        with data_plate(x, num_data):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


class MaskedSite(_Encoded):
    """The VAE with a second, fully masked observation of x (its 16 pixels counted by no ELBO)."""

    def model(self, x, *, num_data=None):
        pyro.module("decoder", self.decoder)
        x = _flat(x)
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            logits = self.decoder(z)
            pyro.sample("x", dist.Bernoulli(logits=logits).to_event(1), obs=x)
            with poutine.mask(mask=False):
                pyro.sample("x_again", dist.Bernoulli(logits=logits - 2.0).to_event(1), obs=x)


PIXEL_MASK = torch.arange(D) % 3 != 0  # the pixels observed; the others are missing


class ObsMask(_Encoded):
    """Missing pixels by Pyro's ``obs_mask``, in a pixel plate (dim -1) nested in the data
    plate (dim -2), as Pyro's idiom for per-pixel masks has it; the guide proposes the
    missing pixels (``x_unobserved``) as fair coins."""

    @staticmethod
    def _plate(x, num_data):
        size = x.shape[0] if num_data is None else num_data
        subsample = None if size == x.shape[0] else torch.arange(x.shape[0])
        return pyro.plate("data", size, subsample=subsample, dim=-2)

    def model(self, x, *, num_data=None):
        pyro.module("decoder", self.decoder)
        x = _flat(x)
        with self._plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))  # batch (..., B, 1)
            logits = self.decoder(z).squeeze(-2)  # (..., B, D)
            with pyro.plate("pixels", D, dim=-1):
                pyro.sample("x", dist.Bernoulli(logits=logits), obs=x, obs_mask=PIXEL_MASK)

    def guide(self, x, *, num_data=None):
        pyro.module("encoder", self.encoder)
        x = _flat(x)
        with self._plate(x, num_data):
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc.unsqueeze(-2), scale.unsqueeze(-2)).to_event(1))
            with pyro.plate("pixels", D, dim=-1), poutine.mask(mask=~PIXEL_MASK):
                pyro.sample("x_unobserved", dist.Bernoulli(probs=torch.full((D,), 0.5)))


class ScaledLikelihood(_Encoded):
    """The likelihood tempered by ``poutine.scale(0.5)``."""

    def model(self, x, *, num_data=None):
        pyro.module("decoder", self.decoder)
        x = _flat(x)
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            with poutine.scale(scale=0.5):
                pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class GlobalLatent(_Encoded):
    """A Bayesian last layer: the weights W ~ N(0, 1) outside the data plate, q(W) a learned Gaussian."""

    def __init__(self):
        super().__init__()
        self.w_loc = nn.Parameter(torch.zeros(Z, D))
        self.w_log_scale = nn.Parameter(torch.full((Z, D), -2.0))

    def model(self, x, *, num_data=None):
        pyro.module("decoder", self.decoder)
        x = _flat(x)
        w = pyro.sample("W", dist.Normal(torch.zeros(Z, D), 1.0).to_event(2))
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z) + z @ w).to_event(1), obs=x)

    def guide(self, x, *, num_data=None):
        pyro.module("program", self)
        pyro.sample("W", dist.Normal(self.w_loc, self.w_log_scale.exp()).to_event(2))
        super().guide(x, num_data=num_data)


class BayesianLayerAutoguide(GlobalLatent):
    """The Bayesian last layer with Pyro's ``AutoDiagonalNormal`` over W beside the amortised encoder."""

    def __init__(self):
        super().__init__()
        del self.w_loc, self.w_log_scale
        self.w_guide = AutoDiagonalNormal(poutine.block(self.model, expose=["W"]))

    def guide(self, x, *, num_data=None):
        self.w_guide(x, num_data=num_data)
        _Encoded.guide(self, x, num_data=num_data)


class BayesianLayerFullCovariance(BayesianLayerAutoguide):
    """The Bayesian last layer with ``AutoMultivariateNormal`` (a full covariance) over W."""

    def __init__(self):
        super().__init__()
        self.w_guide = AutoMultivariateNormal(poutine.block(self.model, expose=["W"]))


class _Plain(_Networks):
    def model(self, x, *, num_data=None, index=None):
        pyro.module("decoder", self.decoder)
        x = _flat(x)
        with data_plate(x, num_data, index):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x)


class PerImageAutoNormal(_Plain):
    """Pyro's ``AutoNormal`` with one Gaussian per training image (no encoder): the
    minibatch's data-set indices must reach the plate."""

    def __init__(self):
        super().__init__()
        del self.encoder
        # the autoguide's plate takes the minibatch's positions, as Pyro's create_plates allows
        self.autoguide = AutoNormal(self.model, create_plates=_data_plate)

    def guide(self, x, *, num_data=None, index=None):
        return self.autoguide(x, num_data=num_data, index=index)


def _data_plate(x, num_data=None, index=None):
    return data_plate(_flat(x), num_data, index)


class OwnSubsampleAutoNormal(_Plain):
    """``AutoNormal`` per image without ``create_plates``: its plate draws random images of
    its own, not the minibatch's. Refused, with the fix."""

    def __init__(self):
        super().__init__()
        del self.encoder
        self.autoguide = AutoNormal(self.model)

    def guide(self, x, *, num_data=None, index=None):
        return self.autoguide(x, num_data=num_data, index=index)


class Messenger(_Plain):
    """Pyro's ``AutoNormalMessenger`` (a ``GuideMessenger``: it runs the model itself),
    amortised over the data plate (one Gaussian shared by every image). The messenger is
    the program's ``guide`` itself, so Pyro's ELBOs see it and trace it as they should."""

    def __init__(self):
        super().__init__()
        del self.encoder
        self.guide = AutoNormalMessenger(self.model, amortized_plates=("data",))


class RegressiveMessenger(_Plain):
    """Pyro's ``AutoRegressiveMessenger`` (the posterior a learned affine function of the
    prior's draw), amortised over the data plate."""

    def __init__(self):
        super().__init__()
        del self.encoder
        self.guide = AutoRegressiveMessenger(self.model, amortized_plates=("data",))


class MessengerInAMethod(_Plain):
    """The same guide called from a method: Pyro's ELBOs cannot see that it runs the model,
    and would score the observed x as a guide site. Refused, with the fix."""

    def __init__(self):
        super().__init__()
        del self.encoder
        self.autoguide = AutoNormalMessenger(self.model, amortized_plates=("data",))

    def guide(self, x, *, num_data=None, index=None):
        return self.autoguide(x, num_data=num_data, index=index)


K = 3  # classes of the discrete latent


class DiscreteLatent(_Encoded):
    """A class y ~ Cat(1/K) beside z; x | y, z; the guide q(y | x) q(z | x). ``enumerate``:
    y summed out in the guide (TraceEnum_ELBO); else drawn (score function, TraceGraph_ELBO)."""

    def __init__(self, enumerate=True):
        super().__init__()
        self.classify = nn.Linear(D, K)
        self.embed = nn.Embedding(K, D)
        self.enumerate = enumerate

    def model(self, x, *, num_data=None):
        pyro.module("program", self)
        x = _flat(x)
        with data_plate(x, num_data):
            y = pyro.sample("y", dist.Categorical(logits=torch.zeros(K)))
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z) + self.embed(y)).to_event(1), obs=x)

    def guide(self, x, *, num_data=None):
        pyro.module("program", self)
        x = _flat(x)
        with data_plate(x, num_data):
            infer = {"enumerate": "parallel"} if self.enumerate else {}
            pyro.sample("y", dist.Categorical(logits=self.classify(x)), infer=infer)
            loc, scale = self.encoder(x)
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


class ModelEnumerated(_Encoded):
    """A mixture of K decoders: the component c ~ Cat(1/K) is summed out in the *model*
    (no guide site), z is guided."""

    def __init__(self):
        super().__init__()
        self.offsets = nn.Parameter(torch.randn(K, D))

    @config_enumerate
    def model(self, x, *, num_data=None):
        pyro.module("program", self)
        x = _flat(x)
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            c = pyro.sample("c", dist.Categorical(logits=torch.zeros(K)))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z) + self.offsets[c]).to_event(1), obs=x)


class Conditional(_Encoded):
    """A conditional VAE: p(x | z, y) with y's embedding added to the logits, q(z | x, y);
    its views take y too, and record what they were given."""

    z_dim, image_shape = Z, SHAPE

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(4, D)
        self.view_labels = []  # the y of every view call (None when called without)

    def encode(self, x, y=None):
        self.view_labels.append(y)
        return self.encoder(_flat(x) + 0.1 * self.embed(y))

    def posterior_mean(self, x, y=None):
        return self.encode(x, y)[0]

    def decode(self, z, y=None):
        self.view_labels.append(y)
        return torch.sigmoid(self.decoder(z) + self.embed(y)).reshape(*z.shape[:-1], *SHAPE)

    def sample_prior(self, num):
        return self.prior().sample((num,))

    def prior(self):
        return dist.Normal(torch.zeros(Z), 1.0).to_event(1)

    def model(self, x, y=None, *, num_data=None):
        pyro.module("program", self)
        x = _flat(x)
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(Z), 1.0).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z) + self.embed(y)).to_event(1), obs=x)

    def guide(self, x, y=None, *, num_data=None):
        pyro.module("program", self)
        x = _flat(x)
        with data_plate(x, num_data):
            loc, scale = self.encoder(x + 0.1 * self.embed(y))
            pyro.sample("z", dist.Normal(loc, scale).to_event(1))


class TiedDecoder(MaskedSite):
    """The decoder reachable by two attribute paths (as tied weights and wrappers make it)."""

    def __init__(self):
        super().__init__()
        self.alias = self.decoder


class TiedValueReading(TiedDecoder):
    """A tied decoder and a guide that reads a value: its recording fails half-way."""

    def guide(self, x, *, num_data=None):
        if float(self.alias.net[0].weight.sum()) > 1e9:
            raise AssertionError("unreachable")
        super().guide(x, num_data=num_data)


def labels_of(images):
    """A label that is a function of the image, 0-3."""
    return _flat(images)[:, :4].sum(-1).long().clamp(max=3)


def _seeded(cls, *args):
    def build():
        torch.manual_seed(0)
        return cls(*args)
    return build


# importable factories (oracle_programs:NAME), so runs of these programs load back
masked_site = _seeded(MaskedSite)
obs_mask = _seeded(ObsMask)
scaled_likelihood = _seeded(ScaledLikelihood)
global_latent = _seeded(GlobalLatent)
bayesian_layer_autoguide = _seeded(BayesianLayerAutoguide)
per_image_autonormal = _seeded(PerImageAutoNormal)
autonormal_messenger = _seeded(Messenger)
discrete_enumerated = _seeded(DiscreteLatent, True)
discrete_sampled = _seeded(DiscreteLatent, False)
model_enumerated = _seeded(ModelEnumerated)
conditional = _seeded(Conditional)
tied_decoder = _seeded(TiedDecoder)
bayesian_layer_full_covariance = _seeded(BayesianLayerFullCovariance)
autoregressive_messenger = _seeded(RegressiveMessenger)

FACTORIES = {
    "masked-site": "masked_site", "obs-mask": "obs_mask", "scaled-likelihood": "scaled_likelihood",
    "global-latent": "global_latent", "bayesian-layer-autoguide": "bayesian_layer_autoguide",
    "per-image-autonormal": "per_image_autonormal", "autonormal-messenger": "autonormal_messenger",
    "discrete-enumerated": "discrete_enumerated", "discrete-sampled": "discrete_sampled",
    "model-enumerated": "model_enumerated", "conditional": "conditional", "tied-decoder": "tied_decoder",
    "bayesian-layer-full-covariance": "bayesian_layer_full_covariance",
    "autoregressive-messenger": "autoregressive_messenger",
}

# Programs whose log p(x) is not defined per image, and the reason the refusal gives
NO_LOG_PX = {"global-latent": "outside the 'data' plate", "bayesian-layer-autoguide": "outside the 'data' plate",
             "bayesian-layer-full-covariance": "outside the 'data' plate", "scaled-likelihood": "scaled by 0.5",
             "model-enumerated": "not sampled by the guide"}
PROGRAMS = {name: globals()[factory] for name, factory in FACTORIES.items()}

ESTIMATOR = {"discrete-enumerated": "traceenum", "discrete-sampled": "tracegraph", "model-enumerated": "traceenum"}

# Valid Pyro, but not scoreable as written: refused at once, the message naming the fix
REFUSED = {
    "messenger-in-a-method": (_seeded(MessengerInAMethod), "the program's guide itself"),
    "autonormal-own-subsample": (_seeded(OwnSubsampleAutoNormal), "create_plates"),
}
