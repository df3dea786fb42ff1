"""``tritonbn bench``: the performance sweep of GitHub issue 5.

On CUDA every (case, layout, dtype, mode) is timed with ``triton.testing.do_bench`` (L2
flushed before every run; median and quartiles) for four providers in one run:

- ``tritonbn``: ``tritonbn.batch_norm`` on the tensor as it lies (any axis, no copy);
- ``torch``: ``torch.nn.functional.batch_norm``, eager (cuDNN or native, as torch dispatches);
- ``torch.compile``: the same function through ``torch.compile(dynamic=False, fullgraph=True)``
  (Inductor), compiled afresh per point; a row whose calls ran no compiled graph (dynamo fell
  back to eager) is reported as failed instead of timing eager torch under this name;
- ``copy``: a device-to-device copy of S bytes (reads S, writes S): the bandwidth reference.

Fused chains (``--fusions``, ``sweeps.FUSIONS``): "relu", "add" and "add_relu" time
``tritonbn.batch_norm(..., act_type=, addend=)`` against the same chain written as torchvision's
blocks compute it (``relu(bn(x) + identity)``, out of place) in torch eager and through
``torch.compile``, and against ``tritonbn-unfused``: tritonbn's plain batch norm followed by
torch's add and ReLU.  Their rows carry the fusion; effective bandwidth counts the chain's
minimal bytes (``sweeps.FUSED_MIN_PASSES``) and on a CPU torch's chain is modelled
(``sweeps.TORCH_CHAIN_PASSES``).

torch's batch_norm only takes the channel at axis 1: for another axis both torch providers get
``x.movedim(axis, 1)``, a view (no copy), and their gradient flows back through it.  Effective
bandwidth counts the *minimal* bytes of a mode (``sweeps.MIN_PASSES``: 2 S inference and
forward, 3 S backward, 5 S forward + backward), whatever a provider really moves.  Modes that
update the moving statistics get them restored after each measurement.

Without a GPU the same command counts instead of timing: the CPU-sized cases run under
``TRITON_INTERPRET=1`` and the traffic counter (``traffic.py``) reports bytes moved / S,
launches and programs per launch of tritonbn ("counted"), next to the pass counts of torch's
documented CUDA design ("modelled": ``sweeps.TORCH_PASSES``).  Nothing there is a GPU time.

On a CPU it also times the torch path (``cpu_backend.CpuBackend``: what ``tritonbn.batch_norm``
runs on CPU tensors without ``TRITON_INTERPRET=1``) against torch's ``F.batch_norm`` at full
size (``cpu_time_sweep``: ``CPU_CASES``, inference / training forward / forward + backward,
fp32 and bf16), ``--cpu-threads`` threads, the two providers' calls interleaved, medians of
``--cpu-repeats``.  Those rows are kind "cpu-measured" (providers "tritonbn (CPU)" and "torch
(CPU)"); ``write_cpu_timings`` adds their table and ``cpu_timings.png`` to the report
(``--no-cpu-timings`` skips them).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import functools
import inspect
import math
import os
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from . import sass, sweeps, traffic
from ..autotune.tuner import restored  # the moving statistics between measurements
from .sweeps import FUSED_MIN_PASSES, FUSIONS, MIN_PASSES, MODES, TORCH_CHAIN_PASSES, UNFUSED, Point

__all__ = ["Row", "Timing", "CompiledBaseline", "EagerFallback", "compile_limits", "default_compile",
           "do_bench_timer", "count_sweep", "time_sweep", "torch_view", "interleaved_timer", "cpu_points",
           "cpu_time_sweep", "write_cpu_timings", "add_arguments", "run"]

MEASURED, COUNTED, MODELLED = "measured", "counted", "modelled"
PROVIDERS = ("tritonbn", "torch", "torch.compile", UNFUSED)
COPY = "copy"
DEFAULT_FUSIONS = ("none", "relu", "add_relu")  # "add" alone follows no BatchNorm in ResNets
MXNET_MOMENTUM = 0.9
EPS = 1e-3


@dataclass
class Row:
    """One CSV row: a (provider, mode, layout, dtype, shape) and what was measured/counted/modelled."""

    provider: str
    kind: str  # measured | counted | modelled
    mode: str
    fusion: str  # sweeps.FUSIONS: "none" (BatchNorm alone) or the chain that follows it
    family: str
    case: str
    layout: str
    dtype: str
    shape: str  # the tensor run, e.g. 32x56x56x64
    axis: int
    logical_shape: str  # (N, C, *spatial)
    data_bytes: int  # S
    min_bytes_per_s: float
    ms: float = math.nan  # median
    ms_q25: float = math.nan
    ms_q75: float = math.nan
    gbps: float = math.nan  # minimal bytes / median time
    pct_copy: float = math.nan  # gbps / measured copy bandwidth, %
    speedup_vs_torch: float = math.nan  # torch eager ms / this ms
    speedup_vs_compile: float = math.nan  # torch.compile ms / this ms
    speedup_vs_unfused: float = math.nan  # tritonbn-unfused ms / this ms (fused chains)
    bytes_moved: float = math.nan
    bytes_per_s: float = math.nan
    data_bytes_per_s: float = math.nan  # x/y/dy/dx only (counted)
    launches: float = math.nan
    programs_per_launch: str = ""
    kernels: str = ""
    torch_copies: float = math.nan  # copies torch made around tritonbn's kernels (counted)
    # compiled code (perf/compiled_facts.py): the launch with the lowest issue-rate ceiling
    binding_kernel: str = ""
    inst_per_element: float = math.nan  # its SASS instructions per element (counted)
    issue_ceiling_tbs: float = math.nan  # the bandwidth instruction issue allows it (modelled)
    active_lanes: float = math.nan  # the lowest active-lane fraction of the row's launches
    binds: str = ""  # "instructions" where the ceiling is below the memory bandwidth, else "bytes"
    note: str = ""


FIELDS = [f.name for f in dataclasses.fields(Row)]


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(s) for s in shape)


def _base(point: Point, provider: str, kind: str, mode: str, fusion: str = "none") -> Row:
    return Row(provider=provider, kind=kind, mode=mode, fusion=fusion, family=point.case.family,
               case=point.case.label, layout=point.layout, dtype=point.dtype, shape=_shape_text(point.shape),
               axis=point.axis, logical_shape=_shape_text(point.case.logical), data_bytes=point.data_bytes,
               min_bytes_per_s=FUSED_MIN_PASSES[fusion].get(mode, 2))


def _progress(items: Sequence, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return items
    from tqdm import tqdm

    return tqdm(items, desc=desc, unit="point", file=sys.stderr, dynamic_ncols=True)


# ----------------------------------------------------------------------------- counting (no GPU)


def count_point(point: Point, fusions: Sequence[str] = ("none",)) -> list[Row]:
    """tritonbn's counted traffic of every mode and fusion at ``point``, and torch's modelled passes."""
    rows = []
    for fusion in fusions:
        rows.extend(_count_fusion(point, fusion))
    return rows


def _count_fusion(point: Point, fusion: str) -> list[Row]:
    import numpy as np

    with np.errstate(divide="ignore", invalid="ignore"):  # the interpreter's numpy, e.g. 1/sqrt(0) under tl.where
        results = traffic.measure("all", point.shape, point.memory, point.torch_dtype, point.axis,
                                  fusion=None if fusion == "none" else fusion)
    rows = []
    for mode in MODES:
        result = results[mode]
        row = _base(point, "tritonbn", COUNTED, mode, fusion)
        row.bytes_moved = result.total
        row.bytes_per_s = result.per_s
        row.data_bytes_per_s = result.data_per_s
        row.launches = result.n_launches
        row.programs_per_launch = "/".join(str(p) for p in result.programs)
        row.kernels = "/".join(launch.kernel for launch in result.launches)
        row.torch_copies = len(result.copies)
        rows.append(row)
        passes = TORCH_CHAIN_PASSES[fusion][mode]
        model = _base(point, "torch", MODELLED, mode, fusion)
        model.bytes_per_s = model.data_bytes_per_s = passes
        model.bytes_moved = passes * point.data_bytes
        model.note = "passes of torch's CUDA design (stats + elementwise; reduce + elementwise)" + (
            "" if fusion == "none" else "; the add and the ReLU as separate ops")
        rows.append(model)
    return rows


def count_sweep(points: Sequence[Point], progress: bool = True, fusions: Sequence[str] = ("none",)) -> list[Row]:
    """Counted (tritonbn) and modelled (torch) rows of every point and fusion, under the interpreter."""
    traffic.ensure_interpreter()
    rows: list[Row] = []
    for point in _progress(points, "counting", progress):
        rows.extend(count_point(point, fusions))
    return rows


# ----------------------------------------------------------------------------- timing (CUDA)


@dataclass(frozen=True)
class Timing:
    """Milliseconds per call: median and quartiles."""

    median: float
    q25: float
    q75: float


def do_bench_timer(fn: Callable[[], Any], warmup: int = 25, rep: int = 100) -> Timing:
    """``triton.testing.do_bench`` (L2 flushed before every run) as median and quartiles."""
    from triton.testing import do_bench

    params = inspect.signature(do_bench).parameters
    if "quantiles" in params:
        median, q25, q75 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.5, 0.25, 0.75])
        return Timing(median, q25, q75)
    times = sorted(do_bench(fn, warmup=warmup, rep=rep, return_mode="all"))  # pragma: no cover

    def quantile(q: float) -> float:  # pragma: no cover
        return times[min(len(times) - 1, int(q * len(times)))]

    return Timing(quantile(0.5), quantile(0.25), quantile(0.75))  # pragma: no cover


def torch_view(t: torch.Tensor, axis: int) -> torch.Tensor:
    """``t`` with its channel axis moved to 1, as torch's batch_norm needs: a view, no copy."""
    axis = axis % t.dim()
    return t if axis == 1 else t.movedim(axis, 1)


