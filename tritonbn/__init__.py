"""tritonbn: Apache MXNet's BatchNorm operator as Triton kernels on torch tensors.

Public API: ``batch_norm`` (SPEC.md), ``trace`` (which path ran, which kernels launched),
``KernelConfig``.  Importing tritonbn needs neither a GPU nor Triton; the kernels are imported
on first use.
"""

from . import trace
from .autotune import KernelConfig
from .ops import batch_norm
from .nn import convert  # torch.nn layers (tritonbn.nn), SyncBatchNorm, torch.compile op

__all__ = ["batch_norm", "convert", "trace", "KernelConfig"]
__version__ = "0.1.0"
