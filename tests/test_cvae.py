"""Quadrant completion (Pyro's CVAE tutorial, Sohn et al. 2015): the split of each image,
the --quadrants setting, the conditional ELBO against Pyro's and a hand computation, and
the family end to end from the command line."""

import json
import math
import shutil

import pyro
import pytest
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO, TraceMeanField_ELBO
from torch.distributions import Bernoulli, Normal, kl_divergence

from pyro_vae import ModelConfig, build_model, load_run
from pyro_vae.cli import main
from pyro_vae.config import ModelConfig as Config
from pyro_vae.evaluate import elbo_terms, log_px_importance
from pyro_vae.models.cvae import quadrant_mask
from pyro_vae.rng import forked_rng

SHAPE = (1, 4, 4)
# the tutorial's masks (its MaskImages): 1 shows the bottom-left quadrant, 2 the left half, 3 all but bottom-right
SHOWN = {1: [[0, 0, 0, 0], [0, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]],
         2: [[1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]],
         3: [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 0, 0]]}


@pytest.mark.parametrize("quadrants", [1, 2, 3])
def test_the_tutorials_quadrants_are_shown(quadrants):
    assert quadrant_mask(SHAPE, quadrants)[0].int().tolist() == SHOWN[quadrants]
    assert int(quadrant_mask((1, 28, 28), quadrants).sum()) == 196 * quadrants


@pytest.mark.parametrize("model", ["cvae", "cvae-baseline"])
@pytest.mark.parametrize("quadrants", [1, 2, 3])
@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 28, 20), (3, 5, 7)])
def test_no_pixel_is_both_shown_and_hidden(model, quadrants, shape):
    program = build_model(ModelConfig(model=model, quadrants=quadrants, z_dim=2, hidden_dims=(8,)), shape)
    shown, hidden = set(program.shown_index.tolist()), set(program.hidden_index.tolist())
    assert not shown & hidden and shown | hidden == set(range(math.prod(shape)))
    assert shown and hidden
    assert torch.equal(program.hidden_mask, ~quadrant_mask(shape, quadrants))
    x = torch.arange(math.prod(shape), dtype=torch.float64).reshape(1, *shape)  # each pixel its own value
    x_shown, x_hidden = program.split(x.reshape(1, -1))
    assert sorted(x_shown[0].tolist() + x_hidden[0].tolist()) == list(range(math.prod(shape)))
    assert torch.equal(program.fill(x, x_hidden.unsqueeze(0))[0], x)  # the hidden pixels put back where they were


@pytest.mark.parametrize("quadrants", [0, 4, -1])
def test_quadrants_outside_1_to_3_is_a_clear_error(quadrants, capsys):
    with pytest.raises(ValueError, match=rf"quadrants must be 1, 2 or 3 \(.*\), got {quadrants}"):
        Config(model="cvae", quadrants=quadrants)
    with pytest.raises(SystemExit) as stop:
        main(["train", "--model", "cvae", "--quadrants", str(quadrants)])
    assert stop.value.code == 2
    assert f"argument --quadrants: expected 1, 2 or 3, got {quadrants}" in capsys.readouterr().err


def test_quadrants_and_baseline_belong_to_quadrant_completion():
    with pytest.raises(ValueError, match="--quadrants sets the quadrants shown .* model 'vae' does not have one. Use "
                                         "--model cvae"):
        build_model(ModelConfig(model="vae", quadrants=2), (1, 28, 28))
    with pytest.raises(ValueError, match="--baseline .* model 'cvae-baseline' does not have one"):
        build_model(ModelConfig(model="cvae-baseline", baseline="somewhere"), (1, 28, 28))
    build_model(ModelConfig(model="cvae", quadrants=3, baseline="somewhere"), (1, 28, 28))  # (read when training starts)


