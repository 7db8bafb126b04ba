"""Whole-process speed: ``pyro-vae train`` with its defaults against a hand-written
PyTorch script that does the same work (experiments/handwritten_train.py), each run as
a fresh process from start to exit, the two alternated so that they share the machine's
state; the ratio is of the median wall times.

    python experiments/whole_process.py --epochs 4 --repeats 3 --out runs/whole-process

Reported per side: the wall time of the whole process (interpreter start, imports, data
loading, training, per-epoch evaluation, checkpoints) and the training loops' own
seconds (the sum of each epoch's training time, as both write it to metrics.jsonl).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def commands(epochs: int, out: Path, limit: int | None = None) -> dict[str, list[str]]:
    ours = [sys.executable, "-m", "pyro_vae", "train", "--epochs", str(epochs), "--out", str(out / "pyro-vae"),
            "--overwrite"]
    hand = [sys.executable, str(REPO / "experiments" / "handwritten_train.py"), "--epochs", str(epochs),
            "--out", str(out / "hand-written")]
    if limit is not None:
        ours += ["--train-limit", str(limit), "--test-limit", str(limit)]
        hand += ["--limit", str(limit)]
    return {"pyro-vae train": ours, "hand-written": hand}


def run_once(name: str, cmd: list[str], out: Path) -> dict:
    folder = out / ("pyro-vae" if name == "pyro-vae train" else "hand-written")
    shutil.rmtree(folder, ignore_errors=True)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wall = time.perf_counter() - t0
    metrics = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {"wall_seconds": wall, "train_seconds": sum(m["seconds"] for m in metrics),
            "final_test_elbo": metrics[-1]["test_elbo"]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3, help="runs of each side, alternated")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "whole-process")
    p.add_argument("--limit", type=int, default=None, help="the first N training and test images only (smoke runs)")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cmds = commands(args.epochs, args.out, args.limit)
    runs = {name: [] for name in cmds}
    for r in range(args.repeats):
        for name in (list(cmds) if r % 2 == 0 else list(reversed(cmds))):  # alternate who goes first
            runs[name].append(run_once(name, cmds[name], args.out))
            print(f"repeat {r + 1}: {name:15} {runs[name][-1]['wall_seconds']:7.1f} s wall, "
                  f"{runs[name][-1]['train_seconds']:7.1f} s in the training loop, "
                  f"test ELBO {runs[name][-1]['final_test_elbo']:.2f}", flush=True)
    med = {name: {k: statistics.median(run[k] for run in v) for k in ("wall_seconds", "train_seconds")}
           for name, v in runs.items()}
    report = {"command": " ".join(["python", "experiments/whole_process.py", *(argv or sys.argv[1:])]),
              "epochs": args.epochs, "repeats": args.repeats, "runs": runs, "medians": med,
              "ratio_wall": med["hand-written"]["wall_seconds"] / med["pyro-vae train"]["wall_seconds"],
              "ratio_train_loop": med["hand-written"]["train_seconds"] / med["pyro-vae train"]["train_seconds"],
              "commands": {name: " ".join(cmd) for name, cmd in cmds.items()}}
    (args.out / "whole-process.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"median wall: pyro-vae {med['pyro-vae train']['wall_seconds']:.1f} s, hand-written "
          f"{med['hand-written']['wall_seconds']:.1f} s; ratio (hand-written / pyro-vae) {report['ratio_wall']:.3f}; "
          f"training loops alone {report['ratio_train_loop']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
