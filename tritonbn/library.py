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

Eager calls skip the custom op (``batch_norm_op``): the dispatcher round trip, its autograd node
and the functional form's clones and copies of the moving statistics cost ~60 µs of host time
and four [C] device kernels per call, more than the kernels of a small batch.  Outside any
tracing, ``batch_norm_op`` runs ``ops.apply_forward`` (what ``tritonbn.batch_norm`` runs):
the same backend calls with the same arguments, so the same kernels and bitwise the same y,
gradients and statistics, with the moving statistics updated in place by the kernels (and, for
the cumulative average, by one ``out=`` add per statistic).  Dynamo, torch.export,
``torch.jit.trace``, make_fx/AOTAutograd (fake, functional or proxy tracing) and ``torch.func``
transforms get the custom op, which they know how to trace, and so does a layout the kernels
cannot read in place (it is copied anyway).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from . import reference, trace
from .ops import wants_grad, apply_forward, apply_fused_forward, backend_for, op_entry
from .plan import MAX_REDUCED_GROUPS, empty_like_layout, layout_strides, plan_view
from .validation import Settings, validate, validate_fusion

__all__ = ["batch_norm_op", "batch_norm_forward", "batch_norm_backward", "cumulative_average"]


# ----------------------------------------------------------------------------- layouts


def _layout_strides(t: Tensor) -> tuple[int, ...]:
    """The strides ``plan.empty_like_layout(t)`` gives, without allocating."""
    return layout_strides(tuple(t.shape), t.stride())


def _in_layout(t: Tensor, like: Tensor) -> Tensor:
    """``t`` with ``empty_like_layout(like)``'s strides (what the fake impls promise)."""
    if t.numel() and t.stride() == _layout_strides(like):
        return t
    return empty_like_layout(like).copy_(t)


def _needs_copy(x: Tensor, axis: int) -> bool:
    """Whether the kernels cannot read ``x`` as one (outer, C, inner) view (more than four groups)."""
    if x.dim() <= MAX_REDUCED_GROUPS + 1 or not x.numel():
        return False  # at most four non-channel dimensions: always four groups or fewer
    return plan_view(x.shape, axis, [x.stride(), _layout_strides(x)]) is None


def _plannable(x: Tensor, axis: int) -> Tensor:
    """``x``, or a contiguous copy when the kernels cannot read it as one (outer, C, inner) view."""
    if _needs_copy(x, axis):
        trace.record_copy(f"data layout needs more than {MAX_REDUCED_GROUPS} reduced groups; copied to contiguous")
        return x.contiguous()
    return x


def _own(t: Tensor, *others: Optional[Tensor]) -> Tensor:
    """``t``, cloned if it shares storage with any of ``others`` (custom op outputs may not alias)."""
    ptr = t.untyped_storage().data_ptr()
    if any(o is not None and o.untyped_storage().data_ptr() == ptr for o in others):
        return t.clone()
    return t


# ----------------------------------------------------------------------------- cumulative average


def _average_weights(count: Tensor) -> tuple[Tensor, Tensor]:
    """(momentum, 1 - momentum) of torch's cumulative average, ``momentum = 1 - 1 / count``:
    float64 tensors on the count's device (the count is never read on the host)."""
    # torch evaluates ``1.0 / t`` as ``t.reciprocal() * 1.0``: the same bits, one op more
    momentum = 1.0 - count.double().reciprocal()
    return momentum, 1.0 - momentum


def cumulative_average(moving: Tensor, batch: Tensor, count: Tensor) -> Tensor:
    """``moving * (1 - 1 / count) + batch / count`` in float64, as a new tensor in ``moving``'s
    dtype: torch's cumulative moving average (``momentum=None``) with the count left on its device.

    The same float64 arithmetic as ``reference.moving_update`` with momentum ``1 - 1 / count``.

    Args:
        moving: [C] running statistic (any float dtype); not modified.
        batch: [C] batch statistic.
        count: one-element integer tensor (``num_batches_tracked``, already incremented).
    """
    momentum, weight = _average_weights(count)
    return (moving.double() * momentum + batch.double() * weight).to(moving.dtype)


