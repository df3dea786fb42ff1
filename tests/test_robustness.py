"""Numerical robustness (issue 7): hard data through every path, each with a stated tolerance.

Every case runs forward *and* backward (``helpers.run_and_compare``), on both kernel families,
on three paths (``helpers.on_every_path``; the cuda ones run nothing here):

* ``triton``: the interpreted Triton kernels as dispatched (single-pass at these sizes);
* ``triton-split``: the split path (persistent kernels off) with several programs per channel
  (``SPLIT_CONFIG``, asserted from the trace), so the Welford/Chan merges of the finalize see the
  hard data too;
* ``reference``: the plain-torch CPU path.

Expected values are ``tritonbn.reference`` evaluated in float64 on the same (rounded) inputs.
Cases: offset half data, constant channels (eps = 0 and eps > 0), one element per channel,
magnitudes from 1e-41 (float32 subnormals) to 1e37, and channels of 1e30 and 1e-30 side by side
(SPEC asks for finite, correct results; float32 squares overflow / underflow there), data at the
float16 maximum, NaN/Inf confined to their channel.  tests/test_numerics.py has the float32
offset forward and extreme magnitudes; tests/test_cpu_backend.py runs hard data through every
tier of the torch path.
"""

from __future__ import annotations

import math

import pytest
import torch

from tritonbn import reference
from tritonbn.autotune import KernelConfig
from tritonbn.plan import CHANNEL_MAJOR, plan_view
from helpers import (BACKWARD_OUTPUTS, FORWARD_OUTPUTS, KERNEL_PATHS, OUTPUTS, TOLERANCES, Inputs, apply_layout,
                     on_both_triton_paths, on_every_path, run_and_compare)

F16, BF16, F32, F64 = torch.float16, torch.bfloat16, torch.float32, torch.float64
CPU_PATHS = [p for p in KERNEL_PATHS if not p.startswith("cuda")]  # for the tables that name the path

# Forced split-path configs: several programs per channel (or channel block), so partials merge.
SPLIT_CONFIG = {
    "channel_major": KernelConfig(2, 8, split_rows=2, split_cols=2),
    "channel_minor": KernelConfig(4, 8, split_rows=3),
}
# (shape, axis, layout) of each kernel family
FAMILIES = {
    "channel_major": ((4, 3, 20), 1, "contiguous"),
    "channel_minor": ((2, 3, 4, 5), 1, "channels_last"),
}


def _family(x: torch.Tensor, axis: int) -> str:
    plan = plan_view(x.shape, axis % x.dim(), [x.stride()])
    return plan.family if plan is not None else CHANNEL_MAJOR


def _params(channels: int, dtype=F32, seed: int = 7):
    gen = torch.Generator().manual_seed(seed)
    gamma = (torch.rand(channels, generator=gen, dtype=F64) + 0.5).to(dtype)
    beta = torch.randn(channels, generator=gen, dtype=F64).to(dtype)
    return gamma, beta, torch.zeros(channels, dtype=dtype), torch.ones(channels, dtype=dtype)


def step(path, x, dy, *, axis=1, params=None, **op_kwargs):
    """One forward (output_mean_var) and backward on ``path`` (the split path with
    ``SPLIT_CONFIG`` of x's family); returns (got, want) dicts of tensors."""
    channels = x.shape[axis]
    params = params if params is not None else _params(channels, reference.stat_dtype(x.dtype))
    got, want, _ = run_and_compare(Inputs(x, *params), dy, path=path, compare=(), axis=axis,
                                   split_configs=dict(reduce=SPLIT_CONFIG[_family(x, axis)]), **op_kwargs)
    return got, want


def close(got, want, what, *, rtol, atol=0.0, scale=None):
    """|got - want| <= atol * scale + rtol * |want|, where ``scale`` defaults to max(1, max |want|):
    an element that cancels to ~0 still carries the rounding of terms as large as the largest."""
    want = want.double()
    if scale is None:
        finite = want[torch.isfinite(want)]
        scale = max(1.0, finite.abs().max().item()) if finite.numel() else 1.0
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * scale, equal_nan=True,
                               msg=lambda m: f"{what}: {m}")


def _data(shape, axis, layout, dtype, *, offset, std, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = (offset + std * torch.randn(shape, generator=gen, dtype=F64)).to(dtype)
    dy = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1), dtype=F64).to(dtype)
    return apply_layout(x, layout, axis % len(shape)), apply_layout(dy, layout, axis % len(shape))


