r"""Per-image ELBO terms, taken from Pyro's own ELBO of the whole minibatch.

Pyro defines the ELBO of a program: its ELBO classes trace the guide, replay the model
against it, score every site with its mask and scale (plates, subsampling,
``poutine.scale``), sum enumerated sites out (:class:`pyro.infer.TraceEnum_ELBO`) and
add it all up into one number per minibatch. This module reports that number, split
per image, without a second copy of those rules:

* :class:`PerImageWeights` multiplies the scale of every site inside the ``"data"``
  plate by a weight of its image, ``w_obs[n]`` for observed sites and ``w_lat[n]`` for
  latent ones, and the scale of every site outside it (a global latent, a prior on
  weights) by a scalar ``g_obs`` or ``g_lat``. All weights are 1, so the value Pyro
  computes is unchanged.
* The ELBO is linear in every site's scale, so its derivative in ``w_obs[n]`` is the
  part of the ELBO that belongs to image ``n``'s observed sites, times the ``"data"``
  plate's ``N / B``; in ``g_lat`` the part of the global latents; and so on. One
  backward pass to the weights (not to the parameters) gives them all.

The per-image ELBO is then ``log_lik[n] - kl[n]`` with

.. math::

    \mathrm{log\_lik}_n = \tfrac{B}{N}\,\partial_{w_{obs,n}} \mathcal L + \tfrac1N\,\partial_{g_{obs}} \mathcal L,
    \qquad
    -\mathrm{kl}_n = \tfrac{B}{N}\,\partial_{w_{lat,n}} \mathcal L + \tfrac1N\,\partial_{g_{lat}} \mathcal L,

so the mean over the ``N`` images of a data set evaluated as one batch is Pyro's ELBO of
that data set divided by ``N``: terms outside the ``"data"`` plate count once for the
data set, not once per image. ``kl`` is minus everything that is not an observed site:
the KL of the local latents (in closed form where Pyro's ``TraceMeanField_ELBO`` uses
one, for a program with a single latent site) and the global latents' share.

Which of Pyro's ELBOs is split: :class:`pyro.infer.TraceEnum_ELBO` when a site of the
model or the guide is marked for enumeration (its weights are the exact marginal over
the enumerated values); else the traces :class:`pyro.infer.Trace_ELBO` makes (a
``GuideMessenger`` guide, such as ``AutoNormalMessenger``, traced as Pyro traces it),
scored as ``TraceMeanField_ELBO`` scores them when the program has one latent site and
a closed-form KL, as ``Trace_ELBO`` does otherwise. Pyro sums a site enumerated in the
*model* out with one scale for all its terms, which cannot be a weight per image: such
programs are scored image by image, and report the ELBO alone (its split into a
log-likelihood and a KL is not defined once the latent is summed out).
"""

from __future__ import annotations

import contextlib
import inspect
import warnings

import torch
from pyro import poutine
from pyro.infer import TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer.enum import get_importance_trace
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

from .rng import forked_rng

DATA_PLATE = "data"


class ScoringError(ValueError):
    """A program whose ELBO cannot be reported per image; the message says why."""


class PerImageWeights(Messenger):
    """Multiply each sample site's scale by the weight of its image (see the module's docstring).

    Sites are weighted after every inner handler has set their scale (plates,
    ``poutine.scale``), so the weights enter Pyro's computation as a factor of the
    scale it applies, and nothing else changes.
    """

    def __init__(self, batch: int, device, shared: bool = False):
        super().__init__()
        # shared (one image, one weight for all its sites): a 0-dim weight, the only kind of
        # scale Pyro lets a site enumerated in the model have
        shape = () if shared else (batch,)
        # float64: the products with float32 log-densities are then exact, and a float64
        # program keeps its precision
        self.w_obs = torch.ones(shape, dtype=torch.float64, device=device, requires_grad=True)
        self.w_lat = self.w_obs if shared else torch.ones(shape, dtype=torch.float64, device=device, requires_grad=True)
        self.g_obs = torch.ones((), dtype=torch.float64, device=device, requires_grad=True)
        self.g_lat = torch.ones((), dtype=torch.float64, device=device, requires_grad=True)

    def _process_message(self, msg):
        if msg["type"] != "sample" or site_is_subsample(msg):
            return
        frame = next((f for f in msg["cond_indep_stack"] if f.name == DATA_PLATE), None)
        if frame is None:
            weight = self.g_obs if msg["is_observed"] else self.g_lat
        else:
            if frame.dim is None:
                raise ScoringError(f"site {msg['name']!r} is in a sequential 'data' plate (pyro.plate without a dim "
                                   "used as an iterator); per-image scores need the vectorised plate")
            weight = self.w_obs if msg["is_observed"] else self.w_lat
            if weight.dim():
                weight = weight.reshape((-1,) + (1,) * (-1 - frame.dim))
        msg["scale"] = weight * msg["scale"]

    def weights(self):
        return [self.w_obs, self.w_lat, self.g_obs, self.g_lat]


