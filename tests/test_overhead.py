"""``tritonbn overhead``: host cost per call, per op and per layer, beside torch's.

The CPU method compiles the kernels for sm_90 and runs Triton's launch path with a no-op CUDA
launcher, so it runs in a subprocess (this test process imported the kernels interpreted:
conftest sets TRITON_INTERPRET=1, and Triton decides that at import).  The subprocess also
reports, after the command returned, whether anything of the no-op launcher is still installed.
The rest checks the arithmetic of the layers and the patching helpers in-process.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path
from types import SimpleNamespace

import pytest

from tritonbn.perf import overhead

from helpers import compiling_env

ROOT = Path(__file__).resolve().parents[1]
SHAPE = "4x4x128x128"  # a channel's slice (65536) beyond one program: the split path, 2 + 2 launches

# Runs the command, then reports what the no-op launcher left behind (it must leave nothing).
_RUN_AND_CHECK = """
import json, sys
from triton.runtime.driver import driver
import tritonbn.library, tritonbn.ops
from tritonbn.cli import main
from tritonbn.perf import overhead

before = (driver._active, tritonbn.ops.backend_for, tritonbn.library.backend_for)
status = main(sys.argv[1:])
after = (driver._active, tritonbn.ops.backend_for, tritonbn.library.backend_for)
print(json.dumps({"status": status, "restored": all(a is b for a, b in zip(before, after)),
                  "installed": overhead.noop_launcher_installed()}))
