"""``tritonbn overhead``: host microseconds per call, per op and per layer of the call, beside
torch's own call measured in the same run (issue 13, "Fast calls").

Ops: inference (``tritonbn.batch_norm``, ``training=False``), training forward, forward +
backward (``y.backward(dy)``) and the ``tritonbn.nn.BatchNorm2d`` training forward.  torch's
counterparts (``F.batch_norm``, ``torch.nn.BatchNorm2d``) run on a tiny CPU tensor of the same
rank, C, dtype and memory format, ``(2, C, 1, ...)``: the issue's measure of torch's host cost.

Two methods:

- **GPU** (a CUDA device, Triton compiling): wall clock of back-to-back calls on real CUDA
  tensors, ``torch.cuda.synchronize()`` at the ends of each batch only; torch's call is also
  timed on the same CUDA tensors.
- **CPU** (no GPU): Triton's real launch path on CPU tensors, with kernels compiled for sm_90
  and only the CUDA launcher replaced by a no-op (``compiled_sm90_on_cpu``): the JIT's binder,
  argument specialisation, compiled-kernel cache and ``CompiledKernel.run`` all run; the
  launcher object they call (``driver.active.launcher_cls``: argument packing and
  ``cuLaunchKernelEx``) does nothing, so its cost is not in the numbers.  The kernels never
  execute: outputs are garbage and nothing reads them.  Each call is timed alone with
  ``time.perf_counter`` after warm-up (the first calls compile); the median is reported.

Every measured function runs interleaved with the others of its op in rounds, so that the load
of a shared machine shifts them alike.  A layer of a call is mostly measured by knocking it out:
one call is recorded (the inner calls' results), then the call is timed whole and with the
layer's functions answering their recorded results (or doing nothing), in the same rounds; the
layer is the median over rounds of the difference.  That is its cost inside the call, with the
caches as cold as the call leaves them (replayed alone in a loop, validation or the config
lookups run 2-4x faster).  ``LAYER_METHODS`` says how each is measured; "other" is what
remains of the call.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Sequence

import torch

from .. import launch as _launch_module
from .. import trace

OPS = ("inference", "training_forward", "forward_backward", "nn_training_forward")
# the targets: tritonbn's host time per call at most this multiple of torch's
TARGETS = {"inference": 2.5, "training_forward": 2.5, "forward_backward": 1.6, "nn_training_forward": 2.0}
DEFAULT_SHAPES = ("32x64x56x56", "32x2048x7x7:channels_last")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# memory formats; "nchw" is contiguous data of any rank
LAYOUTS = {"nchw": None, "channels_last": torch.channels_last, "channels_last_3d": torch.channels_last_3d}
NN_DIMS = {2: 1, 3: 1, 4: 2, 5: 3}  # data rank -> the BatchNorm{1,2,3}d layer that takes it
NOOP_DEVICE = -90  # the no-op driver's device ordinal: never a real one, so its caches stay apart
SM90_PROPERTIES = {"max_shared_mem": 232448, "multiprocessor_count": 132, "max_num_regs": 65536,
                   "warpSize": 32, "sm_clock_rate": 1980000, "mem_clock_rate": 2619000, "mem_bus_width": 5120}

# How each layer is measured.  "Knocked out": the call minus the same call with that layer's
# work removed, both timed in the same rounds: the layer's cost inside the call, cold caches and
# all (a layer replayed alone in a loop runs warm, at a fraction of that).
LAYER_METHODS = {
    "validation": "knocked out: the validation signature (the op entry's key; a repeated call runs no other "
                  "check but out's overlap) and validate() answer with their recorded results",
    "plan/config decisions": "knocked out: the rest of the op entry's and the call plans' keys (layout_strides, "
                             "_alignment, decision_context, force_int64_enabled; ops._cached_plan) answers with "
                             "its recorded results",
    "allocation": "knocked out: torch.empty/empty_strided/empty_like/zeros answer with the recorded tensors",
    "launches": "knocked out: Launch.__call__ a no-op (trace event, tensor arguments, Triton's launcher)",
    "  of which Triton run": "knocked out: Launch.__call__ stops before the compiled kernel's launcher (a no-op "
                             "in the CPU method; on a GPU argument packing and cuLaunchKernelEx), JITFunction.run "
                             "a no-op",
    "autograd Function": "knocked out: BatchNormFunction.apply calls TritonBackend.forward directly",
    "forward call": "the training forward call, timed alone; forward + backward's other layers are those "
                    "of TritonBackend.backward replayed alone, knocked out there",
    "autograd backward": "the step minus the forward call minus TritonBackend.backward replayed alone: "
                         "engine, BatchNormFunction.backward, AccumulateGrad",
    "module": "layer(x) minus library.batch_norm_op timed alone with the call's arguments (Module.__call__, "
              "input checks, num_batches_tracked += 1, torch_batch_norm)",
    "other": "the call minus the layers above: Python glue of the op and the backend (nn: the eager-path "
             "checks of library.batch_norm_op)",
}


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """A data shape and memory format (the channel axis is 1)."""

    shape: tuple[int, ...]
    layout: str = "nchw"

    @property
    def spec(self) -> str:
        """The ``--shape`` argument that gives this case."""
        return "x".join(map(str, self.shape)) + ("" if self.layout == "nchw" else f":{self.layout}")


def shape_label(shape: str, layout: str) -> str:
    """``32x64x56x56 NCHW``, ``32x2048x7x7 channels_last``, ``8x16x32 contiguous``."""
    if layout == "nchw":
        layout = "NCHW" if shape.count("x") == 3 else "contiguous"
    return f"{shape} {layout}"


def parse_case(spec: str) -> Case:
    """``N x C x ...[:layout]`` (``32x2048x7x7:channels_last``; ``,`` separators work too)."""
    dims, _, layout = spec.partition(":")
    layout = layout or "nchw"
    if layout not in LAYOUTS:
        raise argparse.ArgumentTypeError(f"layout must be one of {sorted(LAYOUTS)}, got {layout!r}")
    try:
        shape = tuple(int(d) for d in dims.replace(",", "x").split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad shape {dims!r}; expected e.g. 32x64x56x56") from None
    if len(shape) < 2 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"shape needs N, C and positive extents, got {shape}")
    return Case(shape, layout)


@dataclass
class Tensors:
    """One op's inputs: data, float32 parameters (float64 never: DTYPES has no fp64) and dy."""

    x: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    moving_mean: torch.Tensor
    moving_var: torch.Tensor
    dy: torch.Tensor


