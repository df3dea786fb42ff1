"""What ``tritonbn tune`` writes next to the store: ``report.md``, ``trials.csv`` and PNG plots.

Plots use matplotlib's Agg backend.  ``overview.png``: per op, tuned / heuristic time against
the data size, and per key the spread (slowest / fastest candidate).  ``configs_<family>_
<op>_<role>.png``: for the keys of that group the tuner changed (else the widest spread), the time of the
fastest candidates, the heuristic's and the slowest, one bar per config.  Every title, axis and
table says "modelled" when the times come from the model, not a GPU.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

from .tuner import MODELLED, KeyResult, TuneRun

__all__ = ["write_report", "write_trials_csv", "plot_overview", "plot_configs"]

ROLE_COLORS = {"reduce": "tab:blue", "elementwise": "tab:orange", "persistent": "tab:green"}
OP_MARKERS = {"inference": "o", "forward": "s", "backward": "^"}
MAX_KEYS_PER_PLOT = 4
BARS_PER_KEY = 12


def _us(ms: float) -> str:
    return f"{ms * 1e3:.2f}"


def write_trials_csv(run: TuneRun, path: Path) -> Path:
    """Every timed candidate of every key (``kind`` says modelled or measured)."""
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["kind", "dtype", "family", "op", "role", "channels", "m", "tuned_on", "config",
                         "block_rows", "block_cols", "split_rows", "split_cols", "num_warps", "us",
                         "heuristic", "chosen", "spills"])
        for r in run.results:
            for c in r.candidates:
                cfg = c.config or {}
                writer.writerow([r.kind, r.dtype, r.family, r.op, r.role, r.channels, r.m, r.case, c.label,
                                 cfg.get("block_rows", ""), cfg.get("block_cols", ""), cfg.get("split_rows", ""),
                                 cfg.get("split_cols", ""), cfg.get("num_warps", ""), f"{c.ms * 1e3:.4f}",
                                 int(c.default), int(c.chosen), "" if c.spills is None else int(c.spills)])
    return path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_overview(run: TuneRun, gpu: str, path: Path) -> Path:
    """Left: tuned / heuristic op time vs data size; right: slowest / fastest candidate per key."""
    plt = _plt()
    word = "modelled" if run.kind == MODELLED else "measured"
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for op, marker in OP_MARKERS.items():
        rows = [s for s in run.summaries if s.op == op]
        if rows:
            left.scatter([s.data_bytes for s in rows], [s.tuned_ms / s.heuristic_ms for s in rows],
                         marker=marker, label=op, alpha=0.75)
    left.axhline(1.0, color="grey", lw=1, ls="--")
    left.set_xscale("log")
    left.set_xlabel("data size S (bytes)")
    left.set_ylabel(f"tuned / heuristic ({word} time of the op)")
    left.set_title(f"{gpu}: tuned vs heuristic, per op ({word})")
    left.legend(title="op")
    left.grid(alpha=0.3)
    for role, color in ROLE_COLORS.items():
        rows = [r for r in run.results if r.role == role]
        if rows:
            right.scatter([r.channels * r.m for r in rows], [r.spread for r in rows], color=color, label=role,
                          alpha=0.75, marker="o")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("elements (C x m)")
    right.set_ylabel(f"slowest / fastest candidate ({word})")
    right.set_title(f"{gpu}: spread of the config space, per key ({word})")
    right.legend(title="role")
    right.grid(alpha=0.3, which="both")
    fig.tight_layout()
    _save(fig, path)
    return path


def _bars(result: KeyResult) -> list[Any]:
    """The fastest candidates, the heuristic's and the slowest (fastest first)."""
    rows = list(result.candidates)
    keep = rows[:BARS_PER_KEY - 2]
    for extra in [next(c for c in rows if c.default), next(c for c in rows if c.chosen), rows[-1]]:
        if extra not in keep:
            keep.append(extra)
    return sorted(keep, key=lambda c: c.ms)


