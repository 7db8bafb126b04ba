r"""Figures from trained programs and their metrics. Plots read programs and results; they never train.

Three layers live here:

* array helpers (:func:`pca`, :func:`tsne`, :func:`manifold_grid`, :func:`interpolate`,
  :func:`interpolation_pairs`, ...) that compute what a figure shows, testable on their own;
* figure functions (``*_figure``), each taking a program's views and/or arrays and an
  output path, writing a PNG (and a PDF beside it when ``pdf=True``) and returning the PNG's path;
* the registries :data:`FIGURES` (one run) and :data:`COMPARISONS` (several runs), with
  :func:`draw_figures` and :func:`draw_comparison`, which ``pyro-vae plot`` calls: each
  kind knows which views of the program it needs (:mod:`pyro_vae.views`), so a program
  that lacks one has that figure skipped with a reason, never a traceback.

Figures ask the program for views (``posterior_mean``, ``decode``, ``sample_prior``, ...),
never for a VAE's internals, and draw images of any shape ``(C, H, W)`` at their own
aspect ratio. Every figure has a fixed size in inches (:data:`FIGSIZE`) drawn at
:data:`DPI`, so its pixel size is known in advance. Matplotlib runs on the
non-interactive Agg backend. The torchvision grids (:func:`save_sample_grid`,
:func:`save_reconstruction_grid`) stay for ``pyro-vae sample`` and ``pyro-vae reconstruct``.
"""

from __future__ import annotations

import importlib
import io
import itertools
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image

from . import views
from .catalog import COMPARISONS, FIGURES
from .evaluate import active_units, kl_per_dimension
from .rng import forked_rng
from .views import ViewUnavailable, posterior_means


class _OnFirstUse:
    """A module imported when one of its names is first used. matplotlib's pyplot takes
    about 0.35 s to import; ``pyro-vae sample`` and ``reconstruct`` and TensorBoard's images
    (:mod:`pyro_vae.callbacks`) import this module and draw no matplotlib figure."""

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str):
        module = sys.modules.get(self._name)
        if module is None:
            if "matplotlib.pyplot" not in sys.modules:
                import matplotlib

                matplotlib.use("Agg")  # files only, never a window (a session's own pyplot is left alone)
            module = importlib.import_module(self._name)
        return getattr(module, attr)


plt = _OnFirstUse("matplotlib.pyplot")
mcolors = _OnFirstUse("matplotlib.colors")
mpatches = _OnFirstUse("matplotlib.patches")
mticker = _OnFirstUse("matplotlib.ticker")


def make_grid(*args, **kwargs) -> torch.Tensor:
    """``torchvision.utils.make_grid``, imported on first use: torchvision takes seconds to
    import (its models import ``torch._dynamo``), which figures without image grids and
    TensorBoard's images (:mod:`pyro_vae.callbacks`) need not pay."""
    from torchvision.utils import make_grid as grid

    return grid(*args, **kwargs)


def save_image(*args, **kwargs) -> None:
    """``torchvision.utils.save_image``, imported on first use (see :func:`make_grid`)."""
    from torchvision.utils import save_image as save

    save(*args, **kwargs)


DPI = 100
FIGSIZE = {  # inches; pixel size = FIGSIZE * DPI
    "latent": (7.0, 6.0),
    "manifold": (8.0, 8.4),
    "samples": (6.0, 6.4),
    "reconstructions": (8.0, 4.3),
    "interpolation": (9.0, 3.2),  # per panel (linear, and spherical when asked)
    "dims": (9.0, 8.0),
    "curves": (12.0, 4.0),
    "comparison": (5.0, 5.2),  # per panel
    "kl-profile": (12.0, 5.0),
    "posterior": (3.6, 4.0),  # per panel (one test image each)
}
PAD_VALUE = 1.0  # white lines between the images of a grid: they stand out from grey images and black backgrounds
PRIOR_DRAWS = 10_000  # prior samples behind the manifold's grid when the prior is not N(0, I)


# -- what the figures show -------------------------------------------------------------


@torch.no_grad()
def prior_samples(program, num: int, seed: int = 0, labels: torch.Tensor | None = None) -> torch.Tensor:
    """E[x|z] for ``num`` draws z ~ p(z) (the ``sample_prior`` view): images ``(num, *image_shape)``.
    A conditional program decodes draw i with ``labels[i]`` (the labels are cycled)."""
    views.require(program, "sample_prior", "decode", purpose="samples from the prior")
    with forked_rng(seed):
        z = program.sample_prior(num)
    y = None if labels is None else labels[torch.arange(num, device=labels.device) % labels.shape[0]]
    return views.call(program, "decode", z, y=y)