def make_tensors(shape: Sequence[int], layout: str, dtype: torch.dtype, device: torch.device | str,
                 grad: bool) -> Tensors:
    """Random data in ``layout``; ``grad``: data, gamma and beta require grad (a training step)."""
    def data() -> torch.Tensor:
        t = torch.randn(shape, dtype=dtype, device=device)
        return t if LAYOUTS[layout] is None else t.contiguous(memory_format=LAYOUTS[layout])

    channels = shape[1]
    params = [torch.ones(channels, device=device), torch.zeros(channels, device=device)]
    x = data().requires_grad_(grad)
    return Tensors(x, params[0].clone().requires_grad_(grad), params[1].clone().requires_grad_(grad),
                   params[1].clone(), params[0].clone(), data())


def torch_shape(case: Case) -> tuple[int, ...]:
    """torch's tiny counterpart: same rank and C, two values per channel."""
    return (2, case.shape[1]) + (1,) * (len(case.shape) - 2)


# ----------------------------------------------------------------------------- the calls


def _nn_layer(library_module: Any, rank: int, channels: int, device: torch.device | str) -> torch.nn.Module:
    """``BatchNorm{1,2,3}d`` of ``library_module`` (``tritonbn.nn`` or ``torch.nn``) in training mode."""
    cls = getattr(library_module, f"BatchNorm{NN_DIMS[rank]}d")
    return cls(channels, device=device).train()


def _step(forward: Callable[[], torch.Tensor], t: Tensors) -> Callable[[], None]:
    """Forward + backward; gradients reset first so that each step stores them instead of adding
    a full-size tensor (what a step after ``zero_grad(set_to_none=True)`` does)."""
    def step() -> None:
        t.x.grad = t.gamma.grad = t.beta.grad = None
        forward().backward(t.dy)

    return step


def tritonbn_call(op: str, t: Tensors) -> Callable[[], Any]:
    """The tritonbn call of ``op`` on ``t`` (MXNet's momentum 0.9, a learnt gamma)."""
    import tritonbn

    if op == "nn_training_forward":
        layer = _nn_layer(tritonbn.nn, t.x.dim(), t.x.shape[1], t.x.device)
        return lambda: layer(t.x)
    training = op != "inference"

    def forward() -> torch.Tensor:
        return tritonbn.batch_norm(t.x, t.gamma, t.beta, t.moving_mean, t.moving_var, fix_gamma=False,
                                   training=training)

    return _step(forward, t) if op == "forward_backward" else forward


