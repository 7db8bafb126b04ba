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
import warnings
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from pyro.infer.enum import get_importance_trace

from .capture import CaptureError, CapturedLoss
from .objectives import log_densities, sample_sites
from .protocol import ProgramCall
from .rng import forked_rng
from .scoring import Scorer, plate_depth
from .views import ViewUnavailable, labels_for, posterior_means, require, standard_normal_prior
from .views import call as view


@dataclass(frozen=True)
class Estimate:
    """Mean over images and its standard error (std / sqrt(n)), in nats per image.

    ``stderr`` is the spread over the images: how much the mean would move with other
    images from the same distribution (it includes each image's own Monte Carlo noise
    when the draws of different images are independent). ``mc_stderr``, when known, is
    the Monte Carlo error of the estimate *for these images*: how much it would move with
    other random draws. The two answer different questions; a program with global
    latents, whose draws are shared by all images, can have a small ``stderr`` and a
    large ``mc_stderr``."""

    mean: float
    stderr: float
    n: int
    mc_stderr: float | None = None

    @classmethod
    def of(cls, values: torch.Tensor, mc_stderr: float | None = None) -> "Estimate":
        values = values.detach().double()
        n = values.numel()
        stderr = float(values.std(unbiased=True) / math.sqrt(n)) if n > 1 else float("nan")
        return cls(float(values.mean()), stderr, n, mc_stderr)

    def __str__(self) -> str:
        text = f"{self.mean:.3f} +- {self.stderr:.3f}"
        if self.mc_stderr is not None:
            text += f" (images), +- {self.mc_stderr:.3f} (Monte Carlo)"
        return text


