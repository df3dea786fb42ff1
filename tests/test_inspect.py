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
import tempfile
from pathlib import Path

import pytest

from tritonbn.inspect import _widest_access

ROOT = Path(__file__).resolve().parents[1]
KERNEL_NAMES = {
    f"{family}_{kind}"
    for family in ("channel_major", "channel_minor")
    for kind in ("stats", "elementwise", "backward_reduce", "persistent_forward", "persistent_backward")
} | {"finalize_stats", "finalize_backward"}


def _inspect(arguments: list[str]) -> list[dict]:
    """Run ``tritonbn inspect`` with ``arguments`` in a compiling (not interpreting) process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kernels.json"
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        result = subprocess.run([sys.executable, "-m", "tritonbn", "inspect", *arguments, "--json", str(out)],
                                capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return json.loads(out.read_text())


@pytest.fixture(scope="module")
def sm90_fp16_report() -> list[dict]:
    return _inspect(["--arch", "sm_90", "--dtype", "fp16"])


def test_every_kernel_compiles_for_sm90(sm90_fp16_report):
    assert {row["kernel"] for row in sm90_fp16_report} == KERNEL_NAMES
    assert all(row["arch"] == "sm_90" and row["registers"] > 0 for row in sm90_fp16_report)


def test_four_group_views_compile_every_kernel(sm90_fp16_report):
    """The step-sliced 5-D views (four reduced groups: outer_mid is a runtime value, not the
    constant 1) of both families compile every kernel, split path and single-pass."""
    stepped = {row["kernel"] for row in sm90_fp16_report if row["layout"] == "stepped-5d"}
    assert stepped == KERNEL_NAMES


def test_no_kernel_spills(sm90_fp16_report):
    assert [row for row in sm90_fp16_report if row["spills"]] == []


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "axis-1"])
def test_streaming_kernels_use_128_bit_accesses_on_aligned_shapes(sm90_fp16_report, layout):
    """Every kernel that streams the data of a vector-aligned call reads 128 bits at a time, and
    the ones that write y or dx store 128 bits at a time; scalar-load layouts (7x7 images, C = 6
    channels_last) are compiled too and marked."""
    streaming = [row for row in sm90_fp16_report if row["layout"] == layout and row["role"] != "finalize"]
    aligned = [row for row in streaming if row["vector_aligned"]]
    assert aligned and {row["role"] for row in aligned} >= {"stats", "apply", "backward", "persistent"}
    assert [(row["kernel"], row["shape"]) for row in aligned if row["max_load_bits"] != 128] == []
    writers = [row for row in aligned if row["role"] in ("apply", "persistent")]
    assert [(row["kernel"], row["shape"]) for row in writers if row["max_store_bits"] != 128] == []


def test_float64_kernels_compile_without_spills():
    """float64 data (float64 accumulation, half the single-pass capacity) is real GPU code too."""
    rows = _inspect(["--arch", "sm_90", "--dtype", "fp64", "--layout", "nchw", "--layout", "channels_last"])
    assert {row["kernel"] for row in rows} >= {"channel_major_persistent_forward", "channel_minor_stats",
                                              "channel_minor_persistent_backward", "finalize_stats"}
    assert [row for row in rows if row["spills"]] == []


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
