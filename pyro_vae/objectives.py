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

``iwae`` and ``iwae-dreg``: the importance-weighted bound of Burda et al. (2016), per
image ``log (1/K) sum_k p(x, z_k) / q(z_k|x)`` with K = ``num_particles``, the second
with the doubly reparameterised gradient of Tucker et al. (2019) for the guide
(:class:`ImportanceWeightedELBO`, :class:`ImportanceWeightedELBO_DReG`).
"""

from __future__ import annotations

import contextlib
import math

import torch
from opt_einsum import shared_intermediates
from pyro import poutine
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import ELBO, Trace_ELBO, TraceEnum_ELBO, TraceGraph_ELBO, TraceMeanField_ELBO
from pyro.infer.traceenum_elbo import _compute_dice_elbo
from pyro.infer.util import Dice, _fulldot
from pyro.ops import packed
from pyro.ops.einsum.adjoint import require_backward
from pyro.ops.rings import MarginalRing
from pyro.infer.tracegraph_elbo import _compute_elbo as _compute_graph_elbo
from pyro.infer.util import is_validation_enabled
from pyro.poutine.trace_struct import Trace
from pyro.util import check_model_guide_match, warn_if_nan
from torch.distributions import kl_divergence

from .catalog import ESTIMATORS, OBJECTIVES

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
        # a guide site without rsample (a class drawn, not enumerated): Pyro's surrogate carries
        # its score-function gradient; Pyro reads the ELBO's value beside it (torch_item), unused here
        from pyro.infer import trace_elbo

        with _module_global(trace_elbo, "torch_item", _unread):
            _, surrogate_loss = Trace_ELBO._differentiable_loss_particle(self, model_trace, guide_trace)
        return elbo, -surrogate_loss


class OnDeviceTraceMeanField_ELBO(_OnDeviceLoss, TraceMeanField_ELBO):
    r""":class:`pyro.infer.TraceMeanField_ELBO` whose differentiable loss stays on the device.

    One particle: :math:`\log p(x|z) - \mathrm{KL}(q(z|x) \,\|\, p(z))`, the KL in closed
    form where torch registers it for the pair (a Monte Carlo term otherwise).
    """

    def _get_trace(self, model, guide, args, kwargs):
        # Trace_ELBO's traces, refused here before Pyro's mean-field check would warn about
        # the order of the sites: with one latent site there is no order to check.
        model_trace, guide_trace = Trace_ELBO._get_trace(self, model, guide, args, kwargs)
        latents = [site["name"] for site in sample_sites(guide_trace)]
        if len(latents) > 1:
            raise EstimatorNotApplicable(
                f"estimator 'meanfield' computes each latent site's KL in closed form, which is the ELBO's term only "
                f"when p and q of the site depend on no other latent; this program has latent sites {latents} "
                "(a hierarchy such as z2 -> z1 -> x breaks that): use --estimator trace, iwae or iwae-dreg")
        return model_trace, guide_trace

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


class OnDeviceTraceEnum_ELBO(TraceEnum_ELBO):
    r""":class:`pyro.infer.TraceEnum_ELBO` whose differentiable loss reads nothing back to the host.

    Each particle's ELBO is Pyro's DiCE estimate (``_compute_dice_elbo``): the sites marked
    for enumeration, in the guide (``config_enumerate``) or the model, summed over their
    values exactly, the others sampled. Pyro's own ``differentiable_loss`` adds a NaN check
    of the loss, a read of its value (the engines check for NaN themselves, before the
    optimiser moves); and Pyro's DiCE expectation (``Dice.compute_expectation``) reads one
    boolean per cost term, ``(prob > 0).all()``, to decide whether terms of probability 0
    need dropping (their cost may be infinite, and 0 * inf is NaN). Here
    :class:`DeviceDice` drops them on the device, always: ``prob`` and ``cost`` are set to
    0 where ``prob`` is 0 (``masked_fill``, which leaves every value as it is when no
    probability is 0) before Pyro's same ``tensordot``. The value is Pyro's to rounding
    (``masked_fill`` lays out the broadcast tensors anew, so the dot product may add in
    another order: 1e-13 relatively in float64, ``tests/test_m2.py``), and the step has no
    host read, so the captured engine records it (:mod:`pyro_vae.capture`) like the other
    estimators; the ``module`` and ``captured`` engines take bit-identical steps with it."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        elbos = [dice_elbo(model_trace, guide_trace)
                 for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs)]
        total = _total(elbos)
        return -total / self.num_particles if self.num_particles > 1 else -total