def _average_in_place(moving: Tensor, batch: Tensor, weights: tuple[Tensor, Tensor]) -> None:
    """``moving = cumulative_average(moving, batch, count)`` in place, bitwise the same: the
    float64 sum is rounded once into ``moving``'s dtype by the ``out=`` add (no copy, no clone)."""
    momentum, weight = weights
    torch.add(moving.double() * momentum, batch.double() * weight, out=moving)


def _backend_forward(backend, x: Tensor, gamma: Tensor, beta: Tensor, moving_mean: Tensor, moving_var: Tensor,
                     settings: Settings, addend: Optional[Tensor], keep_mask: bool) -> tuple:
    """(y, mean, invstd, center, x read, mask or None): the backend's plain or fused forward."""
    if not (settings.relu or settings.addend):
        return (*backend.forward(x, gamma, beta, moving_mean, moving_var, settings, None), None)
    return backend.fused_forward(x, gamma, beta, moving_mean, moving_var, settings, None, addend, keep_mask=keep_mask)


def _forward_averaging(backend, x: Tensor, gamma: Tensor, beta: Tensor, moving_mean: Tensor, moving_var: Tensor,
                       settings: Settings, average_count: Tensor, addend: Optional[Tensor], keep_mask: bool
                       ) -> tuple[tuple, Tensor, Tensor]:
    """Training forward with torch's cumulative average: (``_backend_forward``'s result, new mean,
    new var).

    The kernels run with momentum 0 into float64 [2, C] scratch, which then holds the batch
    mean and the (unbiased when asked) batch variance, as ``TritonBackend`` does for a momentum
    outside [0, 1]; the average itself is two [C] device ops.
    """
    batch = torch.zeros((2, x.shape[settings.axis]), dtype=torch.float64, device=x.device)
    result = _backend_forward(backend, x, gamma, beta, batch[0], batch[1], settings._replace(momentum=0.0), addend,
                              keep_mask)
    new_mean, new_var = (cumulative_average(moving, value, average_count)
                         for moving, value in zip((moving_mean, moving_var), batch))
    return result, new_mean, new_var


# ----------------------------------------------------------------------------- forward


def _fused_settings(settings: Settings, relu: bool, addend: Optional[Tensor]) -> Settings:
    return settings._replace(relu=relu, addend=addend is not None) if relu or addend is not None else settings


def _rows(center: Tensor, rows: int) -> Tensor:
    """``center``'s first ``rows`` rows; zero rows appended where it has fewer (an empty batch's
    [2, C] under a fused ReLU, whose backward reads nothing)."""
    if center.shape[0] >= rows:
        return center[:rows]
    return torch.cat([center, center.new_zeros((rows - center.shape[0], center.shape[1]))])


