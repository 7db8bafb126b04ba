"""Property-based tests: no input to the CLI parser or the checkpoint loader crashes
with an unhandled exception.

The command-line fuzzer draws its flags, their numbers of values, their choices and the
kind of their values from the real parser (every subcommand's actions), so a flag added
to the parser is fuzzed without editing this file."""

import argparse
import dataclasses
import io
import re
import types

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyro_vae import checkpoint
from pyro_vae.checkpoint import CheckpointError

# damaged bytes can look like any pickle protocol; torch warns before it refuses them
pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")
from pyro_vae.cli import build_parser, main  # noqa: E402
from pyro_vae.config import SECTIONS, RunConfig, choices_of  # noqa: E402

# tokens any argument may meet: bad numbers, empty and odd strings, argparse's own markers
JUNK = ["0", "-1", "1", "2.5", "1e-3", "nan", "inf", "-inf", "", "abc", "cuda:7", "tpu", "--", "-", "x" * 300,
        "\x00", "é", "=", "--=", "10min", "30s", "epoch"]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def value_kind(action: argparse.Action) -> str:
    """What an option's values are, found by asking its own converter: ``switch`` (no
    value), ``choice``, ``int``, ``float`` or ``text`` (anything: paths, words)."""
    if action.nargs == 0:
        return "switch"
    if action.choices:
        return "choice"
    convert = action.type or str

    def accepts(text):
        try:
            convert(text)
        except (argparse.ArgumentTypeError, TypeError, ValueError):
            return False
        return True

    return "text" if accepts("abc") else "float" if accepts("2.5") else "int"


VALUES = {
    "int": st.integers(-3, 300).map(str),
    "float": st.one_of(st.floats(allow_nan=True, allow_infinity=True).map(repr), st.sampled_from(["1e-3", "0.5"])),
    "text": st.one_of(st.sampled_from(["none", "runs/none", ".", "a:b", "auto", "cpu"]), st.text(max_size=8)),
}
COUNTS = {None: st.just(1), "?": st.integers(0, 1), "+": st.integers(1, 3), 0: st.just(0)}


def values_of(action: argparse.Action) -> st.SearchStrategy[str]:
    kind = value_kind(action)
    right = st.sampled_from(sorted(action.choices)) if kind == "choice" else VALUES.get(kind, st.just(""))
    return st.one_of(right, right, right, st.sampled_from(JUNK))  # mostly values of the right kind


@st.composite
def option(draw, action: argparse.Action) -> list[str]:
    """One of the action's flags with values for it (a number of them its nargs allows)."""
    flag = draw(st.sampled_from(action.option_strings))
    return [flag, *(draw(values_of(action)) for _ in range(draw(COUNTS.get(action.nargs, st.integers(0, 3)))))]


def command_lines(name: str, max_size: int = 8) -> st.SearchStrategy[list[str]]:
    """``[name, ...]``: options of that subcommand with values, its positionals, and junk,
    in any order."""
    actions = subcommands(build_parser())[name]._actions
    parts = [option(a) for a in actions if a.option_strings]
    parts += [st.lists(VALUES["text"], min_size=1, max_size=2) for a in actions if not a.option_strings]
    parts.append(st.sampled_from(JUNK).map(lambda token: [token]))
    return st.lists(st.one_of(parts), max_size=max_size).map(lambda groups: [name, *sum(groups, [])])


def test_the_fuzzer_draws_every_flag_of_the_parser_with_its_kind_of_value():
    """The walk finds the flags the config declares (each maps onto a field) and reads
    their values right, so a new field is fuzzed as what it is."""
    train = {flag: a for a in subcommands(build_parser())["train"]._actions for flag in a.option_strings}
    for klass in SECTIONS.values():
        for f in dataclasses.fields(klass):
            action = train["--" + f.name.replace("_", "-")]
            choices = choices_of(f)
            if choices:
                assert value_kind(action) == "choice" and set(action.choices) == set(choices)
    assert {"--model", "--likelihood", "--estimator", "--lr-schedule", "--decoder-bias", "--z2-dim",
            "--z2-hidden-dims", "--flow-steps", "--test-limit", "--program", "--no-download"} <= set(train)
    assert "--elbo" not in train
    kinds = {flag: value_kind(train[flag]) for flag in ("--z-dim", "--hidden-dims", "--lr", "--out", "--overwrite")}
    assert kinds == {"--z-dim": "int", "--hidden-dims": "int", "--lr": "float", "--out": "text", "--overwrite": "switch"}


def exits_cleanly(argv: list[str], capsys) -> None:
    """``pyro-vae ARGV`` ends with argparse's exit (0 for --help, 2 with its ``error:``
    line) or returns 0, or 1 with one ``pyro-vae: error: ...`` line; never a traceback."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:
        err = capsys.readouterr().err
        assert exit_.code == 0 or (exit_.code == 2 and "error: " in err), (exit_.code, err)
        return
    err = capsys.readouterr().err
    assert code in (0, 1) and "Traceback" not in err
    if code == 1:
        assert re.search(r"^pyro-vae: error: \S", err, re.MULTILINE), err


@pytest.mark.slow
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=command_lines("train"))
def test_train_argument_parsing_never_crashes(argv, tmp_path, monkeypatch, capsys):
    """Everything ``pyro-vae train`` does before training, with training itself replaced
    by a stub that checks what it is given."""
    monkeypatch.chdir(tmp_path)  # (a drawn path names nothing real)

    def no_training(config, out, **kwargs):
        assert config is None or isinstance(config, RunConfig)
        return types.SimpleNamespace(run_dir=out)

    monkeypatch.setattr("pyro_vae.train.train", no_training)
    exits_cleanly(argv, capsys)


@pytest.mark.slow
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.sampled_from(sorted(set(subcommands(build_parser())) - {"train"})).flatmap(
    lambda name: command_lines(name, max_size=6)))
def test_other_commands_never_crash(argv, tmp_path, monkeypatch, capsys):
    """The other commands meet no run in the drawn folders: a clear error, or argparse's."""
    monkeypatch.chdir(tmp_path)
    exits_cleanly(argv, capsys)


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
