"""Training across processes with torch.distributed (gloo, 2 processes on the CPU).

The processes are started the way torchrun starts them: environment variables RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, then the package's own code joins
the process group (pyro_vae.distributed.from_environment).
"""

import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import pytest
import torch
import torch.multiprocessing as mp

from pyro_vae import ModelConfig, TrainConfig, build_model, fit
from pyro_vae.data import ImageData
from pyro_vae.models import data_plate
from pyro_vae.models.vae import VAE
from pyro_vae.networks import MLPDecoder, MLPEncoder
from pyro_vae.objectives import build_elbo
from pyro_vae.steps import ENGINES, build_engine

pytestmark = pytest.mark.slow  # subprocesses and whole runs: outside `-m "not slow"`

REPO = Path(__file__).resolve().parents[1]
WORLD = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def leave() -> None:
    """Both ranks done before either tears its group down: a rank whose peer closed the
    connections while its own gloo threads still used them was seen to abort ("terminate
    called without an active exception") in about one run of this file in three."""
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def join(rank: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)


class FixedNoiseNormal(dist.Normal):
    """N(loc, scale) whose reparameterised draw uses given noise: the gradient is deterministic."""

    def __init__(self, loc, scale, eps, validate_args=None):
        super().__init__(loc, scale, validate_args=validate_args)
        self.eps = eps

    def rsample(self, sample_shape=torch.Size()):
        return self.loc + self.scale * self.eps

    def expand(self, batch_shape, _instance=None):
        return FixedNoiseNormal(self.loc.expand(batch_shape), self.scale.expand(batch_shape),
                                self.eps.expand(batch_shape))


class FixedNoiseVAE(VAE):
    """The VAE whose guide draws image y's fixed noise (labels y carry the image's index)."""

    def __init__(self, noise, *args):
        super().__init__(*args)
        self.register_buffer("noise", noise)

    def model(self, x, y=None, *, num_data=None):
        return super().model(x, num_data=num_data)

    def guide(self, x, y=None, *, num_data=None):
        pyro.module("encoder", self.encoder)
        x = self._flatten(x)
        with data_plate(x, num_data):
            loc, scale = self.encoder(x)
            pyro.sample("z", FixedNoiseNormal(loc, scale, self.noise[y]).to_event(1))


def fixed_noise_program():
    torch.manual_seed(0)
    noise = torch.randn(16, 3, dtype=torch.float64)
    return FixedNoiseVAE(noise, MLPEncoder(4, 3, (6,)), MLPDecoder(4, 3, (6,)), 3, (1, 2, 2)).double()


def batch():
    gen = torch.Generator().manual_seed(1)
    return torch.bernoulli(torch.full((16, 1, 2, 2), 0.4, dtype=torch.float64), generator=gen), torch.arange(16)


def gradients_of_one_step(engine_name, group=None):
    pyro.clear_param_store()
    program = fixed_noise_program()
    engine = build_engine(engine_name, program, program.model, program.guide, build_elbo(), 1e-3, validate=False)
    x, y = batch()
    idx = torch.arange(16)
    if group is not None:
        engine.distribute(group, program)
        idx, engine.weight = group.shard(idx)
    loss = engine.step(x=x[idx], y=y[idx], num_data=1000)
    return float(loss), [p.grad.clone() for p in program.parameters()]


@pytest.mark.parametrize("engine_name", ENGINES.names())
def test_averaged_gradient_is_the_gradient_of_the_combined_batch(engine_name, two_ranks):
    """Two ranks of 8 images each, summed with weights 8/16, give the gradient one process
    computes on all 16 images (the plate told the same N), at the same fixed noise."""
    single_loss, single = gradients_of_one_step(engine_name)
    for r in two_ranks(f"gradients-{engine_name}"):
        loss, grads = r
        assert loss == pytest.approx(single_loss, rel=1e-12)
        for a, b in zip(grads, single):
            assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)


# -- whole runs ---------------------------------------------------------------------------------


def images(n=40, seed=3):
    gen = torch.Generator().manual_seed(seed)
    return torch.bernoulli(torch.full((n, 1, 4, 4), 0.3), generator=gen)


def deterministic_program():
    """The autoencoder: a point-mass guide draws no noise, so a run is a function of its data alone."""
    torch.manual_seed(0)
    return build_model(ModelConfig(model="ae", z_dim=2, hidden_dims=(8,)), (1, 4, 4))


SETTINGS = dict(epochs=3, batch_size=10, lr=1e-2, device="cpu")


def two_process_run(run_dir, engine_name):
    run = fit(deterministic_program(), images(), run_dir, settings=TrainConfig(engine=engine_name, **SETTINGS),
              progress=False, log=lambda line: None)
    return run.program.state_dict()


