"""What a checkpoint costs, against the training time it protects (default configuration).

    python experiments/checkpoint_cost.py              # MNIST, the default model, one epoch each way
    python experiments/checkpoint_cost.py --smoke      # seconds: checks it end to end

Trains one epoch of the default configuration twice in this process, back to back: once
saving only at the epoch's end (``--checkpoint-every epoch``), once also every
``--every`` steps. Every ``checkpoint.save`` is timed (serialising in memory, writing,
fsync, rename). Prints the CPU, the median save, the epoch's step seconds both ways, and
the overhead of the epoch-end checkpoint, of the default 10-minute clock and of the
step interval (the last also measured directly, as the ratio of the two epochs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from machine import cpu_name  # experiments/machine.py
from pyro_vae import DataConfig, RunConfig, TrainConfig, checkpoint
from pyro_vae.config import ModelConfig
from pyro_vae.train import train


def one_epoch(config: RunConfig, folder: Path, every) -> tuple[float, list[float]]:
    """The epoch's step seconds (its saves within included) and each save's seconds."""
    saves, real = [], checkpoint.save

    def timed(payload, path):
        t0 = time.perf_counter()
        real(payload, path)
        saves.append(time.perf_counter() - t0)

    checkpoint.save = timed
    try:
        train(config, folder, progress=False, log=lambda s: None, checkpoint_every=every)
    finally:
        checkpoint.save = real
    metrics = json.loads((folder / "metrics.jsonl").read_text().splitlines()[0])
    return metrics["seconds"], saves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--every", type=int, default=50, help="the step interval measured (default: 50)")
    parser.add_argument("--smoke", action="store_true", help="2,000 images: checks the script, measures nothing")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    limit = 2000 if args.smoke else None
    config = RunConfig(ModelConfig(), DataConfig(train_limit=limit, test_limit=500 if args.smoke else None),
                       TrainConfig(epochs=1, device="cpu"))
    with tempfile.TemporaryDirectory() as tmp:
        epoch_only, end_saves = one_epoch(config, Path(tmp) / "epoch", "epoch")
        stepped, step_saves = one_epoch(config, Path(tmp) / "steps", args.every)
    save = statistics.median(end_saves + step_saves)
    steps = -(-(limit or 60000) // config.train.batch_size)
    result = {
        "cpu": cpu_name(), "saves": len(end_saves + step_saves),
        "median_save_s": save, "epoch_s": epoch_only, "epoch_s_saving_every_steps": stepped,
        "steps_per_epoch": steps, "every_steps": args.every,
        "overhead_epoch_end": save / epoch_only,
        "overhead_default_clock": save / checkpoint.Every(checkpoint.DEFAULT_EVERY).seconds,
        "overhead_every_steps_estimated": save * (steps // args.every) / epoch_only,
        "overhead_every_steps_measured": stepped / epoch_only - 1,
    }
    print(f"CPU: {result['cpu']}")
    print(f"a checkpoint of the default configuration: median {save * 1000:.1f} ms over {result['saves']} saves")
    print(f"one epoch ({steps} steps): {epoch_only:.2f} s saving at its end only, {stepped:.2f} s saving also "
          f"every {args.every} steps")
    print(f"overhead of the epoch-end checkpoint: {100 * result['overhead_epoch_end']:.3f} % of an epoch")
    print(f"overhead of the default clock ({checkpoint.DEFAULT_EVERY}): "
          f"{100 * result['overhead_default_clock']:.4f} % of training time")
    print(f"overhead of every {args.every} steps: {100 * result['overhead_every_steps_estimated']:.2f} % estimated "
          f"from the save time, {100 * result['overhead_every_steps_measured']:.1f} % measured (noisy)")
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
