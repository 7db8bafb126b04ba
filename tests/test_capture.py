"""The recorded loss (pyro_vae.capture) replays exactly what the eager Pyro loss does."""

import pyro
import pytest
import torch

from pyro_vae.capture import CapturedLoss, CaptureError
from pyro_vae.config import ModelConfig
from pyro_vae.objectives import build_elbo, kl_weight, training_program
from pyro_vae.steps import build_engine
from pyro_vae.models import build_model as build_vae

from helpers import random_binary
from test_objectives import HostReads

CASES = {
    "elbo": dict(),
    "kl warm-up": dict(warmup=True),  # a new KL weight at every step, a tensor input of one graph
    "beta 4": dict(weight=4.0),
    "autoencoder": dict(model="ae"),
    "kl-only": dict(objective="kl-only"),
    "meanfield": dict(elbo="meanfield"),
    "3 particles": dict(particles=3),
    "conv": dict(network="conv"),
}


def train_steps(engine_name, steps=12, warmup=False, weight=1.0, model="vae", objective="elbo", elbo="trace",
                particles=1, network="mlp", batches=(16, 16, 16, 8)):
    """``steps`` seeded steps over batches of the given sizes (an epoch's short last batch too)."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    vae = build_vae(ModelConfig(model=model, z_dim=3, hidden_dims=(24,), network=network), (1, 28, 28))
    model, guide = training_program(vae, objective)
    engine = build_engine(engine_name, vae, model, guide, build_elbo(elbo, particles), 1e-2, validate=False)
    data = random_binary(sum(batches), (1, 28, 28), torch.float32)
    starts = [sum(batches[:i]) for i in range(len(batches))]
    pyro.set_rng_seed(1)
    losses = []
    with pyro.get_param_store().scope():
        for i in range(steps):
            j = i % len(batches)
            w = kl_weight(1.0, 5, i / 8) if warmup else weight
            x = data[starts[j] : starts[j] + batches[j]]
            losses.append(engine.step(x=x, num_data=56, kl_weight=w))
        engine.check()
    return vae, torch.stack(losses), engine


@pytest.mark.parametrize("case", CASES)
def test_captured_steps_are_the_eager_steps_bit_for_bit(case):
    a, la, captured = train_steps("captured", **CASES[case])
    b, lb, _ = train_steps("module", **CASES[case])
    assert captured.loss_fn.eager_reason is None and captured.loss_fn.graphs  # it did replay
    assert torch.equal(la, lb)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name
    assert la[-4:].mean() < la[:4].mean()  # and they learn


def test_one_recording_per_batch_shape_and_kind_of_kl_weight():
    _, _, engine = train_steps("captured", steps=12, warmup=True)
    # a key: ((name, shape, dtype, device) of each batch tensor, the other arguments)
    kinds = sorted((key[0][0][1][0], dict(key[1])["kl_weight"]) for key in engine.loss_fn.graphs)
    # batches of 16 and of 8; the warm-up's weights all travel as one tensor input
    assert kinds == [(8, "tensor"), (16, "tensor")]
    _, _, engine = train_steps("captured", steps=6, weight=1.0)
    assert len(engine.loss_fn.graphs) == 2 and all(dict(k[1])["kl_weight"] == 1.0 for k in engine.loss_fn.graphs)


def test_validation_runs_the_loss_eagerly():
    vae = build_vae(ModelConfig(z_dim=3, hidden_dims=(8,)), (1, 28, 28))
    loss = CapturedLoss(build_elbo()(vae.model, vae.guide), vae)
    x = random_binary(4, (1, 28, 28), torch.float32)
    with pyro.validation_enabled(True):
        for _ in range(3):
            loss(x=x, num_data=10)
        x_grey = x.clone()
        x_grey[0, 0, 0, 0] = 0.5
        with pytest.raises(ValueError, match="not 0 or 1"):
            loss(x=x_grey, num_data=10)  # the data check still runs
    assert not loss.graphs


class BernoulliLatent(torch.nn.Module):
    """A discrete latent: its guide site has no rsample, so the ELBO's gradient carries a
    score-function term built with ``detach``, which a recording must keep."""

    def __init__(self):
        super().__init__()
        self.encoder = torch.nn.Linear(4, 3)
        self.decoder = torch.nn.Linear(3, 4)

    def model(self, x, *, num_data=None):
        import pyro.distributions as dist

        pyro.module("decoder", self.decoder)
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Bernoulli(torch.full((x.shape[0], 3), 0.5)).to_event(1))
            pyro.sample("x", dist.Bernoulli(logits=self.decoder(z)).to_event(1), obs=x.reshape(x.shape[0], -1))

    def guide(self, x, *, num_data=None):
        import pyro.distributions as dist

        pyro.module("encoder", self.encoder)
        with pyro.plate("data", x.shape[0]):
            pyro.sample("z", dist.Bernoulli(logits=self.encoder(x.reshape(x.shape[0], -1))).to_event(1))


def test_a_score_function_gradient_is_replayed_with_its_stop_gradients():
    def steps(engine_name):
        pyro.clear_param_store()
        torch.manual_seed(0)
        program = BernoulliLatent()
        engine = build_engine(engine_name, program, program.model, program.guide, build_elbo(), 1e-2,
                              validate=False)
        x = random_binary(8, (1, 2, 2), torch.float32)
        pyro.set_rng_seed(1)
        with pyro.get_param_store().scope():
            for _ in range(5):
                engine.step(x=x, num_data=8)
        return program, engine

    a, captured = steps("captured")
    b, _ = steps("module")
    assert captured.loss_fn.graphs and captured.loss_fn.eager_reason is None
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)  # the encoder's score-function gradient included


class ValueDependentVAE(torch.nn.Module):
    """A program whose operations depend on the data's values: it cannot be recorded."""

    def __init__(self):
        super().__init__()
        self.vae = build_vae(ModelConfig(z_dim=2, hidden_dims=(8,)), (1, 28, 28))

    def model(self, x, **kwargs):
        return self.vae.model(x if x.sum() > 0 else x + 0, **kwargs)

    def guide(self, x, **kwargs):
        return self.vae.guide(x, **kwargs)


