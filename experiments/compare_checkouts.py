"""Before and after a change: the default VAE's hot paths timed in two checkouts of pyro_vae.

Each round runs one fresh process per checkout, alternating (before, after, before, ...),
so both see the same machine state; each process times

* the ``captured`` training step at batch 128 (200 steps, after 20 to warm up),
* ``log_px_importance`` with K = 5000 on 40 images (the default chunking),
* ``elbo_terms`` on 10,000 images in batches of 1,000 (what every epoch reports),
* one epoch of ``pyro_vae.fit`` on 6,000 images at batch 128 (the loop's own seconds, as
  metrics.jsonl records them: the steps, without the evaluation),

on an untrained default VAE and random binary images (the times do not depend on the
values), with 2 threads. The report gives the median of the rounds per checkout, and the
ELBO each computed, which must agree. Make the "before" checkout with
``git worktree add /tmp/before <commit>``.

    python experiments/compare_checkouts.py --before /tmp/before            # 3 rounds
    python experiments/compare_checkouts.py --smoke                          # this checkout against itself
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from machine import cpu_name  # experiments/machine.py

REPO = Path(__file__).resolve().parents[1]


def measure(smoke: bool) -> dict[str, float]:
    import pyro
    import torch

    from pyro_vae.config import ModelConfig
    from pyro_vae.evaluate import elbo_terms, log_px_importance
    from pyro_vae.models import build_model
    from pyro_vae.objectives import build_elbo
    from pyro_vae.steps import build_engine

    torch.set_num_threads(2)
    torch.manual_seed(0)
    steps, warmup, samples, images = (5, 2, 50, 500) if smoke else (200, 20, 5000, 10_000)
    vae = build_model(ModelConfig(), (1, 28, 28))
    x = torch.bernoulli(torch.full((images, 1, 28, 28), 0.2))
    engine = build_engine("captured", vae, vae.model, vae.guide, build_elbo("trace"), 1e-3, validate=False)
    out = {}
    with pyro.validation_enabled(False):
        for i in range(warmup):
            engine.step(x=x[:128], num_data=60_000)
        t = time.perf_counter()
        for i in range(steps):
            engine.step(x=x[(i % 3) * 128 : (i % 3 + 1) * 128], num_data=60_000)
        out["step_ms"] = (time.perf_counter() - t) / steps * 1e3
        log_px_importance(vae.model, vae.guide, x[:10], max(1, samples // 10), seed=0)  # the recording
        t = time.perf_counter()
        log_px_importance(vae.model, vae.guide, x[:40], samples, seed=0)
        out["is_images_per_s"] = 40 / (time.perf_counter() - t)
        t = time.perf_counter()
        out["elbo"] = float(elbo_terms(vae.model, vae.guide, x, 1000, seed=1)["elbo"].double().mean())
        out["elbo_terms_s"] = time.perf_counter() - t
    import tempfile

    from pyro_vae import TrainConfig, fit
    from pyro_vae.runs import read_metrics

    with tempfile.TemporaryDirectory() as folder:
        fit(build_model(ModelConfig(), (1, 28, 28)), x[: 600 if smoke else 6000], folder, progress=False,
            log=lambda line: None, settings=TrainConfig(epochs=1, device="cpu"), overwrite=True)
        out["epoch_s"] = read_metrics(folder)[0]["seconds"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--before", type=Path, default=REPO, help="the checkout to compare with (default: this one)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, one round (for the tests)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(" ".join(f"{k}={v!r}" for k, v in measure(args.smoke).items()))
        return 0
    if not (args.before / "pyro_vae" / "__init__.py").is_file():
        sys.exit(f"--before {args.before} is not a checkout of pyro_vae (no pyro_vae/__init__.py)")
    trees = {"before": args.before.resolve(), "after": REPO}
    results: dict[str, list[dict]] = {name: [] for name in trees}
    for _ in range(1 if args.smoke else args.rounds):
        for name, tree in trees.items():
            cmd = [sys.executable, str(Path(__file__).resolve()), "--child"] + (["--smoke"] if args.smoke else [])
            proc = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(tree)}, cwd=tree, capture_output=True,
                                  text=True)
            if proc.returncode:
                sys.exit(f"{name} ({tree}) failed:\n{proc.stderr[-2000:]}")
            line = proc.stdout.strip().splitlines()[-1]
            results[name].append({k: float(v) for k, v in (item.split("=") for item in line.split())})
    print(f"{cpu_name()}, {os.cpu_count()} CPUs; medians of "
          f"{len(results['after'])} round(s)")
    for name, tree in trees.items():
        med = {k: statistics.median(r[k] for r in results[name]) for k in results[name][0]}
        print(f"{name:<7} {str(tree):<30} step {med['step_ms']:.3f} ms   IS {med['is_images_per_s']:.2f} img/s   "
              f"elbo_terms {med['elbo_terms_s']:.3f} s   fit epoch {med['epoch_s']:.2f} s   (elbo {med['elbo']:.6f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
