"""The table of Pyro's CVAE tutorial (Sohn et al. 2015's quadrant completion on MNIST),
reproduced: for 1, 2 and 3 quadrants shown, the baseline network's -log p(x_hidden | x_shown)
and the conditional VAE's -ELBO with 10 particles (what the tutorial reports as its
"estimated conditional log-likelihood"), beside the importance-sampled
-log p(x_hidden | x_shown) (K = 5000), which the tutorial's table does not have.

    python experiments/cvae_table.py --runs /tmp/runs                 # 1, 2 and 3 quadrants
    python experiments/cvae_table.py --runs /tmp/runs --quadrants 1 --epochs 10 --is-limit 1000
    python experiments/cvae_table.py --smoke --runs /tmp/smoke        # seconds: tiny networks, 500 images

For each quadrant count it trains (or continues: ``--resume-if-present``) two runs in the
runs folder, each printed as the ``pyro-vae`` command it is:

* ``cvae-baseline-q{N}``: the tutorial's deterministic network, 500-500 ReLU;
* ``cvae-q{N}``: the conditional VAE, z 200, 500-500 ReLU, its prior network reading the
  baseline's guess (``--baseline``), as the tutorial builds it.

Both train with Adam at lr 1e-3, batch 128, Trace_ELBO, for a fixed number of epochs (the
tutorial stops early on the test set, patience 3, at most 101). The CVAE copies the
baseline's network when it starts; continued later for more epochs, each run goes on
from where it stopped, and the CVAE keeps the copy it started with. The numbers are then
computed on the test set and kept beside each run (``cvae-table.json``, per epoch), so a
second call evaluates nothing it has evaluated, and a killed one goes on where it stopped.

The data is MNIST binarised as the package binarises it for a Bernoulli likelihood
(dynamically in training, once with a fixed seed for the test set); the tutorial scores
the grey values with the Bernoulli cross-entropy instead, so the two columns answer
close but not identical questions (docs/results.md).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from pyro_vae import cli
from pyro_vae.data import load_data, test_set
from pyro_vae.evaluate import Estimate, elbo_terms, log_px_importance
from pyro_vae.runs import load_run

TUTORIAL = {  # Pyro's CVAE tutorial, its table: -ELBO (10 particles) per quadrant count, nats per image
    "baseline": {1: 100.4, 2: 61.9, 3: 25.4},
    "cvae": {1: 71.8, 2: 51.0, 3: 24.2},
}
NETWORKS = ["--hidden-dims", "500", "500", "--activation", "relu"]
SMOKE_NETWORKS = ["--hidden-dims", "16", "--activation", "relu"]


def train(argv: list[str]) -> None:
    print("$ pyro-vae train " + " ".join(argv), flush=True)
    code = cli.main(["train", *argv])
    if code > 128:  # stopped by a signal, after saving the step it had reached: not a failure
        print("stopped; the run's checkpoint holds the step reached: run the same command again to resume it",
              file=sys.stderr)
        raise SystemExit(code)
    if code:
        raise SystemExit(f"pyro-vae train failed ({code})")


def runs_of(args, q: int) -> tuple[Path, Path]:
    return args.runs / f"cvae-baseline-q{q}", args.runs / f"cvae-q{q}"


def train_both(args, q: int) -> None:
    baseline, cvae = runs_of(args, q)
    common = ["--quadrants", str(q), "--no-progress", "--resume-if-present", "--seed", str(args.seed)]
    if args.smoke:
        common += ["--train-limit", "500", "--test-limit", "100"]
    nets = SMOKE_NETWORKS if args.smoke else NETWORKS
    z = ["--z-dim", "4" if args.smoke else "200"]
    train(["--model", "cvae-baseline", *nets, "--epochs", str(args.baseline_epochs), *common, "--out", str(baseline)])
    train(["--model", "cvae", "--baseline", str(baseline), *z, *nets, "--epochs", str(args.epochs), *common,
           "--out", str(cvae)])


def evaluate(run_dir: Path, args, latent: bool) -> dict:
    """This run's numbers at its epoch, from its ``cvae-table.json`` when they are there."""
    store = run_dir / "cvae-table.json"
    run = load_run(run_dir, device=args.device)
    key = json.dumps({"epoch": run.epoch, "particles": args.particles, "num_samples": args.num_samples,
                      "is_limit": args.is_limit, "seed": args.seed}, sort_keys=True)
    done = json.loads(store.read_text()) if store.exists() else {}
    if key in done:
        return done[key]
    start = time.perf_counter()
    test = test_set(load_data(run.config.data, "test", run.device), run.program.binary_data)
    images = test.images
    model, guide = run.program.model, run.program.guide
    # the tutorial's estimate: the mean of `particles` one-draw ELBOs of each image (Trace_ELBO(num_particles))
    draws = args.particles if latent else 1
    elbo = torch.stack([elbo_terms(model, guide, images, batch_size=1000, seed=args.seed + 7919 * r)["elbo"]
                        for r in range(draws)]).double().mean(0)
    out = {"epoch": run.epoch, "num_test_images": images.shape[0], "particles": draws,
           "neg_elbo": -Estimate.of(elbo).mean, "neg_elbo_stderr": Estimate.of(elbo).stderr}
    if latent and args.num_samples > 0:
        few = images[: args.is_limit]
        log_px = log_px_importance(model, guide, few, num_samples=args.num_samples, seed=args.seed + 1)
        out.update({"is_num_samples": args.num_samples, "is_test_images": few.shape[0],
                    "neg_log_px_is": -Estimate.of(log_px).mean, "neg_log_px_is_stderr": Estimate.of(log_px).stderr,
                    # the ELBO of the same images, for the paired gap
                    "neg_elbo_is_images": -Estimate.of(elbo[: few.shape[0]]).mean,
                    "is_gain": Estimate.of(log_px - elbo[: few.shape[0]]).mean,
                    "is_gain_stderr": Estimate.of(log_px - elbo[: few.shape[0]]).stderr})
    out["seconds"] = time.perf_counter() - start
    done[key] = out
    store.write_text(json.dumps(done, indent=2) + "\n")
    return out