def _all_finite(got, names=OUTPUTS):
    for name in names:
        assert torch.isfinite(got[name]).all(), f"{name} has NaN/Inf: {got[name]}"


# ----------------------------------------------------------------------------- offset half data


@on_every_path
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    "dtype, offset, std",
    [
        pytest.param(F16, 100.0, 0.5, id="float16-offset-100"),
        pytest.param(F16, 1000.0, 2.0, id="float16-offset-1000-std-2"),
        pytest.param(F16, 3e4, 100.0, id="float16-offset-3e4"),
        pytest.param(F16, 6e4, 100.0, id="float16-near-max"),
        pytest.param(BF16, 1000.0, 8.0, id="bfloat16-offset-1000"),
        pytest.param(BF16, 1e4, 50.0, id="bfloat16-offset-1e4-std-50"),
        pytest.param(BF16, 1e20, 1e18, id="bfloat16-offset-1e20"),
    ],
)
def test_offset_half_data_forward_and_backward(dtype, offset, std, family, path):
    """Half data whose mean is 10-600 times its std, forward and backward: every output finite;
    y and dx within the dtype's tolerance (TOLERANCES, scaled by the tensor's largest value),
    dgamma and dbeta too (times m: sums of m terms); mean, invstd (float32, from float32
    accumulation) within 1e-6 / 1e-5 relative -- the statistics of the rounded data itself,
    which is what the kernels see."""
    shape, axis, layout = FAMILIES[family]
    x, dy = _data(shape, axis, layout, dtype, offset=offset, std=std)
    got, want = step(path, x, dy, axis=axis)
    _all_finite(got)
    atol, rtol = TOLERANCES[dtype]
    close(got["y"], want["y"], "y", rtol=rtol, atol=atol)
    close(got["dx"], want["dx"], "dx", rtol=rtol, atol=atol)
    close(got["mean"], want["mean"], "mean", rtol=1e-6)
    close(got["invstd"], want["invstd"], "invstd", rtol=1e-5)
    close(got["moving_var"], want["moving_var"], "moving_var", rtol=1e-5)
    m = x.numel() // x.shape[axis]
    for name in ("dgamma", "dbeta"):  # sums of m terms of size ~max|dy|: atol scales with m
        close(got[name], want[name], name, rtol=rtol, atol=atol * m)


@pytest.mark.parametrize(
    "family, path", [pytest.param(family, v, id=f"{v}-{family}") for family in FAMILIES for v in CPU_PATHS],
    indirect=["path"],
)
def test_offset_float32_backward_is_accurate(family, path):
    """float32 data at 1e4 with std 1e-2 (test_numerics checks the forward): dx, dgamma and y keep
    1e-4 of their largest value (dgamma: of sqrt(numel) times it).  The kernels compute x - mean as
    (x - pilot) - shifted mean; x - mean with a float32 mean would be off by up to 5% of the std."""
    shape, axis, layout = FAMILIES[family]
    x, dy = _data(shape, axis, layout, F32, offset=1e4, std=1e-2, seed=3)
    got, want = step(path, x, dy, axis=axis, eps=0.0)
    _all_finite(got)
    close(got["y"], want["y"], "y", rtol=1e-4, atol=1e-4)
    close(got["dx"], want["dx"], "dx", rtol=1e-4, atol=1e-4)
    close(got["dgamma"], want["dgamma"], "dgamma", rtol=1e-4, atol=1e-4 * math.sqrt(x.numel()))


def assert_rounded(got: torch.Tensor, exact: torch.Tensor, what: str) -> None:
    """``got`` is ``exact`` rounded to got's dtype: bitwise, except bfloat16 within one ulp (Triton's
    interpreter converts float32 to bfloat16 by truncation; compiled kernels round to nearest)."""
    rounded = exact.to(got.dtype)
    if got.dtype == BF16:
        torch.testing.assert_close(got.double(), rounded.double(), rtol=2.0**-7, atol=0, msg=lambda m: f"{what}: {m}")
    else:
        assert torch.equal(got, rounded), f"{what}: {got} != {rounded}"


# ----------------------------------------------------------------------------- constant channels


