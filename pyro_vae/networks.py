"""Encoder and decoder networks: plain ``torch.nn``, no Pyro inside.

An *encoder* maps a batch of flattened images ``x`` of shape ``(..., D)`` to the
parameters ``(loc, scale)`` of a diagonal Gaussian over ``z``, each ``(..., z_dim)``.
A *decoder* maps latents ``z`` of shape ``(..., z_dim)`` to unconstrained outputs of
shape ``(..., D)`` (logits, for the Bernoulli likelihood). Both accept any number of
leading batch dimensions, so the same networks serve a minibatch ``(B, D)`` and the
vectorised particles of an importance-sampled bound ``(K, B, D)``.
"""

from __future__ import annotations

import math
import os
import time
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .catalog import ACTIVATIONS, NETWORKS


SOFTPLUS_FORMS = ("torch", "exp-log")
SOFTPLUS_ENV = "PYRO_VAE_SOFTPLUS"  # "torch", "exp-log" or "auto" (the default): the CPU form


def softplus(h: torch.Tensor) -> torch.Tensor:
    """log(1 + e^h), the value of ``torch.nn.functional.softplus`` to float rounding.

    On the CPU, in the form :func:`cpu_softplus_form` chooses for this machine: torch's
    own, or :func:`exp_log_softplus` where torch's ``log1p`` is slow. On other devices it
    is torch's own, one kernel.
    """
    if h.device.type == "cpu" and cpu_softplus_form() == "exp-log":
        return exp_log_softplus(h)
    return F.softplus(h)


def exp_log_softplus(h: torch.Tensor) -> torch.Tensor:
    """softplus computed as max(h, 0) + log(1 + e^-|h|) with torch's ``exp`` and ``log``.

    torch's CPU softplus goes through ``log1p``, whose speed depends on the CPU: on one
    2-core AMD EPYC this project ran on it took 7 ns an element against about 1.2 ns for
    the plain exp/log form, on another 0.5 ns (docs/performance.md), so :func:`softplus`
    uses this form only where ``log1p`` measures slow.

    ``log(1 + u)`` alone loses the low bits of u = e^-|h| when ``1 + u`` is rounded, which
    costs relative accuracy wherever softplus is small (to 0 below h = -17 in float32,
    where the true value is e^h: a zero scale for the guide). The rounding error of
    ``w = 1 + u`` is exactly ``c = u - (w - 1)`` (Dekker's Fast2Sum, as u <= 1), and
    ``log(1 + u) = log(w) + c / w`` up to c^2 / 2, so the result is softplus to within 2
    units of the dtype's epsilon, relatively, for every h whose softplus is a normal
    float (h > -87 in float32; below that subnormal spacing is the limit), in both tails
    (``tests/test_networks.py``). Where w rounds to 1 the result is u itself.

    Without autograd it runs in place; with autograd out of place, and its gradient is
    sigmoid(h) to the same relative accuracy: the correction c is held constant (its
    derivative is the second-order term), -|h| is written ``h - 2 max(h, 0)`` so that
    its derivative is 1 at h = 0 and the gradient there is 1/2 (``abs`` would give 0),
    and no term of the gradient cancels another (with (h + |h|) / 2 for max(h, 0), the
    halves did, and the tail's tiny gradient was lost against them). One input is
    outside: h = +inf with autograd gives NaN (torch: inf); only a network already
    overflowing makes it, and training then stops on its non-finite check.
    """
    if h.requires_grad and torch.is_grad_enabled():
        positive = torch.relu(h)
        u = torch.exp(torch.add(h, positive, alpha=-2))
        w = u + 1
        c = ((u - (w - 1)) / w).detach()
        return torch.log(w).add(c).add(positive)
    u = h.abs().neg_().exp_()
    w = u + 1
    c = torch.sub(w, 1)
    torch.sub(u, c, out=c)  # the part of u that 1 + u rounded away, exactly
    return w.log().addcdiv_(c, w).add_(torch.relu(h))


_cpu_form: list[str] = []  # the choice, made once per process


def cpu_softplus_form() -> str:
    """Which softplus :func:`softplus` computes on the CPU: ``"torch"`` or ``"exp-log"``.

    ``$PYRO_VAE_SOFTPLUS`` sets it; unset or ``auto``, it is measured once per process by
    :func:`log1p_is_slow`. Both forms give softplus to within 2 epsilon of the dtype,
    relatively (a few units in the last place), so the choice moves results by rounding
    only, as another CPU does.
    """
    if not _cpu_form:
        wanted = softplus_setting()
        _cpu_form.append(wanted if wanted != "auto" else "exp-log" if log1p_is_slow() else "torch")
    return _cpu_form[0]


