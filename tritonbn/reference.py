"""SPEC.md as plain torch code: the oracle for the tests and the CPU path.

Everything here is computed in float64 and cast back at the end, so it is the most accurate
answer torch can give for a call; the Triton kernels accumulate in float32 (float64 for float64
data) and are compared against it with per-dtype tolerances.  The float64 work streams over
chunks of at most ``CHUNK_ELEMENTS`` elements (per-channel float64 sums, then the output chunk by
chunk), so besides its output a call allocates O(C) plus a few chunks, as the kernels do.

The functions take already-validated arguments (see ``tritonbn.validation``): they are the
semantics, not the argument checking.
"""

from __future__ import annotations

import math
from typing import Iterator

import torch

__all__ = [
    "stat_dtype",
    "reduce_dims",
    "channel_shape",
    "batch_statistics",
    "moments",
    "chan_merge",
    "forward",
    "backward",
    "gradient_sums",
    "input_grad",
    "inverse_std",
    "normalize",
    "moving_update",
    "CHUNK_ELEMENTS",
]

# Formulas are evaluated in float64 on chunks of at most this many elements (256 KiB of
# float64), chunk by chunk into the output: the CPU path's workspace beyond its output is O(C)
# plus a few chunks, never a temporary the size of the data (issue: memory).
CHUNK_ELEMENTS = 32 * 1024


def stat_dtype(data_dtype: torch.dtype) -> torch.dtype:
    """The dtype of ``mean``/``invstd`` and of the accumulation for ``data_dtype`` (SPEC: Dtypes)."""
    return torch.float64 if data_dtype == torch.float64 else torch.float32


def reduce_dims(ndim: int, axis: int) -> list[int]:
    """Every dimension except the (non-negative) channel ``axis``."""
    return [d for d in range(ndim) if d != axis]


def channel_shape(ndim: int, axis: int, channels: int) -> list[int]:
    """Shape that broadcasts a length-C vector along ``axis`` of an ``ndim`` tensor."""
    shape = [1] * ndim
    shape[axis] = channels
    return shape


def moving_update(moving: torch.Tensor, batch_value: torch.Tensor, momentum: float) -> None:
    """``moving = moving * momentum + batch_value * (1 - momentum)``, in place, in float64."""
    updated = moving.double() * momentum + batch_value.double() * (1.0 - momentum)
    moving.copy_(updated)


def inverse_std(var: torch.Tensor, eps: float) -> torch.Tensor:
    """1/sqrt(var + eps), except 0 where var == 0 and eps == 0 (SPEC: Forward)."""
    invstd = torch.rsqrt(var + eps)
    if eps == 0:
        invstd = torch.where(var == 0, torch.zeros_like(invstd), invstd)
    return invstd


def _blocks(shape: torch.Size, limit: int) -> Iterator[tuple[slice, ...]]:
    """Index tuples tiling ``shape`` with blocks of at most ``limit`` elements: whole slices of
    the leading dimension where a slice fits, otherwise one index of it and recursion inwards."""
    if math.prod(shape) <= limit:
        yield ()
        return
    inner = math.prod(shape[1:])
    if inner <= limit:
        step = limit // max(inner, 1)
        for start in range(0, shape[0], step):
            yield (slice(start, start + step),)
        return
    for i in range(shape[0]):
        for rest in _blocks(shape[1:], limit):
            yield (slice(i, i + 1), *rest)


def _chunks(axis: int, *tensors: torch.Tensor) -> Iterator[tuple[slice, list[torch.Tensor]]]:
    """(channel slice, views with the channel dimension first) over chunks of same-shaped
    ``tensors``.  Blocks split the first tensor's outermost dimensions in memory first, so a
    dense chunk is one contiguous run whatever the layout; views never copy."""
    order = sorted(range(tensors[0].dim()), key=lambda d: -abs(tensors[0].stride(d)))
    where = order.index(axis)
    views = [t.permute(order) for t in tensors]
    for index in _blocks(views[0].shape, CHUNK_ELEMENTS):
        channels = index[where] if where < len(index) else slice(None)
        yield channels, [v[index].movedim(where, 0) for v in views]


