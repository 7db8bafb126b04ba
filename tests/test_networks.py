"""The networks' softplus: torch's value, computed faster where no gradient is needed."""

import pytest
import torch
import torch.nn.functional as F

from pyro_vae.networks import Softplus, softplus


def every_float_range(dtype):
    dense = torch.linspace(-120.0, 120.0, 2_000_001, dtype=dtype)
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 17.0, 20.0, 20.5, 88.0, 89.0, -88.0, -104.0, 1e30, -1e30,
                            torch.finfo(dtype).max, -torch.finfo(dtype).max, float("inf"), float("-inf")],
                           dtype=dtype)
    return torch.cat([dense, special])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softplus_is_torchs_to_float_rounding(dtype):
    h = every_float_range(dtype)
    wide = h.double()
    exact = wide.clamp(min=0) + torch.log1p(torch.exp(-wide.abs()))  # float64 through log1p: the reference
    ours = softplus(h.clone())
    assert ours.dtype == dtype and torch.equal(torch.isinf(ours), torch.isinf(exact))
    finite = torch.isfinite(exact)
    # absolute below 1, relative above: about what rounding to the dtype costs torch's own
    tol = (6e-7 if dtype == torch.float32 else 2e-15) * exact[finite].abs().clamp(min=1)
    assert ((ours[finite].double() - exact[finite]).abs() <= tol).all()
    if dtype == torch.float32:  # (in float64 torch's own returns h itself above h = 20, 2e-9 off)
        assert ((F.softplus(h)[finite].double() - exact[finite]).abs() <= tol).all()
    assert torch.isnan(softplus(torch.tensor([float("nan")], dtype=dtype))).all()
    assert torch.equal(h, every_float_range(dtype))  # the input is not written


def test_with_autograd_the_value_and_the_gradient_are_torchs():
    h = every_float_range(torch.float32)
    h = torch.cat([h[:-17:1000], h[-17:-1]]).clone().requires_grad_()  # the special values but -inf
    out = Softplus()(h)
    finite = torch.isfinite(h)
    assert torch.allclose(out[finite], F.softplus(h)[finite], rtol=6e-7, atol=6e-7)
    assert torch.equal(out[~finite], F.softplus(h)[~finite])  # +inf
    # -inf, which only a network already overflowing makes, gives NaN here (torch: 0):
    # the training loop's non-finite check then stops the run
    assert torch.isnan(softplus(torch.tensor([-float("inf")], requires_grad=True))).all()
    out.sum().backward()
    assert torch.allclose(h.grad[finite], torch.sigmoid(h.detach())[finite], rtol=0, atol=2e-7)
    zero = torch.zeros(3, requires_grad=True)
    softplus(zero).sum().backward()
    assert torch.equal(zero.grad, torch.full((3,), 0.5))  # sigmoid(0), where |h| has no derivative
