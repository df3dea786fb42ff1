"""Every kernel path is reached, and the trace proves which one ran.

Configs are forced with ``override_configs`` so that small CPU tensors reach the split
reductions (several programs per channel, merged by the finalize), multi-tile elementwise
launches, multi-program finalizes and 64-bit indexing; each result is checked against the
float64 reference.
"""

from __future__ import annotations

import pytest
import torch

import tritonbn
from tritonbn import reference
from tritonbn.autotune import PERSISTENT_OFF, KernelConfig, override_configs
from tritonbn.autotune.config import DeviceProfile, reduce_config
from tritonbn.plan import force_int64_indexing, plan_view
from helpers import assert_close, make_inputs

pytestmark = pytest.mark.usefixtures("interpreted")


@pytest.fixture
def interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _train_step(shape, axis, layout="contiguous", dtype=torch.float32, **kwargs):
    inp = make_inputs(shape, axis, dtype, layout)
    mm, mv = inp.clone_stats()
    x = inp.x.requires_grad_(True)
    gamma = inp.gamma.clone().requires_grad_(True)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=dtype)
    with tritonbn.trace.capture() as trace:
        y, mean, invstd = tritonbn.batch_norm(x, gamma, inp.beta, mm, mv, fix_gamma=False, axis=axis,
                                              training=True, output_mean_var=True, **kwargs)
        y.backward(dy)
    ax = axis % len(shape)
    mm_ref, mv_ref = inp.moving_mean.double().clone(), inp.moving_var.double().clone()
    y_ref, mean_ref, inv_ref = reference.forward(x.detach().double(), inp.gamma.double(), inp.beta.double(), mm_ref,
                                                 mv_ref, axis=ax, eps=1e-3, momentum=0.9, fix_gamma=False,
                                                 batch_stats=True, update_moving=True)
    dx_ref, dg_ref, db_ref = reference.backward(dy.double(), x.detach().double(), inp.gamma.double(), mean_ref,
                                                inv_ref, axis=ax, fix_gamma=False, batch_stats=True)
    for name, got, want in [("y", y, y_ref), ("mean", mean, mean_ref), ("invstd", invstd, inv_ref),
                            ("moving_mean", mm, mm_ref), ("moving_var", mv, mv_ref), ("dx", x.grad, dx_ref),
                            ("dgamma", gamma.grad, dg_ref)]:
        assert_close(got.detach(), want, dtype, name, scale=4.0)
    return trace


REDUCTION_KERNELS = {f"{family}_{phase}" for family in ("channel_major", "channel_minor")
                     for phase in ("stats", "backward_reduce")}

SPLITS = [
    pytest.param((3, 2, 37), 1, KernelConfig(2, 8, split_rows=2, split_cols=3), id="channel-major-rows-and-cols"),
    pytest.param((9, 2, 5), 1, KernelConfig(2, 8, split_rows=4, split_cols=1), id="channel-major-rows-only"),
    pytest.param((1, 3, 50), 1, KernelConfig(1, 16, split_rows=1, split_cols=4), id="channel-major-cols-only"),
    pytest.param((4, 5, 6, 3), -1, KernelConfig(4, 2, split_rows=5), id="channel-minor-rows"),
    pytest.param((2, 5, 3, 4), 1, KernelConfig(8, 4, split_rows=3), id="channel-minor-nhwc"),
]


