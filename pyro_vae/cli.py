"""The ``pyro-vae`` command: parses arguments, then calls the library.

Training flags are generated from the config dataclasses, so every flag maps 1:1 onto a
config field (``--z-dim`` <-> ``ModelConfig.z_dim``); each flag's type, lower bound,
choices and help come from the field's declaration and its registry
(:func:`pyro_vae.config.setting`), never from a second copy here.

Building the parser imports neither torch nor Pyro (the registries name their members
without importing them, :mod:`pyro_vae.catalog`): ``--help`` and usage errors answer at
once, and each command imports what it uses when it starts.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from . import catalog
from . import config as configuration
from .arguments import Parser
from .config import SECTIONS, RunConfig, choices_of, registry_of

DEFAULT_OUT = Path("runs/latest")
DEFAULT_EVERY = "10min"  # pyro_vae.checkpoint.DEFAULT_EVERY (checked by a test; the parser imports no torch)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from . import networks  # torch from here on: the work starts

        networks.softplus_setting()  # a mistyped $PYRO_VAE_SOFTPLUS stops here, before any work
        return args.func(args) or 0
    except KeyboardInterrupt:
        print("pyro-vae: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError, ImportError) as err:
        print(f"pyro-vae: error: {err}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="pyro-vae", description="Variational autoencoders as Pyro programs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a model by SVI")
    for section, klass in SECTIONS.items():
        group = p.add_argument_group(f"{section} settings")
        for f in dataclasses.fields(klass):
            _add_field_flag(group, section, f)
    p.add_argument("--out", type=Path, metavar="RUN_DIR", help=f"run directory (default: {DEFAULT_OUT})")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--tensorboard", nargs="?", const="", metavar="DIR",
                   help="log each epoch to TensorBoard (default DIR: RUN_DIR/tensorboard; then: tensorboard --logdir DIR)")
    p.add_argument("--mlflow", nargs="?", const="", metavar="TRACKING_URI",
                   help="log the run to MLflow (needs pip install -e \".[mlflow]\"; default: an SQLite store in "
                        "RUN_DIR/mlflow.db)")
    p.add_argument("--program", metavar="MODULE:FUNCTION",
                   help="with --resume, for a run of a program built in code that recorded no factory: "
                        "a function that returns the program")
    p.add_argument("--resume-if-present", action="store_true",
                   help="start the run in --out, or continue it if the folder holds it (one command line for start "
                        "and restart: torchrun --max-restarts, a scheduler's requeue); a folder holding a run of "
                        "another configuration is refused")
    p.add_argument("--checkpoint-every", default=None, metavar="N|TIME",
                   help="within an epoch, also save a checkpoint every N steps or on a clock (30s, 10min, 2h; "
                        f"'epoch': at epoch ends only). A crash loses at most that much work (default: "
                        f"{DEFAULT_EVERY})")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test-set ELBO, its terms, and importance-sampled log p(x)")
    _run_args(p)
    p.add_argument("--num-samples", type=_int_at_least(0), default=5000, metavar="K",
                   help="K of the importance-sampled bound; 0 skips it; not used with --method ais (default: 5000)")
    p.add_argument("--method", choices=("is", "ais"), default="is",
                   help="log p(x) by importance sampling with the encoder (is), or by annealed importance sampling "
                        "from the prior (ais: slower, tighter; see the AIS options) (default: is)")
    _ais_args(p)
    p.add_argument("--limit", type=_int_at_least(1), metavar="N", help="evaluate the first N test images only")
    _split_arg(p)
    p.add_argument("--batch-size", type=_int_at_least(1), default=100, metavar="N",
                   help="test images per batch (default: 100)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the Monte Carlo noise (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("gaps", help="how good is q(z|x): approximation and amortisation gaps per test image "
                                    "(Cremer et al. 2018)")
    _run_args(p)
    p.add_argument("--limit", type=_int_at_least(1), default=1000, metavar="N",
                   help="the first N test images (default: 1000)")
    _split_arg(p)
    p.add_argument("--num-samples", type=_int_at_least(1), default=5000, metavar="K",
                   help="importance samples of log p(x), and draws of each ELBO (default: 5000)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=100, metavar="N",
                   help="images optimised together (default: 100)")
    p.add_argument("--max-steps", type=_int_at_least(100), default=5000, metavar="N",
                   help="most Adam steps of the per-image optimisation (default: 5000)")
    p.add_argument("--log-px", choices=("is", "ais"), default="is",
                   help="log p(x) by importance sampling with q* (is), or by AIS (ais: the approximation gap is then "
                        "not shrunk by the importance-sampling bound's own gap) (default: is)")
    _ais_args(p)
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the Monte Carlo noise (default: 0)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_gaps)

    p = sub.add_parser("bdmc", help="bidirectional Monte Carlo: AIS bounds on log p(x) from below and above, on "
                                    "images simulated from the model (Grosse et al. 2015, Wu et al. 2017)")
    _run_args(p)
    p.add_argument("--num", type=_int_at_least(1), default=100, metavar="N",
                   help="images simulated from the model (default: 100)")
    p.add_argument("--batch-size", type=_int_at_least(1), default=25, metavar="N",
                   help="images annealed together (default: 25)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the simulation and the chains (default: 0)")
    _ais_args(p)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_bdmc)

    p = sub.add_parser("graph", help="the plate diagram of the run's model (or guide), by pyro.render_model")
    _run_args(p)
    p.add_argument("--out", type=Path, metavar="FILE", help="a .png, .svg, .pdf (drawn by Graphviz's dot) or .dot "
                   "file (default RUN_DIR/model.png, or guide.png with --guide)")
    p.add_argument("--guide", action="store_true", help="the guide q(z|x) instead of the model p(x, z)")
    p.set_defaults(func=cmd_graph)

    p = sub.add_parser("sample", help="PNG grid of images decoded from prior samples")
    _run_args(p)
    p.add_argument("--num", type=_int_at_least(1), default=64, metavar="N", help="images (default: 64)")
    p.add_argument("--nrow", type=_int_at_least(1), default=8, metavar="N", help="images per row (default: 8)")
    p.add_argument("--seed", type=_int_at_least(0), default=0, help="seed of the prior draws (default: 0)")
    p.add_argument("--out", type=Path, metavar="PNG", help="PNG path (default RUN_DIR/samples.png)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("reconstruct", help="PNG grid of test images above their reconstructions")
    _run_args(p)
    p.add_argument("--num", type=_int_at_least(1), default=32, metavar="N", help="test images (default: 32)")
    p.add_argument("--nrow", type=_int_at_least(1), default=8, metavar="N", help="images per row (default: 8)")
    p.add_argument("--out", type=Path, metavar="PNG", help="PNG path (default RUN_DIR/reconstructions.png)")
    p.set_defaults(func=cmd_reconstruct)

    p = sub.add_parser("plot", help="figures of trained runs: latent space, manifold, samples, curves, ...")
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR",
                   help="the run to draw; for --kind comparison or kl-profile one or more runs")
    figures, comparisons = catalog.FIGURES, catalog.COMPARISONS
    p.add_argument("--kind", default="all", choices=("all", *figures, *comparisons), metavar="KIND",
                   help="which figure: all (every one the run's program can draw) | " + figures.help()
                        + " | several runs side by side: " + comparisons.help() + " (default: all)")
    p.add_argument("--out", type=Path, metavar="FOLDER", help="folder for the figures (default RUN_DIR/figures)")
    p.add_argument("--pdf", action="store_true", help="write a PDF beside each PNG")
    p.add_argument("--tsne", action="store_true", help="latent: t-SNE instead of PCA when z_dim > 2 (needs scikit-learn)")
    p.add_argument("--spherical", action="store_true", help="interpolation: add spherical (slerp) paths")
    p.add_argument("--limit", type=_int_at_least(1), metavar="N", help="use the first N test images only (default: all)")
    p.add_argument("--names", nargs="+", help="comparison, kl-profile: one name per run (default: from its model)")
    p.add_argument("--seed", type=_int_at_least(0), default=0,
                   help="seed of prior samples and interpolation pairs (default: 0)")
    _device_args(p, "runs")
    p.set_defaults(func=cmd_plot)
    return parser


AIS_DEFAULTS = {"steps": 500, "chains": 4, "leapfrog": 5}  # pyro_vae.ais.Schedule's (a test checks): the cheapest that met BDMC's target


def _ais_args(p: argparse.ArgumentParser) -> None:
    group = p.add_argument_group("AIS options (annealed importance sampling, pyro_vae/ais.py)")
    group.add_argument("--ais-steps", type=_int_at_least(2), default=AIS_DEFAULTS["steps"], metavar="T",
                       help=f"intermediate distributions from prior to posterior (default: {AIS_DEFAULTS['steps']})")
    group.add_argument("--chains", type=_int_at_least(1), default=AIS_DEFAULTS["chains"], metavar="C",
                       help=f"independent chains per image (default: {AIS_DEFAULTS['chains']})")
    group.add_argument("--leapfrog", type=_int_at_least(1), default=AIS_DEFAULTS["leapfrog"], metavar="L",
                       help=f"leapfrog steps per HMC transition (default: {AIS_DEFAULTS['leapfrog']})")


def _schedule(args):
    from .ais import Schedule

    return Schedule(steps=args.ais_steps, chains=args.chains, leapfrog=args.leapfrog)


def _ais_store(run, kind: str, **settings) -> Path:
    """Where an AIS evaluation keeps its finished batches, so that a killed one resumes."""
    import hashlib

    key = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return run.run_dir / "ais" / f"{kind}-{key}.pt"


def _split_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", choices=("test", "train"), default="test",
                   help="the images scored: the test split, or the training split (binarised once, as the test "
                        "split is; the only choice for a program with parameters per training image) "
                        "(default: test)")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    _device_args(p, "run")


def _device_args(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: auto)")
    p.add_argument("--data-dir", metavar="FOLDER", help=f"data folder, if not the one the {what} trained with")
    p.add_argument("--program", metavar="MODULE:FUNCTION",
                   help="for a run of a program built in code that recorded no factory: a function returning it")


def _add_field_flag(group, section: str, f: dataclasses.Field) -> None:
    """One flag per configuration field: its type, bound, choices and help from the field's
    declaration (:func:`pyro_vae.config.setting`) and its registry."""
    flag = "--" + f.name.replace("_", "-")
    meta = f.metadata
    kind = configuration._field_kind(f)
    default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
    help_text = meta["help"]
    registry = registry_of(f)
    if registry is not None:
        help_text += " (" + registry.help() + ")"
    if isinstance(default, tuple):
        help_text += f" (default: {' '.join(map(str, default))})"
    elif default is not None:
        help_text += f" (default: {default})"
    elif meta["none_word"]:
        help_text += f" (default: {meta['none_word']})"
    common = dict(dest=f"{section}.{f.name}", default=argparse.SUPPRESS, help=help_text.replace("%", "%%"))
    metavar = meta["metavar"] or f.name.upper()
    if kind is bool:
        group.add_argument(flag, action=argparse.BooleanOptionalAction, **common)
    elif kind is tuple:
        group.add_argument(flag, type=_int_at_least(meta["minimum"]), nargs="+", metavar=metavar, **common)
    elif kind is int:
        group.add_argument(flag, type=_int_at_least(meta["minimum"], meta["none_word"], meta.get("maximum")),
                           metavar=metavar, **common)
    elif kind is float:
        group.add_argument(flag, type=_float_at_least(meta["minimum"]), metavar=metavar, **common)
    else:
        group.add_argument(flag, type=str, choices=choices_of(f), metavar=metavar, **common)


def _int_at_least(minimum, none_word: str | None = None, maximum=None):
    """An argparse type: an integer >= ``minimum`` (and <= ``maximum``, when given; the word
    ``none_word`` stands for None)."""

    def integer(text: str):
        if none_word is not None and text == none_word:
            return None
        try:
            value = int(text)
        except ValueError:
            spelled = f" or {none_word!r}" if none_word else ""
            raise argparse.ArgumentTypeError(f"expected an integer{spelled}, got {text!r}") from None
        if maximum is not None and not (minimum if minimum is not None else value) <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected {configuration.allowed_range(int, minimum, maximum)}, "
                                             f"got {value}")
        if minimum is not None and value < minimum:
            bound = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"expected {bound}, got {value}")
        return value

    return integer


def _float_at_least(minimum):
    def number(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if value != value or (minimum is not None and value < minimum):
            raise argparse.ArgumentTypeError(f"expected a number >= {minimum}, got {text}")
        return value

    return number


def config_from_args(args: argparse.Namespace) -> RunConfig:
    given = {section: {} for section in SECTIONS}
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if section in SECTIONS and name:
            given[section][name] = value
    return RunConfig.from_dict(given)


def config_to_argv(config: RunConfig) -> list[str]:
    """The ``pyro-vae train`` flags that give ``config`` (the inverse of :func:`config_from_args`)."""
    argv = []
    for section, klass in SECTIONS.items():
        values = getattr(config, section)
        for f in dataclasses.fields(klass):
            value = getattr(values, f.name)
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag if value else "--no-" + f.name.replace("_", "-"))
            elif isinstance(value, tuple):
                argv += [flag, *map(str, value)]
            elif value is None:
                if f.metadata["none_word"]:
                    argv += [flag, f.metadata["none_word"]]
            else:
                argv += [flag, repr(value) if isinstance(value, float) else str(value)]
    return argv


def _given_train_flags(args) -> set[str]:
    return {k for k in vars(args) if "." in k}


# -- commands ----------------------------------------------------------------------------


def _trackers(args) -> list:
    """The callbacks --tensorboard and --mlflow ask for (a missing package is a clear error, now)."""
    from .callbacks import MLflow, TensorBoard

    out = []
    if args.tensorboard is not None:
        out.append(TensorBoard(args.tensorboard or None))
    if args.mlflow is not None:
        out.append(MLflow(args.mlflow or None))
    return out


def cmd_train(args) -> int:
    from .train import TrainingInterrupted

    try:
        return _train(args)
    except TrainingInterrupted as stop:
        print(f"pyro-vae: {stop}", file=sys.stderr)
        return 128 + stop.signum


def _train(args) -> int:
    from .checkpoint import Every
    from .train import train

    every = Every(DEFAULT_EVERY if args.checkpoint_every is None else args.checkpoint_every)  # an error before any work
    callbacks = _trackers(args)
    if args.resume_if_present:
        if args.resume is not None:
            raise ValueError("--resume-if-present starts or continues the run in --out; it does not go with "
                             "--resume (which continues a run, and only that)")
        if args.overwrite:
            raise ValueError("--resume-if-present never replaces a run; leave out --overwrite")
    if args.resume is None:
        if args.program is not None:
            raise ValueError("--program goes with --resume (a new run of a registered model takes --model)")
        run = train(config_from_args(args), args.out or DEFAULT_OUT, overwrite=args.overwrite,
                    resume="if-present" if args.resume_if_present else False, progress=not args.no_progress,
                    callbacks=callbacks, checkpoint_every=every)
        _say(f"run directory: {run.run_dir}")
        return 0
    if args.out is not None and args.out.resolve() != args.resume.resolve():
        raise ValueError(f"--resume {args.resume} continues the run in that folder; drop --out {args.out} "
                         "(to start a new run in --out, leave out --resume)")
    extra = _given_train_flags(args) - {"train.epochs"}
    if extra:
        raise ValueError(
            "--resume continues a run with its stored configuration; only --epochs may be given, not "
            + ", ".join("--" + k.split(".")[1].replace("_", "-") for k in sorted(extra))
        )
    from .runs import call_factory, load_config

    config = None
    if "train.epochs" in vars(args):
        stored = load_config(args.resume)
        config = dataclasses.replace(stored, train=dataclasses.replace(stored.train, epochs=vars(args)["train.epochs"]))
    program = call_factory(args.program) if args.program else None
    run = train(config, args.resume, resume=True, progress=not args.no_progress, program=program,
                callbacks=callbacks, checkpoint_every=every)
    _say(f"run directory: {run.run_dir}")
    return 0


def _process_group(args):
    """The torch.distributed group torchrun started this command in (None for one process);
    each rank then uses its own GPU (``--device`` becomes ``cuda:LOCAL_RANK``)."""
    from . import distributed
    from .runs import resolve_device

    device = resolve_device(args.device)
    group = distributed.from_environment(device)
    args.device = str(distributed.device_for(group, device))
    return group


def _say(line: str) -> None:
    """Print, from the only process or from rank 0 of a torchrun launch."""
    if int(os.environ.get("RANK", "0")) == 0:
        print(line)


def _load(run_dir: Path, args):
    from .runs import call_factory, load_run

    program = call_factory(args.program) if args.program else None
    run = load_run(run_dir, device=args.device, program=program)
    if args.data_dir is not None and run.config.data is not None:
        run.config = dataclasses.replace(run.config, data=dataclasses.replace(run.config.data, data_dir=args.data_dir))
    return run


def _test_data(run, limit=None):
    """The run's test split, binarised as in training when the program scores binary data."""
    import torch

    from .data import load_data, test_set

    if run.config.data is None:
        raise ValueError(f"{run.run_dir} was trained on images passed to fit() in code, not on a registered data "
                         "set; evaluate it in Python (pyro_vae.evaluate_model(run.program, images))")
    binary = bool(getattr(run.program, "binary_data", False))
    return test_set(load_data(run.config.data, "test", run.device), binary).head(limit)


