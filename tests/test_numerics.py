"""Numerical edge cases of SPEC.md, each with a stated tolerance, through both paths."""

from __future__ import annotations

import math

import pytest
import torch

import tritonbn
from tritonbn import reference
from tritonbn.autotune import PERSISTENT_OFF, KernelConfig, override_configs
from helpers import apply_layout


def _params(channels, dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    gamma = torch.rand(channels, generator=gen, dtype=dtype) + 0.5
    beta = torch.randn(channels, generator=gen, dtype=dtype)
    return gamma, beta, torch.zeros(channels, dtype=dtype), torch.ones(channels, dtype=dtype)


def _expected(x, gamma, beta, axis, eps):
    mm, mv = torch.zeros(gamma.shape, dtype=torch.float64), torch.ones(gamma.shape, dtype=torch.float64)
    y, mean, invstd = reference.forward(x.double(), gamma.double(), beta.double(), mm, mv, axis=axis, eps=eps,
                                        momentum=0.9, fix_gamma=False, batch_stats=True, update_moving=True)
    return y, mean, invstd, mm, mv


@pytest.mark.parametrize(
    "shape, axis, layout, split",
    [
        pytest.param((8, 2, 16, 8), 1, "contiguous", 1, id="channel-major"),
        pytest.param((8, 2, 16, 8), 1, "contiguous", 4, id="channel-major-split"),
        pytest.param((8, 2, 16, 8), 1, "channels_last", 1, id="channel-minor"),
        pytest.param((64, 4), -1, "contiguous", 4, id="channel-minor-split"),
    ],
)
def test_offset_mean_keeps_variance_accurate(shape, axis, layout, split, path):
    """mean 1e4, std 1e-2 in float32: relative error of invstd < 1e-5, of the output < 1e-4.

    (E[x^2] - E[x]^2 in float32 would lose every digit here; a plain Welford in float32 loses
    about three: the kernels shift each channel by its first element.)
    """
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    x = apply_layout(x, layout, axis % len(shape))
    gamma, beta, mm, mv = _params(shape[axis])
    config = KernelConfig(4, 8, split_rows=split) if split > 1 else None
    with override_configs(**({"reduce": config} if config else {})):
        y, mean, invstd = tritonbn.batch_norm(x, gamma, beta, mm, mv, eps=0.0, fix_gamma=False, axis=axis,
                                              training=True, output_mean_var=True)
    y_ref, mean_ref, inv_ref, mm_ref, mv_ref = _expected(x, gamma, beta, axis % len(shape), 0.0)
    assert ((invstd.double() - inv_ref) / inv_ref).abs().max() < 1e-5
    assert (y.double() - y_ref).abs().max() < 1e-4 * y_ref.abs().max()
    assert ((mean.double() - mean_ref) / mean_ref).abs().max() < 1e-7
    var_ref = 1 / inv_ref**2
    assert (((mv.double() - 0.9) - (mv_ref - 0.9)) / (0.1 * var_ref)).abs().max() < 2e-2  # fp32 of 0.9 + 1e-5


@pytest.mark.parametrize(
    "dtype, offset, std, rtol",
    [
        pytest.param(torch.float16, 100.0, 0.5, 2e-2, id="float16-offset-100"),
        pytest.param(torch.bfloat16, 1000.0, 8.0, 5e-2, id="bfloat16-offset-1000"),
        pytest.param(torch.float16, 6e4, 100.0, 5e-2, id="float16-near-max"),
    ],
)
def test_offset_half_data_is_finite_and_accurate(dtype, offset, std, rtol, path):
    gen = torch.Generator().manual_seed(1)
    x = (offset + std * torch.randn(4, 3, 32, generator=gen, dtype=torch.float64)).clamp(max=65000).to(dtype)
    gamma, beta, mm, mv = _params(3)
    y, mean, invstd = tritonbn.batch_norm(x, gamma, beta, mm, mv, fix_gamma=False, training=True,
                                          output_mean_var=True)
    y_ref, _, inv_ref, _, _ = _expected(x, gamma, beta, 1, 1e-3)
    assert torch.isfinite(y).all() and torch.isfinite(invstd).all()
    torch.testing.assert_close(invstd.double(), inv_ref, rtol=1e-4, atol=0)
    torch.testing.assert_close(y.double(), y_ref, rtol=rtol, atol=rtol)


@pytest.mark.parametrize("split", [pytest.param(False, id="single-pass"), pytest.param(True, id="split")])
@pytest.mark.parametrize("eps", [pytest.param(0.0, id="eps0"), pytest.param(1e-3, id="eps1e-3")])
@pytest.mark.parametrize(
    "scale, offset",
    [pytest.param(1e30, 0.0, id="1e30"), pytest.param(1e-30, 0.0, id="1e-30"), pytest.param(1e18, 1.0, id="1e18"),
     pytest.param(1e30, 5.0, id="1e30-offset")],
)
def test_extreme_magnitudes_float32(scale, offset, eps, split, path):
    """Data of 1e30 or 1e-30 in float32: squares leave float32's range, results must not.

    The kernels rescale each channel by a power of two from its spread (|last - first|) and
    form invstd and dx without invstd^2; relative errors stay at float32's ~1e-5.
    """
    gen = torch.Generator().manual_seed(2)
    x = (scale * (offset + torch.randn(3, 2, 16, generator=gen, dtype=torch.float64))).float().requires_grad_(True)
    gamma, beta, mm, mv = _params(2)
    dy = torch.randn(3, 2, 16, generator=gen)
    with override_configs(**({"persistent": PERSISTENT_OFF} if split else {})):
        y, mean, invstd = tritonbn.batch_norm(x, gamma, beta, mm, mv, eps=eps, fix_gamma=False, training=True,
                                              output_mean_var=True)
        y.backward(dy)
    x64 = x.detach().double()
    y_ref, mean_ref, inv_ref, _, mv_ref = _expected(x64, gamma, beta, 1, eps)
    dx_ref, dg_ref, _ = reference.backward(dy.double(), x64, gamma.double(), mean_ref, inv_ref, axis=1,
                                           fix_gamma=False, batch_stats=True)
    torch.testing.assert_close(mean.double(), mean_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(invstd.double(), inv_ref, rtol=1e-5, atol=0)
    torch.testing.assert_close(y.detach().double(), y_ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(x.grad.double(), dx_ref, rtol=1e-4, atol=1e-4 * dx_ref.abs().max().item())
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    var_ref = (mv_ref - 0.9) / 0.1
    if var_ref.max() < 3e38:  # var itself fits float32: the moving update stores it
        torch.testing.assert_close(mv.double(), mv_ref, rtol=1e-4, atol=0)
    else:
        assert torch.isinf(mv).all(), "a variance beyond float32's range rounds to inf"


def test_constant_channel_with_eps_zero(path):
    """invstd = 0, out = beta, dx = 0 and the update stores the true variance 0."""
    x = torch.randn(4, 2, 5)
    x[:, 1] = 3.25
    x.requires_grad_(True)
    gamma, beta, mm, mv = _params(2)
    y, mean, invstd = tritonbn.batch_norm(x, gamma, beta, mm, mv, eps=0.0, momentum=0.5, fix_gamma=False,
                                          training=True, output_mean_var=True)
    y.backward(torch.randn_like(y))
    assert invstd[1] == 0 and mean[1] == 3.25
    assert torch.equal(y[:, 1].detach(), beta[1].expand(4, 5))
    assert torch.equal(x.grad[:, 1], torch.zeros(4, 5))
    assert mv[1] == 0.5 and math.isfinite(mv[1].item())
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()


def test_constant_channel_with_eps(path):
    x = torch.full((3, 2, 4), -1.5)
    gamma, beta, mm, mv = _params(2)
    y, _, invstd = tritonbn.batch_norm(x, gamma, beta, mm, mv, eps=1e-3, fix_gamma=False, training=True,
                                       output_mean_var=True)
    torch.testing.assert_close(invstd, torch.full((2,), 1 / math.sqrt(1e-3)))
    assert torch.equal(y, beta.reshape(1, 2, 1).expand(3, 2, 4))


@pytest.mark.parametrize(
    "shape, axis",
    [pytest.param((5,), 0, id="rank1"), pytest.param((1, 4), 1, id="one-row"), pytest.param((1, 3, 1, 1), 1, id="1x1")],
)
def test_one_element_per_channel(shape, axis, path):
    """m = 1: var = 0, out = beta, all finite; the biased update is momentum * moving_var."""
    x = torch.randn(shape, requires_grad=True)
    gamma, beta, mm, mv = _params(shape[axis])
    y = tritonbn.batch_norm(x, gamma, beta, mm, mv, momentum=0.25, fix_gamma=False, axis=axis, training=True)
    y.backward(torch.randn_like(y))
    assert torch.equal(y.detach().reshape(-1), beta)
    assert torch.equal(x.grad, torch.zeros_like(x))
    torch.testing.assert_close(mv, torch.full_like(mv, 0.25))
    torch.testing.assert_close(mm, 0.75 * x.detach().reshape(-1))


def test_single_channel(path):
    x = torch.randn(6, 1, 5, dtype=torch.float64, requires_grad=True)
    gamma, beta, mm, mv = _params(1, torch.float64)
    y = tritonbn.batch_norm(x, gamma, beta, mm, mv, fix_gamma=False, training=True)
    y_ref, *_ = _expected(x.detach(), gamma, beta, 1, 1e-3)
    torch.testing.assert_close(y.detach(), y_ref)


def test_nan_and_inf_stay_in_their_channel(path):
    x = torch.randn(4, 3, 6)
    x[1, 0, 2] = float("nan")
    x[2, 2, 3] = float("inf")
    x.requires_grad_(True)
    gamma, beta, mm, mv = _params(3)
    y = tritonbn.batch_norm(x, gamma, beta, mm, mv, fix_gamma=False, training=True)
    y.backward(torch.ones_like(y))
    assert torch.isnan(y[:, 0]).all() and torch.isfinite(y[:, 1]).all()
    assert torch.isfinite(x.grad[:, 1]).all() and torch.isfinite(mm[1]) and torch.isfinite(mv[1])
    assert not torch.isfinite(mm[0]) and not torch.isfinite(mm[2])


def test_repeated_calls_are_bitwise_identical(path):
    x = torch.randn(3, 4, 17, requires_grad=True)
    gamma, beta, _, _ = _params(4)
    results = []
    for _ in range(2):
        mm, mv = torch.zeros(4), torch.ones(4)
        with override_configs(reduce=KernelConfig(2, 8, split_rows=2, split_cols=2)):
            y = tritonbn.batch_norm(x, gamma, beta, mm, mv, fix_gamma=False, training=True)
            (grad,) = torch.autograd.grad(y, x, torch.ones_like(y))
        results.append((y.detach(), grad, mm, mv))
    for first, second in zip(*results):
        assert torch.equal(first, second)
