"""Several runs in one figure: their 2-D latent spaces side by side, and how many latent
dimensions each uses (posterior collapse); a run's name in legends and titles."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from . import canvas
from .canvas import FIGSIZE, class_colorbar, figure_legend, figure_size, plt, scatter_codes


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
        scatter = scatter_codes(ax, codes, labels, ("$z_1$", "$z_2$"), prior_circles=prior_circles)
        spread = codes.double().std(0)
        ax.set_title(f"{name}\nstd of codes: {float(spread[0]):.3g}, {float(spread[1]):.3g}", fontsize=10)
    class_colorbar(fig, scatter, axes[0].tolist(), labels, classes)
    notes = (["no class labels, so one colour"] if labels is None else []) + (
        ["dashed: the prior's 1 and 2 sigma"] if prior_circles else [])
    lines = ["Posterior means of the same test images"] + (["; ".join(notes)] if notes else [])
    fig.suptitle(title or "\n".join(lines))
    return canvas.save(fig, path, pdf)


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
    figure_legend(fig, [ax0, ax1], ncol=3)
    if title:
        fig.suptitle(title)
    return canvas.save(fig, path, pdf)


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
