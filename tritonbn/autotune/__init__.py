"""Launch configuration: ``KernelConfig``s, how they are chosen (override, measured config store,
heuristic), the config spaces and the tuner (``tritonbn tune``).

Importing the package loads ``config`` and ``store`` only (the op's path); the tools (``tuner``,
``tune``, ``online``, ``model``, ``report``, ``space``) load when imported by name."""

from .config import PERSISTENT_OFF, KernelConfig, clear_caches, explain, override_configs

__all__ = ["KernelConfig", "override_configs", "PERSISTENT_OFF", "explain", "clear_caches"]
