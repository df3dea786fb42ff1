"""Autotuning (GitHub issue 4): the config store, its lookup, the tuner and its report.

Everything runs on CPU: lookups and decisions are plain Python; launches are checked through
``tritonbn.trace`` on the interpreted kernels; the tuner runs with the model-based timer (dry
runs on ``meta`` tensors) or with a stub bench that runs the op (the measured pipeline).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import tritonbn
from tritonbn.autotune import config as C
from tritonbn.autotune import online, space, store, tuner
from tritonbn.autotune.config import (
    H100_PROFILE,
    PERSISTENT_OFF,
    DeviceProfile,
    KernelConfig,
    override_configs,
    reduce_config,
)
from tritonbn.autotune.model import GPUS
from tritonbn.autotune.store import Knobs
from tritonbn.plan import plan_view


@pytest.fixture(autouse=True)
def isolated_stores(tmp_path, monkeypatch):
    """Every test starts with an empty user store and cache and the on-line tuner off."""
    config_dir = tmp_path / "configs"
    config_dir.mkdir()
    monkeypatch.setenv(store.CONFIG_DIR_ENV, str(config_dir))
    monkeypatch.setenv(store.CACHE_DIR_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(store.AUTOTUNE_ENV, raising=False)
    C.clear_caches()
    online.configure()
    yield config_dir
    C.clear_caches()
    online.configure()


def _entry(dtype, family, op, role, channels, m, config):
    return dict(dtype=dtype, family=family, op=op, role=role, channels=channels, m=m, config=config)


def _write(config_dir, entries, gpu="h100-sxm", timing="measured", **meta):
    """A store file; measured unless told otherwise (only measured stores steer launches)."""
    path = config_dir / f"{gpu}.json"
    stamp = {} if timing is None else {"timing": timing, "modelled": timing == "modelled"}
    store.save_store(path, store.store_document(gpu, entries, {**stamp, **meta}))
    return path


def _contiguous(shape):
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _plan(shape, axis=1, tensors=2):
    return plan_view(shape, axis, [_contiguous(shape)] * tensors)


def _params(channels):
    return (torch.rand(channels) + 0.5, torch.randn(channels), torch.zeros(channels), torch.ones(channels))


# ----------------------------------------------------------------------------- the store


def test_store_round_trips(tmp_path):
    knobs = Knobs(tile=2048, split=6, num_warps=8)
    entries = [_entry("float16", "channel_major", "forward", "reduce", 64, 100352, knobs.to_json()),
               _entry("float16", "channel_major", "forward", "persistent", 64, 100352, {"enabled": False}),
               _entry("bfloat16", "channel_minor", "inference", "elementwise", 256, 6272,
                      Knobs(tile=4096, block_c=32, num_warps=4).to_json())]
    path = _write(tmp_path, entries)
    data = json.loads(path.read_text())
    assert data["schema"] == store.SCHEMA and data["timing"] == "measured" and data["modelled"] is False
    assert "C64_m131072" in data["configs"]["float16"]["channel_major"]["forward"]["reduce"]
    loaded = store.load_store(path)
    assert len(loaded) == 3
    found = loaded.lookup("float16", "channel_major", "forward", "reduce", 64, 100352)
    assert found.knobs == knobs and (found.c_bucket, found.m_bucket) == (64, 131072)
    assert loaded.lookup("float16", "channel_major", "forward", "persistent", 64, 100352).knobs.enabled is False
    # writing what was read gives the same document
    again = tmp_path / "again" / "h100-sxm.json"
    store.save_store(again, data)
    assert json.loads(again.read_text()) == data


def test_store_rejects_other_schemas_and_bad_entries(tmp_path):
    with pytest.raises(ValueError, match="schema"):
        store.parse_store({"schema": 2, "configs": {}})
    bad = store.store_document("h100-sxm", [_entry("float16", "channel_major", "forward", "reduce", 64, 4096,
                                                   {"tile": -1})], {})
    with pytest.raises(ValueError, match="tile"):
        store.save_store(tmp_path / "x.json", bad)
    with pytest.raises(ValueError, match="role"):
        store.parse_store({"schema": 1, "configs": {"float16": {"channel_major": {"forward": {"apply": {}}}}}})
    with pytest.raises(ValueError, match="unknown knobs"):  # no space varies the stages: not a knob
        Knobs.from_json({"tile": 1024, "num_stages": 2})
    with pytest.raises(ValueError, match="timing"):
        store.parse_store({"schema": 1, "timing": "guessed", "configs": {}})
    with pytest.raises(ValueError, match="contradicts"):
        store.parse_store({"schema": 1, "timing": "measured", "modelled": True, "configs": {}})


def test_a_broken_store_file_is_ignored(isolated_stores):
    (isolated_stores / "h100-sxm.json").write_text("{not json")
    plan = _plan((32, 64, 3136))
    assert reduce_config(plan, H100_PROFILE) == C.explain("reduce", plan, H100_PROFILE).config
    assert C.explain("reduce", plan, H100_PROFILE).source == "heuristic"


@pytest.mark.parametrize("n, expected", [(1, 1), (3, 4), (90, 64), (91, 128), (100352, 131072), (6272, 8192)])
def test_buckets_round_in_log2(n, expected):
    assert store.bucket(n) == expected


@pytest.mark.parametrize("name, model", [
    ("NVIDIA H100 80GB HBM3", "h100-sxm"), ("NVIDIA H100 PCIe", "h100-pcie"), ("NVIDIA H200", "h200"),
    ("NVIDIA A100-SXM4-80GB", "a100-sxm"), (H100_PROFILE.name, "h100-sxm"), ("Some GPU 9000", "some-gpu-9000")])
def test_gpu_model_from_the_device_name(name, model):
    assert store.gpu_model(name) == model


def test_nearest_bucket_lookup(tmp_path):
    near = Knobs(tile=1024, split=4, num_warps=4)
    far = Knobs(tile=8192, split=2, num_warps=16)
    path = _write(tmp_path, [
        _entry("float32", "channel_major", "forward", "reduce", 64, 4096, near.to_json()),
        _entry("float32", "channel_major", "forward", "reduce", 1024, 65536, far.to_json()),
        _entry("float16", "channel_major", "forward", "reduce", 80, 5000, Knobs(tile=512, split=1).to_json()),
    ])
    st = store.load_store(path)
    assert st.lookup("float32", "channel_major", "forward", "reduce", 80, 5000).knobs == near
    assert st.lookup("float32", "channel_major", "forward", "reduce", 700, 50000).knobs == far
    # |log2 C - log2 Cb| + |log2 m - log2 mb| = 1 + 1 picks the nearer of the two
    assert st.lookup("float32", "channel_major", "forward", "reduce", 128, 8192).knobs == near
    # beyond max_log2_distance (2) nothing matches: the heuristic decides
    assert st.lookup("float32", "channel_major", "forward", "reduce", 64, 1 << 20) is None
    assert st.lookup("float32", "channel_minor", "forward", "reduce", 64, 4096) is None
    assert st.lookup("float32", "channel_major", "backward", "reduce", 64, 4096) is None
    # an unknown dtype searches all, float32 first on ties
    assert st.lookup(None, "channel_major", "forward", "reduce", 64, 4096).dtype == "float32"


# ----------------------------------------------------------------------------- decisions


def _train_step(shape, axis=1, dtype=torch.float32):
    x = torch.randn(shape, dtype=dtype).requires_grad_(True)
    gamma, beta, mm, mv = _params(shape[axis])
    with tritonbn.trace.capture() as fwd:
        y = tritonbn.batch_norm(x, gamma, beta, mm, mv, axis=axis, training=True, fix_gamma=False)
    with tritonbn.trace.capture() as bwd:
        y.float().sum().backward()
    return fwd, bwd


def test_the_stored_config_reaches_the_launch(isolated_stores):
    shape = (4, 3, 1024)  # channel-major, C = 3, m = 4096
    reduce_fwd = Knobs(tile=128, split=3, num_warps=2)
    reduce_bwd = Knobs(tile=64, split=2, num_warps=1)
    apply_fwd = Knobs(tile=1024, num_warps=1)
    _write(isolated_stores, [
        _entry("float32", "channel_major", "forward", "persistent", 3, 4096, {"enabled": False}),
        _entry("float32", "channel_major", "forward", "reduce", 3, 4096, reduce_fwd.to_json()),
        _entry("float32", "channel_major", "backward", "persistent", 3, 4096, {"enabled": False}),
        _entry("float32", "channel_major", "backward", "reduce", 3, 4096, reduce_bwd.to_json()),
        _entry("float32", "channel_major", "forward", "elementwise", 3, 4096, apply_fwd.to_json()),
    ])
    fwd, bwd = _train_step(shape)
    assert fwd.kernels() == ["channel_major_stats", "channel_major_elementwise"]
    assert bwd.kernels() == ["channel_major_backward_reduce", "channel_major_elementwise"]
    fwd_plan, bwd_plan = _plan(shape), _plan(shape, tensors=3)
    expected_fwd = C.reduce_from_knobs(fwd_plan, reduce_fwd)
    with C.heuristic_only():
        assert expected_fwd != reduce_config(fwd_plan, H100_PROFILE)
    assert fwd.launches[0].config == expected_fwd == KernelConfig(1, 128, split_rows=3, split_cols=1, num_warps=2)
    assert fwd.launches[0].programs == 3 * 3
    assert bwd.launches[0].config == C.reduce_from_knobs(bwd_plan, reduce_bwd) == \
        KernelConfig(1, 64, split_rows=2, split_cols=1, num_warps=1)
    # the training forward's elementwise launch (apply) is looked up under its op, forward
    assert fwd.launches[1].config == C.elementwise_from_knobs(fwd_plan, apply_fwd) == KernelConfig(1, 1024, num_warps=1)
    decision = C.explain("reduce", fwd_plan, H100_PROFILE, dtype=torch.float32)
    assert decision.source == "store" and decision.entry.knobs == reduce_fwd


def test_the_store_can_turn_the_single_pass_path_off_or_set_its_warps(isolated_stores):
    shape = (2, 4, 64)
    _write(isolated_stores, [
        _entry("float32", "channel_major", "forward", "persistent", 4, 128, {"enabled": False}),
        _entry("float32", "channel_major", "backward", "persistent", 4, 128, {"num_warps": 2}),
    ])
    fwd, bwd = _train_step(shape)
    assert fwd.kernels()[0] == "channel_major_stats"
    assert bwd.kernels() == ["channel_major_persistent_backward"]
    assert bwd.launches[0].config == KernelConfig(2, 64, num_warps=2)


def test_overrides_take_precedence_over_the_store(isolated_stores):
    _write(isolated_stores, [_entry("float32", "channel_major", "forward", "reduce", 3, 384,
                                    Knobs(tile=128, split=3, num_warps=2).to_json())])
    forced = KernelConfig(2, 16, split_rows=2, split_cols=1, num_warps=1)
    with override_configs(reduce=forced, persistent=PERSISTENT_OFF):
        fwd, _ = _train_step((4, 3, 96))
    assert fwd.launches[0].config == forced


@pytest.mark.parametrize("role, knobs", [
    pytest.param("reduce", {"tile": 256, "split": 128, "num_warps": 2}, id="split-larger-than-useful"),
    pytest.param("reduce", {"tile": 300, "split": 1}, id="tile-not-a-power-of-two"),
    pytest.param("reduce", {"num_warps": 4}, id="reduce-without-tile"),
    pytest.param("elementwise", {"tile": 1024, "num_warps": 3}, id="warps-not-a-power-of-two"),
    pytest.param("persistent", {"num_warps": 1}, id="too-few-warps-for-the-slice"),
])
def test_an_invalid_stored_config_falls_back_to_the_heuristic(isolated_stores, role, knobs):
    plan = _plan((8, 2, 2048))  # m = 16384 per channel: a persistent forward slice at capacity
    op = "inference" if role == "elementwise" else "forward"
    _write(isolated_stores, [_entry("float32", "channel_major", op, role, 2, 16384, knobs)])
    decision = C.explain(role, plan, H100_PROFILE, element_size=4, op=op)
    assert decision.source == "heuristic"
    with C.heuristic_only():
        assert decision.config == C.explain(role, plan, H100_PROFILE, element_size=4, op=op).config


def test_persistent_enabled_by_the_store_beyond_capacity_stays_off(isolated_stores):
    plan = _plan((1, 2, 40000))
    _write(isolated_stores, [_entry("float32", "channel_major", "forward", "persistent", 2, 40000,
                                    {"num_warps": 16})])
    assert C.persistent_config(plan, "forward", H100_PROFILE, 4) is None


def test_a_heuristic_entry_gives_the_heuristic_and_blocks_farther_buckets(isolated_stores):
    plan = _plan((32, 64, 3136))
    _write(isolated_stores, [
        _entry("float32", "channel_major", "forward", "reduce", 64, 100352, {}),
        _entry("float32", "channel_major", "forward", "reduce", 64, 32768, {"tile": 512, "split": 2}),
    ])
    decision = C.explain("reduce", plan, H100_PROFILE, dtype="float32")
    assert decision.source == "store" and decision.note == "the heuristic's choice"
    with C.heuristic_only():
        assert decision.config == reduce_config(plan, H100_PROFILE)


def test_lookups_are_cached_per_call_signature(isolated_stores, monkeypatch):
    _write(isolated_stores, [_entry("float32", "channel_major", "forward", "reduce", 64, 100352,
                                    {"tile": 2048, "split": 4, "num_warps": 8})])
    calls = []
    real = store.stores_for
    monkeypatch.setattr(store, "stores_for", lambda *a: calls.append(a) or real(*a))
    plan = _plan((32, 64, 3136))
    first = reduce_config(plan, H100_PROFILE, dtype=torch.float32)
    for _ in range(100):
        assert reduce_config(plan, H100_PROFILE, dtype=torch.float32) is first
    assert len(calls) == 1


REPORT_STORE = Path(__file__).resolve().parents[1] / "perf" / "results" / "autotune" / "h100-sxm" / "h100-sxm.json"


def test_only_measured_stores_ship_and_off_the_gpu_the_heuristic_decides(monkeypatch):
    """No measured H100 store ships yet: off the GPU every decision is the heuristic's."""
    monkeypatch.delenv(store.CONFIG_DIR_ENV)
    C.clear_caches()
    shipped = store.store_paths("h100-sxm", None, False)
    assert all(store.load_store(p).measured for p in shipped)
    if not shipped:
        plan = _plan((32, 64, 3136))
        assert C.explain("reduce", plan, H100_PROFILE, dtype="float16").source == "heuristic"