def plot_configs(results: Sequence[KeyResult], gpu: str, path: Path) -> Path:
    """One panel per key: a bar per config (time), chosen green, heuristic orange, spilling red.

    When the slowest config is far off (over 3x the others), the axis stops at 1.25x the others
    and that bar is drawn to the edge with its time written on it."""
    plt = _plt()
    results = list(results)[:MAX_KEYS_PER_PLOT]
    heights = [0.28 * len(_bars(r)) + 1.5 for r in results]
    fig_height = max(2.8, sum(heights) + 0.6)
    fig, axes = plt.subplots(len(results), 1, figsize=(10, fig_height), squeeze=False,
                             gridspec_kw={"height_ratios": heights})
    for ax, result in zip(axes[:, 0], results):
        bars = _bars(result)
        times = [c.ms * 1e3 for c in bars]
        near = [t for c, t in zip(bars, times) if not (c is bars[-1] and len(bars) > 2)]
        edge = max(max(near), next(c.ms for c in bars if c.default) * 1e3) * 1.25
        if max(times) <= 3 * edge:  # nothing far off: show every bar whole
            edge = max(times)
        colors = ["tab:green" if c.chosen else "tab:orange" if c.default else "tab:red" if c.spills
                  else "silver" for c in bars]
        labels = [c.label + (" (chosen)" if c.chosen else "") + (" (heuristic)" if c.default else "")
                  + (" (spills)" if c.spills else "") for c in bars]
        y = list(range(len(bars)))[::-1]
        ax.barh(y, [min(t, edge) for t in times], color=colors)
        for yy, t in zip(y, times):
            text = f"{t:.1f}" if t <= edge else f"{t:.0f} (off scale)"
            ax.text(min(t, edge), yy, " " + text, va="center", fontsize=7)
        ax.set_xlim(0, edge * 1.12)
        ax.set_yticks(y)
        ax.set_yticklabels(labels, fontsize=8)
        word = "modelled" if result.kind == MODELLED else "measured"
        ax.set_xlabel(f"{word} time of the op (us)")
        ax.set_title(f"{result.dtype} {result.family} {result.op} {result.role}: C={result.channels}, m={result.m}\n"
                     f"tuned on {result.case.rsplit(' ', 1)[0]}; {len(result.candidates)} configs; "
                     f"chosen / heuristic = {1 / result.gain:.3f}", fontsize=9, loc="left")
        ax.grid(axis="x", alpha=0.3)
    word = "modelled" if results and results[0].kind == MODELLED else "measured"
    fig.suptitle(f"{gpu} ({word}): time by config; fastest 10, the heuristic's, the chosen and the slowest",
                 fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.5 / fig_height))
    _save(fig, path)
    return path


def _save(fig: Any, path: Path) -> None:
    """Save as a 64-colour PNG (a third of the size; the plots use a handful of colours).
    Pillow is a dependency of matplotlib, so it is there whenever a plot is."""
    from PIL import Image

    plt = _plt()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    with Image.open(path) as image:
        quantized = image.convert("RGB").quantize(colors=64)
    quantized.save(path, optimize=True)


def _informative(results: Sequence[KeyResult]) -> list[KeyResult]:
    """Keys worth a panel: those the tuner changed (largest gain first), then the widest
    spread; one per (family, op, role, bucket, element size) so float16 and bfloat16 twins do
    not both show."""
    seen, out = set(), []
    ranked = sorted(results, key=lambda r: (r.is_default, -r.gain if not r.is_default else 0,
                                            -r.spread if math.isfinite(r.spread) else 0))
    for r in ranked:
        twin = (r.family, r.op, r.role, r.key[4], r.key[5], r.dtype in ("float16", "bfloat16"))
        if twin not in seen:
            seen.add(twin)
            out.append(r)
    return out


def _group_plots(run: TuneRun, gpu: str, out: Path) -> list[tuple[str, Path]]:
    """One PNG per (family, op, role): its most informative keys, whatever their dtype."""
    groups: dict[tuple, list[KeyResult]] = defaultdict(list)
    for r in run.results:
        groups[(r.family, r.op, r.role)].append(r)
    written = []
    for (family, op, role), results in sorted(groups.items()):
        path = out / f"configs_{family}_{op}_{role}.png"
        written.append((f"{family} {op} {role}", plot_configs(_informative(results), gpu, path)))
    return written


