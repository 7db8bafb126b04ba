"""Burda et al.'s setup: the two-layer VAE, the output bias from the data, the learning-rate
schedule, and the active units of every latent layer.

(The IWAE objective itself is tested in test_iwae.py; ``vae2`` also passes every test of
test_contract.py, which runs over the registry.)
"""

import math
import warnings

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from torch import nn

from pyro_vae import ModelConfig, TrainConfig, build_model, fit
from pyro_vae.cli import main
from pyro_vae.evaluate import active_units, elbo_terms, latent_activity
from pyro_vae.models.vae2 import TwoLayerVAE
from pyro_vae.networks import MLPDecoder, MLPEncoder, Softplus
from pyro_vae.objectives import build_elbo, sample_sites
from pyro_vae.steps import ENGINES, build_engine, learning_rate

from helpers import random_binary, tiny_vae

SHAPE = (1, 4, 4)


def two_layer(seed=0, **settings):
    torch.manual_seed(seed)
    config = ModelConfig(model="vae2", z_dim=6, hidden_dims=(10,), z2_dim=3, z2_hidden_dims=(5,), **settings)
    return build_model(config, SHAPE).double()


def grey(n, seed=2):
    """Grey images with every pixel's mean inside (0, 1)."""
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.8 + 0.1


# -- the two-layer model ------------------------------------------------------------------


def test_two_layer_sites_are_named_after_the_symbols_in_generative_order():
    program = two_layer()
    x = random_binary(5, SHAPE)
    guide_trace = poutine.trace(program.guide).get_trace(x, num_data=5)
    model_trace = poutine.trace(poutine.replay(program.model, trace=guide_trace)).get_trace(x, num_data=5)
    assert [s["name"] for s in sample_sites(guide_trace)] == ["z1", "z2"]  # x -> z1 -> z2
    assert [s["name"] for s in sample_sites(model_trace)] == ["z2", "z1", "x"]  # z2 -> z1 -> x
    assert guide_trace.nodes["z1"]["value"].shape == (5, 6) and guide_trace.nodes["z2"]["value"].shape == (5, 3)
    # p(z1|z2) is read at the z2 the guide drew from z1
    loc, scale = program.upper_decoder(guide_trace.nodes["z2"]["value"])
    assert torch.equal(model_trace.nodes["z1"]["fn"].base_dist.loc, loc)


def test_burda_architectures_have_the_papers_layer_sizes():
    def count(*layers):  # weights and biases of fully connected layers n_in -> n_out
        return sum(n_in * n_out + n_out for n_in, n_out in layers)

    one = build_model(ModelConfig(z_dim=50, hidden_dims=(200, 200), activation="tanh"), (1, 28, 28))
    gaussian = lambda n_in, n: [(n_in, n), (n_in, n)]  # noqa: E731  (loc and scale heads)
    assert sum(p.numel() for p in one.parameters()) == (
        count((784, 200), (200, 200), *gaussian(200, 50))  # q(z|x): 784-200-200-50
        + count((50, 200), (200, 200), (200, 784)))  # p(x|z): 50-200-200-784
    two = build_model(ModelConfig(model="vae2", z_dim=100, hidden_dims=(200, 200), z2_dim=50, z2_hidden_dims=(100, 100),
                                  activation="tanh"), (1, 28, 28))
    assert sum(p.numel() for p in two.parameters()) == (
        count((784, 200), (200, 200), *gaussian(200, 100))  # q(z1|x): 784-200-200-100
        + count((100, 100), (100, 100), *gaussian(100, 50))  # q(z2|z1): 100-100-100-50
        + count((50, 100), (100, 100), *gaussian(100, 100))  # p(z1|z2): 50-100-100-100
        + count((100, 200), (200, 200), (200, 784)))  # p(x|z1): 100-200-200-784
    assert all(isinstance(m, nn.Tanh) for m in two.modules() if isinstance(m, (nn.Tanh, Softplus)))


