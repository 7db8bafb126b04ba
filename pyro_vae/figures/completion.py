"""Quadrant completion (Pyro's CVAE tutorial, Sohn et al. 2015): test images with their
hidden quadrants greyed, the true images, the baseline network's prediction, and several
completions drawn from the conditional VAE's prior p(z | x_shown), one image per column.

The program offers the ``complete`` view (:mod:`pyro_vae.views`): ``complete(x, num)``,
``hidden_mask`` and ``predict(x)`` (the baseline's guess of the hidden pixels, or None).
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..rng import forked_rng
from . import canvas
from .canvas import PAD_VALUE, figure_size, imshow, make_grid, plt
from .kinds import _Options, needs

HIDDEN_GREY = 0.5  # the hidden pixels of the input row: neither ink (1) nor background (0)


@torch.no_grad()
def completion_figure(program, images: torch.Tensor, path: str | Path, *, num_images: int = 10,
                      num_samples: int = 6, seed: int = 0, pdf: bool = False) -> Path:
    """The completion figure of ``program`` on the first ``num_images`` of ``images``.

    Rows: the input (hidden pixels grey), the true image, the baseline's prediction (when
    the program has a baseline: a ``cvae --baseline`` run, or the ``cvae-baseline`` itself),
    then ``num_samples`` completions, each from its own draw z ~ p(z | x_shown) with the
    hidden pixels at their mean E[x_hidden | z]. A red line marks the hidden region of
    every predicted image. Columns: one test image each.
    """
    images = images[:num_images]
    n = images.shape[0]
    hidden = program.hidden_mask.to(images.device)
    shown = images.masked_fill(hidden, HIDDEN_GREY)
    rows = [("shown", shown), ("truth", images)]
    guess = program.predict(images)
    if guess is not None:
        rows.append(("baseline", program.fill(images, guess.unsqueeze(0))[0]))
    if guess is None or getattr(program, "conditional_prior", None) is not None:
        with forked_rng(seed):
            samples = program.complete(images, num_samples)
        rows += [(f"CVAE {i + 1}", s) for i, s in enumerate(samples)]
    tiles = torch.cat([r.reshape(n, *program.image_shape).float().cpu() for _, r in rows])
    grid = make_grid(tiles, nrow=n, padding=2, pad_value=PAD_VALUE)
    # the hidden region of each predicted tile, outlined
    region = torch.zeros(len(rows) * n, *program.image_shape)
    region[2 * n:] = hidden.float().cpu()
    outline = make_grid(region, nrow=n, padding=2, pad_value=0.0)[0]
    fig, ax = plt.subplots(figsize=figure_size("completion", len(rows)), layout="constrained")
    imshow(ax, grid)
    if len(rows) > 2:
        ax.contour(outline.numpy(), levels=[0.5], colors="tab:red", linewidths=0.6)
    h = program.image_shape[1] + 2
    ax.set_yticks([(r + 0.5) * h + 1 for r in range(len(rows))], [name for name, _ in rows])
    ax.set_xticks([])
    ax.tick_params(length=0)
    q = program.quadrants
    ax.set_title(f"Quadrant completion: {q} quadrant{'s' if q > 1 else ''} shown, the rest predicted\n"
                 + ("baseline network" if guess is not None and len(rows) == 3 else
                    "completions with z ~ p(z | shown), hidden pixels at E[x_hidden | z]"), fontsize=10)
    return canvas.save(fig, path, pdf)


@needs("image_shape", "complete", family_only=True)
def _draw_completion(program, test, metrics, path, opt: _Options) -> Path:
    return completion_figure(program, test.images, path, seed=opt.seed, pdf=opt.pdf)
