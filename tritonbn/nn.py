"""torch.nn layers on the tritonbn operator.

- ``BatchNorm1d``/``BatchNorm2d``/``BatchNorm3d``: drop-in replacements of torch's (same
  constructor, parameters, buffers, state_dict keys and semantics: torch's momentum convention,
  ``momentum=None`` as a cumulative average, unbiased running variance, ``affine``/``bias``/
  ``track_running_stats``, train/eval).  Each subclasses torch's class of the same name, so
  ``isinstance(m, torch.nn.BatchNorm2d)`` (and ``_BatchNorm``) holds for code that initialises
  or inspects batch norms.
- ``BatchNormReLU1d/2d/3d`` (forward(x) = relu(bn(x))) and ``BatchNormAddReLU1d/2d/3d``
  (forward(x, addend) = relu(bn(x) + addend)): the same layers fused with the ReLU (and the
  residual add) that follow them, one op each (``tritonbn.batch_norm(act_type=, addend=)``);
  subclasses of the plain layers, so initialisation code and state_dicts treat them as batch norms.
- ``SyncBatchNorm`` (``tritonbn.distributed``): statistics across a process group;
  ``SyncBatchNormReLU`` and ``SyncBatchNormAddReLU`` fused likewise.
- ``BatchNorm``: MXNet Gluon's layer (``axis``, MXNet's momentum, ``epsilon``, ``center``,
  ``scale``, ``use_global_stats``, lazy ``in_channels``, ``fuse_relu``); ``BatchNormReLU``.
- ``convert(model, sync=False)``: swaps torch's batch norms in a model for these
  (``tritonbn.fuse`` also fuses the ReLUs and residual adds that follow them).

Every layer calls ``library.batch_norm_op``: in eager mode the operator's autograd Function
(what ``tritonbn.batch_norm`` runs, the moving statistics updated in place by the kernels),
while traced the ``tritonbn::batch_norm_forward`` custom op, so
``torch.compile(model, fullgraph=True)`` traces them without graph breaks.  Both run the same
kernels on the same arguments: eager and compiled results are bitwise equal.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Callable, Optional, Union

import torch
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm as _TorchBatchNorm
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.parameter import UninitializedBuffer, UninitializedParameter, is_lazy

from . import reference
from .library import batch_norm_op
from .validation import check_addend

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormReLU1d", "BatchNormReLU2d", "BatchNormReLU3d",
           "BatchNormAddReLU1d", "BatchNormAddReLU2d", "BatchNormAddReLU3d", "SyncBatchNorm", "SyncBatchNormReLU",
           "SyncBatchNormAddReLU", "BatchNorm", "BatchNormReLU", "convert", "torch_batch_norm", "TORCH_HAS_BIAS"]

# torch's batch norms take ``bias=`` from torch 2.13 on; on older torch the layers here still
# accept it, and bias=False drops the bias parameter after torch's constructor (what 2.13 does).
TORCH_HAS_BIAS = "bias" in inspect.signature(_NormBase.__init__).parameters


# ----------------------------------------------------------------------------- functional


def _verify_batch_size(x: Tensor) -> None:
    """torch's check: training needs more than one value per channel (channel axis 1)."""
    size_prods = x.shape[0]
    for extent in x.shape[2:]:
        size_prods *= extent
    if size_prods == 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {x.size()}")


def _affine(x: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
            running_mean: Optional[Tensor]) -> tuple[Tensor, Tensor, bool]:
    """(gamma, beta, fix_gamma) for torch's optional weight/bias (absent: ones / zeros)."""
    if weight is not None and bias is not None:
        return weight, bias, False
    like = next((t for t in (weight, bias, running_mean) if t is not None), None)
    dtype = like.dtype if like is not None else reference.stat_dtype(x.dtype)
    channels = x.shape[1]
    gamma = weight if weight is not None else torch.ones(channels, dtype=dtype, device=x.device)
    beta = bias if bias is not None else torch.zeros(channels, dtype=dtype, device=x.device)
    return gamma, beta, weight is None


