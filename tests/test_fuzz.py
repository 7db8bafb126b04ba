"""Property-based tests: no input to the CLI parser or the checkpoint loader crashes
with an unhandled exception."""

import io

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_vae import checkpoint
from pyro_vae.checkpoint import CheckpointError

# damaged bytes can look like any pickle protocol; torch warns before it refuses them
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")
from pyro_vae.cli import build_parser, config_from_args, main

FLAGS = ["--z-dim", "--hidden-dims", "--activation", "--network", "--dataset", "--binarize", "--train-limit",
         "--epochs", "--batch-size", "--lr", "--elbo", "--engine", "--num-particles", "--seed", "--device",
         "--objective", "--beta", "--kl-warmup-epochs", "--no-download", "--out", "--resume", "--overwrite"]
VALUES = ["0", "-1", "1", "2.5", "1e-3", "nan", "inf", "", "abc", "mnist", "cifar", "cuda:7", "relu", "conv",
          "fixed", "meanfield", "module", "kl-only", "--", "-", "x" * 300, "\x00", "é"]
token = st.one_of(st.sampled_from(FLAGS), st.sampled_from(VALUES), st.text(max_size=8))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(token, max_size=8))
def test_train_argument_parsing_never_crashes(argv):
    parser = build_parser()
    try:
        args = parser.parse_args(["train", *argv])
    except SystemExit as exit_:
        assert exit_.code in (0, 2)  # argparse's usage error (or --help)
        return
    try:
        config_from_args(args)
    except ValueError as err:  # the config's own checks: a message, not a traceback
        assert str(err)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["evaluate", "sample", "reconstruct", "--num", "0", "-5", "--limit", "x",
                                 "--num-samples", "--json", "/nonexistent/run", "--device", "tpu"]), max_size=6))
def test_other_commands_never_crash(argv):
    try:
        code = main(argv)
    except SystemExit as exit_:
        assert exit_.code in (0, 2)
        return
    assert code in (0, 1)


def valid_checkpoint_bytes() -> bytes:
    buf = io.BytesIO()
    torch.save({"format_version": checkpoint.FORMAT_VERSION, "epoch": 3, "model": {"w": torch.randn(4, 3)},
                "config": {"model": {"z_dim": 3}}}, buf)
    return buf.getvalue()


VALID = valid_checkpoint_bytes()


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_checkpoint_loader_survives_corruption(tmp_path, data):
    kind = data.draw(st.sampled_from(["flip", "truncate", "random", "splice"]))
    raw = bytearray(VALID)
    if kind == "flip":
        for pos in data.draw(st.lists(st.integers(0, len(raw) - 1), min_size=1, max_size=20)):
            raw[pos] ^= data.draw(st.integers(1, 255))
    elif kind == "truncate":
        raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
    elif kind == "random":
        raw = bytearray(data.draw(st.binary(max_size=2000)))
    else:
        pos = data.draw(st.integers(0, len(raw)))
        raw[pos:pos] = data.draw(st.binary(min_size=1, max_size=50))
    path = tmp_path / "ck.pt"
    path.write_bytes(bytes(raw))
    try:
        state = checkpoint.load(path)
    except CheckpointError as err:
        assert str(path) in str(err) or "checkpoint" in str(err)
    else:
        assert isinstance(state, dict)
