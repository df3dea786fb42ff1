"""The torch path on CPU: SPEC.md's BatchNorm in torch's vectorised CPU ops, at torch's speed.

Without a GPU (and without ``TRITON_INTERPRET=1``) ``ops.backend_for`` runs ``CpuBackend``. It
computes what ``reference.py`` states, with SPEC's accumulation dtype (float32 for half and
float32 data, float64 for float64 data; more where torch's kernels sum in double) instead of the
oracle's float64.  Every full-size pass is one torch kernel; besides its output a call allocates
O(C) and, where the output cannot serve as scratch, blocks of at most ``CHUNK_BYTES``.  Tiers,
chosen per call (the first that applies and passes its checks):

1. torch's batch-norm kernels (``native_batch_norm`` and its backward) where they compute SPEC's
   formula to the dtype's accuracy: inference (y = x * A + B with coefficients formed here);
   training and backward of half data; training and backward of float32/float64 data stored
   channel-major, which torch sums in double.  Checks: every channel's mean within
   NATIVE_PILOT_LIMIT (training) or FAST_FORM_LIMIT (backward) standard deviations of zero
   (torch centres on its mean rounded to the accumulation dtype), no constant or one-element
   channel, everything finite.
2. float32/float64 channel-minor data (channels_last, channel-last, 2-D): torch's kernels run on
   "pseudo-channels" (``_pseudo_view``: each channel's rows split k ways, so that torch's
   row-after-row float32 accumulation stays short and exact), merged with Chan's formula in
   float64: the statistics (the training kernel's normalisation is thrown away) and the
   backward's sums; y and dx are then this module's one- or two-kernel forms.
3. full-size torch ops with the output as scratch (float32/float64 data): statistics as shifted
   sums, ``u = (x - pilot) * scale``, ``sum(u)`` and ``sum(u * u)`` (torch's cascade sums),
   ``mean = pilot + sum(u) / (m scale)``, ``var = (sum(u^2) / m - mean(u)^2) / scale^2``;
   backward ``S = sum(dy)``, ``D = sum((x - pilot) dy) - shift S``;
4. the same block by block over cache-sized scratch (half data in a layout torch's kernels do not
   read, SyncBatchNorm's parts).

In tiers 3 and 4 the pilot is the mean of the first few hundred elements of each channel (their
first element plus a small shift: a constant channel gives exactly 0); the scale is 1 unless
that head's spread is outside [2^-40, 2^40].  Where the sums say either was poor (the pilot more
than two standard deviations off, squares that overflowed or underflowed) a second sweep runs
with the pilot at the mean and the scale from the channel's range (``amax``/``amin``): data at
1e30, 1e-30 or subnormal, and offset data (mean 1e4, std 1e-2), take that path.  y is ``x * A +
B`` in one kernel where its cancellation costs at most 4 bits (``|mean A| <= 16 (|g| + |beta|)``
and no constant channel; for half output, what its rounding hides), otherwise the shifted form
``((x - pilot) * scale) * a + c``; dx likewise (``A dy + B x + K`` or its shifted form), in
``reference.input_grad``'s order of operations where dy holds NaN/Inf.

Per-channel arithmetic ([C] vectors: coefficients, the checks between the tiers) is numpy float64
on the host, IEEE-identical to torch's float64 and free of a torch op's dispatch cost.  The
moving-average update (float64, any momentum), ``inverse_std`` (``invstd = 0`` where ``var == 0
and eps == 0``) and the m = 0 case are ``reference.py``'s formulas.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from . import reference
from .plan import empty_like_layout, is_dense, layout_strides
from .validation import Settings

__all__ = ["CpuBackend", "CHUNK_BYTES", "Geometry", "geometry", "batch_statistics"]

# Bytes of accumulation-dtype scratch per block of a blockwise pass (64K float32 elements): it
# stays in the cores' caches between the few ops of a block, and bounds the workspace as the
# reference's chunks do (tests/test_reliability.py holds the CPU path to 256 KiB).
CHUNK_BYTES = 256 * 1024
# Elements per channel in the head sample that sets the pilot (at most, and at most a quarter
# of a block over all channels).
HEAD_ELEMENTS = 256
# The one-kernel forms (y = x * A + B, dx = A dy + B x + K) are used where the cancellation
# between x * A and B costs at most log2(FAST_FORM_LIMIT) bits of the accumulation dtype.
FAST_FORM_LIMIT = 16.0
# A pilot farther than this many standard deviations from the mean triggers the second sweep
# (it would cost log2(1 + 2^2) of the accumulation dtype's bits in sum(u^2) / m - mean(u)^2).
PILOT_LIMIT = 2.0
# torch's training kernel centres on its mean rounded to the accumulation dtype: it is used
# while every mean is within this many standard deviations of zero (the centring error then
# costs < 1e-6 of var).
NATIVE_PILOT_LIMIT = 64.0
# Rows per pseudo-channel (``_pseudo_view``) at most: torch's channel-minor kernels then add at
# most ~1000 rows per thread in float32, ~5e-7 relative error (1e-5 and more over whole columns).
PSEUDO_ROWS = 2048
# Heads whose spread stays within [2^-40, 2^40] are not rescaled: their squares are far from
# float32's overflow (2^128) and underflow (2^-126).
SCALE_FREE = 40


# ----------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class Geometry:
    """How a call's tensors are walked: the dims of ``x`` in memory order and the blocks of that
    permuted view (index tuples), each a dense run of at most ``limit`` elements."""

    order: tuple[int, ...]  # dims of x, largest stride first
    where: int  # position of the channel dim in ``order``
    channels: int
    blocks: tuple[tuple[slice, ...], ...]
    reduce: tuple[int, ...]  # the dims of a permuted block that are summed over
    block_elements: int  # numel of the largest block
    head: tuple[slice, ...]  # index of the head sample (every channel) in the permuted view

    def channel_slice(self, index: tuple[slice, ...]) -> slice:
        """The channels a block covers."""
        return index[self.where] if self.where < len(index) else slice(None)

    def coef_shape(self) -> list[int]:
        """Shape that broadcasts a [C] vector against a permuted block."""
        shape = [1] * len(self.order)
        shape[self.where] = self.channels
        return shape


def _block_numel(shape: tuple[int, ...], index: tuple[slice, ...]) -> int:
    sizes = [len(range(*s.indices(n))) for s, n in zip(index, shape)] + list(shape[len(index):])
    return math.prod(sizes)


def _head_index(shape: tuple[int, ...], where: int, per_channel: int) -> tuple[slice, ...]:
    """The first ``per_channel`` elements (or fewer) of every channel in memory order: a prefix
    of the innermost dims, index 0 of the outer ones."""
    index = [slice(0, 1)] * len(shape)
    index[where] = slice(None)
    left = per_channel
    for d in reversed(range(len(shape))):
        if d == where:
            continue
        take = max(1, min(shape[d], left))
        index[d] = slice(0, take)
        left = max(1, left // take)
    return tuple(index)


@functools.lru_cache(maxsize=512)
def geometry(shape: tuple[int, ...], strides: tuple[int, ...], axis: int, limit: int) -> Geometry:
    """The walk over a tensor of ``shape``/``strides`` with its channel at ``axis`` (cached)."""
    order = tuple(sorted(range(len(shape)), key=lambda d: (-abs(strides[d]), d)))
    where = order.index(axis)
    permuted = tuple(shape[d] for d in order)
    blocks = tuple(reference._blocks(permuted, limit))  # the reference's tiling (stops clamp in _block_numel)
    channels = shape[axis]
    per_channel = max(1, min(HEAD_ELEMENTS, limit // (4 * max(channels, 1))))
    return Geometry(order, where, channels, blocks, tuple(d for d in range(len(shape)) if d != where),
                    max(_block_numel(permuted, index) for index in blocks),
                    _head_index(permuted, where, per_channel))


def _geometry_of(x: torch.Tensor, axis: int) -> Geometry:
    limit = CHUNK_BYTES // (torch.finfo(reference.stat_dtype(x.dtype)).bits // 8)
    return geometry(tuple(x.shape), tuple(x.stride()), axis, limit)


class _Walk:
    """Blockwise views of same-shaped tensors in ``geo``'s memory order, with per-channel
    coefficients broadcast against each block and float scratch reused block after block."""

    def __init__(self, geo: Geometry, acc: torch.dtype, scratch: int = 1):
        self.geo = geo
        self.acc = acc
        self.flat = [torch.empty(geo.block_elements, dtype=acc) for _ in range(scratch)]

    def coef(self, values: np.ndarray) -> torch.Tensor:
        """A [C] vector as a broadcastable acc-dtype tensor of the permuted view."""
        return _acc_tensor(values, self.acc).reshape(self.geo.coef_shape())

    def coef_or_none(self, values: np.ndarray | None) -> torch.Tensor | None:
        """``coef`` of an optional vector."""
        return None if values is None else self.coef(values)

    def blocks(self, *tensors: torch.Tensor) -> Iterator[tuple[slice, list[torch.Tensor], list[torch.Tensor]]]:
        """(channel slice, block views of ``tensors``, scratch views shaped like the block)."""
        permuted = [t.permute(self.geo.order) for t in tensors]
        for index in self.geo.blocks:
            views = [p[index] for p in permuted]
            n = views[0].numel()
            yield self.geo.channel_slice(index), views, [f[:n].view(views[0].shape) for f in self.flat]

    def part(self, coef: torch.Tensor | None, channels: slice) -> torch.Tensor | None:
        """``coef`` restricted to a block's channels."""
        if coef is None or channels == slice(None):
            return coef
        return coef[(slice(None),) * self.geo.where + (channels,)]

    def channel_sum(self, t: torch.Tensor, out: torch.Tensor) -> None:
        """Sum of a block over everything but its channel dim, into ``out`` (float32 cascade sums)."""
        if self.geo.reduce:
            torch.sum(t, self.geo.reduce, out=out)
        else:  # rank 1: one element per channel
            out.copy_(t.reshape(-1))


