"""How long `pyro-vae train` and `pyro-vae evaluate` take to reach their first step,
beyond importing torch and pyro.

    python experiments/startup.py [--repeats 3] [train flags ...]

Runs, in a fresh process per repeat, the `train` command with the flags given (default:
the default configuration into a temporary folder) and stops it at the start of its first
epoch; then `evaluate` on a small run trained first (its start-up does not depend on the
run's size: it loads the run and the test set) and stops it where the importance sampling
of the first images begins. Prints, per command, the seconds spent importing torch and
pyro and then reaching the first step, and how much of the latter is torch's own import of
torch._dynamo (its optimisers' first `add_param_group` imports it, so for `train` it is
imported first and timed apart; `evaluate` builds no optimiser and pays none). The folder of the stopped training is removed by train itself (a
run stopped before its first checkpoint leaves none); the small run lives in a temporary
folder.
"""

import argparse
import contextlib
import io
import json
import subprocess
import sys
import tempfile

CHILD = """
import sys, time
t0 = time.perf_counter()
import torch, pyro  # noqa: F401
t1 = time.perf_counter()
if sys.argv[1] == "train":  # what its optimiser would import, timed apart
    import torch._dynamo  # noqa: F401
t2 = time.perf_counter()
import pyro_vae.evaluate as evaluate_module
import pyro_vae.train as train_module
reached = {}
def first_step(*args, **kwargs):
    reached["t"] = time.perf_counter()
    raise SystemExit(0)
train_module._Training.run_epoch = first_step
evaluate_module.evaluate_model = first_step
from pyro_vae.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(json.dumps({"torch_pyro": t1 - t0, "dynamo": t2 - t1, "own": reached["t"] - t2,
                  "dynamo_imported": "torch._dynamo" in sys.modules}))
"""


def child(args) -> dict:
    out = subprocess.run([sys.executable, "-c", "import json\n" + CHILD, *args], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def report(command: str, start: dict) -> str:
    dynamo = f"{start['dynamo']:.2f} s" if start["dynamo_imported"] else "0 s (not imported)"
    return (f"{command}: torch + pyro {start['torch_pyro']:.2f} s; then to the first step "
            f"{start['dynamo'] + start['own']:.2f} s: torch's import of torch._dynamo {dynamo}, "
            f"pyro_vae's own {start['own']:.2f} s")


def train_here(args) -> int:
    from pyro_vae.cli import main as pyro_vae

    return pyro_vae(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    known, train_flags = parser.parse_known_args()
    with tempfile.TemporaryDirectory() as folder:
        small = f"{folder}/small"
        with contextlib.redirect_stdout(io.StringIO()):  # (here: its own start-up is not measured)
            if train_here(["train", "--epochs", "1", "--train-limit", "500", "--test-limit", "100", "--no-progress",
                           "--out", small]) != 0:
                sys.exit("startup.py: could not train the small run that evaluate loads")
        commands = {"train": ["train", "--out", f"{folder}/run", "--no-progress", *train_flags],
                    "evaluate": ["evaluate", small]}
        for _ in range(known.repeats):
            for command, args in commands.items():
                print(report(command, child(args)), flush=True)


if __name__ == "__main__":
    main()
