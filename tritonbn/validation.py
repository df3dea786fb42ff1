"""Argument checking of SPEC.md "Bad input".

Every check runs before any kernel and before anything is written, and raises a ``TypeError``
(wrong kind or dtype) or ``ValueError`` (wrong value, shape, device) whose message starts with
the argument's name.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

__all__ = ["Settings", "DATA_DTYPES", "validate"]

DATA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PARAM_NAMES = ("gamma", "beta", "moving_mean", "moving_var")


@dataclass(frozen=True)
class Settings:
    """The scalar part of one call, after validation (axis is non-negative)."""

    axis: int
    eps: float
    momentum: float
    fix_gamma: bool
    batch_stats: bool  # training and not use_global_stats: normalise with batch statistics
    unbiased_update: bool


def _allowed_param_dtypes(data_dtype: torch.dtype) -> tuple[torch.dtype, ...]:
    """SPEC Dtypes: half data takes float32 or its own dtype; float32/float64 only themselves."""
    if data_dtype in (torch.float16, torch.bfloat16):
        return (torch.float32, data_dtype)
    return (data_dtype,)


def _finite_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_axis(axis: object, ndim: int) -> int:
    if isinstance(axis, bool) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"axis must be an int, got {type(axis).__name__}")
    axis = int(axis)
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} is out of range for data of ndim {ndim} (valid: [{-ndim}, {ndim}))")
    return axis % ndim


def _check_data(data: object) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise TypeError(f"data must be a torch.Tensor, got {type(data).__name__}")
    if data.dtype not in DATA_DTYPES:
        raise TypeError(f"data has unsupported dtype {data.dtype}; expected one of {DATA_DTYPES}")
    if data.dim() < 1:
        raise ValueError("data must have at least 1 dimension, got a 0-d tensor")
    return data


def _check_param(name: str, param: object, data: torch.Tensor, channels: int) -> None:
    if not isinstance(param, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(param).__name__}")
    if param.dim() != 1 or param.shape[0] != channels:
        raise ValueError(
            f"{name} must have shape ({channels},) (C = data.shape[axis]), got {tuple(param.shape)}"
        )
    allowed = _allowed_param_dtypes(data.dtype)
    if param.dtype not in allowed:
        raise TypeError(f"{name} has dtype {param.dtype}; for {data.dtype} data expected one of {allowed}")
    if param.device != data.device:
        raise ValueError(f"{name} is on {param.device} but data is on {data.device}")
    if name.startswith("moving_") and _self_overlapping(param):
        raise ValueError(f"{name} has elements that share memory (an expanded view?); it is updated in place")


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Conservative memory-overlap test: same storage and intersecting byte ranges."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False

    def byte_range(t: torch.Tensor) -> tuple[int, int]:
        start = t.data_ptr()
        extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
        return start, start + (extent + 1) * t.element_size()

    a0, a1 = byte_range(a)
    b0, b1 = byte_range(b)
    return a0 < b1 and b0 < a1


def _self_overlapping(t: torch.Tensor) -> bool:
    """Conservative: True unless each dimension steps past everything the faster ones span."""
    span = 0
    for size, stride in sorted(((s, abs(st)) for s, st in zip(t.shape, t.stride()) if s > 1), key=lambda p: p[1]):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def _check_out(out: object, data: torch.Tensor) -> None:
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if out.shape != data.shape:
        raise ValueError(f"out has shape {tuple(out.shape)} but data has shape {tuple(data.shape)}")
    if out.dtype != data.dtype:
        raise TypeError(f"out has dtype {out.dtype} but data has dtype {data.dtype}")
    if out.device != data.device:
        raise ValueError(f"out is on {out.device} but data is on {data.device}")
    if _overlaps(out, data):
        raise ValueError("out overlaps data in memory; pass a separate tensor")
    if _self_overlapping(out):
        raise ValueError("out has elements that share memory (an expanded view?); pass a dense tensor")


def validate(
    data: object,
    params: tuple[object, object, object, object],
    *,
    eps: object,
    momentum: object,
    fix_gamma: object,
    use_global_stats: object,
    axis: object,
    out: object,
    training: object,
    unbiased_update: object,
) -> Settings:
    """Check one call's arguments (SPEC "Bad input") and return its Settings.

    Raises:
        TypeError: wrong type or dtype; the message names the argument.
        ValueError: wrong value, shape or device; the message names the argument.
    """
    data = _check_data(data)
    axis = _check_axis(axis, data.dim())
    channels = data.shape[axis]
    for name, param in zip(PARAM_NAMES, params):
        _check_param(name, param, data, channels)
    eps = _finite_number("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    momentum = _finite_number("momentum", momentum)
    if out is not None:
        _check_out(out, data)
    batch_stats = bool(training) and not bool(use_global_stats)
    m = data.numel() // channels if channels else 0
    if batch_stats and channels and m == 0:
        raise ValueError(f"data has no elements per channel (shape {tuple(data.shape)}, axis {axis}) in training")
    if batch_stats and bool(unbiased_update) and m == 1:
        raise ValueError(
            "unbiased_update needs more than one element per channel: data has m = 1, and "
            "var * m / (m - 1) is undefined"
        )
    return Settings(
        axis=axis,
        eps=eps,
        momentum=momentum,
        fix_gamma=bool(fix_gamma),
        batch_stats=batch_stats,
        unbiased_update=bool(unbiased_update),
    )
