"""Likelihoods: decoder output -> a Pyro distribution over a flattened image.

A likelihood is a small callable object. ``likelihood(decoder_output)`` returns the
distribution of ``x | z`` with the image as one event (``.to_event(1)``), and
``likelihood.check_data(x)`` rejects data the distribution cannot score, before
any training starts. A new observation model (Gaussian, Beta, ...) is a new class
here, not a branch elsewhere.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch.distributions.utils import broadcast_all
from torch.nn.functional import binary_cross_entropy_with_logits


class BernoulliImage(dist.Independent):
    """``Bernoulli(logits).to_event(1)``, scored in one fused pass.

    Same distribution as ``dist.Bernoulli(logits=...).to_event(1)`` (sampling, support,
    expansion are inherited); ``log_prob`` sums the pixels' log-probabilities inside one
    ``binary_cross_entropy_with_logits`` call and negates the per-image sum, instead of
    negating every pixel and then summing: a few percent of a training step at batch
    1024 on the CPU (experiments/benchmark.py).
    """

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        logits, value = broadcast_all(self.base_dist.logits, value)
        return -binary_cross_entropy_with_logits(logits, value, reduction="none").sum(-1)


class BernoulliLikelihood:
    r"""x_d | z ~ Bernoulli(sigmoid(f_d(z))), independently over the D pixels.

    The decoder output is used as ``logits``, which keeps ``log p(x|z)`` numerically
    stable without clamping probabilities.
    """

    name = "bernoulli"

    def __call__(self, logits: torch.Tensor) -> dist.TorchDistribution:
        return BernoulliImage(dist.Bernoulli(logits=logits), 1)

    @staticmethod
    def mean(logits: torch.Tensor) -> torch.Tensor:
        """E[x | z], the image one usually shows for a decoded z."""
        return torch.sigmoid(logits)

    @staticmethod
    def check_data(x: torch.Tensor, what: str = "data") -> None:
        """Raise ``ValueError`` unless every value of ``x`` is exactly 0 or 1."""
        if not torch.is_floating_point(x):
            raise TypeError(f"{what} must be a floating-point tensor, got dtype {x.dtype}")
        bad = ~((x == 0) | (x == 1))
        if bool(bad.any()):
            n_bad = int(bad.sum())
            example = x[bad][0].item()
            raise ValueError(
                f"{what} holds {n_bad} value(s) that are not 0 or 1 (for example {example!r}); "
                "a Bernoulli likelihood scores binary pixels only. Binarize grey-scale images first "
                "(pyro_vae.data.binarize, or --binarize dynamic|fixed)"
            )


LIKELIHOODS = {"bernoulli": BernoulliLikelihood}


def build_likelihood(name: str) -> BernoulliLikelihood:
    try:
        return LIKELIHOODS[name]()
    except KeyError:
        raise ValueError(f"unknown likelihood {name!r}; choose one of {sorted(LIKELIHOODS)}") from None
