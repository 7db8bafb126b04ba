r"""Honest numbers: per-image ELBO and its terms, and the importance-sampled log p(x).

Everything here is computed from traces of ``model`` and ``guide``, so it holds for any
model/guide pair with observed data site(s) and latent sites, not only the VAE of
:mod:`pyro_vae.vae`. All values are in nats per image.

* :func:`elbo_terms`: for each image,
  ``elbo = E_q[log p(x|z)] - KL(q(z|x) || p(z))`` with the expected log-likelihood
  estimated by Monte Carlo and the KL computed analytically where a closed form exists.
* :func:`log_px_importance`: the importance-weighted bound of Burda et al. (2015),

  .. math::

      \log p(x) \gtrsim \mathcal{L}_K = \log \frac{1}{K} \sum_{k=1}^K
          \frac{p(x, z_k)}{q(z_k \mid x)}, \qquad z_k \sim q(z \mid x),

  which is never below the ELBO in expectation and tends to ``log p(x)`` as K grows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.distributions.kl import kl_divergence

from .rng import forked_rng


@dataclass(frozen=True)
class Estimate:
    """Mean over images and its standard error (std / sqrt(n)), in nats per image."""

    mean: float
    stderr: float
    n: int

    @classmethod
    def of(cls, values: torch.Tensor) -> "Estimate":
        values = values.detach().double()
        n = values.numel()
        stderr = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
        return cls(float(values.mean()), stderr, n)

    def __str__(self) -> str:
        return f"{self.mean:.3f} +- {self.stderr:.3f}"


def _sample_sites(trace):
    return [s for s in trace.nodes.values() if s["type"] == "sample" and not _is_subsample(s)]


def _is_subsample(site) -> bool:
    return type(site["fn"]).__name__ == "_Subsample"


def _traces(model, guide, x, **kwargs):
    guide_trace = poutine.trace(guide).get_trace(x, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, **kwargs)
    return model_trace, guide_trace


@torch.no_grad()
def batch_elbo_terms(model, guide, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image ``log_lik``, ``kl`` and ``elbo`` for one batch (one sample of z each)."""
    model_trace, guide_trace = _traces(model, guide, x)
    log_lik = 0.0
    for site in _sample_sites(model_trace):
        if site["is_observed"]:
            log_lik = log_lik + site["fn"].log_prob(site["value"])
    kl = 0.0
    for q_site in _sample_sites(guide_trace):
        p_site = model_trace.nodes[q_site["name"]]
        try:
            kl = kl + kl_divergence(q_site["fn"], p_site["fn"])
        except NotImplementedError:  # no closed form: a one-sample Monte Carlo estimate
            z = q_site["value"]
            kl = kl + q_site["fn"].log_prob(z) - p_site["fn"].log_prob(z)
    return {"log_lik": log_lik, "kl": kl, "elbo": log_lik - kl}


