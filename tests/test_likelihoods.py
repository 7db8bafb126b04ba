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
    out = torch.randn(3, 4, D * like.outputs_per_pixel)
    d = like(out)
    assert d.batch_shape == (3, 4) and d.event_shape == (D,)
    mean = like.mean(out)
    assert mean.shape == (3, 4, D) and torch.isfinite(mean).all()
    # data drawn from the distribution itself is data it scores
    x = d.sample()
    like.check_data(x.reshape(-1, D))
    assert torch.isfinite(d.log_prob(x)).all() and d.log_prob(x).shape == (3, 4)
    # its learned tensors are parameters of the module (so the program owns and saves them)
    assert all(p.requires_grad for p in like.parameters())
    # output_for_mean inverts mean (decoder_bias="data-mean" starts the decoder there)
    target = torch.linspace(0.02, 0.98, 8 * D, dtype=torch.float64).reshape(8, D)  # (a scale per pixel broadcasts)
    if like.outputs_per_pixel > 1:  # many outputs give one mean: no inverse, and a clear refusal
        with pytest.raises(ValueError, match="decoder_bias='data-mean'"):
            like.output_for_mean(target)
        return
    assert torch.allclose(like.mean(like.output_for_mean(target)), target, atol=1e-9)


# -- 8-bit likelihoods: probabilities of the 256 pixel values -------------------------------

LEVEL_VALUES = torch.arange(256, dtype=torch.float64) / 255


@pytest.mark.parametrize("loc, scale", [(0.3, 0.05), (-2.0, 0.01), (1.5, 0.3), (0.5, 1e-3), (0.5001, 1e-4),
                                        (0.0, 20.0)])
def test_the_discretized_logistic_sums_to_one_over_the_256_values(loc, scale):
    from pyro_vae.likelihoods import DiscretizedLogistic

    d = DiscretizedLogistic(torch.full((256,), loc, dtype=torch.float64), torch.full((256,), scale, dtype=torch.float64))
    log_p = d.log_prob(LEVEL_VALUES)
    assert torch.isfinite(log_p).all()
    assert float(log_p.exp().sum()) == pytest.approx(1.0, abs=1e-14)
    assert float(d.mean[0]) == pytest.approx(float((log_p.exp() * LEVEL_VALUES).sum()), abs=1e-12)


def test_the_discretized_logistic_is_the_logistic_mass_of_each_bin_with_open_outer_bins():
    from pyro_vae.likelihoods import DiscretizedLogistic

    loc, scale = 0.4, 0.07
    d = DiscretizedLogistic(torch.tensor(loc, dtype=torch.float64), torch.tensor(scale, dtype=torch.float64))
    cdf = lambda v: torch.sigmoid(torch.tensor((v - loc) / scale, dtype=torch.float64))  # noqa: E731
    for k in (1, 50, 102, 254):
        edges = ((k - 0.5) / 255, (k + 0.5) / 255)
        assert float(d.log_prob(torch.tensor(k / 255, dtype=torch.float64)).exp()) == pytest.approx(
            float(cdf(edges[1]) - cdf(edges[0])), rel=1e-12)
    # k = 0 takes (-inf, 0.5 / 255], k = 255 takes [254.5 / 255, inf)
    assert float(d.log_prob(torch.tensor(0.0, dtype=torch.float64)).exp()) == pytest.approx(float(cdf(0.5 / 255)),
                                                                                            rel=1e-12)
    assert float(d.log_prob(torch.tensor(1.0, dtype=torch.float64)).exp()) == pytest.approx(
        float(1 - cdf(254.5 / 255)), rel=1e-12)


def test_the_discretized_logistic_holds_far_in_the_tails_in_float32():
    from pyro_vae.likelihoods import DiscretizedLogistic

    # a pixel 40 scales from the location: the bin's mass is about e^-40 / (255 s), not 0 (no cancellation)
    d = DiscretizedLogistic(torch.tensor(0.0), torch.tensor(0.01))
    value = torch.tensor(102 / 255)
    exact = DiscretizedLogistic(torch.tensor(0.0, dtype=torch.float64), torch.tensor(0.01, dtype=torch.float64))
    assert torch.isfinite(d.log_prob(value))
    assert float(d.log_prob(value)) == pytest.approx(float(exact.log_prob(value.double())), abs=1e-3)


