"""The tuner: time every candidate config of every key, keep the best, build the store.

A *key* is (dtype, family, op, role, C bucket, m bucket).  For each case (a tensor shape in a
layout and dtype) and op, the roles are tuned one after the other, each with the roles before it
fixed at their winners (coordinate descent):

- inference: elementwise;
- forward and backward: reduce and elementwise with the single-pass path off, then persistent
  (off = the split path with the tuned reduce and elementwise, or single-pass with some warps).

Every candidate runs the whole op (so a reduce candidate also pays for the partials its finalize
reads) through ``ops.TritonBackend`` directly: no autograd, whose CUDA worker thread would not
see ``override_configs``.  Two timers:

- ``MeasuredTimer`` (a GPU): ``triton.testing.do_bench`` (L2 flushed before every run, median).
  Training ops update the moving statistics on every run, so each trial saves and restores them
  (FlagGems' ``restore_value`` trap): the statistics are exactly as before when tuning ends.
  With ``top``, candidates are first ranked by the model and only the best ``top`` (and the
  heuristic's) are measured.
- ``ModelTimer`` (anywhere): the launches of a dry run on ``meta`` tensors, costed by
  ``model.py``.  Its numbers are *modelled*, and every file written from them says so.

The heuristic's choice is always a candidate; a winner must beat it by more than ``margin``
(default 3 %), and must compile without spills for the target when an arch is given (checked
best-first, ``space.spill_free``).  A key where the heuristic stays is stored as ``{}`` ("the
heuristic's choice"), so the store never pins the heuristic's absolute numbers on neighbours.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Iterator, Protocol, Sequence

import torch

from .. import ops
from ..plan import empty_like_layout, plan_view
from . import config as C
from . import space
from .config import PERSISTENT_OFF, KernelConfig, override_configs, override_profile
from .model import GpuSpec, LaunchCost, modelled_ms
from .store import MEASURED, MODELLED, Knobs, bucket

__all__ = [
    "OP_ROLES",
    "TuneCase",
    "Workload",
    "ModelTimer",
    "MeasuredTimer",
    "KeyResult",
    "OpSummary",
    "TuneRun",
    "tune_op",
    "tune",
    "restored",
]

OP_ROLES = {
    C.INFERENCE: (C.ELEMENTWISE,),
    C.FORWARD: (C.REDUCE, C.ELEMENTWISE, C.PERSISTENT),
    C.BACKWARD: (C.REDUCE, C.ELEMENTWISE, C.PERSISTENT),
}
LAYOUTS = ("NCHW", "channels_last", "axis=-1")
DEFAULT_MARGIN = 0.03


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------- cases and workloads


@dataclass(frozen=True)
class TuneCase:
    """A tensor to tune on: logical shape (N, C, *spatial), how it lies, its dtype.

    layouts: "NCHW" (channel axis 1, contiguous: channel-major unless there is no spatial
    extent), "channels_last" (axis 1, the channel stored fastest: channel-minor), "axis=-1"
    ((N, *spatial, C) contiguous, axis -1: channel-minor).
    """

    logical: tuple[int, ...]
    layout: str
    dtype: torch.dtype

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r}: one of {', '.join(LAYOUTS)}")
        if len(self.logical) < 2:
            raise ValueError(f"shape {self.logical}: at least (N, C)")

    @property
    def applies(self) -> bool:
        """channels_last and axis=-1 need a spatial extent (for (N, C) they repeat NCHW)."""
        return self.layout == "NCHW" or len(self.logical) >= 3

    @property
    def channels(self) -> int:
        return self.logical[1]

    @property
    def m(self) -> int:
        return math.prod(self.logical) // self.channels

    @property
    def axis(self) -> int:
        return len(self.logical) - 1 if self.layout == "axis=-1" else 1

    @property
    def label(self) -> str:
        return f"{'x'.join(map(str, self.logical))} {self.layout} {dtype_name(self.dtype)}"

    def make(self, device: torch.device | str, seed: int = 0) -> torch.Tensor:
        """The data tensor (random values; uninitialised on ``meta``)."""
        device = torch.device(device)
        n, c, *spatial = self.logical
        stored = (n, *spatial, c) if self.layout != "NCHW" else tuple(self.logical)
        if device.type == "meta":
            x = torch.empty(stored, dtype=self.dtype, device=device)
        else:
            gen = torch.Generator().manual_seed(seed)
            x = torch.randn(stored, generator=gen).to(dtype=self.dtype, device=device)
        return x.movedim(-1, 1) if self.layout == "channels_last" else x


def _param_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


class Workload:
    """One op of one case on a device (``meta``: dry runs only), runnable again and again.

    ``run()`` runs the op once through ``ops.TritonBackend`` (the training forward updates
    ``moving_mean``/``moving_var``); backward's forward runs once, at construction.
    """

    def __init__(self, case: TuneCase, op: str, device: torch.device | str, seed: int = 0):
        from ..validation import validate

        if op not in OP_ROLES:
            raise ValueError(f"op {op!r}: one of {', '.join(OP_ROLES)}")
        self.case, self.op, self.device = case, op, torch.device(device)
        self.x = case.make(self.device, seed)
        channels = case.channels
        pdt = _param_dtype(case.dtype)
        if self.device.type == "meta":
            params = [torch.empty(channels, dtype=pdt, device=self.device) for _ in range(4)]
        else:
            gen = torch.Generator().manual_seed(seed + 1)
            params = [(torch.rand(channels, generator=gen, dtype=pdt) + 0.5).to(self.device),
                      torch.randn(channels, generator=gen, dtype=pdt).to(self.device),
                      torch.zeros(channels, dtype=pdt, device=self.device),
                      torch.ones(channels, dtype=pdt, device=self.device)]
        self.gamma, self.beta, self.moving_mean, self.moving_var = params
        self.settings = validate(self.x, tuple(params), eps=1e-3, momentum=0.9, fix_gamma=False,
                                 use_global_stats=False, axis=case.axis, out=None,
                                 training=op != C.INFERENCE, unbiased_update=False)
        self.backend = ops.TritonBackend()
        self._saved: tuple | None = None
        if op == C.BACKWARD:
            dry = ops.dry_run() if self.device.type == "meta" else contextlib.nullcontext()
            with dry:
                y, _, invstd, center, x_read = self.backend.forward(
                    self.x, self.gamma, self.beta, self.moving_mean, self.moving_var, self.settings, None)
            self.dy = empty_like_layout(self.x)
            if self.device.type != "meta":
                self.dy.copy_(case.make(self.device, seed + 2))
            self._saved = (x_read, center, invstd)

    @property
    def plan(self):
        tensors = [self.x, self.x] + ([self.x] if self.op == C.BACKWARD else [])
        return plan_view(self.x.shape, self.case.axis, [t.stride() for t in tensors])

    def moving_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.moving_mean, self.moving_var

    def run(self) -> Any:
        if self.op == C.BACKWARD:
            x_read, center, invstd = self._saved
            return self.backend.backward(self.dy, x_read, self.gamma, center, invstd, self.settings,
                                         self.beta.dtype)
        return self.backend.forward(self.x, self.gamma, self.beta, self.moving_mean, self.moving_var,
                                    self.settings, None)

    def capture(self) -> list[Any]:
        """The launches one run makes (recorded, not run)."""
        with ops.dry_run() as launches:
            self.run()
        return list(launches)


# ----------------------------------------------------------------------------- timers


@dataclass
class Trial:
    """One timed candidate: milliseconds (median, or modelled) and, when known, its launches."""

    ms: float
    launches: list[Any] | None = None
    costs: list[LaunchCost] | None = None


@contextlib.contextmanager
def restored(*tensors: torch.Tensor) -> Iterator[None]:
    """Put ``tensors`` back as they were on exit: a trial may run a training op hundreds of times,
    and each run updates the moving statistics."""
    saved = [t.detach().clone() for t in tensors]
    try:
        yield
    finally:
        with torch.no_grad():
            for t, s in zip(tensors, saved):
                t.copy_(s)


class Timer(Protocol):
    """What the tuner times candidates with: ``kind`` (measured or modelled, which every result
    carries), the ``device`` its workloads live on, and one run's Trial."""

    kind: str
    device: Any

    def __call__(self, workload: Workload) -> Trial: ...


