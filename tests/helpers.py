"""What the tests share: input builders, the paths, the run-and-compare harness, tolerances.

* Inputs: ``make_inputs`` (random data with per-channel offsets and scales, in a layout of
  ``apply_layout``), ``GEOMETRIES`` (named (shape, axis, layout) cases, ranks 1-5).
* Paths: ``KERNEL_PATHS`` ("triton", "triton-split", "reference", "cuda", "cuda-split"),
  conftest's ``path`` fixture runs a test on them (``on_every_path``, ``on_both_triton_paths``;
  ``select_path`` sets one up), ``on_path`` / ``split_path`` are the same as contexts, and
  ``assert_path`` checks from the trace what ran.
* Harness: ``run_and_compare(inp, dy, path=..., **batch_norm_kwargs)`` runs one forward
  (``output_mean_var``) and backward and compares every output with ``tritonbn.reference`` in
  float64 (``expected``) at ``TOLERANCES``; ``run_step`` is the run alone.

``DEVICE`` is where ``make_inputs`` puts its tensors: "cpu", or "cuda" on the cuda paths
(``on_path`` sets it).  Values are drawn on the CPU first, so both devices see the same numbers;
``assert_close`` compares on the CPU.
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

import pytest
import torch

import tritonbn
from tritonbn import reference
from tritonbn.autotune import PERSISTENT_OFF, KernelConfig, override_configs

CUDA_MODE = os.environ.get("TRITONBN_TEST_DEVICE", "cpu") == "cuda"
DEVICE = "cpu"

# (atol, rtol) against float64 math, per data dtype.
TOLERANCES = {
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float32: (2e-5, 2e-5),
    torch.float64: (1e-10, 1e-10),
}


# (shape, axis, layout) by name: every rank 1-5, every axis (negative ones too), every layout
# family (channel-major, channel-minor, permuted and step-sliced storage, four reduced groups).
GEOMETRIES = {
    "rank1": ((7,), 0, "contiguous"),
    "rank1-axis-1": ((7,), -1, "contiguous"),
    "2d-nc": ((9, 4), 1, "contiguous"),
    "2d-axis0": ((9, 4), 0, "contiguous"),
    "2d-5x3": ((5, 3), 1, "contiguous"),
    "2d-5x3-axis0": ((5, 3), 0, "contiguous"),
    "2d-permuted": ((5, 3), -1, "permuted"),
    "3d-axis0": ((4, 3, 5), 0, "contiguous"),
    "3d-middle": ((3, 4, 5), 1, "contiguous"),
    "3d-4x3x5-middle": ((4, 3, 5), 1, "contiguous"),
    "3d-last": ((4, 3, 5), 2, "contiguous"),
    "3d-axis-1": ((3, 5, 4), -1, "contiguous"),
    "3d-sliced-axis-2": ((4, 3, 5), -2, "sliced"),
    "3d-permuted": ((3, 5, 4), 2, "permuted"),
    "nchw": ((2, 3, 4, 5), 1, "contiguous"),
    "nhwc": ((2, 3, 4, 5), 1, "channels_last"),
    "4d-axis-1": ((2, 3, 4, 5), -1, "contiguous"),
    "nhwc-axis2": ((2, 3, 4, 5), 2, "channels_last"),
    "4d-permuted-axis0": ((2, 3, 4, 5), 0, "permuted"),
    "4d-sliced": ((2, 3, 4, 5), 1, "sliced"),
    "ncdhw": ((2, 3, 2, 3, 4), 1, "contiguous"),
    "ndhwc": ((2, 3, 2, 3, 4), 1, "channels_last_3d"),
    "5d-axis-2": ((2, 3, 2, 3, 4), -2, "contiguous"),
    "5d-permuted-axis4": ((2, 3, 2, 3, 4), 4, "permuted"),
    "5d-stepped": ((2, 3, 2, 3, 4), 1, "stepped"),
    "5d-stepped-ndhwc": ((2, 3, 2, 3, 4), 1, "stepped_channels_last_3d"),
}


def param_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def apply_layout(x: torch.Tensor, layout: str, axis: int) -> torch.Tensor:
    """``x`` (contiguous) re-laid-out with the same values.

    layouts: "contiguous", "channels_last" (4-D), "channels_last_3d" (5-D), "permuted" (stored
    in reversed dim order), "sliced" (a view with a step on the last dim and an offset),
    "stepped" (5-D, axis 1: steps on D and W, four reduced groups, channel-major) and
    "stepped_channels_last_3d" (steps on N, D and W of NDHWC storage: four groups, channel-minor).
    """
    if layout == "contiguous":
        return x
    if layout == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if layout == "channels_last_3d":
        return x.contiguous(memory_format=torch.channels_last_3d)
    if layout == "permuted":
        order = list(range(x.dim()))[::-1]
        return x.permute(order).contiguous().permute(order)
    if layout == "sliced":
        big_shape = list(x.shape)
        big_shape[-1] = 2 * big_shape[-1] + 1
        big = torch.full(big_shape, float("nan"), dtype=x.dtype, device=x.device)
        view = big[..., 1::2]
        view.copy_(x)
        return view
    if layout == "stepped":
        return _stepped(x, (2, 4), torch.contiguous_format)
    if layout == "stepped_channels_last_3d":
        return _stepped(x, (0, 2, 4), torch.channels_last_3d)
    raise ValueError(layout)


def _stepped(x: torch.Tensor, dims: tuple[int, ...], memory_format: torch.memory_format) -> torch.Tensor:
    """``x`` copied into a view with step 2 (and offset 1) on ``dims`` of a NaN-filled tensor
    stored in ``memory_format``."""
    big_shape = [2 * size + 1 if d in dims else size for d, size in enumerate(x.shape)]
    big = torch.full(big_shape, float("nan"), dtype=x.dtype, device=x.device).contiguous(memory_format=memory_format)
    view = big[tuple(slice(1, None, 2) if d in dims else slice(None) for d in range(x.dim()))]
    view.copy_(x)
    return view


@dataclass
class Inputs:
    """One call's tensors; ``clone_stats`` gives fresh copies of the moving statistics."""

    x: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    moving_mean: torch.Tensor
    moving_var: torch.Tensor

    def clone_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.moving_mean.clone(), self.moving_var.clone()


