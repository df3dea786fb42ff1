"""Backward reductions: per-channel S = sum(dy) and D = sum((x - mean) * dy) and their finalize, in one launch.

Each program of ``*_backward_reduce_kernel`` writes the partial S and D of one split, like the
statistics kernels (same split geometry), into ``partial[2, C, P]``.  With FINALIZE, the last
program of a channel (block) to get there (``common.last_to_arrive``) sums the channel's partials
in a fixed order (split 0 to P-1: deterministic), writes dgamma = D * invstd (0 with fix_gamma),
dbeta = S, and the dx coefficients of the elementwise kernel (see ``elementwise.py``):

    batch statistics:  dx = g*invstd * (dy - S/m - (x - mean) * invstd * (invstd * D) / m)
    moving statistics: dx = g*invstd * dy

With a fused ReLU (RELU) dy counts only where the forward's output was positive: the decisions
come from the forward's bits (ADDEND) or are recomputed from x and the forward's coefficients
center[6, C] (``common.normalized``, as the forward evaluated them).
"""

import triton
import triton.language as tl

from .common import (
    channel_major_split,
    channel_minor_offsets,
    finish_backward,
    last_to_arrive,
    load_bits,
    normalized,
    passes,
    range_bound,
    row_offsets,
    scalar_offset,
)


