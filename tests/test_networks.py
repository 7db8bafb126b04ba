"""The networks' softplus: torch's value, in the form that is faster on this machine's CPU."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pyro_vae import networks
from pyro_vae.networks import exp_log_softplus, softplus


@pytest.fixture
def form():
    """Set the CPU softplus form for one test; the process's own choice comes back after."""
    before = networks.cpu_softplus_form()
    yield networks.set_cpu_softplus_form
    networks.set_cpu_softplus_form(before)


# the reference: softplus and sigmoid in numpy's long double (64 or 113 bits of mantissa
# on x86-64 and aarch64 Linux), where float64's rounding is far below what is tested
EXTENDED = np.finfo(np.longdouble).eps < np.finfo(np.float64).eps / 1000


def exact(h: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """softplus(h) and sigmoid(h) in long double: references for float32 and float64."""
    x = h.detach().double().numpy().astype(np.longdouble)
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x))), 1 / (1 + np.exp(-x))


def within(ours: torch.Tensor, reference: np.ndarray, ulps: float) -> bool:
    """|ours - reference| <= ulps * eps * |reference|, plus the spacing of subnormals,
    which is all the precision a result below the smallest normal float has."""
    info = torch.finfo(ours.dtype)
    err = np.abs(ours.detach().double().numpy().astype(np.longdouble) - reference)
    return bool((err <= ulps * info.eps * np.abs(reference) + info.smallest_normal * info.eps).all())


def span(dtype) -> torch.Tensor:
    """h from -100 to 100 densely, and the points where a tail or the form changes."""
    special = [0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, -15.9, -16.7, -17.0, -20.0, -36.0, -37.5, 17.0, 20.0,
               20.5, 36.0, 37.5, -87.3, -87.4, 88.0, 89.0]
    return torch.cat([torch.linspace(-100.0, 100.0, 400_001, dtype=dtype), torch.tensor(special, dtype=dtype)])


@pytest.mark.skipif(not EXTENDED, reason="numpy's long double is float64 on this platform: no finer reference")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_exp_log_form_is_softplus_to_two_epsilon_relatively_in_both_tails(dtype):
    """Below h = -17 (float32) the plain exp/log form returned 0 where softplus is e^h,
    and from about -10 on it lost the low bits of e^h: relative error up to 100 %. Now
    the value and the gradient are within 2 epsilon of the dtype, relatively, from
    h = -100 to 100 (measured: 1.4), as torch's own are; in float32 the results below
    h = -87.3 are subnormal floats, correct to the spacing of subnormals."""
    h = span(dtype)
    softplus_h, sigmoid_h = exact(h)
    ours = exp_log_softplus(h.clone())
    assert ours.dtype == dtype and within(ours, softplus_h, 2)
    assert (ours[h < -17] > 0).all()  # (the old form: 0, a zero scale for the guide)
    # the reference is right: torch's own is within the bound too, where it computes softplus
    # (above h = 20 it returns h itself) to a normal float
    computed = (h <= 20) & (h > -87)
    assert within(F.softplus(h)[computed], softplus_h[computed.numpy()], 2)

    tracked = h.clone().requires_grad_()
    with_grad = exp_log_softplus(tracked)
    with_grad.sum().backward()
    assert within(with_grad, softplus_h, 2) and within(tracked.grad, sigmoid_h, 2)
    reference = h.clone().requires_grad_()
    F.softplus(reference).sum().backward()
    # and agrees with torch's, which is sigmoid(h) to the same bound where it computes it
    # (above h = 20 it is 1, in float64 2e-9 off; ours is sigmoid(h) there too)
    assert within(tracked.grad[computed], reference.grad[computed].double().numpy().astype(np.longdouble), 4)
    assert torch.equal(h, span(dtype))  # the input is not written


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_exp_log_form_at_zero_the_extremes_and_nan(dtype):
    info = torch.finfo(dtype)
    h = torch.tensor([0.0, -0.0, info.max, -info.max, float("inf"), float("-inf")], dtype=dtype)
    expected = torch.tensor([math.log(2), math.log(2), info.max, 0.0, float("inf"), 0.0], dtype=dtype)
    assert torch.equal(exp_log_softplus(h.clone()), expected)
    tracked = h[:-2].clone().requires_grad_()
    value = exp_log_softplus(tracked)
    value.sum().backward()
    assert torch.equal(value.detach(), expected[:-2])
    # sigmoid(0) = 1/2, where |h| has no derivative, and 1 and 0 at the extremes
    assert torch.equal(tracked.grad, torch.tensor([0.5, 0.5, 1.0, 0.0], dtype=dtype))
    minus_inf = torch.tensor([float("-inf")], dtype=dtype, requires_grad=True)
    exp_log_softplus(minus_inf).sum().backward()
    assert exp_log_softplus(minus_inf).item() == 0.0 and minus_inf.grad.item() == 0.0
    # +inf with autograd, which only a network already overflowing makes, is not finite
    # here (NaN; torch: inf): the training loop's non-finite check then stops the run
    assert not torch.isfinite(exp_log_softplus(torch.tensor([float("inf")], dtype=dtype, requires_grad=True))).any()
    assert torch.isnan(exp_log_softplus(torch.tensor([float("nan")], dtype=dtype))).all()


