"""The contract every registered model family and likelihood keeps.

Parametrised over the registries themselves: a family or likelihood added with one
registry line gets every test here without a line of test code. The trace test runs over
every model x likelihood pair; the longer ones over a covering set of pairs in which every
model and every likelihood appear (:func:`covering`).
"""

import itertools
import math

import pyro
import pytest
import torch
from pyro import poutine

from pyro_vae import ModelConfig, TrainConfig, build_model, fit, load_run
from pyro_vae.data import ImageData
from pyro_vae.evaluate import elbo_terms, log_px_importance
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.models import MODELS, ProgramCall
from pyro_vae.models.cvae import quadrant_mask
from pyro_vae.objectives import build_elbo, sample_sites
from pyro_vae.steps import build_engine

SHAPE = (1, 4, 4)
FAMILIES = list(itertools.product(MODELS.names(), LIKELIHOODS.names()))
IDS = [f"{m}-{lik}" for m, lik in FAMILIES]


def covering(pairs):
    """Pairs in which every model and every likelihood appear: each model with the first
    likelihood it is paired with, then each likelihood not yet met with the first model
    that takes it. The tests that train or sample at length run over these (a pair per
    model and per further likelihood, not their product); the trace test runs over every
    pair, so a family that cannot be built with some likelihood is still caught at once."""
    chosen = [next(p for p in pairs if p[0] == m) for m in dict.fromkeys(m for m, _ in pairs)]
    for lik in dict.fromkeys(lik for _, lik in pairs):
        if not any(p[1] == lik for p in chosen):
            chosen.append(next(p for p in pairs if p[1] == lik))
    return chosen


COVERING = covering(FAMILIES)
COVERING_IDS = [f"{m}-{lik}" for m, lik in COVERING]
LATENT_FREE = {"cvae-baseline"}  # families without a latent: their ELBO is their log-likelihood exactly


def program_of(model, likelihood, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(model=model, likelihood=likelihood, z_dim=2, hidden_dims=(8,)), SHAPE)


def observed_part(program, x):
    """``{site: value}`` of what a family observes of the images ``x``: the whole image as
    ``"x"``, or (quadrant completion) the hidden pixels as ``"x_hidden"``, the shown ones
    being what it is conditioned on."""
    flat = x.reshape(x.shape[0], -1)
    if getattr(program, "quadrants", None) is None:
        return {"x": flat}
    return {"x_hidden": flat[:, ~quadrant_mask(SHAPE, program.quadrants).reshape(-1)]}


def data_for(program, n, seed=1):
    """Images the program's likelihood can score: binary pixels, grey values in [0, 1], or
    8-bit values k / 255 (for a likelihood of the 256 pixel values)."""
    gen = torch.Generator().manual_seed(seed)
    grey = torch.rand((n, *SHAPE), generator=gen)
    if getattr(program.likelihood, "levels", None) is not None:
        return (grey * 255).round() / 255
    return torch.bernoulli(grey, generator=gen) if program.binary_data else grey


@pytest.mark.parametrize("model,likelihood", FAMILIES, ids=IDS)
def test_trace_sites_and_shapes(model, likelihood):
    program = program_of(model, likelihood)
    x = data_for(program, 5)
    guide_trace = poutine.trace(program.guide).get_trace(x, num_data=50)
    model_trace = poutine.trace(poutine.replay(program.model, trace=guide_trace)).get_trace(x, num_data=50)
    model_sites = {s["name"]: s for s in sample_sites(model_trace)}
    observed = {name: s["value"] for name, s in model_sites.items() if s["is_observed"]}
    expected = observed_part(program, x)
    assert observed.keys() == expected.keys() and all(torch.equal(observed[k], v) for k, v in expected.items())
    latent = [s["name"] for s in sample_sites(guide_trace)]
    assert set(latent) <= set(model_sites)  # every latent the guide samples, the model scores
    assert bool(latent) == (model not in LATENT_FREE)
    assert set(model_sites) == set(latent) | set(observed)  # and the model has no latent the guide lacks
    model_trace.compute_log_prob()
    for site in model_sites.values():  # per image, in the "data" plate told the full size
        assert site["log_prob"].shape == (5,)
        assert [f.name for f in site["cond_indep_stack"]] == ["data"] and site["scale"] == 50 / 5
        assert torch.isfinite(site["log_prob"]).all()


@pytest.mark.slow
@pytest.mark.parametrize("model,likelihood", COVERING, ids=COVERING_IDS)
def test_elbo_is_below_the_importance_sampled_bound_in_expectation(model, likelihood):
    """log p(x) >= IS bound >= ELBO, and for these untrained programs the second gap is
    real: q(z|x) is not the posterior, so the mean gap over the images is many standard
    errors above 0 (measured: 6 to 30 standard errors, by family). A bound that degenerated to the
    ELBO would give a gap of 0 +- noise and fail."""
    program = program_of(model, likelihood).double()
    if program.point_estimate:
        pytest.skip(f"{model}: a point-mass guide has no ELBO and no importance-sampled bound")
    n, reps = 20, 200
    x = data_for(program, n).double()
    # 200 independent one-sample ELBOs of each image, drawn in one batch of its copies
    elbos = elbo_terms(program.model, program.guide, x.repeat(reps, 1, 1, 1), batch_size=reps * n, seed=0)["elbo"]
    elbos = elbos.reshape(reps, n)
    elbo = elbos.mean(0)  # E_q[log p(x, z) - log q(z|x)] per image, to Monte Carlo precision
    log_px = log_px_importance(program.model, program.guide, x, num_samples=2000, seed=1)
    if model in LATENT_FREE:  # no latent: the ELBO and the bound are the log-likelihood itself
        assert torch.allclose(log_px, elbos[0], rtol=1e-12, atol=1e-12) and torch.equal(elbos.std(0) == 0,
                                                                                         torch.ones(n, dtype=bool))
        return
    gap = log_px - elbo
    stderr = elbos.std(0) / math.sqrt(reps)
    assert (gap > -4 * stderr - 1e-6).all(), (gap, stderr)  # per image: non-negative up to noise
    gap_stderr = gap.std() / math.sqrt(n)  # over the images: their spread and the noise in each
    assert gap.mean() > 4 * gap_stderr, (gap.mean(), gap_stderr)


