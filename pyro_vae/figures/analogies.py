"""Analogies of a model with a class and a style (Kingma et al. 2014, Figure 1): the style
z of a few test images held fixed while the class y runs over every class.

Each row: a test image x, then E[x | z, y] for y = 0, 1, ..., K - 1 with z = E_q[z | x, y_x],
the posterior mean of the image's style given its own class (its label when the test set
has labels, else the program's prediction). A model whose z holds the style and y the
class draws each row as one hand writing every digit; one whose z also holds the class
draws the test digit over and over."""

from __future__ import annotations

from pathlib import Path

import torch

from .. import views
from . import canvas
from .canvas import FIGSIZE, PAD_VALUE, imshow, make_grid, plt


def analogy_rows(labels: torch.Tensor | None, n: int, rows: int, seed: int = 0) -> list[int]:
    """``rows`` test images for the rows: of different classes where labels allow (a seeded
    random order, the first image of each new class), then any others of that order."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    if labels is None:
        return order[:rows]
    labels = labels.detach().cpu()
    picked, seen = [], set()
    for i in order:
        if int(labels[i]) not in seen:
            picked.append(i)
            seen.add(int(labels[i]))
        if len(picked) == rows:
            return picked
    return picked + [i for i in order if i not in picked][: rows - len(picked)]


@torch.no_grad()
def analogies(program, images: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
    """``(B, K, *image_shape)``: image b's style ``E_q[z | x_b, y_b]`` decoded with every class.
    ``labels`` (``(B,)``) are the images' classes; without them, the program's ``predict_class``."""
    views.require(program, "num_classes", "posterior_mean", "decode", purpose="the analogies")
    if labels is None:
        views.require(program, "predict_class", purpose="the analogies of images without labels")
        labels = program.predict_class(images)
    z = program.posterior_mean(images, y=labels)  # (B, z_dim)
    k = program.num_classes
    classes = torch.arange(k, device=z.device)
    decoded = program.decode(z.unsqueeze(1).expand(-1, k, -1), y=classes.expand(z.shape[0], k))
    return decoded.reshape(z.shape[0], k, *program.image_shape)


def analogies_figure(program, images: torch.Tensor, labels: torch.Tensor | None, path: str | Path, *,
                     rows: int = 8, seed: int = 0, classes=None, title: str | None = None, pdf: bool = False) -> Path:
    """Rows of analogies (:func:`analogies`) for ``rows`` test images of different classes:
    each row the test image, then its style decoded with every class."""
    picked = analogy_rows(labels, images.shape[0], rows, seed)
    chosen = images[picked]
    known = None if labels is None else labels[picked]
    decoded = analogies(program, chosen, known).float().cpu()
    k = program.num_classes
    shape = program.image_shape
    grid = torch.cat([chosen.reshape(-1, 1, *shape).float().cpu(), decoded], 1).reshape(-1, *shape)
    fig, ax = plt.subplots(figsize=FIGSIZE["analogies"], layout="constrained")
    imshow(ax, make_grid(grid, nrow=k + 1, padding=2, pad_value=PAD_VALUE))
    w, h = shape[2] + 2, shape[1] + 2
    names = [str(c) for c in range(k)] if classes is None or len(classes) != k else \
        [name.split(" - ")[0] for name in classes]
    ax.set_xticks([(c + 0.5) * w for c in range(k + 1)], ["test $x$"] + [f"y = {n}" for n in names],
                  rotation=0, fontsize=8)
    ax.set_yticks([])
    ax.tick_params(length=0)
    ax.axvline(w - 1, color="tab:red", lw=1.5)
    given = "its label" if labels is not None else "argmax $q(y|x)$"
    ax.set_xlabel(f"$E[x \\mid z, y]$ with $z = E_q[z \\mid x, y_x]$ ($y_x$: {given}) and every class $y$")
    ax.set_title(title or f"Analogies: the style of {len(picked)} test images, written as every class")
    return canvas.save(fig, path, pdf)
