"""tritonbn: Apache MXNet's BatchNorm operator as Triton kernels on torch tensors.

Public API: ``batch_norm`` (SPEC.md; fused with a ReLU and an addend by ``act_type`` and
``addend``), ``contrib.BatchNormWithReLU`` (MXNet's contrib op), ``trace`` (which path ran, which kernels launched),
``KernelConfig``; ``convert`` and ``fuse`` for torch models.  Importing tritonbn needs neither a GPU nor Triton; the kernels are imported
on first use.
"""

from . import contrib, trace
from .autotune import KernelConfig
from .ops import batch_norm
from .nn import convert  # torch.nn layers (tritonbn.nn), SyncBatchNorm, torch.compile op
from .fuse import fuse  # BN -> ReLU and BN -> add -> ReLU chains of a model as fused layers (torch.fx)

__all__ = ["batch_norm", "contrib", "convert", "fuse", "trace", "KernelConfig"]
__version__ = "0.1.0"
