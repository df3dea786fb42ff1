"""What a sweep writes: ``results.csv``, one PNG per mode (+ a speedup chart on GPU), one per
fused chain (``fused_<fusion>.png``), ``report.md``.

Plots use matplotlib's Agg backend (no display needed).  A figure per mode has one panel per
dtype, the cases along x and one line per (layout, provider): effective GB/s on GPU, bytes
moved / S on CPU; those and their tables show BatchNorm alone (fusion "none").  A fused chain's
figure has a panel per mode: tritonbn's speedups over torch's unfused chain, its compiled
chain and tritonbn's own unfused chain on GPU, bytes moved / S on CPU.  ``report.md`` embeds the figures by relative path and says the device, the
torch/Triton versions, the date and the command that reproduces it.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .sweeps import FUSED_MIN_PASSES, FUSION_TITLES, LAYOUTS, MODE_TITLES, MODES, TORCH_CHAIN_PASSES, UNFUSED

__all__ = ["Meta", "write", "write_csv", "console_summary"]

LAYOUT_COLORS = {"NCHW": "tab:blue", "channels_last": "tab:orange", "axis=-1": "tab:green", "middle": "tab:red"}
# marker and a small x offset per layout, so layouts with equal values stay visible side by side
LAYOUT_MARKERS = {"NCHW": "o", "channels_last": "s", "axis=-1": "^", "middle": "D"}
LAYOUT_OFFSETS = {"NCHW": -0.15, "channels_last": -0.05, "axis=-1": 0.05, "middle": 0.15}
PROVIDER_STYLES = {"tritonbn": "-", "torch": "--", "torch.compile": "-."}


@dataclass(frozen=True)
class Meta:
    """What report.md says about the run."""

    device: str
    timed: bool  # True: times measured (GPU); False: traffic counted (CPU)
    date: str
    command: str
    # (arch, bandwidth TB/s, its source) of the compiled-code facts on the rows; None: not reported
    compiled: tuple | None = None


def _versions() -> str:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:  # pragma: no cover
        triton_version = "not installed"
    import tritonbn

    return (f"torch {torch.__version__}, Triton {triton_version}, tritonbn {tritonbn.__version__}, "
            f"Python {platform.python_version()}")


def write_csv(rows: Sequence, path: Path) -> Path:
    """One row per (provider, mode, layout, dtype, shape); NaN cells are empty."""
    fields = [f.name for f in dataclasses.fields(rows[0])] if rows else []
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        for row in rows:
            values = dataclasses.asdict(row)
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else
                                 (f"{v:.6g}" if isinstance(v, float) else v)) for k, v in values.items()})
    return path


def _ordered(values: Sequence[str]) -> list[str]:
    seen: dict[str, None] = {}
    for value in values:
        seen.setdefault(value, None)
    return list(seen)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _panels(plt, count: int, width: float):
    """A figure with ``count`` data panels and a legend column on the right."""
    fig, axes = plt.subplots(1, count + 1, figsize=(width * count + 2.6, 4.6),
                             gridspec_kw={"width_ratios": [width] * count + [2.6]})
    legend_ax = axes[-1]
    legend_ax.axis("off")
    return fig, list(axes[:-1]), legend_ax


def _finish(plt, fig, axes, legend_ax, cases: Sequence[str], title: str, path: Path) -> Path:
    for ax in axes:
        ax.set_xticks(list(range(len(cases))))
        ax.set_xticklabels(cases, rotation=35, ha="right", fontsize=7)
        ax.grid(True, alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    legend_ax.legend(handles, labels, loc="center left", fontsize=7.5, frameon=False)
    fig.suptitle(title, fontsize=10.5)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _mode_figure(rows: Sequence, mode: str, on_gpu: bool, path: Path) -> Path:
    """One panel per dtype: y per case, a line per (layout, provider)."""
    plt = _pyplot()
    mode_rows = [r for r in rows if r.mode == mode]
    cases = _ordered([r.case for r in mode_rows])
    dtypes = _ordered([r.dtype for r in mode_rows])
    fig, axes, legend_ax = _panels(plt, len(dtypes), 4.6)
    for ax, dtype in zip(axes, dtypes):
        subset = [r for r in mode_rows if r.dtype == dtype]
        if on_gpu:
            _gpu_lines(ax, rows, subset, cases, dtype)
        else:
            _cpu_lines(ax, subset, cases, mode)
        ax.set_title(dtype, fontsize=10)
        ax.set_ylim(bottom=0)
    axes[0].set_ylabel("effective bandwidth, GB/s (minimal bytes / median time)" if on_gpu else
                       "global-memory bytes moved / S\n(S = bytes of the data tensor)")
    if on_gpu:
        what = "measured with triton.testing.do_bench"
        labels = cases
    else:
        what = "tritonbn counted in Triton's interpreter, torch modelled; CPU-sized shapes"
        logical = {r.case: r.logical_shape for r in mode_rows}
        labels = [f"{case}\n({logical[case]})" for case in cases]
    return _finish(plt, fig, axes, legend_ax, labels, f"{MODE_TITLES[mode]} ({what})", path)


def _series(subset: Sequence, cases: Sequence[str], attr: str) -> list[float]:
    by_case = {r.case: getattr(r, attr) for r in subset}
    return [by_case.get(case, math.nan) for case in cases]


def _cpu_lines(ax, subset: Sequence, cases: Sequence[str], mode: str, fusion: str = "none") -> None:
    xs = list(range(len(cases)))
    for layout in LAYOUTS:
        counted = [r for r in subset if r.provider == "tritonbn" and r.layout == layout]
        if counted:
            ax.plot([x + LAYOUT_OFFSETS[layout] for x in xs], _series(counted, cases, "bytes_per_s"),
                     marker=LAYOUT_MARKERS[layout], color=LAYOUT_COLORS[layout], linewidth=1,
                     label=f"tritonbn {layout} (counted)")
    torch_passes = TORCH_CHAIN_PASSES[fusion][mode]
    ax.axhline(FUSED_MIN_PASSES[fusion][mode], color="gray", linewidth=5, alpha=0.35, label="minimal bytes")
    ax.axhline(torch_passes, color="black", linestyle="--",
               label="torch native design (modelled)" if fusion == "none" else "torch's unfused chain (modelled)")
    counted = [r.bytes_per_s for r in subset if r.provider == "tritonbn" and not math.isnan(r.bytes_per_s)]
    ax.set_ylim(top=max([torch_passes + 1.5] + [1.1 * v for v in counted]))


def _gpu_lines(ax, rows: Sequence, subset: Sequence, cases: Sequence[str], dtype: str) -> None:
    xs = list(range(len(cases)))
    for provider, style in PROVIDER_STYLES.items():
        for layout in LAYOUTS:
            mine = [r for r in subset if r.provider == provider and r.layout == layout]
            if mine:
                ax.plot([x + LAYOUT_OFFSETS[layout] for x in xs], _series(mine, cases, "gbps"), linestyle=style,
                        marker=LAYOUT_MARKERS[layout], markersize=6 if provider == "tritonbn" else 3,
                        linewidth=1, color=LAYOUT_COLORS[layout], label=f"{provider} {layout}")
    copies = [r for r in rows if r.provider == "copy" and r.dtype == dtype]
    best: dict[str, float] = {}
    for r in copies:  # one copy per (case, layout): the layouts move the same bytes
        if not math.isnan(r.gbps):
            best[r.case] = max(best.get(r.case, 0.0), r.gbps)
    ax.plot(xs, [best.get(c, math.nan) for c in cases], color="black", linestyle=":", marker="x",
            label="copy of S bytes (2 S / time)")


def _speedup_figure(rows: Sequence, path: Path, title: str = "tritonbn speedup") -> Path:
    """tritonbn's speedup over torch eager (solid), torch.compile (dashed) and, in a fused chain's
    rows, tritonbn's unfused chain (dotted), a panel per mode."""
    plt = _pyplot()
    from matplotlib.ticker import FuncFormatter

    timed = [r for r in rows if r.provider == "tritonbn" and r.kind == "measured"]
    modes = [m for m in MODES if any(r.mode == m for r in timed)]
    cases = _ordered([r.case for r in timed])
    dtype = _ordered([r.dtype for r in timed])[0]
    fig, axes, legend_ax = _panels(plt, len(modes), 4.2)
    xs = list(range(len(cases)))
    for ax, mode in zip(axes, modes):
        for layout in LAYOUTS:
            mine = [r for r in timed if r.mode == mode and r.layout == layout and r.dtype == dtype]
            if not mine:
                continue
            shifted = [x + LAYOUT_OFFSETS[layout] for x in xs]
            ax.plot(shifted, _series(mine, cases, "speedup_vs_torch"), "-", marker=LAYOUT_MARKERS[layout],
                    color=LAYOUT_COLORS[layout], linewidth=1, label=f"{layout} vs torch eager")
            ax.plot(shifted, _series(mine, cases, "speedup_vs_compile"), "--", marker=LAYOUT_MARKERS[layout],
                    markersize=3, color=LAYOUT_COLORS[layout], linewidth=1, label=f"{layout} vs torch.compile")
            if any(r.provider == UNFUSED for r in rows):
                ax.plot(shifted, _series(mine, cases, "speedup_vs_unfused"), ":", marker=LAYOUT_MARKERS[layout],
                        markersize=3, color=LAYOUT_COLORS[layout], linewidth=1, label=f"{layout} vs {UNFUSED}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        times = FuncFormatter(lambda value, _: f"{value:g}×")
        ax.yaxis.set_major_formatter(times)
        ax.yaxis.set_minor_formatter(times)
        ax.tick_params(axis="y", which="minor", labelsize=7)
        ax.set_title(MODE_TITLES[mode], fontsize=10)
    axes[0].set_ylabel("speedup of tritonbn (baseline ms / tritonbn ms)")
    return _finish(plt, fig, axes, legend_ax, cases,
                   f"{title}, {dtype} (median times; > 1: tritonbn faster)", path)


def _fused_counted_figure(rows: Sequence, fusion: str, path: Path) -> Path:
    """A fused chain's counted bytes moved / S, a panel per mode (the first dtype), a line per layout."""
    plt = _pyplot()
    counted = [r for r in rows if r.provider == "tritonbn"]
    modes = [m for m in MODES if any(r.mode == m for r in counted)]
    cases = _ordered([r.case for r in counted])
    dtype = _ordered([r.dtype for r in counted])[0]
    fig, axes, legend_ax = _panels(plt, len(modes), 4.2)
    for ax, mode in zip(axes, modes):
        _cpu_lines(ax, [r for r in counted if r.mode == mode and r.dtype == dtype], cases, mode, fusion)
        ax.set_ylim(bottom=0)
        ax.set_title(MODE_TITLES[mode], fontsize=10)
    axes[0].set_ylabel("global-memory bytes moved / S\n(S = bytes of the data tensor)")
    return _finish(plt, fig, axes, legend_ax, cases,
                   f"{FUSION_TITLES[fusion]}, {dtype}: tritonbn counted (one fused op), torch's chain modelled", path)


# ----------------------------------------------------------------------------- report.md


def _fmt(value: float, spec: str = ".3f") -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _cpu_table(rows: Sequence, fusion: str = "none") -> list[str]:
    counted = [r for r in rows if r.provider == "tritonbn"]
    modes = [m for m in MODES if any(r.mode == m for r in counted)]
    head = "| case | layout | dtype | shape (axis) | " + " | ".join(MODE_TITLES[m] for m in modes) + " |"
    lines = [head, "|" + "---|" * (4 + len(modes))]
    keys = _ordered([(r.case, r.layout, r.dtype) for r in counted])
    by_key = {(r.case, r.layout, r.dtype, r.mode): r for r in counted}
    for case, layout, dtype in keys:
        first = by_key[next((case, layout, dtype, m) for m in modes if (case, layout, dtype, m) in by_key)]
        cells = []
        for mode in modes:
            r = by_key.get((case, layout, dtype, mode))
            cells.append("–" if r is None else
                         f"{r.bytes_per_s:.3f} S, {int(r.launches)}× [{r.programs_per_launch}]"
                         + (f", {int(r.torch_copies)} copies" if r.torch_copies else ""))
        lines.append(f"| {case} | {layout} | {dtype} | {first.shape} ({first.axis}) | " + " | ".join(cells) + " |")
    model = " | ".join(f"{TORCH_CHAIN_PASSES[fusion][m]} S" for m in modes)
    minimal = " | ".join(f"{FUSED_MIN_PASSES[fusion][m]} S" for m in modes)
    torch_name = "torch native design" if fusion == "none" else "torch's unfused chain"
    lines.append(f"| **{torch_name}** | any | any | (modelled) | {model} |")
    lines.append(f"| **minimal** | | | | {minimal} |")
    return lines


def _gpu_table(rows: Sequence, mode: str) -> list[str]:
    unfused = any(r.provider == UNFUSED for r in rows)  # a fused chain's rows
    extra = f" {UNFUSED} ms | × vs unfused |" if unfused else ""
    lines = ["| case | layout | dtype | shape (axis) | tritonbn ms (q25–q75) | GB/s | % copy | torch ms | torch.compile ms "
             f"| × vs torch | × vs compile |{extra} note |", "|" + "---|" * (14 if unfused else 12)]
    mine = [r for r in rows if r.mode == mode and r.provider == "tritonbn"]
    others = {(r.case, r.layout, r.dtype, r.provider): r for r in rows if r.mode == mode}
    for r in mine:
        eager, comp, own = (others.get((r.case, r.layout, r.dtype, p)) for p in ("torch", "torch.compile", UNFUSED))
        notes = "; ".join(_ordered([n for n in (r.note, *(o.note for o in (eager, comp, own) if o)) if n]))
        cells = (f" {_fmt(own.ms if own else math.nan, '.4f')} | {_fmt(r.speedup_vs_unfused, '.2f')} |"
                 if unfused else "")
        lines.append(
            f"| {r.case} | {r.layout} | {r.dtype} | {r.shape} ({r.axis}) | {_fmt(r.ms, '.4f')} ({_fmt(r.ms_q25, '.4f')}–{_fmt(r.ms_q75, '.4f')})"
            f" | {_fmt(r.gbps, '.0f')} | {_fmt(r.pct_copy, '.0f')} | {_fmt(eager.ms if eager else math.nan, '.4f')}"
            f" | {_fmt(comp.ms if comp else math.nan, '.4f')} | {_fmt(r.speedup_vs_torch, '.2f')}"
            f" | {_fmt(r.speedup_vs_compile, '.2f')} |{cells} {notes} |")
    return lines


def _markdown(rows: Sequence, meta: Meta, figures: dict[str, Path], csv_path: Path) -> str:
    on_gpu = meta.timed
    lines = [f"# tritonbn benchmark: {meta.device}", "",
             f"- date: {meta.date}", f"- device: {meta.device}", f"- software: {_versions()}",
             f"- reproduce: `{meta.command}` (or `scripts/bench` with the same arguments after `--quick`)",
             f"- data: [`{csv_path.name}`]({csv_path.name}), one row per (provider, mode, layout, dtype, shape)", ""]
    if on_gpu:
        lines += [
            "Every time is **measured** with `triton.testing.do_bench` (L2 flushed before each run): the median,",
            "with quartiles. Effective GB/s counts the *minimal* bytes of a mode (2 S inference and training",
            "forward, 3 S backward, 5 S forward + backward; S = bytes of the data tensor) whatever a provider",
            "really moves; % copy compares it with a measured device-to-device copy of S bytes (2 S moved).",
            "torch eager (`F.batch_norm`, cuDNN or native as torch dispatches) and `torch.compile` only take the",
            "channel at axis 1: for other axes they get `x.movedim(axis, 1)`, a view (no copy). Moving",
            "statistics are restored after each measurement.", ""]
    else:
        lines += [
            "**No GPU: nothing here is a time.** tritonbn's numbers are **counted**: the CPU-sized cases run",
            "through the Triton kernels in Triton's interpreter (`TRITON_INTERPRET=1`) with its global loads and",
            "stores instrumented (`tritonbn/perf/traffic.py`): bytes = element size × active (unmasked) lanes,",
            "over S = bytes of the data tensor; launches and programs per launch come from `tritonbn.trace`.",
            "The count is what the kernels request from global memory (per-channel parameters and partials",
            "included); a GPU's caches can only lower it. torch's numbers are **modelled**: the passes of its",
            "documented CUDA design (a statistics pass and an elementwise pass forward: 3 S; a reduce pass over",
            "x and dy and an elementwise pass backward: 5 S), not counted.", "",
            "Cells: bytes moved / S, launches × [programs per launch]" + ".", ""]
        if any(r.provider == "tritonbn" for r in rows):
            lines += _cpu_table(rows) + [""]
    for mode in MODES:
        if mode not in figures:
            continue
        lines += [f"## {MODE_TITLES[mode]}", "", f"![{MODE_TITLES[mode]}]({figures[mode].name})", ""]
        if on_gpu:
            lines += _gpu_table(rows, mode) + [""]
    if "speedup" in figures:
        lines += ["## Speedup", "", f"![speedup]({figures['speedup'].name})", ""]
    return "\n".join(lines)


def _compiled_table(rows: Sequence, compiled: tuple) -> list[str]:
    """Per tritonbn row: the binding launch, its SASS instructions per element, the issue-rate
    ceiling (modelled) and whether bytes or instructions bind (``perf/compiled_facts.py``)."""
    arch, bandwidth, source = compiled
    mine = [r for r in rows if r.provider == "tritonbn" and r.binding_kernel]
    if not mine:
        return []
    lines = [f"## Compiled code ({arch})", "",
             "Per row the launch with the lowest issue-rate ceiling: its SASS instructions per element of the",
             "hot loop (counted from the cubin), the bandwidth instruction issue alone allows it (**modelled**:",
             f"`perf/sass.py`), the lowest active-lane fraction of the row's launches, and what binds against",
             f"{bandwidth:.2f} TB/s ({source}): instructions where the ceiling is lower, else bytes.", "",
             "| case | layout | dtype | fusion | mode | kernel | inst/el | ceiling TB/s | lanes | binds |",
             "|" + "---|" * 10]
    for r in mine:
        lines.append(f"| {r.case} | {r.layout} | {r.dtype} | {r.fusion} | {r.mode} | {r.binding_kernel} | "
                     f"{r.inst_per_element:.2f} | {r.issue_ceiling_tbs:.2f} | {r.active_lanes:.0%} | {r.binds} |")
    return lines + [""]


def _passes_text(passes: dict[str, int]) -> str:
    return ", ".join(f"{passes[m]} S {MODE_TITLES[m]}" for m in MODES)


def _fused_markdown(rows: Sequence, fusion: str, on_gpu: bool, figure: Path) -> list[str]:
    """The report section of one fused chain (``rows``: its rows only)."""
    title = FUSION_TITLES[fusion]
    lines = [f"## Fused: {title}", "",
             f"tritonbn runs the chain as one op (`tritonbn.batch_norm(..., act_type=, addend=)`); torch runs it "
             "as separate ops. Minimal bytes of the chain: " + _passes_text(FUSED_MIN_PASSES[fusion]) + ".", ""]
    if on_gpu:
        lines += [f"Measured like BatchNorm alone. Baselines: torch eager's chain, the same chain through "
                  f"`torch.compile` (Inductor may fuse the add and the ReLU itself) and `{UNFUSED}` (tritonbn's "
                  "batch norm, then torch's add and ReLU). GB/s counts the chain's minimal bytes.", "",
                  f"![{title}]({figure.name})", ""]
        for mode in MODES:
            if any(r.mode == mode and r.provider == "tritonbn" for r in rows):
                lines += [f"### {title}: {MODE_TITLES[mode]}", "", *_gpu_table(rows, mode), ""]
        return lines
    lines += ["tritonbn **counted** as above; torch's chain **modelled**: its batch norm's passes, an add "
              "(reads 2 S, writes S) and a ReLU (2 S forward; reads dy and its output, writes S backward): "
              + _passes_text(TORCH_CHAIN_PASSES[fusion]) + ".", "",
              *_cpu_table(rows, fusion), "", f"![{title}]({figure.name})", ""]
    return lines


def write(rows: Sequence, out: Path, meta: Meta) -> list[Path]:
    """results.csv, the figures and report.md under ``out`` (created); returns their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    on_gpu = meta.timed
    csv_path = write_csv(rows, out / "results.csv")
    alone = [r for r in rows if r.fusion == "none"]  # BatchNorm alone, and the copy reference
    figures: dict[str, Path] = {}
    for mode in MODES:
        if any(r.mode == mode for r in alone):
            figures[mode] = _mode_figure(alone, mode, on_gpu, out / f"{mode}.png")
    if on_gpu and any(r.provider == "tritonbn" and r.kind == "measured" for r in alone):
        figures["speedup"] = _speedup_figure(alone, out / "speedup.png")
    sections = []
    for fusion in FUSION_TITLES:
        chain = [r for r in rows if r.fusion == fusion]
        if fusion == "none" or not any(r.provider == "tritonbn" for r in chain):
            continue
        path = out / f"fused_{fusion}.png"
        figures[f"fused_{fusion}"] = (
            _speedup_figure(chain, path, f"{FUSION_TITLES[fusion]}: fused tritonbn's speedup") if on_gpu
            else _fused_counted_figure(chain, fusion, path))
        sections += _fused_markdown(chain, fusion, on_gpu, path)
    if meta.compiled:
        sections += _compiled_table(rows, meta.compiled)
    report = out / "report.md"
    report.write_text("\n".join([_markdown(alone, meta, figures, csv_path), *sections]) + "\n")
    return [csv_path, *figures.values(), report]


def console_summary(rows: Sequence, on_gpu: bool) -> str:
    """A short table for the terminal."""
    if on_gpu:
        lines = [f"{'fusion':8s} {'mode':17s} {'case':20s} {'layout':13s} {'dtype':5s} {'ms':>9s} {'GB/s':>7s} "
                 f"{'%copy':>6s} {'x torch':>8s} {'x compile':>9s}"]
        for r in rows:
            if r.provider == "tritonbn":
                lines.append(f"{r.fusion:8s} {r.mode:17s} {r.case:20s} {r.layout:13s} {r.dtype:5s} {_fmt(r.ms, '9.4f')} "
                             f"{_fmt(r.gbps, '7.0f')} {_fmt(r.pct_copy, '6.0f')} {_fmt(r.speedup_vs_torch, '8.2f')} "
                             f"{_fmt(r.speedup_vs_compile, '9.2f')}")
        return "\n".join(lines)
    lines = ["counted (tritonbn, Triton interpreter) vs modelled (torch native design): bytes moved / S, launches",
             f"{'fusion':8s} {'mode':17s} {'case':18s} {'layout':13s} {'dtype':5s} {'counted':>8s} {'launches':>8s}  "
             f"{'programs':18s} {'modelled':>8s}"]
    for r in rows:
        if r.provider == "tritonbn":
            lines.append(f"{r.fusion:8s} {r.mode:17s} {r.case:18s} {r.layout:13s} {r.dtype:5s} {r.bytes_per_s:8.3f} "
                         f"{int(r.launches):8d}  {r.programs_per_launch:18s} {TORCH_CHAIN_PASSES[r.fusion][r.mode]:8d}")
    return "\n".join(lines)