# Every dynamo knob that caps the graphs kept per function (old names are aliases of the new):
# past any of them dynamo stops compiling and runs the frame eagerly.  torch 2.11's
# accumulated_recompile_limit (256) is the one a long sweep of one function reaches.
COMPILE_LIMIT_KNOBS = ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                       "accumulated_cache_size_limit")
COMPILE_LIMIT = 1 << 16


class EagerFallback(RuntimeError):
    """A ``torch.compile`` provider's calls ran no compiled graph: dynamo ran them eagerly."""


@contextlib.contextmanager
def compile_limits(limit: int = COMPILE_LIMIT) -> Iterator[None]:
    """Dynamo's recompile limits raised for the duration of a sweep, restored afterwards.

    Args:
        limit: the least value every knob of ``COMPILE_LIMIT_KNOBS`` that this torch has gets
            (a higher setting is kept).

    Also sets ``fail_on_recompile_limit_hit`` (where it exists), so that reaching a limit
    anyway is an error in the row, never a silent eager run.  Yields nothing.
    """
    import torch._dynamo.config as dynamo_config

    patch = {knob: max(getattr(dynamo_config, knob), limit) for knob in COMPILE_LIMIT_KNOBS
             if hasattr(dynamo_config, knob)}
    if hasattr(dynamo_config, "fail_on_recompile_limit_hit") and not dynamo_config.suppress_errors:
        patch["fail_on_recompile_limit_hit"] = True  # incompatible with suppress_errors
    with dynamo_config.patch(patch):
        yield


