r"""Figures from trained programs and their metrics, one module per kind of picture. They
read programs and results; they never train. :mod:`pyro_vae.plots` gathers their names.

* :mod:`~pyro_vae.figures.canvas`: matplotlib (imported on first use), sizes, colours,
  image grids, and saving a figure as a small PNG (and a PDF);
* :mod:`~pyro_vae.figures.latent`: where the test images sit in latent space: the 2-D
  scatter of posterior means (PCA, t-SNE) and the latent dimensions' use;
* :mod:`~pyro_vae.figures.decoded`: what the decoder draws: samples from the prior,
  reconstructions, the manifold over a grid of z, interpolations, torchvision grids;
* :mod:`~pyro_vae.figures.curves`: per-epoch metrics;
* :mod:`~pyro_vae.figures.comparison`: several runs in one figure;
* :mod:`~pyro_vae.figures.posterior`: the true posterior (NUTS) against q(z|x) and q*;
* :mod:`~pyro_vae.figures.kinds`: the figure kinds of ``pyro-vae plot`` (each knows the
  views it needs), :func:`~pyro_vae.figures.kinds.draw_figures` and
  :func:`~pyro_vae.figures.kinds.draw_comparison`.

Array helpers (:func:`~pyro_vae.figures.latent.pca`,
:func:`~pyro_vae.figures.decoded.manifold_grid`, ...) compute what a figure shows and are
testable on their own; figure functions (``*_figure``) take a program's views and/or
arrays and an output path, write a PNG (and a PDF beside it when ``pdf=True``) and return
the PNG's path. Figures ask the program for views (``posterior_mean``, ``decode``,
``sample_prior``, ...), never for a VAE's internals, and draw images of any shape
``(C, H, W)`` at their own aspect ratio. Every figure has a fixed size in inches
(:data:`~pyro_vae.figures.canvas.FIGSIZE`) drawn at :data:`~pyro_vae.figures.canvas.DPI`,
so its pixel size is known in advance. Matplotlib runs on the non-interactive Agg backend.
"""
