"""How long `pyro-vae train` takes to reach its first step, beyond importing torch and pyro.

    python experiments/startup.py [--repeats 3] [train flags ...]

Runs, in this process, the `train` command with the flags given (default: the default
configuration into a temporary folder), stops it at the start of its first epoch, and
prints the seconds spent importing torch and pyro and then reaching the first step, and
how much of the latter is torch's own import of torch._dynamo (its optimisers' first
`add_param_group` imports it). Each repeat is a fresh process. The folder of the stopped
run is removed by train itself (a run stopped before its first checkpoint leaves none).
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time

CHILD = """
import sys, time
t0 = time.perf_counter()
import torch, pyro  # noqa: F401
t1 = time.perf_counter()
import pyro_vae.train as train_module
reached = {}
def first_epoch(self, epoch):
    reached["t"] = time.perf_counter()
    raise SystemExit(0)
train_module._Training.run_epoch = first_epoch
from pyro_vae.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps({"torch_pyro": t1 - t0, "to_first_step": reached["t"] - t1}))
"""

DYNAMO = """
import time, json, torch, pyro  # noqa: F401
t = time.perf_counter()
import torch._dynamo  # noqa: F401
print(json.dumps({"dynamo": time.perf_counter() - t}))
"""


def child(code: str, args) -> dict:
    out = subprocess.run([sys.executable, "-c", "import json\n" + code, *args], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    known, train_flags = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as folder:
        args = ["train", "--out", f"{folder}/run", "--no-progress", *train_flags]
        for _ in range(known.repeats):
            start = child(CHILD, args)
            dynamo = child(DYNAMO, [])["dynamo"]
            print(f"torch + pyro {start['torch_pyro']:.2f} s; then to the first step {start['to_first_step']:.2f} s, "
                  f"of which torch._dynamo's import (alone) {dynamo:.2f} s: pyro_vae's own "
                  f"{start['to_first_step'] - dynamo:.2f} s")


if __name__ == "__main__":
    main()
