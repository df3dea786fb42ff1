"""On-line tuning: with ``TRITONBN_AUTOTUNE=1``, a key that no store has is tuned on first use.

Off by default, and kept off until a measured GPU run shows that it pays.  It takes two steps to
turn on: importing this module installs ``tune_on_first_use`` into ``config`` (the op never
imports it: ``config.set_online_tuner`` is the hook), and ``TRITONBN_AUTOTUNE=1`` lets it run.

On a GPU, the first call whose (dtype, family, op, C and m buckets) finds no stored config
within the lookup distance tunes that op there and then: the model ranks the candidates, the
best ``TOP`` of each role and the heuristic's are measured with ``triton.testing.do_bench``
(short warmup and repetition), on tensors of the call's geometry that the tuner allocates
itself (the caller's tensors and moving statistics are never touched), and the winners are
added to ``~/.cache/tritonbn/autotune/<gpu>.json`` (``TRITONBN_CACHE_DIR``
or ``XDG_CACHE_HOME`` move it).  Later calls, and later processes with ``TRITONBN_AUTOTUNE=1``,
read them from there; without the variable the cache is ignored.

Nothing is tuned while a CUDA graph is being captured or ``torch.compile`` is tracing, nor when
the dtype of the call is unknown (ops.py passes it as ``dtype=``; the persistent configs know
the element size).  A key that fails to tune is not retried in the process.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
from typing import Any, Callable

import torch

from ..plan import CHANNEL_MAJOR, ViewPlan
from . import config as C
from .model import GPUS, GpuSpec
from .store import MEASURED, Knobs, bucket, gpu_model, merge_documents, save_store, store_document, user_cache_dir
from .tuner import MeasuredTimer, ModelTimer, TuneCase, tune_op

log = logging.getLogger("tritonbn")

__all__ = ["tune_on_first_use", "configure", "case_for_plan", "TOP"]

TOP = 6  # candidates measured per role (the model's best), besides the heuristic's
WARMUP_MS, REP_MS = 5, 20

_tuning: contextvars.ContextVar[bool] = contextvars.ContextVar("tritonbn_online_tuning", default=False)
_failed: set[tuple] = set()
# tests: run the measured pipeline on CPU tensors with a stub bench
_settings: dict[str, Any] = {"bench": None, "device": None, "top": TOP}


def configure(bench: Callable[[Callable[[], Any]], float] | None = None, device: str | None = None,
              top: int | None = TOP) -> None:
    """Set the bench (``bench(fn) -> ms``; default do_bench), the device (default cuda) and how
    many candidates per role are measured (None: all).  Tests call it; ``configure()`` resets."""
    _settings.update(bench=bench, device=device, top=top)
    _failed.clear()


def case_for_plan(plan: ViewPlan, dtype: torch.dtype) -> TuneCase:
    """A tuning case with the plan's family, C and m: (outer, C, inner) contiguous for
    channel-major, (m, C) for channel-minor."""
    if plan.family == CHANNEL_MAJOR:
        return TuneCase((plan.outer, plan.channels, plan.inner), "NCHW", dtype)
    return TuneCase((plan.m, plan.channels), "NCHW", dtype)


def _dtype(dtype: str | None, element_size: int | None) -> torch.dtype | None:
    if dtype is not None:
        return getattr(torch, dtype, None)
    return {2: torch.float16, 4: torch.float32, 8: torch.float64}.get(element_size or 0)


def _busy() -> bool:
    """Tuning now would be wrong: already tuning, tracing, or capturing a CUDA graph."""
    if _tuning.get():
        return True
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def tune_on_first_use(role: str, plan: ViewPlan, profile: C.DeviceProfile, op: str, dtype: str | None,
                      element_size: int | None) -> Knobs | None:
    """Tune ``op`` for this call's key, save it to the user's cache, return ``role``'s knobs
    (``Knobs()``: the heuristic's choice); None when nothing could be tuned."""
    torch_dtype = _dtype(dtype, element_size)
    if torch_dtype is None or _busy():
        if torch_dtype is None:
            log.debug("tritonbn: on-line tuning skipped for %s: the call's dtype is unknown", role)
        return None
    gpu = gpu_model(profile.name)
    key = (gpu, str(torch_dtype), plan.family, op, bucket(plan.channels), bucket(plan.m))
    if key in _failed:
        return None
    token = _tuning.set(True)
    try:
        results = _tune(plan, op, torch_dtype, profile, gpu)
    except Exception as exc:  # noqa: BLE001 - a failed tuning must not fail the user's call
        log.warning("tritonbn: on-line tuning of %s failed (%s: %s); using the heuristic", key,
                    type(exc).__name__, exc)
        _failed.add(key)
        return None
    finally:
        _tuning.reset(token)
    _save(gpu, results, profile)
    for result in results:
        if result.role == role:
            return result.stored_knobs()
    return None


def _tune(plan: ViewPlan, op: str, dtype: torch.dtype, profile: C.DeviceProfile, gpu: str) -> list:
    """Measure ``op``'s roles for the call's key: the model's best ``top`` and the heuristic's."""
    device = _settings["device"] or "cuda"
    timer = MeasuredTimer(device, _settings["bench"], warmup=WARMUP_MS, rep=REP_MS)
    spec = GPUS.get(gpu) or GpuSpec(gpu, profile.name, "", profile.sm_count, 2.0e12, 4.0, 0.6)
    case = case_for_plan(plan, dtype)
    log.info("tritonbn: tuning %s %s on first use (TRITONBN_AUTOTUNE=1)", case.label, op)
    results, _ = tune_op(case, op, timer, profile, top=_settings["top"], rank_timer=ModelTimer(spec))
    return results


def _save(gpu: str, results: list, profile: C.DeviceProfile) -> None:
    path = user_cache_dir() / f"{gpu}.json"
    meta = {"modelled": False, "timing": MEASURED, "device": profile.name,
            "method": "on-line tuning on first use (TRITONBN_AUTOTUNE=1): triton.testing.do_bench, "
                      f"the model's best {_settings['top']} candidates per role and the heuristic's",
            "created": datetime.datetime.now().isoformat(timespec="seconds")}
    document = store_document(gpu, [r.store_entry() for r in results], meta)
    try:
        previous = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        previous = None  # an unreadable cache is replaced
    # an older cache of another schema or timing is replaced, not merged into
    if previous is not None and previous.get("schema") == document["schema"] and previous.get("timing") == MEASURED:
        document = merge_documents(previous, document)
    try:
        save_store(path, document)
    except (OSError, ValueError) as exc:
        log.warning("tritonbn: cannot write the on-line tuning cache %s: %s", path, exc)
    C.clear_caches()


C.set_online_tuner(tune_on_first_use)  # importing the on-line tuner is what makes it available