class Report(dict):
    """``{quantity: Estimate}``, and ``notes``: what was not estimated, and why."""

    def __init__(self, *args, notes=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.notes = list(notes)


def _traces(model, guide, x, **kwargs):
    guide_trace = poutine.trace(guide).get_trace(x, **kwargs)
    model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(x, **kwargs)
    return model_trace, guide_trace


def _batches(images: torch.Tensor, labels: torch.Tensor | None, batch_size: int,
             index: torch.Tensor | None = None, num_data: int | None = None):
    """``(x, {"y": y, "index": ..., "num_data": ...})`` slices of ``batch_size`` images
    (without the keys that are None)."""
    for start in range(0, images.shape[0], batch_size):
        extra = {} if labels is None else {"y": labels[start : start + batch_size]}
        if index is not None:
            extra["index"] = index[start : start + batch_size]
        if num_data is not None:
            extra["num_data"] = num_data
        yield images[start : start + batch_size], extra


@torch.no_grad()
def batch_elbo_terms(model, guide, x: torch.Tensor, num_data: int | None = None, **kwargs) -> dict[str, torch.Tensor]:
    """Per-image ``log_lik``, ``kl`` and ``elbo`` of one batch (one draw each), split from
    Pyro's own ELBO of the batch (:mod:`pyro_vae.scoring`).

    ``num_data`` is the size of the data set the batch belongs to (the batch itself when
    None): terms outside the ``"data"`` plate (global latents) count once for it, as
    ``1 / num_data`` of them per image. ``kl`` is everything that is not an observed
    site, negated: the local latents' KL (closed form where Pyro's mean-field ELBO has
    one, for a program with one latent site; a one-draw estimate otherwise), auxiliary
    guide sites, and the global latents' share. A model that enumerates a latent site
    reports ``elbo`` alone.
    """
    return Scorer().terms(model, guide, x, x.shape[0] if num_data is None else int(num_data), **kwargs)


def elbo_terms(model, guide, images: torch.Tensor, batch_size: int = 1000, seed: int | None = 0,
               labels: torch.Tensor | None = None, num_data: int | None = None,
               index: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Per-image ELBO terms over a whole data set, batched; values are tensors ``(N,)``.

    The program is told the data set's size N (``num_data``, by default the number of
    ``images``), so the mean of ``elbo`` is Pyro's ELBO of the data set divided by N
    (:func:`batch_elbo_terms`). ``labels``, when given, reach the program as ``y``, and
    ``index`` (the images' positions in the data set) as ``index``."""
    out: dict[str, list[torch.Tensor]] = {}
    scorer = Scorer()
    num_data = images.shape[0] if num_data is None else int(num_data)
    with forked_rng(seed), torch.no_grad():
        for x, extra in _batches(images, labels, batch_size, index):
            for k, v in scorer.terms(model, guide, x, num_data, **extra).items():
                out.setdefault(k, []).append(v)
    return {k: torch.cat(v) for k, v in out.items()}


@torch.no_grad()
def batch_log_weights(model, guide, x: torch.Tensor, num_samples: int, depth: int | None = None,
                      **kwargs) -> torch.Tensor:
    """``log p(x, z_k) - log q(z_k | x)`` for ``num_samples`` draws per image: ``(K, B)``.

    The K draws are vectorised with a ``"particles"`` plate left of all the program's
    plates (``depth``: :func:`pyro_vae.scoring.plate_depth`, read from the program when
    None), so the networks see one ``(K, B, .)`` batch.
    """
    return log_weights(model, guide, x, num_samples, depth, **kwargs)


def log_weights(model, guide, x: torch.Tensor, num_samples: int, depth: int | None = None,
                **kwargs) -> torch.Tensor:
    """:func:`batch_log_weights` with gradients (to optimise a guide through them).

    The traces are Pyro's (``get_importance_trace``, as its ELBOs make them: a
    ``GuideMessenger`` guide included) and each site's log-density is the one Pyro
    computes, its mask applied; per image, it sums the sites inside the ``"data"``
    plate. A program for which that is not log p(x, z) - log q(z | x) of an image is
    refused (:class:`pyro_vae.objectives.ImportanceWeightError`): a site outside the
    ``"data"`` plate (a global latent makes the images dependent), a scale other than
    the plates' (``poutine.scale``), a masked latent, a latent of the model that the
    guide does not sample.
    """
    if depth is None:
        depth = plate_depth(model, guide, x=x, **kwargs)
    # the particles plate inside each program, as Pyro's vectorize_particles puts it
    particles = pyro.plate("particles", num_samples, dim=-1 - depth)
    with warnings.catch_warnings():  # (log_densities refuses such a program below, with the reason)
        warnings.filterwarnings("ignore", "Found vars in model but not guide")
        model_trace, guide_trace = get_importance_trace("flat", depth + 1, particles(model), particles(guide), (),
                                                        {"x": x, **kwargs})
    _, log_p, log_q = log_densities(model_trace, guide_trace, "data", depth, require_rsample=False)
    return (log_p - log_q).expand(num_samples, x.shape[0])


def log_px_importance(
    model,
    guide,
    images: torch.Tensor,
    num_samples: int = 5000,
    batch_size: int = 100,
    max_elements: int | None = None,
    seed: int | None = 0,
    progress=None,
    labels: torch.Tensor | None = None,
    group=None,
    mc_variance: bool = False,
    index: torch.Tensor | None = None,
    num_data: int | None = None,
) -> torch.Tensor:
    """Per-image importance-sampled estimate of log p(x) with K = ``num_samples``.

    With ``mc_variance``, returns ``(log_px, variance)``: beside each estimate, the
    delta-method estimate of its Monte Carlo variance, ``sum_k w~_k^2 - 1/K`` with
    ``w~`` the normalised weights (the relative variance of the mean weight). It is
    estimated from the same draws, so a proposal much narrower than the posterior, whose
    rare large weights the draws have not met, makes it too small: tests/test_importance.py
    finds it exact for a proposal wider than the posterior, and 0.4 times the true variance
    for an untrained VAE's guide at K = 50. Read it as a lower bound there.

    Images go ``batch_size`` at a time and the K samples in chunks of at most
    ``max_elements // batch_size``, combined by a running log-sum-exp, so memory stays
    bounded (about ``max_elements`` decoder outputs at once) whatever K is. The default,
    :func:`default_chunk_elements`, sizes the chunks for the CPU's cache (2,000 outputs)
    or for a GPU's width (50,000). The chunking changes no value: the draws are the same
    whatever it is, as long as each chunk draws a multiple of 16 numbers (the block in
    which torch's CPU generator makes normal draws), as the CPU default does for batches
    of 100 images. ``index`` and ``num_data`` go to a program that keeps parameters per
    data point: the images' positions in the data set of ``num_data`` it trained on.

    ``group`` (a :class:`pyro_vae.distributed.Group`) shares the batches out: each rank
    scores a contiguous run of them and the values are gathered on every rank. The
    noise stays the single-process one: a rank first draws (without scoring) the samples
    of the batches before its own, so every image gets the same draws whatever the
    number of processes, and the estimate is the single process's, value for value.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    batches = list(_batches(images, labels, batch_size, index, num_data))
    first, stop = (0, len(batches)) if group is None else _my_batches(len(batches), group)
    x0, extra0 = batches[0]
    depth = plate_depth(model, guide, x=x0[:1], **_first(extra0))
    score = _recorded_log_weights(model, guide, depth)
    results, variances = [], []
    with forked_rng(seed):
        draws_only = _guide_draws_suffice(model, guide, batches[0], depth) if first > 0 else True
        for j, (x, extra) in enumerate(batches[:stop]):
            chunk = max(1, (max_elements or default_chunk_elements(x.device)) // x.shape[0])
            total = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
            squares = total.clone()  # log of the sum of the squared weights
            for k0 in range(0, num_samples, chunk):
                k = min(chunk, num_samples - k0)
                if j < first:  # another rank's batch: only advance the noise stream past it
                    _draw(model, guide, x, k, draws_only, depth, **extra)
                    continue
                log_w = score(x=x, num_samples=k, first=k0 == 0, **extra).double()
                total = torch.logaddexp(total, torch.logsumexp(log_w, dim=0))
                if mc_variance:
                    squares = torch.logaddexp(squares, torch.logsumexp(2 * log_w, dim=0))
                if progress is not None:  # a fraction of the batch per chunk of samples: a live bar
                    progress(x.shape[0] * k / num_samples)
            if j >= first:
                results.append(total - math.log(num_samples))
                variances.append((squares - 2 * total).exp() - 1.0 / num_samples)
    mine = torch.cat(results) if results else images.new_zeros((0,), dtype=torch.float64)
    mine = mine if group is None else group.gather_cat(mine)
    if not mc_variance:
        return mine
    var = torch.cat(variances) if variances else images.new_zeros((0,), dtype=torch.float64)
    return mine, (var if group is None else group.gather_cat(var)).clamp(min=0.0)


def _first(extra: dict) -> dict:
    """The arguments of one image: the first of each batched tensor."""
    return {k: v[:1] if isinstance(v, torch.Tensor) else v for k, v in extra.items()}


def default_chunk_elements(device: torch.device) -> int:
    """Decoder outputs (samples x images) per chunk of importance sampling.

    On the CPU, 2,000: a chunk's outputs (2,000 x 784 floats for MNIST, 6 MB) stay in the
    cache between the decoder and the scoring. ``experiments/benchmark.py`` measured a
    hand-written loop 1.7x faster with 5,000 than with 50,000, and pyro_vae's fastest at
    2,000 of 1,000, 2,000 and 5,000 (docs/performance.md). On a GPU, 50,000: small chunks
    leave it idle between kernel launches (not measured here: no GPU was lent)."""
    return 50_000 if device.type == "cuda" else 2_000


def _recorded_log_weights(model, guide, depth: int):
    """:func:`batch_log_weights` as a callable ``(x=..., num_samples=k, **extra)``, its
    tensor operations recorded once per chunk shape and replayed (pyro_vae.capture) when
    model and guide are methods of one module: the same operations and random draws
    without Pyro's per-chunk Python (0.8 ms a chunk on the CPU, which is what keeps
    chunks large), so chunks can be sized for the cache instead. Other programs, and
    any that cannot be recorded, are traced at every chunk as before."""
    def eager(x, num_samples, first=True, **extra):
        return batch_log_weights(model, guide, x, num_samples, depth, **extra)

    module = getattr(model, "__self__", None)
    if not isinstance(module, torch.nn.Module) or getattr(guide, "__self__", None) is not module:
        return eager
    # every batch's first chunk runs eagerly (below), so the first recorded call may record
    # The encoder's work on a batch, done once per batch instead of once per chunk
    recorded = CapturedLoss(eager, module, tensor_kwargs=(), strict=True, warmed_up=True, reuse_batch_part=True)

    def score(x, num_samples, first, **extra):
        # a batch's first chunk runs eagerly, under the caller's validation: Pyro checks
        # the images against the likelihood's support there, once per batch
        if not first and recorded.eager_reason is None:
            try:
                with torch.no_grad(), pyro.validation_enabled(False):
                    return recorded(x=x, num_samples=num_samples, **extra)
            except CaptureError:
                pass  # the reason is kept, and this program runs eagerly from now on
        return eager(x, num_samples, **extra)

    score.recording = recorded
    return score


def _my_batches(count: int, group) -> tuple[int, int]:
    """The contiguous run of batch numbers ``[first, stop)`` that rank ``group.rank`` scores."""
    bounds = [round(count * r / group.world_size) for r in range(group.world_size + 1)]
    return bounds[group.rank], bounds[group.rank + 1]


@torch.no_grad()
def _guide_draws_suffice(model, guide, batch, depth: int) -> bool:
    """Whether the guide makes every random draw of a scoring (the model only replays and
    observes); else skipping a batch must run the model as well."""
    x, extra = batch
    with forked_rng(0), pyro.plate("particles", 1, dim=-1 - depth):
        model_trace, guide_trace = _traces(model, guide, x[:1], **_first(extra))
    return all(site["is_observed"] or site["name"] in guide_trace.nodes for site in sample_sites(model_trace))


@torch.no_grad()
def _draw(model, guide, x, num_samples: int, draws_only: bool, depth: int, **kwargs) -> None:
    """Make the random draws of a scoring of ``x`` without scoring it."""
    with pyro.plate("particles", num_samples, dim=-1 - depth):
        if draws_only:
            poutine.trace(guide).get_trace(x, **kwargs)
        else:
            _traces(model, guide, x, **kwargs)


def evaluate_model(
    program,
    images: torch.Tensor,
    num_samples: int = 5000,
    batch_size: int = 100,
    seed: int = 0,
    progress=None,
    labels: torch.Tensor | None = None,
    group=None,
    mc_repeats: int = 4,
    index: torch.Tensor | None = None,
    num_data: int | None = None,
) -> Report:
    """Test-set report: ELBO, its terms, and (for ``num_samples`` > 0) the IS bound.

    Keys: ``elbo``, ``log_lik``, ``kl`` and ``log_px_is{K}``; each an :class:`Estimate`
    with its standard error over the images and its Monte Carlo error. The ELBO terms are
    one draw per image at ``seed``; their Monte Carlo error is the spread of the data
    set's mean over ``mc_repeats`` independent evaluations (the first the reported one),
    which counts draws shared by images (global latents) as they should be counted. The
    IS bound's is the delta-method variance of each image's estimate
    (:func:`log_px_importance`), summed. A program whose guide is a point mass
    (``point_estimate``) has neither an ELBO nor an importance-sampled bound: its report
    holds ``log_lik`` only. A program whose log p(x) is not defined per image (a global
    latent, a scaled site) gets the ELBO and a note that says why there is no bound
    (``Report.notes``). ``labels`` reach programs that take ``y``; with a program that
    classifies (the ``predict_class`` view), they give its ``accuracy``. ``group``: the
    processes that share the importance sampling (the ELBO terms are cheap and computed
    whole on every rank).

    A program that takes ``index`` keeps parameters per data point: it is evaluated on
    images of the data set it trained on, given their positions (``index``) and that data
    set's size (``num_data``); without them it is refused, since it has no posterior for
    other images.
    """
    from .objectives import ImportanceWeightError
    from .scoring import ScoringError

    call = ProgramCall(program)
    known = labels
    if call.takes["index"] and index is None:
        raise ScoringError(
            f"{type(program).__name__} takes index: it keeps parameters per training image, and has no posterior for "
            "other images. Evaluate the images it trained on, with their positions (evaluate_model(..., index=..., "
            "num_data=N)); from the command line: --split train")
    if not call.takes["index"]:
        index = None
    labels = labels if call.takes["y"] else None
    with pyro.get_param_store().scope():
        repeats = [elbo_terms(program.model, program.guide, images, batch_size=max(batch_size, 1000),
                              seed=seed if r == 0 else seed + 7919 * r, labels=labels, num_data=num_data,
                              index=index)
                   for r in range(max(1, mc_repeats))]
        terms = repeats[0]
        if getattr(program, "point_estimate", False):
            return Report({"log_lik": Estimate.of(terms["log_lik"], _spread(repeats, "log_lik"))})
        report = Report({k: Estimate.of(v, _spread(repeats, k)) for k, v in terms.items()})
        if known is not None and getattr(program, "predict_class", None) is not None:
            report["accuracy"] = accuracy(program, images, known, max(batch_size, 1000))
        if num_samples > 0:
            try:
                log_px, var = log_px_importance(program.model, program.guide, images, num_samples, batch_size,
                                                seed=seed + 1, progress=progress, labels=labels, group=group,
                                                mc_variance=True, index=index, num_data=num_data)
            except ImportanceWeightError as err:
                report.notes.append(f"log p(x) was not importance sampled: {err}")
            else:
                mc = float(var.sum().sqrt() / var.numel())
                report[f"log_px_is{num_samples}"] = Estimate.of(log_px, mc)
    return report


@torch.no_grad()
def accuracy(program, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 1000) -> Estimate:
    """The fraction of ``images`` whose class the program's ``predict_class`` view (argmax q(y|x)
    for M2) gets right, with its standard error over the images (a binomial one)."""
    require(program, "predict_class", purpose="the accuracy")
    right = torch.cat([program.predict_class(images[s : s + batch_size]) == labels[s : s + batch_size]
                       for s in range(0, images.shape[0], batch_size)])
    return Estimate.of(right.double())


def _spread(repeats: list[dict], key: str) -> float | None:
    """The standard deviation of the data set's mean of ``key`` over independent evaluations."""
    if len(repeats) < 2:
        return None
    return float(torch.stack([r[key].double().mean() for r in repeats]).std(unbiased=True))


