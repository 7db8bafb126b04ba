r"""Annealed importance sampling of log p(x) (Neal, 2001), and bidirectional Monte Carlo.

AIS moves chains from the prior to the posterior of each image through the geometric path

.. math::

    f_t(z) = p(z)\, p(x \mid z)^{\beta_t}, \qquad 0 = \beta_0 < \beta_1 < \dots < \beta_T = 1,

with a Hamiltonian Monte Carlo transition that leaves :math:`f_t` invariant after each
step of the path. Its weight

.. math::

    \log w = \sum_{t=1}^{T} (\beta_t - \beta_{t-1}) \log p(x \mid z_{t-1}),
    \qquad \mathbb{E}[w] = p(x),

so the log of the mean weight over chains is a stochastic lower bound on log p(x)
(Jensen). Run backwards from an exact posterior sample (BDMC: Grosse et al., 2015; Wu et
al., 2017), the same sum with the signs of the increments flipped has
:math:`\mathbb{E}[w'] = 1 / p(x)`, a stochastic upper bound. An exact posterior sample
exists for data simulated from the model (z drawn from the prior, then x from p(x|z)), so
on such data the two sandwich the true log p(x).

Every density comes from Pyro's trace of the program's ``model`` with its latent sites
given (:class:`Path`); the guide is not used. The schedule (:class:`Schedule`) is
sigmoidal, as Wu et al.'s, and the HMC step size of each chain adapts towards an
acceptance rate of 0.65 as the chain goes (their practice; the tests check the result
against exact log p(x) of a linear-Gaussian model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pyro
import torch
from pyro import poutine
from torch.distributions import biject_to

from .objectives import ImportanceWeightError, _per_image_log_prob, sample_sites


class AISError(ValueError):
    """The program cannot be annealed here; the message says why."""


@dataclass(frozen=True)
class Schedule:
    """How AIS runs: ``steps`` intermediate distributions, ``chains`` per image, ``leapfrog``
    steps per HMC transition; ``delta`` is the steepness of the sigmoidal schedule. The
    step size of each transition and image comes from a tuning run of ``tune_chains``
    chains that starts at ``step_size`` and adapts towards ``target_accept``."""

    steps: int = 500
    chains: int = 4
    leapfrog: int = 5
    step_size: float = 0.05
    target_accept: float = 0.65
    delta: float = 4.0
    tune_chains: int = 2

    def __post_init__(self):
        for name in ("steps", "chains", "leapfrog", "tune_chains"):
            if getattr(self, name) < 1:
                raise ValueError(f"AIS {name} must be at least 1, got {getattr(self, name)}")
        if not 0 < self.target_accept < 1 or self.step_size <= 0 or self.delta <= 0:
            raise ValueError("AIS needs 0 < target_accept < 1, step_size > 0 and delta > 0")

    def betas(self) -> torch.Tensor:
        r"""The inverse temperatures :math:`\beta_0 = 0, ..., \beta_T = 1` (float64): a sigmoid
        in ``t`` rescaled to [0, 1], dense near both ends where log p(x|z)'s scale makes
        equal steps in beta costly."""
        t = torch.linspace(-self.delta, self.delta, self.steps + 1, dtype=torch.float64)
        s = torch.sigmoid(t)
        betas = (s - s[0]) / (s[-1] - s[0])
        betas[0], betas[-1] = 0.0, 1.0
        return betas

    @property
    def gradient_evaluations(self) -> int:
        """Forward and backward passes per image, tuning run included: ``leapfrog`` per
        transition and chain, T - 1 transitions (the last distribution's would not change
        the weight), one at the start."""
        return ((self.steps - 1) * self.leapfrog + 1) * (self.chains + self.tune_chains)


@dataclass
class Result:
    """Per image: the estimate (``(B,)``, float64), the per-chain log weights ``(C, B)``,
    the mean HMC acceptance rate per image and the final step sizes."""

    log_px: torch.Tensor
    log_w: torch.Tensor
    acceptance: torch.Tensor
    step_size: torch.Tensor

    @property
    def mc_variance(self) -> torch.Tensor:
        """Delta-method variance of each image's estimate over its chains (as for IS)."""
        w = torch.softmax(self.log_w, dim=0)
        return ((w * w).sum(0) - 1.0 / self.log_w.shape[0]).clamp(min=0.0)


