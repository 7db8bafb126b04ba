"""Speed of pyro_vae's training step against a hand-written PyTorch VAE step.

Both sides train the same network (MLP 784-400-50, softplus) with the same estimator (a
one-sample Monte Carlo ELBO: log p(x|z) + log p(z) - log q(z|x) at a reparameterised z,
scaled by N / B), the same Adam, and the same data path (the binarised training set held
as one tensor on the device, batches gathered by index). Both run in one process, in
short blocks interleaved round after round, so that they share the machine's state
(frequency, caches, other load); the ratio is of the medians. Peak memory is measured
for each side in a fresh process of its own.

    python experiments/benchmark.py                      # everything, writes a JSON report
    python experiments/benchmark.py --smoke              # seconds: the test suite runs this
    python experiments/benchmark.py --skip-quality --skip-is

Reported: images per second, milliseconds per step, peak memory (CPU: the process's
peak resident set; CUDA: torch's peak allocation), and the ratio ours / reference; the
epochs and seconds for the default configuration to reach a test ELBO of -100 nats; the
wall time of the importance-sampled evaluation (K = 5000 over the 10,000 test images).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


# -- the reference: a hand-written PyTorch VAE step ----------------------------------


def abs_form_softplus(h):
    """softplus as (h + |h|) / 2 + log(1 + e^-|h|), out of place (differentiable): the form
    pyro_vae.networks.softplus takes with autograd on the CPU, written here by hand."""
    a = h.abs()
    return torch.log(torch.exp(-a) + 1) + torch.add(0.5 * h, a, alpha=0.5)


class _Act(torch.nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, h):
        return self.fn(h)


class ReferenceVAE(torch.nn.Module):
    """Plain PyTorch, the way one writes it by hand: same layers as pyro_vae's MLP pair.

    ``exp_log=True`` is the best step written here: every softplus in the abs form
    above instead of torch's (whose CPU kernel goes through the slow ``log1p``), and
    log p(x|z) as ``x . l - sum softplus(l)`` instead of the cross-entropy call (also
    ``log1p`` inside)."""

    def __init__(self, x_dim=784, z_dim=50, hidden=400, exp_log=False):
        super().__init__()
        self.softplus = abs_form_softplus if exp_log else torch.nn.functional.softplus
        self.exp_log = exp_log
        self.enc = torch.nn.Sequential(torch.nn.Linear(x_dim, hidden), _Act(self.softplus))
        self.enc_loc = torch.nn.Linear(hidden, z_dim)
        self.enc_scale = torch.nn.Linear(hidden, z_dim)
        self.dec = torch.nn.Sequential(torch.nn.Linear(z_dim, hidden), _Act(self.softplus), torch.nn.Linear(hidden, x_dim))

    def loss(self, x, num_data):
        h = self.enc(x)
        loc, scale = self.enc_loc(h), self.softplus(self.enc_scale(h))
        eps = torch.randn_like(loc)
        z = loc + scale * eps
        logits = self.dec(z)
        if self.exp_log:
            log_lik = (x * logits).sum() - self.softplus(logits).sum()
        else:
            log_lik = -torch.nn.functional.binary_cross_entropy_with_logits(logits, x, reduction="sum")
        # log p(z) - log q(z|x) at the sample (the 0.5 log 2 pi terms cancel)
        log_ratio = (-0.5 * z.pow(2) + 0.5 * eps.pow(2) + scale.log()).sum()
        return -(log_lik + log_ratio) * (num_data / x.shape[0])


def reference_step_fn(device, batch_size, compile_step=False, exp_log=False):
    model = ReferenceVAE(exp_log=exp_log).to(device)
    # fused Adam: the fastest torch Adam here (on the CPU 0.67 ms a step against foreach's
    # 1.27 ms for this network at batch 128, docs/performance.md), as pyro_vae's engine uses
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, fused=True)
    loss_fn = torch.compile(model.loss) if compile_step else model.loss

    def step(x, n):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(x, n)
        loss.backward()
        opt.step()
        return loss.detach()

    return step


def ours_step_fn(device, batch_size, engine):
    import pyro

    from pyro_vae.config import ModelConfig
    from pyro_vae.models import ProgramCall, build_model
    from pyro_vae.objectives import build_elbo
    from pyro_vae.steps import build_engine

    vae = build_model(ModelConfig(), (1, 28, 28)).to(device)
    # as pyro_vae.train builds it: the data is checked before training, the steps unvalidated
    eng = build_engine(engine, vae, vae.model, vae.guide, build_elbo("trace"), 1e-3, validate=False)
    call = ProgramCall(vae)
    scope = pyro.get_param_store().scope()
    scope.__enter__()

    def step(x, n):  # the keyword arguments the training loop builds for each minibatch
        return eng.step(**call.kwargs({"x": x, "y": None}, num_data=n, kl_weight=1.0))

    return step


def make_step(impl: str, device: torch.device, batch_size: int):
    if impl == "reference":
        return reference_step_fn(device, batch_size)
    if impl == "reference-compiled":
        return reference_step_fn(device, batch_size, compile_step=True)
    if impl == "reference-exp-log":
        return reference_step_fn(device, batch_size, exp_log=True)
    return ours_step_fn(device, batch_size, impl.split(":", 1)[1])


def fake_mnist(device: torch.device, n: int = 60_000) -> torch.Tensor:
    """Binary images at MNIST's mean intensity, on the device (speed does not depend on content)."""
    g = torch.Generator(device=device).manual_seed(0)
    return torch.bernoulli(torch.full((n, 784), 0.13, device=device), generator=g)


