"""The reference's chunked evaluation (``reference.CHUNK_ELEMENTS``) on small tensors.

The other suites' tensors mostly fit one chunk; here the chunk size is cut to a few elements, so
chunks split channels, reduced dimensions and single rows in every layout, and the results must
equal the one-chunk evaluation (to float64 rounding) with the same output strides.  Also: the
CPU path's exact mean (constant channels, the float64 mean the backward gets).
"""

from __future__ import annotations

import pytest
import torch

from tritonbn import reference
from helpers import Inputs, apply_layout, on_path, run_and_compare

F32, F64 = torch.float32, torch.float64

CASES = [
    pytest.param((4, 3, 5, 7), 1, "contiguous", id="nchw"),
    pytest.param((3, 7, 2, 5), 1, "channels_last", id="nhwc"),
    pytest.param((2, 3, 2, 3, 4), 1, "channels_last_3d", id="ndhwc"),
    pytest.param((5, 6, 7), 2, "permuted", id="permuted-axis2"),
    pytest.param((9, 2, 17), 1, "sliced", id="sliced"),
    pytest.param((6, 5, 11), 0, "contiguous", id="axis0"),
    pytest.param((13, 4), 1, "contiguous", id="2d"),
    pytest.param((23,), 0, "contiguous", id="rank1"),
    pytest.param((5, 3, 4), 1, "expanded", id="expanded"),
]


def _tensors(shape, axis, layout, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=gen, dtype=F64) * 2 + 3).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    if layout == "expanded":  # a stride-0 reduced dimension
        x = x[:1].expand(shape)
    else:
        x, dy = apply_layout(x, layout, axis), apply_layout(dy, layout, axis)
    channels = shape[axis]
    gamma = (torch.rand(channels, generator=gen, dtype=F64) + 0.5).to(reference.stat_dtype(dtype))
    beta = torch.randn(channels, generator=gen, dtype=F64).to(gamma.dtype)
    return x, dy, gamma, beta


def _reference_step(x, dy, gamma, beta, axis, batch_stats, out=None):
    """``tritonbn.reference`` itself (not the op) forward and backward, in the inputs' dtype."""
    mm, mv = torch.zeros_like(gamma), torch.ones_like(gamma)
    y, mean, invstd = reference.forward(x, gamma, beta, mm, mv, axis=axis, eps=1e-3, momentum=0.9, fix_gamma=False,
                                        batch_stats=batch_stats, update_moving=batch_stats, out=out)
    dx, dgamma, dbeta = reference.backward(dy, x, gamma, mean, invstd, axis=axis, fix_gamma=False,
                                           batch_stats=batch_stats)
    return dict(y=y, mean=mean, invstd=invstd, moving_mean=mm, moving_var=mv, dx=dx, dgamma=dgamma, dbeta=dbeta)


@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("batch_stats", [True, False], ids=["training", "inference"])
@pytest.mark.parametrize("shape, axis, layout", CASES)
def test_chunked_evaluation_matches_one_chunk(shape, axis, layout, batch_stats, chunk, monkeypatch):
    x, dy, gamma, beta = _tensors(shape, axis, layout, F64)
    whole = _reference_step(x, dy, gamma, beta, axis, batch_stats)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", chunk)
    chunked = _reference_step(x, dy, gamma, beta, axis, batch_stats)
    for name, want in whole.items():
        torch.testing.assert_close(chunked[name], want, rtol=1e-12, atol=1e-12, msg=lambda m: f"{name}: {m}")
    assert chunked["y"].stride() == whole["y"].stride() and chunked["dx"].stride() == whole["dx"].stride()


@pytest.mark.parametrize("shape, axis, layout", CASES[:5])
def test_chunked_out_and_grad_layouts(shape, axis, layout, monkeypatch):
    """out= of another layout is written in place; dx takes grad_out's layout (dense grad_out)."""
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 5)
    x, dy, gamma, beta = _tensors(shape, axis, layout, F32)
    out = torch.empty(shape, dtype=F32).permute(*reversed(range(len(shape)))).contiguous()
    out = out.permute(*reversed(range(len(shape))))  # reversed storage order, same logical shape
    want = _reference_step(x.double(), dy.double(), gamma.double(), beta.double(), axis, True)
    got = _reference_step(x, dy.contiguous(), gamma, beta, axis, True, out=out)
    assert got["y"] is out
    assert got["dx"].stride() == dy.contiguous().stride()
    for name in ("y", "dx"):
        torch.testing.assert_close(got[name].double(), want[name], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("dtype", [F32, F64])
def test_constant_channel_mean_is_exact_across_chunks(dtype, monkeypatch):
    """A constant channel spread over many chunks: mean exactly the value, var exactly 0 (eps = 0:
    invstd 0, y = beta, dx = 0), whatever the float sums would round to."""
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 7)
    x = torch.randn(5, 2, 41, generator=torch.Generator().manual_seed(1), dtype=F64).to(dtype)
    level = torch.tensor(31946.364823168726, dtype=dtype).item()
    x[:, 1] = level
    mean, var = reference.batch_statistics(x, 1)
    assert mean[1].item() == level and var[1].item() == 0.0
    gamma, beta = torch.full((2,), 1.5, dtype=dtype), torch.full((2,), 0.25, dtype=dtype)
    y, _, invstd = reference.forward(x, gamma, beta, torch.zeros(2, dtype=dtype), torch.ones(2, dtype=dtype), axis=1,
                                     eps=0.0, momentum=0.9, fix_gamma=False, batch_stats=True, update_moving=False)
    assert invstd[1].item() == 0.0 and bool((y[:, 1] == 0.25).all())


def test_reference_path_backward_uses_the_float64_mean():
    """CPU path: the forward saves the mean as (rounded, remainder), so the backward's x - mean is
    that of the float64 mean (float32 data at 1e4, std 1e-2: a float32 mean is 5% of the std off)."""
    gen = torch.Generator().manual_seed(3)
    x = (1e4 + 1e-2 * torch.randn(6, 3, 50, generator=gen, dtype=F64)).float()
    dy = torch.randn(6, 3, 50, generator=gen, dtype=F64).float()
    inp = Inputs(x, torch.ones(3), torch.zeros(3), torch.zeros(3), torch.ones(3))
    with on_path("reference"):
        got, want, _ = run_and_compare(inp, dy, path="reference", compare=(), eps=0.0)
    scale = want["dx"].abs().max().item()
    torch.testing.assert_close(got["dx"].double(), want["dx"], rtol=0, atol=1e-6 * scale)