class CompiledBaseline:
    """``torch.compile(fn, dynamic=False, fullgraph=True)`` that counts its graphs and their calls.

    Built once per sweep point: ``torch._dynamo.reset()`` first (with ``reset``), so the cache
    holds only this point's few graphs and no recompile limit comes near however long the
    sweep.  ``fullgraph=True`` makes a graph break or a limit hit raise instead of running
    eagerly.  ``graphs`` counts the graphs the backend compiled and ``graph_calls`` the calls of
    them, so a caller can tell a compiled run from an eager one (``EagerFallback``).
    """

    def __init__(self, fn: Callable, backend: str = "inductor", reset: bool = True):
        """Args: ``fn`` to compile; ``backend``: dynamo backend name (tests use "eager");
        ``reset``: clear dynamo's caches first."""
        import torch._dynamo

        if reset:
            torch._dynamo.reset()
        self.backend = backend
        self.graphs = 0
        self.graph_calls = 0
        self._compiled = torch.compile(fn, backend=self._compile_graph, dynamic=False, fullgraph=True)

    def _compile_graph(self, gm: torch.fx.GraphModule, example_inputs: list) -> Callable:
        from torch._dynamo.backends.registry import lookup_backend

        self.graphs += 1
        inner = lookup_backend(self.backend)(gm, example_inputs)

        @functools.wraps(inner)
        def counted(*args: Any, **kwargs: Any) -> Any:
            self.graph_calls += 1  # one integer add per call: nothing next to a kernel launch
            return inner(*args, **kwargs)

        return counted

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Call the compiled function."""
        return self._compiled(*args, **kwargs)


def default_compile(fn: Callable, backend: str = "inductor") -> CompiledBaseline:
    """The ``torch.compile`` provider of one point: a fresh ``CompiledBaseline`` of ``fn``.

    Args:
        fn: the function to compile (torch's batch_norm with MXNet's constants).
        backend: dynamo backend; Inductor is what ``torch.compile`` uses by default.

    Returns the compiled callable; ``time_sweep`` raises dynamo's limits around the sweep.
    """
    return CompiledBaseline(fn, backend)


def _check_compiled(compiled: Any, calls_before: int, fn: Callable[[], Any], mode: str) -> None:
    """Raise ``EagerFallback`` unless ``compiled`` ran a graph since ``calls_before`` and, where
    ``fn`` calls the forward (every mode but backward), on one more call after the timing."""
    if compiled.graph_calls == calls_before:
        raise EagerFallback("torch.compile ran no compiled graph: dynamo fell back to eager")
    if mode != "backward":
        before = compiled.graph_calls
        fn()
        if compiled.graph_calls == before:
            raise EagerFallback("torch.compile's last call ran eagerly: dynamo fell back to eager")


@dataclass
class _Inputs:
    x: torch.Tensor  # no grad (inference)
    xg: torch.Tensor  # leaf with grad (training)
    dy: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    gamma_g: torch.Tensor
    beta_g: torch.Tensor
    moving_mean: torch.Tensor
    moving_var: torch.Tensor
    axis: int
    addend: torch.Tensor  # the residual of the "add" fusions, x's shape and layout (no grad)
    addend_g: torch.Tensor  # the same as a leaf with grad (training)


def _inputs(point: Point, device: torch.device) -> _Inputs:
    x = traffic.make_data(point.shape, point.memory, point.torch_dtype, seed=0, device=device)
    dy = traffic.make_data(point.shape, point.memory, point.torch_dtype, seed=1, device=device)
    addend = traffic.make_data(point.shape, point.memory, point.torch_dtype, seed=2, device=device)
    channels = point.shape[point.axis]
    gamma = torch.rand(channels, device=device) + 0.5
    beta = torch.randn(channels, device=device)
    return _Inputs(x, x.detach().clone().requires_grad_(True), dy, gamma, beta,
                   gamma.clone().requires_grad_(True), beta.clone().requires_grad_(True),
                   torch.zeros(channels, device=device), torch.ones(channels, device=device), point.axis,
                   addend, addend.detach().clone().requires_grad_(True))


def _torch_batch_norm(x, gamma, beta, moving_mean, moving_var, training: bool):
    # torch's momentum weighs the new batch: MXNet's 0.9 is torch's 0.1
    return torch.nn.functional.batch_norm(x, moving_mean, moving_var, gamma, beta, training,
                                          1.0 - MXNET_MOMENTUM, EPS)


def _chain_tail(y: torch.Tensor, addend: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """What follows the batch norm in an unfused chain: ``+ addend`` then ReLU, as separate ops."""
    if addend is not None:
        y = y + addend
    return torch.relu(y) if relu else y


def _torch_chain(x, addend, gamma, beta, moving_mean, moving_var, training: bool, relu: bool):
    """torch's batch norm, then the add of ``addend`` (None: no add) and the ReLU (``relu``)."""
    return _chain_tail(_torch_batch_norm(x, gamma, beta, moving_mean, moving_var, training), addend, relu)