"""


@pytest.fixture(scope="module")
def cpu_run() -> SimpleNamespace:
    """``tritonbn overhead --method cpu --quick`` on a small split-path shape, in a compiling process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "overhead.json"
        env = compiling_env()
        result = subprocess.run([sys.executable, "-c", _RUN_AND_CHECK, "overhead", "--method", "cpu", "--quick",
                                 "--shape", SHAPE, "--json", str(out)],
                                capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        report = json.loads(out.read_text())
    return SimpleNamespace(stdout=result.stdout, report=report, after=json.loads(result.stdout.splitlines()[-1]))


def _result(cpu_run, op: str) -> dict:
    (result,) = [r for r in cpu_run.report["results"] if r["op"] == op]
    return result


@pytest.mark.parametrize("op", overhead.OPS)
def test_every_op_has_positive_times_and_its_target(cpu_run, op):
    r = _result(cpu_run, op)
    assert r["tritonbn_us"] > 0 and r["torch_us"] > 0
    assert r["ratio"] == pytest.approx(r["tritonbn_us"] / r["torch_us"])
    assert r["target"] == overhead.TARGETS[op] and r["met"] == (r["ratio"] <= r["target"])
    assert r["torch_shape"] == "2x4x1x1"


@pytest.mark.parametrize("op", overhead.OPS)
def test_every_launch_reached_the_no_op_launcher(cpu_run, op):
    """The real Triton launch path ran: each launch the trace recorded went through the JIT
    (binder, specialisation, kernel cache) and ``CompiledKernel.run`` to the patched launcher."""
    r = _result(cpu_run, op)
    assert r["launches_traced"] >= 1
    assert r["launches_reached_launcher"] == r["launches_traced"]


def test_kernels_were_compiled_for_sm90(cpu_run):
    assert cpu_run.report["compiled_for"] == [["cuda", 90]]
    assert cpu_run.report["method"] == "cpu"
    assert "CPU, no-op CUDA launcher, Triton" in cpu_run.report["description"]


def test_the_no_op_launcher_is_uninstalled_afterwards(cpu_run):
    """Triton's active driver, ``ops.backend_for`` and ``library.backend_for`` are the objects of
    before, and no kernel keeps a cache for the no-op device."""
    assert cpu_run.after == {"status": 0, "restored": True, "installed": False}
    assert cpu_run.report["launcher_uninstalled"] is True


@pytest.mark.parametrize("op", overhead.OPS)
def test_layers_partition_the_call(cpu_run, op):
    r = _result(cpu_run, op)
    rows = {row["layer"]: row["us"] for row in r["layers"]}
    assert {"launches", "  of which Triton run", "plan/config decisions", "allocation", "other"} <= set(rows)
    assert all(math.isfinite(value) for value in rows.values())
    listed = sum(value for name, value in rows.items() if not name.startswith(" "))
    assert listed == pytest.approx(r["tritonbn_us"])


def test_output_names_the_method_and_the_command(cpu_run):
    assert "method: CPU, no-op CUDA launcher, Triton" in cpu_run.stdout
    assert f"reproduce: env -u TRITON_INTERPRET python -m tritonbn overhead --method cpu --dtype fp16 " \
           f"--shape {SHAPE} --quick" in cpu_run.stdout
    for op in overhead.OPS:
        assert f"{overhead.op_label(op, SHAPE)}, {SHAPE} NCHW:" in cpu_run.stdout


# ----------------------------------------------------------------------------- in-process parts


@pytest.mark.parametrize("spec, shape, layout", [
    pytest.param("32x64x56x56", (32, 64, 56, 56), "nchw", id="nchw-default"),
    pytest.param("32x2048x7x7:channels_last", (32, 2048, 7, 7), "channels_last", id="channels-last"),
    pytest.param("8,16,4,4,4:channels_last_3d", (8, 16, 4, 4, 4), "channels_last_3d", id="commas-3d"),
])
def test_parse_case(spec, shape, layout):
    case = overhead.parse_case(spec)
    assert (case.shape, case.layout) == (shape, layout)
    assert overhead.parse_case(case.spec) == case


@pytest.mark.parametrize("spec", [pytest.param("32", id="no-channels"), pytest.param("4x0x2", id="zero-extent"),
                                  pytest.param("4x4:nhwc", id="unknown-layout"), pytest.param("4xa", id="not-int")])
def test_parse_case_rejects(spec):
    with pytest.raises(argparse.ArgumentTypeError):
        overhead.parse_case(spec)


def _samples(per_round: dict[str, list[float]]) -> overhead.Samples:
    """Samples whose every round holds the given per-round values (one call a round)."""
    return {name: [[value] for value in values] for name, values in per_round.items()}


def test_paired_differences_cancel_a_drift_of_load():
    """Round by round, the knocked-out call drifts with the call: the layer is the difference."""
    drift = [1.0, 5.0, 9.0, 2.0, 7.0]
    samples = _samples({"call": [d + 3.0 for d in drift], "without x": drift})
    assert overhead.paired(samples, ["call"], ["without x"]) == pytest.approx(3.0)


@pytest.mark.parametrize("op", overhead.OPS)
def test_layer_arithmetic(op):
    """Each knocked-out call costs its layer less than the call; "other" is what remains."""
    costs = {"validation": 2.0, "plan/config decisions": 3.0, "allocation": 1.0, "launches": 8.0,
             "  of which Triton run": 6.0, "autograd Function": 4.0}
    whole = 40.0
    per_round = {"call": [whole] * 3, "forward": [10.0] * 3, "backward": [whole - 25.0] * 3, "op": [whole - 7.0] * 3}
    base = per_round["backward"][0] if op == "forward_backward" else whole
    per_round.update({f"without {layer}": [base - cost] * 3 for layer, cost in costs.items()})
    rows = dict(overhead.layers(op, _samples(per_round)))
    assert rows["launches"] == pytest.approx(8.0) and rows["  of which Triton run"] == pytest.approx(6.0)
    assert sum(v for name, v in rows.items() if not name.startswith(" ")) == pytest.approx(whole)
    expected = {"forward_backward": {"forward call": 10.0, "autograd backward": 15.0},
                "nn_training_forward": {"module": 7.0, "autograd Function": 4.0},
                "inference": {"autograd Function": 4.0}, "training_forward": {"validation": 2.0}}[op]
    assert {name: rows[name] for name in expected} == pytest.approx(expected)


def test_patch_restores_and_memo_cycles():
    holder = SimpleNamespace(value=lambda: "real")
    memo = overhead._memo(["a", "b"])
    patch = overhead.Patch([(holder, "value", memo)])
    seen = []
    patch.around(lambda: seen.extend([holder.value(), holder.value(), holder.value()]))()
    assert seen == ["a", "b", "a"] and holder.value() == "real"
