"""Time torch's softplus against the exp/log form pyro_vae uses on the CPU.

    python experiments/softplus_forms.py            # the decoder's shapes in training and evaluation
    python experiments/softplus_forms.py --rounds 3 --json runs/softplus.json

torch's CPU softplus computes log1p(exp(h)); on some CPUs its ``log1p`` is several times
slower than ``exp`` and ``log`` together, on others as fast as ``exp`` (docs/performance.md).
This script times, per element, in one process and interleaved round after round: torch's
``softplus``, ``log1p``, ``exp`` and ``log`` alone, and pyro_vae.networks.exp_log_softplus
without autograd (in place) and with autograd (forward and backward), against torch's
softplus forward and backward. Medians over rounds; ratios are what carries over between
machines. It prints which form pyro_vae.networks.softplus chose on this machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from pyro_vae.networks import cpu_softplus_form, exp_log_softplus
from pyro_vae.steps import keep_freed_memory

SHAPES = [(128, 400), (128, 784), (1024, 784), (2000, 784)]  # hidden and output, batch 128/1024; an IS chunk


def per_element_ns(fn, numel, calls):
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls / numel * 1e9


def cases(shape):
    h = torch.randn(*shape) * 4
    g = torch.randn(*shape)
    hg = h.clone().requires_grad_()

    def backward_of(fn):
        def run():
            fn(hg).backward(g)
        return run

    return {
        "torch softplus": lambda: F.softplus(h),
        "torch log1p": lambda: torch.log1p(h.abs()),
        "torch exp": lambda: torch.exp(h),
        "torch log": lambda: torch.log(h.abs()),
        "exp/log form, no autograd": lambda: exp_log_softplus(h),
        "torch softplus, forward + backward": backward_of(F.softplus),
        "exp/log form, forward + backward": backward_of(exp_log_softplus),
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=20, help="calls per timed block")
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    keep_freed_memory()  # as pyro-vae train: no page faults from freed buffers in the timings
    form = cpu_softplus_form()
    print(f"pyro_vae.networks.softplus computes on this machine's CPU: {form!r}", flush=True)
    rows = []
    for shape in SHAPES:
        fns = cases(shape)
        numel = shape[0] * shape[1]
        times = {name: [] for name in fns}
        for _ in range(args.rounds):
            for name, fn in fns.items():
                times[name].append(per_element_ns(fn, numel, args.calls))
        for name in fns:
            rows.append({"shape": list(shape), "case": name, "ns_per_element": statistics.median(times[name])})
            print(f"{str(shape):12} {name:40} {rows[-1]['ns_per_element']:7.2f} ns/element", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                         "pyro_vae_form": form, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
