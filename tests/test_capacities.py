"""The single-pass capacities are derived from the compiled code of every supported Triton.

``autotune.config.SINGLE_PASS_CAPACITY`` must be, for every (op, family, load class, dtype),
the smallest over the committed per-version probe tables (``tritonbn capacities --json``,
perf/inspect/capacities/triton-<version>.json) of the largest tile that compiled without
spills: the worst version decides.  The running Triton must compile every class at the library's
capacity without spills (``tritonbn capacities --check``, in a compiling subprocess: this
process imported the kernels interpreted); the support matrix runs this file on each version.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tritonbn.autotune.config import SINGLE_PASS_CAPACITY
from tritonbn.perf.capacities import CLASSES, OPS, PROBE_DTYPES, committed_tables, derived_capacity

from helpers import compiling_env

ROOT = Path(__file__).resolve().parents[1]
MATRIX_TRITONS = sorted({line.split()[2].split("==")[1] for line in (ROOT / "scripts" / "matrix.txt").read_text()
                         .splitlines() if line.strip() and not line.startswith("#")})


def test_a_table_for_every_supported_triton():
    assert sorted(table["triton"] for table in committed_tables()) == MATRIX_TRITONS


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("cls", CLASSES, ids=[f"{c.family}-{c.load}" for c in CLASSES])
def test_capacities_are_the_worst_versions_largest_spill_free_tile(op, cls):
    tables = committed_tables()
    for dtype in PROBE_DTYPES:
        want = derived_capacity(tables, op, cls.family, cls.load, dtype)
        assert want > 0, f"{op} {cls.family} {cls.load} {dtype}: no tile compiles without spills"
        assert SINGLE_PASS_CAPACITY[op][cls.family][cls.load][dtype] == want, (op, cls.family, cls.load, dtype)


def test_capacities_compile_without_spills_on_this_triton():
    env = compiling_env()
    result = subprocess.run([sys.executable, "-m", "tritonbn", "capacities", "--check", "--dtype", "fp16",
                             "--dtype", "bf16", "--dtype", "fp32", "--dtype", "fp64"],
                            capture_output=True, text=True, env=env, cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "0 spilling" in result.stdout