class DeviceDice(Dice):
    """Pyro's :class:`pyro.infer.util.Dice` whose expectation reads nothing back to the host
    (see :class:`OnDeviceTraceEnum_ELBO`). ``compute_expectation`` is Pyro 1.9's
    (Apache 2.0) with the host read ``mask.all()`` and the ``masked_select`` it guards
    (whose result has a data-dependent shape) replaced by ``masked_fill``, and the
    probability promoted to the cost's dtype where they differ (Pyro's ``tensordot`` refuses
    a float32 probability beside a cost scaled by float64 weights, as the per-image
    scores of :mod:`pyro_vae.scoring` scale them)."""

    def compute_expectation(self, costs):
        with shared_intermediates() as cache:
            ring = MarginalRing(cache=cache)
            expected_cost = 0.0
            for ordinal, cost_terms in costs.items():
                log_factors = self._get_log_factors(ordinal)
                scale = math.exp(sum(x for x in log_factors if not isinstance(x, torch.Tensor)))
                log_factors = [x for x in log_factors if isinstance(x, torch.Tensor)]
                # a query per set of dims of the cost terms, for their marginal probability
                queries = {frozenset(cost._pyro_dims): None for cost in cost_terms}
                for log_factor in log_factors:
                    key = frozenset(log_factor._pyro_dims)
                    if queries.get(key, False) is None:
                        queries[key] = log_factor
                for cost in cost_terms:
                    key = frozenset(cost._pyro_dims)
                    if queries[key] is None:
                        query = torch.zeros_like(cost)
                        query._pyro_dims = cost._pyro_dims
                        log_factors.append(query)
                        queries[key] = query
                sum_dims = set().union(*(x._pyro_dims for x in log_factors)) - ordinal
                for query in queries.values():
                    require_backward(query)
                root = ring.sumproduct(log_factors, sum_dims)
                root._pyro_backward()
                probs = {key: query._pyro_backward_result.exp() for key, query in queries.items()}
                for cost in cost_terms:
                    key = frozenset(cost._pyro_dims)
                    prob = probs[key]
                    prob._pyro_dims = queries[key]._pyro_dims
                    mask = prob > 0
                    mask._pyro_dims = prob._pyro_dims
                    cost, prob, mask = packed.broadcast_all(cost, prob, mask)
                    prob = prob.masked_fill(~mask, 0)  # (here Pyro reads mask.all() and masked_selects)
                    cost = cost.masked_fill(~mask, 0)
                    # a cost scaled by a float64 weight (pyro_vae.scoring) beside a float32 probability
                    prob = prob.to(torch.promote_types(prob.dtype, cost.dtype))
                    expected_cost = expected_cost + scale * _fulldot(prob, cost)
        return expected_cost


def dice_elbo(model_trace, guide_trace):
    """Pyro's ``_compute_dice_elbo`` of the two traces, its expectation taken by :class:`DeviceDice`."""
    from pyro.infer import traceenum_elbo

    with _module_global(traceenum_elbo, "Dice", DeviceDice):
        return _compute_dice_elbo(model_trace, guide_trace)


@contextlib.contextmanager
def _module_global(module, name: str, value):
    """``module.name`` is ``value`` for the block: Pyro's function, run with one of the names
    it looks up swapped for ours (its ``Dice``, its ``torch_item``)."""
    was = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, was)


def _unread(x):
    """``torch_item`` without the read: the tensor itself (its value is not used)."""
    return x