class ModelTimer:
    """Modelled time of one run (``model.py``): a dry run's launches on ``meta`` tensors."""

    kind = MODELLED
    device = "meta"

    def __init__(self, spec: GpuSpec):
        self.spec = spec

    def __call__(self, workload: Workload) -> Trial:
        launches = workload.capture()
        ms, costs = modelled_ms(launches, workload.x.shape, self.spec)
        return Trial(ms, launches, costs)


def do_bench_ms(fn: Callable[[], Any], warmup: int = 25, rep: int = 100) -> float:
    """Median milliseconds of ``fn`` by ``triton.testing.do_bench`` (L2 flushed before each run)."""
    from triton.testing import do_bench

    return float(do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


class MeasuredTimer:
    """Measured time of one run on a device; ``bench(fn) -> ms`` defaults to ``do_bench``
    (tests inject a stub that runs ``fn``).  The moving statistics are restored after every
    trial."""

    kind = MEASURED

    def __init__(self, device: torch.device | str = "cuda", bench: Callable[[Callable[[], Any]], float] | None = None,
                 warmup: int = 25, rep: int = 100):
        self.device = torch.device(device)
        self.bench = bench or (lambda fn: do_bench_ms(fn, warmup, rep))

    def __call__(self, workload: Workload) -> Trial:
        with restored(*workload.moving_stats()):
            ms = self.bench(workload.run)
        return Trial(float(ms))


# ----------------------------------------------------------------------------- results


def _role_of(kernel: str) -> str:
    if "_persistent_" in kernel:
        return C.PERSISTENT
    if kernel.endswith("_elementwise"):
        return C.ELEMENTWISE
    return C.REDUCE


@dataclass
class CandidateResult:
    label: str
    knobs: dict
    config: dict | None
    ms: float
    spills: bool | None = None  # None: not compiled
    default: bool = False
    chosen: bool = False


@dataclass
class KeyResult:
    """What tuning one key found."""

    dtype: str
    family: str
    op: str
    role: str
    channels: int
    m: int
    case: str
    kind: str
    chosen: space.Candidate
    chosen_ms: float
    default: space.Candidate
    default_ms: float
    best_ms: float
    worst_ms: float
    candidates: list[CandidateResult]
    pruned_arch: str | None = None
    note: str = ""

    @property
    def key(self) -> tuple:
        return (self.dtype, self.family, self.op, self.role, bucket(self.channels), bucket(self.m))

    @property
    def is_default(self) -> bool:
        return self.chosen.config == self.default.config

    @property
    def gain(self) -> float:
        """Heuristic time / tuned time (1.0: no better)."""
        return self.default_ms / self.chosen_ms if self.chosen_ms > 0 else float("nan")

    @property
    def spread(self) -> float:
        """Worst / best candidate time."""
        return self.worst_ms / self.best_ms if self.best_ms > 0 else float("nan")

    def stored_knobs(self) -> Knobs:
        """What the store keeps: ``Knobs()`` (the heuristic's choice) when the heuristic won."""
        return Knobs() if self.is_default else self.chosen.knobs

    def store_entry(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype, "family": self.family, "op": self.op, "role": self.role,
            "channels": self.channels, "m": self.m,
            "config": self.stored_knobs().to_json(),
            "choice": "heuristic" if self.is_default else self.chosen.label,
            "ms": round(self.chosen_ms, 6), "heuristic_ms": round(self.default_ms, 6),
            "worst_ms": round(self.worst_ms, 6), "candidates": len(self.candidates),
            "tuned_on": self.case,
        }


@dataclass
class OpSummary:
    """An op of a case: every role at the heuristic vs every role at its tuned config."""

    case: str
    op: str
    family: str
    channels: int
    m: int
    data_bytes: int
    heuristic_ms: float
    tuned_ms: float
    kind: str
    kernels_heuristic: str = ""
    kernels_tuned: str = ""


@dataclass
class TuneRun:
    kind: str
    results: list[KeyResult] = field(default_factory=list)
    summaries: list[OpSummary] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)

    def entries(self) -> list[dict[str, Any]]:
        return [r.store_entry() for r in self.results]


