"""One SVI step, three ways. All minimise the same Pyro ELBO of the same model and guide.

``svi``: :class:`pyro.infer.SVI` with :class:`pyro.optim.Adam`, the textbook loop. Pyro
keeps one torch optimiser per parameter tensor and returns the loss as a Python float,
which is a host synchronisation on CUDA at every step.

``module``: the ELBO as a :class:`torch.nn.Module` (``Trace_ELBO()(model, guide)``,
Pyro's PyTorch-native interface to the same estimator) with one multi-tensor
:class:`torch.optim.Adam` (``fused``). The loss stays a
device tensor, so the step never waits for the device.

``captured`` (the default): ``module``, with the ELBO's forward pass recorded once per
batch shape as a graph of tensor operations and replayed (:mod:`pyro_vae.capture`): the
same operations and random draws, without Pyro's per-step Python.

All three check for non-finite values before the optimiser moves: an engine raises
:class:`NonFiniteError` rather than take a poisoned step. The ``module`` and ``captured``
engines check as AMP's GradScaler does: one fused pass over the gradients sets a device
flag, ``found_inf``, and fused Adam skips the update on the device when it is set
(parameters, moments and step count untouched), so the flag is read after the step,
not before it. On the CPU it is read at once and the step raises. On CUDA the engines
record the first bad step in a device tensor and the loop reads it when it reports
progress, so no step waits for the GPU, and the skipped updates leave the parameters
clean (a poisoned state is never saved either way).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import sys

import pyro
import torch
from pyro import poutine
from pyro.infer.util import zero_grads

from .capture import CapturedLoss
from .catalog import ENGINES


class NonFiniteError(FloatingPointError):
    """The loss or a gradient is NaN or infinite."""


class SVIEngine:
    """:class:`pyro.infer.SVI`'s step with the gradients checked before Adam moves."""

    name = "svi"

    def __init__(self, program, model, guide, elbo, lr: float, validate: bool = True):
        self.model, self.guide, self.elbo = model, guide, elbo
        self.validate = validate
        self.optim = pyro.optim.Adam({"lr": lr})
        self.svi = pyro.infer.SVI(model, guide, self.optim, loss=elbo)

    group = None  # a distributed.Group: gradients summed over ranks (distribute())
    weight = 1.0  # this rank's share b_r / B of the step's minibatch, when distributed

    def distribute(self, group, program) -> None:
        """Sum each step's weighted gradients over the ranks of ``group`` before the update."""
        self.group = group
        self.all_params = [p for p in program.parameters() if p.requires_grad]

    def step(self, **kwargs) -> torch.Tensor:
        """One step on the minibatch and options in ``kwargs`` (``x=..., num_data=...``);
        distributed, a rank with no images this step calls it without arguments."""
        # SVI.step, opened up so the gradients can be checked between backward and update
        if kwargs:
            with poutine.trace(param_only=True) as capture, _non_finite_parameters(), \
                    pyro.validation_enabled(self.validate):
                loss = torch.as_tensor(self.elbo.loss_and_grads(self.model, self.guide, **kwargs), dtype=torch.float64)
            params = {site["value"].unconstrained() for site in capture.trace.nodes.values()}
        else:
            loss, params = torch.zeros((), dtype=torch.float64), set()
        if self.group is not None:
            params = self.all_params
            grads = _weighted_grads(params, self.weight)
            loss = self.group.all_reduce_(grads, loss * self.weight)
        _raise_if_non_finite(loss, [p.grad for p in params if p.grad is not None])
        self.optim(params)
        zero_grads(params)
        return loss

    def check(self) -> None:
        """Nothing deferred: every step was checked as it ran."""

    def set_lr(self, lr: float) -> None:
        """The learning rate of the following steps (Pyro keeps one torch Adam per tensor)."""
        self.optim.pt_optim_args["lr"] = lr  # for the tensors' optimisers created from now on
        groups = [g for optim in self.optim.optim_objs.values() for g in optim.param_groups]
        # a resumed run's states wait for their tensor's first step, carrying the rate they were saved with
        groups += [g for state in self.optim._state_waiting_to_be_consumed.values() for g in state["param_groups"]]
        for group in groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return self.optim.get_state()

    def load_state_dict(self, state: dict) -> None:
        self.optim.set_state(state)