def torch_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    training: bool = False,
    momentum: Optional[float] = 0.1,
    eps: float = 1e-5,
    *,
    average_count: Optional[Tensor] = None,
    relu: bool = False,
    addend: Optional[Tensor] = None,
) -> Tensor:
    """``torch.nn.functional.batch_norm`` on the tritonbn op (channel axis 1, torch's conventions),
    optionally fused with the residual add and ReLU that follow it: ``relu(bn(input) + addend)``.

    ``momentum`` is torch's (``running = (1 - momentum) * running + momentum * batch``); with
    ``average_count`` (torch's ``num_batches_tracked``, already incremented) the update is the
    cumulative average ``1 / average_count`` instead.  The running variance is updated with the
    unbiased batch variance, as torch does.  ``relu``: a ReLU after the normalisation (and the
    addend); ``addend``: input's shape and dtype, any layout, gradient flows to it.
    """
    if training:
        _verify_batch_size(input)
        if eps <= 0.0:
            raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    elif eps < 0.0:
        raise ValueError(f"batch_norm eps must be non-negative, but got {eps}")
    if input.numel() == 0:
        # torch: an empty batch gives an empty output that still depends on weight and bias
        out = input.clone()
        if weight is not None:
            out = out * weight[0]
        if bias is not None:
            out = out + bias[0]
        if addend is not None:
            out = out + addend
        return out.relu() if relu else out
    if running_mean is None or running_var is None:
        if not training:
            raise ValueError("running_mean and running_var must be defined in evaluation mode")
        running_mean = running_var = None
    gamma, beta, fix_gamma = _affine(input, weight, bias, running_mean)
    y, _, _ = batch_norm_op(
        input, gamma, beta, running_mean, running_var, axis=1, eps=eps,
        momentum=1.0 - (momentum if momentum is not None else 0.0), fix_gamma=fix_gamma,
        batch_stats=training, unbiased_update=True, average_count=average_count, relu=relu, addend=addend,
        keep_stats=False)
    return y


# ----------------------------------------------------------------------------- torch-style layers


class _BatchNorm(_TorchBatchNorm):
    """torch's ``_BatchNorm`` with the forward on the tritonbn op (channel axis 1)."""

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        """torch's constructor; ``bias=False`` (no learnt shift) on every torch version."""
        extra = {"bias": bias} if TORCH_HAS_BIAS else {}
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **extra)
        if affine and not bias and not TORCH_HAS_BIAS:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        """torch's: running statistics reset, weight ones, bias (when there is one) zeros."""
        self.reset_running_stats()
        if self.affine:
            torch.nn.init.ones_(self.weight)
            if self.bias is not None:
                torch.nn.init.zeros_(self.bias)

    def _batch_norm_args(self) -> tuple[Optional[Tensor], Optional[Tensor], bool, Optional[float], Optional[Tensor]]:
        """torch's bookkeeping: (running_mean, running_var, use batch stats, momentum, average_count).

        Increments ``num_batches_tracked`` in training, as torch does.
        """
        # (each buffer read once: a module's buffer is a Module.__getattr__ call, about 1 µs)
        average_count = None
        training, momentum = self.training, self.momentum
        if training and self.track_running_stats:
            count = self.num_batches_tracked
            if count is not None:
                count.add_(1)
                if momentum is None:  # cumulative moving average: factor 1 / num_batches_tracked
                    average_count = count
        running_mean, running_var = self.running_mean, self.running_var
        bn_training = training or (running_mean is None and running_var is None)
        # Buffers are passed only when they are updated (training and tracked) or normalised with.
        if training and not self.track_running_stats:
            running_mean = running_var = None
        return running_mean, running_var, bn_training, momentum, average_count

    def forward(self, input: Tensor) -> Tensor:
        return self._normalize(input)

    def _normalize(self, input: Tensor, relu: bool = False, addend: Optional[Tensor] = None) -> Tensor:
        """``relu(bn(input) [+ addend])`` (plain bn without ``relu`` and ``addend``) with this
        layer's parameters, buffers and mode.  A bad addend raises before ``num_batches_tracked``
        counts the batch."""
        self._check_input_dim(input)
        if addend is not None:
            check_addend(addend, input)
        running_mean, running_var, bn_training, momentum, average_count = self._batch_norm_args()
        return torch_batch_norm(input, running_mean, running_var, self.weight, self.bias, bn_training,
                                momentum, self.eps, average_count=average_count, relu=relu, addend=addend)