# ----------------------------------------------------------------------------- tuning


def _overrides_for(role: str, op: str, fixed: dict[str, KernelConfig], cand: space.Candidate) -> dict:
    chosen = dict(fixed)
    if role != C.PERSISTENT and op != C.INFERENCE:
        chosen[C.PERSISTENT] = PERSISTENT_OFF  # reduce and elementwise run on the split path
    chosen[role] = cand.config if cand.config is not None else PERSISTENT_OFF
    return chosen


def _time(timer: Timer, workload: Workload, overrides: dict) -> Trial:
    with override_configs(**overrides):
        return timer(workload)


def _ranked(role: str, op: str, fixed: dict, cands: list[space.Candidate], default: space.Candidate,
            rank_timer: ModelTimer | None, rank_workload: Workload | None, top: int | None) -> list[space.Candidate]:
    """The candidates to time: all, or the model's best ``top`` and the heuristic's."""
    if not top or rank_timer is None or len(cands) <= top:
        return cands
    scored = sorted(cands, key=lambda c: _time(rank_timer, rank_workload, _overrides_for(role, op, fixed, c)).ms)
    keep = scored[:top]
    if default not in keep:
        keep.append(default)
    return keep


def tune_op(case: TuneCase, op: str, timer: Timer, profile: C.DeviceProfile, *,
            arch: str | None = None, margin: float = DEFAULT_MARGIN, top: int | None = None,
            rank_timer: ModelTimer | None = None, workload: Workload | None = None,
            roles: Sequence[str] | None = None) -> tuple[list[KeyResult], OpSummary]:
    """Tune every role of ``op`` on ``case``; returns the per-key results and the op summary.

    ``workload`` may be given (tests pass their own to watch its moving statistics); otherwise
    one is built on the timer's device.  ``rank_timer``/``top``: measure only the model's best.
    """
    results: list[KeyResult] = []
    fixed: dict[str, KernelConfig] = {}
    with override_profile(profile), C.heuristic_only():
        workload = workload or Workload(case, op, timer.device)
        rank_workload = Workload(case, op, "meta") if (rank_timer is not None and top) else None
        plan = workload.plan
        element_size = workload.x.element_size()
        for role in roles or OP_ROLES[op]:
            cands = space.candidates(role, plan, op, profile, element_size)
            if not cands:
                continue  # persistent: the slice does not fit, nothing to choose
            default = space.heuristic_candidate(role, plan, op, profile, element_size)
            same = next((c for c in cands if c.config == default.config), None)
            if same is None:
                cands.insert(0, default)
            else:
                default = same
            timed = _ranked(role, op, fixed, cands, default, rank_timer, rank_workload, top)
            trials = {c: _time(timer, workload, _overrides_for(role, op, fixed, c)) for c in timed}
            chosen, rows, note, pruned = _choose(role, op, fixed, timed, trials, default, workload, arch, margin)
            ordered = sorted(trials.values(), key=lambda t: t.ms)
            results.append(KeyResult(
                dtype_name(case.dtype), plan.family, op, role, plan.channels, plan.m, case.label,
                timer.kind, chosen, trials[chosen].ms, default, trials[default].ms,
                ordered[0].ms, ordered[-1].ms, rows, arch if pruned else None, note))
            fixed[role] = chosen.config if chosen.config is not None else PERSISTENT_OFF
        heuristic, heuristic_launches = timer(workload), workload.capture()
        tuned = _time(timer, workload, fixed)
        with override_configs(**fixed):
            tuned_launches = workload.capture()
    summary = OpSummary(case.label, op, plan.family, plan.channels, plan.m,
                        workload.x.numel() * workload.x.element_size(), heuristic.ms, tuned.ms,
                        timer.kind,
                        "/".join(launch.name for launch in heuristic_launches),
                        "/".join(launch.name for launch in tuned_launches))
    return results, summary