class OnDeviceTraceGraph_ELBO(TraceGraph_ELBO):
    r""":class:`pyro.infer.TraceGraph_ELBO` whose differentiable loss stays on the device.

    The value is minus Pyro's ELBO estimate and the gradient that of Pyro's surrogate
    loss (each non-reparameterised site's score function times its downstream cost, the
    variance reduction of Schulman et al. 2015), joined without reading either back to
    the host (Pyro's own version reads the surrogate's value)."""

    def differentiable_loss(self, model, guide, *args, **kwargs):
        losses = []
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            elbo, surrogate = _compute_graph_elbo(model_trace, guide_trace)
            losses.append(-elbo.detach() + (surrogate - surrogate.detach()))
        total = _total(losses)
        return total / self.num_particles if self.num_particles > 1 else total


class EstimatorNotApplicable(ValueError):
    """An estimator that does not apply to this program (or this KL weight)."""


class ImportanceWeightError(EstimatorNotApplicable):
    """A program, or a KL weight, for which the importance-weighted bound is not defined."""


class ImportanceWeightedELBO(ELBO):
    r"""The importance-weighted bound (Burda, Grosse & Salakhutdinov, 2016) as a training loss.

    For each image :math:`x_n` of a minibatch :math:`\mathcal B` of :math:`B` images out
    of :math:`N`, with :math:`K` = ``num_particles`` reparameterised draws
    :math:`z_{n,k} \sim q_\phi(z \mid x_n)`:

    .. math::

        \log w_{n,k} = \log p_\theta(x_n, z_{n,k}) - \log q_\phi(z_{n,k} \mid x_n), \qquad
        \mathcal L_K(x_n) = \log \frac1K \sum_{k=1}^K w_{n,k},

        \mathrm{loss} = -\frac{N}{B} \sum_{n \in \mathcal B} \mathcal L_K(x_n).

    :math:`\log p` and :math:`\log q` add up every sample site of the model's and the
    guide's traces, whatever their names (``"z"``, or ``"z1"`` and ``"z2"``; observed
    sites count in :math:`\log p`): each site's ``log_prob`` with the particle and
    ``"data"`` dims kept and without the plate's scale. The log-mean-exp runs over the
    K draws of each image, and ``N / B`` multiplies its result once, as it multiplies
    the ELBO's minibatch terms. :math:`\mathcal L_1` is the ELBO: at K = 1 the loss is
    :class:`OnDeviceTrace_ELBO`'s, in value and gradient, for the same draws; and
    :math:`\mathbb E[\mathcal L_K]` rises with K towards :math:`\log p_\theta(x_n)`.
    The K draws are vectorised by an outer particles plate when ``vectorize_particles``
    (as :func:`build_elbo` sets for K > 1), else drawn one at a time.

    The gradient is autograd's, in every parameter the IWAE estimator
    :math:`\sum_k \tilde w_{n,k} \nabla \log w_{n,k}` with the normalised weights
    :math:`\tilde w_{n,k} = w_{n,k} / \sum_j w_{n,j}` (the softmax of the log-weights).
    ``differentiable_loss`` reads nothing back to the host, so the ``module`` and
    ``captured`` engines can run it; ``loss`` and ``loss_and_grads`` serve
    :class:`pyro.infer.SVI`.

    The bound is defined here for local latents, at KL weight 1, so these raise
    :class:`ImportanceWeightError`: a sample site outside the ``"data"`` plate (a
    global latent); a latent of the model that the guide does not sample; a guide site
    without ``rsample``; a ``kl_weight`` argument other than 1 (``--beta``,
    ``--kl-warmup-epochs``: :math:`\beta` weights :math:`\log p(z) - \log q(z|x)` inside
    the ELBO's expectation, where it is minus the KL; inside the log-mean-exp it would
    weight no KL term, and the result would bound nothing); and, however it came
    about, a site whose scale is not its plates'
    ``N / B`` (a ``poutine.scale``, as the VAE's KL weight is applied, or a tensor
    scale) or a latent site under ``poutine.mask`` (the VAE's KL weight 0). A mask on
    an observed site is applied: its masked elements add nothing to :math:`\log p`.

    Compared with :class:`pyro.infer.RenyiELBO` at ``alpha=0`` (Pyro 1.9), which
    computes the same value when the minibatch is the whole data set (N = B) and every
    site is inside the ``"data"`` plate: RenyiELBO has no
    ``differentiable_loss`` (its ``loss`` and ``loss_and_grads`` return floats read from
    the device), so only the ``svi`` engine could use it. Its log-weights are the
    sites' ``log_prob``, which Pyro has already multiplied by the plate's ``N / B``, so
    per image it computes :math:`\log \frac1K \sum_k w_{n,k}^{N/B}`, not
    :math:`\frac NB \mathcal L_K(x_n)`, and its gradient weights the draws by the
    softmax of :math:`\frac NB \log w_{n,k}`, close to the single largest weight for
    :math:`N \gg B`. And it keeps only the dims of plates that enclose every site
    before its log-mean-exp: with one site outside the ``"data"`` plate, the
    log-mean-exp runs over the whole minibatch's summed log-weights. Pyro issues #2220
    (plates used for minibatches make IWAE-type objectives fail silently) and #3104
    (RenyiELBO is not suited to local-latent models like the VAE) discuss these limits.
    """

    plate = "data"  # the plate whose elements (images) each get a log-mean-exp

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """Minus ``N / B`` times the sum over the minibatch of :math:`\\mathcal L_K`, a 0-dim tensor."""
        _refuse_kl_weight(kwargs.get("kl_weight", 1))
        particles = list(self._get_traces(model, guide, args, kwargs))
        scale = particles[0][0]
        # each term (K, B): one vectorised trace, or one (1, B) trace per particle
        terms = [parts[0] if len(parts) == 1 else torch.cat(parts) for parts in zip(*(p[1] for p in particles))]
        log_w = terms[0]
        bound = torch.logsumexp(log_w, dim=0)
        if log_w.shape[0] > 1:
            bound = bound - math.log(log_w.shape[0])
        return -(self._objective(bound, *terms).sum() * scale)

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The loss as a float (read from the device)."""
        with torch.no_grad():
            loss = float(self.differentiable_loss(model, guide, *args, **kwargs))
        warn_if_nan(loss, "loss")
        return loss

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        """The loss as a float, its gradient accumulated in the parameters' ``.grad``."""
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward(retain_graph=self.retain_graph)
        loss = float(loss.detach())
        warn_if_nan(loss, "loss")
        return loss

    def _objective(self, bound, log_w):
        """Per image, the tensor whose sum times ``N / B`` is the bound: here the bound itself."""
        return bound

    def _get_trace(self, model, guide, args, kwargs):
        """``(N / B, terms)`` of one guide trace and the model replayed against it."""
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)
        if is_validation_enabled():
            check_model_guide_match(model_trace, guide_trace, self.max_plate_nesting)
        return self._terms(model, guide, args, kwargs, model_trace, guide_trace)

    def _terms(self, model, guide, args, kwargs, model_trace, guide_trace):
        scale, log_p, log_q = log_densities(model_trace, guide_trace, self.plate, self._program_depth())
        return scale, (log_p - log_q,)

    def _program_depth(self) -> int:
        # Pyro counts the vectorised particles' plate in max_plate_nesting
        return self.max_plate_nesting - (1 if self.vectorize_particles and self.num_particles > 1 else 0)