def table(rows: dict[int, tuple[dict, dict]], args) -> str:
    qs = sorted(rows)
    head = "| nats per image, MNIST test set | " + " | ".join(f"{q} quadrant{'s' if q > 1 else ''}" for q in qs) + " |"
    lines = [head, "|---" * (len(qs) + 1) + "|"]

    def cell(value, stderr=None, tutorial=None):
        text = f"{value:.2f}" + (f" +- {stderr:.2f}" if stderr is not None else "")
        return text + (f" (tutorial {tutorial})" if tutorial is not None else "")

    lines.append("| baseline network, -log p(x_hidden \\| x_shown) | " + " | ".join(
        cell(rows[q][0]["neg_elbo"], rows[q][0]["neg_elbo_stderr"], TUTORIAL["baseline"].get(q)) for q in qs) + " |")
    lines.append(f"| CVAE, -ELBO ({args.particles} particles) | " + " | ".join(
        cell(rows[q][1]["neg_elbo"], rows[q][1]["neg_elbo_stderr"], TUTORIAL["cvae"].get(q)) for q in qs) + " |")
    if all("neg_log_px_is" in rows[q][1] for q in qs):
        k = rows[qs[0]][1]["is_num_samples"]
        n = rows[qs[0]][1]["is_test_images"]
        lines.append(f"| CVAE, -log p(x_hidden \\| x_shown), IS K = {k} ({n} test images) | " + " | ".join(
            cell(rows[q][1]["neg_log_px_is"], rows[q][1]["neg_log_px_is_stderr"]) for q in qs) + " |")
        lines.append(f"| CVAE, -ELBO of the same {n} images | " + " | ".join(
            cell(rows[q][1]["neg_elbo_is_images"]) for q in qs) + " |")
    lines.append("| epochs (baseline, CVAE) | " + " | ".join(f"{rows[q][0]['epoch']}, {rows[q][1]['epoch']}"
                                                            for q in qs) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="folder of the run folders (outside the repo)")
    parser.add_argument("--quadrants", type=int, nargs="+", default=[1, 2, 3], choices=(1, 2, 3))
    parser.add_argument("--epochs", type=int, default=30, help="epochs of the CVAE (default: 30)")
    parser.add_argument("--baseline-epochs", type=int, default=30, help="epochs of the baseline (default: 30)")
    parser.add_argument("--particles", type=int, default=10, help="one-draw ELBOs averaged per image (default: 10)")
    parser.add_argument("--num-samples", type=int, default=5000, help="K of the IS bound; 0 skips it (default: 5000)")
    parser.add_argument("--is-limit", type=int, default=None, metavar="N",
                        help="importance sample the first N test images only (default: all 10,000)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-train", action="store_true", help="evaluate the runs as they stand")
    parser.add_argument("--smoke", action="store_true", help="tiny networks, 500 training images, 1 epoch, K = 10")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args(argv)
    if args.smoke:
        args.epochs, args.baseline_epochs, args.num_samples, args.particles = 1, 1, 10, 2
    if not args.runs.is_dir() and args.no_train:
        parser.error(f"--runs {args.runs} does not exist")
    rows = {}
    for q in args.quadrants:
        if not args.no_train:
            train_both(args, q)
        baseline, cvae = runs_of(args, q)
        rows[q] = (evaluate(baseline, args, latent=False), evaluate(cvae, args, latent=True))
        print(f"quadrants {q}: baseline {rows[q][0]}\n             cvae {rows[q][1]}", flush=True)
    text = table(rows, args)
    print(text)
    (args.runs / "cvae-table.md").write_text(text + "\n")
    if args.json is not None:
        args.json.write_text(json.dumps({str(q): {"baseline": b, "cvae": c} for q, (b, c) in rows.items()}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
