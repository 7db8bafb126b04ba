"""The importance-weighted bound as a training objective: ``--estimator iwae`` and ``iwae-dreg``.

Values against a hand-written computation, K = 1 against the ELBO, the bound's rise with K
and its limit log p(x) on models where log p(x) is exact, DReG's gradient against IWAE's
(same expectation, lower variance), every engine, and the refusals.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

from pyro_vae import ModelConfig, TrainConfig, build_model, fit
from pyro_vae.data import ImageData
from pyro_vae.models import data_plate
from pyro_vae.objectives import ESTIMATORS, ImportanceWeightError, build_elbo
from pyro_vae.steps import build_engine

from helpers import random_binary, tiny_vae
from test_objectives import HostReads

ESTIMATOR_NAMES = ["iwae", "iwae-dreg"]


def copies_of(value, copies):
    return nn.Parameter(torch.full((copies,), float(value), dtype=torch.float64))


class LinearGaussian(nn.Module):
    r"""z ~ N(0, 1), x | z ~ N(a z + b, s^2), so x ~ N(b, a^2 + s^2) exactly; the guide
    q(z|x) = N(c x + d, e^2) is not the posterior N(a (x - b) / (a^2 + s^2), s^2 / (a^2 + s^2)).

    Every parameter holds ``copies`` equal entries, image n reading entry n (``copies`` =
    the minibatch size, or 1 for any minibatch): the gradient in entry n is image n's
    alone, so one backward pass gives ``copies`` independent gradient estimates.
    """

    def __init__(self, copies=1, a=1.5, b=0.3, s=0.8, c=0.4, d=0.1, e=0.9):
        super().__init__()
        self.a, self.b, self.log_s = copies_of(a, copies), copies_of(b, copies), copies_of(math.log(s), copies)
        self.c, self.d, self.log_e = copies_of(c, copies), copies_of(d, copies), copies_of(math.log(e), copies)

    guide_parameters = ("c", "d", "log_e")

    def model(self, x, *, num_data=None):
        pyro.module("program", self)
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros_like(x), 1.0))
            pyro.sample("x", dist.Normal(self.a * z + self.b, self.log_s.exp()), obs=x)

    def guide(self, x, *, num_data=None):
        pyro.module("program", self)
        with data_plate(x, num_data):
            pyro.sample("z", dist.Normal(self.c * x + self.d, self.log_e.exp()))

    def log_px(self, x):
        return dist.Normal(self.b, (self.a ** 2 + self.log_s.exp() ** 2).sqrt()).log_prob(x)


class TwoLayer(nn.Module):
    r"""Two latent layers: z1 ~ N(0, 1), z2 | z1 ~ N(alpha z1, 1), x | z2 ~ N(beta z2 + b, s^2),
    so x ~ N(b, beta^2 (alpha^2 + 1) + s^2) exactly. The guide samples z2 first and z1 given
    it, q(z2|x) q(z1|z2) = N(c x + d, e^2) N(f z2 + g, h^2): a guide site whose parameters
    depend on another latent (the more, the larger f). Parameters in ``copies`` as in
    :class:`LinearGaussian`.
    """

    guide_parameters = ("c", "d", "log_e", "f", "g", "log_h")

    def __init__(self, copies=1, alpha=0.8, beta=1.2, b=0.3, s=0.7, c=0.5, d=0.1, e=0.8, f=0.4, g=-0.1, h=0.9):
        super().__init__()
        for name, value in dict(alpha=alpha, beta=beta, b=b, c=c, d=d, f=f, g=g).items():
            setattr(self, name, copies_of(value, copies))
        self.log_s, self.log_e, self.log_h = (copies_of(math.log(v), copies) for v in (s, e, h))

    def model(self, x, *, num_data=None):
        pyro.module("program", self)
        with data_plate(x, num_data):
            z1 = pyro.sample("z1", dist.Normal(torch.zeros_like(x), 1.0))
            z2 = pyro.sample("z2", dist.Normal(self.alpha * z1, 1.0))
            pyro.sample("x", dist.Normal(self.beta * z2 + self.b, self.log_s.exp()), obs=x)

    def guide(self, x, *, num_data=None):
        pyro.module("program", self)
        with data_plate(x, num_data):
            z2 = pyro.sample("z2", dist.Normal(self.c * x + self.d, self.log_e.exp()))
            pyro.sample("z1", dist.Normal(self.f * z2 + self.g, self.log_h.exp()))

    def log_px(self, x):
        variance = self.beta ** 2 * (self.alpha ** 2 + 1) + self.log_s.exp() ** 2
        return dist.Normal(self.b, variance.sqrt()).log_prob(x)


def observations(n, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=gen, dtype=torch.float64) * 1.5 + 0.3


def loss_of(estimator, program, x, num_particles, seed, **kwargs):
    pyro.set_rng_seed(seed)
    return build_elbo(estimator, num_particles).differentiable_loss(program.model, program.guide, x, **kwargs)


def mean_bounds(program, x, num_particles, evaluations):
    """``evaluations`` independent estimates of the per-image mean of the bound over the images ``x``."""
    with torch.no_grad():
        return torch.stack([-loss_of("iwae", program, x, num_particles, seed, num_data=len(x)) / len(x)
                            for seed in range(evaluations)])


def mean_and_stderr(samples):
    return samples.mean(), samples.std() / math.sqrt(len(samples))


# -- the value ----------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ESTIMATOR_NAMES)
@pytest.mark.parametrize("num_particles, vectorize", [(1, False), (4, True), (3, False)])
@pytest.mark.parametrize("num_data", [6, 20])
def test_value_is_the_per_image_log_mean_exp_of_hand_written_weights(estimator, num_particles, vectorize, num_data):
    vae, x = tiny_vae(), random_binary(6)
    elbo = ESTIMATORS[estimator](num_particles=num_particles, vectorize_particles=vectorize, max_plate_nesting=1)
    pyro.set_rng_seed(5)
    loss = elbo.differentiable_loss(vae.model, vae.guide, x, num_data=num_data)

    # the same draws: the guide under the same seed (the model draws nothing, z is replayed)
    pyro.set_rng_seed(5)
    if vectorize:
        with pyro.plate("particles", num_particles, dim=-2):
            z = poutine.trace(vae.guide).get_trace(x, num_data=num_data).nodes["z"]["value"]
    else:
        z = torch.stack([poutine.trace(vae.guide).get_trace(x, num_data=num_data).nodes["z"]["value"]
                         for _ in range(num_particles)])
    with torch.no_grad():
        flat = x.reshape(6, -1)
        loc, scale = vae.encoder(flat)
        logits = vae.decoder(z)
        log_lik = (flat * logits - F.softplus(logits)).sum(-1)
        log_prior = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_q = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
        log_w = log_lik + log_prior - log_q  # (K, B)
        bound = torch.logsumexp(log_w, dim=0) - math.log(num_particles)  # per image
    assert z.shape == (num_particles, 6, 2) and loss.dtype == torch.float64 and loss.dim() == 0
    assert loss.item() == pytest.approx(-(num_data / 6) * bound.sum().item(), rel=1e-12)


@pytest.mark.parametrize("program", [tiny_vae, TwoLayer], ids=["vae", "two-layer"])
def test_one_particle_is_the_elbo_in_value_and_gradient(program):
    program = program()
    x = random_binary(6) if hasattr(program, "encoder") else observations(6)
    params = list(program.parameters())
    reference = loss_of("trace", program, x, 1, seed=2, num_data=20)
    reference_grads = torch.autograd.grad(reference, params)
    for estimator in ESTIMATOR_NAMES:
        loss = loss_of(estimator, program, x, 1, seed=2, num_data=20)
        assert loss.item() == pytest.approx(reference.item(), rel=1e-13)
        if estimator == "iwae":  # (DReG at K = 1 is a different estimator: "sticking the landing")
            for g, h in zip(torch.autograd.grad(loss, params), reference_grads):
                assert torch.allclose(g, h, rtol=1e-11, atol=1e-13)


def test_dreg_has_the_value_of_iwae_bit_for_bit():
    vae, x = tiny_vae(), random_binary(6)
    for num_particles in (1, 5):
        a = loss_of("iwae", vae, x, num_particles, seed=4, num_data=20)
        b = loss_of("iwae-dreg", vae, x, num_particles, seed=4, num_data=20)
        assert torch.equal(a, b)


def test_the_bound_rises_with_k_in_expectation():
    """E[L_1] <= E[L_2] <= E[L_5] <= E[L_20] (Burda et al., Theorem 1), within standard
    errors, and strictly over the whole range: a tiny VAE with untrained networks."""
    vae, x = tiny_vae(), random_binary(100, seed=3)
    estimates = {k: mean_and_stderr(mean_bounds(vae, x, k, evaluations=20)) for k in (1, 2, 5, 20)}
    ks = sorted(estimates)
    for k, k_next in zip(ks, ks[1:]):
        (m, se), (m_next, se_next) = estimates[k], estimates[k_next]
        assert m_next - m > -3 * math.hypot(se, se_next), (k, k_next, estimates)
    (m1, se1), (m20, se20) = estimates[1], estimates[20]
    assert m20 - m1 > 5 * math.hypot(se1, se20), estimates


@pytest.mark.parametrize("program", [LinearGaussian, TwoLayer])
def test_the_bound_converges_to_the_exact_log_px(program):
    """At K = 500 the bound is log p(x) within standard errors (its bias, about
    Var(w / p(x)) / 2K, is far below them), while the ELBO (K = 1) is clearly below."""
    program = program()
    x = observations(100)
    exact = program.log_px(x).mean().item()
    gap_1, se_1 = mean_and_stderr(exact - mean_bounds(program, x, 1, evaluations=10))
    gap_k, se_k = mean_and_stderr(exact - mean_bounds(program, x, 500, evaluations=10))
    assert gap_1 > 4 * se_1 and gap_1 > 0.1
    assert abs(gap_k) < 4 * se_k, (gap_k, se_k)
    assert abs(gap_k) < 0.02 * gap_1


# -- the gradient: DReG against IWAE ---------------------------------------------------------


def per_image_gradients(estimator, program, x, num_particles, seed=1):
    """{parameter name: (copies,) per-image gradients of the bound L_K}."""
    loss = loss_of(estimator, program, x, num_particles, seed, num_data=len(x))
    grads = torch.autograd.grad(loss, list(program.parameters()))
    return {name: -g for (name, _), g in zip(program.named_parameters(), grads)}


@pytest.mark.parametrize("program, settings", [(LinearGaussian, {}), (TwoLayer, dict(c=0.2, f=1.2))])
def test_dreg_has_iwaes_gradient_in_expectation(program, settings):
    """Same draws for both (paired): the guide's gradients differ by noise of mean zero,
    within 4 standard errors per coordinate; the model's are IWAE's, draw by draw. The
    two-layer guide's q(z1|z2) leans on z2 (f = 1.2), where detaching the guide
    distributions' parameters, instead of replaying the guide at the detached draws,
    would bias the gradients of c, d and e by many standard errors."""
    copies, num_particles = 4000, 5
    program = program(copies, **settings)
    x = torch.full((copies,), 1.3, dtype=torch.float64)
    iwae = per_image_gradients("iwae", program, x, num_particles)
    dreg = per_image_gradients("iwae-dreg", program, x, num_particles)
    for name in iwae:
        if name in program.guide_parameters:
            mean, stderr = mean_and_stderr(iwae[name] - dreg[name])
            assert abs(mean) < 4 * stderr, (name, mean, stderr)
            assert not torch.allclose(iwae[name], dreg[name])  # a different estimator
        else:
            assert torch.allclose(iwae[name], dreg[name], rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("program", [LinearGaussian, TwoLayer])
def test_dreg_lowers_the_variance_of_the_guide_gradient_at_large_k(program):
    copies, num_particles = 500, 100
    program = program(copies)
    x = torch.full((copies,), 1.3, dtype=torch.float64)
    iwae = per_image_gradients("iwae", program, x, num_particles)
    dreg = per_image_gradients("iwae-dreg", program, x, num_particles)
    for name in program.guide_parameters:
        ratio = (dreg[name].var() / iwae[name].var()).item()
        assert ratio < 0.25, (name, ratio)


# -- the engines ----------------------------------------------------------------------------


def tiny_program(seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(model="vae", likelihood="bernoulli", z_dim=2, hidden_dims=(8,)), (1, 4, 4))


def tiny_images(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, 1, 4, 4), 0.4), generator=gen)


@pytest.mark.parametrize("estimator", ESTIMATOR_NAMES)
def test_every_engine_trains_with_the_bound(estimator):
    data = tiny_images(24)

    def run(engine_name):
        pyro.clear_param_store()
        program = tiny_program()
        before = {name: p.detach().clone() for name, p in program.named_parameters()}
        engine = build_engine(engine_name, program, program.model, program.guide, build_elbo(estimator, 3), 1e-2,
                              validate=False)
        pyro.set_rng_seed(3)
        with pyro.get_param_store().scope():
            losses = torch.stack([engine.step(x=data[(i % 3) * 8:(i % 3 + 1) * 8], num_data=24) for i in range(4)])
            engine.check()
        moved = {name for name, p in program.named_parameters() if not torch.equal(p, before[name])}
        return program, losses, engine, moved

    captured_program, captured_losses, captured, captured_moved = run("captured")
    module_program, module_losses, _, module_moved = run("module")
    _, svi_losses, _, svi_moved = run("svi")
    # the captured engine recorded the loss and replays it: the module engine's steps, bit for bit
    assert captured.loss_fn.eager_reason is None and len(captured.loss_fn.graphs) == 1
    assert torch.equal(captured_losses, module_losses)
    for (name, p), q in zip(captured_program.state_dict().items(), module_program.state_dict().values()):
        assert torch.equal(p, q), name
    # pyro.infer.SVI takes the same first step from the same parameters and draws
    assert svi_losses[0].item() == pytest.approx(module_losses[0].item(), rel=1e-6)
    assert torch.isfinite(svi_losses).all()
    assert captured_moved == module_moved == svi_moved == {name for name, _ in captured_program.named_parameters()}

    # a replayed step, and an eager one, read nothing back to the host
    x = data[:8]
    with pyro.validation_enabled(False), pyro.get_param_store().scope():
        with HostReads() as reads:
            captured.loss_fn(x=x, num_data=24).backward()
            build_elbo(estimator, 3).differentiable_loss(captured_program.model, captured_program.guide, x,
                                                         num_data=24).backward()
    assert reads.count == 0


# -- what the bound is not defined for ---------------------------------------------------------


@pytest.mark.parametrize("estimator", ESTIMATOR_NAMES)
def test_a_kl_weight_other_than_one_is_refused(estimator, tmp_path):
    vae, x = tiny_vae(), random_binary(6)
    for weight in (0.5, 0.0, 2.0):
        with pytest.raises(ImportanceWeightError, match="no KL weight: got kl_weight="):
            loss_of(estimator, vae, x, 3, seed=0, num_data=20, kl_weight=weight)
    # a tensor weight (a recorded step passes one) reaches the "z" sites as a scale
    with pytest.raises(ImportanceWeightError, match="site 'z' is scaled by a tensor"):
        loss_of(estimator, vae, x, 3, seed=0, num_data=20, kl_weight=torch.tensor(0.5, dtype=torch.float64))
    # and a weight applied any other way: poutine.scale around the whole program
    model, guide = (poutine.scale(fn, scale=2.0) for fn in (vae.model, vae.guide))
    with pytest.raises(ImportanceWeightError, match="site 'z' is scaled by 2 beyond its plates' N / B"):
        build_elbo(estimator, 3).differentiable_loss(model, guide, x, num_data=20)
    # through training: --beta 2 fails at the first step, with the same message
    settings = TrainConfig(epochs=1, batch_size=8, device="cpu", estimator=estimator, num_particles=2, beta=2.0)
    program = tiny_program()
    with pytest.raises(ImportanceWeightError, match="--beta 1"):
        fit(program, ImageData(tiny_images(16), None, True), tmp_path / "run", settings=settings, progress=False,
            log=lambda line: None)


def test_a_global_latent_is_refused():
    def model(x, *, num_data=None):
        shift = pyro.sample("shift", dist.Normal(torch.tensor(0.0, dtype=torch.float64), 1.0))
        with data_plate(x, num_data):
            pyro.sample("x", dist.Normal(shift, 1.0), obs=x)

    def guide(x, *, num_data=None):
        pyro.sample("shift", dist.Normal(torch.tensor(0.1, dtype=torch.float64), 1.0))

    with pytest.raises(ImportanceWeightError, match="site 'shift' is outside the 'data' plate"):
        build_elbo("iwae", 3).differentiable_loss(model, guide, observations(5), num_data=10)
