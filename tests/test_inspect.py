"""The GPU code is real: every kernel compiles for sm_90 with the configs the library picks,
without spills and with 128-bit global accesses where the data streams.

The compilation runs ``tritonbn inspect`` in a subprocess: this test process imported the
kernels in interpreter mode (conftest), and Triton decides that at import.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tritonbn.inspect import _widest_access

ROOT = Path(__file__).resolve().parents[1]
KERNEL_NAMES = {
    f"{family}_{kind}"
    for family in ("channel_major", "channel_minor")
    for kind in ("stats", "elementwise", "backward_reduce", "persistent_forward", "persistent_backward")
} | {"finalize_stats", "finalize_backward"}


@pytest.fixture(scope="module")
def sm90_fp16_report(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("inspect") / "kernels.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    result = subprocess.run(
        [sys.executable, "-m", "tritonbn", "inspect", "--arch", "sm_90", "--dtype", "fp16", "--json", str(out)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(out.read_text())


def test_every_kernel_compiles_for_sm90(sm90_fp16_report):
    assert {row["kernel"] for row in sm90_fp16_report} == KERNEL_NAMES
    assert all(row["arch"] == "sm_90" and row["registers"] > 0 for row in sm90_fp16_report)


def test_no_kernel_spills(sm90_fp16_report):
    assert [row for row in sm90_fp16_report if row["spills"]] == []


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "axis-1"])
def test_streaming_kernels_use_128_bit_loads_on_aligned_shapes(sm90_fp16_report, layout):
    """The split-path kernels of the large, aligned shape of each layout read 128 bits at a time."""
    streaming = [row for row in sm90_fp16_report if row["layout"] == layout
                 and row["role"] in ("stats", "apply", "backward") and row["config"]["split_rows"] >= 1
                 and not row["kernel"].startswith("finalize")]
    assert streaming
    widest = {(row["kernel"], row["op"]): row["max_load_bits"] for row in streaming}
    assert max(widest.values()) == 128
    assert all(bits == 128 for (kernel, _), bits in widest.items() if "_stats" in kernel or "reduce" in kernel)


@pytest.mark.parametrize(
    "ptx, op, bits",
    [
        pytest.param("ld.global.v4.b32 {%r1, %r2, %r3, %r4}, [%rd1];", "ld", 128, id="v4-b32"),
        pytest.param("@%p1 ld.global.b16 {%rs1}, [%rd2];", "ld", 16, id="scalar-b16"),
        pytest.param("ld.global.L1::evict_last.v2.b32 {%r1, %r2}, [%rd1];", "ld", 64, id="cache-hint-v2"),
        pytest.param("st.global.v4.b32 [%rd1], {%r1, %r2, %r3, %r4};\nld.global.b32 %r5, [%rd2];", "st", 128,
                     id="store"),
    ],
)
def test_widest_access_parser(ptx, op, bits):
    assert _widest_access(ptx, op) == bits