def torch_call(op: str, t: Tensors) -> Callable[[], Any]:
    """torch's own call of ``op`` on ``t`` (``F.batch_norm``, ``torch.nn.BatchNorm*d``)."""
    if op == "nn_training_forward":
        layer = _nn_layer(torch.nn, t.x.dim(), t.x.shape[1], t.x.device)
        return lambda: layer(t.x)
    training = op != "inference"

    def forward() -> torch.Tensor:
        return torch.nn.functional.batch_norm(t.x, t.moving_mean, t.moving_var, t.gamma, t.beta,
                                              training=training)

    return _step(forward, t) if op == "forward_backward" else forward


# ----------------------------------------------------------------------------- the no-op launcher


@dataclass
class LaunchCounter:
    """What reached the no-op launcher: launches, the compiled kernels' targets, their JIT functions."""

    calls: int = 0
    targets: set = field(default_factory=set)
    functions: list = field(default_factory=list)
    arguments: list | None = None  # when a list: every launch's arguments are appended (tests)


class _NoOpLauncher:
    """Stands in for Triton's ``CudaLauncher`` (built per compiled kernel by ``_init_handles``,
    called by ``CompiledKernel.run`` with the grid, stream, function handle and arguments, whose
    order differs between Triton versions: all of it is ignored)."""

    def __init__(self, counter: LaunchCounter, src: Any, metadata: Any) -> None:
        self.counter = counter
        counter.targets.add((metadata.target.backend, metadata.target.arch))
        counter.functions.append(src.fn)

    def __call__(self, *args: Any) -> None:
        self.counter.calls += 1
        if self.counter.arguments is not None:
            self.counter.arguments.append(args)


class _Sm90Utils:
    """The driver utilities ``CompiledKernel`` needs to load a kernel, answering for an H100/H200."""

    def get_device_properties(self, device: int) -> dict:
        return dict(SM90_PROPERTIES)

    def load_binary(self, name: str, kernel: bytes, shared: int, device: int) -> tuple[int, int, int, int, int]:
        return 1, 1, 0, 0, 1024  # module, function, registers, spills, max threads per block

    def unload_module(self, module: int) -> None:
        pass


class _Sm90Driver:
    """Triton's active driver for the CPU method: device ``NOOP_DEVICE`` of capability 9.0, stream 0,
    and the no-op launcher as ``launcher_cls``."""

    def __init__(self, counter: LaunchCounter) -> None:
        from triton.backends.compiler import GPUTarget

        self.utils = _Sm90Utils()
        self.target = GPUTarget("cuda", 90, 32)
        self.launcher_cls = lambda src, metadata: _NoOpLauncher(counter, src, metadata)

    def get_current_device(self) -> int:
        return NOOP_DEVICE

    def set_current_device(self, device: int) -> None:
        pass

    def get_current_stream(self, device: int | None = None) -> int:
        return 0

    def get_device_capability(self, device: int | None = None) -> tuple[int, int]:
        return 9, 0

    def get_current_target(self) -> Any:
        return self.target

    def get_active_torch_device(self) -> torch.device:
        return torch.device("cpu")


def _kernel_functions() -> list[Any]:
    """Every ``@triton.jit`` function of ``tritonbn.kernels`` (whose caches the driver touches)."""
    from triton.runtime.jit import JITFunction

    from .. import kernels

    modules = [getattr(kernels, name) for name in kernels.__all__]
    return [v for m in modules for v in vars(m).values() if isinstance(v, JITFunction)]


def _drop_noop_caches(functions: Sequence[Any]) -> None:
    """Forget what was compiled and loaded under the no-op driver; its kernels' fake module
    handles are cleared so that no real driver is asked to unload them."""
    for fn in functions:
        entry = fn.device_caches.pop(NOOP_DEVICE, None)
        for kernel in (entry[0].values() if entry else ()):
            kernel.module = None


