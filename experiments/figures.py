"""Regenerate every figure of docs/figures.md from scratch: train the runs, then draw them.

    python experiments/figures.py             # MNIST; docs/figures/ (about 6 min on 2 CPU cores)
    python experiments/figures.py --smoke     # 500 images, 1 epoch: checks the pipeline end to end

Four runs on MNIST, identical but for the latent size, the model and the objective:

* ``vae-z2``: the VAE with z_dim = 2, for the pictures that need a 2-D latent space;
* ``ae-z2`` and ``kl-only-z2``: the autoencoder (``--model ae``) and KL-only
  (``--objective kl-only``) baselines, for the comparison;
* ``vae-z50``: the VAE with z_dim = 50 (the usual size), for everything else.

Every step is a ``pyro-vae`` command, printed before it runs, so each figure in the docs
can be rebuilt by hand with the command shown beside it.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from pyro_vae.cli import main as pyro_vae

RUNS = {
    "vae-z2": ["--z-dim", "2"],
    "ae-z2": ["--z-dim", "2", "--model", "ae"],
    "kl-only-z2": ["--z-dim", "2", "--objective", "kl-only"],
    "vae-z50": ["--z-dim", "50"],
}
# (runs, kind, output subfolder, extra flags)
PLOTS = [
    (["vae-z2"], "latent", "z2", []),
    (["vae-z2"], "manifold", "z2", []),
    (["ae-z2", "kl-only-z2", "vae-z2"], "comparison", ".", []),
    (["vae-z50"], "latent", "z50", []),
    (["vae-z50"], "samples", "z50", []),
    (["vae-z50"], "reconstructions", "z50", []),
    (["vae-z50"], "interpolation", "z50", ["--spherical"]),
    (["vae-z50"], "dims", "z50", []),
    (["vae-z50"], "curves", "z50", []),
]
SMOKE = ["--train-limit", "500", "--test-limit", "200", "--epochs", "1", "--batch-size", "100"]


def run(argv: list[str]) -> None:
    print("$ pyro-vae " + shlex.join(argv), flush=True)
    if pyro_vae(argv) != 0:
        sys.exit(f"pyro-vae {argv[0]} failed")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny budget: 500 training images, 1 epoch")
    parser.add_argument("--epochs", type=int, default=15, help="training epochs of every run but kl-only")
    parser.add_argument("--kl-only-epochs", type=int, default=5, help="it collapses within the first epoch")
    parser.add_argument("--runs", type=Path, help="folder for the runs (default runs/figures, or runs/figures-smoke)")
    parser.add_argument("--out", type=Path, help="folder for the figures (default docs/figures, or RUNS/figures)")
    parser.add_argument("--plot-only", action="store_true", help="draw from the runs already in --runs")
    parser.add_argument("--data-dir", help="data folder (default $PYRO_VAE_DATA)")
    args = parser.parse_args(argv)

    runs = args.runs or Path("runs/figures-smoke" if args.smoke else "runs/figures")
    out = args.out or (runs / "figures" if args.smoke else Path("docs/figures"))
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    if not args.plot_only:
        for name, flags in RUNS.items():
            epochs = args.kl_only_epochs if name.startswith("kl-only") else args.epochs
            budget = SMOKE if args.smoke else ["--epochs", str(epochs)]
            run(["train", *flags, *budget, *data, "--out", str(runs / name), "--overwrite", "--no-progress"])
    for names, kind, folder, extra in PLOTS:
        run(["plot", *(str(runs / n) for n in names), "--kind", kind, "--out", str(out / folder), *extra, *data])


if __name__ == "__main__":
    main()
