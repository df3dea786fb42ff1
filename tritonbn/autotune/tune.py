"""``tritonbn tune``: sweep a shape set, time every candidate config per key, write the store.

On a GPU (``--timer measured``, the default there) every candidate is timed with
``triton.testing.do_bench``; the model ranks the candidates first and only the best ``--top``
of each key (and the heuristic's) are measured.  Without a GPU (``--timer modelled``) the same
pipeline runs with the model-based timer (``model.py``) on dry-run launches for the GPU named by
``--gpu`` (default h100-sxm): nothing is interpreted or run, so an H100-sized sweep takes
seconds to minutes on a CPU; the store and the report then say ``modelled``.

Writes ``<store-dir>/<gpu>.json`` (default: ``--out``) and ``report.md``, ``trials.csv`` and PNG
plots in ``--out``.  Candidates are pruned by compiling them for the GPU's arch (spills), unless
``--no-prune`` or the kernels are interpreted.

Only a measured store steers launches (``--store-dir autotune_configs`` ships one); a modelled
store is part of its report and launches ignore it, wherever it is.  So that the two never mix,
``--merge`` refuses a store of the other timing, and a modelled run never replaces a measured
store.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import sys
import time
from pathlib import Path
from typing import Iterable, Sequence

import torch

from . import config as C
from .model import GPUS, GpuSpec, describe_model
from .store import (DEFAULT_MAX_DISTANCE, MEASURED, MODELLED, gpu_model, load_store, merge_documents, save_store,
                    store_document)
from .tuner import DEFAULT_MARGIN, LAYOUTS, OP_ROLES, MeasuredTimer, ModelTimer, TuneCase, tune

__all__ = ["SHAPE_SETS", "cases_for", "add_arguments", "run"]

DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32, "float64": torch.float64,
          "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32, "fp64": torch.float64}


def _resnet50(batch: int) -> list[tuple[int, ...]]:
    pairs = [(64, 112), (64, 56), (128, 56), (256, 56), (128, 28), (256, 28), (512, 28), (256, 14), (512, 14),
             (1024, 14), (512, 7), (2048, 7)]
    return [(batch, c, h, h) for c, h in pairs]


def _grid() -> list[tuple[int, ...]]:
    """(4, C, m/4) for C in 2..2048 and m in 2^8..2^22 (x4), at most 2^28 elements."""
    out = []
    for c in (2, 8, 32, 128, 512, 2048):
        for log_m in range(8, 23, 2):
            m = 1 << log_m
            if c * m <= 1 << 28:
                out.append((4, c, m // 4))
    return out


SHAPE_SETS: dict[str, list[tuple[int, ...]]] = {
    "quick": [(32, 64, 56, 56), (32, 256, 14, 14), (8, 2048, 7, 7), (8, 32, 16, 16), (8192, 1024)],
    "models": [*_resnet50(32), *_resnet50(256), (20, 6, 65536), (32, 4, 256, 256),
               *((8, c, 7, 7) for c in (256, 512, 1024, 2048)), (512, 1024), (8192, 2048), (65536, 512),
               (8, 64, 16, 56, 56), (4, 256, 8, 28, 28), (8, 1024, 2048), (32, 768, 512), (4, 4096, 4096)],
    "grid": _grid(),
}
SHAPE_SETS["all"] = SHAPE_SETS["models"] + SHAPE_SETS["grid"]
QUICK = dict(shapes="quick", dtypes="float16", layouts="NCHW,channels_last")
FULL = dict(shapes="all", dtypes="float16,bfloat16,float32", layouts="NCHW,channels_last")


def parse_shapes(text: str) -> list[tuple[int, ...]]:
    """Comma-separated shapes (``32x64x56x56``) and shape-set names (quick, models, grid, all)."""
    shapes: list[tuple[int, ...]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        if part in SHAPE_SETS:
            shapes.extend(SHAPE_SETS[part])
            continue
        try:
            shape = tuple(int(d) for d in part.lower().split("x"))
        except ValueError as exc:
            raise ValueError(f"--shapes: {part!r} is neither a shape like 32x64x56x56 nor one of "
                             f"{', '.join(SHAPE_SETS)}") from exc
        if len(shape) < 2 or min(shape) < 1:
            raise ValueError(f"--shapes: {part!r} needs (N, C, ...) with positive extents")
        shapes.append(shape)
    return list(dict.fromkeys(shapes))


def _names(text: str, allowed: Sequence[str], what: str) -> list[str]:
    chosen = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in chosen if p not in allowed]
    if bad or not chosen:
        raise ValueError(f"--{what}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(allowed)}")
    return chosen


def cases_for(shapes: Iterable[tuple[int, ...]], layouts: Sequence[str], dtypes: Sequence[torch.dtype]) -> list[TuneCase]:
    """Every (shape, layout, dtype) that applies (channels_last needs a spatial extent)."""
    cases = []
    for dtype in dtypes:
        for shape in shapes:
            for layout in layouts:
                case = TuneCase(tuple(shape), layout, dtype)
                if case.applies:
                    cases.append(case)
    return cases


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help=f"a small set: shapes {QUICK['shapes']}, {QUICK['dtypes']}, {QUICK['layouts']}")
    parser.add_argument("--shapes", default=None,
                        help="comma-separated logical shapes (N, C, *spatial) like 32x64x56x56, or sets: "
                             f"{', '.join(SHAPE_SETS)} (default: all; --quick: quick)")
    parser.add_argument("--layouts", default=None, help=f"comma-separated subset of {', '.join(LAYOUTS)} "
                                                        "(default NCHW,channels_last)")
    parser.add_argument("--dtypes", default=None, help="comma-separated dtypes (default float16,bfloat16,float32)")
    parser.add_argument("--ops", default=",".join(OP_ROLES), help=f"comma-separated subset of {', '.join(OP_ROLES)}")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for report.md, trials.csv and plots (default perf/results/autotune/<gpu>)")
    parser.add_argument("--store-dir", type=Path, default=None,
                        help="folder for <gpu>.json (default: --out); measured stores only steer launches "
                             "from autotune_configs (or $TRITONBN_CONFIG_DIR)")
    parser.add_argument("--merge", action="store_true", help="add to an existing <gpu>.json instead of replacing it")
    parser.add_argument("--gpu", default=None, help=f"GPU model of the store (default: this GPU's, else h100-sxm); "
                                                    f"modelled: one of {', '.join(GPUS)}")
    parser.add_argument("--timer", choices=("auto", "measured", "modelled"), default="auto",
                        help="measured (do_bench on this GPU) or modelled; auto: measured when a GPU is present")
    parser.add_argument("--margin", type=float, default=DEFAULT_MARGIN,
                        help="a config must beat the heuristic by more than this fraction (default 0.03)")
    parser.add_argument("--top", type=int, default=24,
                        help="measured: time the model's best N candidates per key and the heuristic (0: all)")
    parser.add_argument("--no-prune", action="store_true", help="do not compile candidates to prune spilling ones")
    parser.add_argument("--warmup", type=int, default=25, help="measured: do_bench warmup, ms")
    parser.add_argument("--rep", type=int, default=100, help="measured: do_bench repetition time, ms")
    parser.add_argument("--no-plots", action="store_true", help="write no PNGs")
    parser.add_argument("--no-trials", action="store_true", help="write no trials.csv (every candidate's time)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _progress(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return lambda items: tqdm(items, desc="tuning", unit="op", file=sys.stderr, dynamic_ncols=True)


def _command(argv: Sequence[str] | None) -> str:
    return "tritonbn tune " + " ".join(argv if argv is not None else sys.argv[2:])


def _versions() -> str:
    import triton

    import tritonbn

    return (f"tritonbn {tritonbn.__version__}, torch {torch.__version__}, Triton {triton.__version__}, "
            f"Python {platform.python_version()}")


def _measured_spec(gpu: str) -> GpuSpec:
    """The model of this GPU (for ranking): a known spec, or one from its properties."""
    if gpu in GPUS:
        return GPUS[gpu]
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    major, minor = torch.cuda.get_device_capability()
    return GpuSpec(gpu, props.name, f"sm_{major}{minor}", props.multi_processor_count, 2.0e12, 4.0, 0.6)


def run(args: argparse.Namespace, *, bench=None, argv: Sequence[str] | None = None) -> int:
    """Tune and write the store and the report.  ``bench`` (tests): a stub ``bench(fn) -> ms``
    that makes the measured pipeline run on CPU tensors (under TRITON_INTERPRET=1)."""
    started = time.time()
    try:
        preset = QUICK if args.quick else FULL
        shapes = parse_shapes(args.shapes or preset["shapes"])
        layouts = _names(args.layouts or preset["layouts"], LAYOUTS, "layouts")
        dtypes = [DTYPES[d] for d in _names(args.dtypes or preset["dtypes"], list(DTYPES), "dtypes")]
        op_names = _names(args.ops, list(OP_ROLES), "ops")
        has_gpu = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1"
        timer_kind = args.timer if args.timer != "auto" else ("measured" if has_gpu or bench else "modelled")
        here = gpu_model(torch.cuda.get_device_name()) if torch.cuda.is_available() else None
        gpu = args.gpu or here or "h100-sxm"
        if timer_kind == "measured":
            if bench is None and not has_gpu:
                raise ValueError("--timer measured needs a CUDA GPU (and TRITON_INTERPRET unset); "
                                 "use --timer modelled")
            if bench is None and gpu != here:
                raise ValueError(f"--gpu {gpu}: this machine's GPU is {here}; measured stores are per GPU model")
            spec = _measured_spec(gpu) if bench is None else GPUS.get(gpu, GPUS["h100-sxm"])
            device = "cuda" if bench is None else "cpu"
            timer = MeasuredTimer(device, bench, warmup=args.warmup, rep=args.rep)
            profile = C.device_profile(torch.device(device)) if bench is None else spec.profile
            rank_timer, top = ModelTimer(spec), (args.top or None)
        else:
            if gpu not in GPUS:
                raise ValueError(f"--gpu {gpu}: no model for it (modelled GPUs: {', '.join(GPUS)})")
            spec = GPUS[gpu]
            timer, profile, rank_timer, top = ModelTimer(spec), spec.profile, None, None
    except (ValueError, RuntimeError) as exc:
        print(f"tritonbn tune: {exc}", file=sys.stderr)
        return 2
    arch = None if args.no_prune or os.environ.get("TRITON_INTERPRET", "0") == "1" else spec.arch
    cases = cases_for(shapes, layouts, dtypes)
    if not cases:
        print("tritonbn tune: the selection is empty", file=sys.stderr)
        return 2
    out = args.out or Path("perf/results/autotune") / gpu
    store_path = (args.store_dir or out) / f"{gpu}.json"
    conflict = _store_conflict(store_path, MODELLED if timer.kind == MODELLED else MEASURED, args.merge)
    if conflict:  # found before tuning, not after minutes of it
        print(f"tritonbn tune: {conflict}", file=sys.stderr)
        return 2
    result = tune(cases, op_names, timer, profile, arch=arch, margin=args.margin, top=top, rank_timer=rank_timer,
                  progress=_progress(not args.no_progress))
    modelled = timer.kind == MODELLED
    header = _header(args, argv, gpu, spec, modelled, arch, len(cases), result, started)
    meta = {k: header[k] for k in ("modelled", "timing", "method", "device", "created", "command", "versions",
                                   "margin", "spill_pruning")}
    if modelled:
        meta["model"] = describe_model(spec)
    meta["lookup"] = {"max_log2_distance": DEFAULT_MAX_DISTANCE}
    document = store_document(gpu, result.entries(), meta)
    if args.merge and store_path.is_file():
        document = merge_documents(json.loads(store_path.read_text()), document)
    save_store(store_path, document)
    from .report import write_report

    report = write_report(result, out, gpu=gpu, store_path=store_path,
                          header={**header, **({"model": describe_model(spec)} if modelled else {})},
                          plots=not args.no_plots, trials=not args.no_trials)
    C.clear_caches()
    word = "modelled" if modelled else "measured"
    gains = [s.heuristic_ms / s.tuned_ms for s in result.summaries if s.tuned_ms]
    geo = math.exp(sum(math.log(g) for g in gains) / len(gains)) if gains else float("nan")
    print(f"tuned {len(result.results)} keys ({word}) in {time.time() - started:.0f} s; "
          f"geometric-mean speedup over the heuristic {geo:.3f} ({word})")
    print(f"wrote {store_path} and {report}")
    return 0


def _store_conflict(store_path: Path, timing: str, merge: bool) -> str | None:
    """Why this run must not write ``store_path``, or None: with ``--merge``, a broken file or one of
    another timing (its buckets would pass for this run's); without, a measured store that a
    modelled run would replace."""
    if not store_path.is_file():
        return None
    try:
        existing = load_store(store_path)
    except (OSError, ValueError) as exc:
        return f"--merge: cannot read {store_path}: {exc}" if merge else None
    if merge and existing.timing != timing:
        return (f"--merge: {store_path} is timed {existing.timing or 'unstated'}, this run is {timing}; "
                "merge only stores timed alike")
    if not merge and existing.measured and timing == MODELLED:
        return f"{store_path} is a measured store: a modelled run does not replace it (choose another --store-dir)"
    return None


def _header(args, argv, gpu: str, spec: GpuSpec, modelled: bool, arch: str | None, n_cases: int, result,
            started: float) -> dict:
    if modelled:
        method = (f"model-based timer (tritonbn/autotune/model.py) on the launches of dry runs for an "
                  f"{spec.description}: launches x {spec.launch_us} us + bytes / {spec.bandwidth / 1e9:.0f} GB/s, "
                  f"derated for too few programs or bytes in flight per SM; not measured on a GPU")
        device = f"{spec.description} (modelled on a {platform.machine()} CPU)"
    else:
        method = "triton.testing.do_bench (L2 flushed, median), moving statistics restored after every trial"
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (stub timer)"
    return {
        "gpu": gpu, "gpu_description": spec.description, "modelled": modelled,
        "timing": MODELLED if modelled else MEASURED, "method": method, "device": device,
        "created": datetime.datetime.now().isoformat(timespec="seconds"), "command": _command(argv),
        "versions": _versions(), "margin": args.margin,
        "spill_pruning": f"compiled for {arch}, spilling candidates dropped" if arch else
        "none (--no-prune or interpreted kernels)",
        "cases": n_cases, "ops tuned": len(result.summaries), "duration_s": round(time.time() - started, 1),
    }
