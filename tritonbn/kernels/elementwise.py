"""The one elementwise pass of every op: normalisation (forward, inference) and dx (backward).

    out = (((x - pilot[c]) - shifted_mean[c]) * invstd[c]) * x_coef[c] + dy * dy_coef[c] + const[c]

(the mean is carried as pilot + shifted_mean, see ``stats.py``; from moving statistics the
pilot is moving_mean and the shifted mean 0)

- forward:  x_coef = g, const = beta, no dy                               -> y
- backward, batch statistics:  x_coef = -g * invstd * (invstd * D) / m,
  dy_coef = g * invstd, const = -g * invstd * S / m                       -> dx
- backward, moving statistics: dy_coef = g * invstd, no x                -> dx

(x - mean) is multiplied by invstd before the coefficient: the product stays near 1 for data of
any magnitude, where invstd^2 or invstd^3 alone would underflow float32.)

Where invstd itself overflows (forward, float32 data of ~1e-41), the training finalize puts the
channel's power-of-two scale in the invstd slot and invstd_z * g in x_coef (see
``stats._finalize_channels``): the formula is the same.

The per-channel coefficients come from a reduction's finalize tail in ``coef[6, C]`` = (pilot,
shifted_mean, invstd, x_coef, dy_coef, const).  Inference has no finalize: with FROM_MOVING the kernel
derives them from the moving statistics itself and the programs of the first tile of each
channel also write ``center[2, C]`` = (mean, 0) and ``invstd``, so inference is one launch.

The centred form (x - mean) * scale is deliberate: ``x * scale + (beta - mean * scale)`` loses
every significant digit of y when |mean| >> std.
"""

import triton
import triton.language as tl

from .common import (
    channel_major_offsets,
    channel_minor_offsets,
    range_bound,
    safe_invstd,
    scalar_offset,
    split_f64,
)


@triton.jit
def _coefficients(
    c, c_mask, C, coef_ptr, moving_mean_ptr, moving_var_ptr, gamma_ptr, beta_ptr,
    center_ptr, invstd_ptr, write_stats, eps_hi, eps_lo,
    FROM_MOVING: tl.constexpr, FIX_GAMMA: tl.constexpr, ACC: tl.constexpr,
    HAS_X: tl.constexpr, HAS_DY: tl.constexpr,
):
    """(pilot, shifted_mean, invstd, x_coef, dy_coef, const) of channel(s) ``c`` (scalar or [BLOCK_C])."""
    if FROM_MOVING:
        pilot = tl.load(moving_mean_ptr + c, mask=c_mask, other=0.0).to(ACC)
        shifted_mean = tl.zeros_like(pilot)
        var = tl.load(moving_var_ptr + c, mask=c_mask, other=1.0).to(ACC)
        invstd = safe_invstd(var, split_f64(eps_hi, eps_lo, ACC))
        if FIX_GAMMA:
            x_coef = tl.zeros_like(invstd) + 1.0
        else:
            x_coef = tl.load(gamma_ptr + c, mask=c_mask, other=1.0).to(ACC)
        dy_coef = tl.zeros_like(invstd)
        const = tl.load(beta_ptr + c, mask=c_mask, other=0.0).to(ACC)
        if write_stats:
            tl.store(center_ptr + c, pilot, mask=c_mask)
            tl.store(center_ptr + C + c, shifted_mean, mask=c_mask)
            tl.store(invstd_ptr + c, invstd, mask=c_mask)
    else:  # only the rows the launch uses: every program loads them (HAS_X / HAS_DY)
        const = tl.load(coef_ptr + 5 * C + c, mask=c_mask, other=0.0)
        if HAS_X:
            pilot = tl.load(coef_ptr + c, mask=c_mask, other=0.0)
            shifted_mean = tl.load(coef_ptr + C + c, mask=c_mask, other=0.0)
            invstd = tl.load(coef_ptr + 2 * C + c, mask=c_mask, other=0.0)
            x_coef = tl.load(coef_ptr + 3 * C + c, mask=c_mask, other=0.0)
        else:
            pilot = tl.zeros_like(const)
            shifted_mean = tl.zeros_like(const)
            invstd = tl.zeros_like(const)
            x_coef = tl.zeros_like(const)
        if HAS_DY:
            dy_coef = tl.load(coef_ptr + 4 * C + c, mask=c_mask, other=0.0)
        else:
            dy_coef = tl.zeros_like(const)
    return pilot, shifted_mean, invstd, x_coef, dy_coef, const


