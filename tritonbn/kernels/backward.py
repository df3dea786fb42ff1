"""Backward reductions: per-channel S = sum(dy) and D = sum((x - mean) * dy), then a finalize.

Phase 1 (``*_backward_reduce_kernel``): partial S and D of one split, like the statistics
kernels (same split geometry), into ``partial[2, C, P]``.
Phase 2 (``finalize_backward_kernel``): sums each channel's partials in a fixed order, writes
dgamma = D * invstd (0 with fix_gamma), dbeta = S, and the dx coefficients of the elementwise
kernel (see ``elementwise.py``):

    batch statistics:  dx = g*invstd * (dy - S/m - (x - mean) * invstd * (invstd * D) / m)
    moving statistics: dx = g*invstd * dy
"""

import triton
import triton.language as tl

from .common import (
    channel_major_split,
    channel_minor_offsets,
    finish_backward,
    range_bound,
    row_offsets,
    scalar_offset,
)


@triton.jit
def channel_major_backward_reduce_kernel(
    x_ptr, dy_ptr,  # (outer, C, inner) views
    center_ptr,  # [2, C] the forward's mean as (pilot, shifted mean), accumulation dtype
    partial_ptr,  # [2, C, P] out: partial S and D
    C, outer, inner,
    outer_mid, outer_lo,
    stride_xoh, stride_xom, stride_xo, stride_xc, stride_xi,
    stride_dyoh, stride_dyom, stride_dyo, stride_dyc, stride_dyi,
    rows_per_split, cols_per_split, SPLIT_O, SPLIT_I,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr,
):
    """Partial S and D of one (channel, split): grid = (C * SPLIT_O * SPLIT_I,)."""
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    num_splits = SPLIT_O * SPLIT_I
    c, split, o_begin, o_end, i_begin, i_end = channel_major_split(
        outer, inner, rows_per_split, cols_per_split, SPLIT_O, SPLIT_I)
    x_base = x_ptr + scalar_offset(c, stride_xc, INT64)
    dy_base = dy_ptr + scalar_offset(c, stride_dyc, INT64)
    pilot = tl.load(center_ptr + c)
    shifted_mean = tl.load(center_ptr + C + c)

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
            sum_dy += dy
            sum_dy_xmu += tl.where(mask, ((x - pilot) - shifted_mean) * dy, 0.0)

    slot = scalar_offset(c, num_splits, INT64) + split
    tl.store(partial_ptr + slot, tl.sum(tl.sum(sum_dy, 1), 0))
    tl.store(partial_ptr + C * num_splits + slot, tl.sum(tl.sum(sum_dy_xmu, 1), 0))


@triton.jit
def channel_minor_backward_reduce_kernel(
    x_ptr, dy_ptr,  # rows x C matrices: row r = o * inner + i
    center_ptr,  # [2, C] the forward's mean as (pilot, shifted mean), accumulation dtype
    partial_ptr,  # [2, C, P] out: partial S and D; P = SPLIT
    C, inner, rows,
    outer_mid, outer_lo,
    stride_xoh, stride_xom, stride_xo, stride_xc, stride_xi,
    stride_dyoh, stride_dyom, stride_dyo, stride_dyc, stride_dyi,
    rows_per_split, SPLIT,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
):
    """Partial S and D of BLOCK_C channels over one row split: grid = (cdiv(C, BLOCK_C) * SPLIT,)."""
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    pid = tl.program_id(0)
    c = (pid // SPLIT) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = pid % SPLIT
    r_begin = split * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, rows)
    c_mask = c < C
    pilot = tl.load(center_ptr + c, mask=c_mask, other=0.0)[None, :]
    shifted_mean = tl.load(center_ptr + C + c, mask=c_mask, other=0.0)[None, :]

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
        sum_dy += dy
        sum_dy_xmu += tl.where(mask, ((x - pilot) - shifted_mean) * dy, 0.0)

    slot = scalar_offset(c, SPLIT, INT64) + split
    tl.store(partial_ptr + slot, tl.sum(sum_dy, 0), mask=c_mask)
    tl.store(partial_ptr + C * SPLIT + slot, tl.sum(sum_dy_xmu, 0), mask=c_mask)


@triton.jit
def finalize_backward_kernel(
    partial_ptr,  # [2, C, P] partial S and D (accumulation dtype)
    center_ptr, invstd_ptr,  # [2, C] and [C]: what the forward normalised with
    gamma_ptr,  # [C]
    dgamma_ptr, dbeta_ptr,  # [C] out, in gamma's / beta's dtype
    coef_ptr,  # [6, C] out: dx coefficients (pilot, shifted mean, invstd, x_coef, dy_coef, const)
    C, P, m,
    FIX_GAMMA: tl.constexpr, BATCH_STATS: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Sum the partials of each channel; dgamma, dbeta and the dx coefficients.

    grid = (cdiv(C, BLOCK_C),), BLOCK_P >= P.
    """
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    p = tl.arange(0, BLOCK_P)
    c_mask = c < C
    mask = (p < P)[:, None] & c_mask[None, :]
    slots = c[None, :] * P + p[:, None]
    sum_dy = tl.sum(tl.load(partial_ptr + slots, mask=mask, other=0.0), 0)
    sum_dy_xmu = tl.sum(tl.load(partial_ptr + C * P + slots, mask=mask, other=0.0), 0)

    invstd = tl.load(invstd_ptr + c, mask=c_mask, other=0.0)
    x_coef, dy_coef, const = finish_backward(
        c, c_mask, sum_dy, sum_dy_xmu, invstd, m, gamma_ptr, dgamma_ptr, dbeta_ptr, FIX_GAMMA, BATCH_STATS)
    tl.store(coef_ptr + c, tl.load(center_ptr + c, mask=c_mask, other=0.0), mask=c_mask)
    tl.store(coef_ptr + C + c, tl.load(center_ptr + C + c, mask=c_mask, other=0.0), mask=c_mask)
    tl.store(coef_ptr + 2 * C + c, invstd, mask=c_mask)
    tl.store(coef_ptr + 3 * C + c, x_coef, mask=c_mask)
    tl.store(coef_ptr + 4 * C + c, dy_coef, mask=c_mask)
    tl.store(coef_ptr + 5 * C + c, const, mask=c_mask)
