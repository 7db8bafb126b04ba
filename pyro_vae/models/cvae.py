r"""Quadrant completion: the conditional VAE of Sohn, Lee & Yan (2015) and its deterministic
baseline, as Pyro's CVAE tutorial sets the task on MNIST.

Each image x is split by a fixed mask into the pixels shown, :math:`x_s`, and the pixels
hidden, :math:`x_h` (:func:`quadrant_mask`: 1 quadrant shown is the bottom-left one, 2 the
left half, 3 all but the bottom-right one). The data stays the whole image; the programs
split it, and score the hidden pixels given the shown ones.

The conditional VAE (``--model cvae``, :class:`ConditionalVAE`), for each image:

.. math::

    z \mid x_s \sim \mathcal{N}\big(\mu_\theta(x_s), \operatorname{diag}\sigma_\theta(x_s)^2\big)
        \quad\text{(prior network)}, \qquad
    x_h \mid x_s, z \sim \text{the likelihood}(g_\theta(z)) \quad\text{(generation network)},

with the recognition network as guide,
:math:`q_\phi(z \mid x_s, x_h) = \mathcal{N}(\mu_\phi(x), \operatorname{diag}\sigma_\phi(x)^2)`.
Any Pyro ELBO of ``(model, guide)`` then bounds the conditional log-likelihood,

.. math::

    \log p(x_h \mid x_s) \ge \mathbb{E}_q[\log p(x_h \mid x_s, z)]
        - \mathrm{KL}\big(q(z \mid x_s, x_h) \,\|\, p(z \mid x_s)\big),

and the importance-sampled bound of :mod:`pyro_vae.evaluate` estimates
:math:`\log p(x_h \mid x_s)` itself: the sites are ``"z"`` and ``"x_hidden"`` (observed), the
shown pixels are what the program is conditioned on and no site. As in the tutorial, the
generation network reads z alone (x_s reaches it through the prior).

The baseline (``--model cvae-baseline``, :class:`CompletionBaseline`) is the tutorial's
deterministic network: :math:`x_h \mid x_s \sim \text{the likelihood}(f_\theta(x_s))`, no
latent, so its ELBO is :math:`\log p(x_h \mid x_s)` exactly. A conditional VAE given a
finished baseline run (``--baseline RUN``) feeds the baseline's guess of the hidden pixels
to its prior network beside the shown ones, as the tutorial does ("the CVAE is built on
top of the NN"); the baseline's weights are copied into the new run and stay frozen.

The networks read and write only the pixels they are about: the prior network the shown
pixels (and the baseline's guess of the hidden ones), the generation network the hidden
pixels' outputs. The tutorial's networks read and write whole images with the other
pixels set to -1 or ignored; at a fixed mask the two are the same functions (a constant
input is a bias; an output nothing reads has no gradient).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import pyro
import torch
from torch import nn

from .. import checkpoint
from ..distributions import DiagonalNormal
from ..likelihoods import build_likelihood
from ..networks import MLPDecoder, MLPEncoder, mlp
from ..protocol import LocalFamily, data_plate
from .vae import flat_images, kl_scaled

QUADRANTS = {1: "the bottom-left quadrant", 2: "the left half", 3: "all but the bottom-right quadrant"}


def quadrant_mask(image_shape: Sequence[int], quadrants: int) -> torch.Tensor:
    """Which pixels are shown, a bool tensor of ``image_shape`` ``(C, H, W)`` (every channel alike).

    As Pyro's CVAE tutorial splits MNIST: 1 quadrant shown is the bottom-left one, 2 the
    left half (top-left and bottom-left), 3 all but the bottom-right one. Rows ``H // 2``
    and below are the bottom, columns below ``W // 2`` the left.
    """
    if quadrants not in QUADRANTS:
        raise ValueError(f"quadrants must be 1, 2 or 3 (the quadrants shown), got {quadrants!r}")
    if len(image_shape) != 3 or image_shape[1] < 2 or image_shape[2] < 2:
        raise ValueError(f"quadrant completion needs images (C, H, W) at least 2 x 2, got {tuple(image_shape)}")
    _, h, w = (int(s) for s in image_shape)
    top = torch.arange(h).unsqueeze(1) < h // 2
    left = torch.arange(w).unsqueeze(0) < w // 2
    shown = {1: ~top & left, 2: left.expand(h, w), 3: top | left}[quadrants]
    return shown.expand(*image_shape).clone()


class _QuadrantSplit(nn.Module):
    """What the two programs share: the fixed split of each image into shown and hidden
    pixels, the likelihood of the hidden ones, and the data checks."""

    point_estimate = False
    bounds = "log p(x_hidden | x_shown)"  # what the ELBO and the importance-sampled bound are of (evaluate)

    def __init__(self, image_shape: Sequence[int], quadrants: int, likelihood: nn.Module):
        super().__init__()
        self.image_shape = tuple(int(s) for s in image_shape)
        self.quadrants = int(quadrants)
        self.x_dim = math.prod(self.image_shape)
        shown = quadrant_mask(self.image_shape, quadrants).reshape(-1)
        # positions in the flattened image; derived from the configuration, so not saved
        self.register_buffer("shown_index", shown.nonzero().squeeze(1), persistent=False)
        self.register_buffer("hidden_index", (~shown).nonzero().squeeze(1), persistent=False)
        self.likelihood = likelihood
        self._likelihood_learns = any(True for _ in self.likelihood.parameters())

    @property
    def binary_data(self) -> bool:
        return bool(self.likelihood.binary)

    @property
    def bounds_detail(self) -> str:
        """What :attr:`bounds` is of, in words, for ``evaluate``'s report."""
        hidden = self.hidden_index.numel()
        return (f"the {hidden} hidden pixels of each image given its {self.x_dim - hidden} shown ones "
                f"({QUADRANTS[self.quadrants]} shown)")

    @property
    def hidden_mask(self) -> torch.Tensor:
        """Which pixels the program predicts: a bool tensor of ``image_shape``."""
        mask = torch.zeros(self.x_dim, dtype=torch.bool, device=self.hidden_index.device)
        mask[self.hidden_index] = True
        return mask.reshape(self.image_shape)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x_shown, x_hidden)`` of flattened images ``(..., D)``: ``(..., S)`` and ``(..., D - S)``."""
        return x.index_select(-1, self.shown_index), x.index_select(-1, self.hidden_index)

    def fill(self, x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Images ``x`` ``(B, ...)`` with their hidden pixels replaced by ``hidden`` ``(..., B, D - S)``,
        as images ``(..., B, *image_shape)``."""
        flat = self._flatten(x, check=False).expand(*hidden.shape[:-1], self.x_dim).clone()
        flat[..., self.hidden_index] = hidden.to(flat.dtype)
        return flat.reshape(*hidden.shape[:-1], *self.image_shape)

    def check_data(self, x: torch.Tensor, what: str = "data") -> None:
        """Raise unless the likelihood can score every pixel of ``x`` (shown ones too: any may be hidden
        in another task, and a binary likelihood's shown pixels are binary data as well)."""
        self.likelihood.check_data(self._flatten(x, check=False), what)

    def _register_likelihood(self) -> None:
        if self._likelihood_learns:
            pyro.module("likelihood", self.likelihood)

    def _flatten(self, x: torch.Tensor, check: bool = True) -> torch.Tensor:
        return flat_images(self, x, check)


