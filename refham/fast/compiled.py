"""Compiled variants of the accelerated chains on NumPy (numba, the `[fast]` extra): each chain
is one loop over its elements that LLVM vectorises with the CPU's SIMD instructions, run in
fixed chunks on the BLAS threads (`threads.run_chunks`), writing straight into its outputs —
no temporaries, one pass through memory.

    variant = COMPILED.get(key)          # None without numba, or for a chain it does not have
    outputs = variant(args)              # None where these arguments are not its case

The loops do the definition's operations in its order, in the arrays' dtype, without fastmath
(no reassociation, no fused multiply-add), so that a value does not depend on where it falls in
a SIMD vector, in a chunk, or on the thread count: layer norm's, AdamW's and the HAM
Lagrangians' chains (layernorm's g, relu's g and ½g², softmax's probabilities) equal
their definitions bit for bit; GELU, which needs erf, has an exp of its own (libm's scalar exp and erf
do not vectorise) and in float32 the rational form of `kernels`, in float64 W. J. Cody's erfc:
both within the bounds their definition meets against the exact form.
Tested in tests/test_fast_paths.py. Compiled on first use and cached on disk (numba's cache:
beside this file, else in the user's cache folder; without a writable one, compiled anew in
each process).
"""
import math

import numpy

from refham.fast.kernels import _GAUSS_CUTOFF, _MILLS_P, _MILLS_Q, INV_SQRT_2PI
from refham.fast.threads import run_chunks

try:
    import numba
    from llvmlite import ir
    from numba.core import types
    from numba.core.extending import intrinsic
except ImportError:   # the plain NumPy chains run instead
    numba = None

CHUNK = 64 * 1024   # elements per chunk: ~30 µs of work, against ~2 µs to dispatch one


def _jit(function):
    """`function` compiled for the CPU: nogil (the chunks run on threads), IEEE arithmetic,
    NumPy's division semantics (no zero checks that stop vectorisation), cached on disk."""
    options = {"nogil": True, "error_model": "numpy"}
    try:
        return numba.njit(cache=True, **options)(function)
    except RuntimeError:   # numba found no writable cache folder: compile in each process
        return numba.njit(**options)(function)


def _f32(value):
    return numpy.float32(value)


