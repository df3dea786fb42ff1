"""Global-memory traffic of an op, counted in Triton's interpreter.

BatchNorm is memory-bound, so the first question about a kernel design is how many bytes it
moves per byte of data (S = bytes of the data tensor): inference >= 2 S, training forward
>= 2 S, backward >= 3 S.  Under ``TRITON_INTERPRET=1`` every ``tl.load``/``tl.store`` of every
program goes through four methods of the interpreter's builder
(``triton/runtime/interpreter.py``)::

    create_load(ptr, ...)                 create_masked_load(ptrs, mask, other, ...)
    create_store(ptr, value, ...)         create_masked_store(ptrs, value, mask, ...)

``count_traffic()`` wraps them (and the atomics, and ``set_grid_dim``, which marks each launch)
and records, per call, the active lanes (mask true), their element size and the lowest address
touched.  Bytes = element size x active lanes: masked-off lanes move nothing.  Calls nested
inside another hooked call (Triton 3.8's ``create_load`` delegates to ``create_masked_load``)
count once.  After the op, ``attribute`` maps each access to the tensor whose storage holds its
address, which splits the data tensors (x, y, dy, dx) from the per-channel buffers.

What the count means: bytes requested by global loads and stores, an upper bound on DRAM
traffic.  A GPU serves repeated loads of per-channel parameters from cache, and copies that
torch itself makes around the kernels are not kernel loads (``TrafficResult.copies`` lists
them, from the trace).

``measure(op, shape, layout, dtype, axis)`` runs one tritonbn op on CPU tensors and returns a
``TrafficResult``; ``tritonbn traffic`` prints it.
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import os
import sys
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch

__all__ = [
    "OPS",
    "LAYOUTS",
    "Access",
    "TrafficCounter",
    "count_traffic",
    "ensure_interpreter",
    "make_data",
    "measure",
    "TrafficResult",
    "LaunchTraffic",
]

# op name -> what it runs
OPS = {
    "inference": "inference forward (moving statistics)",
    "forward": "training forward (batch statistics, moving-statistics update)",
    "backward": "training backward (dx, dgamma, dbeta)",
    "forward_backward": "training forward + backward",
}
# memory layouts of the data tensor (the channel axis is separate)
LAYOUTS = ("contiguous", "channels_last", "channels_last_3d", "channels_last_1d")

REQUIRED_HOOKS = ("create_load", "create_masked_load", "create_store", "create_masked_store")
OPTIONAL_HOOKS = ("create_atomic_rmw", "create_atomic_cas")
LAUNCH_HOOK = "set_grid_dim"
DATA_TENSORS = ("x", "y", "dy", "dx")
OTHER = "other"


# ----------------------------------------------------------------------------- the hooks


@dataclass(frozen=True)
class Access:
    """One hooked load/store call: its launch (0-based, -1 if unknown), kind, lowest active
    address, bytes moved (element size x active lanes)."""

    launch: int
    kind: str  # "load" | "store" | "atomic"
    address: int
    bytes: int


@dataclass
class TrafficCounter:
    """The accesses recorded while ``count_traffic()`` was active."""

    accesses: list[Access] = field(default_factory=list)
    launches: int = 0  # launches seen (set_grid_dim calls); 0 when that hook is missing

    def total(self, kind: str | None = None) -> int:
        """Bytes of every access (or of one kind: "load", "store", "atomic")."""
        return sum(a.bytes for a in self.accesses if kind is None or a.kind == kind)

    def attribute(self, tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, int]]:
        """Bytes per tensor name and kind; accesses outside every named tensor go to "other".

        A tensor owns the address range of its whole storage (views included); name the
        tensors that stayed alive through the op (inputs and outputs), so no freed temporary
        can have shared their addresses.
        """
        ranges = []
        for name, tensor in tensors.items():
            storage = tensor.untyped_storage()
            start = storage.data_ptr()
            ranges.append((start, start + storage.nbytes(), name))
        split: dict[str, dict[str, int]] = {}
        for access in self.accesses:
            owner = next((name for lo, hi, name in ranges if lo <= access.address < hi), OTHER)
            per_kind = split.setdefault(owner, {})
            per_kind[access.kind] = per_kind.get(access.kind, 0) + access.bytes
        return split

    def per_launch(self) -> list[dict[str, int]]:
        """Bytes per kind of each launch, in launch order (empty when launches are unknown)."""
        out: list[dict[str, int]] = [dict() for _ in range(self.launches)]
        for access in self.accesses:
            if 0 <= access.launch < len(out):
                out[access.launch][access.kind] = out[access.launch].get(access.kind, 0) + access.bytes
        return out


class _HookState(threading.local):
    depth = 0


_state = _HookState()
_counters: list[TrafficCounter] = []
_originals: dict[str, Callable] = {}
_install_lock = threading.Lock()


def _builder_class() -> type:
    """The interpreter's builder class; a RuntimeError when this Triton has none to hook."""
    import triton

    try:
        from triton.runtime import interpreter
    except ImportError as exc:  # pragma: no cover - depends on the installed Triton
        raise RuntimeError(f"Triton {triton.__version__} has no triton.runtime.interpreter: {exc}") from exc
    builder = getattr(interpreter, "InterpreterBuilder", None)
    if builder is None:
        raise RuntimeError(f"Triton {triton.__version__}: triton.runtime.interpreter.InterpreterBuilder is missing; "
                           "the traffic counter cannot hook loads and stores")
    missing = [name for name in REQUIRED_HOOKS if not callable(getattr(builder, name, None))]
    if missing:
        raise RuntimeError(f"Triton {triton.__version__}: InterpreterBuilder lacks {', '.join(missing)}; "
                           "the traffic counter cannot hook loads and stores (supported: Triton 3.6-3.9)")
    return builder


