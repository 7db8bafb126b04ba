"""Likelihoods: decoder output -> a Pyro distribution over a flattened image.

A likelihood is a small callable object. ``likelihood(decoder_output)`` returns the
distribution of ``x | z`` with the image as one event (``.to_event(1)``), and
``likelihood.check_data(x)`` rejects data the distribution cannot score, before
any training starts. A new observation model (Gaussian, Beta, ...) is a new class
here, not a branch elsewhere.
"""

from __future__ import annotations

import torch
import pyro.distributions as dist


class BernoulliLikelihood:
    r"""x_d | z ~ Bernoulli(sigmoid(f_d(z))), independently over the D pixels.

    The decoder output is used as ``logits``, which keeps ``log p(x|z)`` numerically
    stable without clamping probabilities.
    """

    name = "bernoulli"

    def __call__(self, logits: torch.Tensor) -> dist.TorchDistribution:
        return dist.Bernoulli(logits=logits).to_event(1)

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
