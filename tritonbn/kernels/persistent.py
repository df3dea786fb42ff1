"""Persistent single-pass kernels: one program owns whole channels, one launch per op.

When a channel's slice (m elements) fits one program's registers, the program loads it once,
reduces it, normalises from registers and writes once:

    training forward:  read x, write y          (2 S instead of 3 S, 1 launch instead of 3)
    backward:          read x and dy, write dx  (3 S instead of 5 S, 1 launch instead of 3)

Channel-major programs own one channel (a [BLOCK_O, BLOCK_I] tile covering outer x inner);
channel-minor programs own BLOCK_C channels (a [BLOCK_R, BLOCK_C] tile covering every row).
The statistics are exact two-pass sums over registers, on z = (x - pilot) * scale as in the
split path (see ``common.py``); the epilogues are the split path's (``common.finish_*``), so both
paths compute the same formulas.  The forward normalises the z it holds from its variance
pass, y = ((z - mean_z) * invstd_z) * g + beta: the float result of ((x - pilot) -
shifted_mean) * invstd * g + beta (scaling by a power of two is exact), right also where invstd
itself overflows (float32 subnormal data), and with three per-channel coefficients live
instead of five.
Fused epilogues (``common.py``): with RELU and/or ADDEND the forward writes relu(v), v =
``normalized(x - pilot, ...)`` + addend with the split path's coefficients (x - pilot is z
unscaled, exactly), and center[6, C] holds them for the backward's recompute; with BITS it
writes the ReLU's bits.  The backward passes dy where the forward's output was positive (from the bits
with ADDEND, writing daddend too; recomputed from x otherwise) before it reduces.
The backward with moving statistics computes dx = dy * g * invstd without x (SPEC: x is not
used there, so a NaN/Inf in x stays out of dx); it reads x only for dgamma, and not at all
with fix_gamma.
"""

import triton
import triton.language as tl

from .common import (
    apply_coefficients,
    channel_major_offsets,
    channel_minor_offsets,
    element_offset,
    divide_by_count,
    finish_backward,
    finish_statistics,
    finite_pilot,
    load_bits,
    normalized,
    passes,
    relu,
    scalar_offset,
    spread_scale,
    store_bits,
    unscale,
)


@triton.jit
def _two_pass_rows(x, mask, pilot, scale, m, inverse_m):
    """Mean and biased variance of z = (x - pilot) * scale down each column of a [R, K] tile.

    pilot, scale: [1, K]; ``inverse_m``: 1 / m correctly rounded to float32 (host); returns
    (mean_z [K], var_z [K], z [R, K], z - mean_z [R, K]), z and z - mean_z 0 where masked.
    """
    z = tl.where(mask, (x - pilot) * scale, 0.0)
    count = tl.cast(m, z.dtype)
    mean_z = divide_by_count(tl.sum(z, 0), count, inverse_m)
    centred_z = tl.where(mask, z - mean_z[None, :], 0.0)
    return mean_z, divide_by_count(tl.sum(centred_z * centred_z, 0), count, inverse_m), z, centred_z


@triton.jit
def _fused_output(z, mask, addend_ptr, addend_offsets, mask_ptr, center_ptr, c, c_mask, C,
                  pilot, mean_z, scale, invstd, invstd_z, g, beta, mask_rows, row_valid, row_bytes, col0, cols,
                  OUT: tl.constexpr, RELU: tl.constexpr, ADDEND: tl.constexpr, BITS: tl.constexpr,
                  ROWS: tl.constexpr, COLS: tl.constexpr, GROUP: tl.constexpr, INT64: tl.constexpr):
    """relu(v) (+ addend) of a fused forward from the tile of z = (x - pilot) * scale [ROWS, COLS]
    (per-channel values broadcastable to it): the elementwise kernel's v, from the coefficients
    the split path's finalize writes, which center[6, C] keeps for the backward's recompute."""
    x_scale, x_coef, const = apply_coefficients(invstd, invstd_z, g, beta, mean_z, scale)
    shifted_mean = unscale(mean_z, scale)
    if RELU and not ADDEND:
        tl.store(center_ptr + 2 * C + c, x_scale, mask=c_mask)
        tl.store(center_ptr + 3 * C + c, x_coef, mask=c_mask)
        tl.store(center_ptr + 5 * C + c, const, mask=c_mask)
    v = normalized(unscale(z, scale), 0.0, shifted_mean, x_scale, x_coef, const)
    if ADDEND:
        v += tl.load(addend_ptr + addend_offsets, mask=mask, other=0.0).to(v.dtype)
    if RELU:
        v = relu(v)
        if BITS:
            store_bits(mask_ptr, passes(v, OUT) & mask, mask_rows, row_valid, row_bytes, col0, cols,
                       ROWS, COLS, GROUP, INT64)
    return v


