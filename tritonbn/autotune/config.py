"""Launch decisions as data: ``KernelConfig`` and how one is chosen for a call.

Every launch of every kernel takes its block sizes, split factors, warps and stages from a
``KernelConfig`` returned here; launchers hold no tuning constants.  For a role (reduce,
elementwise, persistent) a config is chosen in this order:

1. ``override_configs`` (tests and the tuner force a config for one role);
2. a *measured* config store (``store.py``; modelled stores are reports and never consulted):
   the tuned *knobs* of the nearest (C, m) bucket of the call's (dtype, family, op, role) for
   this GPU model, realised for the call's geometry, if valid for it (an invalid stored config,
   e.g. a split larger than the call can use, falls back);
3. with ``TRITONBN_AUTOTUNE=1`` on a GPU and an on-line tuner installed (``set_online_tuner``;
   importing ``tritonbn.autotune.online`` installs one), a key no store has is tuned on first use;
4. the heuristic below.

Steps 2-4 are cached per call signature (plan, profile, op, dtype and the store settings), so a
decision costs one dict lookup after the first call.  The finalize tail of a reduction (its
channel's last program merging a few KB of partials) keeps its heuristic tile.

This module is on the op's import path (``ops.py`` imports it), so it imports none of the tools
(tuner, tune, online, model, report): the on-line tuner hooks in from outside, and the import
graph stays acyclic (tools -> ops -> config, never back).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Callable, Iterator

import torch

from ..plan import CHANNEL_MAJOR, CHANNEL_MINOR, ViewPlan
from . import store as _store
from .store import Knobs

log = logging.getLogger("tritonbn")

__all__ = [
    "KernelConfig",
    "DeviceProfile",
    "Decision",
    "device_profile",
    "override_profile",
    "reduce_config",
    "elementwise_config",
    "finalize_config",
    "persistent_config",
    "override_configs",
    "explain",
    "clear_caches",
    "set_online_tuner",
    "PERSISTENT_OFF",
]

# Roles of launches; a config override names one of these.
REDUCE = "reduce"  # statistics and backward S/D partials
ELEMENTWISE = "elementwise"  # apply (forward, inference) and dx
FINALIZE = "finalize"
PERSISTENT = "persistent"  # single-pass forward / backward

# Ops (store keys); the persistent variants exist for FORWARD and BACKWARD.
INFERENCE = "inference"
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
        num_warps, num_stages: Triton launch options (no tuned space varies the stages: they
            stay at this default unless an override sets them).
        row_tiles: channel-minor elementwise: tiles of block_rows rows each program runs, one
            after the other, with its channels' coefficients loaded once.
    """

    block_rows: int
    block_cols: int
    split_rows: int = 1
    split_cols: int = 1
    num_warps: int = 4
    num_stages: int = 1
    row_tiles: int = 1

    @property
    def splits(self) -> int:
        """Programs per channel (block) in a reduction launch."""
        return self.split_rows * self.split_cols


@dataclass(frozen=True)
class DeviceProfile:
    """What the heuristics need to know of a device.  ``on_gpu``: a real CUDA device's profile
    (False for the modelled H100 that launch decisions are made for off the GPU)."""

    name: str
    sm_count: int
    tile_elements: int  # elements per program per tile in streaming kernels
    on_gpu: bool = False


