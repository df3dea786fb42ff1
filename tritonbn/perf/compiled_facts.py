"""The compiled-code facts of benchmark rows: whether bytes or instruction issue bind.

For every tritonbn row of a sweep (a point, a mode, a fusion) ``tritonbn inspect``'s machinery
compiles the launches the call makes for one arch and reads their SASS (``perf/sass.py``): the
row gets its binding launch (the lowest issue-rate ceiling), that kernel's SASS instructions per
element and the ceiling, and the lowest active-lane fraction of its launches.  The ceiling is
*modelled* (the issue model of ``sass.GPUS``); the instruction counts are counted.

Triton compiles only where ``TRITON_INTERPRET`` is unset, and the counting sweep runs under the
interpreter, so the compiling runs in a process of its own (``python -m
tritonbn.perf.compiled_facts``, JSON in and out).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Sequence

import torch

from . import compiling_env, traffic

# bench mode -> the ops whose launches it runs (inspect.OPS)
MODE_OPS = {"inference": ("inference",), "forward": ("training_forward",), "backward": ("backward",),
            "forward_backward": ("training_forward", "backward")}


def point_call(point, mode: str, fusion: str) -> dict:
    """The call of ``point`` (a ``sweeps.Point``) in ``mode``, as ``inspect.call_issue_facts`` takes it."""
    strides = traffic.in_layout(torch.empty(point.shape, device="meta"), point.memory).stride()
    # the bench's training forward runs under autograd: a fused one keeps its ReLU bits
    return dict(shape=list(point.shape), axis=point.axis, strides=list(strides),
                dtype=point.dtype, ops=list(MODE_OPS[mode]), fusion=fusion, keep_mask=mode != "inference")


def facts_of(calls: Sequence[dict], arch: str, timeout: float = 3600) -> list[dict]:
    """``inspect.call_issue_facts`` of ``calls`` for ``arch``, run in a compiling subprocess."""
    result = subprocess.run([sys.executable, "-m", "tritonbn.perf.compiled_facts"],
                            input=json.dumps(dict(arch=arch, calls=list(calls))), capture_output=True, text=True,
                            env=compiling_env(os.environ), timeout=timeout)
    if result.returncode != 0:
        raise RuntimeError(f"compiled_facts failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout)


def binds(ceiling_tbs: float, bandwidth_tbs: float) -> str:
    """"instructions" where the issue-rate ceiling is below the memory bandwidth, else "bytes"."""
    return "instructions" if ceiling_tbs < bandwidth_tbs else "bytes"


def _main() -> None:
    from ..inspect import call_issue_facts

    request = json.load(sys.stdin)
    json.dump(call_issue_facts(request["calls"], request["arch"]), sys.stdout)


if __name__ == "__main__":
    _main()