def _split_data(run, split: str, limit=None):
    """``(images, keyword arguments)`` for the evaluations: the test split, or the training
    split with the images' positions and the training set's size (a program that keeps
    parameters per training image needs them)."""
    if split == "test":
        return _test_data(run, limit), {}
    import torch

    from .data import load_data, test_set

    if run.config.data is None:
        raise ValueError(f"{run.run_dir} was trained on images passed to fit() in code, not on a registered data "
                         "set; evaluate it in Python (pyro_vae.evaluate_model(run.program, images, index=...))")
    binary = bool(getattr(run.program, "binary_data", False))
    full = load_data(run.config.data, "train", run.device)
    data = test_set(full, binary).head(limit)
    return data, {"index": torch.arange(len(data), device=run.device), "num_data": len(full)}


def cmd_evaluate(args) -> int:
    from .evaluate import Estimate, active_unit_counts, bits_per_dim, evaluate_model

    group = _process_group(args)  # several processes under torchrun share the importance sampling
    if group is not None and args.method == "ais":
        raise ValueError("evaluate --method ais runs in one process; start it without torchrun")
    schedule = _schedule(args) if args.method == "ais" else None
    run = _load(args.run_dir, args)
    test, where = _split_data(run, args.split, args.limit)
    images = test.images
    num_samples = args.num_samples if args.method == "is" else 0
    quiet = args.json or num_samples == 0 or (group is not None and not group.leader)
    with _image_bar(images.shape[0], "importance sampling", quiet) as bar:
        report = evaluate_model(run.program, images, num_samples, args.batch_size, args.seed,
                                progress=bar.update, labels=test.labels, group=group, **where)
    if group is not None and not group.leader:
        return 0
    ais = None
    if schedule is not None:
        from .ais import AISError

        try:
            ais = _ais_log_px(run, images, test.labels, where, schedule, args, f"{args.split} {images.shape[0]}")
        except AISError as err:
            report.notes.append(f"log p(x) was not annealed: {err}")
    if ais is not None:
        mc = float(ais["mc_variance"].sum().sqrt() / ais["mc_variance"].numel())
        report["log_px_ais"] = Estimate.of(ais["log_px"], mc)
        report.notes.append(f"AIS: {schedule.steps} distributions, {schedule.chains} chains, {schedule.leapfrog} "
                            f"leapfrog steps; HMC acceptance {float(ais['acceptance'].mean()):.3f}; "
                            f"{float(ais['seconds'].mean()):.2f} s per image")
    eight_bit = getattr(getattr(run.program, "likelihood", None), "levels", None) is not None
    continuous = not getattr(run.program, "binary_data", True) and not eight_bit
    per_dim = continuous or eight_bit  # bits per dimension beside log p(x)
    dims = images[0].numel()
    activity = _activity(run, test, where)
    if (run.run_dir / "tensorboard").is_dir() and args.split == "test" and args.limit is None:
        from .callbacks import log_evaluation

        log_evaluation(run.run_dir / "tensorboard", run.epoch, report)
    bounds = getattr(run.program, "bounds", "log p(x)")  # what the ELBO and log_px_* are of
    if args.json:
        out = {"run_dir": str(run.run_dir), "epoch": run.epoch, "num_images": images.shape[0], "bounds": bounds}
        out.update({k: {"mean": e.mean, "stderr": e.stderr, "mc_stderr": e.mc_stderr} for k, e in report.items()})
        if report.notes:
            out["notes"] = report.notes
        if ais is not None:
            out["ais"] = {"schedule": dataclasses.asdict(schedule), "acceptance": float(ais["acceptance"].mean()),
                          "seconds_per_image": float(ais["seconds"].mean())}
        if activity is not None:
            out["active_units"] = {name: {"active": active_unit_counts({name: a})[name], "units": a.numel()}
                                   for name, a in activity.items()}
        if per_dim:
            for key, est in report.items():
                if key.startswith("log_px") or key == "elbo":
                    name = key[len("log_px_"):] if key.startswith("log_px") else key
                    out["bits_per_dim_" + name] = {"mean": bits_per_dim(est.mean, dims),
                                                   "stderr": -bits_per_dim(est.stderr, dims)}
        print(json.dumps(out))
        return 0
    kind = ("densities: nats per image of grey values in [0, 1]" if continuous else
            "nats per image: log-probabilities of the 8-bit pixel values" if eight_bit else "nats per image")
    print(f"{run.run_dir} after {_epochs(run.epoch)}, {images.shape[0]} {args.split} images ({kind}; mean +- its s.e. over "
          "the images, +- its Monte Carlo s.e. for these images)")
    if bounds != "log p(x)":  # a conditional program: its numbers are of part of each image given the rest
        detail = getattr(run.program, "bounds_detail", None)
        print(f"  (conditional: elbo and log_px_* are bounds on {bounds}, log_lik is E_q of "
              f"{bounds.replace(')', ', z)')}{'; ' + detail if detail else ''})")
    for key, est in report.items():
        line = f"  {key:<16} {est}"
        if key == "accuracy":  # (a fraction, not nats)
            line = f"  {key:<16} {est.mean:.4f} +- {est.stderr:.4f}   (the fraction of the images classified right)"
        if per_dim and key.startswith(("log_px", "elbo")):
            line += f"   = {bits_per_dim(est.mean, dims):.4f} +- {-bits_per_dim(est.stderr, dims):.4f} bits per dimension"
        print(line)
    for note in report.notes:
        print(f"  note: {note}")
    if activity is not None:
        counts = active_unit_counts(activity)
        print("  active units     " + ", ".join(f"{name} {counts[name]}/{a.numel()}" for name, a in activity.items())
              + "   (Var_x E_q[u|x] > 0.01, Burda et al.)")
    return 0