def bits_per_dim(log_px_nats: float, num_dims: int) -> float:
    r"""``-log p(x)`` in bits per dimension, ``-log p(x) / (D \ln 2)``.

    For a density on grey values in [0, 1] this is the density's own value; it is a bound
    on the code length of 8-bit images only for dequantised data (docs/results.md).
    """
    return -log_px_nats / (num_dims * math.log(2.0))


# -- which latent dimensions are used (programs with a Gaussian posterior view) --------


@torch.no_grad()
def _posterior_params(program, images: torch.Tensor, batch_size: int,
                      labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loc, scale) of q(z|x) for every image, each ``(N, z_dim)``, encoded in batches."""
    require(program, "encode", purpose="the KL per dimension")
    locs, scales = [], []
    for start in range(0, images.shape[0], batch_size):
        loc, scale = view(program, "encode", images[start : start + batch_size],
                          y=labels_for(labels, slice(start, start + batch_size)))
        locs.append(loc)
        scales.append(scale)
    return torch.cat(locs), torch.cat(scales)


def kl_per_dimension(program, images: torch.Tensor, batch_size: int = 1000,
                     labels: torch.Tensor | None = None) -> torch.Tensor:
    r"""Analytic KL of each latent dimension of q(z|x) from the N(0, 1) prior, averaged over images.

    For the diagonal Gaussian guide ``q(z_d|x) = N(loc_d(x), scale_d(x)^2)`` (site ``"z"`` of
    ``VAE.guide``) the KL separates over dimensions,

    .. math::

        \mathrm{KL}_d(x) = \tfrac12\big(\mathrm{loc}_d^2 + \mathrm{scale}_d^2 - 1\big) - \log \mathrm{scale}_d,

    and its sum over ``d`` is the ``kl`` of :func:`batch_elbo_terms`. Returns a tensor
    ``(z_dim,)`` in nats per image; a dimension with KL near 0 carries no information about x.
    Needs the ``encode`` view and a standard normal prior (:func:`pyro_vae.views.standard_normal_prior`).
    """
    if not standard_normal_prior(program):
        raise ViewUnavailable("the KL per dimension needs a N(0, I) prior; this program's prior is another")
    loc, scale = _posterior_params(program, images, batch_size, labels)
    kl = 0.5 * (loc.double() ** 2 + scale.double() ** 2 - 1.0) - scale.double().log()
    return kl.mean(0)


def active_units(program, images: torch.Tensor, threshold: float = 0.01, batch_size: int = 1000,
                 labels: torch.Tensor | None = None) -> tuple[int, torch.Tensor]:
    r"""The number of active latent units and the per-dimension activity (Burda et al., 2015).

    Unit ``d`` is active when its posterior mean moves with the input,

    .. math::

        A_d = \operatorname{Var}_{x}\big(\mathbb{E}_{q(z \mid x)}[z_d]\big) > \text{threshold},

    with ``E_q[z_d]`` from the program's ``posterior_mean`` view and the variance taken over
    ``images`` (population variance, divisor N). Returns ``(count, A)`` with ``A`` of shape
    ``(z_dim,)``. An inactive unit's posterior is the same for every x: it is unused, and
    typically collapsed onto the prior.
    """
    loc = posterior_means(program, images, batch_size, labels)
    activity = loc.double().var(0, unbiased=False)
    return int((activity > threshold).sum()), activity


@torch.no_grad()
def latent_activity(model, guide, images: torch.Tensor, num_samples: int = 100, batch_size: int = 500,
                    seed: int = 0, labels: torch.Tensor | None = None, index: torch.Tensor | None = None,
                    num_data: int | None = None) -> dict[str, torch.Tensor]:
    r"""Burda et al.'s activity of every latent unit of every guide site, for any program.

    For site ``u`` and unit ``d``, :math:`A_{u,d} = \operatorname{Var}_x\big(\mathbb{E}_{q(u|x)}[u_d]\big)`
    (population variance over ``images``). The inner expectation is the mean of the
    site's distribution given what the guide drew before it, averaged over ``num_samples``
    draws of those (vectorised): exact for a site that depends on x alone (z1, or the
    one-layer VAE's z), a Monte Carlo average for an upper layer (E_q[z2|x] =
    E_{q(z1|x)}[mean of q(z2|z1)]). Returns ``{site: activity of shape (units,)}``; a unit is
    active when its activity exceeds 0.01.
    """
    means: dict[str, list[torch.Tensor]] = {}
    depth = None
    with forked_rng(seed):
        for x, extra in _batches(images, labels, batch_size, index, num_data):
            if depth is None:
                depth = plate_depth(model, guide, x=x[:1], **_first(extra))
            with pyro.plate("particles", num_samples, dim=-1 - depth):
                trace = poutine.trace(guide).get_trace(x, **extra)
            for site in sample_sites(trace):
                if site["is_observed"] or site["fn"].support.is_discrete:
                    continue  # (a GuideMessenger runs the model: its data is no latent; a class has no mean)
                mean = site["fn"].mean.expand(num_samples, x.shape[0], *site["fn"].event_shape)
                means.setdefault(site["name"], []).append(mean.double().mean(0).reshape(x.shape[0], -1))
    return {name: torch.cat(parts).var(0, unbiased=False) for name, parts in means.items()}


def active_unit_counts(activity: dict[str, torch.Tensor], threshold: float = 0.01) -> dict[str, int]:
    """``{site: number of units whose activity exceeds threshold}`` of :func:`latent_activity`."""
    return {name: int((a > threshold).sum()) for name, a in activity.items()}
