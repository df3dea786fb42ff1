"""Launch configuration: ``KernelConfig``s, how they are chosen (override, config store,
heuristic), the config spaces and the tuner (``tritonbn tune``)."""

from .config import PERSISTENT_OFF, KernelConfig, clear_caches, explain, override_configs

__all__ = ["KernelConfig", "override_configs", "PERSISTENT_OFF", "explain", "clear_caches"]