class ModuleEngine:
    """The ELBO as a torch module, stepped by one multi-tensor Adam; no host syncs on CUDA."""

    name = "module"

    def __init__(self, program, model, guide, elbo, lr: float, validate: bool = True):
        self.loss_fn = elbo(model, guide)
        self.validate = validate
        self.params = [p for p in program.parameters() if p.requires_grad]
        cuda = self.params[0].is_cuda
        self.optim = multi_tensor_adam(self.params, lr)
        self.deferred = cuda  # on CUDA, checks are read later instead of synchronising now
        self.steps = 0
        device = self.params[0].device
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        # the non-finite check as AMP's GradScaler does it: one fused pass over the
        # gradients sets found_inf, which fused Adam reads on the device to skip the update
        self.found_inf = None
        if self.optim.defaults.get("fused") and hasattr(torch, "_amp_foreach_non_finite_check_and_unscale_"):
            self.found_inf = torch.zeros((), device=device)
            self.optim.found_inf = self.found_inf
            self._one = torch.ones((), device=device)
            self._loss_bad = torch.zeros((), dtype=torch.bool, device=device)

    group = None  # a distributed.Group: gradients summed over ranks (distribute())
    weight = 1.0  # this rank's share b_r / B of the step's minibatch, when distributed

    def distribute(self, group, program) -> None:
        """Sum each step's weighted gradients over the ranks of ``group`` before the update."""
        self.group = group

    def step(self, **kwargs) -> torch.Tensor:
        """One step on the minibatch and options in ``kwargs`` (``x=..., num_data=...``);
        distributed, a rank with no images this step calls it without arguments."""
        self.optim.zero_grad(set_to_none=True)
        if kwargs:
            with _non_finite_parameters(), pyro.validation_enabled(self.validate):
                loss = self.loss_fn(**kwargs)
            loss.backward()
        else:
            loss = torch.zeros((), device=self.params[0].device)
        if self.group is not None:
            loss = self.group.all_reduce_(_weighted_grads(self.params, self.weight), loss.detach() * self.weight)
        grads = [p.grad for p in self.params if p.grad is not None]
        self.steps += 1
        if self.found_inf is None:  # an Adam that cannot skip by itself: check, then step
            if self.deferred:
                bad = _non_finite(loss, grads)
                self.first_bad = torch.where(self.first_bad.lt(0) & bad, self.steps, self.first_bad)
            else:
                _raise_if_non_finite(loss, grads)
            self.optim.step()
            return loss.detach()
        # fused Adam leaves parameters, moments and step count untouched when found_inf
        # is set (as under AMP's GradScaler), so the check need not be read before the update
        torch.logical_not(torch.isfinite(loss.detach()), out=self._loss_bad)
        self.found_inf.copy_(self._loss_bad)
        if grads:
            torch._amp_foreach_non_finite_check_and_unscale_(grads, self.found_inf, self._one)
        self.optim.step()
        if self.deferred:
            self.first_bad = torch.where(self.first_bad.lt(0) & self.found_inf.bool(), self.steps, self.first_bad)
        elif bool(self.found_inf):
            _raise_if_non_finite(loss, grads)
        return loss.detach()

    def check(self) -> None:
        """Raise if a deferred check failed; reading it synchronises with the device."""
        if self.deferred and int(self.first_bad) >= 0:
            back = self.steps - int(self.first_bad)
            raise NonFiniteError(f"the loss or a gradient was NaN or infinite {back} step(s) before the last one")

    def set_lr(self, lr: float) -> None:
        """The learning rate of the following steps."""
        for group in self.optim.param_groups:
            group["lr"] = lr

    def state_dict(self) -> dict:
        return self.optim.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.optim.load_state_dict(state)


def _weighted_grads(params, weight: float) -> list[torch.Tensor]:
    """Every parameter's gradient times ``weight``, a zero tensor where it has none (the
    ranks' flat all-reduce needs the same layout everywhere; Adam moves nothing on a zero
    gradient it has only ever seen zero)."""
    grads = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        elif weight != 1.0:
            p.grad.mul_(weight)
        grads.append(p.grad)
    return grads


def multi_tensor_adam(params, lr: float) -> torch.optim.Adam:
    """Adam over all parameters at once: ``fused`` (one kernel per tensor, no temporaries;
    on the CPU 0.67 ms against ``foreach``'s 1.27 ms in a step of the default network at
    batch 128, docs/performance.md), ``foreach`` where this torch has no fused Adam for
    the device."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # torch < 2.4 fuses on CUDA only
        return torch.optim.Adam(params, lr=lr, foreach=True)


@contextlib.contextmanager
def _non_finite_parameters():
    """Pyro's validation rejects NaN distribution parameters (NaN logits, say) with a
    ValueError; report it as the non-finite value it is."""
    try:
        yield
    except ValueError as err:
        if "found invalid values" not in str(err):
            raise
        raise NonFiniteError(f"NaN or infinite values reached a distribution: {str(err).splitlines()[0]}") from err


def _non_finite(loss: torch.Tensor, grads) -> torch.Tensor:
    """A device boolean: is the loss, or any gradient element, NaN or infinite?

    One multi-tensor 2-norm over all gradients (NaN or inf when an element is; it also
    overflows, rightly flagged, for gradients beyond ~1e19) instead of a check per tensor:
    0.07 ms instead of 1.3 ms per step for the default network on the CPU.
    """
    bad = ~torch.isfinite(loss)
    if grads:
        bad = bad | ~torch.isfinite(torch.stack(torch._foreach_norm(grads))).all()
    return bad


def _raise_if_non_finite(loss: torch.Tensor, grads) -> None:
    loss = loss.detach()
    if bool(_non_finite(loss, grads)):
        if not bool(torch.isfinite(loss)):
            raise NonFiniteError(f"the loss is {float(loss)}")
        raise NonFiniteError("a gradient holds NaN or infinite values (the loss was finite)")


class CapturedEngine(ModuleEngine):
    """:class:`ModuleEngine` replaying a recording of the ELBO's forward pass."""

    name = "captured"

    def __init__(self, program, model, guide, elbo, lr: float, validate: bool = True):
        super().__init__(program, model, guide, elbo, lr, validate)
        self.loss_fn = CapturedLoss(self.loss_fn, program)


