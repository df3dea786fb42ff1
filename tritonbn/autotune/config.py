"""Launch decisions as data: ``KernelConfig`` and how one is chosen for a call.

Every launch of every kernel takes its block sizes, split factors, warps and stages from a
``KernelConfig`` returned here; launchers hold no tuning constants.  For a role (reduce,
elementwise, persistent) a config is chosen in this order:

1. ``override_configs`` (tests and the tuner force a config for one role);
2. the config store (``store.py``): the tuned *knobs* of the nearest (C, m) bucket of the call's
   (dtype, family, op, role) for this GPU model, realised for the call's geometry, if valid for
   it (an invalid stored config, e.g. a split larger than the call can use, falls back);
3. with ``TRITONBN_AUTOTUNE=1`` on a GPU, a key no store has is tuned on first use
   (``online.py``);
4. the heuristic below.

Steps 2-4 are cached per call signature (plan, profile, op, dtype and the store settings), so a
decision costs one dict lookup after the first call.  The finalize keeps its heuristic: it is
one tiny launch whose time is its launch latency.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os
from dataclasses import dataclass, replace
from typing import Any, Iterator

import torch

from ..plan import CHANNEL_MAJOR, ViewPlan
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


def _tile(plan: ViewPlan, tile_elements: int, block_c: int = BLOCK_C) -> tuple[int, int]:
    """(block_rows, block_cols) of a streaming tile of ``tile_elements`` for ``plan``'s family;
    channel-minor tiles span at most ``block_c`` channels."""
    if plan.family == CHANNEL_MAJOR:
        block_cols = _pow2_cover(plan.inner, tile_elements)
        block_rows = _pow2_cover(plan.outer, max(1, tile_elements // block_cols))
    else:
        block_cols = _pow2_cover(plan.channels, block_c)
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
# Bounds a stored knob must respect (anything outside is an invalid entry: heuristic instead).
MAX_TILE_ELEMENTS = 65536
MAX_WARPS = 32
MAX_STAGES = 8


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
    _, channel_elements = reduce_geometry(plan, block_c)
    block_rows, block_cols = _tile(plan, tile, block_c)
    if plan.family == CHANNEL_MAJOR:
        tiles = -(-plan.outer // block_rows) * -(-plan.inner // block_cols)
    else:
        tiles = -(-plan.m // block_rows)
    return max(1, min(channel_elements // MIN_SPLIT_ELEMENTS, tiles, MAX_SPLITS))


def realize_reduce(plan: ViewPlan, tile: int, split: int, block_c: int = BLOCK_C,
                   num_warps: int | None = None, num_stages: int = 1) -> KernelConfig:
    """The reduction config of ``plan`` for a tile of ``tile`` elements split ``split`` ways
    (rows first, then columns, whole tiles per split); warps default to 8 elements per thread."""
    block_rows, block_cols = _tile(plan, tile, block_c)
    if plan.family == CHANNEL_MAJOR:
        tiles_rows, tiles_cols = -(-plan.outer // block_rows), -(-plan.inner // block_cols)
    else:
        tiles_rows, tiles_cols = -(-plan.m // block_rows), 1
    split_rows = min(split, tiles_rows)
    split_cols = min(-(-split // split_rows), tiles_cols)
    warps = num_warps if num_warps is not None else _warps(block_rows * block_cols, per_thread=8)
    return KernelConfig(block_rows, block_cols, split_rows, split_cols, num_warps=warps, num_stages=num_stages)


def heuristic_reduce_knobs(plan: ViewPlan, profile: DeviceProfile) -> Knobs:
    """The heuristic's reduction knobs.

    The split gives the launch at least two programs per SM when the channels (blocks) alone
    cannot, as long as each split keeps MIN_SPLIT_ELEMENTS; tiles shrink (down to
    MIN_TILE_ELEMENTS) so that a split is still a whole number of tiles.
    """
    channel_programs, channel_elements = reduce_geometry(plan)
    wanted = -(-2 * profile.sm_count // channel_programs)
    split = max(1, min(wanted, channel_elements // MIN_SPLIT_ELEMENTS, MAX_SPLITS))
    tile = max(MIN_TILE_ELEMENTS, min(profile.tile_elements, _pow2_floor(channel_elements // split)))
    return Knobs(tile=tile, split=split, block_c=None if plan.family == CHANNEL_MAJOR else BLOCK_C)


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
    config = realize_reduce(plan, knobs.tile, knobs.split, block_c, knobs.num_warps, knobs.num_stages)
    return config if config.splits <= MAX_SPLITS else None


def _launch_options_ok(knobs: Knobs) -> bool:
    warps_ok = knobs.num_warps is None or (_is_pow2(knobs.num_warps) and knobs.num_warps <= MAX_WARPS)
    return warps_ok and isinstance(knobs.num_stages, int) and 1 <= knobs.num_stages <= MAX_STAGES


def reduce_config(plan: ViewPlan, profile: DeviceProfile, *, op: str | None = None,
                  dtype: torch.dtype | str | None = None) -> KernelConfig:
    """Config of a reduction launch (statistics or backward partials): the override, else the
    store's (for ``op``/``dtype``; inferred/any when not given), else the heuristic's."""
    forced = _overrides.get().get(REDUCE)
    if forced is not None:
        return forced
    return _decide(REDUCE, plan, profile, op, _dtype_name(dtype), None).config


# ----------------------------------------------------------------------------- elementwise


def realize_elementwise(plan: ViewPlan, tile: int, block_c: int = BLOCK_C, num_warps: int | None = None,
                        num_stages: int = 1) -> KernelConfig:
    """One tile of ``tile`` elements per program; warps default to 16 elements per thread."""
    block_rows, block_cols = _tile(plan, tile, block_c)
    warps = num_warps if num_warps is not None else _warps(block_rows * block_cols)
    return KernelConfig(block_rows, block_cols, num_warps=warps, num_stages=num_stages)


def heuristic_elementwise_knobs(plan: ViewPlan, profile: DeviceProfile) -> Knobs:
    return Knobs(tile=profile.tile_elements, block_c=None if plan.family == CHANNEL_MAJOR else BLOCK_C)


def elementwise_from_knobs(plan: ViewPlan, knobs: Knobs) -> KernelConfig | None:
    block_c = knobs.block_c or BLOCK_C
    if not (_is_pow2(knobs.tile) and knobs.tile <= MAX_TILE_ELEMENTS and _is_pow2(block_c)):
        return None
    if not _launch_options_ok(knobs):
        return None
    return realize_elementwise(plan, knobs.tile, block_c, knobs.num_warps, knobs.num_stages)


def elementwise_config(plan: ViewPlan, profile: DeviceProfile, *, op: str | None = None,
                       dtype: torch.dtype | str | None = None) -> KernelConfig:
    """Config of the elementwise (apply / dx) launch: one tile per program."""
    forced = _overrides.get().get(ELEMENTWISE)
    if forced is not None:
        return forced
    return _decide(ELEMENTWISE, plan, profile, op, _dtype_name(dtype), None).config


# ----------------------------------------------------------------------------- finalize


def finalize_config(channels: int, partials: int) -> KernelConfig:
    """Config of a finalize launch: a [partials, BLOCK_C] tile of channels per program."""
    forced = _overrides.get().get(FINALIZE)
    if forced is not None:
        return replace(forced, block_rows=max(forced.block_rows, _pow2_cover(partials, 1 << 20)))
    block_rows = _pow2_cover(partials, 1 << 20)
    block_cols = _pow2_cover(channels, max(1, 2048 // block_rows))
    return KernelConfig(block_rows, block_cols, num_warps=4)


# ----------------------------------------------------------------------------- persistent


# Largest slice (elements per channel-major program, or rows x BLOCK_C per channel-minor
# program) that a persistent program keeps in registers.  Chosen from the compiled code:
# `tritonbn inspect --arch sm_90` shows zero spills at these sizes with 16 warps (the backward
# holds x and dy, so half the forward's).
PERSISTENT_CAPACITY = {FORWARD: 16384, BACKWARD: 8192}
PERSISTENT_OFF = KernelConfig(0, 0)  # override_configs(persistent=PERSISTENT_OFF): split path only
# Stored warps for a single-pass tile must leave each thread at most this many elements of each
# tensor it holds (the heuristic's capacity over 16 warps, which compiles without spills).
PERSISTENT_MAX_PER_THREAD = {FORWARD: 32, BACKWARD: 16}


def persistent_tile(plan: ViewPlan, op: str, element_size: int) -> tuple[int, int] | None:
    """(block_rows, block_cols) of a single-pass tile covering a channel's slice, or None when
    the slice does not fit PERSISTENT_CAPACITY[op].

    Channel-minor tiles are [rows, BLOCK_C]: BLOCK_C shrinks from 64 to fit the capacity, but
    never below one 32-byte sector of channels (narrower rows would waste most of every sector
    they touch), so only slices of up to capacity / (32 / element_size) rows go single-pass.
    """
    capacity = PERSISTENT_CAPACITY[op]
    if plan.family == CHANNEL_MAJOR:
        block_rows, block_cols = _pow2_cover(plan.outer, 1 << 30), _pow2_cover(plan.inner, 1 << 30)
    else:
        block_rows, block_cols = _pow2_cover(plan.m, 1 << 30), _pow2_cover(plan.channels, BLOCK_C)
        sector_channels = max(1, 32 // element_size)
        while block_cols > sector_channels and block_rows * block_cols > capacity:
            block_cols //= 2
    if block_rows * block_cols > capacity:
        return None
    return block_rows, block_cols


_INVALID = object()  # a stored config that does not apply to the call
HEURISTIC_KNOBS = Knobs()  # a stored "{}": the heuristic's choice (the tuner found nothing better)


def persistent_from_knobs(plan: ViewPlan, op: str, element_size: int, knobs: Knobs) -> Any:
    """None (split path) for ``enabled: false``; the single-pass config with the stored warps and
    stages; or _INVALID when the tile cannot cover the slice or the options are out of range."""
    if not knobs.enabled:
        return None
    tile = persistent_tile(plan, op, element_size)
    if tile is None or not _launch_options_ok(knobs):
        return _INVALID
    warps = knobs.num_warps if knobs.num_warps is not None else _warps(tile[0] * tile[1])
    if tile[0] * tile[1] > PERSISTENT_MAX_PER_THREAD[op] * 32 * warps:
        return _INVALID  # too few warps for this slice: the registers would spill
    return KernelConfig(*tile, num_warps=warps, num_stages=knobs.num_stages)


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
    return os.environ.get(_store.AUTOTUNE_ENV, "0") == "1"


def _decide(role: str, plan: ViewPlan, profile: DeviceProfile, op: str | None, dtype: str | None,
            element_size: int | None) -> Decision:
    state = (os.environ.get(_store.CONFIG_DIR_ENV) or None, online_enabled(), _generation, _store_disabled.get())
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
                return Decision(_heuristic(role, plan, profile, op, element_size), "store", entry, op,
                                "the heuristic's choice")
            config = _from_knobs(role, plan, op, element_size, entry.knobs)
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
    return Decision(_heuristic(role, plan, profile, op, element_size), "heuristic", None, op)


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


def _from_knobs(role: str, plan: ViewPlan, op: str, element_size: int | None, knobs: Knobs) -> Any:
    if role == PERSISTENT:
        return persistent_from_knobs(plan, op, element_size or 4, knobs)
    if not knobs.enabled:
        return _INVALID
    config = reduce_from_knobs(plan, knobs) if role == REDUCE else elementwise_from_knobs(plan, knobs)
    return _INVALID if config is None else config


def _heuristic(role: str, plan: ViewPlan, profile: DeviceProfile, op: str, element_size: int | None) -> Any:
    if role == REDUCE:
        knobs = heuristic_reduce_knobs(plan, profile)
        return realize_reduce(plan, knobs.tile, knobs.split, knobs.block_c or BLOCK_C)
    if role == ELEMENTWISE:
        return realize_elementwise(plan, profile.tile_elements)
    return heuristic_persistent(plan, op, element_size or 4)


def _tune_online(role: str, plan: ViewPlan, profile: DeviceProfile, op: str, dtype: str | None,
                 element_size: int | None) -> Decision | None:
    from . import online

    knobs = online.tune_on_first_use(role, plan, profile, op, dtype, element_size)
    if knobs is None:
        return None
    if knobs == HEURISTIC_KNOBS:
        return Decision(_heuristic(role, plan, profile, op, element_size), "online", knobs, op,
                        "the heuristic's choice")
    config = _from_knobs(role, plan, op, element_size, knobs)
    return None if config is _INVALID else Decision(config, "online", knobs, op)


def explain(role: str, plan: ViewPlan, profile: DeviceProfile, *, op: str | None = None,
            dtype: torch.dtype | str | None = None, element_size: int | None = None) -> Decision:
    """Which config ``role`` gets for this call and why (overrides included)."""
    forced = _overrides.get().get(role)
    if forced is not None:
        return Decision(forced, "override", None, op or infer_op(role, plan))
    return _decide(role, plan, profile, op, _dtype_name(dtype), element_size)


def interpreting() -> bool:
    """True when TRITON_INTERPRET=1 (CPU tensors then run the Triton kernels)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