@pytest.mark.parametrize("engine_name", ["captured", "svi"])
def test_a_two_process_run_ends_where_one_process_ends(engine_name, tmp_path, two_ranks):
    one = fit(deterministic_program(), images(), tmp_path / "one", settings=TrainConfig(engine=engine_name,
                                                                                        **SETTINGS),
              progress=False, log=lambda line: None)
    rank0, rank1 = two_ranks(f"run-{engine_name}")
    for name, value in one.program.state_dict().items():
        assert torch.equal(rank0[name], rank1[name]), name  # the ranks hold identical parameters
        assert torch.allclose(rank0[name], value, rtol=1e-4, atol=1e-6), name  # float sums in another order
    # rank 0 alone wrote the run, with both ranks' noise streams
    two = two_ranks.folder / f"run-{engine_name}"
    state = torch.load(two / "checkpoint.pt", weights_only=True)
    assert len(state["rng_ranks"]) == WORLD and state["epoch"] == 3
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 3


def torchrun(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD),
               f"--master-port={free_port()}", "-m", "pyro_vae", *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def test_a_killed_rank_stops_the_other_with_a_clear_error_and_the_run_resumes(tmp_path, data_dir):
    run = tmp_path / "run"
    common = ["--train-limit", "3000", "--test-limit", "100", "--batch-size", "20", "--z-dim", "2",
              "--hidden-dims", "16", "--data-dir", str(data_dir), "--no-progress"]
    proc = torchrun(["train", "--out", str(run), "--epochs", "50", *common])
    deadline = time.time() + 240
    while not (run / "checkpoint.pt").exists():  # let it finish an epoch
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.5)
    workers = subprocess.run(["pgrep", "-f", f"pyro_vae train --out {run}"], capture_output=True, text=True)
    pids = sorted(int(p) for p in workers.stdout.split())
    assert len(pids) >= 2
    os.kill(pids[-1], signal.SIGKILL)  # the rank started last
    try:
        out, _ = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("the surviving rank hung after its peer was killed")
    assert proc.returncode != 0
    assert "another process stopped or stopped answering" in out and "torchrun ... -m pyro_vae train --resume" in out
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    done = state["epoch"]
    assert done >= 1
    # the run resumes from its last checkpoint (here in one process: another world size works too)
    from pyro_vae.cli import main

    assert main(["train", "--resume", str(run), "--epochs", str(done + 1), "--no-progress"]) == 0
    assert torch.load(run / "checkpoint.pt", weights_only=True)["epoch"] == done + 1


# -- evaluation ----------------------------------------------------------------------------------


class ExtraLatentVAE(VAE):
    """A model with a latent the guide does not sample (drawn from its prior inside the model):
    skipping another rank's batches must then run the model too, to keep the draws in step."""

    def model(self, x=None, *, num_data=None):
        pyro.module("decoder", self.decoder)
        x = self._flatten(x)
        with data_plate(x, num_data):
            z = pyro.sample("z", self.prior())
            w = pyro.sample("w", dist.Normal(torch.zeros((), dtype=x.dtype), 1.0))
            pyro.sample("x", self.likelihood(self.decoder(z) + 0.5 * w.unsqueeze(-1)), obs=x)


def evaluation_program(kind):
    torch.manual_seed(0)
    family = VAE if kind == "vae" else ExtraLatentVAE
    return family(MLPEncoder(16, 2, (8,)), MLPDecoder(16, 2, (8,)), 2, (1, 4, 4)).double()


def log_px(kind, group=None):
    from pyro_vae.evaluate import log_px_importance

    program = evaluation_program(kind)
    x = images(23).double()  # 23 images in batches of 5: the ranks score 2 and 3 batches, the last one short
    with torch.no_grad():
        return log_px_importance(program.model, program.guide, x, num_samples=30, batch_size=5, max_elements=40,
                                 seed=4, group=group)


def test_a_latent_the_guide_does_not_sample_is_refused_by_importance_sampling():
    """p(x, z, w) / q(z) at w drawn from its prior weights by p(w) once too often: no longer
    computed (it was, before the scoring went through Pyro's traces), refused instead."""
    from pyro_vae.objectives import ImportanceWeightError

    with pytest.raises(ImportanceWeightError, match="latent site 'w' of the model is not sampled by the guide"):
        log_px("extra-latent")


def test_distributed_evaluation_is_the_single_process_one_value_for_value(two_ranks):
    single = log_px("vae")
    for result in two_ranks("evaluation"):
        assert torch.equal(result, single)  # the same draws for every image
    assert single.shape == (23,)


def test_evaluate_command_under_torchrun_prints_the_single_process_report(tmp_path, data_dir, capsys):
    from pyro_vae.cli import main

    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--train-limit", "200", "--test-limit", "30", "--epochs", "1",
                 "--batch-size", "50", "--z-dim", "2", "--hidden-dims", "8", "--data-dir", str(data_dir),
                 "--no-progress"]) == 0
    args = ["evaluate", str(run), "--num-samples", "40", "--batch-size", "7", "--json"]
    capsys.readouterr()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # here, on one thread as each rank
    try:
        assert main(args) == 0
    finally:
        torch.set_num_threads(threads)
    single = capsys.readouterr().out
    proc = torchrun(args)
    out, _ = proc.communicate(timeout=180)
    assert proc.returncode == 0, out
    reports = [line for line in out.splitlines() if line.startswith("{")]
    assert reports == [single.strip()]  # rank 0 alone prints, and prints the same numbers