def softplus_setting() -> str:
    """``$PYRO_VAE_SOFTPLUS`` (``auto`` when unset), refused with a ``ValueError`` that
    says what to set if it is not a form (the command line checks it before any work)."""
    wanted = os.environ.get(SOFTPLUS_ENV, "auto")
    if wanted not in (*SOFTPLUS_FORMS, "auto"):
        raise ValueError(f"${SOFTPLUS_ENV}={wanted!r} is not a softplus form: use one of "
                         f"{', '.join(SOFTPLUS_FORMS)} or auto (measure which is faster), or unset it")
    return wanted


def set_cpu_softplus_form(form: str | None) -> None:
    """Make :func:`softplus` compute ``form`` on the CPU from now on (``None``: choose
    again, from ``$PYRO_VAE_SOFTPLUS`` or by measuring). A loss recorded by the captured
    engine keeps the form it was recorded with."""
    if form is not None and form not in SOFTPLUS_FORMS:
        raise ValueError(f"unknown softplus form {form!r}: use one of {', '.join(SOFTPLUS_FORMS)}")
    _cpu_form.clear()
    if form is not None:
        _cpu_form.append(form)


def log1p_is_slow(elements: int = 1 << 14, repeats: int = 9) -> bool:
    """Whether torch's CPU ``log1p`` takes more than twice as long as ``exp`` and ``log``
    together (:func:`log1p_cost_ratio` above 2).

    Where it is slow it is several times slower (7 ns an element against 1.2 on one
    machine), where it is not about as fast as ``exp`` alone; but the ratio is noisy (0.7
    to 1.6 on one Intel Xeon), so two processes may answer differently, and a run records
    its form in its checkpoint to resume with it.
    """
    return log1p_cost_ratio(elements, repeats) > 2


def log1p_cost_ratio(elements: int = 1 << 14, repeats: int = 9) -> float:
    """The time of torch's CPU ``log1p`` over that of ``exp`` and ``log`` together, by the
    fastest of ``repeats`` interleaved timings of each on ``elements`` values (after one
    untimed call of each: the first call of an operator pays its setup).

    About a millisecond, outside any recording (``torch.fx`` tracing included).
    ``elements`` stays below torch's parallel grain: one thread, as the ratio of
    per-element costs needs.
    """
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes(), torch.no_grad():
        h = torch.linspace(-20.0, 20.0, elements)
        positive = h.abs().add_(0.5)
        cases = {"log1p": (torch.log1p, positive), "exp": (torch.exp, h), "log": (torch.log, positive)}
        best = dict.fromkeys(cases, math.inf)
        for round_ in range(repeats + 1):
            for name, (op, x) in cases.items():
                start = time.perf_counter()
                op(x)
                if round_:
                    best[name] = min(best[name], time.perf_counter() - start)
    return best["log1p"] / (best["exp"] + best["log"])


class Softplus(nn.Module):
    """:func:`softplus` as a layer."""

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return softplus(h)


def activation(name: str) -> nn.Module:
    return ACTIVATIONS[name]()


