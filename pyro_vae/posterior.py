r"""How good is q(z|x)? The inference gaps of Cremer, Li & Duvenaud (2018), and NUTS.

For an image x, a program's amortised guide q(z|x) is one member of a family
:math:`\{q_\lambda\}` whose parameters :math:`\lambda = f_\phi(x)` an encoder computes.
The member best for that image alone, :math:`q^* = q_{\lambda^*}` with
:math:`\lambda^* = \arg\max_\lambda \mathcal{L}[q_\lambda]`, splits the gap between log p(x)
and the ELBO in two:

.. math::

    \underbrace{\log p(x) - \mathcal{L}[q]}_{\text{inference gap}}
    = \underbrace{\log p(x) - \mathcal{L}[q^*]}_{\text{approximation gap}}
    + \underbrace{\mathcal{L}[q^*] - \mathcal{L}[q]}_{\text{amortisation gap}}

The approximation gap is the price of the family (a diagonal Gaussian cannot be a
correlated or multimodal posterior); the amortisation gap is the price of one encoder
for all images. :func:`inference_gaps` measures the three per image:

* :math:`\lambda^*` by Adam on a Monte Carlo ELBO, started at the encoder's output and
  stopped when a round of steps no longer improves the ELBO (measured on fixed noise);
* :math:`\mathcal{L}[q]` and :math:`\mathcal{L}[q^*]` from many samples each;
* log p(x) by importance sampling with :math:`q^*` as the proposal (closer to the
  posterior than q, so its bound is the tighter one; both are lower bounds).

A program offers its family through the ``local_family`` view (:class:`LocalFamily`).
:func:`nuts_posterior` samples the true posterior p(z|x) of one image with Pyro's NUTS.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from dataclasses import dataclass

import pyro
import torch
from torch.distributions import biject_to

from .evaluate import Estimate, batch_log_weights, log_weights
from .protocol import LocalFamily, ProgramCall, data_plate
from .rng import forked_rng
from .scoring import plate_depth


class NoLocalFamily(ValueError):
    """The program's guide has no per-image parametric family to optimise."""


def local_family(program) -> LocalFamily:
    """The program's :class:`LocalFamily` (its ``local_family()`` view), or a clear error."""
    view = getattr(program, "local_family", None)
    if view is None:
        why = ("its guide is a point mass, with no ELBO to optimise" if getattr(program, "point_estimate", False)
               else "it has no local_family() view")
        raise NoLocalFamily(
            f"{type(program).__name__} has no per-image parametric guide family ({why}); the inference gaps need a "
            "guide q(z|x) = family(parameters(x)) over one latent site: the VAE, or a program with a local_family() "
            "method returning pyro_vae.posterior.LocalFamily")
    return view()


class SiteFamily:
    """The per-image family for a program without a ``local_family`` view: for each image,
    independent members over *all* its local latent sites jointly, each on its own event
    shape: a diagonal Gaussian for a real-valued site, a free categorical for a class
    (a site on 0..K-1, as an enumerated label is). Its starting member for an image
    matches ``start_draws`` draws of the program's guide: their mean and standard
    deviation, or their class frequencies. Other supports (a positive scale, counts) and
    sites outside the ``"data"`` plate (no per-image member) are refused.

    A family with a class is optimised with Pyro's ``TraceEnum_ELBO`` (the classes
    summed out, so their probabilities get exact gradients); one with real sites only, on
    reparameterised draws. With a guide richer than this family (a hierarchy
    q(z1|x) q(z2|z1), q(z|x, y), a flow), the best member can score below the guide
    itself: the amortisation gap is then negative, and measures the family rather than
    the amortisation."""

    def __init__(self, program, start_draws: int = 200):
        self.program = program
        self.start_draws = start_draws
        self.sites: list[tuple[str, str, int]] | None = None  # (name, "real" or "class", event dims)

    @property
    def constraints(self) -> tuple:
        from torch.distributions import constraints

        out = []
        for _, kind, _ in self.sites:
            out += [constraints.real, constraints.positive] if kind == "real" else [constraints.real]
        return tuple(out)

    @property
    def enumerates(self) -> bool:
        return any(kind == "class" for _, kind, _ in self.sites)

    def parameters(self, x: torch.Tensor, **extra) -> tuple[torch.Tensor, ...]:
        from pyro.infer.enum import get_importance_trace

        from .scoring import plate_depth

        model, guide = self.program.model, self.program.guide
        depth = plate_depth(model, guide, x=x, **extra)
        particles = pyro.plate("particles", self.start_draws, dim=-1 - depth)
        with torch.no_grad():
            model_trace, guide_trace = get_importance_trace("flat", depth + 1, particles(model), particles(guide), (),
                                                            {"x": x, **extra})
        # the model's latents (an autoguide's auxiliary sites, z_unconstrained, are the guide's own)
        sites = [site for name, site in guide_trace.nodes.items() if site["type"] == "sample"
                 and name in model_trace.nodes and not model_trace.nodes[name]["is_observed"]]
        if not sites:
            raise NoLocalFamily(f"{type(self.program).__name__}'s guide samples no latent: its ELBO is its "
                                "log-likelihood exactly, and there is no inference gap to measure")
        self.sites = [(site["name"], *_site_kind(site)) for site in sites]
        dtype = x.dtype if x.is_floating_point() else torch.get_default_dtype()
        params = []
        for site, (_, kind, _) in zip(sites, self.sites):
            value = site["value"]
            if kind == "real":
                params += [value.double().mean(0).to(dtype), value.double().std(0).clamp(min=1e-6).to(dtype)]
            else:
                classes = int(site["fn"].support.upper_bound) + 1
                counts = torch.nn.functional.one_hot(value.long(), classes).double().mean(0)
                params.append((counts + 1e-3).log().to(dtype))
        return tuple(params)

    def guide(self, params):
        sites = list(self.sites)

        def guide(x, num_data=None, index=None, **_):
            with data_plate(x, num_data, index):
                i = 0
                for name, kind, event_dims in sites:
                    if kind == "real":
                        pyro.sample(name, pyro.distributions.Normal(params[i], params[i + 1]).to_event(event_dims))
                        i += 2
                    else:
                        pyro.sample(name, pyro.distributions.Categorical(logits=params[i]),
                                    infer={"enumerate": "parallel"})
                        i += 1

        return guide


