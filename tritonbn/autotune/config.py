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
    "override_profile",
    "reduce_config",
    "elementwise_config",
    "finalize_config",
    "persistent_config",
    "override_configs",
    "PERSISTENT_OFF",
]

# Roles of launches; a config override names one of these.
REDUCE = "reduce"  # statistics and backward S/D partials
ELEMENTWISE = "elementwise"  # apply (forward, inference) and dx
FINALIZE = "finalize"
PERSISTENT = "persistent"  # single-pass forward / backward

# Ops of the persistent variants.
FORWARD = "forward"
BACKWARD = "backward"


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


# Off the GPU (the interpreter, `tritonbn inspect`, the traffic counter) launch decisions are
# made for an H100 SXM, so what is counted on a CPU is what an H100 would run.
H100_PROFILE = DeviceProfile("NVIDIA H100 80GB HBM3 (modelled)", sm_count=132, tile_elements=4096)

_profile_override: contextvars.ContextVar[DeviceProfile | None] = contextvars.ContextVar(
    "tritonbn_profile_override", default=None
)


@contextlib.contextmanager
def override_profile(profile: DeviceProfile) -> Iterator[None]:
    """Make launch decisions for ``profile`` in this context, whatever the device."""
    token = _profile_override.set(profile)
    try:
        yield
    finally:
        _profile_override.reset(token)


def device_profile(device: torch.device) -> DeviceProfile:
    """The profile launch decisions are made for: the CUDA GPU's, or an H100's off the GPU."""
    forced = _profile_override.get()
    if forced is not None:
        return forced
    if device.type == "cuda":
        return _cuda_profile(device.index if device.index is not None else torch.cuda.current_device())
    return H100_PROFILE


_overrides: contextvars.ContextVar[dict[str, KernelConfig]] = contextvars.ContextVar(
    "tritonbn_config_overrides", default={}
)


@contextlib.contextmanager
def override_configs(**configs: KernelConfig) -> Iterator[None]:
    """Force the config of a role (``reduce``, ``elementwise``, ``finalize``, ``persistent``) in
    this context.  ``persistent=PERSISTENT_OFF`` turns the single-pass path off (the split path
    then runs whatever the size)."""
    unknown = set(configs) - {REDUCE, ELEMENTWISE, FINALIZE, PERSISTENT}
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


def _warps(tile_elements: int, per_thread: int = 16) -> int:
    """Warps for a tile at ``per_thread`` elements per thread (at most 16 warps).

    16 per thread keeps several 128-bit accesses in flight; the Welford reductions hold three
    accumulators per element and take 8 (at 16, sm_80 fp32 code spilled 52 bytes).
    """
    return max(1, min(16, tile_elements // (per_thread * 32)))


# A split shorter than this costs more in partials and launch width than it spreads.
MIN_SPLIT_ELEMENTS = 256
MIN_TILE_ELEMENTS = 256
MAX_SPLITS = 1024  # the finalize merges up to this many partials per channel in one tile


def _pow2_floor(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def reduce_config(plan: ViewPlan, profile: DeviceProfile) -> KernelConfig:
    """Config of a reduction launch (statistics or backward partials).

    The split gives the launch at least two programs per SM when the channels (blocks) alone
    cannot, as long as each split keeps MIN_SPLIT_ELEMENTS; tiles shrink (down to
    MIN_TILE_ELEMENTS) so that a split is still a whole number of tiles.
    """
    forced = _overrides.get().get(REDUCE)
    if forced is not None:
        return forced
    if plan.family == CHANNEL_MAJOR:
        channel_programs, channel_elements = plan.channels, plan.m
    else:
        block_c = _tile(plan, profile.tile_elements)[1]
        channel_programs, channel_elements = -(-plan.channels // block_c), plan.m * block_c
    wanted = -(-2 * profile.sm_count // channel_programs)
    split = max(1, min(wanted, channel_elements // MIN_SPLIT_ELEMENTS, MAX_SPLITS))
    tile_elements = max(MIN_TILE_ELEMENTS, min(profile.tile_elements, _pow2_floor(channel_elements // split)))
    block_rows, block_cols = _tile(plan, tile_elements)
    if plan.family == CHANNEL_MAJOR:
        tiles_rows, tiles_cols = -(-plan.outer // block_rows), -(-plan.inner // block_cols)
    else:
        tiles_rows, tiles_cols = -(-plan.m // block_rows), 1
    split_rows = min(split, tiles_rows)
    split_cols = min(-(-split // split_rows), tiles_cols)
    return KernelConfig(
        block_rows, block_cols, split_rows, split_cols, num_warps=_warps(block_rows * block_cols, per_thread=8)
    )


# Largest slice (elements per channel-major program, or rows x BLOCK_C per channel-minor
# program) that a persistent program keeps in registers.  Chosen from the compiled code:
# `tritonbn inspect --arch sm_90` shows zero spills at these sizes with 16 warps (the backward
# holds x and dy, so half the forward's).
PERSISTENT_CAPACITY = {FORWARD: 16384, BACKWARD: 8192}
PERSISTENT_OFF = KernelConfig(0, 0)  # override_configs(persistent=PERSISTENT_OFF): split path only


def persistent_config(plan: ViewPlan, op: str, profile: DeviceProfile, element_size: int) -> KernelConfig | None:
    """Config of the single-pass kernel of ``op`` ("forward" or "backward") if a channel's
    slice fits one program (the tile covers it whole), else None: the split path runs.

    Channel-minor tiles are [rows, BLOCK_C]: BLOCK_C shrinks from 64 to fit the capacity, but
    never below one 32-byte sector of channels (narrower rows would waste most of every sector
    they touch), so only slices of up to capacity / (32 / element_size) rows go single-pass.
    """
    forced = _overrides.get().get(PERSISTENT)
    if forced == PERSISTENT_OFF:
        return None
    capacity = PERSISTENT_CAPACITY[op]
    if plan.family == CHANNEL_MAJOR:
        block_rows, block_cols = _pow2_cover(plan.outer, 1 << 30), _pow2_cover(plan.inner, 1 << 30)
    else:
        block_rows, block_cols = _pow2_cover(plan.m, 1 << 30), _pow2_cover(plan.channels, 64)
        sector_channels = max(1, 32 // element_size)
        while block_cols > sector_channels and block_rows * block_cols > capacity:
            block_cols //= 2
    if block_rows * block_cols > capacity:
        return None
    if forced is not None:  # forced warps/stages; the tile always covers the slice
        return replace(forced, block_rows=block_rows, block_cols=block_cols)
    return KernelConfig(block_rows, block_cols, num_warps=_warps(block_rows * block_cols))


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
