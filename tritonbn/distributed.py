"""SyncBatchNorm: training statistics of the batch concatenated across a process group.

Exact also when the ranks hold different batch sizes (SPEC "SyncBatchNorm"):

forward (one all_gather of a [3, C] float64 tensor per step)
    each rank: n_r = elements per channel, mean_r, M2_r = sum((x - mean_r)^2)
    all ranks: n = sum n_r, mean = sum(n_r * mean_r) / n,
               M2 = sum(M2_r + n_r * (mean_r - mean)^2)          (Chan et al., exact)
    y = (x - mean) / sqrt(M2 / n + eps) * gamma + beta            (the operator's scale-shift kernels)
    running_mean, running_var <- torch's update with the unbiased M2 / (n - 1)
backward (one all_reduce of a [2, C] float64 tensor per step)
    each rank: S_r = sum(dy), D_r = sum((x - mean) * dy)          (the operator's backward kernels)
    all ranks: S, D = sum over ranks
    dx = gamma * invstd * (dy - S / n - (x - mean) * D * invstd^2 / n)
    dgamma = D_r * invstd, dbeta = S_r: local, as data-parallel training expects (DDP averages them)

Every full-size pass runs the operator's backend (Triton kernels on CUDA and under
TRITON_INTERPRET=1, the reference otherwise), reading each layout in place: the per-rank moments
are the statistics kernel's shifted Welford partials (``moments``), the normalisation is the
elementwise kernel fed the global statistics, S and D are the backward reduction kernel's
(``gradient_sums``) and dx is one elementwise launch whose coefficients come from the
all-reduced sums (``input_grad``); only [3, C] and [2, C] tensors are handled in torch.  Works with NCCL (CUDA) and gloo (CPU).
Outside training, with a group of one rank, or when torch.distributed is not initialised, the
layer is the local ``BatchNorm`` (the compilable custom op); the synchronised path itself runs
eagerly (``torch.compile`` breaks the graph around it, at the collectives).

Nothing is read on the host: the group's count n stays a device tensor (the variance, the
running-variance update and dx divide by it there) and so does ``num_batches_tracked`` for
``momentum=None``.  "More than 1 value per channel" is checked where the host knows the answer
from shapes alone, as torch's SyncBatchNorm does: a group of one rank (n is this rank's count)
raises; in a larger group a rank cannot know the others' counts without a sync, so a group whose
total is n <= 1 leaves the running statistics unchanged (a device-side select) rather than
writing the undefined unbiased variance M2 / (n - 1).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import reference
from .library import cumulative_average
from .nn import _AddReLUForward, _affine, _BatchNorm, _ReLUForward
from .reference import chan_merge
from .ops import backend_for
from .validation import Settings, validate, validate_fusion

__all__ = ["SyncBatchNorm", "SyncBatchNormReLU", "SyncBatchNormAddReLU", "sync_batch_norm", "chan_merge"]


def _all_gather(t: Tensor, group) -> Tensor:
    """[world, *t.shape]: ``t`` of every rank of ``group``."""
    world = dist.get_world_size(group)
    out = t.new_empty((world * t.shape[0], *t.shape[1:]))  # the concatenated form (every backend)
    # all_gather_single is all_gather_into_tensor's name from torch 2.13 on (the old one warns).
    gather = getattr(dist, "all_gather_single", None) or getattr(dist, "all_gather_into_tensor", None)
    if gather is not None:
        gather(out, t.contiguous(), group=group)
    else:
        dist.all_gather(list(out.chunk(world)), t.contiguous(), group=group)
    return out.view(world, *t.shape)


def _check_values_per_channel(x: Tensor, group) -> None:
    """torch's "more than 1 value per channel" error, where it is decidable on the host: with one
    rank the group's count is this rank's, a shape; with more, only a device read could tell."""
    local = x.numel() // max(x.shape[1], 1)
    if local <= 1 and dist.get_world_size(group) == 1:
        raise ValueError(
            f"Expected more than 1 value per channel across the process group when training, got {local}")


def _update_running(running: Tensor, batch_value: Tensor, count: Tensor, momentum: float,
                    average_count: Optional[Tensor]) -> None:
    """torch's running-statistic update in place (``average_count``: the cumulative average),
    skipped on the device for channels whose group count is <= 1 (no unbiased variance)."""
    if average_count is not None:
        updated = cumulative_average(running, batch_value, average_count)
    else:
        updated = (running.double() * momentum + batch_value.double() * (1.0 - momentum)).to(running.dtype)
    running.copy_(torch.where(count > 1, updated, running))


class _SyncBatchNormFunction(torch.autograd.Function):
    """Training forward/backward with statistics across ``group`` (channel axis 1), optionally
    fused with an addend and a ReLU (``fusion`` = (relu, has addend)): y = relu(bn(x) [+ addend])
    in the normalising launch; the backward passes dy where y is positive."""

    @staticmethod
    def forward(ctx, x, gamma, beta, addend, running_mean, running_var, eps, momentum, fix_gamma, group,
                average_count, relu):
        _check_values_per_channel(x, group)
        backend = backend_for(x.device)
        with torch.autocast(x.device.type, enabled=False):
            count, mean, m2 = chan_merge(_all_gather(backend.moments(x, 1), group))  # [C] float64 each
            var = m2 / count.clamp(min=1)
            g = torch.ones_like(mean) if fix_gamma else gamma
            y, x_read, center, invstd = backend.normalize(x, mean, reference.inverse_std(var, eps), g, beta, 1,
                                                          addend=addend, relu=relu)
            if running_mean is not None and running_var is not None:
                _update_running(running_mean, mean, count, momentum, average_count)
                _update_running(running_var, m2 / (count - 1), count, momentum, average_count)
        # the ReLU's decisions are y's sign: y is kept for the backward (a bit mask would be 1/8 of it)
        ctx.save_for_backward(x_read, gamma, center, invstd, y if relu else None)
        ctx.fix_gamma, ctx.group, ctx.count, ctx.beta_dtype = fix_gamma, group, count, beta.dtype
        ctx.relu = relu
        return y

    @staticmethod
    def backward(ctx, dy):
        x, gamma, center, invstd, y = ctx.saved_tensors
        if ctx.relu:
            dy = reference.gate(dy, reference.relu_passes(y))
        daddend = dy if ctx.needs_input_grad[3] else None
        backend = backend_for(x.device)
        with torch.autocast(x.device.type, enabled=False):
            sums = backend.gradient_sums(dy, x, center, 1)  # [2, C] local (S, D)
            local = sums.clone()
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=ctx.group)
            g = torch.ones_like(invstd) if ctx.fix_gamma else gamma.to(invstd.dtype)
            settings = Settings(axis=1, eps=0.0, momentum=0.0, fix_gamma=False, batch_stats=True,
                                unbiased_update=False)
            dx = backend.input_grad(dy, x, g, center, invstd, settings, sums, ctx.count)
            s_local, d_local = local.unbind(0)
        needs = ctx.needs_input_grad
        dgamma = None
        if needs[1]:
            dgamma = torch.zeros_like(gamma) if ctx.fix_gamma else (d_local * invstd.double()).to(gamma.dtype)
        dbeta = s_local.to(ctx.beta_dtype) if needs[2] else None
        return (dx if needs[0] else None, dgamma, dbeta, daddend) + (None,) * 8


def sync_batch_norm(
    input: Tensor,
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    momentum: Optional[float],
    eps: float,
    group: Any = None,
    *,
    average_count: Optional[Tensor] = None,
    relu: bool = False,
    addend: Optional[Tensor] = None,
) -> Tensor:
    """Training batch norm (channel axis 1) with statistics across ``group`` (default WORLD),
    optionally fused: ``relu(bn(input) [+ addend])``.

    torch's conventions: ``momentum`` is torch's (``average_count``: cumulative average), the
    running variance gets the unbiased variance of the whole group's batch.
    """
    if eps <= 0.0:
        raise ValueError(f"batch_norm eps must be positive during training, but got {eps}")
    if running_mean is None or running_var is None:
        running_mean = running_var = None
    gamma, beta, fix_gamma = _affine(input, weight, bias, running_mean)
    tracked = (running_mean, running_var) if running_mean is not None else (gamma, gamma)
    settings = validate(input, (gamma, beta, *tracked), eps=eps, momentum=0.0, fix_gamma=fix_gamma,
                        use_global_stats=False, axis=1, out=None, training=False, unbiased_update=False)
    if relu or addend is not None:
        validate_fusion(settings, input, "relu" if relu else None, addend, None)
    tritonbn_momentum = 1.0 - (momentum if momentum is not None else 0.0)
    group = group if group is not None else dist.group.WORLD
    return _SyncBatchNormFunction.apply(input, gamma, beta, addend, running_mean, running_var, eps, tritonbn_momentum,
                                        fix_gamma, group, average_count, relu)


@functools.lru_cache(maxsize=None)
def _eager_sync_batch_norm() -> Callable[..., Tensor]:
    """``sync_batch_norm`` behind ``torch.compiler.disable``: a compiled model runs it eagerly
    (a graph break).  Made on first use: the decorator imports Dynamo (and Triton with it)."""
    return torch.compiler.disable(sync_batch_norm, recursive=True)


class SyncBatchNorm(_BatchNorm):
    """``torch.nn.SyncBatchNorm`` on tritonbn: (N, C, ...) input, statistics across a group.

    Same constructor, parameters, buffers and state_dict keys as torch's.  In training with a
    process group of more than one rank the statistics are those of the batch concatenated
    over the group (exact for unequal per-rank batches); otherwise it is the local batch norm.
    Unlike torch's, it also runs on CPU tensors (gloo).  Not a subclass of
    ``torch.nn.SyncBatchNorm`` (DDP refuses those on CPU), but of torch's ``_BatchNorm``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: Optional[float] = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device=None,
        dtype=None,
        *,
        bias: bool = True,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, bias=bias)
        self.process_group = process_group

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def _check_non_zero_input_channels(self, input: Tensor) -> None:
        if input.size(1) == 0:
            raise ValueError("SyncBatchNorm number of input channels should be non-zero")

    def _group(self) -> Any:
        """The process group to synchronise over, or None when there is nothing to synchronise."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group if self.process_group is not None else dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _normalize(self, input: Tensor, relu: bool = False, addend: Optional[Tensor] = None) -> Tensor:
        self._check_input_dim(input)
        self._check_non_zero_input_channels(input)
        group = self._group()
        if group is None:
            return super()._normalize(input, relu, addend)
        running_mean, running_var, _, momentum, average_count = self._batch_norm_args()
        return _eager_sync_batch_norm()(input, running_mean, running_var, self.weight, self.bias, momentum, self.eps,
                                        group, average_count=average_count, relu=relu, addend=addend)


class SyncBatchNormReLU(_ReLUForward, SyncBatchNorm):
    """``relu(SyncBatchNorm(x))`` fused: SyncBatchNorm's arguments, parameters and state_dict keys."""


class SyncBatchNormAddReLU(_AddReLUForward, SyncBatchNorm):
    """``relu(SyncBatchNorm(x) + addend)`` fused: forward(x, addend)."""
