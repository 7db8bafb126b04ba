import os
from pathlib import Path

import pyro
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Under pytest-xdist (the default run: one worker per core), each worker computes on one
# thread, and so do the subprocesses it starts: two workers of two threads each on two
# cores would only take turns. (Set before any test runs, so a comparison between this
# process and its subprocesses sees one thread count on both sides.)
if os.environ.get("PYTEST_XDIST_WORKER"):
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[name] = "1"
    torch.set_num_threads(1)

# The CPU softplus form is chosen by timing log1p once per process, and a measurement
# taken under the load of other tests can choose the other form, which differs by float
# rounding. Tests that compare a subprocess's numbers with this process's bit for bit need
# one form: this process measures once and every subprocess inherits its choice. (Tests of
# the choice itself set or clear the variable.)
from pyro_vae import networks  # noqa: E402

os.environ.setdefault(networks.SOFTPLUS_ENV, networks.cpu_softplus_form())


@pytest.fixture(autouse=True)
def fresh_pyro():
    """Every test starts with an empty param store, validation on and a fixed seed."""
    pyro.clear_param_store()
    pyro.enable_validation(True)
    pyro.set_rng_seed(0)
    yield
    pyro.clear_param_store()


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real data sets: $PYRO_VAE_DATA, else ../shared/data beside the repo.

    Missing data fails the tests that need it (it is never silently skipped).
    """
    env = os.environ.get("PYRO_VAE_DATA")
    path = Path(env) if env else REPO.parent / "shared" / "data"
    if not (path / "MNIST" / "raw").is_dir():
        pytest.fail(f"the MNIST data is not in {path}; set PYRO_VAE_DATA to the shared data folder")
    return path


def pytest_collection_modifyitems(config, items):
    # The `slow` tests first: pytest-xdist hands tests out in order as workers free up, so
    # the long ones start early and the short ones fill the gaps at the end, instead of one
    # worker finishing a long test while the others wait (the files' order kept in each part).
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)

