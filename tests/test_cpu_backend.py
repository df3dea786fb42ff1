"""The torch path on CPU (``tritonbn.cpu_backend.CpuBackend``) tier by tier, against float64 math.

The backend picks a tier per call (torch's batch-norm kernels, pseudo-channels, full-size ops
with the output as scratch, blocks); the ``tier`` tables force each one in turn, so that every
tier meets the same table (through ``helpers.run_and_compare`` on the "reference" path: forward
with output_mean_var and backward, every output against ``tritonbn.reference`` in float64 at
``helpers.TOLERANCES``) and the same hard data: offset data, constant channels with eps = 0, one
element per channel, NaN/Inf, 1e30 / 1e-30 / subnormal float32.  Also: no float64 temporary the
size of float32 data, and float32-level statistics on a channels-last tensor large enough that
torch's own kernel would lose digits.  The torch path as dispatched, over every geometry, dtype
and flag set, is the "reference" part of tests/test_batch_norm.py's table.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

import tritonbn
import tritonbn.kernels  # noqa: F401 - see below
from tritonbn import cpu_backend, ops, reference
from tritonbn.plan import is_dense
from helpers import (FLAGS, GEOMETRIES, TOLERANCES, Inputs, apply_layout, assert_close, expected, make_inputs,
                     run_and_compare)

# torch's batch-norm ops under a TorchDispatchMode (Float64Allocations below) import torch._dynamo
# and with it Triton.  Triton's own @jit library is built interpreted or compiled as
# TRITON_INTERPRET says at its import: importing the kernels here, at collection (conftest sets
# it to 1), keeps the interpreted suite of a session that runs this module first working.

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
DTYPES = {"f16": F16, "bf16": BF16, "f32": F32, "f64": F64}


def _always_none(*args, **kwargs):
    return None


# Each tier forced by switching off the ones above it (the backend reads these module globals
# per call); "shifted-forms" also refuses every one-kernel form.
TIERS = {
    "auto": {},
    "no-torch-kernels": {"_native_training": _always_none, "_native_backward": _always_none,
                         "_pseudo_moments": _always_none, "_pseudo_sums": _always_none},
    "blocks": {"_native_training": _always_none, "_native_backward": _always_none,
               "_pseudo_moments": _always_none, "_pseudo_sums": _always_none, "_scratch_for": _always_none},
    "shifted-forms": {"_fast_ok": lambda *args, **kwargs: False},
}


@pytest.fixture(autouse=True)
def torch_path(monkeypatch):
    """CPU tensors on the torch path: TRITON_INTERPRET unset for ``ops.backend_for``."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.fixture(params=list(TIERS))
def tier(request, monkeypatch) -> str:
    for name, replacement in TIERS[request.param].items():
        monkeypatch.setattr(cpu_backend, name, replacement)
    return request.param


def _check_case(geometry: str, dtype: torch.dtype, flag_id: str, seed: int = 0) -> None:
    """One step of a ``GEOMETRIES`` case on the torch path against float64 math: every output,
    its dtype, and a dense input's strides on y and dx."""
    shape, axis, layout = GEOMETRIES[geometry]
    inp = make_inputs(shape, axis, dtype, layout, seed=seed)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64).to(dtype)
    dy = apply_layout(dy, layout, axis % len(shape))
    got, _, _ = run_and_compare(inp, dy, path="reference", axis=axis, **FLAGS[flag_id])
    assert got["y"].dtype == dtype and got["dx"].dtype == dtype
    assert got["mean"].dtype == reference.stat_dtype(dtype) == got["invstd"].dtype
    if is_dense(inp.x):
        assert got["y"].stride() == inp.x.stride() and got["dx"].stride() == inp.x.stride()


# ----------------------------------------------------------------------------- every tier


TIER_GEOMETRIES = ["2d-nc", "3d-axis-1", "nchw", "nhwc", "4d-sliced", "ndhwc", "5d-stepped"]


@pytest.mark.parametrize("flag_id", ["train", "global-stats"])
@pytest.mark.parametrize("dtype_id", ["bf16", "f32", "f64"])
@pytest.mark.parametrize("geometry", TIER_GEOMETRIES)
def test_every_tier_matches_float64_reference(geometry, dtype_id, flag_id, tier):
    _check_case(geometry, DTYPES[dtype_id], flag_id, seed=4)


def test_cpu_tensors_dispatch_to_the_cpu_backend(monkeypatch):
    """CPU without the interpreter: the CPU backend (trace name "reference"); with it: Triton."""
    backend = ops.backend_for(torch.device("cpu"))
    assert isinstance(backend, cpu_backend.CpuBackend) and backend.name == "reference"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert isinstance(ops.backend_for(torch.device("cpu")), ops.TritonBackend)


# ----------------------------------------------------------------------------- hard data, every tier