def enumerates(trace) -> bool:
    """Whether any sample site of ``trace`` is marked for enumeration."""
    return any(site["type"] == "sample" and site["infer"].get("enumerate") for site in trace.nodes.values())


def is_guide_messenger(guide) -> bool:
    """Whether ``guide`` is a :class:`pyro.infer.autoguide.GuideMessenger` (it runs the model itself)."""
    return isinstance(poutine.unwrap(guide), Messenger)


class Scorer:
    """Pyro's ELBO of one minibatch of a program, and its split per image.

    Built once per program (it traces the program once, on the first batch it scores,
    to find the plate depth and whether anything is enumerated)."""

    def __init__(self):
        self.max_plate_nesting = None
        self.enumerated = None
        self.estimator = None  # the Pyro ELBO whose value is split: "traceenum", "meanfield" or "trace"

    def _inspect(self, model, guide, kwargs):
        # one run of guide and model, without enumeration, as Pyro's ELBOs guess the plate
        # depth; its random draws are taken from a fork, so the scores' draws stay the caller's
        model_trace, guide_trace = _plain_traces(model, guide, kwargs)
        check_guide(guide, guide_trace, kwargs)
        self.max_plate_nesting = trace_depth(model_trace, guide_trace)
        self.enumerated = enumerates(guide_trace) or enumerates(model_trace)
        self.model_enumerates = self.enumerated and any(
            site["type"] == "sample" and not site["is_observed"] and site["infer"].get("enumerate")
            and name not in guide_trace.nodes for name, site in model_trace.nodes.items())
        if self.enumerated and is_guide_messenger(guide):
            raise ScoringError("Pyro's TraceEnum_ELBO does not run a GuideMessenger guide, so a program that "
                               "enumerates cannot have one; write the guide as a function or an AutoGuide")

    def elbo(self, model, guide, **kwargs) -> torch.Tensor:
        """Pyro's ELBO estimate (one particle) of the call, a 0-dim tensor."""
        if self.max_plate_nesting is None:
            self._inspect(model, guide, kwargs)
        if self.enumerated:
            estimator = TraceEnum_ELBO(max_plate_nesting=self.max_plate_nesting, strict_enumeration_warning=False)
            from .objectives import dice_elbo  # (Pyro's, its expectation taken without host reads)

            (model_trace, guide_trace), = estimator._get_traces(model, guide, (), kwargs)
            self.estimator = "traceenum"
            return dice_elbo(model_trace, guide_trace)
        model_trace, guide_trace = get_importance_trace("flat", self.max_plate_nesting, model, guide, (), kwargs)
        _refuse_unguided(model_trace, guide_trace)
        latents = [s for s in guide_trace.nodes.values() if s["type"] == "sample"]
        shared = [s for s in latents if s["name"] in model_trace.nodes]
        if len(shared) == 1 and all(s["fn"].has_rsample for s in latents) and \
                all(s["infer"].get("is_auxiliary") for s in latents if s is not shared[0]):
            # Pyro's mean-field ELBO: the site's KL in closed form where one exists
            _, surrogate = TraceMeanField_ELBO()._differentiable_loss_particle(model_trace, guide_trace)
            self.estimator = "meanfield"
            return -surrogate
        self.estimator = "trace"
        total = 0.0
        for site in model_trace.nodes.values():
            if site["type"] == "sample":
                total = total + site["log_prob_sum"]
        for site in latents:
            total = total - site["log_prob_sum"]
        return total

    def terms(self, model, guide, x: torch.Tensor, num_data: int, **kwargs) -> dict[str, torch.Tensor]:
        """Per-image ``log_lik``, ``kl`` and ``elbo`` of the batch ``x`` (one draw each), for
        a data set of ``num_data`` images; ``elbo`` alone for a model that enumerates."""
        kwargs = {"x": x, "num_data": num_data, **kwargs}
        if not _takes(model, "num_data"):  # a bare model: each batch is its own data set
            del kwargs["num_data"]
            num_data = x.shape[0]
        if self.max_plate_nesting is None:
            self._inspect(model, guide, kwargs)
        if self.model_enumerates:
            return self._one_by_one(model, guide, x, num_data, kwargs)
        return self._split(model, guide, x.shape[0], num_data, kwargs, shared=False, device=x.device)

    def _split(self, model, guide, batch, num_data, kwargs, shared, device):
        weights = PerImageWeights(batch, device, shared=shared)
        with _frozen(model, guide), torch.enable_grad(), weights, warnings.catch_warnings():
            # Pyro reads each enumerated site's scale as a float to check they agree
            warnings.filterwarnings("ignore", "Converting a tensor with requires_grad=True to a scalar")
            value = self.elbo(model, guide, **kwargs)
        parts = [torch.zeros_like(w) for w in weights.weights()]
        if isinstance(value, torch.Tensor) and value.requires_grad:
            grads = torch.autograd.grad(value, weights.weights(), allow_unused=True)
            parts = [torch.zeros_like(w) if g is None else g for g, w in zip(grads, weights.weights())]
        w_obs, w_lat, g_obs, g_lat = (p.detach() for p in parts)
        local = batch / num_data
        if shared:  # one weight for every local site: the ELBO alone
            return {"elbo": (w_obs * local + (g_obs + g_lat) / num_data).reshape(batch)}
        log_lik = w_obs * local + g_obs / num_data
        kl = -(w_lat * local + g_lat / num_data)
        return {"log_lik": log_lik, "kl": kl, "elbo": log_lik - kl}

    def _one_by_one(self, model, guide, x, num_data, kwargs):
        out = []
        for i in range(x.shape[0]):
            one = {k: (v[i : i + 1] if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == x.shape[0] else v)
                   for k, v in kwargs.items()}
            out.append(self._split(model, guide, 1, num_data, one, shared=True, device=x.device)["elbo"])
        return {"elbo": torch.cat(out)}


