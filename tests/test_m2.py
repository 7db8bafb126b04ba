"""The semi-supervised M2 (pyro_vae.models.m2) and partially labelled data (--labels N).

What is checked against what:
- the enumerated ELBO of a minibatch holding labelled and unlabelled images equals the
  objective written by hand, sum over y included, each part scaled by its own N / b;
- the engines' loss (pyro_vae's TraceEnum estimator, whose expectation reads nothing back
  to the host) is Pyro's TraceEnum_ELBO loss, and the recorded step is the eager one bit for bit;
- --labels N keeps a balanced, seeded subset, records it, restores it on resume, and no
  hidden label reaches the program (a program that records every call);
- the command line trains, resumes, evaluates (with the accuracy), plots (the analogies)
  and measures the gaps of a tiny run.
"""

import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_vae import DataConfig, ModelConfig, TrainConfig, build_model, fit, load_run
from pyro_vae.cli import main
from pyro_vae.data import UNLABELLED, ImageData, TrainingSet, choose_labelled, hide_labels, labelled_per_batch
from pyro_vae.models.m2 import M2, m2_from_config
from pyro_vae.objectives import build_elbo
from pyro_vae.protocol import ProgramCall
from pyro_vae.steps import build_engine

SHAPE = (1, 2, 3)


def tiny(aux_weight=3.0, seed=0):
    torch.manual_seed(seed)
    return build_model(ModelConfig(model="m2", z_dim=2, hidden_dims=(5,), aux_weight=aux_weight), SHAPE).double()


def images(n, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.rand((n, *SHAPE), generator=gen, dtype=torch.float64), generator=gen)


def enumerated_traces(program, **kwargs):
    elbo = build_elbo("traceenum")
    (model_trace, guide_trace), = elbo._get_traces(program.model, program.guide, (), kwargs)
    return model_trace, guide_trace


def by_hand(program, x, y, guide_trace, num_data, num_labelled):
    """J of the minibatch, written out: N_l / b_l times the labelled images' L(x, y) + alpha log q(y|x),
    plus N_u / b_u times the unlabelled images' sum over y of q(y|x) (L(x, y) - log q(y|x)); the
    draws of z are the guide's (one per labelled image, one per class and unlabelled image)."""
    k, flat = program.num_classes, x.reshape(x.shape[0], -1)
    b_l = y.shape[0]
    x_l, x_u = flat[:b_l], flat[b_l:]

    def elbo_given(xx, yy, z):  # L(x, y) at the draw z: log p(x|y,z) + log p(y) + log p(z) - log q(z|x,y)
        loc, scale = program.encoder(xx, yy)
        log_px = dist.Bernoulli(logits=program.decoder(z, yy)).log_prob(xx).sum(-1)
        return (log_px + math.log(1 / k) + dist.Normal(0.0, 1.0).log_prob(z).sum(-1)
                - dist.Normal(loc, scale).log_prob(z).sum(-1))

    log_q = torch.log_softmax(program.classifier(flat), -1)
    labelled = elbo_given(x_l, y, guide_trace.nodes["z_labelled"]["value"]) \
        + program.aux_weight * log_q[:b_l].gather(1, y[:, None]).squeeze(1)
    classes = torch.arange(k).unsqueeze(-1)  # (K, 1): the enumerated values, as Pyro lays them out
    log_q_u = log_q[b_l:].t()  # (K, b_u)
    unlabelled = (log_q_u.exp() * (elbo_given(x_u, classes, guide_trace.nodes["z"]["value"]) - log_q_u)).sum(0)
    return (num_labelled / b_l) * labelled.sum() + (num_data - num_labelled) / (x.shape[0] - b_l) * unlabelled.sum()


def test_enumerated_elbo_of_a_partly_labelled_minibatch_is_the_objective_by_hand():
    from pyro.infer.traceenum_elbo import _compute_dice_elbo

    program, x, y = tiny(), images(5), torch.tensor([3, 7])
    pyro.set_rng_seed(2)
    model_trace, guide_trace = enumerated_traces(program, x=x, y=y, num_data=50, num_labelled=8)
    assert guide_trace.nodes["z"]["value"].shape == (10, 3, 2)  # a draw of z per class and unlabelled image
    value = _compute_dice_elbo(model_trace, guide_trace)  # Pyro's own
    hand = by_hand(program, x, y, guide_trace, num_data=50, num_labelled=8)
    assert torch.allclose(value, hand, rtol=1e-12, atol=1e-10), (value, hand)
    # the scales are each part's own N / b: the labelled plate's 8 / 2, the unlabelled 'data' plate's 42 / 3
    assert model_trace.nodes["x_labelled"]["scale"] == 4.0 and model_trace.nodes["x"]["scale"] == 14.0
    assert model_trace.nodes["aux"]["scale"] == 4.0 * 3.0


