"""Small @triton.jit helpers shared by the kernels of every phase.

Numerics: each lane of a statistics tile sums z and z^2 of the values below (shifted sums: two
adds an element, no division), a program turns its split's totals into (mean, M2) with
``shifted_moments``, and programs are merged with Chan's formula in its two-pass form: the
merged mean is the count-weighted mean of the parts, and M2 = sum(M2_k + n_k * (mean_k -
mean)^2), a sum of non-negative terms with no cancellation.  The shift keeps S2 - S1 * mean
exact where it matters: z is centred on one of the channel's own values, so S2 is a few times
M2 (a channel offset by 1e4 with std 1e-2 keeps its variance in float32); where the pilot is an
outlier and the subtraction would cancel more than 4 bits (``cancelled``), the program sums its
split again, shifted by the mean.

Every program of a channel accumulates z = (x - pilot) * scale: the pilot (the channel's first
element, or its last where the first is NaN/Inf) removes the offset, and the scale, a power of
two from the spread |last - first|, brings the values near 1 so that squares neither overflow
nor underflow float32 (data of 1e30, 1e-30, or float32 subnormals).  Powers of two scale
exactly; the epilogues undo the scale, or normalise in z units where 1/std itself overflows.

Compiled float32 ``/`` is div.full.f32 (2 ulp), so divisions go through helpers: ``exact_div``,
``divide_by_count``, ``exact_inverse`` and ``unscale`` are correctly rounded, ``safe_invstd`` is
sqrt.rn then div.rn (tests/test_inspect.py checks that no approximate division is left).

NaN/Inf: a finite pilot keeps one +-inf from turning every x - pilot into NaN, so mean =
pilot + mean_z / scale is +-inf as sum(x) / m is (var is NaN, as the formula gives).
"""

import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction


@triton.jit
def range_bound(value):
    """``value`` as a bound of a ``for ... in range(...)`` loop over a runtime extent (a scalar).

    Compiled: ``value`` itself (this call inlines to nothing).  Interpreted: a Python int.  The
    interpreter holds scalars as 1-element 1-D arrays, and Triton 3.6's interpreter converts a
    range bound with ``int(array)``, which numpy >= 2.4 refuses for arrays that are not 0-d
    ("only 0-dimensional arrays can be converted to Python scalars"); ``item()`` takes the one
    element of any shape, on every Triton version.  (One returned expression, not an
    assignment: the interpreter turns every assigned value back into a tensor.)
    """
    return (value.handle.data.item() if hasattr(value, "handle") else value) if INTERPRETED else value


# Whether triton.jit built interpreted functions (TRITON_INTERPRET=1 when Triton decorated them):
# a constexpr, so the compiled kernels never see the interpreter-only branches below.
INTERPRETED = tl.constexpr(isinstance(range_bound, InterpretedFunction))


# Shifted sums keep M2 = S2 - S1 * mean when it holds at least this fraction of S2 = sum(z^2):
# then the subtraction cancels at most 4 bits.  Below it (z's mean more than ~3.9 standard
# deviations from 0, i.e. the pilot an outlier of its channel), the kernels read the split again
# with the mean as the shift (``stats.py``).
KEPT_FRACTION = tl.constexpr(1.0 / 16.0)


@triton.jit
def shifted_moments(s1, s2, count, inverse):
    """(mean, M2) of ``count`` >= 1 values (a scalar shared by every column) from their sum ``s1``
    and sum of squares ``s2`` (tiles of one shape, or scalars); ``inverse``: 1 / count correctly
    rounded to float32, computed by the host (a division instruction's slow-path call made ptxas
    spill the statistics kernels; float64 and the interpreter divide).

    mean = s1 / count, correctly rounded (``divide_by_count``), and +-inf or NaN where s1 is;
    M2 = s2 - s1 * mean with one rounding (an FMA), 0 where rounding left it below 0; NaN where
    s1 is not finite (infinite data: the variance is NaN, as the formula gives).
    """
    mean = tl.where(tl.abs(s1) < float("inf"), divide_by_count(s1, count, inverse), s1)
    m2 = tl.fma(-s1, mean, s2)
    return mean, tl.where(m2 < 0, 0.0, m2)


