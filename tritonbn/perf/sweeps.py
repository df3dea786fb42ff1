"""What the benchmark sweeps: shapes, layouts, dtypes, modes (GitHub issue 5).

A ``Case`` is a logical problem ``(N, C, *spatial)`` with the channel at index 1, a family and a
label; a ``Layout`` turns it into the tensor that is run (shape, channel axis, memory format):

| layout          | tensor                         | axis | memory                              |
|-----------------|--------------------------------|------|-------------------------------------|
| NCHW            | (N, C, *spatial)               | 1    | contiguous (channel-major)          |
| channels_last   | (N, C, *spatial)               | 1    | channel fastest (channels_last[_3d])|
| axis=-1         | (N, *spatial, C)               | -1   | contiguous (channel-minor)          |
| middle          | (N, spatial[0], C, *rest)      | 2    | contiguous, 4-D and up              |

A layout that would repeat another one for a rank (channels_last or axis=-1 of a 2-D (N, C),
middle of a 3-D shape) does not apply to it.  Each case also has a CPU-sized shape with the
same structure, small enough for Triton's interpreter (the whole CPU quick sweep runs in about
two minutes on two cores).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "Case", "Layout", "Point", "LAYOUTS", "DTYPES", "MODES", "MIN_PASSES", "TORCH_PASSES", "FUSIONS",
    "FUSION_TITLES", "FUSED_MIN_PASSES", "TORCH_CHAIN_PASSES", "UNFUSED",
    "FULL_CASES", "QUICK_CASES", "points", "dtype_name",
]

# mode -> minimal global-memory traffic, in units of S (bytes of the data tensor)
MIN_PASSES = {"inference": 2, "forward": 2, "backward": 3, "forward_backward": 5}
# mode -> passes of torch's documented CUDA design (stats pass + elementwise pass forward;
# reduce pass (x, dy) + elementwise pass (x, dy -> dx) backward): *modelled*, not counted
TORCH_PASSES = {"inference": 2, "forward": 3, "backward": 5, "forward_backward": 8}
MODES = tuple(MIN_PASSES)
MODE_TITLES = {"inference": "inference forward", "forward": "training forward",
               "backward": "training backward", "forward_backward": "training forward + backward"}

# The fused chains the sweep runs: "none" is BatchNorm alone; the others are the op with
# act_type/addend (``traffic.FUSIONS``), against torch's chain of separate ops.
FUSIONS = ("none", "relu", "add", "add_relu")
FUSION_TITLES = {"none": "BatchNorm", "relu": "BatchNorm + ReLU", "add": "BatchNorm + add",
                 "add_relu": "BatchNorm + add + ReLU"}
UNFUSED = "tritonbn-unfused"  # the fused chains' provider: tritonbn's batch norm, then torch's add and ReLU
# fusion -> mode -> minimal traffic / S: x (and the addend) read and y written forward; x and dy
# read, dx (and daddend) written backward.  With an addend but no ReLU, daddend is dy itself.
FUSED_MIN_PASSES = {
    "none": MIN_PASSES,
    "relu": MIN_PASSES,
    "add": {"inference": 3, "forward": 3, "backward": 3, "forward_backward": 6},
    "add_relu": {"inference": 3, "forward": 3, "backward": 4, "forward_backward": 7},
}
# fusion -> mode -> passes of torch's unfused chain on its CUDA design (*modelled*): the batch
# norm's passes above, an add reads 2 S and writes S, a ReLU reads and writes S; backward a
# ReLU reads dy and its output and writes S, an add passes its gradient on untouched.
TORCH_CHAIN_PASSES = {
    "none": TORCH_PASSES,
    "relu": {"inference": 4, "forward": 5, "backward": 8, "forward_backward": 13},
    "add": {"inference": 5, "forward": 6, "backward": 5, "forward_backward": 11},
    "add_relu": {"inference": 7, "forward": 8, "backward": 8, "forward_backward": 16},
}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


@dataclass(frozen=True)
class Case:
    """A logical problem (N, C, *spatial), its family, label and CPU-sized counterpart."""

    family: str
    label: str
    logical: tuple[int, ...]
    cpu_logical: tuple[int, ...] | None = None
    layouts: tuple[str, ...] | None = None  # None: every layout that applies

    def for_cpu(self) -> "Case":
        """The same case at its CPU (interpreter) size."""
        logical = self.cpu_logical or self.logical
        return Case(self.family, self.label, logical, None, self.layouts)


@dataclass(frozen=True)
class Layout:
    """How a logical (N, C, *spatial) becomes the tensor run."""

    name: str
    description: str

    def realize(self, logical: Sequence[int]) -> tuple[tuple[int, ...], int, str] | None:
        """(tensor shape, channel axis, memory layout for ``traffic.make_data``), or None."""
        n, c, *spatial = logical
        if self.name == "NCHW":
            return tuple(logical), 1, "contiguous"
        if self.name == "channels_last":
            return (tuple(logical), 1, "channels_last") if spatial else None
        if self.name == "axis=-1":
            return ((n, *spatial, c), len(logical) - 1, "contiguous") if spatial else None
        if self.name == "middle":
            return ((n, spatial[0], c, *spatial[1:]), 2, "contiguous") if len(spatial) >= 2 else None
        raise ValueError(f"unknown layout {self.name!r}")


LAYOUTS = {
    layout.name: layout for layout in (
        Layout("NCHW", "channel axis 1, contiguous"),
        Layout("channels_last", "channel axis 1, channel stored fastest (channels_last / channels_last_3d)"),
        Layout("axis=-1", "channel last, contiguous (N, ..., C) with axis=-1"),
        Layout("middle", "channel at axis 2 of (N, D1, C, ...), contiguous"),
    )
}


def _resnet50(batch: int, cpu_batch: int) -> list[Case]:
    # (C, H=W) of every BatchNorm in ResNet-50 v1.5 (stride on the 3x3 convolution)
    shapes = [(64, 112), (64, 56), (128, 56), (256, 56), (128, 28), (256, 28), (512, 28),
              (256, 14), (512, 14), (1024, 14), (512, 7), (2048, 7)]
    return [Case("resnet50", f"R50 N{batch} {c}@{h}", (batch, c, h, h), (cpu_batch, max(4, c // 32), max(4, h // 8),
                 max(4, h // 8))) for c, h in shapes]


FULL_CASES: tuple[Case, ...] = (
    *_resnet50(32, 2),
    *_resnet50(256, 2),
    Case("small-C", "20x6x65536", (20, 6, 65536), (2, 6, 4096)),
    Case("small-C", "32x4x256x256", (32, 4, 256, 256), (2, 4, 32, 32)),
    *(Case("large-C", f"N8 {c}@7", (8, c, 7, 7), (2, c // 8, 7, 7)) for c in (256, 512, 1024, 2048)),
    *(Case("mlp", f"{n}x{c}", (n, c), (n // 64, c // 8)) for n, c in ((512, 1024), (8192, 2048), (65536, 512))),
    Case("video", "8x64x16x56x56", (8, 64, 16, 56, 56), (2, 8, 4, 8, 8)),
    Case("video", "4x256x8x28x28", (4, 256, 8, 28, 28), (2, 16, 2, 8, 8)),
    # transformer (B, T, C): logical (B, C, T); its natural layout is axis=-1
    *(Case("transformer", f"B{b} T{t} C{c}", (b, c, t), (2, c // 16, t // 32), ("axis=-1", "NCHW"))
      for b, t, c in ((8, 2048, 1024), (32, 512, 768), (4, 4096, 4096))),
)

# The CPU sizes of the quick sweep keep each case's per-channel slice (m = N x spatial), with
# fewer channels, where a tensor stays under 1 MiB for the interpreter: bytes per channel, and so
# bytes moved / S, are then those of the full-size case (per-channel parameters and partials
# weigh what they weigh on the GPU).  Small-C keeps a slice too large for one program (m = 40960:
# the split path, as at full size); the video and transformer slices are 1/8 and 1/4 of theirs.
QUICK_CASES: tuple[Case, ...] = (
    Case("resnet50", "R50 N32 64@56", (32, 64, 56, 56), (32, 2, 56, 56)),
    Case("resnet50", "R50 N32 2048@7", (32, 2048, 7, 7), (32, 16, 7, 7)),
    Case("small-C", "20x6x65536", (20, 6, 65536), (2, 6, 20480)),
    Case("mlp", "8192x2048", (8192, 2048), (8192, 16)),
    Case("video", "8x64x16x56x56", (8, 64, 16, 56, 56), (2, 4, 8, 56, 56)),
    Case("transformer", "B8 T2048 C1024", (8, 1024, 2048), (4, 16, 2048), ("axis=-1",)),
)
QUICK_DTYPES = ("bf16", "fp32")


@dataclass(frozen=True)
class Point:
    """One (case, layout, dtype) of a sweep, realised as a tensor shape and axis."""

    case: Case
    layout: str
    dtype: str
    shape: tuple[int, ...]
    axis: int
    memory: str  # memory layout name for traffic.make_data

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def data_bytes(self) -> int:
        """S: bytes of the data tensor."""
        numel = 1
        for extent in self.shape:
            numel *= extent
        return numel * DTYPES[self.dtype].itemsize


def points(cases: Sequence[Case], layouts: Sequence[str], dtypes: Sequence[str]) -> list[Point]:
    """Every (case, layout, dtype) that applies, case-major."""
    out = []
    for case in cases:
        for layout in layouts:
            if case.layouts is not None and layout not in case.layouts:
                continue
            realized = LAYOUTS[layout].realize(case.logical)
            if realized is None:
                continue
            shape, axis, memory = realized
            out.extend(Point(case, layout, dtype, shape, axis, memory) for dtype in dtypes)
    return out
