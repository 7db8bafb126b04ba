"""Figures from trained programs and their metrics: every name of :mod:`pyro_vae.figures`
that ``pyro-vae plot``, the experiments and users import, in one place. Plots read
programs and results; they never train.

The figures live by what they draw (:mod:`pyro_vae.figures`): ``canvas`` (matplotlib,
sizes, saving), ``latent`` (codes in latent space), ``decoded`` (samples,
reconstructions, manifold, interpolations, torchvision grids), ``curves``, ``comparison``
(several runs), ``posterior`` (NUTS against the guide) and ``kinds`` (the registries
:data:`FIGURES` and :data:`COMPARISONS`, :func:`draw_figures`, :func:`draw_comparison`).
The figure kinds are declared in :mod:`pyro_vae.catalog` as ``"pyro_vae.plots:_draw_..."``;
they resolve here.
"""

from .catalog import COMPARISONS, FIGURES
from .figures.canvas import (DPI, FIGSIZE, PAD_VALUE, figure_size, make_grid, mcolors, mpatches, mticker, plt,
                             save_image)
from .figures.comparison import comparison_figure, default_run_name, kl_profile_figure
from .figures.curves import curves_figure
from .figures.decoded import (PRIOR_DRAWS, interpolate, interpolation_figure, interpolation_pairs, manifold_figure,
                              manifold_grid, prior_quantiles, prior_samples, reconstructions, reconstructions_figure,
                              samples_figure, save_reconstruction_grid, save_sample_grid)
from .figures.kinds import (Figure, _draw_comparison, _draw_curves, _draw_dims, _draw_interpolation,
                            _draw_kl_profile, _draw_latent, _draw_manifold, _draw_posterior, _draw_reconstructions,
                            _draw_samples, draw_comparison, draw_figures, needs)  # noqa: F401  (the _draw_: catalog)
from .figures.latent import dims_figure, latent_figure, pca, project_latents, tsne
from .figures.posterior import posterior_figure

# after the imports above: the catalog's "pyro_vae.plots:_draw_..." resolve to the names imported here
# the single-run kinds "all" draws for every program that offers their views, in order (and those of
# some families only, such as quadrant completion's, for the programs of those families)
KINDS = tuple(n for n in FIGURES.names() if FIGURES[n].in_all and not FIGURES[n].family_only)

__all__ = [
    "COMPARISONS", "DPI", "FIGSIZE", "FIGURES", "Figure", "KINDS", "PAD_VALUE", "PRIOR_DRAWS", "comparison_figure",
    "curves_figure", "default_run_name", "dims_figure", "draw_comparison", "draw_figures", "figure_size",
    "interpolate", "interpolation_figure", "interpolation_pairs", "kl_profile_figure", "latent_figure",
    "make_grid", "manifold_figure", "manifold_grid", "mcolors", "mpatches", "mticker", "needs", "pca", "plt",
    "posterior_figure", "prior_quantiles", "prior_samples", "project_latents", "reconstructions",
    "reconstructions_figure", "samples_figure", "save_image", "save_reconstruction_grid", "save_sample_grid",
    "tsne",
]
