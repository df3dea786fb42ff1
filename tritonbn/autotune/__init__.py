"""Launch configuration: ``KernelConfig``s and how they are chosen."""

from .config import KernelConfig, override_configs

__all__ = ["KernelConfig", "override_configs"]
