"""How good is q(z|x): the inference gaps and NUTS, against a model whose posterior is exact.

z ~ N(0, I_2), x | z ~ N(W z + b, s^2 I_3) with orthogonal columns of W: the posterior is
a Gaussian with a diagonal covariance, so a diagonal-Gaussian guide can be exact, and
log p(x) = log N(x; b, W W^T + s^2 I) is known in closed form.
"""

import math
from unittest import mock

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.ops.stats import effective_sample_size
from torch import nn
from torch.distributions import constraints

from pyro_vae.cli import main
from pyro_vae.models import data_plate
from pyro_vae.posterior import (LocalFamily, NoLocalFamily, inference_gaps, local_family, nuts_posterior,
                                optimal_local_parameters)

W = torch.tensor([[2.0, 0.0], [0.0, 1.0], [0.0, 0.0]], dtype=torch.float64)
B = torch.tensor([0.5, -0.2, 0.1], dtype=torch.float64)
S = 0.7


class LinearGaussian(nn.Module):
    """The model above, with an amortised guide that is deliberately not the posterior."""

    def __init__(self):
        super().__init__()
        self.W, self.b = nn.Parameter(W.clone()), nn.Parameter(B.clone())
        self.enc = nn.Linear(3, 2).double()
        with torch.no_grad():
            self.enc.weight.fill_(0.1)
        self.raw_scale = nn.Parameter(torch.zeros(2, dtype=torch.float64))

    def model(self, x, *, num_data=None):
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(2, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, S).to_event(1), obs=x)

    def encode(self, x):
        return self.enc(x), nn.functional.softplus(self.raw_scale).expand(x.shape[0], 2)

    def guide(self, x, *, num_data=None):
        with data_plate(x, num_data):
            pyro.sample("z", dist.Normal(*self.encode(x)).to_event(1))

    def local_family(self):
        return LocalFamily("z", self.encode, lambda loc, scale: dist.Normal(loc, scale).to_event(1),
                           (constraints.real, constraints.positive))


def exact_posterior(x):
    precision = torch.eye(2, dtype=torch.float64) + W.T @ W / S**2  # diagonal
    cov = torch.linalg.inv(precision)
    return (x - B) @ W @ cov / S**2, cov


def exact_log_px(x):
    return dist.MultivariateNormal(B, W @ W.T + S**2 * torch.eye(3, dtype=torch.float64)).log_prob(x)


def images(n=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 2, generator=gen, dtype=torch.float64)
    return z @ W.T + B + S * torch.randn(n, 3, generator=gen, dtype=torch.float64)


@pytest.mark.slow
def test_optimal_member_is_the_exact_posterior():
    program, x = LinearGaussian(), images()
    (loc, scale), steps = optimal_local_parameters(program, local_family(program), x, lr=2e-2, max_steps=3000)
    mean, cov = exact_posterior(x)
    # Adam at a fixed rate jitters around the optimum by about its step size
    assert torch.allclose(loc, mean, atol=0.03) and torch.allclose(scale, cov.diagonal().sqrt().expand(6, 2), atol=0.03)
    assert 100 <= steps <= 3000
    # started at the encoder's output, which is far from it
    start = program.encode(x)[0].detach()
    assert (start - mean).abs().max() > 0.5


@pytest.mark.slow
def test_gaps_against_the_exact_values():
    program, x = LinearGaussian(), images()
    gaps = inference_gaps(program, x, num_samples=4000, elbo_samples=4000, lr=2e-2)
    mean, cov = exact_posterior(x)
    log_px = exact_log_px(x)
    # log p(x) by importance sampling with q* as proposal: within its noise of the exact value
    assert torch.allclose(gaps.log_px, log_px, atol=5e-3)
    # the approximation gap is KL(q* || p(z|x)): zero for the exact family, up to the optimiser's jitter
    report = gaps.report()
    assert abs(report["approximation_gap"].mean) < 4 * report["approximation_gap"].stderr + 2e-3
    # the amortised guide's gap: KL(q || p(z|x)) in closed form (both Gaussians)
    q = dist.Normal(*program.encode(x)).to_event(1)
    posterior = dist.Normal(mean, cov.diagonal().sqrt()).to_event(1)
    kl = torch.distributions.kl_divergence(q, posterior).detach()
    # L[q] averages 4000 draws of log p(x) - log q(z)/p(z|x): its standard error per image
    z = q.sample((4000,))
    stderr = (q.log_prob(z) - posterior.log_prob(z)).detach().std(0) / math.sqrt(4000)
    assert ((gaps.inference - kl).abs() < 4 * stderr + 0.01).all(), (gaps.inference, kl, stderr)
    assert (gaps.amortization > 0.5).all()
    # the decomposition is exact, image by image
    assert torch.allclose(gaps.inference, gaps.approximation + gaps.amortization, atol=1e-12, rtol=0)
    r = report
    assert r["inference_gap"].mean == pytest.approx(r["approximation_gap"].mean + r["amortization_gap"].mean,
                                                     abs=1e-9)