def _choose(role: str, op: str, fixed: dict, timed: list[space.Candidate], trials: dict[space.Candidate, Trial],
            default: space.Candidate, workload: Workload, arch: str | None,
            margin: float) -> tuple[space.Candidate, list[CandidateResult], str, bool]:
    """The winner (fastest that compiles without spills, unless the heuristic is within
    ``margin``), every candidate's row (fastest first), a note, and whether anything was compiled."""
    order = sorted(timed, key=lambda c: trials[c].ms)
    spills: dict[space.Candidate, bool | None] = {}
    chosen = None
    for cand in order:
        if arch is None or cand.config is None or cand == default:
            chosen = cand
            break
        launches = trials[cand].launches
        if launches is None:
            with override_configs(**_overrides_for(role, op, fixed, cand)):
                launches = workload.capture()
        verdict = space.spill_free([launch for launch in launches if _role_of(launch.name) == role], arch)
        spills[cand] = None if verdict is None else not verdict
        if not spills[cand]:
            chosen = cand
            break
    chosen = chosen or default
    note = ""
    if chosen != default and trials[default].ms <= trials[chosen].ms * (1 + margin):
        if trials[chosen].ms < trials[default].ms * (1 - 1e-9):
            note = f"best ({chosen.label}) within {margin:.0%} of the heuristic: heuristic kept"
        chosen = default
    pruned = [c.label for c, spilled in spills.items() if spilled]
    if pruned:
        note = "; ".join(filter(None, [note, f"spills on {arch}: {', '.join(pruned)}"]))
    rows = [CandidateResult(c.label, c.knobs.to_json(), None if c.config is None else asdict(c.config),
                            trials[c].ms, spills.get(c), c == default, c == chosen) for c in order]
    return chosen, rows, note, any(v is not None for v in spills.values())


def tune(cases: Iterable[TuneCase], op_names: Sequence[str], timer: Timer,
         profile: C.DeviceProfile, *, arch: str | None = None, margin: float = DEFAULT_MARGIN,
         top: int | None = None, rank_timer: ModelTimer | None = None,
         progress: Callable[[Iterable], Iterable] | None = None) -> TuneRun:
    """Tune every (case, op); a case whose keys an earlier case already tuned is skipped."""
    run = TuneRun(timer.kind)
    work = [(case, op) for case in cases if case.applies for op in op_names]
    done: set[tuple] = set()
    for case, op in (progress(work) if progress else work):
        plan = Workload(case, C.INFERENCE, "meta").plan
        key = (dtype_name(case.dtype), plan.family, op, bucket(plan.channels), bucket(plan.m))
        if key in done:
            run.skipped.append(f"{case.label} {op}: bucket already tuned")
            continue
        done.add(key)
        results, summary = tune_op(case, op, timer, profile, arch=arch, margin=margin, top=top,
                                   rank_timer=rank_timer)
        run.results.extend(results)
        run.summaries.append(summary)
    return run