def test_the_modelled_h100_sweep_is_a_report_not_a_source_of_decisions(isolated_stores, caplog):
    """The modelled store stays readable (its report is beside it) but steers nothing, even in
    the folder stores are loaded from; the same file stamped measured would steer."""
    modelled = store.load_store(REPORT_STORE)
    assert modelled.timing == "modelled" and modelled.meta["modelled"] is True and not modelled.measured
    assert len(modelled) > 100 and (REPORT_STORE.parent / "report.md").is_file()
    plan = _plan((256, 2048, 49))  # ResNet-50 N256 2048@7: the modelled sweep split its reduction 8 ways
    with C.heuristic_only():
        heuristic = reduce_config(plan, H100_PROFILE, dtype="float16")
    shutil.copy(REPORT_STORE, isolated_stores / "h100-sxm.json")
    C.clear_caches()
    with caplog.at_level(logging.WARNING, logger="tritonbn"):
        decision = C.explain("reduce", plan, H100_PROFILE, dtype="float16")
    assert decision.source == "heuristic" and decision.config == heuristic
    assert "not measured" in caplog.text
    stamped = json.loads(REPORT_STORE.read_text()) | {"timing": "measured", "modelled": False}
    store.save_store(isolated_stores / "h100-sxm.json", stamped)
    C.clear_caches()
    decision = C.explain("reduce", plan, H100_PROFILE, dtype="float16")
    assert decision.source == "store" and decision.config != heuristic