def hand_terms(program, x, z):
    """log p(x_hidden | z), KL(q(z | x) || p(z | x_shown)) in closed form, and the one-draw
    log p(x_hidden, z | x_shown) - log q(z | x), per image, written out with torch alone."""
    flat = x.reshape(x.shape[0], -1)
    mask = quadrant_mask(SHAPE, program.quadrants).reshape(-1)
    shown, hidden = flat[:, mask], flat[:, ~mask]
    condition = shown
    if program.baseline is not None:  # the baseline's guess of the hidden pixels, beside the shown ones
        condition = torch.cat([shown, torch.sigmoid(program.baseline(shown))], -1)
    prior = Normal(*program.prior_net(condition))
    posterior = Normal(*program.recognition_net(flat))
    log_lik = Bernoulli(logits=program.generation_net(z)).log_prob(hidden).sum(-1)
    kl = kl_divergence(posterior, prior).sum(-1)
    one_draw = log_lik + prior.log_prob(z).sum(-1) - posterior.log_prob(z).sum(-1)
    return log_lik, kl, one_draw


@pytest.mark.parametrize("baseline", [False, True])
def test_the_conditional_elbo_is_pyros_and_the_hand_written_one(baseline):
    torch.manual_seed(0)
    config = ModelConfig(model="cvae", quadrants=1, z_dim=3, hidden_dims=(8,), baseline="unused" if baseline else None)
    program = build_model(config, SHAPE).double()
    x = torch.bernoulli(torch.full((6, *SHAPE), 0.4, dtype=torch.float64), generator=torch.Generator().manual_seed(1))
    with forked_rng(5), torch.no_grad():  # the draw of z the scorings below make, first, from the same seed
        z = poutine.trace(program.guide).get_trace(x, num_data=6).nodes["z"]["value"]
        log_lik, kl, one_draw = hand_terms(program, x, z)
    terms = elbo_terms(program.model, program.guide, x, seed=5)
    assert torch.allclose(terms["log_lik"], log_lik, rtol=0, atol=1e-10)
    assert torch.allclose(terms["kl"], kl, rtol=0, atol=1e-10)
    assert torch.allclose(terms["elbo"], log_lik - kl, rtol=0, atol=1e-10)
    # Pyro's own ELBOs of the batch at the same draw: the mean-field one is the sum of the split
    # per image, Trace_ELBO's Monte Carlo KL is the one-draw log-weight written by hand
    with pyro.get_param_store().scope():
        with forked_rng(5):
            meanfield = TraceMeanField_ELBO().loss(program.model, program.guide, x, num_data=6)
        with forked_rng(5):
            trace = Trace_ELBO().loss(program.model, program.guide, x, num_data=6)
    assert meanfield == pytest.approx(-float(terms["elbo"].sum()), rel=0, abs=1e-9)
    assert trace == pytest.approx(-float(one_draw.sum()), rel=0, abs=1e-9)
    # told a data set of 60 images, Pyro scales the minibatch by 10: the per-image numbers do not move
    again = elbo_terms(program.model, program.guide, x, seed=5, num_data=60)
    assert torch.allclose(again["elbo"], terms["elbo"], rtol=0, atol=1e-10)
    # the importance-sampled bound is of log p(x_hidden | x_shown): with K = 1, the one-draw log-weight
    with forked_rng(5), torch.no_grad():
        z1 = poutine.trace(program.guide).get_trace(x, num_data=6).nodes["z"]["value"]
        by_hand = hand_terms(program, x, z1)[2]
    assert torch.allclose(log_px_importance(program.model, program.guide, x, num_samples=1, seed=5), by_hand,
                          rtol=0, atol=1e-10)


def test_the_baseline_is_its_own_exact_log_likelihood():
    torch.manual_seed(0)
    program = build_model(ModelConfig(model="cvae-baseline", quadrants=2, hidden_dims=(8,)), SHAPE).double()
    x = torch.bernoulli(torch.full((5, *SHAPE), 0.5, dtype=torch.float64), generator=torch.Generator().manual_seed(2))
    mask = quadrant_mask(SHAPE, 2).reshape(-1)
    flat = x.reshape(5, -1)
    with torch.no_grad():
        exact = Bernoulli(logits=program.network(flat[:, mask])).log_prob(flat[:, ~mask]).sum(-1)
    terms = elbo_terms(program.model, program.guide, x)
    assert torch.allclose(terms["elbo"], exact, rtol=0, atol=1e-10) and torch.equal(terms["kl"], torch.zeros(5,
                                                                                                       dtype=torch.float64))
    assert torch.allclose(log_px_importance(program.model, program.guide, x, num_samples=7), exact, rtol=0, atol=1e-10)


