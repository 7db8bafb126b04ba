"""Every pyro-vae command, end to end, and its error messages."""

import json
import os
import subprocess
import sys

import pytest
from PIL import Image

from pyro_vae.cli import build_parser, config_from_args, main

SMALL = ["--train-limit", "600", "--test-limit", "100", "--epochs", "1", "--batch-size", "100",
         "--z-dim", "4", "--hidden-dims", "64", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, data_dir):
    out = tmp_path_factory.mktemp("cli") / "run"
    assert main(["train", *SMALL, "--data-dir", str(data_dir), "--out", str(out)]) == 0
    return out


def test_flags_map_onto_config_fields():
    args = build_parser().parse_args(["train", "--z-dim", "3", "--hidden-dims", "10", "20", "--lr", "0.01",
                                      "--estimator", "meanfield", "--binarize", "fixed", "--no-download",
                                      "--beta", "2.5", "--kl-warmup-epochs", "4"])
    cfg = config_from_args(args)
    assert cfg.model.z_dim == 3 and cfg.model.hidden_dims == (10, 20)
    assert cfg.train.lr == 0.01 and cfg.train.estimator == "meanfield" and cfg.train.beta == 2.5
    assert cfg.train.kl_warmup_epochs == 4
    assert cfg.data.binarize == "fixed" and cfg.data.download is False
    assert config_from_args(build_parser().parse_args(["train"])) == type(cfg)()


