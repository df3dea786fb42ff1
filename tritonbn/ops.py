"""Launchers and the torch binding of the BatchNorm operator.

Order of this file (as in Liger-Kernel's ops): launchers (tensors in, tensors out, one per
kernel), the two backends (Triton kernels, plain-torch reference) behind one interface, the
autograd Function that serves both, and the public ``batch_norm``.

Launch counts per op (channel-major or channel-minor alike):
  inference forward: 1 (elementwise, coefficients from the moving statistics)
  training forward:  1 (persistent, when a channel's slice fits a program)
                     or 3 (statistics partials, finalize, elementwise)
  backward:          1 (persistent) or 3 (S/D partials, finalize, elementwise dx)
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import math
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator, TypeVar

import numpy as np
import torch

from . import reference, trace
from .autotune.config import (
    BACKWARD,
    FORWARD,
    INFERENCE,
    KernelConfig,
    device_profile,
    elementwise_config,
    finalize_config,
    interpreting,
    persistent_config,
    reduce_config,
)
from .cpu_backend import CpuBackend
from .plan import CHANNEL_MAJOR, MAX_REDUCED_GROUPS, ViewPlan, empty_like_layout, plan_view
from .validation import Settings, validate

__all__ = ["batch_norm", "backend_for"]

TRITON = "triton"
REFERENCE = "reference"


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _f64_halves(value: float) -> tuple[float, float]:
    """A float64 scalar as two float32 values whose sum is it to ~1e-16 (kernels take float32).

    Beyond float32's range the pair is (+-inf, 0): an eps that large gives invstd = 0, the
    float32 rounding of 1/sqrt(eps) to within 3e-20 (an inf - inf low half would give NaN).
    """
    with np.errstate(over="ignore"):
        hi = float(np.float32(value))
    if math.isinf(hi):
        return hi, 0.0
    return hi, float(np.float32(value - hi))


def _kernels() -> Any:
    """The kernel modules, imported on first use (importing tritonbn needs no Triton)."""
    return importlib.import_module("tritonbn.kernels")


@dataclass(frozen=True)
class CapturedLaunch:
    """A launch recorded instead of run (``dry_run``): what ``tritonbn inspect`` compiles."""

    kernel: Any
    name: str
    programs: int
    config: KernelConfig
    args: tuple
    constexprs: dict


_dry_run: contextvars.ContextVar[list[CapturedLaunch] | None] = contextvars.ContextVar("tritonbn_dry_run", default=None)


@contextlib.contextmanager
def dry_run() -> Iterator[list[CapturedLaunch]]:
    """Record launches (kernel, arguments, config) instead of running them; outputs stay unwritten."""
    launches: list[CapturedLaunch] = []
    token = _dry_run.set(launches)
    try:
        yield launches
    finally:
        _dry_run.reset(token)


def _launch(kernel: Any, name: str, programs: int, config: KernelConfig, args: tuple, **constexprs: Any) -> None:
    trace.record_launch(name, programs, config, **constexprs)
    captured = _dry_run.get()
    if captured is not None:
        captured.append(CapturedLaunch(kernel, name, programs, config, args, constexprs))
        return
    kernel[(programs,)](*args, **constexprs, num_warps=config.num_warps, num_stages=config.num_stages)


# ----------------------------------------------------------------------------- launchers


def _split_extents(plan: ViewPlan, cfg: KernelConfig) -> tuple[int, int]:
    """(rows_per_split, cols_per_split): whole tiles per split, so splits start tile-aligned."""
    rows = plan.outer if plan.family == CHANNEL_MAJOR else plan.m
    rows_per_split = _cdiv(_cdiv(rows, cfg.block_rows), cfg.split_rows) * cfg.block_rows
    cols_per_split = _cdiv(_cdiv(plan.inner, cfg.block_cols), cfg.split_cols) * cfg.block_cols
    return rows_per_split, cols_per_split


def _reduction_programs(plan: ViewPlan, cfg: KernelConfig) -> int:
    if plan.family == CHANNEL_MAJOR:
        return plan.channels * cfg.splits
    return _cdiv(plan.channels, cfg.block_cols) * cfg.split_rows


def launch_statistics(x: torch.Tensor, plan: ViewPlan, cfg: KernelConfig, acc: torch.dtype) -> torch.Tensor:
    """Shifted, scaled Welford partials of every (channel, split): returns partial [5, C, P] in ``acc``."""
    k = _kernels().stats
    rows_per_split, cols_per_split = _split_extents(plan, cfg)
    partial = torch.empty((5, plan.channels, cfg.splits), dtype=acc, device=x.device)
    programs = _reduction_programs(plan, cfg)
    if plan.family == CHANNEL_MAJOR:
        args = (x, partial, plan.channels, plan.outer, plan.inner, plan.outer_mid, plan.outer_lo, *plan.strides[0],
                rows_per_split, cols_per_split, cfg.split_rows, cfg.split_cols)
        _launch(k.channel_major_stats_kernel, "channel_major_stats", programs, cfg, args,
                BLOCK_O=cfg.block_rows, BLOCK_I=cfg.block_cols, INT64=plan.int64)
    else:
        args = (x, partial, plan.channels, plan.inner, plan.m, plan.outer_mid, plan.outer_lo, *plan.strides[0],
                rows_per_split, cfg.split_rows)
        _launch(k.channel_minor_stats_kernel, "channel_minor_stats", programs, cfg, args,
                BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, INT64=plan.int64)
    return partial


def launch_finalize_statistics(
    partial: torch.Tensor,
    gamma: torch.Tensor,
    beta: torch.Tensor,
    moving_mean: torch.Tensor,
    moving_var: torch.Tensor,
    settings: Settings,
    m: int,
    update_moving: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge partials: returns (mean [C], invstd [C], coef [6, C]); updates moving stats in place.

    coef[:2] is the mean as (pilot, shifted mean), which the backward reuses.
    """
    channels, partials = partial.shape[1], partial.shape[2]
    cfg = finalize_config(channels, partials)
    mean = torch.empty(channels, dtype=partial.dtype, device=partial.device)
    invstd = torch.empty_like(mean)
    coef = torch.empty((6, channels), dtype=partial.dtype, device=partial.device)
    args = (partial, gamma, beta, moving_mean, moving_var, mean, invstd, coef, channels, partials, m,
            *_f64_halves(settings.eps), *_f64_halves(settings.momentum))
    _launch(_kernels().stats.finalize_stats_kernel, "finalize_stats", _cdiv(channels, cfg.block_cols), cfg, args,
            FIX_GAMMA=settings.fix_gamma, UPDATE_MOVING=update_moving, UNBIASED=settings.unbiased_update,
            BLOCK_C=cfg.block_cols, BLOCK_P=cfg.block_rows)
    return mean, invstd, coef