def test_each_part_alone_is_its_term_and_a_call_without_labels_bounds_log_px():
    program, x = tiny(), images(4)
    pyro.set_rng_seed(3)
    _, guide_trace = enumerated_traces(program, x=x, y=torch.full((4,), 2), num_data=4, num_labelled=4)
    assert "y" not in guide_trace.nodes and "z" not in guide_trace.nodes  # every image labelled
    # unlabelled only (an evaluation): the sum over y of q(y|x) (L(x, y) - log q(y|x)), i.e. U(x)
    from pyro.infer.traceenum_elbo import _compute_dice_elbo

    pyro.set_rng_seed(4)
    model_trace, guide_trace = enumerated_traces(program, x=x, num_data=4)
    assert {"y", "z", "x"} <= set(model_trace.nodes) and "labelled" not in model_trace.nodes
    z = guide_trace.nodes["z"]["value"]
    flat = x.reshape(4, -1)
    log_q = torch.log_softmax(program.classifier(flat), -1).t()
    classes = torch.arange(10).unsqueeze(-1)
    loc, scale = program.encoder(flat, classes)
    inner = (dist.Bernoulli(logits=program.decoder(z, classes)).log_prob(flat).sum(-1) + math.log(0.1)
             + dist.Normal(0.0, 1.0).log_prob(z).sum(-1) - dist.Normal(loc, scale).log_prob(z).sum(-1))
    u = (log_q.exp() * (inner - log_q)).sum()
    assert torch.allclose(_compute_dice_elbo(model_trace, guide_trace), u, rtol=1e-12)


def test_the_engines_loss_is_pyros_traceenum_loss_and_the_recording_is_the_eager_step():
    from pyro.infer import TraceEnum_ELBO

    program, x, y = tiny(), images(6), torch.tensor([1, 4])
    kwargs = dict(x=x, y=y, num_data=60, num_labelled=10)
    ours = build_elbo("traceenum")
    pyro.set_rng_seed(5)
    mine = ours.differentiable_loss(program.model, program.guide, **kwargs)
    pyro.set_rng_seed(5)
    theirs = TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(program.model, program.guide, **kwargs)
    assert torch.allclose(mine, theirs, rtol=1e-14, atol=0)  # (the dot product's order of additions may differ)

    def run(engine_name):
        pyro.clear_param_store()
        p = tiny().float()
        engine = build_engine(engine_name, p, p.model, p.guide, build_elbo("traceenum"), 1e-2, validate=False)
        call, data = ProgramCall(p), images(12).float()
        pyro.set_rng_seed(6)
        with pyro.get_param_store().scope():
            losses = [engine.step(**call.kwargs({"x": data[(i % 2) * 6:(i % 2 + 1) * 6], "y": y}, num_data=60,
                                                num_labelled=10, kl_weight=0.5 if i % 3 else 1.0))
                      for i in range(6)]
            engine.check()
        return p, torch.stack(losses), engine

    a, la, captured = run("captured")
    b, lb, _ = run("module")
    assert captured.loss_fn.eager_reason is None and len(captured.loss_fn.graphs) == 2  # recorded: no fallback
    assert torch.equal(la, lb)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_probability_of_zero_drops_its_cost_on_the_device():
    """Where q(y|x) is 0 for a class whose cost is infinite, the term is 0, as in Pyro's expectation."""
    from pyro.infer.traceenum_elbo import _compute_dice_elbo

    from pyro_vae.objectives import dice_elbo

    program, x = tiny(), images(3)
    with torch.no_grad():
        program.classifier[-1].bias[3] = -math.inf  # q(y = 3 | x) = 0 exactly
    pyro.set_rng_seed(7)
    model_trace, guide_trace = enumerated_traces(program, x=x, num_data=3)
    mine, theirs = dice_elbo(model_trace, guide_trace), _compute_dice_elbo(model_trace, guide_trace)
    assert torch.isfinite(mine) and torch.allclose(mine, theirs, rtol=1e-12)


