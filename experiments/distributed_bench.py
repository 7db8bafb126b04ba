"""One process with T threads against T processes of one thread each (torchrun), on this machine.

    python experiments/distributed_bench.py --out /tmp/dist-bench          # MNIST, default model
    python experiments/distributed_bench.py --smoke --out /tmp/dist-smoke  # seconds: checks it end to end

Trains the default configuration twice, back to back, for the same epochs: once as one
process with ``--threads`` torch threads, once under ``torchrun --nproc-per-node
--threads`` with one thread per process (same global batch). Then evaluates the first
run's importance-sampled log p(x) both ways and checks the two reports are identical.
Reports the training loop's seconds per epoch (the metrics' ``seconds``: the steps, not the
per-epoch evaluation, which rank 0 does alone), each command's wall time, and the ratios.
On one machine the processes share its cores and memory bandwidth: this measures the cost
of the all-reduce and of splitting a batch, not scaling across machines.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path


def run(command: list[str], threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    print("$ " + " ".join(command), flush=True)
    t0 = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    run.last_stdout = proc.stdout
    return seconds


def torchrun(processes: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]


def epoch_seconds(run_dir: Path) -> list[float]:
    return [json.loads(line)["seconds"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs and distributed-bench.json")
    parser.add_argument("--threads", type=int, default=2, help="cores to use: threads of one process, or processes")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--eval-images", type=int, default=1000)
    parser.add_argument("--eval-samples", type=int, default=1000)
    parser.add_argument("--data-dir", help="data folder (default $PYRO_VAE_DATA)")
    parser.add_argument("--smoke", action="store_true", help="1,000 training images, 1 epoch, a tiny evaluation")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.eval_images, args.eval_samples = 1, 20, 10
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    train = ["-m", "pyro_vae", "train", "--epochs", str(args.epochs), "--no-progress", "--device", "cpu"]
    train += ["--train-limit", "1000", "--test-limit", "100"] if args.smoke else []
    train += ["--data-dir", args.data_dir] if args.data_dir else []
    one, many = args.out / "one-process", args.out / "processes"
    wall = {"train_one": run([sys.executable, *train, "--out", str(one)], args.threads),
            "train_many": run(torchrun(args.threads) + train + ["--out", str(many)], 1)}
    evaluate = ["-m", "pyro_vae", "evaluate", str(one), "--num-samples", str(args.eval_samples), "--limit",
                str(args.eval_images), "--json", "--device", "cpu"] + (["--data-dir", args.data_dir] if args.data_dir
                                                                      else [])
    wall["evaluate_one"] = run([sys.executable, *evaluate], args.threads)
    report_one = run.last_stdout.strip().splitlines()[-1]
    wall["evaluate_many"] = run(torchrun(args.threads) + evaluate, 1)
    report_many = [line for line in run.last_stdout.splitlines() if line.startswith("{")][-1]
    # the same draws for every image; float32 sums over 2 threads and over 1 round differently
    one_values, many_values = json.loads(report_one), json.loads(report_many)
    for key, value in one_values.items():
        if isinstance(value, dict) and "mean" in value:
            if abs(value["mean"] - many_values[key]["mean"]) > 1e-6 * abs(value["mean"]):
                sys.exit(f"the distributed evaluation differs from the single-process one:\n{report_one}\n{report_many}")
    steps_one, steps_many = epoch_seconds(one), epoch_seconds(many)
    # the first epoch records the step (captured engine): compare the later ones when there are some
    later = slice(1, None) if args.epochs > 1 else slice(0, None)
    one_epoch = sum(steps_one[later]) / len(steps_one[later])
    many_epoch = sum(steps_many[later]) / len(steps_many[later])
    result = {"threads": args.threads, "epochs": args.epochs, "eval_images": args.eval_images,
              "eval_samples": args.eval_samples, "wall_seconds": wall, "epoch_seconds_one": steps_one,
              "epoch_seconds_many": steps_many, "train_epoch_ratio": one_epoch / many_epoch,
              "evaluate_ratio": wall["evaluate_one"] / wall["evaluate_many"], "evaluation_one": one_values,
              "evaluation_many": many_values}
    (args.out / "distributed-bench.json").write_text(json.dumps(result, indent=1) + "\n")
    t = args.threads
    print(f"| what | 1 process x {t} threads | {t} processes x 1 thread | speed-up |")
    print("|---|---|---|---|")
    print(f"| training loop, s per epoch (epochs after the first) | {one_epoch:.1f} | {many_epoch:.1f} | "
          f"{one_epoch / many_epoch:.2f} |")
    print(f"| `pyro-vae train`, wall s ({args.epochs} epochs) | {wall['train_one']:.1f} | {wall['train_many']:.1f} | "
          f"{wall['train_one'] / wall['train_many']:.2f} |")
    print(f"| `pyro-vae evaluate`, wall s ({args.eval_images} images, K = {args.eval_samples}) | "
          f"{wall['evaluate_one']:.1f} | {wall['evaluate_many']:.1f} | {result['evaluate_ratio']:.2f} |")
    print("the two evaluations agree to 1e-6 (float32 sums differ in the last bits between thread counts)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