def test_the_categorical_likelihood_is_a_softmax_over_256_levels_per_pixel():
    like = build_likelihood("categorical-256", 3)
    out = torch.randn(2, 256 * 3, dtype=torch.float64)
    logits = out.reshape(2, 256, 3).transpose(1, 2)  # 256 blocks of D: level by level
    x = torch.tensor([[0, 17, 255], [128, 1, 254]], dtype=torch.float64) / 255
    expected = torch.log_softmax(logits, -1).gather(-1, (x * 255).round().long().unsqueeze(-1)).squeeze(-1).sum(-1)
    assert torch.allclose(like(out).log_prob(x), expected, atol=1e-12)
    # each pixel's 256 probabilities sum to 1: score every image whose pixels all take level k
    every = torch.stack([like(out).log_prob(torch.full((2, 3), k / 255, dtype=torch.float64)) for k in range(256)])
    per_pixel = torch.stack([torch.log_softmax(logits, -1)[..., k] for k in range(256)])  # (256, 2, 3)
    assert torch.allclose(every, per_pixel.sum(-1), atol=1e-12)
    assert torch.allclose(per_pixel.exp().sum(0), torch.ones(2, 3, dtype=torch.float64), atol=1e-14)
    assert torch.allclose(like.mean(out), (torch.softmax(logits, -1) * LEVEL_VALUES).sum(-1), atol=1e-12)


def test_the_local_discretized_logistic_reads_a_location_and_a_scale_per_pixel_of_each_image():
    from pyro_vae.likelihoods import DiscretizedLogistic

    like = build_likelihood("discretized-logistic-local", 3)
    assert like.outputs_per_pixel == 2 and not list(like.parameters())  # nothing learned apart from the decoder
    out = torch.tensor([[0.1, 0.5, 0.9, -3.0, 0.0, 2.0],   # locations, then the scales' raw values
                        [0.1, 0.5, 0.9, 1.0, -5.0, 0.5]], dtype=torch.float64)
    x = torch.tensor([[0, 128, 255], [26, 120, 230]], dtype=torch.float64) / 255
    scale = like.MIN_SCALE + torch.log1p(out[:, 3:].exp())  # softplus
    expected = DiscretizedLogistic(out[:, :3], scale).log_prob(x).sum(-1)
    assert torch.allclose(like(out).log_prob(x), expected, atol=1e-12)
    # the two images share locations, not scales: their log-probabilities of one image differ
    same = like(out).log_prob(x[:1].expand(2, 3))
    assert abs(float(same[0] - same[1])) > 1.0
    # each pixel's 256 probabilities sum to 1
    every = torch.stack([like(out).log_prob(torch.full((2, 3), k / 255, dtype=torch.float64)) for k in range(256)])
    per_pixel = torch.stack([DiscretizedLogistic(out[:, :3], scale).log_prob(torch.full((2, 3), k / 255,
                                                                                       dtype=torch.float64))
                             for k in range(256)])
    assert torch.allclose(every, per_pixel.sum(-1), atol=1e-12)
    assert torch.allclose(per_pixel.exp().sum(0), torch.ones(2, 3, dtype=torch.float64), atol=1e-13)
    assert torch.allclose(like.mean(out), DiscretizedLogistic(out[:, :3], scale).mean, atol=1e-12)
    with pytest.raises(ValueError, match="two outputs per pixel"):
        like.output_for_mean(torch.full((3,), 0.5))


@pytest.mark.parametrize("name", ["discretized-logistic", "discretized-logistic-local", "categorical-256"])
@pytest.mark.parametrize("bad, what", [(0.5, "not a multiple of 1/255"), (1.2, "above 1"), (-1 / 255, "below 0"),
                                       (0.5 / 255, "half a level")])
def test_data_that_is_not_8_bit_is_a_clear_error(name, bad, what):
    like = build_likelihood(name, 4)
    x = torch.tensor([[0.0, 1.0, 17 / 255, bad]])
    with pytest.raises(ValueError, match=f"not 8-bit pixel values.*{name}"):
        like.check_data(x)
    like.check_data(torch.tensor([[0.0, 1.0, 17 / 255, 254 / 255]]))  # 8-bit values pass, in float32 too