def test_labels_are_balanced_seeded_and_reproducible():
    labels = torch.arange(1000) % 10
    labels = labels[torch.randperm(1000, generator=torch.Generator().manual_seed(0))]
    chosen = choose_labelled(labels, 100, seed=3)
    assert chosen.shape == (100,) and chosen.unique().numel() == 100 and torch.equal(chosen, chosen.sort().values)
    assert torch.bincount(labels[chosen], minlength=10).tolist() == [10] * 10
    assert torch.equal(chosen, choose_labelled(labels, 100, seed=3))
    assert not torch.equal(chosen, choose_labelled(labels, 100, seed=4))
    counts = torch.bincount(labels[choose_labelled(labels, 25, seed=3)], minlength=10)
    assert sorted(counts.tolist()) == [2] * 5 + [3] * 5  # as even as 25 allows
    with pytest.raises(ValueError, match="keeps 10 images of class 0, which has 5"):
        choose_labelled(torch.tensor([0] * 5 + [1] * 50), 20, seed=0)
    hidden = hide_labels(ImageData(torch.zeros(1000, 1, 1, 1), labels, True), chosen)
    assert (hidden.labels != UNLABELLED).nonzero().squeeze(1).tolist() == chosen.tolist()


def test_a_mixed_epoch_takes_every_unlabelled_image_once_and_labelled_ones_first_in_each_batch():
    labels = torch.arange(100) % 10
    keep = choose_labelled(labels, 10, seed=0)
    data = hide_labels(ImageData(torch.rand(100, 1, 2, 2), labels, False), keep)
    training = TrainingSet(data, None, seed=1)
    b_l = training.labelled_per_batch(16)
    assert b_l == labelled_per_batch(16, 10, 100) == 2  # an eighth of the batch: more than the share, 1.6
    order = training.mixed_order(0, 16)
    steps = training.num_steps(16, semi_supervised=True)
    assert steps == math.ceil(90 / 14)
    blocks = [order[s * 16:(s + 1) * 16] for s in range(steps)]
    assert all(set(b[:b_l].tolist()) <= set(keep.tolist()) for b in blocks)
    rest = torch.cat([b[b_l:] for b in blocks])
    assert sorted(rest.tolist()) == sorted(set(range(100)) - set(keep.tolist()))  # each once
    assert torch.equal(order, training.mixed_order(0, 16)) and not torch.equal(order, training.mixed_order(1, 16))


class Recording(M2):
    """M2 that records what each training call gives it: the images and the labels."""

    calls: list

    def model(self, x=None, y=None, *, num_data=None, num_labelled=0, kl_weight=1.0, batch_size=None):
        if x is not None and num_labelled:  # (evaluations call it without num_labelled)
            self.calls.append((x.detach().reshape(x.shape[0], -1).clone(), None if y is None else y.clone(),
                               num_labelled))
        return super().model(x, y, num_data=num_data, num_labelled=num_labelled, kl_weight=kl_weight,
                             batch_size=batch_size)


def recording_program():
    torch.manual_seed(0)
    # grey values, scored as they are (not binarised): each image is found again by its pixels
    config = ModelConfig(model="m2", z_dim=2, hidden_dims=(8,), likelihood="continuous-bernoulli")
    program = m2_from_config(config, (1, 28, 28))
    program.__class__ = Recording
    program.calls = []
    return program


DATA = dict(dataset="mnist", train_limit=300, test_limit=50)
SETTINGS = TrainConfig(epochs=2, batch_size=40, device="cpu", estimator="traceenum", eval_batch_size=100)


