"""The worked example of docs/extending.md runs exactly as printed."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from scripts import run_script

pytestmark = pytest.mark.slow  # subprocesses and whole runs: outside `-m "not slow"`

PAGE = REPO / "docs" / "extending.md"


def blocks(marker: str) -> list[tuple[str, str]]:
    """``(argument, code)`` of each fenced block right after ``<!-- marker ... -->``."""
    pattern = re.compile(r"<!-- " + marker + r":? ?([^\n]*?) -->\n```\w*\n(.*?)```", re.S)
    return pattern.findall(PAGE.read_text())


@pytest.mark.slow
def test_the_extending_example_runs_as_printed(tmp_path, data_dir):
    (name, code), = blocks("file")
    (tmp_path / name).write_text(code)
    (_, commands), = blocks("run")
    bin_dir = Path(sys.executable).parent  # `python` and `pyro-vae` of this environment
    env = {**os.environ, "PYRO_VAE_DATA": str(data_dir), "MPLBACKEND": "Agg",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    for command in commands.strip().splitlines():
        res = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"{command}\n{res.stdout}\n{res.stderr}"
        if command.startswith("python mog_vae.py"):
            assert "log p(x), K=100:" in res.stdout
        if command.startswith("pyro-vae evaluate"):
            assert "log_px_is100" in res.stdout and "bits per dimension" in res.stdout
        if command.startswith("pyro-vae plot"):
            assert "skipped dims:" in res.stdout and "latent.png" in res.stdout
    metrics = (tmp_path / "runs" / "mog" / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 4


@pytest.mark.slow
@pytest.mark.parametrize("number", [0, 1, 2])
def test_the_autoguide_enumeration_and_callback_examples_run_as_printed(number, tmp_path):
    code = re.findall(r"<!-- example -->\n```python\n(.*?)```", PAGE.read_text(), re.S)[number]
    (tmp_path / "example.py").write_text(code)
    # `python example.py` in this process (tests/scripts.py): the examples are small, a
    # fresh interpreter would be most of their time
    res = run_script([sys.executable, tmp_path / "example.py"], cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    if number == 0:  # the autoguide's parameters were created, trained and saved
        assert "guide.locs.z_unconstrained" in res.stdout and "guide.scales.z_unconstrained" in res.stdout
    elif number == 1:  # an ELBO per image, with its spread
        assert "+-" in res.stdout
    else:  # the callback saw both epochs
        assert "epoch 1: test ELBO" in res.stdout and "epoch 2: test ELBO" in res.stdout


@pytest.mark.slow
def test_the_readme_first_look_runs_as_printed(tmp_path, data_dir):
    readme = (REPO / "README.md").read_text()
    commands, = re.findall(r"<!-- first-look -->\n```bash\n(.*?)```", readme, re.S)
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "PYRO_VAE_DATA": str(data_dir), "MPLBACKEND": "Agg",
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    lines = commands.strip().splitlines()
    assert [line.split()[:2] for line in lines] == [["pyro-vae", "train"], ["pyro-vae", "evaluate"], ["pyro-vae", "plot"]]
    for command in lines:
        res = subprocess.run(command, shell=True, cwd=tmp_path, env=env, capture_output=True, text=True)
        assert res.returncode == 0, f"{command}\n{res.stdout}\n{res.stderr}"
    run = tmp_path / "runs" / "first-look"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert (run / "checkpoint.pt").exists() and (run / "config.json").exists()
    assert {"latent.png", "samples.png", "curves.png"} <= {f.name for f in (run / "figures").glob("*.png")}


@pytest.mark.parametrize("command, default", [("sample", "RUN_DIR/samples.png"),
                                              ("reconstruct", "RUN_DIR/reconstructions.png"),
                                              ("graph", "RUN_DIR/model.png")])
def test_the_readme_says_the_default_output_the_command_uses(command, default):
    from pyro_vae.cli import build_parser

    line, = [l for l in (REPO / "README.md").read_text().splitlines() if l.startswith(f"pyro-vae {command} RUN_DIR")]
    assert f"default: {default}" in line and ("--out PNG" in line or "--out FILE" in line)
    sub = build_parser()._subparsers._group_actions[0].choices[command]
    out, = [a for a in sub._actions if "--out" in a.option_strings]
    assert f"default {default}" in out.help  # what the command does is what the README says
