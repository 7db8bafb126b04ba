"""Likelihoods: log-densities against hand-written formulas, their support checks, and the
contract every registered likelihood keeps."""

import math

import pytest
import torch

from pyro_vae.likelihoods import LIKELIHOODS, build_likelihood

D = 6


def logits_and_grey(n=5, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = 3 * torch.randn(n, D, generator=gen, dtype=torch.float64)
    grey = torch.rand(n, D, generator=gen, dtype=torch.float64)
    return logits, grey


def test_bernoulli_log_prob_is_the_hand_written_one():
    logits, grey = logits_and_grey()
    x = torch.bernoulli(grey)
    p = torch.sigmoid(logits)
    expected = (x * p.log() + (1 - x) * (1 - p).log()).sum(-1)
    assert torch.allclose(build_likelihood("bernoulli", D)(logits).log_prob(x), expected, rtol=1e-12, atol=1e-12)


def log_c(lam):
    """log C(lambda) of the continuous Bernoulli, written by hand (C(1/2) = 2)."""
    lam = torch.as_tensor(lam, dtype=torch.float64)
    near = (lam - 0.5).abs() < 1e-6
    safe = torch.where(near, torch.full_like(lam, 0.25), lam)
    c = 2 * torch.atanh(1 - 2 * safe) / (1 - 2 * safe)
    return torch.where(near, torch.full_like(lam, math.log(2.0)), c.log())


def test_continuous_bernoulli_log_prob_adds_the_normalising_constant():
    logits, grey = logits_and_grey()
    lam = torch.sigmoid(logits)
    expected = (grey * lam.log() + (1 - grey) * (1 - lam).log() + log_c(lam)).sum(-1)
    got = build_likelihood("continuous-bernoulli", D)(logits).log_prob(grey)
    assert torch.allclose(got, expected, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("logit", [-20.0, -3.0, -1e-4, 0.0, 1e-4, 0.7, 20.0])
def test_continuous_bernoulli_is_a_density_and_its_mean_is_the_true_mean(logit):
    """Integrates to 1 over [0, 1] and E[x] matches the integral of x p(x) (Simpson's rule)."""
    like = build_likelihood("continuous-bernoulli", 1)
    x = torch.linspace(0, 1, 20001, dtype=torch.float64).unsqueeze(-1)
    logits = torch.full((x.shape[0], 1), logit, dtype=torch.float64)
    density = like(logits).log_prob(x).exp()
    weights = torch.ones(x.shape[0], dtype=torch.float64)
    weights[1:-1:2], weights[2:-1:2] = 4, 2
    integral = lambda f: float((weights * f).sum() / 3 / (x.shape[0] - 1))  # noqa: E731
    assert integral(density) == pytest.approx(1.0, abs=1e-6)
    mean = float(like.mean(torch.tensor([[logit]], dtype=torch.float64)))
    assert mean == pytest.approx(integral(density * x.squeeze(-1)), abs=1e-6)
    if abs(logit) >= 0.5:  # away from 1/2, it is not the Bernoulli's mean sigmoid(logit)
        assert mean != pytest.approx(1 / (1 + math.exp(-logit)), abs=1e-3)


@pytest.mark.parametrize("logit", [-20.0, -15.0, -3.0, -1e-3, 0.0, 0.05, 0.5, 15.0, 20.0])
def test_continuous_bernoulli_holds_in_float32(logit):
    """Against the exact density e^(eta x) / ((e^eta - 1) / eta), in float64: torch's own
    implementation, on clamped probabilities, is 0.23 nats per pixel low at |eta| = 20."""
    x = torch.tensor([0.0, 0.3, 1.0])
    like = build_likelihood("continuous-bernoulli", 3)
    got = like(torch.full((3,), logit)).log_prob(x)
    eta = torch.tensor(logit, dtype=torch.float64)
    log_z = torch.log(torch.expm1(eta) / eta) if logit != 0 else torch.tensor(0.0, dtype=torch.float64)
    exact = (x.double() * eta - log_z).sum()
    assert abs(float(got) - float(exact)) < 1e-4 * max(1.0, abs(float(exact)))
    mean = float(like.mean(torch.tensor([logit])))
    exact_mean = 0.5 if logit == 0 else float(1 / -torch.expm1(-eta) - 1 / eta)
    assert mean == pytest.approx(exact_mean, abs=1e-6)
    # and the gradient is finite everywhere, 0 included
    logits = torch.full((3,), logit, requires_grad=True)
    like(logits).log_prob(x).backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("name,scale_shape", [("gaussian", (D,)), ("gaussian-shared", ())])
def test_gaussian_log_prob_and_its_learned_scale(name, scale_shape):
    like = build_likelihood(name, D).double()
    assert like.raw_scale.shape == scale_shape
    assert torch.allclose(like.scale, torch.full(scale_shape, 0.1, dtype=torch.float64))
    out, grey = logits_and_grey()
    loc, s = torch.sigmoid(out), like.scale.expand(D)  # means in (0, 1), as grey values are
    expected = (-0.5 * ((grey - loc) / s) ** 2 - s.log() - 0.5 * math.log(2 * math.pi)).sum(-1)
    log_p = like(out).log_prob(grey)
    assert torch.allclose(log_p, expected, rtol=1e-12)
    log_p.sum().backward()
    assert like.raw_scale.grad is not None and torch.isfinite(like.raw_scale.grad).all()
    # the floor: however far the raw parameter goes, the scale stays at least MIN_SCALE
    with torch.no_grad():
        like.raw_scale.fill_(-1e4)
    assert torch.all(like.scale >= like.MIN_SCALE) and torch.isfinite(like(out).log_prob(grey)).all()


def test_grey_pixels_to_bernoulli_are_an_error_naming_the_fix():
    _, grey = logits_and_grey()
    with pytest.raises(ValueError) as info:
        build_likelihood("bernoulli", D).check_data(grey.float(), "the images")
    msg = str(info.value)
    assert "not 0 or 1" in msg and "bernoulli likelihood" in msg
    assert "--binarize" in msg and "continuous-bernoulli" in msg


@pytest.mark.parametrize("name,bad", [("continuous-bernoulli", 1.5), ("continuous-bernoulli", -0.1),
                                      ("gaussian", float("nan")), ("gaussian-shared", float("inf"))])
def test_data_outside_the_support_is_an_error_naming_the_likelihood(name, bad):
    x = torch.full((2, D), 0.5)
    x[1, 3] = bad
    with pytest.raises(ValueError, match=f"1 value.* which the {name} likelihood cannot score"):
        build_likelihood(name, D).check_data(x)
    with pytest.raises(TypeError, match="floating-point"):
        build_likelihood(name, D).check_data(torch.zeros(2, D, dtype=torch.long))


# -- the contract of every registered likelihood ------------------------------------------


@pytest.mark.parametrize("name", LIKELIHOODS.names())
def test_every_likelihood_keeps_the_contract(name):
    like = build_likelihood(name, D)
    assert like.name == name and isinstance(like.binary, bool)
    out = torch.randn(3, 4, D)
    d = like(out)
    assert d.batch_shape == (3, 4) and d.event_shape == (D,)
    mean = like.mean(out)
    assert mean.shape == out.shape and torch.isfinite(mean).all()
    # data drawn from the distribution itself is data it scores
    x = d.sample()
    like.check_data(x.reshape(-1, D))
    assert torch.isfinite(d.log_prob(x)).all() and d.log_prob(x).shape == (3, 4)
    # its learned tensors are parameters of the module (so the program owns and saves them)
    assert all(p.requires_grad for p in like.parameters())
    # output_for_mean inverts mean (decoder_bias="data-mean" starts the decoder there)
    target = torch.linspace(0.02, 0.98, 49, dtype=torch.float64)
    assert torch.allclose(like.mean(like.output_for_mean(target)), target, atol=1e-9)
