"""Every kernel path is reached, and the trace proves which one ran.

Configs are forced on the split path (``helpers.split_path``) so that small CPU tensors reach
the split reductions (several programs per channel, merged by the last of them), multi-tile
elementwise launches, finalize tails over several channel chunks and 64-bit indexing; each training step is checked
against the float64 reference (``helpers.run_and_compare``).  Then the launch decisions: the
single-pass capacities, programs per launch, runs per channel.
"""

from __future__ import annotations

import pytest
import torch

import tritonbn
from tritonbn.autotune import KernelConfig
from tritonbn.autotune.config import DeviceProfile, reduce_config
from tritonbn.plan import force_int64_indexing, plan_view
import helpers
from helpers import assert_path, make_inputs, on_both_triton_paths, run_and_compare, split_path

pytestmark = pytest.mark.usefixtures("interpreted")


@pytest.fixture
def interpreted(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _train_step(shape, axis, layout="contiguous", dtype=torch.float32, path=None, split_configs=None):
    """A training step of ``make_inputs`` data against the float64 reference (every output, at 4x
    the dtype's tolerance); ``path`` and ``split_configs`` as ``run_and_compare`` takes them.
    Returns the trace."""
    inp = make_inputs(shape, axis, dtype, layout)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(9), dtype=dtype)
    return run_and_compare(inp, dy, path=path, split_configs=split_configs, scale=4.0, axis=axis).trace


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
    trace = _train_step(shape, axis, layout, path="triton-split", split_configs=dict(reduce=config))
    reductions = [launch for launch in trace.launches if launch.kernel in REDUCTION_KERNELS]
    assert len(reductions) == 2 and all(launch.config == config for launch in reductions)
    plan = plan_view(shape, axis % len(shape), [make_inputs(shape, axis, torch.float32, layout).x.stride()])
    assert reductions[0].kernel.startswith(plan.family)
    channel_programs = plan.channels if plan.family == "channel_major" else -(-plan.channels // config.block_cols)
    assert reductions[0].programs == channel_programs * config.splits > channel_programs


def test_multi_tile_elementwise():
    trace = _train_step((3, 7, 9), 1, path="triton-split", split_configs=dict(elementwise=KernelConfig(2, 4)))
    elementwise = [launch for launch in trace.launches if launch.kernel.endswith("elementwise")]
    assert all(launch.programs == 7 * 2 * 3 for launch in elementwise)  # C x ceil(3/2) x ceil(9/4)


# (shape, axis, layout, reduce config, finalize config): the last program of each channel (block)
# merges the partials; channel-minor it walks its block TAIL_C channels at a time
FINALIZE_TAILS = [
    pytest.param((4, 3, 6, 6), 1, "contiguous", KernelConfig(2, 8, split_rows=2, split_cols=2), None,
                 dict(BLOCK_P=4), id="channel-major-4-splits"),
    pytest.param((6, 7, 4, 4), 1, "channels_last", KernelConfig(8, 8, split_rows=3), KernelConfig(1, 2),
                 dict(BLOCK_P=4, TAIL_C=2), id="channel-minor-tail-chunks"),
    pytest.param((40, 5), 1, "contiguous", KernelConfig(4, 4, split_rows=5), None,
                 dict(BLOCK_P=8, TAIL_C=4), id="channel-minor-two-blocks"),
]


@pytest.mark.parametrize("shape, axis, layout, reduce, finalize, tail", FINALIZE_TAILS)
def test_split_reductions_finalize_in_their_own_launch(shape, axis, layout, reduce, finalize, tail):
    """The split path is two launches forward and two backward: each reduction's last program
    per channel (block) merges the partials, and leaves its tickets at zero (no memset, safe
    under CUDA-graph replay); a second step gives bitwise the same results."""
    from tritonbn.ops import tickets

    configs = dict(reduce=reduce) if finalize is None else dict(reduce=reduce, finalize=finalize)
    inp = make_inputs(shape, axis, torch.float32, layout)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    first = run_and_compare(inp, dy, path="triton-split", split_configs=configs, scale=4.0, axis=axis)
    family = plan_view(shape, axis, [inp.x.stride()]).family
    assert first.trace.kernels() == [f"{family}_stats", f"{family}_elementwise",
                                     f"{family}_backward_reduce", f"{family}_elementwise"]
    for launch in helpers.reductions(first.trace):
        assert launch.config == reduce and launch.flags["FINALIZE"]
        assert {name: launch.flags[name] for name in tail} == tail
    assert torch.count_nonzero(tickets(inp.x.device, shape[axis])) == 0
    second = run_and_compare(inp, dy, path="triton-split", split_configs=configs, scale=4.0, axis=axis)
    for name in ("y", "mean", "invstd", "dx", "dgamma", "dbeta"):
        assert torch.equal(first.got[name], second.got[name]), name


@pytest.mark.parametrize(
    "shape, axis, layout, config",
    [pytest.param((2, 5, 3, 7), 1, "channels_last", KernelConfig(4, 4, row_tiles=3), id="nhwc-partial-last-run"),
     pytest.param((3, 4, 16), -1, "contiguous", KernelConfig(2, 8, row_tiles=4), id="axis-1-whole-runs")],
)
def test_channel_minor_elementwise_runs_several_row_tiles(shape, axis, layout, config):
    """A channel-minor elementwise program may run several row tiles with its coefficients loaded
    once (apply, and dx with batch statistics); the tail run is masked."""
    trace = _train_step(shape, axis, layout, path="triton-split", split_configs=dict(elementwise=config))
    elementwise = [launch for launch in trace.launches if launch.kernel == "channel_minor_elementwise"]
    rows = torch.Size(shape).numel() // shape[axis]
    assert len(elementwise) == 2
    run = config.block_rows * config.row_tiles
    assert all(launch.programs == -(-rows // run) * -(-shape[axis] // config.block_cols) for launch in elementwise)


FOUR_GROUP_LAYOUTS = [pytest.param("stepped", "channel_major", id="channel-major"),
                      pytest.param("stepped_channels_last_3d", "channel_minor", id="channel-minor")]


@on_both_triton_paths
@pytest.mark.parametrize("layout, family", FOUR_GROUP_LAYOUTS)
def test_four_group_views_run_in_place(layout, family, path):
    """Steps in two dimensions of a rank-5 view: the kernels address the middle outer group
    (plan.outer_mid > 1) in every phase, with no copy; results match the reference."""
    shape = (3, 4, 3, 2, 3)
    x = make_inputs(shape, 1, torch.float32, layout).x
    plan = plan_view(shape, 1, [x.stride()])
    assert plan.outer_mid > 1 and plan.family == family
    trace = _train_step(shape, 1, layout, path=path, split_configs=dict(reduce=KernelConfig(2, 4, split_rows=2)))
    assert trace.copies == []
    phases = ["persistent_forward", "persistent_backward"] if path == "triton" else [
        "stats", "elementwise", "backward_reduce", "elementwise"]
    assert trace.kernels() == [f"{family}_{p}" for p in phases]


@pytest.mark.parametrize(
    "shape, axis, layout",
    [pytest.param((2, 3, 4, 5), 1, "contiguous", id="channel-major"),
     pytest.param((2, 3, 4, 5), 1, "channels_last", id="channel-minor"),
     pytest.param((2, 3, 4, 11), 1, "sliced", id="three-groups"),
     pytest.param((2, 3, 2, 3, 2), 1, "stepped", id="four-groups")],
)
def test_int64_indexing_path(shape, axis, layout):
    with force_int64_indexing():
        trace = _train_step(shape, axis, layout)
    assert trace.launches and all(launch.flags["INT64"] for launch in trace.launches)


SPLIT_BACKWARD = ["channel_major_backward_reduce", "channel_major_elementwise"]

# (training, use_global_stats, path, forward kernels, backward kernels,
#  flags of the last forward launch, flags of the last backward launch)
LAUNCHES = [
    pytest.param(True, False, "triton", ["channel_major_persistent_forward"], ["channel_major_persistent_backward"],
                 dict(UPDATE_MOVING=True), dict(BATCH_STATS=True), id="training-single-pass"),
    pytest.param(True, False, "triton-split", ["channel_major_stats", "channel_major_elementwise"],
                 SPLIT_BACKWARD, dict(HAS_X=True, HAS_DY=False, FROM_MOVING=False), dict(HAS_X=True, HAS_DY=True),
                 id="training-split"),
    pytest.param(False, False, "triton", ["channel_major_elementwise"], ["channel_major_persistent_backward"],
                 dict(HAS_X=True, HAS_DY=False, FROM_MOVING=True), dict(BATCH_STATS=False), id="inference"),
    pytest.param(False, False, "triton-split", ["channel_major_elementwise"], SPLIT_BACKWARD,
                 dict(HAS_X=True, HAS_DY=False, FROM_MOVING=True), dict(HAS_X=False, HAS_DY=True),
                 id="inference-split-backward"),
    pytest.param(True, True, "triton", ["channel_major_elementwise"], ["channel_major_persistent_backward"],
                 dict(HAS_X=True, HAS_DY=False, FROM_MOVING=True), dict(BATCH_STATS=False), id="global-stats"),
]


@pytest.mark.parametrize("axis, family", [(1, "channel_major"), (-1, "channel_minor")],
                         ids=["channel-major", "channel-minor"])
@pytest.mark.parametrize(
    "training, use_global_stats, path, forward, backward, forward_flags, backward_flags", LAUNCHES,
    indirect=["path"])
def test_launches_per_op(training, use_global_stats, path, forward, backward, forward_flags, backward_flags,
                         axis, family):
    """LAUNCHES names the channel-major kernels; the channel-minor family launches its twins."""
    forward, backward = ([k.replace("channel_major", family) for k in ks] for ks in (forward, backward))
    inp = make_inputs((2, 3, 4), axis, torch.float32)
    x = inp.x.requires_grad_(True)
    with tritonbn.trace.capture() as fwd:
        y = tritonbn.batch_norm(x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, axis=axis,
                                training=training, use_global_stats=use_global_stats)
    with tritonbn.trace.capture() as bwd:
        y.sum().backward()
    assert_path(fwd, path, ops=1, family=family)
    assert_path(bwd, path, ops=1, family=family)
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
    from tritonbn.autotune.config import SINGLE_PASS_CAPACITY
    inner = SINGLE_PASS_CAPACITY["forward"]["channel_major"]["vector"]["fp32"] + 16  # a tile twice the capacity
    inp = make_inputs((1, 2, inner), 1, torch.float32)
    with tritonbn.trace.capture() as trace:
        tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, training=True)
    assert trace.kernels()[0] == "channel_major_stats"


@pytest.mark.parametrize(
    "shape, memory_format",
    [pytest.param((20, 6, 65536), None, id="small-C-large-spatial"),
     pytest.param((32, 64, 56, 56), None, id="resnet"),
     pytest.param((32, 64, 56, 56), torch.channels_last, id="resnet-nhwc"),
     pytest.param((16, 32, 128, 128), torch.channels_last, id="nhwc-C32")],
)
def test_reduction_fills_an_h100(shape, memory_format):
    """With C <= 64 the reduction launch still has >= 2 programs per SM of a 132-SM GPU
    (channel-minor: narrower channel blocks when the splits are capped)."""
    from tritonbn.autotune.config import heuristic_only
    h100 = DeviceProfile("H100", sm_count=132, tile_elements=4096)
    plan = _plan_of(shape, 1, memory_format)
    with heuristic_only():
        config = reduce_config(plan, h100)
    channel_programs = plan.channels if plan.family == "channel_major" else -(-plan.channels // config.block_cols)
    assert channel_programs * config.splits >= 2 * 132


# ----------------------------------------------------------------------------- launch decisions

H100 = DeviceProfile("H100", sm_count=132, tile_elements=4096)


def _plan_of(shape, axis=1, memory_format=None):
    x = torch.empty(shape, device="meta")
    if memory_format is not None:
        x = x.contiguous(memory_format=memory_format)
    return plan_view(shape, axis, [x.stride(), x.stride()])


@pytest.mark.parametrize(
    "shape, memory_format, op, element_size, tile",
    [
        pytest.param((32, 64, 32, 32), None, "forward", 2, (32, 1024), id="nchw-forward-at-vector-capacity"),
        pytest.param((33, 64, 32, 32), None, "forward", 2, None, id="nchw-forward-beyond-capacity"),
        pytest.param((32, 64, 32, 32), None, "backward", 2, None, id="nchw-backward-beyond-capacity"),
        pytest.param((16, 64, 32, 32), None, "forward", 8, (16, 1024), id="nchw-float64-at-half-capacity"),
        pytest.param((32, 64, 32, 32), None, "forward", 8, None, id="nchw-float64-beyond-half"),
        pytest.param((64, 4, 7, 7), None, "forward", 2, (64, 64), id="7x7-scalar-loads-half-within"),
        pytest.param((256, 4, 7, 7), None, "forward", 2, (256, 64), id="7x7-scalar-loads-half-at-16384"),
        pytest.param((512, 4, 7, 7), None, "forward", 2, None, id="7x7-scalar-loads-half-beyond-16384"),
        pytest.param((256, 4, 7, 7), None, "forward", 4, (256, 64), id="7x7-scalar-loads-float32-at-16384"),
        pytest.param((128, 4, 7, 7), None, "forward", 8, (128, 64), id="7x7-scalar-loads-float64-at-8192"),
        pytest.param((256, 4, 7, 7), None, "forward", 8, None, id="7x7-scalar-loads-float64-beyond-8192"),
        pytest.param((1, 64, 16, 16), torch.channels_last, "backward", 2, (256, 64), id="nhwc-at-capacity"),
        pytest.param((4, 64, 16, 16), torch.channels_last, "forward", 2, (1024, 16), id="nhwc-one-sector-wide"),
        pytest.param((8, 6, 32, 32), torch.channels_last, "forward", 2, (8192, 1), id="nhwc-small-C-co-resident"),
        pytest.param((2, 200, 64, 64), torch.channels_last, "forward", 2, None, id="nhwc-too-many-narrow-programs"),
    ],
)
def test_single_pass_tile_follows_the_capacities(shape, memory_format, op, element_size, tile):
    """The single-pass tile covers the slice within the (op, family, alignment, dtype) capacity
    that `tritonbn inspect` shows compiles without spills; None means the split path."""
    from tritonbn.autotune.config import persistent_tile
    assert persistent_tile(_plan_of(shape, 1, memory_format), op, element_size) == tile


@pytest.mark.parametrize(
    "shape, stepped, tile",
    [
        pytest.param((16, 64, 4, 16, 16), "stepped", (1024, 16), id="channel-major-at-16384"),
        pytest.param((32, 64, 4, 16, 16), "stepped", None, id="channel-major-beyond-16384"),
        pytest.param((2, 64, 4, 8, 16), "stepped_channels_last_3d", (1024, 8), id="channel-minor-1024-rows"),
        pytest.param((16, 64, 4, 8, 16), "stepped_channels_last_3d", (8192, 1), id="channel-minor-at-8192"),
        pytest.param((32, 64, 4, 8, 16), "stepped_channels_last_3d", None, id="channel-minor-beyond-8192"),
    ],
)
def test_four_group_views_hold_the_four_group_capacity(shape, stepped, tile):
    """Single-pass tiles of views needing four reduced groups hold the half-precision forward's
    four_group capacity (16384 channel-major; 8192 channel-minor: 16384 spills on Triton 3.6 and
    3.8); channel-minor tiles narrow their channels to fit, the programs staying co-resident."""
    from tritonbn.autotune.config import SINGLE_PASS_CAPACITY, persistent_tile
    from tritonbn.inspect import _meta_data
    x = _meta_data(shape, stepped)
    plan = plan_view(shape, 1, [x.stride(), x.stride()])
    capacity = SINGLE_PASS_CAPACITY["forward"][plan.family]["four_group"]
    assert plan.outer_mid > 1 and min(capacity["fp16"], capacity["bf16"]) == {"channel_major": 16384,
                                                                              "channel_minor": 8192}[plan.family]
    assert persistent_tile(plan, "forward", 2) == tile


@pytest.mark.parametrize(
    "shape, memory_format, op, programs_at_least, run_at_least",
    [
        pytest.param((4, 3, 16384), None, "forward", 128, 1024, id="nchw-small-C-training-spreads"),
        pytest.param((4, 3, 128, 128), torch.channels_last, "forward", 128, 256, id="nhwc-small-C-training-spreads"),
        pytest.param((32, 2048, 7, 7), torch.channels_last, "inference", 128, 512, id="nhwc-large-C-tall-tiles"),
        pytest.param((32, 64, 56, 56), None, "inference", 128, 56 * 56, id="nchw-resnet"),
    ],
)
def test_elementwise_tiles_spread_and_amortise_coefficients(shape, memory_format, op, programs_at_least,
                                                              run_at_least):
    """Training's elementwise launch gives the GPU enough programs; every program streams a long
    run of each of its channels, so that its coefficient loads stay a small part of the traffic."""
    from tritonbn.autotune.config import channel_run, elementwise_config, heuristic_only
    plan = _plan_of(shape, 1, memory_format)
    with heuristic_only():
        config = elementwise_config(plan, H100, op=op, dtype=torch.bfloat16)
    if plan.family == "channel_major":
        programs = plan.channels * -(-plan.outer // config.block_rows) * -(-plan.inner // config.block_cols)
    else:
        programs = -(-plan.m // config.block_rows) * -(-plan.channels // config.block_cols)
    assert programs >= programs_at_least
    assert channel_run(plan, config) >= run_at_least


def test_short_elementwise_runs_are_not_valid_stored_configs():
    from tritonbn.autotune.config import elementwise_from_knobs
    from tritonbn.autotune.store import Knobs
    plan = _plan_of((32, 2048, 7, 7), 1, torch.channels_last)
    assert elementwise_from_knobs(plan, Knobs(tile=4096, block_c=64)) is None  # 64-row runs
    assert elementwise_from_knobs(plan, Knobs(tile=16384, block_c=16)) is not None


def test_forced_column_splits_on_channel_minor_are_rejected_before_anything_runs():
    inp = make_inputs((6, 5, 3, 4), 1, torch.float32, "channels_last")
    mm, mv = inp.clone_stats()
    with split_path(reduce=KernelConfig(8, 8, split_rows=2, split_cols=2)):
        with pytest.raises(ValueError, match="split_cols"):
            tritonbn.batch_norm(inp.x, inp.gamma, inp.beta, mm, mv, training=True)
    assert torch.equal(mm, inp.moving_mean) and torch.equal(mv, inp.moving_var)
