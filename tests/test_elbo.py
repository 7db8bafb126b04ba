"""The ELBO that training optimises, checked against hand-derived values."""

import math

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.distributions.kl import kl_divergence
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO

from pyro_vae.evaluate import _traces
from pyro_vae.objectives import build_elbo

from helpers import random_binary, tiny_vae

LOG_2PI = math.log(2 * math.pi)


def hand_elbo(vae, x, z):
    """Per-image ELBO integrand log p(x|z) + log p(z) - log q(z|x), written out in torch."""
    p = dict(vae.named_parameters())
    x = x.reshape(x.shape[0], -1)
    h = F.softplus(x @ p["encoder.body.0.0.weight"].T + p["encoder.body.0.0.bias"])
    loc = h @ p["encoder.head.loc.weight"].T + p["encoder.head.loc.bias"]
    scale = F.softplus(h @ p["encoder.head.raw_scale.weight"].T + p["encoder.head.raw_scale.bias"])
    g = F.softplus(z @ p["decoder.net.0.weight"].T + p["decoder.net.0.bias"])
    logits = g @ p["decoder.net.2.weight"].T + p["decoder.net.2.bias"]
    log_lik = (x * logits - F.softplus(logits)).sum(-1)
    log_prior = (-0.5 * z**2 - 0.5 * LOG_2PI).sum(-1)
    log_q = (-0.5 * ((z - loc) / scale) ** 2 - scale.log() - 0.5 * LOG_2PI).sum(-1)
    return log_lik + log_prior - log_q


# Pinning z in the model too makes Pyro warn that z is "observed" there: intended here.
pytestmark = pytest.mark.filterwarnings("ignore:Found non-auxiliary vars in guide")


def fix_z(vae, z):
    """Model and guide with the latent site pinned to ``z`` (both score it at that value)."""
    return poutine.condition(vae.model, data={"z": z}), poutine.condition(vae.guide, data={"z": z})


@pytest.mark.parametrize("num_data", [None, 50])
def test_trace_elbo_at_fixed_z_equals_hand_computation(num_data):
    vae = tiny_vae(image_shape=(1, 2, 3), z_dim=2, hidden=(4,))
    x = random_binary(5, (1, 2, 3))
    z = torch.randn(5, 2, dtype=torch.float64)
    model, guide = fix_z(vae, z)
    loss = Trace_ELBO().loss(model, guide, x, num_data=num_data)
    scale = (num_data or 5) / 5
    expected = -scale * hand_elbo(vae, x, z).sum()
    assert loss == pytest.approx(expected.item(), rel=1e-12, abs=1e-10)
    # the differentiable loss that training steps on is the same number
    dloss = Trace_ELBO().differentiable_loss(model, guide, x, num_data=num_data)
    assert dloss.item() == pytest.approx(expected.item(), rel=1e-12, abs=1e-10)


def test_minibatch_loss_is_scaled_by_data_size_over_batch_size():
    vae = tiny_vae()
    x = random_binary(4)
    pyro.set_rng_seed(3)
    full = Trace_ELBO().loss(vae.model, vae.guide, x)
    pyro.set_rng_seed(3)
    scaled = Trace_ELBO().loss(vae.model, vae.guide, x, num_data=1000)
    assert scaled == pytest.approx(full * 1000 / 4, rel=1e-12)


def test_monte_carlo_kl_matches_analytic_kl():
    vae = tiny_vae(z_dim=3)
    x = random_binary(3)
    m = 20000
    with torch.no_grad(), pyro.plate("particles", m, dim=-2):
        model_tr, guide_tr = _traces(vae.model, vae.guide, x)
    q, p = guide_tr.nodes["z"]["fn"], model_tr.nodes["z"]["fn"]
    z = guide_tr.nodes["z"]["value"]
    samples = q.log_prob(z) - p.log_prob(z)  # (m, 3): one KL sample per particle and image
    mc_mean, mc_se = samples.mean(0), samples.std(0) / math.sqrt(m)
    # the analytic KL of one image's q(z|x) against N(0, I)
    loc, scale = vae.encoder(x.reshape(3, -1))
    analytic = (0.5 * (loc**2 + scale**2 - 1) - scale.log()).sum(-1)
    assert torch.allclose(kl_divergence(q, p)[0], analytic, rtol=1e-12)
    assert torch.all((mc_mean - analytic).abs() < 4 * mc_se), (mc_mean, analytic, mc_se)


