"""What the decoder draws: E[x|z] of prior draws, reconstructions at the posterior mean,
the manifold over a grid of z (z_dim = 2), interpolations between test images, and the
torchvision grids of ``pyro-vae sample`` and ``pyro-vae reconstruct``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .. import views
from ..rng import forked_rng
from ..views import ViewUnavailable
from . import canvas
from .canvas import (FIGSIZE, PAD_VALUE, figure_size, imshow, make_grid, plt, save_image, tensor_home, writable,
                     z_dim_note)


PRIOR_DRAWS = 10_000  # prior samples behind the manifold's grid when the prior is not N(0, I)


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


def manifold_figure(program, path: str | Path, *, n: int = 20, seed: int = 0, title: str | None = None,
                    pdf: bool = False, label: torch.Tensor | None = None) -> Path:
    """For z_dim = 2: the decoder mean E[x|z] at ``n x n`` latent points at prior quantiles
    (:func:`prior_quantiles`), each image at its own aspect ratio. A conditional program
    decodes every point with the one ``label`` (0-dim)."""
    views.require(program, "z_dim", "image_shape", "decode", purpose="the manifold figure")
    if program.z_dim != 2:
        raise ViewUnavailable(f"the manifold figure needs z_dim = 2; this program has z_dim = {program.z_dim}")
    z, how = prior_quantiles(program, n, seed)
    device, dtype = tensor_home(program)
    with torch.no_grad():
        y = None if label is None else label.expand(z.shape[0])
        images = views.call(program, "decode", z.to(device, dtype), y=y).float().cpu()
    c, h, w = program.image_shape
    grid = images.reshape(n, n, c, h, w).permute(2, 0, 3, 1, 4).reshape(c, n * h, n * w)
    fig, ax = plt.subplots(figsize=FIGSIZE["manifold"], layout="constrained")
    imshow(ax, grid)
    step = max(1, n // 5)
    ticks = list(range(0, n, step)) + ([n - 1] if (n - 1) % step else [])
    ax.set_xticks([(i + 0.5) * w for i in ticks], [f"{float(z[i, 0]):.2f}" for i in ticks])  # z_1 along a row
    ax.set_yticks([(i + 0.5) * h for i in ticks], [f"{float(z[i * n, 1]):.2f}" for i in ticks])  # z_2 down a column
    ax.set_xlabel(f"$z_1$ ({how})")
    ax.set_ylabel(f"$z_2$ ({how})")
    ax.set_title(title or f"Decoder mean $E[x|z]$ over a {n}x{n} grid of $z$ at prior quantiles")
    return canvas.save(fig, path, pdf)


def samples_figure(program, path: str | Path, *, num: int = 64, nrow: int = 8, seed: int = 0,
                   title: str | None = None, pdf: bool = False, labels: torch.Tensor | None = None) -> Path:
    """Images E[x|z] decoded from ``num`` prior draws z ~ p(z) (with ``labels``, for a
    conditional program: draw i decoded with label i, cycled)."""
    images = prior_samples(program, num, seed, labels).float().cpu()
    fig, ax = plt.subplots(figsize=FIGSIZE["samples"], layout="constrained")
    imshow(ax, make_grid(images, nrow=nrow, padding=2, pad_value=PAD_VALUE))
    ax.set_axis_off()
    prior = "N(0, I)" if views.standard_normal_prior(program) else "p(z)"
    ax.set_title(title or f"$E[x|z]$ for {num} samples $z \\sim {prior}${z_dim_note(program)}")
    return canvas.save(fig, path, pdf)


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
    imshow(ax, grid)
    h = program.image_shape[1] + 2
    n_rows = 2 * (images.shape[0] // nrow)
    ax.set_yticks([(r + 0.5) * h for r in range(n_rows)], ["test $x$", "recon."] * (n_rows // 2))
    ax.set_xticks([])
    ax.tick_params(length=0)
    ax.set_title(title or "Test images above their reconstructions $E[x \\mid z = E_q[z|x]]$")
    return canvas.save(fig, path, pdf)


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
        imshow(ax, make_grid(torch.cat(rows), nrow=steps + 2, padding=2, pad_value=PAD_VALUE))
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
    return canvas.save(fig, path, pdf)


def save_sample_grid(program, path: str | Path, num: int = 64, nrow: int = 8, seed: int = 0,
                     labels: torch.Tensor | None = None) -> Path:
    """E[x|z] of ``num`` prior draws as one image, ``nrow`` images per row (a conditional
    program decodes draw i with ``labels[i]``, cycled)."""
    path = writable(path)
    save_image(prior_samples(program, num, seed, labels).float().cpu(), path, nrow=nrow, padding=2,
               pad_value=PAD_VALUE)
    return path


def save_reconstruction_grid(program, images: torch.Tensor, path: str | Path, nrow: int = 8,
                             labels: torch.Tensor | None = None) -> Path:
    """Rows of test images, each row followed by a row of their reconstructions."""
    views.require(program, "image_shape", purpose="a reconstruction grid")
    path = writable(path)
    nrow = min(nrow, images.shape[0])
    images = images[: images.shape[0] - images.shape[0] % nrow]  # whole rows only
    recon = reconstructions(program, images, views.labels_for(labels, slice(0, images.shape[0])))
    rows = []
    for start in range(0, images.shape[0], nrow):
        rows += [images[start : start + nrow], recon[start : start + nrow]]
    grid = torch.cat(rows).reshape(-1, *program.image_shape).float().cpu()
    save_image(grid, path, nrow=nrow, padding=2, pad_value=PAD_VALUE)
    return path