@triton.jit
def channel_major_elementwise_kernel(
    x_ptr, dy_ptr, out_ptr,  # (outer, C, inner) views; strides per tensor below
    coef_ptr,  # [6, C] accumulation dtype (FROM_MOVING: unused, pass center_ptr)
    moving_mean_ptr, moving_var_ptr, gamma_ptr, beta_ptr,  # [C], FROM_MOVING only
    center_ptr, invstd_ptr,  # [2, C] and [C] outputs, accumulation dtype, FROM_MOVING only
    C, outer, inner, eps_hi, eps_lo,
    outer_mid, outer_lo,
    stride_xoh, stride_xom, stride_xo, stride_xc, stride_xi,
    stride_dyoh, stride_dyom, stride_dyo, stride_dyc, stride_dyi,
    stride_outoh, stride_outom, stride_outo, stride_outc, stride_outi,
    tiles_o, tiles_i,
    HAS_X: tl.constexpr, HAS_DY: tl.constexpr, FROM_MOVING: tl.constexpr,
    FIX_GAMMA: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr,
):
    """One [BLOCK_O, BLOCK_I] tile of one channel: grid = (C * tiles_o * tiles_i,)."""
    ACC: tl.constexpr = center_ptr.dtype.element_ty
    tiles = tiles_o * tiles_i
    pid = tl.program_id(0)
    c = pid // tiles
    tile = pid % tiles
    o = (tile // tiles_i) * BLOCK_O + tl.arange(0, BLOCK_O)
    i = (tile % tiles_i) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = (o < outer)[:, None] & (i < inner)[None, :]
    pilot, shifted_mean, invstd, x_coef, dy_coef, const = _coefficients(
        c, c < C, C, coef_ptr, moving_mean_ptr, moving_var_ptr, gamma_ptr, beta_ptr,
        center_ptr, invstd_ptr, tile == 0, eps_hi, eps_lo, FROM_MOVING, FIX_GAMMA, ACC, HAS_X, HAS_DY,
    )
    result = tl.zeros([BLOCK_O, BLOCK_I], ACC) + const
    if HAS_X:
        x_offsets = scalar_offset(c, stride_xc, INT64) + channel_major_offsets(
            o, i, outer_mid, outer_lo, stride_xoh, stride_xom, stride_xo, stride_xi, INT64)
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(ACC)
        result += (((x - pilot) - shifted_mean) * invstd) * x_coef
    if HAS_DY:
        dy_offsets = scalar_offset(c, stride_dyc, INT64) + channel_major_offsets(
            o, i, outer_mid, outer_lo, stride_dyoh, stride_dyom, stride_dyo, stride_dyi, INT64)
        dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(ACC)
        result += dy * dy_coef
    out_offsets = scalar_offset(c, stride_outc, INT64) + channel_major_offsets(
        o, i, outer_mid, outer_lo, stride_outoh, stride_outom, stride_outo, stride_outi, INT64)
    tl.store(out_ptr + out_offsets, result.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def channel_minor_elementwise_kernel(
    x_ptr, dy_ptr, out_ptr,  # rows x C matrices: row r = o * inner + i
    coef_ptr,  # [6, C] accumulation dtype (FROM_MOVING: unused, pass center_ptr)
    moving_mean_ptr, moving_var_ptr, gamma_ptr, beta_ptr,  # [C], FROM_MOVING only
    center_ptr, invstd_ptr,  # [2, C] and [C] outputs, accumulation dtype, FROM_MOVING only
    C, inner, rows, eps_hi, eps_lo,
    outer_mid, outer_lo,
    stride_xoh, stride_xom, stride_xo, stride_xc, stride_xi,
    stride_dyoh, stride_dyom, stride_dyo, stride_dyc, stride_dyi,
    stride_outoh, stride_outom, stride_outo, stride_outc, stride_outi,
    c_blocks, row_tiles,
    HAS_X: tl.constexpr, HAS_DY: tl.constexpr, FROM_MOVING: tl.constexpr,
    FIX_GAMMA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    """``row_tiles`` [BLOCK_R, BLOCK_C] tiles down the rows of one channel block, coefficients
    loaded once: grid = (cdiv(rows, row_tiles * BLOCK_R) * c_blocks,), channel blocks fastest."""
    ACC: tl.constexpr = center_ptr.dtype.element_ty
    pid = tl.program_id(0)
    row_block = pid // c_blocks
    c = (pid % c_blocks) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = c < C
    pilot, shifted_mean, invstd, x_coef, dy_coef, const = _coefficients(
        c, c_mask, C, coef_ptr, moving_mean_ptr, moving_var_ptr, gamma_ptr, beta_ptr,
        center_ptr, invstd_ptr, row_block == 0, eps_hi, eps_lo, FROM_MOVING, FIX_GAMMA, ACC, HAS_X, HAS_DY,
    )
    for t in range(range_bound(row_tiles)):
        r = (row_block * row_tiles + t) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (r < rows)[:, None] & c_mask[None, :]
        result = tl.zeros([BLOCK_R, BLOCK_C], ACC) + const[None, :]
        if HAS_X:
            x_offsets = channel_minor_offsets(r, c, inner, outer_mid, outer_lo, stride_xoh, stride_xom, stride_xo,
                                              stride_xc, stride_xi, INT64)
            x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(ACC)
            result += (((x - pilot[None, :]) - shifted_mean[None, :]) * invstd[None, :]) * x_coef[None, :]
        if HAS_DY:
            dy_offsets = channel_minor_offsets(r, c, inner, outer_mid, outer_lo, stride_dyoh, stride_dyom,
                                               stride_dyo, stride_dyc, stride_dyi, INT64)
            dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(ACC)
            result += dy * dy_coef[None, :]
        out_offsets = channel_minor_offsets(r, c, inner, outer_mid, outer_lo, stride_outoh, stride_outom,
                                            stride_outo, stride_outc, stride_outi, INT64)
        tl.store(out_ptr + out_offsets, result.to(out_ptr.dtype.element_ty), mask=mask)
