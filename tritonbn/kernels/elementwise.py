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

Fused epilogues (``common.py``, "fused epilogues"): the forward with RELU and/or ADDEND computes
v = ``normalized(x, ...)`` (+ addend, passed in the dy slot) and writes relu(v), and with BITS
(a ReLU and an addend, when a backward will follow) the ReLU's decisions as bits; the backward (GRAD) with RELU passes dy only where the forward's
output was positive, from those bits (ADDEND, also writing daddend = the passed dy) or
recomputed from x and the forward's coefficients ``center[6, C]``.

The centred form (x - mean) * scale is deliberate: ``x * scale + (beta - mean * scale)`` loses
every significant digit of y when |mean| >> std.
"""

import triton
import triton.language as tl

from .common import (
    channel_major_offsets,
    channel_minor_offsets,
    load_bits,
    normalized,
    passes,
    range_bound,
    relu,
    safe_invstd,
    scalar_offset,
    split_f64,
    store_bits,
)


@triton.jit
def _coefficients(
    c, c_mask, C, coef_ptr, moving_mean_ptr, moving_var_ptr, gamma_ptr, beta_ptr,
    center_ptr, invstd_ptr, write_stats, eps_hi, eps_lo,
    FROM_MOVING: tl.constexpr, FIX_GAMMA: tl.constexpr, ACC: tl.constexpr,
    HAS_X: tl.constexpr, HAS_DY: tl.constexpr, FUSED_ROWS: tl.constexpr,
):
    """(pilot, shifted_mean, invstd, x_coef, dy_coef, const) of channel(s) ``c`` (scalar or [BLOCK_C]).
    FROM_MOVING with FUSED_ROWS also writes center rows 2, 3, 5 (invstd, g, beta): what a fused
    ReLU's backward recomputes the forward's v with."""
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
            if FUSED_ROWS:
                tl.store(center_ptr + 2 * C + c, invstd, mask=c_mask)
                tl.store(center_ptr + 3 * C + c, x_coef, mask=c_mask)
                tl.store(center_ptr + 5 * C + c, const, mask=c_mask)
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
def _forward_rows(center_ptr, c, c_mask, C):
    """The forward's coefficients of channel(s) ``c`` from center[6, C] (pilot, shifted mean,
    x_scale, x_coef, const: rows 0, 1, 2, 3, 5), for a fused ReLU's recompute of v."""
    return (tl.load(center_ptr + c, mask=c_mask, other=0.0), tl.load(center_ptr + C + c, mask=c_mask, other=0.0),
            tl.load(center_ptr + 2 * C + c, mask=c_mask, other=0.0),
            tl.load(center_ptr + 3 * C + c, mask=c_mask, other=0.0),
            tl.load(center_ptr + 5 * C + c, mask=c_mask, other=0.0))


@triton.jit
def _elementwise_tile(
    x_ptr, dy_ptr, mask_ptr,
    x_offsets, dy_offsets, mask,  # [ROWS, COLS] offsets of the tile in x and dy
    pilot, shifted_mean, invstd, x_coef, dy_coef, const,  # per channel, broadcastable to the tile
    f_pilot, f_shift, f_scale, f_coef, f_const,  # the forward's coefficients (recompute only)
    mask_rows, row_valid, row_bytes, col0, cols,  # where the tile's bits live (bitmask_offsets)
    HAS_X: tl.constexpr, HAS_DY: tl.constexpr, RELU: tl.constexpr, ADDEND: tl.constexpr, BITS: tl.constexpr,
    ROWS: tl.constexpr, COLS: tl.constexpr, GROUP: tl.constexpr, INT64: tl.constexpr,
):
    """(out, daddend) of one tile in the accumulation dtype (see the module docstring; daddend:
    the gated dy, meaningful with HAS_DY, RELU and ADDEND); the dy slot holds the addend in a
    forward.  The caller computes the output offsets after this returns, so they are not live
    during the loads (computed before, they made ptxas spill the stepped-layout dx kernel)."""
    ACC: tl.constexpr = const.dtype
    OUT: tl.constexpr = x_ptr.dtype.element_ty  # the forward's output dtype (the data's)
    recompute: tl.constexpr = HAS_DY and RELU and not ADDEND
    result = tl.zeros([ROWS, COLS], ACC) + const
    daddend = result  # unused unless HAS_DY
    if HAS_X or recompute:
        x = tl.load(x_ptr + x_offsets, mask=mask, other=0.0).to(ACC)
    if not HAS_DY and (RELU or ADDEND):  # fused forward
        result = normalized(x, pilot, shifted_mean, invstd, x_coef, const)
        if ADDEND:
            result += tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(ACC)
        if RELU:
            result = relu(result)
            if BITS:
                store_bits(mask_ptr, passes(result, OUT) & mask, mask_rows, row_valid, row_bytes, col0, cols,
                           ROWS, COLS, GROUP, INT64)
    else:
        if HAS_X:
            result += (((x - pilot) - shifted_mean) * invstd) * x_coef
        if HAS_DY:
            dy = tl.load(dy_ptr + dy_offsets, mask=mask, other=0.0).to(ACC)
            if RELU:
                if ADDEND:
                    gate = load_bits(mask_ptr, mask_rows, row_valid, row_bytes, col0, cols, ROWS, COLS, GROUP, INT64)
                else:
                    gate = passes(normalized(x, f_pilot, f_shift, f_scale, f_coef, f_const), OUT)
                dy = tl.where(gate, dy, 0.0)
            result += dy * dy_coef
            daddend = dy
    return result, daddend