@pytest.mark.parametrize("timing", ["modelled", None])
def test_a_store_not_timed_on_a_gpu_is_ignored(isolated_stores, timing):
    plan = _plan((32, 64, 3136))
    _write(isolated_stores, [_entry("float32", "channel_major", "forward", "reduce", 64, 100352,
                                    {"tile": 512, "split": 2})], timing=timing)
    assert C.explain("reduce", plan, H100_PROFILE, dtype="float32").source == "heuristic"


def test_stores_of_different_timings_never_mix(tmp_path):
    measured = _write(tmp_path, [_entry("float32", "channel_major", "forward", "reduce", 64, 4096, {})])
    modelled = store.store_document("h100-sxm", [], {"timing": "modelled", "modelled": True})
    with pytest.raises(ValueError, match="cannot merge"):
        store.merge_documents(json.loads(measured.read_text()), modelled)
    from tritonbn.autotune.tune import run

    before = measured.read_text()
    for extra in ((), ("--merge",)):  # a modelled run neither replaces nor merges into a measured store
        args, argv = _tune_args(tmp_path / "out", shapes="8x32x16x16", dtypes="float16", timer="modelled",
                                **{"store-dir": str(tmp_path)})
        args.merge = bool(extra)
        assert run(args, argv=argv) == 2
    assert measured.read_text() == before


