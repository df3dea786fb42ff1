"""The operator registered with ``torch.library``: what ``torch.compile`` sees.

Two custom ops wrap the backends of ``ops.py`` (Triton kernels on CUDA and on CPU under
TRITON_INTERPRET=1, the plain-torch reference otherwise):

    tritonbn::batch_norm_forward(x, gamma, beta, moving_mean, moving_var, average_count,
                                 axis, eps, momentum, fix_gamma, batch_stats, unbiased_update)
        -> (y, mean, invstd, center, new_moving_mean, new_moving_var)
    tritonbn::batch_norm_backward(dy, x, gamma, center, invstd, axis, fix_gamma, batch_stats)
        -> (dx, dgamma, dbeta)

Both are functional: torch accepts ``register_autograd`` only for ops that mutate nothing, so
the forward returns the updated moving statistics and ``batch_norm_op`` copies them into the
buffers after the op (``moving.copy_(new)``, two [C] copies, which compiled graphs keep as the
buffer mutation they are).  Each has a fake (meta) implementation, so Dynamo and AOTAutograd
trace them without running them (``y``/``dx`` get ``plan.empty_like_layout(x)``'s strides,
which the real ones match), and ``register_autograd`` ties them together.  The ops are opaque
to Inductor: the kernels inside are the ones eager runs.  Argument checking
(``validation.validate``) runs in ``batch_norm_op`` before the op, in eager and while Dynamo
traces.

``average_count`` (a one-element integer tensor, e.g. torch's ``num_batches_tracked``) selects
torch's cumulative moving average, ``moving += (batch - moving) / average_count``: the kernels
write the batch statistics into float64 scratch (an update with momentum 0) and [C] torch ops on
the count's device average them in (``cumulative_average``).  The count is never read on the
host: no stream stall per step, CUDA-graph capture works, and ``momentum=None`` modules compile
without a data-dependent graph break.

Autocast: none is registered, as torch registers none for ``aten::batch_norm`` on CPU and CUDA:
the op runs in the data's dtype with float32 parameters (autocast is switched off inside it).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from . import reference, trace
from .ops import backend_for
from .plan import MAX_REDUCED_GROUPS, empty_like_layout, plan_view
from .validation import Settings, validate

__all__ = ["batch_norm_op", "batch_norm_forward", "batch_norm_backward", "cumulative_average"]


def _in_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with ``empty_like_layout(like)``'s strides (what the fake impls promise)."""
    target = empty_like_layout(like)
    if t.stride() == target.stride():
        return t
    return target.copy_(t)


def _plannable(x: Tensor, axis: int) -> Tensor:
    """``x``, or a contiguous copy when the kernels cannot read it as one (outer, C, inner) view."""
    if x.numel() and plan_view(x.shape, axis, [x.stride(), empty_like_layout(x).stride()]) is None:
        trace.record_copy(f"data layout needs more than {MAX_REDUCED_GROUPS} reduced groups; copied to contiguous")
        return x.contiguous()
    return x


def _own(t: Tensor, *others: Optional[Tensor]) -> Tensor:
    """``t``, cloned if it shares storage with any of ``others`` (custom op outputs may not alias)."""
    ptr = t.untyped_storage().data_ptr()
    if any(o is not None and o.untyped_storage().data_ptr() == ptr for o in others):
        return t.clone()
    return t


def cumulative_average(moving: Tensor, batch: Tensor, count: Tensor) -> Tensor:
    """``moving * (1 - 1 / count) + batch / count`` in float64, as a new tensor in ``moving``'s
    dtype: torch's cumulative moving average (``momentum=None``) with the count left on its device.

    The same float64 arithmetic as ``reference.moving_update`` with momentum ``1 - 1 / count``.
    """
    momentum = 1.0 - 1.0 / count.double()
    return (moving.double() * momentum + batch.double() * (1.0 - momentum)).to(moving.dtype)


