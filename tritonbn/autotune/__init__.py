"""Launch configuration: ``KernelConfig``s and how they are chosen."""

from .config import PERSISTENT_OFF, KernelConfig, override_configs

__all__ = ["KernelConfig", "override_configs", "PERSISTENT_OFF"]
