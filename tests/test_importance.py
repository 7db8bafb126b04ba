"""The importance-sampled log p(x) on models where log p(x) is known exactly."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae.evaluate import _recorded_log_weights, elbo_terms, log_px_importance

from helpers import random_binary, tiny_vae


def exact_log_px_1d(vae, x, grid=20001, bound=12.0):
    """log p(x) = log of the integral of N(z; 0, 1) p(x|z) over z (z_dim = 1), by the trapezoid rule."""
    z = torch.linspace(-bound, bound, grid, dtype=torch.float64).unsqueeze(-1)  # (G, 1)
    with torch.no_grad():
        logits = vae.decoder(z)  # (G, D)
        flat = x.reshape(x.shape[0], -1)
        log_lik = dist.Bernoulli(logits=logits.unsqueeze(1)).log_prob(flat).sum(-1)  # (G, N)
    log_joint = log_lik + dist.Normal(0.0, 1.0).log_prob(z)  # (G, N)
    dz = z[1, 0] - z[0, 0]
    weights = torch.full((grid, 1), math.log(dz), dtype=torch.float64)
    weights[0] = weights[-1] = math.log(dz / 2)
    return torch.logsumexp(log_joint + weights, dim=0)


def repeated(x, r):
    """r independent copies of each image, so one call gives r independent estimates."""
    return x.repeat(r, *([1] * (x.dim() - 1)))


@pytest.mark.slow
def test_importance_sampling_converges_to_exact_log_px():
    vae = tiny_vae(image_shape=(1, 3, 3), z_dim=1, hidden=(6,), seed=2)
    x = random_binary(3, (1, 3, 3))
    exact = exact_log_px_1d(vae, x)
    r = 200
    means, ses = {}, {}
    for k in (1, 10, 100, 1000):
        est = log_px_importance(vae.model, vae.guide, repeated(x, r), num_samples=k, batch_size=300, seed=k)
        est = est.reshape(r, 3)
        means[k], ses[k] = est.mean(0), est.std(0) / math.sqrt(r)
    elbo = elbo_terms(vae.model, vae.guide, repeated(x, r), seed=7)["elbo"].reshape(r, 3)
    elbo_mean, elbo_se = elbo.mean(0), elbo.std(0) / math.sqrt(r)
    # the ELBO is a lower bound, and an untrained guide leaves a clear gap
    assert torch.all(elbo_mean + 4 * elbo_se < exact)
    # K = 1 is the ELBO with the KL sampled: same expectation
    assert torch.all((means[1] - elbo_mean).abs() < 4 * torch.sqrt(ses[1] ** 2 + elbo_se**2))
    # more samples: a tighter bound, never below the ELBO, and never above log p(x) in expectation
    for small, large in ((1, 10), (10, 100), (100, 1000)):
        assert torch.all(means[large] - means[small] > -4 * torch.sqrt(ses[large] ** 2 + ses[small] ** 2))
        assert torch.all(exact - means[large] < exact - means[small])
    assert torch.all(means[10] > elbo_mean)
    assert torch.all(means[1000] < exact + 4 * ses[1000])
    # at K = 1000 the bias is already below 0.05 nats here
    assert torch.all((exact - means[1000]).abs() < 0.05 + 4 * ses[1000])


class LinearGaussian:
    """z ~ N(0, I_2), x | z ~ N(W z + b, s^2 I_3): p(x) = N(b, W W^T + s^2 I) is exact,
    and so is the posterior, used here as the guide."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.W = torch.randn(3, 2, generator=g, dtype=torch.float64)
        self.b = torch.randn(3, generator=g, dtype=torch.float64)
        self.s = 0.7
        prec = torch.eye(2, dtype=torch.float64) + self.W.T @ self.W / self.s**2
        self.post_cov = torch.linalg.inv(prec)

    def model(self, x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=torch.float64), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.s).to_event(1), obs=x)

    def guide(self, x):
        loc = (x - self.b) @ self.W @ self.post_cov.T / self.s**2
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, covariance_matrix=self.post_cov))

    def log_px(self, x):
        cov = self.W @ self.W.T + self.s**2 * torch.eye(3, dtype=torch.float64)
        return dist.MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)


def test_exact_posterior_makes_every_bound_tight():
    lg = LinearGaussian()
    x = torch.randn(5, 3, dtype=torch.float64)
    exact = lg.log_px(x)
    for k in (1, 7, 50):
        est = log_px_importance(lg.model, lg.guide, x, num_samples=k, batch_size=5)
        assert torch.allclose(est, exact, rtol=0, atol=1e-9)
    # the ELBO is tight too: here KL(MultivariateNormal || Normal) has no closed form in
    # Pyro, so elbo_terms uses log q - log p at the draw, and every draw gives log p(x)
    terms = elbo_terms(lg.model, lg.guide, x)
    assert torch.allclose(terms["elbo"], exact, rtol=0, atol=1e-9)


def test_chunking_does_not_change_the_estimate():
    """Chunks of K that draw a multiple of 16 normals (the block of torch's CPU generator)
    see the very same draws as one chunk: the same values, to float64 rounding."""
    vae = tiny_vae(z_dim=2)
    x = random_binary(6)
    whole = log_px_importance(vae.model, vae.guide, x, num_samples=64, batch_size=6, max_elements=10_000, seed=1)
    for chunk in (16, 8):  # 4 and 8 chunks of 6 images x chunk samples x 2 latents
        chunked = log_px_importance(vae.model, vae.guide, x, num_samples=64, batch_size=6,
                                    max_elements=6 * chunk, seed=1)
        assert torch.allclose(chunked, whole, rtol=1e-13, atol=0)
    other_seed = log_px_importance(vae.model, vae.guide, x, num_samples=64, batch_size=6, seed=2)
    assert not torch.allclose(other_seed, whole, rtol=1e-6, atol=0)  # (the comparison above is not vacuous)


