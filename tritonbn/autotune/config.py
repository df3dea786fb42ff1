"""Launch decisions as data: ``KernelConfig`` and the heuristic that picks them.

Every launch of every kernel takes its block sizes, split factors, warps and stages from a
``KernelConfig`` returned here; launchers hold no tuning constants.  ``override_configs`` lets
tests (and the tuner) force a config for one role to reach a specific path.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from dataclasses import dataclass, replace
from typing import Iterator

import torch

from ..plan import CHANNEL_MAJOR, ViewPlan

__all__ = [
    "KernelConfig",
    "DeviceProfile",
    "device_profile",
    "reduce_config",
    "elementwise_config",
    "finalize_config",
    "override_configs",
]

# Roles of launches; a config override names one of these.
REDUCE = "reduce"  # statistics and backward S/D partials
ELEMENTWISE = "elementwise"  # apply (forward, inference) and dx
FINALIZE = "finalize"


@dataclass(frozen=True)
class KernelConfig:
    """One launch's decisions.

    Attributes:
        block_rows: tile extent along the reduced rows (channel-major: outer rows; channel-minor:
            flattened rows).
        block_cols: tile extent along the fast axis (channel-major: inner; channel-minor: channels).
        split_rows, split_cols: programs per channel (block) along rows / columns (reductions).
        num_warps, num_stages: Triton launch options.
    """

    block_rows: int
    block_cols: int
    split_rows: int = 1
    split_cols: int = 1
    num_warps: int = 4
    num_stages: int = 1

    @property
    def splits(self) -> int:
        """Programs per channel (block) in a reduction launch."""
        return self.split_rows * self.split_cols


@dataclass(frozen=True)
class DeviceProfile:
    """What the heuristics need to know of a device."""

    name: str
    sm_count: int
    tile_elements: int  # elements per program per tile in streaming kernels


@functools.lru_cache(maxsize=16)
def _cuda_profile(index: int) -> DeviceProfile:
    props = torch.cuda.get_device_properties(index)
    return DeviceProfile(props.name, props.multi_processor_count, 4096)


# The interpreter runs programs one after another in numpy: few programs, big tiles.
INTERPRETER_PROFILE = DeviceProfile("triton-interpreter", sm_count=2, tile_elements=1024)


def device_profile(device: torch.device) -> DeviceProfile:
    """The profile of ``device`` (a CUDA GPU's SM count, or the interpreter's nominal one)."""
    if device.type == "cuda":
        return _cuda_profile(device.index if device.index is not None else torch.cuda.current_device())
    return INTERPRETER_PROFILE


_overrides: contextvars.ContextVar[dict[str, KernelConfig]] = contextvars.ContextVar(
    "tritonbn_config_overrides", default={}
)


@contextlib.contextmanager
def override_configs(**configs: KernelConfig) -> Iterator[None]:
    """Force the config of a role (``reduce``, ``elementwise``, ``finalize``) in this context."""
    unknown = set(configs) - {REDUCE, ELEMENTWISE, FINALIZE}
    if unknown:
        raise ValueError(f"override_configs: unknown roles {sorted(unknown)}")
    token = _overrides.set({**_overrides.get(), **configs})
    try:
        yield
    finally:
        _overrides.reset(token)


def _pow2_cover(n: int, cap: int) -> int:
    """Smallest power of two >= n (a tile that covers n), capped at ``cap`` (a power of two)."""
    return max(1, min(cap, 1 << max(0, (n - 1).bit_length())))


def _tile(plan: ViewPlan, tile_elements: int) -> tuple[int, int]:
    """(block_rows, block_cols) of a streaming tile for ``plan``'s family."""
    if plan.family == CHANNEL_MAJOR:
        block_cols = _pow2_cover(plan.inner, tile_elements)
        block_rows = _pow2_cover(plan.outer, max(1, tile_elements // block_cols))
    else:
        block_cols = _pow2_cover(plan.channels, 64)
        block_rows = _pow2_cover(plan.m, max(1, tile_elements // block_cols))
    return block_rows, block_cols


def _warps(tile_elements: int) -> int:
    # About 16 elements per thread: enough in flight per thread for 128-bit accesses.
    return max(1, min(16, tile_elements // (16 * 32)))


def reduce_config(plan: ViewPlan, profile: DeviceProfile) -> KernelConfig:
    """Config of a reduction launch (statistics or backward partials).

    The split puts at least two programs per SM in the launch when the channels (blocks)
    alone cannot, and never gives a program less than a couple of tiles of work.
    """
    forced = _overrides.get().get(REDUCE)
    if forced is not None:
        return forced
    block_rows, block_cols = _tile(plan, profile.tile_elements)
    if plan.family == CHANNEL_MAJOR:
        channel_programs = plan.channels
        tiles_rows = -(-plan.outer // block_rows)
        tiles_cols = -(-plan.inner // block_cols)
    else:
        channel_programs = -(-plan.channels // block_cols)
        tiles_rows = -(-plan.m // block_rows)
        tiles_cols = 1
    wanted = max(1, -(-2 * profile.sm_count // channel_programs))
    max_useful = max(1, (tiles_rows * tiles_cols) // 2)
    split = min(wanted, max_useful, 1024)
    split_rows = min(split, tiles_rows)
    split_cols = min(-(-split // split_rows), tiles_cols)
    return KernelConfig(
        block_rows, block_cols, split_rows, split_cols, num_warps=_warps(block_rows * block_cols)
    )


def elementwise_config(plan: ViewPlan, profile: DeviceProfile) -> KernelConfig:
    """Config of the elementwise (apply / dx) launch: one tile per program."""
    forced = _overrides.get().get(ELEMENTWISE)
    if forced is not None:
        return forced
    block_rows, block_cols = _tile(plan, profile.tile_elements)
    return KernelConfig(block_rows, block_cols, num_warps=_warps(block_rows * block_cols))


def finalize_config(channels: int, partials: int) -> KernelConfig:
    """Config of a finalize launch: a [partials, BLOCK_C] tile of channels per program."""
    forced = _overrides.get().get(FINALIZE)
    if forced is not None:
        return replace(forced, block_rows=max(forced.block_rows, _pow2_cover(partials, 1 << 20)))
    block_rows = _pow2_cover(partials, 1 << 20)
    block_cols = _pow2_cover(channels, max(1, 2048 // block_rows))
    return KernelConfig(block_rows, block_cols, num_warps=4)


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 (CPU tensors then run the Triton kernels)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
