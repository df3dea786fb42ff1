"""The layout plan: every call is an (outer, C, inner) strided view.

Statistics reduce over every dimension except the channel axis, and the order in which a
reduction visits elements does not change its value, so the non-channel dimensions may be
reordered and merged freely.  ``plan_view`` sorts them by stride (slowest first), merges
neighbours whose strides allow it in *every* tensor of the call (x, y, dy, dx share one plan),
and describes the call as at most four reduced groups around the channel, three outer ones
(hi, mid, lo) and the inner one:

    element (o, c, i) of tensor t, with o = (o_hi * outer_mid + o_mid) * outer_lo + o_lo, lives at
        o_hi * soh[t] + o_mid * som[t] + o_lo * so[t] + c * sc[t] + i * si[t]

A missing group has extent 1 and stride 0: one or two groups have outer_lo = outer; outer_mid
is 1 up to three groups (the JIT specialises it away).  The third and fourth groups cover views
sliced with a step, whose rows are no longer one stride apart: a step in one dimension needs
three groups, steps in two (or a rank-5 view whose dimensions all stay apart) need four.

NCHW axis=1 -> (N, C, HW), strides (C*HW, HW, 1); channels_last axis=1 -> (1, C, N*HW) with
the channel fastest; axis=-1 -> (1, C, M).  Two kernel families fall out:

- ``CHANNEL_MAJOR``: the inner group is faster than the channel; a program walks one channel
  as ``outer`` runs of ``inner`` elements.
- ``CHANNEL_MINOR``: the channel is the fastest dimension; the data is a [rows, C] matrix,
  rows = outer * inner, reduced over rows and tiled over C (vector loads along C).

Four groups cover every layout of rank <= 5 (four non-channel dimensions).  A layout that needs
five or more (rank >= 6 with steps in four dimensions, say) returns None: the caller then copies
once into a dense tensor and logs it.
Plans are cached per (shape, axis, strides), so planning costs nothing after the first call.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from dataclasses import dataclass
from typing import Iterator, Sequence

import torch

__all__ = [
    "CHANNEL_MAJOR",
    "CHANNEL_MINOR",
    "ViewPlan",
    "plan_view",
    "empty_like_layout",
    "is_dense",
    "layout_strides",
    "force_int64_indexing",
    "force_int64_enabled",
    "MAX_REDUCED_GROUPS",
]

CHANNEL_MAJOR = "channel_major"
CHANNEL_MINOR = "channel_minor"

# Offsets stay in int32 while every element's offset fits with a margin for the masked lanes of
# the last tile; past that the kernels are compiled with 64-bit index arithmetic.
INT32_OFFSET_LIMIT = 2**31 - 2**20

# Reduced groups a kernel view addresses: three outer (hi, mid, lo) and the inner one.
MAX_REDUCED_GROUPS = 4

_force_int64 = contextvars.ContextVar("tritonbn_force_int64", default=False)


@contextlib.contextmanager
def force_int64_indexing(enabled: bool = True) -> Iterator[None]:
    """Plan every call in this context with 64-bit offsets (tests reach the int64 path this way)."""
    token = _force_int64.set(enabled)
    try:
        yield
    finally:
        _force_int64.reset(token)


def force_int64_enabled() -> bool:
    """Whether ``force_int64_indexing`` is active here (call plans are keyed by it)."""
    return _force_int64.get()


@dataclass(frozen=True)
class ViewPlan:
    """One call's tensors as (outer, C, inner) views.

    Attributes:
        outer, channels, inner: extents of the canonical view; ``m = outer * inner``.
        outer_mid, outer_lo: extents of the middle and lowest outer groups (outer = outer_hi *
            outer_mid * outer_lo; outer_mid is 1 and outer_lo is ``outer`` with one group).
        family: CHANNEL_MAJOR or CHANNEL_MINOR (which kernel family runs it).
        strides: per planned tensor, (stride_outer_hi, stride_outer_mid, stride_outer_lo,
            stride_channel, stride_inner) in elements.
        int64: the kernels must use 64-bit offsets.
    """

    outer: int
    channels: int
    inner: int
    outer_mid: int
    outer_lo: int
    family: str
    strides: tuple[tuple[int, int, int, int, int], ...]
    int64: bool

    @property
    def m(self) -> int:
        """Elements per channel."""
        return self.outer * self.inner


def kernel_view(plan: ViewPlan) -> ViewPlan:
    """The view the kernels are launched with: ``plan`` itself, except a channel-minor plan of one
    outer row (channels_last, ``axis=-1``: rows r = i at stride_inner), whose rows become outer
    rows of the highest group (stride_inner) with inner, outer_mid and outer_lo 1.  Triton
    specialises arguments equal to 1 as constants, so the kernels' per-row ``r // inner`` and
    ``r % inner`` (an integer division each tile) fold away; every address is the same."""
    if plan.family != CHANNEL_MINOR or plan.outer != 1 or plan.inner == 1:
        return plan
    strides = tuple((inner, 0, 0, channel, inner) for _, _, _, channel, inner in plan.strides)
    return ViewPlan(plan.inner, plan.channels, 1, 1, 1, plan.family, strides, plan.int64)


def plan_view(
    shape: Sequence[int], axis: int, strides: Sequence[Sequence[int]]
) -> ViewPlan | None:
    """Plan the (outer, C, inner) view shared by tensors of ``shape`` with the given strides.

    Args:
        shape: the common shape of the tensors.
        axis: the channel axis (negative counts from the end).
        strides: one stride tuple per tensor (the first one decides the dimension order).
    Returns:
        The plan, or None when the layout needs more than four reduced groups.
    """
    return _plan_cached(
        tuple(shape), axis % len(shape), tuple(tuple(s) for s in strides), _force_int64.get()
    )


@functools.lru_cache(maxsize=4096)
def _plan_cached(
    shape: tuple[int, ...],
    axis: int,
    strides: tuple[tuple[int, ...], ...],
    force_int64: bool,
) -> ViewPlan | None:
    groups = _merge_reduced_dims(shape, axis, strides)
    if groups is None:
        return None
    missing = (1, tuple(0 for _ in strides))
    while len(groups) < 3:
        groups.insert(0, missing)
    if len(groups) == 3:  # the missing group is the middle one: outer_mid = 1 compiles away
        groups.insert(1, missing)
    (outer_hi, hi_strides), (outer_mid, mid_strides), (outer_lo, lo_strides), (inner, inner_strides) = groups
    channels = shape[axis]
    per_tensor = tuple(
        (hi_strides[t], mid_strides[t], lo_strides[t], strides[t][axis], inner_strides[t])
        for t in range(len(strides))
    )
    family = _family(channels, inner, per_tensor[0])
    sizes = (outer_hi, outer_mid, outer_lo, channels, inner)
    int64 = force_int64 or any(_max_offset(sizes, s) >= INT32_OFFSET_LIMIT for s in per_tensor)
    outer = outer_hi * outer_mid * outer_lo
    return ViewPlan(outer, channels, inner, outer_mid, outer_lo, family, per_tensor, int64)


def _merge_reduced_dims(
    shape: tuple[int, ...], axis: int, strides: tuple[tuple[int, ...], ...]
) -> list[tuple[int, tuple[int, ...]]] | None:
    """Group the non-channel dims (size > 1) into runs that are one stride apart in every tensor."""
    dims = [d for d in range(len(shape)) if d != axis and shape[d] != 1]
    # Slowest first in the first tensor; ties keep the logical order.
    dims.sort(key=lambda d: (-abs(strides[0][d]), d))
    groups: list[tuple[int, tuple[int, ...]]] = []
    for d in dims:
        step = tuple(s[d] for s in strides)
        if groups:
            size, last = groups[-1]
            if all(last[t] == step[t] * shape[d] for t in range(len(strides))):
                groups[-1] = (size * shape[d], step)
                continue
        groups.append((shape[d], step))
    return groups if len(groups) <= MAX_REDUCED_GROUPS else None


def _family(channels: int, inner: int, x_strides: tuple[int, ...]) -> str:
    """Channel-minor when the channel is the fastest-moving dimension of x."""
    stride_c, stride_i = x_strides[-2:]
    if channels == 1:
        return CHANNEL_MAJOR
    if inner == 1 or abs(stride_c) < abs(stride_i):
        return CHANNEL_MINOR
    return CHANNEL_MAJOR


def _max_offset(sizes: tuple[int, ...], strides: tuple[int, ...]) -> int:
    return sum((size - 1) * abs(stride) for size, stride in zip(sizes, strides)) + 1


def is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: the elements fill a contiguous block in some dim order."""
    return _dense(tuple(t.shape), tuple(t.stride()))