def test_train_writes_the_run(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["epoch"] == 1


def test_resume_continues_for_more_epochs(run_dir, tmp_path, capsys):
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(run_dir, copy)
    assert main(["train", "--resume", str(copy), "--epochs", "2", "--no-progress"]) == 0
    assert "resuming" in capsys.readouterr().out
    assert [json.loads(l)["epoch"] for l in (copy / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((copy / "config.json").read_text())["train"]["epochs"] == 2  # what people read, too
    assert json.loads((run_dir / "config.json").read_text())["train"]["epochs"] == 1


def test_resume_refuses_other_settings(run_dir, capsys):
    assert main(["train", "--resume", str(run_dir), "--z-dim", "8"]) == 1
    assert "only --epochs may be given, not --z-dim" in capsys.readouterr().err


def test_evaluate_json(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--num-samples", "50", "--limit", "40", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["num_images"] == 40 and report["epoch"] == 1
    for key in ("elbo", "log_lik", "kl", "log_px_is50"):
        assert set(report[key]) == {"mean", "stderr", "mc_stderr"} and report[key]["stderr"] > 0
        # the VAE's KL is in closed form: no Monte Carlo error; every other estimate has some
        assert (report[key]["mc_stderr"] == 0) == (key == "kl")
    assert report["elbo"]["mean"] == pytest.approx(report["log_lik"]["mean"] - report["kl"]["mean"], rel=1e-6)
    # with 50 samples the importance-weighted bound sits above the ELBO
    assert report["log_px_is50"]["mean"] > report["elbo"]["mean"]
    units = report["active_units"]["z"]
    assert units["units"] == 4 and 0 <= units["active"] <= 4


def test_evaluate_text(run_dir, capsys):
    assert main(["evaluate", str(run_dir), "--num-samples", "5", "--limit", "10"]) == 0
    out = capsys.readouterr().out
    assert "log_px_is5" in out and "+-" in out
    assert "active units     z " in out and "/4" in out
    assert f"{run_dir} after 1 epoch, 10 test images" in out  # (one epoch, not "1 epochs")


def test_sample_and_reconstruct_write_pngs(run_dir, tmp_path):
    assert main(["sample", str(run_dir), "--num", "16", "--nrow", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert Image.open(tmp_path / "s.png").size == (4 * 30 + 2, 4 * 30 + 2)  # 28 px + 2 px padding
    assert main(["reconstruct", str(run_dir), "--num", "16", "--out", str(tmp_path / "r.png")]) == 0
    assert Image.open(tmp_path / "r.png").size == (8 * 30 + 2, 4 * 30 + 2)  # 2 rows of images, 2 of reconstructions
    assert main(["sample", str(run_dir)]) == 0 and (run_dir / "samples.png").stat().st_size > 0


@pytest.mark.slow
def test_console_script_end_to_end(run_dir, data_dir):
    """The installed `pyro-vae` script reads a run and reports (its `train` runs as printed in
    tests/test_docs.py's README first look)."""
    env = {**os.environ, "PYRO_VAE_DATA": str(data_dir)}
    exe = os.path.join(os.path.dirname(sys.executable), "pyro-vae")
    res = subprocess.run([exe, "evaluate", str(run_dir), "--num-samples", "10", "--limit", "20", "--json"],
                         check=True, env=env, capture_output=True, text=True)
    assert json.loads(res.stdout)["num_images"] == 20


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--epochs", "0"], "expected a positive integer"),
        (["train", "--batch-size", "-3"], "expected a positive integer"),
        (["train", "--estimator", "renyi"], "argument --estimator: invalid choice: 'renyi'"),
        (["train", "--lr", "-1"], "argument --lr: expected a number >= 0, got -1"),
        (["train", "--lr", "0"], "lr must be positive"),
        (["train", "--dataset", "cifar"], "argument --dataset: invalid choice: 'cifar'"),
        (["train", "--beta", "-2"], "argument --beta: expected a number >= 0, got -2"),
        (["train", "--objective", "gan"], "argument --objective: invalid choice: 'gan'"),
        (["train", "--objective", "autoencoder"], "invalid choice: 'autoencoder'"),
        (["train", "--likelihood", "poisson"], "argument --likelihood: invalid choice: 'poisson'"),
        (["train", "--activation", "swish"], "argument --activation: invalid choice: 'swish'"),
        (["train", "--seed", "-1"], "argument --seed: expected an integer >= 0, got -1"),
        (["train", "--train-limit", "some"], "argument --train-limit: expected an integer or 'all', got 'some'"),
        (["evaluate", "run", "--num-samples", "-5"], "argument --num-samples: expected an integer >= 0, got -5"),
    ],
)
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own type errors
        code = exit_.code
    assert code != 0
    assert message in capsys.readouterr().err


def test_batch_larger_than_the_data_set(tmp_path, data_dir, capsys):
    code = main(["train", "--train-limit", "50", "--batch-size", "100", "--data-dir", str(data_dir),
                 "--out", str(tmp_path / "run"), "--no-progress"])
    assert code == 1 and "batch_size 100 is larger than the 50 training images" in capsys.readouterr().err


@pytest.mark.slow
def test_missing_dataset_is_a_clear_error(tmp_path, capsys):
    code = main(["train", "--data-dir", str(tmp_path), "--no-download", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 1 and "not found" in err and "Traceback" not in err


def test_unwritable_run_dir_is_a_clear_error(tmp_path, data_dir, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code = main(["train", *SMALL, "--data-dir", str(data_dir), "--out", str(blocker / "run")])
    assert code == 1 and "cannot write to the run directory" in capsys.readouterr().err


def test_existing_run_is_not_overwritten(run_dir, capsys):
    before = (run_dir / "checkpoint.pt").read_bytes()
    assert main(["train", *SMALL, "--out", str(run_dir)]) == 1
    assert "already holds a run" in capsys.readouterr().err
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def tree(*folders) -> dict:
    """Every file and folder under ``folders``, with its size and modification time."""
    return {str(p): (p.is_dir(), p.stat().st_size if p.is_file() else 0, p.stat().st_mtime_ns)
            for folder in folders for p in [folder, *folder.rglob("*")]}


@pytest.mark.parametrize("command", [
    ["evaluate", "{tmp}"], ["gaps", "{tmp}"], ["bdmc", "{tmp}"], ["plot", "{tmp}"], ["graph", "{tmp}"],
    ["sample", "{tmp}", "--out", "{tmp}/samples.png"], ["reconstruct", "{tmp}", "--out", "{tmp}/r/r.png"],
    ["train", "--resume", "{tmp}"],
    ["train", "--data-dir", "{tmp}/data", "--no-download", "--out", "{tmp}/run"],
    ["evaluate", "{run}", "--method", "bdmc"], ["evaluate", "{run}", "--limit", "0"],
    ["train", "--resume", "{run}", "--epochs", "0"],
], ids=lambda c: " ".join(c).replace("{tmp}", "TMP").replace("{run}", "RUN"))
def test_failed_commands_leave_no_trace(command, run_dir, tmp_path, capsys):
    """The main failure of each command (a folder that is not a run, a data set that is not
    there, a bad option on a real run) changes no file and makes no folder, anywhere."""
    before = tree(tmp_path, run_dir)
    argv = [part.replace("{tmp}", str(tmp_path)).replace("{run}", str(run_dir)) for part in command]
    try:
        code = main(argv)
    except SystemExit as stop:  # a usage error: argparse's exit
        code = stop.code
    err = capsys.readouterr().err
    assert code in (1, 2) and "Traceback" not in err and err.strip()
    assert tree(tmp_path, run_dir) == before


def test_evaluate_missing_run(tmp_path, capsys):
    assert main(["evaluate", str(tmp_path / "nothing")]) == 1
    assert "not a run directory" in capsys.readouterr().err


def test_resume_without_checkpoint_is_a_clear_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert main(["train", "--resume", str(tmp_path / "empty")]) == 1
    assert "cannot resume" in capsys.readouterr().err


def test_cuda_asked_for_without_cuda(tmp_path, data_dir, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    code = main(["train", *SMALL[:-3], "--device", "cuda", "--data-dir", str(data_dir), "--out", str(tmp_path / "r")])
    assert code == 1 and "no CUDA device; use --device cpu" in capsys.readouterr().err


# -- the CLI takes its own defaults back ---------------------------------------------------


def _train_flags():
    import dataclasses

    from pyro_vae.config import SECTIONS

    return [(section, f) for section, klass in SECTIONS.items() for f in dataclasses.fields(klass)]


@pytest.mark.parametrize("section,field", _train_flags(), ids=lambda v: getattr(v, "name", v))
def test_passing_a_default_back_gives_the_default_configuration(section, field):
    from pyro_vae.cli import config_to_argv
    from pyro_vae.config import RunConfig

    default = RunConfig()
    argv = config_to_argv(default)
    flag = "--" + field.name.replace("_", "-")
    # this field's own flag(s) as config_to_argv spells the default, alone on the command line
    start = next((i for i, a in enumerate(argv) if a in (flag, "--no-" + field.name.replace("_", "-"))), None)
    if start is None:
        assert getattr(getattr(default, section), field.name) is None and not field.metadata["none_word"]
        pytest.skip(f"{flag} has no spelling of its default (None: {field.metadata['help']})")
    end = start + 1
    while end < len(argv) and not argv[end].startswith("--"):
        end += 1
    args = build_parser().parse_args(["train", *argv[start:end]])
    assert config_from_args(args) == default


def test_config_json_turned_back_into_flags_gives_the_same_configuration(run_dir):
    from pyro_vae.cli import config_to_argv
    from pyro_vae.config import RunConfig

    stored = RunConfig.from_dict(json.loads((run_dir / "config.json").read_text()))
    assert stored != RunConfig()  # the run's settings are not the defaults
    again = config_from_args(build_parser().parse_args(["train", *config_to_argv(stored)]))
    assert again == stored


def test_zero_is_accepted_where_it_is_the_default():
    cfg = config_from_args(build_parser().parse_args(["train", "--seed", "0", "--kl-warmup-epochs", "0"]))
    assert cfg.train.seed == 0 and cfg.train.kl_warmup_epochs == 0


def test_help_shows_metavars_as_users_type_them(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--seed SEED" in out and "--z-dim Z_DIM" in out and "--hidden-dims N [N ...]" in out
    assert "TRAIN." not in out and "MODEL." not in out
    # choices and their meanings come from the registries
    assert "continuous-bernoulli" in out and "captured:" in out and "frey" in out


# -- what a newcomer hits ----------------------------------------------------------------


def test_out_beside_resume_is_an_error(run_dir, tmp_path, capsys):
    assert main(["train", "--resume", str(run_dir), "--out", str(tmp_path / "elsewhere")]) == 1
    assert "drop --out" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere").exists()


def test_resume_of_a_finished_run_says_how_to_train_longer(run_dir, capsys):
    before = (run_dir / "checkpoint.pt").read_bytes()
    assert main(["train", "--resume", str(run_dir), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "has finished its 1 epoch;" in out and f"--resume {run_dir} --epochs" in out
    assert (run_dir / "checkpoint.pt").read_bytes() == before


def test_unknown_likelihood_leaves_no_run_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(["train", "--likelihood", "poisson", "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_divergence_in_the_first_epoch_leaves_no_trace_and_says_so(tmp_path, data_dir, capsys):
    out = tmp_path / "run"
    argv = ["train", *SMALL, "--data-dir", str(data_dir), "--out", str(out)]
    assert main([*argv, "--lr", "1e30"]) == 1
    err = capsys.readouterr().err
    assert "no epoch had finished" in err and "nothing of the run was kept" in err and "after epoch 0" not in err
    assert not out.exists()  # the folder this command made is gone with it
    mine = tmp_path / "mine"  # a folder the user made, holding a file of theirs: only the run's files go
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    assert main([*argv[:-1], str(mine), "--lr", "1e30"]) == 1
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]
    assert main(argv) == 0 and (out / "checkpoint.pt").exists()  # and the command works as it did


# -- usage errors: the subcommand's usage, the nearest flag or choice, no prefixes ----------------


@pytest.mark.parametrize(
    "argv, usage, message",
    [
        (["train", "--epcohs", "3"], "usage: pyro-vae train [-h]",
         "pyro-vae train: error: unrecognized arguments: --epcohs 3; did you mean --epochs?"),
        (["train", "--epoch", "2"], "usage: pyro-vae train [-h]", "unrecognized arguments: --epoch 2; did you mean --epochs?"),
        (["train", "--no-progres"], "usage: pyro-vae train [-h]", "did you mean --no-progress?"),
        (["train", "--epcohs=3", "--bach-size", "2"], "usage: pyro-vae train [-h]",
         "did you mean --epochs (for --epcohs), --batch-size (for --bach-size)?"),
        (["train", "--model", "vea"], "usage: pyro-vae train [-h]",
         "argument --model: invalid choice: 'vea' (choose from 'vae', 'ae', "),
        (["train", "--model", "vea"], "usage: pyro-vae train [-h]", "; did you mean 'vae'?"),
        (["train", "--likelihood", "gausian"], "usage: pyro-vae train [-h]", "did you mean 'gaussian'?"),
        (["evaluate", "run", "--num-sample", "5"], "usage: pyro-vae evaluate [-h]", "did you mean --num-samples?"),
        (["plot", "run", "--kind", "latnt"], "usage: pyro-vae plot [-h]", "did you mean 'latent'?"),
        (["trian", "--epochs", "3"], "usage: pyro-vae [-h] COMMAND", "invalid choice: 'trian'"),
        (["trian"], "usage: pyro-vae [-h] COMMAND", "did you mean 'train'?"),
    ],
)
def test_usage_errors_show_the_subcommand_and_the_nearest_flag_or_choice(argv, usage, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    err = capsys.readouterr().err
    assert exit_.value.code == 2
    assert err.startswith(usage) and message in err


def test_an_unknown_flag_far_from_every_flag_gets_no_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--frobnicate"])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.endswith("unrecognized arguments: --frobnicate\n")


def test_no_parser_takes_a_prefix_of_a_flag():
    import argparse

    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    assert parser.allow_abbrev is False and all(p.allow_abbrev is False for p in sub.choices.values())
    for name, p in sub.choices.items():
        flags = {s for a in p._actions for s in a.option_strings}
        for flag in flags:
            prefix = flag[:-1]
            if len(prefix) > 2 and not any(f == prefix for f in flags):
                with pytest.raises(SystemExit):
                    p.parse_args([prefix, "1"] + (["run"] if name != "train" else []))