@on_every_path
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64])
@pytest.mark.parametrize("eps", [0.0, 1e-3], ids=["eps0", "eps1e-3"])
def test_constant_channel(eps, dtype, family, path):
    """A constant channel (at ~1e3, so a shift-free float32 sum would round): exactly var = 0;
    invstd = 0 (eps = 0) or 1/sqrt(eps) to 1e-6; y = beta exactly for eps = 0 (to the dtype's
    tolerance for eps > 0, where (x - mean) = 0 exactly too, so exactly as well); dgamma = 0
    exactly; dx = 0 exactly for eps = 0 (g / sqrt(eps) * (dy - mean(dy)) for eps > 0, to the
    dtype's tolerance); the update stores momentum * moving_var (the true variance 0); the
    other channels are untouched by it (checked against float64)."""
    shape, axis, layout = FAMILIES[family]
    x, dy = _data(shape, axis, layout, dtype, offset=0.0, std=1.0, seed=5)
    level = torch.tensor(1000.5, dtype=dtype).item()  # 1000.5 (float16, wider), 1000 (bfloat16)
    x.select(axis, 1).fill_(level)
    got, want = step(path, x, dy, axis=axis, eps=eps, momentum=0.5)
    _all_finite(got)
    expected_invstd = 0.0 if eps == 0 else 1 / math.sqrt(eps)
    assert got["mean"][1].item() == level
    torch.testing.assert_close(got["invstd"][1].double(), torch.tensor(expected_invstd, dtype=F64), rtol=1e-6, atol=0)
    beta = want["y"].select(axis, 1)  # beta broadcast (float64 reference: exactly beta)
    assert_rounded(got["y"].select(axis, 1), beta, "y on a constant channel must be beta")
    if eps == 0:
        assert not got["dx"].select(axis, 1).any(), "eps = 0: dx must be exactly 0 on a constant channel"
    assert got["dgamma"][1].item() == 0.0
    assert got["moving_var"][1].item() == 0.5  # 0.5 * 1 + 0.5 * 0
    atol, rtol = TOLERANCES[dtype]
    for name in ("y", "dx", "invstd"):
        close(got[name], want[name], name, rtol=rtol, atol=atol)


@on_both_triton_paths
def test_float64_constant_channel_with_a_full_mantissa(path):
    """A float64 constant channel whose value uses all 53 bits: its float64 sum is not exact, so a
    mean taken as sum / m is off by an ulp; SPEC's eps = 0 rule must still see var = 0.  (The
    torch path, every tier, on the same data: tests/test_cpu_backend.py.)"""
    level = 31946.364823168726
    x = torch.randn(3, 2, 39, generator=torch.Generator().manual_seed(23), dtype=F64)
    x[:, 1] = level
    dy = torch.randn(3, 2, 39, generator=torch.Generator().manual_seed(24), dtype=F64)
    got, _ = step(path, x, dy, eps=0.0, momentum=0.5)
    gamma, beta, _, _ = _params(2, F64)
    assert got["mean"][1].item() == level
    assert got["invstd"][1].item() == 0.0, f"invstd {got['invstd'][1].item()}"
    assert torch.equal(got["y"][:, 1], beta[1].expand(3, 39)), "y must be beta"
    assert not got["dx"][:, 1].any(), "dx must be 0"
    assert got["moving_var"][1].item() == 0.5