def _dense(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    expected = 1
    for size, stride in sorted(zip(shape, strides), key=lambda p: abs(p[1])):
        if size == 1:
            continue
        if stride != expected:
            return False
        expected *= size
    return True


def layout_strides(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...]:
    """The strides ``empty_like_layout`` gives a tensor of ``shape`` and ``strides``: the same
    where they are dense, otherwise dense in their dimension order (slowest stride first)."""
    try:
        return _layout_strides_cached(shape, strides)
    except TypeError:  # symbolic sizes (torch.compile tracing) are not hashable
        return _layout_strides(shape, strides)


_MAX_CACHED_LAYOUTS = 4096


def _layout_strides(shape: tuple[int, ...], strides: tuple[int, ...]) -> tuple[int, ...]:
    if _dense(shape, strides):
        return strides
    order = sorted(range(len(shape)), key=lambda d: (-abs(strides[d]), d))
    dense = [0] * len(shape)
    step = 1
    for d in reversed(order):
        dense[d] = step
        step *= max(shape[d], 1)  # as torch.empty: a zero extent does not zero the strides above it
    return tuple(dense)


_layout_strides_cached = functools.lru_cache(maxsize=_MAX_CACHED_LAYOUTS)(_layout_strides)


def empty_like_layout(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """An uninitialised tensor shaped like ``t``: ``t``'s strides where ``t`` is dense,
    otherwise dense in ``t``'s dimension order (so the pair still plans as one view)."""
    shape = t.shape
    return torch.empty_strided(shape, layout_strides(tuple(shape), t.stride()), dtype=dtype or t.dtype,
                               device=t.device)


def numel(shape: Sequence[int]) -> int:
    """Product of a shape (1 for a scalar shape)."""
    return math.prod(shape)
