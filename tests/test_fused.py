"""Fused BatchNorm + ReLU, + add, + add + ReLU: every path and layout against float64 math.

``tritonbn.batch_norm(..., act_type="relu", addend=...)`` computes relu(bn(x) + addend) in the
epilogues of the plain op's launches (``kernels/common.py``, "fused epilogues").  The tables
here run a forward and backward step through ``helpers.run_and_compare`` (float64 reference,
gradients of data, gamma, beta and addend), assert from the trace which kernels ran and that
their launches are the plain op's, check that the backward's ReLU decisions are the forward's
bit for bit, that the bit mask's layout is the view's, the traffic targets of issue 15, and the
bad-input checks.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

import tritonbn
from tritonbn import ops
from tritonbn.autotune import KernelConfig
from tritonbn.perf.traffic import measure
from tritonbn.plan import plan_view
import helpers
from helpers import (FLAGS, GEOMETRIES, assert_close, make_addend, make_inputs, on_both_triton_paths,
                     on_every_path, run_and_compare, split_path)

# (act_type, with an addend) by name
FUSIONS = {"relu": ("relu", False), "add": (None, True), "add-relu": ("relu", True)}
FUSED_OUTPUTS = {name: helpers.OUTPUTS + (("daddend",) if with_addend else ())
                 for name, (_, with_addend) in FUSIONS.items()}
FUSED_KERNELS = ("_elementwise", "_persistent_forward", "_persistent_backward", "_backward_reduce")

LAYOUT_CASES = ["nchw", "nhwc", "4d-axis-1", "3d-last", "3d-sliced-axis-2", "5d-stepped", "ndhwc", "2d-nc", "rank1"]


def _step(geometry: str, fusion: str, path: str, dtype=torch.float32, flags: str = "train",
          split_configs: dict | None = None, addend_layout: str | None = None):
    shape, axis, layout = GEOMETRIES[geometry]
    act_type, with_addend = FUSIONS[fusion]
    inp = make_inputs(shape, axis, dtype, layout)
    addend = make_addend(inp, addend_layout or layout) if with_addend else None
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
    return run_and_compare(inp, helpers.on_device(dy), path=path, split_configs=split_configs,
                           compare=FUSED_OUTPUTS[fusion], scale=4.0, axis=axis, act_type=act_type, addend=addend,
                           **FLAGS[flags])


def _assert_fused_launches(trace, fusion: str) -> None:
    """Every launch that carries the epilogue was compiled with the fusion's constexprs, and the
    launches per op are the plain op's: 1 single-pass, 2 split (no extra pass, no torch op)."""
    act_type, with_addend = FUSIONS[fusion]
    for launch in trace.launches:
        if launch.kernel.endswith(FUSED_KERNELS):
            assert launch.flags.get("RELU") == (act_type == "relu"), (launch.kernel, launch.flags)
            assert launch.flags.get("ADDEND") == with_addend, (launch.kernel, launch.flags)
    kernels = trace.kernels()
    per_op = [1 if any(k.endswith(f"persistent_{op}") for k in kernels) else 2 for op in ("forward", "backward")]
    assert len(kernels) == sum(per_op), kernels


@on_every_path
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("geometry", LAYOUT_CASES)
def test_fused_step_matches_float64(path, geometry, fusion):
    result = _step(geometry, fusion, path)
    if path != "reference":
        _assert_fused_launches(result.trace, fusion)


@on_both_triton_paths
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("geometry", ["nchw", "nhwc"])
def test_fused_dtypes(path, geometry, dtype):
    _assert_fused_launches(_step(geometry, "add-relu", path, dtype).trace, "add-relu")


@on_both_triton_paths
@pytest.mark.parametrize("flags", ["train-fix-gamma", "global-stats"])
@pytest.mark.parametrize("fusion", FUSIONS)
@pytest.mark.parametrize("geometry", ["nchw", "4d-axis-1"])
def test_fused_flags(path, geometry, fusion, flags):
    _step(geometry, fusion, path, flags=flags)


# Forced split configs: several programs per channel, tiles narrower than a byte of the bit mask
# (the forward's writer is widened to 8 columns; the reads take any tile, starting mid-byte).
NARROW = [
    pytest.param("channel_major", (3, 2, 37), 1, dict(reduce=KernelConfig(2, 4, split_rows=2, split_cols=3),
                                                      elementwise=KernelConfig(2, 4)), id="channel-major-4-wide"),
    pytest.param("channel_minor", (4, 5, 6, 11), -1, dict(reduce=KernelConfig(4, 2, split_rows=5),
                                                         elementwise=KernelConfig(8, 2)), id="channel-minor-2-wide"),
]


