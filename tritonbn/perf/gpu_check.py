"""``tritonbn gpu-check`` (``scripts/gpu-check``): the one command to run on a lent GPU machine.

Three stages, each a subprocess with a time budget.  A stage that runs out of it is killed
(its whole process group: pytest's and Inductor's workers too), reported as "timed out after
N s", and the next stage still runs:

- ``cuda-tests`` (230 s): ``TRITONBN_TEST_DEVICE=cuda pytest`` of the CUDA-path tests, with the
  counts of pytest's closing line;
- ``bench`` (140 s): ``tritonbn bench --quick --families resnet50 --dtypes bf16 --layouts
  NCHW,channels_last --fusions none --no-sass``: two full-size ResNet-50 cases, every mode and
  provider of BatchNorm alone, measured;
- ``tune`` (80 s): ``tritonbn tune --quick`` measured with ``do_bench`` (the model's best 3
  candidates per key and the heuristic's): the measured store ``tune/<gpu>.json``.

The budgets sum to 450 s: under 8 minutes from cold caches, with 30 s for starting Python and
writing the summary.  Everything goes to the bench's folder, ``perf/results/<gpu>/<date>/``
(``--out`` elsewhere): the bench's CSV, plots and report, ``tune/`` (store, report), ``logs/<stage>.log``
and the summary, ``gpu-check.json`` and ``gpu-check.md``.

Exit status: 0 when every stage passed, 1 when one did not, 2 without a CUDA GPU (nothing runs)
or on bad arguments.  ``--dry-run`` prints the stages, their commands and budgets (no GPU needed).
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, NamedTuple, Sequence

from . import ROOT, compiling_env

__all__ = ["Stage", "StageResult", "Verdict", "default_stages", "with_budgets", "parse_pytest_counts", "run_stage",
           "run_stages", "write_summary", "summary_markdown", "add_arguments", "run"]

PASSED, FAILED, TIMED_OUT, ERROR = "passed", "failed", "timed out", "error"
TIME_LIMIT_S = 480  # the whole check, from cold caches, on one GPU
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this
TAIL_LINES = 15  # of each stage's log, echoed after the stage
CUDA_TESTS = ("tests/test_cuda.py", "tests/test_batch_norm.py", "tests/test_mxnet_conformance.py")
# BatchNorm alone: each fused chain adds a torch.compile per point, which the 140 s stage has no room for
# --no-sass: the rows' compiled-code facts compile every launch again, which the stage's budget
# does not hold; perf/inspect/streaming.txt has those of the same ResNet-50 calls (N = 32)
BENCH_SUBSET = ("--quick", "--families", "resnet50", "--dtypes", "bf16", "--layouts", "NCHW,channels_last",
                "--fusions", "none", "--no-sass")
# A cold tune compiles every candidate it times: 3 per key (and the heuristic's) keeps --quick's
# keys inside the budget; short do_bench windows suffice for kernels of tens of microseconds.
TUNE_SUBSET = ("--quick", "--top", "3", "--warmup", "5", "--rep", "20")


class Verdict(NamedTuple):
    """What a stage left behind: whether it is good, one line for the summary, and the details."""

    ok: bool
    summary: str
    details: dict


@dataclass(frozen=True)
class Stage:
    """One time-boxed step: a command, its budget and how to judge what it left."""

    name: str
    command: tuple[str, ...]
    budget_s: float
    what: str = ""
    env: Mapping[str, str] = field(default_factory=dict)  # added to the environment (and shown)
    check: Callable[[Path, str], Verdict] | None = None  # (results dir, log text) -> verdict

    def shell(self) -> str:
        """The command as one shell line, with its environment variables in front."""
        return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in self.env.items()), shlex.join(self.command)])


@dataclass
class StageResult:
    """How a stage went: status (passed, failed, timed out, error), seconds, budget, details."""

    name: str
    status: str
    seconds: float
    budget_s: float
    returncode: int | None
    command: str
    log: str
    message: str = ""
    summary: str = ""
    details: dict = field(default_factory=dict)


# ----------------------------------------------------------------------------- the stages


_PLURAL = {"error": "errors", "warning": "warnings"}  # "1 error", "2 errors": one key


def parse_pytest_counts(text: str) -> dict[str, int]:
    """Counts of pytest's closing line (``3 failed, 812 passed, 2 skipped in 201.3s``).

    Args:
        text: pytest's output.

    Returns ``{"passed": 812, "failed": 3, ...}`` (``error`` and ``warning`` pluralised), or
    ``{}`` when there is no closing line (a killed run).
    """
    for line in reversed(text.splitlines()):
        if not re.search(r"\bin \d+(\.\d+)?s\b", line):
            continue
        found = re.findall(r"(\d+) (passed|failed|skipped|xfailed|xpassed|deselected|errors?|warnings?)\b", line)
        if found:
            return {_PLURAL.get(word, word): int(number) for number, word in found}
    return {}


def _count_text(counts: Mapping[str, int]) -> str:
    return ", ".join(f"{n} {word}" for word, n in counts.items()) or "no closing line from pytest"


def check_tests(out: Path, log_text: str) -> Verdict:
    """cuda-tests: good when pytest's closing line has passes and no failures or errors."""
    counts = parse_pytest_counts(log_text)
    ok = counts.get("passed", 0) > 0 and not counts.get("failed") and not counts.get("errors")
    return Verdict(ok, _count_text(counts), {"counts": counts})