def test_a_value_dependent_program_runs_eagerly_with_a_warning():
    net = ValueDependentVAE()
    x = random_binary(4, (1, 28, 28), torch.float32)
    eager = build_elbo()(net.model, net.guide)
    loss = CapturedLoss(eager, net)
    with pyro.validation_enabled(False):
        loss(x=x, num_data=10)
        with pytest.warns(RuntimeWarning, match="running them eagerly"):
            pyro.set_rng_seed(2)
            a = loss(x=x, num_data=10)
        pyro.set_rng_seed(2)
        assert torch.equal(a, eager(x, num_data=10))
        assert loss.eager_reason and not loss.graphs
        strict = CapturedLoss(eager, net, strict=True)
        strict(x=x, num_data=10)
        with pytest.raises(CaptureError, match="could not record"):
            strict(x=x, num_data=10)


@pytest.mark.parametrize("engine", ["module", "captured"])
def test_steps_read_nothing_back_when_checks_are_deferred(engine):
    """With the non-finite check deferred (as on CUDA), a step never waits for the device."""
    vae = build_vae(ModelConfig(z_dim=3, hidden_dims=(8,)), (1, 28, 28))
    eng = build_engine(engine, vae, vae.model, vae.guide, build_elbo(), 1e-3, validate=False)
    eng.deferred = True  # as on CUDA
    x = random_binary(8, (1, 28, 28), torch.float32)
    with pyro.get_param_store().scope():
        eng.step(x=x, num_data=20)  # the first step registers the networks with Pyro
        with HostReads() as reads:
            for _ in range(3):
                eng.step(x=x, num_data=20, kl_weight=0.5)
        assert reads.count == 0
        eng.check()


