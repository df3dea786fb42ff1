"""``tritonbn gpu-check`` on a CPU: its options, the dry run, the no-GPU exit, the time-boxing
of a stage, the stages' verdicts and the summary files (stub stages and runners: no real
pytest, bench or tune runs here)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch

from tritonbn.cli import build_parser, main
from tritonbn.perf import gpu_check
from tritonbn.perf.gpu_check import FAILED, PASSED, TIMED_OUT, Stage, StageResult, Verdict

REPO = Path(__file__).resolve().parents[1]
MARGIN_S = 30  # what the default budgets leave of the 8 minutes for Python start-up and the summary


def _args(*argv: str):
    return build_parser().parse_args(["gpu-check", *argv])


def _exit_code(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as exc:  # argparse's own errors
        return int(exc.code)


def _never_run(stage, log_path):
    raise AssertionError(f"stage {stage.name} must not run")


@pytest.fixture
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def stub_gpu(monkeypatch):
    monkeypatch.setattr(gpu_check, "_gpu_name", lambda: "Stub H200")


# ----------------------------------------------------------------------------- options


@pytest.mark.parametrize("argv, expected", [
    ([], dict(dry_run=False, out=None, stages=None, budget_scale=1.0, budget=[])),
    (["--dry-run"], dict(dry_run=True)),
    (["--out", "/tmp/x"], dict(out=Path("/tmp/x"))),
    (["--stages", "bench,tune"], dict(stages="bench,tune")),
    (["--budget-scale", "1.5"], dict(budget_scale=1.5)),
    (["--budget", "bench=120", "--budget", "tune=60"], dict(budget=[("bench", 120.0), ("tune", 60.0)])),
], ids=["defaults", "dry-run", "out", "stages", "scale", "per-stage-budgets"])
def test_arguments(argv, expected):
    args = _args(*argv)
    assert {k: getattr(args, k) for k in expected} == expected


@pytest.mark.parametrize("argv, message", [
    (["--budget", "bench=soon"], "STAGE=SECONDS"),
    (["--budget", "bench"], "STAGE=SECONDS"),
    (["--budget", "warmup=10"], "unknown stage warmup"),
    (["--stages", "cuda-tests,lint"], "unknown stage lint"),
    (["--budget-scale", "0"], "positive"),
    (["--budget", "tune=-5"], "positive"),
], ids=["not-a-number", "no-seconds", "unknown-budget-stage", "unknown-stage", "zero-scale", "negative-budget"])
def test_bad_arguments_exit_2(argv, message, capsys, no_gpu):
    assert _exit_code(["gpu-check", "--dry-run", *argv]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("scale, overrides, only, expected", [
    (1.0, {}, None, {"cuda-tests": 230, "bench": 140, "tune": 80}),
    (2.0, {}, None, {"cuda-tests": 460, "bench": 280, "tune": 160}),
    (0.5, {"tune": 100}, None, {"cuda-tests": 115, "bench": 70, "tune": 100}),
    (1.0, {}, ["tune", "bench"], {"bench": 140, "tune": 80}),  # the stages' own order
], ids=["defaults", "scaled", "scaled-then-overridden", "subset"])
def test_budgets(scale, overrides, only, expected):
    stages = gpu_check.with_budgets(gpu_check.default_stages("python3", REPO / "out"), scale, overrides, only)
    assert {s.name: s.budget_s for s in stages} == expected
    assert list({s.name: 0 for s in stages}) == list(expected)


def test_default_budgets_fit_the_time_limit_with_a_margin():
    total = sum(s.budget_s for s in gpu_check.default_stages("python3", REPO / "out"))
    assert total + MARGIN_S <= gpu_check.TIME_LIMIT_S == 8 * 60


# ----------------------------------------------------------------------------- dry run, no GPU


def test_dry_run_prints_stages_commands_and_budgets(capsys, no_gpu, tmp_path):
    assert gpu_check.run(_args("--dry-run", "--out", str(tmp_path)), runner=_never_run) == 0
    out = capsys.readouterr().out
    for needle in ("cuda-tests    230 s", "bench         140 s", "tune           80 s", "450 s of budget",
                   "TRITONBN_TEST_DEVICE=cuda", "-m pytest -q -p no:cacheprovider tests/test_cuda.py "
                   "tests/test_batch_norm.py tests/test_mxnet_conformance.py",
                   "bench --quick --families resnet50 --dtypes bf16 --layouts NCHW,channels_last",
                   f"--out {tmp_path}", "tune --quick --top 3", f"--out {tmp_path}/tune", "nothing was run"):
        assert needle in out
    assert not any(tmp_path.iterdir())  # nothing written either


def test_default_results_dir_is_the_benchs(stub_gpu, capsys):
    assert gpu_check.run(_args("--dry-run"), runner=_never_run) == 0
    assert "perf/results/stub-h200/" in capsys.readouterr().out


def test_without_a_gpu_nothing_runs_and_it_exits_2(capsys, no_gpu, tmp_path):
    assert gpu_check.run(_args("--out", str(tmp_path)), runner=_never_run) == 2
    assert "no GPU is present" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


# ----------------------------------------------------------------------------- time-boxing


def _python(code: str) -> tuple[str, ...]:
    return (sys.executable, "-c", code)


def _alive(pid: int) -> bool:
    """A process that exists and is not a zombie (reaped or not, a zombie has ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc")
def test_a_stage_past_its_budget_is_killed_and_the_next_one_runs(tmp_path):
    pids = tmp_path / "pids"
    # the stage and a child of its own: the timeout must end both (the whole process group)
    sleeper = _python("import subprocess, sys, time, os; "
                      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
                      f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{child.pid}}'); print('started', flush=True); "
                      "time.sleep(60)")
    stages = [Stage("sleeper", sleeper, 1), Stage("next", _python("print('ok')"), 30)]
    lines: list[str] = []
    results = gpu_check.run_stages(stages, tmp_path, echo=lines.append)
    slow, nxt = results
    assert (slow.status, slow.message, slow.returncode) == (TIMED_OUT, "timed out after 1 s", None)
    assert 1 <= slow.seconds < 15
    assert not any(_alive(int(pid)) for pid in pids.read_text().split())
    assert (nxt.status, nxt.returncode) == (PASSED, 0)
    assert Path(nxt.log).read_text() == "ok\n" and "started" in Path(slow.log).read_text()
    assert any(line.startswith("== sleeper: timed out after 1 s") for line in lines)