def _no_mask(x: Tensor) -> Tensor:
    """The mask output where there is none (custom ops return tensors): an empty uint8 tensor."""
    return x.new_empty(0, dtype=torch.uint8)


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
    addend: Optional[Tensor] = None,
    relu: bool = False,
    keep_mask: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """SPEC.md forward on validated arguments, fused with ``addend`` and a ReLU when given
    (``relu(bn(x) [+ addend])``).

    Returns (y, mean, invstd, center, new_moving_mean, new_moving_var, mask); the inputs are not
    modified.  center is [2, C] ([6, C] under a fused ReLU on the Triton path: the backward
    recomputes the ReLU's decisions from it); mask holds the decisions where the backend keeps
    them (``keep_mask``: a backward follows) and is empty otherwise.  moving_mean/moving_var may
    be None only with ``batch_stats`` (nothing is tracked then; the last two statistics are scratch).
    """
    if moving_mean is None or moving_var is None:
        if not batch_stats:
            raise ValueError("moving_mean and moving_var are required unless batch statistics are used")
        moving_mean, moving_var = torch.zeros_like(gamma), torch.ones_like(gamma)
    settings = _fused_settings(Settings(axis=axis, eps=eps, momentum=momentum, fix_gamma=fix_gamma,
                                        batch_stats=batch_stats, unbiased_update=unbiased_update), relu, addend)
    backend = backend_for(x.device)
    trace.record_path(backend.name)
    x_read = _plannable(x, axis)
    with torch.autocast(x.device.type, enabled=False):
        if average_count is not None and batch_stats:
            (y, mean, invstd, center, _, mask), new_mean, new_var = _forward_averaging(
                backend, x_read, gamma, beta, moving_mean, moving_var, settings, average_count, addend, keep_mask)
        else:
            new_mean, new_var = moving_mean.clone(), moving_var.clone()
            y, mean, invstd, center, _, mask = _backend_forward(backend, x_read, gamma, beta, new_mean, new_var,
                                                                settings, addend, keep_mask)
    y = _in_layout(y, x)
    inputs = (x, gamma, beta, moving_mean, moving_var, new_mean, new_var, addend)
    # the split path's center is its coefficient rows [6, C]: the plain backward reads two
    rows = backend.fused_state_like(x_read, settings, addend)[0] if relu or addend is not None else 2
    center = _own(_rows(center, rows), *inputs)
    if rows == 6:
        center[4].zero_()  # unread (the backward's dy coefficient): no uninitialised values in an output
    mean = _own(mean, *inputs, center)
    invstd = _own(invstd, *inputs, center, mean)
    return y, mean, invstd, center, new_mean, new_var, mask if keep_mask and mask is not None else _no_mask(x)


@batch_norm_forward.register_fake
def _batch_norm_forward_fake(x, gamma, beta, moving_mean, moving_var, average_count, axis, eps, momentum,
                             fix_gamma, batch_stats, unbiased_update, addend=None, relu=False, keep_mask=False):
    channels = x.shape[axis]
    stat = reference.stat_dtype(x.dtype)
    moving = moving_mean if moving_mean is not None else gamma
    rows, mask = 2, None
    if relu or addend is not None:
        settings = Settings(axis, eps, momentum, fix_gamma, batch_stats, unbiased_update, relu, addend is not None)
        x_read = x.contiguous() if _needs_copy(x, axis) else x  # what the op's _plannable reads
        rows, mask = backend_for(x.device).fused_state_like(x_read, settings, addend)
        mask = mask if keep_mask else None
    return (empty_like_layout(x), x.new_empty(channels, dtype=stat), x.new_empty(channels, dtype=stat),
            x.new_empty((rows, channels), dtype=stat), moving.new_empty(channels), moving.new_empty(channels),
            _no_mask(x) if mask is None else mask)


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
    mask: Optional[Tensor] = None,
    relu: bool = False,
    addend: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """SPEC.md backward: returns (dx, dgamma, dbeta, daddend), dgamma and dbeta in gamma's dtype.

    Under a fused ReLU (``relu``) dy counts where the forward's output was positive: from the
    forward's ``mask`` where it kept one (non-empty), else recomputed from x and center [6, C].
    daddend (the gradient of a fused addend: dy where the ReLU passed it) is written with
    ``relu`` and ``addend``, and is empty otherwise (an addend without a ReLU gets dy itself).
    """
    settings = Settings(axis=axis, eps=0.0, momentum=0.0, fix_gamma=fix_gamma, batch_stats=batch_stats,
                        unbiased_update=False, relu=relu, addend=addend)
    backend = backend_for(x.device)
    trace.record_path(backend.name)
    x_read = _plannable(x, axis)
    with torch.autocast(x.device.type, enabled=False):
        if relu:
            dx, dgamma, dbeta, daddend = backend.fused_backward(
                dy, x_read, gamma, center, invstd, settings, gamma.dtype,
                mask if mask is not None and mask.numel() else None)
        else:
            (dx, dgamma, dbeta), daddend = backend.backward(dy, x_read, gamma, center, invstd, settings,
                                                            gamma.dtype), None
    inputs = (dy, x, gamma, center, invstd, mask)
    dx = _own(_in_layout(dx, x), *inputs)
    dgamma = _own(dgamma, *inputs, dx)
    dbeta = _own(dbeta, *inputs, dx, dgamma)
    if not (relu and addend) or daddend is None:
        return dx, dgamma, dbeta, x.new_empty(0)
    return dx, dgamma, dbeta, _own(_in_layout(daddend, x), *inputs, dx, dgamma, dbeta)