@triton.jit
def channel_major_backward_reduce_kernel(
    x_ptr, dy_ptr,  # (outer, C, inner) views
    center_ptr,  # [2, C] the forward's mean as (pilot, shifted mean), accumulation dtype
    partial_ptr,  # [2, C, P] out: partial S and D
    tickets_ptr,  # [>= C] int32 zeros (FINALIZE): programs of each channel done so far; left zero
    invstd_ptr, gamma_ptr,  # [C] what the forward normalised with (FINALIZE)
    dgamma_ptr, dbeta_ptr, coef_ptr,  # [C], [C], [6, C] out (FINALIZE), as _finalize_channels
    mask_ptr,  # fused ReLU with an addend: the forward's bits (uint8)
    C, outer, inner, m,
    outer_mid, outer_lo,
    stride_xoh, stride_xom, stride_xo, stride_xc, stride_xi,
    stride_dyoh, stride_dyom, stride_dyo, stride_dyc, stride_dyi,
    rows_per_split, cols_per_split, SPLIT_O, SPLIT_I,
    inverse_m, inverse_m_bits,  # (FINALIZE) 1 / m correctly rounded: float32, and float64's bits (host)
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr,
    FINALIZE: tl.constexpr, FIX_GAMMA: tl.constexpr, BATCH_STATS: tl.constexpr, BLOCK_P: tl.constexpr,
    RELU: tl.constexpr = False, ADDEND: tl.constexpr = False, GROUP: tl.constexpr = 8,
):
    """Partial S and D of one (channel, split), and with FINALIZE the channel's gradients and dx
    coefficients (its last program, P <= BLOCK_P partials): grid = (C * SPLIT_O * SPLIT_I,).
    Without FINALIZE the pointers after ``partial_ptr`` are unused."""
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    num_splits = SPLIT_O * SPLIT_I
    c, split, o_begin, o_end, i_begin, i_end = channel_major_split(
        outer, inner, rows_per_split, cols_per_split, SPLIT_O, SPLIT_I)
    x_base = x_ptr + scalar_offset(c, stride_xc, INT64)
    dy_base = dy_ptr + scalar_offset(c, stride_dyc, INT64)
    pilot = tl.load(center_ptr + c)
    shifted_mean = tl.load(center_ptr + C + c)
    if RELU and not ADDEND:
        f_scale, f_coef, f_const = _forward_scale_rows(center_ptr, c, c < C, C)

    sum_dy = tl.zeros([BLOCK_O, BLOCK_I], ACC)
    sum_dy_xmu = tl.zeros([BLOCK_O, BLOCK_I], ACC)
    for o0 in range(range_bound(o_begin), range_bound(o_end), BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        x_rows = x_base + row_offsets(o, outer_mid, outer_lo, stride_xoh, stride_xom, stride_xo, INT64)
        dy_rows = dy_base + row_offsets(o, outer_mid, outer_lo, stride_dyoh, stride_dyom, stride_dyo, INT64)
        for i0 in range(range_bound(i_begin), range_bound(i_end), BLOCK_I):
            i = i0 + tl.arange(0, BLOCK_I)
            mask = (o < o_end)[:, None] & (i < i_end)[None, :]
            x = tl.load(x_rows[:, None] + scalar_offset(i, stride_xi, INT64)[None, :], mask=mask, other=0.0).to(ACC)
            dy = tl.load(dy_rows[:, None] + scalar_offset(i, stride_dyi, INT64)[None, :], mask=mask, other=0.0).to(ACC)
            if RELU:
                if ADDEND:
                    gate = load_bits(mask_ptr, o * C + c, o < o_end, (inner + 7) // 8, i0, inner,
                                     BLOCK_O, BLOCK_I, GROUP, INT64)
                else:
                    gate = passes(normalized(x, pilot, shifted_mean, f_scale, f_coef, f_const), x_ptr.dtype.element_ty)
                dy = tl.where(gate & mask, dy, 0.0)
            sum_dy += dy
            sum_dy_xmu += tl.where(mask, ((x - pilot) - shifted_mean) * dy, 0.0)

    slot = scalar_offset(c, num_splits, INT64) + split
    tl.store(partial_ptr + slot, tl.sum(tl.sum(sum_dy, 1), 0))
    tl.store(partial_ptr + C * num_splits + slot, tl.sum(tl.sum(sum_dy_xmu, 1), 0))
    if FINALIZE:
        if last_to_arrive(tickets_ptr, c, num_splits):
            channel = c + tl.arange(0, 1)
            _finalize_channels(partial_ptr, center_ptr, invstd_ptr, gamma_ptr, dgamma_ptr, dbeta_ptr, coef_ptr,
                               channel, channel < C, C, num_splits, m, inverse_m, inverse_m_bits, FIX_GAMMA,
                               BATCH_STATS, BLOCK_P)


@triton.jit
def channel_minor_backward_reduce_kernel(
    x_ptr, dy_ptr,  # rows x C matrices: row r = o * inner + i
    center_ptr,  # [2, C] the forward's mean as (pilot, shifted mean), accumulation dtype
    partial_ptr,  # [2, C, P] out: partial S and D; P = SPLIT
    tickets_ptr,  # [>= cdiv(C, BLOCK_C)] int32 zeros (FINALIZE): one per channel block; left zero
    invstd_ptr, gamma_ptr,  # [C] what the forward normalised with (FINALIZE)
    dgamma_ptr, dbeta_ptr, coef_ptr,  # [C], [C], [6, C] out (FINALIZE), as _finalize_channels
    mask_ptr,  # fused ReLU with an addend: the forward's bits (uint8)
    C, inner, rows,
    outer_mid, outer_lo,
    stride_xoh, stride_xom, stride_xo, stride_xc, stride_xi,
    stride_dyoh, stride_dyom, stride_dyo, stride_dyc, stride_dyi,
    rows_per_split, SPLIT,
    inverse_m, inverse_m_bits,  # (FINALIZE) 1 / m correctly rounded: float32, and float64's bits (host)
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
    FINALIZE: tl.constexpr, FIX_GAMMA: tl.constexpr, BATCH_STATS: tl.constexpr, BLOCK_P: tl.constexpr,
    TAIL_C: tl.constexpr,
    RELU: tl.constexpr = False, ADDEND: tl.constexpr = False, GROUP: tl.constexpr = 8,
):
    """Partial S and D of BLOCK_C channels over one row split, and with FINALIZE the block's
    gradients and dx coefficients (its last program, TAIL_C channels at a time; BLOCK_P >= SPLIT;
    m = rows): grid = (cdiv(C, BLOCK_C) * SPLIT,)."""
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    pid = tl.program_id(0)
    c0 = (pid // SPLIT) * BLOCK_C
    c = c0 + tl.arange(0, BLOCK_C)
    split = pid % SPLIT
    r_begin = split * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, rows)
    c_mask = c < C
    pilot = tl.load(center_ptr + c, mask=c_mask, other=0.0)[None, :]
    shifted_mean = tl.load(center_ptr + C + c, mask=c_mask, other=0.0)[None, :]
    if RELU and not ADDEND:
        f_scale, f_coef, f_const = _forward_scale_rows(center_ptr, c, c_mask, C)

    sum_dy = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    sum_dy_xmu = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    for r0 in range(range_bound(r_begin), range_bound(r_end), BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        mask = (r < r_end)[:, None] & c_mask[None, :]
        x = tl.load(x_ptr + channel_minor_offsets(
            r, c, inner, outer_mid, outer_lo, stride_xoh, stride_xom, stride_xo, stride_xc, stride_xi, INT64),
            mask=mask, other=0.0).to(ACC)
        dy = tl.load(dy_ptr + channel_minor_offsets(
            r, c, inner, outer_mid, outer_lo, stride_dyoh, stride_dyom, stride_dyo, stride_dyc, stride_dyi, INT64),
            mask=mask, other=0.0).to(ACC)
        if RELU:
            if ADDEND:
                gate = load_bits(mask_ptr, r, r < r_end, (C + 7) // 8, c0, C, BLOCK_R, BLOCK_C, GROUP, INT64)
            else:
                gate = passes(normalized(x, pilot, shifted_mean, f_scale[None, :], f_coef[None, :], f_const[None, :]),
                              x_ptr.dtype.element_ty)
            dy = tl.where(gate & mask, dy, 0.0)
        sum_dy += dy
        sum_dy_xmu += tl.where(mask, ((x - pilot) - shifted_mean) * dy, 0.0)

    slot = scalar_offset(c, SPLIT, INT64) + split
    tl.store(partial_ptr + slot, tl.sum(sum_dy, 0), mask=c_mask)
    tl.store(partial_ptr + C * SPLIT + slot, tl.sum(sum_dy_xmu, 0), mask=c_mask)
    if FINALIZE:
        block = pid // SPLIT
        if last_to_arrive(tickets_ptr, block, SPLIT):
            for c0 in range(0, BLOCK_C, TAIL_C):
                channels = block * BLOCK_C + c0 + tl.arange(0, TAIL_C)
                _finalize_channels(partial_ptr, center_ptr, invstd_ptr, gamma_ptr, dgamma_ptr, dbeta_ptr, coef_ptr,
                                   channels, channels < C, C, SPLIT, rows, inverse_m, inverse_m_bits, FIX_GAMMA,
                                   BATCH_STATS, BLOCK_P)


@triton.jit
def _forward_scale_rows(center_ptr, c, c_mask, C):
    """(x_scale, x_coef, const) of the forward (center rows 2, 3, 5) for a fused ReLU's recompute."""
    return (tl.load(center_ptr + 2 * C + c, mask=c_mask, other=0.0),
            tl.load(center_ptr + 3 * C + c, mask=c_mask, other=0.0),
            tl.load(center_ptr + 5 * C + c, mask=c_mask, other=0.0))


@triton.jit
def _finalize_channels(
    partial_ptr,  # [2, C, P] partial S and D (accumulation dtype)
    center_ptr, invstd_ptr,  # [2, C] and [C]: what the forward normalised with
    gamma_ptr,  # [C]
    dgamma_ptr, dbeta_ptr,  # [C] out, in gamma's / beta's dtype
    coef_ptr,  # [6, C] out: dx coefficients (pilot, shifted mean, invstd, x_coef, dy_coef, const)
    c, c_mask, C, P, m, inverse_m, inverse_m_bits,
    FIX_GAMMA: tl.constexpr, BATCH_STATS: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Sum the P <= BLOCK_P partials of channels ``c`` ([K]) in split order; dgamma, dbeta and the
    dx coefficients (``inverse_m``: the host's 1 / m, so that no division follows the reduction's
    loop).  Partial loads bypass L1 (``.cg``): other programs wrote them this launch."""
    p = tl.arange(0, BLOCK_P)
    mask = (p < P)[:, None] & c_mask[None, :]
    slots = c[None, :] * P + p[:, None]
    sum_dy = tl.sum(tl.load(partial_ptr + slots, mask=mask, other=0.0, cache_modifier=".cg"), 0)
    sum_dy_xmu = tl.sum(tl.load(partial_ptr + C * P + slots, mask=mask, other=0.0, cache_modifier=".cg"), 0)

    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    if invstd.dtype == tl.float64:  # (scalar kernel arguments are float32 or integers)
        inverse = tl.cast(inverse_m_bits, tl.float64, bitcast=True)
    else:
        inverse = tl.cast(inverse_m, tl.float32)
    x_coef, dy_coef, const = finish_backward(
        c, c_mask, sum_dy, sum_dy_xmu, invstd, m, gamma_ptr, dgamma_ptr, dbeta_ptr, FIX_GAMMA, BATCH_STATS,
        inverse)
    tl.store(coef_ptr + c, tl.load(center_ptr + c, mask=c_mask, other=0.0), mask=c_mask)
    tl.store(coef_ptr + C + c, tl.load(center_ptr + C + c, mask=c_mask, other=0.0), mask=c_mask)
    tl.store(coef_ptr + 2 * C + c, invstd, mask=c_mask)
    tl.store(coef_ptr + 3 * C + c, x_coef, mask=c_mask)
    tl.store(coef_ptr + 4 * C + c, dy_coef, mask=c_mask)
    tl.store(coef_ptr + 5 * C + c, const, mask=c_mask)
