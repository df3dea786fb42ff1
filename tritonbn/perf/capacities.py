"""``tritonbn capacities``: the largest single-pass tile that compiles without spills, per class.

A persistent (single-pass) program keeps a channel's slice in registers; how much fits depends
on the op, the family, how the rows are loaded and the dtype, and on the Triton version that
compiles it (Triton 3.6's channel-minor half forward spills at a tile 3.8 holds).  This probe
compiles each class's single-pass kernel ahead of time (``inspect.compile_launch``, ptxas of
sm_80 and sm_90, the warps the library gives the tile) at tiles of 1024, 2048, ... elements and reports the largest one that
spills nothing on both archs (searched from the library's capacity up or down).  ``--json`` writes one version's table; the committed tables
(``perf/inspect/capacities/triton-<version>.json``) are what the library's capacities are
derived from: ``autotune.config.persistent_capacity`` must equal, for every class, the minimum
over the supported versions of the largest spill-free tile (tests/test_capacities.py).

Classes: op (forward, backward) x family (channel_major, channel_minor) x load ("vector":
16-element aligned rows, 128-bit accesses; "scalar": 7x7 images and C = 6 channels_last, an
address per element; "four_group": step-sliced rank-5 views, two more divisions per row) x dtype.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch

OPS = ("forward", "backward")
LOADS = ("vector", "scalar", "four_group")
PROBE_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}
TILES = tuple(2**k for k in range(10, 17))  # 1024 .. 65536 elements a program
TABLE_DIR = Path(__file__).resolve().parents[2] / "perf" / "inspect" / "capacities"


@dataclass(frozen=True)
class ProbeClass:
    """One capacity class and how to build a call whose single-pass tile has ``tile`` elements:
    ``shape(tile)`` the data's shape, its axis and layout marker (``inspect._meta_data``), and the
    tile's channel width (channel-minor; None: the tile's rows cover the rows, its width follows);
    channel-major tiles cover the slice."""

    family: str
    load: str
    shape: Callable[[int], tuple[int, ...]]
    axis: int
    layout: object
    block_cols: int | None


CLASSES = [
    ProbeClass("channel_major", "vector", lambda t: (t // 1024, 2, 32, 32), 1, None, None),
    ProbeClass("channel_major", "scalar", lambda t: (t // 64, 2, 7, 7), 1, None, None),
    ProbeClass("channel_major", "four_group", lambda t: (t // 1024, 2, 4, 16, 16), 1, "stepped", None),
    ProbeClass("channel_minor", "vector", lambda t: (t // 64, 64), -1, None, 64),
    ProbeClass("channel_minor", "scalar", lambda t: (t, 6), -1, None, 1),
    # inspect's stepped NDHWC view: 1024 rows, the tile's channel width grows with it (as the
    # library narrows channels to fit the capacity)
    ProbeClass("channel_minor", "four_group", lambda t: (2, 64, 4, 8, 16), 1, "stepped_channels_last_3d", None),
]


def probe_launch(cls: ProbeClass, op: str, dtype: torch.dtype, tile: int):
    """The captured single-pass launch of ``op`` for ``cls`` at ``tile`` elements (dry run on
    meta tensors, the tile forced past the library's capacity)."""
    from .. import ops
    from ..autotune.config import KernelConfig, _pow2_cover, _warps, load_class
    from ..inspect import _meta_data
    from ..plan import plan_view
    from ..validation import validate

    shape = cls.shape(tile)
    x = _meta_data(shape, cls.layout, dtype)
    axis = cls.axis % len(shape)
    param = torch.float64 if dtype == torch.float64 else torch.float32
    params = [torch.empty(shape[axis], dtype=param, device="meta") for _ in range(4)]
    settings = validate(x, tuple(params), eps=1e-5, momentum=0.9, fix_gamma=False, use_global_stats=False,
                        axis=axis, out=None, training=True, unbiased_update=False)
    y = torch.empty_like(x)
    plan = plan_view(x.shape, axis, [x.stride(), y.stride()] + ([y.stride()] if op == "backward" else []))
    assert plan is not None and plan.family == cls.family and load_class(plan) == cls.load, (cls, plan)
    if cls.family == "channel_major":
        block = (_pow2_cover(plan.outer, 1 << 30), _pow2_cover(plan.inner, 1 << 30))
    else:
        block_cols = cls.block_cols or tile // _pow2_cover(plan.m, 1 << 30)
        block = (tile // block_cols, block_cols)
    assert block[0] * block[1] == tile, (cls, block, tile)
    cfg = KernelConfig(*block, num_warps=_warps(tile))  # the warps the library gives the tile
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    stats = [torch.empty(shape[axis], dtype=acc, device="meta") for _ in range(2)]
    with ops.dry_run() as launches:
        if op == "forward":
            ops.launch_persistent_forward(x, y, plan, cfg, tuple(params), settings, acc)
        else:
            center = torch.empty((2, shape[axis]), dtype=acc, device="meta")
            dgamma, dbeta = (torch.empty(shape[axis], dtype=p.dtype, device="meta") for p in params[:2])
            ops.persistent_backward_launch(plan, cfg, settings)(x, torch.empty_like(x), y, center, stats[1],
                                                               params[0], dgamma, dbeta, x, y)
    (launch,) = launches
    return launch


def largest_spill_free(cls: ProbeClass, op: str, dtype: torch.dtype, archs: Iterable[str], start: int,
                       tiles: tuple[int, ...] = TILES) -> int:
    """The largest of ``tiles`` compiling with 0 spills on every arch (0 if none does), searched
    from ``start``: upwards while it stays spill-free, else downwards until it is (register
    pressure grows with the tile, so spill-freedom is monotone)."""
    from ..inspect import compile_launch

    def spill_free(tile: int) -> bool:
        launch = probe_launch(cls, op, dtype, tile)
        return not any(compile_launch(launch, arch)["spills"] for arch in archs)

    index = tiles.index(start)
    if spill_free(start):
        while index + 1 < len(tiles) and spill_free(tiles[index + 1]):
            index += 1
        return tiles[index]
    while index > 0:
        index -= 1
        if spill_free(tiles[index]):
            return tiles[index]
    return 0


def _probe_entry(entry: tuple[str, int, str, tuple[str, ...]]) -> int:
    op, class_index, name, archs = entry  # an index into CLASSES: workers get picklable entries
    cls = CLASSES[class_index]
    return largest_spill_free(cls, op, PROBE_DTYPES[name], archs, start=library_capacity(cls, op, name))


def probe(archs: Iterable[str] = ("sm_80", "sm_90"), dtypes: Iterable[str] = tuple(PROBE_DTYPES),
          progress: Callable[[str], None] | None = None, jobs: int = 1) -> dict:
    """{"triton": version, "archs": [...], "capacities": {op: {family: {load: {dtype: tile}}}}}.

    ``jobs`` > 1 probes classes in forked worker processes (compiling is CPU-bound)."""
    import multiprocessing

    import triton

    archs = tuple(archs)
    entries = [(op, index, name, archs) for op in OPS for index in range(len(CLASSES)) for name in dtypes]
    if jobs > 1:
        with multiprocessing.get_context("fork").Pool(jobs) as pool:
            tiles = pool.map(_probe_entry, entries, chunksize=1)
    else:
        tiles = []
        for entry in entries:
            if progress:
                progress(f"{entry[0]} {CLASSES[entry[1]].family} {CLASSES[entry[1]].load} {entry[2]}")
            tiles.append(_probe_entry(entry))
    table: dict = {}
    for (op, index, name, _), tile in zip(entries, tiles):
        cls = CLASSES[index]
        table.setdefault(op, {}).setdefault(cls.family, {}).setdefault(cls.load, {})[name] = tile
    return {"triton": triton.__version__, "archs": list(archs), "warps": "library (16 a thread, at most 16)",
            "capacities": table}


def committed_tables(directory: Path = TABLE_DIR) -> list[dict]:
    """The committed per-version tables (one JSON per Triton version)."""
    return [json.loads(path.read_text()) for path in sorted(directory.glob("triton-*.json"))]


def derived_capacity(tables: list[dict], op: str, family: str, load: str, dtype: str) -> int:
    """The rule: the smallest, over the tables (supported Triton versions), of the largest
    spill-free tile of the class."""
    return min(table["capacities"][op][family][load][dtype] for table in tables)


def library_capacity(cls: ProbeClass, op: str, dtype_name: str) -> int:
    """What ``autotune.config.SINGLE_PASS_CAPACITY`` gives the class."""
    from ..autotune.config import SINGLE_PASS_CAPACITY

    return SINGLE_PASS_CAPACITY[op][cls.family][cls.load][dtype_name]


def check(archs: Iterable[str], dtypes: Iterable[str], progress: Callable[[str], None] | None = None
          ) -> list[tuple[str, str, str, str, int, int]]:
    """Compile every class at the library's capacity: rows (op, family, load, dtype, tile,
    spilled bytes summed over ``archs``)."""
    from ..inspect import compile_launch

    rows = []
    for op in OPS:
        for cls in CLASSES:
            for name in dtypes:
                tile = library_capacity(cls, op, name)
                if progress:
                    progress(f"{op} {cls.family} {cls.load} {name} at {tile}")
                launch = probe_launch(cls, op, PROBE_DTYPES[name], tile)
                spills = sum(compile_launch(launch, arch)["spills"] for arch in archs)
                rows.append((op, cls.family, cls.load, name, tile, spills))
    return rows


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arch", action="append", choices=["sm_80", "sm_90"], help="target (default both)")
    parser.add_argument("--dtype", action="append", choices=sorted(PROBE_DTYPES), help="dtype (default all)")
    parser.add_argument("--json", metavar="FILE", help="write the table (perf/inspect/capacities/triton-X.Y.Z.json)")
    parser.add_argument("--jobs", type=int, default=1, help="worker processes for the probe (default 1)")
    parser.add_argument("--check", action="store_true",
                        help="only compile each class at the library's capacity; exit 1 if any spills")


def _progress(text: str) -> None:
    print(f"compiling {text}", file=sys.stderr, flush=True)


def run(args: argparse.Namespace) -> int:
    archs, dtypes = args.arch or ["sm_80", "sm_90"], args.dtype or list(PROBE_DTYPES)
    if args.check:
        rows = check(archs, dtypes, progress=_progress)
        for op, family, load, name, tile, spills in rows:
            print(f"{op:9s} {family:14s} {load:11s} {name:5s} {tile:6d} elements: {spills} B spilled")
        spilling = [row for row in rows if row[-1]]
        print(f"{len(rows)} classes at the library's capacities, {len(spilling)} spilling ({', '.join(archs)})")
        return 1 if spilling else 0
    table = probe(archs, dtypes, progress=_progress, jobs=args.jobs)
    print(f"Triton {table['triton']}, {', '.join(table['archs'])}: largest spill-free single-pass tile")
    for op, families in table["capacities"].items():
        for family, loads in families.items():
            for load, by_dtype in loads.items():
                cells = "  ".join(f"{name} {tile:6d}" for name, tile in by_dtype.items())
                print(f"{op:9s} {family:14s} {load:11s} {cells}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0
