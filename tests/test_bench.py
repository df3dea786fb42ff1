"""The benchmark sweep: definitions, the timed (GPU) path with a stub timer, the counted (CPU)
path on a tiny selection, and what gets written (CSV, PNGs, report.md).

No GPU is needed: the GPU path runs on CPU tensors with an injected timer and torch.compile
replaced by the plain function.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
from pathlib import Path

import pytest
import torch

from tritonbn.cli import build_parser, main
from tritonbn.perf import bench, report, sweeps
from tritonbn.perf.bench import Timing

REPO = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- definitions


def test_minimal_and_modelled_bytes():
    assert sweeps.MIN_PASSES == {"inference": 2, "forward": 2, "backward": 3, "forward_backward": 5}
    assert sweeps.TORCH_PASSES == {"inference": 2, "forward": 3, "backward": 5, "forward_backward": 8}


@pytest.mark.parametrize("logical, layout, expected", [
    ((32, 64, 56, 56), "NCHW", ((32, 64, 56, 56), 1, "contiguous")),
    ((32, 64, 56, 56), "channels_last", ((32, 64, 56, 56), 1, "channels_last")),
    ((32, 64, 56, 56), "axis=-1", ((32, 56, 56, 64), 3, "contiguous")),
    ((32, 64, 56, 56), "middle", ((32, 56, 64, 56), 2, "contiguous")),
    ((8, 1024, 2048), "axis=-1", ((8, 2048, 1024), 2, "contiguous")),
    ((8, 1024, 2048), "middle", None),
    ((512, 1024), "channels_last", None),
    ((512, 1024), "axis=-1", None),
])
def test_layouts_realize_shapes(logical, layout, expected):
    assert sweeps.LAYOUTS[layout].realize(logical) == expected


def test_sweep_covers_the_issue():
    families = {case.family for case in sweeps.FULL_CASES}
    assert families == {"resnet50", "small-C", "large-C", "mlp", "video", "transformer"}
    logical = {case.logical for case in sweeps.FULL_CASES}
    assert {(32, 64, 112, 112), (256, 2048, 7, 7), (20, 6, 65536), (32, 4, 256, 256), (8, 2048, 7, 7)} <= logical
    assert any(len(case.logical) == 5 for case in sweeps.FULL_CASES)
    assert any(len(case.logical) == 2 for case in sweeps.FULL_CASES)
    full = sweeps.points(sweeps.FULL_CASES, list(sweeps.LAYOUTS), list(sweeps.DTYPES))
    assert {p.layout for p in full} == set(sweeps.LAYOUTS) and {p.dtype for p in full} == {"fp16", "bf16", "fp32"}
    transformer = [p for p in full if p.case.family == "transformer" and p.layout == "axis=-1"]
    assert transformer and all(p.axis == 2 for p in transformer)
    quick = sweeps.points([c.for_cpu() for c in sweeps.QUICK_CASES], list(sweeps.LAYOUTS), sweeps.QUICK_DTYPES)
    assert 0 < len(quick) < len(full)
    assert max(p.data_bytes for p in quick) < 2**20  # interpreter-sized


def test_torch_view_moves_the_channel_to_axis_1():
    x = torch.randn(2, 5, 6, 3)
    view = bench.torch_view(x, -1)
    assert view.shape == (2, 3, 5, 6) and view.data_ptr() == x.data_ptr()  # a view, no copy
    assert bench.torch_view(x, 1) is x
    assert bench.torch_view(x, 2).shape == (2, 6, 5, 3)


@pytest.mark.parametrize("shape, axis", [((2, 5, 6, 3), -1), ((2, 4, 3, 5), 2)])
def test_torch_eager_on_the_view_matches_tritonbn(shape, axis):
    import tritonbn

    x = torch.randn(shape, dtype=torch.float64)
    channels = shape[axis]
    gamma, beta = torch.rand(channels, dtype=torch.float64) + 0.5, torch.randn(channels, dtype=torch.float64)
    mm, mv = torch.zeros(channels, dtype=torch.float64), torch.ones(channels, dtype=torch.float64)
    expected = tritonbn.batch_norm(x, gamma, beta, mm.clone(), mv.clone(), fix_gamma=False, axis=axis, training=True)
    got = bench._torch_batch_norm(bench.torch_view(x, axis), gamma, beta, mm.clone(), mv.clone(), True)
    torch.testing.assert_close(got.movedim(1, axis), expected)


# ----------------------------------------------------------------------------- the timed path


class StubTimer:
    """Calls fn once (so every provider really runs) and returns fixed times in call order:
    the copy, then per mode tritonbn, torch, torch.compile."""

    def __init__(self, fail_on: int | None = None):
        self.calls = 0
        self.fail_on = fail_on

    def __call__(self, fn):
        fn()
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("stub failure")
        index = (self.calls - 2) % 3
        ms = 0.5 if self.calls == 1 else (1.0, 2.0, 4.0)[index]
        return Timing(ms, 0.9 * ms, 1.1 * ms)


def _point(layout="axis=-1", dtype="fp32", logical=(2, 4, 3, 5)):
    return sweeps.points([sweeps.Case("test", "tiny", logical)], [layout], [dtype])[0]


def test_timed_point_formulas_and_restored_statistics(monkeypatch):
    created = []
    real_inputs = bench._inputs
    monkeypatch.setattr(bench, "_inputs", lambda point, device: created.append(real_inputs(point, device)) or created[-1])
    point = _point()
    rows = bench.time_point(point, torch.device("cpu"), StubTimer(), compile_fn=lambda fn: fn)
    s = point.data_bytes
    copy = rows[0]
    assert (copy.provider, copy.mode, copy.ms) == ("copy", "copy", 0.5)
    assert copy.gbps == pytest.approx(2 * s / 0.5e6)
    assert len(rows) == 1 + 3 * len(sweeps.MODES)
    for row in rows[1:]:
        assert row.kind == "measured"
        assert row.gbps == pytest.approx(sweeps.MIN_PASSES[row.mode] * s / (row.ms * 1e6))
        assert row.pct_copy == pytest.approx(100 * row.gbps / copy.gbps)
        if row.provider != "tritonbn":
            assert "movedim(3, 1)" in row.note
    tritonbn_rows = [r for r in rows if r.provider == "tritonbn"]
    assert {r.mode for r in tritonbn_rows} == set(sweeps.MODES)
    for row in tritonbn_rows:
        assert (row.ms, row.ms_q25, row.ms_q75) == (1.0, 0.9, 1.1)
        assert row.speedup_vs_torch == 2.0 and row.speedup_vs_compile == 4.0
    inp = created[0]
    assert torch.equal(inp.moving_mean, torch.zeros(4)) and torch.equal(inp.moving_var, torch.ones(4))


class ProviderTimer:
    """Runs fn once (so every chain really executes) and times it by the provider whose row is
    being timed, in ``time_point``'s order: tritonbn, torch, torch.compile, tritonbn-unfused."""

    MS = {"tritonbn": 1.0, "torch": 2.0, "torch.compile": 4.0, bench.UNFUSED: 3.0}

    def __init__(self, providers):
        self.order = ["copy"] + list(providers) * len(sweeps.MODES)
        self.calls = 0

    def __call__(self, fn):
        fn()
        provider = self.order[self.calls]
        self.calls += 1
        ms = 0.5 if provider == "copy" else self.MS[provider]
        return Timing(ms, ms, ms)