@on_every_path
def test_constant_data_everywhere_eps0_inference_and_global_stats(path):
    """eps = 0 with a zero moving_var in inference / use_global_stats: SPEC gives invstd =
    1/sqrt(0) there (the var == 0 exception is the training rule); the reference maps it to 0
    like training.  Both paths must agree with the reference and stay finite."""
    x = torch.full((3, 2, 4), 2.0)
    dy = torch.ones_like(x)
    gamma, beta, mm, mv = _params(2)
    mv.zero_()
    for training, use_global_stats in ((False, False), (True, True)):
        got, want = step(path, x, dy, eps=0.0, training=training, use_global_stats=use_global_stats,
                         params=(gamma, beta, mm.clone(), mv.clone()))
        for name in ("y", "invstd", "dx", "dgamma", "dbeta"):
            close(got[name], want[name], f"{name} (training={training})", rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- one element per channel


@on_every_path
@pytest.mark.parametrize(
    "shape, axis",
    [pytest.param((1,), 0, id="rank1-one-channel"), pytest.param((7,), -1, id="rank1"),
     pytest.param((1, 70), 1, id="two-channel-blocks"), pytest.param((1, 3, 1, 1), 1, id="1x3x1x1")],
)
@pytest.mark.parametrize("dtype", [F16, BF16, F32, F64])
@pytest.mark.parametrize("eps", [0.0, 1e-3], ids=["eps0", "eps1e-3"])
def test_one_element_per_channel(shape, axis, dtype, eps, path):
    """m = 1: var = 0, y = beta exactly, dx = 0
    exactly, dgamma = 0, dbeta = dy, invstd = 0 (eps = 0) or 1/sqrt(eps), moving_var =
    momentum * moving_var; everything finite, in every dtype."""
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    dy = torch.randn(shape, generator=gen, dtype=F64).to(dtype)
    got, want = step(path, x, dy, axis=axis, eps=eps, momentum=0.25)
    _all_finite(got)
    pdt = reference.stat_dtype(dtype)
    gamma, beta, _, _ = _params(x.shape[axis], pdt)
    assert_rounded(got["y"].reshape(-1), beta, "y must be beta")
    assert not got["dx"].any() and not got["dgamma"].any()
    assert torch.equal(got["dbeta"], dy.reshape(-1).to(pdt))
    expected_invstd = torch.full_like(want["invstd"], 0.0 if eps == 0 else 1 / math.sqrt(eps))
    close(got["invstd"], expected_invstd, "invstd", rtol=1e-6)
    assert torch.equal(got["moving_var"], torch.full_like(got["moving_var"], 0.25))
    close(got["moving_mean"], want["moving_mean"], "moving_mean", rtol=1e-6)


# ----------------------------------------------------------------------------- extreme magnitudes


def _extreme_cases():
    for dtype in (F32, BF16, F64):
        for scale in (1e30, 1e-30, 1e37, 1e-37):
            if dtype == F64 and scale in (1e37, 1e-37):
                continue  # float64 has the range: 1e30 / 1e-30 already show its accumulators are exact
            for family in FAMILIES:
                for path in CPU_PATHS:
                    name = {F32: "float32", BF16: "bfloat16", F64: "float64"}[dtype]
                    yield pytest.param(dtype, scale, family, path, id=f"{name}-{scale:g}-{family}-{path}")


@pytest.mark.parametrize("dtype, scale, family, path", list(_extreme_cases()), indirect=["path"])
def test_extreme_magnitudes(dtype, scale, family, path):
    """Data ~ scale * (1 + N(0, 1)) with eps = 0 (with eps > 0 a 1e-60 variance vanishes in var + eps
    in float64 too): SPEC requires finite, correct results.  1e37 keeps x - mean within float32;
    at 1e-37 the few values that would be subnormal are moved to the smallest normal float32
    (Triton's interpreter converts bfloat16 subnormals to float32 wrongly: 5e-39 -> 8.1e-39,
    1e-40 -> 0; compiled kernels do not; subnormal data has its own test below).  Tolerances (relative): mean 1e-5,
    invstd and y 1e-4 (float32 accumulation; bfloat16 y at its TOLERANCES), dx 1e-4 of its largest
    value, dgamma/dbeta 1e-4 of sqrt(m) times the largest.  moving_var follows the float64
    reference rounded to the parameter dtype: 0.1 * 1e60 is not a float32, so inf there is the
    correctly rounded update (not an error)."""
    shape, axis, layout = FAMILIES[family]
    gen = torch.Generator().manual_seed(2)
    x = scale * (1 + torch.randn(shape, generator=gen, dtype=F64))
    tiny = torch.finfo(F32).tiny
    x = torch.where(x.abs() < tiny, torch.full_like(x, tiny), x).to(dtype)
    x = apply_layout(x, layout, axis)
    dy = apply_layout(torch.randn(shape, generator=gen, dtype=F64).to(dtype), layout, axis)
    got, want = step(path, x, dy, axis=axis, eps=0.0)
    m = x.numel() // x.shape[axis]
    rtol_y = TOLERANCES[BF16][1] if dtype == BF16 else 1e-4
    close(got["mean"], want["mean"], "mean", rtol=1e-5)
    close(got["invstd"], want["invstd"], "invstd", rtol=1e-4)
    close(got["y"], want["y"], "y", rtol=rtol_y, atol=rtol_y)
    pdt = got["moving_var"].dtype
    close(got["moving_var"], want["moving_var"].to(pdt), "moving_var", rtol=1e-5)
    close(got["moving_mean"], want["moving_mean"], "moving_mean", rtol=1e-5)
    for name in ("dx", "dgamma", "dbeta"):
        finite = want[name].abs().max().item()
        factor = math.sqrt(m) if name != "dx" else 1.0
        close(got[name], want[name], name, rtol=rtol_y, atol=rtol_y * factor, scale=finite)
    _all_finite(got, ("y", "mean", "invstd", "dx", "dgamma", "dbeta"))


@pytest.mark.parametrize("family", FAMILIES)
@on_every_path
def test_subnormal_float32_data(family, path):
    """float32 data of ~1e-41 (subnormal: ~13 significant bits; the reference sees the same values),
    eps = 0: y is representable and must be right (1e-4 relative); invstd ~1e41 is beyond float32,
    so its correctly rounded value is inf; the mean is within 2 subnormal ulps (2.8e-45)."""
    shape, axis, layout = FAMILIES[family]
    gen = torch.Generator().manual_seed(2)
    x = apply_layout((1e-41 * (1 + torch.randn(shape, generator=gen, dtype=F64))).float(), layout, axis)
    dy = apply_layout(torch.randn(shape, generator=gen, dtype=F64).float(), layout, axis)
    got, want = step(path, x, dy, axis=axis, eps=0.0)
    close(got["y"], want["y"], "y", rtol=1e-4, atol=1e-4)
    assert torch.isfinite(got["y"]).all()
    assert torch.equal(got["invstd"], want["invstd"].float()), f"invstd {got['invstd']} (float32 of {want['invstd']})"
    close(got["mean"], want["mean"], "mean", rtol=0, atol=2.8e-45, scale=1.0)


@on_every_path
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("magnitude", [1e-39, 1e-40, 1e-43], ids=["1e-39", "1e-40", "1e-43"])
def test_tiny_float32_data_whose_invstd_overflows(magnitude, family, path):
    """float32 data from just below the normal range (1e-39) down to 1e-43 (a few significant bits),
    eps = 0: invstd = 1/std is beyond float32 (its correctly rounded value, inf, is what comes out),
    yet y = (x - mean) * invstd * g + beta is representable: the kernels normalise in their scaled
    units there (split path: through the apply coefficients).  y to 1e-4, mean within 2 ulps of
    the smallest subnormal."""
    shape, axis, layout = FAMILIES[family]
    gen = torch.Generator().manual_seed(31)
    x = apply_layout((magnitude * (1 + torch.randn(shape, generator=gen, dtype=F64))).float(), layout, axis)
    dy = apply_layout(torch.randn(shape, generator=gen, dtype=F64).float(), layout, axis)
    got, want = step(path, x, dy, axis=axis, eps=0.0)
    assert torch.isinf(want["invstd"].float()).all()
    assert torch.equal(got["invstd"], want["invstd"].float()), f"invstd {got['invstd']}"
    assert torch.isfinite(got["y"]).all()
    close(got["y"], want["y"], "y", rtol=1e-4, atol=1e-4)
    close(got["mean"], want["mean"], "mean", rtol=0, atol=2.8e-45, scale=1.0)


@on_every_path
@pytest.mark.parametrize("family", FAMILIES)
def test_channels_of_very_different_magnitudes_side_by_side(family, path):
    """float32 channels at 1e30, 1e-30 and 1 in one tensor (neighbours in a channel-minor tile, and
    in the finalize's channel block): each channel is normalised with its own scale -- y, invstd,
    dx to 1e-4 relative, all finite."""
    shape, axis, layout = FAMILIES[family]
    gen = torch.Generator().manual_seed(29)
    base = 1 + torch.randn(shape, generator=gen, dtype=F64)
    scales = torch.tensor([1e30, 1e-30, 1.0], dtype=F64).reshape(reference.channel_shape(len(shape), axis, 3))
    x = apply_layout((base * scales).float(), layout, axis)
    dy = apply_layout(torch.randn(shape, generator=gen, dtype=F64).float(), layout, axis)
    got, want = step(path, x, dy, axis=axis, eps=0.0)
    _all_finite(got, ("y", "mean", "invstd", "dx", "dgamma", "dbeta"))
    close(got["invstd"], want["invstd"], "invstd", rtol=1e-4)
    close(got["mean"], want["mean"], "mean", rtol=1e-5)
    close(got["y"], want["y"], "y", rtol=1e-4, atol=1e-4)
    for c in range(3):
        close(got["dx"].select(axis, c), want["dx"].select(axis, c), f"dx[channel {c}]", rtol=1e-4, atol=1e-4,
              scale=want["dx"].select(axis, c).abs().max().item())


# ----------------------------------------------------------------------------- float16 maximum


@on_every_path
@pytest.mark.parametrize("family", FAMILIES)
def test_float16_data_at_its_maximum(family, path):
    """float16 data at +-65504 (the largest float16) and a channel all at 65504: the float32
    accumulators hold 65504^2 * m easily; y, dx within float16's tolerance, all finite; dy at
    +-65504 too (dbeta = S is float32, so it does not overflow); dgamma, dbeta within 1e-5 of
    sum |dy| (float32 sums of terms as large as 65504)."""
    shape, axis, layout = FAMILIES[family]
    signs = torch.where(torch.arange(math.prod(shape)).reshape(shape) % 3 == 0, -1.0, 1.0)
    x = (65504.0 * signs).to(F16)
    x.select(axis, 2).fill_(65504.0)  # constant at the maximum: var = 0 exactly
    dy = (65504.0 * signs.flip(-1)).to(F16)
    # on the constant channel dx = g / sqrt(eps) * (dy - mean(dy)): keep dy ~1 there, or dx
    # itself (31.6 * 65504) is beyond float16
    dy.select(axis, 2).copy_(signs.select(axis, 2))
    x, dy = apply_layout(x, layout, axis), apply_layout(dy, layout, axis)
    got, want = step(path, x, dy, axis=axis)
    _all_finite(got)
    atol, rtol = TOLERANCES[F16]
    for name in ("y", "dx", "invstd", "mean", "moving_mean", "moving_var"):
        close(got[name], want[name], name, rtol=rtol, atol=atol)
    for name in ("dgamma", "dbeta"):
        close(got[name], want[name], name, rtol=1e-5, atol=1e-5, scale=65504.0 * x.numel())


# ----------------------------------------------------------------------------- NaN / Inf confinement


def _poison(t: torch.Tensor, axis: int, channel: int, value: float, at: int = 1) -> None:
    """Write ``value`` into one element of ``channel``: its first element (the kernels' shift
    pilot) for at = 0, an inner one for at = 1."""
    target = t.select(axis, channel)
    target[tuple(min(at, s - 1) for s in target.shape)] = value


def _confined(got, want, axis, bad_channels, names, check_bad=True):
    """Every channel but ``bad_channels`` is finite and within float32 tolerance (x4: dgamma and
    dbeta sum a few dozen terms); with ``check_bad`` the bad channels match the reference NaN for
    NaN."""
    channels = got["y"].shape[axis]
    good = [c for c in range(channels) if c not in bad_channels]
    atol, rtol = TOLERANCES[F32]
    for name in names:
        t, ref = got[name], want[name]
        per_channel = t.dim() == 1
        for c in good:
            value = t[c] if per_channel else t.select(axis, c)
            expect = ref[c] if per_channel else ref.select(axis, c)
            assert torch.isfinite(value).all(), f"{name}: channel {c} picked up a NaN/Inf from channels {bad_channels}"
            close(value, expect, f"{name}[channel {c}]", rtol=rtol * 4, atol=atol * 4)
        for c in bad_channels if check_bad else ():
            value = t[c] if per_channel else t.select(axis, c)
            expect = ref[c] if per_channel else ref.select(axis, c)
            assert torch.equal(torch.isnan(value), torch.isnan(expect)), f"{name}[channel {c}]: NaN pattern differs"




POISONS = [pytest.param(float("nan"), id="nan"), pytest.param(float("inf"), id="inf"),
           pytest.param(float("-inf"), id="-inf")]
POSITIONS = [pytest.param(1, id="inner-element"), pytest.param(0, id="first-element")]


@on_every_path
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("poison", POISONS)
@pytest.mark.parametrize("at", POSITIONS)
@pytest.mark.parametrize("mode", ["training", "inference"])
def test_nonfinite_data_stays_in_its_channel(poison, at, family, mode, path):
    """One NaN/Inf element in channel 0 of the data: every other channel -- neighbours in the same
    channel-minor tile and in the same split -- is finite and correct, forward and backward.
    Training: channel 0's y and dx are NaN throughout, as the formulas give (var is NaN).
    Inference: y is elementwise, so only that element of y is non-finite.  ``first-element``
    puts it where the kernels take their shift pilot."""
    shape, axis, layout = FAMILIES[family]
    x, dy = _data(shape, axis, layout, F32, offset=0.0, std=1.0, seed=13)
    _poison(x, axis, 0, poison, at=at)
    training = mode == "training"
    got, want = step(path, x, dy, axis=axis, training=training)
    _confined(got, want, axis, [0], FORWARD_OUTPUTS + BACKWARD_OUTPUTS, check_bad=False)
    bad_y, bad_dx = got["y"].select(axis, 0), got["dx"].select(axis, 0)
    if training:
        assert torch.isnan(bad_y).all() and torch.isnan(bad_dx).all()
        assert torch.isnan(got["invstd"][0]) and torch.isnan(got["moving_var"][0])
        assert not torch.isfinite(got["moving_mean"][0]), "the update carries the channel's NaN/Inf mean"
    else:
        assert (~torch.isfinite(bad_y)).sum() == 1, "inference: only the element itself"
        assert torch.equal(torch.isnan(bad_y), torch.isnan(want["y"].select(axis, 0)))


@pytest.mark.parametrize(
    "family, poison, at, path",
    [pytest.param(family, poison, at, v,
                  id=f"{v}-{family}-{'+' if poison > 0 else '-'}inf-{'first' if at == 0 else 'inner'}-element")
     for family in FAMILIES for poison in (float("inf"), float("-inf")) for at in (1, 0) for v in CPU_PATHS],
    indirect=["path"],
)
def test_infinite_data_gives_an_infinite_mean(family, poison, at, path):
    """SPEC: "NaN and Inf in the data propagate as the formulas say": mean = sum(x) / m = +-inf for
    a channel holding one +-inf (its var and invstd are NaN), and moving_mean becomes +-inf."""
    shape, axis, layout = FAMILIES[family]
    x, dy = _data(shape, axis, layout, F32, offset=0.0, std=1.0, seed=13)
    _poison(x, axis, 0, poison, at=at)
    got, want = step(path, x, dy, axis=axis)
    assert want["mean"][0].item() == poison
    assert got["mean"][0].item() == poison, f"mean {got['mean'][0].item()}, expected {poison}"
    assert got["moving_mean"][0].item() == poison, f"moving_mean {got['moving_mean'][0].item()}"


@pytest.mark.parametrize(
    "family, poison, use_global_stats, path",
    [pytest.param(family, poison, ugs, v, id=f"{v}-{family}-{name}-{'global-stats' if ugs else 'inference'}")
     for family in FAMILIES for poison, name in ((float("nan"), "nan"), (float("inf"), "inf"))
     for ugs in (False, True) for v in CPU_PATHS],
    indirect=["path"],
)
def test_nonfinite_data_does_not_reach_the_scale_shift_dx(family, poison, use_global_stats, path):
    """Inference and use_global_stats backward: dx = dy * g / sqrt(moving_var + eps) does not
    depend on x, so a NaN/Inf in x leaves dx finite and exact (to float32 tolerance); dgamma of
    that channel is NaN/Inf (it sums dy * (x - moving_mean)), the others finite."""
    shape, axis, layout = FAMILIES[family]
    x, dy = _data(shape, axis, layout, F32, offset=0.0, std=1.0, seed=13)
    _poison(x, axis, 0, poison)
    got, want = step(path, x, dy, axis=axis, training=use_global_stats, use_global_stats=use_global_stats)
    assert torch.isfinite(got["dx"]).all(), f"dx has {(~torch.isfinite(got['dx'])).sum().item()} non-finite elements"
    atol, rtol = TOLERANCES[F32]
    close(got["dx"], want["dx"], "dx", rtol=rtol, atol=atol)
    assert not torch.isfinite(got["dgamma"][0]) and torch.isfinite(got["dgamma"][1:]).all()


# (shape, axis, layout) with four channels: +-inf mixtures in three, the fourth finite
FOUR_CHANNELS = {
    "channel_major": ((4, 4, 20), 1, "contiguous"),
    "channel_minor": ((2, 4, 4, 5), 1, "channels_last"),
}


@on_every_path
@pytest.mark.parametrize("family", FOUR_CHANNELS)
def test_infinities_in_many_lanes_and_splits(family, path):
    """Every third element of channel 0 is +inf (so several Welford lanes, splits and finalize
    partials are infinite at once): mean = moving_mean = +inf.  Channel 1 holds +inf and -inf,
    channel 2 +inf and NaN: their means are NaN (sum(x) / m).  Channel 3 is finite and right."""
    shape, axis, layout = FOUR_CHANNELS[family]
    x, dy = _data(shape, axis, layout, F32, offset=0.0, std=1.0, seed=37)
    flat = x.select(axis, 0)
    flat.copy_(torch.where(torch.arange(flat.numel()).reshape(flat.shape) % 3 == 0, float("inf"), flat))
    _poison(x, axis, 1, float("inf"), at=0)
    _poison(x, axis, 1, float("-inf"), at=1)
    _poison(x, axis, 2, float("inf"), at=1)
    _poison(x, axis, 2, float("nan"), at=0)
    got, want = step(path, x, dy, axis=axis)
    assert want["mean"][0].item() == float("inf")
    assert got["mean"][0].item() == float("inf") and got["moving_mean"][0].item() == float("inf")
    assert torch.isnan(got["mean"][1:3]).all() and torch.isnan(got["moving_mean"][1:3]).all()
    assert torch.isnan(got["invstd"][:3]).all() and torch.isnan(got["moving_var"][:3]).all()
    _confined(got, want, axis, [0, 1, 2], FORWARD_OUTPUTS + BACKWARD_OUTPUTS, check_bad=False)


@on_every_path
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("use_global_stats", [False, True], ids=["inference", "global-stats"])
def test_scale_shift_backward_with_fix_gamma_needs_no_x(family, use_global_stats, path):
    """fix_gamma with moving statistics: dx = dy / sqrt(moving_var + eps), dgamma = 0, dbeta = S
    -- nothing depends on x (the single-pass backward does not even read it), so NaN/Inf in x
    reach no gradient."""
    shape, axis, layout = FAMILIES[family]
    x, dy = _data(shape, axis, layout, F32, offset=0.0, std=1.0, seed=41)
    _poison(x, axis, 0, float("nan"))
    _poison(x, axis, 1, float("inf"), at=0)
    got, want = step(path, x, dy, axis=axis, fix_gamma=True, training=use_global_stats,
                     use_global_stats=use_global_stats)
    _all_finite(got, BACKWARD_OUTPUTS)
    assert not got["dgamma"].any()
    atol, rtol = TOLERANCES[F32]
    for name in BACKWARD_OUTPUTS:
        close(got[name], want[name], name, rtol=rtol, atol=atol)


@on_every_path
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("mode", ["training", "inference"])
def test_nonfinite_grad_stays_in_its_channel(family, mode, path):
    """NaN and Inf in dy (channels 0 and 2): dx, dgamma, dbeta of channel 1 are finite and correct;
    the forward outputs are all finite."""
    shape, axis, layout = FAMILIES[family]
    x, dy = _data(shape, axis, layout, F32, offset=0.0, std=1.0, seed=17)
    _poison(dy, axis, 0, float("nan"))
    _poison(dy, axis, 2, float("inf"), at=0)
    got, want = step(path, x, dy, axis=axis, training=mode == "training")
    _all_finite(got, FORWARD_OUTPUTS)
    _confined(got, want, axis, [0, 2], BACKWARD_OUTPUTS)


@on_every_path
@pytest.mark.parametrize("family", FAMILIES)
def test_nonfinite_parameters_stay_in_their_channel(family, path):
    """NaN gamma in channel 0, Inf moving_var in channel 2 (inference), NaN moving_mean in channel 2
    (training: the update is NaN only there)."""
    shape, axis, layout = FAMILIES[family]
    x, dy = _data(shape, axis, layout, F32, offset=0.0, std=1.0, seed=19)
    gamma, beta, mm, mv = _params(3)
    gamma[0] = float("nan")
    mv[2] = float("inf")
    got, want = step(path, x, dy, axis=axis, training=False, params=(gamma, beta, mm.clone(), mv.clone()))
    _confined(got, want, axis, [0, 2], ("y", "dx", "dgamma", "dbeta", "invstd"))
    mm[2] = float("nan")
    mv[2] = 1.0
    got, want = step(path, x, dy, axis=axis, training=True, params=(gamma, beta, mm.clone(), mv.clone()))
    _confined(got, want, axis, [0], ("y", "dx", "dgamma", "dbeta", "invstd", "mean", "moving_var"))
    assert torch.isnan(got["moving_mean"][2]) and torch.isfinite(got["moving_mean"][:2]).all()