@pytest.mark.parametrize("model,likelihood", COVERING, ids=COVERING_IDS)
def test_importance_sampling_replayed_is_the_traced_one(model, likelihood):
    # The model's own methods are recorded (with the batch's encoder work done once per
    # batch); plain functions are traced at every chunk. Same draws, same values.
    program = program_of(model, likelihood).double()
    if program.point_estimate:
        pytest.skip(f"{model}: a point-mass guide has no importance-sampled bound")
    x = data_for(program, 9).double()
    kw = dict(num_samples=60, batch_size=4, max_elements=40, seed=3)
    replayed = log_px_importance(program.model, program.guide, x, **kw)
    traced = log_px_importance(lambda *a, **k: program.model(*a, **k), lambda *a, **k: program.guide(*a, **k), x, **kw)
    assert torch.allclose(replayed, traced, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("model,likelihood", COVERING, ids=COVERING_IDS)
def test_recorded_step_is_the_eager_step_bit_for_bit(model, likelihood):
    def run(engine_name):
        pyro.clear_param_store()
        program = program_of(model, likelihood)
        engine = build_engine(engine_name, program, program.model, program.guide, build_elbo(), 1e-2, validate=False)
        data = data_for(program, 24)
        call = ProgramCall(program)
        pyro.set_rng_seed(3)
        with pyro.get_param_store().scope():
            losses = [engine.step(**call.kwargs({"x": data[(i % 3) * 8:(i % 3 + 1) * 8]}, num_data=24, kl_weight=0.7))
                      for i in range(6)]
            engine.check()
        return program, torch.stack(losses), engine

    a, la, captured = run("captured")
    b, lb, _ = run("module")
    assert captured.loss_fn.eager_reason is None and captured.loss_fn.graphs
    assert torch.equal(la, lb)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def short_fit(program, run_dir, epochs, **kw):
    data = data_for(program, 48)
    test = data_for(program, 16, seed=2)
    settings = TrainConfig(epochs=epochs, batch_size=16, device="cpu", eval_batch_size=100, lr=1e-2)
    return fit(program, ImageData(data, None, program.binary_data), run_dir, test=test, settings=settings,
               progress=False, log=lambda line: None, **kw)


@pytest.mark.slow
@pytest.mark.parametrize("model,likelihood", COVERING, ids=COVERING_IDS)
def test_checkpoint_round_trip_and_exact_resume(model, likelihood, tmp_path):
    straight = short_fit(program_of(model, likelihood), tmp_path / "straight", 2)
    # the checkpoint holds every learned tensor: the loaded program is the trained one
    loaded = load_run(tmp_path / "straight", device="cpu")
    trained = straight.program.state_dict()
    assert loaded.program.state_dict().keys() == trained.keys()
    for name, value in loaded.program.state_dict().items():
        assert torch.equal(value, trained[name]), name
    # one epoch, then a resume to two, ends where two straight epochs end
    short_fit(program_of(model, likelihood), tmp_path / "resumed", 1)
    resumed = short_fit(program_of(model, likelihood, seed=7), tmp_path / "resumed", 2, resume=True)
    for name, value in resumed.program.state_dict().items():
        assert torch.equal(value, trained[name]), name


@pytest.mark.parametrize("model,likelihood", COVERING, ids=COVERING_IDS)
def test_every_engine_trains_the_same_tensors(model, likelihood):
    """Whatever an engine is, the same learned tensors move (a likelihood's scale included)."""
    moved = {}
    for engine_name in ("svi", "module", "captured"):
        pyro.clear_param_store()
        program = program_of(model, likelihood)
        before = {name: p.detach().clone() for name, p in program.named_parameters()}
        engine = build_engine(engine_name, program, program.model, program.guide, build_elbo(), 1e-2, validate=False)
        x = data_for(program, 8)
        with pyro.get_param_store().scope():
            for _ in range(3):
                engine.step(x=x, num_data=8)
        moved[engine_name] = {name for name, p in program.named_parameters() if not torch.equal(p, before[name])}
    assert moved["svi"] == moved["module"] == moved["captured"]
    learned = {name for name, p in program.named_parameters()}
    # all but the encoder's scale head of a point-mass guide, which nothing reads
    unused = {n for n in learned if n.startswith("encoder.head.raw_scale")} if program.point_estimate else set()
    assert moved["svi"] == learned - unused
