"""MXNet's ``contrib`` BatchNorm variants on torch tensors (``mxnet.ndarray.contrib``)."""

from __future__ import annotations

import torch

from .ops import batch_norm

__all__ = ["BatchNormWithReLU"]


def BatchNormWithReLU(  # noqa: N802 - MXNet's operator name
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
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``mxnet.ndarray.contrib.BatchNormWithReLU``: relu(BatchNorm(data)) with BatchNorm's
    arguments and outputs (``tritonbn.batch_norm(..., act_type="relu")``).  MXNet runs it on
    CPU/oneDNN only (4-D, axis 1, float32); here every layout, axis and dtype ``batch_norm``
    takes, on the fused kernels."""
    return batch_norm(data, gamma, beta, moving_mean, moving_var, eps, momentum, fix_gamma, use_global_stats,
                      output_mean_var, axis, cudnn_off, out, training=training, act_type="relu")