def check_bench(out: Path, log_text: str) -> Verdict:
    """bench: good when ``results.csv`` has measured rows and none failed (an eager-fallback
    torch.compile row is a failed row)."""
    path = out / "results.csv"
    if not path.is_file():
        return Verdict(False, f"no {path.name} written", {})
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    measured = [r for r in rows if r.get("kind") == "measured"]
    failed = [f"{r['provider']} {r['mode']} {r['case']} {r['layout']}: {r['note']}" for r in rows
              if r.get("note", "").startswith("failed")]
    summary = f"{len(measured)} measured rows, {len(failed)} failed; {path.name}, report.md"
    details = {"results": str(path), "report": str(out / "report.md"), "rows": len(rows),
               "measured_rows": len(measured), "failed_rows": failed[:20]}
    return Verdict(bool(measured) and not failed, summary, details)


def check_tune(out: Path, log_text: str) -> Verdict:
    """tune: good when ``tune/<gpu>.json`` exists and says it was measured (not modelled)."""
    stores = sorted((out / "tune").glob("*.json"))
    if not stores:
        return Verdict(False, "no store written in tune/", {})
    store = stores[0]
    try:
        document = json.loads(store.read_text())
    except (OSError, ValueError) as exc:
        return Verdict(False, f"{store.name}: unreadable ({exc})", {"store": str(store)})
    timing = document.get("timing", "modelled" if document.get("modelled", True) else "measured")
    measured = document.get("modelled") is False
    return Verdict(measured, f"store tune/{store.name} ({timing})",
                   {"store": str(store), "timing": timing, "report": str(out / "tune" / "report.md")})


def _relative(path: Path) -> Path:
    try:
        return path.relative_to(ROOT)
    except ValueError:
        return path


def default_stages(python: str, out: Path) -> list[Stage]:
    """The three stages of the check, run by ``python``, writing under ``out``.

    Args:
        python: the interpreter that holds torch and Triton (scripts/setup.sh's).
        out: the results folder.

    Returns the stages with their default budgets (see the module's table).
    """
    module = (python, "-m", "tritonbn")
    out = _relative(out)  # the stages run in the repository root: shorter commands, same folder
    return [
        Stage("cuda-tests", (python, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CUDA_TESTS), 230,
              "the CUDA-path tests on the GPU (compiled kernels); counts from pytest's closing line",
              {"TRITONBN_TEST_DEVICE": "cuda"}, check_tests),
        Stage("bench", (*module, "bench", *BENCH_SUBSET, "--no-progress", "--out", str(out)), 140,
              "two full-size ResNet-50 cases, bf16, NCHW and channels_last, every mode: tritonbn, torch, "
              "torch.compile, copy, measured with do_bench", check=check_bench),
        Stage("tune", (*module, "tune", *TUNE_SUBSET, "--no-progress", "--out", str(out / "tune")), 80,
              "tune --quick measured with do_bench on this GPU: the measured store", check=check_tune),
    ]


def with_budgets(stages: Sequence[Stage], scale: float = 1.0, overrides: Mapping[str, float] | None = None,
                 only: Sequence[str] | None = None) -> list[Stage]:
    """The stages chosen by ``only`` (default all, in their order), budgets scaled by ``scale``
    and then replaced by ``overrides`` (stage name -> seconds).

    Raises ``ValueError`` naming an unknown stage or a budget that is not positive.
    """
    names = [stage.name for stage in stages]
    overrides = dict(overrides or {})
    unknown = [name for name in [*overrides, *(only or ())] if name not in names]
    if unknown:
        raise ValueError(f"unknown stage {', '.join(unknown)}; the stages are {', '.join(names)}")
    if scale <= 0 or any(seconds <= 0 for seconds in overrides.values()):
        raise ValueError("budgets must be positive")
    chosen = [stage for stage in stages if only is None or stage.name in only]
    return [dataclasses.replace(stage, budget_s=overrides.get(stage.name, stage.budget_s * scale)) for stage in chosen]


# ----------------------------------------------------------------------------- running them


def _stage_env(stage: Stage) -> dict[str, str]:
    return compiling_env({**os.environ, **stage.env})  # compiled for the GPU, never interpreted