def make_inputs(
    shape: tuple[int, ...],
    axis: int,
    dtype: torch.dtype,
    layout: str = "contiguous",
    seed: int = 0,
    param_dtype: torch.dtype | None = None,
) -> Inputs:
    """Random inputs with a per-channel offset and scale, so channels differ."""
    gen = torch.Generator().manual_seed(seed)
    channels = shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = channels
    offset = torch.randn(channels, generator=gen, dtype=torch.float64).reshape(bshape) * 3
    scale = (torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5).reshape(bshape)
    x = (torch.randn(shape, generator=gen, dtype=torch.float64) * scale + offset).to(dtype)
    x = apply_layout(x.to(DEVICE), layout, axis % len(shape))
    pdt = param_dtype or param_dtype_for(dtype)
    gamma = (torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5).to(pdt)
    beta = torch.randn(channels, generator=gen, dtype=torch.float64).to(pdt)
    moving_mean = torch.randn(channels, generator=gen, dtype=torch.float64).to(pdt)
    moving_var = (torch.rand(channels, generator=gen, dtype=torch.float64) + 0.5).to(pdt)
    return Inputs(x, *(t.to(DEVICE) for t in (gamma, beta, moving_mean, moving_var)))


# ----------------------------------------------------------------------------- paths
#
# A test's *path* names what runs its calls: "triton" (the Triton kernels as dispatched, which is
# the single-pass kernels at the tests' sizes), "triton-split" (the Triton split path: persistent
# kernels off, so statistics partials, finalize and elementwise launches run), "reference" (the
# plain-torch CPU path), and in CUDA mode "cuda" / "cuda-split" (the compiled kernels on CUDA
# tensors).  conftest's ``path`` fixture runs a test on each (``on_every_path`` adds the split
# paths to its default three); ``on_path`` is the same switch as a context.