@triton.jit
def channel_major_persistent_forward_kernel(
    x_ptr, y_ptr,  # (outer, C, inner) views
    gamma_ptr, beta_ptr, moving_mean_ptr, moving_var_ptr,  # [C]
    mean_ptr, invstd_ptr, center_ptr,  # [C], [C], [2, C] ([6, C] fused ReLU) outputs (accumulation dtype)
    addend_ptr, mask_ptr,  # fused: the addend (own strides), the ReLU's bits (uint8 out, with an addend)
    C, outer, inner, m, eps_hi, eps_lo, momentum_hi, momentum_lo,
    inverse_m, unbias,  # 1 / m and m / (m - 1), correctly rounded to float32 (host)
    outer_mid, outer_lo,
    stride_xoh, stride_xom, stride_xo, stride_xc, stride_xi,
    stride_yoh, stride_yom, stride_yo, stride_yc, stride_yi,
    stride_aoh, stride_aom, stride_ao, stride_ac, stride_ai,
    FIX_GAMMA: tl.constexpr, UPDATE_MOVING: tl.constexpr, UNBIASED: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr,
    RELU: tl.constexpr = False, ADDEND: tl.constexpr = False, BITS: tl.constexpr = False, GROUP: tl.constexpr = 8,
):
    """Training forward of one channel: grid = (C,), BLOCK_O >= outer, BLOCK_I >= inner."""
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    lanes: tl.constexpr = BLOCK_O * BLOCK_I
    c_scalar = tl.program_id(0)
    c = c_scalar + tl.arange(0, 1)
    o = tl.arange(0, BLOCK_O)
    i = tl.arange(0, BLOCK_I)
    mask = (o < outer)[:, None] & (i < inner)[None, :]
    x_base = x_ptr + scalar_offset(c_scalar, stride_xc, INT64)
    x = tl.load(x_base + channel_major_offsets(
        o, i, outer_mid, outer_lo, stride_xoh, stride_xom, stride_xo, stride_xi, INT64), mask=mask, other=0.0).to(ACC)
    first = tl.zeros([1], tl.int32)
    last = tl.load(x_base + first + element_offset(
        outer - 1, inner - 1, outer_mid, outer_lo, stride_xoh, stride_xom, stride_xo, stride_xi, INT64)).to(ACC)
    pilot = finite_pilot(tl.load(x_base + first).to(ACC), last)
    scale = spread_scale(pilot, last)
    mean_z, var_z, z, _ = _two_pass_rows(
        tl.reshape(x, [lanes, 1]), tl.reshape(mask, [lanes, 1]), pilot[None, :], scale[None, :], m, inverse_m)
    invstd, invstd_z, g, beta = finish_statistics(
        c, c < C, C, pilot, mean_z, var_z, scale, m, gamma_ptr, beta_ptr, moving_mean_ptr, moving_var_ptr,
        mean_ptr, invstd_ptr, center_ptr, eps_hi, eps_lo, momentum_hi, momentum_lo,
        FIX_GAMMA, UPDATE_MOVING, UNBIASED, unbias,
    )
    if RELU or ADDEND:
        y = _fused_output(
            tl.reshape(z, [BLOCK_O, BLOCK_I]), mask, addend_ptr,
            scalar_offset(c_scalar, stride_ac, INT64) + channel_major_offsets(
                o, i, outer_mid, outer_lo, stride_aoh, stride_aom, stride_ao, stride_ai, INT64),
            # the per-channel values as scalars (their [1]-shaped forms broadcast onto the tile
            # made Triton replicate it: 8192 selects a thread, ptxas ran for minutes)
            mask_ptr, center_ptr, c, c < C, C, tl.sum(pilot, 0), tl.sum(mean_z, 0), tl.sum(scale, 0),
            tl.sum(invstd, 0), tl.sum(invstd_z, 0), tl.sum(g, 0), tl.sum(beta, 0),
            o * C + c_scalar, o < outer, (inner + 7) // 8, 0, inner,
            x_ptr.dtype.element_ty, RELU, ADDEND, BITS, BLOCK_O, BLOCK_I, GROUP, INT64)
    else:
        # z - mean_z again rather than the variance pass's copy: fewer registers here (ptxas)
        centred_z = tl.reshape(z, [BLOCK_O, BLOCK_I]) - tl.sum(mean_z, 0)
        y = (centred_z * tl.sum(invstd_z, 0)) * tl.sum(g, 0) + tl.sum(beta, 0)
    y_offsets = scalar_offset(c_scalar, stride_yc, INT64) + channel_major_offsets(
        o, i, outer_mid, outer_lo, stride_yoh, stride_yom, stride_yo, stride_yi, INT64)
    tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def channel_minor_persistent_forward_kernel(
    x_ptr, y_ptr,  # rows x C matrices: row r = o * inner + i
    gamma_ptr, beta_ptr, moving_mean_ptr, moving_var_ptr,  # [C]
    mean_ptr, invstd_ptr, center_ptr,  # [C], [C], [2, C] ([6, C] fused ReLU) outputs (accumulation dtype)
    addend_ptr, mask_ptr,  # fused: the addend (own strides), the ReLU's bits (uint8 out, with an addend)
    C, inner, rows, eps_hi, eps_lo, momentum_hi, momentum_lo,
    inverse_m, unbias,  # 1 / m and m / (m - 1), correctly rounded to float32 (host)
    outer_mid, outer_lo,
    stride_xoh, stride_xom, stride_xo, stride_xc, stride_xi,
    stride_yoh, stride_yom, stride_yo, stride_yc, stride_yi,
    stride_aoh, stride_aom, stride_ao, stride_ac, stride_ai,
    FIX_GAMMA: tl.constexpr, UPDATE_MOVING: tl.constexpr, UNBIASED: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
    RELU: tl.constexpr = False, ADDEND: tl.constexpr = False, BITS: tl.constexpr = False, GROUP: tl.constexpr = 8,
):
    """Training forward of BLOCK_C channels: grid = (cdiv(C, BLOCK_C),), BLOCK_R >= rows."""
    ACC: tl.constexpr = mean_ptr.dtype.element_ty
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    c_mask = c < C
    mask = (r < rows)[:, None] & c_mask[None, :]
    x = tl.load(x_ptr + channel_minor_offsets(
        r, c, inner, outer_mid, outer_lo, stride_xoh, stride_xom, stride_xo, stride_xc, stride_xi, INT64),
        mask=mask, other=0.0).to(ACC)
    channel_offsets = scalar_offset(c, stride_xc, INT64)
    last_offset = element_offset((rows - 1) // inner, (rows - 1) % inner, outer_mid, outer_lo,
                                 stride_xoh, stride_xom, stride_xo, stride_xi, INT64)
    last = tl.load(x_ptr + channel_offsets + last_offset, mask=c_mask, other=0.0).to(ACC)
    pilot = finite_pilot(tl.load(x_ptr + channel_offsets, mask=c_mask, other=0.0).to(ACC), last)
    scale = spread_scale(pilot, last)
    mean_z, var_z, z, centred_z = _two_pass_rows(x, mask, pilot[None, :], scale[None, :], rows, inverse_m)
    # without unbias: finish_statistics then divides (shifted mean, m / (m - 1)); its product
    # form spilled 88-136 bytes here (vector fp16/bf16 at 16384, Triton 3.6), where the
    # channel-major kernel needs the product form to stay spill-free (scalar fp16 at 8192, sm_80)
    invstd, invstd_z, g, beta = finish_statistics(
        c, c_mask, C, pilot, mean_z, var_z, scale, rows, gamma_ptr, beta_ptr, moving_mean_ptr, moving_var_ptr,
        mean_ptr, invstd_ptr, center_ptr, eps_hi, eps_lo, momentum_hi, momentum_lo,
        FIX_GAMMA, UPDATE_MOVING, UNBIASED,
    )
    if RELU or ADDEND:
        y = _fused_output(
            z, mask, addend_ptr,
            channel_minor_offsets(r, c, inner, outer_mid, outer_lo, stride_aoh, stride_aom, stride_ao, stride_ac,
                                  stride_ai, INT64),
            mask_ptr, center_ptr, c, c_mask, C, pilot, mean_z, scale, invstd, invstd_z, g, beta,
            r, r < rows, (C + 7) // 8, tl.program_id(0) * BLOCK_C, C,
            x_ptr.dtype.element_ty, RELU, ADDEND, BITS, BLOCK_R, BLOCK_C, GROUP, INT64)
    else:
        y = (centred_z * invstd_z[None, :]) * g[None, :] + beta[None, :]
    y_offsets = channel_minor_offsets(r, c, inner, outer_mid, outer_lo, stride_yoh, stride_yom, stride_yo, stride_yc,
                                      stride_yi, INT64)
    tl.store(y_ptr + y_offsets, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_dy(dy, x, mask, center_ptr, c, c_mask, C, mask_ptr, daddend_ptr, daddend_offsets,
              mask_rows, row_valid, row_bytes, col0, cols,
              OUT: tl.constexpr, ADDEND: tl.constexpr, ROWS: tl.constexpr, COLS: tl.constexpr,
              GROUP: tl.constexpr, INT64: tl.constexpr):
    """dy where the fused forward's output was positive, 0 elsewhere: the decisions from the bits
    (ADDEND, which also writes daddend = the result) or recomputed from x with the forward's
    coefficients center[6, C] (``normalized``, as the forward evaluated it)."""
    if ADDEND:
        gate = load_bits(mask_ptr, mask_rows, row_valid, row_bytes, col0, cols, ROWS, COLS, GROUP, INT64)
    else:
        v = normalized(x, tl.load(center_ptr + c, mask=c_mask, other=0.0),
                       tl.load(center_ptr + C + c, mask=c_mask, other=0.0),
                       tl.load(center_ptr + 2 * C + c, mask=c_mask, other=0.0),
                       tl.load(center_ptr + 3 * C + c, mask=c_mask, other=0.0),
                       tl.load(center_ptr + 5 * C + c, mask=c_mask, other=0.0))
        gate = passes(v, OUT)
    dy = tl.where(gate & mask, dy, 0.0)
    if ADDEND:
        tl.store(daddend_ptr + daddend_offsets, dy.to(daddend_ptr.dtype.element_ty), mask=mask)
    return dy


@triton.jit
def channel_major_persistent_backward_kernel(
    x_ptr, dy_ptr, dx_ptr,  # (outer, C, inner) views
    center_ptr, invstd_ptr,  # [2, C] ([6, C] fused ReLU without addend), [C]: what the forward normalised with
    gamma_ptr, dgamma_ptr, dbeta_ptr,  # [C]
    mask_ptr, daddend_ptr,  # fused ReLU with an addend: the forward's bits, daddend out (dx's strides)
    C, outer, inner, m, outer_mid, outer_lo,
    stride_xoh, stride_xom, stride_xo, stride_xc, stride_xi,
    stride_dyoh, stride_dyom, stride_dyo, stride_dyc, stride_dyi,
    stride_dxoh, stride_dxom, stride_dxo, stride_dxc, stride_dxi,
    FIX_GAMMA: tl.constexpr, BATCH_STATS: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr,
    RELU: tl.constexpr = False, ADDEND: tl.constexpr = False, GROUP: tl.constexpr = 8,
):
    """Backward of one channel: S, D, dgamma, dbeta and dx in one pass; grid = (C,)."""
    ACC: tl.constexpr = invstd_ptr.dtype.element_ty
    c_scalar = tl.program_id(0)
    c = c_scalar + tl.arange(0, 1)
    o = tl.arange(0, BLOCK_O)
    i = tl.arange(0, BLOCK_I)
    mask = (o < outer)[:, None] & (i < inner)[None, :]
    dy = tl.load(dy_ptr + scalar_offset(c_scalar, stride_dyc, INT64)
                 + channel_major_offsets(o, i, outer_mid, outer_lo, stride_dyoh, stride_dyom, stride_dyo,
                                         stride_dyi, INT64),
                 mask=mask, other=0.0).to(ACC)
    recompute: tl.constexpr = RELU and not ADDEND  # the ReLU's decisions from x (else from the bits)
    if RELU:
        if recompute:
            x = tl.load(x_ptr + scalar_offset(c_scalar, stride_xc, INT64)
                        + channel_major_offsets(o, i, outer_mid, outer_lo, stride_xoh, stride_xom, stride_xo,
                                                stride_xi, INT64),
                        mask=mask, other=0.0).to(ACC)
        else:
            x = dy
        dy = _gated_dy(dy, x, mask, center_ptr, c, c < C, C, mask_ptr, daddend_ptr,
                       scalar_offset(c_scalar, stride_dxc, INT64) + channel_major_offsets(
                           o, i, outer_mid, outer_lo, stride_dxoh, stride_dxom, stride_dxo, stride_dxi, INT64),
                       o * C + c_scalar, o < outer, (inner + 7) // 8, 0, inner,
                       x_ptr.dtype.element_ty, ADDEND, BLOCK_O, BLOCK_I, GROUP, INT64)
    sum_dy = tl.sum(tl.reshape(dy, [BLOCK_O * BLOCK_I]), 0) + tl.zeros([1], ACC)
    if BATCH_STATS or not FIX_GAMMA:  # D = sum((x - mean) * dy) feeds dx or dgamma
        if not recompute:  # (loaded after the sum of dy, as ptxas allocates it best)
            x = tl.load(x_ptr + scalar_offset(c_scalar, stride_xc, INT64)
                        + channel_major_offsets(o, i, outer_mid, outer_lo, stride_xoh, stride_xom, stride_xo,
                                                stride_xi, INT64),
                        mask=mask, other=0.0).to(ACC)
        pilot = tl.load(center_ptr + c_scalar)
        shifted_mean = tl.load(center_ptr + C + c_scalar)
        centred = tl.where(mask, (x - pilot) - shifted_mean, 0.0)
        sum_dy_xmu = tl.sum(tl.reshape(centred * dy, [BLOCK_O * BLOCK_I]), 0) + tl.zeros([1], ACC)
    else:
        sum_dy_xmu = tl.zeros([1], ACC)
    invstd = tl.load(invstd_ptr + c)
    x_coef, dy_coef, const = finish_backward(
        c, c < C, sum_dy, sum_dy_xmu, invstd, m, gamma_ptr, dgamma_ptr, dbeta_ptr, FIX_GAMMA, BATCH_STATS)
    if BATCH_STATS:
        dx = (centred * tl.sum(invstd, 0)) * tl.sum(x_coef, 0) + dy * tl.sum(dy_coef, 0) + tl.sum(const, 0)
    else:
        dx = dy * tl.sum(dy_coef, 0)  # moving statistics: dx = dy * g * invstd, x not used
    dx_offsets = scalar_offset(c_scalar, stride_dxc, INT64) + channel_major_offsets(
        o, i, outer_mid, outer_lo, stride_dxoh, stride_dxom, stride_dxo, stride_dxi, INT64)
    tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)