class ImportanceWeightedELBO_DReG(ImportanceWeightedELBO):
    r"""The importance-weighted bound of :class:`ImportanceWeightedELBO` (the same value,
    bit for bit, for the same draws), with the doubly reparameterised gradient
    estimator (DReG; Tucker, Lawson, Gu & Maddison, 2019) for the guide's parameters.

    With :math:`z_k = z_k(\varepsilon_k, \phi)` reparameterised and
    :math:`\tilde w_k` the normalised weights of one image, the IWAE gradient in the
    guide's parameters :math:`\phi` is

    .. math::

        \nabla_\phi \mathcal L_K = \sum_k \tilde w_k \Big(
            \frac{\partial \log w_k}{\partial z_k} \frac{d z_k}{d \phi}
            - \frac{\partial \log q_\phi(z_k \mid x)}{\partial \phi}\Big|_{z_k}\Big),

    where :math:`\partial \log w_k / \partial z_k` differentiates
    :math:`\log p_\theta(x, z) - \log q_\phi(z \mid x)` in :math:`z` with :math:`\phi`
    held fixed. The second term, the score function, is the noisy one: the
    signal-to-noise ratio of this estimator falls like :math:`1/\sqrt K` (Rainforth et
    al., 2018). Reparameterising it once more,
    :math:`\mathbb E_q[f(z)\, \partial_\phi \log q_\phi(z)] = \mathbb E_\varepsilon[\partial_z f\, dz/d\phi]`
    with :math:`f = \tilde w_k`, whose derivative in :math:`z_k` is
    :math:`(\tilde w_k - \tilde w_k^2)\, \partial \log w_k / \partial z_k`, turns the
    gradient into one with the same expectation and no score term:

    .. math::

        \nabla^{\mathrm{DReG}}_\phi \mathcal L_K = \sum_k \tilde w_k^2\,
            \frac{\partial \log w_k}{\partial z_k} \frac{d z_k}{d \phi}.

    The model's parameters :math:`\theta` keep IWAE's gradient,
    :math:`\sum_k \tilde w_k \nabla_\theta \log p_\theta(x, z_k)`. At K = 1 this is the
    "sticking the landing" estimator of Roeder, Wu & Duvenaud (2017).

    One backward pass gives both: per image, the loss's gradient is that of the surrogate

    .. math::

        S = \sum_k \bar{\tilde w}_k^2 \big(\log w_k + \log q_\phi(\bar z_k \mid x)\big)
          + \sum_k \big(\bar{\tilde w}_k - \bar{\tilde w}_k^2\big) \log p_\theta(x, \bar z_k),

    bars marking values detached from the graph. In :math:`\phi`:
    :math:`\log w_k` gives the pathwise term and the score term; the second addend,
    :math:`\log q_\phi` at the detached draw, gives exactly the score term with the
    opposite sign, so the two cancel and :math:`\tilde w_k^2` times the pathwise term
    is left; the last sum does not depend on :math:`\phi` (its :math:`z` is detached).
    In :math:`\theta`: the first sum gives :math:`\tilde w_k^2 \nabla_\theta \log p` and
    the last adds :math:`(\tilde w_k - \tilde w_k^2) \nabla_\theta \log p`, IWAE's
    gradient in all. (So model and guide must not share a parameter: it would get a
    mixture of the two.)

    The detached terms come from a second pass of the guide and the model, replayed at
    the detached draws (no new random numbers are drawn): one more forward pass of
    both networks per step, and a backward pass from it to their parameters. Evaluating
    :math:`\log q_\phi(\bar z \mid x)` by replaying the guide, rather than by detaching
    the parameters of each guide distribution, keeps the estimator exact for a guide
    whose later sites depend on earlier latents (:math:`q(z_2 \mid z_1, x)`), where
    :math:`\partial \log q / \partial z_1` also runs through the parameters of
    :math:`q(z_2 \mid z_1, x)`.
    """

    def _objective(self, bound, log_w, log_q_fixed, log_p_fixed):
        weights = torch.softmax(log_w.detach(), dim=0)
        squared = weights * weights
        surrogate = (squared * (log_w + log_q_fixed) + (weights - squared) * log_p_fixed).sum(0)
        # the value is the bound's (x - x is exactly 0), the gradient the surrogate's
        return bound.detach() + (surrogate - surrogate.detach())

    def _terms(self, model, guide, args, kwargs, model_trace, guide_trace):
        for site in sample_sites(guide_trace):
            if _is_flow(site["fn"]):
                raise EstimatorNotApplicable(
                    f"estimator 'iwae-dreg' rescores the guide's draw of {site['name']!r} at detached draws, which for "
                    "a flow (a TransformedDistribution) means inverting it: one pass of its network per latent "
                    "dimension, with a host read per dimension on CUDA; use --estimator iwae")
        scale, (log_w,) = super()._terms(model, guide, args, kwargs, model_trace, guide_trace)
        fixed_guide = poutine.trace(poutine.replay(guide, trace=_detached(guide_trace))).get_trace(*args, **kwargs)
        fixed_model = poutine.trace(poutine.replay(model, trace=fixed_guide)).get_trace(*args, **kwargs)
        _, log_p_fixed, log_q_fixed = log_densities(fixed_model, fixed_guide, self.plate, self._program_depth())
        return scale, (log_w, log_q_fixed, log_p_fixed)


