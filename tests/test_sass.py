"""The SASS facts of ``tritonbn inspect`` (``tritonbn/perf/sass.py``): the parser and the issue
model on SASS text of known content, the facts of compiled kernels of known content
(``tests/sass_kernels.py``, compiled in a subprocess: this process imported Triton interpreted),
and ``inspect --calls streaming --cubin-dir``'s index of launches and cubins."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from tritonbn.inspect import OPS, STREAMING_CALLS, CompiledKernel, captured_launches, format_budget
from tritonbn.perf import sass

from helpers import compiling_env

ROOT = Path(__file__).resolve().parents[1]

# Two loops (the inner one streams, the outer one does not), a subroutine after EXIT and the
# padding branch to itself that ends every kernel.
KNOWN_SASS = """
        /*0000*/                   S2R R0, SR_TID.X ;
.L_x_1:
        /*0010*/                   IADD3 R1, R1, 0x1, RZ ;
.L_x_0:
        /*0020*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0030*/                   FADD R8, R4, R8 ;
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0050*/                   MUFU.RCP R9, R8 ;
        /*0060*/                   ISETP.GE.AND P0, PT, R1, 0x8, PT ;
        /*0070*/              @!P0 BRA `(.L_x_0) ;
        /*0080*/                   LDG.E.U16 R5, desc[UR4][R6.64] ;
        /*0090*/               @P1 BRA `(.L_x_1) ;
        /*00a0*/                   STG.E.64 desc[UR4][R2.64], R8 ;
        /*00b0*/                   EXIT ;
.L_x_2:
        /*00c0*/                   BRA `(.L_x_2);
        /*00d0*/                   NOP;
$__internal_0_$__cuda_sm3x_div_rn_noftz_f32_slowpath:
        /*00e0*/                   FFMA R0, R1, R2, R3 ;
        /*00f0*/                   RET.REL.NODEC R20 `(kernel) ;
"""


def test_parser_finds_the_streaming_inner_loop():
    parsed = sass.parse(KNOWN_SASS)
    assert len(parsed.instructions) == 13  # no NOP, nothing of the subroutine
    assert sorted(sass.loops(parsed)) == [(0x10, 0x90), (0x20, 0x70)]
    assert sass.hot_loop(parsed) == (0x20, 0x70)


# A streaming loop (two 128-bit loads), a second pass over the same data (as many bits, longer)
# and a finalize tail's loop over channels (five scalar loads: more loads, fewer bits).
THREE_LOOPS = """
.L_x_0:
        /*0000*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0010*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0020*/              @!P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0030*/                   LDG.E.128 R4, desc[UR4][R2.64] ;
        /*0040*/                   LDG.E.128 R8, desc[UR4][R2.64+0x10] ;
        /*0050*/                   FADD R12, R4, -R13 ;
        /*0060*/              @!P1 BRA `(.L_x_1) ;
.L_x_2:
        /*0070*/                   LDG.E.STRONG.GPU R4, desc[UR4][R2.64] ;
        /*0080*/                   LDG.E.STRONG.GPU R5, desc[UR4][R2.64] ;
        /*0090*/                   LDG.E R6, desc[UR4][R2.64] ;
        /*00a0*/                   LDG.E R7, desc[UR4][R2.64] ;
        /*00b0*/                   LDG.E R8, desc[UR4][R2.64] ;
        /*00c0*/              @!P2 BRA `(.L_x_2) ;
        /*00d0*/                   EXIT ;
"""


def test_the_hot_loop_is_the_one_loading_most_data_bits_first_of_equals():
    """A finalize tail's many scalar loads do not make it the hot loop, nor does a rare second
    pass over the data that is longer than the streaming one."""
    parsed = sass.parse(THREE_LOOPS)
    assert sorted(sass.loops(parsed)) == [(0x00, 0x20), (0x30, 0x60), (0x70, 0xc0)]
    assert sass.hot_loop(parsed) == (0x00, 0x20)


@pytest.mark.parametrize("opcode, bits", [("LDG.E.128", 128), ("LDG.E.64", 64), ("LDG.E", 32), ("LDG.E.U16", 16),
                                          ("STG.E.U8", 8), ("LDG.E.128.STRONG.GPU", 128)])
def test_access_widths(opcode, bits):
    assert sass.access_bits(opcode) == bits


def test_facts_of_the_known_loop():
    """2 warps; the loop's one 128-bit fp32 load per thread brings in 4 elements a thread."""
    facts = sass.issue_facts(sass.parse(KNOWN_SASS), "sm_90", num_warps=2, registers=32, shared=0, programs=264,
                             tile_elements=256, element_size=4, reads=1, writes=0, active_lanes=0.5)
    assert facts.in_loop and facts.instructions == 6 and facts.elements == 64 * 4
    assert facts.instructions_per_element == 6 * 64 / 256 and facts.barriers == 1
    assert facts.mufu_per_element == 64 / 256
    assert (facts.widest_load_bits, facts.widest_store_bits) == (128, 64)
    assert facts.ctas_per_sm == 32 and facts.waves == 264 / (32 * 132) and facts.active_lanes == 0.5
    # issue model: 6 warp-instructions per 32 threads x 4 elements; MUFU (1/8 rate) binds:
    # 1 MUFU per 128 elements at 0.5 a clock = 1/64 clock per element vs 6/128/4 issue
    cycles = max(6 / 128 / 4, 1 / 128 / 2, 1 / 128 / 0.5)  # all, half rate (ISETP), eighth (MUFU)
    assert facts.issue_ceiling_tbs == pytest.approx(132 * 1.98e9 / cycles * 4 / 1e12)


