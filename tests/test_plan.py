"""The layout plan: which (outer, C, inner) view and kernel family each layout gets."""

from __future__ import annotations

import math
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from tritonbn.plan import (
    CHANNEL_MAJOR,
    CHANNEL_MINOR,
    empty_like_layout,
    force_int64_indexing,
    is_dense,
    _plan_cached,
    plan_view,
)
from helpers import apply_layout


def _x(shape, layout="contiguous"):
    x = torch.empty(shape)
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    return x


# (tensor, axis, expected (outer, C, inner, outer_mid, outer_lo), family, x strides (oh, om, o, c, i))
PLANS = [
    pytest.param(_x((2, 3, 4, 5)), 1, (2, 3, 20, 1, 2), CHANNEL_MAJOR, (0, 0, 60, 20, 1), id="nchw-axis1"),
    pytest.param(_x((2, 3, 4, 5), "channels_last"), 1, (1, 3, 40, 1, 1), CHANNEL_MINOR, (0, 0, 0, 1, 3), id="nhwc-axis1"),
    pytest.param(_x((2, 3, 2, 4, 5), "channels_last_3d"), 1, (1, 3, 80, 1, 1), CHANNEL_MINOR, (0, 0, 0, 1, 3),
                 id="ndhwc-axis1"),
    pytest.param(_x((6, 7)), -1, (1, 7, 6, 1, 1), CHANNEL_MINOR, (0, 0, 0, 1, 7), id="rows-by-channels-axis-1"),
    pytest.param(_x((6, 7)), 0, (1, 6, 7, 1, 1), CHANNEL_MAJOR, (0, 0, 0, 7, 1), id="2d-axis0"),
    pytest.param(_x((2, 3, 4, 5)), 2, (6, 4, 5, 1, 6), CHANNEL_MAJOR, (0, 0, 20, 5, 1), id="nchw-axis2"),
    pytest.param(_x((2, 3, 4, 5)).permute(0, 2, 3, 1), 3, (2, 3, 20, 1, 2), CHANNEL_MAJOR, (0, 0, 60, 20, 1),
                 id="permuted-view-keeps-memory-order"),
    pytest.param(_x((2, 3, 4, 11))[..., 1:10:2], 1, (8, 3, 5, 1, 4), CHANNEL_MAJOR, (132, 0, 11, 44, 2),
                 id="step-sliced-three-groups"),
    pytest.param(_x((2, 3, 4, 3, 5))[:, :, ::2, :, ::2], 1, (12, 3, 3, 2, 3), CHANNEL_MAJOR, (180, 30, 5, 60, 2),
                 id="steps-in-two-dims-four-groups"),
    pytest.param(_x((4, 3, 4, 3, 5), "channels_last_3d")[::2, :, ::2, :, 1::2], 1, (12, 3, 2, 2, 3), CHANNEL_MINOR,
                 (360, 90, 15, 1, 6), id="channels-last-3d-steps-four-groups"),
    pytest.param(_x((2, 6, 4, 5))[:, 1:4], 1, (2, 3, 20, 1, 2), CHANNEL_MAJOR, (0, 0, 120, 20, 1), id="channel-slice"),
    pytest.param(_x((7,)), 0, (1, 7, 1, 1, 1), CHANNEL_MINOR, (0, 0, 0, 1, 0), id="rank1-one-element-per-channel"),
    pytest.param(_x((5, 1, 3)), 1, (1, 1, 15, 1, 1), CHANNEL_MAJOR, (0, 0, 0, 3, 1), id="single-channel"),
    pytest.param(torch.empty(1).expand(4, 3), 1, (1, 3, 4, 1, 1), CHANNEL_MAJOR, (0, 0, 0, 0, 0), id="expanded-zero-strides"),
]


@pytest.mark.parametrize("x, axis, extents, family, x_strides", PLANS)
def test_plan_view(x, axis, extents, family, x_strides):
    plan = plan_view(x.shape, axis, [x.stride()])
    assert (plan.outer, plan.channels, plan.inner, plan.outer_mid, plan.outer_lo) == extents
    assert plan.family == family
    assert plan.strides[0] == x_strides
    assert not plan.int64


