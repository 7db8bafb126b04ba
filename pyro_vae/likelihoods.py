r"""Likelihoods: decoder output -> a Pyro distribution over a flattened image.

A likelihood is a small :class:`torch.nn.Module`, built as ``Klass(x_dim)``:

* ``likelihood(out)`` returns the distribution of ``x | z`` with the image as one event
  (batch shape ``out.shape[:-1]``, event shape ``(x_dim,)``);
* ``mean(out)`` is E[x|z], the image a figure shows for a decoded z;
* ``check_data(x)`` rejects data outside the distribution's support before training,
  naming the likelihood and the fix;
* ``binary`` says whether it scores binary pixels only: training binarises grey images
  for those (``--binarize``) and leaves grey values as they are for the others.

A learned part (a Gaussian's scale) is a parameter of the module; the VAE registers the
likelihood with Pyro (``pyro.module``) so that every engine trains it. A new
observation model is one class here and one registry line.

For grey data the likelihoods are densities on [0, 1]^D: log p(x) is then a log-density,
not a log-probability, and may be positive (docs/results.md).
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch import nn
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all
from torch.nn.functional import binary_cross_entropy_with_logits, logsigmoid, softplus

from . import networks
from .catalog import LIKELIHOODS

class BernoulliImage(dist.Independent):
    r"""``Bernoulli(logits).to_event(1)``, scored in three passes over the logits.

    Same distribution as ``dist.Bernoulli(logits=...).to_event(1)`` (sampling, support,
    expansion are inherited); ``log_prob`` is
    :math:`\sum_d x_d l_d - \mathrm{softplus}(l_d)` (the Bernoulli log-probability
    :math:`x \log\sigma(l) + (1 - x)\log\sigma(-l)` rearranged), one fused
    multiply-and-sum and one softplus-and-sum, instead of
    ``binary_cross_entropy_with_logits``, whose CPU kernel makes several passes. On the
    CPU that is 25 % less time for the scoring in importance-sampled evaluation and 40 %
    less forward and backward at batch 1024 (docs/performance.md). Float32 rounding of
    the two sums differs from the cross-entropy's by about 1e-4 nats per image. The softplus
    is :func:`pyro_vae.networks.softplus`: on CPUs whose ``log1p`` is slow, computed from
    ``exp`` and ``log`` instead, 6 times faster there without autograd.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits = self.base_dist.logits
        return torch.linalg.vecdot(logits, value) - networks.softplus(logits).sum(-1)


class Likelihood(nn.Module):
    """What every likelihood shares: the float check and the support check's message."""

    name = ""
    binary = False
    levels = None  # the number of pixel values whose probabilities it gives, for likelihoods of 8-bit data
    outputs_per_pixel = 1  # decoder outputs per pixel
    support = ""  # for messages: how the values it cannot score are described
    fix = ""  # for messages: what to do with data it cannot score

    def __init__(self, x_dim: int):
        super().__init__()
        self.x_dim = int(x_dim)

    def outside(self, x: torch.Tensor) -> torch.Tensor:
        """Elementwise: which values lie outside the support."""
        raise NotImplementedError

    MEAN_FLOOR = 1e-3  # output_for_mean aims at means in [MEAN_FLOOR, 1 - MEAN_FLOOR]

    @torch.no_grad()
    def output_for_mean(self, mean: torch.Tensor) -> torch.Tensor:
        """The decoder output whose mean ``self.mean(out)`` is ``mean``, elementwise, for
        means clipped to ``[MEAN_FLOOR, 1 - MEAN_FLOOR]``.

        The clip keeps a pixel that is 0 in every training image (MNIST's border) at a
        finite output (a Bernoulli logit of -6.9) that a test image with ink there can
        still afford. Every likelihood here has a mean that increases with the decoder
        output (a sigmoid, or the continuous Bernoulli's mean of its logit), so bisection
        finds it. Used to start the decoder's output bias at the training set's mean image.
        """
        target = mean.double().clamp(self.MEAN_FLOOR, 1 - self.MEAN_FLOOR)
        low = torch.full_like(target, -1e4)
        high = torch.full_like(target, 1e4)
        for _ in range(80):
            mid = (low + high) / 2
            above = self.mean(mid) > target
            high = torch.where(above, mid, high)
            low = torch.where(above, low, mid)
        return ((low + high) / 2).to(mean.dtype)

    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        """Raise ``ValueError`` when any value of ``x`` lies outside the support (one host read)."""
        if not torch.is_floating_point(x):
            raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
        bad = self.outside(x)
        if bool(bad.any()):
            n_bad = int(bad.sum())
            example = x[bad][0].item()
            raise ValueError(
                f"{what} holds {n_bad} value(s) {self.support} (for example {example!r}), which the "
                f"{self.name} likelihood cannot score. {self.fix}"
            )