@triton.jit
def channel_minor_persistent_backward_kernel(
    x_ptr, dy_ptr, dx_ptr,  # rows x C matrices: row r = o * inner + i
    center_ptr, invstd_ptr,  # [2, C] ([6, C] fused ReLU without addend), [C]
    gamma_ptr, dgamma_ptr, dbeta_ptr,  # [C]
    mask_ptr, daddend_ptr,  # fused ReLU with an addend: the forward's bits, daddend out (dx's strides)
    C, inner, rows, outer_mid, outer_lo,
    stride_xoh, stride_xom, stride_xo, stride_xc, stride_xi,
    stride_dyoh, stride_dyom, stride_dyo, stride_dyc, stride_dyi,
    stride_dxoh, stride_dxom, stride_dxo, stride_dxc, stride_dxi,
    FIX_GAMMA: tl.constexpr, BATCH_STATS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
    RELU: tl.constexpr = False, ADDEND: tl.constexpr = False, GROUP: tl.constexpr = 8,
):
    """Backward of BLOCK_C channels over every row in one pass; grid = (cdiv(C, BLOCK_C),)."""
    ACC: tl.constexpr = invstd_ptr.dtype.element_ty
    c0 = tl.program_id(0) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    r = tl.arange(0, BLOCK_R)
    c_mask = c < C
    mask = (r < rows)[:, None] & c_mask[None, :]
    dy = tl.load(dy_ptr + channel_minor_offsets(
        r, c, inner, outer_mid, outer_lo, stride_dyoh, stride_dyom, stride_dyo, stride_dyc, stride_dyi, INT64),
        mask=mask, other=0.0).to(ACC)
    recompute: tl.constexpr = RELU and not ADDEND  # the ReLU's decisions from x (else from the bits)
    if RELU:
        if recompute:
            x = tl.load(x_ptr + channel_minor_offsets(
                r, c, inner, outer_mid, outer_lo, stride_xoh, stride_xom, stride_xo, stride_xc, stride_xi, INT64),
                mask=mask, other=0.0).to(ACC)
        else:
            x = dy
        dy = _gated_dy(dy, x, mask, center_ptr, c, c_mask, C, mask_ptr, daddend_ptr,
                       channel_minor_offsets(r, c, inner, outer_mid, outer_lo, stride_dxoh, stride_dxom, stride_dxo,
                                             stride_dxc, stride_dxi, INT64),
                       r, r < rows, (C + 7) // 8, c0, C,
                       x_ptr.dtype.element_ty, ADDEND, BLOCK_R, BLOCK_C, GROUP, INT64)
    if BATCH_STATS or not FIX_GAMMA:  # D = sum((x - mean) * dy) feeds dx or dgamma
        if not recompute:
            x = tl.load(x_ptr + channel_minor_offsets(
                r, c, inner, outer_mid, outer_lo, stride_xoh, stride_xom, stride_xo, stride_xc, stride_xi, INT64),
                mask=mask, other=0.0).to(ACC)
        pilot = tl.load(center_ptr + c, mask=c_mask, other=0.0)
        shifted_mean = tl.load(center_ptr + C + c, mask=c_mask, other=0.0)
        centred = tl.where(mask, (x - pilot[None, :]) - shifted_mean[None, :], 0.0)
        sum_dy_xmu = tl.sum(centred * dy, 0)
    else:
        sum_dy_xmu = tl.zeros([BLOCK_C], ACC)
    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    x_coef, dy_coef, const = finish_backward(
        c, c_mask, tl.sum(dy, 0), sum_dy_xmu, invstd, rows, gamma_ptr, dgamma_ptr, dbeta_ptr,
        FIX_GAMMA, BATCH_STATS)
    if BATCH_STATS:
        dx = (centred * invstd[None, :]) * x_coef[None, :] + dy * dy_coef[None, :] + const[None, :]
    else:
        dx = dy * dy_coef[None, :]  # moving statistics: dx = dy * g * invstd, x not used
    dx_offsets = channel_minor_offsets(r, c, inner, outer_mid, outer_lo, stride_dxoh, stride_dxom, stride_dxo,
                                       stride_dxc, stride_dxi, INT64)
    tl.store(dx_ptr + dx_offsets, dx.to(dx_ptr.dtype.element_ty), mask=mask)
