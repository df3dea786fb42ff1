"""Direct launches (``tritonbn/launch.py``): after its first launch through ``kernel[grid]``, a
call plan's ``Launch`` calls the compiled kernel's launcher itself.  That is right only if it
hands the launcher what Triton's own path hands it.

The check runs in a compiling subprocess (this process imported the kernels interpreted) under
``tritonbn overhead``'s CPU method: kernels compiled for sm_90, a launcher that records its
arguments instead of launching.  Every path of every family runs twice with the same signature:
the first call goes through Triton's ``JITFunction.run``, the second must not, and the launcher
must receive the same grid, stream, function, metadata and kernel arguments (tensors compared by
dtype, shape and strides: outputs are new allocations) in both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import compiling_env

ROOT = Path(__file__).resolve().parents[1]

_COMPARE = """
import json, sys
import torch
from triton.runtime.jit import JITFunction
import tritonbn
from tritonbn import trace
from tritonbn.perf import overhead

runs = [0]
original_run = JITFunction.run
def counted_run(self, *args, **kwargs):
    runs[0] += 1
    return original_run(self, *args, **kwargs)
JITFunction.run = counted_run

def describe(arg):
    if isinstance(arg, torch.Tensor):
        return ["tensor", str(arg.dtype), list(arg.shape), list(arg.stride())]
    return repr(arg)

def compare(counter, shape, layout, mode):
    dims = [int(d) for d in shape.split("x")]
    x = torch.randn(dims, dtype=torch.float16)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    C = dims[1]
    params = [torch.ones(C), torch.zeros(C), torch.zeros(C), torch.ones(C)]
    calls = []
    for attempt in range(2):
        before_runs, before_args = runs[0], len(counter.arguments)
        with trace.capture() as t:
            if mode == "backward":
                xg = x.clone().requires_grad_()
                y = tritonbn.batch_norm(xg, *params, training=True, fix_gamma=False)
                y.backward(torch.ones_like(y))
            else:
                tritonbn.batch_norm(x, *params, training=mode == "training")
        launched = counter.arguments[before_args:]
        calls.append({"kernels": t.kernels(), "jit_runs": runs[0] - before_runs,
                      "launches": [[describe(a) for i, a in enumerate(args) if i not in (6, 7, 8)]
                                   for args in launched],
                      "hooks": [[a is None for a in args[6:9]] for args in launched]})
    return calls

with overhead.compiled_sm90_on_cpu() as counter:
    counter.arguments = []
    print(json.dumps({case: compare(counter, *case.split(",")) for case in sys.argv[1:]}))
