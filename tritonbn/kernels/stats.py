"""Training-forward statistics: per-channel (mean, M2, count) partials and their finalize, in one launch.

Each program of ``*_stats_kernel`` reduces one channel (channel-major) or a block of channels
(channel-minor) over one split of the reduced range, and writes its (mean, M2, count) partial.  Splitting
lets C * splits programs fill the GPU when C alone cannot.  With FINALIZE, the last program of a
channel (block) to store its partial (``common.last_to_arrive``: an atomic ticket per channel
(block), reset by that program) merges the channel's partials in a fixed order (deterministic:
split 0 to P-1, whichever program came last), writes mean/invstd, the coefficients of the apply
kernel and the moving-stat update.  Without FINALIZE (SyncBatchNorm: the partials of every rank
are merged first) the kernel writes the partials only.

Partials live in one buffer ``partial[5, C, P]``: planes 0-4 hold mean and M2 of z, the count,
the pilot and the scale of split p of channel c at ``k * C * P + c * P + p``; P = splits.

Shift and scale: every program of a channel accumulates z = (x - pilot) * scale, with the same
pilot (the channel's first element; its last where the first is NaN/Inf) and scale (a power of
two from |last - first|), so the accumulators see values near 1 even when the mean is 1e4 times
the std, or the data 1e30 or 1e-30.  The mean is carried as the pair (pilot, shifted mean) to
the apply and backward kernels, which compute x - mean as (x - pilot) - shifted_mean: exact
where it matters.

Sums: each lane sums z and z^2 (``common.shifted_moments`` turns the split's totals into mean
and M2).  Where that M2 would have cancelled more than 4 bits (``common.cancelled``: the pilot
is an outlier of its channel), the program reads its split again and sums z - mean: one more
read of that split, for data whose first element lies ~4 standard deviations or more from the
mean.  Infinite data needs no second look: the sum of z is +-inf as sum(x) is, or NaN where the
data holds NaN or both infinities, and M2 is NaN either way.
"""

import triton
import triton.language as tl

from .common import (
    apply_coefficients,
    cancelled,
    chan_merge_rows,
    channel_major_split,
    channel_minor_offsets,
    divide_by_count,
    element_offset,
    finish_statistics,
    finite_pilot,
    last_to_arrive,
    range_bound,
    row_offsets,
    scalar_offset,
    shifted_moments,
    spread_scale,
)


@triton.jit
def _channel_major_z(rows, o, i, o_end, i_end, stride_i, pilot, scale, shift, ACC: tl.constexpr,
                     INT64: tl.constexpr):
    """z = (x - pilot) * scale of one channel's [BLOCK_O, BLOCK_I] tile (rows o, columns i) of a
    split ending at (o_end, i_end), 0 outside it, and the tile's mask; ``rows``: [BLOCK_O]
    pointers to the rows.  One FMA, x * scale + shift with shift = -pilot * scale (exact: scale is
    a power of two), which is (x - pilot) * scale rounded once; masked lanes load the pilot."""
    mask = (o < o_end)[:, None] & (i < i_end)[None, :]
    pointers = rows[:, None] + scalar_offset(i, stride_i, INT64)[None, :]
    return tl.fma(tl.load(pointers, mask=mask, other=pilot).to(ACC), scale, shift), mask


@triton.jit
def _channel_minor_z(x_ptr, r, c, c_mask, r_end, inner, outer_mid, outer_lo, stride_oh, stride_om, stride_o,
                     stride_c, stride_i, pilot, scale, shift, ACC: tl.constexpr, INT64: tl.constexpr):
    """z = (x - pilot) * scale of a [BLOCK_R, BLOCK_C] tile (rows r of channels c) of a split
    ending at row r_end, 0 outside it, and the tile's mask; pilot, scale, shift: [BLOCK_C]
    (as ``_channel_major_z``)."""
    mask = (r < r_end)[:, None] & c_mask[None, :]
    offsets = channel_minor_offsets(r, c, inner, outer_mid, outer_lo, stride_oh, stride_om, stride_o, stride_c,
                                    stride_i, INT64)
    x = tl.load(x_ptr + offsets, mask=mask, other=pilot[None, :])
    return tl.fma(x.to(ACC), scale[None, :], shift[None, :]), mask