@pytest.mark.slow
def test_the_gaps_bar_moves_within_a_batch_and_adds_up_to_the_images():
    """A live bar for ``gaps``: the optimisation of q* moves it at every step (up to 90 % of
    the batch at the earlier batches' pace), its end the rest; the moves add up to N."""
    shown = []
    gaps = inference_gaps(LinearGaussian(), images(6), num_samples=20, elbo_samples=20, batch_size=3,
                          max_steps=300, round_steps=50, progress=shown.append)
    assert len(shown) > 2 * 10 and all(s > 0 for s in shown)  # many moves per batch, never backwards
    assert sum(shown) == pytest.approx(6, abs=1e-9)
    assert sum(shown[: len(shown) // 2]) < 3 + 1e-9  # the first batch's moves stay within its 3 images
    assert len(gaps.steps) == 2


@pytest.mark.slow
def test_nuts_samples_the_exact_posterior():
    program, x = LinearGaussian(), images(1, seed=3)
    samples = nuts_posterior(program, x, num_samples=1000, warmup=300)
    mean, cov = exact_posterior(x)
    ess = effective_sample_size(samples.unsqueeze(0), chain_dim=0, sample_dim=1)
    sd = cov.diagonal().sqrt()
    assert (ess > 200).all()
    assert ((samples.mean(0) - mean[0]).abs() < 4 * sd / ess.sqrt()).all(), (samples.mean(0), mean)
    # a sample variance's relative standard error is about sqrt(2 / ESS)
    assert ((samples.var(0) / sd**2 - 1).abs() < 4 * (2 / ess).sqrt()).all()
    assert abs(float(torch.corrcoef(samples.T)[0, 1])) < 4 / float(ess.min().sqrt())  # a diagonal posterior


def test_programs_whose_q_star_is_not_defined_are_refused():
    from oracle_programs import GlobalLatent
    from pyro_vae import ModelConfig, build_model

    x = torch.bernoulli(torch.full((3, 1, 4, 4), 0.5))
    cases = ((build_model(ModelConfig(model="ae", z_dim=2, hidden_dims=(4,)), (1, 4, 4)), "point mass"),
             (GlobalLatent(), "outside the 'data' plate"))
    for program, why in cases:
        with pytest.raises(ValueError, match=why):  # NoLocalFamily, or the importance weights' refusal
            inference_gaps(program, x, num_samples=10, elbo_samples=10, max_steps=10)
    with pytest.raises(ValueError, match="at least 1"):
        inference_gaps(LinearGaussian(), images(), num_samples=0)
    with pytest.raises(NoLocalFamily, match="takes values in GreaterThan"):
        inference_gaps(PositiveLatent(), torch.rand(3, 2), num_samples=10, elbo_samples=10, max_steps=10)


class PositiveLatent(torch.nn.Module):
    """A positive latent (a Gamma): no Gaussian or categorical stands in for it."""

    def model(self, x, num_data=None):
        with pyro.plate("data", x.shape[0]):
            rate = pyro.sample("rate", dist.Gamma(2.0, 1.0))
            pyro.sample("x", dist.Exponential(rate.unsqueeze(-1) * torch.ones(2)).to_event(1), obs=x)

    def guide(self, x, num_data=None):
        with pyro.plate("data", x.shape[0]):
            pyro.sample("rate", dist.Gamma(3.0, 1.0))


class TwoSites(torch.nn.Module):
    """Two latent sites, z_a and z_b, each explaining one coordinate of x linearly with
    Gaussian noise; the guide is the prior. The posterior is a Gaussian per site, so the
    per-image Gaussians over all sites hold it: q* is exact."""

    w, b, s = (1.5, -0.8), (0.2, 0.1), (0.5, 0.7)

    def model(self, x, num_data=None):
        with pyro.plate("data", x.shape[0]):
            for i, name in enumerate(("za", "zb")):
                z = pyro.sample(name, dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
                pyro.sample(f"x{i}", dist.Normal(self.w[i] * z + self.b[i], self.s[i]), obs=x[:, i])

    def guide(self, x, num_data=None):
        with pyro.plate("data", x.shape[0]):
            for name in ("za", "zb"):
                pyro.sample(name, dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))

    def exact(self, x):
        """log p(x), and the ELBO of the prior as guide: E_p(z)[log p(x|z)], both per image."""
        log_px, elbo = 0.0, 0.0
        for i in range(2):
            w, b, s = self.w[i], self.b[i], self.s[i]
            log_px = log_px + dist.Normal(b, math.sqrt(w**2 + s**2)).log_prob(x[:, i])
            elbo = elbo - 0.5 * math.log(2 * math.pi * s**2) - ((x[:, i] - b) ** 2 + w**2) / (2 * s**2)
        return log_px, elbo


@pytest.mark.slow
def test_gaps_of_a_program_with_two_latent_sites_against_exact_values():
    program = TwoSites()
    x = torch.randn(6, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)) * 1.5
    log_px, elbo_prior = program.exact(x)
    gaps = inference_gaps(program, x, num_samples=4000, elbo_samples=4000, lr=2e-2)
    # the guide is the prior: L[q] is E_p(z)[log p(x|z)], known in closed form (Monte Carlo error ~0.05 here)
    assert torch.allclose(gaps.elbo_amortized, elbo_prior, atol=0.3)
    # q* reaches the exact posterior: no approximation gap, and its bound is log p(x)
    assert torch.allclose(gaps.log_px, log_px, atol=0.02)
    assert torch.allclose(gaps.elbo_optimal, log_px, atol=0.05)
    assert (gaps.approximation.abs() < 0.05).all()
    assert torch.allclose(gaps.amortization, log_px - elbo_prior, atol=0.3)


@pytest.fixture(scope="module")
def tiny_runs(tmp_path_factory, data_dir):
    root = tmp_path_factory.mktemp("gaps")
    common = ["--train-limit", "200", "--test-limit", "20", "--epochs", "1", "--batch-size", "50", "--z-dim", "2",
              "--hidden-dims", "16", "--data-dir", str(data_dir), "--no-progress"]
    for name, extra in (("vae", []), ("ae", ["--model", "ae"])):
        assert main(["train", "--out", str(root / name), *common, *extra]) == 0
    return root


@pytest.mark.slow
def test_gaps_command_end_to_end(tiny_runs, capsys):
    assert main(["gaps", str(tiny_runs / "vae"), "--limit", "4", "--num-samples", "50", "--max-steps", "200",
                 "--json"]) == 0
    import json

    report = json.loads(capsys.readouterr().out)
    assert report["num_images"] == 4 and report["num_samples"] == 50 and report["optimizer_steps"]
    for key in ("log_px", "elbo_amortized", "elbo_optimal", "inference_gap", "approximation_gap", "amortization_gap"):
        assert set(report[key]) == {"mean", "stderr"}
    for gap, (high, low) in {"approximation_gap": ("log_px", "elbo_optimal"), "inference_gap": ("log_px", "elbo_amortized"),
                             "amortization_gap": ("elbo_optimal", "elbo_amortized")}.items():
        assert report[gap]["mean"] == pytest.approx(report[high]["mean"] - report[low]["mean"], abs=1e-9)
    assert report["elbo_optimal"]["mean"] > report["elbo_amortized"]["mean"]  # q* is at least as good, per image
    assert main(["gaps", str(tiny_runs / "vae"), "--limit", "2", "--num-samples", "20", "--max-steps", "100"]) == 0
    out = capsys.readouterr().out
    assert "amortisation" in out and "approximation" in out and "L[q*]" in out


def test_gaps_command_refuses_bad_input(tiny_runs, capsys):
    assert main(["gaps", str(tiny_runs / "ae"), "--limit", "2"]) == 1
    assert "point mass" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["gaps", str(tiny_runs / "vae"), "--num-samples", "0"])
    assert "expected a positive integer, got 0" in capsys.readouterr().err
    assert main(["gaps", str(tiny_runs / "nothing")]) == 1