def _losses(elbo, vae, x, n, **kw):
    return torch.tensor([elbo.loss(vae.model, vae.guide, x, **kw) for _ in range(n)])


def test_trace_and_meanfield_elbo_agree_in_expectation():
    vae = tiny_vae(z_dim=2)
    x = random_binary(6)
    # 40 independent estimates, each the average of 100 vectorised particles
    a = _losses(build_elbo("trace", num_particles=100), vae, x, 40)
    b = _losses(build_elbo("meanfield", num_particles=100), vae, x, 40)
    se = math.sqrt(a.var() / len(a) + b.var() / len(b))
    assert abs(a.mean() - b.mean()) < 4 * se
    # the analytic KL removes variance: meanfield's spread is smaller
    assert b.std() < a.std()
    # a single-particle estimator has the same mean, with 100 times the variance
    c = _losses(build_elbo("trace"), vae, x, 200)
    se_c = math.sqrt(a.var() / len(a) + c.var() / len(c))
    assert abs(a.mean() - c.mean()) < 4 * se_c


@pytest.mark.slow
def test_per_image_elbo_does_not_depend_on_batch_size():
    """loss / N from random minibatches of any size estimates the same per-image ELBO."""
    vae = tiny_vae(z_dim=2)
    data = random_binary(40)
    n = data.shape[0]
    gen = torch.Generator().manual_seed(5)
    estimates = {}
    for batch in (4, 40):
        values = []
        for _ in range(300):
            idx = torch.randperm(n, generator=gen)[:batch]
            values.append(TraceMeanField_ELBO().loss(vae.model, vae.guide, data[idx], num_data=n) / n)
        estimates[batch] = torch.tensor(values)
    small, full = estimates[4], estimates[40]
    se = math.sqrt(small.var() / len(small) + full.var() / len(full))
    assert abs(small.mean() - full.mean()) < 4 * se
    assert small.std() > full.std()  # subsampling adds variance, not bias


def test_kl_weight_scales_only_the_kl_part():
    """With weight w the objective is E[log p(x|z)] - w * KL; w = 1 is the ELBO."""
    vae = tiny_vae(z_dim=2)
    x = random_binary(5)
    z = torch.randn(5, 2, dtype=torch.float64)
    model, guide = fix_z(vae, z)
    elbo = Trace_ELBO()
    at = {w: -elbo.loss(model, guide, x, kl_weight=w) for w in (0.0, 0.5, 1.0, 4.0)}
    log_lik = at[0.0]
    log_ratio = at[1.0] - log_lik  # log p(z) - log q(z|x) at the fixed z
    for w in (0.5, 4.0):
        assert at[w] == pytest.approx(log_lik + w * log_ratio, rel=1e-12)
    assert at[1.0] == pytest.approx(hand_elbo(vae, x, z).sum().item(), rel=1e-12)


def test_guide_sites_the_model_lacks_count_as_auxiliary_not_as_errors():
    """An autoguide-style auxiliary site ("w", in the guide only) adds its log q to the KL term."""
    import pyro.distributions as dist

    from pyro_vae.evaluate import elbo_terms
    from pyro_vae.rng import forked_rng

    loc, scale = torch.tensor([0.3, -1.0], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(()), 1.0))
            pyro.sample("x", dist.Normal(z, 1.0), obs=x)

    def guide(x):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("w", dist.Normal(torch.zeros((), dtype=torch.float64), 1.0), infer={"is_auxiliary": True})
            pyro.sample("z", dist.Normal(loc, scale))

    x = torch.tensor([0.1, 2.0], dtype=torch.float64)
    terms = elbo_terms(model, guide, x, seed=3)
    with forked_rng(3):  # the same draws, by hand
        w = torch.randn(2, dtype=torch.float64)
        z = loc + scale * torch.randn(2, dtype=torch.float64)
    kl_z = -torch.log(scale) + 0.5 * (scale ** 2 + loc ** 2 - 1)
    log_q_w = -0.5 * w ** 2 - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(terms["kl"], kl_z + log_q_w, rtol=1e-10)
    log_lik = -0.5 * (x - z) ** 2 - 0.5 * math.log(2 * math.pi)
    assert torch.allclose(terms["log_lik"], log_lik, rtol=1e-10)