@pytest.mark.slow
def test_no_hidden_label_reaches_the_program_and_the_subset_is_recorded(tmp_path, data_dir):
    from pyro_vae.data import load_data

    program = recording_program()
    config = DataConfig(**DATA, data_dir=str(data_dir), labels=20)
    # engine module: the model runs at every step (a recorded step would replay its tensor operations only)
    settings = TrainConfig(**{**SETTINGS.__dict__, "engine": "module"})
    fit(program, config, tmp_path / "run", settings=settings, progress=False, log=lambda line: None)
    train = load_data(DataConfig(**DATA, data_dir=str(data_dir)), "train", "cpu")
    position = {row.numpy().tobytes(): i for i, row in enumerate(train.images.reshape(300, -1))}
    assert len(position) == 300  # no two images alike
    record = json.loads((tmp_path / "run" / "labelled.json").read_text())
    kept = set(record["positions"])
    assert record["labels"] == 20 and len(kept) == 20 and record["seed"] == 0
    assert torch.bincount(train.labels[record["positions"]], minlength=10).tolist() == [2] * 10
    seen_unlabelled = []
    for x, y, num_labelled in program.calls:
        index = torch.tensor([position[row.numpy().tobytes()] for row in x])
        b_l = 0 if y is None else y.shape[0]
        assert b_l == 5  # an eighth of the minibatch of 40
        assert set(index[:b_l].tolist()) <= kept and not set(index[b_l:].tolist()) & kept
        assert torch.equal(y, train.labels[index[:b_l]])  # the true labels of labelled images, and no others
        assert num_labelled == 20
        seen_unlabelled.append(index[b_l:].tolist())
    # the first call checks the program's tensors on the first minibatch; then 2 epochs of steps
    assert len(program.calls) == 1 + 2 * math.ceil(280 / 35)
    steps = [i for part in seen_unlabelled[1:] for i in part]
    assert sorted(steps) == sorted([i for i in range(300) if i not in kept] * 2)  # each unlabelled image once an epoch
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert state["labelled"].tolist() == record["positions"]


@pytest.mark.slow
def test_a_resumed_run_restores_its_labelled_subset_exactly(tmp_path, data_dir, monkeypatch):
    def run(out, epochs, resume=False):
        program = recording_program()
        config = DataConfig(**DATA, data_dir=str(data_dir), labels=20)
        settings = TrainConfig(**{**SETTINGS.__dict__, "epochs": epochs})
        return fit(program, config, out, settings=settings, resume=resume, progress=False, log=lambda line: None)

    straight = run(tmp_path / "straight", 2)
    run(tmp_path / "resumed", 1)
    import pyro_vae.train

    def refuse(*args, **kwargs):
        raise AssertionError("a resumed run chose its labelled images again")

    monkeypatch.setattr(pyro_vae.train, "choose_labelled", refuse)
    resumed = run(tmp_path / "resumed", 2, resume=True)
    for (name, p), q in zip(straight.program.state_dict().items(), resumed.program.state_dict().values()):
        assert torch.equal(p, q), name
    def accuracies(run):
        lines = (tmp_path / run / "metrics.jsonl").read_text().splitlines()
        return [json.loads(line)["test_accuracy"] for line in lines]

    assert accuracies("resumed") == accuracies("straight")


def test_labels_are_refused_where_they_cannot_be_used(tmp_path, data_dir):
    config = DataConfig(**DATA, data_dir=str(data_dir), labels=20)
    vae = build_model(ModelConfig(z_dim=2, hidden_dims=(8,)), (1, 28, 28))
    with pytest.raises(ValueError, match="not one"):
        fit(vae, config, tmp_path / "vae", settings=SETTINGS, progress=False, log=lambda line: None)
    with pytest.raises(ValueError, match="class"):
        fit(recording_program(), DataConfig(**DATA, data_dir=str(data_dir), labels=299), tmp_path / "many",
            settings=SETTINGS, progress=False, log=lambda line: None)


def test_views_predict_class_decode_every_class_and_the_mixture_mean():
    program, x = tiny(), images(4)
    probs = program.class_probabilities(x)
    assert torch.allclose(probs.sum(-1), torch.ones(4, dtype=torch.float64))
    assert torch.equal(program.predict_class(x), probs.argmax(-1))
    classes = torch.arange(10).unsqueeze(-1)
    locs = program.encoder(x.reshape(4, -1), classes)[0]
    assert torch.allclose(program.posterior_mean(x), (probs.t().unsqueeze(-1) * locs).sum(0))
    z = torch.randn(4, 2, dtype=torch.float64)
    each = torch.stack([program.decode(z, torch.full((4,), c)) for c in range(10)])
    assert torch.allclose(program.decode(z), each.mean(0))
    # the first layer over [v, onehot(y)] is the concatenation's nn.Linear
    first = program.encoder.first
    onehot = torch.nn.functional.one_hot(torch.tensor([2, 5, 0, 9]), 10).double()
    h = first(torch.cat([x.reshape(4, -1), onehot], -1))
    h_fast = torch.nn.functional.linear(x.reshape(4, -1), first.weight[:, :6], first.bias) + \
        first.weight[:, 6:].t()[torch.tensor([2, 5, 0, 9])]
    assert torch.allclose(h, h_fast, rtol=1e-12)


