"""Figures from trained models. Plots read models and results; they never train.

Image grids use :func:`torchvision.utils.make_grid` / :func:`save_image`.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torchvision.utils import save_image

from .rng import forked_rng


@torch.no_grad()
def prior_samples(vae, num: int, seed: int = 0) -> torch.Tensor:
    """E[x|z] for ``num`` draws z ~ p(z): images ``(num, *image_shape)``."""
    with forked_rng(seed):
        z = torch.randn(num, vae.z_dim, device=vae.prior_loc.device)
    return vae.decode(z)


@torch.no_grad()
def reconstructions(vae, images: torch.Tensor) -> torch.Tensor:
    """E[x|z] at the posterior mean z = loc(x), the usual picture of a reconstruction."""
    loc, _ = vae.encode(images)
    return vae.decode(loc)


def save_sample_grid(vae, path: str | Path, num: int = 64, nrow: int = 8, seed: int = 0) -> Path:
    path = _writable(path)
    save_image(prior_samples(vae, num, seed).cpu(), path, nrow=nrow, padding=2, pad_value=0.5)
    return path


def save_reconstruction_grid(vae, images: torch.Tensor, path: str | Path, nrow: int = 8) -> Path:
    """Rows of test images, each row followed by a row of their reconstructions."""
    path = _writable(path)
    nrow = min(nrow, images.shape[0])
    images = images[: images.shape[0] - images.shape[0] % nrow]  # whole rows only
    recon = reconstructions(vae, images)
    rows = []
    for start in range(0, images.shape[0], nrow):
        rows += [images[start : start + nrow], recon[start : start + nrow]]
    grid = torch.cat(rows).reshape(-1, *vae.image_shape).cpu()
    save_image(grid, path, nrow=nrow, padding=2, pad_value=0.5)
    return path


def _writable(path: str | Path) -> Path:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OSError(f"cannot create the folder {path.parent} for {path.name}: {err.strerror or err}") from err
    return path