def _site_kind(site) -> tuple[str, int]:
    """``("real" or "class", event dims)`` of a guide site a :class:`SiteFamily` member can stand in for."""
    from torch.distributions import constraints

    name, fn = site["name"], site["fn"]
    if not any(f.name == "data" for f in site["cond_indep_stack"]):
        raise NoLocalFamily(f"latent site {name!r} lies outside the 'data' plate (a global latent): it has no "
                            "per-image member, so the inference gaps per image are not defined for this program")
    support = fn.support
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if support is constraints.real and not fn.support.is_discrete:
        return "real", fn.event_dim
    if isinstance(support, constraints.integer_interval) and support.lower_bound == 0 and fn.event_dim == 0:
        return "class", 0
    raise NoLocalFamily(f"latent site {name!r} takes values in {fn.support}: the per-image family that stands in "
                        "for a guide without a local_family() view has Gaussians for real values and categoricals "
                        "for classes 0..K-1, nothing for this")


def gap_family(program):
    """The family of q*: the program's ``local_family()`` view, else :class:`SiteFamily`;
    a guide that is a point mass has none."""
    if getattr(program, "point_estimate", False):
        return local_family(program)  # (raises, naming the point mass)
    if getattr(program, "local_family", None) is not None:
        return program.local_family()
    return SiteFamily(program)


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """The module's parameters without gradients for the duration (the optimiser moves the guide's only)."""
    flags = [(p, p.requires_grad) for p in module.parameters()]
    for p, _ in flags:
        p.requires_grad_(False)
    try:
        with warnings.catch_warnings():  # pyro.module notes that frozen tensors stay out of its param store
            warnings.filterwarnings("ignore", message=".*was not registered in the param store")
            yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


def elbo_of(model, guide, x: torch.Tensor, num_samples: int, chunk: int = 500, depth: int | None = None,
            **extra) -> torch.Tensor:
    """Per-image ELBO ``E_q[log p(x, z) - log q(z)]`` from ``num_samples`` draws, ``(B,)``;
    ``extra`` (``y``) goes to model and guide."""
    total = torch.zeros(x.shape[0], dtype=torch.float64, device=x.device)
    for k0 in range(0, num_samples, chunk):
        k = min(chunk, num_samples - k0)
        total += batch_log_weights(model, guide, x, k, depth, **extra).double().sum(0)
    return total / num_samples


def importance_log_px(model, guide, x: torch.Tensor, num_samples: int, chunk: int = 500, depth: int | None = None,
                      **extra) -> torch.Tensor:
    """Per-image ``log (1/K) sum_k p(x, z_k) / q(z_k)`` with z_k from ``guide``, ``(B,)``."""
    total = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
    for k0 in range(0, num_samples, chunk):
        k = min(chunk, num_samples - k0)
        total = torch.logaddexp(total, torch.logsumexp(batch_log_weights(model, guide, x, k, depth, **extra).double(),
                                                       0))
    return total - math.log(num_samples)