def elbo_terms(model, guide, images: torch.Tensor, batch_size: int = 1000, seed: int | None = 0) -> dict[str, torch.Tensor]:
    """Per-image ELBO terms over a whole data set, batched; values are tensors ``(N,)``."""
    out: dict[str, list[torch.Tensor]] = {"log_lik": [], "kl": [], "elbo": []}
    with forked_rng(seed):
        for start in range(0, images.shape[0], batch_size):
            terms = batch_elbo_terms(model, guide, images[start : start + batch_size])
            for k in out:
                out[k].append(terms[k])
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def batch_log_weights(model, guide, x: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``log p(x, z_k) - log q(z_k | x)`` for ``num_samples`` draws per image: ``(K, B)``.

    The K draws are vectorised with an outer ``"particles"`` plate, so the networks see
    one ``(K, B, .)`` batch.
    """
    with pyro.plate("particles", num_samples, dim=-2):
        model_trace, guide_trace = _traces(model, guide, x)
    log_w = 0.0
    for site in _sample_sites(model_trace):
        log_w = log_w + site["fn"].log_prob(site["value"])
    for site in _sample_sites(guide_trace):
        log_w = log_w - site["fn"].log_prob(site["value"])
    return log_w.expand(num_samples, x.shape[0])


def log_px_importance(
    model,
    guide,
    images: torch.Tensor,
    num_samples: int = 5000,
    batch_size: int = 100,
    max_elements: int = 50_000,
    seed: int | None = 0,
    progress=None,
) -> torch.Tensor:
    """Per-image importance-sampled estimate of log p(x) with K = ``num_samples``.

    Images go ``batch_size`` at a time and the K samples in chunks of at most
    ``max_elements // batch_size``, combined by a running log-sum-exp, so memory stays
    bounded (about ``max_elements`` decoder outputs at once) whatever K is.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    results = []
    with forked_rng(seed):
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size]
            chunk = max(1, max_elements // x.shape[0])
            total = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
            for k0 in range(0, num_samples, chunk):
                k = min(chunk, num_samples - k0)
                log_w = batch_log_weights(model, guide, x, k).double()
                total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
            results.append(total - math.log(num_samples))
            if progress is not None:
                progress(x.shape[0])
    return torch.cat(results)


def evaluate_model(
    vae,
    images: torch.Tensor,
    num_samples: int = 5000,
    batch_size: int = 100,
    seed: int = 0,
    progress=None,
) -> dict[str, Estimate]:
    """Test-set report: ELBO, its terms, and (for ``num_samples`` > 0) the IS bound.

    Keys: ``elbo``, ``log_lik``, ``kl`` and ``log_px_is{K}``; each an :class:`Estimate`.
    """
    with pyro.get_param_store().scope():
        terms = elbo_terms(vae.model, vae.guide, images, batch_size=max(batch_size, 1000), seed=seed)
        report = {k: Estimate.of(v) for k, v in terms.items()}
        if num_samples > 0:
            log_px = log_px_importance(
                vae.model, vae.guide, images, num_samples, batch_size, seed=seed + 1, progress=progress
            )
            report[f"log_px_is{num_samples}"] = Estimate.of(log_px)
    return report


# -- which latent dimensions are used -------------------------------------------------


@torch.no_grad()
def _posterior_params(vae, images: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale) of q(z|x) for every image, each ``(N, z_dim)``, encoded in batches."""
    locs, scales = [], []
    for start in range(0, images.shape[0], batch_size):
        loc, scale = vae.encode(images[start : start + batch_size])
        locs.append(loc)
        scales.append(scale)
    return torch.cat(locs), torch.cat(scales)


def kl_per_dimension(vae, images: torch.Tensor, batch_size: int = 1000) -> torch.Tensor:
    r"""Analytic KL of each latent dimension of q(z|x) from the N(0, 1) prior, averaged over images.

    For the diagonal Gaussian guide ``q(z_d|x) = N(loc_d(x), scale_d(x)^2)`` (site ``"z"`` of
    ``VAE.guide``) the KL separates over dimensions,

    .. math::

        \mathrm{KL}_d(x) = \tfrac12\big(\mathrm{loc}_d^2 + \mathrm{scale}_d^2 - 1\big) - \log \mathrm{scale}_d,

    and its sum over ``d`` is the ``kl`` of :func:`batch_elbo_terms`. Returns a tensor
    ``(z_dim,)`` in nats per image; a dimension with KL near 0 carries no information about x.
    """
    loc, scale = _posterior_params(vae, images, batch_size)
    kl = 0.5 * (loc.double() ** 2 + scale.double() ** 2 - 1.0) - scale.double().log()
    return kl.mean(0)


def active_units(vae, images: torch.Tensor, threshold: float = 0.01, batch_size: int = 1000) -> tuple[int, torch.Tensor]:
    r"""The number of active latent units and the per-dimension activity (Burda et al., 2015).

    Unit ``d`` is active when its posterior mean moves with the input,

    .. math::

        A_d = \operatorname{Var}_{x}\big(\mathbb{E}_{q(z \mid x)}[z_d]\big) > \text{threshold},

    with ``E_q[z_d] = loc_d(x)`` for the Gaussian guide and the variance taken over
    ``images`` (population variance, divisor N). Returns ``(count, A)`` with ``A`` of shape
    ``(z_dim,)``. An inactive unit's posterior is the same for every x: it is unused, and
    typically collapsed onto the prior.
    """
    loc, _ = _posterior_params(vae, images, batch_size)
    activity = loc.double().var(0, unbiased=False)
    return int((activity > threshold).sum()), activity