@pytest.mark.parametrize("fusion", ["relu", "add", "add_relu"])
def test_fused_timed_rows_carry_the_chain_and_its_minimal_bytes(fusion):
    point = _point("NCHW")
    rows = bench.time_point(point, torch.device("cpu"), ProviderTimer(bench.PROVIDERS), compile_fn=lambda fn: fn,
                            fusions=(fusion,))
    assert [r.provider for r in rows[:5]] == ["copy", *bench.PROVIDERS]
    assert len(rows) == 1 + 4 * len(sweeps.MODES) and {r.fusion for r in rows[1:]} == {fusion}
    for row in rows[1:]:
        assert row.gbps == pytest.approx(sweeps.FUSED_MIN_PASSES[fusion][row.mode] * point.data_bytes / (row.ms * 1e6))
        assert row.note == "", row.note
    for row in (r for r in rows if r.provider == "tritonbn"):
        assert (row.speedup_vs_torch, row.speedup_vs_compile, row.speedup_vs_unfused) == (2.0, 4.0, 3.0)


def test_unfused_runs_only_for_fused_chains():
    rows = bench.time_point(_point("NCHW"), torch.device("cpu"), StubTimer(), compile_fn=lambda fn: fn,
                            modes=("inference",), fusions=("none", "relu"))
    providers = {(r.fusion, r.provider) for r in rows}
    assert ("none", bench.UNFUSED) not in providers and ("relu", bench.UNFUSED) in providers
    assert [r.provider for r in rows].count("copy") == 1


