"""Table 1 of Burda, Grosse & Salakhutdinov (2016), "Importance Weighted Autoencoders", on pyro_vae.

    python experiments/iwae_table.py --runs ~/iwae-table            # train, evaluate, print the table
    python experiments/iwae_table.py --runs ~/iwae-table --rows 1-vae-1 1-iwae-5   # some rows only
    python experiments/iwae_table.py --runs ~/iwae-table --table-only             # the table of what is done
    python experiments/iwae_table.py --smoke --runs /tmp/iwae-smoke                # end to end in a minute
    python experiments/iwae_table.py --runs ~/iwae-table --archive archive/iwae-table-runs/100-epochs   # to commit
    python experiments/iwae_table.py --runs ~/iwae-full --epochs 3280 --evaluate-at 121 364 1093 --rows 1-vae-1

Rows: 1 and 2 stochastic layers x {VAE, IWAE} x k in {1, 5, 50} on dynamically binarised
MNIST (k = 1 is the same run for both: the IWAE bound at K = 1 is the ELBO). Each row is a
``pyro-vae train`` run in its own folder under ``--runs`` (the command is printed and
written to the table); an unfinished row resumes from its checkpoint, a finished one is
skipped, so the table can be built in pieces across sessions. Each finished row is then
evaluated once: test log p(x) by K = 5000 importance samples over all 10,000 test images
(mean +- standard error, in nats) and the active units of each latent layer
(Var_x E_q[u|x] > 0.01), written to ``RUN/iwae-table.json``.

``--evaluate-at E...`` evaluates a long row on the way as well: the row trains to epoch E,
stops there, its run folder is copied to ``RUNS/at-E/ROW`` and the copy is evaluated like
a finished row (``--table-only --runs RUNS/at-E`` tables it), then training goes on. The
learning rate depends on the epoch alone, so stopping changes nothing in the training.

The architectures are Burda et al.'s: one layer 784-200-200-50 (tanh); two layers
784-200-200-100 and 100-100-100-50 (tanh); output bias started at the training set's mean.
What differs from the paper (batch size, number of epochs, Adam's epsilon, the scale
link) is listed in docs/results.md beside the table.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import time
from pathlib import Path

import torch

from pyro_vae.cli import main as pyro_vae
from pyro_vae.data import load_data, test_set
from pyro_vae.evaluate import Estimate, active_unit_counts, latent_activity, log_px_importance
from pyro_vae.runs import RunLockedError, load_run, read_metrics, run_lock

# Burda et al. (2016), Table 1, MNIST, test NLL by K = 5000 importance samples
PAPER = {"1-vae-1": 86.76, "1-vae-5": 86.47, "1-iwae-5": 85.54, "1-vae-50": 86.35, "1-iwae-50": 84.78,
         "2-vae-1": 85.33, "2-vae-5": 85.01, "2-iwae-5": 83.89, "2-vae-50": 84.78, "2-iwae-50": 82.90}
ROWS = list(PAPER)

ARCHITECTURE = {
    1: ["--model", "vae", "--z-dim", "50", "--hidden-dims", "200", "200"],
    2: ["--model", "vae2", "--z-dim", "100", "--hidden-dims", "200", "200", "--z2-dim", "50",
        "--z2-hidden-dims", "100", "100"],
}
COMMON = ["--activation", "tanh", "--decoder-bias", "data-mean", "--dataset", "mnist", "--binarize", "dynamic",
          "--lr-schedule", "burda", "--lr", "1e-3"]
SMOKE_ARCHITECTURE = {
    1: ["--model", "vae", "--z-dim", "5", "--hidden-dims", "20"],
    2: ["--model", "vae2", "--z-dim", "8", "--hidden-dims", "20", "--z2-dim", "4", "--z2-hidden-dims", "10"],
}
SMOKE = ["--train-limit", "300", "--test-limit", "100"]
RESULT = "iwae-table.json"
PER_IMAGE = "iwae-table-log-px.pt"  # each test image's log p(x), float64, in the test set's order
# pairs of rows whose difference the paper's findings are about: (better, worse)
PAIRS = [("1-iwae-50", "1-iwae-5"), ("2-iwae-50", "2-iwae-5"), ("1-iwae-5", "1-vae-5"), ("2-iwae-5", "2-vae-5"),
         ("1-iwae-50", "1-vae-50"), ("2-iwae-50", "2-vae-50"), ("2-vae-1", "1-vae-1"), ("2-iwae-50", "1-iwae-50")]


def parse_row(name: str) -> tuple[int, str, int]:
    layers, objective, k = name.split("-")
    return int(layers), objective, int(k)


def train_argv(row: str, run_dir: Path, args) -> list[str]:
    layers, objective, k = parse_row(row)
    estimator = "iwae" if objective == "iwae" else "trace"
    arch = SMOKE_ARCHITECTURE if args.smoke else ARCHITECTURE
    argv = ["train", *arch[layers], *COMMON, "--estimator", estimator, "--num-particles", str(k),
            "--epochs", str(args.epochs), "--batch-size", str(args.batch_size), "--seed", str(args.seed),
            "--out", str(run_dir)]
    if args.smoke:
        argv += SMOKE
    if args.data_dir:
        argv += ["--data-dir", args.data_dir]
    return argv


def epochs_done(run_dir: Path) -> int:
    metrics = read_metrics(run_dir) if (run_dir / "checkpoint.pt").exists() else []
    return metrics[-1]["epoch"] if metrics else 0


def train_row(row: str, run_dir: Path, args, until: int | None = None) -> None:
    """Train the row to epoch ``until`` (default: all its epochs), resuming its run when it
    has a checkpoint; nothing to do once there."""
    until = until or args.epochs
    if epochs_done(run_dir) >= until:
        return
    if (run_dir / "checkpoint.pt").exists():
        argv = ["train", "--resume", str(run_dir), "--epochs", str(until)]
    else:
        argv = train_argv(row, run_dir, args)
        argv[argv.index("--epochs") + 1] = str(until)
    print("$ pyro-vae " + shlex.join(argv), flush=True)
    code = pyro_vae(argv + ["--no-progress"])
    if code > 128:  # stopped by a signal, after saving the step it had reached
        print(f"row {row}: stopped; its checkpoint in {run_dir} holds the step reached: run the same "
              "command again to resume it", file=sys.stderr)
        sys.exit(code)
    if code != 0:
        sys.exit(f"row {row}: pyro-vae train failed")


def evaluate_row(row: str, run_dir: Path, args) -> dict:
    """Test log p(x) (K importance samples, every test image) and active units of a finished row."""
    out = run_dir / RESULT
    if out.exists():
        return json.loads(out.read_text())
    run = load_run(run_dir, device=args.device)
    data = run.config.data
    if args.data_dir:
        data = type(data)(**{**data.__dict__, "data_dir": args.data_dir})
    images = test_set(load_data(data, "test", run.device), True).images
    t0 = time.perf_counter()
    with torch.no_grad():
        log_px = log_px_importance(run.program.model, run.program.guide, images, args.eval_samples, seed=0)
    eval_seconds = time.perf_counter() - t0
    torch.save(log_px.detach().double().cpu(), run_dir / PER_IMAGE)
    activity = latent_activity(run.program.model, run.program.guide, images)
    metrics = read_metrics(run_dir)
    estimate = Estimate.of(log_px)
    result = {
        "row": row, "epochs": metrics[-1]["epoch"], "num_test_images": images.shape[0],
        "num_samples": args.eval_samples, "nll": -estimate.mean, "nll_stderr": estimate.stderr,
        "active_units": active_unit_counts(activity),
        "units": {name: int(a.numel()) for name, a in activity.items()},
        "train_seconds": sum(m["seconds"] for m in metrics), "eval_seconds": eval_seconds,
        "final_test_elbo": metrics[-1].get("test_elbo"),
        "config": run.config.to_dict(),
        "threads": torch.get_num_threads(),
    }
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


def snapshot(row: str, run_dir: Path, epoch: int, args) -> Path | None:
    """The row's run as it was after ``epoch``, evaluated, in ``RUNS/at-EPOCH/ROW``: trained to
    that epoch first if it is not there yet. None (and a note) for a run already past it,
    since its state at that epoch is gone."""
    target = args.runs / f"at-{epoch}" / row
    if (target / RESULT).exists():
        return target
    if not (target / "checkpoint.pt").exists():
        if epochs_done(run_dir) > epoch:
            print(f"row {row}: past epoch {epoch} already ({epochs_done(run_dir)} trained) and no copy of it in "
                  f"{target}; it cannot be evaluated there any more", file=sys.stderr, flush=True)
            return None
        train_row(row, run_dir, args, until=epoch)
        partial = target.with_name(row + ".partial")  # a copy cut short is never taken for a whole one
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(run_dir, partial, ignore=shutil.ignore_patterns(".lock", RESULT, PER_IMAGE))
        partial.rename(target)
    evaluate_row(row, target, args)
    return target


def snapshot_lines(root: Path) -> str:
    """One line per evaluated copy under ``root/at-E``: the row's NLL after epoch E, and how
    much lower it is than at the row's previous copy, paired over the test images."""
    lines = []
    found = [path.parent for path in root.glob(f"at-*/*/{RESULT}") if path.parents[1].name[3:].isdigit()]
    earlier = {}  # row -> its previous copy
    for copy in sorted(found, key=lambda copy: (copy.name, int(copy.parent.name[3:]))):
        r = json.loads((copy / RESULT).read_text())
        line = (f"- {r['row']} after epoch {r['epochs']} (in {copy.parent.name}/): NLL {r['nll']:.2f} +- "
                f"{r['nll_stderr']:.2f} nats, active units {r['active_units']}")
        before = earlier.get(copy.name)
        if before is not None and (before / PER_IMAGE).exists() and (copy / PER_IMAGE).exists():
            d = Estimate.of(torch.load(copy / PER_IMAGE) - torch.load(before / PER_IMAGE))
            line += f"; {d.mean:.2f} +- {d.stderr:.2f} lower than in {before.parent.name}/ (paired)"
        earlier[copy.name] = copy
        lines.append(line)
    return "\n".join(lines)