def _fusion_parts(fusion: str) -> tuple[bool, bool]:
    """(ReLU?, addend?) of a fusion of ``sweeps.FUSIONS``, as ``traffic.FUSIONS`` defines them."""
    act_type, with_addend = traffic.FUSIONS.get(fusion, (None, False))
    return act_type == "relu", with_addend


def _forward(provider: str, inp: _Inputs, training: bool, compiled: Callable | None,
             fusion: str = "none") -> Callable[[], torch.Tensor]:
    """A call of ``provider``'s forward of the chain ``fusion`` (training with grad-requiring
    inputs, else without)."""
    x = inp.xg if training else inp.x
    gamma, beta = (inp.gamma_g, inp.beta_g) if training else (inp.gamma, inp.beta)
    relu, with_addend = _fusion_parts(fusion)
    addend = (inp.addend_g if training else inp.addend) if with_addend else None
    if provider in ("tritonbn", UNFUSED):
        import tritonbn

        fused = provider == "tritonbn"
        call = functools.partial(tritonbn.batch_norm, x, gamma, beta, inp.moving_mean, inp.moving_var, eps=EPS,
                                 momentum=MXNET_MOMENTUM, fix_gamma=False, axis=inp.axis, training=training,
                                 **(dict(act_type="relu" if relu else None, addend=addend) if fused else {}))
        if fused or fusion == "none":
            return call
        return lambda: _chain_tail(call(), addend, relu)
    fn = _torch_chain if provider == "torch" else compiled
    view = torch_view(addend, inp.axis) if addend is not None else None
    return lambda: fn(torch_view(x, inp.axis), view, gamma, beta, inp.moving_mean, inp.moving_var, training, relu)


def _mode_fn(provider: str, mode: str, inp: _Inputs, compiled: Callable | None,
             fusion: str = "none") -> Callable[[], Any]:
    """The callable timed for (provider, mode, fusion); backward builds its graph once, here."""
    training = mode != "inference"
    forward = _forward(provider, inp, training, compiled, fusion)
    dy = inp.dy if provider in ("tritonbn", UNFUSED) else torch_view(inp.dy, inp.axis)
    wrt = (inp.xg, inp.gamma_g, inp.beta_g) + ((inp.addend_g,) if _fusion_parts(fusion)[1] else ())
    if mode in ("inference", "forward"):
        return forward
    if mode == "backward":
        y = forward()
        return lambda: torch.autograd.grad(y, wrt, dy, retain_graph=True)
    return lambda: torch.autograd.grad(forward(), wrt, dy)


def _timed(row: Row, timer: Callable, fn_factory: Callable[[], Callable[[], Any]], restore: Sequence[torch.Tensor],
           compiled: Any = None):
    """Time ``fn_factory()`` into ``row``; with ``compiled`` (a ``CompiledBaseline``) the row fails
    unless its calls ran a compiled graph."""
    watched = hasattr(compiled, "graph_calls")  # a compile_fn injected by a test may return a plain function
    try:
        with restored(*restore):
            calls_before = compiled.graph_calls if watched else 0
            fn = fn_factory()
            timing = timer(fn)
            if watched:
                _check_compiled(compiled, calls_before, fn, row.mode)
        row.ms, row.ms_q25, row.ms_q75 = timing.median, timing.q25, timing.q75
    except Exception as exc:  # noqa: BLE001 - one failing provider must not end the sweep
        row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"


def time_point(point: Point, device: torch.device, timer: Callable[[Callable[[], Any]], Timing],
               compile_fn: Callable[[Callable], Callable] = default_compile,
               providers: Sequence[str] = PROVIDERS, modes: Sequence[str] = MODES,
               fusions: Sequence[str] = ("none",)) -> list[Row]:
    """Timed rows of every (fusion, provider, mode) at ``point``, plus the copy reference (once).

    ``tritonbn-unfused`` runs for the fused chains only: for "none" it would be ``tritonbn``.
    """
    inp = _inputs(point, device)
    rows: list[Row] = []
    src = torch.empty(inp.x.numel(), dtype=inp.x.dtype, device=device).copy_(inp.x.reshape(-1))
    dst = torch.empty_like(src)
    copy = _base(point, COPY, MEASURED, COPY)
    copy.note = "device-to-device copy of S bytes; GB/s counts 2 S (read + write)"
    _timed(copy, timer, lambda: (lambda: dst.copy_(src)), ())
    copy.gbps = 2 * point.data_bytes / (copy.ms * 1e6)
    rows.append(copy)
    for fusion in fusions:
        chain_providers = [p for p in providers if fusion != "none" or p != UNFUSED]
        compiled = compile_fn(_torch_chain) if "torch.compile" in chain_providers else None
        for mode in modes:
            rows.extend(_time_mode(point, inp, timer, compiled, chain_providers, mode, fusion, copy.gbps))
    return rows


