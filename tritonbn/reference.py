"""SPEC.md as plain torch code: the oracle for the tests and the CPU path.

Everything here is computed in float64 and cast back at the end, so it is the most accurate
answer torch can give for a call; the Triton kernels accumulate in float32 (float64 for float64
data) and are compared against it with per-dtype tolerances.

The functions take already-validated arguments (see ``tritonbn.validation``): they are the
semantics, not the argument checking.
"""

from __future__ import annotations

import torch

__all__ = [
    "stat_dtype",
    "reduce_dims",
    "channel_shape",
    "forward",
    "backward",
    "moving_update",
]


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


def _invstd(var: torch.Tensor, eps: float) -> torch.Tensor:
    """1/sqrt(var + eps), except 0 where var == 0 and eps == 0 (SPEC: Forward)."""
    invstd = torch.rsqrt(var + eps)
    if eps == 0:
        invstd = torch.where(var == 0, torch.zeros_like(invstd), invstd)
    return invstd


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
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """BatchNorm forward of SPEC.md.

    Args:
        data: (..., C, ...) with C = data.shape[axis]; axis is non-negative here.
        gamma, beta, moving_mean, moving_var: (C,).
        batch_stats: normalise with the batch statistics (training and not use_global_stats);
            otherwise with the moving statistics.
        update_moving: update moving_mean/moving_var in place (only with batch_stats).
        unbiased_update: use var * m / (m - 1) in the moving_var update (m > 1 required).
        out: written in place when given (same shape and dtype as data).
    Returns:
        (out, mean, invstd); mean and invstd are (C,) in ``stat_dtype(data.dtype)``.
    """
    channels = data.shape[axis]
    bshape = channel_shape(data.dim(), axis, channels)
    x = data.double()
    if batch_stats:
        dims = reduce_dims(data.dim(), axis)
        mean = x.mean(dim=dims) if dims else x.clone()
        centered = x - mean.reshape(bshape)
        var = (centered * centered).mean(dim=dims) if dims else torch.zeros_like(mean)
    else:
        mean = moving_mean.double()
        var = moving_var.double()
        centered = x - mean.reshape(bshape)
    invstd = _invstd(var, eps)
    g = torch.ones_like(mean) if fix_gamma else gamma.double()
    y = centered * (invstd * g).reshape(bshape) + beta.double().reshape(bshape)
    if batch_stats and update_moving:
        m = data.numel() // max(channels, 1)
        var_for_update = var * (m / (m - 1)) if unbiased_update else var
        moving_update(moving_mean, mean, momentum)
        moving_update(moving_var, var_for_update, momentum)
    sdt = stat_dtype(data.dtype)
    if out is None:
        out = torch.empty_like(data)
    out.copy_(y)
    return out, mean.to(sdt), invstd.to(sdt)


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
        (dx, dgamma, dbeta): dx like data; dgamma (C,) in gamma's dtype, dbeta (C,) in
        ``beta_dtype``.
    """
    channels = data.shape[axis]
    bshape = channel_shape(data.dim(), axis, channels)
    dims = reduce_dims(data.dim(), axis)
    dy = grad_out.double()
    x = data.double()
    mean64 = mean.double()
    inv64 = invstd.double()
    g = torch.ones_like(inv64) if fix_gamma else gamma.double()
    centered = x - mean64.reshape(bshape)
    sum_dy = dy.sum(dim=dims) if dims else dy.clone()
    sum_dy_xmu = (centered * dy).sum(dim=dims) if dims else centered * dy
    scale = (g * inv64).reshape(bshape)
    if batch_stats:
        m = data.numel() // max(channels, 1)
        dx = scale * (
            dy
            - (sum_dy / m).reshape(bshape)
            - centered * (sum_dy_xmu * inv64 * inv64 / m).reshape(bshape)
        )
    else:
        dx = dy * scale
    dgamma = torch.zeros_like(inv64) if fix_gamma else sum_dy_xmu * inv64
    dbeta = sum_dy
    return dx.to(data.dtype), dgamma.to(gamma.dtype), dbeta.to(beta_dtype or gamma.dtype)
