"""Checkpoints: atomic writes and safe, checked loading."""

import os
import pickle

import pytest
import torch

from pyro_vae import checkpoint
from pyro_vae.checkpoint import CheckpointError

# damaged bytes can look like any pickle protocol; torch warns before it refuses them
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")


def test_round_trip_and_no_temporary_files(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.save({"w": torch.arange(3.0), "epoch": 2, "cfg": {"a": [1, 2]}}, path)
    checkpoint.save({"w": torch.arange(4.0), "epoch": 3, "cfg": {"a": [1, 2]}}, path)
    state = checkpoint.load(path)
    assert state["epoch"] == 3 and torch.equal(state["w"], torch.arange(4.0))
    assert os.listdir(tmp_path) == ["ck.pt"]


def test_failed_write_keeps_the_previous_checkpoint(tmp_path):
    path = tmp_path / "ck.pt"
    checkpoint.save({"epoch": 1}, path)
    with pytest.raises(Exception):
        checkpoint.save({"epoch": 2, "bad": lambda: None}, path)  # not picklable: the write fails
    assert checkpoint.load(path)["epoch"] == 1
    assert os.listdir(tmp_path) == ["ck.pt"]


@pytest.mark.parametrize("cut", [0, 10, 200])
def test_truncated_checkpoint_is_a_clear_error(tmp_path, cut):
    path = tmp_path / "ck.pt"
    checkpoint.save({"w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:cut])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        checkpoint.load(path)


class Evil:
    def __reduce__(self):
        return (os.system, ("echo owned > /dev/null",))


def test_loading_never_runs_code(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save({"format_version": 1, "payload": Evil()}, path)
    with pytest.raises(CheckpointError, match="refusing to unpickle"):
        checkpoint.load(path)
    raw = tmp_path / "raw.pt"
    raw.write_bytes(pickle.dumps(Evil()))
    with pytest.raises(CheckpointError):
        checkpoint.load(raw)


def test_foreign_and_future_checkpoints(tmp_path):
    path = tmp_path / "ck.pt"
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(CheckpointError, match="not a pyro_vae checkpoint"):
        checkpoint.load(path)
    torch.save({"format_version": 99}, path)
    with pytest.raises(CheckpointError, match="format 99"):
        checkpoint.load(path)
    with pytest.raises(CheckpointError, match="no checkpoint"):
        checkpoint.load(tmp_path / "missing.pt")


def test_checkpoint_of_another_architecture(tmp_path, data_dir):
    from pyro_vae import DataConfig, ModelConfig, RunConfig, TrainConfig, load_run
    from pyro_vae.train import train

    cfg = RunConfig(ModelConfig(z_dim=3, hidden_dims=(16,)),
                    DataConfig(data_dir=str(data_dir), train_limit=200, test_limit=50),
                    TrainConfig(epochs=1, batch_size=100, device="cpu"))
    run = train(cfg, tmp_path / "run", progress=False, log=lambda s: None)
    state = checkpoint.load(run.run_dir / "checkpoint.pt")
    state["config"]["model"]["z_dim"] = 5  # the stored weights have z_dim 3
    del state["format_version"]
    checkpoint.save(state, run.run_dir / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="do not fit the program"):
        load_run(run.run_dir)
