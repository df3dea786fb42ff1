"""Performance tooling: what the ops cost, on any machine.

- ``traffic``: global-memory bytes moved per op, counted by instrumenting the loads and stores
  of Triton's interpreter (``TRITON_INTERPRET=1``), with the launches from ``tritonbn.trace``
  (``tritonbn traffic``).
- ``sweeps``: the shapes, layouts, dtypes and modes of the benchmark sweep (GitHub issue 5).
- ``bench``: the sweep itself (``tritonbn bench``): timed against torch eager, torch.compile
  and a copy on CUDA; counted (tritonbn) next to modelled (torch) pass counts on CPU.
- ``report``: the CSV, the plots and ``report.md`` of a sweep.

Nothing here imports Triton at module level: the interpreter must be chosen (the environment
variable set) before Triton is first imported.
"""

import os
from pathlib import Path
from typing import Mapping

ROOT = Path(__file__).resolve().parents[2]  # the checkout tritonbn runs from


def compiling_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` for a subprocess that compiles the kernels (never interprets them): without
    ``TRITON_INTERPRET``, and with this checkout first on ``PYTHONPATH``."""
    compiling = {name: value for name, value in env.items() if name != "TRITON_INTERPRET"}
    compiling["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return compiling