@contextlib.contextmanager
def compiled_sm90_on_cpu() -> Iterator[LaunchCounter]:
    """The CPU method: in this context ``TritonBackend`` serves CPU tensors (``ops.backend_for``
    and ``library.backend_for``), Triton compiles for ``GPUTarget("cuda", 90, 32)`` and its
    launches reach a no-op launcher, counted.  Everything is restored on exit."""
    from triton.runtime.driver import driver

    from .. import library, ops

    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("the CPU method compiles kernels: unset TRITON_INTERPRET")
    counter = LaunchCounter()
    saved = (driver._active, ops.backend_for, library.backend_for)

    real_backend_for, cuda = ops.backend_for, torch.device("cuda", 0)

    def backend_for(device: torch.device) -> Any:
        return real_backend_for(cuda)  # what ops.backend_for gives a CUDA tensor, at the same cost

    driver.set_active(_Sm90Driver(counter))
    ops.backend_for = library.backend_for = backend_for
    ops.clear_call_plans()  # call plans hold direct launchers of the driver they were made under
    try:
        yield counter
    finally:
        driver.set_active(saved[0])
        ops.backend_for, library.backend_for = saved[1], saved[2]
        ops.clear_call_plans()
        _drop_noop_caches({id(f): f for f in [*_kernel_functions(), *counter.functions]}.values())


def noop_launcher_installed() -> bool:
    """Whether anything of ``compiled_sm90_on_cpu`` is still in place (False after it exits)."""
    from triton.runtime.driver import driver

    from .. import library, ops

    return (isinstance(driver._active, _Sm90Driver) or library.backend_for is not ops.backend_for
            or ops.backend_for.__module__ != ops.__name__
            or any(NOOP_DEVICE in f.device_caches for f in _kernel_functions()))


# ----------------------------------------------------------------------------- timing


def cpu_timer(fn: Callable[[], Any], calls: int) -> list[float]:
    """Seconds of each of ``calls`` calls, each timed alone."""
    clock, samples = time.perf_counter, []
    for _ in range(calls):
        start = clock()
        fn()
        samples.append(clock() - start)
    return samples


def gpu_timer(fn: Callable[[], Any], calls: int) -> list[float]:
    """Seconds per call of ``calls`` back-to-back calls, synchronised at the ends only (one sample)."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return [(time.perf_counter() - start) / calls]


@dataclass(frozen=True)
class Repeats:
    """Warm-up calls per function, then ``rounds`` rounds of ``calls`` calls each."""

    warmup: int
    rounds: int
    calls: int


FULL, QUICK = Repeats(warmup=20, rounds=40, calls=25), Repeats(warmup=3, rounds=3, calls=10)


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch's CPU ops on the calling thread only: a tiny op's parallel region otherwise waits for
    a worker thread to be scheduled, milliseconds on a loaded machine, which is not host cost."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


Samples = dict[str, list[list[float]]]  # function -> rounds -> seconds per call


def measure(thunks: dict[str, Callable[[], Any]], repeats: Repeats, timer: Callable) -> Samples:
    """Samples per function and round, the functions interleaved round by round (order reversed
    every other round) so that a shared machine's load affects them alike; gc off while timing."""
    for fn in thunks.values():
        for _ in range(repeats.warmup):
            fn()
    samples: Samples = {name: [] for name in thunks}
    gc.collect()
    gc.disable()
    try:
        for index in range(repeats.rounds):
            order = list(thunks) if index % 2 == 0 else list(reversed(thunks))
            for name in order:
                samples[name].append(timer(thunks[name], repeats.calls))
    finally:
        gc.enable()
    return samples


def overall_median(samples: Samples, name: str) -> float:
    """Median over every sample of ``name``."""
    return statistics.median(value for values in samples[name] for value in values)


def paired(samples: Samples, plus: Sequence[str], minus: Sequence[str]) -> float:
    """Median over rounds of sum(round medians of ``plus``) - sum(round medians of ``minus``):
    differences of functions timed in the same round, so that slow drifts of load cancel."""
    def round_sum(names: Sequence[str], index: int) -> float:
        return sum(statistics.median(samples[name][index]) for name in names)

    rounds = len(samples[plus[0]])
    return statistics.median(round_sum(plus, i) - round_sum(minus, i) for i in range(rounds))


# ----------------------------------------------------------------------------- layers


# the call-plan lookup: its key (layout strides, pointer alignment, decision context) and the cache
DECISIONS = ("layout_strides", "_alignment", "decision_context", "force_int64_enabled", "_cached_plan")
ALLOCATIONS = ("empty", "empty_like", "empty_strided", "zeros", "zeros_like")


