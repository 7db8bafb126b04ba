"""The objective knobs: KL weight schedule, the autoencoder and KL-only baselines."""

import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from pyro_vae.baselines import Autoencoder
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
    loss = Trace_ELBO().loss(ae.model, ae.guide, x, kl_weight=0.0)
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