@torch.no_grad()
def reconstructions(program, images: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
    """E[x|z] at the posterior mean z = E_q[z|x], the usual picture of a reconstruction."""
    views.require(program, "posterior_mean", "decode", purpose="reconstructions")
    return views.call(program, "decode", views.call(program, "posterior_mean", images, y=labels), y=labels)


def pca(z: torch.Tensor, k: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Project rows of ``z`` (N, D) onto their first ``k`` principal components.

    Returns ``(projected (N, k), explained (k,))`` where ``explained`` is each component's
    share of the total variance. Computed by an exact SVD of the centred data; each
    component's sign is fixed (largest loading positive) so the picture is reproducible.
    """
    if z.dim() != 2:
        raise ValueError(f"pca expects an (N, D) matrix, got shape {tuple(z.shape)}")
    k = min(k, z.shape[1])
    centred = z.double() - z.double().mean(0)
    _, s, vh = torch.linalg.svd(centred, full_matrices=False)
    comps = vh[:k]
    signs = torch.sign(comps.gather(1, comps.abs().argmax(1, keepdim=True)))
    comps = comps * signs
    var = s**2
    explained = var[:k] / var.sum().clamp_min(torch.finfo(var.dtype).tiny)
    return (centred @ comps.T).to(z.dtype), explained.to(z.dtype)


def tsne(z: torch.Tensor, seed: int = 0, perplexity: float = 30.0) -> torch.Tensor:
    """A 2-D t-SNE embedding of rows of ``z`` (van der Maaten & Hinton, 2008), via scikit-learn.

    scikit-learn is an optional dependency, used only here.
    """
    try:
        from sklearn.manifold import TSNE
    except ImportError:
        raise ImportError(
            "t-SNE needs scikit-learn, which is not installed; install it (pip install scikit-learn) "
            "or use the default PCA projection (drop --tsne)"
        ) from None
    perplexity = min(perplexity, max(1.0, (z.shape[0] - 1) / 3))
    out = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        z.detach().cpu().double().numpy()
    )
    return torch.from_numpy(out)


def project_latents(z: torch.Tensor, method: str = "auto", seed: int = 0) -> tuple[torch.Tensor, tuple[str, str]]:
    """2-D coordinates of latent codes and their axis labels.

    ``method``: ``"auto"`` (the codes themselves when z_dim <= 2, else PCA), ``"direct"``,
    ``"pca"`` or ``"tsne"``.
    """
    if method == "auto":
        method = "direct" if z.shape[1] <= 2 else "pca"
    if method == "direct":
        if z.shape[1] > 2:
            raise ValueError(f"cannot plot {z.shape[1]}-D codes directly; project them with 'pca' or 'tsne'")
        if z.shape[1] == 1:
            return torch.cat([z, torch.zeros_like(z)], 1), ("$z_1$", "(z_dim = 1)")
        return z, ("$z_1$", "$z_2$")
    if method == "pca":
        proj, explained = pca(z, 2)
        if proj.shape[1] == 1:
            proj = torch.cat([proj, torch.zeros_like(proj)], 1)
            explained = torch.cat([explained, explained.new_zeros(1)])
        return proj, tuple(f"PC {i + 1} ({100 * float(e):.0f}% of variance)" for i, e in enumerate(explained))
    if method == "tsne":
        return tsne(z, seed), ("t-SNE 1", "t-SNE 2")
    raise ValueError(f"unknown projection {method!r}; choose 'auto', 'direct', 'pca' or 'tsne'")


def manifold_grid(n: int = 20, q1: torch.Tensor | None = None, q2: torch.Tensor | None = None) -> torch.Tensor:
    r"""Latent points ``(n * n, 2)`` on a grid, by default at the Gaussian quantiles ``Phi^{-1}((i + 1/2) / n)``.

    Equal steps in probability mass, so each grid cell holds the same prior mass and the
    grid covers the prior's bulk without running into its tails. ``q1`` and ``q2``
    (increasing, ``(n,)`` each) replace the quantiles of ``z_1`` and ``z_2``, e.g. by those
    of another prior. Row-major from the top: row ``r`` has ``z_2`` decreasing with ``r``
    (so larger ``z_2`` is drawn higher up), column ``c`` has ``z_1`` increasing with ``c``.
    """
    q = torch.distributions.Normal(0.0, 1.0).icdf((torch.arange(n, dtype=torch.float64) + 0.5) / n).float()
    q1 = q if q1 is None else q1
    q2 = q if q2 is None else q2
    z2, z1 = torch.meshgrid(q2.flip(0), q1, indexing="ij")
    return torch.stack([z1.reshape(-1), z2.reshape(-1)], 1)


def prior_quantiles(program, n: int, seed: int = 0) -> tuple[torch.Tensor, str]:
    """The manifold's grid for ``program``: ``(z (n * n, 2), what the axes are)``.

    Under a N(0, I) prior, the exact Gaussian quantiles. Under another prior with the
    ``sample_prior`` view, each axis's empirical quantiles at ``(i + 1/2) / n`` of
    :data:`PRIOR_DRAWS` draws, so the grid covers that prior's bulk (a mixture's
    components sit wherever the prior puts them). Without either, the N(0, 1) quantiles,
    labelled as such.
    """
    if views.standard_normal_prior(program):
        return manifold_grid(n), "Gaussian quantiles"
    if views.missing(program, "sample_prior") is None:
        with forked_rng(seed), torch.no_grad():
            draws = program.sample_prior(PRIOR_DRAWS).detach().double().cpu()
        levels = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        q1, q2 = (torch.quantile(draws[:, d], levels).float() for d in (0, 1))
        return manifold_grid(n, q1, q2), f"prior quantiles, from {PRIOR_DRAWS:,} draws"
    return manifold_grid(n), "N(0, 1) quantiles"


def interpolate(z_a: torch.Tensor, z_b: torch.Tensor, steps: int, spherical: bool = False) -> torch.Tensor:
    r"""``steps`` points from ``z_a`` to ``z_b`` (both ends included): ``(steps, z_dim)``.

    Linear: ``(1 - t) z_a + t z_b``. Spherical (slerp, Shoemake 1985):
    ``sin((1 - t) w) / sin(w) z_a + sin(t w) / sin(w) z_b`` with ``w`` the angle between the
    two; under a Gaussian prior it keeps the norm of the path near the norms of its ends,
    where linear paths pass through the low-norm middle that prior samples rarely visit.
    """
    t = torch.linspace(0.0, 1.0, steps, dtype=z_a.dtype, device=z_a.device).unsqueeze(1)
    if not spherical:
        return (1 - t) * z_a + t * z_b
    cos = torch.dot(z_a, z_b) / (z_a.norm() * z_b.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    if float(omega.sin()) < 1e-6:  # (anti)parallel ends: slerp is undefined, use the line
        return (1 - t) * z_a + t * z_b
    return (torch.sin((1 - t) * omega) * z_a + torch.sin(t * omega) * z_b) / omega.sin()


def interpolation_pairs(labels: torch.Tensor | None, num_pairs: int, n: int, seed: int = 0) -> list[tuple[int, int]]:
    """``num_pairs`` index pairs of test images, no image twice: of different classes when
    labels are known, else any two images of a seeded random order."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen).tolist()
    pairs, used = [], set()
    for i in order:
        if len(pairs) == num_pairs:
            break
        if i in used:
            continue
        for j in order:
            if j != i and j not in used and (labels is None or int(labels[i]) != int(labels[j])):
                pairs.append((i, j))
                used.update((i, j))
                break
    return pairs


# -- figures ---------------------------------------------------------------------------


def latent_figure(
    program,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    path: str | Path,
    *,
    method: str = "auto",
    classes: Sequence[str] | None = None,
    title: str | None = None,
    seed: int = 0,
    pdf: bool = False,
) -> Path:
    """Posterior means E_q[z|x] of ``images`` scattered in 2-D, coloured by class when ``labels`` are given.

    With 2-D codes drawn directly under a N(0, I) prior, the prior's 1- and 2-sigma
    circles are drawn as a yardstick.
    """
    codes = posterior_means(program, images, labels=labels).cpu()
    xy, axis_labels = project_latents(codes, method, seed)
    fig, ax = plt.subplots(figsize=FIGSIZE["latent"], layout="constrained")
    direct = codes.shape[1] <= 2 and method in ("auto", "direct")
    circles = direct and codes.shape[1] == 2 and views.standard_normal_prior(program)
    scatter = _scatter_codes(ax, xy, labels, axis_labels, prior_circles=circles)
    how = "" if direct else {"pca": ", PCA", "auto": ", PCA", "tsne": ", t-SNE"}.get(method, "")
    lines = [f"Posterior means $E_q[z|x]$ of {len(codes)} test images (z_dim = {codes.shape[1]}{how})"]
    notes = (["no class labels, so one colour"] if labels is None else []) + (
        ["dashed: the prior's 1 and 2 sigma"] if circles else [])
    ax.set_title(title or "\n".join(lines + (["; ".join(notes)] if notes else [])), fontsize=11)
    _class_colorbar(fig, scatter, ax, labels, classes)
    return _save(fig, path, pdf)


def manifold_figure(program, path: str | Path, *, n: int = 20, seed: int = 0, title: str | None = None,
                    pdf: bool = False, label: torch.Tensor | None = None) -> Path:
    """For z_dim = 2: the decoder mean E[x|z] at ``n x n`` latent points at prior quantiles
    (:func:`prior_quantiles`), each image at its own aspect ratio. A conditional program
    decodes every point with the one ``label`` (0-dim)."""
    views.require(program, "z_dim", "image_shape", "decode", purpose="the manifold figure")
    if program.z_dim != 2:
        raise ViewUnavailable(f"the manifold figure needs z_dim = 2; this program has z_dim = {program.z_dim}")
    z, how = prior_quantiles(program, n, seed)
    device, dtype = _tensor_home(program)
    with torch.no_grad():
        y = None if label is None else label.expand(z.shape[0])
        images = views.call(program, "decode", z.to(device, dtype), y=y).float().cpu()
    c, h, w = program.image_shape
    grid = images.reshape(n, n, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, n * h, n * w)
    fig, ax = plt.subplots(figsize=FIGSIZE["manifold"], layout="constrained")
    _imshow(ax, grid)
    step = max(1, n // 5)
    ticks = list(range(0, n, step)) + ([n - 1] if (n - 1) % step else [])
    ax.set_xticks([(i + 0.5) * w for i in ticks], [f"{float(z[i, 0]):.2f}" for i in ticks])  # z_1 along a row
    ax.set_yticks([(i + 0.5) * h for i in ticks], [f"{float(z[i * n, 1]):.2f}" for i in ticks])  # z_2 down a column
    ax.set_xlabel(f"$z_1$ ({how})")
    ax.set_ylabel(f"$z_2$ ({how})")
    ax.set_title(title or f"Decoder mean $E[x|z]$ over a {n}x{n} grid of $z$ at prior quantiles")
    return _save(fig, path, pdf)


def samples_figure(program, path: str | Path, *, num: int = 64, nrow: int = 8, seed: int = 0,
                   title: str | None = None, pdf: bool = False, labels: torch.Tensor | None = None) -> Path:
    """Images E[x|z] decoded from ``num`` prior draws z ~ p(z) (with ``labels``, for a
    conditional program: draw i decoded with label i, cycled)."""
    images = prior_samples(program, num, seed, labels).float().cpu()
    fig, ax = plt.subplots(figsize=FIGSIZE["samples"], layout="constrained")
    _imshow(ax, make_grid(images, nrow=nrow, padding=2, pad_value=PAD_VALUE))
    ax.set_axis_off()
    prior = "N(0, I)" if views.standard_normal_prior(program) else "p(z)"
    ax.set_title(title or f"$E[x|z]$ for {num} samples $z \\sim {prior}${_z_dim_note(program)}")
    return _save(fig, path, pdf)


def reconstructions_figure(program, images: torch.Tensor, path: str | Path, *, nrow: int = 12, rows: int = 3,
                           title: str | None = None, pdf: bool = False, labels: torch.Tensor | None = None) -> Path:
    """Test images, each row above a row of their reconstructions E[x | z = E_q[z|x]]."""
    views.require(program, "image_shape", purpose="the reconstructions figure")
    num = min(nrow * rows, images.shape[0])
    nrow = min(nrow, num)
    images = images[: num - num % nrow]
    recon = reconstructions(program, images, views.labels_for(labels, slice(0, images.shape[0]))).float().cpu()
    images = images.reshape(-1, *program.image_shape).float().cpu()
    stacked = []
    for s in range(0, images.shape[0], nrow):
        stacked += [images[s : s + nrow], recon[s : s + nrow]]
    grid = make_grid(torch.cat(stacked), nrow=nrow, padding=2, pad_value=PAD_VALUE)
    fig, ax = plt.subplots(figsize=FIGSIZE["reconstructions"], layout="constrained")
    _imshow(ax, grid)
    h = program.image_shape[1] + 2
    n_rows = 2 * (images.shape[0] // nrow)
    ax.set_yticks([(r + 0.5) * h for r in range(n_rows)], ["test $x$", "recon."] * (n_rows // 2))
    ax.set_xticks([])
    ax.tick_params(length=0)
    ax.set_title(title or "Test images above their reconstructions $E[x \\mid z = E_q[z|x]]$")
    return _save(fig, path, pdf)


def interpolation_figure(
    program,
    images: torch.Tensor,
    labels: torch.Tensor | None,
    path: str | Path,
    *,
    num_pairs: int = 4,
    steps: int = 10,
    spherical: bool = False,
    seed: int = 0,
    title: str | None = None,
    pdf: bool = False,
) -> Path:
    """Decoded paths between the posterior means of pairs of test images.

    Each row: test image ``x_a``, ``steps`` decoded points from ``E_q[z|x_a]`` to
    ``E_q[z|x_b]``, test image ``x_b``. Pairs join different classes when ``labels`` are
    given, else random pairs (:func:`interpolation_pairs`). With ``spherical=True`` a
    second panel shows the slerp paths.
    """
    views.require(program, "image_shape", "posterior_mean", "decode", purpose="the interpolation figure")
    pairs = interpolation_pairs(labels, num_pairs, images.shape[0], seed)
    if not pairs:
        raise ValueError("interpolation needs at least two test images (of different classes when labelled)")
    modes = [False, True] if spherical else [False]
    fig, axes = plt.subplots(len(modes), 1, figsize=figure_size("interpolation", len(modes)), layout="constrained",
                             squeeze=False)
    for ax, sph in zip(axes[:, 0], modes):
        rows = []
        for i, j in pairs:
            with torch.no_grad():
                loc = views.call(program, "posterior_mean", images[[i, j]], y=views.labels_for(labels, [i, j]))
                codes = interpolate(loc[0], loc[1], steps, sph)  # decoded with x_a's label, when it takes one
                path_images = views.call(program, "decode", codes,
                                         y=views.labels_for(labels, i, codes.shape[0])).float().cpu()
            ends = images[[i, j]].reshape(2, *program.image_shape).float().cpu()
            rows.append(torch.cat([ends[:1], path_images, ends[1:]]))
        _imshow(ax, make_grid(torch.cat(rows), nrow=steps + 2, padding=2, pad_value=PAD_VALUE))
        w = program.image_shape[2] + 2
        names = ["$x_a$"] + [f"{t:.1f}" if k in (0, steps - 1) or steps <= 6 else "" for k, t in
                             enumerate(np.linspace(0, 1, steps))] + ["$x_b$"]
        ax.set_xticks([(k + 0.5) * w for k in range(steps + 2)], names)
        ax.set_yticks([])
        ax.tick_params(length=0)
        kind = "spherical (slerp)" if sph else "linear"
        ax.set_xlabel(f"{kind} path from $E_q[z|x_a]$ (t = 0) to $E_q[z|x_b]$ (t = 1), decoded")
    chosen = "of different classes" if labels is not None else "chosen at random (no labels)"
    axes[0, 0].set_title(title or f"Latent interpolation between {len(pairs)} pairs of test images {chosen}")
    return _save(fig, path, pdf)


def dims_figure(
    loc: torch.Tensor,
    scale: torch.Tensor,
    kl: torch.Tensor,
    activity: torch.Tensor,
    path: str | Path,
    *,
    threshold: float = 0.01,
    title: str | None = None,
    pdf: bool = False,
) -> Path:
    """Which latent dimensions are used.

    Top: for a few images (rows of ``loc``/``scale``, each ``(n, z_dim)``), every
    dimension's posterior mean +- scale against the prior N(0, 1) (grey band: +-1).
    Middle: ``kl`` (z_dim,), the KL per dimension averaged over the test set.
    Bottom: ``activity`` (z_dim,), Var_x E_q[z_d|x], on a log scale against ``threshold``.
    """
    loc, scale, kl, activity = (t.detach().double().cpu().numpy() for t in (loc, scale, kl, activity))
    d = np.arange(1, kl.shape[0] + 1)
    active = activity > threshold
    fig, (ax0, ax1, ax2) = plt.subplots(3, 1, figsize=FIGSIZE["dims"], layout="constrained", sharex=True)
    ax0.axhspan(-1, 1, color="0.88", label="prior N(0, 1): $\\pm 1$")
    ax0.axhline(0, color="0.6", lw=0.8)
    offsets = np.linspace(-0.25, 0.25, loc.shape[0]) if loc.shape[0] > 1 else [0.0]
    for k in range(loc.shape[0]):
        ax0.errorbar(d + offsets[k], loc[k], yerr=scale[k], fmt="o", ms=3, capsize=2, lw=1,
                     label=f"test image {k + 1}")
    ax0.set_ylabel("posterior loc $\\pm$ scale")
    ax0.set_title("$q(z_d|x)$ for a few test images against the prior N(0, 1)")
    ax0.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    bar_colors = np.where(active, "tab:blue", "tab:gray")
    width = 0.8 if len(d) > 4 else 0.4
    ax1.bar(d, kl, color=bar_colors, width=width)
    ax1.set_ylabel("KL (nats / image)")
    ax1.set_title(f"KL$(q(z_d|x)\\,\\|\\,p(z_d))$ per dimension, test-set mean (total {kl.sum():.1f} nats)")
    ax2.bar(d, np.maximum(activity, 1e-12), color=bar_colors, width=width)
    ax2.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold:g}")
    ax2.set_yscale("log")
    ax2.set_ylabel("Var$_x\\, E_q[z_d|x]$")
    ax2.set_xlabel("latent dimension $d$")
    ax2.set_title(f"Activity: {int(active.sum())} of {len(d)} units active (blue; Burda et al., 2015)")
    ax2.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    if len(d) <= 20:
        ax2.set_xticks(d)
    if title:
        fig.suptitle(title)
    return _save(fig, path, pdf)


def curves_figure(records: Sequence[dict], path: str | Path, *, density: bool = False, title: str | None = None,
                  pdf: bool = False) -> Path:
    """ELBO, expected log-likelihood and KL per epoch, train and test, from metrics.jsonl lines.

    Draws every series the records hold: ``{train,test}_{elbo,log_lik,kl}`` and, when
    the training objective differs from the ELBO (beta != 1, annealing, baselines),
    ``train_objective`` beside the ELBO and the KL weight on the KL panel. A run with no
    ELBO (a point-mass guide) leaves the panels it has no series for empty, saying so.
    ``density``: the likelihood is a density over grey pixels (not a probability of binary
    ones), so the ELBO and log-likelihood are log-densities, which may well be positive;
    the axes follow the data either way.
    """
    if not records:
        raise ValueError("no metrics to plot: the run has not finished an epoch")
    epochs = [r["epoch"] for r in records]
    fig, axes = plt.subplots(1, 3, figsize=FIGSIZE["curves"], layout="constrained")
    panels = [("elbo", "ELBO"), ("log_lik", "$E_q[\\log p(x|z)]$"), ("kl", "KL$(q(z|x)\\,\\|\\,p(z))$")]
    style = {"train": dict(color="tab:blue", marker="o"), "test": dict(color="tab:orange", marker="s")}
    for ax, (key, name) in zip(axes, panels):
        for split in ("train", "test"):
            series = [r.get(f"{split}_{key}") for r in records]
            if any(v is not None for v in series):
                ax.plot(epochs, _nan(series), ms=3, label=split, **style[split])
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("log-density, nats per image" if density and key != "kl" else "nats per image")
        ax.grid(alpha=0.3)
    objective = [r.get("train_objective") for r in records]
    weights = [r.get("kl_weight") for r in records]
    if any(v is not None for v in objective) and any(w is not None and w != 1.0 for w in weights):
        axes[0].plot(epochs, _nan(objective), color="tab:green", ls="--", marker=".", label="train objective")
    legend_axes = list(axes)
    if any(w is not None for w in weights) and len(set(weights)) > 1:
        twin = axes[2].twinx()
        twin.plot(epochs, _nan(weights), color="tab:gray", ls=":", label="KL weight (right axis)")
        twin.set_ylabel("KL weight", color="tab:gray")
        twin.set_ylim(bottom=0)
        legend_axes.append(twin)
    for ax in axes:
        if not ax.get_lines():  # the autoencoder has no KL and so no ELBO
            ax.text(0.5, 0.5, "not reported for this run\n(no ELBO: the guide is a point mass)", ha="center",
                    va="center", transform=ax.transAxes, color="0.4")
            ax.set_xticks([])
            ax.set_yticks([])
        else:
            ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
    _figure_legend(fig, legend_axes)
    fig.suptitle(title or "Per-epoch metrics (higher ELBO and log-likelihood are better)")
    return _save(fig, path, pdf)


def comparison_figure(
    panels: Sequence[tuple[str, torch.Tensor]],
    labels: torch.Tensor | None,
    path: str | Path,
    *,
    classes: Sequence[str] | None = None,
    prior_circles: bool = True,
    title: str | None = None,
    pdf: bool = False,
) -> Path:
    """Side-by-side 2-D latent spaces, e.g. autoencoder vs KL-only vs VAE.

    ``panels``: ``(name, codes (N, 2))`` pairs, codes of the same images in every panel.
    Each panel has its own scale (the AE's codes can be orders of magnitude wider than the
    prior); with ``prior_circles`` (every run's prior is N(0, I)) every panel draws the
    prior's 1- and 2-sigma circles as the common yardstick.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=figure_size("comparison", len(panels)), layout="constrained",
                             squeeze=False)
    scatter = None
    for ax, (name, codes) in zip(axes[0], panels):
        codes = codes.detach().cpu()
        if codes.shape[1] != 2:
            raise ValueError(f"the comparison figure needs 2-D latent codes; {name!r} has {codes.shape[1]} dimensions")
        scatter = _scatter_codes(ax, codes, labels, ("$z_1$", "$z_2$"), prior_circles=prior_circles)
        spread = codes.double().std(0)
        ax.set_title(f"{name}\nstd of codes: {float(spread[0]):.3g}, {float(spread[1]):.3g}", fontsize=10)
    _class_colorbar(fig, scatter, axes[0].tolist(), labels, classes)
    notes = (["no class labels, so one colour"] if labels is None else []) + (
        ["dashed: the prior's 1 and 2 sigma"] if prior_circles else [])
    lines = ["Posterior means of the same test images"] + (["; ".join(notes)] if notes else [])
    fig.suptitle(title or "\n".join(lines))
    return _save(fig, path, pdf)


def kl_profile_figure(
    profiles: Sequence[tuple[str, torch.Tensor, torch.Tensor]],
    path: str | Path,
    *,
    threshold: float = 0.01,
    title: str | None = None,
    pdf: bool = False,
) -> Path:
    """How many latent dimensions each run uses: the signature of posterior collapse.

    ``profiles``: ``(name, kl (z_dim,), activity (z_dim,))`` per run, as returned by
    :func:`pyro_vae.evaluate.kl_per_dimension` and :func:`pyro_vae.evaluate.active_units`.
    Left: KL per dimension sorted from largest to smallest. Right: activity
    Var_x E_q[z_d|x], sorted, against ``threshold``. Both on log scales, where a
    collapsed dimension shows as a drop of several orders of magnitude.
    """
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=FIGSIZE["kl-profile"], layout="constrained")
    floor = 1e-6  # collapsed dimensions can reach 0 to rounding; keep them on the log axis
    for name, kl, activity in profiles:
        kl = kl.detach().double().cpu().numpy()
        activity = activity.detach().double().cpu().numpy()
        rank = np.arange(1, len(kl) + 1)
        label = f"{name}: {int((activity > threshold).sum())} active, KL {kl.sum():.1f}"
        (line,) = ax0.plot(rank, np.maximum(np.sort(kl)[::-1], floor), marker=".", label=label)
        ax1.plot(rank, np.maximum(np.sort(activity)[::-1], floor), marker=".", color=line.get_color())
    ax1.axhline(threshold, color="tab:red", ls="--", lw=1, label=f"activity threshold {threshold:g}")
    for ax in (ax0, ax1):
        ax.set_yscale("log")
        ax.set_xlabel("latent dimensions, sorted (largest first)")
        ax.grid(alpha=0.3)
    ax0.set_ylabel("KL$(q(z_d|x)\\,\\|\\,p(z_d))$, nats / image")
    ax0.set_title("KL per dimension (test-set mean)")
    ax1.set_ylabel("Var$_x\\, E_q[z_d|x]$")
    ax1.set_title("Activity per dimension (Burda et al., 2015)")
    _figure_legend(fig, [ax0, ax1], ncol=3)
    if title:
        fig.suptitle(title)
    return _save(fig, path, pdf)


# -- the figure kinds of `pyro-vae plot` ------------------------------------------------------

def posterior_figure(program, images: torch.Tensor, path: str | Path, *, num_images: int = 4,
                     nuts_samples: int = 1000, warmup: int = 500, seed: int = 0, pdf: bool = False,
                     log: Callable[[str], None] = print, labels: torch.Tensor | None = None) -> Path:
    """For ``num_images`` test images of a z_dim = 2 program: draws of the true posterior
    p(z|x) (NUTS) against the contours of the encoder's q(z|x) and of the per-image optimum
    q*(z|x) of the same family (:mod:`pyro_vae.posterior`).

    Contours are at the densities 1, 2 and 3 standard deviations from a Gaussian's mode
    would have (exp(-1/2), exp(-2), exp(-9/2) of each density's peak on the grid).
    """
    from .posterior import local_family, nuts_posterior, optimal_local_parameters

    family = local_family(program)
    x = images[:num_images]
    extra = {} if labels is None or not views.takes_labels(program.model) else {"y": labels[:num_images]}
    with torch.no_grad():
        amortized = family.parameters(x, **extra)
    optimal, steps = optimal_local_parameters(program, family, x, seed=seed, extra=extra)
    log(f"q* took {steps} Adam steps")
    n = x.shape[0]
    fig, axes = plt.subplots(1, n, figsize=figure_size("posterior", n), layout="constrained", squeeze=False)
    levels = np.exp(-0.5 * np.array([3.0, 2.0, 1.0]) ** 2)
    for i, ax in enumerate(axes[0]):
        log(f"NUTS on test image {i + 1} of {n}")
        samples = nuts_posterior(program, x[i : i + 1], num_samples=nuts_samples, warmup=warmup, seed=seed + i,
                                 y=None if not extra else extra["y"][i : i + 1]).cpu()
        members = [family.distribution(*(p[i : i + 1] for p in params)) for params in (amortized, optimal)]
        with torch.no_grad():
            draws = torch.cat([samples] + [m.sample((500,)).reshape(500, 2).cpu() for m in members])
        lo = torch.quantile(draws, 0.002, dim=0)
        hi = torch.quantile(draws, 0.998, dim=0)
        pad = (hi - lo) * 0.15
        lo, hi = lo - pad, hi + pad
        g1, g2 = torch.meshgrid(torch.linspace(lo[0], hi[0], 150), torch.linspace(lo[1], hi[1], 150), indexing="xy")
        grid = torch.stack([g1, g2], -1).reshape(-1, 1, 2).to(x.device, amortized[0].dtype)
        ax.scatter(samples[:, 0], samples[:, 1], s=3, color="0.35", alpha=0.35, linewidths=0)
        for member, colour in zip(members, ("tab:blue", "tab:red")):
            with torch.no_grad():
                density = member.log_prob(grid).reshape(150, 150).cpu().double()
            density = (density - density.max()).exp().numpy()
            ax.contour(g1.numpy(), g2.numpy(), density, levels=levels, colors=colour, linewidths=1.4)
        inset = ax.inset_axes([0.0, 0.78, 0.22, 0.22])
        image = x[i].reshape(getattr(program, "image_shape", (1, *x.shape[-2:]))).cpu()
        inset.imshow(image.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
        inset.set_xticks([])
        inset.set_yticks([])
        ax.set_xlim(float(lo[0]), float(hi[0]))
        ax.set_ylim(float(lo[1]), float(hi[1]))
        ax.set_xlabel("$z_1$")
        ax.set_ylabel("$z_2$")
        ax.set_title(f"test image {i + 1}", fontsize=11)
    handles = [plt.Line2D([], [], marker="o", linestyle="", color="0.35", label="p(z|x), NUTS draws"),
               plt.Line2D([], [], color="tab:blue", label="q(z|x), the encoder"),
               plt.Line2D([], [], color="tab:red", label="q*(z|x), optimised for the image")]
    fig.legend(handles=handles, loc="outside lower center", ncol=3, fontsize=10, frameon=False)
    fig.suptitle("True posterior against the guide (contours at 1, 2, 3 sigma-equivalent densities)", fontsize=12)
    return _save(fig, path, pdf)


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

    def unavailable(self, program, test=None, metrics=None) -> str | None:
        """Why this figure cannot be drawn for ``program`` (one line), or None when it can."""
        reason = views.missing(program, *self.view_names)
        if reason is None and self.check is not None:
            reason = self.check(program, test, metrics)
        return reason


def needs(*view_names: str, check: Callable[..., str | None] | None = None, in_all: bool = True):
    """Decorator: a draw function -> a :class:`Figure` needing ``view_names`` (and ``check``)."""

    def wrap(draw) -> Figure:
        return Figure(draw, view_names, check, in_all)

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


@needs("z_dim", "local_family", check=_two_dimensional, in_all=False)
def _draw_posterior(program, test, metrics, path, opt: _Options) -> Path:
    return posterior_figure(program, test.images, path, seed=opt.seed, pdf=opt.pdf, log=opt.log, labels=test.labels)


KINDS = tuple(n for n in FIGURES.names() if FIGURES[n].in_all)  # the single-run kinds "all" draws, in order


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
        reason = FIGURES[name].unavailable(program, test, metrics)
        if reason is None:
            todo.append(name)
        elif every:
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


def default_run_name(config) -> str:
    """A run's name in legends and panel titles, from its :class:`pyro_vae.config.RunConfig`.

    ``"Autoencoder (reconstruction only)"`` for the ``ae`` model, ``"KL term only"`` for
    the ``kl-only`` objective, ``"VAE (ELBO)"`` for the VAE, the family's name for other
    registered families, and the class name of a program built in code (its
    :class:`pyro_vae.config.ProgramRecord`); then ``", beta = B"`` and
    ``", KL warm-up E epochs"`` when the KL term was weighted.
    """
    train = config.train
    if config.registered and config.model.model == "ae":
        return "Autoencoder (reconstruction only)"  # no KL term, so no KL weight to name
    if config.registered:
        name = "VAE" if config.model.model == "vae" else config.model.model
    else:
        name = config.model.program.rpartition(":")[2]  # "module:QualName" -> QualName
    if train.objective == "kl-only":
        name = "KL term only" if name == "VAE" else f"{name}, KL term only"
    elif name == "VAE":
        name = "VAE (ELBO)"
    if train.beta != 1.0:
        name += f", beta = {train.beta:g}"
    if train.kl_warmup_epochs:
        name += f", KL warm-up {train.kl_warmup_epochs} epochs"
    return name


# -- torchvision grids (pyro-vae sample / reconstruct) ---------------------------------------


def save_sample_grid(program, path: str | Path, num: int = 64, nrow: int = 8, seed: int = 0,
                     labels: torch.Tensor | None = None) -> Path:
    """E[x|z] of ``num`` prior draws as one image, ``nrow`` images per row (a conditional
    program decodes draw i with ``labels[i]``, cycled)."""
    path = _writable(path)
    save_image(prior_samples(program, num, seed, labels).float().cpu(), path, nrow=nrow, padding=2,
               pad_value=PAD_VALUE)
    return path


def save_reconstruction_grid(program, images: torch.Tensor, path: str | Path, nrow: int = 8,
                             labels: torch.Tensor | None = None) -> Path:
    """Rows of test images, each row followed by a row of their reconstructions."""
    views.require(program, "image_shape", purpose="a reconstruction grid")
    path = _writable(path)
    nrow = min(nrow, images.shape[0])
    images = images[: images.shape[0] - images.shape[0] % nrow]  # whole rows only
    recon = reconstructions(program, images, views.labels_for(labels, slice(0, images.shape[0])))
    rows = []
    for start in range(0, images.shape[0], nrow):
        rows += [images[start : start + nrow], recon[start : start + nrow]]
    grid = torch.cat(rows).reshape(-1, *program.image_shape).float().cpu()
    save_image(grid, path, nrow=nrow, padding=2, pad_value=PAD_VALUE)
    return path


# -- helpers -------------------------------------------------------------------------------


def figure_size(kind: str, panels: int = 1) -> tuple[float, float]:
    """Size in inches of a figure of ``kind``; ``panels`` counts the repeated panels of
    ``interpolation`` (stacked) and ``comparison`` and ``posterior`` (side by side)."""
    w, h = FIGSIZE[kind]
    if kind == "interpolation":
        return (w, h * panels)
    if kind in ("comparison", "posterior"):
        return (w * panels, h)
    return (w, h)


def _tensor_home(program) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of the program's tensors, for latent points made here."""
    tensors = itertools.chain(program.parameters(), program.buffers()) if isinstance(program, torch.nn.Module) else ()
    for t in tensors:
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def _z_dim_note(program) -> str:
    z_dim = getattr(program, "z_dim", None)
    return "" if z_dim is None else f" (z_dim = {z_dim})"


def _scatter_codes(ax, xy: torch.Tensor, labels, axis_labels, prior_circles: bool):
    xy = xy.detach().double().cpu().numpy()
    if labels is None:
        scatter = ax.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.5, color="tab:blue", rasterized=True)
    else:
        lab = labels.detach().cpu().numpy()
        cmap, norm = _class_colors(int(lab.max()) + 1)
        order = np.random.default_rng(0).permutation(len(lab))  # no class painted over all others
        scatter = ax.scatter(xy[order, 0], xy[order, 1], c=lab[order], cmap=cmap, norm=norm, s=2, alpha=0.6,
                             rasterized=True)
    if prior_circles:
        lim = max(3.0, float(np.percentile(np.abs(xy), 99.9)) * 1.05)  # a few far outliers may fall outside
        for r in (1, 2):
            ax.add_patch(mpatches.Circle((0, 0), r, fill=False, ls="--", lw=1, color="0.3"))
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.grid(alpha=0.2)
    return scatter


def _figure_legend(fig, axes, ncol: int | None = None) -> None:
    """One legend for the whole figure, below the panels, so it never covers data."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncol=ncol or len(entries),
                   fontsize=9, frameon=False)


def _class_colors(n: int):
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20", n)
    return cmap, mcolors.BoundaryNorm(np.arange(n + 1) - 0.5, n)


def _class_colorbar(fig, scatter, ax, labels, classes) -> None:
    if labels is None or scatter is None:
        return
    n = int(labels.max()) + 1
    bar = fig.colorbar(scatter, ax=ax, ticks=np.arange(n), shrink=0.9)
    bar.set_ticklabels(list(classes)[:n] if classes is not None else [str(i) for i in range(n)])
    bar.set_label("class")
    bar.solids.set_alpha(1.0)


def _imshow(ax, grid: torch.Tensor) -> None:
    """Show a (C, H, W) image in [0, 1]: grey-scale for one channel."""
    img = grid.detach().cpu().permute(1, 2, 0).numpy()
    if img.shape[2] == 1:
        ax.imshow(img[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(img.clip(0, 1))


def _nan(values) -> list[float]:
    return [float("nan") if v is None else float(v) for v in values]


def _save(fig, path: str | Path, pdf: bool) -> Path:
    path = _writable(path)
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI)
        # A palette makes the PNGs several times smaller (the docs embed a dozen of them):
        # 256 colours keep plots intact; 32 grey levels are plenty for the blurry decoder means.
        image = Image.open(buffer).convert("RGB")
        pixels = np.asarray(image)
        grey = bool((pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 1] == pixels[..., 2]).all())
        image.quantize(32 if grey else 256).save(path, format="PNG", optimize=True)
        if pdf:
            fig.savefig(path.with_suffix(".pdf"))
    finally:
        plt.close(fig)
    return path


def _writable(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the folder {path.parent} for {path.name}: {err.strerror or err}") from err
    return path
