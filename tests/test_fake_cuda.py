"""The CUDA path without a GPU: a training step's forward pass on fake CUDA tensors.

torch's FakeTensorMode gives tensors a device and a shape but no storage, so a program
runs on "cuda" here: an operation that mixes a CUDA tensor with a CPU one fails as it
would on a GPU, and reading a value back to the host fails outright. What fake tensors
cannot reach is written in docs/performance.md: the backward pass (the autograd engine
asks the driver for a device context), fused Adam's kernel, and the recorded graph
(make_fx folds Pyro's subsample constants by running them on the real device).
"""

import contextlib
import pyro
import pytest
import torch
from torch._subclasses.fake_tensor import DataDependentOutputException, FakeTensorMode
from torch.utils._pytree import tree_leaves
from torch.utils._python_dispatch import TorchDispatchMode

from pyro_vae import ModelConfig, build_model
from pyro_vae.likelihoods import LIKELIHOODS
from pyro_vae.models import MODELS, ProgramCall
from pyro_vae.objectives import ESTIMATORS, EstimatorNotApplicable, build_elbo


def _moves_data(t) -> bool:
    # 0-dim CPU tensors enter CUDA kernels as scalars (the recorded KL weight is one),
    # and empty ones (Pyro makes a few while broadcasting shapes) move no data
    return isinstance(t, torch.Tensor) and t.dim() > 0 and t.numel() > 0


class DeviceAudit(TorchDispatchMode):
    """Operations that bring device data to the host, or mix host data into device work,
    and reads of a value back to the host: each a synchronisation (or a failure) on a GPU.
    (Host tensors that never meet device data, such as the index Pyro makes for its
    particles plate, cost nothing and are not counted.)"""

    def __init__(self):
        super().__init__()
        self.crossings, self.host_reads, self.ops = [], 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.host_reads += 1
        out = func(*args, **(kwargs or {}))
        self.ops += 1
        inputs = [t for t in tree_leaves((args, kwargs)) if _moves_data(t)]
        outputs = [t for t in tree_leaves(out) if _moves_data(t)]
        devices = {t.device.type for t in inputs + outputs}
        if "cuda" in devices and len(devices) > 1:
            self.crossings.append((str(func), sorted(devices), [tuple(t.shape) for t in inputs + outputs]))
        return out


def every_pair(models, likelihoods, estimators):
    """Combinations in which every model meets every likelihood, and each of them every
    estimator (a covering array of strength 2): a device leak lives in one family or where
    two meet, and this finds it in len(models) * len(likelihoods) forward passes instead
    of all the triples. The estimator of (model i, likelihood j) is number i + j, cyclically."""
    assert len(models) >= len(estimators) and len(likelihoods) >= len(estimators)  # else some pair is missed
    return [(m, l, estimators[(i + j) % len(estimators)])
            for i, m in enumerate(models) for j, l in enumerate(likelihoods)]


def test_every_pair_of_families_meets():
    names = MODELS.names(), LIKELIHOODS.names(), ESTIMATORS.names()
    cases = every_pair(*names)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert {(c[a], c[b]) for c in cases} == {(x, y) for x in names[a] for y in names[b]}


class NotOnFakeTensors(Exception):
    """This estimator cannot run this program, or cannot run on fake tensors."""


@pytest.mark.parametrize("model, likelihood, estimator",
                         every_pair(MODELS.names(), LIKELIHOODS.names(), ESTIMATORS.names()))
def test_a_training_forward_pass_stays_on_the_device_and_reads_nothing_back(model, likelihood, estimator):
    # where the pair's estimator does not apply to the model (or cannot run on fake
    # tensors), the next one that does takes its place: the model and likelihood still meet
    names = ESTIMATORS.names()
    first = names.index(estimator)
    reasons = []
    for name in names[first:] + names[:first]:
        try:
            loss, audit = forward_on_fake_cuda(model, likelihood, name)
            break
        except NotOnFakeTensors as err:
            reasons.append(str(err))
    else:
        pytest.skip("; ".join(reasons))
    assert loss.device.type == "cuda" and loss.shape == ()
    # (a program without a latent, the quadrant-completion baseline, makes fewer operations: 50 here)
    assert audit.ops > (40 if model == "cvae-baseline" else 50)
    assert audit.crossings == [] and audit.host_reads == 0, name