@pytest.mark.parametrize("family, shape, axis, configs", NARROW)
def test_bit_mask_with_narrow_tiles(family, shape, axis, configs, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inp = make_inputs(shape, axis, torch.float32)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    result = run_and_compare(inp, dy, path="triton-split", split_configs=configs, scale=4.0, axis=axis,
                             compare=FUSED_OUTPUTS["add-relu"], act_type="relu", addend=make_addend(inp))
    launches = result.trace.launches
    assert [launch.kernel for launch in launches] == [f"{family}_{k}" for k in
                                                      ("stats", "elementwise", "backward_reduce", "elementwise")]
    writer, reader = launches[1], launches[3]
    assert writer.flags["BITS"] and writer.config.block_cols == 8, writer  # widened to whole bytes
    assert "BITS" not in reader.flags and reader.config.block_cols == 8  # a reader of whole bytes too
    assert launches[2].config == configs["reduce"] and launches[2].flags["GROUP"] < 8  # reads mid-byte


@on_both_triton_paths
@pytest.mark.parametrize("fusion", ["relu", "add-relu"])
@pytest.mark.parametrize("geometry", ["nchw", "nhwc"])
def test_backward_decides_as_the_forward(path, geometry, fusion):
    """With moving statistics and fix_gamma, dx = dy * invstd where the ReLU passed and 0 where it
    did not: the zeros of dx (dy of ones) are exactly the zeros of y, in half precision, where
    v rounds to 0 for the smallest values, and around a beta that puts half the outputs at 0."""
    shape, axis, layout = GEOMETRIES[geometry]
    act_type, with_addend = FUSIONS[fusion]
    inp = make_inputs(shape, axis, torch.float16, layout)
    inp.beta.zero_()
    inp.moving_mean.copy_(inp.x.double().mean([d for d in range(4) if d != axis]))
    x = inp.x.detach().requires_grad_(True)
    addend = make_addend(inp, layout).mul_(1e-3) if with_addend else None
    y = tritonbn.batch_norm(x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, fix_gamma=True,
                            use_global_stats=True, training=True, axis=axis, act_type=act_type, addend=addend)
    (dx,) = torch.autograd.grad(y, (x,), torch.ones_like(y))
    zeros = (y == 0).sum().item()
    assert 0 < zeros < y.numel()
    assert torch.equal(dx == 0, y == 0)


@pytest.mark.parametrize("geometry", ["nchw", "nhwc", "4d-axis-1", "5d-stepped"])
def test_bit_mask_layout_is_the_views(geometry, monkeypatch):
    """The forward's bits are the view's (``ops.bitmask_bytes``): a row of cdiv(extent, 8) bytes
    per (o, c) channel-major, per row r channel-minor, bit k of byte b for element 8 b + k."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    shape, axis, layout = GEOMETRIES[geometry]
    inp = make_inputs(shape, axis, torch.float32, layout)
    addend = make_addend(inp, layout)
    settings = tritonbn.validation.validate(
        inp.x, (inp.gamma, inp.beta, inp.moving_mean, inp.moving_var), eps=1e-3, momentum=0.9, fix_gamma=False,
        use_global_stats=False, axis=axis, out=None, training=True, unbiased_update=False)._replace(relu=True,
                                                                                                 addend=True)
    result = ops.TritonBackend().fused_forward(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var,
                                               settings, None, addend)
    plan = plan_view(shape, axis % len(shape), [inp.x.stride()])
    positive = _view_order(result.y > 0, axis % len(shape), plan)  # [outer, C, inner] or [m, C]
    fast = positive.shape[-1]
    padded = np.zeros(positive.shape[:-1] + (-(-fast // 8) * 8,), dtype=bool)
    padded[..., :fast] = positive
    want = np.packbits(padded, axis=-1, bitorder="little").reshape(-1)
    assert result.mask.numel() == ops.bitmask_bytes(plan) == want.size
    assert np.array_equal(result.mask.numpy(), want)


def _view_order(t: torch.Tensor, axis: int, plan) -> np.ndarray:
    """``t`` as the plan's view enumerates it: channel-major [outer, C, inner], channel-minor
    [rows, C] (non-channel dimensions slowest first in memory, as ``plan_view`` orders them)."""
    dims = sorted((d for d in range(t.dim()) if d != axis), key=lambda d: (-abs(t.stride(d)), d))
    channel_last = t.permute(dims + [axis]).reshape(plan.m, plan.channels)
    if plan.family == "channel_minor":
        return channel_last.numpy()
    return channel_last.reshape(plan.outer, plan.inner, plan.channels).permute(0, 2, 1).numpy()


@pytest.mark.parametrize("fusion", FUSIONS)
def test_fused_inference_is_one_launch_without_a_mask(fusion, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    act_type, with_addend = FUSIONS[fusion]
    inp = make_inputs((2, 3, 4, 5), 1, torch.float32)
    addend = make_addend(inp) if with_addend else None
    out = torch.empty_like(inp.x)
    with tritonbn.trace.capture() as trace:
        y = tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, fix_gamma=False,
                                act_type=act_type, addend=addend, out=out)
    assert y is out and trace.kernels() == ["channel_major_elementwise"]
    assert "BITS" not in trace.launches[0].flags
    want = helpers.expected(inp, None, training=False, act_type=act_type, addend=addend)
    assert_close(y, want["y"], torch.float32, "y")


# (fusion, shape, layout, dtype, op, path) -> issue 15's bound in S (bytes of data), the mask counted
TRAFFIC = [
    ("relu", "forward", "single", 2.1), ("relu", "backward", "single", 3.1),
    ("relu", "forward", "split", 3.1), ("relu", "backward", "split", 5.1),
    ("add_relu", "forward", "single", 3.2), ("add_relu", "backward", "single", 4.2),
    ("add_relu", "forward", "split", 4.2), ("add_relu", "backward", "split", 6.2),
    ("relu", "inference", "single", 2.05), ("add_relu", "inference", "single", 3.05),
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("fusion, op, path, bound", TRAFFIC, ids=lambda v: str(v))
def test_fused_traffic_targets(fusion, op, path, bound, layout):
    with split_path() if path == "split" else contextlib.nullcontext():
        # single pass: a channel fits a program (the NHWC addend's tile too, 8 channels wide)
        shape = (16, 8, 28, 28) if path == "split" else (16, 32, 7, 7)
        result = measure(op, shape, layout, torch.float16, fusion=fusion)
    plain_launches = {"inference": 1, "forward": 1 if path == "single" else 2, "backward": 1 if path == "single" else 2}
    assert result.n_launches == plain_launches[op], result.summary()
    assert result.copies == ()
    assert result.total / result.data_bytes <= bound, result.summary()


BAD = [
    pytest.param(dict(act_type="sigmoid"), ValueError, "act_type", id="unknown-act"),
    pytest.param(dict(act_type=1), TypeError, "act_type", id="act-not-str"),
    pytest.param(dict(addend=[1.0]), TypeError, "addend", id="addend-not-tensor"),
    pytest.param(dict(addend=torch.zeros(2, 3, 4)), ValueError, "addend", id="addend-shape"),
    pytest.param(dict(addend=torch.zeros(2, 3, 4, 5, dtype=torch.float64)), TypeError, "addend", id="addend-dtype"),
    pytest.param(dict(addend=torch.zeros(2, 3, 4, 5, device="meta")), ValueError, "addend", id="addend-device"),
    pytest.param("overlap", ValueError, "addend", id="out-overlaps-addend"),
]


@pytest.mark.parametrize("kwargs, error, name", BAD)
def test_bad_fusion_arguments_change_nothing(kwargs, error, name):
    inp = make_inputs((2, 3, 4, 5), 1, torch.float32)
    before = inp.clone_stats()
    if kwargs == "overlap":
        out = torch.empty_like(inp.x)
        kwargs = dict(addend=out, out=out, act_type="relu")
    with pytest.raises(error, match=name):
        tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, training=True, **kwargs)
    assert torch.equal(inp.moving_mean, before[0]) and torch.equal(inp.moving_var, before[1])


def test_out_with_a_gradient_on_the_addend_is_refused():
    inp = make_inputs((2, 3, 4, 5), 1, torch.float32)
    addend = make_addend(inp).requires_grad_(True)
    with pytest.raises(ValueError, match="out="):
        tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, addend=addend,
                            out=torch.empty_like(inp.x))


@pytest.mark.parametrize("fusion, copies", [("add", 0), ("add-relu", 1)])
def test_addend_in_another_layout(fusion, copies, monkeypatch):
    """A permuted addend shares a (three-group) view with NCHW data and is read in place; with a
    ReLU's bit mask that view's rows would not be x's own (the mask's layout), so the addend is
    copied once (the trace says so).  Either way the step is right."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    result = _step("nchw", fusion, "triton", addend_layout="permuted")
    assert result.trace.copies.count(ops.DENSE_ADDEND_COPY) == copies, result.trace.copies


@pytest.mark.parametrize("output_mean_var", [False, True])
def test_contrib_batch_norm_with_relu_is_batch_norm_with_act_relu(output_mean_var, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    inp = make_inputs((2, 3, 4, 5), 1, torch.float32)
    stats = inp.clone_stats()
    got = tritonbn.contrib.BatchNormWithReLU(inp.x, inp.gamma, inp.beta, *stats, fix_gamma=False,
                                             output_mean_var=output_mean_var, training=True)
    want = helpers.expected(inp, None, act_type="relu")
    y = got[0] if output_mean_var else got
    assert_close(y, want["y"], torch.float32, "y")
    assert_close(stats[0], want["moving_mean"], torch.float32, "moving_mean")
    if output_mean_var:
        assert_close(got[1], want["mean"], torch.float32, "mean")
        assert_close(got[2], want["invstd"], torch.float32, "invstd")
