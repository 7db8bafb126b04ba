"""The short-scoring Gaussians are the diagonal Gaussians they replace: same draws, same
log-densities, same gradients, same KL, inside Pyro's plates and particles."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

from pyro_vae.config import ModelConfig
from pyro_vae.distributions import DiagonalNormal, StandardNormal
from pyro_vae.models import build_model
from pyro_vae.models.vae import VAE
from pyro_vae.objectives import build_elbo

from helpers import random_binary


def test_standard_normal_scores_as_normal_0_1():
    prior = StandardNormal.of_size(5, like=torch.zeros((), dtype=torch.float64))
    plain = dist.Normal(torch.zeros((), dtype=torch.float64), 1.0).expand([5]).to_event(1)
    assert prior.event_shape == plain.event_shape == (5,)
    z = torch.randn(7, 3, 5, dtype=torch.float64) * 3
    assert torch.allclose(prior.log_prob(z), plain.log_prob(z), rtol=1e-12)
    expanded = prior.expand([3])  # as a plate of size 3 expands it
    assert isinstance(expanded, StandardNormal) and expanded.log_prob(z[0, :1]).shape == (3,)
    assert torch.allclose(expanded.log_prob(z[0]), plain.expand([3]).log_prob(z[0]), rtol=1e-12)


def test_diagonal_normal_draws_as_normal_and_scores_its_draw_exactly():
    loc = torch.randn(4, 6, dtype=torch.float64, requires_grad=True)
    scale = (torch.rand(4, 6, dtype=torch.float64) + 0.1).requires_grad_()
    q, plain = DiagonalNormal.of(loc, scale), dist.Normal(loc, scale).to_event(1)
    torch.manual_seed(3)
    z = q.rsample()
    torch.manual_seed(3)
    assert torch.equal(z, plain.rsample())  # the same random stream, the same values
    fast, slow = q.log_prob(z), plain.log_prob(z)
    assert fast.shape == (4,)
    assert torch.allclose(fast, slow, rtol=1e-12)
    # the same gradients: the general formula's path through z and its score term cancel
    g_fast = torch.autograd.grad(fast.sum(), (loc, scale), allow_unused=True, materialize_grads=True)
    g_slow = torch.autograd.grad(slow.sum(), (loc, scale))
    for a, b in zip(g_fast, g_slow):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
    assert torch.allclose(g_slow[0], torch.zeros_like(loc), atol=1e-12)  # d log q / d loc = 0 at its own draw
    # any other value, even an equal copy, takes the general formula
    other = z.detach().clone()
    assert torch.allclose(q.log_prob(other), plain.log_prob(other), rtol=1e-12)
    assert torch.allclose(q.log_prob(other + 1), plain.log_prob(other + 1), rtol=1e-12)


def test_the_closed_form_kl_and_particles_work_as_for_plain_normals():
    loc, scale = torch.randn(3, 4), torch.rand(3, 4) + 0.2
    prior = StandardNormal.of_size(4, like=loc).expand([3])
    expected = kl_divergence(dist.Normal(loc, scale).to_event(1), dist.Normal(0.0, 1.0).expand([3, 4]).to_event(1))
    assert torch.allclose(kl_divergence(DiagonalNormal.of(loc, scale), prior), expected)
    q = DiagonalNormal.of(loc, scale).expand([5, 3])  # vectorised particles expand the guide
    z = q.rsample()
    assert z.shape == (5, 3, 4)
    assert torch.allclose(q.log_prob(z), dist.Normal(loc, scale).to_event(1).log_prob(z), rtol=1e-5)


class PlainVAE(VAE):
    """The VAE with Pyro's general Normal for prior and guide: the formulas replaced."""

    def prior(self):
        return dist.Normal(self.prior_loc, self.prior_scale).expand([self.z_dim]).to_event(1)

    def posterior(self, loc, scale):
        return dist.Normal(loc, scale).to_event(1)


@pytest.mark.parametrize("estimator,particles", [("trace", 1), ("trace", 3), ("iwae", 4), ("meanfield", 1)])
def test_the_vae_estimates_the_same_objective_and_gradient_as_with_plain_normals(estimator, particles):
    torch.manual_seed(0)
    fast = build_model(ModelConfig(z_dim=3, hidden_dims=(16,)), (1, 28, 28))
    slow = PlainVAE(fast.encoder, fast.decoder, fast.z_dim, fast.image_shape, fast.likelihood)
    x = random_binary(10, (1, 28, 28), torch.float32)
    values, grads = [], []
    for vae in (fast, slow):
        loss_fn = build_elbo(estimator, num_particles=particles)(vae.model, vae.guide)
        pyro.set_rng_seed(1)
        loss = loss_fn(x=x, num_data=100)
        values.append(loss)
        grads.append(torch.autograd.grad(loss, list(fast.parameters())))
    assert torch.allclose(values[0], values[1], rtol=1e-5)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4)