def test_two_layer_evaluation_elbo_is_the_trace_elbo_at_the_same_draws():
    """No closed-form KL for a hierarchy: the evaluation's ELBO is log p(x, z1, z2) - log q(z1, z2|x)
    at the drawn z, exactly what Trace_ELBO's loss is at the same noise."""
    program = two_layer()
    x = random_binary(7, SHAPE)
    per_image = elbo_terms(program.model, program.guide, x, seed=3)["elbo"]
    pyro.set_rng_seed(3)
    loss = build_elbo("trace").differentiable_loss(program.model, program.guide, x, num_data=7)
    assert float(per_image.sum()) == pytest.approx(-float(loss.detach()), rel=1e-12)


def test_closed_form_kl_at_the_drawn_upper_latent_is_not_the_elbo():
    """Why the evaluation scores hierarchies by Monte Carlo: KL(q(z1|x) || p(z1|z2)) at the z2
    drawn from z1 has another expectation than log q(z1|x) - log p(z1|z2)."""
    program = two_layer(seed=1)
    with torch.no_grad():  # make q(z2|z1) lean hard on z1, so the dependence shows
        program.upper_encoder.head.loc.weight.mul_(20)
    x = random_binary(1, SHAPE).expand(20000, *SHAPE)
    with torch.no_grad():
        guide_trace = poutine.trace(program.guide).get_trace(x, num_data=20000)
        model_trace = poutine.trace(poutine.replay(program.model, trace=guide_trace)).get_trace(x, num_data=20000)
    q, p = guide_trace.nodes["z1"], model_trace.nodes["z1"]
    monte_carlo = q["fn"].log_prob(q["value"]) - p["fn"].log_prob(q["value"])
    closed = torch.distributions.kl_divergence(q["fn"], p["fn"])
    difference = (monte_carlo - closed).detach()
    assert abs(float(difference.mean())) > 6 * float(difference.std()) / math.sqrt(20000)


