"""One epoch of the semi-supervised M2: pyro_vae against Pyro's own ``ss_vae_M2.py``, timed
side by side in one process, on the same MNIST images and labels.

Both train the tutorial's third variant: y summed out by ``TraceEnum_ELBO`` where it is
unlabelled, the auxiliary loss (weight 46) on the labelled images, z of 50 dimensions,
one hidden layer of 500 softplus units in each network, Adam at lr 0.00042, minibatches of
200. Pyro's side is its example's own ``SSVAE``, ``config_enumerate(..., expand=True)``,
``SVI`` and ``run_inference_for_epoch`` (imported from ../shared/peers/pyro-examples, not
copied; its ``visdom`` import is given a stub), fed by torch ``DataLoader``s over the same
grey images and one-hot labels as its ``MNISTCached`` makes (the first 50,000 training
images; its labelled images are balanced over the classes, as ours). pyro_vae's side is
``pyro_vae.fit`` of ``--model m2 --estimator traceenum --labels N`` with the default
``captured`` engine, timed by its own clock (``seconds`` in metrics.jsonl: the epoch's
steps, not its evaluation). Each side trains two epochs and the second is timed (the first
records pyro_vae's step, and warms up both). An epoch is a pass over the unlabelled images in both
(Pyro's alternates whole labelled and unlabelled batches, ours mixes them in every batch:
data.labelled_per_batch). Rounds alternate the two; the report gives each one's seconds.

    python experiments/m2_vs_pyro.py                     # 3 rounds, two epochs of 50,000 images each
    python experiments/m2_vs_pyro.py --smoke             # seconds: 600 images, 1 round
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import types
from pathlib import Path

from machine import cpu_name  # experiments/machine.py

REPO = Path(__file__).resolve().parents[1]
PEERS = REPO.parent / "shared" / "peers" / "pyro-examples" / "examples" / "vae"
Z_DIM, HIDDEN, LR, BATCH, AUX = 50, 500, 0.00042, 200, 46.0


def pyro_example():
    """Pyro's ss_vae_M2 module, imported from the peers' folder (``visdom`` stubbed)."""
    sys.path.insert(0, str(PEERS))
    sys.modules.setdefault("visdom", types.SimpleNamespace(Visdom=object))
    import ss_vae_M2

    return ss_vae_M2


def time_pyro(images, labels, labelled, hidden: int, seed: int) -> float:
    """Seconds of the second ``run_inference_for_epoch`` of Pyro's example (both its SVI objects)."""
    import pyro
    import torch
    from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO, config_enumerate
    from pyro.optim import Adam
    from torch.utils.data import DataLoader, TensorDataset

    example = pyro_example()
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    model = example.SSVAE(z_dim=Z_DIM, hidden_layers=[hidden], config_enum="parallel", aux_loss_multiplier=AUX)
    optimizer = Adam({"lr": LR, "betas": (0.9, 0.999)})
    guide = config_enumerate(model.guide, "parallel", expand=True)
    losses = [SVI(model.model, guide, optimizer, loss=TraceEnum_ELBO(max_plate_nesting=1,
                                                                      strict_enumeration_warning=False)),
              SVI(model.model_classify, model.guide_classify, optimizer, loss=Trace_ELBO())]
    x = images.reshape(images.shape[0], -1)
    onehot = torch.nn.functional.one_hot(labels, 10).float()
    mask = torch.zeros(x.shape[0], dtype=torch.bool)
    mask[labelled] = True
    loaders = {"sup": DataLoader(TensorDataset(x[mask], onehot[mask]), batch_size=BATCH, shuffle=True),
               "unsup": DataLoader(TensorDataset(x[~mask], onehot[~mask] * float("nan")), batch_size=BATCH,
                                   shuffle=True)}
    interval = int(x.shape[0] / len(labelled))  # as its main() computes it
    example.run_inference_for_epoch(loaders, losses, interval)  # the first epoch, untimed (as ours)
    start = time.perf_counter()
    example.run_inference_for_epoch(loaders, losses, interval)
    return time.perf_counter() - start


def time_ours(data_dir: str, limit: int, num_labels: int, hidden: int, seed: int, runs: Path) -> tuple[float, float]:
    """(seconds of the second epoch's steps, test accuracy after it) of ``pyro_vae.fit``: the
    first epoch records the step (pyro_vae.capture), once per shape of minibatch."""
    from pyro_vae import DataConfig, ModelConfig, TrainConfig, build_model, fit

    model = ModelConfig(model="m2", z_dim=Z_DIM, hidden_dims=(hidden,), aux_weight=AUX)
    data = DataConfig(dataset="mnist", data_dir=data_dir, train_limit=limit, test_limit=1000, labels=num_labels)
    train = TrainConfig(epochs=2, batch_size=BATCH, lr=LR, estimator="traceenum", device="cpu", seed=seed)
    program = build_model(model, (1, 28, 28))
    out = Path(tempfile.mkdtemp(dir=runs))
    fit(program, data, out, settings=train, progress=False, log=lambda line: None)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    return record["seconds"], record["test_accuracy"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="600 images, 100 labels, 50 hidden units, 1 round: "
                        "seconds")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--labels", type=int, default=3000, help="labelled images (the tutorial's default)")
    parser.add_argument("--limit", type=int, default=50_000, help="training images (Pyro's example trains on 50,000)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--runs", type=Path, default=None, help="folder for our runs (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None, help="also write the report here as JSON")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    hidden = HIDDEN
    if args.smoke:
        args.rounds, args.labels, args.limit, hidden = 1, 100, 600, 50
    import torch

    from pyro_vae.data import choose_labelled, load_split, resolve_data_dir

    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = str(resolve_data_dir(args.data_dir))
    train = load_split("mnist", "train", data_dir).head(args.limit)
    labelled = choose_labelled(train.labels, args.labels, seed=0)
    runs = args.runs or Path(tempfile.mkdtemp())
    runs.mkdir(parents=True, exist_ok=True)
    ours, theirs, accuracy = [], [], None
    for r in range(args.rounds):
        seconds, accuracy = time_ours(data_dir, args.limit, args.labels, hidden, r, runs)
        ours.append(seconds)
        theirs.append(time_pyro(train.images, train.labels, labelled, hidden, r))
        print(f"round {r + 1}: pyro_vae {ours[-1]:.2f} s, Pyro's ss_vae_M2.py {theirs[-1]:.2f} s", flush=True)
    report = {"cpu": cpu_name(), "threads": torch.get_num_threads(), "images": args.limit, "labels": args.labels,
              "batch": BATCH, "z_dim": Z_DIM, "hidden": hidden, "rounds": args.rounds,
              "pyro_vae_seconds": ours, "pyro_seconds": theirs,
              "pyro_vae_median": statistics.median(ours), "pyro_median": statistics.median(theirs),
              "speedup": statistics.median(theirs) / statistics.median(ours),
              "pyro_vae_test_accuracy_after_two_epochs": accuracy}
    print(f"the second epoch of {args.limit:,} images, {args.labels} labelled, on {report['cpu']} ({report['threads']} "
          f"threads): pyro_vae {report['pyro_vae_median']:.2f} s, Pyro's ss_vae_M2.py {report['pyro_median']:.2f} s "
          f"(median of {args.rounds}); Pyro's / ours = {report['speedup']:.2f}")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