class CompletionBaseline(_QuadrantSplit):
    """The tutorial's deterministic baseline: x_hidden | x_shown ~ the likelihood(f(x_shown)).

    :param network: ``x_shown (..., S) -> (..., (D - S) * outputs_per_pixel)``, the likelihood's
        parameters for the hidden pixels.

    No latent: the guide samples nothing, and the ELBO is log p(x_hidden | x_shown) itself.
    """

    local_family = None  # nothing to optimise per image: there is no latent

    def __init__(self, network: nn.Module, image_shape: Sequence[int], quadrants: int, likelihood: nn.Module):
        super().__init__(image_shape, quadrants, likelihood)
        self.network = network

    def model(self, x, *, num_data=None, kl_weight=1.0):
        """p(x_hidden | x_shown), one event of the hidden pixels per image (``kl_weight`` weights the
        latent sites, of which there are none: the objective is the same at every weight)."""
        pyro.module("network", self.network)
        self._register_likelihood()
        shown, hidden = self.split(self._flatten(x))
        with data_plate(x, num_data):
            pyro.sample("x_hidden", self.likelihood(self.network(shown)), obs=hidden)

    def guide(self, x, *, num_data=None, kl_weight=1.0):
        """Nothing to infer: the model has no latent."""

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean of the hidden pixels given the shown ones, ``(B, D - S)``."""
        shown, _ = self.split(self._flatten(x, check=False))
        return self.likelihood.mean(self.network(shown))

    @torch.no_grad()
    def complete(self, x: torch.Tensor, num: int = 1) -> torch.Tensor:
        """``x`` with its hidden pixels filled by the prediction: ``(1, B, *image_shape)`` (one: it is deterministic)."""
        return self.fill(x, self.predict(x).unsqueeze(0))


class ConditionalVAE(_QuadrantSplit):
    """The conditional VAE of the module's docstring: prior p(z | x_shown), generation
    p(x_hidden | z), recognition q(z | x_shown, x_hidden) as guide; sites ``"z"`` and ``"x_hidden"``.

    :param prior_net: ``(..., S [+ D - S with a baseline]) -> (loc, scale)`` of p(z | x_shown).
    :param recognition_net: ``x (..., D) -> (loc, scale)`` of q(z | x_shown, x_hidden).
    :param generation_net: ``z (..., z_dim) -> (..., (D - S) * outputs_per_pixel)``.
    :param baseline: a :class:`CompletionBaseline`'s network, frozen (its weights are buffers:
        saved with the run, trained by nothing), whose guess of the hidden pixels the prior
        network reads beside the shown ones; or None.
    """

    def __init__(self, prior_net: nn.Module, recognition_net: nn.Module, generation_net: nn.Module, z_dim: int,
                 image_shape: Sequence[int], quadrants: int, likelihood: nn.Module,
                 baseline: nn.Module | None = None):
        super().__init__(image_shape, quadrants, likelihood)
        self.prior_net = prior_net
        self.recognition_net = recognition_net
        self.generation_net = generation_net
        self.z_dim = int(z_dim)
        self.baseline = frozen(baseline) if baseline is not None else None
        self.baseline_from: str | None = None  # a run folder to copy the baseline's weights from, before training

    def condition(self, shown: torch.Tensor) -> torch.Tensor:
        """What the prior network reads: the shown pixels, and the baseline's guess of the hidden ones."""
        if self.baseline is None:
            return shown
        guess = self.likelihood.mean(self.baseline(shown))  # (no gradient: its weights are buffers)
        return torch.cat([shown, guess.to(shown.dtype)], -1)

    def conditional_prior(self, shown: torch.Tensor):
        """p(z | x_shown) = N(loc(x_shown), diag scale(x_shown)^2)."""
        return DiagonalNormal.of(*self.prior_net(self.condition(shown)))

    def model(self, x, *, num_data=None, kl_weight=1.0):
        """p(x_hidden, z | x_shown) = p(z | x_shown) p(x_hidden | z); ``kl_weight`` weights ``"z"``
        (here and in the guide), as the VAE's does."""
        pyro.module("prior_net", self.prior_net)
        pyro.module("generation_net", self.generation_net)
        self._register_likelihood()
        shown, hidden = self.split(self._flatten(x))
        with data_plate(x, num_data):
            with kl_scaled(kl_weight):
                z = pyro.sample("z", self.conditional_prior(shown))
            out = self.generation_net(z)
            pyro.sample("x_hidden", self.likelihood(out), obs=hidden)
        return out

    def guide(self, x, *, num_data=None, kl_weight=1.0):
        """q(z | x_shown, x_hidden) = N(loc(x), diag scale(x)^2), sampled by reparameterisation."""
        pyro.module("recognition_net", self.recognition_net)
        x = self._flatten(x)
        with data_plate(x, num_data):
            with kl_scaled(kl_weight):
                pyro.sample("z", DiagonalNormal.of(*self.recognition_net(x)))

    def initialize_from_data(self, images: torch.Tensor) -> None:
        """Before a new run's first step: copy the baseline run's weights (``--baseline RUN``)."""
        if self.baseline_from is not None:
            load_baseline(self, self.baseline_from)

    # -- views, for figures and diagnostics (pyro_vae.views) ----------------------------

    def local_family(self) -> LocalFamily:
        """The guide's per-image family, N(loc, diag scale^2) over ``"z"`` (pyro_vae.posterior)."""
        from torch.distributions import constraints

        return LocalFamily("z", lambda x: self.recognition_net(self._flatten(x, check=False)), DiagonalNormal.of,
                           (constraints.real, constraints.positive))

    def posterior_mean(self, x: torch.Tensor) -> torch.Tensor:
        """E_q[z | x_shown, x_hidden] for a batch of images."""
        return self.recognition_net(self._flatten(x, check=False))[0]

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor | None:
        """The baseline's guess of the hidden pixels ``(B, D - S)``, or None without a baseline."""
        if self.baseline is None:
            return None
        shown, _ = self.split(self._flatten(x, check=False))
        return self.likelihood.mean(self.baseline(shown))

    @torch.no_grad()
    def complete(self, x: torch.Tensor, num: int = 1) -> torch.Tensor:
        """``num`` completions of each image from its shown pixels alone: z ~ p(z | x_shown), the
        hidden pixels at their mean E[x_hidden | z] (as the tutorial shows them);
        ``(num, B, *image_shape)``."""
        shown, _ = self.split(self._flatten(x, check=False))
        z = self.conditional_prior(shown).sample((num,))
        return self.fill(x, self.likelihood.mean(self.generation_net(z)))


