"""Launchers and the torch binding of the BatchNorm operator.

Order of this file (as in Liger-Kernel's ops): launchers (tensors in, tensors out, one per
kernel), call plans, the backends (Triton kernels, plain torch) behind one interface, the
autograd Function that serves them, the op entries (a repeated call's settings, backend and
plan under one key) and the public ``batch_norm``.

Launch counts per op (channel-major or channel-minor alike):
  inference forward: 1 (elementwise, coefficients from the moving statistics)
  training forward:  1 (persistent, when a channel's slice fits a program)
                     or 2 (statistics partials finalized by each channel's last program, elementwise)
  backward:          1 (persistent) or 2 (S/D partials and their finalize, elementwise dx)
"""

from __future__ import annotations

import functools
import importlib
import struct
import threading
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, TypeVar

import numpy as np
import torch

from . import reference, trace
from .autotune.config import (
    BACKEND_ENV,
    BACKWARD,
    BITMASK_GROUP,
    ELEMENTWISE,
    FORWARD,
    INFERENCE,
    PERSISTENT,
    REDUCE,
    KernelConfig,
    decision_context,
    device_profile,
    bitmask_elementwise,
    elementwise_config,
    environment,
    finalize_config,
    fused_persistent,
    interpreting,
    launch_programs,
    persistent_config,
    reduce_config,
)
from .cpu_backend import CpuBackend, torch_fused_backward, torch_fused_state_like
from .launch import CapturedLaunch, Launch, cdiv, dry_run, f32_ratio, f64_halves  # noqa: F401 (dry_run, CapturedLaunch: re-exported for the tools)
from .plan import (CHANNEL_MAJOR, MAX_REDUCED_GROUPS, ViewPlan, empty_like_layout, force_int64_enabled, kernel_view,
                   layout_strides, plan_view)
from .validation import Settings, check_out_apart, signature, validate, validate_fusion

__all__ = ["batch_norm", "backend_for"]

TRITON = "triton"
REFERENCE = "reference"


@functools.lru_cache(maxsize=None)
def _kernels() -> Any:
    """The kernel modules, imported on first use (importing tritonbn needs no Triton)."""
    return importlib.import_module("tritonbn.kernels")


# ----------------------------------------------------------------------------- launches
#
# One function per kernel: the Launch of that kernel for a plan and its config (grid, scalars,
# constexprs), decided from the call's signature alone.  The docstring names the tensors the
# launch then takes, in order.


def _split_extents(plan: ViewPlan, cfg: KernelConfig) -> tuple[int, int]:
    """(rows_per_split, cols_per_split): whole tiles per split, so splits start tile-aligned."""
    rows = plan.outer if plan.family == CHANNEL_MAJOR else plan.m
    rows_per_split = cdiv(cdiv(rows, cfg.block_rows), cfg.split_rows) * cfg.block_rows
    cols_per_split = cdiv(cdiv(plan.inner, cfg.block_cols), cfg.split_cols) * cfg.block_cols
    return rows_per_split, cols_per_split


def _split_inverses(plan: ViewPlan, rows_per_split: int, cols_per_split: int) -> tuple[float, ...]:
    """1 / (elements of a split), correctly rounded to float32, for each extent a split can have
    (full, or the shorter last one): channel-major (full x full, full x short columns, short
    rows x full, short x short), channel-minor (full, short).  The statistics kernels divide their
    split's sums by these: no division instruction (its slow-path call made ptxas spill)."""
    if plan.family != CHANNEL_MAJOR:
        full, _, short, _ = _split_count_inverses(plan.m, rows_per_split, 1, 1)
        return full, short
    return _split_count_inverses(plan.outer, rows_per_split, plan.inner, cols_per_split)


@functools.lru_cache(maxsize=1024)
def _split_count_inverses(rows: int, rows_per_split: int, cols: int, cols_per_split: int) -> tuple[float, ...]:
    """``_split_inverses`` of a rows x cols range in splits of rows_per_split x cols_per_split
    (cached: SyncBatchNorm builds its statistics launch every call)."""
    def short(extent: int, per_split: int) -> int:
        return extent - (extent - 1) // per_split * per_split

    row_extents, col_extents = (rows_per_split, short(rows, rows_per_split)), (cols_per_split, short(cols, cols_per_split))
    return tuple(f32_ratio(1, int(np.float32(r * c))) for r in row_extents for c in col_extents)


def _finalize_tail(plan: ViewPlan, cfg: KernelConfig) -> dict[str, int]:
    """The constexprs of a reduction's finalize tail (its channel's, or channel block's, last
    program merges the partials): BLOCK_P >= the partials per channel and, channel-minor, TAIL_C
    channels merged at a time, from ``finalize_config`` (a [BLOCK_P, TAIL_C] tile)."""
    tail = finalize_config(cfg.splits, cfg.num_warps)
    if plan.family == CHANNEL_MAJOR:
        return dict(BLOCK_P=tail.block_rows)
    return dict(BLOCK_P=tail.block_rows, TAIL_C=max(1, min(tail.block_cols, cfg.block_cols)))


def _count_ratios(m: int) -> tuple[float, float]:
    """(1 / m, m / (m - 1)) as the kernels' float32 divisions of the float32 counts would round
    them (correctly), computed on the host: a finalize tail has no division instruction left."""
    count, previous = int(np.float32(m)), int(np.float32(max(m - 1, 1)))
    return f32_ratio(1, count), f32_ratio(count, previous)


def _fused_flags(settings: Settings | None, cfg: KernelConfig, bits: bool = False) -> dict[str, Any]:
    """The fused epilogue's constexprs (none for a plain call, whose kernels then compile as
    before): RELU, ADDEND, the bit mask's GROUP of columns per byte (``kernels/common.py``) and,
    for a forward, BITS: it writes the ReLU's decisions (a backward will read them)."""
    if settings is None or not (settings.relu or settings.addend):
        return {}
    flags = dict(RELU=settings.relu, ADDEND=settings.addend, GROUP=min(BITMASK_GROUP, cfg.block_cols))
    return dict(flags, BITS=True) if bits else flags


def _float64_bits(value: float) -> int:
    """A float64's bits as an int64 kernel argument (Triton passes float scalars as float32)."""
    return struct.unpack("<q", struct.pack("<d", value))[0]


def statistics_launch(plan: ViewPlan, cfg: KernelConfig, settings: Settings | None = None) -> Launch:
    """Shifted, scaled (mean, M2, count) partials of every (channel, split), finalized in the same launch
    when ``settings`` are given (the split path), partials only without (SyncBatchNorm merges
    them across ranks first).

    Tensors: (x, partial [5, C, P], tickets (int32 zeros, ``tickets``), gamma, beta, moving_mean,
    moving_var, mean [C] out, invstd [C] out, coef [6, C] out); coef[:2] is the mean as (pilot,
    shifted mean), which the backward reuses.  The moving statistics are updated in place.
    Without ``settings`` pass ``partial`` for the tensors after it (unused).
    """
    plan = kernel_view(plan)
    k = _kernels().stats
    rows_per_split, cols_per_split = _split_extents(plan, cfg)
    programs = launch_programs(REDUCE, plan, cfg)
    finalize = settings is not None
    tail = _finalize_tail(plan, cfg) if finalize else dict(BLOCK_P=1, TAIL_C=1)
    numbers = ((*f64_halves(settings.eps), *f64_halves(settings.momentum), *_count_ratios(plan.m))
               if finalize else (0.0,) * 4 + (1.0, 1.0))
    flags = dict(INT64=plan.int64, FINALIZE=finalize, FIX_GAMMA=finalize and settings.fix_gamma,
                 UNBIASED=finalize and settings.unbiased_update)
    if plan.family == CHANNEL_MAJOR:
        scalars = (plan.channels, plan.outer, plan.inner, plan.m, plan.outer_mid, plan.outer_lo, *plan.strides[0],
                   rows_per_split, cols_per_split, cfg.split_rows, cfg.split_cols,
                   *_split_inverses(plan, rows_per_split, cols_per_split), *numbers)
        return Launch(k.channel_major_stats_kernel, "channel_major_stats", programs, cfg, scalars,
                      dict(BLOCK_O=cfg.block_rows, BLOCK_I=cfg.block_cols, **flags, BLOCK_P=tail["BLOCK_P"]))
    scalars = (plan.channels, plan.inner, plan.m, plan.outer_mid, plan.outer_lo, *plan.strides[0],
               rows_per_split, cfg.split_rows, *_split_inverses(plan, rows_per_split, cols_per_split), *numbers)
    return Launch(k.channel_minor_stats_kernel, "channel_minor_stats", programs, cfg, scalars,
                  dict(BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, **flags, **tail))


def elementwise_launch(plan: ViewPlan, cfg: KernelConfig, settings: Settings, *, has_x: bool, has_dy: bool,
                       from_moving: bool, bits: bool = False) -> Launch:
    """out = ((x - mean) * invstd) * x_coef + dy * dy_coef + const per channel.

    Tensors: (x, dy, out, coef [6, C], moving_mean, moving_var, gamma, beta, center [2, C] out,
    invstd [C] out, mask, daddend).  ``plan.strides`` are those of (x, out) or (x, dy, out).  With
    ``from_moving`` the coefficients come from the moving statistics (and gamma, beta), and
    center/invstd are written; otherwise from coef (the [C] tensors are then unused: pass any).
    Without x or dy, pass another tensor of the call in its place (it is not read).

    Fused (``settings.relu`` / ``settings.addend``): a forward takes the addend in dy's slot
    (``has_dy`` False, ``plan.strides`` of (x, out, addend)) and writes the ReLU's bits into
    mask; a backward passes dy where the forward's output was positive (bits from mask with an
    addend, writing daddend in out's strides; else recomputed from x and the forward's
    coefficients in center [6, C]).  ``bits``: the forward writes the ReLU's decisions into
    mask.  A plain call passes any tensor for mask and daddend.
    """
    plan = kernel_view(plan)
    k = _kernels().elementwise
    fused = _fused_flags(settings, cfg, bits)
    x_strides = plan.strides[0]
    if has_dy:
        dy_strides, out_strides = plan.strides[1], plan.strides[2]
    else:  # a forward: (x, out) or (x, out, addend)
        dy_strides = plan.strides[2] if settings.addend else x_strides
        out_strides = plan.strides[1]
    strides = (*x_strides, *dy_strides, *out_strides)
    eps = f64_halves(settings.eps)
    flags = dict(HAS_X=has_x, HAS_DY=has_dy, FROM_MOVING=from_moving, FIX_GAMMA=settings.fix_gamma,
                 INT64=plan.int64, **fused)
    if plan.family == CHANNEL_MAJOR:
        tiles_o, tiles_i = cdiv(plan.outer, cfg.block_rows), cdiv(plan.inner, cfg.block_cols)
        scalars = (plan.channels, plan.outer, plan.inner, *eps, plan.outer_mid, plan.outer_lo, *strides,
                   tiles_o, tiles_i)
        return Launch(k.channel_major_elementwise_kernel, "channel_major_elementwise",
                      launch_programs(ELEMENTWISE, plan, cfg), cfg, scalars,
                      dict(BLOCK_O=cfg.block_rows, BLOCK_I=cfg.block_cols, **flags))
    c_blocks = cdiv(plan.channels, cfg.block_cols)
    scalars = (plan.channels, plan.inner, plan.m, *eps, plan.outer_mid, plan.outer_lo, *strides,
               c_blocks, cfg.row_tiles)
    return Launch(k.channel_minor_elementwise_kernel, "channel_minor_elementwise",
                  launch_programs(ELEMENTWISE, plan, cfg), cfg, scalars,
                  dict(BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, **flags))