def forward_on_fake_cuda(model, likelihood, estimator):
    """One training forward pass of the program on fake CUDA tensors, audited: ``(loss, audit)``."""
    # the default device stays the CPU: a tensor made without the program's device lands
    # there, and the audit (or the fake device check of a mixed operation) reports it
    config = ModelConfig(model=model, likelihood=likelihood, z_dim=3, hidden_dims=(16,))
    with FakeTensorMode() as mode:
        try:
            with torch.device("cuda"):  # the program is built on the device; the forward runs outside this
                program = build_model(config, (1, 28, 20))
        except DataDependentOutputException:
            # Pyro's autoregressive networks build their masks from values (vae-iaf): build the
            # program for real on the CPU, then give it fake CUDA copies of its tensors
            with mode.avoid_fake_tensors() if hasattr(mode, "avoid_fake_tensors") else _unset(mode):
                program = build_model(config, (1, 28, 20))
            _fake_cuda_(program, mode)
        assert all(t.device.type == "cuda" for t in [*program.parameters(), *program.buffers()])
        grey = torch.rand(8, 1, 28, 20, device="cuda")
        x = torch.bernoulli(grey) if program.binary_data else grey
        loss_fn = build_elbo(estimator, num_particles=2)(program.model, program.guide)
        # a KL weight that is neither 0 nor 1 where the estimator has one (the importance-
        # weighted bounds refuse any, and any program without a KL term)
        for weight in (0.5, 1.0):
            kwargs = ProgramCall(program).kwargs({"x": x}, num_data=100, kl_weight=weight)
            try:
                with pyro.validation_enabled(False), pyro.get_param_store().scope(), DeviceAudit() as audit:
                    return loss_fn(**kwargs), audit
            except EstimatorNotApplicable as err:
                refused = err
            except DataDependentOutputException:
                reads = getattr(ESTIMATORS[estimator], "host_reads", None)
                if not reads:
                    raise
                raise NotOnFakeTensors(f"{estimator} reads values back to the host, which fake tensors do not "
                                       f"have: {reads}")
            except RuntimeError as err:
                if "ProvenanceTensor" not in str(err):
                    raise
                # (a program with a class drawn in the guide, m2 without enumeration)
                raise NotOnFakeTensors(f"{estimator} tracks where draws without rsample go through a tensor "
                                       "subclass of Pyro's, ProvenanceTensor, which cannot wrap a fake tensor")
        raise NotOnFakeTensors(f"{estimator} does not apply to {model}: {refused}")


@contextlib.contextmanager
def _unset(mode):
    """Run the block outside ``mode`` (real tensors)."""
    from torch.utils._python_dispatch import _disable_current_modes

    with _disable_current_modes():
        yield


def _fake_cuda_(module, mode) -> None:
    """Replace every parameter and buffer of ``module`` by a fake CUDA tensor of the same shape."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                sub._parameters[name] = torch.nn.Parameter(mode.from_tensor(p).to("cuda"), p.requires_grad)
        for name, b in list(sub._buffers.items()):
            if b is not None:
                sub._buffers[name] = mode.from_tensor(b).to("cuda")


def test_the_audit_sees_what_it_is_for():
    """A CPU tensor in a CUDA computation, and a host read, are caught here as on a GPU."""
    with FakeTensorMode():
        x = torch.ones(3, device="cuda")
        with DeviceAudit() as audit:
            x.cpu()  # a copy to the host
        assert audit.crossings
        with pytest.raises(RuntimeError):
            x + torch.ones(3)  # a CPU tensor made without the device: refused, as on CUDA
        with pytest.raises(Exception):
            float(x.sum())  # no value to read back