def _per_channel(values: torch.Tensor, channels: slice, like: torch.Tensor) -> torch.Tensor:
    """``values[channels]`` shaped to broadcast against a channel-first chunk ``like``."""
    return values[channels].reshape([-1] + [1] * (like.dim() - 1))


def _channel_sum(chunk: torch.Tensor) -> torch.Tensor:
    """Sum of a channel-first chunk over everything but its first dimension."""
    return chunk.sum(dim=tuple(range(1, chunk.dim()))) if chunk.dim() > 1 else chunk


def batch_statistics(data: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean, biased var) per channel in float64, streamed over chunks; needs m > 0.

    mean = x0 + sum(x - x0) / m with x0 the channel's first element (0 if not finite, so that
    +-inf data still gives an infinite mean): exact for a constant channel, whose plain float64
    sum may round (SPEC's var == 0 rule needs exactly 0), and the shifted terms are small.  var
    is a second pass over (x - mean)^2 (SPEC: never E[x^2] - E[x]^2)."""
    channels = data.shape[axis]
    m = data.numel() // max(channels, 1)
    if m == 0:  # nothing to average (validation rejects this in training)
        return (torch.full((channels,), math.nan, dtype=torch.float64, device=data.device),) * 2
    first = data.movedim(axis, 0)[(slice(None),) + (0,) * (data.dim() - 1)].double()
    shift = torch.where(torch.isfinite(first), first, torch.zeros_like(first))
    shifted_sum = torch.zeros(channels, dtype=torch.float64, device=data.device)
    for c, (x,) in _chunks(axis, data):
        shifted_sum[c] += _channel_sum(x - _per_channel(shift, c, x))
    mean = shift + shifted_sum / m
    squares = torch.zeros_like(shifted_sum)
    for c, (x,) in _chunks(axis, data):
        centered = x - _per_channel(mean, c, x)
        squares[c] += _channel_sum(centered.mul_(centered))
    return mean, squares / m


def moments(data: torch.Tensor, axis: int) -> torch.Tensor:
    """[3, C] float64 (count, mean, M2 = sum((x - mean)^2)) per channel: the parts Chan's formula
    merges (``chan_merge``) across the ranks of a process group; count 0 when m = 0."""
    channels = data.shape[axis]
    m = data.numel() // max(channels, 1)
    result = torch.zeros((3, channels), dtype=torch.float64, device=data.device)
    result[0] = m
    if m:
        mean, var = batch_statistics(data, axis)
        result[1], result[2] = mean, var * m
    return result


def chan_merge(parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge [K, 3, C] (count, mean, M2) parts into the whole's (count, mean, M2), each [C].

    Chan et al.'s pairwise update generalised to K parts at once, in float64: mean is the
    count-weighted mean and M2 = sum(M2_k + n_k * (mean_k - mean)^2), a sum of non-negative
    terms; parts with no elements drop out.
    """
    counts, means, m2s = parts.double().unbind(1)
    total = counts.sum(0)
    present = counts > 0  # an empty part's mean may be NaN: keep it out of the sums
    mean_terms = torch.where(present, counts * means, 0.0)
    mean = mean_terms.sum(0) / total.clamp(min=1)
    spread = torch.where(present, m2s + counts * (means - mean) ** 2, 0.0)
    return total, mean, spread.sum(0)


def forward(
    data: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    moving_mean: torch.Tensor,
    moving_var: torch.Tensor,
    *,
    axis: int,
    eps: float,
    momentum: float,
    fix_gamma: bool,
    batch_stats: bool,
    update_moving: bool,
    unbiased_update: bool = False,
    out: torch.Tensor | None = None,
    stats_dtype: torch.dtype | None = None,
    addend: torch.Tensor | None = None,
    relu: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm forward of SPEC.md, fused with what follows it in a ResNet:
    out = relu(bn(data) + addend), the ReLU and the addend each optional, in float64 and rounded
    once.

    Args:
        data: (..., C, ...) with C = data.shape[axis]; axis is non-negative here.
        gamma, beta, moving_mean, moving_var: (C,).
        batch_stats: normalise with the batch statistics (training and not use_global_stats);
            otherwise with the moving statistics.
        update_moving: update moving_mean/moving_var in place (only with batch_stats).
        unbiased_update: use var * m / (m - 1) in the moving_var update (m > 1 required).
        out: written in place when given (same shape and dtype as data).
        stats_dtype: dtype of the returned mean/invstd (default ``stat_dtype(data.dtype)``);
            torch.float64 gives them unrounded (what the CPU path's backward needs).
        addend: added to bn(data) before the ReLU (data's shape and dtype).
        relu: out = max(v, 0) (NaN kept, as torch.relu).
    Returns:
        (out, mean, invstd); mean and invstd are (C,) in ``stats_dtype``.
    """
    if batch_stats:
        mean, var = batch_statistics(data, axis)
    else:
        mean, var = moving_mean.double(), moving_var.double()
    invstd = inverse_std(var, eps)
    g = torch.ones_like(mean) if fix_gamma else gamma.double()
    out = normalize(data, mean, invstd, g, beta, axis=axis, out=out, addend=addend, relu=relu)
    if batch_stats and update_moving:
        m = data.numel() // max(data.shape[axis], 1)
        var_for_update = var * (m / (m - 1)) if unbiased_update else var
        moving_update(moving_mean, mean, momentum)
        moving_update(moving_var, var_for_update, momentum)
    sdt = stats_dtype or stat_dtype(data.dtype)
    return out, mean.to(sdt), invstd.to(sdt)


def normalize(data: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, *,
              axis: int, out: torch.Tensor | None = None, addend: torch.Tensor | None = None,
              relu: bool = False) -> torch.Tensor:
    """out = (x - mean) * invstd * g + beta per channel (+ addend, then max(., 0) with ``relu``),
    in float64 chunk by chunk, into ``out`` (default: like ``data``); mean, invstd, g, beta: (C,)."""
    coef, bias = invstd.double() * g.double(), beta.double()
    mean64 = mean.double()
    if out is None:
        out = torch.empty_like(data)
    tensors = (data, out) if addend is None else (data, out, addend)
    for c, chunks in _chunks(axis, *tensors):  # x - mean promotes to float64 chunk by chunk
        x, y = chunks[0], chunks[1]
        value = (x - _per_channel(mean64, c, x)).mul_(_per_channel(coef, c, x)).add_(_per_channel(bias, c, x))
        if addend is not None:
            value.add_(chunks[2].double())
        if relu:
            value = torch.where(value < 0, 0.0, value)  # NaN kept, as torch.relu
        y.copy_(value)
    return out


def relu_passes(out: torch.Tensor) -> torch.Tensor:
    """Where a fused ReLU passes the gradient: its output is positive (torch.relu's rule: 0 at
    exactly 0 and at NaN)."""
    return out > 0


def gate(grad_out: torch.Tensor, passes: torch.Tensor) -> torch.Tensor:
    """The gradient of bn(data) + addend under a fused ReLU: grad_out where it ``passes``, else 0."""
    return torch.where(passes, grad_out, torch.zeros((), dtype=grad_out.dtype, device=grad_out.device))


def backward(
    grad_out: torch.Tensor,
    data: torch.Tensor,
    gamma: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    *,
    axis: int,
    fix_gamma: bool,
    batch_stats: bool,
    beta_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm backward of SPEC.md.

    Args:
        grad_out: (..., C, ...) gradient of ``out``, same shape as ``data``.
        data: the forward input.
        gamma: (C,) the forward gamma (ignored when fix_gamma).
        mean, invstd: (C,) the statistics the forward normalised with (batch statistics in
            training, moving_mean and 1/sqrt(moving_var + eps) otherwise).
        batch_stats: the forward used batch statistics (gradient flows through them).
        beta_dtype: dtype of dbeta (default: gamma's dtype).
    Returns:
        (dx, dgamma, dbeta): dx like data (dtype) in grad_out's layout; dgamma (C,) in gamma's
        dtype, dbeta (C,) in ``beta_dtype``.
    """
    channels = data.shape[axis]
    mean64, inv64 = mean.double(), invstd.double()
    g = torch.ones_like(inv64) if fix_gamma else gamma.double()
    sum_dy, sum_dy_xmu = gradient_sums(grad_out, data, mean64, axis)
    m = data.numel() // max(channels, 1)
    dx = input_grad(grad_out, data, mean64, inv64, g, axis=axis, sums=(sum_dy, sum_dy_xmu) if batch_stats else None,
                    count=m)
    dgamma = torch.zeros_like(inv64) if fix_gamma else sum_dy_xmu * inv64
    return dx, dgamma.to(gamma.dtype), sum_dy.to(beta_dtype or gamma.dtype)


def gradient_sums(grad_out: torch.Tensor, data: torch.Tensor, mean: torch.Tensor,
                  axis: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, D) = (sum(dy), sum((x - mean) * dy)) per channel in float64, streamed over chunks.

    Args:
        grad_out, data: same shape; mean: (C,) the mean the forward normalised with.
    """
    channels = data.shape[axis]
    mean64 = mean.double()
    sum_dy = torch.zeros(channels, dtype=torch.float64, device=data.device)
    sum_dy_xmu = torch.zeros_like(sum_dy)
    for c, (x, dy) in _chunks(axis, data, grad_out):
        dy64 = dy.double()
        sum_dy[c] += _channel_sum(dy64)
        sum_dy_xmu[c] += _channel_sum((x - _per_channel(mean64, c, x)).mul_(dy64))
    return sum_dy, sum_dy_xmu


def input_grad(
    grad_out: torch.Tensor,
    data: torch.Tensor,
    mean: torch.Tensor,
    invstd: torch.Tensor,
    g: torch.Tensor,
    *,
    axis: int,
    sums: tuple[torch.Tensor, torch.Tensor] | None,
    count: int,
) -> torch.Tensor:
    """dx of SPEC.md, streamed over chunks, in ``data``'s dtype and ``grad_out``'s layout.

    Args:
        mean, invstd, g: (C,) the forward's statistics and the gamma it scaled by (ones with
            fix_gamma).
        sums: (S, D) over the ``count`` elements per channel the statistics were taken over
            (the whole process group's with SyncBatchNorm); None when the forward used the
            moving statistics (the gradient does not flow through them).
    Returns:
        batch statistics: dx = g * invstd * (dy - S / count - (x - mean) * D * invstd^2 / count);
        moving statistics: dx = g * invstd * dy.
    """
    mean64, inv64 = mean.double(), invstd.double()
    scale = g.double() * inv64
    dx = torch.empty_like(grad_out, dtype=data.dtype)
    if sums is not None:
        sum_dy, sum_dy_xmu = sums
        mean_dy, x_coef = sum_dy / count, sum_dy_xmu * inv64 * inv64 / count
    for c, (x, dy, dx_chunk) in _chunks(axis, data, grad_out, dx):
        # every in-place op below acts on a fresh float64 chunk (dy.double() may be dy itself)
        if sums is not None:
            centered = x - _per_channel(mean64, c, x)
            inner = (dy - _per_channel(mean_dy, c, x)).sub_(centered.mul_(_per_channel(x_coef, c, x)))
            dx_chunk.copy_(inner.mul_(_per_channel(scale, c, x)))
        else:
            dx_chunk.copy_(dy * _per_channel(scale, c, x))
    return dx
