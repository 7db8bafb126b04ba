"""Where the time of an importance-sampled evaluation goes: torch.profiler over
``log_px_importance`` on the default network (untrained; the time does not depend on
the weights).

    python experiments/profile_is.py                      # softplus as pyro_vae chooses on this machine
    python experiments/profile_is.py --softplus torch     # torch's softplus
    python experiments/profile_is.py --softplus exp-log   # the exp/log form (pyro_vae.networks.exp_log_softplus)

Prints torch.profiler's table of operators, by time spent in each.
"""

from __future__ import annotations

import argparse
import sys

import pyro
import torch
from torch.profiler import profile

import pyro_vae.networks
from pyro_vae.config import ModelConfig
from pyro_vae.evaluate import log_px_importance
from pyro_vae.models import build_model
from pyro_vae.steps import keep_freed_memory


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=100)
    p.add_argument("--samples", type=int, default=5000)
    p.add_argument("--rows", type=int, default=12, help="operators in the table")
    p.add_argument("--softplus", choices=pyro_vae.networks.SOFTPLUS_FORMS,
                   help="the CPU softplus of the activation, the guide's scale and the likelihood "
                        "(default: as pyro_vae chooses on this machine)")
    args = p.parse_args(argv)
    keep_freed_memory()  # as pyro-vae evaluate runs
    if args.softplus:
        pyro_vae.networks.set_cpu_softplus_form(args.softplus)
    print(f"softplus: {pyro_vae.networks.cpu_softplus_form()}")
    torch.manual_seed(0)
    vae = build_model(ModelConfig(), (1, 28, 28))
    x = torch.bernoulli(torch.rand(args.images, 1, 28, 28) * 0.3)
    with torch.no_grad(), pyro.validation_enabled(False):
        log_px_importance(vae.model, vae.guide, x, max(1, args.samples // 5), seed=0)  # warm up: the recording
        with profile() as prof:
            log_px_importance(vae.model, vae.guide, x, args.samples, seed=0)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