@triton.jit
def cancelled(mean, m2, s2):
    """Whether ``shifted_moments``' M2 lost more than 4 bits to cancellation (or s2 overflowed)
    while the mean is finite: then the values are to be summed again, shifted by the mean."""
    return (tl.abs(mean) < float("inf")) & ((m2 < s2 * KEPT_FRACTION) | (s2 == float("inf")))


@triton.jit
def chan_merge_rows(mean, m2, count, shared_count, shared_inverse):
    """Merge per-row (mean, M2, count) states of [R, K] tiles along axis 0 into [K] (mean, M2,
    count): the finalize tails' merge of a channel's split partials.

    ``shared_count``: the scalar count every column holds in total (a channel's m);
    ``shared_inverse``: its correctly rounded inverse from the host.  The merged mean's division
    is correctly rounded (``divide_by_count``).
    """
    total = tl.sum(count, 0)
    merged_mean = divide_by_count(tl.sum(count * mean, 0), tl.maximum(shared_count, 1.0), shared_inverse)
    delta = mean - merged_mean[None, :]
    merged_m2 = tl.sum(m2 + count * delta * delta, 0)
    return merged_mean, merged_m2, total


@triton.jit
def last_to_arrive(tickets_ptr, group, programs):
    """Whether this program is the last of the ``programs`` programs of ``group`` to get here.

    Each takes a ticket (an atomic increment of ``tickets_ptr[group]``, acquire-release at GPU
    scope); the one that draws ``programs - 1`` is last, every other program's stores are then
    visible to it, and it puts the counter back to 0, so the next launch (or a CUDA graph's next
    replay) finds the zeros it needs without a memset.  The barrier first makes every thread's
    stores of this program happen before the release (the atomic is one thread's).  Readers of
    other programs' stores load with ``cache_modifier=".cg"``: L1 is not coherent across SMs.
    """
    tl.debug_barrier()
    ticket = tl.atomic_add(tickets_ptr + group, 1, sem="acq_rel", scope="gpu")
    is_last = ticket == programs - 1
    tl.atomic_xchg(tickets_ptr + group, 0, mask=is_last, sem="relaxed", scope="gpu")
    return is_last


@triton.jit
def split_f64(hi, lo, ACC: tl.constexpr):
    """Rebuild a host float64 scalar passed as two float32 halves (hi + lo) in dtype ACC."""
    return tl.cast(hi, ACC) + tl.cast(lo, ACC)


@triton.jit
def exact_div(numerator, denominator):
    """numerator / denominator rounded to nearest (IEEE), in float32 or float64.

    A plain ``/`` of float32 values compiles to ``div.full.f32``, within 2 ulp only (PTX ISA);
    float64 ``/`` is ``div.rn.f64`` already.  For divisions once per channel or program, where
    the correctly rounded quotient costs nothing that matters; ``tests/test_inspect.py`` checks
    that no ``div.full.f32`` is left in the compiled kernels.
    """
    if numerator.dtype == tl.float64:
        quotient = numerator / denominator
    else:
        quotient = tl.div_rn(numerator, denominator)
    return quotient


@triton.jit
def exact_inverse(count):
    """1 / count rounded to nearest (IEEE), float32 or float64, of any shape (a scalar count:
    one division per program)."""
    if count.dtype == tl.float64:
        inverse = 1.0 / count
    else:
        inverse = tl.div_rn(1.0, count)
    return inverse


@triton.jit
def divide_by_count(value, count, inverse=None):
    """value / count rounded to nearest (IEEE) for a scalar ``count`` that all of ``value`` shares;
    ``inverse``: 1 / count correctly rounded to float32, when the host computed it (no division
    instruction then: its slow-path call makes ptxas spill in kernels with a loop before it).

    One correctly rounded inverse y = 1/count per program, then per value q = value * y and the
    remainder's correction q + (value - q * count) * y, two explicit FMAs: with y correctly
    rounded, that is the correctly rounded quotient (Markstein's theorem; barring underflow of
    the remainder, i.e. quotients near float32's smallest normals).  Where many values share a
    count this replaces a div.rn.f32 per value, whose slow-path call costs registers: with one
    per channel, ``channel_minor_stats`` and the channel-minor single-pass forward spilled
    (ptxas, sm_80/sm_90).  float64 and the interpreter divide (correctly rounded already; the
    interpreter's fma rounds twice).
    """
    if INTERPRETED:
        quotient = value / count
    elif value.dtype == tl.float64:
        quotient = value / count
    else:
        if inverse is None:
            inverse = exact_inverse(count)
        estimate = value * inverse
        quotient = tl.fma(tl.fma(-estimate, count, value), inverse, estimate)
    return quotient