def launch_elementwise(
    plan: ViewPlan,
    cfg: KernelConfig,
    out: torch.Tensor,
    *,
    x: torch.Tensor | None,
    dy: torch.Tensor | None,
    coef: torch.Tensor | None,
    moving: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    stats_out: tuple[torch.Tensor, torch.Tensor],
    settings: Settings,
) -> None:
    """out = ((x - mean) * invstd) * x_coef + dy * dy_coef + const per channel.

    ``plan.strides`` are those of (x, out) or (x, dy, out).  With ``moving`` (moving_mean,
    moving_var, gamma, beta) the coefficients come from the moving statistics and ``stats_out``
    (center [2, C], invstd [C]) is written by the kernel; otherwise they come from ``coef`` [6, C].
    """
    k = _kernels().elementwise
    center_out, invstd_out = stats_out
    x_strides = plan.strides[0]
    dy_strides = plan.strides[1] if dy is not None else x_strides
    out_strides = plan.strides[-1]
    from_moving = moving is not None
    moving_mean, moving_var, gamma, beta = moving if from_moving else (center_out,) * 4
    coef = center_out if coef is None else coef
    x_arg = x if x is not None else out
    dy_arg = dy if dy is not None else x_arg
    flags = dict(HAS_X=x is not None, HAS_DY=dy is not None, FROM_MOVING=from_moving,
                 FIX_GAMMA=settings.fix_gamma, INT64=plan.int64)
    common = (x_arg, dy_arg, out, coef, moving_mean, moving_var, gamma, beta, center_out, invstd_out)
    eps = _f64_halves(settings.eps)
    if plan.family == CHANNEL_MAJOR:
        tiles_o, tiles_i = _cdiv(plan.outer, cfg.block_rows), _cdiv(plan.inner, cfg.block_cols)
        args = (*common, plan.channels, plan.outer, plan.inner, *eps, plan.outer_mid, plan.outer_lo,
                *x_strides, *dy_strides, *out_strides, tiles_o, tiles_i)
        _launch(k.channel_major_elementwise_kernel, "channel_major_elementwise",
                plan.channels * tiles_o * tiles_i, cfg, args,
                BLOCK_O=cfg.block_rows, BLOCK_I=cfg.block_cols, **flags)
    else:
        c_blocks = _cdiv(plan.channels, cfg.block_cols)
        args = (*common, plan.channels, plan.inner, plan.m, *eps, plan.outer_mid, plan.outer_lo,
                *x_strides, *dy_strides, *out_strides, c_blocks, cfg.row_tiles)
        _launch(k.channel_minor_elementwise_kernel, "channel_minor_elementwise",
                _cdiv(plan.m, cfg.block_rows * cfg.row_tiles) * c_blocks, cfg, args,
                BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, **flags)