@contextlib.contextmanager
def _frozen(*fns):
    """The parameters of the modules behind ``fns`` (a program's bound methods, a guide that
    is a module) without gradients for the duration: the backward pass to the per-image
    weights then builds no graph through the networks."""
    modules = []
    for fn in fns:
        fn = poutine.unwrap(fn)
        owner = fn if isinstance(fn, torch.nn.Module) else getattr(fn, "__self__", None)
        if isinstance(owner, torch.nn.Module):
            modules.append(owner)
    flags = {id(p): (p, p.requires_grad) for m in modules for p in m.parameters()}
    for p, _ in flags.values():
        p.requires_grad_(False)
    try:
        with warnings.catch_warnings():  # pyro.module notes that frozen tensors stay out of its param store
            warnings.filterwarnings("ignore", message=".*was not registered in the param store")
            yield
    finally:
        for p, flag in flags.values():
            p.requires_grad_(flag)


def _takes(fn, name: str) -> bool:
    params = inspect.signature(poutine.unwrap(fn)).parameters.values()
    return any(p.name == name or p.kind is p.VAR_KEYWORD for p in params)


def _plain_traces(model, guide, kwargs):
    """One run of guide and model, without enumeration and without a gradient, its random
    draws taken from a fork (so the caller's stream is untouched)."""
    with poutine.block(), torch.no_grad(), forked_rng(0):
        guide_trace = poutine.trace(guide).get_trace(**kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**kwargs)
    return model_trace, guide_trace