"""

CASES = [  # (shape, layout, mode): every path of both families
    ("4x4x128x128", "nchw", "training"),         # channel-major split: stats, finalize, elementwise
    ("4x4x8x8", "nchw", "training"),             # channel-major persistent
    ("4x4x8x8", "nchw", "inference"),
    ("64x16x32x32", "channels_last", "training"),  # channel-minor split
    ("4x16x8x8", "channels_last", "training"),     # channel-minor persistent
    ("4x16x8x8", "channels_last", "inference"),
    ("4x4x128x128", "nchw", "backward"),         # forward and backward split
    ("4x16x8x8", "channels_last", "backward"),     # forward and backward persistent
]


@pytest.fixture(scope="module")
def compared() -> dict[str, list[dict]]:
    """Every case's two calls, from one compiling subprocess."""
    env = compiling_env()
    cases = [",".join(case) for case in CASES]
    result = subprocess.run([sys.executable, "-c", _COMPARE, *cases], capture_output=True, text=True, env=env,
                            cwd=ROOT, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return json.loads(result.stdout.splitlines()[-1])


@pytest.mark.parametrize("shape,layout,mode", CASES, ids=[f"{m}-{s}-{layout}" for s, layout, m in CASES])
def test_direct_launch_hands_the_launcher_what_triton_does(compared, shape, layout, mode):
    first, second = compared[f"{shape},{layout},{mode}"]
    assert first["kernels"] == second["kernels"] and first["kernels"]
    assert first["jit_runs"] == len(first["kernels"])  # the first call compiles through kernel[grid]
    assert second["jit_runs"] == 0  # the second launches directly
    assert len(second["launches"]) == len(first["launches"]) == len(first["kernels"])
    assert second["launches"] == first["launches"]
    assert all(all(none) for none in second["hooks"])  # no launch metadata or hooks built


# (numerator, denominator): quotients the finalize tails take from the host instead of dividing
RATIOS = [(1, 3), (1, 7), (1, 3136), (1, 100352), (12544, 12543), (1, 2**24 + 2), (3, 2**26), (2**25 + 1, 2**25), (2**24 + 1, 2**24)]


@pytest.mark.parametrize("numerator, denominator", RATIOS, ids=[f"{n}/{d}" for n, d in RATIOS])
def test_f32_ratio_is_the_correctly_rounded_float32_quotient(numerator, denominator):
    """``launch.f32_ratio`` rounds the exact quotient to the nearest float32 (ties to even), as a
    kernel's correctly rounded float32 division would: no neighbour is nearer."""
    import fractions

    import numpy as np

    from tritonbn.launch import f32_ratio

    value = np.float32(f32_ratio(numerator, denominator))
    exact = fractions.Fraction(numerator, denominator)
    error = abs(fractions.Fraction(float(value)) - exact)
    for neighbour in (np.nextafter(value, np.float32(-np.inf)), np.nextafter(value, np.float32(np.inf))):
        other = abs(fractions.Fraction(float(neighbour)) - exact)
        assert error < other or (error == other and int(value.view(np.uint32)) % 2 == 0)


# (shape, axis, memory format, config): channel-major splits short in rows and columns (and one
# empty row split), and channel-minor splits with a short last one.
SPLIT_CASES = [
    pytest.param((7, 3, 10), 1, None, (2, 4, 3, 2), id="channel-major"),
    pytest.param((5, 3, 4, 4), 1, "channels_last", (16, 4, 3, 1), id="channel-minor"),
]


@pytest.mark.parametrize("shape, axis, memory_format, config", SPLIT_CASES)
def test_statistics_launch_passes_the_inverse_of_every_split_count(shape, axis, memory_format, config):
    """The statistics kernels divide a split's sums by the host's correctly rounded 1 / count,
    picked by whether the split's rows (and columns) are the full extent: for every split the
    one picked is 1 / its element count.  (The interpreter divides instead, so only this checks
    the values a compiled kernel uses.)"""
    import torch

    from tritonbn import ops
    from tritonbn.autotune import KernelConfig
    from tritonbn.launch import f32_ratio
    from tritonbn.plan import CHANNEL_MAJOR, plan_view

    x = torch.empty(shape)
    if memory_format:
        x = x.to(memory_format=torch.channels_last)
    plan = ops.kernel_view(plan_view(shape, axis, [x.stride()]))
    block_rows, block_cols, split_rows, split_cols = config
    cfg = KernelConfig(block_rows, block_cols, split_rows=split_rows, split_cols=split_cols)
    launch = ops.statistics_launch(plan, cfg)
    rows_per_split, cols_per_split = ops._split_extents(plan, cfg)
    major = plan.family == CHANNEL_MAJOR
    rows, cols = (plan.outer, plan.inner) if major else (plan.m, 1)
    cols_per_split, split_cols = (cols_per_split, split_cols) if major else (1, 1)
    import inspect

    names = [name for name, param in inspect.signature(launch.kernel.fn).parameters.items()
             if param.annotation is inspect.Parameter.empty or "constexpr" not in str(param.annotation)]
    scalars = dict(zip(names[-len(launch.scalars):], launch.scalars))
    inverses = [scalars[name] for name in (("inverse_split", "inverse_short_cols", "inverse_short_rows",
                                            "inverse_short_both") if major else ("inverse_split", "inverse_short"))]
    checked = 0
    for split_o in range(split_rows):
        for split_i in range(split_cols):
            o_extent = max(0, min(rows_per_split, rows - split_o * rows_per_split))
            i_extent = max(0, min(cols_per_split, cols - split_i * cols_per_split))
            if not o_extent * i_extent:
                continue  # an empty split: its sums are 0, any inverse gives mean 0
            full_rows, full_cols = o_extent == rows_per_split, i_extent == cols_per_split
            picked = (inverses[(0 if full_rows else 2) + (0 if full_cols else 1)] if major
                      else inverses[0 if full_rows else 1])
            assert picked == f32_ratio(1, o_extent * i_extent), (split_o, split_i)
            checked += 1
    assert checked >= 3