def write_report(run: TuneRun, out: Path, *, gpu: str, store_path: Path, header: dict[str, Any],
                 plots: bool = True, trials: bool = True) -> Path:
    """report.md (with trials.csv and the PNGs) in ``out``; returns the report's path."""
    out.mkdir(parents=True, exist_ok=True)
    modelled = run.kind == MODELLED
    word = "modelled" if modelled else "measured"
    if trials:
        write_trials_csv(run, out / "trials.csv")
    figures = []
    if plots and run.results:
        figures.append(("overview", plot_overview(run, gpu, out / "overview.png")))
        figures.extend(_group_plots(run, gpu, out))
    lines = [f"# tritonbn autotuning report: {gpu} ({word})", ""]
    if modelled:
        lines += ["**Every time in this report is modelled, not measured**: no GPU ran it. The times come from",
                  "the model-based timer (below) applied to the launches a dry run of each op would make on an",
                  f"{header.get('gpu_description', gpu)}. Re-tune on the GPU (`tritonbn tune --gpu {gpu}` on that",
                  "machine) to replace them with measurements. A modelled store is this report's data, not a",
                  "source of launch decisions: launches read measured stores only.", ""]
    else:
        lines += ["Times are measured on the GPU with `triton.testing.do_bench` (L2 flushed before every run, "
                  "median); the moving statistics were restored after every trial.", ""]
    lines += ["| | |", "|---|---|"]
    for name, value in header.items():
        if name == "model":
            continue
        lines.append(f"| {name} | {value} |")
    lines.append(f"| store | `{store_path}` ({len(run.results)} keys) |")
    lines.append("")
    model = header.get("model")
    if model:
        lines += ["## The model", "", "Per launch: `t = launch latency + bytes / (bandwidth x efficiency)`, "
                  "`efficiency = min(1, programs / SMs) x min(1, bytes in flight per SM / (bandwidth x memory "
                  "latency / SMs))`; an op's time is the sum over its launches.", "",
                  "| parameter | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in model.items() if k != "formula"]
        lines += ["", "Bytes: the distinct tensor arguments of each launch of a dry run (`ops.dry_run` on `meta` "
                  "tensors), each counted once: data tensors (x, y, dy, dx) at their size, which is exact; "
                  "per-channel tensors at their full size once (a GPU serves repeats from L2). Bytes in flight "
                  "per SM: resident programs (at most min(32, 64 warps / num_warps)) x one tile of each data "
                  "tensor read (a finalize: its whole share of the partials). Not modelled: compute, register pressure (spilling candidates are pruned by "
                  "compiling them), tail waves, L2 reuse between kernels.", ""]
    lines += _op_table(run, word) + _key_table(run, word)
    if run.skipped:
        lines += ["## Skipped", ""] + [f"- {s}" for s in run.skipped] + [""]
    if figures:
        lines += ["## Plots", ""]
        for title, path in figures:
            lines += [f"### {title}", "", f"![{title}]({path.name})", ""]
    files = f"- `{store_path}`: the store (schema 1)"
    if trials:
        files += f"; `trials.csv`: every candidate's {word} time"
    lines += ["## Files", "", files + ".", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _op_table(run: TuneRun, word: str) -> list[str]:
    lines = [f"## Ops: heuristic vs tuned ({word})", "",
             f"Each op of each case with every role at the heuristic's config, then at the tuned ones ({word} us).",
             "", "| case | op | family | C | m | heuristic us | tuned us | speedup | kernels (tuned) |",
             "|---|---|---|---:|---:|---:|---:|---:|---|"]
    for s in run.summaries:
        speed = s.heuristic_ms / s.tuned_ms if s.tuned_ms else float("nan")
        lines.append(f"| {s.case} | {s.op} | {s.family} | {s.channels} | {s.m} | {_us(s.heuristic_ms)} | "
                     f"{_us(s.tuned_ms)} | {speed:.3f} | {s.kernels_tuned} |")
    if run.summaries:
        gains = [s.heuristic_ms / s.tuned_ms for s in run.summaries if s.tuned_ms]
        better = sum(g > 1.0 + 1e-9 for g in gains)
        lines += ["", f"{better} of {len(gains)} ops faster than the heuristic; geometric-mean speedup "
                  f"{math.exp(sum(math.log(g) for g in gains) / len(gains)):.3f}, best {max(gains):.3f} ({word})."]
    return lines + [""]


def _key_table(run: TuneRun, word: str) -> list[str]:
    lines = [f"## Keys ({word})", "",
             "Per key (dtype, family, op, role, C and m buckets): the chosen config, its time and the heuristic's "
             "(the whole op, the other roles at their tuned configs), the speedup, and the spread between the "
             "slowest and the fastest candidate.", "",
             "| dtype | family | op | role | bucket | tuned on | chosen | heuristic | chosen us | heuristic us "
             "| speedup | spread | configs | note |",
             "|---|---|---|---|---|---|---|---|---:|---:|---:|---:|---:|---|"]
    for r in run.results:
        bucket = f"C{r.key[4]} m{r.key[5]}"
        chosen = "heuristic" if r.is_default else r.chosen.label
        lines.append(f"| {r.dtype} | {r.family} | {r.op} | {r.role} | {bucket} | {r.case} | {chosen} | "
                     f"{r.default.label} | {_us(r.chosen_ms)} | {_us(r.default_ms)} | {r.gain:.3f} | "
                     f"{r.spread:.2f} | {len(r.candidates)} | {r.note} |")
    return lines + [""]
