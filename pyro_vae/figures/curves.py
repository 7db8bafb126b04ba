"""Per-epoch metrics of a run: ELBO, expected log-likelihood and KL, train and test."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from . import canvas
from .canvas import FIGSIZE, figure_legend, mticker, nan_for_none, plt


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
                ax.plot(epochs, nan_for_none(series), ms=3, label=split, **style[split])
        ax.set_title(name)
        ax.set_xlabel("epoch")
        ax.set_ylabel("log-density, nats per image" if density and key != "kl" else "nats per image")
        ax.grid(alpha=0.3)
    objective = [r.get("train_objective") for r in records]
    weights = [r.get("kl_weight") for r in records]
    if any(v is not None for v in objective) and any(w is not None and w != 1.0 for w in weights):
        axes[0].plot(epochs, nan_for_none(objective), color="tab:green", ls="--", marker=".", label="train objective")
    legend_axes = list(axes)
    if any(w is not None for w in weights) and len(set(weights)) > 1:
        twin = axes[2].twinx()
        twin.plot(epochs, nan_for_none(weights), color="tab:gray", ls=":", label="KL weight (right axis)")
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
    figure_legend(fig, legend_axes)
    fig.suptitle(title or "Per-epoch metrics (higher ELBO and log-likelihood are better)")
    return canvas.save(fig, path, pdf)