# ----------------------------------------------------------------------------- spaces and the model


def test_config_spaces_are_valid_deduplicated_and_hold_the_heuristic():
    for shape, axis in (((32, 64, 3136), 1), ((8192, 1024), 1), ((4, 32, 256), 1)):
        plan = _plan(shape, axis)
        for role in ("reduce", "elementwise", "persistent"):
            cands = space.candidates(role, plan, "forward", H100_PROFILE, 2)
            configs = [c.config for c in cands]
            assert len(configs) == len(set(configs))
            heuristic = space.heuristic_candidate(role, plan, "forward", H100_PROFILE, 2)
            if role == "persistent" and C.persistent_tile(plan, "forward", 2) is None:
                assert cands == []
                continue
            assert heuristic.config in configs
            if role == "reduce":
                assert all(c.config.splits <= C.max_useful_split(plan, c.knobs.tile, c.knobs.block_c or 64)
                           for c in cands)
            assert all(c.config is None or c.config.num_stages == 1 for c in cands)  # stages: not a knob


def test_modelled_data_bytes_match_the_interpreters_count():
    """The model's data-tensor bytes are what the kernels move: the traffic counter agrees, up to
    the pilot (each channel's first element, the shift of the statistics) that the statistics
    kernels re-read once or twice per program: L1/L2 hits on a GPU, not counted by the model.
    (A 4-SM profile keeps the split launches small enough for the interpreter.)"""
    traffic = pytest.importorskip("tritonbn.perf.traffic")
    small = DeviceProfile("tiny GPU (test)", sm_count=4, tile_elements=4096)
    spec, seen = GPUS["h100-sxm"], set()
    for shape, layout in (((2, 6, 10, 10), "contiguous"), ((2, 20, 6, 6), "channels_last"),
                          ((1, 3, 130, 130), "contiguous"), ((1, 4, 100, 100), "channels_last")):
        case = tuner.TuneCase(shape, "NCHW" if layout == "contiguous" else "channels_last", torch.float32)
        with C.override_profile(small):
            counted = traffic.measure("all", shape, layout, torch.float32, 1)
        for op in ("inference", "forward", "backward"):
            with C.override_profile(small):
                trial = tuner.ModelTimer(spec)(tuner.Workload(case, op, "meta"))
            modelled = sum(cost.data_bytes for cost in trial.costs)
            assert [c.kernel for c in trial.costs] == [launch.kernel for launch in counted[op].launches]
            seen.update(c.kernel for c in trial.costs)
            pilots = sum(2 * launch.programs * launch.config.block_cols * 4 for launch in trial.launches
                         if launch.name.endswith(("_stats", "_persistent_forward")))
            assert modelled <= counted[op].data_total <= modelled + pilots, (shape, op)
            if op != "forward":
                assert modelled == counted[op].data_total, (shape, op)
    assert {"channel_major_stats", "channel_minor_stats", "channel_minor_persistent_forward"} <= seen


