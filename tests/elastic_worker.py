"""``pyro-vae`` with injected faults, for torchrun's restart tests (tests/test_elastic.py).

Run as torchrun's script: ``torchrun ... tests/elastic_worker.py train ...``. The faults,
in ``$PYRO_VAE_TEST_FAULT`` separated by ``;``, strike one per attempt: the first on
torchrun's first attempt (restart count 0), the second on its first restart, and so on
(steps and checkpoints are counted from the attempt's start):

* ``kill-at-step:RANK:N``: rank RANK kills itself with SIGKILL just before its N-th step;
* ``kill-in-checkpoint:N``: rank 0 kills itself halfway through writing its N-th
  checkpoint (the temporary file half written, not yet renamed over the last one).
"""

import os
import signal
import sys

from pyro_vae import checkpoint
from pyro_vae import train as train_module
from pyro_vae.cli import main


def _die():
    os.kill(os.getpid(), signal.SIGKILL)


def kill_at_step(rank: int, n: int) -> None:
    if int(os.environ["RANK"]) != rank:
        return
    build = train_module.build_engine

    def build_engine(*args, **kwargs):
        engine = build(*args, **kwargs)
        step, count = engine.step, [0]

        def counted(*a, **kw):
            count[0] += 1
            if count[0] == n:
                _die()
            return step(*a, **kw)

        engine.step = counted
        return engine

    train_module.build_engine = build_engine


def kill_in_checkpoint(n: int) -> None:
    if int(os.environ["RANK"]) != 0:
        return
    write, count = checkpoint.atomic_write, [0]

    def atomic_write(path, data):
        if str(path).endswith(checkpoint.CHECKPOINT_NAME):
            count[0] += 1
            if count[0] == n:
                fd = os.open(os.path.join(os.path.dirname(path), ".checkpoint.pt.killed.tmp"), os.O_WRONLY | os.O_CREAT)
                os.write(fd, bytes(data)[: len(data) // 2])
                _die()
        write(path, data)

    checkpoint.atomic_write = atomic_write


if __name__ == "__main__":
    faults = [f for f in os.environ.get("PYRO_VAE_TEST_FAULT", "").split(";") if f]
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if attempt < len(faults):
        kind, *numbers = faults[attempt].split(":")
        {"kill-at-step": kill_at_step, "kill-in-checkpoint": kill_in_checkpoint}[kind](*map(int, numbers))
    sys.exit(main(sys.argv[1:]))