def keep_freed_memory() -> bool:
    """Ask glibc's ``malloc`` to keep memory that torch frees inside the process (CPU).

    A training step allocates and frees the same large buffers (at batch 1024 each
    decoder-sized tensor is 3 MiB) thousands of times. By default glibc serves blocks of
    that size with fresh ``mmap`` pages and hands freed memory at the heap's top back to
    the kernel, so every step pays page faults to get zeroed pages again; on a virtual
    machine these are slow and erratic (docs/performance.md measures both). A fixed
    mmap threshold of 32 MiB (glibc's ceiling) and a 1 GiB trim threshold keep those
    buffers in the heap for reuse. Affects the whole process, like the environment
    variables ``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` it mirrors.

    Returns whether both settings took (False off Linux/glibc: nothing is changed).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl) or none found
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # from glibc's malloc.h
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 1 << 30))


def build_engine(name: str, program, model, guide, elbo, lr: float, validate: bool = True):
    """The engine ``name`` training ``program``'s parameters. ``validate=False`` runs the
    steps with Pyro's validation off: for callers that checked all of the data beforehand
    (the training loop does)."""
    return ENGINES[name](program, model, guide, elbo, lr, validate)


BURDA_STAGES = 8  # Burda et al. (2016): stage i of 3^i passes at lr * 10^(-i/7), 3,280 passes in all


def learning_rate(lr: float, schedule: str, epoch: int) -> float:
    """The learning rate of epoch ``epoch`` (counted from 0).

    ``constant``: ``lr`` throughout. ``burda``: Burda et al.'s schedule, epoch by epoch:
    stage i (i = 0..7) lasts 3^i epochs at ``lr * 10^(-i/7)`` (1 + 3 + ... + 2187 = 3,280
    epochs), and later epochs stay at the last stage's rate. A run of E < 3,280 epochs
    takes the paper's first E epochs. The rate depends on the epoch alone, so a resumed
    run, or one resumed with more epochs, takes the rates an uninterrupted run would.
    """
    if schedule == "constant":
        return lr
    if schedule != "burda":
        raise ValueError(f"unknown lr_schedule {schedule!r}; choose constant or burda")
    stage = 0
    while stage < BURDA_STAGES - 1 and epoch >= (3 ** (stage + 1) - 1) // 2:
        stage += 1
    return lr * 10 ** (-stage / 7)


class LearnedTensorError(TypeError):
    """A program holds a learned tensor that some engine would not train or no checkpoint save."""


def check_learned_tensors(program, model, guide, engine: str, **kwargs) -> int:
    """Refuse a program whose learned tensors the engines would treat differently.

    What a run learns is the program's parameters: the ``module`` and ``captured`` engines
    train ``program.parameters()`` and checkpoints save ``program.state_dict()``, while
    ``svi`` trains what Pyro's param store sees in the model and guide. So a ``pyro.param``
    that the module does not own would be trained by ``svi`` alone and saved by none,
    and a parameter never registered with Pyro (``pyro.module``) would be left untrained
    by ``svi``. One call of the model and guide on ``kwargs`` (one minibatch) shows which
    tensors Pyro sees; either mismatch raises :class:`LearnedTensorError` naming the tensor.

    The same call creates the parameters a program makes on its first call (Pyro's
    autoguides), refuses a guide Pyro's ELBOs would mis-score
    (:func:`pyro_vae.scoring.check_guide`), and returns the program's plate depth.
    """
    from .scoring import check_guide, trace_depth

    with torch.no_grad(), poutine.trace(param_only=True) as params:
        guide_trace = poutine.trace(guide).get_trace(**kwargs)
        model_trace = poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(**kwargs)
    check_guide(guide, guide_trace, kwargs)
    seen = {name: site["value"].unconstrained() for name, site in params.trace.nodes.items()}
    owned = {id(p) for p in program.parameters()}
    name = type(program).__name__
    for param_name, tensor in seen.items():
        if id(tensor) not in owned:
            raise LearnedTensorError(
                f"pyro.param({param_name!r}) is not a parameter of the {name} module: the module engines would "
                "not train it and no checkpoint would save it. Make it an nn.Parameter of the module "
                f"(self.w = nn.Parameter(...), registered with pyro.module) or a PyroParam of a PyroModule")
    if engine == "svi":
        registered = {id(t) for t in seen.values()}
        for param_name, p in program.named_parameters():
            if p.requires_grad and id(p) not in registered:
                raise LearnedTensorError(
                    f"parameter {param_name!r} of {name} is not registered with Pyro in its model or guide, so "
                    "engine 'svi' (pyro.infer.SVI) would leave it untrained; register the submodule that owns it "
                    "with pyro.module(...) in the model or guide, or train with --engine module or captured")
    return trace_depth(model_trace, guide_trace)
