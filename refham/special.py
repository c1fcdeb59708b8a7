"""The special functions of the Mixer's nonlinearity: the standard normal cdf Φ_N and pdf φ,
GELU(x) = x·Φ_N(x) in its exact erf form (not the tanh approximation) and its derivative.

These are the definitions. `gelu_and_deriv` is the one chain the training step runs, and what
runs is its accelerated variant (refham.fast): on CuPy one CUDA kernel of the same erf form; on
NumPy in float32 a form without erf (a rational fit of Φ_N's tail, within a few float32 ulp of
this one); on NumPy in float64 this definition itself. tests/test_fast_paths.py holds the
variants equal to it.
"""
import math

from refham.backend import accelerated, erf, xp

SQRT_2 = math.sqrt(2.0)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def normal_cdf(x):
    """Φ_N(x) = ½(1 + erf(x/√2))."""
    return 0.5 * (1.0 + erf(x / SQRT_2))


def normal_pdf(x):
    """φ(x) = e^{−x²/2}/√(2π)."""
    return INV_SQRT_2PI * xp.exp(-0.5 * x * x)


def gelu(x):
    """GELU(x) = x·Φ_N(x), the exact erf form (not the tanh approximation)."""
    return x * normal_cdf(x)


def gelu_deriv(x):
    """GELU′(x) = Φ_N(x) + x·φ(x)."""
    return normal_cdf(x) + x * normal_pdf(x)


@accelerated
def gelu_and_deriv(x):
    """(GELU(x), GELU′(x)) = (x·Φ_N(x), Φ_N(x) + x·φ(x)), sharing Φ_N between the two."""
    cdf = normal_cdf(x)
    return x * cdf, cdf + x * normal_pdf(x)
