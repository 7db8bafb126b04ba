"""One long run on Burda et al.'s learning-rate schedule, drawn epoch by epoch.

    python experiments/schedule_curve.py ~/iwae-full/1-vae-1 --evaluated ~/iwae-full/at-*/1-vae-1 \
        --paper 86.76 --out curve.png

The first argument is the run folder (its ``metrics.jsonl``); each ``--evaluated`` folder
is a copy of it taken at the end of a stage and evaluated by
``experiments/iwae_table.py --evaluate-at`` (its ``iwae-table.json``). The figure shows, in nats per test image on a log epoch axis: the
one-sample bound -ELBO on the test set after every epoch, the NLL by K importance
samples of each evaluated snapshot, the paper's NLL and the issue's target above it, and
the schedule's stages with their learning rates. The bound and the estimate are both
upper bounds on -log p(x) in expectation; the estimate is the tight one.

A snapshot whose metrics are not the run's own up to its epoch (another run, another
seed, a copy of the wrong folder) is refused.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from pyro_vae.runs import read_metrics  # noqa: E402
from pyro_vae.steps import learning_rate  # noqa: E402

RESULT = "iwae-table.json"  # (experiments/iwae_table.py writes it)
STAGE_ENDS = [(3 ** (i + 1) - 1) // 2 for i in range(8)]  # 1, 4, 13, ..., 3280


def curve_points(run_dir: Path, snapshots: list[Path]) -> tuple[list[dict], list[dict]]:
    """The run's per-epoch metrics and the evaluated snapshots' results, in epoch order.

    Refuses a snapshot that is not a copy of this run: its metrics must be the run's
    first lines, and its result must be for its last epoch."""
    metrics = read_metrics(run_dir)
    if not metrics:
        raise ValueError(f"{run_dir} has no finished epoch to draw (no metrics.jsonl lines)")
    results = []
    for snap in snapshots:
        path = snap / RESULT
        if not path.exists():
            raise ValueError(f"{snap} has no {RESULT}: evaluate the snapshot first "
                             "(experiments/iwae_table.py --runs FOLDER --epochs E --rows ROW)")
        result = json.loads(path.read_text())
        own = read_metrics(snap)
        epoch = result["epochs"]
        if not own or own[-1]["epoch"] != epoch or own != metrics[:epoch]:
            raise ValueError(f"{snap} is not a copy of {run_dir} at epoch {epoch}: its metrics differ from the "
                             "run's; give the snapshots taken of this run")
        results.append(result)
    return metrics, sorted(results, key=lambda r: r["epochs"])


def draw(metrics: list[dict], results: list[dict], path: Path, *, paper: float | None, margin: float,
         title: str) -> Path:
    epochs = [m["epoch"] for m in metrics]
    config = results[0]["config"]["train"] if results else None
    fig, ax = plt.subplots(figsize=(8.0, 5.6), layout="constrained")
    ax.plot(epochs, [-m["test_elbo"] for m in metrics], color="tab:orange", lw=1.2,
            label="-ELBO on the test set (1 sample), after each epoch")
    if results:
        ax.errorbar([r["epochs"] for r in results], [r["nll"] for r in results],
                    yerr=[2 * r["nll_stderr"] for r in results], fmt="o", color="tab:blue", capsize=4, ms=6,
                    label=f"NLL by K = {results[0]['num_samples']} importance samples (+- 2 s.e.)")
        for r in results:
            ax.annotate(f"{r['nll']:.2f}", (r["epochs"], r["nll"]), textcoords="offset points", xytext=(-9, 0),
                        ha="right", va="center", color="tab:blue", fontsize=9)
    if paper is not None:
        ax.axhline(paper, color="0.2", ls="--", lw=1, label=f"paper (3,280 epochs): {paper:.2f}")
        ax.axhline(paper + margin, color="tab:red", ls=":", lw=1.2, label=f"target: within {margin} nats of it")
    last = max(epochs[-1], max((r["epochs"] for r in results), default=0))
    ends = [e for e in STAGE_ENDS if e <= max(last, 1)] + [e for e in STAGE_ENDS if e > last][:1]
    lr = config["lr"] if config else 1e-3
    for start, end in zip([0] + ends[:-1], ends):
        ax.axvline(end, color="0.8", lw=0.8, zorder=0)
        ax.text(max(start, 1) * (end / max(start, 1)) ** 0.5, 1.0, f"{learning_rate(lr, 'burda', start):.1e}",
                transform=ax.get_xaxis_transform(), ha="center", va="bottom", fontsize=8, color="0.35")
    ax.set_xscale("log")
    ax.set_xlim(1, ends[-1] * 1.05)
    lowest = [-m["test_elbo"] for m in metrics] + [r["nll"] for r in results] + ([paper] if paper is not None else [])
    low = min(lowest) - 1
    ax.set_ylim(low, low + 20)
    ax.set_xlabel("epoch (log scale); grey lines: ends of the schedule's stages, learning rate of each above it")
    ax.set_ylabel("nats per test image (lower is better)")
    ax.grid(alpha=0.3, which="major")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, fontsize=9, frameon=False)
    ax.set_title(title, pad=16)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run", type=Path, help="the run folder (its metrics.jsonl)")
    parser.add_argument("--evaluated", type=Path, nargs="*", default=[], metavar="SNAPSHOT",
                        help=f"copies of the run evaluated by experiments/iwae_table.py (each with {RESULT})")
    parser.add_argument("--paper", type=float, help="the paper's NLL for this row, drawn with the target above it")
    parser.add_argument("--margin", type=float, default=1.5, help="the target: within this many nats of --paper")
    parser.add_argument("--title", default="One-layer VAE, k = 1, on Burda et al.'s schedule (3,280 epochs)")
    parser.add_argument("--out", type=Path, required=True, help="the PNG to write")
    args = parser.parse_args(argv)
    if not (args.run / "metrics.jsonl").exists():
        parser.error(f"{args.run} has no metrics.jsonl: give a run folder (e.g. ~/iwae-full/1-vae-1)")
    try:
        metrics, results = curve_points(args.run, args.evaluated)
    except ValueError as err:
        parser.error(str(err))
    print(draw(metrics, results, args.out, paper=args.paper, margin=args.margin, title=args.title))
    return 0


if __name__ == "__main__":
    sys.exit(main())