def table(root: Path) -> str:
    lines = ["| layers | objective | k | paper NLL | our NLL (K = 5000) | active units | epochs | train time | eval time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in ROWS:
        layers, objective, k = parse_row(row)
        path = root / row / RESULT
        if not path.exists():
            done = read_metrics(root / row)[-1]["epoch"] if (root / row / "metrics.jsonl").exists() else 0
            lines.append(f"| {layers} | {objective.upper()} | {k} | {PAPER[row]:.2f} | not yet ({done} epochs "
                         "trained) | | | | |")
            continue
        r = json.loads(path.read_text())
        units = " + ".join(f"{r['active_units'][name]}/{r['units'][name]} ({name})"
                           for name in sorted(r["active_units"]))
        lines.append(f"| {layers} | {objective.upper()} | {k} | {PAPER[row]:.2f} | {r['nll']:.2f} +- "
                     f"{r['nll_stderr']:.2f} | {units} | {r['epochs']} | {_hours(r['train_seconds'])} | "
                     f"{_hours(r['eval_seconds'])} |")
    return "\n".join(lines)


def paired_differences(root: Path) -> str:
    """NLL differences of the rows in PAIRS that kept their per-image values, with the
    standard error of the paired differences (the rows score the same test images, so it
    is smaller than either row's own)."""
    lines = []
    for better, worse in PAIRS:
        paths = [root / row / PER_IMAGE for row in (better, worse)]
        if all(path.exists() for path in paths):
            a, b = (torch.load(path) for path in paths)
            d = Estimate.of(a - b)  # log p(x) of ``better`` minus that of ``worse``: its NLL is lower by this
            lines.append(f"- NLL of {worse} minus NLL of {better}: {d.mean:.2f} +- {d.stderr:.2f} nats "
                         f"(paired over {d.n} test images)")
    return "\n".join(lines)


def archive(root: Path, into: Path) -> tuple[list[str], list[str]]:
    """Copy what each row's run folder under ``root`` needs to be resumed or tabled into
    ``into/ROW``: its settings, versions and metrics, its result and per-image values once
    evaluated, and its checkpoint while it is unfinished (a finished row's table entry does
    not need its weights). For machines that do not outlive a session: the copies are
    committed, and copied back into a runs folder to resume.

    Each row is copied holding its run folder's lock, so that no training process writes
    a checkpoint between the copies of its metrics and of its checkpoint. A row that is
    training is left out, its earlier copy in ``into`` kept as it was. Returns the rows
    copied and the rows left out."""
    copied, training = [], []
    for row in ROWS:
        source = root / row
        if not (source / "checkpoint.pt").exists():
            continue
        names = ["config.json", "versions.json", "metrics.jsonl"]
        try:
            with run_lock(source):
                names += [RESULT, PER_IMAGE] if (source / RESULT).exists() else ["checkpoint.pt"]
                target = into / row
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                for name in names:
                    if (source / name).exists():
                        shutil.copy2(source / name, target / name)
        except RunLockedError:
            training.append(row)
            continue
        copied.append(row)
    for stage in sorted(root.glob("at-*")):  # evaluated copies of long rows (--evaluate-at)
        if stage.is_dir():
            more, busy = archive(stage, into / stage.name)
            copied += [f"{stage.name}/{row}" for row in more]
            training += [f"{stage.name}/{row}" for row in busy]
    return copied, training


def _hours(seconds: float) -> str:
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, required=True, help="folder of the rows' runs (keep it outside the repo)")
    parser.add_argument("--rows", nargs="+", choices=ROWS, default=ROWS, metavar="ROW",
                        help=f"rows to train and evaluate, of: {' '.join(ROWS)} (default: all)")
    parser.add_argument("--epochs", type=int, help="epochs of every row (default 100; 1 with --smoke)")
    parser.add_argument("--batch-size", type=int, default=20, help="default 20, the paper's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-samples", type=int, help="importance samples per test image (default 5000; 10 "
                        "with --smoke)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data-dir", help="data folder (default $PYRO_VAE_DATA)")
    parser.add_argument("--evaluate-at", type=int, nargs="+", default=[], metavar="EPOCH",
                        help="also evaluate each row after these epochs (e.g. the ends of the schedule's stages: "
                        "121 364 1093), in a copy RUNS/at-EPOCH/ROW")
    parser.add_argument("--table-only", action="store_true", help="print the table of the rows already evaluated")
    parser.add_argument("--smoke", action="store_true", help="tiny networks, 300 images, 1 epoch, K = 10")
    parser.add_argument("--archive", type=Path, metavar="DIR",
                        help="copy the rows' run folders (checkpoints of unfinished rows only) into DIR/ROW and exit")
    args = parser.parse_args(argv)
    args.epochs = args.epochs or (1 if args.smoke else 100)
    args.eval_samples = args.eval_samples or (10 if args.smoke else 5000)
    if args.threads:
        torch.set_num_threads(args.threads)
    wrong = [e for e in args.evaluate_at if not 0 < e < args.epochs]
    if wrong:
        parser.error(f"--evaluate-at {' '.join(map(str, wrong))}: each epoch must lie between 1 and --epochs - 1 "
                     f"({args.epochs - 1}); the end of training is evaluated anyway")
    if (args.archive or args.table_only) and not args.runs.is_dir():
        parser.error(f"--runs {args.runs} is not a folder: give the folder that holds the rows' runs "
                     "(each in a folder named after its row, e.g. 1-vae-1)")
    if args.archive:
        copied, training = archive(args.runs, args.archive)
        print(f"copied into {args.archive}: {' '.join(copied) or 'no row'}")
        for row in training:
            print(f"{row} is training (another process holds {args.runs / row}): not copied, and "
                  f"{args.archive / row} is left as it was. Stop it (SIGTERM saves the step it reached), then "
                  "archive again", file=sys.stderr)
        return 1 if training else 0
    if not args.table_only:
        for row in args.rows:
            run_dir = args.runs / row
            for epoch in sorted(set(args.evaluate_at)):
                copy = snapshot(row, run_dir, epoch, args)
                if copy is not None:
                    r = json.loads((copy / RESULT).read_text())
                    print(f"{row} after epoch {epoch}: test NLL {r['nll']:.2f} +- {r['nll_stderr']:.2f} nats",
                          flush=True)
            train_row(row, run_dir, args)
            result = evaluate_row(row, run_dir, args)
            print(f"{row}: test NLL {result['nll']:.2f} +- {result['nll_stderr']:.2f} nats (K = "
                  f"{result['num_samples']}, {result['num_test_images']} images), active units "
                  f"{result['active_units']}", flush=True)
    text = table(args.runs)
    for extra in (paired_differences(args.runs), snapshot_lines(args.runs)):
        if extra:
            text += "\n\n" + extra
    (args.runs / "table.md").write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
