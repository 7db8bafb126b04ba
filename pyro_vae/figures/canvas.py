"""What every figure is drawn on: matplotlib and torchvision imported on first use, the
figures' sizes (:data:`FIGSIZE` inches at :data:`DPI`), class colours, image grids, and
:func:`save`, which writes a figure as a small PNG (and a PDF beside it)."""

from __future__ import annotations

import importlib
import io
import itertools
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image


class _OnFirstUse:
    """A module imported when one of its names is first used. matplotlib's pyplot takes
    about 0.35 s to import; ``pyro-vae sample`` and ``reconstruct`` and TensorBoard's images
    (:mod:`pyro_vae.callbacks`) import the figures and draw no matplotlib figure."""

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
    "completion": (8.0, 0.72),  # per row of images (10 images a row), and 0.9 more for the two lines of title
    "analogies": (7.0, 5.6),
}
PAD_VALUE = 1.0  # white lines between the images of a grid: they stand out from grey images and black backgrounds


def figure_size(kind: str, panels: int = 1) -> tuple[float, float]:
    """Size in inches of a figure of ``kind``; ``panels`` counts the repeated panels of
    ``interpolation`` (stacked) and ``comparison`` and ``posterior`` (side by side), and the
    rows of images of ``completion``."""
    w, h = FIGSIZE[kind]
    if kind == "interpolation":
        return (w, h * panels)
    if kind in ("comparison", "posterior"):
        return (w * panels, h)
    if kind == "completion":  # panels: the rows of images
        return (w, h * panels + 0.9)
    return (w, h)


def tensor_home(program) -> tuple[torch.device, torch.dtype]:
    """The device and floating dtype of the program's tensors, for latent points made here."""
    tensors = itertools.chain(program.parameters(), program.buffers()) if isinstance(program, torch.nn.Module) else ()
    for t in tensors:
        if t.is_floating_point():
            return t.device, t.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def z_dim_note(program) -> str:
    """" (z_dim = D)" for a title, or nothing for a program without the ``z_dim`` view."""
    z_dim = getattr(program, "z_dim", None)
    return "" if z_dim is None else f" (z_dim = {z_dim})"


def scatter_codes(ax, xy: torch.Tensor, labels, axis_labels, prior_circles: bool):
    """2-D codes ``xy`` (N, 2) as points, coloured by class when ``labels`` are given; with
    ``prior_circles``, N(0, I)'s 1- and 2-sigma circles on equal axes. Returns the scatter."""
    xy = xy.detach().double().cpu().numpy()
    if labels is None:
        scatter = ax.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.5, color="tab:blue", rasterized=True)
    else:
        lab = labels.detach().cpu().numpy()
        cmap, norm = class_colors(int(lab.max()) + 1)
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


def figure_legend(fig, axes, ncol: int | None = None) -> None:
    """One legend for the whole figure, below the panels, so it never covers data."""
    entries = {}
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if entries:
        fig.legend(entries.values(), entries.keys(), loc="outside lower center", ncol=ncol or len(entries),
                   fontsize=9, frameon=False)


def class_colors(n: int):
    """A qualitative colour map of ``n`` classes and the norm that puts class k on colour k."""
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20", n)
    return cmap, mcolors.BoundaryNorm(np.arange(n + 1) - 0.5, n)


def class_colorbar(fig, scatter, ax, labels, classes) -> None:
    """A colour bar naming the classes of ``scatter`` (nothing without labels)."""
    if labels is None or scatter is None:
        return
    n = int(labels.max()) + 1
    bar = fig.colorbar(scatter, ax=ax, ticks=np.arange(n), shrink=0.9)
    bar.set_ticklabels(list(classes)[:n] if classes is not None else [str(i) for i in range(n)])
    bar.set_label("class")
    bar.solids.set_alpha(1.0)


def imshow(ax, grid: torch.Tensor) -> None:
    """Show a (C, H, W) image in [0, 1]: grey-scale for one channel."""
    img = grid.detach().cpu().permute(1, 2, 0).numpy()
    if img.shape[2] == 1:
        ax.imshow(img[:, :, 0], cmap="gray", vmin=0.0, vmax=1.0)
    else:
        ax.imshow(img.clip(0, 1))


def nan_for_none(values) -> list[float]:
    """Floats to plot, NaN (a gap in the line) where a record has no value."""
    return [float("nan") if v is None else float(v) for v in values]


def save(fig, path: str | Path, pdf: bool) -> Path:
    """Write ``fig`` to ``path`` as a palette PNG (and a PDF beside it with ``pdf``), close
    it, and return ``path``. The figure modules call it as ``canvas.save``: one place where
    every figure is written (tests/test_plots.py catches the figures there)."""
    path = writable(path)
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


def writable(path: str | Path) -> Path:
    """``path``, its folder created, or an error that names the folder."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the folder {path.parent} for {path.name}: {err.strerror or err}") from err
    return path