@pytest.mark.parametrize("registers, warps, shared, ctas", [
    pytest.param(32, 4, 0, 16, id="threads-bound"),
    pytest.param(128, 4, 0, 4, id="registers-bound"),
    pytest.param(255, 16, 0, 0, id="registers-exceed-the-file"),
    pytest.param(32, 1, 0, 32, id="cta-slots-bound"),
    pytest.param(32, 4, 64 * 1024, 3, id="shared-bound"),
])
def test_ctas_per_sm(registers, warps, shared, ctas):
    assert sass.ctas_per_sm(sass.GPUS["sm_90"], registers, warps, shared) == ctas


def test_waves_and_last_wave_fill():
    gpu = sass.GPUS["sm_90"]
    assert sass.waves(gpu, 132 * 2 * 3, 2) == (3.0, 1.0)
    assert sass.waves(gpu, 132 * 2 + 66, 2) == (1.25, 0.25)


@pytest.fixture(scope="module", params=["sm_80", "sm_90"])
def known_kernels(request) -> dict:
    result = subprocess.run([sys.executable, str(ROOT / "tests" / "sass_kernels.py"), request.param],
                            capture_output=True, text=True, env=compiling_env(), cwd=ROOT, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def test_compiled_loop_facts(known_kernels):
    """A summing loop of 128-bit loads: found, no barrier; one ``debug_barrier`` an iteration
    counts 1 a tile whatever ptxas unrolls."""
    loop, with_barrier = known_kernels["loop"], known_kernels["loop_barrier"]
    assert loop["in_loop"] and with_barrier["in_loop"]
    assert loop["barriers"] == 0 and with_barrier["barriers"] == 1
    assert loop["widest_load_bits"] == 128 and loop["elements"] % 1024 == 0
    assert 0 < loop["instructions_per_element"] < with_barrier["instructions_per_element"]


def test_compiled_loop_free_facts(known_kernels):
    """One rsqrt an element is one MUFU an element; no loop, 128-bit accesses."""
    rsqrt = known_kernels["rsqrt"]
    assert not rsqrt["in_loop"] and rsqrt["mufu_per_element"] == 1.0
    assert (rsqrt["widest_load_bits"], rsqrt["widest_store_bits"]) == (128, 128)


def _launches_of(calls, dtype) -> int:
    return sum(len(captured_launches(shape, axis, memory_format, dtype, op))
               for shape, axis, memory_format in calls for op in OPS)


def test_streaming_calls_write_a_cubin_index():
    """``inspect --calls streaming --cubin-dir``: a row per launch in the JSON and in index.json,
    each naming a cubin that exists and disassembles to the facts reported."""
    with tempfile.TemporaryDirectory() as tmp:
        report, cubins = Path(tmp) / "report.json", Path(tmp) / "cubins"
        result = subprocess.run([sys.executable, "-m", "tritonbn", "inspect", "--calls", "streaming", "--arch", "sm_90",
                                 "--dtype", "bf16", "--layout", "channels_last", "--json", str(report),
                                 "--cubin-dir", str(cubins)],
                                capture_output=True, text=True, env=compiling_env(), cwd=ROOT, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        rows, index = json.loads(report.read_text()), json.loads((cubins / "index.json").read_text())
        assert len(rows) == len(index) == _launches_of(STREAMING_CALLS["channels_last"], torch.bfloat16)
        for row, entry in zip(rows, index):
            assert {k: entry[k] for k in ("kernel", "arch", "dtype", "layout", "op", "config", "programs")} == \
                {k: row[k] for k in ("kernel", "arch", "dtype", "layout", "op", "config", "programs")}
            assert entry["shape"] == list(row["shape"]) and entry["programs"] > 0
            parsed = sass.parse(sass.disassemble((cubins / entry["cubin"]).read_bytes()))
            loop, region = sass.hot_region(parsed)
            assert (loop is not None, len(region)) == (row["sass"]["in_loop"], row["sass"]["instructions"])
        assert {row["kernel"] for row in rows if row["op"] == "training_forward"} >= {"channel_minor_stats"}
        stats = [row["sass"] for row in rows if row["kernel"] == "channel_minor_stats"]
        assert all(f["in_loop"] and f["instructions_per_element"] > 0 and f["barriers"] == 0 for f in stats)
        assert "issue 14's budget:" in result.stdout


def _row(**facts) -> CompiledKernel:
    sass_facts = dict(in_loop=True, barriers=0, issue_ceiling_tbs=10.0, active_lanes=1.0, ctas_per_sm=2, waves=0.5,
                      last_wave_fill=0.5)
    sass_facts.update(facts)
    return CompiledKernel(kernel="k", role=sass_facts.pop("role", "stats"), dtype="bf16", layout="nchw",
                          op="training_forward", config={}, arch="sm_90", registers=32, spills=0, shared=0,
                          max_load_bits=128, max_store_bits=128, sass=sass_facts)


def test_budget_counts_each_target_over_the_launches_it_applies_to():
    """Barriers count in loops only, CTAs per SM on split-path launches, the last wave on
    launches of 1-4 waves."""
    rows = [_row(), _row(issue_ceiling_tbs=2.6, barriers=4, active_lanes=0.77),
            _row(in_loop=False, barriers=3, role="persistent", ctas_per_sm=1, waves=1.2, last_wave_fill=0.2),
            _row(waves=2.0, last_wave_fill=1.0)]
    assert format_budget(rows).splitlines()[1:] == [
        "  issue-rate ceiling >= 9.6 TB/s: 3 of 4", "  no barrier in a hot-loop iteration: 2 of 3",
        "  active lanes >= 95%: 3 of 4", "  >= 2 CTAs per SM (split-path launches): 3 of 3",
        "  last wave >= 75% full (launches of 1-4 waves): 1 of 2"]
