"""The traffic and launch targets of the kernel-performance issue, counted by the traffic counter.

Each case is counted under Triton's interpreter (conftest) with the launch decisions made for
an H100; bytes moved are everything the kernels load and store (data, parameters, partials)
over S, the bytes of the data tensor.  Targets:

    inference:         1 launch, <= 2.05 S
    training forward:  1 launch, <= 2.1 S when a channel's slice fits one program,
                       else 2 launches (the reductions finalize themselves), <= 3.1 S
    backward:          1 launch, <= 3.1 S when it fits, else 2 launches, <= 5.1 S
    split path, C <= 64: the widest launch has >= 128 programs
    no layout makes more launches than NCHW for the same shape, nor moves more bytes (within
    0.015 S: a channel-minor program covers several channels and loads each one's coefficients)

The shapes keep realistic slices per channel (the ratio of per-channel bytes to data bytes is
what the targets are about) with few channels, so the interpreter stays quick.
"""

from __future__ import annotations

import pytest
import torch

from tritonbn.perf.traffic import measure

FITS = {"inference": (1, 2.05), "forward": (1, 2.1), "backward": (1, 3.1)}
SPLIT = {"inference": (1, 2.05), "forward": (2, 3.1), "backward": (2, 5.1)}

# (id, logical (N, C, *spatial), does a channel's slice fit one program in NCHW)
CASES = [
    ("resnet-2048@7-n32", (32, 4, 7, 7), True),  # m = 1568, scalar loads (7x7)
    ("small-C-fits", (2, 6, 4096), True),  # m = 8192: channels_last needs co-resident narrow tiles
    ("small-C-split", (4, 3, 16384), False),  # m = 65536: split path in every layout
    ("mlp", (4096, 8), True),  # (N, C): m = 4096
]
LAYOUTS = {
    "NCHW": lambda logical: (logical, "contiguous", 1),
    "channels_last": lambda logical: (logical, "channels_last_1d" if len(logical) == 3 else "channels_last", 1),
    "axis=-1": lambda logical: ((logical[0], *logical[2:], logical[1]), "contiguous", -1),
}


def _counted(logical, layout, dtype):
    shape, memory, axis = LAYOUTS[layout](logical)
    return measure("all", shape, memory, dtype, axis=axis)


def _applies(logical, layout):
    return layout == "NCHW" or len(logical) > 2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("name, logical, fits", [pytest.param(*case, id=case[0]) for case in CASES])
def test_issue_targets_in_every_layout(name, logical, fits, dtype):
    counted = {layout: _counted(logical, layout, dtype) for layout in LAYOUTS if _applies(logical, layout)}
    for layout, results in counted.items():
        for op, (launches, per_s) in (FITS if fits else SPLIT).items():
            result = results[op]
            where = f"{layout} {op}: {result.summary()}"
            assert result.n_launches <= launches and result.per_s <= per_s, where
            if not fits and op != "inference" and logical[1] <= 64:
                assert max(result.programs) >= 128, where
            nchw = counted["NCHW"][op]
            assert result.n_launches <= nchw.n_launches, f"{where} vs NCHW {nchw.summary()}"
            assert result.per_s <= nchw.per_s + 0.015, f"{where} vs NCHW {nchw.summary()}"