# ----------------------------------------------------------------------------- the tuner


def test_tuning_restores_the_moving_statistics():
    """FlagGems' restore_value trap: trials run the training forward many times; every trial
    starts from the caller's moving statistics and tuning leaves them as they were."""
    case = tuner.TuneCase((2, 3, 40), "NCHW", torch.float32)
    work = tuner.Workload(case, "forward", "cpu")
    work.moving_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    work.moving_var.copy_(torch.tensor([1.5, 0.25, 3.0]))
    before = [t.clone() for t in work.moving_stats()]
    seen = []

    def bench(fn):
        assert all(torch.equal(t, b) for t, b in zip(work.moving_stats(), before)), "not restored between trials"
        for _ in range(3):
            fn()
        seen.append(not torch.equal(work.moving_mean, before[0]))
        return 1.0

    results, _ = tuner.tune_op(case, "forward", tuner.MeasuredTimer("cpu", bench), H100_PROFILE, workload=work)
    assert {r.role for r in results} == {"reduce", "elementwise", "persistent"}
    assert len(seen) > 3 and all(seen)  # the trials did update them...
    assert all(torch.equal(t, b) for t, b in zip(work.moving_stats(), before))  # ...and tuning put them back


def test_the_tuner_keeps_the_heuristic_unless_a_config_beats_it_by_the_margin():
    case = tuner.TuneCase((2, 3, 40), "NCHW", torch.float32)
    calls = []

    def bench(fn):
        with tritonbn.trace.capture() as t:
            fn()
        calls.append(t.launches)
        stats = [launch for launch in t.launches if launch.kernel.endswith("_stats")]
        return 1.0 if stats and stats[0].config.num_warps == 2 else 2.0

    results, summary = tuner.tune_op(case, "forward", tuner.MeasuredTimer("cpu", bench), H100_PROFILE,
                                     roles=["reduce"])
    (result,) = results
    assert result.chosen.config.num_warps == 2 and not result.is_default
    assert result.chosen_ms == 1.0 and result.default_ms == 2.0 and result.gain == 2.0
    assert result.store_entry()["config"] == result.chosen.knobs.to_json()
    slow, _ = tuner.tune_op(case, "forward", tuner.MeasuredTimer("cpu", lambda fn: (fn(), 1.0)[1]), H100_PROFILE,
                            roles=["reduce"])
    assert slow[0].is_default and slow[0].store_entry()["config"] == {}