def _time_mode(point: Point, inp: _Inputs, timer: Callable, compiled: Any, providers: Sequence[str], mode: str,
               fusion: str, copy_gbps: float) -> list[Row]:
    """The rows of every provider for one (mode, fusion) at ``point``, with their speedups."""
    by_provider: dict[str, Row] = {}
    for provider in providers:
        row = _base(point, provider, MEASURED, mode, fusion)
        if provider not in ("tritonbn", UNFUSED) and point.axis != 1:
            row.note = f"x.movedim({point.axis}, 1) (a view) for torch"
        _timed(row, timer, lambda: _mode_fn(provider, mode, inp, compiled, fusion),
               (inp.moving_mean, inp.moving_var), compiled if provider == "torch.compile" else None)
        row.gbps = FUSED_MIN_PASSES[fusion][mode] * point.data_bytes / (row.ms * 1e6)
        row.pct_copy = 100.0 * row.gbps / copy_gbps
        by_provider[provider] = row
    for row in by_provider.values():
        for field, provider in (("speedup_vs_torch", "torch"), ("speedup_vs_compile", "torch.compile"),
                                ("speedup_vs_unfused", UNFUSED)):
            if provider in by_provider:
                setattr(row, field, by_provider[provider].ms / row.ms)
    return list(by_provider.values())


def time_sweep(points: Sequence[Point], device: torch.device | str, timer: Callable[[Callable[[], Any]], Timing],
               compile_fn: Callable[[Callable], Callable] = default_compile,
               providers: Sequence[str] = PROVIDERS, modes: Sequence[str] = MODES,
               progress: bool = True, fusions: Sequence[str] = ("none",)) -> list[Row]:
    """Timed rows of every point and fusion (see ``time_point``); ``timer`` is injectable (tests stub it).

    With the torch.compile provider, dynamo's recompile limits are raised for the whole sweep
    (``compile_limits``), so its rows stay compiled however many points there are.
    """
    device = torch.device(device)
    rows: list[Row] = []
    limits = compile_limits() if "torch.compile" in providers else contextlib.nullcontext()
    with limits:  # the compiled baseline stays compiled over the whole sweep
        for point in _progress(points, "timing", progress):
            rows.extend(time_point(point, device, timer, compile_fn, providers, modes, fusions))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


# ----------------------------------------------------------------------------- timing on a CPU (the torch path)

CPU_MEASURED = "cpu-measured"
CPU_PROVIDERS = {"tritonbn": "tritonbn (CPU)", "torch": "torch (CPU)"}
# Full-size shapes of the torch path's speed targets: ResNet-50's widest and deepest BatchNorms,
# an MLP's 2-D (N, C) and a transformer's (B, T, C) with axis=-1.
CPU_CASES: tuple[sweeps.Case, ...] = (
    sweeps.Case("resnet50", "R50 N32 64@56", (32, 64, 56, 56)),
    sweeps.Case("resnet50", "R50 N32 2048@7", (32, 2048, 7, 7)),
    sweeps.Case("mlp", "256x1024", (256, 1024)),
    sweeps.Case("transformer", "B8 T2048 C1024", (8, 1024, 2048), layouts=("axis=-1",)),
)
CPU_MODES = ("inference", "forward", "forward_backward")
CPU_DTYPES = ("fp32", "bf16")
CPU_LAYOUTS = ("NCHW", "channels_last", "axis=-1")
CPU_TARGET = 1.25  # the torch path's time over torch's, at most


def interleaved_timer(fns: dict[str, Callable[[], Any]], repeats: int = 7, warmup: int = 2) -> dict[str, Timing]:
    """Median and quartiles (ms) of each callable, timed in rounds: every round calls each once,
    in an order that alternates round by round, so a noisy machine slows all of them alike."""
    import time

    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for round_index in range(repeats):
        for name in (names if round_index % 2 == 0 else names[::-1]):
            start = time.perf_counter()
            fns[name]()
            samples[name].append((time.perf_counter() - start) * 1e3)

    def timing(values: list[float]) -> Timing:
        ordered = sorted(values)
        pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
        return Timing(statistics.median(ordered), pick(0.25), pick(0.75))

    return {name: timing(values) for name, values in samples.items()}


@contextlib.contextmanager
def torch_path(threads: int) -> Iterator[None]:
    """CPU tensors on the torch path (TRITON_INTERPRET unset for ``backend_for``, which reads it per
    call) with ``threads`` torch threads; both restored on exit."""
    saved_env, saved_threads = os.environ.get("TRITON_INTERPRET"), torch.get_num_threads()
    os.environ["TRITON_INTERPRET"] = "0"
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


def cpu_points(layouts: Sequence[str] | None = None, dtypes: Sequence[str] | None = None,
               families: Sequence[str] | None = None) -> list[Point]:
    """The CPU timing points: ``CPU_CASES`` in ``layouts`` (default ``CPU_LAYOUTS``) and
    ``dtypes`` (default ``CPU_DTYPES``), optionally only ``families``."""
    cases = [c for c in CPU_CASES if families is None or c.family in families]
    return sweeps.points(cases, list(layouts or CPU_LAYOUTS), list(dtypes or CPU_DTYPES))


def cpu_time_point(point: Point, modes: Sequence[str], timer: Callable[[dict], dict[str, Timing]],
                   threads: int = 2) -> list[Row]:
    """Rows of the torch path and of torch's ``F.batch_norm`` for each mode at ``point`` (CPU
    tensors), timed together by ``timer`` (``interleaved_timer`` or a test's stub)."""
    inp = _inputs(point, torch.device("cpu"))
    rows: list[Row] = []
    with torch_path(threads):
        for mode in modes:
            by_provider = {provider: _base(point, label, CPU_MEASURED, mode)
                           for provider, label in CPU_PROVIDERS.items()}
            try:
                with restored(inp.moving_mean, inp.moving_var):
                    fns = {provider: _mode_fn(provider, mode, inp, None) for provider in CPU_PROVIDERS}
                    timings = timer(fns)
            except Exception as exc:  # noqa: BLE001 - one failing point must not end the sweep
                for row in by_provider.values():
                    row.note = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
                rows.extend(by_provider.values())
                continue
            for provider, row in by_provider.items():
                timing = timings[provider]
                row.ms, row.ms_q25, row.ms_q75 = timing.median, timing.q25, timing.q75
                row.gbps = MIN_PASSES[mode] * point.data_bytes / (row.ms * 1e6)
                row.note = f"CPU timing, {threads} threads, calls interleaved with the other provider"
                if provider != "tritonbn" and point.axis != 1:
                    row.note += f"; x.movedim({point.axis}, 1) (a view) for torch"
            for row in by_provider.values():
                row.speedup_vs_torch = by_provider["torch"].ms / row.ms
            rows.extend(by_provider.values())
    return rows