def _is_flow(fn) -> bool:
    while isinstance(fn, torch.distributions.Independent):
        fn = fn.base_dist
    return isinstance(fn, torch.distributions.TransformedDistribution)


def _refuse_kl_weight(weight) -> None:
    if not isinstance(weight, torch.Tensor) and weight != 1:
        raise ImportanceWeightError(
            f"the importance-weighted bound has no KL weight: got kl_weight={weight}; train it with --beta 1 "
            "and no --kl-warmup-epochs (a KL weight scales log p(z) - log q(z|x) inside the ELBO's expectation; "
            "inside the bound's log-mean-exp it has no such meaning)")


def _detached(trace: Trace) -> Trace:
    """A trace of ``trace``'s sample sites, their values cut from the graph, to replay against."""
    frozen = Trace()
    for name, site in trace.nodes.items():
        if site["type"] == "sample":
            value = site["value"]
            if isinstance(value, torch.Tensor):
                value = value.detach()  # kept by a recording (pyro_vae.capture records detach as it is)
            frozen.add_node(name, **{**site, "value": value})
    return frozen


def log_densities(model_trace: Trace, guide_trace: Trace, plate: str, depth: int, require_rsample: bool = True):
    """``(N / B, log p, log q)``: the plate's scale and, per draw and image, ``(K, B)``,
    the model's and the guide's log-densities summed over their sample sites, unscaled.

    ``depth`` is the program's plate depth; the draws lie left of it (a particles plate
    at dim ``-1 - depth``, or none). Each site's log-density is Pyro's (the trace's
    ``unscaled_log_prob`` where Pyro has computed it), its mask applied, summed over the
    plates nested in ``plate``. Checks, in Python only (no tensor is read), that the
    bound is defined for the sites (see :class:`ImportanceWeightedELBO`); guide sites
    need ``rsample`` when ``require_rsample`` (a gradient flows through them). Without
    it (evaluation), a latent masked alike in model and guide counts its kept elements."""
    guide_sites = sample_sites(guide_trace)
    guided = {site["name"] for site in guide_sites}
    for site in sample_sites(model_trace):
        if not site["is_observed"] and site["name"] not in guided:
            raise ImportanceWeightError(
                f"latent site {site['name']!r} of the model is not sampled by the guide (enumerated in the model?); "
                "the importance weights p(x, z) / q(z|x) need a proposal q for every latent")
    for site in guide_sites:
        if require_rsample and not site["fn"].has_rsample:
            raise ImportanceWeightError(
                f"guide site {site['name']!r} ({type(site['fn']).__name__}) cannot be reparameterised; the "
                "importance-weighted estimators here need rsample at every guide site")
    agreeing = _agreeing_masks(model_trace, guide_trace) if not require_rsample else set()
    model_terms = [_per_image_log_prob(site, plate, "model", depth, agreeing) for site in sample_sites(model_trace)]
    guide_terms = [_per_image_log_prob(site, plate, "guide", depth, agreeing) for site in guide_sites]
    if not model_terms:
        raise ImportanceWeightError("the importance-weighted bound needs sample sites in the model")
    scales = {scale for _, scale in model_terms + guide_terms}
    if len(scales) != 1:  # one plate, one minibatch: every site has the same N / B
        raise ImportanceWeightError(f"the sites' {plate!r} plates differ in N / B: {sorted(scales)}")
    log_p = _total([t for t, _ in model_terms])
    # a guide that samples nothing (a model without latents, checked above): q is a point, every
    # weight is p(x) itself, and the bound is log p(x) exactly
    log_q = _total([t for t, _ in guide_terms]) if guide_terms else torch.zeros_like(log_p)
    log_p, log_q = torch.broadcast_tensors(log_p, log_q)
    images = log_p.shape[-1]
    return scales.pop(), log_p.reshape(-1, images), log_q.reshape(-1, images)