def _element_bytes(handle: Any) -> int:
    dtype = handle.dtype
    while hasattr(dtype, "element_ty"):
        dtype = dtype.element_ty
    return max(1, getattr(dtype, "primitive_bitwidth", 8) // 8)


def _argument(params: list[str], args: tuple, kwargs: dict, names: Sequence[str], index: int) -> Any:
    """An argument of a hooked call, by name (``names``) or else by position (after self)."""
    for name in names:
        if name in kwargs:
            return kwargs[name]
        if name in params:
            position = params.index(name) - 1
            if position < len(args):
                return args[position]
    return args[index] if index < len(args) else None


def _record(kind: str, ptrs: Any, mask: Any, scale: int = 1) -> None:
    import numpy as np

    data = np.asarray(ptrs.data)
    if mask is None:
        active = data.size
        lowest = int(data.min()) if data.size else 0
    else:
        lanes = np.broadcast_to(np.asarray(mask.data, dtype=bool), data.shape)
        active = int(np.count_nonzero(lanes))
        lowest = int(data[lanes].min()) if active else 0
    if not active:
        return
    moved = scale * active * _element_bytes(ptrs)
    for counter in _counters:  # the launch index is per counter: counters may start at different launches
        counter.accesses.append(Access(counter.launches - 1, kind, lowest, moved))


def _wrap(name: str, original: Callable, kind: str, ptr_names: tuple, ptr_index: int,
          mask_index: int | None, scale: int = 1) -> Callable:
    params = list(inspect.signature(original).parameters)

    def hooked(self, *args, **kwargs):
        if _state.depth or not _counters:
            return original(self, *args, **kwargs)
        _state.depth += 1
        try:
            result = original(self, *args, **kwargs)
        finally:
            _state.depth -= 1
        ptrs = _argument(params, args, kwargs, ptr_names, ptr_index)
        mask = None if mask_index is None else _argument(params, args, kwargs, ("mask",), mask_index)
        _record(kind, ptrs, mask, scale)
        return result

    hooked.__name__ = name
    hooked.__wrapped__ = original
    return hooked


def _wrap_launch(original: Callable) -> Callable:
    def hooked(self, *args, **kwargs):
        for counter in _counters:
            counter.launches += 1
        return original(self, *args, **kwargs)

    hooked.__wrapped__ = original
    return hooked


# name -> (kind, names of the pointer argument, its position, mask position or None, scale)
_HOOK_SPECS = {
    "create_load": ("load", ("ptr", "ptrs"), 0, None, 1),
    "create_masked_load": ("load", ("ptrs", "ptr"), 0, 1, 1),
    "create_store": ("store", ("ptr", "ptrs"), 0, None, 1),
    "create_masked_store": ("store", ("ptrs", "ptr"), 0, 2, 1),
    # an atomic reads and writes its lanes
    "create_atomic_rmw": ("atomic", ("ptr", "ptrs"), 1, 3, 2),
    "create_atomic_cas": ("atomic", ("ptr", "ptrs"), 0, None, 2),
}


def _install() -> None:
    builder = _builder_class()
    for name, (kind, ptr_names, ptr_index, mask_index, scale) in _HOOK_SPECS.items():
        original = getattr(builder, name, None)
        if original is None:
            continue  # only the optional atomics may be absent (checked in _builder_class)
        _originals[name] = original
        setattr(builder, name, _wrap(name, original, kind, ptr_names, ptr_index, mask_index, scale))
    launch = getattr(builder, LAUNCH_HOOK, None)
    if launch is not None:
        _originals[LAUNCH_HOOK] = launch
        setattr(builder, LAUNCH_HOOK, _wrap_launch(launch))


def _uninstall() -> None:
    builder = _builder_class()
    for name, original in _originals.items():
        setattr(builder, name, original)
    _originals.clear()


@contextlib.contextmanager
def count_traffic() -> Iterator[TrafficCounter]:
    """Count the global loads/stores of the interpreted kernels run in this context.

    Counters nest (each sees everything run while it is active).  Raises RuntimeError when the
    installed Triton lacks the hook points.
    """
    counter = TrafficCounter()
    with _install_lock:
        if not _counters:
            _install()
        _counters.append(counter)
    try:
        yield counter
    finally:
        with _install_lock:
            _counters.remove(counter)
            if not _counters:
                _uninstall()


def ensure_interpreter() -> None:
    """Select Triton's interpreter for tritonbn's kernels, or fail if it is too late.

    Sets TRITON_INTERPRET=1 (which also routes CPU tensors to the kernels).  Raises RuntimeError
    when tritonbn's kernels were already built as compiled kernels: the variable must be set
    before they are imported.
    """
    kernels = sys.modules.get("tritonbn.kernels")
    if kernels is not None and not _interpreted(kernels):
        raise RuntimeError("counting traffic needs tritonbn's kernels built under TRITON_INTERPRET=1: set it in "
                           "the environment before Triton and tritonbn.kernels are imported")
    os.environ["TRITON_INTERPRET"] = "1"


def _interpreted(package: Any) -> bool:
    """True when the kernel modules of ``package`` hold interpreted (not compiled) kernels."""
    kinds = {type(obj).__name__ for mod in vars(package).values() if inspect.ismodule(mod)
             for obj in vars(mod).values()}
    return "InterpretedFunction" in kinds or "JITFunction" not in kinds


# ----------------------------------------------------------------------------- measuring ops


def make_data(shape: Sequence[int], layout: str, dtype: torch.dtype, seed: int = 0,
              device: str | torch.device = "cpu") -> torch.Tensor:
    """Random data of ``shape`` in a memory layout.

    layouts: "contiguous"; "channels_last" (dim 1 stored fastest: torch.channels_last for
    4-D, channels_last_3d for 5-D, the same stride order built by permutation for 3-D; 2-D
    is already channel-fastest); "channels_last_3d" (5-D); "channels_last_1d" (3-D).
    """
    gen = torch.Generator().manual_seed(seed)
    return in_layout(torch.randn(tuple(shape), generator=gen).to(dtype), layout).to(device)


def in_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` stored in the memory layout ``layout`` (``make_data``'s names)."""
    ndim = x.dim()
    if layout == "contiguous" or (layout == "channels_last" and ndim <= 2):
        return x
    if layout == "channels_last" and ndim == 4:
        return x.contiguous(memory_format=torch.channels_last)
    if layout in ("channels_last", "channels_last_3d") and ndim == 5:
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout in ("channels_last", "channels_last_1d") and ndim == 3:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    raise ValueError(f"layout {layout!r} does not apply to a {ndim}-D shape (layouts: {', '.join(LAYOUTS)})")


@dataclass(frozen=True)
class LaunchTraffic:
    """One launch of an op: kernel name, programs, bytes loaded and stored (-1: unknown)."""

    kernel: str
    programs: int
    loaded: int = -1
    stored: int = -1


@dataclass(frozen=True)
class TrafficResult:
    """What one op moved.  ``tensors`` maps x/y/dy/dx/other to {"load": bytes, "store": bytes}."""

    op: str
    shape: tuple[int, ...]
    layout: str
    dtype: str
    axis: int
    data_bytes: int  # S: bytes of the data tensor
    tensors: dict[str, dict[str, int]]
    launches: tuple[LaunchTraffic, ...]
    copies: tuple[str, ...] = ()

    @property
    def loaded(self) -> int:
        return sum(v.get("load", 0) + v.get("atomic", 0) // 2 for v in self.tensors.values())

    @property
    def stored(self) -> int:
        return sum(v.get("store", 0) + v.get("atomic", 0) // 2 for v in self.tensors.values())

    @property
    def total(self) -> int:
        """All bytes moved by the op's kernels."""
        return self.loaded + self.stored

    @property
    def per_s(self) -> float:
        """Bytes moved / S."""
        return self.total / self.data_bytes if self.data_bytes else float("nan")

    @property
    def data_total(self) -> int:
        """Bytes moved to and from the data tensors (x, y, dy, dx)."""
        return sum(sum(self.tensors.get(name, {}).values()) for name in DATA_TENSORS)

    @property
    def data_per_s(self) -> float:
        return self.data_total / self.data_bytes if self.data_bytes else float("nan")

    @property
    def other_total(self) -> int:
        """Bytes moved to and from everything else (per-channel parameters, partials)."""
        return self.total - self.data_total

    @property
    def n_launches(self) -> int:
        return len(self.launches)

    @property
    def programs(self) -> tuple[int, ...]:
        """Programs of each launch, in launch order."""
        return tuple(launch.programs for launch in self.launches)

    def summary(self) -> str:
        """One line: bytes/S (data + other), launches, programs per launch."""
        programs = "/".join(str(p) for p in self.programs)
        copies = f", {len(self.copies)} torch copies" if self.copies else ""
        return (f"{self.per_s:6.3f} S ({self.data_per_s:.3f} S data + {self.other_total} B other), "
                f"{self.n_launches} launches, programs {programs}{copies}")


def _params(channels: int, requires_grad: bool) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(1)
    gamma = (torch.rand(channels, generator=gen) + 0.5).requires_grad_(requires_grad)
    beta = torch.randn(channels, generator=gen).requires_grad_(requires_grad)
    return gamma, beta, torch.zeros(channels), torch.ones(channels)


FUSIONS = {"relu": ("relu", False), "add": (None, True), "add_relu": ("relu", True)}  # (act_type, addend)


def measure(op: str, shape: Sequence[int], layout: str = "contiguous", dtype: torch.dtype = torch.float32,
            axis: int = 1, *, fix_gamma: bool = False, seed: int = 0,
            fusion: str | None = None) -> TrafficResult | dict[str, TrafficResult]:
    """Count the traffic of one tritonbn op on CPU tensors under Triton's interpreter.

    Args:
        op: "inference", "forward" (training), "backward" (training; the forward runs uncounted
            first), "forward_backward", or "all" (returns {"inference", "forward", "backward",
            "forward_backward"} from two runs: forward_backward is the forward and the
            backward of the same call, counted phase by phase).
        shape, layout, dtype, axis: the data tensor (``make_data`` layouts) and its channel axis.
        fusion: None, or the fused op of ``FUSIONS`` ("relu", "add", "add_relu"): the addend is
            data-shaped in the same layout, and the backward also takes its gradient.
    Returns:
        a TrafficResult (a dict of them for op="all").
    """
    if op not in OPS and op != "all":
        raise ValueError(f"op must be one of {', '.join(OPS)} or all, not {op!r}")
    ensure_interpreter()
    import tritonbn

    x = make_data(shape, layout, dtype, seed)
    act_type, with_addend = FUSIONS[fusion] if fusion is not None else (None, False)
    addend = make_data(shape, layout, dtype, seed + 2) if with_addend else None
    fused = dict(act_type=act_type, addend=addend) if fusion is not None else {}
    channels = x.shape[axis]
    ndim = x.dim()
    meta = dict(shape=tuple(x.shape), layout=layout, dtype=str(dtype).replace("torch.", ""),
                axis=axis % ndim if ndim else axis, data_bytes=x.numel() * x.element_size())
    results: dict[str, TrafficResult] = {}

    def counted(name: str, fn: Callable[[], dict[str, torch.Tensor]]) -> TrafficResult:
        with tritonbn.trace.capture() as trace, count_traffic() as counter:
            tensors = fn()
        if trace.path != "triton" or not trace.launches:
            raise RuntimeError(f"{name}: tritonbn ran the {trace.path} path, not the Triton kernels; "
                               "set TRITON_INTERPRET=1 before importing Triton")
        return _result(name, meta, counter, trace, tensors)

    if op in ("inference", "all"):
        gamma, beta, mm, mv = _params(channels, False)

        def inference() -> dict[str, torch.Tensor]:
            with torch.no_grad():
                y = tritonbn.batch_norm(x, gamma, beta, mm, mv, fix_gamma=fix_gamma, axis=axis, **fused)
            return {"x": x, "y": y, **({} if addend is None else {"addend": addend})}

        results["inference"] = counted("inference", inference)
    if op in ("forward", "backward", "forward_backward", "all"):
        gamma, beta, mm, mv = _params(channels, True)
        xg = x.detach().requires_grad_(True)
        dy = make_data(shape, layout, dtype, seed + 1)
        kept: dict[str, torch.Tensor] = {}
        wrt = (xg, gamma, beta)
        if addend is not None:
            fused["addend"] = addend = addend.detach().requires_grad_(True)
            wrt += (addend,)
        extra = {} if addend is None else {"addend": addend}

        def forward() -> dict[str, torch.Tensor]:
            kept["y"] = tritonbn.batch_norm(xg, gamma, beta, mm, mv, fix_gamma=fix_gamma, axis=axis, training=True,
                                            **fused)
            return {"x": xg, "y": kept["y"], **extra}

        def backward() -> dict[str, torch.Tensor]:
            grads = torch.autograd.grad(kept["y"], wrt, dy)
            named = {"daddend": grads[3]} if addend is not None else {}
            return {"x": xg, "y": kept["y"], "dy": dy, "dx": grads[0], **extra, **named}

        results["forward"] = counted("forward", forward)
        if op != "forward":
            results["backward"] = counted("backward", backward)
            results["forward_backward"] = _combine("forward_backward", results["forward"], results["backward"])
    if op == "all":
        return results
    return results[op]


def _result(op: str, meta: dict, counter: TrafficCounter, trace: Any, tensors: dict[str, torch.Tensor]) -> TrafficResult:
    per_launch = counter.per_launch()
    if len(per_launch) != len(trace.launches):
        per_launch = [{} for _ in trace.launches]  # launch hook missing: totals only
        known = False
    else:
        known = True
    launches = tuple(
        LaunchTraffic(launch.kernel, launch.programs,
                      bytes_.get("load", 0) + bytes_.get("atomic", 0) // 2 if known else -1,
                      bytes_.get("store", 0) + bytes_.get("atomic", 0) // 2 if known else -1)
        for launch, bytes_ in zip(trace.launches, per_launch))
    return TrafficResult(op=op, tensors=counter.attribute(tensors), launches=launches,
                         copies=tuple(trace.copies), **meta)


def _combine(op: str, first: TrafficResult, second: TrafficResult) -> TrafficResult:
    tensors: dict[str, dict[str, int]] = {}
    for part in (first, second):
        for name, per_kind in part.tensors.items():
            into = tensors.setdefault(name, {})
            for kind, value in per_kind.items():
                into[kind] = into.get(kind, 0) + value
    return TrafficResult(op=op, shape=first.shape, layout=first.layout, dtype=first.dtype, axis=first.axis,
                         data_bytes=first.data_bytes, tensors=tensors,
                         launches=first.launches + second.launches, copies=first.copies + second.copies)


# ----------------------------------------------------------------------------- the subcommand

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}


def _shape(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.replace("x", ",").split(",") if part)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"shape must be integers like 8,16,14,14, not {text!r}") from exc


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--shape", type=_shape, default=(8, 16, 14, 14), help="data shape, e.g. 8,16,14,14")
    parser.add_argument("--axis", type=int, default=1, help="channel axis (default 1)")
    parser.add_argument("--layout", choices=LAYOUTS, default="contiguous", help="memory layout of the data")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32")
    parser.add_argument("--op", choices=[*OPS, "all"], default="all", help="which op to count (default all)")
    parser.add_argument("--fusion", choices=sorted(FUSIONS), default=None,
                        help="count the fused op: BN + ReLU, BN + add, BN + add + ReLU")


def run(args: argparse.Namespace) -> int:
    ensure_interpreter()
    results = measure(args.op, args.shape, args.layout, _DTYPES[args.dtype], args.axis, fusion=args.fusion)
    if isinstance(results, TrafficResult):
        results = {args.op: results}
    first = next(iter(results.values()))
    print(f"shape {first.shape} axis={first.axis} {first.layout} {first.dtype}: S = {first.data_bytes} bytes "
          "(counted: global loads/stores of the interpreted kernels)")
    for op, result in results.items():
        print(f"{op:17s} {result.summary()}")
        split = ", ".join(f"{name} {sum(v.values()) / result.data_bytes:.3f} S" for name, v in
                          sorted(result.tensors.items()) if name != OTHER)
        print(f"{'':17s} per tensor: {split}; other {sum(result.tensors.get(OTHER, {}).values())} B")
        for launch in result.launches:
            moved = f"{launch.loaded} B in, {launch.stored} B out" if launch.loaded >= 0 else "bytes unknown"
            print(f"{'':17s}   {launch.kernel:32s} {launch.programs:6d} programs  {moved}")
    return 0
