"""The config store: tuned launch decisions per GPU model, as versioned JSON.

One file per GPU model, ``<gpu>.json`` (``h100-sxm.json``), found in this order:

1. ``$TRITONBN_CONFIG_DIR/<gpu>.json`` when that variable is set (a user's own store; it
   *replaces* the shipped one);
2. the shipped store: ``autotune_configs/`` at the repository root (source checkouts and
   editable installs), or the package data of an installed wheel (``<prefix>/share/tritonbn/
   autotune_configs``);
3. in front of both, with ``TRITONBN_AUTOTUNE=1``, the on-line tuner's cache
   (``~/.cache/tritonbn/autotune/<gpu>.json``; see ``online.py``).

Only *measured* stores steer launches: a file found there whose ``timing`` is not
``"measured"`` (a modelled store, written by ``tritonbn tune`` without a GPU, or one that does
not say how it was made) is skipped with a warning.  A modelled store is a report: its numbers
come from the cost model's constants, not from a GPU (it lives with its report, under
``perf/results/autotune/<gpu>/``), and ``load_store`` still reads it for people and tools.

Schema 1::

    {"schema": 1, "gpu": "h100-sxm", "timing": "measured" | "modelled", "modelled": false | true,
     "method": "...", "lookup": {...},
     "configs": {dtype: {family: {op: {role: {"C64_m131072": {"config": {knobs}, ...}}}}}}}

``timing`` says how the store was produced (``modelled`` repeats it as a boolean; the two must
agree).  dtype: float16 | bfloat16 | float32 | float64; family: channel_major | channel_minor;
op: inference | forward | backward; role: reduce | elementwise | persistent.  A bucket is a
power of two of C (channels) and of m (elements per channel), rounded in log2.  ``config`` holds
the *knobs* of a role (``Knobs``), not block sizes: the launch's block sizes are derived from the
knobs and the call's own geometry (``config.py``), so a bucket's entry serves every shape in it.
Everything else in an entry (times, the shape it was tuned on) is for the report and for people.

Lookup is nearest-bucket: among the entries of (dtype, family, op, role), the one with the
smallest |log2 C - log2 C_b| + |log2 m - log2 m_b|, if that distance is at most the store's
``lookup.max_log2_distance`` (default 2); otherwise nothing matches and the heuristic decides.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import sysconfig
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Mapping

log = logging.getLogger("tritonbn")

__all__ = [
    "SCHEMA",
    "Knobs",
    "Store",
    "StoreEntry",
    "bucket",
    "bucket_key",
    "gpu_model",
    "load_store",
    "save_store",
    "shipped_dirs",
    "store_paths",
    "stores_for",
    "CONFIG_DIR_ENV",
    "AUTOTUNE_ENV",
    "MEASURED",
    "MODELLED",
]

SCHEMA = 1
CONFIG_DIR_ENV = "TRITONBN_CONFIG_DIR"
AUTOTUNE_ENV = "TRITONBN_AUTOTUNE"
CACHE_DIR_ENV = "TRITONBN_CACHE_DIR"
DEFAULT_MAX_DISTANCE = 2.0
# How a store's times were produced (its "timing"): only measured stores steer launches.
MEASURED, MODELLED = "measured", "modelled"
TIMINGS = (MEASURED, MODELLED)

DTYPES = ("float16", "bfloat16", "float32", "float64")
FAMILIES = ("channel_major", "channel_minor")
OPS = ("inference", "forward", "backward")
ROLES = ("reduce", "elementwise", "persistent")
# When the caller does not say the dtype, entries of this order win ties.
DTYPE_PREFERENCE = ("float32", "float16", "bfloat16", "float64")


@dataclass(frozen=True)
class Knobs:
    """What the store says for one role; None fields are left to the heuristic's rule.

    Attributes:
        tile: elements per tile (reduce, elementwise): the block sizes are the heuristic's
            tile shape for this many elements and the call's geometry.
        split: programs per channel (channel-major) or per channel block (channel-minor) of a
            reduction.
        block_c: channel-minor only: the most channels a tile spans (a power of two).
        num_warps: Triton's warps (no space varies the stages: launches keep
            ``KernelConfig.num_stages``'s default).
        enabled: persistent only: False sends the bucket to the split path.
    """

    tile: int | None = None
    split: int | None = None
    block_c: int | None = None
    num_warps: int | None = None
    enabled: bool = True

    def to_json(self) -> dict[str, Any]:
        """The non-default fields (``{"enabled": false}`` for a persistent-off entry)."""
        if not self.enabled:
            return {"enabled": False}
        return {k: v for k, v in asdict(self).items() if v is not None and k != "enabled"}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "Knobs":
        """Knobs from a stored ``config`` (ValueError on an unknown knob or a bad value)."""
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown knobs {sorted(unknown)}")
        values = {}
        for name, value in data.items():
            if name == "enabled":
                if not isinstance(value, bool):
                    raise ValueError("enabled must be true or false")
            elif value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
            values[name] = value
        return cls(**values)

    def describe(self) -> str:
        """Short text for reports: ``tile=4096 split=5 warps=8``."""
        if not self.enabled:
            return "off (split path)"
        parts = [f"{'warps' if k == 'num_warps' else k}={v}" for k, v in self.to_json().items()]
        return " ".join(parts) or "heuristic"


def bucket(n: int) -> int:
    """The power of two nearest to ``n`` in log2 (ties round up)."""
    if n <= 1:
        return 1
    return 1 << int(math.floor(math.log2(n) + 0.5))


def bucket_key(channels: int, m: int) -> str:
    """``C64_m131072``: the key of the (C, m) bucket."""
    return f"C{bucket(channels)}_m{bucket(m)}"


_BUCKET_RE = re.compile(r"^C(\d+)_m(\d+)$")


def parse_bucket_key(key: str) -> tuple[int, int]:
    match = _BUCKET_RE.match(key)
    if not match:
        raise ValueError(f"bad bucket key {key!r} (expected like C64_m131072)")
    c, m = int(match.group(1)), int(match.group(2))
    if c & (c - 1) or m & (m - 1):
        raise ValueError(f"bucket {key!r}: C and m must be powers of two")
    return c, m


def gpu_model(device_name: str) -> str:
    """Store name of a GPU from its device name (``torch.cuda.get_device_name()``).

    "NVIDIA H100 80GB HBM3" -> "h100-sxm", "NVIDIA H100 PCIe" -> "h100-pcie", "NVIDIA H200"
    -> "h200", "NVIDIA A100-SXM4-80GB" -> "a100-sxm"; anything else: the name lowercased,
    non-alphanumerics as dashes.  The modelled off-GPU profile is named after an H100 SXM.
    """
    name = device_name.lower()
    for chip in ("h100", "h800", "a100", "a800"):
        if chip in name:
            return f"{chip}-pcie" if "pcie" in name else f"{chip}-sxm"
    for chip in ("h200", "gh200", "b200", "l40s", "l4"):
        if re.search(rf"\b{chip}\b", name):
            return chip
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-") or "unknown"


@dataclass(frozen=True)
class StoreEntry:
    """One stored config: its key, bucket and knobs (plus the raw entry, for reports)."""

    dtype: str
    family: str
    op: str
    role: str
    c_bucket: int
    m_bucket: int
    knobs: Knobs
    raw: Mapping[str, Any]

    def distance(self, channels: int, m: int) -> float:
        return abs(math.log2(max(channels, 1)) - math.log2(self.c_bucket)) + \
            abs(math.log2(max(m, 1)) - math.log2(self.m_bucket))


@dataclass
class Store:
    """A parsed store file."""

    path: str | None
    gpu: str
    meta: dict[str, Any]
    entries: dict[tuple[str, str, str, str], list[StoreEntry]]
    max_distance: float = DEFAULT_MAX_DISTANCE

    def lookup(self, dtype: str | None, family: str, op: str, role: str, channels: int,
               m: int) -> StoreEntry | None:
        """The nearest entry within ``max_distance``, or None.  ``dtype=None`` (the caller does
        not know it) searches every dtype, DTYPE_PREFERENCE breaking ties."""
        dtypes = [dtype] if dtype is not None else list(DTYPE_PREFERENCE)
        best, best_rank = None, None
        for rank, name in enumerate(dtypes):
            for entry in self.entries.get((name, family, op, role), ()):
                distance = entry.distance(channels, m)
                if distance > self.max_distance + 1e-9:
                    continue
                key = (round(distance, 9), rank, entry.c_bucket, entry.m_bucket)
                if best_rank is None or key < best_rank:
                    best, best_rank = entry, key
        return best

    @property
    def timing(self) -> str | None:
        """How the store was produced: "measured", "modelled", or None (it does not say)."""
        return self.meta.get("timing")

    @property
    def measured(self) -> bool:
        """True for a store timed on a GPU: the only kind that steers launches."""
        return self.timing == MEASURED

    def __len__(self) -> int:
        return sum(len(v) for v in self.entries.values())


def parse_store(data: Mapping[str, Any], path: str | None = None) -> Store:
    """A Store from a decoded JSON document; ValueError on a wrong schema or a bad entry."""
    if not isinstance(data, Mapping):
        raise ValueError("a store is a JSON object")
    if data.get("schema") != SCHEMA:
        raise ValueError(f"schema {data.get('schema')!r} is not supported (this tritonbn reads schema {SCHEMA})")
    entries: dict[tuple[str, str, str, str], list[StoreEntry]] = {}
    configs = data.get("configs", {})
    for dtype, by_family in configs.items():
        _check(dtype, DTYPES, "dtype")
        for family, by_op in by_family.items():
            _check(family, FAMILIES, "family")
            for op, by_role in by_op.items():
                _check(op, OPS, "op")
                for role, by_bucket in by_role.items():
                    _check(role, ROLES, "role")
                    for key, entry in by_bucket.items():
                        c_bucket, m_bucket = parse_bucket_key(key)
                        try:
                            knobs = Knobs.from_json(entry["config"])
                        except (KeyError, TypeError, ValueError) as exc:
                            raise ValueError(f"{dtype}/{family}/{op}/{role}/{key}: {exc}") from exc
                        entries.setdefault((dtype, family, op, role), []).append(
                            StoreEntry(dtype, family, op, role, c_bucket, m_bucket, knobs, entry))
    _check_timing(data)
    lookup = data.get("lookup", {})
    meta = {k: v for k, v in data.items() if k != "configs"}
    return Store(path, str(data.get("gpu", "")), meta, entries,
                 float(lookup.get("max_log2_distance", DEFAULT_MAX_DISTANCE)))


def _check_timing(data: Mapping[str, Any]) -> None:
    """``timing`` (when given) is measured or modelled, and ``modelled`` (when given) agrees:
    a file must not claim to be both."""
    timing, modelled = data.get("timing"), data.get("modelled")
    if timing is not None:
        _check(timing, TIMINGS, "timing")
    if modelled is not None and not isinstance(modelled, bool):
        raise ValueError(f"modelled must be true or false, got {modelled!r}")
    if timing is not None and modelled is not None and modelled != (timing == MODELLED):
        raise ValueError(f'"timing": {timing!r} contradicts "modelled": {str(modelled).lower()}')


def _check(value: str, allowed: Iterable[str], what: str) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r} (one of {', '.join(allowed)})")


def load_store(path: str | os.PathLike) -> Store:
    """Read and parse a store file (ValueError / OSError when it cannot be used)."""
    with open(path) as handle:
        return parse_store(json.load(handle), str(path))


def store_document(gpu: str, entries: Iterable[Mapping[str, Any]], meta: Mapping[str, Any]) -> dict[str, Any]:
    """A schema-1 document from flat entries (each with dtype, family, op, role, channels, m,
    config and anything else to keep), sorted so that files diff well."""
    configs: dict[str, Any] = {}
    for entry in sorted(entries, key=lambda e: (e["dtype"], e["family"], e["op"], e["role"],
                                                bucket(e["channels"]), bucket(e["m"]))):
        rest = {k: v for k, v in entry.items() if k not in ("dtype", "family", "op", "role")}
        slot = configs.setdefault(entry["dtype"], {}).setdefault(entry["family"], {}) \
            .setdefault(entry["op"], {}).setdefault(entry["role"], {})
        slot[bucket_key(entry["channels"], entry["m"])] = rest
    return {"schema": SCHEMA, "gpu": gpu, **meta, "configs": configs}


def save_store(path: str | os.PathLike, document: Mapping[str, Any]) -> None:
    """Write a store document (checked by parsing it first), atomically."""
    parse_store(document, str(path))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + f".tmp{os.getpid()}")
    tmp.write_text(dumps_store(document))
    os.replace(tmp, path)


def dumps_store(document: Mapping[str, Any]) -> str:
    """JSON text of a store: indented down to the buckets, each bucket's entry on one line
    (a smaller file that diffs one config per line)."""

    def dump(value: Any, depth: int, indent: str) -> str:
        # configs -> dtype -> family -> op -> role -> bucket: entries sit 6 levels below the root
        if not isinstance(value, dict) or not value or depth >= 6 or (depth >= 1 and path[0] != "configs"):
            return json.dumps(value, separators=(", ", ": "))
        inner = indent + " "
        items = []
        for key, item in value.items():
            path.append(key)
            items.append(f"{inner}{json.dumps(key)}: {dump(item, depth + 1, inner)}")
            path.pop()
        return "{\n" + ",\n".join(items) + "\n" + indent + "}"

    path: list[str] = []
    return dump(dict(document), 0, "") + "\n"


def merge_documents(base: Mapping[str, Any], update: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with every bucket of ``update`` added or replaced (meta from ``update``).

    ValueError when the two were produced differently (measured vs modelled): the merged file
    has one ``timing``, so modelled buckets would pass for measured ones or the reverse."""
    if base.get("timing") != update.get("timing"):
        raise ValueError(f"cannot merge a store timed {update.get('timing') or 'unstated'} into one "
                         f"timed {base.get('timing') or 'unstated'}")
    merged = json.loads(json.dumps(base.get("configs", {})))
    for dtype, by_family in update.get("configs", {}).items():
        for family, by_op in by_family.items():
            for op, by_role in by_op.items():
                for role, by_bucket in by_role.items():
                    merged.setdefault(dtype, {}).setdefault(family, {}).setdefault(op, {}) \
                        .setdefault(role, {}).update(by_bucket)
    return {**{k: v for k, v in update.items() if k != "configs"}, "configs": merged}


