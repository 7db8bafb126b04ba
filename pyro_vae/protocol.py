"""The protocol that programs, the training loop, the evaluations and the posterior tools
share: the ``"data"`` plate (:func:`data_plate`), how a program's ``model`` and ``guide``
are called (:class:`ProgramCall`), and a guide's per-image family (:class:`LocalFamily`).

This module lies below all of them (it imports torch and Pyro only), so that the
programs (:mod:`pyro_vae.models`), the bounds (:mod:`pyro_vae.evaluate`) and the
inference gaps (:mod:`pyro_vae.posterior`) use one another's types without importing one
another; each name is re-exported from its old home (``pyro_vae.models.data_plate``,
``pyro_vae.models.ProgramCall``, ``pyro_vae.posterior.LocalFamily``).

A *program* is a :class:`torch.nn.Module` with two Pyro callables over the same sites::

    class Program(nn.Module):
        def model(self, x, y=None, *, num_data=None, kl_weight=1.0): ...   # p(x, z | ...)
        def guide(self, x, y=None, *, num_data=None, kl_weight=1.0): ...   # q(z | x, ...)

* ``x`` is a minibatch of images ``(B, C, H, W)``; ``y`` its labels ``(B,)``, passed only
  when the data set has labels and the program's ``model`` and ``guide`` take ``y``: a
  *conditional* program, given every image's label in training and in every evaluation.
* ``num_labelled`` (optional) makes a *semi-supervised* program, trained on data whose
  labels are known for some images only (``--labels N``): in training, ``y`` holds the
  labels of the first ``len(y)`` images of ``x`` (``len(y)`` may be 0, or ``B``), the rest
  are unlabelled, and ``num_labelled`` is the number of labelled images in the data set
  (``num_data`` counts them all). A label that was hidden never reaches the program. The
  evaluations call it without ``y`` and ``num_labelled``: y is then a latent of every image.
* ``num_data`` (required) is the size N of the whole data set: the ``"data"`` plate is told
  it (:func:`data_plate`), so Pyro scales the minibatch's terms by N / B.
* ``kl_weight`` (optional) weights the latent sites (beta-VAE, KL warm-up); a program
  without it trains only at weight 1.
* ``index`` (optional) is the minibatch's positions in the data set ``(B,)``, for
  programs that keep parameters per data point: give it to the plate
  (``data_plate(x, num_data, index)``) so each image's parameters are its own.
* Every learned tensor is an ``nn.Parameter`` of the module (registered with Pyro through
  ``pyro.module`` in the model or guide, for the ``svi`` engine); the training loop
  refuses a ``pyro.param`` the module does not own, which no checkpoint would save.

Optional, and used when present:

* ``check_data(x)``: reject data the likelihood cannot score. With it, training checks
  each epoch's data once and runs the steps with Pyro's validation off (and recordable,
  :mod:`pyro_vae.capture`); without it, every step runs with Pyro's validation as set.
* ``binary_data``: True when the program scores binary data (grey images are then
  binarised by :func:`pyro_vae.train.train`).
* ``point_estimate``: True when the guide is a point mass (no ELBO, only log p(x|z)).
* ``bounds``: what the ELBO and the importance-sampled bound are of, in words, when it is
  not log p(x): ``"log p(x_hidden | x_shown)"`` for a program that scores part of each image
  given the rest (quadrant completion); ``evaluate`` and ``gaps`` label their numbers with it
  (and ``evaluate`` with ``bounds_detail``, the same in words, when the program has it).
* ``initialize_from_data(images)``: called once with the training images before the
  first step of a new run (not on resume), e.g. to start an output bias at the data's mean.
* Views for figures and diagnostics (:mod:`pyro_vae.views`): ``z_dim``, ``image_shape``,
  ``posterior_mean(x)``, ``encode(x) -> (loc, scale)``, ``decode(z)``, ``sample_prior(n)``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import pyro
import torch
from pyro import poutine
from pyro.poutine.messenger import Messenger


def data_plate(x: torch.Tensor, num_data: int | None, index: torch.Tensor | None = None):
    """``pyro.plate("data")`` over the minibatch ``x``, told the data set's size ``num_data``.

    ``index``: the minibatch's positions in the data set (the training loop passes them
    to programs whose ``model`` and ``guide`` take ``index``), as the plate's subsample,
    so parameters kept per data point (Pyro's ``AutoNormal`` over the plate) belong to
    the right images. Without it, an explicit ``arange`` gives the plate the minibatch
    size without drawing a random permutation of the whole data set at every step.
    """
    batch = x.shape[0]
    size = batch if num_data is None else int(num_data)
    if size < batch:
        raise ValueError(f"num_data={size} is smaller than the minibatch of {batch} images")
    if index is not None:
        if index.shape != (batch,):
            raise ValueError(f"index has shape {tuple(index.shape)}; expected one position per image, ({batch},)")
        return pyro.plate("data", size=size, subsample=index)
    subsample = torch.arange(batch, device=x.device) if size != batch else None
    return pyro.plate("data", size=size, subsample=subsample)


class ProgramCall:
    """How the training loop and the evaluations call a program's ``model`` and ``guide``.

    Reads the two signatures once: which of ``y``, ``num_data`` and ``kl_weight`` they
    take. Pyro calls the model and the guide with the same arguments, so both must take
    the same ones.
    """

    def __init__(self, program):
        for name in ("model", "guide"):
            if not callable(getattr(program, name, None)):
                raise TypeError(f"{type(program).__name__} has no {name}() method; a program is a torch.nn.Module "
                                "with Pyro model(x, *, num_data) and guide(x, *, num_data) methods")
        if not isinstance(program, torch.nn.Module):
            raise TypeError(f"a program must be a torch.nn.Module that owns its learned tensors, "
                            f"got {type(program).__name__}")
        model = _arguments(program.model)
        # a guide that takes any arguments (Pyro's autoguides) is called with the model's;
        # a GuideMessenger (AutoNormalMessenger) calls the model with them itself
        guide = model if isinstance(poutine.unwrap(program.guide), Messenger) or _takes_anything(program.guide) \
            else _arguments(program.guide)
        self.takes = {}
        for arg in ("y", "num_data", "kl_weight", "index", "num_labelled"):
            if (arg in model) != (arg in guide):
                has, lacks = ("model", "guide") if arg in model else ("guide", "model")
                raise TypeError(f"{type(program).__name__}.{has} takes {arg} but its {lacks} does not; Pyro calls "
                                f"both with the same arguments, so give {lacks} a {arg}=None parameter")
            self.takes[arg] = arg in model
        if not self.takes["num_data"]:
            raise TypeError(f"{type(program).__name__}.model must take num_data=..., the size of the whole data set, "
                            "and tell its 'data' plate (pyro_vae.models.data_plate(x, num_data)), so that the "
                            "loss of a minibatch estimates the whole data set's")
        # semi-supervised: y is the labels of some images, in training only; "takes y" means
        # conditional (every image's label, in every call), which it is not
        self.semi_supervised = self.takes["num_labelled"]
        if self.semi_supervised and "y" not in model:
            raise TypeError(f"{type(program).__name__}.model takes num_labelled but not y; a semi-supervised program "
                            "takes both (y: the labels of the first len(y) images of x)")
        self.takes["y"] = self.takes["y"] and not self.semi_supervised
        self.program = program

    def kwargs(self, batch: dict[str, torch.Tensor], **options) -> dict:
        """The keyword arguments of one call: the batch's tensors and the options the program takes
        (``num_labelled`` goes to a semi-supervised program only, with the labels in ``batch["y"]``)."""
        out = {"x": batch["x"]}
        if (self.takes["y"] or self.semi_supervised) and batch.get("y") is not None:
            out["y"] = batch["y"]
        if self.takes["index"] and batch.get("index") is not None:
            out["index"] = batch["index"]
        for name, value in options.items():
            if name == "num_labelled" and not self.semi_supervised:
                continue
            if name == "kl_weight" and not self.takes["kl_weight"]:
                if value != 1:
                    raise TypeError(f"a KL weight of {value} needs a program whose model and guide take kl_weight; "
                                    f"{type(self.program).__name__} does not (train it with --beta 1 and no warm-up)")
                continue
            out[name] = value
        return out


def _takes_anything(fn) -> bool:
    params = inspect.signature(poutine.unwrap(fn)).parameters.values()
    return all(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params) and len(params) > 0


def _arguments(fn) -> set[str]:
    # a method under a Pyro handler (@config_enumerate) is read through the handler
    params = inspect.signature(poutine.unwrap(fn)).parameters.values()
    if any(p.kind is p.VAR_KEYWORD for p in params):
        return {"y", "num_data", "kl_weight"}
    return {p.name for p in params}


@dataclass(frozen=True)
class LocalFamily:
    """The per-image family of a program's guide over one latent site.

    ``parameters(x)``: the amortised parameters, a tuple of tensors ``(B, ...)``;
    ``distribution(*params)``: the guide's distribution of ``site`` given them (one event per image);
    ``constraints``: the support of each parameter (the optimiser works in unconstrained space).
    A program offers it through its ``local_family()`` view; :mod:`pyro_vae.posterior`
    optimises each image's parameters.
    """

    site: str
    parameters: Callable[[torch.Tensor], tuple[torch.Tensor, ...]]
    distribution: Callable[..., object]
    constraints: tuple

    def guide(self, params: Sequence[torch.Tensor]):
        """A Pyro guide drawing ``site`` from this family at ``params``, one member per image."""

        def guide(x, num_data=None, index=None, **_):
            with data_plate(x, num_data, index):
                pyro.sample(self.site, self.distribution(*params))

        return guide
