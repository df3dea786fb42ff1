"""Argument checking of SPEC.md "Bad input".

Every check runs before any kernel and before anything is written, and raises a ``TypeError``
(wrong kind or dtype) or ``ValueError`` (wrong value, shape, device) whose message starts with
the argument's name.

Most calls repeat a signature (one layer, one batch shape), so ``validate`` remembers the
``Settings`` of every signature it accepted, keyed by what the checks read: dtypes, shapes, the
devices, the strides whose self-overlap is checked, axis, eps, momentum and the flags (no tensor
is held).  A repeat call builds that key (``signature``; the op's own entries are keyed by it
too) and then runs the one check no key can decide: whether ``out`` overlaps ``data`` in memory.  A
call the key cannot describe exactly (numpy scalars, tensor subclasses, -0.0, a Dynamo trace,
...) or whose key is new takes the full checks, in their usual order, so every error is the same.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch

__all__ = ["Settings", "DATA_DTYPES", "validate", "validate_fusion", "signature", "check_out_apart"]

DATA_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
PARAM_NAMES = ("gamma", "beta", "moving_mean", "moving_var")


class Settings(NamedTuple):
    """The scalar part of one call, after validation (axis is non-negative).  A named tuple: call
    plans are keyed by it, and a tuple hashes in C (a frozen dataclass's hash is Python code)."""

    axis: int
    eps: float
    momentum: float
    fix_gamma: bool
    batch_stats: bool  # training and not use_global_stats: normalise with batch statistics
    unbiased_update: bool
    relu: bool = False  # fused: out = relu(bn(data) [+ addend])
    addend: bool = False  # fused: an addend is added to bn(data) (before the ReLU)


ACT_TYPES = (None, "relu")


def validate_fusion(settings: Settings, data: torch.Tensor, act_type: object, addend: object,
                    out: torch.Tensor | None) -> Settings:
    """The fused epilogue's checks (``act_type``, ``addend``) after ``validate`` accepted the rest:
    returns ``settings`` with ``relu`` and ``addend`` set.

    Raises:
        TypeError: act_type not a string or None; addend not a tensor, or of another dtype.
        ValueError: an unknown act_type; addend of another shape or device, or overlapping out.
    """
    if act_type is not None and not isinstance(act_type, str):
        raise TypeError(f"act_type must be None or a string, got {type(act_type).__name__}")
    if act_type not in ACT_TYPES:
        raise ValueError(f"act_type must be None or 'relu', got {act_type!r}")
    if addend is not None:
        check_addend(addend, data)
        if out is not None and _overlaps(out, addend):
            raise ValueError("out overlaps addend in memory; pass a separate tensor")
    return settings._replace(relu=act_type == "relu", addend=addend is not None)


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


def _byte_range(t: torch.Tensor) -> tuple[int, int]:
    """[first, last + 1) bytes that t's elements can touch."""
    start = t.data_ptr()
    extent = sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride()))
    return start, start + (extent + 1) * t.element_size()


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Conservative memory-overlap test: same storage and intersecting byte ranges."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    if a.untyped_storage().data_ptr() != b.untyped_storage().data_ptr():
        return False
    a0, a1 = _byte_range(a)
    b0, b1 = _byte_range(b)
    return a0 < b1 and b0 < a1


def _self_overlapping(t: torch.Tensor) -> bool:
    """Conservative: True unless each dimension steps past everything the faster ones span."""
    span = 0
    for size, stride in sorted(((s, abs(st)) for s, st in zip(t.shape, t.stride()) if s > 1), key=lambda p: p[1]):
        if stride <= span:
            return True
        span += (size - 1) * stride
    return False


def check_out_apart(out: torch.Tensor, data: torch.Tensor) -> None:
    """out must not share memory with data: the only check that reads addresses, not metadata."""
    if _overlaps(out, data):
        raise ValueError("out overlaps data in memory; pass a separate tensor")


def _check_like_data(name: str, t: object, data: torch.Tensor) -> None:
    """``t`` (``out``, ``addend``) is a tensor of data's shape, dtype and device."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if t.shape != data.shape:
        raise ValueError(f"{name} has shape {tuple(t.shape)} but data has shape {tuple(data.shape)}")
    if t.dtype != data.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but data has dtype {data.dtype}")
    if t.device != data.device:
        raise ValueError(f"{name} is on {t.device} but data is on {data.device}")


def check_addend(addend: object, data: torch.Tensor) -> None:
    """A fused addend is a tensor of data's shape, dtype and device (TypeError / ValueError)."""
    _check_like_data("addend", addend, data)