# -------------------------------------------------------------------- float32 GELU, vectorised
if numba is not None:
    @intrinsic
    def _float32_from_bits(typingctx, bits):
        """The float32 whose IEEE bits are the int32 `bits` (a bitcast; SIMD-friendly)."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())
        return types.float32(types.int32), codegen

    @intrinsic
    def _float64_from_bits(typingctx, bits):
        """The float64 whose IEEE bits are the int64 `bits`."""
        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.DoubleType())
        return types.float64(types.int64), codegen

_LOG2E, _HALF = _f32(1.0 / math.log(2.0)), _f32(0.5)
_LN2_HI, _LN2_LO = _f32(0.693359375), _f32(-2.12194440e-4)   # Cody–Waite split of ln 2
# e^r − 1 − r ≈ r²·(c0 + c1 r + … + c5 r⁵) on |r| ≤ ln2/2 (Cephes' expf, ~1 ulp)
_EXP_C = tuple(_f32(c) for c in (5.0000001201e-1, 1.6666665459e-1, 4.1665795894e-2,
                                 8.3334519073e-3, 1.3981999507e-3, 1.9875691500e-4))
_P32 = tuple(_f32(c) for c in _MILLS_P)
_Q32 = tuple(_f32(c) for c in _MILLS_Q)
_CUTOFF32, _ONE, _INV_SQRT_2PI32 = _f32(_GAUSS_CUTOFF), _f32(1.0), _f32(INV_SQRT_2PI)
_EXPONENT_BIAS = numpy.int32(127)


def _exp_nonpositive_float32(x):
    """e^x for float32 x in [−128, 0]: x = n·ln2 + r, e^r by Cephes' polynomial, 2ⁿ as two
    powers of two built from their bits (each a normal float32, so the subnormal results of
    x < −87.3 come out right)."""
    n = numpy.floor(x * _LOG2E + _HALF)
    r = (x - n * _LN2_HI) - n * _LN2_LO
    c0, c1, c2, c3, c4, c5 = _EXP_C
    poly = (((((c5 * r + c4) * r + c3) * r + c2) * r + c1) * r + c0) * (r * r) + r + _ONE
    k = numpy.int32(n)
    half = k >> 1
    return (poly * _float32_from_bits((half + _EXPONENT_BIAS) << 23)) \
        * _float32_from_bits((k - half + _EXPONENT_BIAS) << 23)


if numba is not None:   # a compiled helper, inlined into the loop that calls it
    _exp_nonpositive_float32 = numba.njit(inline="always")(_exp_nonpositive_float32)


def _gelu_and_deriv_float32_loop(x, gelu, deriv):
    """kernels._gelu_and_deriv_float32, one element at a time (flat contiguous arrays)."""
    p0, p1, p2, p3 = _P32
    q0, q1, q2, q3 = _Q32
    for i in range(x.size):
        xi = x[i]
        u = min(abs(xi), _CUTOFF32)
        gauss = _exp_nonpositive_float32(u * (u * -_HALF))
        tail = gauss * ((((p3 * u + p2) * u + p1) * u + p0)
                        / ((((u + q3) * u + q2) * u + q1) * u + q0))
        cdf = math.copysign(_HALF - tail, xi) + _HALF
        gelu[i] = xi * cdf
        deriv[i] = cdf + xi * (gauss * _INV_SQRT_2PI32)


# ------------------------------------------------------------------- float64 GELU, vectorised
_LN2_HI64, _LN2_LO64 = 6.93147180369123816490e-01, 1.90821492927058770002e-10  # fdlibm's split
_EXP_TAYLOR64 = tuple(1.0 / math.factorial(k) for k in range(14))   # e^r to r¹³: 4e-18 at ln2/2
# W. J. Cody's rational approximations of erf and erfc (SPECFUN CALERF, Math. Comp. 1969):
# erf on |y| ≤ 0.46875, erfc·e^{y²} on (0.46875, 4], and in 1/y² beyond
_CODY_A = (3.1611237438705656, 113.864154151050156, 377.485237685302021, 3209.37758913846947,
           0.185777706184603153)
_CODY_B = (23.6012909523441209, 244.024637934444173, 1282.61652607737228, 2844.23683343917062)
_CODY_C = (0.564188496988670089, 8.88314979438837594, 66.1191906371416295, 298.635138197400131,
           881.95222124176909, 1712.04761263407058, 2051.07837782607147, 1230.33935479799725,
           2.15311535474403846e-8)
_CODY_D = (15.7449261107098347, 117.693950891312499, 537.181101862009858, 1621.38957456669019,
           3290.79923573345963, 4362.61909014324716, 3439.36767414372164, 1230.33935480374942)
_CODY_P = (0.305326634961232344, 0.360344899949804439, 0.125781726111229246,
           0.0160837851487422766, 6.58749161529837803e-4, 0.0163153871373020978)
_CODY_Q = (2.56852019228982242, 1.87295284992346047, 0.527905102951428412,
           0.0605183413124413191, 0.00233520497626869185)
_ERFC_ZERO_BEYOND = 26.543   # erfc(y) underflows to 0 in float64 beyond (Cody's xbig)
_INV_SQRT_2, _INV_SQRT_PI = 1.0 / math.sqrt(2.0), 1.0 / math.sqrt(math.pi)


def _exp_float64(x):
    """e^x for float64 x in [−709, 0]: x = n·ln2 + r, e^r by its Taylor series to r¹³, 2ⁿ as
    two powers of two built from their bits."""
    n = numpy.floor(x * 1.4426950408889634 + 0.5)
    r = (x - n * _LN2_HI64) - n * _LN2_LO64
    poly = _EXP_TAYLOR64[13]
    for k in range(12, -1, -1):
        poly = poly * r + _EXP_TAYLOR64[k]
    k = numpy.int64(n)
    half = k >> 1
    return (poly * _float64_from_bits((half + 1023) << 52)) \
        * _float64_from_bits((k - half + 1023) << 52)


def _erfc_nonnegative_float64(y):
    """erfc(y) for y ≥ 0 by Cody's three rational forms, all evaluated and the right one
    selected (branch-free, so the loop vectorises); e^{−y²} as e^{−ỹ²}·e^{−(y−ỹ)(y+ỹ)} with
    ỹ = y rounded down to 1/16, so that no rounding of y² is magnified (Cody's device)."""
    y = min(y, _ERFC_ZERO_BEYOND)
    ysq = y * y
    a, b = _CODY_A, _CODY_B
    num, den = a[4] * ysq, ysq
    for i in range(3):
        num, den = (num + a[i]) * ysq, (den + b[i]) * ysq
    small = 1.0 - y * (num + a[3]) / (den + b[3])
    c, d = _CODY_C, _CODY_D
    num, den = c[8] * y, y
    for i in range(7):
        num, den = (num + c[i]) * y, (den + d[i]) * y
    middle = (num + c[7]) / (den + d[7])
    inv_sq = 1.0 / max(ysq, 16.0)
    p, q = _CODY_P, _CODY_Q
    num, den = p[5] * inv_sq, inv_sq
    for i in range(4):
        num, den = (num + p[i]) * inv_sq, (den + q[i]) * inv_sq
    large = (_INV_SQRT_PI - inv_sq * (num + p[4]) / (den + q[4])) / y
    y_low = numpy.floor(y * 16.0) / 16.0
    gauss = _exp_float64(-(y_low * y_low)) * _exp_float64(-((y - y_low) * (y + y_low)))
    tail = gauss * (middle if y <= 4.0 else large)
    return small if y <= 0.46875 else (tail if y < _ERFC_ZERO_BEYOND else 0.0)


def _gelu_and_deriv_float64_loop(x, gelu, deriv):
    """(GELU, GELU′) in float64 from the lower tail t = Φ_N(−|x|) = ½erfc(|x|/√2):
    Φ_N(x) = ½ + sign(x)(½ − t), as the float32 loop; φ(x) = e^{−x²/2}/√(2π)."""
    for i in range(x.size):
        xi = x[i]
        tail = 0.5 * _erfc_nonnegative_float64(abs(xi) * _INV_SQRT_2)
        cdf = math.copysign(0.5 - tail, xi) + 0.5
        gelu[i] = xi * cdf
        deriv[i] = cdf + xi * (_exp_float64(max(-0.5 * (xi * xi), -745.0)) * INV_SQRT_2PI)


if numba is not None:
    _exp_float64 = numba.njit(inline="always")(_exp_float64)
    _erfc_nonnegative_float64 = numba.njit(inline="always")(_erfc_nonnegative_float64)


# ----------------------------------------------------------- the other chains, in their order
def _gelu_backward_loop(cache, dy, dx):
    for i in range(dy.size):
        dx[i] = dy[i] * cache[i]


def _normalise_affine_loop(centred, inv_sigma, weight, bias, x_hat, y):
    """(R, D) rows; inv_sigma (R,); weight, bias (D,)."""
    for r in range(centred.shape[0]):
        s = inv_sigma[r]
        for j in range(centred.shape[1]):
            h = centred[r, j] * s
            x_hat[r, j] = h
            y[r, j] = weight[j] * h + bias[j]


def _layernorm_dx_loop(d_hat, x_hat, inv_sigma, mean_d, mean_dx, dx):
    """(R, D) rows; inv_sigma, mean_d, mean_dx (R,)."""
    for r in range(d_hat.shape[0]):
        s, md, mdx = inv_sigma[r], mean_d[r], mean_dx[r]
        for j in range(d_hat.shape[1]):
            dx[r, j] = s * ((d_hat[r, j] - md) - x_hat[r, j] * mdx)


def _scaled_normalised_loop(centred, sigma, gamma, delta, g):
    """(R, D) rows; sigma (R,); gamma, delta (D,)."""
    for r in range(centred.shape[0]):
        s = sigma[r]
        for j in range(centred.shape[1]):
            g[r, j] = gamma[j] * (centred[r, j] / s) + delta[j]


def _quotient_and_product_loop(e, x, total, g, x_g):
    """(R, D) rows; total (R,)."""
    for r in range(e.shape[0]):
        t = total[r]
        for j in range(e.shape[1]):
            gi = e[r, j] / t
            g[r, j] = gi
            x_g[r, j] = x[r, j] * gi


def _relu_and_half_square_loop(x, zero, half, g, half_square):
    """zero, half: 0 and ½ in x's dtype (so that nothing is computed in float64 for float32)."""
    for i in range(x.size):
        xi = x[i]
        gi = zero if xi <= zero else xi   # NumPy's maximum(x, 0.0): NaN stays, −0 becomes 0
        g[i] = gi
        half_square[i] = half * gi * gi


def _adamw_loop(p, g, m, v, decay, step_size, beta1, one_minus_beta1, beta2, one_minus_beta2,
                correction2, eps, p_new, m_new, v_new):
    for i in range(p.size):
        gi = g[i]
        mi = beta1 * m[i] + one_minus_beta1 * gi
        vi = beta2 * v[i] + one_minus_beta2 * (gi * gi)
        m_new[i], v_new[i] = mi, vi
        p_new[i] = p[i] * decay - step_size * (mi / (math.sqrt(vi / correction2) + eps))


# ------------------------------------------------------------------ the variants, by chain
_DTYPES = (numpy.float32, numpy.float64)   # what the loops are compiled for


def _flat(arrays):
    """The arrays as flat C-ordered arrays (views where they are C-contiguous) if all are NumPy
    arrays of one shape and dtype, float32 or float64; else None."""
    first = arrays[0]
    if not all(isinstance(a, numpy.ndarray) and a.shape == first.shape and a.dtype == first.dtype
               for a in arrays) or first.dtype not in _DTYPES:
        return None
    return [numpy.ascontiguousarray(a).reshape(-1) for a in arrays]


def _chunked(loop, inputs, outputs, rows_per_chunk, scalars=()):
    """loop(*inputs[part], *scalars, *outputs[part]) over chunks of the leading axis."""
    n = inputs[0].shape[0]

    def task(index):
        part = slice(index * rows_per_chunk, (index + 1) * rows_per_chunk)
        loop(*(a[part] for a in inputs), *scalars, *(o[part] for o in outputs))

    run_chunks(task, -(-n // rows_per_chunk))


def _elementwise(loop, n_outputs):
    """A variant for a chain of same-shaped arrays (plus scalars after them)."""
    def variant(args, n_arrays):
        flat = _flat(args[:n_arrays])
        if flat is None:
            return None
        outputs = [numpy.empty_like(flat[0]) for _ in range(n_outputs)]
        _chunked(loop, flat, outputs, CHUNK, args[n_arrays:])
        shape = args[0].shape
        results = tuple(o.reshape(shape) for o in outputs)
        return results if n_outputs > 1 else results[0]
    return variant


def _rows(full, per_row, per_element):
    """(R, D) views for a layer-norm chain: `full` arrays of shape lead + trail, `per_row`
    arrays lead + (1,)·len(trail) (keepdims means), `per_element` arrays trail or 0-d (the
    affine), as (R, D), (R,) and (D,); or None for any other case."""
    arrays = full + per_row + per_element
    if not all(isinstance(a, numpy.ndarray) and a.dtype == full[0].dtype for a in arrays) \
            or full[0].dtype not in _DTYPES:
        return None
    shape = full[0].shape
    trail = 0   # the normalised axes: where the first per-row array has length 1
    while trail < len(shape) and per_row[0].shape[len(shape) - 1 - trail:] == (1,) * (trail + 1):
        trail += 1
    lead = shape[:len(shape) - trail]
    if trail == 0 or any(a.shape != shape for a in full) \
            or any(a.shape != lead + (1,) * trail for a in per_row) \
            or any(a.shape not in ((), shape[len(lead):]) for a in per_element):
        return None
    rows, width = math.prod(lead), math.prod(shape[len(lead):])
    return ([numpy.ascontiguousarray(a).reshape(rows, width) for a in full],
            [numpy.ascontiguousarray(a).reshape(rows) for a in per_row],
            [numpy.ascontiguousarray(numpy.broadcast_to(a, shape[len(lead):])).reshape(width)
             for a in per_element])


def _rows_chunk(width):
    """Rows per chunk: about CHUNK elements, at least one row."""
    return max(1, CHUNK // max(1, width))


def _in_dtype(value, like):
    """A Python number as a 0-d array of `like`'s dtype (what NumPy's arithmetic casts it to);
    arrays unchanged."""
    if isinstance(value, (int, float)) and isinstance(like, numpy.ndarray):
        return numpy.asarray(value, dtype=like.dtype)
    return value


def _row_chain(loop, n_full, n_per_row, n_outputs):
    """A variant for a chain over rows whose arguments are `n_full` arrays of the full shape,
    `n_per_row` keepdims arrays, then per-element ones (the trailing shape, 0-d, or Python
    numbers): its loop takes (R, D), (R,) and (D,) views in that order, then its outputs."""
    def variant(args):
        first = args[0]
        per_element = [_in_dtype(a, first) for a in args[n_full + n_per_row:]]
        views = _rows(list(args[:n_full]), list(args[n_full:n_full + n_per_row]), per_element)
        if views is None:
            return None
        full, per_row, per_element = views
        outputs = [numpy.empty_like(full[0]) for _ in range(n_outputs)]
        _chunked(_LOOPS[loop], full + per_row, outputs, _rows_chunk(full[0].shape[1]),
                 tuple(per_element))
        results = tuple(o.reshape(first.shape) for o in outputs)
        return results if n_outputs > 1 else results[0]
    return variant


def _adamw_variant(args):
    arrays, (decay, step_size, beta1, beta2, correction2, eps) = args[:4], args[4:]
    dtype = getattr(arrays[0], "dtype", None)
    if not all(isinstance(s, numpy.generic) and s.dtype == dtype for s in args[4:]):
        return None
    one = dtype.type(1)   # 1 − β in the arrays' dtype, as the definition's scalar arithmetic
    scalars = (decay, step_size, beta1, one - beta1, beta2, one - beta2, correction2, eps)
    return _elementwise(_LOOPS["adamw"], 3)(arrays + scalars, 4)


def _relu_and_half_square_variant(args):
    dtype = getattr(args[0], "dtype", None)
    if dtype not in _DTYPES:
        return None
    scalars = (dtype.type(0), dtype.type(0.5))
    return _elementwise(_LOOPS["relu_and_half_square"], 2)(args + scalars, 1)


def _gelu_variant(args):
    loop = _LOOPS["gelu_float32" if getattr(args[0], "dtype", None) == numpy.float32
                  else "gelu_float64"]
    return _elementwise(loop, 2)(args, 1)


def _gelu_backward_variant(args):
    return _elementwise(_LOOPS["gelu_backward"], 1)(args, 2)


_LOOPS = {} if numba is None else {
    "gelu_float32": _jit(_gelu_and_deriv_float32_loop),
    "gelu_float64": _jit(_gelu_and_deriv_float64_loop),
    "gelu_backward": _jit(_gelu_backward_loop),
    "normalise_affine": _jit(_normalise_affine_loop),
    "layernorm_dx": _jit(_layernorm_dx_loop),
    "adamw": _jit(_adamw_loop),
    "scaled_normalised": _jit(_scaled_normalised_loop),
    "quotient_and_product": _jit(_quotient_and_product_loop),
    "relu_and_half_square": _jit(_relu_and_half_square_loop),
}
COMPILED = {} if numba is None else {
    "refham.special.gelu_and_deriv": _gelu_variant,
    "refham.layers.gelu_backward": _gelu_backward_variant,
    "refham.layers._normalise_affine": _row_chain("normalise_affine", 1, 1, 2),
    "refham.layers._layernorm_dx": _row_chain("layernorm_dx", 2, 3, 1),
    "refham.optim.adamw_step": _adamw_variant,
    "refham.normalisers.scaled_normalised": _row_chain("scaled_normalised", 1, 1, 1),
    "refham.lagrangians.relu_and_half_square": _relu_and_half_square_variant,
    "refham.lagrangians.quotient_and_product": _row_chain("quotient_and_product", 2, 1, 2),
}