@pytest.mark.parametrize("mode", ["inference", "forward_backward"])
@pytest.mark.parametrize("fusion", ["relu", "add", "add_relu"])
def test_every_provider_computes_the_same_chain(fusion, mode):
    point = _point("axis=-1", "fp32", (4, 3, 2, 5))
    inp = bench._inputs(point, torch.device("cpu"))
    results = {}
    for provider in ("tritonbn", "torch", bench.UNFUSED):
        with bench.restored(inp.moving_mean, inp.moving_var):
            results[provider] = bench._mode_fn(provider, mode, inp, None, fusion)()
    expected = results["torch"]
    if mode == "inference":
        expected = expected.movedim(1, point.axis)  # torch ran on the channel-at-1 view
        if "relu" in fusion:
            assert (results["tritonbn"] >= 0).all() and (results["tritonbn"] == 0).any()
    else:
        assert len(expected) == (4 if "add" in fusion else 3)  # dx, dgamma, dbeta (, daddend)
    for provider in ("tritonbn", bench.UNFUSED):
        got = results[provider]
        for ours, theirs in zip(got if isinstance(got, tuple) else (got,),
                                expected if isinstance(expected, tuple) else (expected,)):
            torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_a_failing_provider_is_a_note_not_a_crash():
    rows = bench.time_point(_point("NCHW"), torch.device("cpu"), StubTimer(fail_on=3), compile_fn=lambda fn: fn,
                            modes=("inference",))
    failed = [r for r in rows if r.note.startswith("failed")]
    assert len(failed) == 1 and failed[0].provider == "torch" and math.isnan(failed[0].ms)
    assert "stub failure" in failed[0].note