MAX_STEPS = 5000  # Adam steps per batch at most, when optimising q* per image


def optimal_local_parameters(program, family: LocalFamily, x: torch.Tensor, *, samples: int = 100,
                             lr: float = 1e-2, round_steps: int = 100, max_steps: int = MAX_STEPS,
                             tolerance: float = 0.01,
                             decays: int = 3, check_samples: int = 500, seed: int = 0, extra: dict | None = None,
                             on_step=None) -> tuple[tuple[torch.Tensor, ...], int]:
    """lambda* per image: Adam on the ELBO of each image's own member of the family.

    Starts at the encoder's output; each step averages ``samples`` draws per image (the
    images' parameters are independent, so one summed loss optimises all at once). After
    every ``round_steps`` steps the batch's mean ELBO is measured on the same noise each
    time (``check_samples`` draws), so rounds compare without Monte Carlo noise. A round
    that gains less than ``tolerance`` nats cuts the learning rate by 10 (Adam at a fixed
    rate circles the optimum at a distance set by the rate); after ``decays`` cuts, or
    ``max_steps`` steps, it stops. Returns the best parameters measured and the steps taken.
    ``extra`` (the images' labels ``y``) goes to the model, and to the family's start.
    ``on_step(steps)``, when given, is called after each step with the steps taken so far.
    """
    extra = extra or {}
    with torch.no_grad():
        start = family.parameters(x, **extra)
    transforms = [biject_to(c) for c in family.constraints]
    free = [t.inv(p.detach()).clone().requires_grad_(True) for t, p in zip(transforms, start)]
    optim = torch.optim.Adam(free, lr=lr)

    def current():
        return tuple(t(u) for t, u in zip(transforms, free))

    depth = plate_depth(program.model, family.guide(current()), x=x, **extra)
    enumerated = None
    if getattr(family, "enumerates", False):
        from pyro.infer import TraceEnum_ELBO

        enumerated = TraceEnum_ELBO(num_particles=samples, vectorize_particles=True, max_plate_nesting=depth)

    def check() -> float:
        with torch.no_grad(), forked_rng(seed + 1):
            return float(elbo_of(program.model, family.guide(current()), x, check_samples, depth=depth,
                                 **extra).mean())

    best_value, best, steps, cuts = check(), tuple(p.detach() for p in current()), 0, 0
    with frozen(program), forked_rng(seed):
        while steps < max_steps:
            for i in range(round_steps):
                if enumerated is not None:  # classes summed out by Pyro's TraceEnum_ELBO
                    loss = enumerated.differentiable_loss(program.model, family.guide(current()), x, **extra)
                else:
                    log_w = log_weights(program.model, family.guide(current()), x, samples, depth, **extra)
                    loss = -log_w.mean(0).sum()
                optim.zero_grad(set_to_none=True)
                loss.backward()
                optim.step()
                if on_step is not None:
                    on_step(steps + i + 1)
            steps += round_steps
            value = check()
            if value > best_value:
                gained, best_value, best = value - best_value, value, tuple(p.detach() for p in current())
            else:
                gained = 0.0
            if gained < tolerance:
                cuts += 1
                if cuts > decays:
                    break
                for group in optim.param_groups:
                    group["lr"] *= 0.1
    return best, steps


@dataclass(frozen=True)
class Gaps:
    """Per-image values (nats), each ``(N,)``, and the optimisation's steps per batch."""

    log_px: torch.Tensor
    elbo_amortized: torch.Tensor
    elbo_optimal: torch.Tensor
    steps: list[int]

    @property
    def approximation(self) -> torch.Tensor:
        return self.log_px - self.elbo_optimal

    @property
    def amortization(self) -> torch.Tensor:
        return self.elbo_optimal - self.elbo_amortized

    @property
    def inference(self) -> torch.Tensor:
        return self.log_px - self.elbo_amortized

    def report(self) -> dict[str, Estimate]:
        return {"log_px": Estimate.of(self.log_px), "elbo_amortized": Estimate.of(self.elbo_amortized),
                "elbo_optimal": Estimate.of(self.elbo_optimal), "inference_gap": Estimate.of(self.inference),
                "approximation_gap": Estimate.of(self.approximation),
                "amortization_gap": Estimate.of(self.amortization)}