def frozen(module: nn.Module) -> nn.Module:
    """``module`` with each parameter turned into a buffer of the same name: saved and loaded
    with the state, moved with the module, trained by no engine and seen by no optimiser."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            del sub._parameters[name]
            sub.register_buffer(name, None if p is None else p.detach())
    return module


def load_baseline(program: ConditionalVAE, run_dir: str | Path) -> None:
    """Copy the network of a finished ``cvae-baseline`` run into ``program.baseline``, after
    checking it was trained for the same task with the same network."""
    run_dir = Path(run_dir)
    path = run_dir / checkpoint.CHECKPOINT_NAME
    if not path.is_file():
        raise ValueError(f"--baseline {run_dir}: no checkpoint there; train the baseline first: pyro-vae train "
                         f"--model cvae-baseline --quadrants {program.quadrants} --out {run_dir}")
    state = checkpoint.load(path)
    config = state.get("config", {}).get("model", {}) if isinstance(state.get("config"), dict) else {}
    if config.get("model") != "cvae-baseline":
        raise ValueError(f"--baseline {run_dir} is a run of model {config.get('model')!r}; it must be a "
                         "cvae-baseline run")
    wanted = program.model_config
    for name in ("quadrants", "hidden_dims", "activation", "likelihood"):
        theirs, ours = config.get(name), getattr(wanted, name)
        if (tuple(theirs) if isinstance(theirs, list) else theirs) != ours:
            raise ValueError(f"--baseline {run_dir} was trained with {name} {theirs!r}, this cvae has {ours!r}; "
                             "the baseline must have the same --quadrants, --hidden-dims, --activation and "
                             "--likelihood")
    weights = {k[len("network."):]: v for k, v in state["model"].items() if k.startswith("network.")}
    program.baseline.load_state_dict(weights)


def _check_family(config, name: str) -> None:
    if config.network != "mlp":
        raise ValueError(f"model {name!r} is built of fully connected layers; use --network mlp, not {config.network!r}")
    if config.decoder_bias != "random":
        raise ValueError(f"model {name!r} has no decoder bias to start at the data's mean; leave out --decoder-bias")


def _outputs(likelihood, hidden: int) -> int:
    return hidden * getattr(likelihood, "outputs_per_pixel", 1)


def baseline_network(config, shown: int, hidden: int, likelihood) -> nn.Module:
    """The baseline's network: the shown pixels through ``hidden_dims`` to the hidden pixels' outputs."""
    return mlp([shown, *config.hidden_dims, _outputs(likelihood, hidden)], config.activation)


def completion_baseline_from_config(config, image_shape: Sequence[int]) -> CompletionBaseline:
    config.refuse_unused(uses=("quadrants",))
    _check_family(config, "cvae-baseline")
    shown = int(quadrant_mask(image_shape, config.quadrants).sum())
    hidden = math.prod(image_shape) - shown
    likelihood = build_likelihood(config.likelihood, hidden)
    return CompletionBaseline(baseline_network(config, shown, hidden, likelihood), image_shape, config.quadrants,
                              likelihood)


def conditional_vae_from_config(config, image_shape: Sequence[int]) -> ConditionalVAE:
    config.refuse_unused(uses=("quadrants", "baseline"))
    _check_family(config, "cvae")
    dims, act = tuple(config.hidden_dims), config.activation
    x_dim = math.prod(image_shape)
    shown = int(quadrant_mask(image_shape, config.quadrants).sum())
    hidden = x_dim - shown
    likelihood = build_likelihood(config.likelihood, hidden)
    baseline = baseline_network(config, shown, hidden, likelihood) if config.baseline is not None else None
    condition = shown + (hidden if baseline is not None else 0)
    program = ConditionalVAE(MLPEncoder(condition, config.z_dim, dims, act), MLPEncoder(x_dim, config.z_dim, dims, act),
                             MLPDecoder(_outputs(likelihood, hidden), config.z_dim, dims, act), config.z_dim,
                             image_shape, config.quadrants, likelihood, baseline)
    program.baseline_from = config.baseline
    return program