def cpu_time_sweep(points: Sequence[Point], modes: Sequence[str] = CPU_MODES,
                   timer: Callable[[dict], dict[str, Timing]] | None = None, threads: int = 2,
                   progress: bool = True) -> list[Row]:
    """CPU timing rows (``cpu_time_point``) of every point; ``timer`` defaults to
    ``interleaved_timer`` (7 rounds after 2 warm-up calls)."""
    timer = timer or interleaved_timer
    rows: list[Row] = []
    for point in _progress(points, "timing the torch path", progress):
        rows.extend(cpu_time_point(point, modes, timer, threads))
    return rows


def cpu_timing_table(rows: Sequence[Row]) -> list[str]:
    """Markdown table of the CPU timing rows: ms of both providers and their ratio per mode."""
    timed = [r for r in rows if r.kind == CPU_MEASURED]
    modes = [m for m in sweeps.MODES if any(r.mode == m for r in timed)]
    head = "| case | layout | dtype | shape (axis) | " + " | ".join(
        f"{sweeps.MODE_TITLES[m]}: tritonbn / torch ms (ratio)" for m in modes) + " |"
    lines = [head, "|" + "---|" * (4 + len(modes))]
    by_key = {(r.case, r.layout, r.dtype, r.mode, r.provider): r for r in timed}
    keys = list(dict.fromkeys((r.case, r.layout, r.dtype, r.shape, r.axis) for r in timed))
    for case, layout, dtype, shape, axis in keys:
        cells = []
        for mode in modes:
            ours = by_key.get((case, layout, dtype, mode, CPU_PROVIDERS["tritonbn"]))
            theirs = by_key.get((case, layout, dtype, mode, CPU_PROVIDERS["torch"]))
            if ours is None or theirs is None or math.isnan(ours.ms) or math.isnan(theirs.ms):
                cells.append("failed" if ours is not None else "–")
                continue
            ratio = ours.ms / theirs.ms
            mark = "" if ratio <= CPU_TARGET else " ✗"
            cells.append(f"{ours.ms:.3f} / {theirs.ms:.3f} ({ratio:.2f}×{mark})")
        lines.append(f"| {case} | {layout} | {dtype} | {shape} ({axis}) | " + " | ".join(cells) + " |")
    return lines


def _cpu_timing_figure(rows: Sequence[Row], path: Path) -> Path:
    """Time ratio (torch path / torch) per point, a panel per mode, a line per (layout, dtype)."""
    from .report import _finish, _panels, _pyplot

    plt = _pyplot()
    timed = [r for r in rows if r.kind == CPU_MEASURED and r.provider == CPU_PROVIDERS["tritonbn"]]
    modes = [m for m in sweeps.MODES if any(r.mode == m for r in timed)]
    cases = list(dict.fromkeys(r.case for r in timed))
    fig, axes, legend_ax = _panels(plt, len(modes), 4.2)
    for ax, mode in zip(axes, modes):
        for layout, dtype in dict.fromkeys((r.layout, r.dtype) for r in timed):
            mine = {r.case: 1.0 / r.speedup_vs_torch for r in timed
                    if r.mode == mode and r.layout == layout and r.dtype == dtype}
            ax.plot(range(len(cases)), [mine.get(c, math.nan) for c in cases], marker="o",
                    linestyle="-" if dtype == "fp32" else "--", linewidth=1, label=f"{layout} {dtype}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.axhline(CPU_TARGET, color="red", linewidth=0.8, linestyle=":", label=f"target {CPU_TARGET}×")
        ax.set_ylim(bottom=0)
        ax.set_title(sweeps.MODE_TITLES[mode], fontsize=10)
    axes[0].set_ylabel("CPU time, tritonbn torch path / torch F.batch_norm")
    return _finish(plt, fig, axes, legend_ax, cases, "CPU timings (median of interleaved calls; < 1: tritonbn faster)",
                   path)


def write_cpu_timings(rows: Sequence[Row], out: Path, command: str, threads: int) -> list[Path]:
    """Append the CPU timings (table and ``cpu_timings.png``) to ``out/report.md``; returns the
    paths written (none without CPU timing rows)."""
    if not any(r.kind == CPU_MEASURED for r in rows):
        return []
    figure = _cpu_timing_figure(rows, Path(out) / "cpu_timings.png")
    lines = ["", "## CPU timings: the torch path against torch's F.batch_norm", "",
             "Measured on this CPU (not a GPU): `tritonbn.batch_norm` on CPU tensors without `TRITON_INTERPRET=1`",
             f"(the torch path, `tritonbn/cpu_backend.py`) and `torch.nn.functional.batch_norm`, {threads} threads,",
             "their calls interleaved round by round; medians. Ratio = tritonbn ms / torch ms "
             f"(target ≤ {CPU_TARGET}; ✗ marks a miss).",
             f"Reproduce: `{command}`; one table: `tritonbn cpu-speed`.", "",
             *cpu_timing_table(rows), "", f"![CPU timings]({figure.name})", ""]
    report = Path(out) / "report.md"
    with open(report, "a") as handle:
        handle.write("\n".join(lines))
    return [figure]


# ----------------------------------------------------------------------------- the subcommand


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="the quick subset (a few shapes, bf16 and fp32)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output folder (default perf/results/<device>/<date>/)")
    parser.add_argument("--device", default=None,
                        help="cuda[:i] (timed) or cpu (counted under TRITON_INTERPRET=1); default: cuda if available")
    parser.add_argument("--dtypes", default=None, help=f"comma-separated subset of {','.join(sweeps.DTYPES)}")
    parser.add_argument("--layouts", default=None, help=f"comma-separated subset of {','.join(sweeps.LAYOUTS)}")
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--fusions", default=None,
                        help=f"comma-separated subset of {','.join(FUSIONS)} (default {','.join(DEFAULT_FUSIONS)}): "
                             "BatchNorm alone and the chains fused into it")
    parser.add_argument("--families", default=None, help="comma-separated case families (resnet50, small-C, ...)")
    parser.add_argument("--providers", default=None, help=f"GPU: comma-separated subset of {','.join(PROVIDERS)}")
    parser.add_argument("--warmup", type=int, default=25, help="GPU: do_bench warmup, ms")
    parser.add_argument("--rep", type=int, default=100, help="GPU: do_bench repetition time, ms")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--no-cpu-timings", action="store_true",
                        help="CPU: skip timing the torch path against torch's F.batch_norm")
    parser.add_argument("--cpu-threads", type=int, default=2, help="CPU timings: torch threads")
    parser.add_argument("--cpu-repeats", type=int, default=7, help="CPU timings: interleaved rounds per point")
    parser.add_argument("--no-sass", action="store_true",
                        help="skip the compiled-code facts (SASS instructions per element, issue-rate ceiling) of each row")