def interleaved_timing(impls, device_name: str, batch_size: int, steps: int, warmup: int, rounds: int) -> dict:
    """Time each implementation in blocks of ``steps`` steps, the blocks of all
    implementations interleaved round after round in this one process, so that both
    sides see the same machine state; returns each block's images per second."""
    device = torch.device(device_name)
    torch.manual_seed(0)
    data = fake_mnist(device)
    n = data.shape[0]
    perm = torch.randperm(n, device=device)
    batches = n // batch_size
    fns = {impl: make_step(impl, device, batch_size) for impl in impls}
    offset = {impl: 0 for impl in impls}

    def run(impl, k):
        total = torch.zeros((), device=device)
        for _ in range(k):
            j = offset[impl] % batches
            offset[impl] += 1
            total += fns[impl](data[perm[j * batch_size : (j + 1) * batch_size]], n)
        return float(total)  # one read at the end, as the training loop reads once per refresh

    for impl in impls:
        run(impl, warmup)
    result = {impl: [] for impl in impls}
    for _ in range(rounds):
        for impl in impls:
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            run(impl, steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            result[impl].append(steps * batch_size / (time.perf_counter() - t0))
    return result


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_memory(impl: str, device_name: str, batch_size: int, steps: int) -> float:
    """Runs inside a fresh process: MiB that ``steps`` training steps add at their peak to
    what the data and the networks already hold (CUDA: torch's peak allocation minus the
    allocation before the steps; CPU: the resident set, sampled after every step)."""
    device = torch.device(device_name)
    data = fake_mnist(device)
    step = make_step(impl, device, batch_size)
    if device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base, peak = _rss_mib(), 0.0
    for j in range(steps):
        step(data[j * batch_size : (j + 1) * batch_size], data.shape[0])
        if device.type != "cuda":
            peak = max(peak, _rss_mib())
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    return peak - base


def measure_memory(impl, device, batch_size, steps=20, default_malloc=False) -> float:
    cmd = [sys.executable, __file__, "--child", impl, device, str(batch_size), str(steps)]
    cmd += ["--default-malloc"] if default_malloc else []
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    return float(out.stdout.strip().splitlines()[-1])


def throughput_table(devices, batch_sizes, ours, reference, rounds, steps, warmup, default_malloc=False) -> list[dict]:
    rows = []
    for device in devices:
        for bs in batch_sizes:
            k = max(5, steps * 128 // bs)  # about the same number of images per block
            blocks = interleaved_timing([ours, reference], device, bs, k, warmup, rounds)
            med = {impl: statistics.median(v) for impl, v in blocks.items()}
            row = {
                "device": device, "batch_size": bs, "steps_per_block": k, "rounds": rounds,
                "ours": ours, "reference": reference,
                "ours_images_per_s": med[ours], "reference_images_per_s": med[reference],
                "ours_ms_per_step": 1000 * bs / med[ours], "reference_ms_per_step": 1000 * bs / med[reference],
                "ours_peak_mib": measure_memory(ours, device, bs, default_malloc=default_malloc),
                "reference_peak_mib": measure_memory(reference, device, bs, default_malloc=default_malloc),
                "ratio": med[ours] / med[reference],
                "ratio_per_round": [a / b for a, b in zip(blocks[ours], blocks[reference])],
            }
            rows.append(row)
            print(f"{device:5} batch {bs:5}  ours {row['ours_images_per_s']:9.0f} img/s "
                  f"({row['ours_ms_per_step']:.2f} ms)  reference {row['reference_images_per_s']:9.0f} img/s "
                  f"({row['reference_ms_per_step']:.2f} ms)  ratio {row['ratio']:.3f}  "
                  f"peak MiB {row['ours_peak_mib']:.0f} / {row['reference_peak_mib']:.0f}", flush=True)
    return rows


def time_to_quality(device, data_dir, target, max_epochs, out_dir, engine, batch_size=128, lr=1e-3) -> dict:
    from pyro_vae import DataConfig, RunConfig, TrainConfig
    from pyro_vae.runs import read_metrics
    from pyro_vae.train import train

    cfg = RunConfig(data=DataConfig(data_dir=data_dir),
                    train=TrainConfig(epochs=max_epochs, device=device, engine=engine, batch_size=batch_size, lr=lr))
    t0 = time.perf_counter()
    # the loop has no early stop; the metrics say when the target was first met
    train(cfg, out_dir, overwrite=True, progress=False, log=lambda s: print(s, flush=True))
    wall = time.perf_counter() - t0
    metrics = read_metrics(out_dir)
    reached = next((m for m in metrics if m["test_elbo"] >= target), None)
    train_seconds = None if reached is None else sum(m["seconds"] for m in metrics[: reached["epoch"]])
    return {"device": device, "batch_size": batch_size, "lr": lr, "target": target,
            "epochs": None if reached is None else reached["epoch"],
            "train_seconds": train_seconds, "wall_seconds_all_epochs": wall, "max_epochs": max_epochs,
            "best_test_elbo": max(m["test_elbo"] for m in metrics)}


def time_importance_sampling(device, data_dir, run_dir, num_samples, limit) -> dict:
    from pyro_vae.data import load_data, test_set
    from pyro_vae.evaluate import evaluate_model
    from pyro_vae.runs import load_run

    run = load_run(run_dir, device=device)
    cfg = run.config
    images = test_set(load_data(cfg.data, "test", run.device), run.program.binary_data).head(limit).images
    t0 = time.perf_counter()
    report = evaluate_model(run.program, images, num_samples=num_samples)
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    return {"device": device, "run": str(run_dir), "epoch": run.epoch, "num_samples": num_samples,
            "num_images": images.shape[0], "seconds": time.perf_counter() - t0,
            **{k: {"mean": e.mean, "stderr": e.stderr} for k, e in report.items()}}


def exp_log_softplus(h):
    """softplus as max(h, 0) + log(1 + e^-|h|) from torch's exp and log, in place: the form
    pyro_vae.networks.softplus takes without autograd, written here for the hand-written loops."""
    return torch.exp(h.abs().neg_()).add_(1).log_().add_(torch.relu(h))


@torch.no_grad()
def handwritten_log_px(vae, images, num_samples, batch_size=100, rows_per_chunk=50_000, fast=False,
                       as_pyro_vae=False, softplus=None):
    """log p(x) by K importance samples, written by hand against ``vae``'s own weights:
    the bound pyro_vae.evaluate.log_px_importance computes, with the same noise (draws
    ``randn(k, B, z_dim)`` chunk after chunk, as Pyro's particle plate draws them). The
    decoder runs as ``F.linear`` calls with ``softplus`` between them (default torch's
    ``F.softplus``; :func:`exp_log_softplus` is the faster form).

    ``fast=False`` is the straightforward loop: the cross-entropy call for log p(x|z) and
    ``Normal.log_prob`` for the prior and the guide. ``fast=True`` is the best loop
    written here: log p(x|z) = x . logits - sum softplus(logits), with ``x . logits``
    taken through the last layer's weights (``(x W) . h + x . b``: 400 products per
    sample instead of 784), and log p(z) - log q(z|x) from the noise, the constants
    cancelled. ``as_pyro_vae=True`` (with ``fast``) does the arithmetic pyro_vae's
    scoring does instead: ``x . logits`` over all 784 logits, as a likelihood that sees
    only the logits must. ``rows_per_chunk`` is how many decoder outputs (samples x
    images) are held at once."""
    import torch.nn.functional as F

    softplus = softplus or F.softplus
    linears = [m for m in vae.decoder.net if isinstance(m, torch.nn.Linear)]
    last = linears[-1]

    def body(z):
        h = z
        for layer in linears[:-1]:
            h = softplus(F.linear(h, layer.weight, layer.bias))
        return h

    out = []
    for x in images.split(batch_size):
        loc, scale = vae.encoder(x)
        chunk = max(1, rows_per_chunk // x.shape[0])
        total = torch.full((x.shape[0],), -math.inf, dtype=torch.float64, device=x.device)
        x_w, x_b, log_scale = x @ last.weight, x @ last.bias, scale.log().sum(-1)
        for k0 in range(0, num_samples, chunk):
            k = min(chunk, num_samples - k0)
            eps = torch.randn(k, *loc.shape, device=x.device)
            z = loc + eps * scale
            h = body(z)
            if fast and as_pyro_vae:
                logits = F.linear(h, last.weight, last.bias)
                log_lik = torch.linalg.vecdot(logits, x) - softplus(logits).sum(-1)
                log_w = log_lik + 0.5 * (torch.linalg.vecdot(eps, eps) - torch.linalg.vecdot(z, z)) + log_scale
            elif fast:
                log_lik = torch.linalg.vecdot(h, x_w) + x_b - softplus(F.linear(h, last.weight, last.bias)).sum(-1)
                log_w = log_lik + 0.5 * (torch.linalg.vecdot(eps, eps) - torch.linalg.vecdot(z, z)) + log_scale
            else:
                logits = F.linear(h, last.weight, last.bias)
                log_lik = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none").sum(-1)
                log_prior = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)
                log_q = torch.distributions.Normal(loc, scale).log_prob(z).sum(-1)
                log_w = log_lik + log_prior - log_q
            total = torch.logaddexp(total, torch.logsumexp(log_w.double(), dim=0))
        out.append(total - math.log(num_samples))
    return torch.cat(out)


def matmul_gflops(device, rows=5000, rounds=7) -> float:
    """The machine's matrix-multiply throughput on the decoder's largest layer shape
    ((rows, 400) x (400, 784), float32), in GFLOP/s: the ceiling for the evaluation."""
    a, b = torch.randn(rows, 400, device=device), torch.randn(400, 784, device=device)
    best = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(5):
            a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best.append((time.perf_counter() - t0) / 5)
    return 2 * rows * 400 * 784 / statistics.median(best) / 1e9


def is_throughput_table(device_name, num_images, num_samples, rounds) -> list[dict]:
    """Images per second of the K-sample bound: pyro_vae's log_px_importance (today's
    default chunk and the old one of 50,000 decoder outputs) against the hand-written
    loops, interleaved round after round in this process, on the default network."""
    from pyro_vae.config import ModelConfig
    from pyro_vae.evaluate import log_px_importance
    from pyro_vae.models import build_model

    device = torch.device(device_name)
    torch.manual_seed(0)
    vae = build_model(ModelConfig(), (1, 28, 28)).to(device)
    images = fake_mnist(device, num_images)

    def ours(max_elements=None):
        kw = {} if max_elements is None else {"max_elements": max_elements}
        return lambda: log_px_importance(vae.model, vae.guide, images, num_samples, seed=0, **kw)

    def handwritten(rows, fast, as_pyro_vae=False, softplus=None):
        def run():
            torch.manual_seed(0)
            return handwritten_log_px(vae, images, num_samples, rows_per_chunk=rows, fast=fast,
                                      as_pyro_vae=as_pyro_vae, softplus=softplus)
        return run

    variants = {
        "pyro_vae log_px_importance (default chunk)": ours(),
        "pyro_vae log_px_importance, 1,000 outputs per chunk": ours(1_000),
        "pyro_vae log_px_importance, 5,000 outputs per chunk": ours(5_000),
        "pyro_vae log_px_importance, 50,000 outputs per chunk (before)": ours(50_000),
        "hand-written, 50,000 outputs per chunk": handwritten(50_000, False),
        "hand-written, 5,000 outputs per chunk": handwritten(5_000, False),
        "hand-written best formulas, torch's softplus, 2,000 outputs per chunk": handwritten(2_000, True),
        "hand-written best (exp/log softplus, 5,000 outputs per chunk)": handwritten(5_000, True, False, exp_log_softplus),
        "hand-written best (exp/log softplus, 2,000 outputs per chunk)": handwritten(2_000, True, False, exp_log_softplus),
        "hand-written best (exp/log softplus, 1,000 outputs per chunk)": handwritten(1_000, True, False, exp_log_softplus),
        "hand-written, pyro_vae's arithmetic (2,000 outputs per chunk)": handwritten(2_000, True, True, exp_log_softplus),
    }
    with torch.no_grad(), __import__("pyro").validation_enabled(False):
        values = {name: fn() for name, fn in variants.items()}  # warm up, and the values to compare
        seconds = {name: [] for name in variants}
        order = random.Random(0)
        for _ in range(rounds):
            names = list(variants)
            order.shuffle(names)  # a fresh order each round: no variant always follows the same one
            for name in names:
                fn = variants[name]
                t0 = time.perf_counter()
                fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
                seconds[name].append(time.perf_counter() - t0)
    gflops = matmul_gflops(device)
    flops_per_image = num_samples * 2 * (50 * 400 + 400 * 784)  # the decoder's two layers, per image
    base = statistics.median(seconds["hand-written, 50,000 outputs per chunk"])
    reference = values["hand-written, 50,000 outputs per chunk"]
    rows = []
    for name in variants:
        med = statistics.median(seconds[name])
        row = {"device": device_name, "variant": name, "images": num_images, "num_samples": num_samples,
               "rounds": rounds, "images_per_s": num_images / med,
               "images_per_s_per_round": [num_images / t for t in seconds[name]],
               "speed_vs_handwritten_50000": base / med,
               "matmul_share": num_images * flops_per_image / med / 1e9 / gflops, "matmul_gflops": gflops,
               "max_abs_diff_vs_handwritten_nats": float((values[name] - reference).abs().max())}
        rows.append(row)
        print(f"{device_name:5} IS K={num_samples}  {name:66} {row['images_per_s']:7.2f} img/s  "
              f"x{row['speed_vs_handwritten_50000']:.2f} of hand-written at 50,000  "
              f"{100 * row['matmul_share']:4.1f} % of {gflops:.0f} GFLOP/s  "
              f"max |diff| {row['max_abs_diff_vs_handwritten_nats']:.1e}", flush=True)
    return rows


def hardware() -> dict:
    info = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "torch_threads": torch.get_num_threads()}
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine", default=None, help="pyro_vae engine to time (default: the CLI's default)")
    p.add_argument("--reference", default="reference", choices=["reference", "reference-exp-log"],
                   help="the hand-written step: torch's softplus and cross-entropy (default), or the softplus "
                        "in exp/log form that pyro_vae uses on the CPU")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[128, 1024])
    p.add_argument("--steps", type=int, default=50, help="steps per timed block at batch 128 (scaled for larger batches)")
    p.add_argument("--warmup", type=int, default=20)
    p.add_argument("--rounds", type=int, default=15, help="timed blocks per implementation, interleaved")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--skip-quality", action="store_true")
    p.add_argument("--skip-is", action="store_true")
    p.add_argument("--quality-epochs", type=int, default=40)
    p.add_argument("--quality-batch-size", type=int, default=128, help="batch size of the time-to-quality run")
    p.add_argument("--quality-lr", type=float, default=1e-3, help="learning rate of the time-to-quality run")
    p.add_argument("--skip-throughput", action="store_true")
    p.add_argument("--is-samples", type=int, default=5000)
    p.add_argument("--is-limit", type=int, default=None, help="evaluate the first N test images only")
    p.add_argument("--skip-is-throughput", action="store_true")
    p.add_argument("--is-throughput-images", type=int, default=200,
                   help="images per timed call of the importance-sampling throughput comparison (each call of "
                        "log_px_importance records its scoring once, about 0.1 s, which the time includes)")
    p.add_argument("--is-throughput-rounds", type=int, default=3)
    p.add_argument("--is-run", type=Path, default=None,
                   help="time the importance-sampled evaluation of this run (default: the time-to-quality run)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "benchmark")
    p.add_argument("--smoke", action="store_true", help="a few steps of everything (for the tests)")
    p.add_argument("--default-malloc", action="store_true",
                   help="leave glibc's malloc settings alone (default: pyro_vae.steps.keep_freed_memory, "
                        "for both sides, as pyro-vae train does on the CPU)")
    p.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    from pyro_vae.steps import keep_freed_memory

    # process-wide, so the reference gets it too: the comparison stays like for like
    malloc_tuned = False if args.default_malloc else keep_freed_memory()
    if args.child:
        impl, device, bs, steps = args.child
        print(peak_memory(impl, device, int(bs), int(steps)))
        return 0

    from pyro_vae.config import TrainConfig

    engine = args.engine or TrainConfig().engine
    if args.smoke:
        args.batch_sizes, args.steps, args.warmup, args.rounds = [64], 5, 2, 2
        args.quality_epochs, args.is_samples, args.is_limit = 1, 10, 20
        args.is_throughput_images, args.is_throughput_rounds = 3, 1
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"hardware": hardware(), "engine": engine, "keep_freed_memory": malloc_tuned, "command": " ".join(["python", "experiments/benchmark.py", *(argv or sys.argv[1:])])}
    if not args.skip_throughput:
        report["throughput"] = throughput_table(devices, args.batch_sizes, f"ours:{engine}", args.reference,
                                                args.rounds, args.steps, args.warmup, args.default_malloc)
    if not args.skip_is_throughput:
        report["is_throughput"] = [row for device in devices for row in is_throughput_table(
            device, args.is_throughput_images, args.is_samples, args.is_throughput_rounds)]
    if not args.skip_quality or not args.skip_is:
        quality_dir = args.out / "quality"
        for device in devices:
            if args.smoke:
                from pyro_vae import DataConfig, RunConfig, TrainConfig as TC
                from pyro_vae.train import train

                train(RunConfig(data=DataConfig(data_dir=args.data_dir, train_limit=500, test_limit=100),
                                train=TC(epochs=1, device=device, engine=engine)),
                      quality_dir / device, overwrite=True, progress=False, log=lambda s: None)
                report.setdefault("time_to_quality", []).append({"device": device, "smoke": True})
            elif not args.skip_quality:
                report.setdefault("time_to_quality", []).append(
                    time_to_quality(device, args.data_dir, -100.0, args.quality_epochs, quality_dir / device, engine,
                                    args.quality_batch_size, args.quality_lr))
            is_run = args.is_run or quality_dir / device
            if not args.skip_is and (is_run / "checkpoint.pt").exists():
                report.setdefault("importance_sampling", []).append(
                    time_importance_sampling(device, args.data_dir, is_run, args.is_samples, args.is_limit))
                print(report["importance_sampling"][-1], flush=True)
    path = args.out / ("benchmark-smoke.json" if args.smoke else "benchmark.json")
    path.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
