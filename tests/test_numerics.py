"""Numerical edge cases of SPEC.md on float32 data, each with a stated tolerance, on every path.

Offset data whose mean dwarfs its spread, magnitudes whose squares leave float32's range, and a
single channel, through the Triton kernels (single-pass and split) and the torch path
(``helpers.run_and_compare``).  The hard-data tables (offset half data, constant channels,
m = 1, 1e-41..1e37, the float16 maximum, NaN/Inf confined to a channel) are
tests/test_robustness.py; bitwise determinism is tests/test_reliability.py.
"""

from __future__ import annotations

import pytest
import torch

from tritonbn.autotune import KernelConfig
from helpers import Inputs, apply_layout, on_every_path, run_and_compare


def _params(channels, dtype=torch.float32):
    gen = torch.Generator().manual_seed(7)
    gamma = torch.rand(channels, generator=gen, dtype=dtype) + 0.5
    beta = torch.randn(channels, generator=gen, dtype=dtype)
    return gamma, beta, torch.zeros(channels, dtype=dtype), torch.ones(channels, dtype=dtype)


SPLIT = dict(reduce=KernelConfig(4, 8, split_rows=4))  # the split path: four programs per channel (block)


@on_every_path
@pytest.mark.parametrize(
    "shape, axis, layout",
    [
        pytest.param((8, 2, 16, 8), 1, "contiguous", id="channel-major"),
        pytest.param((8, 2, 16, 8), 1, "channels_last", id="channel-minor"),
        pytest.param((64, 4), -1, "contiguous", id="channel-minor-2d"),
    ],
)
def test_offset_mean_keeps_variance_accurate(shape, axis, layout, path):
    """mean 1e4, std 1e-2 in float32: relative error of invstd < 1e-5, of the output < 1e-4.

    (E[x^2] - E[x]^2 in float32 would lose every digit here; a plain Welford in float32 loses
    about three: the kernels shift each channel by its first element.  The backward on the same
    data: tests/test_robustness.py::test_offset_float32_backward_is_accurate.)
    """
    gen = torch.Generator().manual_seed(0)
    x = (1e4 + 1e-2 * torch.randn(shape, generator=gen, dtype=torch.float64)).float()
    x = apply_layout(x, layout, axis % len(shape))
    dy = torch.randn(shape, generator=gen)
    got, want, _ = run_and_compare(Inputs(x, *_params(shape[axis])), dy, path=path, split_configs=SPLIT, compare=(),
                                   eps=0.0, axis=axis)
    inv_ref, y_ref = want["invstd"], want["y"]
    assert ((got["invstd"].double() - inv_ref) / inv_ref).abs().max() < 1e-5
    assert (got["y"].double() - y_ref).abs().max() < 1e-4 * y_ref.abs().max()
    assert ((got["mean"].double() - want["mean"]) / want["mean"]).abs().max() < 1e-7
    var_ref = 1 / inv_ref**2
    mv, mv_ref = got["moving_var"].double(), want["moving_var"]
    assert (((mv - 0.9) - (mv_ref - 0.9)) / (0.1 * var_ref)).abs().max() < 2e-2  # fp32 of 0.9 + 1e-5


@on_every_path
@pytest.mark.parametrize(
    "shape, axis, layout",
    [
        pytest.param((16, 2, 256), 1, "contiguous", id="channel-major"),
        pytest.param((16, 2, 16, 16), 1, "channels_last", id="channel-minor"),
        pytest.param((4096, 2), -1, "contiguous", id="channel-minor-2d"),
    ],
)
def test_outlier_pilot_keeps_variance_accurate(shape, axis, layout, path):
    """Each channel's first element (the kernels' shift, ``kernels/common.py``) lies 4096 from
    the rest, which have mean 4096 and std 1/8: invstd within 1e-5 of float64.

    Sums of z = x - pilot would leave M2 = S2 - S1 * mean with ~1e-3 relative error here (S2 is
    4096 times M2); the statistics kernels see the cancellation and sum their split again around
    the mean.  A split that does not hold the pilot cancels worse still: its values are 4096 from
    the shift, their spread 1/8.
    """
    gen = torch.Generator().manual_seed(3)
    channels = shape[axis]
    x = 4096 + torch.randn(shape, generator=gen, dtype=torch.float64) / 8
    x.movedim(axis, 0)[(slice(None),) + (0,) * (len(shape) - 1)] = 0.0  # every channel's first element
    x = apply_layout(x.float(), layout, axis % len(shape))
    dy = torch.randn(shape, generator=gen)
    got, want, _ = run_and_compare(Inputs(x, *_params(channels)), dy, path=path, split_configs=SPLIT, compare=(),
                                   axis=axis)
    assert ((got["invstd"].double() - want["invstd"]) / want["invstd"]).abs().max() < 1e-5
    assert ((got["mean"].double() - want["mean"]) / want["mean"]).abs().max() < 1e-6


@on_every_path
@pytest.mark.parametrize("eps", [pytest.param(0.0, id="eps0"), pytest.param(1e-3, id="eps1e-3")])
@pytest.mark.parametrize(
    "scale, offset",
    [pytest.param(1e30, 0.0, id="1e30"), pytest.param(1e-30, 0.0, id="1e-30"), pytest.param(1e18, 1.0, id="1e18"),
     pytest.param(1e30, 5.0, id="1e30-offset")],
)
def test_extreme_magnitudes_float32(scale, offset, eps, path):
    """Data of 1e30 or 1e-30 in float32: squares leave float32's range, results must not.

    The kernels rescale each channel by a power of two from its spread (|last - first|) and
    form invstd and dx without invstd^2; relative errors stay at float32's ~1e-5.
    """
    gen = torch.Generator().manual_seed(2)
    x = (scale * (offset + torch.randn(3, 2, 16, generator=gen, dtype=torch.float64))).float()
    dy = torch.randn(3, 2, 16, generator=gen)
    got, want, _ = run_and_compare(Inputs(x, *_params(2)), dy, path=path, compare=(), eps=eps)
    torch.testing.assert_close(got["mean"].double(), want["mean"], rtol=1e-5, atol=0)
    torch.testing.assert_close(got["invstd"].double(), want["invstd"], rtol=1e-5, atol=0)
    torch.testing.assert_close(got["y"].double(), want["y"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got["dx"].double(), want["dx"], rtol=1e-4, atol=1e-4 * want["dx"].abs().max().item())
    assert torch.isfinite(got["y"]).all() and torch.isfinite(got["dx"]).all()
    var_ref = (want["moving_var"] - 0.9) / 0.1
    if var_ref.max() < 3e38:  # var itself fits float32: the moving update stores it
        torch.testing.assert_close(got["moving_var"].double(), want["moving_var"], rtol=1e-4, atol=0)
    else:
        assert torch.isinf(got["moving_var"]).all(), "a variance beyond float32's range rounds to inf"


@on_every_path
def test_single_channel(path):
    """C = 1 (one channel-major program, one channel-minor column), float64: every output at
    float64's tolerance."""
    x = torch.randn(6, 1, 5, dtype=torch.float64)
    run_and_compare(Inputs(x, *_params(1, torch.float64)), torch.randn(6, 1, 5, dtype=torch.float64), path=path)