# -- the flow guide ------------------------------------------------------------------------


def flow_vae(seed=0, steps=2):
    from pyro_vae import ModelConfig, build_model

    torch.manual_seed(seed)
    return build_model(ModelConfig(model="vae-iaf", z_dim=3, hidden_dims=(8,), flow_steps=steps), (1, 2, 2)).double()


class GaussianPart(nn.Module):
    """The flow encoder's Gaussian alone: (loc, scale) of z_0."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, x):
        return self.encoder(x)[:2]


def test_a_flow_guide_at_the_identity_is_the_gaussian_guide():
    from pyro_vae.evaluate import batch_log_weights, elbo_terms
    from pyro_vae.models.vae import VAE

    flow = flow_vae()
    gaussian = VAE(GaussianPart(flow.encoder), flow.decoder, 3, (1, 2, 2))
    x = torch.bernoulli(torch.full((7, 1, 2, 2), 0.4, dtype=torch.float64))
    pyro.set_rng_seed(5)
    wa = batch_log_weights(flow.model, flow.guide, x, 10)
    pyro.set_rng_seed(5)
    wb = batch_log_weights(gaussian.model, gaussian.guide, x, 10)
    assert torch.allclose(wa, wb, atol=1e-12, rtol=0)
    # the ELBO's terms on 400 draws of each image: the same z, so the same log-likelihood;
    # the Gaussian's KL in closed form, the flow's by Monte Carlo, whose mean is that KL
    r = 400
    copies = x.repeat(r, 1, 1, 1)
    a = elbo_terms(flow.model, flow.guide, copies, seed=5)
    b = elbo_terms(gaussian.model, gaussian.guide, copies, seed=5)
    assert torch.allclose(a["log_lik"], b["log_lik"], atol=1e-12, rtol=0)
    for terms in (a, b):
        assert torch.allclose(terms["elbo"], terms["log_lik"] - terms["kl"], atol=1e-12, rtol=0)
    kl = b["kl"].reshape(r, 7)
    assert torch.allclose(kl, kl[:1].expand(r, 7), atol=1e-12, rtol=0)  # closed form: no noise
    sampled = a["kl"].reshape(r, 7)
    stderr = sampled.std(0) / math.sqrt(r)
    assert ((sampled.mean(0) - kl[0]).abs() < 4 * stderr).all(), (sampled.mean(0), kl[0], stderr)


def test_flow_guide_log_density_is_the_change_of_variables():
    """log q(z|x) = log N(z_0; loc, scale^2) - sum_t sum_d log s_t, with s_t from each transform."""
    flow = flow_vae(seed=1)
    with torch.no_grad():  # move the transforms away from the identity
        for p in flow.flows.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.bernoulli(torch.full((5, 1, 2, 2), 0.4, dtype=torch.float64))
    loc, scale, context = flow.amortized_parameters(x)
    q = flow.posterior(loc, scale, context)
    z0 = loc + scale * torch.randn_like(loc)
    z, log_det = z0, 0.0
    for t in flow.flows:
        mean, log_s = t.nn(z, context)
        log_s = log_s.clamp(-5.0, 3.0)  # Pyro's clip of the log-scale
        z = mean + log_s.exp() * z
        log_det = log_det + log_s.sum(-1)
    expected = dist.Normal(loc, scale).to_event(1).log_prob(z0) - log_det
    assert torch.allclose(q.log_prob(z), expected, atol=1e-9)  # (inverts the flow: no cache used here)
    assert (log_det.abs() > 1e-3).all()


def gaps_with_standard_errors(program, x, num_samples, elbo_samples, **optimize):
    """:func:`inference_gaps` of one batch, and the Monte Carlo standard errors of its
    three numbers per image, from the very draws it made: with the q* it found (kept on
    the way out of :func:`optimal_local_parameters`), the log-weights of q and q* on the
    gaps' noise streams (the batch's seed, and that seed + 2) must give back the reported
    ELBOs and log p(x) exactly."""
    from pyro_vae import posterior
    from pyro_vae.evaluate import batch_log_weights
    from pyro_vae.rng import forked_rng

    assert elbo_samples <= 500 and num_samples <= 500  # (one chunk of elbo_of and importance_log_px each)
    found, optimize_ = [], posterior.optimal_local_parameters

    def keeping_q_star(program, family, x, **kwargs):
        best, steps = optimize_(program, family, x, **kwargs)
        found.append(family.guide(best))
        return best, steps

    with mock.patch.object(posterior, "optimal_local_parameters", keeping_q_star):
        gaps = inference_gaps(program, x, num_samples=num_samples, elbo_samples=elbo_samples,
                              batch_size=x.shape[0], **optimize)
    (q_star,) = found
    with torch.no_grad():
        with forked_rng(0):
            amortized = batch_log_weights(program.model, program.guide, x, elbo_samples).double()
        with forked_rng(2):
            optimal = batch_log_weights(program.model, q_star, x, elbo_samples).double()
            importance = batch_log_weights(program.model, q_star, x, num_samples).double()
    assert torch.allclose(amortized.mean(0), gaps.elbo_amortized, rtol=1e-12, atol=0)
    assert torch.allclose(optimal.mean(0), gaps.elbo_optimal, rtol=1e-12, atol=0)
    assert torch.allclose(torch.logsumexp(importance, 0) - math.log(num_samples), gaps.log_px, rtol=1e-12, atol=0)
    normalized = torch.softmax(importance, 0)  # delta method: the relative variance of the mean weight
    return gaps, {"elbo_amortized": amortized.std(0) / math.sqrt(elbo_samples),
                  "elbo_optimal": optimal.std(0) / math.sqrt(elbo_samples),
                  "log_px": ((normalized**2).sum(0) - 1 / num_samples).clamp(min=0).sqrt()}


def assert_the_gaps_are_the_differences_of_the_terms(gaps):
    assert torch.equal(gaps.approximation, gaps.log_px - gaps.elbo_optimal)
    assert torch.equal(gaps.amortization, gaps.elbo_optimal - gaps.elbo_amortized)
    assert torch.equal(gaps.inference, gaps.log_px - gaps.elbo_amortized)
    r = gaps.report()
    for gap, (high, low) in {"approximation_gap": ("log_px", "elbo_optimal"), "inference_gap": ("log_px", "elbo_amortized"),
                             "amortization_gap": ("elbo_optimal", "elbo_amortized")}.items():
        assert r[gap].mean == pytest.approx(r[high].mean - r[low].mean, abs=1e-12)


@pytest.mark.slow
def test_the_gaps_of_a_flow_guide_optimise_its_local_parameters():
    flow = flow_vae(seed=2)
    x = torch.bernoulli(torch.full((4, 1, 2, 2), 0.4, dtype=torch.float64))
    family = local_family(flow)
    assert len(family.parameters(x)) == 3  # loc, scale and the flow's context, per image
    gaps, se = gaps_with_standard_errors(flow, x, 200, 200, max_steps=300)
    assert_the_gaps_are_the_differences_of_the_terms(gaps)
    # log p(x) >= its importance-sampled bound with q* >= L[q*] in expectation: per image, up to their noise
    assert (gaps.log_px - gaps.elbo_optimal > -4 * torch.sqrt(se["log_px"] ** 2 + se["elbo_optimal"] ** 2)).all()
    # the family holds the encoder's member (it starts there): L[q*] >= L[q], up to noise;
    # and for this untrained encoder, by far
    assert (gaps.amortization > -4 * torch.sqrt(se["elbo_optimal"] ** 2 + se["elbo_amortized"] ** 2)).all()
    assert (gaps.amortization > 4 * torch.sqrt(se["elbo_optimal"] ** 2 + se["elbo_amortized"] ** 2)).all()


def test_dreg_refuses_a_flow_guide_whose_rescoring_would_invert_it():
    from pyro_vae.objectives import EstimatorNotApplicable, build_elbo
    from pyro_vae.steps import build_engine

    flow = flow_vae()
    engine = build_engine("module", flow, flow.model, flow.guide, build_elbo("iwae-dreg", 3), 1e-3)
    with pytest.raises(EstimatorNotApplicable, match="inverting it.*use --estimator iwae"):
        engine.step(x=torch.bernoulli(torch.full((4, 1, 2, 2), 0.4, dtype=torch.float64)), num_data=4)
    build_engine("module", flow, flow.model, flow.guide, build_elbo("iwae", 3), 1e-3).step(
        x=torch.bernoulli(torch.full((4, 1, 2, 2), 0.4, dtype=torch.float64)), num_data=4)  # plain IWAE trains it


@pytest.mark.slow
def test_the_two_layer_vae_has_gaps_over_both_its_latent_sites():
    from pyro_vae import ModelConfig, build_model
    from pyro_vae.posterior import SiteFamily, gap_family

    program = build_model(ModelConfig(model="vae2", z_dim=2, z2_dim=2, hidden_dims=(8,), z2_hidden_dims=(4,)),
                          (1, 4, 4))
    x = torch.bernoulli(torch.full((6, 1, 4, 4), 0.4), generator=torch.Generator().manual_seed(0))
    family = gap_family(program)
    family.parameters(x)  # the family reads its sites from the guide's draws
    assert isinstance(family, SiteFamily) and [name for name, _, _ in family.sites] == ["z1", "z2"]
    gaps, se = gaps_with_standard_errors(program, x, 200, 200, max_steps=300)
    assert_the_gaps_are_the_differences_of_the_terms(gaps)
    # log p(x) >= its importance-sampled bound with q* >= L[q*] in expectation: per image, up to their noise
    assert (gaps.log_px - gaps.elbo_optimal > -4 * torch.sqrt(se["log_px"] ** 2 + se["elbo_optimal"] ** 2)).all()
    # (L[q*] >= L[q] need not hold: independent Gaussians over z1 and z2 are a narrower family
    # than the guide's q(z1|x) q(z2|z1); SiteFamily's docstring)