def _kill_group(proc: subprocess.Popen) -> None:
    """End the stage's process group (it has its own session): SIGTERM, then SIGKILL."""
    for sig, grace in ((signal.SIGTERM, KILL_GRACE_S), (signal.SIGKILL, None)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break  # nothing of the group is left
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    proc.wait()


def run_stage(stage: Stage, log_path: Path, cwd: Path = ROOT) -> StageResult:
    """Run ``stage`` with its output in ``log_path``; killed when it outlasts its budget.

    Returns the stage's result: passed (exit 0), failed, timed out, or error (did not start);
    the verdict of ``stage.check`` is applied by ``run_stages``.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    returncode, message = None, ""
    with open(log_path, "wb") as log:
        try:
            # its own session: a timeout can end the whole group, workers included
            proc = subprocess.Popen(stage.command, cwd=cwd, env=_stage_env(stage), stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        except OSError as exc:
            status, message = ERROR, f"could not start: {exc}"
        else:
            try:
                returncode = proc.wait(timeout=stage.budget_s)
                status = PASSED if returncode == 0 else FAILED
                message = "" if returncode == 0 else f"exit status {returncode}"
            except subprocess.TimeoutExpired:
                _kill_group(proc)
                status, message = TIMED_OUT, f"timed out after {stage.budget_s:g} s"
            except BaseException:  # Ctrl-C: take the stage down with us
                _kill_group(proc)
                raise
    return StageResult(stage.name, status, round(time.monotonic() - started, 1), stage.budget_s, returncode,
                       stage.shell(), str(log_path), message)


def _judge(stage: Stage, result: StageResult, out: Path) -> StageResult:
    """Apply the stage's check: its summary and details always, a failed verdict fails a clean exit."""
    if stage.check is None or result.status == ERROR:
        return result
    log_text = Path(result.log).read_text(errors="replace") if Path(result.log).is_file() else ""
    verdict = stage.check(out, log_text)
    result.summary, result.details = verdict.summary, verdict.details
    if result.status == PASSED and not verdict.ok:
        result.status, result.message = FAILED, f"exit status 0, but {verdict.summary}"
    return result


def _tail(path: str, lines: int = TAIL_LINES) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def run_stages(stages: Sequence[Stage], out: Path, runner: Callable[..., StageResult] = run_stage,
               echo: Callable[[str], None] = print) -> list[StageResult]:
    """Run every stage in order (each whatever became of the one before), judge each one.

    Args:
        stages: what to run.
        out: the results folder (logs go to ``out/logs/<stage>.log``).
        runner: ``runner(stage, log_path) -> StageResult`` (tests inject one).
        echo: where progress lines go.

    Returns one result per stage.
    """
    results = []
    for stage in stages:
        echo(f"== {stage.name} (budget {stage.budget_s:g} s): {stage.shell()}")
        result = _judge(stage, runner(stage, out / "logs" / f"{stage.name}.log"), out)
        tail = _tail(result.log)
        if tail:
            echo(tail)
        echo(f"== {stage.name}: {_status_text(result)} ({result.seconds:.1f} s of {result.budget_s:g} s)"
             + (f"; {result.summary}" if result.summary else ""))
        results.append(result)
    return results


# ----------------------------------------------------------------------------- the summary


def _status_text(result: StageResult) -> str:
    return result.message if result.status == TIMED_OUT else result.status


def summary_markdown(results: Sequence[StageResult], meta: Mapping[str, object]) -> str:
    """The summary as markdown: a row per stage (status, seconds, budget, what it found), the
    total against the budget, the commands and their logs."""
    passed = bool(results) and all(r.status == PASSED for r in results)
    lines = [f"# tritonbn gpu-check: {meta['device']}: {'passed' if passed else 'FAILED'}", "",
             f"{meta['started']}; {meta['versions']}; results in `{meta['results_dir']}`", "",
             "| stage | status | seconds | budget (s) | result |", "|---|---|---|---|---|"]
    for r in results:
        detail = "; ".join(filter(None, [r.summary, r.message if r.status != TIMED_OUT else ""]))
        lines.append(f"| {r.name} | {_status_text(r)} | {r.seconds:.1f} | {r.budget_s:g} | {detail} |")
    total = sum(r.seconds for r in results)
    lines += ["", f"Total {total:.1f} s of a {sum(r.budget_s for r in results):g} s budget "
                  f"(limit {TIME_LIMIT_S} s).", "", "Commands (logs in `logs/`):", ""]
    lines += [f"- {r.name}: `{r.command}`" for r in results]
    return "\n".join(lines) + "\n"


def write_summary(results: Sequence[StageResult], out: Path, meta: Mapping[str, object]) -> list[Path]:
    """Write ``gpu-check.json`` and ``gpu-check.md`` into ``out``; returns their paths."""
    out.mkdir(parents=True, exist_ok=True)
    document = {"schema": 1, **meta, "passed": bool(results) and all(r.status == PASSED for r in results),
                "total_s": round(sum(r.seconds for r in results), 1),
                "budget_s": sum(r.budget_s for r in results), "time_limit_s": TIME_LIMIT_S,
                "stages": [dataclasses.asdict(r) for r in results]}
    json_path, md_path = out / "gpu-check.json", out / "gpu-check.md"
    json_path.write_text(json.dumps(document, indent=2) + "\n")
    md_path.write_text(summary_markdown(results, meta))
    return [json_path, md_path]


# ----------------------------------------------------------------------------- the subcommand


def _budget_item(text: str) -> tuple[str, float]:
    name, sep, seconds = text.partition("=")
    try:
        return name.strip(), float(seconds) if sep else float("nan")
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected STAGE=SECONDS, e.g. bench=120") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``tritonbn gpu-check``."""
    parser.add_argument("--dry-run", action="store_true", help="print the stages, commands and budgets; run nothing")
    parser.add_argument("--out", type=Path, default=None,
                        help="results folder (default perf/results/<gpu>/<date>/, the bench's)")
    parser.add_argument("--stages", default=None, help="comma-separated subset of cuda-tests,bench,tune (default all)")
    parser.add_argument("--budget-scale", type=float, default=1.0,
                        help="multiply every default budget (e.g. 2 on a slower machine)")
    parser.add_argument("--budget", type=_budget_item, action="append", default=[], metavar="STAGE=SECONDS",
                        help="one stage's budget in seconds (repeatable; not scaled)")


def _gpu_name() -> str | None:
    """This machine's CUDA device name, or None without one."""
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _versions() -> str:
    import torch

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    return f"torch {torch.__version__}, Triton {triton_version}, Python {platform.python_version()} ({sys.executable})"


def _results_dir(args: argparse.Namespace, gpu: str | None, now: datetime.datetime) -> Path:
    if args.out is not None:
        return args.out.resolve()
    slug = re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-") if gpu else "<gpu>"  # as bench.device_slug
    return ROOT / "perf" / "results" / slug / now.strftime("%Y-%m-%d")


def _command(args: argparse.Namespace) -> str:
    parts = ["tritonbn", "gpu-check"]
    if args.out is not None:
        parts += ["--out", str(args.out)]
    if args.stages is not None:
        parts += ["--stages", args.stages]
    if args.budget_scale != 1.0:
        parts += ["--budget-scale", f"{args.budget_scale:g}"]
    parts += [item for name, seconds in args.budget for item in ("--budget", f"{name}={seconds:g}")]
    return shlex.join(parts)


def _dry_run(stages: Sequence[Stage], out: Path) -> int:
    total = sum(stage.budget_s for stage in stages)
    print(f"tritonbn gpu-check: {len(stages)} stages, {total:.0f} s of budget (limit {TIME_LIMIT_S} s); "
          f"results in {out}")
    for stage in stages:
        print(f"  {stage.name:11s} {stage.budget_s:5.0f} s  {stage.shell()}")
        if stage.what:
            print(f"  {'':11s} {'':7s}  {stage.what}")
    print("dry run: nothing was run")
    return 0


def run(args: argparse.Namespace, *, stages: Sequence[Stage] | None = None,
        runner: Callable[..., StageResult] = run_stage) -> int:
    """Run the check and write its summary.

    Args:
        args: the parsed options.
        stages: instead of ``default_stages`` (tests inject stub stages).
        runner: how a stage is run (``run_stage``; tests inject one).

    Returns 0 when every stage passed, 1 when one did not, 2 without a CUDA GPU or on bad arguments.
    """
    now = datetime.datetime.now()
    gpu = _gpu_name()
    out = _results_dir(args, gpu, now)
    try:
        only = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages is not None else None
        if any(seconds != seconds for _, seconds in args.budget):  # NaN: no "=SECONDS"
            raise ValueError("--budget takes STAGE=SECONDS, e.g. bench=120")
        chosen = with_budgets(stages if stages is not None else default_stages(sys.executable, out),
                              args.budget_scale, dict(args.budget), only)
    except ValueError as exc:
        print(f"tritonbn gpu-check: {exc}", file=sys.stderr)
        return 2
    if args.dry_run:
        return _dry_run(chosen, out)
    if gpu is None:
        print("tritonbn gpu-check: no GPU is present (torch.cuda.is_available() is False): nothing was run",
              file=sys.stderr)
        return 2
    meta = {"device": gpu, "started": now.isoformat(timespec="seconds"), "versions": _versions(),
            "results_dir": str(out), "command": _command(args)}
    results = run_stages(chosen, out, runner)
    written = write_summary(results, out, meta)
    print(summary_markdown(results, meta))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0 if all(r.status == PASSED for r in results) else 1
