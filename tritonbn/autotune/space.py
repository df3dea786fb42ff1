"""Config spaces: the candidates the tuner tries, per kernel family and role.

A candidate is a ``Knobs`` (what the store keeps) realised for the call's plan as a
``KernelConfig``; candidates that realise to the same config are one candidate.  The spaces are
built from small helpers, so a space is easy to read and to change:

| role        | knobs                                                   | channel-minor also |
|-------------|---------------------------------------------------------|--------------------|
| reduce      | tile (elements) x split x warps (2-32 elements/thread)  | block_c            |
| elementwise | tile x warps (4-64 elements/thread)                     | block_c            |
| persistent  | off, or warps (at most 32 elements/thread)              |                    |

The finalize tail of a reduction is not tuned (its channel's last program reads a few KB), and no
space varies Triton's stages (the kernels stream; launches keep ``KernelConfig``'s default).

Candidates are pruned by what compiles without spills for the target GPU (``spill_free``:
``tritonbn.inspect.compile_launch``, ahead of time, no GPU needed; results cached in memory and
on disk).  The tuner prunes lazily: it compiles the best-ranked candidates until one does not
spill, so a key costs one or two compilations, not one per candidate.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from ..plan import CHANNEL_MAJOR, ViewPlan
from . import config as C
from .config import KernelConfig
from .store import Knobs, user_cache_dir

log = logging.getLogger("tritonbn")

__all__ = [
    "Candidate",
    "tile_choices",
    "warp_choices",
    "split_choices",
    "block_c_choices",
    "reduce_space",
    "elementwise_space",
    "persistent_space",
    "candidates",
    "spill_free",
]

TILES = (256, 512, 1024, 2048, 4096, 8192, 16384)
WARPS = (1, 2, 4, 8, 16, 32)
BLOCK_CS = (16, 32, 64, 128)
# elements per thread a tile may hold, per role (the reductions keep two or three accumulators)
PER_THREAD = {C.REDUCE: (2, 32), C.ELEMENTWISE: (4, 64), C.PERSISTENT: (1, 64)}  # persistent: at most
# config.persistent_max_per_thread(op, family) (the capacity over 16 warps)
MAX_SPLIT_FACTOR = 8  # try splits up to this many times what fills the GPU twice


@dataclass(frozen=True)
class Candidate:
    """One point of a role's space for one call: the knobs and what they realise to
    (``config`` None: the persistent path is off)."""

    knobs: Knobs
    config: KernelConfig | None

    @property
    def label(self) -> str:
        return self.knobs.describe()


def tile_choices() -> tuple[int, ...]:
    return TILES


def warp_choices(tile_elements: int, role: str, high: int | None = None) -> list[int]:
    """Warps that give each thread between PER_THREAD[role] elements of the tile (at most
    ``high`` when given)."""
    low, high = PER_THREAD[role][0], high or PER_THREAD[role][1]
    fits = [w for w in WARPS if low <= tile_elements / (32 * w) <= high]
    return fits or [max(1, min(WARPS[-1], tile_elements // (32 * low)))]


def block_c_choices(plan: ViewPlan, element_size: int) -> list[int | None]:
    """Channel-minor: channels per tile, from one 32-byte sector of channels to 128 (those that
    realise differently for this C); channel-major: [None]."""
    if plan.family == CHANNEL_MAJOR:
        return [None]
    sector = max(1, 32 // element_size)
    seen, out = set(), []
    for block_c in BLOCK_CS:
        width = C._pow2_cover(plan.channels, block_c)
        if block_c < sector and width < plan.channels:
            continue
        if width not in seen:
            seen.add(width)
            out.append(block_c)
    return out


def split_choices(plan: ViewPlan, tile: int, block_c: int | None, profile: C.DeviceProfile) -> list[int]:
    """Powers of two up to MAX_SPLIT_FACTOR x what gives every SM two programs, and the
    heuristic's rule for this tile, all within ``config.max_useful_split``."""
    width = block_c or C.BLOCK_C
    channel_programs, _ = C.reduce_geometry(plan, width)
    wanted = -(-2 * profile.sm_count // channel_programs)
    useful = C.max_useful_split(plan, tile, width)
    limit = min(useful, MAX_SPLIT_FACTOR * wanted)
    splits = {1 << k for k in range(0, limit.bit_length()) if 1 << k <= limit}
    heuristic = max(1, min(wanted, plan.m // C.MIN_SPLIT_ELEMENTS, C.MAX_SPLITS))
    if heuristic <= useful:
        splits.add(heuristic)
    return sorted(splits)


def _dedupe(candidates: Iterable[Candidate]) -> list[Candidate]:
    seen, out = set(), []
    for cand in candidates:
        if cand.config in seen:
            continue
        seen.add(cand.config)
        out.append(cand)
    return out


def reduce_space(plan: ViewPlan, profile: C.DeviceProfile, element_size: int) -> list[Candidate]:
    out = []
    for block_c in block_c_choices(plan, element_size):
        for tile in tile_choices():
            for split in split_choices(plan, tile, block_c, profile):
                rows, cols = C._tile(plan, tile, block_c or C.BLOCK_C)
                for warps in warp_choices(rows * cols, C.REDUCE):
                    knobs = Knobs(tile=tile, split=split, block_c=block_c, num_warps=warps)
                    config = C.reduce_from_knobs(plan, knobs)
                    if config is not None:
                        out.append(Candidate(knobs, config))
    return _dedupe(out)


def elementwise_space(plan: ViewPlan, profile: C.DeviceProfile, element_size: int,
                      op: str = C.INFERENCE) -> list[Candidate]:
    """Tiles, channel blocks and warps whose runs per channel and program counts are at least the
    heuristic's (see config.elementwise_from_knobs)."""
    out = []
    bounds = C.heuristic_elementwise_bounds(plan, profile, op)
    for block_c in block_c_choices(plan, element_size):
        for tile in tile_choices():
            rows, cols = C._tile(plan, tile, block_c or C.BLOCK_C, narrow=True)
            for warps in warp_choices(rows * cols, C.ELEMENTWISE):
                knobs = Knobs(tile=tile, block_c=block_c, num_warps=warps)
                config = C.elementwise_from_knobs(plan, knobs, *bounds)
                if config is not None:
                    out.append(Candidate(knobs, config))
    return _dedupe(out)


def persistent_space(plan: ViewPlan, op: str, element_size: int) -> list[Candidate]:
    """Off, and single-pass with each warp count that fits (empty when the slice does not fit:
    there is nothing to choose)."""
    tile = C.persistent_tile(plan, op, element_size)
    if tile is None:
        return []
    out = [Candidate(Knobs(enabled=False), None)]
    for warps in warp_choices(tile[0] * tile[1], C.PERSISTENT, C.persistent_max_per_thread(op, plan, element_size)):
        knobs = Knobs(num_warps=warps)
        config = C.persistent_from_knobs(plan, op, element_size, knobs)
        if isinstance(config, KernelConfig):
            out.append(Candidate(knobs, config))
    return _dedupe(out)


def candidates(role: str, plan: ViewPlan, op: str, profile: C.DeviceProfile, element_size: int) -> list[Candidate]:
    """The space of ``role`` for one call."""
    if role == C.REDUCE:
        return reduce_space(plan, profile, element_size)
    if role == C.ELEMENTWISE:
        cands = elementwise_space(plan, profile, element_size, op)
        default = heuristic_candidate(role, plan, op, profile, element_size)
        # channel-minor: the heuristic's row tiles are not a knob, so it is its own candidate
        return cands if any(c.config == default.config for c in cands) else [default, *cands]
    if role == C.PERSISTENT:
        return persistent_space(plan, op, element_size)
    raise ValueError(f"no tuned space for role {role!r}")


def heuristic_candidate(role: str, plan: ViewPlan, op: str, profile: C.DeviceProfile,
                        element_size: int) -> Candidate:
    """The heuristic's choice as a candidate (its knobs made explicit)."""
    if role == C.PERSISTENT:
        config = C.heuristic_persistent(plan, op, element_size)
        if config is None:
            return Candidate(Knobs(enabled=False), None)
        return Candidate(Knobs(num_warps=config.num_warps), config)
    if role == C.REDUCE:
        knobs = C.heuristic_reduce_knobs(plan, profile)
        config = C.realize_reduce(plan, knobs.tile, knobs.split, knobs.block_c or C.BLOCK_C)
    else:  # the heuristic's own config (channel-minor: with its row tiles, which are not a knob)
        knobs = C.heuristic_elementwise_knobs(plan, profile, op)
        config = C._heuristic(C.ELEMENTWISE, plan, profile, op, element_size)
    return Candidate(Knobs(tile=knobs.tile, split=knobs.split, block_c=knobs.block_c,
                           num_warps=config.num_warps), config)


# ----------------------------------------------------------------------------- spill pruning

_compile_lock = threading.Lock()
_compile_memo: dict[str, dict] = {}
_disk_loaded = False


def _compile_cache_path() -> Path:
    return user_cache_dir() / "compiled.json"


def _compile_key(launch: Any, arch: str) -> str | None:
    """What decides a variant's registers: kernel source, arch, pointer dtypes, constexprs,
    warps, stages.  Integer arguments' specialisation (divisible by 16, equal to 1) is left out
    of the key on purpose: it changes addressing, not what a thread holds, and keeping it would
    compile every shape anew."""
    import torch
    from triton.runtime.jit import JITFunction

    kernel = launch.kernel
    if not isinstance(kernel, JITFunction):  # interpreted (TRITON_INTERPRET=1): nothing to compile
        return None
    source_key = kernel.cache_key
    pointers = [str(arg.dtype) for arg in launch.args if isinstance(arg, torch.Tensor)]
    constexprs = json.dumps({k: repr(v) for k, v in launch.constexprs.items()}, sort_keys=True)
    return "|".join([launch.name, source_key, arch, ",".join(pointers), constexprs,
                     str(launch.config.num_warps), str(launch.config.num_stages)])


def _load_disk_cache() -> None:
    global _disk_loaded
    if _disk_loaded:
        return
    _disk_loaded = True
    try:
        _compile_memo.update(json.loads(_compile_cache_path().read_text()))
    except (OSError, ValueError):
        pass


def _save_disk_cache() -> None:
    path = _compile_cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(_compile_memo))
        os.replace(tmp, path)
    except OSError as exc:  # a read-only home must not stop tuning
        log.debug("tritonbn: cannot write the compile cache %s: %s", path, exc)


def compiled_stats(launch: Any, arch: str) -> dict | None:
    """``inspect.compile_launch`` of a captured launch for ``arch`` (registers, spills, ...),
    cached; None when the kernel is interpreted (TRITON_INTERPRET=1: nothing to compile)."""
    key = _compile_key(launch, arch)
    if key is None:
        return None
    with _compile_lock:
        _load_disk_cache()
        if key in _compile_memo:
            return _compile_memo[key]
    from ..inspect import compile_launch

    stats = compile_launch(launch, arch)
    with _compile_lock:
        _compile_memo[key] = stats
        _save_disk_cache()
    return stats


def spill_free(launches: Iterable[Any], arch: str) -> bool | None:
    """True when every launch compiles for ``arch`` without spills, False when one spills, None
    when this process cannot compile (interpreted kernels)."""
    verdict: bool | None = True
    for launch in launches:
        stats = compiled_stats(launch, arch)
        if stats is None:
            return None
        if stats["spills"]:
            verdict = False
    return verdict