class BatchNorm1d(_BatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on tritonbn: (N, C) or (N, C, L) input."""


class BatchNorm2d(_BatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on tritonbn: (N, C, H, W) input, any memory format."""


class BatchNorm3d(_BatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on tritonbn: (N, C, D, H, W) input, any memory format."""


# ----------------------------------------------------------------------------- fused layers


class _ReLUForward:
    """forward(x) = relu(bn(x)), one fused op (kernels/common.py "fused epilogues")."""

    def forward(self, input: Tensor) -> Tensor:
        return self._normalize(input, relu=True)


class _AddReLUForward:
    """forward(x, addend) = relu(bn(x) + addend), one fused op; the gradient flows to addend."""

    def forward(self, input: Tensor, addend: Tensor) -> Tensor:
        return self._normalize(input, relu=True, addend=addend)


class BatchNormReLU1d(_ReLUForward, BatchNorm1d):
    """``relu(BatchNorm1d(x))`` fused: torch's BatchNorm1d arguments, parameters and state_dict keys."""


class BatchNormReLU2d(_ReLUForward, BatchNorm2d):
    """``relu(BatchNorm2d(x))`` fused: torch's BatchNorm2d arguments, parameters and state_dict keys."""


class BatchNormReLU3d(_ReLUForward, BatchNorm3d):
    """``relu(BatchNorm3d(x))`` fused: torch's BatchNorm3d arguments, parameters and state_dict keys."""


class BatchNormAddReLU1d(_AddReLUForward, BatchNorm1d):
    """``relu(BatchNorm1d(x) + addend)`` fused (a residual block's end): forward(x, addend)."""


class BatchNormAddReLU2d(_AddReLUForward, BatchNorm2d):
    """``relu(BatchNorm2d(x) + addend)`` fused (a residual block's end): forward(x, addend)."""


class BatchNormAddReLU3d(_AddReLUForward, BatchNorm3d):
    """``relu(BatchNorm3d(x) + addend)`` fused (a residual block's end): forward(x, addend)."""


# ----------------------------------------------------------------------------- Gluon-style layer


def _initializer(init: Union[str, float, Callable[[Tensor], object]]) -> Callable[[Tensor], object]:
    """MXNet's initializer names ('zeros', 'ones'), a constant, or a function filling a tensor."""
    if callable(init):
        return init
    if isinstance(init, str):
        constants = {"zeros": 0.0, "ones": 1.0}
        if init.lower() not in constants:
            raise ValueError(f"initializer must be 'zeros', 'ones', a number or a callable, got {init!r}")
        init = constants[init.lower()]
    return lambda t: torch.nn.init.constant_(t, float(init))


class BatchNorm(LazyModuleMixin, torch.nn.Module):
    """MXNet Gluon's ``nn.BatchNorm`` layer on tritonbn.

    Args (Gluon's names and defaults):
        axis: the channel axis (any, negative too).
        momentum: MXNet's: ``running = running * momentum + batch * (1 - momentum)``; the
            running variance is updated with the biased batch variance, as MXNet does.
        epsilon: added to the variance.
        center: learn ``beta``; False: beta is fixed at 0.
        scale: learn ``gamma``; False: gamma is fixed at 1 (MXNet's ``fix_gamma``).
        use_global_stats: normalise with the running statistics in training too.
        beta_initializer, gamma_initializer, running_mean_initializer,
        running_variance_initializer: 'zeros', 'ones', a number, or a function filling a tensor.
        in_channels: number of channels; 0 infers it (and the dtype: float64 for float64 data,
            else float32, unless ``dtype`` is given) on the first call.
        device, dtype: of the parameters and running statistics.
        fuse_relu: a ReLU fused after the normalisation (MXNet's ``_BatchNorm(fuse_relu=True)``,
            ``BatchNormReLU``): one op, ``relu(bn(x))``.

    Parameters ``gamma`` and ``beta`` (``requires_grad`` False when not ``scale`` / ``center``),
    buffers ``running_mean`` and ``running_var``.  Training mode is ``module.training``.
    """

    cls_to_become = None

    def __init__(
        self,
        axis: int = 1,
        momentum: float = 0.9,
        epsilon: float = 1e-5,
        center: bool = True,
        scale: bool = True,
        use_global_stats: bool = False,
        beta_initializer="zeros",
        gamma_initializer="ones",
        running_mean_initializer="zeros",
        running_variance_initializer="ones",
        in_channels: int = 0,
        device=None,
        dtype=None,
        *,
        fuse_relu: bool = False,
    ) -> None:
        super().__init__()
        self.fuse_relu = fuse_relu
        self.axis = axis
        self.momentum = momentum
        self.epsilon = epsilon
        self.center = center
        self.scale = scale
        self.use_global_stats = use_global_stats
        self.in_channels = in_channels
        self._inits = {
            "gamma": _initializer(gamma_initializer),
            "beta": _initializer(beta_initializer),
            "running_mean": _initializer(running_mean_initializer),
            "running_var": _initializer(running_variance_initializer),
        }
        kwargs = {"device": device, "dtype": dtype}
        self._dtype = dtype
        if in_channels > 0:
            self.gamma = torch.nn.Parameter(torch.empty(in_channels, **kwargs), requires_grad=scale)
            self.beta = torch.nn.Parameter(torch.empty(in_channels, **kwargs), requires_grad=center)
            self.register_buffer("running_mean", torch.empty(in_channels, **kwargs))
            self.register_buffer("running_var", torch.empty(in_channels, **kwargs))
            self.reset_parameters()
        else:
            self.gamma = UninitializedParameter(requires_grad=scale, **kwargs)
            self.beta = UninitializedParameter(requires_grad=center, **kwargs)
            self.running_mean = UninitializedBuffer(**kwargs)
            self.running_var = UninitializedBuffer(**kwargs)

    def reset_parameters(self) -> None:
        """Fill gamma, beta and the running statistics with their initializers."""
        if self.has_uninitialized_params():
            return
        with torch.no_grad():
            for name, init in self._inits.items():
                init(getattr(self, name))

    def initialize_parameters(self, x: Tensor) -> None:
        """Lazy shape (and dtype) inference on the first call."""
        if not self.has_uninitialized_params():
            return
        channels = x.shape[self.axis]
        dtype = self._dtype or reference.stat_dtype(x.dtype)
        with torch.no_grad():
            for name in ("gamma", "beta", "running_mean", "running_var"):
                getattr(self, name).materialize((channels,), device=x.device, dtype=dtype)
        self.in_channels = channels
        self.reset_parameters()

    def _lazy_load_hook(self, state_dict, prefix, *args) -> None:
        """Loading a checkpoint into an uninitialised layer: its shapes and (unless ``dtype`` was
        given) its dtype."""
        with torch.no_grad():
            for name in ("gamma", "beta", "running_mean", "running_var"):
                current, value = getattr(self, name), state_dict.get(prefix + name)
                if is_lazy(current) and value is not None and not is_lazy(value):
                    current.materialize(value.shape, dtype=self._dtype or value.dtype)
        if not self.has_uninitialized_params():
            self.in_channels = self.gamma.shape[0]

    def forward(self, x: Tensor) -> Tensor:
        beta = self.beta if self.center else torch.zeros_like(self.beta)
        y, _, _ = batch_norm_op(
            x, self.gamma, beta, self.running_mean, self.running_var, axis=self.axis, eps=self.epsilon,
            momentum=self.momentum, fix_gamma=not self.scale,
            batch_stats=self.training and not self.use_global_stats, relu=self.fuse_relu,
            keep_stats=False)
        return y

    def extra_repr(self) -> str:
        return (f"axis={self.axis}, eps={self.epsilon}, momentum={self.momentum}, "
                f"fix_gamma={not self.scale}, use_global_stats={self.use_global_stats}, "
                f"in_channels={self.in_channels if self.in_channels else None}"
                + (", fuse_relu=True" if self.fuse_relu else ""))


class BatchNormReLU(BatchNorm):
    """MXNet Gluon's ``nn.BatchNormReLU``: ``BatchNorm`` with ``fuse_relu=True`` (same arguments)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, fuse_relu=True, **kwargs)


# ----------------------------------------------------------------------------- convert

from .distributed import SyncBatchNorm, SyncBatchNormAddReLU, SyncBatchNormReLU  # noqa: E402  (needs _BatchNorm above)

_TORCH_TO_TRITONBN = {
    torch.nn.BatchNorm1d: BatchNorm1d,
    torch.nn.BatchNorm2d: BatchNorm2d,
    torch.nn.BatchNorm3d: BatchNorm3d,
}


_FUSED = {  # plain layer -> (its ReLU layer, its add + ReLU layer)
    BatchNorm1d: (BatchNormReLU1d, BatchNormAddReLU1d),
    BatchNorm2d: (BatchNormReLU2d, BatchNormAddReLU2d),
    BatchNorm3d: (BatchNormReLU3d, BatchNormAddReLU3d),
    SyncBatchNorm: (SyncBatchNormReLU, SyncBatchNormAddReLU),
}


def _target_class(module: torch.nn.Module, sync: bool) -> Optional[type]:
    """The tritonbn class that replaces ``module``, or None if it stays."""
    if isinstance(module, (_BatchNorm, BatchNorm)) and not (sync and not isinstance(module, SyncBatchNorm)):
        return None  # already tritonbn (and synchronised if asked)
    if isinstance(module, torch.nn.SyncBatchNorm) or (sync and isinstance(module, _TorchBatchNorm)):
        if isinstance(module, _AddReLUForward):  # a fused layer stays fused
            return SyncBatchNormAddReLU
        return SyncBatchNormReLU if isinstance(module, _ReLUForward) else SyncBatchNorm
    for torch_class, ours in _TORCH_TO_TRITONBN.items():
        if isinstance(module, torch_class):
            return ours
    return None


def _replacement(module: _TorchBatchNorm, cls: type, process_group) -> torch.nn.Module:
    """A ``cls`` layer holding ``module``'s own parameter and buffer objects."""
    kwargs = dict(eps=module.eps, momentum=module.momentum, affine=module.affine,
                  track_running_stats=module.track_running_stats, device="meta",
                  bias=getattr(module, "bias", None) is not None or not module.affine)
    if issubclass(cls, SyncBatchNorm):
        kwargs["process_group"] = process_group if process_group is not None else getattr(
            module, "process_group", None)
    new = cls(module.num_features, **kwargs)
    # The same Parameter and buffer objects: optimizers and references to them keep working.
    for name in ("weight", "bias"):
        setattr(new, name, getattr(module, name, None))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new.register_buffer(name, getattr(module, name, None),
                            persistent=name not in module._non_persistent_buffers_set)
    new.train(module.training)
    for hooks in ("_forward_pre_hooks", "_forward_hooks", "_backward_hooks",
                  "_state_dict_hooks", "_load_state_dict_pre_hooks"):
        getattr(new, hooks).update(getattr(module, hooks))
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def fused_layer(module: torch.nn.Module, addend: bool) -> Optional[torch.nn.Module]:
    """``module`` (a plain tritonbn BatchNorm1d/2d/3d or SyncBatchNorm) as its fused ReLU layer
    (``addend``: its add + ReLU layer), holding the same parameter and buffer objects; None for
    any other module (torch's own layers: ``convert`` them first; already fused; Gluon-style)."""
    fused = _FUSED.get(type(module))
    return None if fused is None else _replacement(module, fused[addend], None)


def convert(model: torch.nn.Module, sync: bool = False, process_group=None) -> torch.nn.Module:
    """Replace every torch batch norm in ``model`` (nested too) with tritonbn's.

    ``torch.nn.BatchNorm1d/2d/3d`` become ``tritonbn.nn.BatchNorm1d/2d/3d`` and
    ``torch.nn.SyncBatchNorm`` becomes ``tritonbn.nn.SyncBatchNorm`` (keeping its process
    group); with ``sync=True`` every batch norm becomes a ``tritonbn.nn.SyncBatchNorm`` over
    ``process_group`` (default: the whole world).  The new layers hold the old layers' own
    parameter and buffer tensors (same device, dtype, values, state_dict keys) and training
    mode, so a torch checkpoint loads into the converted model and an optimizer built before
    the conversion still updates them.  Lazy torch layers that are not initialised yet are
    left alone (with a warning).

    Returns ``model``, converted in place (or the new layer when ``model`` is a batch norm).
    """
    if isinstance(model, LazyModuleMixin) and model.has_uninitialized_params():
        if isinstance(model, _TorchBatchNorm):
            warnings.warn(f"tritonbn.convert: {type(model).__name__} is not initialised yet (run a batch "
                          "through the model first); left as is", stacklevel=2)
    else:
        cls = _target_class(model, sync)
        if cls is not None:
            model = _replacement(model, cls, process_group)
    for name, child in list(model.named_children()):
        converted = convert(child, sync, process_group)
        if converted is not child:
            model.add_module(name, converted)
    return model