class BernoulliLikelihood(Likelihood):
    r"""x_d | z ~ Bernoulli(sigmoid(f_d(z))), independently over the D pixels.

    The decoder output is used as ``logits``, which keeps ``log p(x|z)`` numerically
    stable without clamping probabilities.
    """

    name = "bernoulli"
    binary = True
    support = "that are not 0 or 1"
    fix = ("Binarize grey images first (--binarize dynamic|fixed, or pyro_vae.data.binarize), or score the grey "
           "values with --likelihood continuous-bernoulli or gaussian")

    def forward(self, logits: torch.Tensor) -> dist.TorchDistribution:
        return BernoulliImage(dist.Bernoulli(logits=logits), 1)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(logits)

    def outside(self, x):
        return ~((x == 0) | (x == 1))


def cb_log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    r"""log C of the continuous Bernoulli, from its logits eta:

    .. math::

        C(\lambda) = \frac{2 \operatorname{artanh}(1 - 2\lambda)}{1 - 2\lambda}
                   = \frac{\eta}{\tanh(\eta / 2)}, \qquad \lambda = \sigma(\eta),\ C(1/2) = 2.

    Written in eta because torch's ``ContinuousBernoulli`` clamps lambda to
    ``[eps, 1 - eps]``: in float32 its log-density is 0.01 nats per pixel too low at
    ``|eta| = 15`` and 0.23 at 20 (``tests/test_likelihoods.py``), where a decoder's
    logits for always-black pixels go. Below ``|eta| = 0.1`` the series
    :math:`\log 2 + u^2/3 - 7u^4/90 + 62u^6/2835 - 127u^8/18900` in :math:`u = \eta/2`
    replaces the closed form (0/0 at eta = 0); its first dropped term is below 1e-16.
    """
    a = logits.abs()
    small = a < 0.1
    # torch.where differentiates both branches: feed each only values it is defined at
    a_big = torch.where(small, torch.ones_like(a), a)
    u = torch.where(small, a, torch.zeros_like(a)) / 2
    s = u * u
    series = math.log(2.0) + s * (1 / 3 - s * (7 / 90 - s * (62 / 2835 - s * 127 / 18900)))
    return torch.where(small, series, torch.log(a_big) - torch.log(torch.tanh(a_big / 2)))


def cb_mean(logits: torch.Tensor) -> torch.Tensor:
    r"""E[x] of the continuous Bernoulli with logits eta, whose density is proportional to
    :math:`e^{\eta x}` on [0, 1]:
    :math:`\tfrac12 + \frac{1}{2\tanh(\eta/2)} - \frac1\eta` (bounded for every eta), and
    near 0, where that form cancels, the series
    :math:`\tfrac12 + \frac{\eta}{12} - \frac{\eta^3}{720} + \frac{\eta^5}{30240} - \frac{\eta^7}{1209600}`."""
    small = logits.abs() < (0.25 if torch.finfo(logits.dtype).eps < 1e-10 else 1.0)
    big = torch.where(small, torch.ones_like(logits), logits)
    e = torch.where(small, logits, torch.zeros_like(logits))
    s = e * e
    series = 0.5 + e * (1 / 12 - s * (1 / 720 - s * (1 / 30240 - s / 1209600)))
    return torch.where(small, series, 0.5 + 0.5 / torch.tanh(big / 2) - 1 / big)