def backward_reduce_launch(plan: ViewPlan, cfg: KernelConfig, settings: Settings | None = None) -> Launch:
    """Partial S = sum(dy) and D = sum((x - mean) * dy), finalized in the same launch into dgamma,
    dbeta and the dx coefficients when ``settings`` are given (partials only without:
    SyncBatchNorm sums them across ranks first).

    Tensors: (x, dy, center [2, C] (the forward's mean as (pilot, shifted mean)), partial
    [2, C, P] out, tickets (int32 zeros, ``tickets``), invstd [C], gamma, dgamma [C] out, dbeta
    [C] out, coef [6, C] out, mask (the fused forward's bits; any tensor otherwise)).  Without
    ``settings`` pass ``partial`` for the tensors after it.
    """
    plan = kernel_view(plan)
    k = _kernels().backward
    rows_per_split, cols_per_split = _split_extents(plan, cfg)
    programs = launch_programs(REDUCE, plan, cfg)
    finalize = settings is not None
    tail = _finalize_tail(plan, cfg) if finalize else dict(BLOCK_P=1, TAIL_C=1)
    flags = dict(INT64=plan.int64, FINALIZE=finalize, FIX_GAMMA=finalize and settings.fix_gamma,
                 BATCH_STATS=finalize and settings.batch_stats, **_fused_flags(settings, cfg))
    inverse = (_count_ratios(plan.m)[0], _float64_bits(1.0 / plan.m))
    if plan.family == CHANNEL_MAJOR:
        scalars = (plan.channels, plan.outer, plan.inner, plan.m, plan.outer_mid, plan.outer_lo,
                   *plan.strides[0], *plan.strides[1], rows_per_split, cols_per_split, cfg.split_rows, cfg.split_cols,
                   *inverse)
        return Launch(k.channel_major_backward_reduce_kernel, "channel_major_backward_reduce", programs, cfg,
                      scalars, dict(BLOCK_O=cfg.block_rows, BLOCK_I=cfg.block_cols, **flags, BLOCK_P=tail["BLOCK_P"]))
    scalars = (plan.channels, plan.inner, plan.m, plan.outer_mid, plan.outer_lo,
               *plan.strides[0], *plan.strides[1], rows_per_split, cfg.split_rows, *inverse)
    return Launch(k.channel_minor_backward_reduce_kernel, "channel_minor_backward_reduce", programs, cfg,
                  scalars, dict(BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, **flags, **tail))


def persistent_forward_launch(plan: ViewPlan, cfg: KernelConfig, settings: Settings, bits: bool = False) -> Launch:
    """Training forward in one pass (a channel's slice fits a program): writes y, mean, invstd
    and center, updates the moving statistics in place.  Tensors: (x, y, gamma, beta,
    moving_mean, moving_var, mean [C] out, invstd [C] out, center [2, C] out ([6, C] with a
    fused ReLU), addend, mask (the ReLU's bits out)); ``plan.strides`` of (x, y) or (x, y,
    addend); ``bits``: it writes the ReLU's decisions into mask.  A plain call passes any tensor
    for addend and mask.  (Launched on ``plan`` itself, as the backward: ``kernel_view``'s
    channel-minor tiles spilled at capacities probed with it, 16 bytes for fp64 [8192, 2].)"""
    k = _kernels().persistent
    scalars = (*f64_halves(settings.eps), *f64_halves(settings.momentum), *_count_ratios(plan.m),
               plan.outer_mid, plan.outer_lo)
    flags = dict(FIX_GAMMA=settings.fix_gamma, UPDATE_MOVING=True, UNBIASED=settings.unbiased_update,
                 INT64=plan.int64, **_fused_flags(settings, cfg, bits))
    strides = (*plan.strides[0], *plan.strides[1], *plan.strides[2 if settings.addend else 0])
    if plan.family == CHANNEL_MAJOR:
        return Launch(k.channel_major_persistent_forward_kernel, "channel_major_persistent_forward",
                      launch_programs(PERSISTENT, plan, cfg), cfg, (plan.channels, plan.outer, plan.inner, plan.m, *scalars, *strides),
                      dict(BLOCK_O=cfg.block_rows, BLOCK_I=cfg.block_cols, **flags))
    return Launch(k.channel_minor_persistent_forward_kernel, "channel_minor_persistent_forward",
                  launch_programs(PERSISTENT, plan, cfg), cfg, (plan.channels, plan.inner, plan.m, *scalars, *strides),
                  dict(BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, **flags))


def persistent_backward_launch(plan: ViewPlan, cfg: KernelConfig, settings: Settings) -> Launch:
    """Backward in one pass (a channel's slice fits a program): writes dx, dgamma, dbeta.
    Tensors: (x, dy, dx, center [2, C] ([6, C] fused ReLU), invstd [C], gamma, dgamma [C] out,
    dbeta [C] out, mask (the fused forward's bits), daddend out (dx's strides)); a plain call
    passes any tensor for mask and daddend.  (Launched on ``plan`` itself, not ``kernel_view``'s:
    with inner = 1 specialised, ptxas spilled the channel-minor kernel at its scalar-load
    capacity, 16 bytes at 8192 elements on Triton 3.8 and 3.9.)"""
    k = _kernels().persistent
    flags = dict(FIX_GAMMA=settings.fix_gamma, BATCH_STATS=settings.batch_stats, INT64=plan.int64,
                 **_fused_flags(settings, cfg))
    strides = (*plan.strides[0], *plan.strides[1], *plan.strides[2])
    if plan.family == CHANNEL_MAJOR:
        return Launch(k.channel_major_persistent_backward_kernel, "channel_major_persistent_backward",
                      launch_programs(PERSISTENT, plan, cfg), cfg, (plan.channels, plan.outer, plan.inner, plan.m, plan.outer_mid,
                                           plan.outer_lo, *strides),
                      dict(BLOCK_O=cfg.block_rows, BLOCK_I=cfg.block_cols, **flags))
    return Launch(k.channel_minor_persistent_backward_kernel, "channel_minor_persistent_backward",
                  launch_programs(PERSISTENT, plan, cfg), cfg,
                  (plan.channels, plan.inner, plan.m, plan.outer_mid, plan.outer_lo, *strides),
                  dict(BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, **flags))


def launch_statistics(x: torch.Tensor, plan: ViewPlan, cfg: KernelConfig, acc: torch.dtype) -> torch.Tensor:
    """Run ``statistics_launch`` without its finalize: returns partial [5, C, P] in ``acc``."""
    partial = torch.empty((5, plan.channels, cfg.splits), dtype=acc, device=x.device)
    statistics_launch(plan, cfg)(x, partial, *(partial,) * 8)
    return partial


def launch_persistent_forward(x: torch.Tensor, y: torch.Tensor, plan: ViewPlan, cfg: KernelConfig,
                              params: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                              settings: Settings, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run ``persistent_forward_launch`` with ``params`` (gamma, beta, moving_mean, moving_var):
    returns (mean, invstd, center [2, C]) and writes y."""
    mean, invstd, center = _stat_outputs(plan.channels, acc, x.device)
    persistent_forward_launch(plan, cfg, settings)(x, y, *params, mean, invstd, center, x, x)
    return mean, invstd, center


# Per-device buffers the kernels use across calls, never freed.  While a CUDA graph is being
# captured every call gets fresh ones (kept alive for the graph's replays, never reused), so a
# graph shares no buffer with eager calls or with other graphs.
_buffers: dict[tuple, torch.Tensor] = {}
_graph_buffers: list[torch.Tensor] = []
MIN_BUFFER_ELEMENTS = 4096


_cuda_devices: dict[torch.device, bool] = {}


def _is_cuda(device: torch.device) -> bool:
    """``device.type == "cuda"``, looked up: ``device.type`` builds a new string each time (about 1 µs)."""
    cuda = _cuda_devices.get(device)
    if cuda is None:
        cuda = _cuda_devices[device] = device.type == "cuda"
    return cuda


def _cached_buffer(key: tuple, count: int, dtype: torch.dtype, device: torch.device, zeroed: bool,
                  capturing: bool) -> torch.Tensor:
    buffer = None if capturing else _buffers.get(key)
    if buffer is not None and buffer.numel() >= count:
        return buffer
    buffer = (torch.zeros if zeroed else torch.empty)(max(count, MIN_BUFFER_ELEMENTS), dtype=dtype, device=device)
    if capturing:
        _graph_buffers.append(buffer)
    else:
        if key in _buffers:  # a graph captured before may still replay on the old one
            _graph_buffers.append(_buffers[key])
        _buffers[key] = buffer
    return buffer


def stream_state(device: torch.device) -> tuple[int, bool]:
    """(what orders a call's kernels after the previous call's, whether a CUDA graph is being
    captured): the current CUDA stream; off CUDA (the interpreter runs kernels on the calling
    thread) the thread.  A call with several per-stream buffers looks it up once."""
    if _is_cuda(device):
        # (torch.cuda's Python wrappers of these cost a µs more; CUDA is initialised: data is on it)
        return torch._C._cuda_getCurrentRawStream(device.index), torch._C._cuda_isCurrentStreamCapturing()
    return threading.get_ident(), False


def tickets(device: torch.device, count: int, state: tuple[int, bool] | None = None) -> torch.Tensor:
    """At least ``count`` int32 tickets, zero, for a split-path reduction on ``device``'s current
    stream (``kernels.common.last_to_arrive``; ``state``: its ``stream_state``, if known).  Every
    launch leaves them zero; launches on one stream run in order and share them, other streams
    get their own."""
    stream, capturing = state or stream_state(device)
    return _cached_buffer(("tickets", device, stream), count, torch.int32, device, True, capturing)


PARTIALS, COEFFICIENTS = "partials", "coefficients"  # the workspaces of a call


def workspace(device: torch.device, dtype: torch.dtype, count: int, part: str = PARTIALS,
              state: tuple[int, bool] | None = None) -> torch.Tensor:
    """At least ``count`` elements for what one call's kernels pass each other and the caller never
    sees (``part``: the split path's partials, the dx coefficients; ``state`` as ``tickets``'),
    per stream: the next call on the stream runs after this one's kernels (cuDNN's workspace,
    likewise)."""
    stream, capturing = state or stream_state(device)
    return _cached_buffer((part, device, stream, dtype), count, dtype, device, False, capturing)


_split_sets: dict[tuple, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}


def split_workspace(device: torch.device, dtype: torch.dtype, partials: int, channels: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(partials, coefficients, tickets) of one split-path call on ``device``'s current stream:
    ``workspace`` of ``partials`` elements, ``workspace(COEFFICIENTS)`` of [6 C] and ``tickets``
    for ``channels``, remembered together (one lookup a call instead of three)."""
    state = stream_state(device)
    key = (device, state[0], dtype)
    buffers = None if state[1] else _split_sets.get(key)
    if (buffers is not None and buffers[0].numel() >= partials and buffers[1].numel() >= COEFFICIENT_ROWS * channels
            and buffers[2].numel() >= channels):
        return buffers
    buffers = (workspace(device, dtype, partials, PARTIALS, state),
               workspace(device, dtype, COEFFICIENT_ROWS * channels, COEFFICIENTS, state), tickets(device, channels, state))
    if not state[1]:
        _split_sets[key] = buffers
    return buffers