def inference_gaps(program, images: torch.Tensor, *, num_samples: int = 5000, elbo_samples: int = 5000,
                   batch_size: int = 100, seed: int = 0, progress=None, labels: torch.Tensor | None = None,
                   index: torch.Tensor | None = None, num_data: int | None = None,
                   log_px: torch.Tensor | None = None, **optimize) -> Gaps:
    """log p(x), L[q] and L[q*] of every image (module docstring); ``log_px``, when given,
    is each image's log p(x) from elsewhere (AIS: :mod:`pyro_vae.ais`), used instead of
    importance sampling with q* as the proposal; ``optimize`` goes to
    :func:`optimal_local_parameters`. q* is a member of :func:`gap_family`: the program's
    ``local_family()`` view, else per-image Gaussians over all its local latent sites
    (:class:`SiteFamily`). ``labels`` reach programs that take ``y``; ``index`` and
    ``num_data`` (the images' positions in the training set, and its size) programs
    that keep parameters per training image, and take ``index``."""
    if num_samples < 1 or elbo_samples < 1:
        raise ValueError(f"num_samples and elbo_samples must be at least 1, got {num_samples} and {elbo_samples}")
    family = gap_family(program)
    call = ProgramCall(program)
    labels = labels if call.takes["y"] else None
    if call.takes["index"] and index is None:
        raise NoLocalFamily(f"{type(program).__name__} takes index: it keeps parameters per training image and has "
                            "no guide for other images; measure the gaps on the training images (--split train)")
    index = index if call.takes["index"] else None
    parts: dict[str, list[torch.Tensor]] = {"log_px": [], "elbo_amortized": [], "elbo_optimal": []}
    steps = []
    with pyro.get_param_store().scope():
        for start in range(0, images.shape[0], batch_size):
            x = images[start : start + batch_size]
            extra = {} if labels is None else {"y": labels[start : start + batch_size]}
            if index is not None:
                extra.update(index=index[start : start + batch_size], num_data=num_data)
            batch_seed = seed + start  # noise of each batch from its position: any --limit gives the same values
            with torch.no_grad(), forked_rng(batch_seed):
                parts["elbo_amortized"].append(elbo_of(program.model, program.guide, x, elbo_samples, **extra))
            expected = sum(steps) / len(steps) if steps else optimize.get("max_steps", MAX_STEPS)
            shown = _BatchProgress(progress, x.shape[0], expected)
            best, taken = optimal_local_parameters(program, family, x, seed=batch_seed, extra=extra,
                                                   on_step=shown.optimised, **optimize)
            steps.append(taken)
            optimal = family.guide(best)
            with torch.no_grad(), forked_rng(batch_seed + 2):
                parts["elbo_optimal"].append(elbo_of(program.model, optimal, x, elbo_samples, **extra))
                if log_px is None:
                    parts["log_px"].append(importance_log_px(program.model, optimal, x, num_samples, **extra))
                else:
                    parts["log_px"].append(log_px[start : start + batch_size].to(x.device, torch.float64))
            shown.finished()
    return Gaps(*(torch.cat(parts[k]) for k in ("log_px", "elbo_amortized", "elbo_optimal")), steps)


class _BatchProgress:
    """A batch's share of a progress bar, counted in images: the optimisation's rounds move it
    (each step) up to 90 % of the batch, as if it took ``expected_steps`` (the earlier batches' mean, or
    the most allowed for the first), and the bounds after it the rest; so a bar over many
    minutes moves every few seconds, and its estimate of the time left holds from the first batch."""

    def __init__(self, progress, images: int, expected_steps: float):
        self.progress, self.images, self.expected, self.shown = progress, images, max(1.0, expected_steps), 0.0

    def optimised(self, steps: int) -> None:
        self._to(0.9 * self.images * min(1.0, steps / self.expected))

    def finished(self) -> None:
        self._to(self.images)

    def _to(self, value: float) -> None:
        if self.progress is not None and value > self.shown:
            self.progress(value - self.shown)
            self.shown = value


def nuts_posterior(program, x: torch.Tensor, *, num_samples: int = 1000, warmup: int = 500, seed: int = 0,
                   site: str = "z", y: torch.Tensor | None = None, progress: bool = False) -> torch.Tensor:
    """Draws of the true posterior p(z|x) of one image ``x`` (shape ``(1, ...)``) by NUTS,
    ``(num_samples, z_dim)``: :class:`pyro.infer.MCMC` on the program's model with x observed.
    ``progress``: Pyro's own bar of the warm-up and the draws, with the time left."""
    from pyro.infer import MCMC, NUTS

    def model():  # (y, the image's label, for a conditional program)
        return program.model(x, num_data=1) if y is None else program.model(x, y=y, num_data=1)

    with pyro.get_param_store().scope(), frozen(program), forked_rng(seed):
        mcmc = MCMC(NUTS(model), num_samples=num_samples, warmup_steps=warmup, disable_progbar=not progress)
        mcmc.run()
    return mcmc.get_samples()[site].reshape(num_samples, -1).detach()