def _tune_args(out, **kw):
    from tritonbn.autotune.tune import add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["--out", str(out), "--no-progress"] + [x for k, v in kw.items() for x in (f"--{k}", v)]
    return parser.parse_args(argv), argv


def test_the_cpu_pipeline_writes_a_modelled_store_report_and_plots(tmp_path, monkeypatch):
    from tritonbn.autotune.tune import run

    args, argv = _tune_args(tmp_path / "out", shapes="8x32x16x16", dtypes="float16")
    assert run(args, argv=argv) == 0
    out = tmp_path / "out"
    document = json.loads((out / "h100-sxm.json").read_text())
    assert document["schema"] == 1 and document["modelled"] is True and document["timing"] == "modelled"
    assert "model" in document and document["model"]["bandwidth_gb_s"] == 3000.0
    loaded = store.load_store(out / "h100-sxm.json")
    assert loaded.lookup("float16", "channel_major", "forward", "reduce", 32, 2048) is not None
    assert loaded.lookup("float16", "channel_major", "backward", "persistent", 32, 2048) is not None
    assert loaded.lookup("float16", "channel_minor", "inference", "elementwise", 32, 2048) is not None
    report = (out / "report.md").read_text()
    assert "(modelled)" in report and "modelled, not measured" in report
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "overview.png" in pngs and len(pngs) >= 5
    assert all((out / p).stat().st_size > 5_000 for p in pngs)
    assert (out / "trials.csv").read_text().splitlines()[1].startswith("modelled,")
    # the modelled store is the report's: pointed at, it steers nothing
    monkeypatch.setenv(store.CONFIG_DIR_ENV, str(out))
    C.clear_caches()
    assert C.explain("reduce", _plan((8, 32, 256)), H100_PROFILE, dtype="float16").source == "heuristic"


