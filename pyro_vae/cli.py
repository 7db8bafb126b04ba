"""The ``pyro-vae`` command: parses arguments, then calls the library.

Training flags are generated from the config dataclasses, so every flag maps 1:1 onto a
config field (``--z-dim`` <-> ``ModelConfig.z_dim``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path

from .config import DataConfig, ModelConfig, RunConfig, TrainConfig
from .train import TrainingInterrupted

SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
FLAG_HELP = {
    "z_dim": "latent dimension",
    "hidden_dims": "hidden layer sizes of encoder (decoder mirrors them)",
    "activation": "relu | softplus | tanh | elu | gelu",
    "network": "mlp | conv",
    "likelihood": "observation model p(x|z)",
    "dataset": "mnist | fashion-mnist | binarized-mnist",
    "data_dir": "data folder (default: $PYRO_VAE_DATA, else ~/.cache/pyro_vae/data)",
    "binarize": "dynamic (fresh Bernoulli sample per epoch) | fixed (one sample)",
    "train_limit": "train on the first N training images only",
    "test_limit": "evaluate on the first N test images only",
    "download": "try torchvision's download when the files are missing",
    "elbo": "trace (Monte Carlo KL) | meanfield (analytic KL)",
    "engine": "captured (module, replaying a recording of the ELBO's forward pass) | module (ELBO as torch "
    "module + one torch Adam) | svi (pyro.infer.SVI + pyro.optim.Adam)",
    "objective": "elbo | autoencoder (point-mass encoder, no KL) | kl-only",
    "beta": "weight of the KL term (beta-VAE)",
    "kl_warmup_epochs": "raise the KL weight linearly to beta over this many epochs",
    "num_particles": "samples of z per image in each ELBO estimate",
    "device": "auto | cpu | cuda[:N]  (auto: CUDA when available)",
    "eval_batch_size": "images per batch when evaluating the test set",
}


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except TrainingInterrupted as stop:
        print(f"pyro-vae: {stop}", file=sys.stderr)
        return 128 + stop.signum
    except KeyboardInterrupt:
        print("pyro-vae: interrupted", file=sys.stderr)
        return 130
    except (ValueError, TypeError, OSError, RuntimeError) as err:
        print(f"pyro-vae: error: {err}", file=sys.stderr)
        return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pyro-vae", description="Variational autoencoders as Pyro programs.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train a VAE by SVI", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for section, klass in SECTIONS.items():
        group = p.add_argument_group(f"{section} settings")
        for f in dataclasses.fields(klass):
            _add_field_flag(group, section, f)
    p.add_argument("--out", type=Path, default=Path("runs/latest"), help="run directory (RUN_DIR)")
    p.add_argument("--resume", type=Path, metavar="RUN_DIR", help="continue the run in RUN_DIR from its checkpoint")
    p.add_argument("--overwrite", action="store_true", help="replace a run already in --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="test-set ELBO, its terms, and importance-sampled log p(x)")
    _run_args(p)
    p.add_argument("--num-samples", type=int, default=5000, help="K of the importance-sampled bound (0: skip it)")
    p.add_argument("--limit", type=_positive_int, help="evaluate the first N test images only")
    p.add_argument("--batch-size", type=_positive_int, default=100, help="test images per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="PNG grid of images decoded from prior samples")
    _run_args(p)
    p.add_argument("--num", type=_positive_int, default=64)
    p.add_argument("--nrow", type=_positive_int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="PNG path (default RUN_DIR/samples.png)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("reconstruct", help="PNG grid of test images above their reconstructions")
    _run_args(p)
    p.add_argument("--num", type=_positive_int, default=32)
    p.add_argument("--nrow", type=_positive_int, default=8)
    p.add_argument("--out", type=Path, help="PNG path (default RUN_DIR/reconstructions.png)")
    p.set_defaults(func=cmd_reconstruct)
    p = sub.add_parser("plot", help="figures of trained runs: latent space, manifold, samples, curves, ...")
    p.add_argument("run_dirs", type=Path, nargs="+", metavar="RUN_DIR",
                   help="the run to draw; for --kind comparison or kl-profile one or more runs")
    p.add_argument("--kind", default="all", choices=("latent", "manifold", "samples", "reconstructions",
                                                     "interpolation", "dims", "curves", "all", "comparison",
                                                     "kl-profile"),
                   help="which figure; all: every one that applies to the run; comparison and kl-profile "
                        "draw several runs side by side")
    p.add_argument("--out", type=Path, metavar="FOLDER", help="folder for the figures (default RUN_DIR/figures)")
    p.add_argument("--pdf", action="store_true", help="write a PDF beside each PNG")
    p.add_argument("--tsne", action="store_true", help="latent: t-SNE instead of PCA when z_dim > 2 (needs scikit-learn)")
    p.add_argument("--spherical", action="store_true", help="interpolation: add spherical (slerp) paths")
    p.add_argument("--limit", type=_positive_int, help="use the first N test images only (default: all)")
    p.add_argument("--names", nargs="+", help="comparison, kl-profile: one name per run (default: from its objective)")
    p.add_argument("--seed", type=int, default=0, help="seed of prior samples and interpolation pairs")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--data-dir", help="data folder, if not the one the runs were trained with")
    p.set_defaults(func=cmd_plot)
    return parser


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda[:N]")
    p.add_argument("--data-dir", help="data folder, if not the one the run was trained with")


def _add_field_flag(group, section: str, f: dataclasses.Field) -> None:
    flag = "--" + f.name.replace("_", "-")
    dest = f"{section}.{f.name}"
    help_text = FLAG_HELP.get(f.name)
    default = f.default
    kind = _base_type(f.type)
    if kind is bool:
        group.add_argument(f"--no-{f.name.replace('_', '-')}", dest=dest, action="store_false",
                           default=argparse.SUPPRESS, help=f"do not {help_text}" if help_text else None)
    elif kind is tuple:
        group.add_argument(flag, dest=dest, type=_positive_int, nargs="+", default=argparse.SUPPRESS,
                           help=f"{help_text} (default: {' '.join(map(str, default))})")
    else:
        convert = _positive_int if kind is int else kind
        group.add_argument(flag, dest=dest, type=convert, default=argparse.SUPPRESS,
                           help=f"{help_text or ''} (default: {default})".strip())


def _base_type(annotation) -> type:
    """int for 'int | None', tuple for 'tuple[int, ...]', and so on."""
    hint = eval(annotation, vars(typing)) if isinstance(annotation, str) else annotation
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
        origin = typing.get_origin(hint)
    return origin or hint


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def config_from_args(args: argparse.Namespace) -> RunConfig:
    given = {section: {} for section in SECTIONS}
    for key, value in vars(args).items():
        section, _, name = key.partition(".")
        if section in SECTIONS and name:
            given[section][name] = value
    return RunConfig.from_dict(given)


def _given_train_flags(args) -> set[str]:
    return {k for k in vars(args) if "." in k}


# -- commands ----------------------------------------------------------------------------


def cmd_train(args) -> int:
    from .train import train

    if args.resume is not None:
        extra = _given_train_flags(args) - {"train.epochs"}
        if extra:
            raise ValueError(
                f"--resume continues a run with its stored configuration; only --epochs may be given, not "
                + ", ".join("--" + k.split(".")[1].replace("_", "-") for k in sorted(extra))
            )
        config = None
        if "train.epochs" in vars(args):
            from .train import load_config

            stored = load_config(args.resume)
            config = dataclasses.replace(stored, train=dataclasses.replace(stored.train, epochs=vars(args)["train.epochs"]))
        run = train(config, args.resume, resume=True, progress=not args.no_progress)
    else:
        run = train(config_from_args(args), args.out, overwrite=args.overwrite, progress=not args.no_progress)
    print(f"run directory: {run.run_dir}")
    return 0


def _load(args):
    from .train import load_run

    run = load_run(args.run_dir, device=args.device)
    if args.data_dir is not None:
        run.config = dataclasses.replace(run.config, data=dataclasses.replace(run.config.data, data_dir=args.data_dir))
    return run


def _test_images(run, limit=None):
    from .data import binary_test_set, load_data

    data = binary_test_set(load_data(run.config, "test", run.device))
    return data.head(limit).images


def cmd_evaluate(args) -> int:
    from tqdm.auto import tqdm

    from .evaluate import evaluate_model

    run = _load(args)
    images = _test_images(run, args.limit)
    with tqdm(total=images.shape[0], desc="importance sampling", unit="img", disable=args.json or args.num_samples == 0,
              file=sys.stderr) as bar:
        report = evaluate_model(run.vae, images, args.num_samples, args.batch_size, args.seed, progress=bar.update)
    if args.json:
        out = {"run_dir": str(run.run_dir), "epoch": run.epoch, "num_images": images.shape[0]}
        out.update({k: {"mean": e.mean, "stderr": e.stderr} for k, e in report.items()})
        print(json.dumps(out))
    else:
        print(f"{run.run_dir} after {run.epoch} epochs, {images.shape[0]} test images (nats per image, mean +- s.e.)")
        for key, est in report.items():
            print(f"  {key:<16} {est}")
    return 0


def cmd_sample(args) -> int:
    from .plots import save_sample_grid

    run = _load(args)
    path = save_sample_grid(run.vae, args.out or run.run_dir / "samples.png", args.num, args.nrow, args.seed)
    print(f"wrote {path}")
    return 0


def cmd_reconstruct(args) -> int:
    from .plots import save_reconstruction_grid

    run = _load(args)
    images = _test_images(run, args.num)
    path = save_reconstruction_grid(run.vae, images, args.out or run.run_dir / "reconstructions.png", args.nrow)
    print(f"wrote {path}")
    return 0


def cmd_plot(args) -> int:
    """Draw figures of one run (or the comparison of several) from its checkpoint and metrics."""
    from . import plots
    from .data import binary_test_set, load_data
    from .evaluate import active_units, kl_per_dimension
    from .train import load_run, read_metrics

    multi = args.kind in ("comparison", "kl-profile")
    if len(args.run_dirs) > 1 and not multi:
        raise ValueError(f"--kind {args.kind} draws one run, got {len(args.run_dirs)} RUN_DIRs; "
                         "--kind comparison and --kind kl-profile take several")
    runs = []
    for run_dir in args.run_dirs:
        run = load_run(run_dir, device=args.device)
        if args.data_dir is not None:
            run.config = dataclasses.replace(run.config, data=dataclasses.replace(run.config.data, data_dir=args.data_dir))
        runs.append(run)
    run = runs[0]
    test = binary_test_set(load_data(run.config, "test", run.device)).head(args.limit)
    classes = test.classes
    out = args.out if args.out is not None else run.run_dir / "figures"
    written = []
    if multi:
        titles = {"autoencoder": "Autoencoder (reconstruction only)", "kl-only": "KL term only"}
        names = args.names or [
            titles.get(r.config.train.objective, "VAE (ELBO)")
            + (f", beta = {r.config.train.beta:g}" if r.config.train.beta != 1.0 else "")
            + (f", KL warm-up {r.config.train.kl_warmup_epochs} epochs" if r.config.train.kl_warmup_epochs else "")
            for r in runs
        ]
        if len(names) != len(runs):
            raise ValueError(f"--names gives {len(names)} names for {len(runs)} runs")
        if args.kind == "comparison":
            panels = [(name, plots.posterior_means(r.vae, test.images)) for name, r in zip(names, runs)]
            written.append(plots.comparison_figure(panels, test.labels, out / "comparison.png", classes=classes,
                                                   pdf=args.pdf))
        else:
            profiles = [(name, kl_per_dimension(r.vae, test.images), active_units(r.vae, test.images)[1])
                        for name, r in zip(names, runs)]
            written.append(plots.kl_profile_figure(profiles, out / "kl-profile.png", pdf=args.pdf))
    kinds = plots.KINDS if args.kind == "all" else () if multi else (args.kind,)
    vae = run.vae
    for kind in kinds:
        path = out / f"{kind}.png"
        if kind == "latent":
            method = "tsne" if args.tsne else "auto"
            written.append(plots.latent_figure(vae, test.images, test.labels, path, method=method, classes=classes,
                                               seed=args.seed, pdf=args.pdf))
        elif kind == "manifold":
            if vae.z_dim != 2 and args.kind == "all":
                print(f"skipped manifold: it needs z_dim = 2, this run has z_dim = {vae.z_dim}")
                continue
            written.append(plots.manifold_figure(vae, path, pdf=args.pdf))
        elif kind == "samples":
            written.append(plots.samples_figure(vae, path, seed=args.seed, pdf=args.pdf))
        elif kind == "reconstructions":
            written.append(plots.reconstructions_figure(vae, test.images, path, pdf=args.pdf))
        elif kind == "interpolation":
            written.append(plots.interpolation_figure(vae, test.images, test.labels, path, spherical=args.spherical,
                                                      seed=args.seed, pdf=args.pdf))
        elif kind == "dims":
            count, activity = active_units(vae, test.images)
            loc, scale = vae.encode(test.images[:4])
            written.append(plots.dims_figure(loc, scale, kl_per_dimension(vae, test.images), activity, path,
                                             pdf=args.pdf))
            print(f"active units: {count} of {vae.z_dim}")
        elif kind == "curves":
            written.append(plots.curves_figure(read_metrics(run.run_dir), path, pdf=args.pdf))
    for path in written:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
