"""``tritonbn cpu-speed``: the torch path on CPU against torch's ``F.batch_norm``, as one table.

The torch path is what ``tritonbn.batch_norm`` (and the ``tritonbn.nn`` layers) run on CPU tensors
without ``TRITON_INTERPRET=1``: ``cpu_backend.CpuBackend``.  Every (case, layout, dtype, mode) of
``bench.CPU_CASES`` runs both providers on the same full-size tensors with
``torch.set_num_threads(--threads)``; their calls are interleaved round by round (the order
alternating), so that a machine shared with other work slows both alike, and each time is the
median of ``--repeats`` calls after ``--warmup``.  Modes: inference, training forward (moving
statistics updated: the training call each provider makes), forward + backward (gradients for
data, gamma and beta).  torch takes the channel at axis 1 only: for other axes it gets
``x.movedim(axis, 1)``, a view.  The ratio is tritonbn's time over torch's (target: at most
``bench.CPU_TARGET``).
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Callable, Sequence

from . import bench, sweeps
from .bench import CPU_MEASURED, CPU_PROVIDERS, CPU_TARGET, Row

__all__ = ["add_arguments", "run", "speed_rows", "format_table", "command_line"]

DEFAULTS = {"threads": 2, "repeats": 9, "warmup": 2}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The subcommand's options."""
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"], help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=DEFAULTS["repeats"], help="interleaved calls per provider")
    parser.add_argument("--warmup", type=int, default=DEFAULTS["warmup"], help="untimed calls per provider first")
    parser.add_argument("--dtypes", default=None, help=f"comma-separated subset of {','.join(bench.CPU_DTYPES)}")
    parser.add_argument("--layouts", default=None, help=f"comma-separated subset of {','.join(bench.CPU_LAYOUTS)}")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(bench.CPU_MODES)}")
    parser.add_argument("--families", default=None,
                        help=f"comma-separated subset of {','.join(sorted({c.family for c in bench.CPU_CASES}))}")


def _choose(text: str | None, allowed: Sequence[str], what: str) -> list[str]:
    if text is None:
        return list(allowed)
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in chosen if part not in allowed]
    if unknown or not chosen:
        raise ValueError(f"--{what}: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(allowed)}")
    return chosen


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces a run of ``args``."""
    parts = ["tritonbn", "cpu-speed"]
    for name, default in DEFAULTS.items():
        parts += [f"--{name}", str(getattr(args, name, default))]
    for name in ("dtypes", "layouts", "modes", "families"):
        if getattr(args, name, None) is not None:
            parts += [f"--{name}", getattr(args, name)]
    return " ".join(parts)


def speed_rows(args: argparse.Namespace, timer: Callable[[dict], dict] | None = None) -> list[Row]:
    """The timed rows of ``args``' selection (``timer``: a stub for tests)."""
    points = bench.cpu_points(_choose(args.layouts, bench.CPU_LAYOUTS, "layouts"),
                              _choose(args.dtypes, bench.CPU_DTYPES, "dtypes"),
                              _choose(args.families, sorted({c.family for c in bench.CPU_CASES}), "families"))
    modes = _choose(args.modes, bench.CPU_MODES, "modes")
    timer = timer or (lambda fns: bench.interleaved_timer(fns, repeats=args.repeats, warmup=args.warmup))
    return bench.cpu_time_sweep(points, modes, timer, threads=args.threads, progress=False)


def format_table(rows: Sequence[Row], command: str) -> str:
    """The ratio table as text, with the command that reproduces it and the targets missed."""
    ours = {(r.case, r.layout, r.dtype, r.mode): r for r in rows
            if r.kind == CPU_MEASURED and r.provider == CPU_PROVIDERS["tritonbn"]}
    theirs = {(r.case, r.layout, r.dtype, r.mode): r for r in rows
              if r.kind == CPU_MEASURED and r.provider == CPU_PROVIDERS["torch"]}
    lines = [f"{'case':16s} {'layout':13s} {'dtype':5s} {'shape (axis)':22s} {'mode':17s} "
             f"{'tritonbn ms':>11s} {'torch ms':>9s} {'ratio':>6s} {'q25 ratio':>9s}"]
    misses = []
    for key, row in ours.items():
        other = theirs.get(key)
        ratio = row.ms / other.ms if other is not None else math.nan
        low_ratio = row.ms_q25 / other.ms_q25 if other is not None else math.nan
        shape = f"{row.shape} ({row.axis})"
        flag = "" if ratio <= CPU_TARGET else "  > target" if not math.isnan(ratio) else "  failed"
        lines.append(f"{row.case:16s} {row.layout:13s} {row.dtype:5s} {shape:22s} {row.mode:17s} "
                     f"{row.ms:11.3f} {(other.ms if other else math.nan):9.3f} {ratio:6.2f} {low_ratio:9.2f}{flag}")
        if not ratio <= CPU_TARGET:
            misses.append(f"{row.case} {row.layout} {row.dtype} {row.mode} ({ratio:.2f}x)")
    lines += ["", f"ratio = tritonbn's median ms / torch's (F.batch_norm), interleaved calls; target <= {CPU_TARGET};"
              " q25 ratio: of the lower quartiles (less sensitive to other work on the machine)",
              f"reproduce: {command}",
              f"targets met: {len(ours) - len(misses)} of {len(ours)}" + (f"; missed: {'; '.join(misses)}" if misses
                                                                        else "")]
    return "\n".join(lines)


def run(args: argparse.Namespace, timer: Callable[[dict], dict] | None = None) -> int:
    """Time the selection and print the table; 2 on a bad selection."""
    try:
        rows = speed_rows(args, timer)
    except ValueError as exc:
        print(f"tritonbn cpu-speed: {exc}", file=sys.stderr)
        return 2
    if not rows:
        print("tritonbn cpu-speed: the selection is empty", file=sys.stderr)
        return 2
    print(format_table(rows, command_line(args)))
    return 0
