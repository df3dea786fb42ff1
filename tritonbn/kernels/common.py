"""Small @triton.jit helpers shared by the kernels of every phase.

Numerics: per-channel statistics are Welford sums kept per lane (no sums of squares of raw
values, so a channel offset by 1e4 with std 1e-2 keeps its variance in float32), then merged
across lanes and across programs with Chan's formula in its two-pass form: the merged mean is
the count-weighted mean of the parts, and M2 = sum(M2_k + n_k * (mean_k - mean)^2), a sum of
non-negative terms with no cancellation.
"""

import triton
import triton.language as tl


@triton.jit
def welford_update(mean, m2, count, x, mask):
    """Fold one value per lane into per-lane (mean, M2, count); masked lanes are unchanged.

    All arguments are tiles of one shape; ``x`` is already in the accumulation dtype.
    """
    count_new = count + tl.where(mask, 1.0, 0.0).to(count.dtype)
    delta = x - mean
    mean_new = mean + tl.where(mask, delta / tl.maximum(count_new, 1.0), 0.0)
    m2_new = m2 + tl.where(mask, delta * (x - mean_new), 0.0)
    return mean_new, m2_new, count_new


@triton.jit
def chan_merge_rows(mean, m2, count):
    """Merge per-row Welford states of [R, K] tiles along axis 0 into [K] (mean, M2, count)."""
    total = tl.sum(count, 0)
    merged_mean = tl.sum(count * mean, 0) / tl.maximum(total, 1.0)
    delta = mean - merged_mean[None, :]
    merged_m2 = tl.sum(m2 + count * delta * delta, 0)
    return merged_mean, merged_m2, total


@triton.jit
def split_f64(hi, lo, ACC: tl.constexpr):
    """Rebuild a host float64 scalar passed as two float32 halves (hi + lo) in dtype ACC."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def safe_invstd(var, eps):
    """1/sqrt(var + eps) rounded correctly, and 0 where var == 0 and eps == 0 (SPEC: Forward).

    var >= 0 and eps >= 0, so "both zero" is "var + eps == 0"; NaN stays NaN.
    """
    total = var + eps
    if total.dtype == tl.float64:
        invstd = 1.0 / tl.sqrt(total)  # float64 sqrt and division are IEEE-rounded already
    else:
        invstd = tl.div_rn(tl.full(total.shape, 1.0, total.dtype), tl.sqrt_rn(total))
    return tl.where(total == 0, 0.0, invstd)


@triton.jit
def channel_major_offsets(o, i, outer_lo, stride_oh, stride_o, stride_i, INT64: tl.constexpr):
    """[BLOCK_O, BLOCK_I] element offsets of outer rows ``o`` ([BLOCK_O]) and inner columns ``i``.

    An outer row is (o // outer_lo, o % outer_lo) in two strided groups; with one outer group
    outer_lo = outer and stride_oh = 0.  The division is per row, not per element.
    """
    if INT64:
        o = o.to(tl.int64)
        i = i.to(tl.int64)
    row = (o // outer_lo) * stride_oh + (o % outer_lo) * stride_o
    return row[:, None] + i[None, :] * stride_i


@triton.jit
def channel_minor_offsets(r, c, inner, outer_lo, stride_oh, stride_o, stride_c, stride_i, INT64: tl.constexpr):
    """[BLOCK_R, BLOCK_C] offsets of flattened rows ``r`` (r = o * inner + i) and channels ``c``."""
    if INT64:
        r = r.to(tl.int64)
        c = c.to(tl.int64)
    o = r // inner
    row = (o // outer_lo) * stride_oh + (o % outer_lo) * stride_o + (r % inner) * stride_i
    return row[:, None] + c[None, :] * stride_c


@triton.jit
def scalar_offset(index, stride, INT64: tl.constexpr):
    """index * stride, widened to int64 first when INT64."""
    if INT64:
        index = index.to(tl.int64)
    return index * stride