def _forward_averaging(backend, x: Tensor, gamma: Tensor, beta: Tensor, moving_mean: Tensor, moving_var: Tensor,
                       settings: Settings, average_count: Tensor) -> tuple[tuple, Tensor, Tensor]:
    """Training forward with torch's cumulative average: (forward result, new mean, new var).

    The kernels run with momentum 0 into float64 [2, C] scratch, which then holds the batch
    mean and the (unbiased when asked) batch variance, as ``TritonBackend`` does for a momentum
    outside [0, 1]; the average itself is two [C] device ops.
    """
    batch = torch.zeros((2, x.shape[settings.axis]), dtype=torch.float64, device=x.device)
    result = backend.forward(x, gamma, beta, batch[0], batch[1], replace(settings, momentum=0.0), None)
    new_mean, new_var = (cumulative_average(moving, value, average_count)
                         for moving, value in zip((moving_mean, moving_var), batch))
    return result, new_mean, new_var


# ----------------------------------------------------------------------------- forward


@torch.library.custom_op("tritonbn::batch_norm_forward", mutates_args=())
def batch_norm_forward(
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    moving_mean: Optional[Tensor],
    moving_var: Optional[Tensor],
    average_count: Optional[Tensor],
    axis: int,
    eps: float,
    momentum: float,
    fix_gamma: bool,
    batch_stats: bool,
    unbiased_update: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SPEC.md forward on validated arguments.

    Returns (y, mean, invstd, center [2, C], new_moving_mean, new_moving_var); the inputs are not
    modified.  moving_mean/moving_var may be None only with ``batch_stats`` (nothing is tracked
    then; the last two outputs are scratch).
    """
    if moving_mean is None or moving_var is None:
        if not batch_stats:
            raise ValueError("moving_mean and moving_var are required unless batch statistics are used")
        moving_mean, moving_var = torch.zeros_like(gamma), torch.ones_like(gamma)
    settings = Settings(axis=axis, eps=eps, momentum=momentum, fix_gamma=fix_gamma,
                        batch_stats=batch_stats, unbiased_update=unbiased_update)
    backend = backend_for(x.device)
    trace.record_path(backend.name)
    with torch.autocast(x.device.type, enabled=False):
        if average_count is not None and batch_stats:
            (y, mean, invstd, center, _), new_mean, new_var = _forward_averaging(
                backend, _plannable(x, axis), gamma, beta, moving_mean, moving_var, settings, average_count)
        else:
            new_mean, new_var = moving_mean.clone(), moving_var.clone()
            y, mean, invstd, center, _ = backend.forward(
                _plannable(x, axis), gamma, beta, new_mean, new_var, settings, None)
    y = _in_layout(y, x)
    inputs = (x, gamma, beta, moving_mean, moving_var, new_mean, new_var)
    center = _own(center, *inputs)
    mean = _own(mean, *inputs, center)
    invstd = _own(invstd, *inputs, center, mean)
    return y, mean, invstd, center, new_mean, new_var


@batch_norm_forward.register_fake
def _batch_norm_forward_fake(x, gamma, beta, moving_mean, moving_var, average_count, axis, eps, momentum,
                             fix_gamma, batch_stats, unbiased_update):
    channels = x.shape[axis]
    stat = reference.stat_dtype(x.dtype)
    moving = moving_mean if moving_mean is not None else gamma
    return (empty_like_layout(x), x.new_empty(channels, dtype=stat), x.new_empty(channels, dtype=stat),
            x.new_empty((2, channels), dtype=stat), moving.new_empty(channels), moving.new_empty(channels))


# ----------------------------------------------------------------------------- backward


@torch.library.custom_op("tritonbn::batch_norm_backward", mutates_args=())
def batch_norm_backward(
    dy: Tensor,
    x: Tensor,
    gamma: Tensor,
    center: Tensor,
    invstd: Tensor,
    axis: int,
    fix_gamma: bool,
    batch_stats: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """SPEC.md backward: returns (dx, dgamma, dbeta), dgamma and dbeta in gamma's dtype."""
    settings = Settings(axis=axis, eps=0.0, momentum=0.0, fix_gamma=fix_gamma, batch_stats=batch_stats,
                        unbiased_update=False)
    backend = backend_for(x.device)
    trace.record_path(backend.name)
    with torch.autocast(x.device.type, enabled=False):
        dx, dgamma, dbeta = backend.backward(dy, _plannable(x, axis), gamma, center, invstd, settings, gamma.dtype)
    inputs = (dy, x, gamma, center, invstd)
    dx = _own(_in_layout(dx, x), *inputs)
    dgamma = _own(dgamma, *inputs, dx)
    dbeta = _own(dbeta, *inputs, dx, dgamma)
    return dx, dgamma, dbeta


@batch_norm_backward.register_fake
def _batch_norm_backward_fake(dy, x, gamma, center, invstd, axis, fix_gamma, batch_stats):
    channels = x.shape[axis]
    return (empty_like_layout(x), gamma.new_empty(channels), gamma.new_empty(channels))


# ----------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output) -> None:
    x, gamma, beta, _mm, _mv, _count, axis, _eps, _momentum, fix_gamma, batch_stats, _unbiased = inputs
    _y, mean, invstd, center, new_mean, new_var = output
    ctx.mark_non_differentiable(mean, invstd, center, new_mean, new_var)
    ctx.save_for_backward(x, gamma, center, invstd)
    ctx.config = (axis, fix_gamma, batch_stats)
    ctx.beta_dtype = beta.dtype


def _backward(ctx, grad_y, *_grad_stats):
    x, gamma, center, invstd = ctx.saved_tensors
    dx, dgamma, dbeta = batch_norm_backward(grad_y, x, gamma, center, invstd, *ctx.config)
    needs = ctx.needs_input_grad
    return (dx if needs[0] else None, dgamma if needs[1] else None,
            dbeta.to(ctx.beta_dtype) if needs[2] else None) + (None,) * 9


torch.library.register_autograd("tritonbn::batch_norm_forward", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- entry point


def batch_norm_op(
    x: Tensor,
    gamma: Tensor,
    beta: Tensor,
    moving_mean: Optional[Tensor],
    moving_var: Optional[Tensor],
    *,
    axis: int = 1,
    eps: float,
    momentum: float,
    fix_gamma: bool,
    batch_stats: bool,
    unbiased_update: bool = False,
    average_count: Optional[Tensor] = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate (SPEC "Bad input") and run ``tritonbn::batch_norm_forward``: (y, mean, invstd).

    ``momentum`` is tritonbn's (``moving = moving * momentum + batch * (1 - momentum)``);
    with ``average_count`` it is ignored for torch's cumulative average by ``average_count``
    (computed on the device).
    moving_mean/moving_var may be None when ``batch_stats`` (nothing is tracked).
    """
    tracked = (moving_mean, moving_var) if moving_mean is not None and moving_var is not None else (gamma, gamma)
    # While Dynamo traces, eps and momentum may be symbolic floats (dynamic=True), which the
    # finiteness check cannot read: the trace checks only the sign of eps (eager checks all).
    tracing = torch.compiler.is_compiling()
    if tracing and eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    settings = validate(x, (gamma, beta, *tracked), eps=1.0 if tracing else eps,
                        momentum=0.5 if tracing else momentum, fix_gamma=fix_gamma,
                        use_global_stats=not batch_stats, axis=axis, out=None, training=True,
                        unbiased_update=unbiased_update and moving_mean is not None)
    if not tracing:
        eps, momentum = settings.eps, settings.momentum
    y, mean, invstd, _, new_mean, new_var = batch_norm_forward(
        x, gamma, beta, moving_mean, moving_var, average_count, settings.axis, eps,
        momentum, settings.fix_gamma, settings.batch_stats, settings.unbiased_update)
    if settings.batch_stats and moving_mean is not None and moving_var is not None:
        with torch.no_grad():
            moving_mean.copy_(new_mean)
            moving_var.copy_(new_var)
    return y, mean, invstd