@pytest.mark.parametrize("stage, status, message", [
    (Stage("exit-3", _python("raise SystemExit(3)"), 30), FAILED, "exit status 3"),
    (Stage("missing", ("/nonexistent/python",), 30), gpu_check.ERROR, "could not start"),
    (Stage("env", _python("import os, sys; sys.exit(os.environ.get('TRITON_INTERPRET') is not None "
                          "or os.environ['STAGE_VAR'] != 'x')"), 30, env={"STAGE_VAR": "x"}), PASSED, ""),
], ids=["non-zero-exit", "cannot-start", "env-set-and-interpreter-off"])
def test_stage_outcomes(stage, status, message, tmp_path, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    result = gpu_check.run_stage(stage, tmp_path / "log")
    assert result.status == status and message in result.message


# ----------------------------------------------------------------------------- verdicts


@pytest.mark.parametrize("text, counts", [
    ("....\n812 passed, 2 skipped in 201.35s (0:03:21)\n", {"passed": 812, "skipped": 2}),
    ("FAILED tests/x.py::t\n3 failed, 10 passed, 1 warning in 4.0s\n", {"failed": 3, "passed": 10, "warnings": 1}),
    ("===== 1 error in 0.50s =====\n", {"errors": 1}),
    ("collected 0 items\n\nno tests ran in 0.01s\n", {}),
    ("....  [ 40%]\n", {}),
], ids=["passes", "failures-and-warning", "collection-error", "no-tests", "killed-mid-run"])
def test_pytest_counts_from_the_closing_line(text, counts):
    assert gpu_check.parse_pytest_counts(text) == counts


def _write_bench(out: Path, notes: list[str]) -> None:
    header = "provider,kind,mode,case,layout,note\n"
    lines = [f"torch.compile,measured,forward,R50 N32 64@56,NCHW,{note}" for note in notes]
    (out / "results.csv").write_text(header + "\n".join(lines) + "\n")


def _write_store(out: Path, modelled: bool) -> None:
    (out / "tune").mkdir()
    (out / "tune" / "h200.json").write_text(json.dumps({"schema": 1, "modelled": modelled,
                                                        "timing": "modelled" if modelled else "measured"}))


@pytest.mark.parametrize("check, setup, ok, summary", [
    (gpu_check.check_bench, lambda out: _write_bench(out, ["", ""]), True, "2 measured rows, 0 failed"),
    (gpu_check.check_bench, lambda out: _write_bench(out, ["", "failed: EagerFallback: eager"]), False, "1 failed"),
    (gpu_check.check_bench, lambda out: None, False, "no results.csv"),
    (gpu_check.check_tune, lambda out: _write_store(out, modelled=False), True, "tune/h200.json (measured)"),
    (gpu_check.check_tune, lambda out: _write_store(out, modelled=True), False, "(modelled)"),
    (gpu_check.check_tune, lambda out: None, False, "no store"),
], ids=["bench-ok", "bench-failed-row", "bench-no-csv", "tune-measured", "tune-modelled", "tune-no-store"])
def test_stage_verdicts(check, setup, ok, summary, tmp_path):
    setup(tmp_path)
    verdict = check(tmp_path, "")
    assert verdict.ok == ok and summary in verdict.summary


# ----------------------------------------------------------------------------- the summary


def _stub_stages(outcomes: dict[str, str]) -> list[Stage]:
    def check(out: Path, log_text: str) -> Verdict:
        return Verdict("bad" not in log_text, log_text.strip(), {"log": log_text.strip()})

    return [Stage(name, ("stub", name), 10 * (i + 1), f"stub {name}", check=check) for i, name in enumerate(outcomes)]


def _stub_runner(outcomes: dict[str, str]):
    """Writes each stage's log and reports the status named in ``outcomes`` (``exit0-bad``: a
    clean exit whose check fails)."""
    def runner(stage: Stage, log_path: Path) -> StageResult:
        outcome = outcomes[stage.name]
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("bad output\n" if outcome == "exit0-bad" else "3 passed in 1.0s\n")
        status = PASSED if outcome in (PASSED, "exit0-bad") else outcome
        message = f"timed out after {stage.budget_s:.0f} s" if status == TIMED_OUT else ""
        return StageResult(stage.name, status, 1.5, stage.budget_s, 0 if status == PASSED else None, stage.shell(),
                           str(log_path), message)

    return runner


@pytest.mark.parametrize("outcomes, code, statuses", [
    ({"cuda-tests": PASSED, "bench": PASSED, "tune": PASSED}, 0, [PASSED] * 3),
    ({"cuda-tests": FAILED, "bench": PASSED, "tune": PASSED}, 1, [FAILED, PASSED, PASSED]),
    ({"cuda-tests": PASSED, "bench": TIMED_OUT, "tune": PASSED}, 1, [PASSED, TIMED_OUT, PASSED]),
    ({"cuda-tests": PASSED, "bench": PASSED, "tune": "exit0-bad"}, 1, [PASSED, PASSED, FAILED]),
], ids=["all-pass", "tests-fail", "bench-times-out", "tune-exit-0-but-check-fails"])
def test_summary_files_and_exit_code(outcomes, code, statuses, tmp_path, stub_gpu, capsys):
    args = _args("--out", str(tmp_path))
    assert gpu_check.run(args, stages=_stub_stages(outcomes), runner=_stub_runner(outcomes)) == code
    document = json.loads((tmp_path / "gpu-check.json").read_text())
    assert document["passed"] == (code == 0) and document["device"] == "Stub H200"
    assert [s["status"] for s in document["stages"]] == statuses
    assert [s["budget_s"] for s in document["stages"]] == [10, 20, 30]
    assert document["total_s"] == 4.5 and document["budget_s"] == 60
    assert all(s["log"].startswith(str(tmp_path / "logs")) for s in document["stages"])
    markdown = (tmp_path / "gpu-check.md").read_text()
    assert ("passed" if code == 0 else "FAILED") in markdown.splitlines()[0]
    assert "| cuda-tests | " in markdown and "Total 4.5 s of a 60 s budget" in markdown
    if TIMED_OUT in statuses:
        assert "| bench | timed out after 20 s | 1.5 | 20 |" in markdown
    printed = capsys.readouterr().out
    assert "gpu-check.json" in printed and "| tune |" in printed


def test_real_stages_report_test_counts(tmp_path, stub_gpu):
    stages = gpu_check.with_budgets(gpu_check.default_stages("python3", tmp_path), only=["cuda-tests"])
    runner = _stub_runner({"cuda-tests": PASSED})
    assert gpu_check.run(_args("--out", str(tmp_path), "--stages", "cuda-tests"), stages=stages, runner=runner) == 0
    stage = json.loads((tmp_path / "gpu-check.json").read_text())["stages"][0]
    assert stage["details"] == {"counts": {"passed": 3}} and stage["summary"] == "3 passed"


# ----------------------------------------------------------------------------- the script


def test_scripts_gpu_check_runs_the_subcommand_with_setups_python():
    script = REPO / "scripts" / "gpu-check"
    assert os.access(script, os.X_OK)
    text = script.read_text()
    assert 'py="$("$root/scripts/setup.sh")"' in text and '-m tritonbn gpu-check "$@"' in text