KERNEL_PATHS = ("triton", "triton-split", "reference", "cuda", "cuda-split")
on_every_path = pytest.mark.parametrize("path", KERNEL_PATHS, indirect=True)
# The two Triton paths, named by what runs at the tests' sizes.
on_both_triton_paths = pytest.mark.parametrize(
    "path", [pytest.param("triton", id="single-pass"), pytest.param("triton-split", id="split")], indirect=True)


def _backend_of(path: str) -> tuple[str | None, str]:
    """(TRITON_INTERPRET, DEVICE) of ``path``: the cuda paths leave TRITON_INTERPRET as it is."""
    base = path.partition("-")[0]
    return (None, "cuda") if base == "cuda" else ("1" if base == "triton" else "0", "cpu")


def select_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set up ``path`` (one of ``KERNEL_PATHS``) for one test with ``monkeypatch`` (conftest's
    ``path`` fixture, which also enters ``split_path`` on the "-split" ones), or skip the test
    when the mode (CPU or CUDA, conftest) does not run that path."""
    on_cuda = path.startswith("cuda")
    if on_cuda != CUDA_MODE:
        pytest.skip("the cuda path runs with TRITONBN_TEST_DEVICE=cuda" if on_cuda
                    else "CUDA mode runs only the cuda path")
    interpret, device = _backend_of(path)
    if interpret is not None:
        monkeypatch.setenv("TRITON_INTERPRET", interpret)
    monkeypatch.setattr(sys.modules[__name__], "DEVICE", device)


@contextlib.contextmanager
def split_path(**configs: KernelConfig) -> Iterator[None]:
    """The Triton split path in this context: persistent kernels off, ``configs`` (e.g.
    ``reduce=KernelConfig(2, 8, split_rows=2)`` for several programs per channel) forced.
    Per thread (the overrides are ContextVars)."""
    with override_configs(persistent=PERSISTENT_OFF, **configs):
        yield


@contextlib.contextmanager
def on_path(path: str, **split_configs: KernelConfig) -> Iterator[None]:
    """``select_path`` as a context, for code that cannot take a fixture (hypothesis examples,
    a part of a test): dispatch the calls in it to ``path`` -- TRITON_INTERPRET as the path needs
    (CPU tensors then run the interpreted kernels or the torch path), ``DEVICE`` "cuda" on the
    cuda paths, the split path on "-split" ones with ``split_configs`` forced (ignored on the
    others).  Everything is restored on exit; no skip."""
    module = sys.modules[__name__]
    interpret, device = _backend_of(path)
    saved_env, saved_device = os.environ.get("TRITON_INTERPRET"), module.DEVICE
    if interpret is not None:
        os.environ["TRITON_INTERPRET"] = interpret
    module.DEVICE = device
    try:
        with split_path(**split_configs) if path.endswith("-split") else contextlib.nullcontext():
            yield
    finally:
        module.DEVICE = saved_device
        if saved_env is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved_env


def on_device(t: torch.Tensor) -> torch.Tensor:
    """``t`` on ``DEVICE`` (its layout kept)."""
    return t.to(DEVICE)


def backend_name(path: str) -> str:
    """The backend a path runs (``trace.paths``): the cuda paths run the Triton kernels."""
    return "reference" if path == "reference" else "triton"


REDUCTIONS = ("_stats", "_backward_reduce")  # the kernels a forced ``reduce`` config applies to


def reductions(trace: tritonbn.trace.Trace) -> list:
    """The launches of the statistics and backward reductions (either family)."""
    return [launch for launch in trace.launches
            if launch.kernel.startswith("channel_") and launch.kernel.endswith(REDUCTIONS)]


def assert_path(trace: tritonbn.trace.Trace, path: str, *, ops: int = 2, family: str | None = None,
                split_configs: dict | None = None, batch_stats: bool = True) -> None:
    """``trace`` holds ``ops`` ops that all ran on ``path``; on the Triton paths every kernel is of
    ``family`` when given, the split path launched no single-pass kernel, and a
    forced ``reduce`` config ran every reduction of a call with batch statistics."""
    assert trace.paths == [backend_name(path)] * ops, f"requested {path}, ran {trace.paths}"
    if path == "reference":
        assert trace.launches == [], trace.kernels()
        return
    if family is not None:
        assert trace.kernels() and all(k.startswith(family) for k in trace.kernels()), trace.kernels()
    if path.endswith("-split"):
        assert not any("persistent" in k for k in trace.kernels()), f"the split path ran {trace.kernels()}"
        forced = (split_configs or {}).get("reduce")
        if forced is not None and batch_stats:
            launched = reductions(trace)
            assert launched and all(launch.config == forced for launch in launched), trace.kernels()


# ----------------------------------------------------------------------------- run and compare

OUTPUTS = ("y", "mean", "invstd", "moving_mean", "moving_var", "dx", "dgamma", "dbeta")
FORWARD_OUTPUTS = OUTPUTS[:5]
BACKWARD_OUTPUTS = OUTPUTS[5:]
# dgamma and dbeta sum m terms of order one: their tolerance is scaled by this.
SUM_SCALE = {"dgamma": 4.0, "dbeta": 4.0}

# (training, fix_gamma, use_global_stats) of the four modes, as keyword arguments of a step.
FLAGS = {
    "train": dict(training=True, fix_gamma=False, use_global_stats=False),
    "train-fix-gamma": dict(training=True, fix_gamma=True, use_global_stats=False),
    "infer": dict(training=False, fix_gamma=False, use_global_stats=False),
    "global-stats": dict(training=True, fix_gamma=False, use_global_stats=True),
}

# A step's keyword arguments unless the caller gives them: MXNet's eps and momentum, but
# training with gamma (batch_norm itself defaults to inference with fix_gamma=True).
STEP_DEFAULTS = dict(eps=1e-3, momentum=0.9, fix_gamma=False, use_global_stats=False, axis=1, training=True,
                     unbiased_update=False)


def expected(inp: Inputs, dy: torch.Tensor | None, **op_kwargs) -> dict[str, torch.Tensor]:
    """Every output of one step (``OUTPUTS``; ``FORWARD_OUTPUTS`` without ``dy``) by
    ``tritonbn.reference`` in float64, on copies of the moving statistics (``inp`` is not
    modified).  A fused step (``act_type``, ``addend`` in ``op_kwargs``) also gives "daddend";
    its ReLU passes the gradient where the output rounded to the data dtype is positive."""
    kw = {**STEP_DEFAULTS, **op_kwargs}
    addend, relu = kw.pop("addend", None), kw.pop("act_type", None) == "relu"
    ax = kw["axis"] % inp.x.dim()
    batch_stats = kw["training"] and not kw["use_global_stats"]
    x, gamma = inp.x.detach().double(), inp.gamma.detach().double()
    mm, mv = inp.moving_mean.double().clone(), inp.moving_var.double().clone()
    y, mean, invstd = reference.forward(
        x, gamma, inp.beta.detach().double(), mm, mv, axis=ax, eps=kw["eps"], momentum=kw["momentum"],
        fix_gamma=kw["fix_gamma"], batch_stats=batch_stats, update_moving=batch_stats,
        unbiased_update=kw["unbiased_update"], addend=None if addend is None else addend.detach().double(), relu=relu)
    forward = dict(y=y, mean=mean, invstd=invstd, moving_mean=mm, moving_var=mv)
    if dy is None:
        return forward
    dy = dy.double()
    if relu:
        dy = reference.gate(dy, reference.relu_passes(y.to(inp.x.dtype)))
    dx, dgamma, dbeta = reference.backward(dy, x, gamma, mean, invstd, axis=ax, fix_gamma=kw["fix_gamma"],
                                           batch_stats=batch_stats)
    return dict(forward, dx=dx, dgamma=dgamma, dbeta=dbeta, **({} if addend is None else dict(daddend=dy)))


def run_step(inp: Inputs, dy: torch.Tensor, **op_kwargs) -> tuple[dict[str, torch.Tensor], tritonbn.trace.Trace]:
    """One forward (``output_mean_var``) and backward (for data, gamma and beta) through
    ``tritonbn.batch_norm`` on the current path; ``inp``'s moving statistics are updated as
    the op does.  Returns every output (``OUTPUTS``, and "daddend" for a fused ``addend``) and the
    trace of both ops."""
    kw = {**STEP_DEFAULTS, **op_kwargs}
    # detached, not copied: a write into any input shows in ``inp``
    x, gamma, beta = (t.detach().requires_grad_(True) for t in (inp.x, inp.gamma, inp.beta))
    addend = kw.pop("addend", None)
    wrt = (x, gamma, beta)
    if addend is not None:
        addend = addend.detach().requires_grad_(True)
        wrt += (addend,)
    with tritonbn.trace.capture() as trace:
        y, mean, invstd = tritonbn.batch_norm(x, gamma, beta, inp.moving_mean, inp.moving_var, output_mean_var=True,
                                              **kw, **({} if addend is None else dict(addend=addend)))
        grads = torch.autograd.grad(y, wrt, dy)
    got = dict(y=y.detach(), mean=mean, invstd=invstd, moving_mean=inp.moving_mean, moving_var=inp.moving_var,
               dx=grads[0], dgamma=grads[1], dbeta=grads[2], **({} if addend is None else dict(daddend=grads[3])))
    return got, trace


def make_addend(inp: Inputs, layout: str = "contiguous", seed: int = 5) -> torch.Tensor:
    """A random addend for ``inp``'s data (its shape and dtype, on ``DEVICE``) in ``layout``."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(tuple(inp.x.shape), generator=gen, dtype=torch.float64).to(inp.x.dtype)
    return apply_layout(values.to(DEVICE), layout, 0)