# ----------------------------------------------------------------------------- where stores live


def repo_dir() -> Path:
    """``autotune_configs/`` of a source checkout (next to the ``tritonbn`` package)."""
    return Path(__file__).resolve().parents[2] / "autotune_configs"


@functools.lru_cache(maxsize=1)
def shipped_dirs() -> tuple[Path, ...]:
    """Folders that may hold the shipped stores, most specific first: the checkout's, then the
    data folders a wheel installs ``autotune_configs/*.json`` into (pyproject.toml)."""
    dirs = [repo_dir()]
    for scheme_path in {sysconfig.get_path("data"), sysconfig.get_path("data", f"{os.name}_user")}:
        if scheme_path:
            dirs.append(Path(scheme_path) / "share" / "tritonbn" / "autotune_configs")
    return tuple(dirs)


def user_cache_dir() -> Path:
    """The on-line tuner's folder: $TRITONBN_CACHE_DIR, else $XDG_CACHE_HOME/tritonbn/autotune,
    else ~/.cache/tritonbn/autotune."""
    explicit = os.environ.get(CACHE_DIR_ENV)
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tritonbn" / "autotune"


def store_paths(gpu: str, config_dir: str | None, online: bool) -> list[Path]:
    """The store files consulted for ``gpu``, first match wins (existing files only)."""
    name = f"{gpu}.json"
    paths = [user_cache_dir() / name] if online else []
    if config_dir:
        paths.append(Path(config_dir) / name)
    else:
        shipped = next((d / name for d in shipped_dirs() if (d / name).is_file()), None)
        if shipped is not None:
            paths.append(shipped)
    return [p for p in paths if p.is_file()]


@functools.lru_cache(maxsize=64)
def _usable_store(path: str, mtime_ns: int) -> Store | None:
    """The parsed store at ``path`` if it may steer launches: readable, valid and measured (each
    file version is read, and any warning logged, once)."""
    try:
        store = load_store(path)
    except (OSError, ValueError) as exc:
        log.warning("tritonbn: ignoring config store %s: %s", path, exc)
        return None
    if not store.measured:
        # a modelled store ranks configs on the cost model's constants: a report, not a decision
        log.warning("tritonbn: ignoring config store %s: its timing is %s, not measured (only stores "
                    "timed on a GPU steer launches)", path, store.timing or "not stated")
        return None
    log.debug("tritonbn: loaded config store %s (%d entries)", path, len(store))
    return store


def stores_for(gpu: str, config_dir: str | None, online: bool) -> list[Store]:
    """The measured stores consulted for ``gpu``, first match wins (cached per file version)."""
    stores = []
    for path in store_paths(gpu, config_dir, online):
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:
            continue
        store = _usable_store(str(path), mtime)
        if store is not None:
            stores.append(store)
    return stores


def clear_cache() -> None:
    """Forget parsed stores (the lookup caches in config.py are cleared by its clear_caches)."""
    _usable_store.cache_clear()