def launch_backward_reduce(
    x: torch.Tensor, dy: torch.Tensor, center: torch.Tensor, plan: ViewPlan, cfg: KernelConfig
) -> torch.Tensor:
    """Partial S = sum(dy) and D = sum((x - mean) * dy): returns partial [2, C, P].

    ``center`` [2, C] is the forward's mean as (pilot, shifted mean).
    """
    k = _kernels().backward
    rows_per_split, cols_per_split = _split_extents(plan, cfg)
    partial = torch.empty((2, plan.channels, cfg.splits), dtype=center.dtype, device=x.device)
    programs = _reduction_programs(plan, cfg)
    if plan.family == CHANNEL_MAJOR:
        args = (x, dy, center, partial, plan.channels, plan.outer, plan.inner, plan.outer_mid, plan.outer_lo,
                *plan.strides[0], *plan.strides[1],
                rows_per_split, cols_per_split, cfg.split_rows, cfg.split_cols)
        _launch(k.channel_major_backward_reduce_kernel, "channel_major_backward_reduce", programs, cfg, args,
                BLOCK_O=cfg.block_rows, BLOCK_I=cfg.block_cols, INT64=plan.int64)
    else:
        args = (x, dy, center, partial, plan.channels, plan.inner, plan.m, plan.outer_mid, plan.outer_lo,
                *plan.strides[0], *plan.strides[1],
                rows_per_split, cfg.split_rows)
        _launch(k.channel_minor_backward_reduce_kernel, "channel_minor_backward_reduce", programs, cfg, args,
                BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, INT64=plan.int64)
    return partial


