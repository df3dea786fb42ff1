"""Kernels of known SASS content for tests/test_sass.py, compiled by running this file (a
compiling process: the test process imported Triton interpreted).

``python tests/sass_kernels.py ARCH`` prints, as JSON, ``perf.sass.issue_facts`` of:

- ``loop``: a summing loop over 128-bit loads (1024 fp32 elements an iteration, 4 warps);
- ``loop_barrier``: the same with one ``tl.debug_barrier`` an iteration;
- ``rsqrt``: a loop-free kernel taking one ``rsqrt`` (a MUFU.RSQ) per element.
"""

from __future__ import annotations

import dataclasses
import json
import sys

import torch
import triton
import triton.language as tl

BLOCK = 1024
WARPS = 4


@triton.jit
def summing_loop_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr, BARRIER: tl.constexpr):
    """y[:BLOCK] = column sums of x viewed as [n / BLOCK, BLOCK] (n a multiple of BLOCK)."""
    acc = tl.zeros([BLOCK], tl.float32)
    for start in range(0, n, BLOCK):
        acc += tl.load(x_ptr + start + tl.arange(0, BLOCK))
        if BARRIER:
            tl.debug_barrier()
    tl.store(y_ptr + tl.arange(0, BLOCK), acc)


@triton.jit
def rsqrt_kernel(x_ptr, y_ptr, BLOCK: tl.constexpr):
    """y = rsqrt(x) on one BLOCK a program."""
    offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offsets, tl.math.rsqrt(tl.load(x_ptr + offsets)))


def facts(arch: str) -> dict:
    from tritonbn.autotune.config import KernelConfig
    from tritonbn.inspect import _ptxas_report, compile_kernel
    from tritonbn.launch import CapturedLaunch
    from tritonbn.perf import sass

    data = torch.empty(64 * BLOCK, device="meta")
    launches = {
        "loop": CapturedLaunch(summing_loop_kernel, "loop", 1, KernelConfig(1, BLOCK, num_warps=WARPS),
                               (data, data, 64 * BLOCK), dict(BLOCK=BLOCK, BARRIER=False)),
        "rsqrt": CapturedLaunch(rsqrt_kernel, "rsqrt", 64, KernelConfig(1, BLOCK, num_warps=WARPS),
                                (data, data), dict(BLOCK=BLOCK)),
    }
    launches["loop_barrier"] = dataclasses.replace(launches["loop"], constexprs=dict(BLOCK=BLOCK, BARRIER=True))
    report = {}
    for name, launch in launches.items():
        compiled = compile_kernel(launch, arch)
        parsed = sass.parse(sass.disassemble(compiled.asm["cubin"]))
        registers, _ = _ptxas_report(compiled.asm["ptx"], arch)
        report[name] = dataclasses.asdict(sass.issue_facts(
            parsed, arch, num_warps=WARPS, registers=registers, shared=int(compiled.metadata.shared),
            programs=launch.programs, tile_elements=BLOCK, element_size=4, reads=1, writes=name == "rsqrt",
            active_lanes=1.0))
    return report


if __name__ == "__main__":
    print(json.dumps(facts(sys.argv[1])))