def _agreeing_masks(model_trace: Trace, guide_trace: Trace) -> set[str]:
    """Latent sites masked alike in model and guide, with some elements kept (Pyro's
    ``obs_mask`` makes such a site of the missing values): their masked elements do not
    exist for either, and the weights count the rest. (Reads the masks' values: for
    evaluation, not for a recorded training step.)"""
    names = set()
    for name, site in model_trace.nodes.items():
        other = guide_trace.nodes.get(name)
        if site["type"] != "sample" or site["is_observed"] or other is None:
            continue
        a, b = site["mask"], other["mask"]
        if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
            a, b = torch.broadcast_tensors(a, b)
            if torch.equal(a, b) and bool(a.any()):
                names.add(name)
    return names


def _per_image_log_prob(site, plate: str, program: str, depth: int, agreeing: set = frozenset()):
    """``(log_prob summed to the plate's dim, N / B)`` of a site inside ``plate``: its
    batch dims ``(draws..., B)``, the plates nested in ``plate`` summed out."""
    name = site["name"]
    frame = next((f for f in site["cond_indep_stack"] if f.name == plate), None)
    if frame is None or frame.dim is None:
        raise ImportanceWeightError(
            f"{program} site {name!r} is outside the {plate!r} plate (a global latent?): the images are then not "
            f"independent given the program, so log p(x) and the importance-weighted bound are not defined per "
            f"image; they are defined for programs whose sites all lie inside the {plate!r} plate")
    scale = site["scale"]
    plates = 1.0
    for f in site["cond_indep_stack"]:
        plates = plates * (f.full_size or f.size) / f.size
    if isinstance(scale, torch.Tensor) or not math.isclose(scale, plates, rel_tol=1e-9):
        weight = "a tensor" if isinstance(scale, torch.Tensor) else f"{scale / plates:.6g}"
        raise ImportanceWeightError(
            f"{program} site {name!r} is scaled by {weight} beyond its plates' N / B (a KL weight other than 1, or "
            "poutine.scale); log p(x) and the importance-weighted bound are defined at weight 1 only (train the "
            "bound with --beta 1 and no --kl-warmup-epochs)")
    log_prob = site.get("unscaled_log_prob")
    if log_prob is None:
        log_prob = site["fn"].log_prob(site["value"], *site["args"], **site["kwargs"])
    mask = site["mask"]
    if mask is not None:
        if not site["is_observed"] and name not in agreeing:
            raise ImportanceWeightError(
                f"latent {program} site {name!r} is masked (poutine.mask), its log-density dropped: a KL weight "
                "of 0, or a program without a KL term such as the autoencoder (--model ae); the "
                "importance-weighted bound needs every latent's log-density (and --beta 1, no --kl-warmup-epochs)")
        log_prob = scale_and_mask(log_prob, 1.0, mask)
    # the image's dim last, and the program's other plate dims (plates nested in the data
    # plate, or broadcast room for them) summed: their elements belong to the image
    if log_prob.dim() < depth:
        log_prob = log_prob.reshape((1,) * (depth - log_prob.dim()) + log_prob.shape)
    if frame.dim != -1:
        log_prob = log_prob.movedim(frame.dim, -1)
    if depth > 1:
        log_prob = log_prob.sum(list(range(-depth, -1)))
    return log_prob, (frame.full_size or frame.size) / frame.size


MAX_PLATE_NESTING = 1  # the VAE has one plate, "data": the default depth


def build_elbo(name: str = "trace", num_particles: int = 1, max_plate_nesting: int = MAX_PLATE_NESTING) -> ELBO:
    """The estimator registered as ``name``, vectorising ``num_particles`` > 1, for a
    program that nests ``max_plate_nesting`` plates (:func:`pyro_vae.scoring.plate_depth`)."""
    return ESTIMATORS[name](
        num_particles=num_particles,
        vectorize_particles=num_particles > 1,
        max_plate_nesting=max_plate_nesting,
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


def elbo_objective(model, guide):
    return model, guide


def kl_only_objective(model, guide):
    return poutine.block(model, hide_fn=lambda msg: msg["type"] == "sample" and msg["is_observed"]), guide


def training_program(program, objective: str = "elbo"):
    """The (model, guide) pair that SVI optimises for ``objective`` (:data:`OBJECTIVES`).

    ``elbo`` trains the pair as it is. ``kl-only`` hides the observed sites with
    :func:`pyro.poutine.block`, so the ELBO estimator sees the KL term alone.
    """
    return OBJECTIVES[objective](program.model, program.guide)
