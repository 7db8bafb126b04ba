"""Where the test images sit in latent space: posterior means in 2-D (the codes
themselves, PCA or t-SNE) and which latent dimensions the program uses."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from .. import views
from ..views import posterior_means
from . import canvas
from .canvas import FIGSIZE, class_colorbar, plt, scatter_codes


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
    scatter = scatter_codes(ax, xy, labels, axis_labels, prior_circles=circles)
    how = "" if direct else {"pca": ", PCA", "auto": ", PCA", "tsne": ", t-SNE"}.get(method, "")
    lines = [f"Posterior means $E_q[z|x]$ of {len(codes)} test images (z_dim = {codes.shape[1]}{how})"]
    notes = (["no class labels, so one colour"] if labels is None else []) + (
        ["dashed: the prior's 1 and 2 sigma"] if circles else [])
    ax.set_title(title or "\n".join(lines + (["; ".join(notes)] if notes else [])), fontsize=11)
    class_colorbar(fig, scatter, ax, labels, classes)
    return canvas.save(fig, path, pdf)


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
    return canvas.save(fig, path, pdf)
