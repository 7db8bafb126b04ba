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


def test_with_autograd_it_is_torchs_softplus_and_its_gradient():
    h = every_float_range(torch.float32)[::1000].clone().requires_grad_()
    out = Softplus()(h)
    assert torch.equal(out, F.softplus(h))
    out.sum().backward()
    finite = torch.isfinite(h)
    assert torch.allclose(h.grad[finite], torch.sigmoid(h.detach())[finite], atol=1e-7)