class Result(NamedTuple):
    """What ``run_and_compare`` ran: tritonbn's outputs, the float64 reference's, the trace."""

    got: dict[str, torch.Tensor]
    want: dict[str, torch.Tensor]
    trace: tritonbn.trace.Trace


def run_and_compare(inp: Inputs, dy: torch.Tensor, *, path: str | None = None, split_configs: dict | None = None,
                    compare: tuple[str, ...] = OUTPUTS, scale: float | dict[str, float] | None = None,
                    **op_kwargs) -> Result:
    """The tests' harness: one step (``run_step``) against the float64 reference (``expected``).

    path: the path the step must have run on (``assert_path``).  On "-split" paths the step runs
        on the split path with ``split_configs`` forced (a forced ``reduce`` must have run the
        reductions); the backend itself (TRITON_INTERPRET, the device) is the caller's, set by
        conftest's ``path`` fixture or ``on_path``.
    compare: the outputs checked with ``assert_close`` at the data dtype's ``TOLERANCES``, times
        ``scale`` (one factor, or per output; default ``SUM_SCALE``); () to check nothing here.
    op_kwargs: batch_norm's keyword arguments (``STEP_DEFAULTS`` for the rest).
    """
    want = expected(inp, dy, **op_kwargs)
    split = path is not None and path.endswith("-split")
    with split_path(**(split_configs or {})) if split else contextlib.nullcontext():
        got, trace = run_step(inp, dy, **op_kwargs)
    if path is not None:
        kw = {**STEP_DEFAULTS, **op_kwargs}
        assert_path(trace, path, split_configs=split_configs,
                    batch_stats=kw["training"] and not kw["use_global_stats"])
    scales = scale if isinstance(scale, dict) else SUM_SCALE if scale is None else dict.fromkeys(compare, scale)
    for name in compare:
        assert_close(got[name], want[name], inp.x.dtype, f"{name} ({path or 'as dispatched'})",
                     scale=scales.get(name, 1.0))
    return Result(got, want, trace)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, scale: float = 1.0) -> None:
    """Compare in float64 with the tolerance of ``dtype`` (times ``scale``)."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected.detach().double().cpu(), atol=atol * scale, rtol=rtol * scale, equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )


ROOT = Path(__file__).resolve().parents[1]


def compiling_env() -> dict[str, str]:
    """The environment of a subprocess that compiles kernels (this process imported Triton
    interpreted, and Triton decides that at import): TRITON_INTERPRET unset, the repository first
    on PYTHONPATH."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env