def mlp(sizes: Sequence[int], act: str) -> nn.Sequential:
    """Linear layers of the given sizes with ``act`` between them (not after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i > 0:
            layers.append(activation(act))
        layers.append(nn.Linear(n_in, n_out))
    return nn.Sequential(*layers)


class GaussianHead(nn.Module):
    """Features -> (loc, scale) of a diagonal Gaussian; softplus keeps the scale positive."""

    def __init__(self, in_features: int, z_dim: int):
        super().__init__()
        self.loc = nn.Linear(in_features, z_dim)
        self.raw_scale = nn.Linear(in_features, z_dim)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.loc(h), softplus(self.raw_scale(h))


class MLPEncoder(nn.Module):
    """x (..., D) -> hidden layers -> (loc, scale) of q(z|x), each (..., z_dim)."""

    def __init__(self, x_dim: int, z_dim: int, hidden_dims: Sequence[int] = (400,), act: str = "softplus"):
        super().__init__()
        if not hidden_dims:
            raise ValueError("hidden_dims must name at least one hidden layer, e.g. (400,)")
        self.body = nn.Sequential(mlp([x_dim, *hidden_dims], act), activation(act))
        self.head = GaussianHead(hidden_dims[-1], z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.head(self.body(x))


class MLPDecoder(nn.Module):
    """z (..., z_dim) -> hidden layers (mirrored) -> outputs (..., D)."""

    def __init__(self, x_dim: int, z_dim: int, hidden_dims: Sequence[int] = (400,), act: str = "softplus"):
        super().__init__()
        self.net = mlp([z_dim, *reversed(hidden_dims), x_dim], act)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)

    @property
    def output_bias(self) -> torch.Tensor:
        """The bias of the last layer: one value per output."""
        return self.net[-1].bias


class ConvEncoder(nn.Module):
    """A small convolutional encoder for (C, H, W) images with H and W divisible by 4.

    Two stride-2 convolutions (32 and 64 channels) halve the image twice, then a
    hidden linear layer feeds the Gaussian head.
    """

    def __init__(self, image_shape: Sequence[int], z_dim: int, hidden_dims: Sequence[int] = (400,), act: str = "softplus"):
        super().__init__()
        c, h, w = _check_conv_shape(image_shape)
        self.image_shape = (c, h, w)
        hidden = hidden_dims[-1] if hidden_dims else 400
        self.body = nn.Sequential(
            nn.Conv2d(c, 32, 4, stride=2, padding=1),
            activation(act),
            nn.Conv2d(32, 64, 4, stride=2, padding=1),
            activation(act),
            nn.Flatten(),
            nn.Linear(64 * (h // 4) * (w // 4), hidden),
            activation(act),
        )
        self.head = GaussianHead(hidden, z_dim)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_shape = x.shape[:-1]
        h = self.body(x.reshape(-1, *self.image_shape))
        loc, scale = self.head(h)
        return loc.reshape(*batch_shape, -1), scale.reshape(*batch_shape, -1)


class ConvDecoder(nn.Module):
    """Mirror of :class:`ConvEncoder`: linear layers, then two stride-2 transposed convolutions."""

    def __init__(self, image_shape: Sequence[int], z_dim: int, hidden_dims: Sequence[int] = (400,), act: str = "softplus"):
        super().__init__()
        c, h, w = _check_conv_shape(image_shape)
        hidden = hidden_dims[-1] if hidden_dims else 400
        self.x_dim = c * h * w
        self.net = nn.Sequential(
            nn.Linear(z_dim, hidden),
            activation(act),
            nn.Linear(hidden, 64 * (h // 4) * (w // 4)),
            activation(act),
            nn.Unflatten(1, (64, h // 4, w // 4)),
            nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
            activation(act),
            nn.ConvTranspose2d(32, c, 4, stride=2, padding=1),
            nn.Flatten(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        batch_shape = z.shape[:-1]
        return self.net(z.reshape(-1, z.shape[-1])).reshape(*batch_shape, self.x_dim)


def _check_conv_shape(image_shape: Sequence[int]) -> tuple[int, int, int]:
    if len(image_shape) != 3 or image_shape[1] % 4 or image_shape[2] % 4:
        raise ValueError(
            f"the convolutional networks need an image shape (C, H, W) with H and W divisible by 4, "
            f"got {tuple(image_shape)}; use network='mlp' for other shapes"
        )
    return tuple(int(s) for s in image_shape)  # type: ignore[return-value]


def mlp_pair(image_shape: Sequence[int], z_dim: int, hidden_dims: Sequence[int], act: str):
    x_dim = math.prod(image_shape)
    return MLPEncoder(x_dim, z_dim, hidden_dims, act), MLPDecoder(x_dim, z_dim, hidden_dims, act)


def conv_pair(image_shape: Sequence[int], z_dim: int, hidden_dims: Sequence[int], act: str):
    return ConvEncoder(image_shape, z_dim, hidden_dims, act), ConvDecoder(image_shape, z_dim, hidden_dims, act)


def build_networks(
    kind: str, image_shape: Sequence[int], z_dim: int, hidden_dims: Sequence[int], act: str
) -> tuple[nn.Module, nn.Module]:
    """The (encoder, decoder) pair registered as ``kind`` in :data:`NETWORKS`."""
    return NETWORKS[kind](image_shape, z_dim, hidden_dims, act)