def _raw(owner: Any, name: str) -> Any:
    """``owner.name`` as stored (a class's plain function, not a bound method)."""
    return vars(owner)[name] if isinstance(owner, type) else getattr(owner, name)


class Patch:
    """Attribute replacements, applied and restored around each timed call (a few setattr: no
    context manager, whose own cost would land in the layer)."""

    def __init__(self, replacements: Sequence[tuple[Any, str, Any]]) -> None:
        self.replacements = list(replacements)
        self.originals = [(owner, name, _raw(owner, name)) for owner, name, _ in self.replacements]

    def apply(self) -> None:
        """Install the replacements."""
        for owner, name, value in self.replacements:
            setattr(owner, name, value)

    def restore(self) -> None:
        """Put the originals back."""
        for owner, name, value in self.originals:
            setattr(owner, name, value)

    def around(self, fn: Callable[[], Any]) -> Callable[[], None]:
        """``fn`` run with the replacements in place."""
        def call() -> None:
            self.apply()
            try:
                fn()
            finally:
                self.restore()

        return call


@dataclass
class Recorded:
    """The calls one attribute received while recording: (args, kwargs, result) each."""

    layer: str
    owner: Any
    name: str
    calls: list = field(default_factory=list)


def _record_targets() -> list[tuple[str, Any, str]]:
    """(layer, owner, attribute) of every inner call a breakdown replays or memoises."""
    from .. import library, nn, ops

    return ([("validation", ops, "signature"), ("validation", ops, "validate"), ("validation", library, "validate"),
             ("backend.backward", ops.TritonBackend, "backward"), ("op", nn, "batch_norm_op")]
            + [("plan/config decisions", ops, name) for name in DECISIONS]
            + [("allocation", torch, name) for name in ALLOCATIONS])