# ----------------------------------------------------------------------------- per-channel math


def _np_dtype(acc: torch.dtype) -> type:
    return np.float64 if acc == torch.float64 else np.float32


def _vec(t: torch.Tensor) -> np.ndarray:
    """A [C] CPU tensor (any float dtype, any strides, grad or not) as float64 numpy."""
    t = t.detach()
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16
        t = t.float()
    return t.numpy().astype(np.float64)


def _acc_tensor(values: np.ndarray, acc: torch.dtype) -> torch.Tensor:
    """A [C] numpy vector as a (new) torch tensor of the accumulation dtype ``acc`` (beyond its
    range: inf, as the float32 rounding of a float64 value is)."""
    with np.errstate(over="ignore"):
        return torch.from_numpy(np.array(values, dtype=_np_dtype(acc)))


def _inverse_std(var: np.ndarray, eps: float) -> np.ndarray:
    """``reference.inverse_std``: 1/sqrt(var + eps), 0 where var == 0 and eps == 0 (float64)."""
    with np.errstate(all="ignore"):
        invstd = 1.0 / np.sqrt(var + eps)
    if eps == 0:
        invstd = np.where(var == 0, 0.0, invstd)
    return invstd


def _moving_update(moving: torch.Tensor, value: np.ndarray, momentum: float) -> None:
    """``reference.moving_update``: moving = moving * momentum + value * (1 - momentum) in
    float64 (any momentum; beyond the dtype's range the copy stores inf), in place."""
    with np.errstate(all="ignore"):
        updated = _vec(moving) * momentum + value * (1.0 - momentum)
    moving.copy_(torch.from_numpy(updated))


def _center(mean: np.ndarray, acc: torch.dtype) -> torch.Tensor:
    """[2, C] (mean rounded to ``acc``, the rounding remainder): ``ops.center_pair``'s pair."""
    with np.errstate(all="ignore"):
        rounded = mean.astype(_np_dtype(acc))
        remainder = (mean - rounded.astype(np.float64)).astype(_np_dtype(acc))
    return torch.from_numpy(np.stack([rounded, remainder]))


def _pow2(values: np.ndarray, acc: torch.dtype) -> np.ndarray:
    """The power of two at or just above |values| (1 where values is 0 or not finite), within the
    normal range of ``acc``, float64."""
    info = torch.finfo(acc)
    with np.errstate(all="ignore"):
        _, exponent = np.frexp(np.abs(values))
    ok = np.isfinite(values) & (values != 0)
    exponent = np.where(ok, np.clip(exponent, math.frexp(info.tiny)[1], math.frexp(info.max)[1] - 1), 0)
    return np.ldexp(1.0, exponent)


def _clamp_scale(scale: np.ndarray, acc: torch.dtype) -> np.ndarray:
    """Scales kept to normal powers of two of ``acc`` (so x * scale stays exact)."""
    info = torch.finfo(acc)
    return np.clip(scale, info.tiny, 2.0 ** (math.frexp(info.max)[1] - 1))


def _scale_or_none(scale: np.ndarray, acc: torch.dtype) -> np.ndarray | None:
    """``scale`` in the accumulation dtype, None where it is 1 everywhere (a plain subtraction)."""
    return None if bool(np.all(scale == 1)) else _clamp_scale(scale, acc).astype(_np_dtype(acc))


# ----------------------------------------------------------------------------- elementwise pieces


def _broadcast(values: np.ndarray | None, x: torch.Tensor, axis: int, acc: torch.dtype) -> torch.Tensor | None:
    """A [C] vector as an acc-dtype tensor broadcasting along ``axis`` of x."""
    if values is None:
        return None
    return _acc_tensor(values, acc).reshape(reference.channel_shape(x.dim(), axis, x.shape[axis]))