def trace_depth(model_trace, guide_trace) -> int:
    """The plate depth (Pyro's ``max_plate_nesting``) that a model and guide trace show."""
    dims = [frame.dim for trace in (model_trace, guide_trace) for site in trace.nodes.values()
            if site["type"] == "sample" for frame in site["cond_indep_stack"] if frame.vectorized]
    return -min(dims) if dims else 0


def plate_depth(model, guide, **kwargs) -> int:
    """How many vectorised plates the program nests (Pyro's ``max_plate_nesting``), read
    from one run of it, as Pyro's ELBOs guess it: a particles plate goes left of them all.

    The same run checks that the guide's ``"data"`` plate sees the images the call is
    about (:func:`check_subsample`)."""
    model_trace, guide_trace = _plain_traces(model, guide, kwargs)
    check_guide(guide, guide_trace, kwargs)
    return trace_depth(model_trace, guide_trace)


def check_guide(guide, guide_trace, kwargs) -> None:
    """Refuse a guide that Pyro's ELBOs would mis-score: one that observes data (a
    ``GuideMessenger`` called from a method, which Pyro cannot see runs the model), or
    whose ``"data"`` plate draws a subsample of its own (:func:`check_subsample`)."""
    if not is_guide_messenger(guide):
        observed = [name for name, site in guide_trace.nodes.items() if site["type"] == "sample"
                    and site["is_observed"]]
        if observed:
            raise ScoringError(
                f"the guide observes {observed}: it runs the model (a GuideMessenger such as AutoNormalMessenger "
                "called from inside a method?), so Pyro's ELBOs would score the data as a guide site. Make the "
                "messenger the program's guide itself (self.guide = AutoNormalMessenger(self.model)), so that "
                "Pyro traces it as a GuideMessenger")
    check_subsample(guide_trace, kwargs)


def check_subsample(guide_trace, kwargs) -> None:
    """Refuse a guide whose ``"data"`` plate draws a subsample of its own.

    A plate made without the minibatch's indices (``pyro.plate("data", N,
    subsample_size=B)``, as an autoguide makes its plates unless given ``create_plates``)
    picks B random data points at every call: per-data-point parameters then belong to
    other images than the minibatch's, and every number is wrong without a sign."""
    site = guide_trace.nodes.get(DATA_PLATE)
    if site is None or not site_is_subsample(site) or "x" not in kwargs:
        return
    batch = kwargs["x"].shape[0]
    # a semi-supervised call: the first len(y) images are labelled, in a plate of their own
    labelled = kwargs["y"].shape[0] if "num_labelled" in kwargs and kwargs.get("y") is not None else 0
    wanted = kwargs.get("index")
    if wanted is None:
        wanted = torch.arange(batch - labelled, device=kwargs["x"].device)
    else:
        wanted = wanted[labelled:]
    value = site["value"]
    if value.shape != wanted.shape or not torch.equal(value.to(wanted.device), wanted):
        raise ScoringError(
            "the guide's 'data' plate chose its own subsample of the data set, not the minibatch's images, so "
            "parameters per data point would train on other images than their own. Give the plate the "
            "minibatch's positions: take index=None in model and guide and open pyro_vae.models.data_plate(x, "
            "num_data, index); for an autoguide, AutoNormal(model, create_plates=lambda x, num_data=None, "
            "index=None, **kw: data_plate(x, num_data, index))")


def _refuse_unguided(model_trace, guide_trace) -> None:
    for name, site in model_trace.nodes.items():
        if site["type"] == "sample" and not site["is_observed"] and not site_is_subsample(site) \
                and name not in guide_trace.nodes:
            raise ScoringError(
                f"latent site {name!r} of the model is neither sampled by the guide nor enumerated; Pyro's "
                "Trace_ELBO would draw it from the prior and report a number that bounds nothing. Sample it in "
                "the guide, or mark it infer={'enumerate': 'parallel'} and train with --estimator traceenum")
