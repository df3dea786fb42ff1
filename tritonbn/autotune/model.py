"""The model-based timer: what a launch would cost on a GPU, from its launch alone.

Used by ``tritonbn tune`` where no GPU is present (every number it yields is *modelled*), and
to rank candidates before a GPU measures the best of them.  The model, per launch:

    t = launch latency + bytes / (bandwidth x efficiency)
    efficiency = min(1, programs / SMs) x min(1, bytes in flight per SM / (bandwidth x latency / SMs))

- bytes: every distinct tensor argument of the launch counted once: the data tensors (x, y,
  dy, dx) at their number of elements x element size, which is exact (every kernel reads each
  element of its data inputs once and writes each output element once; the test checks it
  against the interpreter's traffic counter), and the per-channel tensors (parameters,
  partials, coefficients) at their full size, once (a GPU serves their repeated loads from L2;
  the interpreter's counter counts every request, an upper bound).  Nothing is interpreted:
  the launches come from a dry run (``ops.dry_run``) on ``meta`` tensors, so tuning an
  H100-sized shape costs about a millisecond per candidate on a CPU.
- launch latency: a fixed cost per launch (4 us on an H100), which dominates small tensors.
- fill: a launch with fewer programs than SMs leaves SMs idle: it gets programs / SMs of the
  bandwidth.
- bytes in flight: by Little's law a GPU needs bandwidth x memory latency bytes requested at
  once (3.0 TB/s x 0.6 us = 1.8 MB on an H100, 13.6 KB per SM); an SM holds min(programs per SM,
  max resident programs) tiles in flight, max resident = min(32, 64 warps / num_warps); a
  program's tile is block_rows x block_cols elements of each data tensor it reads.
Not modelled: compute, register pressure (candidates that spill are pruned by compiling them
instead), tail waves, L2 hits on data re-read by another kernel, DRAM sector granularity.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .config import H100_PROFILE, DeviceProfile

__all__ = ["GpuSpec", "GPUS", "LaunchCost", "launch_cost", "modelled_ms", "describe_model"]


@dataclass(frozen=True)
class GpuSpec:
    """A GPU model as the model-based timer and the store see it."""

    model: str  # store name, e.g. "h100-sxm"
    description: str
    arch: str  # compile target for spill pruning
    sm_count: int
    bandwidth: float  # achievable DRAM bandwidth, bytes/s
    launch_us: float  # fixed cost per launch
    memory_latency_us: float  # for the bytes-in-flight requirement
    max_warps_per_sm: int = 64
    max_programs_per_sm: int = 32

    @property
    def profile(self) -> DeviceProfile:
        """The profile launch decisions are made for when tuning this GPU off the device."""
        if self.model == "h100-sxm":
            return H100_PROFILE
        return DeviceProfile(f"{self.description} (modelled)", self.sm_count, 4096)

    @property
    def bytes_in_flight_per_sm(self) -> float:
        return self.bandwidth * self.memory_latency_us * 1e-6 / self.sm_count


GPUS = {
    spec.model: spec for spec in (
        GpuSpec("h100-sxm", "NVIDIA H100 SXM 80GB HBM3", "sm_90", 132, 3.0e12, 4.0, 0.6),
        GpuSpec("h100-pcie", "NVIDIA H100 PCIe 80GB", "sm_90", 114, 1.8e12, 4.0, 0.6),
        GpuSpec("h200", "NVIDIA H200 141GB HBM3e", "sm_90", 132, 4.3e12, 4.0, 0.6),
        GpuSpec("a100-sxm", "NVIDIA A100 SXM 80GB", "sm_80", 108, 1.7e12, 4.0, 0.6),
    )
}


@dataclass(frozen=True)
class LaunchCost:
    """The model's view of one launch."""

    kernel: str
    programs: int
    bytes: int
    data_bytes: int
    efficiency: float
    us: float


def _data_outputs(kernel: str) -> int:
    """Data tensors a kernel writes: the elementwise and persistent kernels write y or dx."""
    return 1 if ("_elementwise" in kernel or "_persistent_" in kernel) else 0


def launch_cost(launch: Any, data_shape: Sequence[int], spec: GpuSpec) -> LaunchCost:
    """Modelled cost of a captured launch (``ops.CapturedLaunch``) of a call on data of
    ``data_shape``."""
    seen: set[int] = set()
    total = data = reads = 0
    element_size = 4
    shape = tuple(data_shape)
    for arg in launch.args:
        if not isinstance(arg, torch.Tensor) or id(arg) in seen or not arg.is_floating_point():
            continue  # (int32 tickets: one atomic per program, not a stream)
        seen.add(id(arg))
        nbytes = arg.numel() * arg.element_size()
        total += nbytes
        if tuple(arg.shape) == shape:
            data += nbytes
            reads += 1
            element_size = arg.element_size()
    reads = max(0, reads - _data_outputs(launch.name))
    cfg = launch.config
    programs = max(1, launch.programs)
    if reads:  # streaming kernels: one tile of each data tensor read is in flight per program
        tile_bytes = cfg.block_rows * cfg.block_cols * element_size * reads
    else:  # no data tensor: a program requests its whole share of per-channel tensors at once
        tile_bytes = total / programs
    sms = spec.sm_count
    resident = max(1, min(spec.max_programs_per_sm, spec.max_warps_per_sm // max(1, cfg.num_warps)))
    per_sm = min(resident, math.ceil(programs / sms))
    fill = min(1.0, programs / sms)
    in_flight = min(1.0, per_sm * tile_bytes / spec.bytes_in_flight_per_sm)
    efficiency = fill * in_flight
    us = spec.launch_us + total / (spec.bandwidth * efficiency) * 1e6
    return LaunchCost(launch.name, programs, total, data, efficiency, us)


def modelled_ms(launches: Sequence[Any], data_shape: Sequence[int], spec: GpuSpec) -> tuple[float, list[LaunchCost]]:
    """Modelled milliseconds of an op's launches, and the cost of each."""
    costs = [launch_cost(launch, data_shape, spec) for launch in launches]
    return sum(c.us for c in costs) / 1e3, costs


def describe_model(spec: GpuSpec) -> dict[str, Any]:
    """The model's parameters, for store files and reports."""
    return {
        "gpu": spec.description,
        "sm_count": spec.sm_count,
        "bandwidth_gb_s": spec.bandwidth / 1e9,
        "launch_latency_us": spec.launch_us,
        "memory_latency_us": spec.memory_latency_us,
        "bytes_in_flight_per_sm": round(spec.bytes_in_flight_per_sm),
        "max_warps_per_sm": spec.max_warps_per_sm,
        "max_programs_per_sm": spec.max_programs_per_sm,
        "formula": "t = launches x launch latency + sum(bytes / (bandwidth x min(1, programs / SMs) x "
                   "min(1, in-flight bytes per SM / (bandwidth x memory latency / SMs))))",
        "bytes": "distinct tensor arguments of each dry-run launch, once each (data tensors exact)",
    }