@pytest.mark.slow
def test_the_command_line_trains_resumes_evaluates_plots_and_measures_gaps(tmp_path, data_dir, capsys):
    out = tmp_path / "m2"
    train = ["train", "--model", "m2", "--estimator", "traceenum", "--labels", "20", "--train-limit", "300",
             "--test-limit", "60", "--batch-size", "40", "--hidden-dims", "16", "--z-dim", "4", "--device", "cpu",
             "--data-dir", str(data_dir), "--no-progress"]
    assert main([*train, "--epochs", "1", "--out", str(out)]) == 0
    assert main(["train", "--resume", str(out), "--epochs", "2", "--no-progress"]) == 0
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in metrics] == [1, 2] and all(0 <= m["test_accuracy"] <= 1 for m in metrics)
    capsys.readouterr()
    assert main(["evaluate", str(out), "--num-samples", "20", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["accuracy"]["mean"] == pytest.approx(metrics[-1]["test_accuracy"])
    assert main(["evaluate", str(out), "--num-samples", "20"]) == 0
    assert "accuracy" in capsys.readouterr().out
    assert main(["plot", str(out), "--out", str(tmp_path / "figures")]) == 0
    assert (tmp_path / "figures" / "analogies.png").exists() and (tmp_path / "figures" / "samples.png").exists()
    assert main(["gaps", str(out), "--limit", "4", "--num-samples", "20", "--max-steps", "100", "--json"]) == 0
    gaps = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert gaps["inference_gap"]["mean"] > 0
    run = load_run(out, device="cpu")
    assert isinstance(run.program, M2) and run.config.data.labels == 20


def test_why_two_plates_and_not_pyros_obs_mask():
    """The design's alternative, checked by hand on a 3-class toy: one plate with Pyro's
    ``obs_mask`` on y scores a labelled image right only if the guide masks its enumerated
    ``y_unobserved`` too (else the ELBO gains the entropy of q(y|x) of every labelled image),
    and even then every labelled image is enumerated over all classes (K times the work
    downstream of y) under the one plate's N / B. M2 puts the parts in two plates instead."""
    k = 3  # (float32: Pyro's obs_mask makes its mask's log-densities in the default dtype)
    mu = torch.tensor([-1.0, 0.5, 2.0], requires_grad=True)
    q_logits = torch.tensor([[0.2, -0.3, 0.1], [1.0, 0.0, -1.0]])
    x, y, observed = torch.tensor([0.3, 1.7]), torch.tensor([2, 0]), torch.tensor([True, False])

    def model():
        with pyro.plate("data", 2):
            label = pyro.sample("y", dist.Categorical(logits=torch.zeros(k)), obs=y,
                                obs_mask=observed)
            pyro.sample("x", dist.Normal(mu[label], 1.0), obs=x)

    def guide(masked):
        def guide():
            with pyro.plate("data", 2), pyro.poutine.mask(mask=~observed if masked else True):
                pyro.sample("y_unobserved", dist.Categorical(logits=q_logits), infer={"enumerate": "parallel"})
        return guide

    from pyro.infer import TraceEnum_ELBO

    log_py = math.log(1 / k)
    q = torch.softmax(q_logits[1], -1)
    hand = log_py + dist.Normal(mu[2], 1.0).log_prob(x[0]) \
        + (q * (log_py + dist.Normal(mu, 1.0).log_prob(x[1]) - q.log())).sum()
    entropy = -(torch.softmax(q_logits[0], -1) * torch.log_softmax(q_logits[0], -1)).sum()
    for masked, expected in ((True, hand), (False, hand + entropy)):
        value = -TraceEnum_ELBO(max_plate_nesting=1).differentiable_loss(model, guide(masked))
        assert torch.allclose(value, expected, rtol=1e-6), (masked, value, expected)
