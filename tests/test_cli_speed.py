"""The command answers at once where it does no work: ``--help`` and usage errors import
neither torch, Pyro, torchvision nor matplotlib; the registries name their members (for
choices and help) without importing them, and every name resolves when it is used.

Each check runs in a fresh interpreter: this test session has long imported torch."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

HEAVY = ("torch", "pyro", "torchvision", "matplotlib", "numpy")


def run_python(code: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "1000"}  # help lines unwrapped
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=env)


def test_help_and_usage_errors_import_nothing_heavy():
    res = run_python(f"""
        import contextlib, io, json, sys
        from pyro_vae.cli import build_parser, main

        commands = [a for a in build_parser()._actions if a.dest == "command"][0].choices
        argvs = [["--help"]] + [[name, "--help"] for name in commands] + [
            ["train", "--epcohs", "3"], ["train", "--epoch", "2"], ["train", "--model", "vea"], ["trian"],
            ["train", "--epochs", "0"], ["evaluate"], ["plot", "run", "--kind", "latnt"]]
        codes = []
        for argv in argvs:
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                try:
                    main(argv)
                except SystemExit as exit_:
                    codes.append(exit_.code)
        print(json.dumps({{"commands": list(commands), "codes": codes,
                          "heavy": [m for m in {HEAVY!r} if m in sys.modules]}}))
    """)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert {"train", "evaluate", "plot", "sample"} <= set(out["commands"])
    helps = 1 + len(out["commands"])
    assert out["codes"] == [0] * helps + [2] * 7
    assert out["heavy"] == []


@pytest.mark.slow
def test_importing_the_package_imports_nothing_heavy_and_the_api_loads_on_first_use():
    res = run_python(f"""
        import json, sys
        import pyro_vae
        from pyro_vae.config import RunConfig

        RunConfig.from_dict({{"model": {{"model": "vae2"}}, "train": {{"estimator": "iwae"}}}})  # validated by name
        light = [m for m in {HEAVY!r} if m in sys.modules]
        from pyro_vae import MODELS, VAE, fit, load_run, evaluate_model  # noqa: F401
        print(json.dumps({{"light": light, "train": pyro_vae.train.train.__module__, "vae": VAE.__name__}}))
    """)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"light": [], "train": "pyro_vae.train", "vae": "VAE"}


@pytest.mark.slow
def test_the_catalog_declares_every_built_in_and_each_declaration_resolves():
    """A built-in registered with the decorator instead of a line in pyro_vae/catalog.py
    would be missing from the CLI's choices until its module is imported: no module
    adds a name when imported, and each declared name resolves to what its module defines."""
    res = run_python("""
        import importlib, json
        from pyro_vae import catalog
        from pyro_vae.registry import Registry

        registries = {name: reg for name, reg in vars(catalog).items() if isinstance(reg, Registry)}
        declared = {name: reg.help() for name, reg in registries.items()}
        for module in ("models", "likelihoods", "networks", "objectives", "steps", "data", "plots"):
            importlib.import_module("pyro_vae." + module)
        after = {name: reg.help() for name, reg in registries.items()}
        resolved = {name: {entry: getattr(reg[entry], "__name__", type(reg[entry]).__name__) for entry in reg}
                    for name, reg in registries.items()}
        print(json.dumps({"same": declared == after, "resolved": resolved}))
    """)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["same"]
    resolved = out["resolved"]
    assert set(resolved) == {"MODELS", "LIKELIHOODS", "NETWORKS", "ACTIVATIONS", "ESTIMATORS", "OBJECTIVES",
                             "ENGINES", "DATASETS", "FIGURES", "COMPARISONS"}
    assert resolved["MODELS"]["vae"] == "vae_from_config" and resolved["ACTIVATIONS"]["relu"] == "ReLU"
    assert resolved["LIKELIHOODS"]["bernoulli"] == "BernoulliLikelihood"
    assert resolved["FIGURES"]["latent"] == "Figure"


def test_the_registries_are_the_ones_the_modules_export():
    from pyro_vae import catalog, data, likelihoods, models, networks, objectives, plots, steps

    assert models.MODELS is catalog.MODELS and likelihoods.LIKELIHOODS is catalog.LIKELIHOODS
    assert networks.NETWORKS is catalog.NETWORKS and networks.ACTIVATIONS is catalog.ACTIVATIONS
    assert objectives.ESTIMATORS is catalog.ESTIMATORS and objectives.OBJECTIVES is catalog.OBJECTIVES
    assert steps.ENGINES is catalog.ENGINES and data.DATASETS is catalog.DATASETS
    assert plots.FIGURES is catalog.FIGURES and plots.COMPARISONS is catalog.COMPARISONS


@pytest.mark.slow
def test_a_family_registered_with_the_decorator_is_a_choice_like_a_built_in():
    """A user's module registers at import, beside its class, as before: configurations
    validate it, the model builds, and a parser built after the import offers it."""
    res = run_python("""
        import contextlib, io, json
        from pyro_vae.models import MODELS, build_model
        from pyro_vae.models.vae import vae_from_config
        from pyro_vae.config import ModelConfig
        from pyro_vae.cli import build_parser

        @MODELS.register("my-vae", "a user's own family")
        def mine(config, image_shape):
            return vae_from_config(config, image_shape)

        program = build_model(ModelConfig(model="my-vae", z_dim=2, hidden_dims=(8,)), (1, 4, 4))
        args = build_parser().parse_args(["train", "--model", "my-vae"])
        help_text = io.StringIO()
        with contextlib.redirect_stdout(help_text):
            try:
                build_parser().parse_args(["train", "--help"])
            except SystemExit:
                pass
        try:
            MODELS.register("vae", "a second vae")(mine)
            shadowed = True
        except ValueError:
            shadowed = False
        print(json.dumps({"program": type(program).__name__, "model": vars(args)["model.model"],
                          "help": "my-vae: a user's own family" in help_text.getvalue(), "shadowed": shadowed}))
    """)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {"program": "VAE", "model": "my-vae", "help": True, "shadowed": False}