def scratch(device: torch.device, dtype: torch.dtype, count: int) -> torch.Tensor:
    """At least ``count`` elements where kernels write per-channel outputs no caller asked for
    (mean, invstd without ``output_mean_var`` or autograd): shared by every call and stream, since
    nothing ever reads it."""
    return _cached_buffer(("scratch", device, dtype), count, dtype, device, False, stream_state(device)[1])


def _stat_outputs(channels: int, acc: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(mean [C], invstd [C], center [2, C]) in the accumulation dtype, unwritten."""
    mean = torch.empty(channels, dtype=acc, device=device)
    return mean, torch.empty(channels, dtype=acc, device=device), torch.empty((2, channels), dtype=acc, device=device)


# ----------------------------------------------------------------------------- call plans
#
# What a forward or backward call launches depends only on its signature: shapes, strides,
# dtypes, device, settings, the 16-byte alignment of its pointers (Triton specialises on it) and
# the decision context (overrides, stores).  A call plan holds those decisions, made once; a call
# looks its plan up, allocates its outputs and launches.

PERSISTENT_PATH = "persistent"  # one single-pass launch
SPLIT_PATH = "split"  # partials finalized by each channel's last program, then elementwise
INFERENCE_PATH = "inference"  # one elementwise launch from the moving statistics


@dataclass(frozen=True, eq=False)
class CallPlan:
    """The decisions of one forward or backward call signature.

    Attributes:
        path: PERSISTENT_PATH, SPLIT_PATH or INFERENCE_PATH.
        view: the view plan of the tensors the kernels read and write.
        launches: the path's launches, in order.
        acc: the accumulation dtype (float32, float64 for float64 data).
        partials: partials per channel of the split path's reduction (0 otherwise).
        dense_x: x needs more than four reduced groups: the kernels read a dense copy.
        temp_output: the output shares no view plan with x: the kernels write a dense temporary.
        dense_dy: (backward) dy shares no view plan with x: the kernels read a dense copy.
        y_strides: (forward) the strides of y: out's, or x's layout made dense.
        y_like_x: (forward, no out) y has x's strides: ``torch.empty_like(x)`` allocates it
            (cheaper than ``empty_strided``).
        dense_addend: (fused forward) the addend shares no view plan with x and y: the kernels
            read a dense copy.
        mask_bytes: (fused ReLU with an addend) bytes of the ReLU's bit mask (``bitmask_bytes``).
        reads_x: (backward, split path) the dx launch reads x: batch statistics, or a fused
            ReLU's recompute.
        center_rows: (forward) rows of the center it writes: 2, or 6 with a fused ReLU (the
            coefficients the backward recomputes the ReLU's decisions with).
        channel_like: (forward) an accumulation-dtype [C] tensor: ``torch.empty_like`` of it
            allocates mean and invstd (cheaper than ``torch.empty`` with a shape, dtype and device).
        rows_like: (forward) likewise for the rows the path writes: center [center_rows, C], on
            the split path the coefficients [6, C] (whose rows 0-1 are the center).
        scratch: (forward) ``scratch`` of the path's per-channel outputs (see there).
        dx_like_x: (backward) dx has the strides of x as read: ``torch.empty_like`` allocates it.
        dgamma_like, dbeta_like: (backward) [C] tensors of gamma's and beta's dtypes, likewise.
    """

    path: str
    view: ViewPlan
    launches: tuple[Launch, ...]
    acc: torch.dtype
    partials: int = 0
    dense_x: bool = False
    temp_output: bool = False
    dense_dy: bool = False
    y_strides: tuple[int, ...] = ()
    y_like_x: bool = False
    dense_addend: bool = False
    mask_bytes: int = 0
    reads_x: bool = True
    center_rows: int = 2
    channel_like: torch.Tensor | None = None
    rows_like: torch.Tensor | None = None
    scratch: torch.Tensor | None = None
    dx_like_x: bool = False
    dgamma_like: torch.Tensor | None = None
    dbeta_like: torch.Tensor | None = None


MAX_CALL_PLANS = 4096  # distinct signatures kept; the cache is emptied past that
_call_plans: dict[tuple, CallPlan | None] = {}


def clear_call_plans() -> None:
    """Forget every cached call plan (with their direct launchers), and the op entries holding them."""
    _call_plans.clear()
    _op_entries.clear()


def _cached_plan(key: tuple, make: Callable[[], CallPlan | None]) -> CallPlan | None:
    plan = _call_plans.get(key, _MISSING)
    if plan is _MISSING:
        if len(_call_plans) >= MAX_CALL_PLANS:
            _call_plans.clear()
        plan = _call_plans[key] = make()
    return plan


_MISSING: Any = object()


def _alignment(*tensors: torch.Tensor) -> int:
    """A bit per pointer: set where it is 16-byte aligned (Triton compiles aligned pointers apart;
    divisibility by 16 is all it specialises a pointer on).  Callers first test the OR of the
    pointers and key -1 where all are aligned (almost every call: the allocator aligns to 512
    bytes), which is cheaper than this loop."""
    mask = 0
    for t in tensors:
        mask = (mask << 1) | (t.data_ptr() & 15 == 0)
    return mask


def _forward_layout(shape: tuple[int, ...], axis: int, x_strides: tuple[int, ...], y_strides: tuple[int, ...]
                    ) -> tuple[ViewPlan, bool, bool]:
    """(plan, dense_x, temp_output) of a forward: copies only for layouts with no 4-group view."""
    plan = plan_view(shape, axis, [x_strides, y_strides])
    if plan is not None:
        return plan, False, False
    dense_x = plan_view(shape, axis, [x_strides]) is None
    if dense_x:
        x_strides = layout_strides(shape, x_strides)
        plan = plan_view(shape, axis, [x_strides, y_strides])
        if plan is not None:
            return plan, True, False
    return plan_view(shape, axis, [x_strides, layout_strides(shape, x_strides)]), dense_x, True


def _backward_layout(shape: tuple[int, ...], axis: int, x_strides: tuple[int, ...], dy_strides: tuple[int, ...]
                     ) -> tuple[ViewPlan, bool, bool]:
    """(plan of (x, dy, dx), dense_x, dense_dy): dx is allocated in x's layout; x is copied only
    when it needs more than four groups (a caller that kept no dense copy), dy only when it does
    not share a plan with x."""
    plan = plan_view(shape, axis, [x_strides, dy_strides, layout_strides(shape, x_strides)])
    dense_x = plan is None and plan_view(shape, axis, [x_strides]) is None
    if dense_x:
        x_strides = layout_strides(shape, x_strides)
        plan = plan_view(shape, axis, [x_strides, dy_strides, x_strides])
    if plan is not None:
        return plan, dense_x, False
    dense = layout_strides(shape, x_strides)
    return plan_view(shape, axis, [x_strides, dense, dense]), dense_x, True


def bitmask_bytes(plan: ViewPlan) -> int:
    """Bytes of a fused ReLU's bit mask on ``plan``: a row of cdiv(extent, 8) bytes per (o, c)
    channel-major (extent inner), per row r channel-minor (extent C); kernels/common.py."""
    if plan.family == CHANNEL_MAJOR:
        return plan.outer * plan.channels * cdiv(plan.inner, 8)
    return plan.m * cdiv(plan.channels, 8)


def _same_bitmask_rows(plan: ViewPlan, shape: tuple[int, ...], axis: int, x_strides: tuple[int, ...]) -> bool:
    """Whether ``plan`` addresses the bit mask as x's own plan does: the rows of a channel-major
    mask are runs of ``inner`` elements (channel-minor rows are the linear row index, which every
    plan of x enumerates alike)."""
    return plan.family != CHANNEL_MAJOR or plan.inner == plan_view(shape, axis, [x_strides]).inner


def _addend_layout(shape: tuple[int, ...], axis: int, x_strides: tuple[int, ...], y_strides: tuple[int, ...],
                   addend_strides: tuple[int, ...], bits: bool) -> tuple[ViewPlan, bool, bool]:
    """(plan of (x, y, addend) as the kernels see them, temp_output, dense_addend), x and y as
    ``_forward_layout`` gives them (``x_strides``, ``y_strides``: after its copies): the addend
    is copied only where it shares no plan with them, and y written through a temporary where
    the shared plan would address the bit mask unlike x's own (``_same_bitmask_rows``)."""
    plan = plan_view(shape, axis, [x_strides, y_strides, addend_strides])
    if plan is not None and (not bits or _same_bitmask_rows(plan, shape, axis, x_strides)):
        return plan, False, False
    dense = layout_strides(shape, x_strides)
    plan = plan_view(shape, axis, [x_strides, y_strides, dense])
    if plan is not None and (not bits or _same_bitmask_rows(plan, shape, axis, x_strides)):
        return plan, False, True
    return plan_view(shape, axis, [x_strides, dense, dense]), True, True


def _fused_layout(x: torch.Tensor, out_strides: tuple[int, ...] | None, settings: Settings,
                  addend_strides: tuple[int, ...] | None, bits: bool
                  ) -> tuple[ViewPlan, tuple[int, ...], bool, bool, bool]:
    """(view, y_strides, dense_x, temp_output, dense_addend) of a forward into out of
    ``out_strides`` (None: y allocated in x's layout), with an addend of ``addend_strides`` when
    ``settings.addend`` (``bits``: a ReLU's bit mask is written, whose rows must be x's own)."""
    shape = tuple(x.shape)
    y_strides = layout_strides(shape, x.stride()) if out_strides is None else out_strides
    view, dense_x, temp_output = _forward_layout(shape, settings.axis, x.stride(), y_strides)
    dense_addend = False
    if settings.addend:
        x_kernel = layout_strides(shape, x.stride()) if dense_x else tuple(x.stride())
        y_kernel = layout_strides(shape, x_kernel) if temp_output else y_strides
        view, temp_addend, dense_addend = _addend_layout(shape, settings.axis, x_kernel, y_kernel, addend_strides, bits)
        temp_output = temp_output or temp_addend
    return view, y_strides, dense_x, temp_output, dense_addend


def _forward_plan(x: torch.Tensor, out_strides: tuple[int, ...] | None, settings: Settings,
                  addend_strides: tuple[int, ...] | None = None, keep_mask: bool = False) -> CallPlan | None:
    """The call plan of a forward writing into out of ``out_strides`` (None: y is allocated),
    fused with an addend of ``addend_strides`` when ``settings.addend`` (and, with a ReLU and
    ``keep_mask``, writing its decisions as bits for the backward); None where there are no
    elements (handled apart)."""
    bits = settings.relu and settings.addend and keep_mask
    view, y_strides, dense_x, temp_output, dense_addend = _fused_layout(x, out_strides, settings, addend_strides, bits)
    if view.m == 0 or view.channels == 0:
        return None
    acc = reference.stat_dtype(x.dtype)
    profile, dtype = device_profile(x.device), x.dtype
    layout = dict(dense_x=dense_x, temp_output=temp_output, y_strides=y_strides,
                  y_like_x=y_strides == tuple(x.stride()), dense_addend=dense_addend,
                  mask_bytes=bitmask_bytes(view) if bits else 0, center_rows=6 if settings.relu else 2)
    if not settings.batch_stats:
        apply = elementwise_config(view, profile, op=INFERENCE, dtype=dtype)
        apply = bitmask_elementwise(view, apply) if bits else apply
        launch = elementwise_launch(view, apply, settings, has_x=True, has_dy=False, from_moving=True, bits=bits)
        return CallPlan(INFERENCE_PATH, view, (launch,), acc, **layout,
                        **_output_templates(view.channels, layout["center_rows"], acc, x.device))
    single_pass = persistent_config(view, FORWARD, profile, x.element_size(), dtype=dtype)
    if settings.relu or settings.addend:
        single_pass = fused_persistent(view, FORWARD, x.element_size(), single_pass, bits)
    if single_pass is not None:
        return CallPlan(PERSISTENT_PATH, view, (persistent_forward_launch(view, single_pass, settings, bits),), acc,
                        **layout, **_output_templates(view.channels, layout["center_rows"], acc, x.device))
    reduce = reduce_config(view, profile, op=FORWARD, dtype=dtype)
    apply = elementwise_config(view, profile, op=FORWARD, dtype=dtype)
    apply = bitmask_elementwise(view, apply) if bits else apply
    launches = (statistics_launch(view, reduce, settings),
                elementwise_launch(view, apply, settings, has_x=True, has_dy=False, from_moving=False, bits=bits))
    return CallPlan(SPLIT_PATH, view, launches, acc, reduce.splits, **layout,
                    **_output_templates(view.channels, COEFFICIENT_ROWS, acc, x.device))


COEFFICIENT_ROWS = 6  # the split path's [6, C] coefficients: center (rows 0-1), then the elementwise rows


def _output_templates(channels: int, rows: int, acc: torch.dtype, device: torch.device) -> dict[str, torch.Tensor]:
    """A forward plan's ``channel_like``, ``rows_like`` ([rows, C]) and ``scratch``."""
    return dict(channel_like=torch.empty(channels, dtype=acc, device=device),
                rows_like=torch.empty((rows, channels), dtype=acc, device=device),
                scratch=scratch(device, acc, max(rows, COEFFICIENT_ROWS) * channels))


def _backward_plan(x: torch.Tensor, dy: torch.Tensor, settings: Settings, gamma_dtype: torch.dtype,
                   beta_dtype: torch.dtype) -> CallPlan | None:
    """The call plan of a backward (None: no elements); dgamma and dbeta in ``gamma_dtype`` and
    ``beta_dtype``."""
    shape = tuple(x.shape)
    view, dense_x, dense_dy = _backward_layout(shape, settings.axis, x.stride(), dy.stride())
    bits = settings.relu and settings.addend
    if bits and not dense_dy and not _same_bitmask_rows(view, shape, settings.axis, view_x_strides(x, dense_x)):
        dense = layout_strides(shape, x.stride())
        view, dense_dy = plan_view(shape, settings.axis, [view_x_strides(x, dense_x), dense, dense]), True
    if view.m == 0 or view.channels == 0:
        return None
    acc = reference.stat_dtype(x.dtype)
    profile, dtype = device_profile(x.device), x.dtype
    x_strides = view_x_strides(x, dense_x)
    layout = dict(dense_x=dense_x, dense_dy=dense_dy, mask_bytes=bitmask_bytes(view) if bits else 0,
                  dx_like_x=layout_strides(shape, x_strides) == x_strides,
                  dgamma_like=torch.empty(view.channels, dtype=gamma_dtype, device=x.device),
                  dbeta_like=torch.empty(view.channels, dtype=beta_dtype, device=x.device))
    single_pass = persistent_config(view, BACKWARD, profile, x.element_size(), dtype=dtype)
    if single_pass is not None:
        return CallPlan(PERSISTENT_PATH, view, (persistent_backward_launch(view, single_pass, settings),), acc,
                        **layout)
    reduce = reduce_config(view, profile, op=BACKWARD, dtype=dtype)
    apply = elementwise_config(view, profile, op=BACKWARD, dtype=dtype)
    # whole bytes of the bit mask per tile: narrower tiles would each load the bytes they share
    apply = bitmask_elementwise(view, apply) if bits else apply
    reads_x = settings.batch_stats or (settings.relu and not settings.addend)
    launches = (backward_reduce_launch(view, reduce, settings),
                elementwise_launch(view, apply, settings, has_x=settings.batch_stats, has_dy=True, from_moving=False))
    return CallPlan(SPLIT_PATH, view, launches, acc, reduce.splits, reads_x=reads_x, **layout)


def view_x_strides(x: torch.Tensor, dense_x: bool) -> tuple[int, ...]:
    """The strides of x as the kernels read it (its dense copy's where ``dense_x``)."""
    return layout_strides(tuple(x.shape), x.stride()) if dense_x else tuple(x.stride())


DENSE_X_COPY = f"data layout needs more than {MAX_REDUCED_GROUPS} reduced groups; copied to a dense tensor"
TEMP_OUTPUT = "out layout does not share a view plan with data; writing through a temporary"
DENSE_DY_COPY = "grad_out layout does not share a view plan with data"
DENSE_ADDEND_COPY = "addend layout does not share a view plan with data and out; copied to a dense tensor"


def _forward_copies(x: torch.Tensor, y: torch.Tensor, dense_x: bool, temp_output: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x to read, y to write) as ``_forward_layout`` decided; when y to write is not ``y`` the
    caller copies it back."""
    if dense_x:
        trace.record_copy(DENSE_X_COPY)
        x = empty_like_layout(x).copy_(x)
    if temp_output:
        trace.record_copy(TEMP_OUTPUT)
        y = empty_like_layout(x)
    return x, y


def _backward_copies(x: torch.Tensor, dy: torch.Tensor, dense_x: bool, dense_dy: bool
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, dy) to read as ``_backward_layout`` decided (dy copied into x's layout)."""
    if dense_x:
        trace.record_copy(DENSE_X_COPY)
        x = empty_like_layout(x).copy_(x)
    if dense_dy:
        trace.record_copy(DENSE_DY_COPY)
        dy = empty_like_layout(x).copy_(dy)
    return x, dy


def _run_forward(call: CallPlan, x: torch.Tensor, y: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor,
                 moving_mean: torch.Tensor, moving_var: torch.Tensor, keep_stats: bool,
                 addend: torch.Tensor | None = None, mask: torch.Tensor | None = None, keep_mean: bool = True
                 ) -> tuple[Any, Any, Any]:
    """Run a forward call plan: returns (mean, invstd, center [2 or 6, C]) and writes y (and, fused,
    the ReLU's bits into ``mask``).  Statistics nobody reads go to the plan's ``scratch`` and come
    back as None (an allocation costs more host time than a launch): all three with
    ``keep_stats`` False, the mean with ``keep_mean`` False (what autograd saves: invstd, center)."""
    if addend is None:
        addend = x  # (not read)
    if mask is None:
        mask = x  # (not written)
    path = call.path
    if keep_stats:
        invstd, rows = torch.empty_like(call.channel_like), torch.empty_like(call.rows_like)
        mean = torch.empty_like(call.channel_like) if keep_mean and path != INFERENCE_PATH else call.scratch
    else:
        mean = invstd = rows = call.scratch
    if path == SPLIT_PATH:
        statistics, apply = call.launches
        channels = call.view.channels
        # without keep_stats the coefficients come from the workspace: the elementwise launch
        # reads them, so they cannot be the shared scratch
        partial, coef, ticket = split_workspace(x.device, call.acc, 5 * channels * call.partials, channels)
        if not keep_stats:
            rows = coef
        statistics(x, partial, ticket, gamma, beta, moving_mean, moving_var, mean, invstd, rows)
        # rows are the [6, C] coefficients; the first two are the center: they stand in for the
        # unused [C] tensors, and are the center the backward reads (its rows 0-1; a view [:2]
        # would cost as much as the launch; a fused ReLU's recompute reads its rows 2, 3, 5 too)
        apply(x, addend, y, rows, rows, rows, rows, rows, rows, invstd, mask, x)
    elif path == PERSISTENT_PATH:
        call.launches[0](x, y, gamma, beta, moving_mean, moving_var, mean, invstd, rows, addend, mask)
    else:
        call.launches[0](x, addend, y, rows, moving_mean, moving_var, gamma, beta, rows, invstd, mask, x)
        # inference: the mean is the moving mean (shifted part 0)
        mean = rows[0] if keep_stats and keep_mean else mean
    if not keep_stats:
        return None, None, None
    return (mean if keep_mean else None), invstd, rows


# ----------------------------------------------------------------------------- backends


HOST_MOVING_UPDATE = "moving statistics updated in float64 on the host (momentum outside [0, 1])"


def kernel_momentum(momentum: float) -> bool:
    """Whether the kernels apply ``momentum`` themselves: 0 <= momentum <= 1, where the update is a
    convex combination of finite values and cannot overflow the accumulation dtype.  Outside
    (extrapolating updates, momentum up to 1e308) float32 products overflow where the float64
    formula does not, and float32 cannot even hold momentum > 3.4e38: the host applies it."""
    return 0.0 <= momentum <= 1.0


def _plan_for(tensors: list[torch.Tensor], axis: int) -> ViewPlan | None:
    return plan_view(tensors[0].shape, axis, [t.stride() for t in tensors])


_Method = TypeVar("_Method", bound=Callable[..., Any])


def _current_cuda_device() -> int:
    """``torch.cuda.current_device()`` without its lazy-initialisation check (a µs of Python):
    asked only about data on CUDA, which is initialised then."""
    return torch._C._cuda_getDevice()


def on_data_device(method: _Method) -> _Method:
    """Run a backend method with its first argument's CUDA device current.

    Triton launches on the current CUDA device, not on the tensors' device: data on cuda:1
    while cuda:0 is current would run on GPU 0 (and read memory of another device).  The guard
    is on every public ``TritonBackend`` method, through which every launch path passes (the
    functional op, the custom ops, the layers, SyncBatchNorm).  It costs one attribute read for
    CPU tensors, and enters ``torch.cuda.device`` only when another device is current.
    """
    @functools.wraps(method)
    def guarded(self, data: torch.Tensor, *args, **kwargs):
        if not data.is_cuda:
            return method(self, data, *args, **kwargs)
        index = data.get_device()
        if index == _current_cuda_device():
            return method(self, data, *args, **kwargs)
        with torch.cuda.device(index):
            return method(self, data, *args, **kwargs)

    return guarded  # type: ignore[return-value]


class ForwardResult(NamedTuple):
    """A backend's forward: y, the statistics it normalised with (mean, invstd [C] in the
    accumulation dtype), center [>= 2, C] (rows 0-1: the mean as (pilot, shifted mean), for the
    backward) and x as the kernels read it (a dense copy for layouts beyond four groups)."""

    y: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    center: torch.Tensor
    x: torch.Tensor


class FusedForwardResult(NamedTuple):
    """A backend's fused forward: ``ForwardResult``'s fields and the ReLU's decisions (``mask``:
    the Triton kernels' bits with an addend, a bool tensor on the torch path; else None)."""

    y: torch.Tensor
    mean: torch.Tensor
    invstd: torch.Tensor
    center: torch.Tensor
    x: torch.Tensor
    mask: torch.Tensor | None


class FusedBackwardResult(NamedTuple):
    """A backend's fused backward: dx, dgamma, dbeta and daddend (None without an addend)."""

    dx: torch.Tensor
    dgamma: torch.Tensor
    dbeta: torch.Tensor
    daddend: torch.Tensor | None


class BackwardResult(NamedTuple):
    """A backend's backward: dx, dgamma (gamma's dtype), dbeta (beta's dtype)."""

    dx: torch.Tensor
    dgamma: torch.Tensor
    dbeta: torch.Tensor


@dataclass(frozen=True)
class TritonBackend:
    """Runs every phase as Triton kernels (on CUDA, or on CPU under TRITON_INTERPRET=1).

    ``forward`` returns a ``ForwardResult`` and updates the moving statistics; ``backward`` a
    ``BackwardResult``.  Both run the call plan of their signature (``CallPlan``).
    """

    name: str = TRITON

    @on_data_device
    def forward(self, x, gamma, beta, moving_mean, moving_var, settings: Settings, out,
                keep_stats: bool = True, keep_mean: bool = True, call: CallPlan | None = None) -> ForwardResult:
        """``keep_stats`` False: the caller reads only y (and the moving statistics); the result's
        mean, invstd and center are None.  ``keep_mean`` False: the mean is None (autograd keeps
        only invstd and center).  ``call``: this signature's plan, from the op's entry
        (``_direct_plan``), which also vouches for contiguous parameters and a kernel momentum."""
        if call is not None:
            return self._run(call, x, gamma, beta, moving_mean, moving_var, out, keep_stats, keep_mean)
        # The kernels index parameters as ptr + c: strided views go through contiguous copies,
        # and the moving statistics are copied back after the update.
        gamma, beta = gamma.contiguous(), beta.contiguous()
        mean_arg, var_arg = moving_mean.contiguous(), moving_var.contiguous()
        if settings.batch_stats and not kernel_momentum(settings.momentum):
            result = self._forward_updating_on_host(x, gamma, beta, mean_arg, var_arg, settings, out)
        else:
            result = self._forward(x, gamma, beta, mean_arg, var_arg, settings, out, keep_stats, keep_mean=keep_mean)
        if mean_arg is not moving_mean:
            moving_mean.copy_(mean_arg)
        if var_arg is not moving_var:
            moving_var.copy_(var_arg)
        return result

    def _direct_plan(self, x, gamma, beta, moving_mean, moving_var, settings: Settings, out) -> CallPlan | None:
        """The plan ``forward(..., call=)`` may run this unfused call with, or None where
        ``forward`` must decide for itself (strided parameters, a host-side moving update, no
        elements)."""
        if not all(t.is_contiguous() for t in (gamma, beta, moving_mean, moving_var)):
            return None
        if settings.batch_stats and not kernel_momentum(settings.momentum):
            return None
        return self._lookup_plan(x, gamma, beta, moving_mean, moving_var, settings, out)

    def _forward_updating_on_host(self, x, gamma, beta, moving_mean, moving_var, settings: Settings, out,
                                  addend=None, mask_box=None):
        """Training forward with a momentum outside [0, 1]: the kernels write the batch statistics
        (an update with momentum 0 into float64 [2, C] scratch) and ``reference.moving_update``
        applies the momentum in float64, as the SPEC formula is evaluated (O(C) work)."""
        trace.record_note(HOST_MOVING_UPDATE)
        batch = torch.zeros((2, x.shape[settings.axis]), dtype=torch.float64, device=x.device)
        result = self._forward(x, gamma, beta, batch[0], batch[1], settings._replace(momentum=0.0), out,
                               addend=addend, mask_box=mask_box)
        for moving, batch_value in zip((moving_mean, moving_var), batch):
            reference.moving_update(moving, batch_value, settings.momentum)
        return result

    @staticmethod
    def _lookup_plan(x, gamma, beta, moving_mean, moving_var, settings: Settings, out,
                     addend: torch.Tensor | None = None, keep_mask: bool = False) -> CallPlan | None:
        """The cached call plan of this forward signature (None: no elements)."""
        out_strides = None if out is None else out.stride()
        y_ptr = x if out is None else out  # y is allocated aligned; out's pointer is the caller's
        pointer_bits = (x.data_ptr() | y_ptr.data_ptr() | gamma.data_ptr() | beta.data_ptr() | moving_mean.data_ptr()
                        | moving_var.data_ptr())
        alignment = -1 if not pointer_bits & 15 else _alignment(x, y_ptr, gamma, beta, moving_mean, moving_var)
        key = (x.shape, x.stride(), x.dtype, x.device, out_strides, gamma.dtype, beta.dtype, moving_mean.dtype,
               moving_var.dtype, settings, alignment, decision_context(), force_int64_enabled())
        if addend is not None:
            key += (addend.stride(), addend.data_ptr() & 15 == 0, keep_mask)
        return _cached_plan(key, lambda: _forward_plan(x, out_strides, settings,
                                                       None if addend is None else addend.stride(), keep_mask))

    def _forward(self, x, gamma, beta, moving_mean, moving_var, settings: Settings, out,
                 keep_stats: bool = True, addend: torch.Tensor | None = None,
                 mask_box: list | None = None, keep_mean: bool = True) -> ForwardResult:
        """``addend`` (settings.addend): fused into y; a fused ReLU's bit mask, where the plan has
        one, is appended to ``mask_box``."""
        call = self._lookup_plan(x, gamma, beta, moving_mean, moving_var, settings, out, addend, mask_box is not None)
        if call is None:
            y = out if out is not None else empty_like_layout(x)
            return self._empty_forward(x, y, gamma, beta, moving_mean, moving_var, settings)
        return self._run(call, x, gamma, beta, moving_mean, moving_var, out, keep_stats, keep_mean, addend, mask_box)

    @staticmethod
    def _run(call: CallPlan, x, gamma, beta, moving_mean, moving_var, out, keep_stats: bool, keep_mean: bool,
             addend: torch.Tensor | None = None, mask_box: list | None = None) -> ForwardResult:
        """Allocate y (or write ``out``), make the plan's copies and run its launches."""
        if out is not None:
            y = out
        elif call.y_like_x:
            y = torch.empty_like(x)
        else:
            y = torch.empty_strided(x.shape, call.y_strides, dtype=x.dtype, device=x.device)
        y_kernel = y
        if call.dense_x or call.temp_output:
            x, y_kernel = _forward_copies(x, y, call.dense_x, call.temp_output)
        mask = None
        if addend is not None:
            if call.dense_addend:
                trace.record_copy(DENSE_ADDEND_COPY)
                addend = empty_like_layout(x).copy_(addend)
            if call.mask_bytes:
                mask = torch.empty(call.mask_bytes, dtype=torch.uint8, device=x.device)
                mask_box.append(mask)
        mean, invstd, center = _run_forward(call, x, y_kernel, gamma, beta, moving_mean, moving_var, keep_stats,
                                            addend, mask, keep_mean)
        if y_kernel is not y:
            y.copy_(y_kernel)
        return ForwardResult(y, mean, invstd, center, x)

    @on_data_device
    def fused_forward(self, x, gamma, beta, moving_mean, moving_var, settings: Settings, out,
                      addend: torch.Tensor | None, keep_stats: bool = True, keep_mask: bool = True
                      ) -> FusedForwardResult:
        """``forward`` fused with the ReLU and/or addend of ``settings`` (the epilogues of the same
        launches); the result also holds the ReLU's bit mask (with an addend and ``keep_mask``:
        a backward will follow; None otherwise, the backward then recomputes the decisions)."""
        gamma, beta = gamma.contiguous(), beta.contiguous()
        mean_arg, var_arg = moving_mean.contiguous(), moving_var.contiguous()
        mask_box: list | None = [] if keep_mask else None
        if settings.batch_stats and not kernel_momentum(settings.momentum):
            result = self._forward_updating_on_host(x, gamma, beta, mean_arg, var_arg, settings, out, addend,
                                                    mask_box)
        else:
            result = self._forward(x, gamma, beta, mean_arg, var_arg, settings, out, keep_stats, addend, mask_box)
        if mean_arg is not moving_mean:
            moving_mean.copy_(mean_arg)
        if var_arg is not moving_var:
            moving_var.copy_(var_arg)
        return FusedForwardResult(*result, mask_box[0] if mask_box else None)

    @staticmethod
    def fused_state_like(x: torch.Tensor, settings: Settings, addend: torch.Tensor | None
                         ) -> tuple[int, torch.Tensor | None]:
        """(rows of center, an empty tensor shaped as the mask or None) that ``fused_forward`` on
        ``x`` with ``addend`` returns (a backward to follow; ``out`` None): what a custom op's
        fake implementation promises, from shapes and strides alone.  Symbolic shapes (dynamic
        compilation) cannot be planned: the mask's length is then a data-dependent size."""
        # without an addend the backward recomputes the ReLU from rows 0-3 and 5; with one it reads the bits
        rows = 6 if settings.relu and not settings.addend else 2
        if not (settings.relu and settings.addend):
            return rows, None
        if not all(isinstance(n, int) for n in (*x.shape, *x.stride(), *addend.stride())):
            return rows, x.new_empty(torch.library.get_ctx().new_dynamic_size(), dtype=torch.uint8)
        view = _fused_layout(x, None, settings, addend.stride(), True)[0]
        return rows, x.new_empty(bitmask_bytes(view) if view.m and view.channels else 0, dtype=torch.uint8)

    @staticmethod
    def _empty_forward(x, y, gamma, beta, moving_mean, moving_var, settings: Settings) -> ForwardResult:
        """No elements to normalise (inference on an empty batch): per-channel statistics only."""
        _, mean, invstd = reference.forward(x, gamma, beta, moving_mean, moving_var, axis=settings.axis,
                                            eps=settings.eps, momentum=settings.momentum,
                                            fix_gamma=settings.fix_gamma, batch_stats=False,
                                            update_moving=False, out=y)
        return ForwardResult(y, mean, invstd, torch.stack([mean, torch.zeros_like(mean)]), x)

    @on_data_device
    def backward(self, dy, x, gamma, center, invstd, settings: Settings, beta_dtype,
                 mask: torch.Tensor | None = None, forward_call: CallPlan | None = None) -> BackwardResult:
        """Returns (dx, dgamma, dbeta); with a fused ReLU (``settings.relu``) dy counts where the
        forward's output was positive: from its bit ``mask`` (with an addend) or recomputed from x
        and center [6, C].  ``fused_backward`` also returns daddend.  ``forward_call``: the plan
        of the forward that returned x (as read), center and invstd for this gamma, settings and
        beta dtype; it then stands for them in the plan key."""
        dx, dgamma, dbeta, _ = self._backward(dy, x, gamma, center, invstd, settings, beta_dtype, mask, forward_call)
        return BackwardResult(dx, dgamma, dbeta)

    @on_data_device
    def fused_backward(self, dy, x, gamma, center, invstd, settings: Settings, beta_dtype,
                       mask: torch.Tensor | None = None) -> FusedBackwardResult:
        """(dx, dgamma, dbeta, daddend): daddend, the gradient of a fused addend, is dy where the
        ReLU passed it (written by the dx launch), dy itself without a ReLU, None without addend."""
        return self._backward(dy, x, gamma, center, invstd, settings, beta_dtype, mask)

    def _backward(self, dy, x, gamma, center, invstd, settings: Settings, beta_dtype, mask,
                  forward_call: CallPlan | None = None) -> FusedBackwardResult:
        if forward_call is None:  # (a forward plan of an op entry ran on this contiguous gamma)
            gamma = gamma.contiguous()
        pointer_bits = x.data_ptr() | dy.data_ptr() | gamma.data_ptr() | center.data_ptr() | invstd.data_ptr()
        alignment = -1 if not pointer_bits & 15 else _alignment(x, dy, gamma, center, invstd)
        if forward_call is None:
            key = (x.shape, x.stride(), dy.stride(), x.dtype, dy.dtype, x.device, gamma.dtype, center.dtype,
                   beta_dtype, settings, alignment, decision_context(), force_int64_enabled())
        else:  # (a CallPlan hashes by identity)
            key = (forward_call, dy.stride(), dy.dtype, alignment, decision_context(), force_int64_enabled())
        call = _call_plans.get(key, _MISSING)  # (the hit without the closure below)
        if call is _MISSING:
            call = _cached_plan(key, lambda: _backward_plan(x, dy, settings, gamma.dtype, beta_dtype))
        plain_addend = dy if settings.addend and not settings.relu else None
        if call is None:
            channels = x.shape[settings.axis]
            dgamma = torch.zeros(channels, dtype=gamma.dtype, device=x.device)
            daddend = empty_like_layout(x) if settings.addend else None
            return FusedBackwardResult(empty_like_layout(x), dgamma,
                                       torch.zeros(channels, dtype=beta_dtype, device=x.device), daddend)
        if call.dense_x or call.dense_dy:
            x, dy = _backward_copies(x, dy, call.dense_x, call.dense_dy)
        dx = torch.empty_like(x) if call.dx_like_x else empty_like_layout(x)
        dgamma, dbeta = torch.empty_like(call.dgamma_like), torch.empty_like(call.dbeta_like)
        daddend = empty_like_layout(x) if call.mask_bytes else None
        bits = mask if mask is not None else x
        if call.path == PERSISTENT_PATH:
            call.launches[0](x, dy, dx, center, invstd, gamma, dgamma, dbeta, bits, dx if daddend is None else daddend)
            return FusedBackwardResult(dx, dgamma, dbeta, plain_addend if daddend is None else daddend)
        reduce, apply = call.launches
        channels = call.view.channels
        partial, coef, ticket = split_workspace(x.device, center.dtype, 2 * channels * call.partials, channels)
        reduce(x, dy, center, partial, ticket, invstd, gamma, dgamma, dbeta, coef, bits)
        # without batch statistics (and a ReLU to recompute) dx does not read x: dx stands in for it
        apply(x if call.reads_x else dx, dy, dx, coef, center, center, center, center, center, invstd, bits,
              dx if daddend is None else daddend)
        return FusedBackwardResult(dx, dgamma, dbeta, plain_addend if daddend is None else daddend)

    # ------------------------------------------------------------------ SyncBatchNorm's parts
    # Uncached (one call per step each): the same launches, planned per call.

    @on_data_device
    def moments(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """[3, C] float64 (count, mean, M2) of this rank's batch (``reference.moments``): the
        statistics kernel's shifted Welford partials, merged over splits on the host (O(C x P))."""
        channels = x.shape[axis]
        dense_x = plan_view(x.shape, axis, [x.stride()]) is None
        x, _ = _forward_copies(x, x, dense_x, False)
        plan = _plan_for([x], axis)
        if plan.m == 0 or channels == 0:
            return reference.moments(x, axis)
        cfg = reduce_config(plan, device_profile(x.device), op=FORWARD, dtype=x.dtype)
        partial = launch_statistics(x, plan, cfg, reference.stat_dtype(x.dtype)).double()
        mean_z, m2_z, count, pilot, scale = partial.unbind(0)  # [C, P] each: z = (x - pilot) * scale
        parts = torch.stack([count, pilot + mean_z / scale, m2_z / (scale * scale)])  # [3, C, P] in x units
        return torch.stack(reference.chan_merge(parts.permute(2, 0, 1)))

    @on_data_device
    def normalize(self, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, g: torch.Tensor,
                  beta: torch.Tensor, axis: int, addend: torch.Tensor | None = None, relu: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """y = (x - mean) * invstd * g + beta with given float64 statistics [C] (+ ``addend``, then
        a ReLU with ``relu``: the fused epilogue), in one elementwise launch: returns (y, x as
        read, center [2, C], invstd [C]) in the accumulation dtype."""
        acc = reference.stat_dtype(x.dtype)
        center, invstd_acc = center_pair(mean, acc), invstd.to(acc)
        y = empty_like_layout(x)
        settings = Settings(axis=axis, eps=0.0, momentum=0.0, fix_gamma=False, batch_stats=True,
                            unbiased_update=False, relu=relu, addend=addend is not None)
        plan, _, dense_x, temp_output, dense_addend = _fused_layout(
            x, None, settings, None if addend is None else addend.stride(), False)
        x, y_kernel = _forward_copies(x, y, dense_x, temp_output)
        if plan.m == 0 or plan.channels == 0:
            return y, x, center, invstd_acc
        if dense_addend:
            trace.record_copy(DENSE_ADDEND_COPY)
            addend = empty_like_layout(x).copy_(addend)
        zeros = torch.zeros_like(invstd_acc)
        coef = _coefficient_rows(center, invstd_acc, g, zeros, beta)
        cfg = elementwise_config(plan, device_profile(x.device), op=FORWARD, dtype=x.dtype)
        apply = elementwise_launch(plan, cfg, settings, has_x=True, has_dy=False, from_moving=False)
        apply(x, x if addend is None else addend, y_kernel, coef, center, center, center, center, center, invstd_acc,
              x, x)
        if y_kernel is not y:
            y.copy_(y_kernel)
        return y, x, center, invstd_acc

    @on_data_device
    def gradient_sums(self, dy: torch.Tensor, x: torch.Tensor, center: torch.Tensor, axis: int) -> torch.Tensor:
        """[2, C] float64 (S, D) = (sum(dy), sum((x - mean) * dy)): the backward reduction kernel's
        partials summed on the host; ``center`` [2, C] is the mean as (pilot, shifted mean)."""
        plan, dense_x, dense_dy = _backward_layout(tuple(x.shape), axis, x.stride(), dy.stride())
        x, dy = _backward_copies(x, dy, dense_x, dense_dy)
        if plan.m == 0 or plan.channels == 0:
            return torch.zeros((2, x.shape[axis]), dtype=torch.float64, device=x.device)
        cfg = reduce_config(plan, device_profile(x.device), op=BACKWARD, dtype=x.dtype)
        partial = torch.empty((2, plan.channels, cfg.splits), dtype=center.dtype, device=x.device)
        backward_reduce_launch(plan, cfg)(x, dy, center, partial, *(partial,) * 7)
        return partial.double().sum(-1)

    @on_data_device
    def input_grad(self, dy: torch.Tensor, x: torch.Tensor, g: torch.Tensor, center: torch.Tensor,
                   invstd: torch.Tensor, settings: Settings, sums: torch.Tensor | None,
                   count: int | torch.Tensor) -> torch.Tensor:
        """dx of ``reference.input_grad`` in one elementwise launch: the coefficients [6, C] of
        ``finish_backward`` (kernels/common.py) from the given ``sums`` (S, D) over ``count``
        elements per channel, e.g. a process group's: an int, or a tensor ([C] or one element)
        on the data's device, which stays there (no host read)."""
        plan, dense_x, dense_dy = _backward_layout(tuple(x.shape), settings.axis, x.stride(), dy.stride())
        x, dy = _backward_copies(x, dy, dense_x, dense_dy)
        dx = empty_like_layout(x)
        if plan.m == 0 or plan.channels == 0:
            return dx
        inv64 = invstd.double()
        dy_coef = g.double() * inv64
        zeros = torch.zeros_like(dy_coef)
        if sums is None:
            x_coef, const = zeros, zeros
        else:
            x_coef, const = -dy_coef * (inv64 * sums[1]) / count, -dy_coef * sums[0] / count
        coef = _coefficient_rows(center, invstd, x_coef, dy_coef, const)
        cfg = elementwise_config(plan, device_profile(x.device), op=BACKWARD, dtype=x.dtype)
        apply = elementwise_launch(plan, cfg, settings, has_x=sums is not None, has_dy=True, from_moving=False)
        apply(x if sums is not None else dx, dy, dx, coef, center, center, center, center, center, invstd, dx, dx)
        return dx


def center_pair(mean: torch.Tensor, acc: torch.dtype) -> torch.Tensor:
    """[2, C] (mean rounded to ``acc``, the rounding remainder): a float64 mean as the kernels'
    (pilot, shifted mean) pair, so that x - mean keeps the float64 mean's digits (a float32 mean
    alone is off by up to ulp/2: 5% of the std at mean 1e4, std 1e-2)."""
    rounded = mean.to(acc)
    return torch.stack([rounded, (mean.double() - rounded.double()).to(acc)])  # new storage: never aliases mean


def _coefficient_rows(center: torch.Tensor, invstd: torch.Tensor, x_coef: torch.Tensor, dy_coef: torch.Tensor,
                      const: torch.Tensor) -> torch.Tensor:
    """The elementwise kernel's coef [6, C] (pilot, shifted mean, invstd, x_coef, dy_coef, const)
    in the accumulation dtype (``invstd``'s)."""
    rows = [center[0], center[1], invstd, x_coef, dy_coef, const]
    return torch.stack([row.to(invstd.dtype) for row in rows])


@dataclass(frozen=True)
class ReferenceBackend:
    """Plain torch (``reference.py``): CPU tensors when not interpreting Triton."""

    name: str = REFERENCE

    def forward(self, x, gamma, beta, moving_mean, moving_var, settings: Settings, out, keep_stats: bool = True,
                keep_mean: bool = True, call: None = None):
        del keep_stats, keep_mean, call  # the statistics cost no allocation worth saving here
        y, mean64, invstd64 = reference.forward(
            x, gamma, beta, moving_mean, moving_var, axis=settings.axis, eps=settings.eps,
            momentum=settings.momentum, fix_gamma=settings.fix_gamma, batch_stats=settings.batch_stats,
            update_moving=settings.batch_stats, unbiased_update=settings.unbiased_update,
            out=out if out is not None else empty_like_layout(x), stats_dtype=torch.float64)
        acc = reference.stat_dtype(x.dtype)
        center = center_pair(mean64, acc)  # summed in float64 again by the backward
        return y, center[0], invstd64.to(acc), center, x

    def fused_forward(self, x, gamma, beta, moving_mean, moving_var, settings: Settings, out, addend,
                      keep_stats: bool = True, keep_mask: bool = True) -> FusedForwardResult:
        """``forward`` with the fused addend and ReLU, in float64 rounded once; the mask is where
        the output is positive (a bool tensor)."""
        del keep_stats, keep_mask
        y, mean64, invstd64 = reference.forward(
            x, gamma, beta, moving_mean, moving_var, axis=settings.axis, eps=settings.eps,
            momentum=settings.momentum, fix_gamma=settings.fix_gamma, batch_stats=settings.batch_stats,
            update_moving=settings.batch_stats, unbiased_update=settings.unbiased_update,
            out=out if out is not None else empty_like_layout(x), stats_dtype=torch.float64,
            addend=addend, relu=settings.relu)
        acc = reference.stat_dtype(x.dtype)
        center = center_pair(mean64, acc)
        return FusedForwardResult(y, center[0], invstd64.to(acc), center, x,
                                  reference.relu_passes(y) if settings.relu else None)

    def fused_backward(self, dy, x, gamma, center, invstd, settings: Settings, beta_dtype,
                       mask=None) -> FusedBackwardResult:
        """``backward`` of the gated dy (``cpu_backend.torch_fused_backward``)."""
        return FusedBackwardResult(*torch_fused_backward(self, dy, x, gamma, center, invstd, settings, beta_dtype,
                                                         mask))

    @staticmethod
    def fused_state_like(x: torch.Tensor, settings: Settings, addend: torch.Tensor | None
                         ) -> tuple[int, torch.Tensor | None]:
        """``TritonBackend.fused_state_like`` of the torch paths: center [2, C], a bool mask of
        y's layout with a ReLU."""
        return torch_fused_state_like(x, settings)

    def backward(self, dy, x, gamma, center, invstd, settings: Settings, beta_dtype):
        mean = center[0].double() + center[1].double()
        return reference.backward(dy, x, gamma, mean, invstd, axis=settings.axis, fix_gamma=settings.fix_gamma,
                                  batch_stats=settings.batch_stats, beta_dtype=beta_dtype)

    # ------------------------------------------------------------------ SyncBatchNorm's parts

    def moments(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """[3, C] float64 (count, mean, M2) of this rank's batch."""
        return reference.moments(x, axis)

    def normalize(self, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, g: torch.Tensor,
                  beta: torch.Tensor, axis: int, addend: torch.Tensor | None = None, relu: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y, x, center [2, C], invstd [C]) as ``TritonBackend.normalize``."""
        y = reference.normalize(x, mean, invstd, g, beta, axis=axis, out=empty_like_layout(x), addend=addend,
                                relu=relu)
        acc = reference.stat_dtype(x.dtype)
        return y, x, center_pair(mean, acc), invstd.to(acc)

    def gradient_sums(self, dy: torch.Tensor, x: torch.Tensor, center: torch.Tensor, axis: int) -> torch.Tensor:
        """[2, C] float64 (S, D) around the mean ``center[0] + center[1]``."""
        return torch.stack(reference.gradient_sums(dy, x, center[0].double() + center[1].double(), axis))

    def input_grad(self, dy: torch.Tensor, x: torch.Tensor, g: torch.Tensor, center: torch.Tensor,
                   invstd: torch.Tensor, settings: Settings, sums: torch.Tensor | None,
                   count: int | torch.Tensor) -> torch.Tensor:
        """dx (``reference.input_grad``) from ``sums`` (S, D) over ``count`` elements per channel
        (an int or a tensor, as ``TritonBackend.input_grad``)."""
        mean = center[0].double() + center[1].double()
        return reference.input_grad(dy, x, mean, invstd, g, axis=settings.axis,
                                    sums=None if sums is None else tuple(sums.double()), count=count)


_TRITON, _CPU, _REFERENCE = TritonBackend(), CpuBackend(), ReferenceBackend()


def backend_for(device: torch.device) -> TritonBackend | CpuBackend | ReferenceBackend:
    """The backend of a call on ``device``.

    ``TRITONBN_BACKEND=auto`` (or unset): Triton kernels on CUDA, and on CPU under
    TRITON_INTERPRET=1; on CPU otherwise torch's vectorised ops (``cpu_backend.CpuBackend``,
    trace name "reference" too); the float64 reference on any other device.
    ``triton``: the Triton kernels on every device (a CPU needs TRITON_INTERPRET=1).
    ``reference``: the torch path (CpuBackend on CPU, the float64 reference elsewhere).
    """
    key = (device, environment(BACKEND_ENV), interpreting())
    backend = _backends.get(key)
    if backend is None:
        backend = _choose_backend(*key)
        if len(_backends) < MAX_CALL_PLANS:
            _backends[key] = backend
    return backend


_backends: dict[tuple, Any] = {}


def _choose_backend(device: torch.device, forced: str | None, interpreted: bool) -> Any:
    if forced is None or forced == "auto":
        if device.type == "cuda" or (device.type == "cpu" and interpreted):
            return _TRITON
    elif forced == "triton":
        if device.type == "cpu" and not interpreted:
            raise ValueError(f"{BACKEND_ENV}=triton on a CPU tensor needs TRITON_INTERPRET=1 (Triton compiles "
                             "for GPUs only)")
        return _TRITON
    elif forced != "reference":
        raise ValueError(f"{BACKEND_ENV} must be auto, triton or reference, got {forced!r}")
    return _CPU if device.type == "cpu" else _REFERENCE


# ----------------------------------------------------------------------------- autograd


class BatchNormFunction(torch.autograd.Function):
    """Autograd binding shared by the backends; gradient flows to data, gamma and beta only.

    ``apply(x, gamma, beta, rest)``, ``rest`` = (moving_mean, moving_var, settings, backend,
    keep_stats, call): the arguments autograd never differentiates travel as one, since each
    argument of ``apply`` costs host time (autograd inspects every one); ``call`` is the op
    entry's plan or None (``TritonBackend.forward``).  Returns (y, mean, invstd), or y alone with
    ``keep_stats`` False (each output costs autograd host time too, and the mean is then never
    allocated).
    """

    @staticmethod
    def forward(ctx, x, gamma, beta, rest):
        moving_mean, moving_var, settings, backend, keep_stats, call = rest
        # (positional: out, keep_stats, keep_mean, call)
        y, mean, invstd, center, x_read = backend.forward(x, gamma, beta, moving_mean, moving_var, settings, None,
                                                          True, keep_stats, call)
        # mean and invstd get no gradient: no zero-filled [C] tensors (set_materialize_grads(False),
        # without its Python frame)
        ctx.materialize_grads = False
        ctx.save_for_backward(x_read, gamma, center, invstd)
        ctx.call = (settings, backend, beta.dtype, call)
        if not keep_stats:
            return y
        ctx.mark_non_differentiable(mean, invstd)
        return y, mean, invstd

    @staticmethod
    def backward(ctx, grad_y, *_grad_stats):
        if grad_y is None:  # y took no part in the loss
            return None, None, None, None
        x, gamma, center, invstd = ctx.saved_tensors
        settings, backend, beta_dtype, call = ctx.call
        trace.record_path(backend.name)
        # (gradients of inputs that need none are dropped by autograd: no needs_input_grad checks)
        if call is None:
            dx, dgamma, dbeta = backend.backward(grad_y, x, gamma, center, invstd, settings, beta_dtype)
        else:
            dx, dgamma, dbeta = backend.backward(grad_y, x, gamma, center, invstd, settings, beta_dtype, None, call)
        return dx, dgamma, dbeta, None


class FusedBatchNormFunction(torch.autograd.Function):
    """Autograd binding of the fused op, relu(bn(x) [+ addend]): gradient flows to data, gamma,
    beta and addend.  ``apply(x, gamma, beta, addend, rest)``, ``rest`` as BatchNormFunction's;
    ``addend`` may be None."""

    @staticmethod
    def forward(ctx, x, gamma, beta, addend, rest):
        moving_mean, moving_var, settings, backend = rest
        y, mean, invstd, center, x_read, mask = backend.fused_forward(
            x, gamma, beta, moving_mean, moving_var, settings, None, addend)
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x_read, gamma, center, invstd, mask)
        ctx.call = (settings, backend, beta.dtype)
        return y, mean, invstd

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_invstd):
        needs = ctx.needs_input_grad
        if grad_y is None:
            return None, None, None, None, None
        x, gamma, center, invstd, mask = ctx.saved_tensors
        settings, backend, beta_dtype = ctx.call
        trace.record_path(backend.name)
        dx, dgamma, dbeta, daddend = backend.fused_backward(grad_y, x, gamma, center, invstd, settings, beta_dtype,
                                                            mask)
        return (dx if needs[0] else None, dgamma if needs[1] else None, dbeta if needs[2] else None,
                daddend if needs[3] else None, None)


def wants_grad(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd records a call on ``tensors`` (None entries ignored)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def apply_fused_forward(data: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, addend: torch.Tensor | None,
                        moving_mean: torch.Tensor, moving_var: torch.Tensor, settings: Settings, backend: Any,
                        out: torch.Tensor | None = None, keep_stats: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(y, mean, invstd) of the fused forward (``settings.relu`` / ``settings.addend``), through
    ``FusedBatchNormFunction`` when a gradient is wanted."""
    if out is None and wants_grad(data, gamma, beta, addend):
        return FusedBatchNormFunction.apply(data, gamma, beta, addend, (moving_mean, moving_var, settings, backend))
    y, mean, invstd, *_ = backend.fused_forward(data, gamma, beta, moving_mean, moving_var, settings, out, addend,
                                                keep_stats=keep_stats, keep_mask=False)
    return y, mean, invstd


# torch.autograd.Function.apply in Python binds default arguments, checks for functorch
# transforms and unwraps dead functorch wrappers, then calls this C++ apply; eager calls outside
# any transform (and outside Dynamo, which traces Function.apply itself) call it directly.
_function_apply = super(torch.autograd.Function, BatchNormFunction).apply
_unwrap_if_dead = torch._C._functorch.unwrap_if_dead
_functorch_active = torch._C._are_functorch_transforms_active
_compiling = torch.compiler.is_dynamo_compiling  # (is_compiling also asks TorchScript: a µs more)


def apply_forward(data: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor, moving_mean: torch.Tensor,
                  moving_var: torch.Tensor, settings: Settings, backend: Any, keep_stats: bool = True,
                  call: CallPlan | None = None) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(y, mean, invstd) of ``backend``'s forward on validated arguments, through the autograd
    Function only when a gradient is wanted (an autograd node costs several µs a call).  With
    ``keep_stats`` False, mean and invstd are None (allocated only where the backward reads them).
    ``call``: the plan of an ``OpEntry`` (Triton backend only)."""
    if torch.is_grad_enabled() and (data.requires_grad or gamma.requires_grad or beta.requires_grad):
        rest = (moving_mean, moving_var, settings, backend, keep_stats, call)
        if _compiling() or _functorch_active():
            outputs = BatchNormFunction.apply(data, gamma, beta, rest)
        else:
            outputs = _function_apply(_unwrap_if_dead(data), _unwrap_if_dead(gamma), _unwrap_if_dead(beta), rest)
        return outputs if keep_stats else (outputs, None, None)
    y, mean, invstd, _, _ = backend.forward(data, gamma, beta, moving_mean, moving_var, settings, None,
                                            keep_stats=keep_stats, call=call)
    return y, mean, invstd


# ----------------------------------------------------------------------------- op entries
#
# A repeated call of ``batch_norm`` needs neither the checks nor the dispatch again: one key, the
# validation signature with everything the call plan adds (strides, pointer alignment, the
# decision context, the forced backend), finds the settings, the backend and the plan at once.


class OpEntry(NamedTuple):
    """What ``batch_norm`` decided for one call signature: its validated ``settings``, its
    ``backend`` and, for the Triton backend, the ``call`` plan ``TritonBackend.forward`` runs
    directly (None: the backend decides per call, e.g. strided parameters)."""

    settings: Settings
    backend: Any
    call: CallPlan | None


_op_entries: dict[tuple, OpEntry] = {}


def op_entry(data: Any, params: tuple, eps: Any, momentum: Any, fix_gamma: Any, use_global_stats: Any, axis: Any,
             out: Any, training: Any, unbiased_update: Any) -> OpEntry:
    """The entry of an unfused eager call: found by key (then only where ``out`` lies is checked), or
    made by ``validate`` (every check, in its order), ``backend_for`` and the backend's plan."""
    key = _op_key(data, params, eps, momentum, fix_gamma, use_global_stats, axis, out, training, unbiased_update)
    if key is not None:
        entry = _op_entries.get(key)
        if entry is not None:
            if out is not None:
                check_out_apart(out, data)
            return entry
    settings = validate(data, params, eps=eps, momentum=momentum, fix_gamma=fix_gamma,
                        use_global_stats=use_global_stats, axis=axis, out=out, training=training,
                        unbiased_update=unbiased_update)
    backend = backend_for(data.device)
    if key is None:
        return OpEntry(settings, backend, None)
    entry = OpEntry(settings, backend, backend._direct_plan(data, *params, settings, out) if backend is _TRITON else None)
    if len(_op_entries) >= MAX_CALL_PLANS:
        _op_entries.clear()
    _op_entries[key] = entry
    return entry


def _op_key(data: Any, params: tuple, eps: Any, momentum: Any, fix_gamma: Any, use_global_stats: Any, axis: Any,
            out: Any, training: Any, unbiased_update: Any) -> tuple | None:
    """The op entry key: the validation ``signature`` plus what the plan depends on beyond it;
    None where either cannot be read (no signature; functorch-wrapped or storage-less tensors,
    whose pointers cannot be read: those calls take every step)."""
    valid = signature(data, params, eps, momentum, fix_gamma, use_global_stats, axis, out, training, unbiased_update)
    if valid is None or _functorch_active():
        return None
    gamma, beta, moving_mean, moving_var = params
    y_ptr = data if out is None else out
    try:
        pointer_bits = (data.data_ptr() | y_ptr.data_ptr() | gamma.data_ptr() | beta.data_ptr()
                        | moving_mean.data_ptr() | moving_var.data_ptr())
    except RuntimeError:
        return None
    alignment = -1 if not pointer_bits & 15 else _alignment(data, y_ptr, gamma, beta, moving_mean, moving_var)
    return valid, data.stride(), gamma.stride(), beta.stride(), alignment, decision_context(), force_int64_enabled()


# ----------------------------------------------------------------------------- public op


def batch_norm(
    data: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    moving_mean: torch.Tensor,
    moving_var: torch.Tensor,
    eps: float = 1e-3,
    momentum: float = 0.9,
    fix_gamma: bool = True,
    use_global_stats: bool = False,
    output_mean_var: bool = False,
    axis: int = 1,
    cudnn_off: bool = False,
    out: torch.Tensor | None = None,
    *,
    training: bool = False,
    unbiased_update: bool = False,
    act_type: str | None = None,
    addend: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MXNet's BatchNorm (SPEC.md) on torch tensors, as Triton kernels, optionally fused with the
    ReLU and residual add that follow it: ``relu(bn(data) + addend)``.

    Args:
        data: (..., C, ...) float16/bfloat16/float32/float64 tensor, any layout; C = data.shape[axis].
        gamma, beta: (C,) scale and shift (float32, or the data dtype for half data; float64 for
            float64 data).  gamma is read as ones when ``fix_gamma`` (and never written).
        moving_mean, moving_var: (C,) running statistics, updated in place in training.
        eps: added to the variance; finite, >= 0.
        momentum: ``moving = moving * momentum + batch * (1 - momentum)``.
        fix_gamma: treat gamma as ones; its gradient is then zero.
        use_global_stats: normalise with the moving statistics even in training.
        output_mean_var: also return (mean, invstd) (inverse std, not variance).
        axis: channel axis, negative allowed.
        cudnn_off: accepted for MXNet compatibility; changes nothing.
        out: optional output tensor (data's shape and dtype, not overlapping data); no autograd.
        training: use batch statistics and update the moving statistics (MXNet's train_mode).
        unbiased_update: update moving_var with var * m / (m - 1) (cuDNN/torch convention);
            needs m > 1 (a ValueError otherwise).
        act_type: None, or "relu": out = relu(bn(data) [+ addend]); its gradient is 0 where the
            output is 0 (as torch.relu's).
        addend: added to bn(data) before the activation (data's shape, dtype and device, any
            layout); gradient flows to it.
    Returns:
        out, or (out, mean, invstd) with ``output_mean_var``; mean/invstd are (C,) float32
        (float64 for float64 data).
    Raises:
        TypeError, ValueError: bad arguments (SPEC "Bad input"), before anything is modified.
    """
    del cudnn_off  # accepted for compatibility (SPEC)
    params = (gamma, beta, moving_mean, moving_var)
    if act_type is not None or addend is not None:
        settings = validate(data, params, eps=eps, momentum=momentum, fix_gamma=fix_gamma,
                            use_global_stats=use_global_stats, axis=axis, out=out, training=training,
                            unbiased_update=unbiased_update)
        backend = backend_for(data.device)
        settings = validate_fusion(settings, data, act_type, addend, out)
        if out is not None and wants_grad(data, gamma, beta, addend):
            raise ValueError("out= does not support autograd; call without out= (or under torch.no_grad())")
        trace.record_path(backend.name)
        y, mean, invstd = apply_fused_forward(data, gamma, beta, addend, moving_mean, moving_var, settings, backend,
                                              out, keep_stats=output_mean_var)
        return (y, mean, invstd) if output_mean_var else y
    settings, backend, call = op_entry(data, params, eps, momentum, fix_gamma, use_global_stats, axis, out, training,
                                       unbiased_update)
    if out is None:
        trace.record_path(backend.name)
        y, mean, invstd = apply_forward(data, gamma, beta, moving_mean, moving_var, settings, backend,
                                        keep_stats=output_mean_var, call=call)
    else:
        if torch.is_grad_enabled() and (data.requires_grad or gamma.requires_grad or beta.requires_grad):
            raise ValueError("out= does not support autograd; call without out= (or under torch.no_grad())")
        trace.record_path(backend.name)
        y, mean, invstd, _, _ = backend.forward(data, gamma, beta, moving_mean, moving_var, settings, out,
                                                keep_stats=output_mean_var, call=call)
    return (y, mean, invstd) if output_mean_var else y