def _subset(text: str | None, allowed: Sequence[str], what: str) -> list[str] | None:
    if text is None:
        return None
    chosen = [part.strip() for part in text.split(",") if part.strip()]
    unknown = [part for part in chosen if part not in allowed]
    if unknown or not chosen:
        raise ValueError(f"--{what}: unknown {', '.join(unknown) or '(empty)'}; choose from {', '.join(allowed)}")
    return chosen


def device_slug(device: torch.device) -> str:
    """Folder name of a device: "cpu" or the GPU's name, e.g. "nvidia-h100-80gb-hbm3"."""
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"{props.name} ({props.multi_processor_count} SMs, {props.total_memory / 2**30:.0f} GiB)"
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores): Triton interpreter"


def _command(args: argparse.Namespace) -> str:
    parts = ["tritonbn", "bench"]
    if args.quick:
        parts.append("--quick")
    for name in ("device", "dtypes", "layouts", "modes", "fusions", "families", "providers"):
        value = getattr(args, name)
        if value is not None:
            parts += [f"--{name}", str(value)]
    for name, default in (("warmup", 25), ("rep", 100), ("cpu_threads", 2), ("cpu_repeats", 7)):
        if getattr(args, name, default) != default:
            parts += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    if getattr(args, "no_cpu_timings", False):
        parts.append("--no-cpu-timings")
    if getattr(args, "no_sass", False):
        parts.append("--no-sass")
    if args.out is not None:
        parts += ["--out", str(args.out)]
    return " ".join(parts)


def select_points(args: argparse.Namespace, cpu: bool) -> tuple[list[Point], list[str]]:
    """The sweep's points and modes for ``args`` (CPU: the quick cases at their CPU sizes)."""
    quick = args.quick or cpu
    cases = sweeps.QUICK_CASES if quick else sweeps.FULL_CASES
    if cpu:
        cases = tuple(case.for_cpu() for case in cases)
    families = _subset(args.families, sorted({c.family for c in sweeps.FULL_CASES}), "families")
    if families:
        cases = tuple(c for c in cases if c.family in families)
    dtypes = _subset(args.dtypes, list(sweeps.DTYPES), "dtypes") or (
        list(sweeps.QUICK_DTYPES) if quick else list(sweeps.DTYPES))
    layouts = _subset(args.layouts, list(sweeps.LAYOUTS), "layouts") or list(sweeps.LAYOUTS)
    modes = _subset(args.modes, list(MODES), "modes") or list(MODES)
    return sweeps.points(cases, layouts, dtypes), modes


def compiled_code_arch(device: torch.device) -> str:
    """The arch whose compiled code a run reports: the GPU's (sm_80, sm_90), else sm_90."""
    from ..inspect import ARCHS

    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        if f"sm_{major}{minor}" in ARCHS:
            return f"sm_{major}{minor}"
    return "sm_90"


