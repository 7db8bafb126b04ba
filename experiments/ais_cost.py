"""What AIS costs per image, and where the time goes (pyro_vae/ais.py).

    python experiments/ais_cost.py --run runs/default            # the default MNIST run, 10 test images
    python experiments/ais_cost.py --run runs/default --smoke    # seconds: checks it end to end

For a few schedules (intermediate distributions T, chains C, leapfrog steps L) it times
forward AIS (its tuning run included) on the first ``--images`` test images in one batch,
and reports seconds per image and per gradient evaluation (one forward and backward pass
of the model for one chain of one image). Beside it, the decoder alone: the same rows
through the decoder and back by plain torch, and the machine's matrix-product rate
(a large ``torch.mm``), so the share of AIS's time spent in the decoder's products, and
the rest (Pyro's tracing, the HMC arithmetic) is visible. Prints the CPU, and the
extrapolated time of 1,000 test images for each schedule (time grows linearly in T, L and C).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from machine import cpu_name  # experiments/machine.py
from pyro_vae import load_run
from pyro_vae.ais import Schedule, ais_log_px
from pyro_vae.data import load_data, test_set


def matmul_rate(size: int = 1024, repeats: int = 5) -> float:
    """GFLOP/s of a square float32 ``torch.mm`` on this machine (the best of ``repeats``)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    best = math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * size**3 / best / 1e9


def decoder_seconds(decoder, rows: int, z_dim: int, repeats: int = 20) -> float:
    """Seconds of one forward and backward pass of the decoder on ``rows`` latent vectors."""
    z = torch.randn(rows, z_dim, requires_grad=True)
    for _ in range(3):
        torch.autograd.grad(decoder(z).sum(), z)
    t0 = time.perf_counter()
    for _ in range(repeats):
        torch.autograd.grad(decoder(z).sum(), z)
    return (time.perf_counter() - t0) / repeats


def decoder_flops(decoder) -> int:
    """Multiply-adds x 2 of one forward pass per row (the linear layers)."""
    return sum(2 * m.in_features * m.out_features for m in decoder.modules() if isinstance(m, torch.nn.Linear))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained run folder (the default MNIST run)")
    parser.add_argument("--images", type=int, default=10, help="test images annealed together (default: 10)")
    parser.add_argument("--smoke", action="store_true", help="tiny schedules: checks the script, measures nothing")
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args()
    torch.manual_seed(0)
    run = load_run(args.run, "cpu")
    data = test_set(load_data(run.config.data, "test", "cpu"), bool(getattr(run.program, "binary_data", False)))
    x = data.images[: args.images]
    grid = ([(10, 2, 2), (10, 4, 2)] if args.smoke else
            [(100, 4, 5), (100, 8, 5), (100, 4, 10), (200, 4, 5)])
    rate = matmul_rate()
    z_dim = run.program.z_dim
    flops = decoder_flops(run.program.decoder)
    print(f"CPU: {cpu_name()}, torch threads {torch.get_num_threads()}; torch.mm 1024^2: {rate:.1f} GFLOP/s")
    print(f"decoder: {flops / 1e6:.2f} MFLOP forward per row; {args.images} test images of {args.run}")
    rows = []
    for steps, chains, leapfrog in grid:
        schedule = Schedule(steps=steps, chains=chains, leapfrog=leapfrog)
        t0 = time.perf_counter()
        result = ais_log_px(run.program.model, x, schedule)
        seconds = time.perf_counter() - t0
        evaluations = schedule.gradient_evaluations  # per image, tuning run included
        per_eval = seconds / (evaluations * args.images)
        # the decoder alone, on the rows one gradient evaluation of the estimating run sees
        alone = decoder_seconds(run.program.decoder, chains * args.images, z_dim) / (chains * args.images)
        row = {"steps": steps, "chains": chains, "leapfrog": leapfrog, "seconds_per_image": seconds / args.images,
               "us_per_evaluation": per_eval * 1e6, "decoder_us_per_row": alone * 1e6,
               "decoder_share": alone / per_eval, "decoder_gflops": 3 * flops / alone / 1e9,
               "hours_for_1000_images": seconds / args.images * 1000 / 3600,
               "log_px": float(result.log_px.mean()), "acceptance": float(result.acceptance.mean())}
        rows.append(row)
        print(f"T={steps:<5} C={chains:<3} L={leapfrog:<3} {row['seconds_per_image']:7.2f} s/image   "
              f"{row['us_per_evaluation']:6.1f} us per evaluation (decoder alone {row['decoder_us_per_row']:5.1f} us: "
              f"{100 * row['decoder_share']:4.0f} %, {row['decoder_gflops']:5.1f} GFLOP/s)   "
              f"1,000 images: {row['hours_for_1000_images']:5.2f} h   log p(x) {row['log_px']:.2f}, "
              f"acceptance {row['acceptance']:.2f}")
    if args.json:
        args.json.write_text(json.dumps({"cpu": cpu_name(), "matmul_gflops": rate, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