# -- a NaN on one rank -------------------------------------------------------------------------


class PoisonedVAE(VAE):
    """Its likelihood's logits are NaN for the image labelled 13: a NaN on whichever rank holds it."""

    def model(self, x=None, y=None, *, num_data=None):
        pyro.module("decoder", self.decoder)
        x = self._flatten(x)
        with data_plate(x, num_data):
            z = pyro.sample("z", self.prior())
            poison = torch.where(y == 13, float("nan"), 1.0).unsqueeze(-1)
            pyro.sample("x", self.likelihood(self.decoder(z) * poison), obs=x)

    def guide(self, x=None, y=None, *, num_data=None):
        return super().guide(x, num_data=num_data)


def poisoned_run(run_dir):
    from pyro_vae.train import TrainingDivergedError

    torch.manual_seed(0)
    program = PoisonedVAE(MLPEncoder(16, 2, (8,)), MLPDecoder(16, 2, (8,)), 2, (1, 4, 4))
    data = ImageData(images(40), torch.arange(40), binary=True)
    try:
        fit(program, data, run_dir, settings=TrainConfig(epochs=2, batch_size=10, device="cpu"), progress=False,
            log=lambda line: None)
    except TrainingDivergedError as err:
        return str(err)
    return "no error"


def test_a_nan_on_one_rank_stops_every_rank_at_the_same_step(tmp_path, two_ranks):
    messages = two_ranks("poisoned")
    single = poisoned_run(tmp_path / "one")
    assert "training stopped at epoch 1, step" in single
    # both ranks raise the single process's error: the same epoch and step (the folders differ)
    two = str(two_ranks.folder / "poisoned")
    assert messages[0] == messages[1] == single.replace(str(tmp_path / "one"), two)


def resumed_under_two(run_dir):
    lines = []
    fit(deterministic_program(), images(), run_dir, settings=TrainConfig(**{**SETTINGS, "epochs": 2}), resume=True,
        progress=False, log=lines.append)
    return "\n".join(lines)


def one_process_run(run_dir):
    fit(deterministic_program(), images(), run_dir, settings=TrainConfig(**{**SETTINGS, "epochs": 1}),
        progress=False, log=lambda line: None)


def test_a_one_process_run_resumes_under_two_and_says_the_noise_starts_afresh(two_ranks):
    leader, other = two_ranks("resumed")
    assert "saved by 1 process(es) and resumes with 2; the noise streams start afresh" in leader
    assert other == ""  # rank 1 prints nothing
    state = torch.load(two_ranks.folder / "resumed" / "checkpoint.pt", weights_only=True)
    assert state["epoch"] == 2 and len(state["rng_ranks"]) == 2


# -- every multi-process job of this file, in one pair of processes ----------------------------


def jobs(folder: Path) -> dict:
    """What the two ranks compute, by name: each test above compares its job's results with
    the single process's. One spawn of two ranks runs them all in turn, in one process
    group: starting two fresh Python processes costs seconds each time."""
    out = {f"gradients-{e}": (lambda e=e: gradients_of_one_step(e, group())) for e in ENGINES.names()}
    out.update({f"run-{e}": (lambda e=e: two_process_run(folder / f"run-{e}", e)) for e in ("captured", "svi")})
    out["evaluation"] = lambda: log_px("vae", group())
    out["poisoned"] = lambda: poisoned_run(folder / "poisoned")
    out["resumed"] = lambda: resumed_under_two(folder / "resumed")
    return out


def group():
    from pyro_vae import distributed

    return distributed.from_environment(torch.device("cpu"))


def _jobs_worker(rank, port, folder):
    join(rank, port)
    folder = Path(folder)
    for name, job in jobs(folder).items():
        try:
            result = {"value": job()}
        except Exception as err:  # noqa: BLE001 - the job's test reports it; the other jobs still run
            result = {"error": f"{type(err).__name__}: {err}"}
        torch.save(result, folder / f"{name}.{rank}")
    leave()


class TwoRanks:
    """The results of :func:`jobs` run by two ranks: ``two_ranks(name)`` is each rank's."""

    def __init__(self, folder: Path):
        self.folder = folder

    def __call__(self, name: str) -> list:
        results = [torch.load(self.folder / f"{name}.{r}", weights_only=False) for r in range(WORLD)]
        for rank, result in enumerate(results):
            assert "error" not in result, f"rank {rank}: {result.get('error')}"
        return [result["value"] for result in results]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """The jobs run once per test session: the first pytest-xdist worker to need them runs
    them in a folder all workers share (their base folders' parent); the others wait for it
    and read its results. (The tests only read that folder.)"""
    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # this session's folder, above each worker's own
    folder = shared / "two-ranks"
    with open(shared / "two-ranks.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (folder / "finished").exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            one_process_run(folder / "resumed")  # the run that two processes resume
            mp.spawn(_jobs_worker, args=(free_port(), str(folder)), nprocs=WORLD)
            (folder / "finished").touch()
    return TwoRanks(folder)
