"""Annealed importance sampling and bidirectional Monte Carlo against exact log p(x).

The reference is a linear-Gaussian model, z ~ N(0, I), x | z ~ N(W z + b, s^2 I), whose
marginal N(b, W W^T + s^2 I) and posterior are known in closed form.
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from torch import nn

from pyro_vae.ais import AISError, Path, Schedule, _adapt, ais_log_px, evaluate_ais, hmc, reverse_ais_log_px, simulate
from pyro_vae.models import data_plate


class LinearGaussian(nn.Module):
    def __init__(self, z_dim=2, x_dim=5, noise=0.3):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.W = nn.Parameter(torch.randn(x_dim, z_dim, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(x_dim, generator=g, dtype=torch.float64))
        self.noise, self.z_dim = noise, z_dim

    def model(self, x, num_data=None):
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.z_dim, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.noise).to_event(1), obs=x)

    def guide(self, x, num_data=None):
        with data_plate(x, num_data):
            pyro.sample("z", dist.Normal(torch.zeros(x.shape[0], self.z_dim, dtype=x.dtype), 1.0).to_event(1))

    def log_px(self, x):
        cov = self.W @ self.W.T + self.noise**2 * torch.eye(self.W.shape[0], dtype=x.dtype)
        return dist.MultivariateNormal(self.b, cov).log_prob(x).detach()

    def posterior(self, x):
        """Mean and covariance of p(z | x) (one image)."""
        precision = torch.eye(self.z_dim, dtype=x.dtype) + self.W.T @ self.W / self.noise**2
        cov = torch.linalg.inv(precision)
        return (cov @ self.W.T @ (x - self.b) / self.noise**2).detach(), cov.detach()


@pytest.fixture(scope="module")
def simulated():
    torch.manual_seed(0)
    program = LinearGaussian()
    x, posterior = simulate(program.model, torch.zeros(40, 5, dtype=torch.float64))
    return program, x, posterior, program.log_px(x)


def mean_and_se(values):
    values = values.detach()
    return float(values.mean()), float(values.std() / math.sqrt(values.numel()))


def test_simulate_draws_images_from_the_model_with_the_latents_that_made_them(simulated):
    program, x, posterior, _ = simulated
    assert x.shape == (40, 5) and posterior["z"].shape == (40, 2)
    residual = ((x - posterior["z"] @ program.W.T - program.b) / program.noise).detach()  # N(0, 1) noise
    m, se = mean_and_se(residual.flatten())
    assert abs(m) < 4 * se and abs(float(residual.std()) - 1) < 4 / math.sqrt(2 * residual.numel())


@pytest.mark.slow
def test_ais_brackets_the_exact_log_px_and_more_steps_narrow_the_sandwich(simulated):
    program, x, posterior, exact = simulated
    torch.manual_seed(1)
    gaps = {}
    for steps in (10, 100):
        schedule = Schedule(steps=steps, chains=8, leapfrog=3, step_size=0.1)
        forward = ais_log_px(program.model, x, schedule)
        reverse = reverse_ais_log_px(program.model, x, posterior, schedule, step_sizes=forward.step_size)
        low, low_se = mean_and_se(forward.log_px - exact)
        high, high_se = mean_and_se(reverse.log_px - exact)
        assert low < 4 * low_se  # a lower bound in expectation
        assert high > -4 * high_se  # an upper bound in expectation
        gaps[steps] = reverse.log_px - forward.log_px
    # with 100 distributions forward AIS is within its standard errors of the exact value
    assert abs(low) < 4 * low_se
    narrow, narrow_se = mean_and_se(gaps[100])
    wide, wide_se = mean_and_se(gaps[10])
    assert wide - narrow > 4 * math.hypot(wide_se, narrow_se)


def test_hmc_leaves_the_posterior_invariant(simulated):
    program, x, _, _ = simulated
    image = x[:1]
    loc, cov = program.posterior(image[0])
    chains = 4000
    path = Path(program.model, image, chains, depth=1)
    torch.manual_seed(2)
    start = dist.MultivariateNormal(loc, cov).sample((chains, 1))
    state = path.evaluate(path.flatten({"z": start}))
    step_size = torch.full((chains, 1), 0.15, dtype=torch.float64)
    accepted = []
    for _ in range(10):
        state, accept_prob = hmc(path, state, 1.0, step_size, leapfrog=5)
        accepted.append(float(accept_prob.mean()))
    z = state.u[:, 0]
    sd = cov.diagonal().sqrt()
    assert ((z.mean(0) - loc).abs() < 4 * sd / math.sqrt(chains)).all()
    # the variance of each coordinate within 4 standard errors (sqrt(2 / n) relative) of the exact one
    assert ((z.var(0) / cov.diagonal() - 1).abs() < 4 * math.sqrt(2 / chains)).all()
    assert 0.3 < sum(accepted) / len(accepted) < 1.0  # the transitions moved


@pytest.mark.slow
def test_the_step_size_adaptation_reaches_its_target_acceptance():
    # an isotropic posterior (W = 2 I, unit noise: covariance I / 5), where the acceptance
    # rate falls smoothly with the step size; on a stiff one it falls off a cliff at the
    # leapfrog's stability limit, and the adaptation oscillates across the cliff
    program = LinearGaussian(z_dim=3, x_dim=3, noise=1.0)
    with torch.no_grad():
        program.W.copy_(2 * torch.eye(3, dtype=torch.float64))
    torch.manual_seed(3)
    x, _ = simulate(program.model, torch.zeros(4, 3, dtype=torch.float64))
    path = Path(program.model, x, 50, depth=1)
    state = path.evaluate(path.flatten({"z": path.start.nodes["z"]["value"]}))
    for start in (0.005, 1.5):  # far too small, far too large
        step_size, history = torch.full((4,), start, dtype=torch.float64), []
        for _ in range(150):  # adapting, as the tuning run does, here at the posterior (beta = 1)
            state, accept_prob = hmc(path, state, 1.0, step_size.expand(50, 4), leapfrog=3)
            step_size = _adapt(step_size, accept_prob, 0.65)
            history.append(step_size.log())
        settled = torch.stack(history[-60:]).mean(0).exp()
        rates = []
        for _ in range(40):  # then frozen where it settled
            state, accept_prob = hmc(path, state, 1.0, settled.expand(50, 4), leapfrog=3)
            rates.append(accept_prob.mean(0))
        assert ((torch.stack(rates).mean(0) - 0.65).abs() < 0.05).all(), torch.stack(rates).mean(0)


def test_simulation_needs_a_model_that_observes_one_site():
    class TwoObserved(LinearGaussian):
        def model(self, x, num_data=None):
            with data_plate(x, num_data):
                z = pyro.sample("z", dist.Normal(torch.zeros(self.z_dim, dtype=x.dtype), 1.0).to_event(1))
                pyro.sample("x", dist.Normal(z @ self.W.T + self.b, self.noise).to_event(1), obs=x)
                pyro.sample("x2", dist.Normal(z @ self.W.T, 1.0).to_event(1), obs=x)

    with pytest.raises(AISError, match="observes one site"):
        simulate(TwoObserved().model, torch.zeros(3, 5, dtype=torch.float64))


def test_the_schedule_is_sigmoidal_from_0_to_1():
    betas = Schedule(steps=100).betas()
    assert betas[0] == 0 and betas[-1] == 1 and (betas.diff() > 0).all()
    steps = betas.diff()
    assert steps[0] < steps[50] and steps[-1] < steps[50]  # dense at both ends


def test_evaluate_ais_resumes_a_killed_evaluation_with_the_same_numbers(simulated, tmp_path):
    program, x, _, _ = simulated
    schedule = Schedule(steps=10, chains=2, leapfrog=2, step_size=0.1)
    straight = evaluate_ais(program, x[:12], schedule, batch_size=4, seed=5)
    store = tmp_path / "ais.pt"
    calls = []

    def die_in_the_third_batch(t):
        calls.append(t)
        if len(calls) > 2 * 2 * schedule.steps:  # (tuning and estimate) x two batches
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        evaluate_ais(program, x[:12], schedule, batch_size=4, seed=5, store=store, progress=die_in_the_third_batch)
    from pyro_vae import checkpoint

    assert sorted(checkpoint.load(store)["batches"]) == [0, 1]
    resumed = evaluate_ais(program, x[:12], schedule, batch_size=4, seed=5, store=store)
    for key, value in straight.items():
        if key != "seconds":
            assert torch.equal(resumed[key], value), key


class DiscreteLatent(LinearGaussian):
    def model(self, x, num_data=None):
        with data_plate(x, num_data):
            c = pyro.sample("c", dist.Bernoulli(torch.full((x.shape[0],), 0.5, dtype=x.dtype)))
            pyro.sample("x", dist.Normal(c.unsqueeze(-1) + self.b, 1.0).to_event(1), obs=x)


class GlobalLatent(LinearGaussian):
    def model(self, x, num_data=None):
        shift = pyro.sample("shift", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Normal(torch.zeros(self.z_dim, dtype=x.dtype), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z @ self.W.T + self.b + shift.unsqueeze(-1), self.noise).to_event(1), obs=x)


@pytest.mark.parametrize("klass, reason", [(DiscreteLatent, "discrete"), (GlobalLatent, "outside the 'data' plate")])
def test_programs_ais_cannot_anneal_are_refused_with_the_reason(klass, reason):
    x = torch.zeros(3, 5, dtype=torch.float64)
    with pytest.raises(AISError, match=reason):
        ais_log_px(klass().model, x, Schedule(steps=5, chains=2))


class PositiveLatent(nn.Module):
    """z ~ Gamma(3, 2), x | z ~ N(z, 0.5): a constrained latent, annealed in log space."""

    def model(self, x, num_data=None):
        with data_plate(x, num_data):
            z = pyro.sample("z", dist.Gamma(torch.tensor(3.0, dtype=x.dtype), 2.0))
            pyro.sample("x", dist.Normal(z, 0.5), obs=x)


@pytest.mark.slow
def test_a_constrained_latent_is_annealed_with_its_jacobian():
    x = torch.tensor([0.3, 1.2, 2.5], dtype=torch.float64)
    grid = torch.linspace(1e-6, 20, 400_001, dtype=torch.float64)
    joint = dist.Gamma(3.0, 2.0).log_prob(grid)[:, None] + dist.Normal(grid[:, None], 0.5).log_prob(x)
    exact = torch.logsumexp(joint, 0) + math.log(float(grid[1] - grid[0]))  # quadrature
    torch.manual_seed(4)
    result = ais_log_px(PositiveLatent().model, x, Schedule(steps=200, chains=64, leapfrog=5, step_size=0.3))
    se = result.mc_variance.sqrt()
    assert ((result.log_px - exact).abs() < 4 * se + 0.02).all()


# -- from the command line -----------------------------------------------------------------

AIS_FLAGS = ["--ais-steps", "20", "--chains", "2", "--leapfrog", "2", "--batch-size", "3"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, data_dir):
    from pyro_vae.cli import main

    run = tmp_path_factory.mktemp("ais") / "run"
    assert main(["train", "--train-limit", "300", "--test-limit", "20", "--batch-size", "50", "--z-dim", "3",
                 "--hidden-dims", "16", "--epochs", "2", "--data-dir", str(data_dir), "--device", "cpu",
                 "--no-progress", "--out", str(run)]) == 0
    return run


@pytest.mark.slow
def test_evaluate_method_ais_and_gaps_with_ais_end_to_end(tiny_run, capsys):
    import json

    from pyro_vae.cli import main

    assert main(["evaluate", str(tiny_run), "--method", "ais", "--limit", "6", *AIS_FLAGS, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert "log_px_is5000" not in report and report["ais"]["schedule"]["steps"] == 20
    assert 0 < report["ais"]["acceptance"] < 1
    stored = list((tiny_run / "ais").glob("ais-*.pt"))
    assert len(stored) == 1  # the finished batches, for a resume
    assert main(["evaluate", str(tiny_run), "--method", "ais", "--limit", "6", *AIS_FLAGS]) == 0
    text = capsys.readouterr().out
    assert f"log_px_ais       {report['log_px_ais']['mean']:.3f}" in text  # the same numbers, read back
    assert "note: AIS: 20 distributions, 2 chains, 2 leapfrog steps" in text
    assert main(["gaps", str(tiny_run), "--log-px", "ais", "--limit", "6", *AIS_FLAGS, "--num-samples", "20",
                 "--max-steps", "100", "--json"]) == 0
    gaps = json.loads(capsys.readouterr().out)
    assert gaps["log_px"]["mean"] == pytest.approx(report["log_px_ais"]["mean"], abs=1e-9)
    # the approximation gap is measured from the AIS log p(x)
    assert gaps["approximation_gap"]["mean"] == pytest.approx(report["log_px_ais"]["mean"] - gaps["elbo_optimal"]["mean"],
                                                              abs=1e-9)


def test_bdmc_end_to_end(tiny_run, capsys):
    import json

    from pyro_vae.cli import main

    assert main(["bdmc", str(tiny_run), "--num", "6", *AIS_FLAGS, "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["num_images"] == 6 and out["gap"]["mean"] == pytest.approx(out["upper"]["mean"] - out["lower"]["mean"])
    assert out["gap"]["mean"] > 0  # a short schedule: a wide sandwich
    assert main(["bdmc", str(tiny_run), "--num", "6", *AIS_FLAGS]) == 0
    text = capsys.readouterr().out
    assert "log p(x) >=" in text and "log p(x) <=" in text and "6 images simulated from the model" in text


def test_the_cli_defaults_are_the_schedules():
    from pyro_vae.cli import AIS_DEFAULTS

    assert AIS_DEFAULTS == {"steps": Schedule().steps, "chains": Schedule().chains, "leapfrog": Schedule().leapfrog}


@pytest.mark.slow
def test_the_cost_script_runs_in_its_smoke_mode(tiny_run, tmp_path, data_dir):
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path as FilePath

    script = FilePath(__file__).resolve().parents[1] / "experiments" / "ais_cost.py"
    env = dict(os.environ, PYRO_VAE_DATA=str(data_dir), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, str(script), "--run", str(tiny_run), "--images", "3", "--smoke", "--json",
                           str(tmp_path / "cost.json")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "cost.json").read_text())["rows"]
    assert [(r["steps"], r["chains"]) for r in rows] == [(10, 2), (10, 4)]
    assert all(r["seconds_per_image"] > 0 and 0 < r["decoder_share"] for r in rows)