def test_a_network_with_hooks_runs_eagerly_so_the_hooks_run():
    vae = build_vae(ModelConfig(z_dim=3, hidden_dims=(8,)), (1, 28, 28))
    calls = []
    vae.decoder.register_forward_hook(lambda module, inputs, output: calls.append(1))
    loss = CapturedLoss(build_elbo()(vae.model, vae.guide), vae)
    x = random_binary(4, (1, 28, 28), torch.float32)
    with pyro.validation_enabled(False):
        loss(x=x, num_data=10)
        with pytest.warns(RuntimeWarning, match="decoder have hooks"):
            loss(x=x, num_data=10)
        loss(x=x, num_data=10)
    assert len(calls) == 3 and not loss.graphs


def test_a_replayed_step_with_nan_parameters_stops_before_the_update():
    from pyro_vae.steps import NonFiniteError

    vae = build_vae(ModelConfig(z_dim=3, hidden_dims=(8,)), (1, 28, 28))
    engine = build_engine("captured", vae, vae.model, vae.guide, build_elbo(), 1e-2, validate=False)
    x = random_binary(8, (1, 28, 28), torch.float32)
    with pyro.get_param_store().scope():
        engine.step(x=x, num_data=20)
        engine.step(x=x, num_data=20)
        assert engine.loss_fn.graphs  # the second step replayed
        with torch.no_grad():
            vae.decoder.net[0].weight[0, 0] = float("nan")
        before = [p.detach().clone() for p in vae.parameters()]
        with pytest.raises(NonFiniteError, match="the loss is nan"):
            engine.step(x=x, num_data=20)
    for p, q in zip(before, vae.parameters()):
        assert torch.equal(p.nan_to_num(), q.nan_to_num())  # not moved (the NaN compared as 0)


def _noisy_tanh(net):
    def loss(x):
        h = torch.tanh(net(x))
        return (h + torch.randn(h.shape)).pow(2).sum(-1)
    return loss


def _written_in_place(net):
    def loss(x):
        h = net(x) * 2.0
        h.add_(torch.randn(h.shape))  # a value of the batch alone, then written: it cannot be kept
        return h.sum(-1)
    return loss


@pytest.mark.parametrize("make_loss", [_noisy_tanh, _written_in_place])
def test_a_batch_part_is_computed_once_per_batch_and_draws_nothing(make_loss):
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    loss = make_loss(net)
    reused = CapturedLoss(loss, net, warmed_up=True, strict=True, reuse_batch_part=True)
    x, other = torch.randn(4, 3), torch.randn(4, 3)

    def same_as_eager(inp):
        torch.manual_seed(7)
        got = reused(x=inp)
        torch.manual_seed(7)
        return torch.equal(got, loss(inp))

    with torch.no_grad(), pyro.validation_enabled(False):  # under validation, every call runs eagerly
        assert same_as_eager(x)  # records
        split = next(iter(reused.graphs.values()))
        prefix, calls = split.prefix, []
        split.prefix = lambda *a: calls.append(1) or prefix(*a)
        for inp in (x, x, x, other, other, x):
            assert same_as_eager(inp)
        assert len(calls) == 2  # other, then x again (x's from the recording call was kept)
        net.weight.mul_(2)  # an in-place update (an optimiser step): the kept values are stale
        assert same_as_eager(x) and len(calls) == 3
        state = torch.get_rng_state()
        prefix(*reused._module_tensors, x)
        assert torch.equal(state, torch.get_rng_state())  # the batch part draws no random number
    # with autograd on, every call computes its batch part, and the gradients are the eager ones
    grads = []
    for fn in (reused, reused, loss):
        net.zero_grad()
        torch.manual_seed(7)
        with pyro.validation_enabled(False):
            fn(x=x).sum().backward()
        grads.append(net.weight.grad.clone())
    assert len(calls) == 5 and torch.equal(grads[0], grads[2]) and torch.equal(grads[1], grads[2])