def test_the_measured_pipeline_runs_with_a_stub_bench(tmp_path):
    from tritonbn.autotune.tune import run

    args, argv = _tune_args(tmp_path / "m", shapes="2x8x4x4", dtypes="float32", layouts="NCHW", top="3",
                            ops="inference,forward")
    assert run(args, bench=lambda fn: (fn(), 1.0)[1], argv=argv) == 0
    document = json.loads((tmp_path / "m" / "h100-sxm.json").read_text())
    assert document["modelled"] is False and document["timing"] == "measured"
    assert "measured" in (tmp_path / "m" / "report.md").read_text()


# ----------------------------------------------------------------------------- on-line tuning


def test_online_tuning_tunes_unseen_keys_once_and_caches_them(isolated_stores, tmp_path, monkeypatch):
    gpu = DeviceProfile("NVIDIA H100 80GB HBM3", 132, 4096, on_gpu=True)
    plan = _plan((2, 3, 40))
    benched = []

    def bench(fn):
        with tritonbn.trace.capture() as t:
            fn()
        benched.append(1)
        stats = [launch for launch in t.launches if launch.kernel.endswith("_stats")]
        return 1.0 if stats and stats[0].config.num_warps == 2 else 2.0

    online.configure(bench=bench, device="cpu", top=None)
    heuristic = reduce_config(plan, gpu, op="forward", dtype=torch.float32)
    assert not benched  # off by default
    monkeypatch.setenv(store.AUTOTUNE_ENV, "1")
    tuned = reduce_config(plan, gpu, op="forward", dtype=torch.float32)
    assert benched and tuned.num_warps == 2 and tuned != heuristic
    count = len(benched)
    assert reduce_config(plan, gpu, op="forward", dtype=torch.float32) == tuned
    # the stub made the split path (reduce at 2 warps) faster than single-pass: the store says off
    assert C.persistent_config(plan, "forward", gpu, 4, dtype=torch.float32) is None
    assert len(benched) == count  # the whole op was tuned at once; nothing tuned again
    cache = tmp_path / "cache" / "h100-sxm.json"
    document = json.loads(cache.read_text())
    assert document["modelled"] is False and "on-line" in document["method"]
    C.clear_caches()  # a later process reads the cache
    decision = C.explain("reduce", plan, gpu, op="forward", dtype=torch.float32)
    assert decision.source == "store" and decision.config == tuned and len(benched) == count
    # the modelled off-GPU profile never tunes on-line
    assert C.explain("reduce", _plan((2, 512, 4096)), H100_PROFILE, dtype=torch.float32).source == "heuristic"
    assert len(benched) == count


