"""The posterior-collapse demonstration of docs/posterior-collapse.md: train, measure, draw.

    python experiments/posterior_collapse.py            # MNIST, z_dim = 50 (about 9 min on 2 CPU cores)
    python experiments/posterior_collapse.py --smoke    # 500 images, 1 epoch: checks it end to end

Five z_dim = 50 runs that differ only in how the KL term is weighted: beta = 0.5, 1 and 4
without annealing, beta = 1 with a linear KL warm-up, and the KL term alone. For each it
prints (and writes to ``summary.json``) the test-set ELBO, its two terms and the number of
active units, and draws the KL per dimension of all runs in one figure.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

from pyro_vae.cli import main as pyro_vae
from pyro_vae.data import load_data, test_set
from pyro_vae.evaluate import active_units, kl_per_dimension
from pyro_vae.runs import load_run, read_metrics

SMOKE = ["--train-limit", "500", "--test-limit", "200", "--epochs", "1", "--batch-size", "100"]


def runs(warmup: int) -> dict[str, list[str]]:
    return {
        "beta-0.5": ["--beta", "0.5"],
        "beta-1": [],
        f"beta-1-warmup-{warmup}": ["--kl-warmup-epochs", str(warmup)],
        "beta-4": ["--beta", "4"],
        "kl-only": ["--objective", "kl-only"],
    }


def run(argv: list[str]) -> None:
    print("$ pyro-vae " + shlex.join(argv), flush=True)
    if pyro_vae(argv) != 0:
        sys.exit(f"pyro-vae {argv[0]} failed")


def summarize(run_dir: Path, data_dir: str | None) -> dict:
    """Final test-set numbers of one run, in nats per image, and its active units."""
    trained = load_run(run_dir)
    config = trained.config
    data = config.data if data_dir is None else dataclasses.replace(config.data, data_dir=data_dir)
    binary = bool(getattr(trained.program, "binary_data", False))  # binarised as in training
    images = test_set(load_data(data, "test", trained.device), binary).images
    count, activity = active_units(trained.program, images)
    kl = kl_per_dimension(trained.program, images)
    last = read_metrics(run_dir)[-1]
    return {
        "run": run_dir.name,
        "beta": config.train.beta,
        "kl_warmup_epochs": config.train.kl_warmup_epochs,
        "objective": config.train.objective,
        "epochs": last["epoch"],
        "test_elbo": last["test_elbo"],
        "test_log_lik": last["test_log_lik"],
        "test_kl": last["test_kl"],
        "active_units": count,
        "z_dim": config.model.z_dim,
        "dims_with_kl_above_0.1": int((kl > 0.1).sum()),
        "kl_top5": sorted(kl.tolist(), reverse=True)[:5],
        "max_activity_inactive": max([a for a in activity.tolist() if a <= 0.01], default=None),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny budget: 500 training images, 1 epoch")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=10, help="KL warm-up epochs of the annealed run")
    parser.add_argument("--kl-only-epochs", type=int, default=5, help="it collapses within the first epoch")
    parser.add_argument("--runs", type=Path, help="folder for the runs (default runs/collapse, or runs/collapse-smoke)")
    parser.add_argument("--out", type=Path, help="folder for figures and summary.json "
                                                 "(default docs/figures/collapse, or RUNS/figures)")
    parser.add_argument("--plot-only", action="store_true", help="measure and draw the runs already in --runs")
    parser.add_argument("--data-dir", help="data folder (default $PYRO_VAE_DATA)")
    args = parser.parse_args(argv)

    root = args.runs or Path("runs/collapse-smoke" if args.smoke else "runs/collapse")
    out = args.out or (root / "figures" if args.smoke else Path("docs/figures/collapse"))
    data = ["--data-dir", args.data_dir] if args.data_dir else []
    plan = runs(1 if args.smoke else args.warmup)
    if not args.plot_only:
        for name, flags in plan.items():
            epochs = args.kl_only_epochs if name == "kl-only" else args.epochs
            budget = SMOKE if args.smoke else ["--epochs", str(epochs)]
            run(["train", "--z-dim", "50", *flags, *budget, *data, "--out", str(root / name), "--overwrite",
                 "--no-progress"])

    dirs = [root / name for name in plan]
    run(["plot", *map(str, dirs), "--kind", "kl-profile", "--out", str(out), *data])
    annealed = root / list(plan)[2]
    run(["plot", str(annealed), "--kind", "curves", "--out", str(out / annealed.name), *data])
    run(["plot", str(root / "beta-4"), "--kind", "samples", "--out", str(out / "beta-4"), *data])

    summary = [summarize(d, args.data_dir) for d in dirs]
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| run | beta | KL warm-up | test ELBO | test E[log p(x|z)] | test KL | active units | dims with KL > 0.1 |")
    print("|---|---|---|---|---|---|---|---|")
    for s in summary:
        beta = "KL only" if s["objective"] == "kl-only" else f"{s['beta']:g}"
        print(f"| {s['run']} | {beta} | {s['kl_warmup_epochs']} | {s['test_elbo']:.2f} | {s['test_log_lik']:.2f} "
              f"| {s['test_kl']:.2f} | {s['active_units']} / {s['z_dim']} | {s['dims_with_kl_above_0.1']} |")
    print(f"\nwrote {out / 'summary.json'}")


if __name__ == "__main__":
    main()