@pytest.mark.parametrize("shape, axis, config", SPLITS)
def test_split_reductions_merge_exactly(shape, axis, config):
    layout = "channels_last" if len(shape) == 4 and axis == 1 and shape == (2, 5, 3, 4) else "contiguous"
    with override_configs(reduce=config, persistent=PERSISTENT_OFF):
        trace = _train_step(shape, axis, layout)
    reductions = [launch for launch in trace.launches if launch.kernel in REDUCTION_KERNELS]
    assert len(reductions) == 2 and all(launch.config == config for launch in reductions)
    plan = plan_view(shape, axis % len(shape), [make_inputs(shape, axis, torch.float32, layout).x.stride()])
    assert reductions[0].kernel.startswith(plan.family)
    channel_programs = plan.channels if plan.family == "channel_major" else -(-plan.channels // config.block_cols)
    assert reductions[0].programs == channel_programs * config.splits > channel_programs


def test_multi_program_finalize_and_multi_tile_elementwise():
    with override_configs(finalize=KernelConfig(1, 2), elementwise=KernelConfig(2, 4), persistent=PERSISTENT_OFF):
        trace = _train_step((3, 7, 9), 1)
    finalizes = [launch for launch in trace.launches if launch.kernel.startswith("finalize")]
    assert [launch.programs for launch in finalizes] == [4, 4]  # ceil(7 channels / 2)
    elementwise = [launch for launch in trace.launches if launch.kernel.endswith("elementwise")]
    assert all(launch.programs == 7 * 2 * 3 for launch in elementwise)  # C x ceil(3/2) x ceil(9/4)


@pytest.mark.parametrize(
    "shape, axis, layout",
    [pytest.param((2, 3, 4, 5), 1, "contiguous", id="channel-major"),
     pytest.param((2, 3, 4, 5), 1, "channels_last", id="channel-minor"),
     pytest.param((2, 3, 4, 11), 1, "sliced", id="three-groups")],
)
def test_int64_indexing_path(shape, axis, layout):
    with force_int64_indexing():
        trace = _train_step(shape, axis, layout)
    streaming = [launch for launch in trace.launches if not launch.kernel.startswith("finalize")]
    assert streaming and all(launch.flags["INT64"] for launch in streaming)


SPLIT_BACKWARD = ["channel_major_backward_reduce", "finalize_backward", "channel_major_elementwise"]

# (training, use_global_stats, persistent on, forward kernels, backward kernels,
#  flags of the last forward launch, flags of the last backward launch)
LAUNCHES = [
    pytest.param(True, False, True, ["channel_major_persistent_forward"], ["channel_major_persistent_backward"],
                 dict(UPDATE_MOVING=True), dict(BATCH_STATS=True), id="training-single-pass"),
    pytest.param(True, False, False, ["channel_major_stats", "finalize_stats", "channel_major_elementwise"],
                 SPLIT_BACKWARD, dict(HAS_X=True, HAS_DY=False, FROM_MOVING=False), dict(HAS_X=True, HAS_DY=True),
                 id="training-split"),
    pytest.param(False, False, True, ["channel_major_elementwise"], ["channel_major_persistent_backward"],
                 dict(HAS_X=True, HAS_DY=False, FROM_MOVING=True), dict(BATCH_STATS=False), id="inference"),
    pytest.param(False, False, False, ["channel_major_elementwise"], SPLIT_BACKWARD,
                 dict(HAS_X=True, HAS_DY=False, FROM_MOVING=True), dict(HAS_X=False, HAS_DY=True),
                 id="inference-split-backward"),
    pytest.param(True, True, True, ["channel_major_elementwise"], ["channel_major_persistent_backward"],
                 dict(HAS_X=True, HAS_DY=False, FROM_MOVING=True), dict(BATCH_STATS=False), id="global-stats"),
]


@pytest.mark.parametrize(
    "training, use_global_stats, single_pass, forward, backward, forward_flags, backward_flags", LAUNCHES)
def test_launches_per_op(training, use_global_stats, single_pass, forward, backward, forward_flags, backward_flags):
    inp = make_inputs((2, 3, 4), 1, torch.float32)
    x = inp.x.requires_grad_(True)
    with override_configs(**({} if single_pass else {"persistent": PERSISTENT_OFF})):
        with tritonbn.trace.capture() as fwd:
            y = tritonbn.batch_norm(x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var,
                                    training=training, use_global_stats=use_global_stats)
        with tritonbn.trace.capture() as bwd:
            y.sum().backward()
    assert fwd.kernels() == forward and bwd.kernels() == backward
    assert forward_flags.items() <= fwd.launches[-1].flags.items()
    assert backward_flags.items() <= bwd.launches[-1].flags.items()


@pytest.mark.parametrize(
    "shape, axis, layout, family",
    [pytest.param((3, 5, 7), 1, "contiguous", "channel_major", id="channel-major"),
     pytest.param((3, 70, 2, 2), 1, "channels_last", "channel_minor", id="channel-minor-several-blocks")],
)
def test_single_pass_kernels_run_one_launch_per_op(shape, axis, layout, family):
    trace = _train_step(shape, axis, layout)
    assert trace.kernels() == [f"{family}_persistent_forward", f"{family}_persistent_backward"]


def test_slices_beyond_capacity_take_the_split_path():
    from tritonbn.autotune.config import PERSISTENT_CAPACITY
    inner = PERSISTENT_CAPACITY["forward"] + 1  # the tile covering it would be twice the capacity
    inp = make_inputs((1, 2, inner), 1, torch.float32)
    with tritonbn.trace.capture() as trace:
        tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, training=True)
    assert trace.kernels()[0] == "channel_major_stats"


@pytest.mark.parametrize(
    "shape",
    [pytest.param((20, 6, 65536), id="small-C-large-spatial"), pytest.param((32, 64, 56, 56), id="resnet")],
)
def test_reduction_fills_an_h100(shape):
    """With C <= 64 the reduction launch still has >= 2 programs per SM of a 132-SM GPU."""
    h100 = DeviceProfile("H100", sm_count=132, tile_elements=4096)
    plan = plan_view(shape, 1, [_contiguous_strides(shape)])
    config = reduce_config(plan, h100)
    assert plan.channels * config.splits >= 2 * 132


def _contiguous_strides(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))