def _image_bar(total: int, desc: str, quiet: bool):
    """A bar counted in images, moved by fractions of a batch (from the first batch on, an
    update every few seconds with the time left), shown as whole images."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=quiet, file=sys.stderr, mininterval=1.0,
                bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.0f}/{total} img [{elapsed}<{remaining}]")


def _ais_log_px(run, images, labels, where, schedule, args, what: str, bdmc: bool = False) -> dict:
    """Per-image AIS results (:func:`pyro_vae.ais.evaluate_ais`) with a live bar, resumable
    from the run folder's ``ais/`` (a killed evaluation goes on where it stopped)."""
    import dataclasses as dc

    from tqdm.auto import tqdm

    from .ais import evaluate_ais

    batch_size = args.batch_size
    store = _ais_store(run, "bdmc" if bdmc else "ais", epoch=run.epoch, schedule=dc.asdict(schedule),
                       batch_size=batch_size, seed=args.seed, images=images.shape[0], what=what)
    runs = 3 if bdmc else 2  # the tuning run, the forward run (and the reverse one)
    batches = -(-images.shape[0] // batch_size)
    with tqdm(total=batches * runs * schedule.steps, desc=f"AIS ({what})", unit="step", disable=args.json,
              file=sys.stderr, mininterval=1.0) as bar:
        return evaluate_ais(run.program, images, schedule, batch_size, args.seed, labels=labels, store=store,
                            progress=lambda t: bar.update(1), bdmc=bdmc, **where)


def _epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def cmd_bdmc(args) -> int:
    from .evaluate import Estimate

    schedule = _schedule(args)
    run = _load(args.run_dir, args)
    test = _test_data(run, 1)
    shape = (args.num, *test.images.shape[1:])
    like = test.images.new_zeros(shape)
    labels = None if test.labels is None else test.labels.new_zeros(args.num)
    out = _ais_log_px(run, like, labels, {}, schedule, args, f"{args.num} simulated", bdmc=True)
    report = {"lower": Estimate.of(out["log_px"]), "upper": Estimate.of(out["upper"]), "gap": Estimate.of(out["gap"]),
              "acceptance": Estimate.of(out["acceptance"]), "seconds_per_image": Estimate.of(out["seconds"])}
    if args.json:
        print(json.dumps({"run_dir": str(run.run_dir), "epoch": run.epoch, "num_images": args.num,
                          "schedule": dataclasses.asdict(schedule),
                          **{k: {"mean": e.mean, "stderr": e.stderr} for k, e in report.items()}}))
        return 0
    print(f"{run.run_dir} after {_epochs(run.epoch)}: {args.num} images simulated from the model, AIS with "
          f"{schedule.steps} distributions, {schedule.chains} chains, {schedule.leapfrog} leapfrog steps "
          "(nats per image, mean +- s.e. over the images)")
    print(f"  log p(x) >= {report['lower']}   (forward AIS from the prior)")
    print(f"  log p(x) <= {report['upper']}   (reverse AIS from the z that made each image)")
    print(f"  gap         {report['gap']}   (upper - lower: how far AIS may be from log p(x) on such images)")
    print(f"  HMC acceptance {report['acceptance'].mean:.3f}, {report['seconds_per_image'].mean:.2f} s per image "
          "(the three runs: tuning, forward, reverse)")
    return 0


def cmd_gaps(args) -> int:
    from .posterior import gap_family, inference_gaps

    schedule = _schedule(args) if args.log_px == "ais" else None
    run = _load(args.run_dir, args)
    gap_family(run.program)  # a clear error before any data loads
    test, where = _split_data(run, args.split, args.limit)
    log_px = None
    if schedule is not None:
        log_px = _ais_log_px(run, test.images, test.labels, where, schedule, args,
                             f"{args.split} {test.images.shape[0]}")["log_px"]
    with _image_bar(test.images.shape[0], "optimising q* per image", args.json) as bar:
        gaps = inference_gaps(run.program, test.images, num_samples=args.num_samples, elbo_samples=args.num_samples,
                              batch_size=args.batch_size, seed=args.seed, progress=bar.update,
                              max_steps=args.max_steps, labels=test.labels, log_px=log_px, **where)
    report = gaps.report()
    if args.json:
        out = {"run_dir": str(run.run_dir), "epoch": run.epoch, "num_images": test.images.shape[0],
               "num_samples": args.num_samples, "optimizer_steps": gaps.steps}
        out.update({k: {"mean": e.mean, "stderr": e.stderr} for k, e in report.items()})
        print(json.dumps(out))
        return 0
    print(f"{run.run_dir} after {_epochs(run.epoch)}, {test.images.shape[0]} {args.split} images, K = {args.num_samples} "
          "(nats per image, mean +- s.e.)")
    names = {"log_px": getattr(run.program, "bounds", "log p(x)") + (" (AIS)" if schedule is not None else ""), "elbo_amortized": "L[q]  (the encoder)", "elbo_optimal": "L[q*] (per image)",
             "inference_gap": "inference gap", "approximation_gap": "  approximation", "amortization_gap":
             "  amortisation"}
    for key, est in report.items():
        print(f"  {names[key]:<22} {est}")
    print(f"  (q* took {min(gaps.steps)}-{max(gaps.steps)} Adam steps per batch of {args.batch_size})")
    return 0


def cmd_graph(args) -> int:
    from .graph import program_graph, write_graph

    run = _load(args.run_dir, args)
    x = _test_data(run, 2).images  # two test images: the diagram shows the plate, not its size
    graph = program_graph(run.program, x, guide=args.guide)
    out = args.out or run.run_dir / ("guide.png" if args.guide else "model.png")
    print(f"wrote {write_graph(graph, out)}")
    return 0


def _activity(run, test, where=None):
    """Active units of each latent site of the guide, or None when a site's distribution has no mean."""
    import pyro

    from .evaluate import latent_activity
    from .models import ProgramCall

    labels = test.labels if ProgramCall(run.program).takes["y"] else None
    try:
        with pyro.get_param_store().scope():
            activity = latent_activity(run.program.model, run.program.guide, test.images, labels=labels,
                                       **(where if ProgramCall(run.program).takes["index"] else {}))
    except NotImplementedError:
        return None
    return activity or None  # (a program without latents has no units)


def cmd_sample(args) -> int:
    from .plots import save_sample_grid

    from .views import takes_labels

    run = _load(args.run_dir, args)
    decode = getattr(run.program, "decode", None)
    # a conditional program decodes each draw with a label: those of the first test images
    labels = _test_data(run, args.num).labels if decode is not None and takes_labels(decode) else None
    path = save_sample_grid(run.program, args.out or run.run_dir / "samples.png", args.num, args.nrow, args.seed,
                            labels=labels)
    print(f"wrote {path}")
    return 0


def cmd_reconstruct(args) -> int:
    from .plots import save_reconstruction_grid

    run = _load(args.run_dir, args)
    test = _test_data(run, args.num)
    path = save_reconstruction_grid(run.program, test.images, args.out or run.run_dir / "reconstructions.png",
                                    args.nrow, labels=test.labels)
    print(f"wrote {path}")
    return 0


def cmd_plot(args) -> int:
    """Draw figures of one run (or the comparison of several) from its checkpoint and metrics."""
    from . import plots
    from .runs import read_metrics

    multi = args.kind in plots.COMPARISONS
    if len(args.run_dirs) > 1 and not multi:
        raise ValueError(f"--kind {args.kind} draws one run, got {len(args.run_dirs)} RUN_DIRs; "
                         f"--kind {' and --kind '.join(plots.COMPARISONS)} take several")
    runs = [_load(run_dir, args) for run_dir in args.run_dirs]
    run = runs[0]
    test = _test_data(run, args.limit)
    out = args.out if args.out is not None else run.run_dir / "figures"
    if multi:
        names = args.names or [plots.default_run_name(r.config) for r in runs]
        if len(names) != len(runs):
            raise ValueError(f"--names gives {len(names)} names for {len(runs)} runs")
        written = [plots.draw_comparison(args.kind, list(zip(names, (r.program for r in runs))), test, out,
                                         pdf=args.pdf)]
    else:
        written = plots.draw_figures([args.kind], run.program, test, read_metrics(run.run_dir), out,
                                     method="tsne" if args.tsne else "auto", spherical=args.spherical,
                                     seed=args.seed, pdf=args.pdf)
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
