"""The GPU code is real: every kernel compiles for sm_90 with the configs the library picks,
without spills, with 128-bit global accesses where the data streams, and with correctly rounded
arithmetic where the numerics rely on exact steps (no approximate division: the allowlist
``inspect.ALLOWED_APPROXIMATE`` is empty).

The compilation runs ``tritonbn inspect`` in a subprocess: this test process imported the
kernels in interpreter mode (conftest), and Triton decides that at import.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tritonbn.inspect import CompiledKernel, _widest_access, approximate_ops

from helpers import compiling_env

ROOT = Path(__file__).resolve().parents[1]
KERNEL_NAMES = {
    f"{family}_{kind}"
    for family in ("channel_major", "channel_minor")
    for kind in ("stats", "elementwise", "backward_reduce", "persistent_forward", "persistent_backward")
}


def _inspect(arguments: list[str]) -> list[dict]:
    """Run ``tritonbn inspect`` with ``arguments`` in a compiling (not interpreting) process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "kernels.json"
        env = compiling_env()
        result = subprocess.run([sys.executable, "-m", "tritonbn", "inspect", *arguments, "--json", str(out)],
                                capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return json.loads(out.read_text())


@pytest.fixture(scope="module")
def sm90_fp16_report() -> list[dict]:
    return _inspect(["--arch", "sm_90", "--dtype", "fp16"])


@pytest.fixture(scope="module")
def sm90_fp32_report() -> list[dict]:
    return _inspect(["--arch", "sm_90", "--dtype", "fp32"])


@pytest.fixture(scope="module")
def sm90_fp64_report() -> list[dict]:
    return _inspect(["--arch", "sm_90", "--dtype", "fp64", "--layout", "nchw", "--layout", "channels_last"])


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
    streaming = [row for row in sm90_fp16_report if row["layout"] == layout]
    aligned = [row for row in streaming if row["vector_aligned"]]
    assert aligned and {row["role"] for row in aligned} >= {"stats", "apply", "backward", "persistent"}
    assert [(row["kernel"], row["shape"]) for row in aligned if row["max_load_bits"] != 128] == []
    writers = [row for row in aligned if row["role"] in ("apply", "persistent")]
    assert [(row["kernel"], row["shape"]) for row in writers if row["max_store_bits"] != 128] == []


def test_float64_kernels_compile_without_spills(sm90_fp64_report):
    """float64 data (float64 accumulation, half the single-pass capacity) is real GPU code too."""
    assert {row["kernel"] for row in sm90_fp64_report} >= {"channel_major_persistent_forward", "channel_minor_stats",
                                                          "channel_minor_persistent_backward", "channel_major_stats"}
    assert [row for row in sm90_fp64_report if row["spills"]] == []


@pytest.mark.parametrize("dtype", ["fp16", "fp32", "fp64"])
def test_no_approximate_math_where_exactness_is_claimed(request, dtype):
    """Every division, reciprocal and square root of every kernel compiles to a correctly rounded
    instruction (div.rn, sqrt.rn; products with exact powers of two), except the approximations
    that ``inspect.ALLOWED_APPROXIMATE`` names with their reason.  A plain float32 ``/`` in a
    kernel (``div.full.f32``, 2 ulp) fails here; use ``common.exact_div``."""
    report = request.getfixturevalue(f"sm90_{dtype}_report")
    unexpected = [(row["kernel"], row["layout"], CompiledKernel(**row).unexpected_approximations()) for row in report]
    assert [entry for entry in unexpected if entry[2]] == []


@pytest.mark.parametrize("dtype", ["fp16", "fp32", "fp64"])
def test_statistics_loops_divide_nothing(request, dtype):
    """The statistics kernels' hot loops are shifted sums: no float division and no MUFU per
    element (the per-lane Welford update they replaced divided by the count at every element).
    Step-sliced views are the exception for MUFU: their rows' integer divisions (four reduced
    groups) go through a MUFU.RCP each."""
    report = request.getfixturevalue(f"sm90_{dtype}_report")
    stats = [row for row in report if row["kernel"].endswith("_stats")]
    assert stats and all(row["approximate"] == {} for row in stats)
    assert all(row["sass"]["mufu_per_element"] == 0 for row in stats if row["layout"] != "stepped-5d")


# A kernel of each kind of float32 division, compiled for sm_90 in a subprocess (as _inspect).
_DIVISIONS = """
import triton, triton.language as tl
from tritonbn.inspect import approximate_ops
from tritonbn.kernels.common import exact_div

@triton.jit
def divide(a_ptr, b_ptr, out_ptr, KIND: tl.constexpr):
    a = tl.load(a_ptr + tl.arange(0, 128))
    b = tl.load(b_ptr + tl.arange(0, 128))
    if KIND == "plain":
        q = a / b
    else:
        q = exact_div(a, b)
    tl.store(out_ptr + tl.arange(0, 128), q)

from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
for kind in ("plain", "exact"):
    source = ASTSource(divide, {"a_ptr": "*fp32", "b_ptr": "*fp32", "out_ptr": "*fp32", "KIND": "constexpr"},
                       constexprs={"KIND": kind})
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    print(kind, sorted(approximate_ops(ptx)), "div.rn.f32" in ptx)
"""


def test_a_plain_float32_division_is_what_the_check_catches():
    """The check sees what this Triton makes of a plain float32 ``/`` (div.full.f32, which
    ``ALLOWED_APPROXIMATE`` never allows), and ``common.exact_div`` compiles to div.rn.f32."""
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "divisions.py"  # triton.jit reads the kernel's source from a file
        script.write_text(_DIVISIONS)
        env = compiling_env()
        result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, cwd=ROOT,
                                timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split("\n")[:2] == ["plain ['div.full.f32'] False", "exact [] True"]


@pytest.mark.parametrize(
    "ptx, counts",
    [
        pytest.param("div.full.f32 %f3, %f1, %f2;", {"div.full.f32": 1}, id="plain-float32-division"),
        pytest.param("\t// begin inline asm\n\tdiv.full.f32 %r3, %r1, %r2;\n\t// end inline asm\n"
                     "\tdiv.full.f32 %f3, %f1, %f2;", {"div.full.f32 (inline asm)": 1, "div.full.f32": 1},
                     id="inline-asm-division"),
        pytest.param("div.approx.f32 %f3, %f1, %f2;\ndiv.approx.f32 %f4, %f1, %f2;", {"div.approx.f32": 2},
                     id="approx-twice"),
        pytest.param("div.approx.ftz.f32 %f3, %f1, %f2;", {"div.approx.ftz.f32": 1}, id="approx-ftz"),
        pytest.param("rcp.approx.ftz.f64 %fd2, %fd1;", {"rcp.approx.ftz.f64": 1}, id="rcp-f64"),
        pytest.param("rsqrt.approx.f32 %f2, %f1;\nex2.approx.ftz.f32 %f3, %f2;\nlg2.approx.f32 %f4, %f3;",
                     {"rsqrt.approx.f32": 1, "ex2.approx.ftz.f32": 1, "lg2.approx.f32": 1}, id="fast-math"),
        pytest.param("div.rn.f32 %f3, %f1, %f2;\nsqrt.rn.f32 %f4, %f3;\ndiv.rn.f64 %fd3, %fd1, %fd2;", {},
                     id="correctly-rounded"),
        pytest.param("div.s32 %r3, %r1, %r2;\nrem.s32 %r4, %r1, %r2;", {}, id="integer-division"),
    ],
)
def test_approximate_ops_parser(ptx, counts):
    assert approximate_ops(ptx) == counts


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