@triton.jit
def safe_invstd(var, eps):
    """1/sqrt(var + eps) as IEEE float math computes it (sqrt and division each correctly
    rounded: sqrt.rn and div.rn, not rsqrt.approx), and 0 where var == 0 and eps == 0 (SPEC: Forward).

    var >= 0 and eps >= 0, so "both zero" is "var + eps == 0"; NaN stays NaN.
    """
    total = var + eps
    if total.dtype == tl.float64:
        invstd = 1.0 / tl.sqrt(total)  # float64 sqrt and division are IEEE-rounded already
    else:
        invstd = tl.div_rn(tl.full(total.shape, 1.0, total.dtype), tl.sqrt_rn(total))
    return tl.where(total == 0, 0.0, invstd)


@triton.jit
def finite_pilot(first, last):
    """The shift pilot of a channel: its first element, or its last where the first is NaN/Inf,
    or 0 where both are (an infinite pilot would make every x - pilot NaN, and the mean NaN
    instead of +-inf)."""
    return tl.where(tl.abs(first) < float("inf"), first, tl.where(tl.abs(last) < float("inf"), last, 0.0))


@triton.jit
def spread_scale(first, last):
    """A power of two s with |last - first| * s in [1, 2) for a normal spread, in [2^-22, 2) for a
    subnormal one (s = 2^127, the largest float32 power of two: z = spread * s is normal then, and
    its square too); 1 where the spread is 0, inf or NaN, and always 1 for float64, whose range
    needs no rescaling."""
    # (if/else, not an early return: the compiler would also build the float32 code for float64)
    if first.dtype == tl.float64:
        scale = tl.full(first.shape, 1.0, tl.float64)
    else:
        bits = tl.abs(last - first).to(tl.int32, bitcast=True)
        exponent = (bits >> 23) & 0xFF
        # exponent 0 with bits != 0 is a subnormal spread: 254 - 0 clamps to 254, s = 2^127
        rescale = (bits != 0) & (exponent < 255)
        scale_exponent = tl.minimum(tl.maximum(254 - exponent, 1), 254)
        scale = (tl.where(rescale, scale_exponent, 127) << 23).to(tl.float32, bitcast=True)
    return scale


@triton.jit
def inverse_scale(scale):
    """1 / scale, exactly, for a float32 power of two scale in [2^-126, 2^127] (bit arithmetic:
    no division).  2^e has the biased exponent e + 127, 2^-e has 127 - e = 254 - (e + 127),
    except 2^-127, which is subnormal."""
    bits = (254 << 23) - scale.to(tl.int32, bitcast=True)
    return tl.where(bits == 0, 1 << 22, bits).to(tl.float32, bitcast=True)  # 1 << 22: 2^-127


@triton.jit
def unscale(value, scale):
    """value / scale, exactly rounded, for the power of two scale of ``spread_scale``: a product
    with the exact inverse (no division; 1 for float64, whose scale is 1)."""
    if value.dtype == tl.float64:
        result = value
    else:
        result = value * inverse_scale(scale)
    return result


