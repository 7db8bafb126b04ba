r"""Diagonal Gaussians that score their values in fewer tensor operations.

Pyro scores a latent site with the distribution's own ``log_prob``. For
``Normal(loc, scale).to_event(1)`` that is, element by element,
``-(z - loc)^2 / (2 scale^2) - log scale - log sqrt(2 pi)``, summed over the event: about
ten operations on a ``(batch, z_dim)`` tensor forward, and as many again backward, for
the prior and for the guide at every step. Two facts make most of them unnecessary:

- the prior is N(0, I), so :math:`\log p(z) = -\tfrac12 \sum_d z_d^2 - \tfrac{D}{2}\log 2\pi`;
- the guide scores the very sample it drew, :math:`z = \mu + \sigma \odot \epsilon`, so
  :math:`(z - \mu)/\sigma = \epsilon` and
  :math:`\log q(z|x) = -\tfrac12 \sum_d \epsilon_d^2 - \sum_d \log\sigma_d - \tfrac{D}{2}\log 2\pi`.

Both are the same functions of the parameters as the general formula (the same values up
to rounding, and the same gradients: for the guide the path through ``z`` and the score
term cancel exactly in the general formula, and are absent here), so every estimator
built on them is unchanged. :class:`StandardNormal` and :class:`DiagonalNormal` are
``Independent(Normal, 1)`` distributions, so the closed-form KL, expansion by plates,
``sample`` and everything else Pyro and torch do with a diagonal Gaussian work as before;
only ``log_prob`` is shorter. A value other than the guide's own draw (a replayed
trace, a detached rescoring as DReG does) is scored by the general formula.
"""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
from torch.distributions.utils import _standard_normal

HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)


class StandardNormal(dist.Independent):
    """N(0, I) over the last dimension, on the device and dtype of ``like``."""

    @classmethod
    def of_size(cls, size: int, like: torch.Tensor) -> StandardNormal:
        zero = torch.zeros((), dtype=like.dtype, device=like.device)
        return cls(dist.Normal(zero, zero + 1).expand([int(size)]), 1)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._validate_args:
            self._validate_sample(value)
        size = value.shape[-1]
        return torch.linalg.vecdot(value, value).mul(-0.5).sub(size * HALF_LOG_TWO_PI).expand(
            torch.broadcast_shapes(value.shape[:-1], self.batch_shape))


class DiagonalNormal(dist.Independent):
    """N(loc, diag scale^2) over the last dimension; its reparameterised draws are scored
    from the noise that made them (module docstring)."""

    _drawn: tuple[torch.Tensor, torch.Tensor] | None = None  # (the last rsample, its noise)

    @classmethod
    def of(cls, loc: torch.Tensor, scale: torch.Tensor) -> DiagonalNormal:
        return cls(dist.Normal(loc, scale), 1)

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        # the draws torch.distributions.Normal.rsample makes, in its order: same values for the same seed
        base = self.base_dist
        eps = _standard_normal(base._extended_shape(sample_shape), dtype=base.loc.dtype, device=base.loc.device)
        value = base.loc + eps * base.scale
        self._drawn = (value, eps)
        return value

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        drawn = self._drawn
        if drawn is None or value is not drawn[0]:
            return super().log_prob(value)
        eps = drawn[1]
        return (torch.linalg.vecdot(eps, eps).mul(-0.5) - self.base_dist.scale.log().sum(-1)).sub(
            eps.shape[-1] * HALF_LOG_TWO_PI)