class Path:
    """``log p(z)`` and ``log p(x|z)`` per chain and image, from Pyro's trace of ``model``
    with its latent sites given, on an unconstrained flat vector ``u`` of shape ``(C, B, D)``.

    The chains are a ``"ais_chains"`` plate left of the program's ``depth`` plates, as Pyro
    vectorises particles. A latent with a constrained support lives in unconstrained
    space (:func:`torch.distributions.biject_to`), its Jacobian counted in ``log p(z)``.
    Refused with the reason (:class:`AISError`): a discrete latent, a site outside the
    ``"data"`` plate (a global latent), a scaled or masked latent.
    """

    def __init__(self, model, x: torch.Tensor, chains: int, depth: int, **kwargs):
        self.model, self.x, self.chains, self.depth, self.kwargs = model, x, chains, depth, kwargs
        trace = self._trace(None)
        self.latents, self.observed, self.layout = [], [], {}
        for site in sample_sites(trace):
            name = site["name"]
            try:
                _per_image_log_prob(site, "data", "model", depth)
            except ImportanceWeightError as err:
                raise AISError(f"AIS cannot anneal this program: {err}") from None
            if site["is_observed"]:
                self.observed.append(name)
                continue
            fn = site["fn"]
            if fn.support.is_discrete or site["infer"].get("enumerate"):
                raise AISError(f"AIS moves continuous latents by Hamiltonian Monte Carlo; latent site {name!r} is "
                               f"discrete ({type(fn).__name__}): sum it out in the model, or use --method is")
            self.latents.append(name)
            self.layout[name] = (site["value"].shape, self._data_dim(site), biject_to(fn.support))
        if not self.latents or not self.observed:
            raise AISError("AIS needs latent sites and observed sites in the model")
        self.start = trace

    def _trace(self, values: dict | None):
        chains = pyro.plate("ais_chains", self.chains, dim=-1 - self.depth)
        program = chains(self.model)
        if values is not None:
            program = poutine.condition(program, data=values)
        return poutine.trace(program).get_trace(x=self.x, **self.kwargs)

    def _data_dim(self, site) -> int:
        frame = next(f for f in site["cond_indep_stack"] if f.name == "data")
        event = len(site["fn"].event_shape)
        return site["value"].dim() - event + frame.dim

    # -- between sites and the flat unconstrained vector --------------------------------

    def flatten(self, values: dict) -> torch.Tensor:
        parts = []
        for name in self.latents:
            shape, dim, transform = self.layout[name]
            u = transform.inv(values[name].expand(shape))
            parts.append(u.movedim(dim, 1).reshape(self.chains, self.x.shape[0], -1))
        return torch.cat(parts, -1)

    def unflatten(self, u: torch.Tensor) -> tuple[dict, torch.Tensor]:
        """The sites' values and the log-Jacobian of the transforms, ``(C, B)``."""
        values, log_jac, offset = {}, u.new_zeros(u.shape[:2]), 0
        for name in self.latents:
            shape, dim, transform = self.layout[name]
            moved = shape[:1] + shape[dim : dim + 1] + shape[1:dim] + shape[dim + 1 :]
            size = math.prod(moved[2:])
            v = u[..., offset : offset + size].reshape(moved).movedim(1, dim)
            offset += size
            z = transform(v)
            if not _is_identity(transform):
                jac = transform.log_abs_det_jacobian(v, z)  # elementwise, or summed over the event dims
                log_jac = log_jac + jac.movedim(dim, 1).reshape(self.chains, self.x.shape[0], -1).sum(-1)
            values[name] = z
        return values, log_jac

    def terms(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(log p(z) + log|J|, log p(x|z))``, each ``(C, B)``."""
        values, log_prior = self.unflatten(u)
        trace = self._trace(values)
        log_lik = u.new_zeros(log_prior.shape)
        for site in sample_sites(trace):
            name = site["name"]
            log_prob, _ = _per_image_log_prob({**site, "is_observed": True}, "data", "model", self.depth)
            log_prob = log_prob.expand(self.chains, self.x.shape[0])
            if name in self.observed:
                log_lik = log_lik + log_prob
            else:
                log_prior = log_prior + log_prob
        return log_prior, log_lik

    def evaluate(self, u: torch.Tensor):
        """Both terms at ``u`` and their gradients in ``u``."""
        u = u.detach().requires_grad_(True)
        with torch.enable_grad():
            log_prior, log_lik = self.terms(u)
            grad_lik, = torch.autograd.grad(log_lik.sum(), u, retain_graph=True)
            grad_prior, = torch.autograd.grad(log_prior.sum(), u, allow_unused=True)
        if grad_prior is None:
            grad_prior = torch.zeros_like(u)
        return State(u.detach(), log_prior.detach(), log_lik.detach(), grad_prior, grad_lik)


def _is_identity(transform) -> bool:
    while isinstance(transform, torch.distributions.transforms.IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, torch.distributions.transforms.ComposeTransform) and not transform.parts


@dataclass
class State:
    u: torch.Tensor
    log_prior: torch.Tensor
    log_lik: torch.Tensor
    grad_prior: torch.Tensor
    grad_lik: torch.Tensor

    def target(self, beta: float) -> torch.Tensor:
        return self.log_prior + beta * self.log_lik

    def grad(self, beta: float) -> torch.Tensor:
        return self.grad_prior + beta * self.grad_lik


def hmc(path: Path, state: State, beta: float, step_size: torch.Tensor, leapfrog: int
        ) -> tuple[State, torch.Tensor]:
    """One HMC transition per chain and image, leaving ``p(z) p(x|z)^beta`` invariant; returns the
    new state and the acceptance probability ``(C, B)``. ``step_size`` is ``(C, B)``."""
    eps = step_size.unsqueeze(-1).to(state.u.dtype)
    momentum = torch.randn_like(state.u)
    p = momentum + 0.5 * eps * state.grad(beta)
    new = state
    for step in range(leapfrog):
        new = path.evaluate(new.u + eps * p)
        if step < leapfrog - 1:
            p = p + eps * new.grad(beta)
    p = p + 0.5 * eps * new.grad(beta)
    log_ratio = (new.target(beta) - 0.5 * (p * p).sum(-1)) - (state.target(beta) - 0.5 * (momentum * momentum).sum(-1))
    log_ratio = torch.nan_to_num(log_ratio, nan=-math.inf)
    accept_prob = log_ratio.clamp(max=0.0).exp()
    accept = torch.rand_like(accept_prob).log() < log_ratio
    keep = accept.unsqueeze(-1)
    chosen = State(*(torch.where(keep if a.dim() == 3 else accept, a, b)
                     for a, b in zip((new.u, new.log_prior, new.log_lik, new.grad_prior, new.grad_lik),
                                     (state.u, state.log_prior, state.log_lik, state.grad_prior, state.grad_lik))))
    return chosen, accept_prob


def _adapt(step_size: torch.Tensor, accept_prob: torch.Tensor, target: float) -> torch.Tensor:
    """Each image's step size, up when its chains' mean acceptance probability is above the
    target and down when below, multiplicatively: a fixed point where the acceptance is the target."""
    return (step_size * torch.exp(0.5 * (accept_prob.mean(0) - target))).clamp(1e-5, 2.0)


def anneal(path: Path, state: State, schedule: Schedule, reverse: bool = False, step_sizes=None,
           progress=None) -> Result:
    """AIS from ``state`` along the schedule (forward: from beta 0; reverse: from beta 1).

    ``step_sizes``: each transition's step size per image, ``(T - 1, B)`` in forward order,
    used as they are. Without them, each image's step size adapts as the chains go, and
    ``Result.step_size`` holds the sequence: a tuning run. Adapting within the run that
    estimates would bias it (a chain's step size then depends on its own past: measured
    here, +0.2 nats on a linear-Gaussian model whose log p(x) is known), so the estimates
    use the step sizes of an independent tuning run (:func:`tuned`)."""
    betas = schedule.betas().tolist()
    transitions = list(range(1, len(betas) - 1))  # the last distribution's transition would not change the weight
    if reverse:
        betas = betas[::-1]
    images = state.log_lik.shape[1]
    log_w = torch.zeros_like(state.log_lik, dtype=torch.float64)
    step_size = torch.full((images,), schedule.step_size, dtype=state.u.dtype, device=state.u.device)
    record = []
    accepted = torch.zeros_like(state.log_lik, dtype=torch.float64)
    for t in range(1, len(betas)):
        log_w += (betas[t] - betas[t - 1]) * state.log_lik.double()
        if t < len(betas) - 1:
            if step_sizes is not None:
                step_size = step_sizes[(len(betas) - 1 - t) - 1 if reverse else t - 1]
            state, accept_prob = hmc(path, state, betas[t], step_size.expand(state.log_lik.shape), schedule.leapfrog)
            accepted += accept_prob.double()
            if step_sizes is None:
                record.append(step_size)
                step_size = _adapt(step_size, accept_prob, schedule.target_accept)
        if progress is not None:
            progress(t)
    sign = -1.0 if reverse else 1.0
    estimate = sign * (torch.logsumexp(log_w, 0) - math.log(log_w.shape[0]))
    steps = torch.stack(record) if record else step_sizes
    return Result(estimate, log_w, (accepted / max(len(transitions), 1)).mean(0), steps)


def tuned(path: Path, schedule: Schedule, progress=None) -> torch.Tensor:
    """Step sizes per transition and image, ``(T - 1, B)``, adapted on a forward run of
    ``schedule.tune_chains`` chains drawn independently of those that estimate."""
    pilot = Path(path.model, path.x, schedule.tune_chains, path.depth, **path.kwargs)
    state = pilot.evaluate(pilot.flatten({name: pilot.start.nodes[name]["value"] for name in pilot.latents}))
    return anneal(pilot, state, schedule, progress=progress).step_size


@torch.no_grad()
def ais_log_px(model, x: torch.Tensor, schedule: Schedule = Schedule(), depth: int = 1, progress=None,
               **kwargs) -> Result:
    """Forward AIS: a stochastic lower bound on each image's log p(x), ``Result.log_px`` ``(B,)``.
    ``progress(t)`` is called after each of the tuning run's and then the estimate's T steps."""
    path = Path(model, x, schedule.chains, depth, **kwargs)
    steps = tuned(path, schedule, progress)
    state = path.evaluate(path.flatten({name: path.start.nodes[name]["value"] for name in path.latents}))
    return anneal(path, state, schedule, step_sizes=steps, progress=progress)


@torch.no_grad()
def reverse_ais_log_px(model, x: torch.Tensor, posterior: dict, schedule: Schedule = Schedule(), depth: int = 1,
                       progress=None, step_sizes: torch.Tensor | None = None, **kwargs) -> Result:
    """Reverse AIS from exact posterior samples ``posterior`` (site -> value of shape
    ``(B, ...)``, broadcast over the chains): a stochastic upper bound on log p(x). The step
    sizes are ``step_sizes`` (a forward run's, for BDMC) or a tuning run's."""
    path = Path(model, x, schedule.chains, depth, **kwargs)
    if step_sizes is None:
        step_sizes = tuned(path, schedule, progress)
    start = {name: posterior[name].unsqueeze(0).expand(path.layout[name][0]) for name in path.latents}
    state = path.evaluate(path.flatten(start))
    return anneal(path, state, schedule, reverse=True, step_sizes=step_sizes, progress=progress)


@torch.no_grad()
def simulate(model, x_like: torch.Tensor, **kwargs) -> tuple[torch.Tensor, dict]:
    """Images drawn from the model, ``(B, ...)`` shaped as ``x_like``, and the latent values that
    generated them (exact posterior samples for them). The model must observe one site, the image."""
    observed = [s["name"] for s in sample_sites(poutine.trace(model).get_trace(x=x_like, **kwargs))
                if s["is_observed"]]
    if len(observed) != 1:
        raise AISError(f"simulating data needs a model that observes one site, the image; this one observes {observed}")
    trace = poutine.trace(poutine.uncondition(model)).get_trace(x=x_like, **kwargs)
    sampled = [s["name"] for s in sample_sites(trace) if not s["is_observed"]]
    name = observed[0]
    x = trace.nodes[name]["value"].reshape(x_like.shape).to(x_like.dtype)
    return x, {n: trace.nodes[n]["value"] for n in sampled if n != name}


# -- a data set, batch by batch, resumable ------------------------------------------------


def evaluate_ais(program, images: torch.Tensor, schedule: Schedule = Schedule(), batch_size: int = 100,
                 seed: int = 0, labels: torch.Tensor | None = None, index: torch.Tensor | None = None,
                 num_data: int | None = None, store=None, progress=None, bdmc: bool = False) -> dict:
    """AIS on every image, ``batch_size`` images at a time, each batch from its own seed
    (``seed`` and the batch's position), so a killed evaluation resumed from ``store`` (a
    file path: finished batches are kept there, written atomically) gives the numbers an
    uninterrupted one gives.

    Returns per-image tensors: ``log_px`` and ``mc_variance`` (forward AIS), ``acceptance``,
    ``seconds`` (per batch, spread over its images). With ``bdmc``, the images are not
    used but their number: as many are simulated from the model (z from the prior, then
    x), and the result adds ``upper`` (reverse AIS from the z that made each image) and
    ``gap`` = upper - log_px; ``log_px`` is then the forward bound on the simulated images.
    """
    import time
    from pathlib import Path as FilePath

    from . import checkpoint
    from .evaluate import _batches, _first
    from .protocol import ProgramCall
    from .rng import forked_rng
    from .scoring import plate_depth

    takes = ProgramCall(program).takes
    labels = labels if takes["y"] else None
    index, num_data = (index, num_data) if takes["index"] else (None, None)
    batches = list(_batches(images, labels, batch_size, index, num_data))
    x0, extra0 = batches[0]
    depth = plate_depth(program.model, program.guide, x=x0[:1], **_first(extra0))
    Path(program.model, x0[:1], 1, depth, **_first(extra0))  # refuse a program AIS cannot anneal, before any work
    settings = {"schedule": vars(schedule), "batch_size": batch_size, "seed": seed, "images": images.shape[0],
                "bdmc": bdmc}
    done = {}
    if store is not None:
        store = FilePath(store)
        if store.exists():
            saved = checkpoint.load(store)
            if saved.get("settings") == settings:
                done = saved["batches"]
    keys = ("log_px", "mc_variance", "acceptance", "seconds") + (("upper", "gap") if bdmc else ())
    for j, (x, extra) in enumerate(batches):
        if j in done:
            if progress is not None:
                progress(schedule.steps * (3 if bdmc else 2))
            continue
        t0 = time.perf_counter()
        with forked_rng(seed + 1_000_003 * j):
            if bdmc:
                x, posterior = simulate(program.model, x, **extra)
            forward = ais_log_px(program.model, x, schedule, depth, progress, **extra)
            out = {"log_px": forward.log_px, "mc_variance": forward.mc_variance, "acceptance": forward.acceptance}
            if bdmc:
                reverse = reverse_ais_log_px(program.model, x, posterior, schedule, depth, progress,
                                             step_sizes=forward.step_size, **extra)
                out.update(upper=reverse.log_px, gap=reverse.log_px - forward.log_px)
        out["seconds"] = torch.full_like(forward.log_px, (time.perf_counter() - t0) / x.shape[0])
        done[j] = {k: v.detach().double().cpu() for k, v in out.items()}
        if store is not None:
            store.parent.mkdir(parents=True, exist_ok=True)
            checkpoint.save({"settings": settings, "batches": done}, store)
    return {k: torch.cat([done[j][k] for j in range(len(batches))]) for k in keys}