@pytest.mark.parametrize("grad", [False, True])
def test_softplus_and_its_layer_compute_the_chosen_form(form, grad):
    h = torch.linspace(-30, 30, 1001, requires_grad=grad)
    for name, expected in [("torch", F.softplus(h)), ("exp-log", exp_log_softplus(h))]:
        form(name)
        assert networks.cpu_softplus_form() == name
        assert torch.equal(softplus(h), expected) and torch.equal(networks.Softplus()(h), expected)


def test_the_form_comes_from_the_environment_and_a_wrong_one_is_refused(form, monkeypatch):
    for name in networks.SOFTPLUS_FORMS:
        monkeypatch.setenv(networks.SOFTPLUS_ENV, name)
        form(None)
        assert networks.cpu_softplus_form() == name
    monkeypatch.setenv(networks.SOFTPLUS_ENV, "log1p")
    form(None)
    with pytest.raises(ValueError, match=r"PYRO_VAE_SOFTPLUS='log1p' is not a softplus form: use one of torch, exp-log"):
        networks.cpu_softplus_form()
    with pytest.raises(ValueError, match="unknown softplus form 'fast'"):
        form("fast")


def test_auto_takes_the_exp_log_form_where_log1p_is_slow(form, monkeypatch):
    monkeypatch.setenv(networks.SOFTPLUS_ENV, "auto")
    log1p = torch.log1p

    def slow_log1p(x):  # ten times torch's own: log1p as slow as on the machine that made this form worth it
        for _ in range(9):
            log1p(x)
        return log1p(x)

    monkeypatch.setattr(torch, "log1p", slow_log1p)
    form(None)
    assert networks.log1p_is_slow() and networks.cpu_softplus_form() == "exp-log"
    monkeypatch.setattr(torch, "log1p", torch.exp)  # as fast as exp: no reason for the longer form
    form(None)
    assert not networks.log1p_is_slow() and networks.cpu_softplus_form() == "torch"


def test_the_choice_is_made_outside_a_recording(form, monkeypatch):
    """The first softplus of a process may come while the captured engine traces the loss
    with fake tensors: the measurement must still time real ones and leave no trace."""
    from torch.fx.experimental.proxy_tensor import make_fx

    monkeypatch.delenv(networks.SOFTPLUS_ENV, raising=False)
    form(None)
    graph = make_fx(lambda h: softplus(h).sum(), tracing_mode="fake")(torch.randn(5))
    assert networks.cpu_softplus_form() in networks.SOFTPLUS_FORMS
    targets = {str(node.target) for node in graph.graph.nodes if node.op == "call_function"}
    assert not targets & {"aten.linspace.default", "aten.log1p.default"}


def test_the_command_line_refuses_a_wrong_form_before_any_work(monkeypatch, tmp_path, capsys):
    from pyro_vae.cli import main

    monkeypatch.setenv(networks.SOFTPLUS_ENV, "fast")
    assert main(["train", "--out", str(tmp_path / "run"), "--epochs", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("pyro-vae: error: $PYRO_VAE_SOFTPLUS='fast' is not a softplus form: use one of torch, "
                          "exp-log or auto") and "Trace Shapes" not in err
    assert not (tmp_path / "run").exists()