TINY = ["--train-limit", "300", "--test-limit", "60", "--epochs", "1", "--batch-size", "100", "--hidden-dims", "32",
        "--activation", "relu", "--device", "cpu", "--no-progress"]


@pytest.mark.slow
def test_the_family_end_to_end_from_the_command_line(tmp_path, data_dir, capsys):
    """Baseline, then the CVAE on it (--baseline), 1 quadrant shown; evaluate, plot, gaps and
    train --resume on both, as a user types them."""
    data = ["--data-dir", str(data_dir)]
    baseline, cvae = tmp_path / "baseline", tmp_path / "cvae"
    assert main(["train", "--model", "cvae-baseline", "--quadrants", "1", *TINY, *data, "--out", str(baseline)]) == 0
    # a baseline of another task is refused, naming the difference
    assert main(["train", "--model", "cvae", "--quadrants", "2", "--baseline", str(baseline), "--z-dim", "4", *TINY,
                 *data, "--out", str(tmp_path / "wrong")]) == 1
    assert "was trained with quadrants 1, this cvae has 2" in capsys.readouterr().err
    assert main(["train", "--model", "cvae", "--quadrants", "1", "--baseline", str(baseline), "--z-dim", "4", *TINY,
                 *data, "--out", str(cvae)]) == 0
    stored = json.loads((cvae / "config.json").read_text())["model"]
    assert stored["model"] == "cvae" and stored["quadrants"] == 1 and stored["baseline"] == str(baseline)
    # the baseline's network is in the CVAE's run, as trained, and training left it alone
    guess = load_run(baseline, device="cpu").program.network.state_dict()
    run = load_run(cvae, device="cpu")
    copied = run.program.baseline.state_dict()
    assert copied.keys() == guess.keys() and all(torch.equal(copied[k], guess[k]) for k in guess)
    capsys.readouterr()

    # evaluate: numbers of log p(x_hidden | x_shown), said so
    assert main(["evaluate", str(cvae), "--num-samples", "20", "--limit", "30", "--json", *data]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["bounds"] == "log p(x_hidden | x_shown)" and report["num_images"] == 30
    assert report["elbo"]["mean"] <= report["log_px_is20"]["mean"] + 3 * report["log_px_is20"]["stderr"]
    assert 0 < -report["log_px_is20"]["mean"] < 588 * math.log(2)  # below a coin per hidden pixel
    assert main(["evaluate", str(baseline), "--num-samples", "5", "--limit", "30", *data]) == 0
    out = capsys.readouterr().out
    assert "bounds on log p(x_hidden | x_shown)" in out and "the 588 hidden pixels of each image given its 196 " \
        "shown ones (the bottom-left quadrant shown)" in out
    assert "active units" not in out  # (no latent)

    # plot: the completion figure, and what the family cannot draw said in a line each
    assert main(["plot", str(cvae), "--limit", "20", *data]) == 0
    out = capsys.readouterr().out
    assert "wrote " + str(cvae / "figures" / "completion.png") in out and "skipped samples:" in out
    assert main(["plot", str(baseline), "--kind", "completion", "--limit", "12", *data]) == 0
    assert (baseline / "figures" / "completion.png").stat().st_size > 0
    capsys.readouterr()

    # gaps: the CVAE's inference gaps; the baseline, without a latent, has none
    assert main(["gaps", str(cvae), "--limit", "4", "--num-samples", "20", "--max-steps", "100", "--json",
                 *data]) == 0
    gaps = json.loads(capsys.readouterr().out)
    assert gaps["num_images"] == 4 and math.isfinite(gaps["inference_gap"]["mean"])
    assert main(["gaps", str(baseline), "--limit", "4", *data]) == 1
    assert "guide samples no latent" in capsys.readouterr().err

    # train --resume: one more epoch of each, the baseline folder no longer needed by the CVAE
    moved = tmp_path / "elsewhere"
    shutil.move(baseline, moved)
    for run_dir in (moved, cvae):
        assert main(["train", "--resume", str(run_dir), "--epochs", "2", "--no-progress"]) == 0
        assert [json.loads(line)["epoch"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    again = load_run(cvae, device="cpu").program.baseline.state_dict()
    assert all(torch.equal(again[k], guess[k]) for k in guess)  # frozen through the resumed epoch too
