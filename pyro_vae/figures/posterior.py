"""The true posterior p(z|x) of a few test images (NUTS) against the encoder's q(z|x) and
the per-image optimum q*(z|x) (:mod:`pyro_vae.posterior`), for z_dim = 2."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import views
from . import canvas
from .canvas import figure_size, plt


def posterior_figure(program, images: torch.Tensor, path: str | Path, *, num_images: int = 4,
                     nuts_samples: int = 1000, warmup: int = 500, seed: int = 0, pdf: bool = False,
                     log: Callable[[str], None] = print, labels: torch.Tensor | None = None) -> Path:
    """For ``num_images`` test images of a z_dim = 2 program: draws of the true posterior
    p(z|x) (NUTS) against the contours of the encoder's q(z|x) and of the per-image optimum
    q*(z|x) of the same family (:mod:`pyro_vae.posterior`).

    Contours are at the densities 1, 2 and 3 standard deviations from a Gaussian's mode
    would have (exp(-1/2), exp(-2), exp(-9/2) of each density's peak on the grid).
    """
    from ..posterior import local_family, nuts_posterior, optimal_local_parameters

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
                                 y=None if not extra else extra["y"][i : i + 1], progress=True).cpu()
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
    return canvas.save(fig, path, pdf)
