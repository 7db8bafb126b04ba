"""The figure kinds of ``pyro-vae plot``: the single-run kinds of :data:`FIGURES` and the
multi-run kinds of :data:`COMPARISONS` (both declared in :mod:`pyro_vae.catalog`), each a
:class:`Figure` that knows which views of the program it needs (:mod:`pyro_vae.views`),
so a program that lacks one has that figure skipped with a reason, never a traceback;
:func:`draw_figures` and :func:`draw_comparison` draw them."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .. import views
from ..catalog import COMPARISONS, FIGURES
from ..evaluate import active_units, kl_per_dimension
from ..views import ViewUnavailable, posterior_means
from .comparison import comparison_figure, kl_profile_figure
from .curves import curves_figure
from .decoded import interpolation_figure, manifold_figure, reconstructions_figure, samples_figure
from .latent import dims_figure, latent_figure
from .posterior import posterior_figure


@dataclass(frozen=True)
class Figure:
    """One figure kind: what it needs of the program, and how it is drawn.

    ``draw(program, test, metrics, path, options)``: writes the figure, returns its PNG's path
    (for :data:`COMPARISONS`: ``draw(named_programs, test, path, pdf)``).
    ``view_names``: the views (:mod:`pyro_vae.views`) the program must offer.
    ``check(program, test, metrics)``: any further condition, as a one-line reason it fails, or None.
    """

    draw: Callable[..., Path]
    view_names: tuple[str, ...] = ()
    check: Callable[..., str | None] | None = None
    in_all: bool = True  # drawn by --kind all (False: only when asked for by name)
    # a figure of the families that offer its views (quadrant completion): --kind all draws it for
    # them and says nothing of it for the others
    family_only: bool = False

    def unavailable(self, program, test=None, metrics=None) -> str | None:
        """Why this figure cannot be drawn for ``program`` (one line), or None when it can."""
        reason = views.missing(program, *self.view_names)
        if reason is None and self.check is not None:
            reason = self.check(program, test, metrics)
        return reason


def needs(*view_names: str, check: Callable[..., str | None] | None = None, in_all: bool = True,
          family_only: bool = False):
    """Decorator: a draw function -> a :class:`Figure` needing ``view_names`` (and ``check``)."""

    def wrap(draw) -> Figure:
        return Figure(draw, view_names, check, in_all, family_only)

    return wrap


@dataclass(frozen=True)
class _Options:
    method: str = "auto"
    spherical: bool = False
    seed: int = 0
    pdf: bool = False
    log: Callable[[str], None] = print


def _two_dimensional(program, test, metrics) -> str | None:
    if program.z_dim != 2:
        return f"it needs z_dim = 2, this run has z_dim = {program.z_dim}"
    return None


def _gaussian_posterior_and_prior(program, test, metrics) -> str | None:
    """The KL per dimension is the closed form for a diagonal Gaussian q(z|x) against N(0, I)
    (the ``encode`` view, which a point-mass guide lacks, is checked before this)."""
    if not views.standard_normal_prior(program):
        return f"the KL per dimension needs a N(0, I) prior; {type(program).__name__}'s prior is another"
    return None


def _two_images(program, test, metrics) -> str | None:
    return None if test.images.shape[0] >= 2 else "it needs at least two test images"


def _has_metrics(program, test, metrics) -> str | None:
    return None if metrics else "the run has no metrics yet (it has not finished an epoch)"


@needs("posterior_mean")
def _draw_latent(program, test, metrics, path, opt: _Options) -> Path:
    return latent_figure(program, test.images, test.labels, path, method=opt.method, classes=test.classes,
                         seed=opt.seed, pdf=opt.pdf)


@needs("z_dim", "image_shape", "decode", check=_two_dimensional)
def _draw_manifold(program, test, metrics, path, opt: _Options) -> Path:
    return manifold_figure(program, path, seed=opt.seed, pdf=opt.pdf, label=views.labels_for(test.labels, 0))


@needs("sample_prior", "decode")
def _draw_samples(program, test, metrics, path, opt: _Options) -> Path:
    return samples_figure(program, path, seed=opt.seed, pdf=opt.pdf, labels=test.labels)


@needs("image_shape", "posterior_mean", "decode")
def _draw_reconstructions(program, test, metrics, path, opt: _Options) -> Path:
    return reconstructions_figure(program, test.images, path, pdf=opt.pdf, labels=test.labels)


@needs("image_shape", "posterior_mean", "decode", check=_two_images)
def _draw_interpolation(program, test, metrics, path, opt: _Options) -> Path:
    return interpolation_figure(program, test.images, test.labels, path, spherical=opt.spherical, seed=opt.seed,
                                pdf=opt.pdf)


@needs("z_dim", "posterior_mean", "encode", check=_gaussian_posterior_and_prior)
def _draw_dims(program, test, metrics, path, opt: _Options) -> Path:
    kl = kl_per_dimension(program, test.images, labels=test.labels)
    count, activity = active_units(program, test.images, labels=test.labels)
    with torch.no_grad():
        loc, scale = views.call(program, "encode", test.images[:4], y=views.labels_for(test.labels, slice(0, 4)))
    opt.log(f"active units: {count} of {program.z_dim}")
    return dims_figure(loc, scale, kl, activity, path, pdf=opt.pdf)


@needs(check=_has_metrics)
def _draw_curves(program, test, metrics, path, opt: _Options) -> Path:
    density = not getattr(program, "binary_data", True)
    return curves_figure(metrics, path, density=density, pdf=opt.pdf)


@needs("num_classes", "image_shape", "posterior_mean", "decode", family_only=True)
def _draw_analogies(program, test, metrics, path, opt: _Options) -> Path:
    from .analogies import analogies_figure

    return analogies_figure(program, test.images, test.labels, path, seed=opt.seed, classes=test.classes,
                            pdf=opt.pdf)


@needs("z_dim", "local_family", check=_two_dimensional, in_all=False)
def _draw_posterior(program, test, metrics, path, opt: _Options) -> Path:
    return posterior_figure(program, test.images, path, seed=opt.seed, pdf=opt.pdf, log=opt.log, labels=test.labels)


def draw_figures(
    kinds: Sequence[str],
    program,
    test,
    metrics: Sequence[dict],
    out: str | Path,
    *,
    method: str = "auto",
    spherical: bool = False,
    seed: int = 0,
    pdf: bool = False,
    log: Callable[[str], None] = print,
) -> list[Path]:
    """Draw the single-run figures ``kinds`` of one trained program into ``out/<kind>.png``.

    This is ``pyro-vae plot RUN --kind KIND`` for every kind in :data:`FIGURES`: the CLI
    loads the run and its test set, then calls
    ``draw_figures([args.kind], run.program, test, read_metrics(run.run_dir), out, ...)``.

    :param kinds: names registered in :data:`FIGURES`, or ``["all"]`` for every one of them.
    :param program: the trained program; each figure asks it for the views it needs
        (:mod:`pyro_vae.views`).
    :param test: a :class:`pyro_vae.data.ImageData` (``.images``, ``.labels`` or None,
        ``.classes`` or None) on the program's device, as the program scores it.
    :param metrics: the run's per-epoch records (``metrics.jsonl``), for ``curves``.
    :param method: the latent figure's projection beyond 2-D: ``"auto"`` (PCA) or ``"tsne"``.
    :param spherical: the interpolation figure adds a panel of slerp paths.
    :param log: where one-line notes go: ``skipped <kind>: <reason>`` under ``"all"``
        for a figure this program cannot draw, and ``active units: K of Z`` from ``dims``.
    :returns: the PNGs written (a PDF beside each when ``pdf``).
    :raises pyro_vae.views.ViewUnavailable: a kind asked for by name cannot be drawn for
        this program; nothing is drawn then.
    :raises ValueError: an unknown kind, or a multi-run kind (use :func:`draw_comparison`).
    """
    every = "all" in kinds
    names = [n for n in FIGURES.names() if FIGURES[n].in_all] if every else list(dict.fromkeys(kinds))
    for name in names:
        if name in COMPARISONS:
            raise ValueError(f"{name!r} compares several runs; draw it with draw_comparison")
        FIGURES.check(name, "figure kind")
    todo = []
    for name in names:
        figure = FIGURES[name]
        reason = figure.unavailable(program, test, metrics)
        if reason is None:
            todo.append(name)
        elif every:
            if not (figure.family_only and views.missing(program, *figure.view_names)):
                log(f"skipped {name}: {reason}")
        else:
            raise ViewUnavailable(f"cannot draw {name}: {reason}")
    options = _Options(method=method, spherical=spherical, seed=seed, pdf=pdf, log=log)
    out = Path(out)
    return [FIGURES[name].draw(program, test, metrics, out / f"{name}.png", options) for name in todo]


@needs("z_dim", "posterior_mean", check=_two_dimensional)
def _draw_comparison(named_programs, test, path, pdf) -> Path:
    panels = [(name, posterior_means(program, test.images, labels=test.labels)) for name, program in named_programs]
    circles = all(views.standard_normal_prior(program) for _, program in named_programs)
    return comparison_figure(panels, test.labels, path, classes=test.classes, prior_circles=circles, pdf=pdf)


@needs("z_dim", "posterior_mean", "encode", check=_gaussian_posterior_and_prior)
def _draw_kl_profile(named_programs, test, path, pdf) -> Path:
    profiles = [(name, kl_per_dimension(program, test.images, labels=test.labels),
                 active_units(program, test.images, labels=test.labels)[1])
                for name, program in named_programs]
    return kl_profile_figure(profiles, path, pdf=pdf)


def draw_comparison(kind: str, named_programs: Sequence[tuple[str, object]], test, out: str | Path, *,
                    pdf: bool = False) -> Path:
    """Draw the multi-run figure ``kind`` (:data:`COMPARISONS`) of several programs into ``out/<kind>.png``.

    This is ``pyro-vae plot RUN1 RUN2 ... --kind comparison|kl-profile``: the CLI loads the
    runs and the first run's test set, names them (``--names``, else
    :func:`default_run_name` of each run's configuration), then calls
    ``draw_comparison(args.kind, [(name, run.program), ...], test, out, pdf=args.pdf)``.

    :param named_programs: ``(name, program)`` per run, in legend / panel order.
    :param test: a :class:`pyro_vae.data.ImageData`, the same images for every run.
    :raises pyro_vae.views.ViewUnavailable: a program lacks what ``kind`` needs (the
        message names the run).
    :raises ValueError: an unknown kind, or no programs.
    """
    COMPARISONS.check(kind, "comparison kind")
    if not named_programs:
        raise ValueError(f"{kind} needs at least one run")
    figure = COMPARISONS[kind]
    for name, program in named_programs:
        reason = figure.unavailable(program, test)
        if reason is not None:
            raise ViewUnavailable(f"cannot draw {kind} of run {name!r}: {reason}")
    return figure.draw(list(named_programs), test, Path(out) / f"{kind}.png", pdf)
