"""Training objectives: which Pyro ELBO estimator turns (model, guide) into a loss.

``trace``: :class:`pyro.infer.Trace_ELBO`, the Monte Carlo estimate
``log p(x|z) + log p(z) - log q(z|x)`` at reparameterised samples ``z ~ q(z|x)``.

``meanfield``: :class:`pyro.infer.TraceMeanField_ELBO`, the same expected
log-likelihood with ``KL(q(z|x) || p(z))`` computed in closed form (lower variance).

Both have the same expectation; ``num_particles`` > 1 averages that many samples per
image, drawn in one vectorised batch through an outer particles plate.

Both are Pyro's estimators with one change, in ``differentiable_loss`` (the method the
training step calls): the loss it returns is assembled from the traces' tensors alone.
Pyro's own version reads each site's log-density back to the host (``.item()``) to
report a float beside the surrogate, which is a device synchronisation per site and
per step on CUDA, and which a recorded graph cannot replay (pyro_vae.capture).
``loss`` and ``loss_and_grads`` (used by ``pyro.infer.SVI``) are Pyro's, unchanged.
"""

from __future__ import annotations

from pyro import poutine
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import kl_divergence

from .registry import Registry

ESTIMATORS = Registry("estimator")
OBJECTIVES = Registry("objective")


class _OnDeviceLoss:
    """``differentiable_loss`` without host reads: the mean over particles of the ELBO
    estimate, negated. Its value is the estimate and its gradient the estimator's.

    A particle returns ``(elbo, surrogate)``: ``surrogate`` is ``None`` when it equals
    ``elbo`` (every guide site reparameterised), else a tensor with the score-function
    gradient, whose value is replaced by ``elbo``'s without reading either to the host.
    """

    def differentiable_loss(self, model, guide, *args, **kwargs):
        particles = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo, surrogate = self._elbo_particle(model_trace, guide_trace)
            if surrogate is not None:
                elbo = elbo.detach() + (surrogate - surrogate.detach())
            particles.append(elbo)
        # vectorised particles arrive as one trace pair whose sums run over all of them
        total = _total(particles)
        return -total / self.num_particles if self.num_particles > 1 else -total


def _total(terms):
    """The sum of a non-empty list of tensors, without a leading ``0 +`` op."""
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def sample_sites(trace):
    """The sample sites of a trace, without the plates' subsample sites."""
    return [site for site in trace.nodes.values() if site["type"] == "sample" and type(site["fn"]).__name__ != "_Subsample"]


@ESTIMATORS.register("trace", "Trace_ELBO: Monte Carlo KL at reparameterised samples")
class OnDeviceTrace_ELBO(_OnDeviceLoss, Trace_ELBO):
    r""":class:`pyro.infer.Trace_ELBO` whose differentiable loss stays on the device.

    One particle: :math:`\log p(x, z) - \log q(z|x)` at ``z ~ q(z|x)``, each site's
    log-density scaled by its plates (``N / B`` for a minibatch).
    """

    def _elbo_particle(self, model_trace, guide_trace):
        guide_sites = sample_sites(guide_trace)
        elbo = _total([site["log_prob_sum"] for site in sample_sites(model_trace)])
        if guide_sites:
            elbo = elbo - _total([site["log_prob_sum"] for site in guide_sites])
        if all(is_identically_zero(site["score_parts"].score_function) for site in guide_sites):
            return elbo, None
        # a guide site without rsample: Pyro's surrogate carries its score-function gradient
        _, surrogate_loss = Trace_ELBO._differentiable_loss_particle(self, model_trace, guide_trace)
        return elbo, -surrogate_loss


@ESTIMATORS.register("meanfield", "TraceMeanField_ELBO: the KL in closed form where one exists")
class OnDeviceTraceMeanField_ELBO(_OnDeviceLoss, TraceMeanField_ELBO):
    r""":class:`pyro.infer.TraceMeanField_ELBO` whose differentiable loss stays on the device.

    One particle: :math:`\log p(x|z) - \mathrm{KL}(q(z|x) \,\|\, p(z))`, the KL in closed
    form where torch registers it for the pair (a Monte Carlo term otherwise).
    """

    def _elbo_particle(self, model_trace, guide_trace):
        terms = []
        for site in sample_sites(model_trace):
            if site["is_observed"]:
                terms.append(site["log_prob_sum"])
                continue
            guide_site = guide_trace.nodes[site["name"]]
            try:
                kl = kl_divergence(guide_site["fn"], site["fn"])
            except NotImplementedError:
                terms.append(site["log_prob_sum"] - guide_site["log_prob_sum"])
            else:
                terms.append(-scale_and_mask(kl, guide_site["scale"], guide_site["mask"]).sum())
        for site in sample_sites(guide_trace):
            if site["name"] not in model_trace.nodes:  # auxiliary guide variables
                terms.append(-site["log_prob_sum"])
        return _total(terms), None


MAX_PLATE_NESTING = 1  # the VAE has one plate, "data"


def build_elbo(name: str = "trace", num_particles: int = 1) -> ELBO:
    """The estimator registered as ``name``, vectorising ``num_particles`` > 1."""
    return ESTIMATORS[name](
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=MAX_PLATE_NESTING,
    )


def kl_weight(beta: float, warmup_epochs: int, progress: float) -> float:
    """Weight of the KL term after ``progress`` epochs (a float: 2.5 is half-way through epoch 3).

    Without warm-up it is ``beta`` throughout. With ``warmup_epochs = W`` it rises linearly,
    ``beta * min(1, progress / W)``, from ``beta / (W * steps_per_epoch)`` at the first step
    to ``beta`` at the end of epoch W (the annealing of Bowman et al. 2016; Sønderby et al. 2016).
    """
    if warmup_epochs <= 0:
        return float(beta)
    return float(beta) * min(1.0, progress / warmup_epochs)


@OBJECTIVES.register("elbo", "the ELBO, with the KL term weighted by --beta and the warm-up")
def elbo_objective(model, guide):
    return model, guide


@OBJECTIVES.register("kl-only", "the KL term alone: the observed sites hidden (posterior collapse, on purpose)")
def kl_only_objective(model, guide):
    return poutine.block(model, hide_fn=lambda msg: msg["type"] == "sample" and msg["is_observed"]), guide


def training_program(program, objective: str = "elbo"):
    """The (model, guide) pair that SVI optimises for ``objective`` (:data:`OBJECTIVES`).

    ``elbo`` trains the pair as it is. ``kl-only`` hides the observed sites with
    :func:`pyro.poutine.block`, so the ELBO estimator sees the KL term alone.
    """
    return OBJECTIVES[objective](program.model, program.guide)
