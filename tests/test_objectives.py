"""The objective knobs: KL weight schedule, the autoencoder and KL-only baselines."""

import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_vae.models.ae import Autoencoder
from pyro_vae.networks import MLPDecoder, MLPEncoder
from pyro_vae.objectives import kl_weight, training_program

from helpers import random_binary, tiny_vae


@pytest.mark.parametrize(
    "beta, warmup, progress, expected",
    [
        (1.0, 0, 0.01, 1.0),
        (4.0, 0, 3.0, 4.0),
        (1.0, 10, 0.5, 0.05),  # half-way through the first of ten warm-up epochs
        (1.0, 10, 5.0, 0.5),
        (2.0, 4, 1.0, 0.5),
        (2.0, 4, 4.0, 2.0),
        (2.0, 4, 9.0, 2.0),  # after the warm-up it stays at beta
        (0.5, 2, 1.0, 0.25),
    ],
)
def test_kl_weight_schedule(beta, warmup, progress, expected):
    assert kl_weight(beta, warmup, progress) == pytest.approx(expected)


def tiny_autoencoder():
    torch.manual_seed(0)
    return Autoencoder(MLPEncoder(4, 2, (5,)), MLPDecoder(4, 2, (5,)), 2, (1, 2, 2)).double()


def test_autoencoder_has_no_sampling_and_no_kl():
    ae = tiny_autoencoder()
    x = random_binary(6)
    guide_tr = poutine.trace(ae.guide).get_trace(x, kl_weight=0.0)
    loc, _ = ae.encoder(x.reshape(6, -1))
    # a point mass at loc(x): the same z every time, no noise
    assert type(guide_tr.nodes["z"]["fn"].base_dist).__name__ == "Delta"
    assert torch.equal(guide_tr.nodes["z"]["value"], loc)
    assert torch.equal(poutine.trace(ae.guide).get_trace(x, kl_weight=0.0).nodes["z"]["value"], loc)
    # the loss is exactly the reconstruction term at z = loc(x): no KL, no prior
    loss = Trace_ELBO().loss(ae.model, ae.guide, x)  # at KL weight 1: the model itself drops the KL
    log_lik = ae.likelihood(ae.decoder(loc)).log_prob(x.reshape(6, -1)).sum()
    assert loss == pytest.approx(-log_lik.item(), rel=1e-12)


def test_kl_only_objective_hides_the_observation():
    vae = tiny_vae()
    x = random_binary(5)
    model, guide = training_program(vae, "kl-only")
    tr = poutine.trace(model).get_trace(x)
    assert "x" not in tr.nodes and "z" in tr.nodes
    # the KL-only loss does not depend on the data's pixels, only on q(z|x) through x
    torch.manual_seed(1)
    a = Trace_ELBO().differentiable_loss(model, guide, x)
    a.backward()
    assert all(p.grad is None or torch.all(p.grad == 0) for p in vae.decoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in vae.encoder.parameters())


def test_unknown_objective():
    with pytest.raises(ValueError, match="unknown objective"):
        training_program(tiny_vae(), "gan")


# -- the on-device estimators: Pyro's values and gradients, no host reads ----------------

import pyro  # noqa: E402
import pyro.distributions as dist  # noqa: E402
from pyro.infer import TraceMeanField_ELBO  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from pyro_vae.objectives import OnDeviceTrace_ELBO, OnDeviceTraceMeanField_ELBO  # noqa: E402


class HostReads(TorchDispatchMode):
    """Counts the operations that copy a tensor's value to Python (``.item()``, ``bool()``)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.count += 1
        return func(*args, **(kwargs or {}))


def loss_and_grads(elbo, model, guide, params, *args, **kwargs):
    pyro.set_rng_seed(3)
    loss = elbo.differentiable_loss(model, guide, *args, **kwargs)
    return loss.detach(), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("ours, pyros", [
    (OnDeviceTrace_ELBO, Trace_ELBO),
    (OnDeviceTraceMeanField_ELBO, TraceMeanField_ELBO),
])
@pytest.mark.parametrize("particles", [dict(), dict(num_particles=3), dict(num_particles=4, vectorize_particles=True)])
@pytest.mark.parametrize("kl", [1.0, 0.5, 0.0])
def test_on_device_elbo_equals_pyros_in_value_and_gradient(ours, pyros, particles, kl):
    vae = tiny_vae()
    x = random_binary(6)
    params = list(vae.parameters())
    kwargs = dict(particles, max_plate_nesting=1)
    a, ga = loss_and_grads(ours(**kwargs), vae.model, vae.guide, params, x, num_data=20, kl_weight=kl)
    b, gb = loss_and_grads(pyros(**kwargs), vae.model, vae.guide, params, x, num_data=20, kl_weight=kl)
    assert torch.allclose(a, b, rtol=1e-13, atol=0)
    for u, v in zip(ga, gb):
        assert torch.allclose(u, v, rtol=1e-12, atol=1e-13)


def test_on_device_elbo_keeps_the_score_function_gradient_of_a_discrete_latent():
    """A guide site without rsample: the loss's value is the ELBO estimate, its gradient
    Pyro's score-function surrogate's."""
    logit = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    loc = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)

    def model():
        c = pyro.sample("c", dist.Bernoulli(torch.tensor(0.5, dtype=torch.float64)))
        pyro.sample("y", dist.Normal(loc * c, 1.0), obs=torch.tensor(1.2, dtype=torch.float64))

    def guide():
        pyro.sample("c", dist.Bernoulli(logits=logit))

    for seed in range(4):  # both values of c
        pyro.set_rng_seed(seed)
        a = OnDeviceTrace_ELBO().differentiable_loss(model, guide)
        ga = torch.autograd.grad(a, [logit, loc])
        pyro.set_rng_seed(seed)
        b = Trace_ELBO().differentiable_loss(model, guide)
        gb = torch.autograd.grad(b, [logit, loc])
        assert a.item() == pytest.approx(b.item(), rel=1e-14)
        for u, v in zip(ga, gb):
            assert u.item() == pytest.approx(v.item(), rel=1e-12, abs=1e-14)


def test_on_device_elbo_reads_nothing_back_to_the_host():
    vae = tiny_vae()
    x = random_binary(6)
    with pyro.validation_enabled(False):
        with HostReads() as reads:
            OnDeviceTrace_ELBO().differentiable_loss(vae.model, vae.guide, x, num_data=20).backward()
            OnDeviceTraceMeanField_ELBO().differentiable_loss(vae.model, vae.guide, x, num_data=20).backward()
        assert reads.count == 0
        with HostReads() as reads:  # the detector works: Pyro's own version reads every site
            Trace_ELBO().differentiable_loss(vae.model, vae.guide, x, num_data=20).backward()
        assert reads.count >= 3