def test_written_outputs_on_the_timed_path(tmp_path):
    points = [_point(layout, dtype, logical) for layout in ("NCHW", "axis=-1") for dtype in ("fp32", "bf16")
              for logical in ((2, 4, 3, 5), (4, 3, 2, 2))]
    rows = bench.time_sweep(points, "cpu", StubTimer(), compile_fn=lambda fn: fn, progress=False)
    meta = report.Meta(device="stub GPU", timed=True, date="2026-01-01 00:00", command="tritonbn bench --quick")
    written = report.write(rows, tmp_path, meta)
    names = sorted(p.name for p in written)
    assert names == sorted(["results.csv", "report.md", "speedup.png", *(f"{m}.png" for m in sweeps.MODES)])
    assert {r.fusion for r in rows} == {"none"}
    with open(tmp_path / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    assert len(table) == len(rows)
    assert {"provider", "mode", "layout", "dtype", "shape", "ms", "gbps", "pct_copy", "speedup_vs_torch"} <= set(table[0])
    assert {r["provider"] for r in table} == {"tritonbn", "torch", "torch.compile", "copy"}
    text = (tmp_path / "report.md").read_text()
    for needle in ("stub GPU", "torch 2", "Triton", "2026-01-01", "`tritonbn bench --quick`", "](speedup.png)",
                   "](inference.png)", "movedim", "measured"):
        assert needle in text
    for png in tmp_path.glob("*.png"):
        assert 1000 < png.stat().st_size < 200_000


# ----------------------------------------------------------------------------- the torch.compile baseline
# dynamo's "eager" backend keeps these cheap on a CPU: the graphs are traced, not compiled by Inductor.


class RepeatTimer:
    """Calls fn three times (warm-up and timed runs alike must hit the compiled graph); 1 ms."""

    def __call__(self, fn):
        for _ in range(3):
            fn()
        return Timing(1.0, 1.0, 1.0)


COMPILED_MODES = ("inference", "forward", "backward", "forward_backward")
# six shapes, two graphs each (inference, training): far past the limits the tests lower to 2
DISTINCT_POINTS = [_point("NCHW", "fp32", (n, 3, 2, 2)) for n in range(2, 8)]


def _recording_compile(made: list, reset: bool):
    """The sweep's own default_compile (reset per point), or one dynamo cache for the whole sweep."""
    def compile_fn(fn):
        made.append(bench.default_compile(fn, backend="eager") if reset else
                    bench.CompiledBaseline(fn, backend="eager", reset=False))
        return made[-1]

    return compile_fn


def _compiled_rows(rows):
    return [r for r in rows if r.provider == "torch.compile"]


@pytest.mark.parametrize("reset", [True, False], ids=["reset-per-point", "one-cache-raised-limits"])
def test_compiled_provider_stays_compiled_past_dynamo_limits(reset):
    import torch._dynamo.config as dynamo_config

    made: list = []
    with dynamo_config.patch(recompile_limit=2, accumulated_recompile_limit=2):
        rows = bench.time_sweep(DISTINCT_POINTS, "cpu", RepeatTimer(), compile_fn=_recording_compile(made, reset),
                                providers=("torch.compile",), modes=COMPILED_MODES, progress=False)
        assert dynamo_config.accumulated_recompile_limit == 2  # the sweep's raised limits were scoped
    compiled = _compiled_rows(rows)
    assert len(compiled) == len(DISTINCT_POINTS) * len(COMPILED_MODES)
    assert [r.note for r in compiled if r.note] == []
    assert all(r.ms == 1.0 for r in compiled)
    assert [b.graphs for b in made] == [2] * len(DISTINCT_POINTS)  # inference + training, per point
    # three timed calls of each mode but backward (whose graph ran once, building y) and the final check
    assert all(b.graph_calls >= 3 * 3 + 1 for b in made)


@contextlib.contextmanager
def _limits_of_one():
    import torch._dynamo.config as dynamo_config

    with dynamo_config.patch(recompile_limit=1, accumulated_recompile_limit=1):
        yield


@pytest.mark.parametrize("fallback, expected", [
    (lambda: torch.compiler.set_stance("force_eager"), "EagerFallback"),
    (_limits_of_one, "FailOnRecompileLimitHit"),
], ids=["force-eager-stance", "recompile-limit-hit"])
def test_an_eager_fallback_is_a_failed_row_not_a_time(fallback, expected):
    made: list = []
    rows = []
    with fallback():  # time_point, unlike time_sweep, leaves dynamo's limits as they are
        for point in DISTINCT_POINTS[:2]:
            rows += bench.time_point(point, torch.device("cpu"), RepeatTimer(), _recording_compile(made, False),
                                     providers=("torch.compile",), modes=COMPILED_MODES)
    compiled = _compiled_rows(rows)
    flagged = [r for r in compiled if r.note.startswith("failed")]
    assert flagged and all(expected in r.note for r in flagged)
    assert all(math.isnan(r.ms) for r in flagged)
    assert all(r.ms == 1.0 for r in compiled if not r.note)  # a time only where a graph ran


def test_compile_limits_raise_every_knob_and_restore():
    import torch._dynamo.config as dynamo_config

    knobs = [k for k in bench.COMPILE_LIMIT_KNOBS if hasattr(dynamo_config, k)]
    assert "accumulated_recompile_limit" in knobs
    before = {k: getattr(dynamo_config, k) for k in knobs}
    with bench.compile_limits():
        assert all(getattr(dynamo_config, k) >= bench.COMPILE_LIMIT for k in knobs)
        assert dynamo_config.fail_on_recompile_limit_hit
    assert {k: getattr(dynamo_config, k) for k in knobs} == before


# ----------------------------------------------------------------------------- the command


def _args(*argv):
    return build_parser().parse_args(["bench", *argv])


def test_subcommands_are_registered():
    assert _args("--quick").quick
    assert build_parser().parse_args(["traffic"]).op == "all"


@pytest.mark.parametrize("argv, message", [
    (["--dtypes", "fp8"], "--dtypes"),
    (["--layouts", "diagonal"], "--layouts"),
    (["--fusions", "none,gelu"], "--fusions: unknown gelu"),
    (["--device", "mps"], "only cuda and cpu"),
])
def test_bad_arguments_exit_2(argv, message, capsys, tmp_path):
    assert main(["bench", "--out", str(tmp_path), *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_cuda_without_a_gpu_exits_2(capsys):
    assert main(["bench", "--device", "cuda"]) == 2
    assert "no CUDA device" in capsys.readouterr().err


def test_run_with_injected_timer_takes_the_timed_path(tmp_path, capsys):
    args = _args("--device", "cpu", "--families", "mlp", "--dtypes", "fp32", "--modes", "inference,backward",
                 "--out", str(tmp_path), "--no-progress", "--no-sass")
    assert bench.run(args, timer=StubTimer(), compile_fn=lambda fn: fn) == 0
    text = (tmp_path / "report.md").read_text()
    assert "--families mlp" in text and "measured" in text
    assert "x torch" in capsys.readouterr().out


def test_cpu_run_counts_and_models(tmp_path, capsys):
    assert main(["bench", "--quick", "--device", "cpu", "--families", "mlp,transformer", "--dtypes", "bf16",
                 "--out", str(tmp_path), "--no-progress", "--no-cpu-timings"]) == 0
    with open(tmp_path / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    kinds = {(r["provider"], r["kind"]) for r in table}
    assert kinds == {("tritonbn", "counted"), ("torch", "modelled")}
    assert {r["fusion"] for r in table} == set(bench.DEFAULT_FUSIONS)
    assert all(r["ms"] == "" for r in table)  # nothing is a time
    for r in table:
        if r["provider"] == "tritonbn":
            assert float(r["bytes_per_s"]) >= sweeps.FUSED_MIN_PASSES[r["fusion"]][r["mode"]]
            assert int(r["launches"]) == len(r["programs_per_launch"].split("/"))
        else:
            assert float(r["bytes_per_s"]) == sweeps.TORCH_CHAIN_PASSES[r["fusion"]][r["mode"]]
    text = (tmp_path / "report.md").read_text()
    assert "counted" in text and "modelled" in text and "nothing here is a time" in text
    assert "(forward.png)" in text and not (tmp_path / "speedup.png").exists()
    for fusion in ("relu", "add_relu"):
        assert f"## Fused: {sweeps.FUSION_TITLES[fusion]}" in text and f"](fused_{fusion}.png)" in text
        assert 1000 < (tmp_path / f"fused_{fusion}.png").stat().st_size < 200_000
    assert "torch's unfused chain** | any | any | (modelled) | 7 S | 8 S | 8 S | 16 S |" in text
    assert "counted (tritonbn" in capsys.readouterr().out
    # the compiled-code facts of every tritonbn row: sm_90's SASS, read against H200's specified peak
    for r in table:
        if r["provider"] == "tritonbn":
            assert r["binding_kernel"] in r["kernels"].split("/"), r
            assert float(r["inst_per_element"]) > 0 and float(r["issue_ceiling_tbs"]) > 0
            assert 0 < float(r["active_lanes"]) <= 1
            assert r["binds"] == ("instructions" if float(r["issue_ceiling_tbs"]) < 4.8 else "bytes")
        else:
            assert r["binds"] == "" and r["binding_kernel"] == ""
    assert "## Compiled code (sm_90)" in text and "4.80 TB/s (specified peak)" in text


# Each fused chain's counted traffic stays below torch's modelled unfused chain in every mode,
# and the fused op keeps one launch inference and forward_backward at most 3 (8x2048 bf16 rows).
@pytest.mark.parametrize("fusion", ["relu", "add", "add_relu"])
def test_fused_counted_rows_beat_the_modelled_chain(fusion):
    rows = bench.count_sweep([_point("NCHW", "bf16", (64, 16))], progress=False, fusions=(fusion,))
    counted = {r.mode: r for r in rows if r.provider == "tritonbn"}
    modelled = {r.mode: r for r in rows if r.provider == "torch"}
    assert set(counted) == set(modelled) == set(sweeps.MODES)
    assert {r.fusion for r in rows} == {fusion}
    for mode, row in counted.items():
        assert sweeps.FUSED_MIN_PASSES[fusion][mode] <= row.bytes_per_s < modelled[mode].bytes_per_s, mode
        assert row.min_bytes_per_s == sweeps.FUSED_MIN_PASSES[fusion][mode]
    assert counted["inference"].launches == 1 and counted["forward_backward"].launches <= 3


def test_scripts_bench_runs_the_quick_sweep():
    script = (REPO / "scripts" / "bench").read_text()
    assert "-m tritonbn bench --quick" in script and '"$@"' in script


# ----------------------------------------------------------------------------- CPU timings (the torch path)


class StubCpuTimer:
    """Calls every provider once (so both really run, on the torch path: it records the trace,
    TRITON_INTERPRET and the thread count it ran under) and returns fixed times: tritonbn 1 ms,
    torch 2 ms."""

    def __init__(self):
        self.seen: list[dict] = []

    def __call__(self, fns):
        import os

        import tritonbn

        with tritonbn.trace.capture() as trace:
            for fn in fns.values():
                fn()
        self.seen.append({"providers": sorted(fns), "paths": set(trace.paths), "threads": torch.get_num_threads(),
                          "interpret": os.environ.get("TRITON_INTERPRET")})
        return {"tritonbn": Timing(1.0, 0.9, 1.1), "torch": Timing(2.0, 1.8, 2.2)}


def test_cpu_time_sweep_rows_on_the_torch_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # as a CPU bench run has it: the timing switches it off
    threads = torch.get_num_threads()
    points = [_point("NCHW", "fp32", (4, 3, 2, 2)), _point("axis=-1", "bf16", (4, 3, 2, 2))]
    stub = StubCpuTimer()
    rows = bench.cpu_time_sweep(points, bench.CPU_MODES, stub, threads=2, progress=False)
    assert len(rows) == 2 * len(points) * len(bench.CPU_MODES)
    assert {r.kind for r in rows} == {bench.CPU_MEASURED}
    assert {r.provider for r in rows} == set(bench.CPU_PROVIDERS.values())
    for row in rows:
        ours = row.provider == bench.CPU_PROVIDERS["tritonbn"]
        assert row.ms == (1.0 if ours else 2.0) and row.speedup_vs_torch == (2.0 if ours else 1.0)
        point = next(p for p in points if p.layout == row.layout)
        assert row.gbps == pytest.approx(sweeps.MIN_PASSES[row.mode] * point.data_bytes / (row.ms * 1e6))
        assert row.note.startswith("CPU timing, 2 threads")
        if not ours and row.layout == "axis=-1":
            assert "movedim" in row.note
    assert all(s["providers"] == ["torch", "tritonbn"] and s["paths"] == {"reference"} for s in stub.seen)
    assert all(s["threads"] == 2 and s["interpret"] == "0" for s in stub.seen)
    assert torch.get_num_threads() == threads and os.environ["TRITON_INTERPRET"] == "1"  # both restored


def test_interleaved_timer_alternates_and_takes_medians(monkeypatch):
    import time

    clock = {"now": 0.0}
    calls: list[str] = []
    monkeypatch.setattr(time, "perf_counter", lambda: clock["now"])

    def provider(name, seconds):
        def call():
            calls.append(name)
            clock["now"] += seconds
        return call

    timings = bench.interleaved_timer({"a": provider("a", 1e-3), "b": provider("b", 3e-3)}, repeats=4, warmup=1)
    assert calls == ["a", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]  # warm-up, then alternating order
    assert timings["a"].median == pytest.approx(1.0) and timings["b"].median == pytest.approx(3.0)


def test_cpu_run_writes_cpu_timings(tmp_path, capsys):
    args = _args("--device", "cpu", "--families", "mlp", "--dtypes", "fp32", "--modes", "inference",
                 "--out", str(tmp_path), "--no-progress", "--no-sass")
    assert bench.run(args, cpu_timer=StubCpuTimer()) == 0
    with open(tmp_path / "results.csv") as handle:
        table = list(csv.DictReader(handle))
    kinds = {(r["provider"], r["kind"]) for r in table}
    assert kinds == {("tritonbn", "counted"), ("torch", "modelled"), ("tritonbn (CPU)", "cpu-measured"),
                     ("torch (CPU)", "cpu-measured")}
    timed = [r for r in table if r["kind"] == "cpu-measured"]
    assert {r["shape"] for r in timed} == {"256x1024"} and {r["mode"] for r in timed} == {"inference"}
    text = (tmp_path / "report.md").read_text()
    assert "## CPU timings" in text and "(cpu_timings.png)" in text and "1.000 / 2.000 (0.50×)" in text
    assert "counted" in text  # the counted sections are still there
    assert (tmp_path / "cpu_timings.png").stat().st_size > 1000
    assert "CPU timings (the torch path" in capsys.readouterr().out


def test_cpu_speed_prints_the_ratio_table(capsys):
    args = build_parser().parse_args(["cpu-speed", "--families", "mlp", "--dtypes", "fp32,bf16",
                                      "--modes", "inference,forward"])
    from tritonbn.perf import cpu_speed

    assert cpu_speed.run(args, timer=StubCpuTimer()) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if line.startswith("256x1024")]
    assert len(rows) == 4 and all(" 0.50 " in line for line in rows)  # 1 ms / 2 ms
    assert "reproduce: tritonbn cpu-speed --threads 2 --repeats 9 --warmup 2 --dtypes fp32,bf16" in text
    assert "targets met: 4 of 4" in text


def test_cpu_speed_bad_selection_exits_2(capsys):
    from tritonbn.perf import cpu_speed

    assert cpu_speed.run(build_parser().parse_args(["cpu-speed", "--layouts", "diagonal"])) == 2
    assert "--layouts" in capsys.readouterr().err