@batch_norm_backward.register_fake
def _batch_norm_backward_fake(dy, x, gamma, center, invstd, axis, fix_gamma, batch_stats, mask=None, relu=False,
                              addend=False):
    channels = x.shape[axis]
    daddend = empty_like_layout(x) if relu and addend else x.new_empty(0)
    return empty_like_layout(x), gamma.new_empty(channels), gamma.new_empty(channels), daddend


# ----------------------------------------------------------------------------- autograd


def _setup_context(ctx, inputs, output) -> None:
    (x, gamma, beta, _mm, _mv, _count, axis, _eps, _momentum, fix_gamma, batch_stats, _unbiased, addend, relu,
     _keep_mask) = inputs
    _y, mean, invstd, center, new_mean, new_var, mask = output
    ctx.mark_non_differentiable(mean, invstd, center, new_mean, new_var, mask)
    ctx.save_for_backward(x, gamma, center, invstd, mask)
    ctx.config = (axis, fix_gamma, batch_stats)
    ctx.fusion = (relu, addend is not None)
    ctx.beta_dtype = beta.dtype


def _backward(ctx, grad_y, *_grad_stats):
    x, gamma, center, invstd, mask = ctx.saved_tensors
    relu, has_addend = ctx.fusion
    dx, dgamma, dbeta, daddend = batch_norm_backward(grad_y, x, gamma, center, invstd, *ctx.config, mask, relu,
                                                     has_addend)
    needs = ctx.needs_input_grad
    if has_addend and needs[12]:
        daddend = daddend if relu else grad_y  # relu(bn + addend) gates it; bn + addend passes dy
    else:
        daddend = None
    return (dx if needs[0] else None, dgamma if needs[1] else None,
            dbeta.to(ctx.beta_dtype) if needs[2] else None) + (None,) * 9 + (daddend, None, None)