def add_compiled_facts(rows: list[Row], points: Sequence[Point], arch: str, bandwidth_tbs: float) -> None:
    """Give every tritonbn row the SASS facts of its binding launch (``compiled_facts``) and
    whether bytes or instructions bind against ``bandwidth_tbs``."""
    from . import compiled_facts

    by_key = {(p.case.label, p.layout, p.dtype): p for p in points}
    mine = [r for r in rows if r.provider == "tritonbn" and (r.case, r.layout, r.dtype) in by_key]
    keys = list(dict.fromkeys((r.case, r.layout, r.dtype, r.mode, r.fusion) for r in mine))
    facts = compiled_facts.facts_of([compiled_facts.point_call(by_key[k[:3]], k[3], k[4]) for k in keys], arch)
    found = dict(zip(keys, facts))
    for row in mine:
        fact = found[(row.case, row.layout, row.dtype, row.mode, row.fusion)]
        row.binding_kernel, row.inst_per_element = fact["kernel"], fact["instructions_per_element"]
        row.issue_ceiling_tbs, row.active_lanes = fact["issue_ceiling_tbs"], fact["active_lanes"]
        row.binds = compiled_facts.binds(row.issue_ceiling_tbs, bandwidth_tbs)


def _cpu_timing_rows(args: argparse.Namespace, modes: Sequence[str], timer: Callable | None) -> list[Row]:
    """The CPU timing rows of a CPU run (none with ``--no-cpu-timings``), in the run's dtypes,
    layouts and families where they are CPU timing ones."""
    if getattr(args, "no_cpu_timings", False):
        return []
    dtypes = _subset(args.dtypes, list(sweeps.DTYPES), "dtypes") or list(CPU_DTYPES)
    layouts = _subset(args.layouts, list(sweeps.LAYOUTS), "layouts") or list(CPU_LAYOUTS)
    families = _subset(args.families, sorted({c.family for c in sweeps.FULL_CASES}), "families")
    points = cpu_points(layouts, dtypes, families)
    cpu_modes = [m for m in CPU_MODES if m in modes]
    if not points or not cpu_modes:
        return []
    repeats = getattr(args, "cpu_repeats", 7)
    return cpu_time_sweep(points, cpu_modes, timer or (lambda fns: interleaved_timer(fns, repeats=repeats)),
                          threads=getattr(args, "cpu_threads", 2), progress=not args.no_progress)


def run(args: argparse.Namespace, timer: Callable | None = None, compile_fn: Callable | None = None,
        cpu_timer: Callable | None = None) -> int:
    """Run the sweep and write CSV, plots and report.md; ``timer``/``compile_fn``/``cpu_timer``
    (the CPU timings' interleaved timer) are for tests."""
    from . import report

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available (use --device cpu to count traffic)")
        if device.type not in ("cuda", "cpu"):
            raise ValueError(f"--device {args.device}: only cuda and cpu are supported")
        # A GPU is timed; a CPU is counted, unless a timer is injected (tests time the GPU path on CPU).
        timed = device.type == "cuda" or timer is not None
        if device.type == "cuda" and os.environ.get("TRITON_INTERPRET") == "1":
            raise ValueError("TRITON_INTERPRET=1 would interpret the kernels on the GPU: unset it to time them")
        if device.type == "cpu":
            traffic.ensure_interpreter()  # before anything imports Triton: CPU tensors run interpreted
        points, modes = select_points(args, cpu=device.type == "cpu")
        fusions = _subset(getattr(args, "fusions", None), list(FUSIONS), "fusions") or list(DEFAULT_FUSIONS)
        providers = _subset(args.providers, list(PROVIDERS), "providers") or list(PROVIDERS)
    except (ValueError, RuntimeError) as exc:
        print(f"tritonbn bench: {exc}", file=sys.stderr)
        return 2
    if not points:
        print("tritonbn bench: the selection is empty", file=sys.stderr)
        return 2
    now = datetime.datetime.now()
    out = args.out or Path("perf/results") / device_slug(device) / now.strftime("%Y-%m-%d")
    if device.type == "cpu" and not args.quick:
        print("no GPU: the CPU-sized quick subset, counted under Triton's interpreter (not timed)", file=sys.stderr)
    if timed:
        timer = timer or (lambda fn: do_bench_timer(fn, warmup=args.warmup, rep=args.rep))
        rows = time_sweep(points, device, timer, compile_fn or default_compile, providers, modes,
                          progress=not args.no_progress, fusions=fusions)
    else:
        rows = [row for row in count_sweep(points, progress=not args.no_progress, fusions=fusions)
                if row.mode in modes]
    cpu_rows = [] if timed else _cpu_timing_rows(args, modes, cpu_timer)
    arch = compiled_code_arch(device)
    copies = [r.gbps for r in rows if r.provider == COPY and not math.isnan(r.gbps)]
    # the bar a ceiling is read against: the run's best measured copy, or the arch's specified peak
    bandwidth = (max(copies) / 1000, "measured copy") if copies else (sass.GPUS[arch].dram_tbs, "specified peak")
    compiled = None
    if not getattr(args, "no_sass", False):
        try:
            add_compiled_facts(rows, points, arch, bandwidth[0])
            compiled = (arch, *bandwidth)
        except (RuntimeError, OSError, subprocess.TimeoutExpired) as exc:  # the measured rows still count
            print(f"tritonbn bench: no compiled-code facts ({exc})", file=sys.stderr)
    meta = report.Meta(device=device_description(device), timed=timed,
                       date=now.strftime("%Y-%m-%d %H:%M"), command=_command(args), compiled=compiled)
    written = report.write(rows, out, meta)  # the counted figures and tables: counted rows only
    if cpu_rows:
        report.write_csv(rows + cpu_rows, Path(out) / "results.csv")  # one CSV with every row
        written += write_cpu_timings(cpu_rows, out, meta.command, args.cpu_threads)
    print(report.console_summary(rows, timed))
    if cpu_rows:
        print("\n".join(["CPU timings (the torch path vs torch F.batch_norm):", *cpu_timing_table(cpu_rows)]))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0