def _load(view: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """A block in the accumulation dtype: ``view`` itself, or its copy in ``buf`` (half data:
    mixed-dtype torch ops fall back to slow casting loops, a dtype copy is vectorised)."""
    if view.dtype == buf.dtype:
        return view
    return buf.copy_(view)


def _shift(view: torch.Tensor, out: torch.Tensor, pilot: torch.Tensor, scale: torch.Tensor | None,
           neg_scaled_pilot: torch.Tensor | None) -> torch.Tensor:
    """``out = (view - pilot) * scale`` as ``view * scale - pilot * scale`` (exact products for a
    power-of-two scale), or ``view - pilot`` without a scale; ``out`` may hold ``view`` itself."""
    if view.dtype != out.dtype:
        view = out.copy_(view)
    if scale is None:
        return torch.sub(view, pilot, out=out)
    return torch.addcmul(neg_scaled_pilot, view, scale, out=out)


def _neg_scaled(pilot: np.ndarray, scale: np.ndarray | None) -> np.ndarray | None:
    """-pilot * scale (exact: a power-of-two scale), None without a scale."""
    return None if scale is None else -pilot * scale


def _shift_full(x: torch.Tensor, out: torch.Tensor, axis: int, pilot: np.ndarray, scale: np.ndarray | None,
                acc: torch.dtype) -> torch.Tensor:
    """``_shift`` of the whole of x (acc dtype) into ``out`` (x's shape): one torch op."""
    return _shift(x, out, _broadcast(pilot, x, axis, acc), _broadcast(scale, x, axis, acc),
                  _broadcast(_neg_scaled(pilot, scale), x, axis, acc))


def _channel_total(t: torch.Tensor, axis: int) -> np.ndarray:
    """Sum over every dim but ``axis`` (torch's cascade sum in t's dtype), as float64 [C]."""
    dims = reference.reduce_dims(t.dim(), axis)
    return _vec(torch.sum(t, dims) if dims else t)


# ----------------------------------------------------------------------------- statistics


def _head_pilot(x: torch.Tensor, geo: Geometry, acc: torch.dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """(pilot [C], scale [C] or None) in the accumulation dtype, from the head sample: the pilot
    is the head's first element plus the head's mean offset from it (so a constant head gives
    exactly its value), 0 where the head is not finite; the scale puts the head's spread near 1
    where it lies outside [2^-SCALE_FREE, 2^SCALE_FREE] (None when no channel needs one)."""
    head = x.detach().permute(geo.order)[geo.head]
    head = (head.float() if head.dtype == torch.bfloat16 else head).numpy()
    head = np.moveaxis(head, geo.where, 0).reshape(geo.channels, -1).astype(_np_dtype(acc))
    with np.errstate(all="ignore"):
        first = head[:, 0]
        first = np.where(np.isfinite(first), first, 0).astype(head.dtype)
        pilot = first + (head - first[:, None]).mean(1, dtype=head.dtype)
        pilot = np.where(np.isfinite(pilot), pilot, first).astype(head.dtype)
        spread = np.abs(head - pilot[:, None]).max(1).astype(np.float64)
    wild = np.isfinite(spread) & (spread > 0) & ((spread < 2.0**-SCALE_FREE) | (spread > 2.0**SCALE_FREE))
    if not wild.any():
        return pilot, None
    return pilot, _scale_or_none(np.where(wild, 1.0 / _pow2(spread, acc), 1.0), acc)


def _moment_sums(x: torch.Tensor, axis: int, geo: Geometry, acc: torch.dtype, pilot: np.ndarray,
                 scale: np.ndarray | None, scratch: torch.Tensor | None) -> tuple[np.ndarray, np.ndarray]:
    """(sum(u), sum(u^2)) per channel in float64 with u = (x - pilot) * scale, summed in the
    accumulation dtype (torch's cascade sums): in ``scratch`` (x's shape, acc dtype, e.g. the
    output) as three full-size ops, else block by block (merged over blocks in float64)."""
    if scratch is not None:
        u = _shift_full(x, scratch, axis, pilot, scale, acc)
        first = _channel_total(u, axis)
        u.mul_(u)
        return first, _channel_total(u, axis)
    walk = _Walk(geo, acc)
    parts = torch.zeros((2, len(geo.blocks), geo.channels), dtype=acc)
    pilot_b, scale_b, shift_b = walk.coef(pilot), walk.coef_or_none(scale), walk.coef_or_none(_neg_scaled(pilot, scale))
    for k, (channels, (view,), (buf,)) in enumerate(walk.blocks(x)):
        u = _shift(view, buf, walk.part(pilot_b, channels), walk.part(scale_b, channels),
                   walk.part(shift_b, channels))
        walk.channel_sum(u, parts[0, k, channels])
        u.mul_(u)
        walk.channel_sum(u, parts[1, k, channels])
    sums = parts.sum(1, dtype=torch.float64).numpy()
    return sums[0], sums[1]


@dataclass(frozen=True)
class _Moments:
    """One sweep's per-channel results (float64 [C]) and the channels it could not vouch for."""

    mean: np.ndarray
    var: np.ndarray
    suspect: np.ndarray  # bool [C]


def _finish(s1: np.ndarray, s2: np.ndarray, pilot: np.ndarray, scale: np.ndarray | None, m: int,
            acc: torch.dtype) -> _Moments:
    """mean and biased var from the shifted sums; ``suspect`` marks channels whose sums overflowed,
    underflowed or had a pilot beyond PILOT_LIMIT standard deviations."""
    with np.errstate(all="ignore"):
        d = s1 / m
        var_u = s2 / m - d * d
        s = scale.astype(np.float64) if scale is not None else 1.0
        mean = pilot.astype(np.float64) + d / s
        var = np.where(var_u > 0, var_u, np.where(np.isnan(var_u), var_u, 0.0)) / (s * s)
        tiny = torch.finfo(acc).tiny * 2.0**26  # below this mean square, squares lost their digits
        suspect = (~np.isfinite(s1) | ~np.isfinite(s2) | ((s2 == 0) & (s1 != 0))
                   | ((s2 > 0) & (s2 < m * tiny)) | (d * d > PILOT_LIMIT**2 * var_u))
    return _Moments(mean, var, suspect)


def _range_pilot(x: torch.Tensor, axis: int, first: _Moments, pilot: np.ndarray, scale: np.ndarray | None,
                 acc: torch.dtype) -> tuple[np.ndarray, np.ndarray | None]:
    """(pilot, scale) of the second sweep: for suspect channels of finite data the first sweep's
    mean (the midrange where that overflowed) and 1 / 2^ceil(log2(max - min)); unchanged for the
    others, and for channels holding NaN/Inf, whose sums propagate them as the formulas say."""
    dims = reference.reduce_dims(x.dim(), axis)
    hi, lo = (_vec(x.amax(dims)), _vec(x.amin(dims))) if dims else (_vec(x), _vec(x))
    with np.errstate(all="ignore"):
        redo = first.suspect & np.isfinite(hi) & np.isfinite(lo)
        centre = np.where(np.isfinite(first.mean), first.mean, lo + (hi - lo) / 2)
        new_pilot = np.where(redo, centre, pilot).astype(pilot.dtype)
        spread = hi - lo
        old_scale = scale.astype(np.float64) if scale is not None else np.ones_like(spread)
        new_scale = np.where(redo & (spread > 0), 1.0 / _pow2(spread, acc), old_scale)
    return new_pilot, _scale_or_none(new_scale, acc)


def batch_statistics(x: torch.Tensor, axis: int, scratch: torch.Tensor | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(mean, biased var) per channel in float64 (``reference.batch_statistics``' values, from
    accumulation in SPEC's dtype); m > 0.  ``scratch``: a tensor of x's shape and the
    accumulation dtype to work in (the output, which is written afterwards), else blocks."""
    acc = reference.stat_dtype(x.dtype)
    geo = _geometry_of(x, axis)
    m = x.numel() // geo.channels
    pilot, scale = _head_pilot(x, geo, acc)
    first = _finish(*_moment_sums(x, axis, geo, acc, pilot, scale, scratch), pilot, scale, m, acc)
    if not first.suspect.any():
        return first.mean, first.var
    pilot, scale = _range_pilot(x, axis, first, pilot, scale, acc)
    second = _finish(*_moment_sums(x, axis, geo, acc, pilot, scale, scratch), pilot, scale, m, acc)
    return second.mean, second.var


def _scratch_for(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """``out`` as full-size scratch for x's passes: where it holds the accumulation dtype and x's
    dense layout (so a pass reads and writes in the same order); else None (blocks)."""
    if x.dtype != reference.stat_dtype(x.dtype) or out.stride() != x.stride() or not is_dense(x):
        return None
    return out


# ----------------------------------------------------------------------------- torch's kernels


def _native_view(t: torch.Tensor, axis: int, channel_minor: bool) -> torch.Tensor | None:
    """``t`` as an (N, C, ...) tensor that torch's batch-norm kernels read in place, in a layout
    whose output (``empty_like``) has t's strides: contiguous with the channel between an outer
    and an inner run, (outer, C, inner); and with ``channel_minor``, channels_last(_3d) or the
    (1, C, rows, 1) channels-last view of channel-last data.  None where there is none."""
    if t.dim() < 2 or t.numel() == 0:
        return None
    channels = t.shape[axis]
    if t.is_contiguous() and axis < t.dim() - 1:
        outer = math.prod(t.shape[:axis])
        return t.view(outer, channels, t.numel() // (outer * channels))
    if not channel_minor:
        return None
    if axis == 1 and ((t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last))
                      or (t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))):
        return t
    if t.is_contiguous() and axis == t.dim() - 1:
        rows = t.numel() // channels
        return t.as_strided((1, channels, rows, 1), (rows * channels, 1, channels, channels))
    return None


def _native_views(axis: int, channel_minor: bool, *tensors: torch.Tensor) -> list[torch.Tensor] | None:
    """``_native_view`` of tensors sharing one layout, or None."""
    if any(t.stride() != tensors[0].stride() for t in tensors):
        return None
    views = [_native_view(t, axis, channel_minor) for t in tensors]
    return None if any(v is None for v in views) else views


def _pilot_ok(mean: np.ndarray, spread: np.ndarray, limit: float) -> bool:
    """Whether a mean torch rounds to the accumulation dtype is close enough to zero for its
    kernels: |mean| within ``limit`` times ``spread`` (a std, or 1/invstd), all finite."""
    with np.errstate(all="ignore"):
        return bool(np.all(np.isfinite(mean) & np.isfinite(spread) & (np.abs(mean) <= limit * spread)))


def _native_training(x: torch.Tensor, y: torch.Tensor, axis: int, g: np.ndarray, beta: np.ndarray,
                     eps: float) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """torch's training kernel (statistics in two passes, centred on its mean, and y = x * A + B)
    into ``y``, for half data (float32 accumulation) and for float32/float64 data stored
    channel-major (torch accumulates those in double): (mean, biased var, invstd) in float64, or
    None where that is not SPEC's answer to the dtype's accuracy -- a constant or single-element
    channel, a mean beyond NATIVE_PILOT_LIMIT standard deviations (torch centres on its mean
    rounded to the accumulation dtype), a y losing more than ``_fast_limit`` to cancellation,
    NaN/Inf -- and the exact path must run."""
    acc = reference.stat_dtype(x.dtype)
    channels = x.shape[axis]
    m = x.numel() // channels
    half = x.dtype != acc
    views = _native_views(axis, half, x, y)
    if views is None or m < 2 or not (half or views[0].shape[2] > 1):
        return None
    running = (torch.zeros(channels, dtype=acc), torch.ones(channels, dtype=acc))
    saved = (torch.empty(0, dtype=acc), torch.empty(0, dtype=acc))
    # momentum 1 leaves the batch mean and the unbiased variance in the scratch running stats
    torch.ops.aten.native_batch_norm.out(views[0], _acc_tensor(g, acc), _acc_tensor(beta, acc), *running, True, 1.0,
                                         eps, out=views[1], save_mean=saved[0], save_invstd=saved[1])
    mean, var = _vec(running[0]), _vec(running[1]) * ((m - 1) / m)
    invstd = _inverse_std(var, eps)
    a = invstd * g
    with np.errstate(all="ignore"):
        accepted = (bool(np.all(var > 0)) and _pilot_ok(mean, np.sqrt(var), NATIVE_PILOT_LIMIT)
                    and _fast_ok(np.abs(mean * a), _fast_limit(x.dtype) * (np.abs(g) + np.abs(beta)), acc,
                                 a, beta - mean * a))
    return (mean, var, invstd) if accepted else None


def _native_backward(dy: torch.Tensor, x: torch.Tensor, axis: int, center: torch.Tensor, invstd: np.ndarray,
                     g: np.ndarray, settings: Settings) -> tuple[torch.Tensor, np.ndarray, np.ndarray] | None:
    """torch's backward kernel (one pass for S and D, one for dx): for half data, and for float32
    and float64 data stored channel-major (torch sums those in double); (dx, dgamma = D * invstd,
    S) with dgamma and S float64, or None where its rounded mean (center[0]) is too far from zero
    for the data's spread, or NaN/Inf is about."""
    acc = reference.stat_dtype(x.dtype)
    half = x.dtype != acc
    views = _native_views(axis, half, x, dy)
    pilot, shift = _vec(center[0]), _vec(center[1])
    with np.errstate(all="ignore"):
        spread = 1.0 / invstd
    # float32/float64 only channel-major with an inner run: torch sums those planes in double
    if views is None or not (half or views[0].shape[2] > 1) or not _pilot_ok(pilot, spread, _fast_limit(x.dtype)):
        return None
    dx = empty_like_layout(x)  # x's strides: the same view
    views.append(_native_view(dx, axis, half))
    channels = x.shape[axis]
    d_out, s_out = torch.empty(channels, dtype=acc), torch.empty(channels, dtype=acc)
    if settings.batch_stats:
        torch.ops.aten.native_batch_norm_backward.out(
            views[1], views[0], _acc_tensor(g, acc), None, None, center[0], _acc_tensor(invstd, acc), True, 0.0,
            [True, True, True], out0=views[2], out1=d_out, out2=s_out)
        d_times_invstd = _vec(d_out)  # torch's grad_weight: D * invstd
    else:  # running stats: mean center[0], var 1, eps 0, so dx = dy * weight and D comes unscaled
        torch.ops.aten.native_batch_norm_backward.out(
            views[1], views[0], _acc_tensor(g * invstd, acc), center[0], torch.ones(channels, dtype=acc), None,
            None, False, 0.0, [True, True, True], out0=views[2], out1=d_out, out2=s_out)
        d_times_invstd = _vec(d_out) * invstd
    s = _vec(s_out)
    with np.errstate(all="ignore"):
        dgamma = d_times_invstd - shift * s * invstd  # D around the float64 mean: less shift * S
    if not bool(np.all(np.isfinite(s) & np.isfinite(dgamma))):
        return None  # NaN/Inf in dy: the reference's order of operations (input_grad)
    return dx, dgamma, s


def _pseudo_view(t: torch.Tensor, axis: int) -> tuple[torch.Tensor, int] | None:
    """Channel-minor data (every row of C channels contiguous: channels_last(_3d), channel-last,
    2-D (N, C)) as (rows / k, k * C): k "pseudo-channels" per channel, each a k-th of its rows,
    with k the power of two that brings the rows per pseudo-channel to PSEUDO_ROWS or fewer
    (torch's channel-minor kernels accumulate row after row: short columns keep them exact);
    None for other layouts or when the row count has too few factors of two."""
    channels = t.shape[axis]
    rows = t.numel() // max(channels, 1)
    if t.dim() < 2 or t.stride(axis) != 1 or not is_dense(t) or rows < 2:
        return None
    order = sorted(range(t.dim()), key=lambda d: (-abs(t.stride(d)), d))
    if order[-1] != axis:
        return None
    k = 1
    while rows // k > PSEUDO_ROWS and rows % (2 * k) == 0:
        k *= 2
    if rows // k > PSEUDO_ROWS:
        return None
    flat = t.as_strided((rows // k, k * channels), (k * channels, 1))
    return flat, k


def _pseudo_moments(x: torch.Tensor, y: torch.Tensor, axis: int) -> tuple[np.ndarray, np.ndarray] | None:
    """float32/float64 channel-minor data: (mean, biased var) in float64 from torch's training
    kernel run on pseudo-channels (``_pseudo_view``; it writes a throwaway normalisation into
    ``y``, which the caller overwrites) and Chan's merge of their (mean, M2) in float64; None where
    that is not exact enough (a mean beyond NATIVE_PILOT_LIMIT std: torch centres each column on
    its float32 mean; a constant channel; NaN/Inf) or the layout has no pseudo view."""
    acc = reference.stat_dtype(x.dtype)
    channels = x.shape[axis]
    pseudo, pseudo_out = _pseudo_view(x, axis), _pseudo_view(y, axis) if y.stride() == x.stride() else None
    if pseudo is None or pseudo_out is None:
        return None
    (flat, k), (flat_out, _) = pseudo, pseudo_out
    rows = flat.shape[0]
    running = (torch.zeros(k * channels, dtype=acc), torch.ones(k * channels, dtype=acc))
    torch.ops.aten.native_batch_norm.out(flat, None, None, *running, True, 1.0, 0.0, out=flat_out,
                                         save_mean=torch.empty(0, dtype=acc), save_invstd=torch.empty(0, dtype=acc))
    means = _vec(running[0]).reshape(k, channels)
    m2 = (_vec(running[1]) * (rows - 1)).reshape(k, channels)  # unbiased var -> sum of squares
    mean = means.mean(0)
    var = (m2.sum(0) + rows * ((means - mean) ** 2).sum(0)) / (k * rows)
    if not (bool(np.all(var > 0)) and _pilot_ok(mean, np.sqrt(var), NATIVE_PILOT_LIMIT)):
        return None
    return mean, var


def _pseudo_sums(dy: torch.Tensor, x: torch.Tensor, axis: int, center: torch.Tensor
                 ) -> tuple[np.ndarray, np.ndarray] | None:
    """float32/float64 channel-minor data: (S, D) in float64 from torch's backward reduction
    (sum(dy), sum((x - center[0]) * dy); no dx written) run on pseudo-channels, D less
    center[1] * S; None without a pseudo view shared by x and dy, or for non-finite sums."""
    acc = reference.stat_dtype(x.dtype)
    channels = x.shape[axis]
    if dy.stride() != x.stride() or dy.dtype != x.dtype:
        return None
    px, pdy = _pseudo_view(x, axis), _pseudo_view(dy, axis)
    if px is None or pdy is None:
        return None
    (flat_x, k), (flat_dy, _) = px, pdy
    pilot = center[0].repeat(k)
    _, d_out, s_out = torch.ops.aten.native_batch_norm_backward(
        flat_dy, flat_x, None, None, None, pilot, torch.ones(k * channels, dtype=acc), True, 0.0,
        [False, True, True])
    s = _vec(s_out).reshape(k, channels).sum(0)
    d = _vec(d_out).reshape(k, channels).sum(0) - _vec(center[1]) * s
    return (s, d) if bool(np.all(np.isfinite(s) & np.isfinite(d))) else None


# ----------------------------------------------------------------------------- normalisation


@functools.lru_cache(maxsize=64)
def _identity_stats(channels: int, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(zeros, ones) [C]: the running statistics under which torch's inference kernel applies
    its weight and bias as the coefficients (it only reads them)."""
    return torch.zeros(channels, dtype=acc), torch.ones(channels, dtype=acc)


def _fast_limit(dtype: torch.dtype) -> float:
    """FAST_FORM_LIMIT, widened for half output by what its rounding hides (a sixteenth of its
    ulp): 2^12 for bfloat16, 2^9 for float16."""
    acc = reference.stat_dtype(dtype)
    slack = torch.finfo(dtype).eps / torch.finfo(acc).eps
    return max(FAST_FORM_LIMIT, slack / 16)


def _fast_ok(cancelled: np.ndarray, magnitude: np.ndarray, acc: torch.dtype, *coefs: np.ndarray) -> bool:
    """Whether a one-kernel form loses little to cancellation: every ``cancelled`` term within
    ``magnitude`` (already scaled by the limit; NaN fails), and the float64 ``coefs`` held by
    ``acc`` without overflow or underflow (0 aside)."""
    info = torch.finfo(acc)
    with np.errstate(all="ignore"):
        if not (cancelled <= magnitude).all():
            return False
        sizes = np.abs(np.concatenate(coefs))
        return bool((sizes <= info.max / 4).all() and ((sizes >= info.tiny) | (sizes == 0)).all())


def _scale_shift(x: torch.Tensor, y: torch.Tensor, axis: int, a: np.ndarray, b: np.ndarray, acc: torch.dtype,
                 finite: bool | None = None) -> None:
    """y = x * a + b per channel (a, b: [C] float64) in one pass over x, into ``y``: for float32/
    float64 data addcmul, or torch's batch-norm inference kernel where it reads the layout with
    an inner run (it is faster there); for half data that kernel (mixed dtypes: float32 math),
    else block by block.  The kernel forms b - 0 * a: a and b must be ``finite`` for it (checked
    here unless the caller knows)."""
    if finite is None:
        finite = bool(np.isfinite(a).all() and np.isfinite(b).all())
    half = x.dtype != acc
    views = _native_views(axis, half, x, y) if finite else None
    if views is not None and (half or views[0].shape[2] > 1):
        zeros, ones = _identity_stats(len(a), acc)
        torch.ops.aten.native_batch_norm.out(views[0], _acc_tensor(a, acc), _acc_tensor(b, acc), zeros, ones, False,
                                             0.0, 0.0, out=views[1], save_mean=torch.empty(0, dtype=acc),
                                             save_invstd=torch.empty(0, dtype=acc))
        return
    if x.dtype == acc:
        torch.addcmul(_broadcast(b, x, axis, acc), x, _broadcast(a, x, axis, acc), out=y)
        return
    walk = _Walk(_geometry_of(x, axis), acc)
    a_b, b_b = walk.coef(a), walk.coef(b)
    for channels, (view, out), (buf,) in walk.blocks(x, y):
        u = buf.copy_(view)
        torch.addcmul(walk.part(b_b, channels), u, walk.part(a_b, channels), out=u)
        out.copy_(u)


def _shifted_scale_shift(x: torch.Tensor, y: torch.Tensor, axis: int, pilot: np.ndarray, scale: np.ndarray | None,
                         a: np.ndarray, c: np.ndarray, acc: torch.dtype) -> None:
    """y = ((x - pilot) * scale) * a + c (a, c: [C] float64, a already divided by the scale): the
    form that keeps the digits of offset data; two full-size ops in y, or block by block for half
    data."""
    if x.dtype == acc:
        u = _shift_full(x, y, axis, pilot, scale, acc)
        torch.addcmul(_broadcast(c, x, axis, acc), u, _broadcast(a, x, axis, acc), out=u)
        return
    walk = _Walk(_geometry_of(x, axis), acc)
    pilot_b, scale_b, neg_b = walk.coef(pilot), walk.coef_or_none(scale), walk.coef_or_none(_neg_scaled(pilot, scale))
    a_b, c_b = walk.coef(a), walk.coef(c)
    for channels, (view, out), (buf,) in walk.blocks(x, y):
        u = _shift(view, buf, walk.part(pilot_b, channels), walk.part(scale_b, channels), walk.part(neg_b, channels))
        torch.addcmul(walk.part(c_b, channels), u, walk.part(a_b, channels), out=u)
        out.copy_(u)


def normalize(x: torch.Tensor, y: torch.Tensor, axis: int, mean: np.ndarray, invstd: np.ndarray, g: np.ndarray,
              beta: np.ndarray, exact: bool = False) -> None:
    """y = (x - mean) * invstd * g + beta into ``y`` (mean, invstd, g, beta: [C] float64): the
    one-kernel form x * A + B where it is accurate (and not ``exact``), else the shifted form."""
    acc = reference.stat_dtype(x.dtype)
    with np.errstate(all="ignore"):
        a = invstd * g
        b = beta - mean * a
        fast = not exact and _fast_ok(np.abs(mean * a), _fast_limit(x.dtype) * (np.abs(g) + np.abs(beta)), acc, a, b)
    if fast:
        _scale_shift(x, y, axis, a, b, acc, finite=True)
        return
    pilot = mean.astype(_np_dtype(acc))
    # a beyond the accumulation range (invstd of subnormal data): normalise in units of a power
    # of two near it, u = (x - pilot) * scale, which is exact
    with np.errstate(all="ignore"):
        huge = np.isfinite(a) & (np.abs(a) >= torch.finfo(acc).max / 4)
        scale = _scale_or_none(np.where(huge, _pow2(a, acc), 1.0), acc) if huge.any() else None
        a_u = a / scale if scale is not None else a
        c = beta - (mean - pilot.astype(np.float64)) * a  # the float64 remainder (subnormal means lose it in acc)
    _shifted_scale_shift(x, y, axis, pilot, scale, a_u, c, acc)


# ----------------------------------------------------------------------------- backward


def _backward_scale(invstd: np.ndarray, acc: torch.dtype) -> np.ndarray | None:
    """A power of two near invstd per channel where invstd is outside [2^-SCALE_FREE,
    2^SCALE_FREE] (u = (x - pilot) * scale is then of order one), None if no channel needs one."""
    wild = np.isfinite(invstd) & (invstd > 0) & ((invstd < 2.0**-SCALE_FREE) | (invstd > 2.0**SCALE_FREE))
    if not wild.any():
        return None
    return _scale_or_none(np.where(wild, _pow2(invstd, acc), 1.0), acc)


def gradient_sums(dy: torch.Tensor, x: torch.Tensor, axis: int, center: torch.Tensor, invstd: np.ndarray | None,
                  with_d: bool = True, scratch: torch.Tensor | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """(S, D) = (sum(dy), sum((x - mean) * dy)) per channel in float64 with mean = center[0] +
    center[1]: sums in the accumulation dtype of (x - center[0]) * scale * dy, D = that / scale -
    center[1] * S; in ``scratch`` (full size, see ``_scratch_for``) or block by block.  Without
    ``with_d`` only S (x is not read)."""
    acc = reference.stat_dtype(x.dtype)
    pilot, shift = _vec(center[0]).astype(_np_dtype(acc)), _vec(center[1])
    scale = _backward_scale(invstd, acc) if (with_d and invstd is not None) else None
    if dy.dtype == acc and (scratch is not None or not with_d):
        s = _channel_total(dy, axis)
        if not with_d:
            return s, None
        u = _shift_full(x, scratch, axis, pilot, scale, acc)
        u.mul_(dy)
        return s, _shifted_d(_channel_total(u, axis), s, shift, scale)
    geo = _geometry_of(x, axis)
    walk = _Walk(geo, acc, scratch=2)
    parts = torch.zeros((2, len(geo.blocks), geo.channels), dtype=acc)
    pilot_b, scale_b, shift_b = walk.coef(pilot), walk.coef_or_none(scale), walk.coef_or_none(_neg_scaled(pilot, scale))
    for k, (channels, (dy_view, x_view), (buf, dy_buf)) in enumerate(walk.blocks(dy, x)):
        grad = _load(dy_view, dy_buf)
        walk.channel_sum(grad, parts[0, k, channels])
        if with_d:
            u = _shift(x_view, buf, walk.part(pilot_b, channels), walk.part(scale_b, channels),
                       walk.part(shift_b, channels))
            u.mul_(grad)
            walk.channel_sum(u, parts[1, k, channels])
    sums = parts.sum(1, dtype=torch.float64).numpy()
    return sums[0], _shifted_d(sums[1], sums[0], shift, scale) if with_d else None


def _shifted_d(summed: np.ndarray, s: np.ndarray, shift: np.ndarray, scale: np.ndarray | None) -> np.ndarray:
    """D = sum((x - center[0]) * scale * dy) / scale - center[1] * S; a non-finite S stays out
    of D (shift * S would turn an infinite D into NaN)."""
    with np.errstate(all="ignore"):
        d = summed / scale.astype(np.float64) if scale is not None else summed
        return np.where(np.isfinite(s), d - shift * s, d)


def input_grad(dy: torch.Tensor, x: torch.Tensor, axis: int, center: torch.Tensor, invstd: np.ndarray,
               g: np.ndarray, sums: tuple[np.ndarray, np.ndarray] | None, count: int | torch.Tensor,
               dx: torch.Tensor | None = None) -> torch.Tensor:
    """dx of ``reference.input_grad`` in x's layout and dtype (into ``dx`` when given): g * invstd *
    (dy - S / count - (x - mean) * D * invstd^2 / count) from the given (S, D), or g * invstd * dy
    without them."""
    acc = reference.stat_dtype(x.dtype)
    a = g * invstd
    dx = empty_like_layout(x) if dx is None else dx
    if sums is None:
        _scale_shift(dy, dx, axis, a, np.zeros_like(a), acc)
        return dx
    s, d = sums
    count64 = _vec(count.reshape(-1)) if isinstance(count, torch.Tensor) else float(count)
    if not bool(np.all(np.isfinite(s) & np.isfinite(d))):  # NaN/Inf in dy: the reference's order
        with np.errstate(all="ignore"):
            _formula_input_grad(dy, x, dx, axis, center, a, s / count64, d * invstd * invstd / count64, acc)
        return dx
    if isinstance(count, int) and count == 1:  # dy - S = 0 exactly (x - mean = 0): dx = 0 * a
        return dx.copy_(torch.sub(dy, dy).to(acc) * _broadcast(a, x, axis, acc))
    pilot, shift = _vec(center[0]), _vec(center[1])
    with np.errstate(all="ignore"):
        b = -a * (invstd * (d / count64)) * invstd  # the x coefficient, formed without invstd^2 overflowing
        k = -a * s / count64
        k_x = k - b * (pilot + shift)  # dx = a dy + b x + k_x
        scale = _backward_scale(invstd, acc)
        fast = x.dtype == acc and scale is None and _fast_ok(
            np.abs(pilot * b), FAST_FORM_LIMIT * np.abs(b) / invstd, acc, a, b, k_x)
    if fast:
        _scale_shift(x, dx, axis, b, k_x, acc, finite=True)
        dx.addcmul_(dy, _broadcast(a, x, axis, acc))
        return dx
    _shifted_input_grad(dy, x, dx, axis, pilot.astype(_np_dtype(acc)), a, b, k - b * shift, acc, scale)
    return dx


def _shifted_input_grad(dy: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, axis: int, pilot: np.ndarray,
                        a: np.ndarray, b: np.ndarray, k: np.ndarray, acc: torch.dtype,
                        scale: np.ndarray | None) -> None:
    """dx = a * dy + b * (x - pilot) + k, (x - pilot) as ((x - pilot) * scale) / scale: three
    full-size ops in dx, or block by block for half data."""
    b_u = b / scale.astype(np.float64) if scale is not None else b
    if x.dtype == acc:
        u = _shift_full(x, dx, axis, pilot, scale, acc)
        torch.addcmul(_broadcast(k, x, axis, acc), u, _broadcast(b_u, x, axis, acc), out=u)
        u.addcmul_(dy, _broadcast(a, x, axis, acc))
        return
    walk = _Walk(_geometry_of(x, axis), acc, scratch=2)
    pilot_b, scale_b, neg_b = walk.coef(pilot), walk.coef_or_none(scale), walk.coef_or_none(_neg_scaled(pilot, scale))
    a_b, b_b, k_b = walk.coef(a), walk.coef(b_u), walk.coef(k)
    for channels, (x_view, dy_view, out), (buf, dy_buf) in walk.blocks(x, dy, dx):
        u = _shift(x_view, buf, walk.part(pilot_b, channels), walk.part(scale_b, channels), walk.part(neg_b, channels))
        torch.addcmul(walk.part(k_b, channels), u, walk.part(b_b, channels), out=u)
        u.addcmul_(_load(dy_view, dy_buf), walk.part(a_b, channels))
        out.copy_(u)


def _formula_input_grad(dy: torch.Tensor, x: torch.Tensor, dx: torch.Tensor, axis: int, center: torch.Tensor,
                        a: np.ndarray, mean_dy: np.ndarray, x_coef: np.ndarray, acc: torch.dtype) -> None:
    """dx = ((dy - mean_dy) - (x - mean) * x_coef) * a block by block, in ``reference.input_grad``'s
    order of operations, so that non-finite sums give its NaN/Inf pattern."""
    walk = _Walk(_geometry_of(x, axis), acc, scratch=2)
    pilot_b, shift_b = walk.coef(_vec(center[0])), walk.coef(_vec(center[1]))
    a_b, mean_dy_b, x_coef_b = walk.coef(a), walk.coef(mean_dy), walk.coef(x_coef)
    for channels, (x_view, dy_view, out), (buf, dy_buf) in walk.blocks(x, dy, dx):
        centered = _shift(x_view, buf, walk.part(pilot_b, channels), None, None)
        centered.sub_(walk.part(shift_b, channels)).mul_(walk.part(x_coef_b, channels))
        inner = torch.sub(_load(dy_view, dy_buf), walk.part(mean_dy_b, channels), out=dy_buf)
        inner.sub_(centered).mul_(walk.part(a_b, channels))
        out.copy_(inner)


# ----------------------------------------------------------------------------- the backend


def _ieee(method):
    """Run a backend method with numpy's floating-point warnings off: its [C]-vector arithmetic
    meets inf and NaN exactly where SPEC's formulas give them (IEEE semantics, as torch's)."""
    @functools.wraps(method)
    def quiet(*args, **kwargs):
        with np.errstate(all="ignore"):
            return method(*args, **kwargs)

    return quiet


@dataclass(frozen=True)
class CpuBackend:
    """torch's vectorised CPU ops (this module): CPU tensors when not interpreting Triton.

    The same interface and results as ``ops.ReferenceBackend`` (the float64 oracle), at torch's
    speed.  Its trace name is "reference": the CPU path, as the tests and traces call it.
    """

    name: str = "reference"

    @_ieee
    def forward(self, x, gamma, beta, moving_mean, moving_var, settings: Settings, out, keep_stats: bool = True,
                keep_mean: bool = True, call: None = None):
        """(y, mean, invstd, center [2, C], x); updates the moving statistics in training
        (``keep_stats``, ``keep_mean`` and ``call`` are the Triton backend's savings: the
        statistics come anyway, and there is no plan)."""
        acc = reference.stat_dtype(x.dtype)
        if x.numel() == 0:
            return self._empty_forward(x, gamma, beta, moving_mean, moving_var, settings, out, acc)
        y = out if out is not None else empty_like_layout(x)
        g = np.ones(x.shape[settings.axis]) if settings.fix_gamma else _vec(gamma)
        b = _vec(beta)
        if not settings.batch_stats:
            mean = _vec(moving_mean)
            invstd = _inverse_std(_vec(moving_var), settings.eps)
            normalize(x, y, settings.axis, mean, invstd, g, b)
        else:
            native = _native_training(x, y, settings.axis, g, b, settings.eps)
            if native is not None:
                mean, var, invstd = native
            else:
                moments = _pseudo_moments(x, y, settings.axis) if x.dtype == acc else None
                mean, var = moments if moments is not None else batch_statistics(x, settings.axis,
                                                                                  _scratch_for(x, y))
                invstd = _inverse_std(var, settings.eps)
                # a constant channel takes the shifted form: exactly (x - mean) = 0, y = beta
                normalize(x, y, settings.axis, mean, invstd, g, b, exact=bool((var == 0).any()))
            self._update(x, mean, var, moving_mean, moving_var, settings)
        center = _center(mean, acc)
        return y, center[0], _acc_tensor(invstd, acc), center, x

    def fused_forward(self, x, gamma, beta, moving_mean, moving_var, settings: Settings, out, addend,
                      keep_stats: bool = True, keep_mask: bool = True):
        """(y, mean, invstd, center, x, mask) of relu(bn(x) [+ addend]): the plain forward, then
        the addend and the ReLU on y in the accumulation dtype (y rounded twice: within the
        tolerance of one more rounding); mask (bool) is where y is positive, with the ReLU."""
        y, mean, invstd, center, x_read = self.forward(x, gamma, beta, moving_mean, moving_var, settings, out,
                                                       keep_stats)
        _fused_epilogue(y, addend, settings.relu)
        return y, mean, invstd, center, x_read, reference.relu_passes(y) if settings.relu and keep_mask else None

    def fused_backward(self, dy, x, gamma, center, invstd, settings: Settings, beta_dtype, mask=None):
        """(dx, dgamma, dbeta, daddend): ``backward`` of dy gated by the forward's mask."""
        return torch_fused_backward(self, dy, x, gamma, center, invstd, settings, beta_dtype, mask)

    @staticmethod
    def fused_state_like(x: torch.Tensor, settings: Settings, addend) -> tuple[int, torch.Tensor | None]:
        """(center rows, empty mask or None) ``fused_forward`` returns: ``torch_fused_state_like``."""
        return torch_fused_state_like(x, settings)

    @staticmethod
    def _update(x, mean: np.ndarray, var: np.ndarray, moving_mean, moving_var, settings: Settings) -> None:
        """The moving-average update of ``reference.forward`` (float64, any momentum)."""
        m = x.numel() // x.shape[settings.axis]
        var_for_update = var * (m / (m - 1)) if settings.unbiased_update else var
        _moving_update(moving_mean, mean, settings.momentum)
        _moving_update(moving_var, var_for_update, settings.momentum)

    @staticmethod
    def _empty_forward(x, gamma, beta, moving_mean, moving_var, settings: Settings, out, acc):
        """No elements (inference on an empty batch): the reference's per-channel statistics."""
        y, mean64, invstd64 = reference.forward(
            x, gamma, beta, moving_mean, moving_var, axis=settings.axis, eps=settings.eps,
            momentum=settings.momentum, fix_gamma=settings.fix_gamma, batch_stats=settings.batch_stats,
            update_moving=settings.batch_stats, unbiased_update=settings.unbiased_update,
            out=out if out is not None else empty_like_layout(x), stats_dtype=torch.float64)
        center = _center(_vec(mean64), acc)
        return y, center[0], invstd64.to(acc), center, x

    @_ieee
    def backward(self, dy, x, gamma, center, invstd, settings: Settings, beta_dtype):
        """Returns (dx, dgamma, dbeta); dx in x's layout."""
        channels = x.shape[settings.axis]
        acc = reference.stat_dtype(x.dtype)
        beta_dtype = beta_dtype or gamma.dtype
        if x.numel() == 0:
            zeros = torch.zeros(channels, dtype=torch.float64)
            return empty_like_layout(x), zeros.to(gamma.dtype), zeros.to(beta_dtype)
        if dy.stride() != x.stride() and dy.stride() != layout_strides(tuple(x.shape), x.stride()):
            # dy read in x's layout, as the kernels read it (ops._backward_layout): the sums then
            # run in one order whatever layout autograd hands dy in (torch 2.11's AOTAutograd
            # makes a compiled backward's dy contiguous, eager keeps y's layout)
            dy = empty_like_layout(x).copy_(dy)
        inv = _vec(invstd)
        g = np.ones(channels) if settings.fix_gamma else _vec(gamma)
        native = _native_backward(dy, x, settings.axis, center, inv, g, settings)
        if native is not None:
            dx, dgamma, s = native
        else:
            dx = empty_like_layout(x)
            with_d = settings.batch_stats or not settings.fix_gamma
            sums = (_pseudo_sums(dy, x, settings.axis, center)
                    if with_d and x.dtype == acc and _backward_scale(inv, acc) is None else None)
            s, d = sums if sums is not None else gradient_sums(dy, x, settings.axis, center, inv, with_d,
                                                               _scratch_for(x, dx))
            m = x.numel() // channels
            input_grad(dy, x, settings.axis, center, inv, g, (s, d) if settings.batch_stats else None, m, dx)
            dgamma = d * inv if with_d else None
        if settings.fix_gamma:
            dgamma = np.zeros(channels)
        return dx, torch.from_numpy(dgamma).to(gamma.dtype), torch.from_numpy(s).to(beta_dtype)

    # ------------------------------------------------------------------ SyncBatchNorm's parts

    @_ieee
    def moments(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """[3, C] float64 (count, mean, M2) of this rank's batch."""
        channels = x.shape[axis]
        m = x.numel() // max(channels, 1)
        if m == 0 or channels == 0:
            return reference.moments(x, axis)
        mean, var = batch_statistics(x, axis)
        return torch.from_numpy(np.stack([np.full_like(mean, m), mean, var * m]))

    @_ieee
    def normalize(self, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, g: torch.Tensor,
                  beta: torch.Tensor, axis: int, addend: torch.Tensor | None = None, relu: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y, x, center [2, C], invstd [C]) as ``TritonBackend.normalize`` (the addend and ReLU
        applied to y as in ``fused_forward``)."""
        acc = reference.stat_dtype(x.dtype)
        y = empty_like_layout(x)
        mean64 = _vec(mean)
        if x.numel():
            normalize(x, y, axis, mean64, _vec(invstd), _vec(g), _vec(beta))
            _fused_epilogue(y, addend, relu)
        return y, x, _center(mean64, acc), invstd.to(acc)

    @_ieee
    def gradient_sums(self, dy: torch.Tensor, x: torch.Tensor, center: torch.Tensor, axis: int) -> torch.Tensor:
        """[2, C] float64 (S, D) around the mean ``center[0] + center[1]``."""
        if x.numel() == 0:
            return torch.zeros((2, x.shape[axis]), dtype=torch.float64)
        s, d = gradient_sums(dy, x, axis, center, None)
        return torch.from_numpy(np.stack([s, d]))

    @_ieee
    def input_grad(self, dy: torch.Tensor, x: torch.Tensor, g: torch.Tensor, center: torch.Tensor,
                   invstd: torch.Tensor, settings: Settings, sums: torch.Tensor | None,
                   count: int | torch.Tensor) -> torch.Tensor:
        """dx from ``sums`` (S, D) over ``count`` elements per channel (an int or a tensor)."""
        if x.numel() == 0:
            return empty_like_layout(x)
        pair = None if sums is None else (_vec(sums[0]), _vec(sums[1]))
        return input_grad(dy, x, settings.axis, center, _vec(invstd), _vec(g), pair, count)


# ----------------------------------------------------------------------------- fused, torch paths


def _fused_epilogue(y: torch.Tensor, addend: torch.Tensor | None, relu: bool) -> None:
    """y = relu(y [+ addend]) in place, in the accumulation dtype (y rounded a second time: within
    the tolerance of one more rounding); NaN kept, as torch.relu."""
    if addend is None and not relu:
        return
    value = y.to(reference.stat_dtype(y.dtype))
    if addend is not None:
        value = value + addend.to(value.dtype)
    if relu:
        value = torch.where(value < 0, 0.0, value)
    y.copy_(value)


def torch_fused_backward(backend, dy, x, gamma, center, invstd, settings: Settings, beta_dtype, mask
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """A torch path's fused backward (this backend's and the reference's): dy gated by the
    forward's ``mask`` (bool: where its output was positive) under a ReLU, then ``backend``'s
    plain backward; returns (dx, dgamma, dbeta, daddend), daddend being that gated dy."""
    if settings.relu and mask is not None:
        dy = reference.gate(dy, mask)
    dx, dgamma, dbeta = backend.backward(dy, x, gamma, center, invstd, settings, beta_dtype)
    return dx, dgamma, dbeta, dy if settings.addend else None


def torch_fused_state_like(x: torch.Tensor, settings: Settings) -> tuple[int, torch.Tensor | None]:
    """(center rows, empty mask or None) of a torch path's fused forward on ``x``: center [2, C]
    and, with a ReLU, the bool mask ``reference.relu_passes(y)`` (y in x's layout)."""
    return 2, empty_like_layout(x, dtype=torch.bool) if settings.relu else None