@pytest.mark.slow
def test_other_batches_and_chunks_draw_other_noise_for_the_same_estimate():
    """Other image batches, or chunks that split the generator's blocks, give each image
    other draws: another estimate of the same expectation, within standard errors."""
    vae = tiny_vae(z_dim=2)
    x = random_binary(6)
    r = 50  # independent estimates of each image, from its copies
    whole = log_px_importance(vae.model, vae.guide, repeated(x, r), num_samples=64, batch_size=6 * r,
                              max_elements=10**6, seed=1).reshape(r, 6)
    # batches of 50 images, 10-sample chunks (1,000 normals); batches of all 300, 7-sample
    # chunks (4,200 normals): neither a multiple of 16
    for batch_size, max_elements in ((50, 500), (6 * r, 6 * r * 7)):
        other = log_px_importance(vae.model, vae.guide, repeated(x, r), num_samples=64, batch_size=batch_size,
                                  max_elements=max_elements, seed=1).reshape(r, 6)
        assert not torch.allclose(other, whole, rtol=1e-6, atol=0)  # other noise indeed
        se = torch.sqrt((whole.var(0) + other.var(0)) / r)
        assert ((other.mean(0) - whole.mean(0)).abs() < 4 * se).all(), (other.mean(0) - whole.mean(0), se)


def test_rejects_zero_samples():
    vae = tiny_vae()
    with pytest.raises(ValueError, match="at least 1"):
        log_px_importance(vae.model, vae.guide, random_binary(2), num_samples=0)


def test_the_recorded_scoring_is_the_traced_one_value_for_value():
    # model and guide of one module: chunks after a batch's first are replayed from a
    # recording; plain functions are traced at every chunk. Same draws, same values.
    vae = tiny_vae(z_dim=4)
    x = random_binary(12)
    recorded = log_px_importance(vae.model, vae.guide, x, num_samples=96, batch_size=5, max_elements=80, seed=2)
    traced = log_px_importance(lambda *a, **k: vae.model(*a, **k), lambda *a, **k: vae.guide(*a, **k), x,
                               num_samples=96, batch_size=5, max_elements=80, seed=2)
    assert torch.allclose(recorded, traced, rtol=1e-6, atol=1e-6)
    score = _recorded_log_weights(vae.model, vae.guide, depth=1)
    with torch.no_grad():
        for first in (True, False, False):
            score(x=x[:5], num_samples=16, first=first)
    assert score.recording.eager_reason is None and len(score.recording.graphs) == 1


class _ValueReadingVAE(type(tiny_vae())):
    """A guide that reads a value (a branch on the data): it cannot be recorded."""

    def guide(self, x=None, **kwargs):
        if float(x.sum()) < 0:
            raise AssertionError("binary data")
        return super().guide(x, **kwargs)


def test_a_program_that_cannot_be_recorded_is_scored_eagerly_and_silently(recwarn):
    vae = tiny_vae(z_dim=4)
    other = _ValueReadingVAE(vae.encoder, vae.decoder, vae.z_dim, vae.image_shape, vae.likelihood)
    x = random_binary(6)
    a = log_px_importance(vae.model, vae.guide, x, num_samples=48, batch_size=3, max_elements=30, seed=0)
    b = log_px_importance(other.model, other.guide, x, num_samples=48, batch_size=3, max_elements=30, seed=0)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    assert not [w for w in recwarn if "recorded" in str(w.message)]


class WideProposal(LinearGaussian):
    """The linear-Gaussian model with a proposal 1.5 times wider than the posterior, and off
    centre: weights that vary but are bounded, where the delta method holds."""

    def guide(self, x):
        loc = (x - self.b) @ self.W @ self.post_cov.T / self.s**2 + 0.3
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.MultivariateNormal(loc, covariance_matrix=1.5 * self.post_cov))


def test_the_monte_carlo_variance_beside_each_estimate_is_its_spread_over_draws():
    """The delta-method variance reported beside each image's estimate matches the variance
    of the estimate over independent draws (400 copies of each image, one draw set each)."""
    lg = WideProposal()
    x = torch.randn(3, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    r = 400
    est, var = log_px_importance(lg.model, lg.guide, repeated(x, r), num_samples=50, batch_size=300, seed=1,
                                 mc_variance=True)
    est, var = est.reshape(r, 3), var.reshape(r, 3)
    empirical = est.var(0)
    # the sample variance of r draws has a relative standard error of sqrt(2 / (r - 1)), 0.07 here
    ratio = var.mean(0) / empirical
    assert torch.all((ratio - 1).abs() < 4 * math.sqrt(2 / (r - 1))), ratio


def test_progress_moves_with_every_chunk_of_samples_and_adds_up_to_the_images():
    """A live bar: each chunk of K reports its share of the batch, so a batch whose K = 5000
    takes a minute moves the bar every few seconds; the shares add up to the images."""
    vae = tiny_vae(z_dim=2)
    x = random_binary(12)
    shown = []
    log_px_importance(vae.model, vae.guide, x, num_samples=64, batch_size=6, max_elements=6 * 16, seed=1,
                      progress=shown.append)
    assert shown == [6 * 16 / 64] * 8  # two batches of four chunks each