torch.library.register_autograd("tritonbn::batch_norm_forward", _backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- eager path

# The dispatch modes through which make_fx / AOTAutograd trace: they see aten ops only, not the
# kernels' writes, so a call under them must go through the custom op.
_TRACING_MODES = tuple(getattr(torch._C._TorchDispatchModeKey, k) for k in ("FAKE", "PROXY", "FUNCTIONAL"))
_PLAIN_TENSORS = (Tensor, torch.nn.Parameter)


def _runs_eagerly(x: Tensor, axis: int) -> bool:
    """Whether a call on ``x`` may skip the custom op: nothing traces it (Dynamo/export,
    ``torch.jit.trace``, make_fx's fake/proxy/functional modes, ``torch.func`` transforms,
    tensor subclasses) and the kernels read ``x`` in place (the rare layout that needs a copy
    keeps the custom op's copy-and-relayout, so both paths stay bitwise equal there too)."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or type(x) not in _PLAIN_TENSORS:
        return False
    if torch._C._are_functorch_transforms_active():
        return False
    if torch._C._len_torch_dispatch_stack():  # (counts the infra modes too: none, nothing to look for)
        for key in _TRACING_MODES:
            if torch._C._get_dispatch_mode(key) is not None:
                return False
    return not _needs_copy(x, axis)


@dataclass(frozen=True)
class _AutocastOff:
    """``backend`` with autocast switched off in its forward and backward, as inside the custom
    ops: autocast would recast the backend's own torch ops (float64 [C] math, CPU matmuls)."""

    backend: Any

    def __getattr__(self, name: str) -> Any:
        if name == "backend":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.backend, name)

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(x.device.type, enabled=False):
            return self.backend.forward(x, *args, **kwargs)

    def backward(self, dy: Tensor, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(x.device.type, enabled=False):
            return self.backend.backward(dy, x, *args, **kwargs)

    def fused_forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Any:
        with torch.autocast(x.device.type, enabled=False):
            return self.backend.fused_forward(x, *args, **kwargs)

    def fused_backward(self, dy: Tensor, x: Tensor, *args: Any) -> Any:
        with torch.autocast(x.device.type, enabled=False):
            return self.backend.fused_backward(dy, x, *args)


def _apply(x: Tensor, gamma: Tensor, beta: Tensor, moving_mean: Tensor, moving_var: Tensor, settings: Settings,
           backend: Any, addend: Optional[Tensor], keep_stats: bool) -> tuple[Tensor, Tensor, Tensor]:
    """``ops.apply_forward`` or, fused (``settings.relu`` / ``settings.addend``), ``ops.apply_fused_forward``."""
    if settings.relu or settings.addend:
        return apply_fused_forward(x, gamma, beta, addend, moving_mean, moving_var, settings, backend,
                                   keep_stats=keep_stats)
    return apply_forward(x, gamma, beta, moving_mean, moving_var, settings, backend, keep_stats)


_device_types: dict[torch.device, str] = {}


def _device_type(device: torch.device) -> str:
    """``device.type``, looked up (it builds a new string each time, about 1 µs)."""
    kind = _device_types.get(device)
    if kind is None:
        kind = _device_types[device] = device.type
    return kind


def _eager_forward(x: Tensor, gamma: Tensor, beta: Tensor, moving_mean: Optional[Tensor],
                   moving_var: Optional[Tensor], settings: Settings,
                   average_count: Optional[Tensor], addend: Optional[Tensor], keep_stats: bool, backend: Any,
                   call: Any) -> tuple[Tensor, Tensor, Tensor]:
    """``batch_norm_forward`` and the buffer update without the custom op: (y, mean, invstd);
    with ``keep_stats`` False mean and invstd may be None.  ``backend`` and ``call`` come from the
    call's ``ops.OpEntry`` (``call``: None unless its plan is of exactly this unfused call).

    The backend calls ``batch_norm_forward`` makes, through ``ops.apply_forward`` or
    ``ops.apply_fused_forward`` (autograd when a gradient is wanted), but with the moving
    statistics themselves as the kernels' targets (no clones, no copies back).  The cumulative
    average keeps its float64 [2, C] scratch and device-side count.
    """
    trace.record_path(backend.name)
    if torch.is_autocast_enabled(_device_type(x.device)):
        backend = _AutocastOff(backend)
    if moving_mean is None or moving_var is None:  # untracked: the kernels update throw-away scratch
        if not settings.batch_stats:
            raise ValueError("moving_mean and moving_var are required unless batch statistics are used")
        moving_mean, moving_var, average_count = torch.zeros_like(gamma), torch.ones_like(gamma), None
    if average_count is None or not settings.batch_stats:
        if call is not None:
            return apply_forward(x, gamma, beta, moving_mean, moving_var, settings, backend, keep_stats, call)
        return _apply(x, gamma, beta, moving_mean, moving_var, settings, backend, addend, keep_stats)
    # Cumulative average: the kernels leave the batch statistics in the scratch (momentum 0).
    batch = torch.zeros((2, x.shape[settings.axis]), dtype=torch.float64, device=x.device)
    y, mean, invstd = _apply(x, gamma, beta, batch[0], batch[1], settings._replace(momentum=0.0), backend, addend,
                             keep_stats)
    with torch.no_grad():
        weights = _average_weights(average_count)
        _average_in_place(moving_mean, batch[0], weights)
        _average_in_place(moving_var, batch[1], weights)
    return y, mean, invstd


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
    relu: bool = False,
    addend: Optional[Tensor] = None,
    keep_stats: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """Validate (SPEC "Bad input") and run the forward: (y, mean, invstd), y = bn(x), or
    ``relu(bn(x) [+ addend])`` fused; the moving statistics are updated in place when ``batch_stats``.

    Eagerly through ``ops.apply_forward``; while traced (``torch.compile``, export, ...)
    through ``tritonbn::batch_norm_forward`` and a copy into the buffers.  Bitwise the same.

    Args:
        x: data (..., C, ...), any layout; C = x.shape[axis].
        gamma, beta: [C] scale and shift (gamma ignored with ``fix_gamma``).
        moving_mean, moving_var: [C] running statistics, or both None when ``batch_stats``
            (nothing is tracked).
        axis: the channel axis (negative allowed).
        eps: added to the variance.
        momentum: tritonbn's (``moving = moving * momentum + batch * (1 - momentum)``); with
            ``average_count`` it is ignored for torch's cumulative average by ``average_count``
            (computed on the device).
        fix_gamma: gamma read as ones.
        batch_stats: normalise with (and track) the batch statistics.
        unbiased_update: update moving_var with the unbiased batch variance.
        average_count: one-element integer tensor (``num_batches_tracked``) or None.
        relu: a ReLU fused after the normalisation (and the addend).
        addend: x's shape and dtype, added to bn(x) before the ReLU; gradient flows to it.
        keep_stats: False when the caller reads only y: eager calls then may return None for
            mean and invstd (and need not allocate them).
    Returns:
        y (x's layout), mean [C] and invstd [C] in the accumulation dtype.
    """
    tracked = (moving_mean, moving_var) if moving_mean is not None and moving_var is not None else (gamma, gamma)
    unbiased_update = unbiased_update and moving_mean is not None
    # While Dynamo traces, eps and momentum may be symbolic floats (dynamic=True), which the
    # finiteness check cannot read: the trace checks only the sign of eps (eager checks all).
    tracing = torch.compiler.is_compiling()
    if tracing and eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    fused = relu or addend is not None
    backend = call = None
    if tracing or fused:  # (op entries are of unfused eager calls, as in ops.batch_norm)
        settings = validate(x, (gamma, beta, *tracked), eps=1.0 if tracing else eps,
                            momentum=0.5 if tracing else momentum, fix_gamma=fix_gamma,
                            use_global_stats=not batch_stats, axis=axis, out=None, training=True,
                            unbiased_update=unbiased_update)
    else:
        settings, backend, call = op_entry(x, (gamma, beta, *tracked), eps, momentum, fix_gamma, not batch_stats, axis,
                                           None, True, unbiased_update)
    if fused:
        settings = validate_fusion(settings, x, "relu" if relu else None, addend, None)
    if not tracing:
        if _runs_eagerly(x, settings.axis):
            # the entry's plan is of a call on these very moving statistics
            direct = moving_mean is not None and moving_var is not None and average_count is None
            return _eager_forward(x, gamma, beta, moving_mean, moving_var, settings, average_count, addend,
                                  keep_stats, backend if backend is not None else backend_for(x.device),
                                  call if direct else None)
        eps, momentum = settings.eps, settings.momentum
    fused = {} if not (relu or addend is not None) else dict(
        addend=addend, relu=relu, keep_mask=wants_grad(x, gamma, beta, addend))
    y, mean, invstd, _, new_mean, new_var, _ = batch_norm_forward(
        x, gamma, beta, moving_mean, moving_var, average_count, settings.axis, eps,
        momentum, settings.fix_gamma, settings.batch_stats, settings.unbiased_update, **fused)
    if settings.batch_stats and moving_mean is not None and moving_var is not None:
        with torch.no_grad():
            moving_mean.copy_(new_mean)
            moving_var.copy_(new_var)
    return y, mean, invstd
