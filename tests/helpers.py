"""Input builders and per-dtype tolerances shared by the tests.

``DEVICE`` is where ``make_inputs`` puts its tensors: "cpu", or "cuda" for the cuda path
(conftest's ``path`` fixture sets it).  Values are drawn on the CPU first, so both devices see the
same numbers; ``assert_close`` compares on the CPU.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import pytest
import torch

CUDA_MODE = os.environ.get("TRITONBN_TEST_DEVICE", "cpu") == "cuda"
DEVICE = "cpu"

# (atol, rtol) against float64 math, per data dtype.
TOLERANCES = {
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
    torch.float32: (2e-5, 2e-5),
    torch.float64: (1e-10, 1e-10),
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


def select_path(path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Set up the execution path ``path`` ("triton", "reference" or "cuda") for one test, or skip
    it when the mode (CPU or CUDA, conftest) does not run that path."""
    if (path == "cuda") != CUDA_MODE:
        pytest.skip("the cuda path runs with TRITONBN_TEST_DEVICE=cuda" if path == "cuda"
                    else "CUDA mode runs only the cuda path")
    if path == "cuda":
        monkeypatch.setattr(sys.modules[__name__], "DEVICE", "cuda")
    else:
        monkeypatch.setenv("TRITON_INTERPRET", "1" if path == "triton" else "0")


def on_device(t: torch.Tensor) -> torch.Tensor:
    """``t`` on ``DEVICE`` (its layout kept)."""
    return t.to(DEVICE)


def backend_name(path: str) -> str:
    """The backend a path runs (``trace.paths``): the cuda path runs the Triton kernels."""
    return "triton" if path == "cuda" else path


def assert_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str, scale: float = 1.0) -> None:
    """Compare in float64 with the tolerance of ``dtype`` (times ``scale``)."""
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected.detach().double().cpu(), atol=atol * scale, rtol=rtol * scale, equal_nan=True,
        msg=lambda m: f"{what}: {m}",
    )