def launch_finalize_backward(
    partial: torch.Tensor,
    center: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta_dtype: torch.dtype,
    settings: Settings,
    m: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sum S/D partials: returns (dgamma [C], dbeta [C], dx coef [6, C])."""
    channels, partials = partial.shape[1], partial.shape[2]
    cfg = finalize_config(channels, partials)
    dgamma = torch.empty(channels, dtype=gamma.dtype, device=gamma.device)
    dbeta = torch.empty(channels, dtype=beta_dtype, device=gamma.device)
    coef = torch.empty((6, channels), dtype=partial.dtype, device=partial.device)
    args = (partial, center, invstd, gamma, dgamma, dbeta, coef, channels, partials, m)
    _launch(_kernels().backward.finalize_backward_kernel, "finalize_backward", _cdiv(channels, cfg.block_cols),
            cfg, args, FIX_GAMMA=settings.fix_gamma, BATCH_STATS=settings.batch_stats,
            BLOCK_C=cfg.block_cols, BLOCK_P=cfg.block_rows)
    return dgamma, dbeta, coef


def launch_persistent_forward(
    x: torch.Tensor,
    y: torch.Tensor,
    plan: ViewPlan,
    cfg: KernelConfig,
    params: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
    settings: Settings,
    acc: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Training forward in one pass (a channel's slice fits a program): returns (mean, invstd,
    center [2, C]) and writes y; updates the moving statistics in place."""
    k = _kernels().persistent
    channels = plan.channels
    mean = torch.empty(channels, dtype=acc, device=x.device)
    invstd = torch.empty_like(mean)
    center = torch.empty((2, channels), dtype=acc, device=x.device)
    scalars = (*_f64_halves(settings.eps), *_f64_halves(settings.momentum), plan.outer_mid, plan.outer_lo)
    flags = dict(FIX_GAMMA=settings.fix_gamma, UPDATE_MOVING=True, UNBIASED=settings.unbiased_update,
                 INT64=plan.int64)
    common = (x, y, *params, mean, invstd, center)
    if plan.family == CHANNEL_MAJOR:
        args = (*common, channels, plan.outer, plan.inner, plan.m, *scalars, *plan.strides[0], *plan.strides[1])
        _launch(k.channel_major_persistent_forward_kernel, "channel_major_persistent_forward", channels, cfg,
                args, BLOCK_O=cfg.block_rows, BLOCK_I=cfg.block_cols, **flags)
    else:
        args = (*common, channels, plan.inner, plan.m, *scalars, *plan.strides[0], *plan.strides[1])
        _launch(k.channel_minor_persistent_forward_kernel, "channel_minor_persistent_forward",
                _cdiv(channels, cfg.block_cols), cfg, args, BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, **flags)
    return mean, invstd, center


def launch_persistent_backward(
    x: torch.Tensor,
    dy: torch.Tensor,
    dx: torch.Tensor,
    plan: ViewPlan,
    cfg: KernelConfig,
    center: torch.Tensor,
    invstd: torch.Tensor,
    gamma: torch.Tensor,
    beta_dtype: torch.dtype,
    settings: Settings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Backward in one pass (a channel's slice fits a program): writes dx, returns (dgamma, dbeta)."""
    k = _kernels().persistent
    channels = plan.channels
    dgamma = torch.empty(channels, dtype=gamma.dtype, device=x.device)
    dbeta = torch.empty(channels, dtype=beta_dtype, device=x.device)
    flags = dict(FIX_GAMMA=settings.fix_gamma, BATCH_STATS=settings.batch_stats, INT64=plan.int64)
    common = (x, dy, dx, center, invstd, gamma, dgamma, dbeta)
    strides = (*plan.strides[0], *plan.strides[1], *plan.strides[2])
    if plan.family == CHANNEL_MAJOR:
        args = (*common, channels, plan.outer, plan.inner, plan.m, plan.outer_mid, plan.outer_lo, *strides)
        _launch(k.channel_major_persistent_backward_kernel, "channel_major_persistent_backward", channels, cfg,
                args, BLOCK_O=cfg.block_rows, BLOCK_I=cfg.block_cols, **flags)
    else:
        args = (*common, channels, plan.inner, plan.m, plan.outer_mid, plan.outer_lo, *strides)
        _launch(k.channel_minor_persistent_backward_kernel, "channel_minor_persistent_backward",
                _cdiv(channels, cfg.block_cols), cfg, args, BLOCK_R=cfg.block_rows, BLOCK_C=cfg.block_cols, **flags)
    return dgamma, dbeta


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
        if index == torch.cuda.current_device():
            return method(self, data, *args, **kwargs)
        with torch.cuda.device(index):
            return method(self, data, *args, **kwargs)

    return guarded  # type: ignore[return-value]


@dataclass(frozen=True)
class TritonBackend:
    """Runs every phase as Triton kernels (on CUDA, or on CPU under TRITON_INTERPRET=1).

    ``forward`` returns (y, mean, invstd, center, x as the kernels read it) and updates the
    moving statistics; ``center`` [2, C] is the mean as (pilot, shifted mean) for the backward.
    """

    name: str = TRITON

    @on_data_device
    def forward(self, x, gamma, beta, moving_mean, moving_var, settings: Settings, out):
        # The kernels index parameters as ptr + c: strided views go through contiguous copies,
        # and the moving statistics are copied back after the update.
        moving = (moving_mean.contiguous(), moving_var.contiguous())
        if settings.batch_stats and not kernel_momentum(settings.momentum):
            result = self._forward_updating_on_host(x, gamma.contiguous(), beta.contiguous(), *moving, settings, out)
        else:
            result = self._forward(x, gamma.contiguous(), beta.contiguous(), *moving, settings, out)
        for target, updated in zip((moving_mean, moving_var), moving):
            if updated is not target:
                target.copy_(updated)
        return result

    def _forward_updating_on_host(self, x, gamma, beta, moving_mean, moving_var, settings: Settings, out):
        """Training forward with a momentum outside [0, 1]: the kernels write the batch statistics
        (an update with momentum 0 into float64 [2, C] scratch) and ``reference.moving_update``
        applies the momentum in float64, as the SPEC formula is evaluated (O(C) work)."""
        trace.record_note(HOST_MOVING_UPDATE)
        batch = torch.zeros((2, x.shape[settings.axis]), dtype=torch.float64, device=x.device)
        result = self._forward(x, gamma, beta, batch[0], batch[1], replace(settings, momentum=0.0), out)
        for moving, batch_value in zip((moving_mean, moving_var), batch):
            reference.moving_update(moving, batch_value, settings.momentum)
        return result

    def _forward(self, x, gamma, beta, moving_mean, moving_var, settings: Settings, out):
        acc = reference.stat_dtype(x.dtype)
        channels = x.shape[settings.axis]
        y = out if out is not None else empty_like_layout(x)
        x, y_kernel, plan = _plan_output(x, y, settings.axis)
        profile = device_profile(x.device)
        if plan.m == 0 or channels == 0:
            return self._empty_forward(x, y, gamma, beta, moving_mean, moving_var, settings)
        # The store keys decisions by op and dtype: training forward and inference differ.
        op, dtype = (FORWARD if settings.batch_stats else INFERENCE), x.dtype
        elementwise = elementwise_config(plan, profile, op=op, dtype=dtype)
        single_pass = (persistent_config(plan, FORWARD, profile, x.element_size(), dtype=dtype)
                       if settings.batch_stats else None)
        if single_pass is not None:
            mean, invstd, center = launch_persistent_forward(
                x, y_kernel, plan, single_pass, (gamma, beta, moving_mean, moving_var), settings, acc)
        elif settings.batch_stats:
            partial = launch_statistics(x, plan, reduce_config(plan, profile, op=op, dtype=dtype), acc)
            mean, invstd, coef = launch_finalize_statistics(
                partial, gamma, beta, moving_mean, moving_var, settings, plan.m, update_moving=True)
            launch_elementwise(plan, elementwise, y_kernel, x=x, dy=None, coef=coef,
                               stats_out=(coef[:2], invstd), settings=settings)
            center = coef[:2]
        else:
            center = torch.empty((2, channels), dtype=acc, device=x.device)
            invstd = torch.empty(channels, dtype=acc, device=x.device)
            launch_elementwise(plan, elementwise, y_kernel, x=x, dy=None, coef=None,
                               moving=(moving_mean, moving_var, gamma, beta),
                               stats_out=(center, invstd), settings=settings)
            mean = center[0]  # inference: the mean is the moving mean (shifted part 0)
        if y_kernel is not y:
            y.copy_(y_kernel)
        return y, mean, invstd, center, x

    @staticmethod
    def _empty_forward(x, y, gamma, beta, moving_mean, moving_var, settings: Settings):
        """No elements to normalise (inference on an empty batch): per-channel statistics only."""
        _, mean, invstd = reference.forward(x, gamma, beta, moving_mean, moving_var, axis=settings.axis,
                                            eps=settings.eps, momentum=settings.momentum,
                                            fix_gamma=settings.fix_gamma, batch_stats=False,
                                            update_moving=False, out=y)
        return y, mean, invstd, torch.stack([mean, torch.zeros_like(mean)]), x

    @on_data_device
    def backward(self, dy, x, gamma, center, invstd, settings: Settings, beta_dtype):
        """Returns (dx, dgamma, dbeta)."""
        gamma = gamma.contiguous()
        channels = x.shape[settings.axis]
        x, dy, dx, plan = _plan_backward(dy, x, settings.axis)
        if plan.m == 0 or channels == 0:
            dgamma = torch.zeros(channels, dtype=gamma.dtype, device=x.device)
            return dx, dgamma, torch.zeros(channels, dtype=beta_dtype, device=x.device)
        profile = device_profile(x.device)
        single_pass = persistent_config(plan, BACKWARD, profile, x.element_size(), dtype=x.dtype)
        if single_pass is not None:
            dgamma, dbeta = launch_persistent_backward(x, dy, dx, plan, single_pass, center, invstd, gamma,
                                                       beta_dtype, settings)
            return dx, dgamma, dbeta
        reduce = reduce_config(plan, profile, op=BACKWARD, dtype=x.dtype)
        partial = launch_backward_reduce(x, dy, center, plan, reduce)
        dgamma, dbeta, coef = launch_finalize_backward(partial, center, invstd, gamma, beta_dtype, settings, plan.m)
        launch_elementwise(plan, elementwise_config(plan, profile, op=BACKWARD, dtype=x.dtype), dx,
                           x=x if settings.batch_stats else None, dy=dy, coef=coef,
                           stats_out=(center, invstd), settings=settings)
        return dx, dgamma, dbeta

    # ------------------------------------------------------------------ SyncBatchNorm's parts

    @on_data_device
    def moments(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """[3, C] float64 (count, mean, M2) of this rank's batch (``reference.moments``): the
        statistics kernel's shifted Welford partials, merged over splits on the host (O(C x P))."""
        channels = x.shape[axis]
        x = _dense_if_unplannable(x, axis)
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
                  beta: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """y = (x - mean) * invstd * g + beta with given float64 statistics [C], in one elementwise
        launch: returns (y, x as read, center [2, C], invstd [C]) in the accumulation dtype."""
        acc = reference.stat_dtype(x.dtype)
        center, invstd_acc = center_pair(mean, acc), invstd.to(acc)
        y = empty_like_layout(x)
        x, y_kernel, plan = _plan_output(x, y, axis)
        if plan.m == 0 or plan.channels == 0:
            return y, x, center, invstd_acc
        zeros = torch.zeros_like(invstd_acc)
        coef = _coefficient_rows(center, invstd_acc, g, zeros, beta)
        settings = Settings(axis=axis, eps=0.0, momentum=0.0, fix_gamma=False, batch_stats=True,
                            unbiased_update=False)
        cfg = elementwise_config(plan, device_profile(x.device), op=FORWARD, dtype=x.dtype)
        launch_elementwise(plan, cfg, y_kernel, x=x, dy=None, coef=coef, stats_out=(center, invstd_acc),
                           settings=settings)
        if y_kernel is not y:
            y.copy_(y_kernel)
        return y, x, center, invstd_acc

    @on_data_device
    def gradient_sums(self, dy: torch.Tensor, x: torch.Tensor, center: torch.Tensor, axis: int) -> torch.Tensor:
        """[2, C] float64 (S, D) = (sum(dy), sum((x - mean) * dy)): the backward reduction kernel's
        partials summed on the host; ``center`` [2, C] is the mean as (pilot, shifted mean)."""
        x, dy, _, plan = _plan_backward(dy, x, axis, with_dx=False)
        if plan.m == 0 or plan.channels == 0:
            return torch.zeros((2, x.shape[axis]), dtype=torch.float64, device=x.device)
        cfg = reduce_config(plan, device_profile(x.device), op=BACKWARD, dtype=x.dtype)
        return launch_backward_reduce(x, dy, center, plan, cfg).double().sum(-1)

    @on_data_device
    def input_grad(self, dy: torch.Tensor, x: torch.Tensor, g: torch.Tensor, center: torch.Tensor,
                   invstd: torch.Tensor, settings: Settings, sums: torch.Tensor | None,
                   count: int | torch.Tensor) -> torch.Tensor:
        """dx of ``reference.input_grad`` in one elementwise launch: the coefficients [6, C] of
        ``finish_backward`` (kernels/common.py) from the given ``sums`` (S, D) over ``count``
        elements per channel, e.g. a process group's: an int, or a tensor ([C] or one element)
        on the data's device, which stays there (no host read)."""
        x, dy, dx, plan = _plan_backward(dy, x, settings.axis)
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
        launch_elementwise(plan, cfg, dx, x=x if sums is not None else None, dy=dy, coef=coef,
                           stats_out=(center, invstd), settings=settings)
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


def _plan_backward(dy: torch.Tensor, x: torch.Tensor, axis: int, with_dx: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, ViewPlan]:
    """(x, dy, dx, plan) the backward kernels use: dx (when ``with_dx``) allocated in x's layout;
    x copied only when it needs more than four groups (a caller that kept no dense copy), dy
    only when it does not share a plan with x."""
    def plan_of(x, dy):
        dx = empty_like_layout(x) if with_dx else None
        return dx, _plan_for([x, dy] + ([dx] if with_dx else []), axis)

    dx, plan = plan_of(x, dy)
    if plan is None and _plan_for([x], axis) is None:  # the forward saves its copy instead
        x = _dense_if_unplannable(x, axis)
        dx, plan = plan_of(x, dy)
    if plan is None:
        trace.record_copy("grad_out layout does not share a view plan with data")
        dy = empty_like_layout(x).copy_(dy)
        dx, plan = plan_of(x, dy)
    return x, dy, dx, plan


def _plan_output(x: torch.Tensor, y: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor, ViewPlan]:
    """The (x, y) pair the kernels use and its plan; copies only layouts with no 4-group view.

    Returns (x to read, y to write, plan); when y to write is not ``y`` the caller copies it back.
    """
    plan = _plan_for([x, y], axis)
    if plan is not None:
        return x, y, plan
    x = _dense_if_unplannable(x, axis)
    plan = _plan_for([x, y], axis)
    if plan is not None:
        return x, y, plan
    trace.record_copy("out layout does not share a view plan with data; writing through a temporary")
    y_dense = empty_like_layout(x)
    return x, y_dense, _plan_for([x, y_dense], axis)


def _dense_if_unplannable(x: torch.Tensor, axis: int) -> torch.Tensor:
    """``x``, or a dense copy in its dimension order when ``x`` needs more than four reduced
    groups (rank >= 6, step slices in four dimensions): the one full-size temporary tritonbn makes."""
    if _plan_for([x], axis) is not None:
        return x
    trace.record_copy(f"data layout needs more than {MAX_REDUCED_GROUPS} reduced groups; copied to a dense tensor")
    return empty_like_layout(x).copy_(x)


@dataclass(frozen=True)
class ReferenceBackend:
    """Plain torch (``reference.py``): CPU tensors when not interpreting Triton."""

    name: str = REFERENCE

    def forward(self, x, gamma, beta, moving_mean, moving_var, settings: Settings, out):
        y, mean64, invstd64 = reference.forward(
            x, gamma, beta, moving_mean, moving_var, axis=settings.axis, eps=settings.eps,
            momentum=settings.momentum, fix_gamma=settings.fix_gamma, batch_stats=settings.batch_stats,
            update_moving=settings.batch_stats, unbiased_update=settings.unbiased_update,
            out=out if out is not None else empty_like_layout(x), stats_dtype=torch.float64)
        acc = reference.stat_dtype(x.dtype)
        center = center_pair(mean64, acc)  # summed in float64 again by the backward
        return y, center[0], invstd64.to(acc), center, x

    def backward(self, dy, x, gamma, center, invstd, settings: Settings, beta_dtype):
        mean = center[0].double() + center[1].double()
        return reference.backward(dy, x, gamma, mean, invstd, axis=settings.axis, fix_gamma=settings.fix_gamma,
                                  batch_stats=settings.batch_stats, beta_dtype=beta_dtype)

    # ------------------------------------------------------------------ SyncBatchNorm's parts

    def moments(self, x: torch.Tensor, axis: int) -> torch.Tensor:
        """[3, C] float64 (count, mean, M2) of this rank's batch."""
        return reference.moments(x, axis)

    def normalize(self, x: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor, g: torch.Tensor,
                  beta: torch.Tensor, axis: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(y, x, center [2, C], invstd [C]) as ``TritonBackend.normalize``."""
        y = reference.normalize(x, mean, invstd, g, beta, axis=axis, out=empty_like_layout(x))
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


def backend_for(device: torch.device) -> TritonBackend | CpuBackend | ReferenceBackend:
    """Triton kernels on CUDA, and on CPU under TRITON_INTERPRET=1; on CPU otherwise torch's
    vectorised ops (``cpu_backend.CpuBackend``, trace name "reference" too); the float64
    reference on any other device."""
    if device.type == "cuda" or (device.type == "cpu" and interpreting()):
        return TritonBackend()
    if device.type == "cpu":
        return CpuBackend()
    return ReferenceBackend()


# ----------------------------------------------------------------------------- autograd


class BatchNormFunction(torch.autograd.Function):
    """Autograd binding shared by both backends; gradient flows to data, gamma and beta only."""

    @staticmethod
    def forward(ctx, x, gamma, beta, moving_mean, moving_var, settings, backend, out):
        y, mean, invstd, center, x_read = backend.forward(x, gamma, beta, moving_mean, moving_var, settings, out)
        ctx.mark_non_differentiable(mean, invstd)
        ctx.save_for_backward(x_read, gamma, center, invstd)
        ctx.settings = settings
        ctx.backend = backend
        ctx.beta_dtype = beta.dtype
        return y, mean, invstd

    @staticmethod
    def backward(ctx, grad_y, _grad_mean, _grad_invstd):
        x, gamma, center, invstd = ctx.saved_tensors
        trace.record_path(ctx.backend.name)
        dx, dgamma, dbeta = ctx.backend.backward(grad_y, x, gamma, center, invstd, ctx.settings, ctx.beta_dtype)
        needs = ctx.needs_input_grad
        return (dx if needs[0] else None, dgamma if needs[1] else None, dbeta if needs[2] else None,
                None, None, None, None, None)


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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MXNet's BatchNorm (SPEC.md) on torch tensors, as Triton kernels.

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
    Returns:
        out, or (out, mean, invstd) with ``output_mean_var``; mean/invstd are (C,) float32
        (float64 for float64 data).
    Raises:
        TypeError, ValueError: bad arguments (SPEC "Bad input"), before anything is modified.
    """
    del cudnn_off  # accepted for compatibility (SPEC)
    settings = validate(
        data, (gamma, beta, moving_mean, moving_var), eps=eps, momentum=momentum, fix_gamma=fix_gamma,
        use_global_stats=use_global_stats, axis=axis, out=out, training=training,
        unbiased_update=unbiased_update)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (data, gamma, beta))
    if out is not None and needs_grad:
        raise ValueError("out= does not support autograd; call without out= (or under torch.no_grad())")
    backend = backend_for(data.device)
    trace.record_path(backend.name)
    if out is not None:  # no autograd with out= (checked above): the result is ``out`` itself
        y, mean, invstd, _, _ = backend.forward(data, gamma, beta, moving_mean, moving_var, settings, out)
    else:
        y, mean, invstd = BatchNormFunction.apply(data, gamma, beta, moving_mean, moving_var, settings, backend, None)
    return (y, mean, invstd) if output_mean_var else y
