"""Optional views of a program, for figures and diagnostics.

Training and the bounds of :mod:`pyro_vae.evaluate` need only ``model`` and ``guide``.
Figures and some diagnostics need more: an encoder's posterior mean, a decoder, a prior
to sample from. A program offers what it can as plain attributes and methods:

=====================  =====================================================  ==========================
view                   what it returns                                        used by
=====================  =====================================================  ==========================
``z_dim``              the latent dimension                                   manifold, samples
``image_shape``        ``(C, H, W)`` of one image                             every image grid
``posterior_mean(x)``  E_q[z|x], ``(B, z_dim)``                               latent, interpolation,
                                                                              active units
``encode(x)``          ``(loc, scale)`` of a diagonal Gaussian q(z|x)         dims, KL per dimension
``decode(z)``          E[x|z] as images ``(..., *image_shape)``               manifold, samples,
                                                                              reconstructions
``sample_prior(n)``    ``n`` draws of z ~ p(z), ``(n, z_dim)``                samples
``local_family()``     the guide's per-image family, :class:`LocalFamily`      gaps, posterior
``complete(x, num)``   ``num`` completions of each image from its shown        completion
                       pixels, ``(num, B, *image_shape)``; with
                       ``hidden_mask`` and ``predict(x)`` (a baseline's
                       guess, or None)
``num_classes``        the number of classes of a label y                     analogies
``predict_class(x)``   the predicted class of each image, ``(B,)``            accuracy
=====================  =====================================================  ==========================

What a program lacks is skipped, with a one-line reason (:func:`missing`). A conditional
program's views take the labels too (``posterior_mean(x, y)``, ``encode(x, y)``,
``decode(z, y)``): :func:`call` passes ``y`` to a view whose signature has it.
"""

from __future__ import annotations

import inspect

import pyro.distributions as dist
import torch

VIEWS = {
    "z_dim": "its latent dimension",
    "image_shape": "the shape of one image",
    "posterior_mean": "E_q[z|x] from an encoder",
    "encode": "a diagonal Gaussian q(z|x) as (loc, scale)",
    "decode": "E[x|z] from a decoder",
    "sample_prior": "draws of z from the prior",
    "local_family": "a per-image parametric guide family (pyro_vae.posterior.LocalFamily)",
    "complete": "completions of images from their shown pixels (quadrant completion)",
    "num_classes": "the number of classes of its label y",
    "predict_class": "a predicted class of each image",
}


class ViewUnavailable(ValueError):
    """The program does not offer a view that a figure or diagnostic needs."""


def missing(program, *views: str) -> str | None:
    """Why ``program`` cannot serve ``views`` (one line), or None when it has them all."""
    absent = [name for name in views if getattr(program, name, None) is None]
    if not absent:
        return None
    wants = "; ".join(f"{name} ({VIEWS[name]})" for name in absent)
    return f"{type(program).__name__} has no {wants}"


def require(program, *views: str, purpose: str) -> None:
    reason = missing(program, *views)
    if reason is not None:
        raise ViewUnavailable(f"{purpose} needs {', '.join(views)}: {reason}")


def standard_normal_prior(program) -> bool:
    """Whether the program's ``prior()`` is N(0, I) (the KL-per-dimension formula assumes it)."""
    prior = getattr(program, "prior", None)
    if prior is None:
        return False
    p = prior()
    base = p.base_dist if isinstance(p, dist.Independent) else p
    if not isinstance(base, dist.Normal):
        return False
    return bool((base.loc == 0).all()) and bool((base.scale == 1).all())


def call(program, name: str, *args, y: torch.Tensor | None = None):
    """``program.<name>(*args)``, with ``y=y`` when labels are given and the view takes ``y``."""
    view = getattr(program, name)
    if y is not None and takes_labels(view):
        return view(*args, y=y)
    return view(*args)


def takes_labels(fn) -> bool:
    """Whether a view (or a model) has a ``y`` parameter."""
    try:
        return "y" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def labels_for(labels: torch.Tensor | None, index, count: int | None = None) -> torch.Tensor | None:
    """``labels[index]`` (None stays None); with ``count``, that one label repeated ``count`` times."""
    if labels is None:
        return None
    picked = labels[index]
    return picked.expand(count) if count is not None else picked


@torch.no_grad()
def posterior_means(program, images: torch.Tensor, batch_size: int = 1000,
                    labels: torch.Tensor | None = None) -> torch.Tensor:
    """E_q[z|x] for every image: ``(N, z_dim)``, in batches; ``labels`` reach a view that takes ``y``."""
    require(program, "posterior_mean", purpose="the posterior means")
    return torch.cat([call(program, "posterior_mean", images[s : s + batch_size],
                           y=labels_for(labels, slice(s, s + batch_size)))
                      for s in range(0, images.shape[0], batch_size)])