@pytest.mark.parametrize("x", [
    pytest.param(torch.arange(264.0, dtype=torch.float64).reshape(2, 3, 4, 11)[..., 1:10:2], id="three-groups"),
    pytest.param(torch.arange(1080.0, dtype=torch.float64).reshape(4, 3, 6, 3, 5)[:, :, 1::2, :, ::2],
                 id="four-groups"),
    pytest.param(torch.arange(1080.0, dtype=torch.float64).reshape(4, 3, 6, 3, 5)
                 .contiguous(memory_format=torch.channels_last_3d)[::2, :, ::2, :, 1::2], id="four-groups-channel-minor"),
])
def test_plan_reproduces_every_offset(x):
    """The planned strides address exactly the elements torch's strides do (the kernels' formula)."""
    plan = plan_view(x.shape, 1, [x.stride()])
    soh, som, so, sc, si = plan.strides[0]
    flat = x.as_strided((x.untyped_storage().nbytes() // 8,), (1,), 0)
    gathered = torch.empty(plan.outer, plan.channels, plan.inner, dtype=torch.float64)
    for o in range(plan.outer):
        o_hi, o_mid, o_lo = o // plan.outer_lo // plan.outer_mid, o // plan.outer_lo % plan.outer_mid, o % plan.outer_lo
        for c in range(plan.channels):
            for i in range(plan.inner):
                gathered[o, c, i] = flat[x.storage_offset() + o_hi * soh + o_mid * som + o_lo * so + c * sc + i * si]
    channels = x.shape[1]
    expected = x.movedim(1, -1).reshape(-1, channels)
    assert torch.equal(torch.sort(gathered.permute(1, 0, 2).reshape(channels, -1), dim=1).values,
                       torch.sort(expected.T, dim=1).values)


def test_five_groups_are_not_planned():
    """Rank 6 with steps in four dimensions: five reduced groups, the one layout copied once."""
    x = torch.empty(2, 3, 4, 4, 4, 5)[:, :, ::2, ::2, ::2, ::2]
    assert plan_view(x.shape, 1, [x.stride()]) is None
    assert plan_view(x[:, :, :, :, :, 0].shape, 1, [x[:, :, :, :, :, 0].stride()]) is not None


def test_joint_plan_merges_only_where_every_tensor_allows():
    x = torch.empty(2, 3, 4, 5)
    y = torch.empty(2, 3, 4, 11)[..., 1:10:2]
    assert plan_view(x.shape, 1, [x.stride()]).outer_lo == 2  # N alone, HW merged
    joint = plan_view(x.shape, 1, [x.stride(), y.stride()])
    assert (joint.outer, joint.outer_mid, joint.outer_lo, joint.inner) == (8, 1, 4, 5)


def test_force_int64_indexing_switches_the_plan():
    x = torch.empty(2, 3, 4)
    assert not plan_view(x.shape, 1, [x.stride()]).int64
    with force_int64_indexing():
        assert plan_view(x.shape, 1, [x.stride()]).int64
    assert not plan_view(x.shape, 1, [x.stride()]).int64


def test_large_strides_need_int64_without_allocating():
    shape, strides = (2, 3, 2**30), (3 * 2**30, 2**30, 1)
    assert plan_view(shape, 1, [strides]).int64


@pytest.mark.parametrize(
    "x, dense",
    [
        pytest.param(torch.empty(2, 3, 4), True, id="contiguous"),
        pytest.param(torch.empty(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), True, id="channels-last"),
        pytest.param(torch.empty(2, 3, 4).permute(2, 0, 1), True, id="permuted"),
        pytest.param(torch.empty(2, 3, 8)[..., ::2], False, id="stepped"),
        pytest.param(torch.empty(1).expand(3, 4), False, id="expanded"),
    ],
)
def test_empty_like_layout(x, dense):
    assert is_dense(x) == dense
    y = empty_like_layout(x)
    assert y.shape == x.shape and is_dense(y)
    if dense:
        assert y.stride() == x.stride()


def _cache_keys():
    """(shape, axis, strides of data and grad) keys: ranks 1-5, every axis, four layouts (200 of
    them, repeated), and 32 channel-major shapes."""
    keys = []
    for shape in [(2, 3, 4, 5), (3, 1, 7), (5, 6), (2, 2, 2, 2, 2), (8,)]:
        for axis in range(len(shape)):
            for layout in ("contiguous", "permuted", "sliced", "channels_last"):
                if layout == "channels_last" and len(shape) != 4:
                    continue
                x = apply_layout(torch.zeros(shape), layout, axis)
                keys.append((shape, axis, (x.stride(), x.stride())))
    keys = (keys * 4)[:200]
    for shape in [(2, c, 3 + c) for c in range(1, 17)] + [(c, 3, 2) for c in range(1, 17)]:
        x = torch.empty(shape)
        keys.append((shape, 1, (x.stride(),)))
    return keys


def test_plan_cache_is_thread_safe():
    """plan_view from 8 threads started together, the lru_cache filled concurrently from empty:
    every thread gets, for every key, the plan computed without the cache."""
    keys = _cache_keys()
    _plan_cached.cache_clear()
    expected = [_plan_cached.__wrapped__(s, a, st, False) for s, a, st in keys]
    assert all(p.m * p.channels == math.prod(s) for p, (s, _, _) in zip(expected, keys))
    _plan_cached.cache_clear()
    barrier = threading.Barrier(8)

    def worker(_):
        barrier.wait(timeout=30)
        return [plan_view(*key) for key in keys]

    with ThreadPoolExecutor(8) as pool:
        for got in pool.map(worker, range(8)):
            assert got == expected