def test_without_an_installed_tuner_autotune_on_gives_the_heuristic(isolated_stores, monkeypatch, caplog):
    """The on-line tuner is a hook (config.set_online_tuner) that importing online installs;
    TRITONBN_AUTOTUNE=1 alone does not import it."""
    gpu = DeviceProfile("NVIDIA H100 80GB HBM3", 132, 4096, on_gpu=True)
    assert C._online_tuner is online.tune_on_first_use
    monkeypatch.setenv(store.AUTOTUNE_ENV, "1")
    monkeypatch.setattr(C, "_warned_no_tuner", False)
    C.set_online_tuner(None)
    try:
        with caplog.at_level(logging.WARNING, logger="tritonbn"):
            decision = C.explain("reduce", _plan((2, 3, 40)), gpu, op="forward", dtype=torch.float32)
    finally:
        C.set_online_tuner(online.tune_on_first_use)
    assert decision.source == "heuristic" and "no on-line tuner is installed" in caplog.text


# Modules of the tools: the op (tritonbn, tritonbn.ops, tritonbn.nn) must import none of them.
TOOL_MODULES = ("tritonbn.autotune.tuner", "tritonbn.autotune.tune", "tritonbn.autotune.online",
                "tritonbn.autotune.model", "tritonbn.autotune.report", "tritonbn.autotune.space",
                "tritonbn.perf", "tritonbn.inspect", "tritonbn.cli")
_IMPORT_PROBE = """
import sys
import tritonbn, tritonbn.ops, tritonbn.nn
from tritonbn.autotune import config as C
from tritonbn.plan import plan_view
gpu = C.DeviceProfile("NVIDIA H100 80GB HBM3", 132, 4096, on_gpu=True)
C.explain("reduce", plan_view((2, 3, 40), 1, [(120, 40, 1)] * 2), gpu, op="forward", dtype="float32")
print(" ".join(sorted(m for m in sys.modules if m.startswith("tritonbn"))))
"""


def test_the_op_imports_none_of_its_tools(tmp_path):
    """In a fresh interpreter, with TRITONBN_AUTOTUNE=1 and a decision made on a GPU profile (where
    the on-line tuner used to be imported lazily): no tuner, tune, online, model, report, space,
    perf, inspect or cli module is loaded, so the graph ops -> config never closes a cycle."""
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRITONBN_")}
    env.update(TRITONBN_AUTOTUNE="1", TRITONBN_CONFIG_DIR=str(tmp_path), TRITONBN_CACHE_DIR=str(tmp_path))
    done = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.split()
    assert "tritonbn.ops" in loaded and "tritonbn.nn" in loaded
    assert [m for m in loaded if m.startswith(TOOL_MODULES)] == []


def test_cli_registers_tune():
    from tritonbn.cli import COMMANDS, build_parser

    assert COMMANDS["tune"][0] == "tritonbn.autotune.tune"
    args = build_parser().parse_args(["tune", "--quick", "--out", "x"])
    assert args.quick and str(args.out) == "x"


# (inner extent, channel-major elementwise columns): the widest power of two whose tiles keep 95%
# of their lanes busy (56 x 56 rows: 98% at 128 instead of 77% at 2048 or 4096), not below 32;
# odd extents no power of two divides keep the widest of the fullest.
NARROWED_COLUMNS = [(3136, 128), (784, 32), (196, 32), (49, 64), (65536, 2048), (1024, 1024), (7, 8)]


@pytest.mark.parametrize("inner, cols", NARROWED_COLUMNS, ids=[str(inner) for inner, _ in NARROWED_COLUMNS])
def test_channel_major_elementwise_tiles_keep_their_lanes_busy(inner, cols):
    """Elementwise tiles narrow their columns to the extent; reductions keep the widest columns
    (narrowed [16, 128] statistics tiles spilled on sm_80)."""
    plan = _plan((32, 4, inner))
    elementwise = C.realize_elementwise(plan, 2048)
    assert elementwise.block_cols == cols
    assert elementwise.block_rows == C._pow2_cover(32, 2048 // cols)
    assert C.realize_reduce(plan, 2048, 1).block_cols == C._pow2_cover(inner, 2048)