def _check_out(out: object, data: torch.Tensor) -> None:
    _check_like_data("out", out, data)
    check_out_apart(out, data)
    if _self_overlapping(out):
        raise ValueError("out has elements that share memory (an expanded view?); pass a dense tensor")


def _validate_fully(
    data: object,
    params: tuple[object, object, object, object],
    eps: object,
    momentum: object,
    fix_gamma: object,
    use_global_stats: object,
    axis: object,
    out: object,
    training: object,
    unbiased_update: object,
) -> Settings:
    """Every check of SPEC "Bad input", in the order that decides which error a bad call gets."""
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


# ----------------------------------------------------------------------------- signature cache

MAX_SIGNATURES = 4096
"""The cache is cleared when it holds this many signatures (a model has a few dozen)."""

_signatures: dict[tuple, Settings] = {}

# Exact types the key describes.  Equal keys must mean equal outcomes: True == 1 == 1.0 as dict
# keys, so a bool or float axis or a bool eps (TypeErrors) must never meet a cached int; numpy
# scalars and tensor subclasses (FakeTensor, ...) simply take the full checks.
_TENSOR_TYPES = frozenset({torch.Tensor, torch.nn.Parameter})
_NUMBER_TYPES = frozenset({float, int})
_FLAG_TYPES = frozenset({bool, int, type(None)})  # only bool(flag) matters, and equal numbers agree on it
_is_dynamo_compiling = torch.compiler.is_dynamo_compiling
_copysign = math.copysign


def signature(
    data: object,
    params: object,
    eps: object,
    momentum: object,
    fix_gamma: object,
    use_global_stats: object,
    axis: object,
    out: object,
    training: object,
    unbiased_update: object,
) -> tuple | None:
    """The cache key of one call: everything its checks and Settings depend on except where
    ``out`` lies in memory; None when the call is not one the key can describe."""
    # Dynamo traces symbolic sizes, which cannot be hashed (and a trace runs once per graph).
    if _is_dynamo_compiling() or type(params) is not tuple or len(params) != 4 or type(axis) is not int:
        return None
    if type(eps) not in _NUMBER_TYPES or type(momentum) not in _NUMBER_TYPES:
        return None
    # -0.0 == 0.0 would share 0.0's entry, but Settings keeps the sign float() gives it.
    if not (eps or _copysign(1.0, eps) > 0) or not (momentum or _copysign(1.0, momentum) > 0):
        return None
    flag_types = _FLAG_TYPES
    if (type(fix_gamma) not in flag_types or type(use_global_stats) not in flag_types
            or type(training) not in flag_types or type(unbiased_update) not in flag_types):
        return None
    gamma, beta, moving_mean, moving_var = params
    tensor_types = _TENSOR_TYPES
    if (type(data) not in tensor_types or type(gamma) not in tensor_types or type(beta) not in tensor_types
            or type(moving_mean) not in tensor_types or type(moving_var) not in tensor_types
            or (out is not None and type(out) not in tensor_types)):
        return None
    try:
        # Every tensor's device is in the key (cheaper than comparing them): a key with mismatched
        # devices never passed the full checks, so it is never found.
        key = (
            data.dtype, data.shape, data.device, axis, eps, momentum, fix_gamma, use_global_stats, training,
            unbiased_update, gamma.dtype, gamma.shape, gamma.device, beta.dtype, beta.shape, beta.device,
            # the moving statistics are updated in place: their strides decide _self_overlapping
            moving_mean.dtype, moving_mean.shape, moving_mean.stride(), moving_mean.device,
            moving_var.dtype, moving_var.shape, moving_var.stride(), moving_var.device,
        )
        return key if out is None else key + (out.dtype, out.shape, out.stride(), out.device)
    except Exception:  # noqa: BLE001 - e.g. sparse or nested layouts: the full checks raise what they raise
        return None


def _remember(key: tuple, settings: Settings) -> None:
    """Cache an accepted signature; clearing when full keeps the cache bounded without LRU costs."""
    if len(_signatures) >= MAX_SIGNATURES:
        _signatures.clear()
    _signatures[key] = settings


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
    key = signature(data, params, eps, momentum, fix_gamma, use_global_stats, axis, out, training,
                     unbiased_update)
    settings = _signatures.get(key) if key is not None else None
    if settings is None:
        settings = _validate_fully(data, params, eps, momentum, fix_gamma, use_global_stats, axis, out,
                                   training, unbiased_update)
        if key is not None:
            _remember(key, settings)
    elif out is not None:
        # A cached signature passed every other check; where out lies is new with each call.
        check_out_apart(out, data)
    return settings
