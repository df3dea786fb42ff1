"""Kernel launches as data: a ``Launch`` is one kernel call of a call plan, decided once per call
signature, and run with the call's tensors.

A launch's scalar arguments, constexprs, grid and config depend only on the signature (shapes,
strides, dtypes, settings), so they are fixed when the plan is made; a call passes only its
tensors.  Every kernel takes its tensor arguments first, then its scalars, then its constexprs.

The first run of a ``Launch`` goes through Triton's ``kernel[grid](...)`` (binder,
specialisation, compiled-kernel cache: about 11 µs); it then keeps the compiled kernel's own
launcher and calls it directly (about 3 µs), with the argument list Triton passes it:

    compiled.run(grid_x, grid_y, grid_z, stream, compiled.function, compiled.packed_metadata,
                 launch_metadata, launch_enter_hook, launch_exit_hook, *every_parameter)

(the same on Triton 3.6 to 3.9; constexpr parameters are passed and ignored by the launcher).
That is valid for as long as Triton itself would pick the same compiled kernel: the call plan is
keyed by everything Triton specialises on (dtypes, the scalars, 16-byte alignment of every
pointer, the device).  The direct path is skipped under the interpreter, while a launch hook is
installed (a profiler's ``knobs.runtime.launch_enter_hook``) and during ``dry_run``; those take
``kernel[grid]``.
"""

from __future__ import annotations

import contextlib
import contextvars
import fractions
import functools
import math
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np

from . import trace
from .autotune.config import KernelConfig

__all__ = ["Launch", "CapturedLaunch", "dry_run", "f64_halves", "f32_ratio", "cdiv"]


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for positive b."""
    return -(-a // b)


def f64_halves(value: float) -> tuple[float, float]:
    """A float64 scalar as two float32 values whose sum is it to ~1e-16 (kernels take float32).

    Beyond float32's range the pair is (+-inf, 0): an eps that large gives invstd = 0, the
    float32 rounding of 1/sqrt(eps) to within 3e-20 (an inf - inf low half would give NaN).
    Only plan-making calls this (once per signature).
    """
    with np.errstate(over="ignore"):
        hi = float(np.float32(value))
    if math.isinf(hi):
        return hi, 0.0
    return hi, float(np.float32(value - hi))


@functools.lru_cache(maxsize=4096)
def f32_ratio(numerator: int, denominator: int) -> float:
    """numerator / denominator rounded to the nearest float32 (ties to even), exactly: a kernel's
    correctly rounded constant (1/m, m/(m-1), 1/split count) computed on the host instead of by a
    division instruction.  (Rounding the float64 quotient again could round twice.)  Cached: the
    exact comparison costs ~50 µs, and launches built per call (SyncBatchNorm's statistics) ask
    for the same counts every step."""
    exact = fractions.Fraction(numerator, denominator)
    guess = np.float32(numerator / denominator)
    candidates = [guess, np.nextafter(guess, np.float32(-np.inf)), np.nextafter(guess, np.float32(np.inf))]
    def key(value: np.float32) -> tuple:
        return abs(fractions.Fraction(float(value)) - exact), int(value.view(np.uint32)) & 1
    return float(min(candidates, key=key))


@dataclass(frozen=True)
class CapturedLaunch:
    """A launch recorded instead of run (``dry_run``): what ``tritonbn inspect`` compiles."""

    kernel: Any
    name: str
    programs: int
    config: KernelConfig
    args: tuple
    constexprs: dict


_dry_run: contextvars.ContextVar[list[CapturedLaunch] | None] = contextvars.ContextVar("tritonbn_dry_run", default=None)


@contextlib.contextmanager
def dry_run() -> Iterator[list[CapturedLaunch]]:
    """Record launches (kernel, arguments, config) instead of running them; outputs stay unwritten."""
    launches: list[CapturedLaunch] = []
    token = _dry_run.set(launches)
    try:
        yield launches
    finally:
        _dry_run.reset(token)


_runtime_knobs: list = []  # triton.knobs.runtime, once a direct launcher exists (no Triton import before)


def _launch_hook_installed() -> bool:
    """Whether a Triton launch hook (a profiler such as proton) wants launch metadata: then
    ``kernel[grid]`` runs, which builds it.  Triton 3.6-3.9 keep the hooks in a ``HookChain``
    (never None; installed when it has calls), older ones as a callable or None."""
    runtime = _runtime_knobs[0]
    enter, leave = runtime.launch_enter_hook, runtime.launch_exit_hook
    # a HookChain's list of calls, or an older hook itself: either is installed when truthy
    return bool(getattr(enter, "calls", enter) or getattr(leave, "calls", leave))


@dataclass(frozen=True, eq=False)
class Launch:
    """One kernel launch of a call plan.

    Attributes:
        kernel: the ``@triton.jit`` function.
        name: its name in traces (``trace.Launch.kernel``).
        programs: the 1-D grid.
        config: the ``KernelConfig`` it was decided with (num_warps, num_stages, block sizes).
        scalars: the non-tensor arguments that follow the tensors, in the kernel's order.
        constexprs: the constexpr arguments by name.
    """

    kernel: Any
    name: str
    programs: int
    config: KernelConfig
    scalars: tuple
    constexprs: dict
    _direct: list = field(default_factory=lambda: [None], repr=False)  # _direct_launcher's tuple, once known

    def __call__(self, *tensors: Any) -> None:
        """Launch on ``tensors`` (the kernel's tensor arguments, in order)."""
        trace.record_launch(self.name, self.programs, self.config, self.constexprs)
        captured = _dry_run.get()
        if captured is not None:
            captured.append(CapturedLaunch(self.kernel, self.name, self.programs, self.config,
                                           (*tensors, *self.scalars), self.constexprs))
            return
        direct = self._direct[0]
        if direct is not None and not _launch_hook_installed():
            run, programs, get_stream, device, function, metadata, tail = direct
            run(programs, 1, 1, get_stream(device), function, metadata, None, None, None, *tensors, *tail)
            return
        compiled = self.kernel[(self.programs,)](*tensors, *self.scalars, **self.constexprs,
                                                 num_warps=self.config.num_warps,
                                                 num_stages=self.config.num_stages)
        if direct is None:
            self._direct[0] = _direct_launcher(self, compiled, len(tensors))


def _direct_launcher(launch: Launch, compiled: Any, tensor_count: int) -> tuple | None:
    """What ``Launch.__call__`` calls the compiled kernel's launcher with besides the tensors:
    (launcher, grid, the stream getter and its device, the CUfunction, the packed metadata, the
    arguments after the tensors), or None where only ``kernel[grid]`` is right (the interpreter
    returns no compiled kernel).  A tuple, not a closure: one Python frame less a launch."""
    if compiled is None or not hasattr(compiled, "packed_metadata"):
        return None
    if hasattr(compiled, "result"):  # an asynchronously compiled kernel (a future)
        return None
    from triton import knobs
    from triton.runtime.driver import driver

    if not _runtime_knobs:
        _runtime_knobs.append(knobs.runtime)
    signature = launch.kernel.signature
    bound = signature.bind(*([None] * tensor_count), *launch.scalars, **launch.constexprs)
    bound.apply_defaults()
    tail = tuple(bound.arguments.values())[tensor_count:]
    run, function, metadata = compiled.run, compiled.function, compiled.packed_metadata
    active = driver.active
    get_stream, device = active.get_current_stream, active.get_current_device()
    return run, launch.programs, get_stream, device, function, metadata, tail
