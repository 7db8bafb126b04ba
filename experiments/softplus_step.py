"""What each CPU softplus form costs a whole training step: pyro_vae's captured step
(recorded loss, backward, fused Adam) with ``softplus`` as torch computes it and in the
exp/log form (pyro_vae.networks.exp_log_softplus), on the default network at batch 128
and on Burda et al.'s one- and two-layer networks trained by the IWAE bound at k = 50,
batch 20 (the k = 50 rows of experiments/iwae_table.py). One thread; both forms built
from the same weights and timed in alternating blocks, in one process.

    python experiments/softplus_step.py                # medians over 5 rounds of 15 steps
    python experiments/softplus_step.py --smoke        # a few steps, tiny networks

Prints ms per step for each form, their ratio, and which form pyro_vae.networks.softplus
chose on this machine (``$PYRO_VAE_SOFTPLUS`` or a measurement of ``log1p``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import pyro
import torch

from pyro_vae import networks
from pyro_vae.capture import CapturedLoss
from pyro_vae.config import ModelConfig
from pyro_vae.models import build_model
from pyro_vae.objectives import build_elbo
from pyro_vae.steps import keep_freed_memory

BURDA_1 = dict(model="vae", z_dim=50, hidden_dims=(200, 200), activation="tanh")
BURDA_2 = dict(model="vae2", z_dim=100, hidden_dims=(200, 200), activation="tanh", z2_dim=50,
               z2_hidden_dims=(100, 100))
# name: (model settings, estimator, particles, batch size)
CASES = {
    "default network, ELBO, batch 128": ({}, "trace", 1, 128),
    "Burda 1 layer, IWAE k=50, batch 20": (BURDA_1, "iwae", 50, 20),
    "Burda 2 layers, IWAE k=50, batch 20": (BURDA_2, "iwae", 50, 20),
}
SMOKE = {"tiny, IWAE k=5, batch 8": (dict(z_dim=4, hidden_dims=(16,)), "iwae", 5, 8)}


def captured_step(settings: dict, estimator: str, particles: int, batch: int, form: str):
    """One training step of pyro_vae's captured engine, its softplus recorded in ``form``."""
    networks.set_cpu_softplus_form(form)
    torch.manual_seed(0)
    program = build_model(ModelConfig(**settings), (1, 28, 28))
    loss_fn = CapturedLoss(build_elbo(estimator, particles)(program.model, program.guide), program, strict=True)
    params = list(program.parameters())
    adam = torch.optim.Adam(params, lr=1e-3, fused=True)
    x = torch.bernoulli(torch.rand(batch, 1, 28, 28) * 0.3, generator=torch.Generator().manual_seed(1))

    def step():
        adam.zero_grad(set_to_none=True)
        loss_fn(x=x, num_data=60_000).backward()
        adam.step()

    with pyro.validation_enabled(False):
        for _ in range(3):  # the first runs eagerly, the second records
            step()
    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=15, help="steps per timed block")
    p.add_argument("--smoke", action="store_true", help="tiny network, 1 round of 2 steps")
    args = p.parse_args(argv)
    if args.smoke:
        args.rounds, args.steps = 1, 2
    chosen = networks.cpu_softplus_form()
    torch.set_num_threads(1)
    keep_freed_memory()  # as pyro-vae train
    print(f"pyro_vae.networks.softplus computes on this machine's CPU: {chosen!r}")
    print(f"| case | torch softplus, ms/step | exp/log form, ms/step | exp/log / torch |")
    print("|---|---|---|---|")
    with pyro.get_param_store().scope(), pyro.validation_enabled(False):
        for name, case in (SMOKE if args.smoke else CASES).items():
            steps = {form: captured_step(*case, form) for form in networks.SOFTPLUS_FORMS}
            times = {form: [] for form in steps}
            for _ in range(args.rounds):
                for form, step in steps.items():
                    start = time.perf_counter()
                    for _ in range(args.steps):
                        step()
                    times[form].append((time.perf_counter() - start) / args.steps * 1e3)
            ms = {form: statistics.median(t) for form, t in times.items()}
            print(f"| {name} | {ms['torch']:.2f} | {ms['exp-log']:.2f} | {ms['exp-log'] / ms['torch']:.3f} |",
                  flush=True)
    networks.set_cpu_softplus_form(chosen)
    return 0


if __name__ == "__main__":
    sys.exit(main())