class ContinuousBernoulliImage(dist.Independent):
    """``ContinuousBernoulli(logits).to_event(1)`` whose log-density and mean hold in float32.

    Sampling, support and expansion are Pyro's; ``log_prob`` is the Bernoulli term (one
    fused pass, as :class:`BernoulliImage`) plus :func:`cb_log_normalizer`, and ``mean`` is
    :func:`cb_mean`, both computed from the logits rather than from clamped probabilities.
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = broadcast_all(self.base_dist.logits, value)
        return (cb_log_normalizer(logits) - binary_cross_entropy_with_logits(logits, value, reduction="none")).sum(-1)

    @property
    def mean(self) -> torch.Tensor:
        return cb_mean(self.base_dist.logits)


class ContinuousBernoulliLikelihood(Likelihood):
    r"""x_d | z ~ ContinuousBernoulli(lambda_d = sigmoid(f_d(z))) on [0, 1] (Loaiza-Ganem &
    Cunningham, 2019):

    .. math::

        p(x \mid \lambda) = C(\lambda)\, \lambda^x (1 - \lambda)^{1 - x}, \qquad
        C(\lambda) = \frac{2 \operatorname{artanh}(1 - 2\lambda)}{1 - 2\lambda}, \quad C(\tfrac12) = 2.

    The Bernoulli's cross-entropy applied to grey values is this density without
    ``log C``; the constant makes it a proper density and changes what the decoder
    learns. ``log C`` and E[x|z] (the distribution's mean, not lambda) are computed from
    the logits (:class:`ContinuousBernoulliImage`).
    """

    name = "continuous-bernoulli"
    support = "outside [0, 1]"
    fix = "Scale pixels to [0, 1]"

    def forward(self, logits: torch.Tensor) -> dist.TorchDistribution:
        return ContinuousBernoulliImage(dist.ContinuousBernoulli(logits=logits), 1)

    def mean(self, logits: torch.Tensor) -> torch.Tensor:
        return cb_mean(logits)

    def outside(self, x):
        return ~((x >= 0) & (x <= 1))


class _GaussianLikelihood(Likelihood):
    r"""x_d | z ~ Normal(sigmoid(f_d(z)), sigma_d) with a learned scale,
    ``sigma = MIN_SCALE + softplus(raw)``.

    The means are kept in (0, 1), where grey values lie, by a sigmoid, as Kingma &
    Welling (2013) did for the Frey faces: an unbounded mean lets decoded images leave
    the range of the data. The floor of the scale keeps the density finite: grey images
    have pixels that are exactly 0 in every image (MNIST's border), on which a free
    scale would shrink towards 0 and the log-density grow without bound. The scale
    starts at ``INIT_SCALE``, about the spread of a pixel around a blurry
    reconstruction, so the first steps fit the means rather than the scale.
    """

    support = "that are NaN or infinite"
    fix = "Replace NaN or infinite pixels"
    MIN_SCALE = 1e-3
    INIT_SCALE = 0.1

    def __init__(self, x_dim: int, scale_shape):
        super().__init__(x_dim)
        start = torch.full(scale_shape, self.INIT_SCALE - self.MIN_SCALE)
        self.raw_scale = nn.Parameter(start + torch.log(-torch.expm1(-start)))  # softplus^{-1}

    @property
    def scale(self) -> torch.Tensor:
        return self.MIN_SCALE + softplus(self.raw_scale)

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        loc = torch.sigmoid(out)
        return dist.Normal(loc, self.scale.expand(loc.shape)).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out)

    def outside(self, x):
        return ~torch.isfinite(x)


class GaussianLikelihood(_GaussianLikelihood):
    __doc__ = _GaussianLikelihood.__doc__ + "\n    One learned scale per pixel."
    name = "gaussian"

    def __init__(self, x_dim: int):
        super().__init__(x_dim, (int(x_dim),))


class SharedScaleGaussianLikelihood(_GaussianLikelihood):
    __doc__ = _GaussianLikelihood.__doc__ + "\n    One learned scale shared by all pixels."
    name = "gaussian-shared"

    def __init__(self, x_dim: int):
        super().__init__(x_dim, ())


# -- 8-bit images: probabilities of the 256 pixel values ---------------------------------

LEVELS = 256  # the values of an 8-bit pixel, 0..255, seen as k / 255 in [0, 1]
_TOLERANCE = 1e-3  # in units of one level: float32 k / 255 * 255 is k to about 1e-5


class _EightBit(constraints.Constraint):
    """The values k / 255, k = 0..255."""

    is_discrete = True
    event_dim = 0

    def check(self, value):
        scaled = value * (LEVELS - 1)
        return (value >= 0) & (value <= 1) & ((scaled - scaled.round()).abs() < _TOLERANCE)


eight_bit = _EightBit()


def levels_of(x: torch.Tensor) -> torch.Tensor:
    """The integer pixel values k of images ``x`` holding k / 255."""
    return (x * (LEVELS - 1)).round().long()


class DiscretizedLogistic(dist.TorchDistribution):
    r"""A logistic(loc, scale) on [0, 1] discretised to the 256 values k / 255:

    .. math::

        P(k) = \sigma\Big(rac{x_k + \delta - \mu}{s}\Big) - \sigma\Big(rac{x_k - \delta - \mu}{s}\Big),
        \qquad x_k = k / 255,\ \delta = 1 / 510,

    with the outer bins open (k = 0 takes everything below its upper edge, k = 255
    everything above its lower edge), so the 256 probabilities sum to 1. Each
    log-probability is computed without cancellation from
    :math:`\sigma(a) - \sigma(b) = \sigma(a)\,\sigma(-b)\,(1 - e^{b - a})`, where
    :math:`a - b = 1 / (255 s)` (Salimans et al. 2017 use a mixture of such logistics).
    """

    arg_constraints = {"loc": constraints.real, "scale": constraints.positive}
    support = eight_bit
    has_rsample = False

    def __init__(self, loc, scale, validate_args=None):
        self.loc, self.scale = broadcast_all(loc, scale)
        super().__init__(self.loc.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(DiscretizedLogistic, _instance)
        new.loc, new.scale = self.loc.expand(batch_shape), self.scale.expand(batch_shape)
        super(DiscretizedLogistic, new).__init__(torch.Size(batch_shape), validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        half = 0.5 / (LEVELS - 1)
        upper = (value + half - self.loc) / self.scale
        lower = (value - half - self.loc) / self.scale
        width = torch.log(-torch.expm1(-(2 * half) / self.scale))
        inner = logsigmoid(upper) + logsigmoid(-lower) + width
        k = levels_of(value)
        return torch.where(k <= 0, logsigmoid(upper), torch.where(k >= LEVELS - 1, logsigmoid(-lower), inner))

    def sample(self, sample_shape=torch.Size()):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            u = torch.rand(shape, dtype=self.loc.dtype, device=self.loc.device).clamp(1e-12, 1 - 1e-12)
            y = self.loc.expand(shape) + self.scale.expand(shape) * (torch.log(u) - torch.log1p(-u))
            return (y * (LEVELS - 1)).round().clamp(0, LEVELS - 1) / (LEVELS - 1)

    @property
    def mean(self):
        """E[k / 255] = sum over k of P(value >= k / 255) / 255, one logistic CDF per level."""
        edges = (torch.arange(1, LEVELS, dtype=self.loc.dtype, device=self.loc.device) - 0.5) / (LEVELS - 1)
        above = torch.sigmoid(-(edges - self.loc.unsqueeze(-1)) / self.scale.unsqueeze(-1))
        return above.sum(-1) / (LEVELS - 1)


class _EightBitLikelihood(Likelihood):
    """What the likelihoods of 8-bit pixel values share: the data check and ``levels``."""

    levels = LEVELS  # log p(x) is a log-probability of the integer pixel values
    support = "that are not 8-bit pixel values k / 255 in [0, 1]"
    fix = ("Give the 8-bit images scaled by 1 / 255, as loaded (not binarised, not dequantised), or use "
           "--likelihood continuous-bernoulli or gaussian for other grey values")

    def outside(self, x):
        return ~eight_bit.check(x)


class DiscretizedLogisticLikelihood(_EightBitLikelihood):
    r"""x_d * 255 | z ~ a logistic with location f_d(z) (in units of [0, 1]) and a learned
    per-pixel scale ``MIN_SCALE + softplus(raw)``, discretised to the 256 pixel values
    (:class:`DiscretizedLogistic`): log p(x) is a probability, in nats per image or bits
    per dimension, comparable with published numbers on 8-bit data."""

    name = "discretized-logistic"
    MIN_SCALE = 1e-3
    INIT_SCALE = 0.1

    def __init__(self, x_dim: int):
        super().__init__(x_dim)
        start = torch.full((int(x_dim),), self.INIT_SCALE - self.MIN_SCALE)
        self.raw_scale = nn.Parameter(start + torch.log(-torch.expm1(-start)))  # softplus^{-1}

    @property
    def scale(self) -> torch.Tensor:
        return self.MIN_SCALE + softplus(self.raw_scale)

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        return DiscretizedLogistic(out, self.scale.expand(out.shape)).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return DiscretizedLogistic(out, self.scale.expand(out.shape)).mean


class LocalDiscretizedLogisticLikelihood(_EightBitLikelihood):
    r"""x_d * 255 | z ~ a logistic with location f_d(z) and scale
    ``MIN_SCALE + softplus(g_d(z))``, both from the decoder, discretised to the 256 pixel
    values (:class:`DiscretizedLogistic`). The decoder gives two outputs per pixel, read as
    two blocks of D: the locations, then the scales' raw values. Where
    ``discretized-logistic`` learns one scale per pixel for all images, here each image
    gets its own: a pixel the latent code pins down costs few bits, one it leaves open
    (the mouth of an expression the code does not hold) many, instead of a spread that
    every image pays."""

    name = "discretized-logistic-local"
    outputs_per_pixel = 2
    MIN_SCALE = DiscretizedLogisticLikelihood.MIN_SCALE

    def _loc_scale(self, out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = out[..., :self.x_dim], out[..., self.x_dim:]
        return loc, self.MIN_SCALE + softplus(raw)

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        return DiscretizedLogistic(*self._loc_scale(out)).to_event(1)

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return DiscretizedLogistic(*self._loc_scale(out)).mean

    def output_for_mean(self, mean: torch.Tensor) -> torch.Tensor:
        raise ValueError("decoder_bias='data-mean' starts one decoder output per pixel at the data's mean; the "
                         "discretized-logistic-local likelihood has two outputs per pixel (location and scale): "
                         "use decoder_bias='random'")


class CategoricalImage(dist.TorchDistribution):
    """Independent 256-way categoricals over the D pixels, as one event of D values k / 255."""

    arg_constraints = {"logits": constraints.real}
    support = constraints.independent(eight_bit, 1)
    has_rsample = False

    def __init__(self, logits, validate_args=None):
        self.logits = logits - logits.logsumexp(-1, keepdim=True)  # (..., D, 256)
        super().__init__(self.logits.shape[:-2], self.logits.shape[-2:-1], validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(CategoricalImage, _instance)
        new.logits = self.logits.expand(torch.Size(batch_shape) + self.logits.shape[-2:])
        super(CategoricalImage, new).__init__(torch.Size(batch_shape), self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        k = levels_of(value)
        shape = torch.broadcast_shapes(k.shape, self.logits.shape[:-1])
        logits = self.logits.expand(shape + (LEVELS,))
        return logits.gather(-1, k.expand(shape).unsqueeze(-1)).squeeze(-1).sum(-1)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            k = torch.distributions.Categorical(logits=self.logits).sample(sample_shape)
            return k.to(self.logits.dtype) / (LEVELS - 1)

    @property
    def mean(self):
        values = torch.arange(LEVELS, dtype=self.logits.dtype, device=self.logits.device) / (LEVELS - 1)
        return (self.logits.exp() * values).sum(-1)


class Categorical256Likelihood(_EightBitLikelihood):
    r"""x_d * 255 | z ~ Categorical(softmax(f_{d,0..255}(z))): the decoder gives 256 logits per
    pixel (``outputs_per_pixel``; its outputs are read as 256 blocks of D, level by level),
    the likelihood of the FFJORD and Sylvester-flow papers' Frey Face results."""

    name = "categorical-256"
    outputs_per_pixel = LEVELS

    def _logits(self, out: torch.Tensor) -> torch.Tensor:
        return out.reshape(out.shape[:-1] + (LEVELS, self.x_dim)).transpose(-1, -2)

    def forward(self, out: torch.Tensor) -> dist.TorchDistribution:
        return CategoricalImage(self._logits(out))

    def mean(self, out: torch.Tensor) -> torch.Tensor:
        return CategoricalImage(self._logits(out)).mean

    def output_for_mean(self, mean: torch.Tensor) -> torch.Tensor:
        raise ValueError("decoder_bias='data-mean' starts one decoder output per pixel at the data's mean; the "
                         "categorical-256 likelihood has 256 outputs per pixel, which no mean determines: use "
                         "decoder_bias='random'")


def build_likelihood(name: str, x_dim: int) -> Likelihood:
    """The likelihood registered as ``name``, for images of ``x_dim`` pixels."""
    return LIKELIHOODS[name](x_dim)