def _params(channels: int, dtype=F32, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    gamma = (torch.rand(channels, generator=gen, dtype=F64) + 0.5).to(dtype)
    beta = torch.randn(channels, generator=gen, dtype=F64).to(dtype)
    return gamma, beta, torch.zeros(channels, dtype=dtype), torch.ones(channels, dtype=dtype)


def _hard_step(x, dy, axis=1, eps=1e-3, flags=FLAGS["train"], momentum=0.9):
    """One step of ``x`` (parameters from ``_params``) on the torch path: (got, want, beta)."""
    inp = Inputs(x, *_params(x.shape[axis], reference.stat_dtype(x.dtype)))
    got, want, _ = run_and_compare(inp, dy, path="reference", compare=(), axis=axis, eps=eps, momentum=momentum,
                                   **flags)
    return got, want, inp.beta


def _rel_close(got, want, what, rtol, atol_scale=None):
    want = want.double()
    scale = want.abs().max().item() if atol_scale is None else atol_scale
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=rtol * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


# (id, layout of (4, 3, 6, 5) data)
HARD_LAYOUTS = [pytest.param("contiguous", id="nchw"), pytest.param("channels_last", id="nhwc"),
                pytest.param("sliced", id="sliced")]


@pytest.mark.parametrize("layout", HARD_LAYOUTS)
def test_offset_float32_keeps_its_digits(layout, tier):
    """mean 1e4, std 1e-2 in float32 (a float32 mean alone is 5% of the std off): invstd to 1e-5,
    mean to 1e-7 relative, y and dx to 1e-4 of their largest value."""
    gen = torch.Generator().manual_seed(3)
    x = apply_layout((1e4 + 1e-2 * torch.randn(4, 3, 6, 5, generator=gen, dtype=F64)).float(), layout, 1)
    dy = apply_layout(torch.randn(4, 3, 6, 5, generator=gen, dtype=F64).float(), layout, 1)
    got, want, _ = _hard_step(x, dy, eps=0.0)
    _rel_close(got["invstd"], want["invstd"], "invstd", 1e-5)
    torch.testing.assert_close(got["mean"].double(), want["mean"], rtol=1e-7, atol=0)
    _rel_close(got["y"], want["y"], "y", 1e-4)
    _rel_close(got["dx"], want["dx"], "dx", 1e-4)
    _rel_close(got["dgamma"], want["dgamma"], "dgamma", 1e-4, atol_scale=1e-4 * math.sqrt(x.numel()))


@pytest.mark.parametrize("dtype", [pytest.param(d, id=n) for n, d in DTYPES.items()])
@pytest.mark.parametrize("layout", HARD_LAYOUTS)
def test_constant_channel_with_eps_zero(layout, dtype, tier):
    """invstd = 0, y = beta and dx = 0 exactly, the update stores the true variance 0."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(4, 3, 6, 5, generator=gen, dtype=F64).to(dtype)
    x[:, 1] = torch.tensor(1000.5, dtype=dtype)  # float16/bfloat16 round it; a constant anyway
    x = apply_layout(x, layout, 1)
    dy = apply_layout(torch.randn(4, 3, 6, 5, generator=gen, dtype=F64).to(dtype), layout, 1)
    got, _, beta = _hard_step(x, dy, eps=0.0, momentum=0.5)
    assert got["invstd"][1].item() == 0.0
    assert torch.equal(got["y"][:, 1], beta[1].to(dtype).expand(4, 6, 5)), "y must be beta"
    assert not got["dx"][:, 1].any(), "dx must be 0"
    assert got["moving_var"][1].item() == 0.5 and got["dgamma"][1].item() == 0.0


def test_float64_constant_channel_with_a_full_mantissa(tier):
    """A constant whose float64 sum rounds: var must still be exactly 0 (SPEC's eps = 0 rule), so
    y = beta and dx = 0 exactly.  (tests/test_robustness.py runs the same data on the kernels.)"""
    level = 31946.364823168726
    x = torch.randn(3, 2, 39, generator=torch.Generator().manual_seed(23), dtype=F64)
    x[:, 1] = level
    dy = torch.randn(3, 2, 39, generator=torch.Generator().manual_seed(24), dtype=F64)
    got, _, beta = _hard_step(x, dy, eps=0.0, momentum=0.5)
    assert got["mean"][1].item() == level and got["invstd"][1].item() == 0.0
    assert torch.equal(got["y"][:, 1], beta[1].expand(3, 39)), "y must be beta"
    assert not got["dx"][:, 1].any(), "dx must be 0"
    assert got["moving_var"][1].item() == 0.5


@pytest.mark.parametrize("dtype", [pytest.param(d, id=n) for n, d in DTYPES.items()])
@pytest.mark.parametrize("shape, axis", [pytest.param((5,), 0, id="rank1"), pytest.param((1, 6), 1, id="one-row"),
                                         pytest.param((1, 3, 1, 1), 1, id="1x3x1x1")])
def test_one_element_per_channel(shape, axis, dtype, tier):
    """m = 1: var = 0, y = beta, dx = 0 exactly, moving_var = momentum * moving_var."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    got, _, beta = _hard_step(x, dy, axis=axis, momentum=0.25)
    assert torch.equal(got["y"].reshape(-1), beta.to(dtype))
    assert not got["dx"].any() and not got["dgamma"].any()
    torch.testing.assert_close(got["moving_var"].double(), torch.full((x.shape[axis],), 0.25, dtype=F64))


@pytest.mark.parametrize("poison", [pytest.param(math.nan, id="nan"), pytest.param(math.inf, id="inf")])
@pytest.mark.parametrize("layout", HARD_LAYOUTS)
def test_nonfinite_data_stays_in_its_channel(layout, poison, tier):
    """NaN/Inf in channel 0 of x (training): channel 0 is NaN throughout (its var is NaN; +inf
    gives an infinite mean), the other channels match float64 math."""
    gen = torch.Generator().manual_seed(13)
    x = torch.randn(4, 3, 6, 5, generator=gen, dtype=F64).float()
    x[1, 0, 2, 3] = poison
    x = apply_layout(x, layout, 1)
    dy = apply_layout(torch.randn(4, 3, 6, 5, generator=gen, dtype=F64).float(), layout, 1)
    got, want, _ = _hard_step(x, dy)
    assert torch.isnan(got["y"][:, 0]).all() and torch.isnan(got["dx"][:, 0]).all()
    assert (got["mean"][0].item() == math.inf) if poison == math.inf else math.isnan(got["mean"][0].item())
    for name in ("y", "dx", "mean", "invstd", "moving_mean", "moving_var", "dgamma", "dbeta"):
        good = got[name][1:] if got[name].dim() == 1 else got[name][:, 1:]
        expected = want[name][1:] if want[name].dim() == 1 else want[name][:, 1:]
        assert torch.isfinite(good).all(), f"{name} picked up the poison"
        assert_close(good, expected, F32, name, scale=4.0)


@pytest.mark.parametrize("layout", HARD_LAYOUTS)
def test_nonfinite_gradient_follows_the_reference_pattern(layout, tier):
    """NaN in dy of channel 0, +inf in channel 2: dx's NaN/Inf pattern there is the reference's,
    channel 1 is finite and right."""
    gen = torch.Generator().manual_seed(17)
    x = apply_layout(torch.randn(4, 3, 6, 5, generator=gen, dtype=F64).float(), layout, 1)
    dy = torch.randn(4, 3, 6, 5, generator=gen, dtype=F64).float()
    dy[0, 0, 1, 1], dy[0, 2, 0, 0] = math.nan, math.inf
    got, want, _ = _hard_step(x, apply_layout(dy, layout, 1))
    for c in (0, 2):
        assert torch.equal(torch.isnan(got["dx"][:, c]), torch.isnan(want["dx"][:, c])), f"channel {c}"
        assert torch.equal(torch.isinf(got["dx"][:, c]), torch.isinf(want["dx"][:, c])), f"channel {c}"
    assert_close(got["dx"][:, 1], want["dx"][:, 1], F32, "dx[channel 1]")


@pytest.mark.parametrize("eps", [pytest.param(0.0, id="eps0"), pytest.param(1e-3, id="eps1e-3")])
@pytest.mark.parametrize("scale", [pytest.param(1e30, id="1e30"), pytest.param(1e-30, id="1e-30"),
                                   pytest.param(1e18, id="1e18")])
@pytest.mark.parametrize("layout", HARD_LAYOUTS)
def test_extreme_magnitudes_float32(layout, scale, eps, tier):
    """float32 data of 1e30 / 1e-30 (squares beyond float32's range): mean, invstd to 1e-5, y and
    dx to 1e-4, everything finite."""
    gen = torch.Generator().manual_seed(2)
    x = apply_layout((scale * (1 + torch.randn(3, 2, 4, 4, generator=gen, dtype=F64))).float(), layout, 1)
    dy = apply_layout(torch.randn(3, 2, 4, 4, generator=gen, dtype=F64).float(), layout, 1)
    got, want, _ = _hard_step(x, dy, eps=eps)
    torch.testing.assert_close(got["mean"].double(), want["mean"], rtol=1e-5, atol=0)
    torch.testing.assert_close(got["invstd"].double(), want["invstd"], rtol=1e-5, atol=0)
    _rel_close(got["y"], want["y"], "y", 1e-4)
    _rel_close(got["dx"], want["dx"], "dx", 1e-4)
    assert torch.isfinite(got["y"]).all() and torch.isfinite(got["dx"]).all()


@pytest.mark.parametrize("layout", HARD_LAYOUTS)
def test_subnormal_float32(layout, tier):
    """float32 data at 1e-41 (subnormal), eps = 0: invstd is float32's rounding of the true one
    (inf: beyond float32), y finite and right to 1e-4."""
    gen = torch.Generator().manual_seed(31)
    x = apply_layout((1e-41 * (1 + torch.randn(3, 2, 4, 4, generator=gen, dtype=F64))).float(), layout, 1)
    dy = apply_layout(torch.randn(3, 2, 4, 4, generator=gen, dtype=F64).float(), layout, 1)
    gamma, beta, mm, mv = _params(2)
    want = expected(Inputs(x, gamma, beta, mm, mv), dy, eps=0.0)
    y, mean, invstd = tritonbn.batch_norm(x, gamma, beta, mm, mv, eps=0.0, fix_gamma=False, training=True,
                                          output_mean_var=True)
    assert torch.equal(invstd, want["invstd"].float())
    assert torch.isfinite(y).all()
    _rel_close(y, want["y"], "y", 1e-4)
    torch.testing.assert_close(mean.double(), want["mean"], rtol=0, atol=2.8e-45)


# ----------------------------------------------------------------------------- memory and accuracy at size


class Float64Allocations(TorchDispatchMode):
    """The numel of every float64 tensor an aten op returns (views and in-place results too:
    an upper bound on what was allocated)."""

    def __init__(self):
        super().__init__()
        self.numels: list[int] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == F64:
                self.numels.append(t.numel())
        return out


@pytest.mark.parametrize("training", [pytest.param(True, id="training"), pytest.param(False, id="inference")])
@pytest.mark.parametrize("geometry", ["nchw", "nhwc", "4d-sliced", "3d-axis-1"])
def test_no_full_size_float64_temporary_for_float32_data(geometry, training, tier):
    """float32 data: no op of the forward or the backward creates a float64 tensor with as many
    elements as the data (per-channel float64 vectors only)."""
    shape, axis, layout = GEOMETRIES[geometry]
    shape = tuple(4 * s for s in shape)
    inp = make_inputs(shape, axis, F32, layout)
    dy = apply_layout(torch.randn(shape, generator=torch.Generator().manual_seed(1)), layout, axis % len(shape))
    x = inp.x.detach().requires_grad_(True)
    with Float64Allocations() as seen:
        y = tritonbn.batch_norm(x, inp.gamma, inp.beta, inp.moving_mean, inp.moving_var, fix_gamma=False, axis=axis,
                                training=training)
        torch.autograd.grad(y, x, dy)
    channels = shape[axis]
    assert seen.numels == [] or max(seen.numels) < x.numel(), f"float64 tensors of {max(seen.numels)} elements"
    assert all(n <= 4 * channels for n in seen.numels), sorted(seen.numels)[-3:]


def test_channels_last_statistics_keep_float32_digits():
    """A channels_last tensor with 2^18 rows: torch's own channels-last kernels add row after
    row in float32 (errors ~1e-5); the pseudo-channels keep mean and invstd to 1e-6, dgamma and
    dbeta to 1e-6 of their scale."""
    gen = torch.Generator().manual_seed(0)
    x64 = 3 + torch.randn(256, 8, 32, 32, generator=gen, dtype=F64)
    x = x64.float().contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=gen).contiguous(memory_format=torch.channels_last)
    got, want, _ = _hard_step(x, dy, eps=1e-5)
    std = (1 / want["invstd"]).max().item()
    torch.testing.assert_close(got["mean"].double(), want["mean"], rtol=0, atol=1e-6 * std)
    torch.testing.assert_close(got["invstd"].double(), want["invstd"], rtol=1e-6, atol=0)
    for name in ("dgamma", "dbeta"):
        scale = want[name].abs().max().item()
        torch.testing.assert_close(got[name].double(), want[name], rtol=0, atol=1e-6 * scale)
    assert_close(got["dx"], want["dx"], F32, "dx")


def test_half_data_at_size_is_within_its_tolerance():
    """bfloat16 on torch's own kernels (float32 accumulation): statistics to 1e-4 relative, far
    inside bfloat16's tolerance, y and dx to it."""
    gen = torch.Generator().manual_seed(1)
    x = (3 + torch.randn(64, 8, 32, 32, generator=gen, dtype=F64)).to(BF16)
    x = x.contiguous(memory_format=torch.channels_last)
    dy = torch.randn(x.shape, generator=gen).to(BF16).contiguous(memory_format=torch.channels_last)
    got, want, _ = _hard_step(x, dy)
    torch.testing.assert_close(got["invstd"].double(), want["invstd"], rtol=1e-4, atol=0)
    for name in ("y", "dx"):
        assert_close(got[name], want[name], BF16, name)
    assert TOLERANCES[BF16][1] > 100 * 1e-4