def test_meanfield_estimator_refuses_a_hierarchy():
    program = two_layer()
    engine = build_engine("module", program, program.model, program.guide, build_elbo("meanfield"), 1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the refusal comes first, not Pyro's warning about the order of the sites
        with pytest.raises(ValueError, match=r"latent sites \['z1', 'z2'\].*--estimator trace, iwae or iwae-dreg"):
            engine.step(x=random_binary(4, SHAPE), num_data=4)


def test_one_layer_models_refuse_the_upper_layer_settings(tmp_path, capsys):
    for model in ("vae", "ae"):
        with pytest.raises(ValueError, match="--z2-dim sets the upper stochastic layer.*Use --model vae2"):
            build_model(ModelConfig(model=model, z2_dim=30), SHAPE)
    assert main(["train", "--z2-hidden-dims", "7", "--out", str(tmp_path / "run"), "--train-limit", "100"]) == 1
    assert "--z2-hidden-dims sets the upper stochastic layer" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before anything was written
    with pytest.raises(ValueError, match="--network mlp"):
        build_model(ModelConfig(model="vae2", network="conv"), SHAPE)


# -- the learning-rate schedule -------------------------------------------------------------


def test_burda_schedule_is_the_papers_stage_by_stage():
    rates = [learning_rate(1e-3, "burda", epoch) for epoch in range(3280)]
    stages = []  # (rate, number of epochs) in order
    for rate in rates:
        if stages and stages[-1][0] == rate:
            stages[-1][1] += 1
        else:
            stages.append([rate, 1])
    assert [n for _, n in stages] == [3 ** i for i in range(8)]  # 1 + 3 + ... + 2187 = 3280 epochs
    assert [r for r, _ in stages] == pytest.approx([1e-3 * 10 ** (-i / 7) for i in range(8)], rel=1e-12)
    assert learning_rate(1e-3, "burda", 5000) == pytest.approx(1e-4)  # beyond the paper: the last rate
    assert learning_rate(1e-3, "constant", 5000) == 1e-3


def torch_optimizers(engine):
    return list(engine.optim.optim_objs.values()) if engine.name == "svi" else [engine.optim]


@pytest.mark.parametrize("engine_name", ENGINES.names())
def test_every_engine_takes_the_learning_rate_it_is_set(engine_name):
    """Adam's first step moves every parameter with a clear gradient by the learning rate in
    force (times the sign of its gradient); later rates reach every optimiser."""
    x = random_binary(8)
    for rate in (3e-3, 5e-4):
        pyro.clear_param_store()
        program = tiny_vae()
        engine = build_engine(engine_name, program, program.model, program.guide, build_elbo(), 1e-2, validate=False)
        engine.set_lr(rate)
        before = [p.detach().clone() for p in program.parameters()]
        engine.step(x=x, num_data=8)
        moved = max(float((p.detach() - b).abs().max()) for p, b in zip(program.parameters(), before))
        assert moved == pytest.approx(rate, rel=1e-4)
        engine.set_lr(rate / 3)
        assert {g["lr"] for optim in torch_optimizers(engine) for g in optim.param_groups} == {rate / 3}


@pytest.mark.parametrize("engine_name", ENGINES.names())
def test_a_scheduled_run_records_its_rates_and_resumes_exactly(engine_name, tmp_path):
    """Resumed at the boundary of two stages, every engine takes the new stage's rate
    (not the one its saved optimiser state carries) and ends where one whole run ends."""
    settings = TrainConfig(epochs=5, batch_size=10, lr=1e-2, lr_schedule="burda", device="cpu", engine=engine_name)
    x = random_binary(40, SHAPE, dtype=torch.float32)

    def program():
        torch.manual_seed(0)
        return build_model(ModelConfig(z_dim=2, hidden_dims=(8,), decoder_bias="data-mean"), SHAPE)

    whole = fit(program(), x, tmp_path / "whole", settings=settings, progress=False, log=lambda _: None)
    from pyro_vae.runs import read_metrics

    rates = [m["lr"] for m in read_metrics(tmp_path / "whole")]
    assert rates == pytest.approx([1e-2, 1e-2 * 10 ** (-1 / 7), 1e-2 * 10 ** (-1 / 7), 1e-2 * 10 ** (-1 / 7),
                                   1e-2 * 10 ** (-2 / 7)])
    pyro.clear_param_store()
    fit(program(), x, tmp_path / "pieces", settings=TrainConfig(**{**settings.__dict__, "epochs": 1}), progress=False,
        log=lambda _: None)
    pyro.clear_param_store()
    pieces = fit(program(), x, tmp_path / "pieces", settings=settings, resume=True, progress=False, log=lambda _: None)
    for (name, a), b in zip(whole.program.state_dict().items(), pieces.program.state_dict().values()):
        assert torch.equal(a, b), name  # rates and the data-mean bias are not re-applied on resume


# -- the output bias from the data ----------------------------------------------------------


@pytest.mark.parametrize("likelihood", ["bernoulli", "continuous-bernoulli", "gaussian"])
@pytest.mark.parametrize("model", ["vae", "vae2"])
def test_data_mean_bias_decodes_the_training_mean_at_zero_weights(model, likelihood):
    torch.manual_seed(0)
    config = ModelConfig(model=model, z_dim=3, hidden_dims=(8,), likelihood=likelihood, decoder_bias="data-mean")
    program = build_model(config, SHAPE).double()
    images = grey(50)  # float64, as the program
    program.initialize_from_data(images)
    with torch.no_grad():
        program.decoder.net[-1].weight.zero_()  # the output is then the bias alone
        mean = program.likelihood.mean(program.decoder(torch.zeros(1, 3, dtype=torch.float64)))
    assert torch.allclose(mean[0], images.mean(0).flatten(), atol=1e-9)
    if likelihood == "bernoulli":  # the log-odds of the mean pixel
        assert torch.allclose(program.decoder.output_bias, torch.logit(images.mean(0).flatten()), atol=1e-9)


def test_data_mean_bias_is_off_by_default_and_refused_without_a_per_pixel_bias(tmp_path):
    torch.manual_seed(0)
    program = build_model(ModelConfig(z_dim=2, hidden_dims=(8,)), SHAPE)
    bias = program.decoder.output_bias.detach().clone()
    program.initialize_from_data(grey(10).float())
    assert torch.equal(program.decoder.output_bias, bias)
    conv = build_model(ModelConfig(z_dim=2, network="conv", decoder_bias="data-mean"), (1, 8, 8))
    with pytest.raises(ValueError, match="decoder_bias='data-mean' needs a decoder with one output bias per pixel"):
        fit(conv, torch.bernoulli(torch.full((20, 1, 8, 8), 0.3)), tmp_path / "run", progress=False,
            settings=TrainConfig(batch_size=10, device="cpu"))
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("likelihood, why", [("categorical-256", "256 outputs per pixel"),
                                             ("discretized-logistic-local", "two outputs per pixel")])
def test_data_mean_bias_is_refused_for_a_likelihood_of_several_outputs_per_pixel_saying_why(likelihood, why,
                                                                                           tmp_path):
    program = build_model(ModelConfig(z_dim=2, hidden_dims=(8,), likelihood=likelihood, decoder_bias="data-mean"),
                          (1, 4, 4))
    images = torch.randint(0, 256, (20, 1, 4, 4)).double().div(255)
    with pytest.raises(ValueError, match=f"{why}.*use decoder_bias='random'"):
        fit(program, images, tmp_path / "run", progress=False, settings=TrainConfig(batch_size=10, device="cpu"))
    assert not (tmp_path / "run").exists()


def test_data_mean_bias_uses_the_grey_mean_under_dynamic_binarisation(tmp_path):
    """Dynamically binarised images are the grey ones in expectation: the bias starts at their log-odds."""
    from pyro_vae.data import ImageData

    torch.manual_seed(0)
    program = build_model(ModelConfig(z_dim=2, hidden_dims=(8,), decoder_bias="data-mean"), SHAPE)
    images = grey(30).float()
    seen = []
    program.initialize_from_data = seen.append
    fit(program, ImageData(images, None, binary=False), tmp_path / "run", binarize="dynamic",
        settings=TrainConfig(epochs=1, batch_size=10, device="cpu"), progress=False, log=lambda _: None)
    assert len(seen) == 1 and torch.equal(seen[0], images)


# -- active units of every layer -------------------------------------------------------------


def test_one_layer_activity_is_the_variance_of_the_encoders_mean():
    program = tiny_vae(image_shape=SHAPE, z_dim=3)
    x = random_binary(60, SHAPE)
    activity = latent_activity(program.model, program.guide, x, num_samples=4)
    assert set(activity) == {"z"}
    assert torch.allclose(activity["z"], active_units(program, x)[1], rtol=1e-12)


class LinearGaussian(nn.Module):
    """z1 -> (W z1 + b, a fixed scale): E_q[z2|x] = W E_q[z1|x] + b exactly."""

    def __init__(self, n_in, n_out):
        super().__init__()
        self.linear = nn.Linear(n_in, n_out)
        self.raw = nn.Parameter(torch.zeros(n_out))

    def forward(self, z1):
        return self.linear(z1), F.softplus(self.raw).expand(z1.shape[:-1] + self.raw.shape)


def test_upper_layer_activity_averages_over_the_lower_layers_draws():
    torch.manual_seed(0)
    d = math.prod(SHAPE)
    program = TwoLayerVAE(MLPEncoder(d, 4, (10,)), MLPDecoder(d, 4, (10,)), LinearGaussian(4, 2),
                          MLPEncoder(2, 4, (5,)), 4, 2, SHAPE).double()
    x = random_binary(400, SHAPE)
    samples = 200
    activity = latent_activity(program.model, program.guide, x, num_samples=samples)
    with torch.no_grad():
        loc1, scale1 = program.encoder(x.reshape(400, d))
        exact_mean = program.upper_encoder.linear(loc1)  # W E[z1|x] + b
        exact = exact_mean.var(0, unbiased=False)
        # each image's Monte Carlo mean is off by noise of variance sum_j W_dj^2 scale1_j^2 / S,
        # which adds about that much to the variance over images (and a little cross-term noise)
        noise = (program.upper_encoder.linear.weight ** 2 @ (scale1 ** 2).T).T.mean(0) / samples
    assert torch.allclose(activity["z1"], loc1.var(0, unbiased=False), rtol=1e-12)
    tolerance = 3 * noise + 8 * torch.sqrt(exact * noise / 400)
    assert ((activity["z2"] - exact).abs() < tolerance).all(), (activity["z2"], exact, tolerance)
