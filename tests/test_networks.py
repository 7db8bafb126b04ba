"""The networks' softplus: torch's value, in the form that is faster on this machine's CPU."""

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


def every_float_range(dtype):
    dense = torch.linspace(-120.0, 120.0, 2_000_001, dtype=dtype)
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 17.0, 20.0, 20.5, 88.0, 89.0, -88.0, -104.0, 1e30, -1e30,
                            torch.finfo(dtype).max, -torch.finfo(dtype).max, float("inf"), float("-inf")],
                           dtype=dtype)
    return torch.cat([dense, special])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_exp_log_form_is_torchs_softplus_to_float_rounding(dtype):
    h = every_float_range(dtype)
    wide = h.double()
    exact = wide.clamp(min=0) + torch.log1p(torch.exp(-wide.abs()))  # float64 through log1p: the reference
    ours = exp_log_softplus(h.clone())
    assert ours.dtype == dtype and torch.equal(torch.isinf(ours), torch.isinf(exact))
    finite = torch.isfinite(exact)
    # absolute below 1, relative above: about what rounding to the dtype costs torch's own
    tol = (6e-7 if dtype == torch.float32 else 2e-15) * exact[finite].abs().clamp(min=1)
    assert ((ours[finite].double() - exact[finite]).abs() <= tol).all()
    if dtype == torch.float32:  # (in float64 torch's own returns h itself above h = 20, 2e-9 off)
        assert ((F.softplus(h)[finite].double() - exact[finite]).abs() <= tol).all()
    assert torch.isnan(exp_log_softplus(torch.tensor([float("nan")], dtype=dtype))).all()
    assert torch.equal(h, every_float_range(dtype))  # the input is not written


def test_with_autograd_the_exp_log_forms_value_and_gradient_are_torchs():
    h = every_float_range(torch.float32)
    h = torch.cat([h[:-17:1000], h[-17:-1]]).clone().requires_grad_()  # the special values but -inf
    out = exp_log_softplus(h)
    finite = torch.isfinite(h)
    assert torch.allclose(out[finite], F.softplus(h)[finite], rtol=6e-7, atol=6e-7)
    assert torch.equal(out[~finite], F.softplus(h)[~finite])  # +inf
    # -inf, which only a network already overflowing makes, gives NaN here (torch: 0):
    # the training loop's non-finite check then stops the run
    assert torch.isnan(exp_log_softplus(torch.tensor([-float("inf")], requires_grad=True))).all()
    out.sum().backward()
    assert torch.allclose(h.grad[finite], torch.sigmoid(h.detach())[finite], rtol=0, atol=2e-7)
    zero = torch.zeros(3, requires_grad=True)
    exp_log_softplus(zero).sum().backward()
    assert torch.equal(zero.grad, torch.full((3,), 0.5))  # sigmoid(0), where |h| has no derivative


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