@triton.jit
def scaled_invstd(var_z, scale, eps):
    """(var, invstd, invstd_z) of var = var_z / scale^2, without the overflow or underflow of var.

    var, rounded to the accumulation dtype, is what float math says the variance is (it may be
    inf or 0); where it is inf, or eps is 0, 1/sqrt(var) is taken from the scaled variance
    instead, which stays finite: scale / sqrt(var_z).  invstd_z = invstd / scale, exactly, is
    1/std in z units: (z - mean_z) * invstd_z is the normalised value, (x - mean) * invstd, also
    where invstd itself overflows (float32 data of ~1e-41: std ~1e-41, invstd ~1e41 > 3.4e38).
    """
    var = unscale(unscale(var_z, scale), scale)
    eps_tile = tl.zeros_like(var) + eps
    use_scaled = (eps_tile == 0) | (var == float("inf"))
    # one 1/sqrt per channel, of whichever variance is used (a sqrt.rn and a div.rn each, with
    # slow-path calls: computing both and selecting doubled them)
    root = safe_invstd(tl.where(use_scaled, var_z, var), tl.where(use_scaled, 0.0, eps_tile))
    if scale.dtype == tl.float64:  # scale is 1
        invstd = root
        invstd_z = root
    else:
        invstd = tl.where(use_scaled, root * scale, root)
        invstd_z = tl.where(use_scaled, root, root * inverse_scale(scale))
    return var, invstd, invstd_z