@triton.jit
def _store_tile(out_ptr, daddend_ptr, out_offsets, mask, result, daddend, DADDEND: tl.constexpr):
    """Write one tile of out (and, with DADDEND, of daddend: same strides as out)."""
    tl.store(out_ptr + out_offsets, result.to(out_ptr.dtype.element_ty), mask=mask)
    if DADDEND:
        tl.store(daddend_ptr + out_offsets, daddend.to(daddend_ptr.dtype.element_ty), mask=mask)


@triton.jit
def channel_major_elementwise_kernel(
    x_ptr, dy_ptr, out_ptr,  # (outer, C, inner) views; strides per tensor below
    coef_ptr,  # [6, C] accumulation dtype (FROM_MOVING: unused, pass center_ptr)
    moving_mean_ptr, moving_var_ptr, gamma_ptr, beta_ptr,  # [C], FROM_MOVING only
    center_ptr, invstd_ptr,  # [2, C] (fused ReLU: [6, C]) and [C]: outputs FROM_MOVING, else the backward's recompute reads center
    mask_ptr, daddend_ptr,  # bit mask (uint8) and daddend (out's strides): fused ReLU with an addend
    C, outer, inner, eps_hi, eps_lo,
    outer_mid, outer_lo,
    stride_xoh, stride_xom, stride_xo, stride_xc, stride_xi,
    stride_dyoh, stride_dyom, stride_dyo, stride_dyc, stride_dyi,
    stride_outoh, stride_outom, stride_outo, stride_outc, stride_outi,
    tiles_o, tiles_i,
    HAS_X: tl.constexpr, HAS_DY: tl.constexpr, FROM_MOVING: tl.constexpr,
    FIX_GAMMA: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr,
    RELU: tl.constexpr = False, ADDEND: tl.constexpr = False, BITS: tl.constexpr = False, GROUP: tl.constexpr = 8,
):
    """One [BLOCK_O, BLOCK_I] tile of one channel: grid = (C * tiles_o * tiles_i,)."""
    ACC: tl.constexpr = center_ptr.dtype.element_ty
    tiles = tiles_o * tiles_i
    pid = tl.program_id(0)
    c = pid // tiles
    tile = pid % tiles
    o = (tile // tiles_i) * BLOCK_O + tl.arange(0, BLOCK_O)
    i0 = (tile % tiles_i) * BLOCK_I
    i = i0 + tl.arange(0, BLOCK_I)
    mask = (o < outer)[:, None] & (i < inner)[None, :]
    pilot, shifted_mean, invstd, x_coef, dy_coef, const = _coefficients(
        c, c < C, C, coef_ptr, moving_mean_ptr, moving_var_ptr, gamma_ptr, beta_ptr,
        center_ptr, invstd_ptr, tile == 0, eps_hi, eps_lo, FROM_MOVING, FIX_GAMMA, ACC, HAS_X, HAS_DY,
        RELU and not ADDEND,
    )
    if HAS_DY and RELU and not ADDEND:
        f_pilot, f_shift, f_scale, f_coef, f_const = _forward_rows(center_ptr, c, c < C, C)
    else:
        f_pilot, f_shift, f_scale, f_coef, f_const = pilot, shifted_mean, invstd, x_coef, const
    result, daddend = _elementwise_tile(
        x_ptr, dy_ptr, mask_ptr,
        scalar_offset(c, stride_xc, INT64) + channel_major_offsets(
            o, i, outer_mid, outer_lo, stride_xoh, stride_xom, stride_xo, stride_xi, INT64),
        scalar_offset(c, stride_dyc, INT64) + channel_major_offsets(
            o, i, outer_mid, outer_lo, stride_dyoh, stride_dyom, stride_dyo, stride_dyi, INT64),
        mask, pilot, shifted_mean, invstd, x_coef, dy_coef, const, f_pilot, f_shift, f_scale, f_coef, f_const,
        o * C + c, o < outer, (inner + 7) // 8, i0, inner,
        HAS_X, HAS_DY, RELU, ADDEND, BITS, BLOCK_O, BLOCK_I, GROUP, INT64,
    )
    out_offsets = scalar_offset(c, stride_outc, INT64) + channel_major_offsets(
        o, i, outer_mid, outer_lo, stride_outoh, stride_outom, stride_outo, stride_outi, INT64)
    _store_tile(out_ptr, daddend_ptr, out_offsets, mask, result, daddend, HAS_DY and RELU and ADDEND)


@triton.jit
def channel_minor_elementwise_kernel(
    x_ptr, dy_ptr, out_ptr,  # rows x C matrices: row r = o * inner + i
    coef_ptr,  # [6, C] accumulation dtype (FROM_MOVING: unused, pass center_ptr)
    moving_mean_ptr, moving_var_ptr, gamma_ptr, beta_ptr,  # [C], FROM_MOVING only
    center_ptr, invstd_ptr,  # [2, C] (fused ReLU: [6, C]) and [C]: outputs FROM_MOVING, else the backward's recompute reads center
    mask_ptr, daddend_ptr,  # bit mask (uint8) and daddend (out's strides): fused ReLU with an addend
    C, inner, rows, eps_hi, eps_lo,
    outer_mid, outer_lo,
    stride_xoh, stride_xom, stride_xo, stride_xc, stride_xi,
    stride_dyoh, stride_dyom, stride_dyo, stride_dyc, stride_dyi,
    stride_outoh, stride_outom, stride_outo, stride_outc, stride_outi,
    c_blocks, row_tiles,
    HAS_X: tl.constexpr, HAS_DY: tl.constexpr, FROM_MOVING: tl.constexpr,
    FIX_GAMMA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
    RELU: tl.constexpr = False, ADDEND: tl.constexpr = False, BITS: tl.constexpr = False, GROUP: tl.constexpr = 8,
):
    """``row_tiles`` [BLOCK_R, BLOCK_C] tiles down the rows of one channel block, coefficients
    loaded once: grid = (cdiv(rows, row_tiles * BLOCK_R) * c_blocks,), channel blocks fastest."""
    ACC: tl.constexpr = center_ptr.dtype.element_ty
    pid = tl.program_id(0)
    row_block = pid // c_blocks
    c0 = (pid % c_blocks) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    c_mask = c < C
    pilot, shifted_mean, invstd, x_coef, dy_coef, const = _coefficients(
        c, c_mask, C, coef_ptr, moving_mean_ptr, moving_var_ptr, gamma_ptr, beta_ptr,
        center_ptr, invstd_ptr, row_block == 0, eps_hi, eps_lo, FROM_MOVING, FIX_GAMMA, ACC, HAS_X, HAS_DY,
        RELU and not ADDEND,
    )
    if HAS_DY and RELU and not ADDEND:
        f_pilot, f_shift, f_scale, f_coef, f_const = _forward_rows(center_ptr, c, c_mask, C)
    else:
        f_pilot, f_shift, f_scale, f_coef, f_const = pilot, shifted_mean, invstd, x_coef, const
    for t in range(range_bound(row_tiles)):
        r = (row_block * row_tiles + t) * BLOCK_R + tl.arange(0, BLOCK_R)
        mask = (r < rows)[:, None] & c_mask[None, :]
        result, daddend = _elementwise_tile(
            x_ptr, dy_ptr, mask_ptr,
            channel_minor_offsets(r, c, inner, outer_mid, outer_lo, stride_xoh, stride_xom, stride_xo,
                                  stride_xc, stride_xi, INT64),
            channel_minor_offsets(r, c, inner, outer_mid, outer_lo, stride_dyoh, stride_dyom, stride_dyo,
                                  stride_dyc, stride_dyi, INT64),
            mask, pilot[None, :], shifted_mean[None, :], invstd[None, :], x_coef[None, :], dy_coef[None, :],
            const[None, :], f_pilot[None, :], f_shift[None, :], f_scale[None, :], f_coef[None, :], f_const[None, :],
            r, r < rows, (C + 7) // 8, c0, C,
            HAS_X, HAS_DY, RELU, ADDEND, BITS, BLOCK_R, BLOCK_C, GROUP, INT64,
        )
        out_offsets = channel_minor_offsets(r, c, inner, outer_mid, outer_lo, stride_outoh, stride_outom, stride_outo,
                                            stride_outc, stride_outi, INT64)
        _store_tile(out_ptr, daddend_ptr, out_offsets, mask, result, daddend, HAS_DY and RELU and ADDEND)