def _recorder(log: list, original: Callable) -> Callable:
    def recorded(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        log.append((args, kwargs, result))
        return result

    return recorded


@contextlib.contextmanager
def recording() -> Iterator[list[Recorded]]:
    """Record the calls of ``_record_targets`` made in this context, with their results."""
    records = [Recorded(layer, owner, name) for layer, owner, name in _record_targets()]
    patch = Patch([(r.owner, r.name, _recorder(r.calls, _raw(r.owner, r.name))) for r in records])
    patch.apply()
    try:
        yield records
    finally:
        patch.restore()


def _memo(results: Sequence[Any]) -> Callable:
    """A stand-in returning ``results`` in turn, cyclically: every call of the op makes the same
    calls in the same order, so each gets the object the real call returned when recorded."""
    state = [0]

    def memo(*args: Any, **kwargs: Any) -> Any:
        index = state[0]
        state[0] = (index + 1) % len(results)
        return results[index]

    return memo


def memoised(records: Sequence[Recorded], layer: str) -> Patch:
    """Every attribute of ``layer`` answering with its recorded results (its work knocked out)."""
    return Patch([(r.owner, r.name, _memo([result for *_, result in r.calls]))
                  for r in records if r.layer == layer and r.calls])


def _skip_launch(*args: Any, **kwargs: Any) -> None:
    """``Launch.__call__`` doing nothing: no trace event, nothing reaches Triton."""


def _skip_run(self: Any, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
    """``JITFunction.run`` doing nothing (Triton 3.6-3.9 share this signature)."""


def _launch_without_triton(self: Any, *tensors: Any) -> None:
    """``Launch.__call__`` up to Triton: the trace event and the checks it makes, then no launcher
    call (with ``JITFunction.run`` a no-op too, a first launch reaches nothing either)."""
    trace.record_launch(self.name, self.programs, self.config, self.constexprs)
    if _launch_module._dry_run.get() is None and self._direct[0] is not None:
        _launch_module._launch_hook_installed()


class _DirectFunction:
    """``ops.BatchNormFunction`` without autograd: ``apply`` calls the backend's forward."""

    @staticmethod
    def apply(x, gamma, beta, rest):
        moving_mean, moving_var, settings, backend, keep_stats, call = rest
        result = backend.forward(x, gamma, beta, moving_mean, moving_var, settings, None, keep_mean=keep_stats,
                                 call=call)
        return result[:3] if keep_stats else result.y


def knockouts(op: str, records: Sequence[Recorded]) -> dict[str, Patch]:
    """Per layer, the patch that removes its work from ``op``'s call (or from its backward)."""
    from triton.runtime.jit import JITFunction

    from .. import launch, ops

    patches = {layer: memoised(records, layer) for layer in ("plan/config decisions", "allocation")}
    patches["launches"] = Patch([(launch.Launch, "__call__", _skip_launch)])
    patches["  of which Triton run"] = Patch([(launch.Launch, "__call__", _launch_without_triton),
                                             (JITFunction, "run", _skip_run)])
    if op == "forward_backward":
        return patches
    patches["validation"] = memoised(records, "validation")
    patches["autograd Function"] = Patch([(ops, "BatchNormFunction", _DirectFunction),
                                          (ops, "_function_apply", _DirectFunction.apply)])
    return patches


def breakdown_thunks(op: str, call: Callable[[], Any], t: Tensors) -> dict[str, Callable[[], Any]]:
    """The functions whose times give ``op``'s layers (``layers``), from one recorded call: the
    call with each layer knocked out.  Forward + backward: the forward timed alone, and the
    backend's backward replayed alone, whole and with each layer knocked out (a knocked-out
    step would hand AccumulateGrad a dx the stand-in still holds, which it then copies)."""
    if op == "forward_backward":
        forward = tritonbn_call("training_forward", t)
        y = forward()
        with recording() as records:
            y.backward(t.dy)
        backward = next(r for r in records if r.layer == "backend.backward")
        (args, kwargs, _), = backward.calls
        target = _raw(backward.owner, backward.name)
        replayed = lambda: target(*args, **kwargs)  # noqa: E731
        return {"forward": forward, "backward": replayed,
                **{f"without {layer}": patch.around(replayed) for layer, patch in knockouts(op, records).items()}}
    with recording() as records:
        call()
    thunks = {f"without {layer}": patch.around(call) for layer, patch in knockouts(op, records).items()}
    if op == "nn_training_forward":
        batch_norm_op = next(r for r in records if r.layer == "op")
        (args, kwargs, _), = batch_norm_op.calls
        target = _raw(batch_norm_op.owner, batch_norm_op.name)
        thunks["op"] = lambda: target(*args, **kwargs)
    return thunks


def layers(op: str, samples: Samples) -> list[tuple[str, float]]:
    """(layer, seconds) of ``op`` from the samples of "call" and ``breakdown_thunks``; "other" is
    the call minus the layers listed before it (the "of which" rows excluded)."""
    whole = "backward" if op == "forward_backward" else "call"

    def cost(layer: str) -> float:
        return paired(samples, [whole], [f"without {layer}"])

    work = ["plan/config decisions", "allocation", "launches", "  of which Triton run"]
    if op == "forward_backward":
        rows = [("forward call", overall_median(samples, "forward")),
                ("autograd backward", paired(samples, ["call"], ["forward", "backward"]))]
        rows += [(layer, cost(layer)) for layer in work]
    elif op == "nn_training_forward":
        rows = [("module", paired(samples, ["call"], ["op"]))]
        rows += [(layer, cost(layer)) for layer in ["validation", *work, "autograd Function"]]
    else:
        rows = [(layer, cost(layer)) for layer in ["validation", *work, "autograd Function"]]
    listed = sum(value for name, value in rows if not name.startswith(" "))
    return rows + [("other", overall_median(samples, "call") - listed)]


# ----------------------------------------------------------------------------- one op


@dataclass
class Result:
    """One op on one case: host µs per call (medians; minimums too) and its layers."""

    op: str
    shape: str
    layout: str
    torch_shape: str
    tritonbn_us: float
    torch_us: float
    ratio: float
    target: float
    met: bool
    tritonbn_min_us: float
    torch_min_us: float
    launches_traced: int
    launches_reached_launcher: int | None
    layers: list[dict] = field(default_factory=list)
    torch_cuda_us: float | None = None


def _launch_check(call: Callable[[], Any], counter: LaunchCounter | None) -> tuple[int, int | None]:
    """(launches the trace recorded, launches that reached the no-op launcher) over one call."""
    import tritonbn

    before = counter.calls if counter else 0
    with tritonbn.trace.capture() as traced:
        call()
    return len(traced.launches), (counter.calls - before) if counter else None


def measure_op(op: str, case: Case, dtype: torch.dtype, device: str, repeats: Repeats, timer: Callable,
               counter: LaunchCounter | None) -> Result:
    """Time ``op`` on ``case``: tritonbn, torch's tiny CPU call, (GPU) torch on the same tensors,
    and the layers of the tritonbn call."""
    grad = op != "inference"
    t = make_tensors(case.shape, case.layout, dtype, device, grad)
    tiny = make_tensors(torch_shape(case), case.layout, dtype, "cpu", grad)
    call = tritonbn_call(op, t)
    call()  # compiles, and builds the layer's state (the nn layer's first call)
    thunks = {"call": call, "torch": torch_call(op, tiny), **breakdown_thunks(op, call, t)}
    if device != "cpu":
        thunks["torch_cuda"] = torch_call(op, t)
    traced, reached = _launch_check(call, counter)
    return _result(op, case, measure(thunks, repeats, timer), traced, reached)


def _result(op: str, case: Case, samples: Samples, traced: int, reached: int | None) -> Result:
    us = 1e6
    tritonbn_us, torch_us = overall_median(samples, "call") * us, overall_median(samples, "torch") * us
    return Result(op=op, shape="x".join(map(str, case.shape)), layout=case.layout,
                  torch_shape="x".join(map(str, torch_shape(case))), tritonbn_us=tritonbn_us, torch_us=torch_us,
                  ratio=tritonbn_us / torch_us, target=TARGETS[op], met=tritonbn_us / torch_us <= TARGETS[op],
                  tritonbn_min_us=min(map(min, samples["call"])) * us,
                  torch_min_us=min(map(min, samples["torch"])) * us,
                  launches_traced=traced, launches_reached_launcher=reached,
                  layers=[{"layer": name, "us": value * us} for name, value in layers(op, samples)],
                  torch_cuda_us=overall_median(samples, "torch_cuda") * us if "torch_cuda" in samples else None)


# ----------------------------------------------------------------------------- report


OP_LABELS = {"inference": "inference", "training_forward": "training forward",
             "forward_backward": "forward + backward", "nn_training_forward": "nn.BatchNorm{}d training forward"}


def op_label(op: str, shape: str) -> str:
    """The op's name in the tables (the nn layer's by the data's rank)."""
    return OP_LABELS[op].format(NN_DIMS.get(len(shape.split("x")), 2))


def method_text(method: str) -> str:
    """One line saying how the numbers were measured."""
    import triton

    if method == "cpu":
        return (f"CPU, no-op CUDA launcher, Triton {triton.__version__}, kernels compiled for sm_90 "
                f"(torch {torch.__version__}); median of per-call time.perf_counter")
    return (f"GPU wall clock ({torch.cuda.get_device_name()}), back-to-back calls synchronised at the ends, "
            f"Triton {triton.__version__}, torch {torch.__version__}")


def format_table(results: Sequence[Result], gpu: bool) -> str:
    """The per-op table: tritonbn µs, torch µs, ratio, target, met."""
    header = (f"{'op':32s} {'shape':26s} {'tritonbn µs':>11s} {'torch µs':>9s} {'ratio':>7s} {'target':>7s} "
              f"{'met?':4s}" + (f" {'torch cuda µs':>13s}" if gpu else ""))
    lines = [header, "-" * len(header)]
    for r in results:
        lines.append(f"{op_label(r.op, r.shape):32s} {shape_label(r.shape, r.layout):26s} {r.tritonbn_us:11.1f} "
                     f"{r.torch_us:9.1f} {r.ratio:6.2f}x {'<=' + format(r.target, '.1f') + 'x':>7s} "
                     f"{'yes' if r.met else 'no':4s}" + (f" {r.torch_cuda_us:13.1f}" if gpu else ""))
    return "\n".join(lines)


def format_layers(results: Sequence[Result]) -> str:
    """Per op and case: each layer's µs and share of the call, then the legend of how each is measured."""
    lines = []
    for r in results:
        lines.append(f"{op_label(r.op, r.shape)}, {shape_label(r.shape, r.layout)}: {r.tritonbn_us:.1f} µs "
                     f"({r.launches_traced} launch{'' if r.launches_traced == 1 else 'es'})")
        for row in r.layers:
            lines.append(f"  {row['layer']:26s} {row['us']:8.1f} µs {100 * row['us'] / r.tritonbn_us:5.0f}%")
    used = {row["layer"] for r in results for row in r.layers}
    lines.append("how each layer is measured:")
    lines += [f"  {name.strip():22s} {text}" for name, text in LAYER_METHODS.items() if name in used]
    return "\n".join(lines)


def command(args: argparse.Namespace, method: str) -> str:
    """The command line that reproduces this run."""
    shapes = " ".join(f"--shape {case.spec}" for case in args.shape or map(parse_case, DEFAULT_SHAPES))
    ops = "" if args.ops is None else f" --ops {','.join(args.ops)}"
    prefix = "env -u TRITON_INTERPRET " if method == "cpu" else ""
    return (f"{prefix}python -m tritonbn overhead --method {method} --dtype {args.dtype} {shapes}{ops}"
            + (" --quick" if args.quick else ""))


# ----------------------------------------------------------------------------- command


def _op_list(text: str) -> list[str]:
    ops = text.split(",")
    unknown = sorted(set(ops) - set(OPS))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown ops {unknown}; choose from {','.join(OPS)}")
    return ops


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``tritonbn overhead``'s options."""
    parser.add_argument("--shape", type=parse_case, action="append",
                        help=f"data shape[:layout] (repeatable; default {' and '.join(DEFAULT_SHAPES)}); "
                             f"layouts: {', '.join(LAYOUTS)}")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp16", help="data dtype (default fp16)")
    parser.add_argument("--ops", type=_op_list, help=f"comma-separated subset of {','.join(OPS)}")
    parser.add_argument("--method", choices=("auto", "cpu", "gpu"), default="auto",
                        help="gpu: wall clock on CUDA; cpu: compiled kernels, no-op launcher (auto: gpu if present)")
    parser.add_argument("--quick", action="store_true", help="few repeats (tests); numbers are rough")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")


def _method(requested: str) -> str:
    gpu_ready = torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1"
    if requested == "gpu" and not gpu_ready:
        raise SystemExit("tritonbn overhead --method gpu needs a CUDA GPU and TRITON_INTERPRET unset")
    if requested == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("tritonbn overhead compiles kernels: unset TRITON_INTERPRET")
    return requested if requested != "auto" else ("gpu" if gpu_ready else "cpu")


def measure_all(method: str, cases: Sequence[Case], ops: Sequence[str], dtype: torch.dtype,
                repeats: Repeats) -> tuple[list[Result], list | None]:
    """Every op on every case; and (CPU method) the targets the kernels were compiled for."""
    cpu = method == "cpu"
    with one_thread(), (compiled_sm90_on_cpu() if cpu else contextlib.nullcontext()) as counter:
        results = [measure_op(op, case, dtype, "cpu" if cpu else "cuda", repeats, cpu_timer if cpu else gpu_timer,
                              counter) for case in cases for op in ops]
    return results, sorted(counter.targets) if counter else None


def report_text(args: argparse.Namespace, method: str, repeats: Repeats, results: Sequence[Result],
                targets: list | None) -> str:
    """What ``run`` prints: method, command, both tables, and (CPU) the launch-path check."""
    tiny = ", ".join(sorted({r.torch_shape for r in results}))
    lines = [f"method: {method_text(method)}", f"reproduce: {command(args, method)}",
             f"timing: per function {repeats.warmup} warm-up calls, then {repeats.rounds} rounds x {repeats.calls} "
             "calls, the functions of an op interleaved round by round; medians",
             f"torch's call: the same op on a tiny CPU tensor ({tiny}, same dtype and memory format, requires_grad "
             "as tritonbn's), torch on 1 CPU thread" + ("; torch cuda µs: on tritonbn's CUDA tensors"
                                                       if method == "gpu" else ""),
             format_table(results, gpu=method == "gpu"), "", format_layers(results)]
    if targets is not None:
        traced, reached = sum(r.launches_traced for r in results), sum(r.launches_reached_launcher for r in results)
        lines.append(f"launch path: {traced} launches traced, {reached} reached the no-op launcher; "
                     f"kernels compiled for {', '.join(f'{b} sm_{a}' for b, a in targets)}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    """Measure every op on every case; print the tables (and write ``--json``)."""
    method = _method(args.method)
    repeats = QUICK if args.quick else FULL
    results, targets = measure_all(method, args.shape or [parse_case(spec) for spec in DEFAULT_SHAPES],
                                   args.ops or list(OPS), DTYPES[args.dtype], repeats)
    print(report_text(args, method, repeats, results, targets))
    if args.json:
        report = dict(method=method, description=method_text(method), command=command(args, method),
                      dtype=args.dtype, compiled_for=targets, results=[asdict(r) for r in results],
                      launcher_uninstalled=not noop_launcher_installed() if method == "cpu" else None)
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=1)
        print(f"wrote {args.json}")
    return 0