@triton.jit
def channel_major_split(outer, inner, rows_per_split, cols_per_split, SPLIT_O, SPLIT_I):
    """This program's (channel, split, row range, column range) in a channel-major reduction.

    grid = (C * SPLIT_O * SPLIT_I,): program pid takes channel pid // P and split pid % P, a
    rectangle of ``rows_per_split`` outer rows by ``cols_per_split`` inner columns.
    """
    num_splits = SPLIT_O * SPLIT_I
    pid = tl.program_id(0)
    c = pid // num_splits
    split = pid % num_splits
    o_begin = (split // SPLIT_I) * rows_per_split
    i_begin = (split % SPLIT_I) * cols_per_split
    o_end = tl.minimum(o_begin + rows_per_split, outer)
    i_end = tl.minimum(i_begin + cols_per_split, inner)
    return c, split, o_begin, o_end, i_begin, i_end


@triton.jit
def outer_offset(o, outer_mid, outer_lo, stride_oh, stride_om, stride_o):
    """Offset of outer row(s) ``o``: o = (o_hi * outer_mid + o_mid) * outer_lo + o_lo, three strided
    groups (see ``plan.py``).  Fewer groups pass extent 1 and stride 0 for the missing ones; the
    JIT specialises ``outer_mid == 1`` to a constant, so views of up to three reduced groups
    compile to the one division and remainder by ``outer_lo`` they always had."""
    rows_lo = o // outer_lo
    return (rows_lo // outer_mid) * stride_oh + (rows_lo % outer_mid) * stride_om + (o % outer_lo) * stride_o


@triton.jit
def row_offsets(o, outer_mid, outer_lo, stride_oh, stride_om, stride_o, INT64: tl.constexpr):
    """[BLOCK_O] offsets of outer rows ``o``: hoisted out of a loop over a row's columns."""
    if INT64:
        o = o.to(tl.int64)
    return outer_offset(o, outer_mid, outer_lo, stride_oh, stride_om, stride_o)


@triton.jit
def channel_major_offsets(o, i, outer_mid, outer_lo, stride_oh, stride_om, stride_o, stride_i, INT64: tl.constexpr):
    """[BLOCK_O, BLOCK_I] element offsets of outer rows ``o`` ([BLOCK_O]) and inner columns ``i``.

    The outer row is split into its strided groups per row, not per element (``outer_offset``).
    """
    row = row_offsets(o, outer_mid, outer_lo, stride_oh, stride_om, stride_o, INT64)
    return row[:, None] + scalar_offset(i, stride_i, INT64)[None, :]


@triton.jit
def channel_minor_offsets(r, c, inner, outer_mid, outer_lo, stride_oh, stride_om, stride_o, stride_c, stride_i,
                          INT64: tl.constexpr):
    """[BLOCK_R, BLOCK_C] offsets of flattened rows ``r`` (r = o * inner + i) and channels ``c``."""
    if INT64:
        r = r.to(tl.int64)
        c = c.to(tl.int64)
    row = outer_offset(r // inner, outer_mid, outer_lo, stride_oh, stride_om, stride_o) + (r % inner) * stride_i
    return row[:, None] + c[None, :] * stride_c


@triton.jit
def element_offset(o, i, outer_mid, outer_lo, stride_oh, stride_om, stride_o, stride_i, INT64: tl.constexpr):
    """Offset of element (outer row ``o``, inner column ``i``) of one channel (scalars)."""
    row = row_offsets(o, outer_mid, outer_lo, stride_oh, stride_om, stride_o, INT64)
    return row + scalar_offset(i, stride_i, INT64)


@triton.jit
def scalar_offset(index, stride, INT64: tl.constexpr):
    """index * stride, widened to int64 first when INT64."""
    if INT64:
        index = index.to(tl.int64)
    return index * stride


@triton.jit
def apply_coefficients(invstd, invstd_z, g, beta, mean_z, scale):
    """(x_scale, x_coef, const): y = (((x - pilot) - shifted_mean) * x_scale) * x_coef + const.

    The forward coefficients of the elementwise kernel (``elementwise.py``), which sees x, not z.
    Normally (invstd, g, beta): y = ((x - mean) * invstd) * g + beta, as before.  Where invstd
    overflowed (float32 data of ~1e-41: std ~1e-41, invstd ~1e41), the normalisation goes
    through z units instead: (scale, invstd_z * g, beta - residual * invstd_z * g).  There
    (x - pilot) - shifted_mean is exact (subnormal operands), and so is its product with the
    power of two scale; residual = mean_z - shifted_mean * scale puts back the part of the mean
    below shifted_mean's subnormal resolution.  (A select per channel rather than the z form
    everywhere: the common case keeps the float results of the split path as they were.)
    """
    if invstd.dtype == tl.float64:  # 1/sqrt of the smallest float64 is finite
        x_scale = invstd
        x_coef = g
        const = beta
    else:
        overflow = invstd == float("inf")
        z_coef = invstd_z * g
        residual = mean_z - unscale(mean_z, scale) * scale
        x_scale = tl.where(overflow, scale, invstd)
        x_coef = tl.where(overflow, z_coef, g)
        const = tl.where(overflow, beta - residual * z_coef, beta)
    return x_scale, x_coef, const


@triton.jit
def finish_statistics(
    c, c_mask, C, pilot, mean_z, var_z, scale, m,
    gamma_ptr, beta_ptr, moving_mean_ptr, moving_var_ptr, mean_ptr, invstd_ptr, center_ptr,
    eps_hi, eps_lo, momentum_hi, momentum_lo,
    FIX_GAMMA: tl.constexpr, UPDATE_MOVING: tl.constexpr, UNBIASED: tl.constexpr,
    unbias=None,
):
    """Epilogue of the training statistics of channels ``c`` ([K] vectors in, [K] vectors out).

    Takes the mean and biased variance of z = (x - pilot) * scale.  Writes mean = pilot +
    mean_z / scale and invstd (outputs), center[2, C] = (pilot, shifted mean) for the backward,
    and ``moving = moving * momentum + batch * (1 - momentum)`` (var biased, or * m/(m-1) if
    UNBIASED).  Returns (invstd, invstd_z, g, beta): y = ((x - pilot) - shifted_mean) * invstd *
    g + beta = ((z - mean_z) * invstd_z) * g + beta, the second form also where invstd overflows.
    ``unbias``: m / (m - 1) correctly rounded to float32, computed by the host for a caller that
    wants no avoidable division instruction (each has a slow-path call, which makes ptxas spill in
    kernels with a loop before it): the shifted mean is then the product with the scale's exact
    inverse, which is the same value.
    """
    ACC: tl.constexpr = var_z.dtype
    if unbias is None:
        # the value of unscale(mean_z, scale) (a power of two divides exactly), as a division: with
        # the product, the channel-minor single-pass forward at its capacity spilled 8 bytes (ptxas, sm_90)
        shifted_mean = exact_div(mean_z, scale)
    else:
        shifted_mean = unscale(mean_z, scale)
    var, invstd, invstd_z = scaled_invstd(var_z, scale, split_f64(eps_hi, eps_lo, ACC))
    mean = pilot + shifted_mean
    if FIX_GAMMA:
        g = tl.full(invstd.shape, 1.0, ACC)
    else:
        g = tl.load(gamma_ptr + c, mask=c_mask, other=1.0).to(ACC)
    beta = tl.load(beta_ptr + c, mask=c_mask, other=0.0).to(ACC)
    tl.store(mean_ptr + c, mean, mask=c_mask)
    tl.store(invstd_ptr + c, invstd, mask=c_mask)
    tl.store(center_ptr + c, pilot, mask=c_mask)
    tl.store(center_ptr + C + c, shifted_mean, mask=c_mask)
    if UPDATE_MOVING:
        momentum = split_f64(momentum_hi, momentum_lo, ACC)
        if UNBIASED:
            if unbias is None or ACC == tl.float64:
                var = var * exact_div(tl.cast(m, ACC), tl.cast(m - 1, ACC))
            else:
                var = var * unbias
        old_mean = tl.load(moving_mean_ptr + c, mask=c_mask, other=0.0).to(ACC)
        old_var = tl.load(moving_var_ptr + c, mask=c_mask, other=0.0).to(ACC)
        new_mean = old_mean * momentum + mean * (1.0 - momentum)
        new_var = old_var * momentum + var * (1.0 - momentum)
        tl.store(moving_mean_ptr + c, new_mean.to(moving_mean_ptr.dtype.element_ty), mask=c_mask)
        tl.store(moving_var_ptr + c, new_var.to(moving_var_ptr.dtype.element_ty), mask=c_mask)
    return invstd, invstd_z, g, beta


@triton.jit
def finish_backward(
    c, c_mask, sum_dy, sum_dy_xmu, invstd, m, gamma_ptr, dgamma_ptr, dbeta_ptr,
    FIX_GAMMA: tl.constexpr, BATCH_STATS: tl.constexpr, inverse_m=None,
):
    """Epilogue of the backward reductions of channels ``c`` ([K] vectors).

    Stores dgamma = D * invstd (0 with FIX_GAMMA) and dbeta = S; returns the dx coefficients
    (x_coef, dy_coef, const) of dx = ((x - mean) * invstd) * x_coef + dy * dy_coef + const:
        batch statistics:  dx = g*invstd * (dy - S/m - (x - mean) * invstd * (invstd * D) / m)
        moving statistics: dx = g*invstd * dy
    (invstd multiplies (x - mean) first and D next: invstd^2 alone underflows float32 for data
    of 1e30.)  ``inverse_m``: 1 / m correctly rounded in the accumulation dtype, when the host
    computed it.
    """
    ACC: tl.constexpr = invstd.dtype
    if FIX_GAMMA:
        dy_coef = invstd
        dgamma = tl.zeros_like(invstd)
    else:
        dy_coef = tl.load(gamma_ptr + c, mask=c_mask, other=0.0).to(ACC) * invstd
        dgamma = sum_dy_xmu * invstd
    tl.store(dgamma_ptr + c, dgamma.to(dgamma_ptr.dtype.element_ty), mask=c_mask)
    tl.store(dbeta_ptr + c, sum_dy.to(dbeta_ptr.dtype.element_ty), mask=c_mask)
    if BATCH_STATS:
        if inverse_m is None:
            inv_m = exact_inverse(tl.cast(m, ACC))
        else:
            inv_m = inverse_m
        x_coef = -dy_coef * (invstd * sum_dy_xmu) * inv_m
        const = -dy_coef * sum_dy * inv_m
    else:
        x_coef = tl.zeros_like(invstd)
        const = tl.zeros_like(invstd)
    return x_coef, dy_coef, const


# ----------------------------------------------------------------------------- fused epilogues
#
# A fused activation decides per element on v = bn(x) (+ addend); the backward needs the same
# decision.  Without an addend it recomputes v from x, which it reads anyway: the forward and the
# recompute both evaluate ``normalized`` (one explicit FMA, so that no compiler contracts one and
# not the other) on the forward's coefficients, and decide on v rounded to the data dtype, which
# is the output's sign.  With an addend the forward writes the decisions as one bit per element.
#
# The bit mask's layout depends only on the view (never on a tile): a mask row holds
# cdiv(extent, 8) bytes for the fast extent (channel-major: inner, one row per (o, c), row
# o * C + c; channel-minor: C, one row per r), bit k of byte b is element 8 b + k.  A tile
# writes whole bytes: its columns come in GROUP = min(8, BLOCK) consecutive elements, and
# BLOCK < 8 only when one tile covers the extent (the configs' rule).  Reads take any tile.


@triton.jit
def relu(v):
    """max(v, 0), NaN kept (as torch.relu)."""
    return tl.where(v < 0, 0.0, v)


@triton.jit
def normalized(x, pilot, shifted_mean, x_scale, x_coef, const):
    """(((x - pilot) - shifted_mean) * x_scale) * x_coef + const, with one explicit FMA: the value
    a fused activation decides on, computed alike by the forward and the backward's recompute."""
    return tl.fma(((x - pilot) - shifted_mean) * x_scale, x_coef, const)


@triton.jit
def passes(v, OUT: tl.constexpr):
    """The ReLU's decision on v: the output (v rounded to the output dtype ``OUT``) is positive,
    where torch's relu passes the gradient (0 at exactly 0 and at NaN)."""
    return v.to(OUT) > 0


@triton.jit
def bitmask_offsets(mask_rows, row_bytes, col0, cols, BLOCK_COLS: tl.constexpr, GROUP: tl.constexpr,
                    INT64: tl.constexpr):
    """Where a tile's bits live: mask rows ``mask_rows`` [R] of ``row_bytes`` bytes, columns col0 +
    [0, BLOCK_COLS) of an extent ``cols``.  Returns (byte offsets [R, BLOCK_COLS // GROUP], the bit
    of each group's first column [BLOCK_COLS // GROUP], which groups lie inside ``cols``)."""
    first = col0 + tl.arange(0, BLOCK_COLS // GROUP) * GROUP
    offsets = scalar_offset(mask_rows, row_bytes, INT64)[:, None] + (first // 8)[None, :]
    return offsets, first % 8, first < cols


@triton.jit
def pack_bits(flags, ROWS: tl.constexpr, COLS: tl.constexpr, GROUP: tl.constexpr):
    """[ROWS, COLS] booleans as [ROWS, COLS // GROUP] bytes (uint8): bit k of byte j is column
    j * GROUP + k (the group's first column starts a byte, see ``bitmask_offsets``)."""
    grouped = tl.reshape(flags.to(tl.int32), [ROWS, COLS // GROUP, GROUP])
    return tl.sum(grouped << tl.arange(0, GROUP)[None, None, :], 2).to(tl.uint8)


@triton.jit
def unpack_bits(packed, first_bit, ROWS: tl.constexpr, COLS: tl.constexpr, GROUP: tl.constexpr):
    """``pack_bits`` undone: bytes [ROWS, COLS // GROUP] whose group j starts at bit
    ``first_bit[j]`` -> [ROWS, COLS] booleans."""
    shifts = first_bit[None, :, None] + tl.arange(0, GROUP)[None, None, :]
    bits = (packed.to(tl.int32)[:, :, None] >> shifts) & 1
    return tl.reshape(bits, [ROWS, COLS]) != 0


@triton.jit
def store_bits(mask_ptr, flags, mask_rows, row_valid, row_bytes, col0, cols,
               ROWS: tl.constexpr, COLS: tl.constexpr, GROUP: tl.constexpr, INT64: tl.constexpr):
    """Write a tile's decisions ``flags`` [ROWS, COLS] (False where masked) as bits (see above)."""
    offsets, _, col_valid = bitmask_offsets(mask_rows, row_bytes, col0, cols, COLS, GROUP, INT64)
    tl.store(mask_ptr + offsets, pack_bits(flags, ROWS, COLS, GROUP), mask=row_valid[:, None] & col_valid[None, :])


@triton.jit
def load_bits(mask_ptr, mask_rows, row_valid, row_bytes, col0, cols,
              ROWS: tl.constexpr, COLS: tl.constexpr, GROUP: tl.constexpr, INT64: tl.constexpr):
    """A tile's decisions [ROWS, COLS] read back from the bit mask (False outside it)."""
    offsets, first_bit, col_valid = bitmask_offsets(mask_rows, row_bytes, col0, cols, COLS, GROUP, INT64)
    packed = tl.load(mask_ptr + offsets, mask=row_valid[:, None] & col_valid[None, :], other=0)
    return unpack_bits(packed, first_bit, ROWS, COLS, GROUP)