@triton.jit
def channel_major_stats_kernel(
    x_ptr,  # data, (outer, C, inner) view: outer row o in three strided groups (common.outer_offset)
    partial_ptr,  # [5, C, P] accumulation dtype; P = SPLIT_O * SPLIT_I
    tickets_ptr,  # [>= C] int32 zeros (FINALIZE): programs of each channel done so far; left zero
    gamma_ptr, beta_ptr, moving_mean_ptr, moving_var_ptr,  # [C] (FINALIZE), as finish_statistics
    mean_ptr, invstd_ptr, coef_ptr,  # [C], [C], [6, C] out (FINALIZE), as _finalize_channels
    C, outer, inner, m,
    outer_mid, outer_lo,
    stride_oh, stride_om, stride_o, stride_c, stride_i,
    rows_per_split, cols_per_split,  # split extents (multiples of BLOCK_O / BLOCK_I)
    SPLIT_O, SPLIT_I,
    # 1 / a split's element count (float32, host): full, short columns, short rows, both short
    inverse_split, inverse_short_cols, inverse_short_rows, inverse_short_both,
    eps_hi, eps_lo, momentum_hi, momentum_lo, inverse_m, unbias,  # (FINALIZE) 1/m, m/(m-1): float32 (host)
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, INT64: tl.constexpr,
    FINALIZE: tl.constexpr, FIX_GAMMA: tl.constexpr, UNBIASED: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """(mean, M2, count) partial of one (channel, split), and with FINALIZE the channel's statistics:
    grid = (C * SPLIT_O * SPLIT_I,).

    Program ``pid`` takes channel ``pid // P`` and split ``pid % P``; a split is a rectangle of
    ``rows_per_split`` outer rows by ``cols_per_split`` inner columns, walked in
    [BLOCK_O, BLOCK_I] tiles.  With FINALIZE the channel's last program merges its P <= BLOCK_P
    partials (``_finalize_channels``).  Without it the pointers after ``partial_ptr`` are unused.
    """
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    num_splits = SPLIT_O * SPLIT_I
    c, split, o_begin, o_end, i_begin, i_end = channel_major_split(
        outer, inner, rows_per_split, cols_per_split, SPLIT_O, SPLIT_I)
    base = x_ptr + scalar_offset(c, stride_c, INT64)
    last = tl.load(base + element_offset(outer - 1, inner - 1, outer_mid, outer_lo, stride_oh, stride_om, stride_o,
                                         stride_i, INT64))
    last = last.to(ACC)
    pilot = finite_pilot(tl.load(base).to(ACC), last)
    scale = spread_scale(pilot, last)

    shift = -pilot * scale

    s1 = tl.zeros([BLOCK_O, BLOCK_I], ACC)
    s2 = tl.zeros([BLOCK_O, BLOCK_I], ACC)
    for o0 in range(range_bound(o_begin), range_bound(o_end), BLOCK_O):
        o = o0 + tl.arange(0, BLOCK_O)
        rows = base + row_offsets(o, outer_mid, outer_lo, stride_oh, stride_om, stride_o, INT64)
        for i0 in range(range_bound(i_begin), range_bound(i_end), BLOCK_I):
            z, _ = _channel_major_z(rows, o, i0 + tl.arange(0, BLOCK_I), o_end, i_end, stride_i, pilot, scale, shift,
                                    ACC, INT64)
            s1 += z
            s2 = tl.fma(z, z, s2)

    count = tl.maximum(o_end - o_begin, 0).to(ACC) * tl.maximum(i_end - i_begin, 0).to(ACC)  # 0: an empty split
    count_or_1 = tl.maximum(count, 1.0)
    full_cols = i_end - i_begin == cols_per_split
    inverse = tl.where(o_end - o_begin == rows_per_split, tl.where(full_cols, inverse_split, inverse_short_cols),
                       tl.where(full_cols, inverse_short_rows, inverse_short_both))
    total_sq = tl.sum(tl.sum(s2, 1), 0)
    mean, m2 = shifted_moments(tl.sum(tl.sum(s1, 1), 0), total_sq, count_or_1, inverse)
    if cancelled(mean, m2, total_sq):  # the pilot is an outlier (module docstring): sum z - mean
        # eighth-width tiles: this rare pass must not raise the kernel's register peak (at 1/1, 1/2
        # or 1/4 of the width ptxas spilled 8-12 bytes somewhere: Triton 3.6 or 3.8, sm_80 or sm_90)
        REDO_I: tl.constexpr = max(BLOCK_I // 8, 1)
        d1 = tl.zeros([BLOCK_O, REDO_I], ACC)
        d2 = tl.zeros([BLOCK_O, REDO_I], ACC)
        for o1 in range(range_bound(o_begin), range_bound(o_end), BLOCK_O):
            o_redo = o1 + tl.arange(0, BLOCK_O)
            rows_redo = base + row_offsets(o_redo, outer_mid, outer_lo, stride_oh, stride_om, stride_o, INT64)
            for i1 in range(range_bound(i_begin), range_bound(i_end), REDO_I):
                z, in_split = _channel_major_z(rows_redo, o_redo, i1 + tl.arange(0, REDO_I), o_end, i_end, stride_i,
                                               pilot, scale, shift, ACC, INT64)
                d = tl.where(in_split, z - mean, 0.0)
                d1 += d
                d2 = tl.fma(d, d, d2)
        correction, m2 = shifted_moments(tl.sum(tl.sum(d1, 1), 0), tl.sum(tl.sum(d2, 1), 0), count_or_1, inverse)
        mean += correction
    mean = mean + tl.zeros([1], ACC)
    m2 = m2 + tl.zeros([1], ACC)
    count = count + tl.zeros([1], ACC)
    slot = scalar_offset(c, num_splits, INT64) + split + tl.arange(0, 1)
    plane = C * num_splits
    tl.store(partial_ptr + slot, mean)
    tl.store(partial_ptr + plane + slot, m2)
    tl.store(partial_ptr + 2 * plane + slot, count)
    tl.store(partial_ptr + 3 * plane + slot, pilot + tl.zeros([1], ACC))
    tl.store(partial_ptr + 4 * plane + slot, scale + tl.zeros([1], ACC))
    if FINALIZE:
        if last_to_arrive(tickets_ptr, c, num_splits):
            channel = c + tl.arange(0, 1)
            _finalize_channels(partial_ptr, channel, channel < C, C, num_splits, m, inverse_m, unbias, gamma_ptr,
                               beta_ptr,
                               moving_mean_ptr, moving_var_ptr, mean_ptr, invstd_ptr, coef_ptr,
                               eps_hi, eps_lo, momentum_hi, momentum_lo, FIX_GAMMA, UNBIASED, BLOCK_P)


@triton.jit
def channel_minor_stats_kernel(
    x_ptr,  # data, rows x C matrix: row r = o * inner + i at outer_offset(o) + i * stride_i
    partial_ptr,  # [5, C, P] accumulation dtype; P = SPLIT
    tickets_ptr,  # [>= cdiv(C, BLOCK_C)] int32 zeros (FINALIZE): one per channel block; left zero
    gamma_ptr, beta_ptr, moving_mean_ptr, moving_var_ptr,  # [C] (FINALIZE), as finish_statistics
    mean_ptr, invstd_ptr, coef_ptr,  # [C], [C], [6, C] out (FINALIZE), as _finalize_channels
    C, inner, rows,
    outer_mid, outer_lo,
    stride_oh, stride_om, stride_o, stride_c, stride_i,
    rows_per_split, SPLIT,
    inverse_split, inverse_short,  # 1 / a split's row count (float32, host): a full split, the shorter last one
    eps_hi, eps_lo, momentum_hi, momentum_lo, inverse_m, unbias,  # (FINALIZE) 1/m, m/(m-1): float32 (host)
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, INT64: tl.constexpr,
    FINALIZE: tl.constexpr, FIX_GAMMA: tl.constexpr, UNBIASED: tl.constexpr, BLOCK_P: tl.constexpr,
    TAIL_C: tl.constexpr,
):
    """(mean, M2, count) partials of a block of BLOCK_C channels over one split of the rows, and with
    FINALIZE the block's statistics.

    grid = (cdiv(C, BLOCK_C) * SPLIT,); program ``pid`` takes channel block ``pid // SPLIT``
    and rows [split * rows_per_split, (split + 1) * rows_per_split), in [BLOCK_R, BLOCK_C]
    tiles whose loads are contiguous along C.  With FINALIZE the block's last program merges
    its partials TAIL_C channels at a time ([BLOCK_P, TAIL_C] tiles, BLOCK_P >= SPLIT; m = rows).
    """
    ACC: tl.constexpr = partial_ptr.dtype.element_ty
    pid = tl.program_id(0)
    c = (pid // SPLIT) * BLOCK_C + tl.arange(0, BLOCK_C)
    split = pid % SPLIT
    r_begin = split * rows_per_split
    r_end = tl.minimum(r_begin + rows_per_split, rows)
    c_mask = c < C
    channel_offsets = scalar_offset(c, stride_c, INT64)
    last_offset = element_offset((rows - 1) // inner, (rows - 1) % inner, outer_mid, outer_lo,
                                 stride_oh, stride_om, stride_o, stride_i, INT64)
    last = tl.load(x_ptr + channel_offsets + last_offset, mask=c_mask, other=0.0).to(ACC)
    pilot = finite_pilot(tl.load(x_ptr + channel_offsets, mask=c_mask, other=0.0).to(ACC), last)
    scale = spread_scale(pilot, last)

    shift = -pilot * scale

    s1 = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    s2 = tl.zeros([BLOCK_R, BLOCK_C], ACC)
    for r0 in range(range_bound(r_begin), range_bound(r_end), BLOCK_R):
        z, _ = _channel_minor_z(x_ptr, r0 + tl.arange(0, BLOCK_R), c, c_mask, r_end, inner, outer_mid, outer_lo,
                                stride_oh, stride_om, stride_o, stride_c, stride_i, pilot, scale, shift, ACC, INT64)
        s1 += z
        s2 = tl.fma(z, z, s2)

    split_count = tl.cast(tl.maximum(r_end - r_begin, 0), ACC)  # each channel's count (0: an empty split)
    count_or_1 = tl.maximum(split_count, 1.0)
    inverse = tl.where(r_end - r_begin == rows_per_split, inverse_split, inverse_short)
    total_sq = tl.sum(s2, 0)
    mean, m2 = shifted_moments(tl.sum(s1, 0), total_sq, count_or_1, inverse)
    redo = cancelled(mean, m2, total_sq)
    if tl.max(redo.to(tl.int32), 0) > 0:  # a pilot is an outlier (module docstring): sum z - mean
        d1 = tl.zeros([BLOCK_R, BLOCK_C], ACC)
        d2 = tl.zeros([BLOCK_R, BLOCK_C], ACC)
        for r1 in range(range_bound(r_begin), range_bound(r_end), BLOCK_R):
            z, in_split = _channel_minor_z(x_ptr, r1 + tl.arange(0, BLOCK_R), c, c_mask, r_end, inner, outer_mid,
                                           outer_lo, stride_oh, stride_om, stride_o, stride_c, stride_i, pilot, scale,
                                           shift, ACC, INT64)
            d = tl.where(in_split, z - mean[None, :], 0.0)
            d1 += d
            d2 = tl.fma(d, d, d2)
        correction, m2_again = shifted_moments(tl.sum(d1, 0), tl.sum(d2, 0), count_or_1, inverse)
        mean = tl.where(redo, mean + correction, mean)
        m2 = tl.where(redo, m2_again, m2)
    count = tl.zeros([BLOCK_C], ACC) + split_count
    slot = scalar_offset(c, SPLIT, INT64) + split
    plane = C * SPLIT
    tl.store(partial_ptr + slot, mean, mask=c_mask)
    tl.store(partial_ptr + plane + slot, m2, mask=c_mask)
    tl.store(partial_ptr + 2 * plane + slot, count, mask=c_mask)
    tl.store(partial_ptr + 3 * plane + slot, pilot, mask=c_mask)
    tl.store(partial_ptr + 4 * plane + slot, scale, mask=c_mask)
    if FINALIZE:
        block = pid // SPLIT
        if last_to_arrive(tickets_ptr, block, SPLIT):
            for c0 in range(0, BLOCK_C, TAIL_C):
                channels = block * BLOCK_C + c0 + tl.arange(0, TAIL_C)
                _finalize_channels(partial_ptr, channels, channels < C, C, SPLIT, rows, inverse_m, unbias, gamma_ptr,
                                   beta_ptr,
                                   moving_mean_ptr, moving_var_ptr, mean_ptr, invstd_ptr, coef_ptr,
                                   eps_hi, eps_lo, momentum_hi, momentum_lo, FIX_GAMMA, UNBIASED, BLOCK_P)


@triton.jit
def _merged_partials(partial_ptr, c, c_mask, C, P, m, inverse_m, BLOCK_P: tl.constexpr):
    """(pilot, mean_z, var_z, scale) of channels ``c`` ([K]) from their P partials, merged in split
    order; each channel holds m elements (``inverse_m``: 1 / m correctly rounded to float32).
    Loads bypass L1 (``.cg``): other programs wrote the partials during this launch, and L1 is not
    coherent across SMs."""
    p = tl.arange(0, BLOCK_P)
    mask = (p < P)[:, None] & c_mask[None, :]
    slots = c[None, :] * P + p[:, None]  # [BLOCK_P, K]: partials of a channel down a column
    plane = C * P
    part_mean = tl.load(partial_ptr + slots, mask=mask, other=0.0, cache_modifier=".cg")
    part_m2 = tl.load(partial_ptr + plane + slots, mask=mask, other=0.0, cache_modifier=".cg")
    part_count = tl.load(partial_ptr + 2 * plane + slots, mask=mask, other=0.0, cache_modifier=".cg")
    count = tl.cast(m, part_mean.dtype)
    mean_z, m2, _ = chan_merge_rows(part_mean, part_m2, part_count, count, inverse_m)
    pilot = tl.load(partial_ptr + 3 * plane + c * P, mask=c_mask, other=0.0, cache_modifier=".cg")
    scale = tl.load(partial_ptr + 4 * plane + c * P, mask=c_mask, other=1.0, cache_modifier=".cg")
    return pilot, mean_z, divide_by_count(m2, count, inverse_m), scale


@triton.jit
def _finalize_channels(
    partial_ptr, c, c_mask, C, P, m,
    inverse_m, unbias,  # 1 / m and m / (m - 1), correctly rounded to float32 (host)
    gamma_ptr, beta_ptr,  # [C] parameters (float32 or the data dtype; float64 for float64)
    moving_mean_ptr, moving_var_ptr,  # [C] updated in place
    mean_ptr, invstd_ptr,  # [C] outputs, accumulation dtype
    coef_ptr,  # [6, C] out: (pilot, shifted mean, x scale, x coef, dy coef, const); rows 0-1: center
    eps_hi, eps_lo, momentum_hi, momentum_lo,
    FIX_GAMMA: tl.constexpr, UNBIASED: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Merge the P <= BLOCK_P partials of channels ``c`` ([K]) and finish their statistics.

    Writes mean, invstd = 1/sqrt(var + eps), the apply coefficients of
    ``y = (x - mean) * invstd * g + beta``, and ``moving = moving * momentum + batch * (1 -
    momentum)`` (var biased, or * m/(m-1) if UNBIASED).  Where invstd overflowed (float32 data of
    ~1e-41), the apply coefficients are the z-unit ones of ``common.apply_coefficients``.  The
    divisions by m are products with the host's inverse (``common.divide_by_count``): the tail
    runs after the reduction's loop, where a division's slow-path call made ptxas spill.
    """
    pilot, mean_z, var_z, scale = _merged_partials(partial_ptr, c, c_mask, C, P, m, inverse_m, BLOCK_P)
    invstd, invstd_z, g, beta = finish_statistics(
        c, c_mask, C, pilot, mean_z, var_z, scale, m, gamma_ptr, beta_ptr,
        moving_mean_ptr, moving_var_ptr, mean_ptr, invstd_ptr, coef_ptr, eps_hi, eps_lo, momentum_hi, momentum_lo,
        FIX_GAMMA, True, UNBIASED, unbias,
    )
    x_scale, x_coef, const = apply_coefficients(invstd, invstd_z, g, beta, mean_z, scale)
    tl.store(coef_ptr + 2 * C + c, x_scale, mask=c_mask)
    tl.store(coef_ptr + 3 * C + c, x_coef, mask=c_mask)
    tl.store(coef_ptr + 4 * C + c, tl.zeros_like(x_coef), mask=c_mask)
    tl.store(coef_ptr + 5 * C + c, const, mask=c_mask)