@functools.lru_cache(maxsize=16)
def _cuda_profile(index: int) -> DeviceProfile:
    props = torch.cuda.get_device_properties(index)
    return DeviceProfile(props.name, props.multi_processor_count, 4096, on_gpu=True)


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
    then runs whatever the size).  Overrides take precedence over the store and the heuristic."""
    unknown = set(configs) - {REDUCE, ELEMENTWISE, FINALIZE, PERSISTENT}
    if unknown:
        raise ValueError(f"override_configs: unknown roles {sorted(unknown)}")
    token = _overrides.set({**_overrides.get(), **configs})
    try:
        yield
    finally:
        _overrides.reset(token)


# While the tuner runs, stored configs are not consulted: the candidates are compared against
# the heuristic, never against an older store's answer.
_store_disabled: contextvars.ContextVar[bool] = contextvars.ContextVar("tritonbn_store_disabled", default=False)


@contextlib.contextmanager
def heuristic_only() -> Iterator[None]:
    """Ignore every config store (and on-line tuning) in this context: heuristic decisions."""
    token = _store_disabled.set(True)
    try:
        yield
    finally:
        _store_disabled.reset(token)


# ----------------------------------------------------------------------------- tile geometry


def _pow2_cover(n: int, cap: int) -> int:
    """Smallest power of two >= n (a tile that covers n), capped at ``cap`` (a power of two)."""
    return max(1, min(cap, 1 << max(0, (n - 1).bit_length())))


def _pow2_floor(n: int) -> int:
    return 1 << max(0, n.bit_length() - 1)


def _is_pow2(n: Any) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and n >= 1 and n & (n - 1) == 0


BLOCK_C = 64  # channels per channel-minor tile (the heuristic's cap)


# Channel-major elementwise tiles narrow their columns while that keeps the lanes busy: a row of
# 3136 elements (56 x 56) fills 77% of 2048- or 4096-wide tiles and 98% of 128-wide ones.  Not
# below MIN_TILE_COLS elements (64 bytes of half data, a 128-bit access for every thread of a
# row).  Reductions keep their widest columns: [16, 128] statistics tiles (several rows a thread)
# spilled 8-12 bytes at 56 registers (fp32 on sm_80 with Triton 3.8 and 3.9, fp16 on 3.6).
ACTIVE_LANES = 0.95
MIN_TILE_COLS = 32


def _lane_fill(extent: int, block: int) -> float:
    """Fraction of the lanes of ``block``-wide tiles that cover ``extent`` holding an element."""
    return extent / (-(-extent // block) * block)


def _channel_major_cols(inner: int, tile_elements: int) -> int:
    """The widest power-of-two column block (at most ``tile_elements``, at least MIN_TILE_COLS
    or the covering width) whose tiles keep ACTIVE_LANES of their lanes over ``inner``; where none
    does, the widest of the fullest."""
    widest = _pow2_cover(inner, tile_elements)
    candidates = [widest >> k for k in range(widest.bit_length()) if widest >> k >= min(MIN_TILE_COLS, widest)]
    busy = [cols for cols in candidates if _lane_fill(inner, cols) >= ACTIVE_LANES]
    return busy[0] if busy else max(candidates, key=lambda cols: (_lane_fill(inner, cols), cols))


def _tile(plan: ViewPlan, tile_elements: int, block_c: int = BLOCK_C, narrow: bool = False) -> tuple[int, int]:
    """(block_rows, block_cols) of a streaming tile of ``tile_elements`` for ``plan``'s family;
    channel-minor tiles span at most ``block_c`` channels; ``narrow``: channel-major columns
    narrow to keep the lanes busy (``_channel_major_cols``; elementwise tiles)."""
    if plan.family == CHANNEL_MAJOR:
        block_cols = (_channel_major_cols(plan.inner, tile_elements) if narrow
                      else _pow2_cover(plan.inner, tile_elements))
        block_rows = _pow2_cover(plan.outer, max(1, tile_elements // block_cols))
    else:
        block_cols = _pow2_cover(plan.channels, block_c)
        block_rows = _pow2_cover(plan.m, max(1, tile_elements // block_cols))
    return block_rows, block_cols


def _warps(tile_elements: int, per_thread: int = 16) -> int:
    """Warps for a tile at ``per_thread`` elements per thread (at most 16 warps); 16 per thread
    keeps several 128-bit accesses in flight."""
    return max(1, min(16, tile_elements // (per_thread * 32)))


# Elements of one channel a split must cover: each (channel, split) writes five float32 partials
# that the finalize tail reads back (40 bytes), at most 2% of what the split reads (1024 x 2 bytes).
MIN_SPLIT_ELEMENTS = 1024
MIN_TILE_ELEMENTS = 256
# Reduction tiles (two or three accumulators an element: shifted sums, dy sums): at most 2048
# elements, 16 a thread, so 4 warps (measured when the statistics kept three Welford
# accumulators; not re-probed since).  ptxas spills a 512-thread program to reach 64 registers (two programs an SM): the
# statistics kernels at 4096 elements x 16 warps spilled 36-48 bytes on Triton 3.6 and 3.9
# (sm_80; 3.6 sm_90 fp32 too), and 4096 x 8 warps spilled 68-80 bytes in fp32 on sm_80, while
# 2048 x 4 warps compiles spill-free on 3.6, 3.8 and 3.9 for both archs (`tritonbn inspect`).
MAX_REDUCE_TILE_ELEMENTS = 2048
REDUCE_PER_THREAD = 16
# Four-group views (steps in two dimensions) index rows with two more divisions: 8 elements a
# thread there.  At 16, ptxas capped the channel-major statistics kernel with its finalize tail
# at 168 registers and spilled 120 bytes ([32, 32] tile, 2 warps, Triton 3.6, sm_90); with 4
# warps it takes 92 and spills nothing (float64 too: at 4 a thread, 8 warps, ptxas held the
# channel-major backward reduction to 64 registers and spilled 12 bytes).
FOUR_GROUP_REDUCE_PER_THREAD = 8
# The channel-minor backward reduction with its finalize tail sat at ptxas's 72-register target
# with 4 warps, spilling 4 bytes or not by the tail's shape and the Triton version (3.6 and 3.9,
# sm_80); at 8 elements a thread (8 warps for 2048) it takes 64 and spills nothing on either.
CHANNEL_MINOR_BACKWARD_REDUCE_PER_THREAD = 8
MAX_SPLITS = 1024  # the finalize tail merges up to this many partials per channel in one tile
# Bounds a stored knob must respect (anything outside is an invalid entry: heuristic instead).
MAX_TILE_ELEMENTS = 65536
MAX_WARPS = 32


# ----------------------------------------------------------------------------- reductions


def reduce_geometry(plan: ViewPlan, block_c: int = BLOCK_C) -> tuple[int, int]:
    """(channel programs, elements per channel program) of a reduction before splitting:
    channel-major: one per channel, m elements; channel-minor: one per block of block_c
    channels, m x block_c elements."""
    if plan.family == CHANNEL_MAJOR:
        return plan.channels, plan.m
    width = _pow2_cover(plan.channels, block_c)
    return -(-plan.channels // width), plan.m * width


def max_useful_split(plan: ViewPlan, tile: int, block_c: int = BLOCK_C) -> int:
    """The largest split worth launching: every split keeps MIN_SPLIT_ELEMENTS and at least one
    tile, and the finalize can merge them (MAX_SPLITS)."""
    block_rows, block_cols = _tile(plan, tile, block_c)
    if plan.family == CHANNEL_MAJOR:
        tiles = -(-plan.outer // block_rows) * -(-plan.inner // block_cols)
    else:
        tiles = -(-plan.m // block_rows)
    return max(1, min(plan.m // MIN_SPLIT_ELEMENTS, tiles, MAX_SPLITS))


def reduce_per_thread(plan: ViewPlan, op: str | None = None, float64: bool = False) -> int:
    """Elements a thread holds of a reduction tile by default (the warps follow): fewer in
    four-group views, float64 and channel-minor backward reductions (constants above)."""
    if plan.outer_mid > 1:
        return FOUR_GROUP_REDUCE_PER_THREAD
    if float64:
        return FLOAT64_REDUCE_PER_THREAD
    if plan.family != CHANNEL_MAJOR and op == BACKWARD:
        return CHANNEL_MINOR_BACKWARD_REDUCE_PER_THREAD
    return REDUCE_PER_THREAD


def realize_reduce(plan: ViewPlan, tile: int, split: int, block_c: int = BLOCK_C,
                   num_warps: int | None = None, per_thread: int | None = None) -> KernelConfig:
    """The reduction config of ``plan`` for a tile of ``tile`` elements split ``split`` ways
    (rows first, then columns, whole tiles per split); warps default to ``per_thread`` elements
    per thread (default ``reduce_per_thread(plan)``)."""
    block_rows, block_cols = _tile(plan, tile, block_c)
    if plan.family == CHANNEL_MAJOR:
        tiles_rows, tiles_cols = -(-plan.outer // block_rows), -(-plan.inner // block_cols)
    else:
        tiles_rows, tiles_cols = -(-plan.m // block_rows), 1
    split_rows = min(split, tiles_rows)
    split_cols = min(-(-split // split_rows), tiles_cols)
    if num_warps is None:
        num_warps = _warps(block_rows * block_cols, per_thread=per_thread or reduce_per_thread(plan))
    return KernelConfig(block_rows, block_cols, split_rows, split_cols, num_warps=num_warps)


def heuristic_reduce_knobs(plan: ViewPlan, profile: DeviceProfile) -> Knobs:
    """The heuristic's reduction knobs.

    The split gives the launch at least two programs per SM when the channels (blocks) alone
    cannot, as long as each split keeps MIN_SPLIT_ELEMENTS; tiles shrink (down to
    MIN_TILE_ELEMENTS) so that a split is still a whole number of tiles.
    """
    block_c = None if plan.family == CHANNEL_MAJOR else _reduce_block_c(plan, profile)
    channel_programs, channel_elements = reduce_geometry(plan, block_c or BLOCK_C)
    split = _reduce_split(plan, channel_programs, profile)
    # four-group views index rows with two more divisions: 2048 x 4 warps spilled there (Triton 3.9, sm_90)
    max_tile = MAX_REDUCE_TILE_ELEMENTS if plan.outer_mid == 1 else MAX_REDUCE_TILE_ELEMENTS // 2
    tile = max(MIN_TILE_ELEMENTS, min(profile.tile_elements, max_tile, _pow2_floor(channel_elements // split)))
    return Knobs(tile=tile, split=split, block_c=block_c)


def _reduce_split(plan: ViewPlan, channel_programs: int, profile: DeviceProfile) -> int:
    wanted = -(-2 * profile.sm_count // channel_programs)
    return max(1, min(wanted, plan.m // MIN_SPLIT_ELEMENTS, MAX_SPLITS))


# Narrowest channel-minor reduction tile: 16 channels, a 32-byte sector of half data per row.
MIN_REDUCE_BLOCK_C = 16


def _reduce_block_c(plan: ViewPlan, profile: DeviceProfile) -> int:
    """Channels per channel-minor reduction program: BLOCK_C, narrowed (down to
    MIN_REDUCE_BLOCK_C) while the launch falls short of two programs per SM because the
    splits are capped (each keeps MIN_SPLIT_ELEMENTS rows): more channel blocks instead."""
    block_c = BLOCK_C
    while block_c > MIN_REDUCE_BLOCK_C:
        programs, _ = reduce_geometry(plan, block_c)
        if programs * _reduce_split(plan, programs, profile) >= 2 * profile.sm_count:
            break
        block_c //= 2
    return block_c


def reduce_from_knobs(plan: ViewPlan, knobs: Knobs) -> KernelConfig | None:
    """``knobs`` realised for ``plan``, or None when they are invalid for it (missing tile or
    split, out-of-range values, a split larger than useful)."""
    block_c = knobs.block_c or BLOCK_C
    if not (_is_pow2(knobs.tile) and knobs.tile <= MAX_TILE_ELEMENTS and _is_pow2(block_c)):
        return None
    if not (isinstance(knobs.split, int) and knobs.split >= 1) or not _launch_options_ok(knobs):
        return None
    if knobs.split > max_useful_split(plan, knobs.tile, block_c):
        return None
    config = realize_reduce(plan, knobs.tile, knobs.split, block_c, knobs.num_warps)
    return config if config.splits <= MAX_SPLITS else None


def _launch_options_ok(knobs: Knobs) -> bool:
    """The stored warps (if any) are a power of two Triton accepts."""
    return knobs.num_warps is None or (_is_pow2(knobs.num_warps) and knobs.num_warps <= MAX_WARPS)


def reduce_config(plan: ViewPlan, profile: DeviceProfile, *, op: str | None = None,
                  dtype: torch.dtype | str | None = None) -> KernelConfig:
    """Config of a reduction launch (statistics or backward partials): the override, else the
    store's (for ``op``/``dtype``; inferred/any when not given), else the heuristic's."""
    forced = _overrides.get().get(REDUCE)
    if forced is not None:
        if plan.family != CHANNEL_MAJOR and forced.split_cols != 1:
            # channel-minor programs span every column of their channel block: nothing to split
            raise ValueError(f"override_configs: reduce config {forced} has split_cols="
                             f"{forced.split_cols}; channel-minor layouts split rows only (split_cols=1)")
        return forced
    return _decide(REDUCE, plan, profile, op, _dtype_name(dtype), None).config


# ----------------------------------------------------------------------------- elementwise


def realize_elementwise(plan: ViewPlan, tile: int, block_c: int = BLOCK_C,
                        num_warps: int | None = None) -> KernelConfig:
    """One tile of ``tile`` elements per program; warps default to 16 elements per thread."""
    block_rows, block_cols = _tile(plan, tile, block_c, narrow=True)
    warps = num_warps if num_warps is not None else _warps(block_rows * block_cols)
    return KernelConfig(block_rows, block_cols, num_warps=warps)


# Every elementwise program loads its channels' coefficients once (16-20 bytes a channel). A
# program streams a run of MIN_CHANNEL_RUN elements of each of its channels or more (or the whole
# slice), so that those loads stay within ~1% (channel-major: 1024 elements) or ~4% (channel-minor:
# 256 rows) of S as counted: a GPU serves the repeats from L2, the traffic targets count them.
MIN_CHANNEL_RUN = {CHANNEL_MAJOR: 1024, CHANNEL_MINOR: 256}
MIN_WIDEST_PROGRAMS = 128  # about a wave of one program per SM on the GPUs we target
# Channel-minor programs run row tiles of 16 channels (one or two 32-byte sectors a row) one after
# the other, with their coefficients loaded once: runs of 256-1024 rows, as long as the launch
# keeps MIN_WIDEST_PROGRAMS programs; tiles of at most 8192 elements (64 x 64 tiles re-loaded
# coefficients for 12% of S; [1024, 16] tiles at 16 warps spilled 64 bytes on sm_90).
ELEMENTWISE_BLOCK_C = 16
CHANNEL_MINOR_ELEMENTWISE_TILE = 8192
MAX_CHANNEL_MINOR_RUN = 1024


def channel_run(plan: ViewPlan, config: KernelConfig) -> int:
    """Elements of one channel an elementwise program of ``config`` streams (at most m)."""
    if plan.family == CHANNEL_MAJOR:
        return min(config.block_rows, plan.outer) * min(config.block_cols, plan.inner)
    return min(config.block_rows * config.row_tiles, plan.m)


def heuristic_channel_minor_elementwise(plan: ViewPlan, op: str) -> KernelConfig:
    """Channel-minor elementwise config: runs of 1024 rows, as 4 row tiles a program.  In training
    (the split path's third launch) a small tensor still gets MIN_WIDEST_PROGRAMS programs:
    first from narrower channel blocks (same coefficient loads per element), then from shorter
    runs, down to 256 rows."""
    block_cols = _pow2_cover(plan.channels, ELEMENTWISE_BLOCK_C)
    if op != INFERENCE:  # more channel blocks before shorter runs (the programs share sectors in L2)
        full_runs = plan.m // MAX_CHANNEL_MINOR_RUN
        while block_cols > 1 and -(-plan.channels // block_cols) * full_runs < MIN_WIDEST_PROGRAMS:
            block_cols //= 2
    row_programs = -(-MIN_WIDEST_PROGRAMS // -(-plan.channels // block_cols))
    run = MAX_CHANNEL_MINOR_RUN if op == INFERENCE else plan.m // row_programs
    run = min(max(run, MIN_CHANNEL_RUN[CHANNEL_MINOR]), MAX_CHANNEL_MINOR_RUN, plan.m)
    block_rows = min(CHANNEL_MINOR_ELEMENTWISE_TILE // block_cols, _pow2_floor(max(1, run // 4)))
    row_tiles = -(-run // block_rows) if run == plan.m else run // block_rows
    return KernelConfig(block_rows, block_cols, num_warps=_warps(block_rows * block_cols), row_tiles=row_tiles)


def heuristic_elementwise_tile(plan: ViewPlan, profile: DeviceProfile, op: str) -> int:
    """Elements per channel-major elementwise program: the profile's tile; in training (forward,
    backward: the split path's third launch) shrunk, down to runs of MIN_CHANNEL_RUN, until the
    launch has MIN_WIDEST_PROGRAMS programs, so that a small-C tensor's widest launch still spreads
    over the GPU (no further: every extra program re-loads its channel's coefficients)."""
    if op == INFERENCE:
        return profile.tile_elements
    filling = _pow2_floor(max(1, plan.m * plan.channels // MIN_WIDEST_PROGRAMS))
    return max(MIN_CHANNEL_RUN[CHANNEL_MAJOR], min(profile.tile_elements, filling))


def heuristic_elementwise_knobs(plan: ViewPlan, profile: DeviceProfile, op: str = INFERENCE) -> Knobs:
    """The heuristic's elementwise knobs (tile, channel block; its row tiles are not a knob)."""
    if plan.family == CHANNEL_MAJOR:
        return Knobs(tile=heuristic_elementwise_tile(plan, profile, op))
    config = heuristic_channel_minor_elementwise(plan, op)
    return Knobs(tile=config.block_rows * config.block_cols, block_c=ELEMENTWISE_BLOCK_C)


def launch_programs(role: str, plan: ViewPlan, config: KernelConfig) -> int:
    """The 1-D grid of a launch of ``role`` (REDUCE, ELEMENTWISE, PERSISTENT) with
    ``config`` on ``plan``: the one place for every kernel's grid formula (launchers, rules and
    tests call it).

    - REDUCE: one program per (channel, split) channel-major, per (channel block, row split)
      channel-minor.
    - ELEMENTWISE: one per (channel, outer tile, inner tile) channel-major, per (row tiles of
      ``row_tiles`` tiles, channel block) channel-minor.
    - PERSISTENT: one per channel channel-major, per channel block channel-minor.
    """
    channel_blocks = -(-plan.channels // config.block_cols)
    major = plan.family == CHANNEL_MAJOR
    if role == REDUCE:
        return plan.channels * config.splits if major else channel_blocks * config.split_rows
    if role == ELEMENTWISE:
        if major:
            return plan.channels * -(-plan.outer // config.block_rows) * -(-plan.inner // config.block_cols)
        return -(-plan.m // (config.block_rows * config.row_tiles)) * channel_blocks
    if role == PERSISTENT:
        return plan.channels if major else channel_blocks
    raise ValueError(f"launch_programs: unknown role {role!r}")


def elementwise_programs(plan: ViewPlan, config: KernelConfig) -> int:
    """Programs of an elementwise launch of ``config``."""
    return launch_programs(ELEMENTWISE, plan, config)


def elementwise_from_knobs(plan: ViewPlan, knobs: Knobs, min_run: int | None = None,
                           min_programs: int = 1) -> KernelConfig | None:
    """``knobs`` realised for ``plan``, or None when invalid: out-of-range values, runs per
    channel shorter than ``min_run`` (default MIN_CHANNEL_RUN; lookups pass the heuristic's run:
    a stored config may spend fewer coefficient loads than the heuristic, never more), or fewer
    than ``min_programs`` programs (training lookups: the heuristic's, up to MIN_WIDEST_PROGRAMS)."""
    block_c = knobs.block_c or BLOCK_C
    if not (_is_pow2(knobs.tile) and knobs.tile <= MAX_TILE_ELEMENTS and _is_pow2(block_c)):
        return None
    if not _launch_options_ok(knobs):
        return None
    config = realize_elementwise(plan, knobs.tile, block_c, knobs.num_warps)
    shortest = MIN_CHANNEL_RUN[plan.family] if min_run is None else min_run
    if channel_run(plan, config) < min(shortest, plan.m):
        return None  # too short a run per channel: its coefficient loads would weigh too much
    if elementwise_programs(plan, config) < min_programs:
        return None  # a small tensor's widest launch would not spread over the GPU
    return config


def heuristic_elementwise_bounds(plan: ViewPlan, profile: DeviceProfile, op: str) -> tuple[int, int]:
    """(run per channel, programs) a stored elementwise config for ``op`` must reach: the
    heuristic's run, and in training its program count up to MIN_WIDEST_PROGRAMS."""
    config = _heuristic(ELEMENTWISE, plan, profile, op, None)
    programs = 1 if op == INFERENCE else min(elementwise_programs(plan, config), MIN_WIDEST_PROGRAMS)
    return channel_run(plan, config), programs


def elementwise_config(plan: ViewPlan, profile: DeviceProfile, *, op: str | None = None,
                       dtype: torch.dtype | str | None = None) -> KernelConfig:
    """Config of the elementwise (apply / dx) launch: one tile per program."""
    forced = _overrides.get().get(ELEMENTWISE)
    if forced is not None:
        return forced
    return _decide(ELEMENTWISE, plan, profile, op, _dtype_name(dtype), None).config


# ----------------------------------------------------------------------------- finalize


# Elements a thread holds of a finalize tail's partials tile: the tail runs in the reduction's
# program, after its loop, so its tile must not raise the kernel's registers (ptxas allocates
# the peak).  At 16 a thread ([128 partials, 16 channels], 4 warps) channel_minor_stats took 198
# registers on sm_90 against 127 without a tail; at 4 a thread it is 128 (Triton 3.8, fp16).
TAIL_PER_THREAD = 1


def finalize_config(partials: int, num_warps: int) -> KernelConfig:
    """Config of a reduction's finalize tail (the last program of a channel, or channel block,
    merges its partials), for a reduction of ``num_warps`` warps: [block_rows >= partials,
    block_cols channels] tiles of about TAIL_PER_THREAD elements a thread (a channel-major tail
    takes one channel; a channel-minor one walks its block block_cols channels at a time)."""
    block_rows = _pow2_cover(partials, 1 << 20)
    forced = _overrides.get().get(FINALIZE)
    if forced is not None:
        return replace(forced, block_rows=max(forced.block_rows, block_rows))
    block_cols = max(1, TAIL_PER_THREAD * 32 * num_warps // block_rows)
    return KernelConfig(block_rows, block_cols, num_warps=num_warps)


# ----------------------------------------------------------------------------- persistent


# Largest single-pass tile (elements a channel-major program holds, or rows x BLOCK_C of a
# channel-minor one) in registers with 16 warps, per op, family, load class and dtype: for every
# class the smallest, over the supported Triton versions, of the largest power-of-two tile that
# compiles without spills for sm_80 and sm_90 (`tritonbn capacities --json` writes one version's
# table into perf/inspect/capacities/; tests/test_capacities.py checks that these numbers are
# that rule applied to the committed tables, and that they compile spill-free on the running
# Triton).  Load classes: "vector" rows are 16-element aligned (128-bit accesses share an
# address among 16 bytes); "scalar" rows are not (7x7 images, C = 6 channels_last: an address per
# element); "four_group" views (steps in two dimensions) split each row offset with two more
# divisions.  float64 takes two registers an element.
_CAPACITY_TABLE = {  # (fp16, bf16, fp32, fp64)
    FORWARD: {
        CHANNEL_MAJOR: {"vector": (32768, 32768, 32768, 16384), "scalar": (16384, 16384, 16384, 8192),
                        "four_group": (16384, 32768, 16384, 8192)},
        CHANNEL_MINOR: {"vector": (16384, 16384, 16384, 8192), "scalar": (8192, 16384, 8192, 8192),
                        "four_group": (8192, 8192, 16384, 8192)},
    },
    BACKWARD: {
        CHANNEL_MAJOR: {"vector": (16384, 16384, 16384, 8192), "scalar": (8192, 8192, 8192, 8192),
                        "four_group": (8192, 16384, 8192, 4096)},
        CHANNEL_MINOR: {"vector": (16384, 16384, 16384, 8192), "scalar": (8192, 8192, 8192, 8192),
                        "four_group": (16384, 16384, 16384, 4096)},
    },
}
CAPACITY_DTYPES = ("fp16", "bf16", "fp32", "fp64")  # the order of _CAPACITY_TABLE's tuples
SINGLE_PASS_CAPACITY = {op: {family: {load: dict(zip(CAPACITY_DTYPES, tiles)) for load, tiles in loads.items()}
                             for family, loads in families.items()}
                        for op, families in _CAPACITY_TABLE.items()}
# Lookups go by element size (the launch decisions know it, not always the dtype): both 16-bit
# dtypes get the smaller of their two capacities.
_CAPACITY_BY_SIZE = {op: {family: {load: {2: min(by["fp16"], by["bf16"]), 4: by["fp32"], 8: by["fp64"]}
                                   for load, by in loads.items()}
                          for family, loads in families.items()}
                     for op, families in SINGLE_PASS_CAPACITY.items()}
PERSISTENT_WARPS = 16  # the warps the capacities were measured with
PERSISTENT_OFF = KernelConfig(0, 0)  # override_configs(persistent=PERSISTENT_OFF): split path only
# A channel-minor single-pass launch with at most this many programs runs them all at once on
# any target GPU (>= 108 SMs), so programs narrower than a 32-byte sector of channels share each
# sector through L2 instead of fetching it once per program.
CO_RESIDENT_PROGRAMS = 108


def vector_aligned(plan: ViewPlan) -> bool:
    """True when Triton can prove 16-element alignment of every row the kernels stream: each
    non-unit stride and the fast extent (inner, or C for channel-minor) a multiple of 16 (what
    its integer specialisation records), so loads and stores vectorise."""
    fast_extent = plan.inner if plan.family == CHANNEL_MAJOR else plan.channels
    strides_ok = all(stride % 16 == 0 for strides in plan.strides for stride in strides if stride != 1)
    return strides_ok and fast_extent % 16 == 0


def load_class(plan: ViewPlan) -> str:
    """The capacity class of a plan's rows: "four_group", "vector" or "scalar"."""
    if plan.outer_mid > 1:
        return "four_group"
    return "vector" if vector_aligned(plan) else "scalar"


def persistent_capacity(op: str, plan: ViewPlan, element_size: int = 4) -> int:
    """Elements a single-pass program of ``op`` holds for ``plan`` (SINGLE_PASS_CAPACITY)."""
    return _CAPACITY_BY_SIZE[op][plan.family][load_class(plan)][element_size]


def persistent_max_per_thread(op: str, plan: ViewPlan, element_size: int = 4) -> int:
    """Elements of each tensor a thread may hold in a single-pass tile: the capacity over
    PERSISTENT_WARPS warps (fewer warps than that for the same tile would spill)."""
    return persistent_capacity(op, plan, element_size) // (32 * PERSISTENT_WARPS)


def persistent_tile(plan: ViewPlan, op: str, element_size: int, capacity: int | None = None
                    ) -> tuple[int, int] | None:
    """(block_rows, block_cols) of a single-pass tile covering a channel's slice, or None when
    the slice does not fit the capacity of (op, family).

    Channel-minor tiles are [rows, BLOCK_C]: BLOCK_C shrinks from 64 to fit the capacity, down to
    one 32-byte sector of channels (narrower rows would use part of every sector they touch);
    below that only while the launch stays co-resident (CO_RESIDENT_PROGRAMS), where the
    programs reading the same rows share their sectors in L2.  Small-C channels_last tensors
    thus stay single-pass like their NCHW twins.  ``capacity``: the elements a program may hold
    (default the (op, family) capacity).
    """
    if capacity is None:
        capacity = persistent_capacity(op, plan, element_size)
    if plan.family == CHANNEL_MAJOR:
        block_rows, block_cols = _pow2_cover(plan.outer, 1 << 30), _pow2_cover(plan.inner, 1 << 30)
    else:
        block_rows, block_cols = _pow2_cover(plan.m, 1 << 30), _pow2_cover(plan.channels, BLOCK_C)
        sector_channels = max(1, 32 // element_size)
        while block_cols > sector_channels and block_rows * block_cols > capacity:
            block_cols //= 2
        while (block_cols > 1 and block_rows * block_cols > capacity
               and -(-plan.channels // (block_cols // 2)) <= CO_RESIDENT_PROGRAMS):
            block_cols //= 2
    if block_rows * block_cols > capacity:
        return None
    return block_rows, block_cols


_INVALID = object()  # a stored config that does not apply to the call
HEURISTIC_KNOBS = Knobs()  # a stored "{}": the heuristic's choice (the tuner found nothing better)


def persistent_from_knobs(plan: ViewPlan, op: str, element_size: int, knobs: Knobs) -> Any:
    """None (split path) for ``enabled: false``; the single-pass config with the stored warps;
    or _INVALID when the tile cannot cover the slice or the warps are out of range."""
    if not knobs.enabled:
        return None
    tile = persistent_tile(plan, op, element_size)
    if tile is None or not _launch_options_ok(knobs):
        return _INVALID
    warps = knobs.num_warps if knobs.num_warps is not None else _warps(tile[0] * tile[1])
    if tile[0] * tile[1] > persistent_max_per_thread(op, plan, element_size) * 32 * warps:
        return _INVALID  # too few warps for this slice: the registers would spill
    return KernelConfig(*tile, num_warps=warps)


def persistent_config(plan: ViewPlan, op: str, profile: DeviceProfile, element_size: int, *,
                      dtype: torch.dtype | str | None = None) -> KernelConfig | None:
    """Config of the single-pass kernel of ``op`` ("forward" or "backward") if a channel's
    slice fits one program (the tile covers it whole), else None: the split path runs.

    An override sets warps/stages (the tile always covers the slice) or PERSISTENT_OFF; the
    store may turn a bucket off or give warps; the heuristic goes single-pass whenever the
    slice fits.
    """
    forced = _overrides.get().get(PERSISTENT)
    if forced == PERSISTENT_OFF:
        return None
    if forced is not None:  # forced warps/stages; the tile always covers the slice
        tile = persistent_tile(plan, op, element_size)
        return None if tile is None else replace(forced, block_rows=tile[0], block_cols=tile[1])
    return _decide(PERSISTENT, plan, profile, op, _dtype_name(dtype), element_size).config


def heuristic_persistent(plan: ViewPlan, op: str, element_size: int) -> KernelConfig | None:
    tile = persistent_tile(plan, op, element_size)
    if tile is None:
        return None
    return KernelConfig(*tile, num_warps=_warps(tile[0] * tile[1]))


# ----------------------------------------------------------------------------- fused epilogues

# A fused BN + add + ReLU forward writes the ReLU's decisions as bits, a byte for 8 consecutive
# elements of the fast extent (inner channel-major, C channel-minor; kernels/common.py), so its
# tiles must hold whole bytes: 8 columns or more, or every column of the extent.
BITMASK_GROUP = 8


def _fast_extent(plan: ViewPlan) -> int:
    return plan.inner if plan.family == CHANNEL_MAJOR else plan.channels


def writes_whole_bytes(plan: ViewPlan, config: KernelConfig) -> bool:
    """Whether tiles of ``config`` write whole bytes of a bit mask on ``plan``."""
    return config.block_cols >= BITMASK_GROUP or config.block_cols >= _fast_extent(plan)


def bitmask_elementwise(plan: ViewPlan, config: KernelConfig) -> KernelConfig:
    """An elementwise config whose tiles hold whole bytes of the bit mask: ``config``, its columns
    widened to a byte's 8 (or the whole extent) where narrower, each program's run per channel
    kept (channel-major: the tile's elements; channel-minor: its rows, as row tiles of at most
    CHANNEL_MINOR_ELEMENTWISE_TILE elements)."""
    if writes_whole_bytes(plan, config):
        return config
    cols = min(BITMASK_GROUP, _pow2_cover(_fast_extent(plan), BITMASK_GROUP))
    if plan.family == CHANNEL_MAJOR:
        return replace(config, block_cols=cols, block_rows=max(1, config.block_rows * config.block_cols // cols))
    rows = min(config.block_rows, max(1, CHANNEL_MINOR_ELEMENTWISE_TILE // cols))
    return replace(config, block_cols=cols, block_rows=rows, row_tiles=config.row_tiles * (config.block_rows // rows))


def fused_persistent(plan: ViewPlan, op: str, element_size: int, config: KernelConfig | None,
                     bitmask: bool) -> KernelConfig | None:
    """A single-pass config for a fused call, or None (the split path).  A fused forward's tile is
    planned for half the plain kernel's capacity (a channel-minor block narrows; a channel-major
    slice must fit): with an addend it holds a second tile in registers, and the ReLU's epilogue
    alone took 128 registers against 63 and spilled 16-208 bytes at the plain capacity
    (channel-major, 16384 scalar loads, fp16/fp32, Triton 3.8, sm_80/sm_90).  A bit
    mask writer's tile must write whole bytes (the tile covers the slice, so only a channel-minor
    block narrower than 8 channels can fail that)."""
    if config is None:
        return None
    if op == FORWARD:
        tile = persistent_tile(plan, op, element_size, persistent_capacity(op, plan, element_size) // 2)
        if tile is None:
            return None
        config = replace(config, block_rows=tile[0], block_cols=tile[1])
    if bitmask and not writes_whole_bytes(plan, config):
        return None
    return config


# ----------------------------------------------------------------------------- the decision


@dataclass(frozen=True)
class Decision:
    """A role's config for a call and where it came from: "store" (``entry`` says which file
    and bucket), "online" (tuned on first use), or "heuristic"."""

    config: KernelConfig | None
    source: str
    entry: Any = None
    op: str | None = None
    note: str = ""


_generation = 0  # bumped when a store changes under us (the on-line tuner wrote one)


def clear_caches() -> None:
    """Forget every cached decision and parsed store (after writing a store, in tests)."""
    global _generation
    _generation += 1
    _decide_cached.cache_clear()
    _store.clear_cache()


def _dtype_name(dtype: torch.dtype | str | None) -> str | None:
    if dtype is None or isinstance(dtype, str):
        return dtype
    return str(dtype).replace("torch.", "")


def infer_op(role: str, plan: ViewPlan) -> str:
    """The op of a launch when the caller did not say: a backward plan covers three tensors
    (x, dy, dx), a forward plan two (x, y); a two-tensor elementwise launch is looked up as
    inference (the training forward's apply is the same kernel)."""
    if len(plan.strides) >= 3:
        return BACKWARD
    return INFERENCE if role == ELEMENTWISE else FORWARD


def _dtype_candidates(dtype: str | None, element_size: int | None) -> tuple[str, ...] | None:
    """The dtypes whose stored entries may serve the call (None: any, by preference)."""
    if dtype is not None:
        return (dtype,)
    if element_size is not None:
        by_size = {2: ("float16", "bfloat16"), 4: ("float32",), 8: ("float64",)}
        return by_size.get(element_size)
    return None


def online_enabled() -> bool:
    """TRITONBN_AUTOTUNE=1: read the on-line tuner's cache and tune unseen keys (off by default)."""
    return environment(_store.AUTOTUNE_ENV) == "1"


# The on-line tuner, if a tool installed one: (role, plan, profile, op, dtype, element_size) ->
# the role's knobs (Knobs(): the heuristic's choice) or None.  A hook rather than an import, so
# that the op (ops.py -> config) never imports the tuner (tuner -> ops would close a cycle).
OnlineTuner = Callable[[str, ViewPlan, DeviceProfile, str, str | None, int | None], Knobs | None]
_online_tuner: OnlineTuner | None = None
_warned_no_tuner = False


def set_online_tuner(tuner: OnlineTuner | None) -> None:
    """Install (or with None remove) the tuner that TRITONBN_AUTOTUNE=1 runs for keys no store
    has; decisions made before are forgotten."""
    global _online_tuner
    _online_tuner = tuner
    clear_caches()


def _decide(role: str, plan: ViewPlan, profile: DeviceProfile, op: str | None, dtype: str | None,
            element_size: int | None) -> Decision:
    state = (environment(_store.CONFIG_DIR_ENV) or None, online_enabled(), _generation, _store_disabled.get())
    return _decide_cached(role, plan, profile, op, dtype, element_size, state)


@functools.lru_cache(maxsize=8192)
def _decide_cached(role: str, plan: ViewPlan, profile: DeviceProfile, op: str | None, dtype: str | None,
                   element_size: int | None, state: tuple) -> Decision:
    config_dir, online, _, disabled = state
    op = op or infer_op(role, plan)
    if not disabled:
        gpu = _store.gpu_model(profile.name)
        dtypes = _dtype_candidates(dtype, element_size)
        for st in _store.stores_for(gpu, config_dir, online):
            entry = _lookup(st, dtypes, plan, op, role)
            if entry is None:
                continue
            if entry.knobs == HEURISTIC_KNOBS:  # the tuner kept the heuristic for this bucket
                return Decision(_heuristic(role, plan, profile, op, element_size, dtype), "store", entry, op,
                                "the heuristic's choice")
            config = _from_knobs(role, plan, op, element_size, entry.knobs, profile)
            if config is not _INVALID:
                return Decision(config, "store", entry, op)
            log.debug("tritonbn: stored %s config %s (%s) is invalid for %s; heuristic instead",
                      role, entry.knobs, st.path, plan)
            break  # the nearest stored answer does not apply: the heuristic decides
        else:
            if online and profile.on_gpu:
                tuned = _tune_online(role, plan, profile, op, dtype, element_size)
                if tuned is not None:
                    return tuned
    return Decision(_heuristic(role, plan, profile, op, element_size, dtype), "heuristic", None, op)


def _lookup(st: Any, dtypes: tuple[str, ...] | None, plan: ViewPlan, op: str, role: str) -> Any:
    if dtypes is None:
        return st.lookup(None, plan.family, op, role, plan.channels, plan.m)
    best = None
    for dtype in dtypes:
        entry = st.lookup(dtype, plan.family, op, role, plan.channels, plan.m)
        if entry is not None and (best is None or entry.distance(plan.channels, plan.m) <
                                  best.distance(plan.channels, plan.m) - 1e-9):
            best = entry
    return best


def _from_knobs(role: str, plan: ViewPlan, op: str, element_size: int | None, knobs: Knobs,
                profile: DeviceProfile) -> Any:
    if role == PERSISTENT:
        return persistent_from_knobs(plan, op, element_size or 4, knobs)
    if not knobs.enabled:
        return _INVALID
    if role == REDUCE:
        config = reduce_from_knobs(plan, knobs)
    else:
        config = elementwise_from_knobs(plan, knobs, *heuristic_elementwise_bounds(plan, profile, op))
    return _INVALID if config is None else config


# float64 lanes take two registers per accumulator: reduction tiles of 2048 elements at
# 4 per thread (4096 at 8 spilled 24-120 bytes on sm_90).
FLOAT64_REDUCE_TILE = 2048
FLOAT64_REDUCE_PER_THREAD = 4


def _heuristic(role: str, plan: ViewPlan, profile: DeviceProfile, op: str, element_size: int | None,
               dtype: str | None = None) -> Any:
    if role == REDUCE:
        knobs = heuristic_reduce_knobs(plan, profile)
        float64 = dtype == "float64" or element_size == 8
        tile = min(knobs.tile, FLOAT64_REDUCE_TILE) if float64 else knobs.tile
        return realize_reduce(plan, tile, knobs.split, knobs.block_c or BLOCK_C,
                              per_thread=reduce_per_thread(plan, op, float64))
    if role == ELEMENTWISE:
        if plan.family != CHANNEL_MAJOR:
            return heuristic_channel_minor_elementwise(plan, op)
        return realize_elementwise(plan, heuristic_elementwise_tile(plan, profile, op))
    return heuristic_persistent(plan, op, element_size or 4)


def _tune_online(role: str, plan: ViewPlan, profile: DeviceProfile, op: str, dtype: str | None,
                 element_size: int | None) -> Decision | None:
    """The installed on-line tuner's decision for a key no store has, or None."""
    global _warned_no_tuner
    if _online_tuner is None:
        if not _warned_no_tuner:
            _warned_no_tuner = True
            log.warning("tritonbn: %s=1 but no on-line tuner is installed (import tritonbn.autotune.online "
                        "to install it): unseen keys get the heuristic", _store.AUTOTUNE_ENV)
        return None
    knobs = _online_tuner(role, plan, profile, op, dtype, element_size)
    if knobs is None:
        return None
    if knobs == HEURISTIC_KNOBS:
        return Decision(_heuristic(role, plan, profile, op, element_size, dtype), "online", knobs, op,
                        "the heuristic's choice")
    config = _from_knobs(role, plan, op, element_size, knobs, profile)
    return None if config is _INVALID else Decision(config, "online", knobs, op)


def explain(role: str, plan: ViewPlan, profile: DeviceProfile, *, op: str | None = None,
            dtype: torch.dtype | str | None = None, element_size: int | None = None) -> Decision:
    """Which config ``role`` gets for this call and why (overrides included)."""
    forced = _overrides.get().get(role)
    if forced is not None:
        return Decision(forced, "override", None, op or infer_op(role, plan))
    return _decide(role, plan, profile, op, _dtype_name(dtype), element_size)


def _environment_reader() -> Callable[[str], str | None]:
    """``os.environ.get`` for the reads every call makes, at the cost of a dict lookup.

    ``os.environ.get`` encodes the name and decodes the value (about 1 µs, three reads a call);
    on POSIX ``os.environ`` keeps the bytes in ``os.environ._data``, which ``os.environ[...] =``,
    ``del`` and ``putenv`` through ``os.environ`` (monkeypatch included) update, so reading it
    sees what ``os.environ.get`` would.  Elsewhere (Windows keys are upper-cased str) the plain get.
    """
    data = getattr(os.environ, "_data", None)
    if os.name != "posix" or not isinstance(data, dict):
        return os.environ.get
    encoded: dict[str, bytes] = {}

    def read(name: str) -> str | None:
        key = encoded.get(name)
        if key is None:
            key = encoded[name] = os.fsencode(name)
        value = data.get(key)
        return None if value is None else os.fsdecode(value)

    return read


environment = _environment_reader()

BACKEND_ENV = "TRITONBN_BACKEND"  # auto (default), triton or reference: forces the dispatch (ops.backend_for)
INTERPRET_ENV = "TRITON_INTERPRET"


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 (CPU tensors then run the Triton kernels)."""
    return environment(INTERPRET_ENV) == "1"


def _environment_state_reader(names: tuple[str, ...]) -> Callable[[], tuple]:
    """A function returning the raw values of ``names`` in the environment as one tuple: a key
    component (compared, never decoded), read as ``environment`` reads, in one call."""
    data = getattr(os.environ, "_data", None)
    if os.name != "posix" or not isinstance(data, dict):
        return lambda: tuple(os.environ.get(name) for name in names)
    get = data.get
    first, second, third, fourth = (os.fsencode(name) for name in names)
    return lambda: (get(first), get(second), get(third), get(fourth))


# what the decisions and the dispatch read from the environment
_decision_environment = _environment_state_reader((_store.CONFIG_DIR_ENV, _store.AUTOTUNE_ENV, BACKEND_ENV,
                                                   INTERPRET_ENV))


def decision_context() -> tuple:
    """Everything besides the call's signature that the decisions above and the dispatch depend
    on (overrides, a forced profile, the store settings, the store generation, the environment
    variables of the stores and of the backend choice), as a hashable value: call plans and op
    entries cached per signature are keyed by it too, so an override, a new store or a forced
    backend is never missed."""
    overrides = _overrides.get()
    return (tuple(overrides.items()) if overrides else (), _profile_override.get(), _store_disabled.get(),
            _generation, _decision_environment())
