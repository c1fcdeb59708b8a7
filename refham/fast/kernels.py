"""The faster variants of the accelerated elementwise chains, keyed by their definition's name
(`module.function`): one CUDA kernel body per chain for CuPy, and on NumPy a float32 GELU without
erf. Each computes its definition's arithmetic; tests/test_fast_paths.py holds them equal.

A CUDA entry is (input parameters, output parameters, body) in CuPy's ElementwiseKernel syntax
("T x, T y": T binds to the arrays' dtype; scalars are passed as the arrays' dtype scalars).
On a GPU a chain of k array operations costs k kernel launches and k trips through memory; the
kernel costs one of each.
"""
import math

import numpy

INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)

CUDA = {
    "refham.special.gelu_and_deriv": ("T x", "T gelu, T deriv", """
        const T cdf = (T)0.5 * erfc(x * (T)-0.70710678118654752);
        gelu = x * cdf;
        deriv = cdf + x * (T)0.39894228040143268 * exp((T)-0.5 * x * x);
    """),
    "refham.layers.gelu_backward": ("T cache, T dy", "T dx", "dx = dy * cache;"),
    "refham.layers._normalise_affine": (
        "T centred, T inv_sigma, T weight, T bias", "T x_hat, T y",
        "x_hat = centred * inv_sigma; y = weight * x_hat + bias;"),
    "refham.layers._layernorm_dx": (
        "T d_hat, T x_hat, T inv_sigma, T mean_d, T mean_dx", "T dx",
        "dx = inv_sigma * (d_hat - mean_d - x_hat * mean_dx);"),
    "refham.normalisers.scaled_normalised": (
        "T centred, T sigma, T gamma, T delta", "T g", "g = gamma * (centred / sigma) + delta;"),
    "refham.lagrangians.relu_and_half_square": (
        "T x", "T g, T half_square",
        "g = x <= (T)0 ? (T)0 : x; half_square = (T)0.5 * g * g;"),
    "refham.lagrangians.quotient_and_product": (
        "T e, T x, T total", "T g, T x_g", "g = e / total; x_g = x * g;"),
    "refham.optim.adamw_step": (
        "T p, T g, T m, T v, T decay, T step_size, T beta1, T beta2, T correction2, T eps",
        "T p_new, T m_new, T v_new", """
        m_new = beta1 * m + (1 - beta1) * g;
        v_new = beta2 * v + (1 - beta2) * (g * g);
        p_new = p * decay - step_size * (m_new / (sqrt(v_new / correction2) + eps));
    """),
}


# Φ_N(−u) = e^{−u²/2}·P(u)/Q(u) for u ≥ 0: a (3, 4) rational fit of the scaled Mills ratio
# e^{u²/2}Φ_N(−u), minimax in the absolute error of Φ_N on [0, 16] (7.3e-10 in exact arithmetic,
# far below float32's 6e-8 at ½; it decays like 1/(u√(2π)), so it holds beyond). Coefficients
# from degree 0 up; Q is monic (its leading 1 is not stored).
_MILLS_P = (20.02227365074431, 11.922232084566254, 3.461260080899899, 0.39764216858994855)
_MILLS_Q = (40.04454736030966, 55.795387672170506, 31.41856305536559, 8.616040310961138)
_GAUSS_CUTOFF = 16.0   # e^{−u²/2} is 0 in float32 beyond u ≈ 14.4; clipping keeps u⁴ finite


def _polynomial(coefficients, u, monic=False):
    """Σ_k c_k u^k (plus u^n for monic) by Horner's rule."""
    result = u + coefficients[-1] if monic else coefficients[-1]
    for c in reversed(coefficients[:-1]):
        result = result * u + c
    return result


def _gelu_and_deriv_float32(x):
    """(GELU(x), GELU′(x)) for a float32 NumPy array x, in float32 arithmetic without erf,
    from the lower tail t = Φ_N(−|x|):

        t = e^{−x²/2}·P(|x|)/Q(|x|),   Φ_N(x) = ½ + sign(x)(½ − t),
        GELU(x) = x·Φ_N(x),   GELU′(x) = Φ_N(x) + x·φ(x),   φ(x) = e^{−x²/2}/√(2π).

    Φ_N is within ~1 float32 ulp of 1 (absolute), as good as ½(1 + erf(x/√2)) with a correctly
    rounded float32 erf; so GELU is within a few ulp, except in the lower tail where (like the
    erf form, and torch's) its error is ~|x|·6e-8 absolute. Tested in tests/test_fast_paths.py."""
    u = numpy.clip(numpy.abs(x), 0.0, _GAUSS_CUTOFF)  # clip: SIMD; minimum(u, scalar) is not
    gauss = numpy.exp(u * (u * -0.5))
    tail = gauss * (_polynomial(_MILLS_P, u) / _polynomial(_MILLS_Q, u, monic=True))
    cdf = _copysign_float32(0.5 - tail, x) + 0.5
    return x * cdf, cdf + x * (gauss * INV_SQRT_2PI)


def _copysign_float32(magnitude, sign_of):
    """copysign(magnitude, sign_of) for float32 magnitude ≥ 0 (or +0): the sign bit of sign_of
    ORed into magnitude's bits: NumPy's copysign has no SIMD loop, these bit operations do."""
    sign_bit = sign_of.view(numpy.int32) & numpy.int32(-2 ** 31)
    return (magnitude.view(numpy.int32) | sign_bit).view(numpy.float32)


def gelu_and_deriv_numpy(plain):
    """The NumPy variant of special.gelu_and_deriv: float32 through `_gelu_and_deriv_float32`
    (SciPy's erf is a scalar loop), float64 through the definition."""
    def variant(x):
        if x.dtype == numpy.float32:
            return _gelu_and_deriv_float32(x)
        return plain(x)
    return variant


NUMPY = {"refham.special.gelu_and_deriv": gelu_and_deriv_numpy}
