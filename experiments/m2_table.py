"""M2's test accuracy by number of labels, beside Pyro's SS-VAE tutorial's table.

Trains (or continues) one run per label count and label set, then tables the test
accuracy of argmax q(y|x) on the 10,000 test images after the last epoch: the mean and
the spread (standard deviation) over the label sets, beside the tutorial's
0.9319 / 0.9437 / 0.9487 / 0.9582 (+- 0.0060 / 0.0070 / 0.0038 / 0.0012, five label sets
each) for 100 / 600 / 1000 / 3000 labels. A label set is the run's seed: ``--labels N
--seed s`` keeps N labels chosen by s (balanced over the classes), and s seeds the rest of
the run too.

The configuration is the tutorial's third variant (Pyro's ``ss_vae_M2.py`` defaults):
y summed out (``--estimator traceenum``), the auxiliary loss at weight 46, z of 50
dimensions, one hidden layer of 500 softplus units, Adam at lr 0.00042, minibatches of
200, the first 50,000 training images (the tutorial keeps the last 10,000 for validation;
no run here reads them). Ours binarises the grey images afresh each epoch for its
Bernoulli likelihood, where the tutorial scores the grey values.

Each run's folder is ``RUNS/m2-{labels}-s{seed}`` (outside the repository, e.g.
/tmp/runs): the command starts a run or continues it from its checkpoint (``pyro-vae train
--resume-if-present``), so an interrupted table is finished by running it again, and
``--epochs`` higher trains the runs longer. One run is one command line::

    pyro-vae train --model m2 --estimator traceenum --labels 100 --seed 0 --train-limit 50000 \\
        --hidden-dims 500 --z-dim 50 --batch-size 200 --lr 0.00042 --aux-weight 46 --epochs 50 \\
        --out /tmp/runs/m2-100-s0 --resume-if-present

    python experiments/m2_table.py --runs /tmp/runs                  # 4 label counts x 5 label sets, 50 epochs
    python experiments/m2_table.py --runs /tmp/runs --labels 100 --seeds 0 --epochs 10
    python experiments/m2_table.py --runs /tmp/runs --table-only     # table the runs as they stand
    python experiments/m2_table.py --smoke --runs /tmp/smoke         # seconds: 600 images, 1 epoch
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

TUTORIAL = {100: (0.9319, 0.0060), 600: (0.9437, 0.0070), 1000: (0.9487, 0.0038), 3000: (0.9582, 0.0012)}
FLAGS = ["--model", "m2", "--estimator", "traceenum", "--train-limit", "50000", "--hidden-dims", "500",
         "--z-dim", "50", "--batch-size", "200", "--lr", "0.00042", "--aux-weight", "46"]
SMOKE = ["--model", "m2", "--estimator", "traceenum", "--train-limit", "600", "--test-limit", "200",
         "--hidden-dims", "32", "--z-dim", "8", "--batch-size", "100"]


def run_name(labels: int, seed: int) -> str:
    return f"m2-{labels}-s{seed}"


def train(runs: Path, labels: int, seed: int, epochs: int, smoke: bool, data_dir: str | None) -> None:
    from pyro_vae.cli import main

    argv = ["train", *(SMOKE if smoke else FLAGS), "--labels", str(labels), "--seed", str(seed), "--epochs",
            str(epochs), "--out", str(runs / run_name(labels, seed)), "--resume-if-present", "--no-progress"]
    if data_dir:
        argv += ["--data-dir", data_dir]
    code = main(argv)
    if code > 128:  # stopped by a signal, after saving the step it had reached: not a failure
        print(f"{run_name(labels, seed)}: stopped; its checkpoint holds the step reached: run the same command "
              "again to resume it", file=sys.stderr)
        raise SystemExit(code)
    if code != 0:
        raise SystemExit(f"training {run_name(labels, seed)} failed")


def last_record(run: Path) -> dict | None:
    path = run / "metrics.jsonl"
    if not path.exists():
        return None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return lines[-1] if lines else None


def table(runs: Path, label_counts, seeds) -> list[dict]:
    rows = []
    for labels in label_counts:
        records = {s: last_record(runs / run_name(labels, s)) for s in seeds}
        done = {s: r for s, r in records.items() if r is not None and "test_accuracy" in r}
        accuracies = [r["test_accuracy"] for r in done.values()]
        rows.append({"labels": labels, "label_sets": len(done), "seeds": sorted(done),
                     "epochs": sorted({r["epoch"] for r in done.values()}),
                     "accuracy": statistics.mean(accuracies) if accuracies else None,
                     "spread": statistics.stdev(accuracies) if len(accuracies) > 1 else None,
                     "accuracies": accuracies, "tutorial": TUTORIAL.get(labels)})
    return rows


def show(rows: list[dict]) -> None:
    print("| labels | label sets | epochs | test accuracy (mean, sd over sets) | Pyro's tutorial (5 sets) |")
    print("| ---: | ---: | :--- | :--- | :--- |")
    for row in rows:
        ours = "not yet measured" if row["accuracy"] is None else f"{row['accuracy']:.4f}" + (
            f" +- {row['spread']:.4f}" if row["spread"] is not None else "")
        theirs = "" if row["tutorial"] is None else f"{row['tutorial'][0]:.4f} +- {row['tutorial'][1]:.4f}"
        epochs = ", ".join(map(str, row["epochs"])) or "-"
        print(f"| {row['labels']} | {row['label_sets']} | {epochs} | {ours} | {theirs} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="the runs' folder (outside the repository)")
    parser.add_argument("--labels", type=int, nargs="+", default=sorted(TUTORIAL))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4], help="label sets")
    parser.add_argument("--epochs", type=int, default=50)
    parser.add_argument("--table-only", action="store_true", help="train nothing: table the runs as they stand")
    parser.add_argument("--smoke", action="store_true", help="600 images, 100 labels, 1 epoch, 1 label set")
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    parser.add_argument("--data-dir", default=None)
    args = parser.parse_args(argv)
    if args.smoke:
        args.labels, args.seeds, args.epochs = [100], [0], 1
    if args.table_only and not args.runs.is_dir():
        raise SystemExit(f"{args.runs} is not a folder of runs")
    args.runs.mkdir(parents=True, exist_ok=True)
    if not args.table_only:
        for labels in args.labels:
            for seed in args.seeds:
                train(args.runs, labels, seed, args.epochs, args.smoke, args.data_dir)
    rows = table(args.runs, args.labels, args.seeds)
    show(rows)
    if args.json is not None:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
