"""The probabilistic program: sites, distributions, shapes, the plate, input checks."""

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from pyro_vae.config import ModelConfig
from pyro_vae.models import build_model as build_vae

from helpers import random_binary


@pytest.fixture
def vae():
    return build_vae(ModelConfig(z_dim=3, hidden_dims=(16,)), (1, 28, 28))


def traces(vae, x, **kw):
    guide_tr = poutine.trace(vae.guide).get_trace(x, **kw)
    model_tr = poutine.trace(poutine.replay(vae.model, trace=guide_tr)).get_trace(x, **kw)
    guide_tr.compute_log_prob()
    model_tr.compute_log_prob()
    return model_tr, guide_tr


@pytest.mark.parametrize("shape", [(5, 1, 28, 28), (5, 784)])
def test_model_trace_sites_and_shapes(vae, shape):
    x = random_binary(5, (1, 28, 28), torch.float32).reshape(shape)
    model_tr, guide_tr = traces(vae, x)
    z, xs = model_tr.nodes["z"], model_tr.nodes["x"]
    assert not z["is_observed"] and xs["is_observed"]
    # the prior is a standard normal over z_dim, one event per image
    prior = z["fn"]
    assert isinstance(prior, dist.Independent) and prior.event_shape == (3,) and prior.batch_shape == (5,)
    assert torch.equal(prior.base_dist.loc, torch.zeros(5, 3)) and torch.equal(prior.base_dist.scale, torch.ones(5, 3))
    like = xs["fn"]
    assert isinstance(like.base_dist, dist.Bernoulli)
    assert like.event_shape == (784,) and like.batch_shape == (5,)
    assert torch.equal(xs["value"], x.reshape(5, 784))
    assert z["log_prob"].shape == (5,) and xs["log_prob"].shape == (5,)
    # both sites sit in the one "data" plate of size 5
    for site in (z, xs):
        (frame,) = site["cond_indep_stack"]
        assert frame.name == "data" and frame.size == 5 and frame.dim == -1
    params = {n for n, s in model_tr.nodes.items() if s["type"] == "param"}
    assert params and all(n.startswith("decoder$$$") for n in params)


def test_guide_trace_is_reparameterised_diagonal_normal(vae):
    x = random_binary(4, (1, 28, 28), torch.float32)
    _, guide_tr = traces(vae, x)
    q = guide_tr.nodes["z"]["fn"]
    assert isinstance(q.base_dist, dist.Normal) and q.event_shape == (3,) and q.batch_shape == (4,)
    assert q.has_rsample and bool((q.base_dist.scale > 0).all())
    loc, scale = vae.encoder(x.reshape(4, -1))
    assert torch.allclose(q.base_dist.loc, loc) and torch.allclose(q.base_dist.scale, scale)
    params = {n for n, s in guide_tr.nodes.items() if s["type"] == "param"}
    assert params and all(n.startswith("encoder$$$") for n in params)


def test_plate_knows_the_full_data_size(vae):
    x = random_binary(4, (1, 28, 28), torch.float32)
    model_tr, guide_tr = traces(vae, x, num_data=1000)
    for tr in (model_tr, guide_tr):
        (frame,) = tr.nodes["z"]["cond_indep_stack"]
        assert frame.full_size == 1000 and frame.size == 4
        assert tr.nodes["z"]["scale"] == pytest.approx(1000 / 4)
    assert model_tr.nodes["x"]["scale"] == pytest.approx(1000 / 4)


def test_generative_mode_samples_images(vae):
    tr = poutine.trace(vae.model).get_trace(batch_size=6)
    assert tr.nodes["x"]["value"].shape == (6, 784) and not tr.nodes["x"]["is_observed"]
    assert set(tr.nodes["x"]["value"].unique().tolist()) <= {0.0, 1.0}
    assert vae.decode(torch.zeros(2, 3)).shape == (2, 1, 28, 28)


def test_non_binary_data_is_a_clear_error(vae):
    x = torch.full((2, 1, 28, 28), 0.5)
    with pytest.raises(ValueError, match="not 0 or 1.*Binarize"):
        vae.model(x)
    with pytest.raises(ValueError, match="not 0 or 1"):
        vae.guide(x)


@pytest.mark.parametrize("shape", [(2, 28, 28), (2, 1, 27, 28), (2, 783), (784,)])
def test_wrong_shapes_are_a_clear_error(vae, shape):
    with pytest.raises(ValueError, match=r"expected \(batch, 1, 28, 28\) or \(batch, 784\)"):
        vae.model(torch.zeros(shape))


def test_num_data_smaller_than_batch_is_an_error(vae):
    with pytest.raises(ValueError, match="smaller than the minibatch"):
        vae.model(torch.zeros(4, 784), num_data=2)


def test_conv_networks_fit_the_same_program():
    vae = build_vae(ModelConfig(z_dim=4, hidden_dims=(32,), network="conv"), (1, 28, 28))
    x = random_binary(3, (1, 28, 28), torch.float32)
    model_tr, guide_tr = traces(vae, x)
    assert model_tr.nodes["x"]["fn"].batch_shape == (3,)
    # leading particle dimensions pass through the convolutional decoder
    assert vae.decoder(torch.zeros(7, 3, 4)).shape == (7, 3, 784)
    assert [t.shape for t in vae.encoder(torch.zeros(7, 3, 784))] == [(7, 3, 4), (7, 3, 4)]


def test_conv_needs_divisible_image_shape():
    with pytest.raises(ValueError, match="divisible by 4"):
        build_vae(ModelConfig(network="conv"), (1, 30, 30))
