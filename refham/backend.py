"""The array-module switch: every numeric line in refham is written against `xp`.

    from refham.backend import xp, erf
    y = xp.tanh(x)            # numpy.tanh on the CPU, cupy.tanh on the GPU

`xp` is a thin proxy that forwards each attribute to the active module, so a switch made with
`set_backend` (or the REFHAM_BACKEND environment variable at import time) reaches code that
imported `xp` earlier. Tests swap in `autograd.numpy` with `use_module` to differentiate the very
same forward code that the hand-written gradients are checked against.

Also here: the default float dtype, a seeded random generator that gives the same numbers on every
backend (drawn with NumPy, then moved), `asarray`/`to_numpy`, the few special functions that
numeric code needs (erf, the normal cdf/pdf, GELU and its derivative), and the fused elementwise
chains of the training step: `fused_elementwise` pairs a plain xp definition (the specification,
run under autograd, and on NumPy in cache-sized chunks on the BLAS threads) with the same
arithmetic as one CuPy kernel (run on the GPU).
"""
import contextlib
import functools
import math
import os

import numpy
import scipy.special

from refham.cpu_threads import chunked_elementwise

_BACKENDS = ("numpy", "cupy")


class BackendError(RuntimeError):
    """The requested array backend cannot be used here."""


class _State:
    name = "numpy"
    module = numpy
    erf = staticmethod(scipy.special.erf)
    dtype = numpy.float64


class _ModuleProxy:
    """Forwards attribute access to the active array module (numpy, cupy or autograd.numpy)."""

    def __getattr__(self, attr):
        return getattr(_State.module, attr)

    def __repr__(self):
        return f"<refham xp -> {_State.module.__name__}>"


xp = _ModuleProxy()


def erf(x):
    """The error function erf(x) = (2/√π) ∫₀ˣ e^{−t²} dt on the active backend."""
    return _State.erf(x)


def backend_name():
    """'numpy' or 'cupy' (or the name of a module installed with `use_module`)."""
    return _State.name


def _load_cupy():
    try:
        import cupy
        import cupyx.scipy.special as cupy_special
    except ImportError as exc:
        raise BackendError(
            "backend 'cupy' needs CuPy: install it with `pip install refham[cuda12]` "
            "(or [cuda13] to match your CUDA toolkit)") from exc
    try:
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken: cupy raises its own error types
        raise BackendError(f"backend 'cupy' found no usable GPU: {exc}") from exc
    if n_gpus < 1:
        raise BackendError("backend 'cupy' found no GPU (getDeviceCount() == 0); use 'numpy'")
    return cupy, cupy_special.erf


def set_backend(name):
    """Make `name` ('numpy' or 'cupy') the array module behind `xp` and `erf`."""
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(_BACKENDS)}")
    if name == "cupy":
        module, erf_fn = _load_cupy()
    else:
        module, erf_fn = numpy, scipy.special.erf
    _State.name, _State.module, _State.erf = name, module, erf_fn


@contextlib.contextmanager
def use_module(module, erf_fn, name=None):
    """Temporarily run all refham code on another NumPy-like module (tests: autograd.numpy)."""
    saved = (_State.name, _State.module, _State.erf)
    _State.name, _State.module, _State.erf = name or module.__name__, module, erf_fn
    try:
        yield
    finally:
        _State.name, _State.module, _State.erf = saved


def set_dtype(dtype):
    """Default float dtype for parameters and data: float64 (reference) or float32 (speed)."""
    dtype = numpy.dtype(dtype)
    if dtype not in (numpy.float32, numpy.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    _State.dtype = dtype.type


def get_dtype():
    return _State.dtype


def asarray(a, dtype=None):
    """`a` as an array of the active backend, in `dtype` (default: the default float dtype)."""
    return xp.asarray(a, dtype=dtype or _State.dtype)


def to_numpy(a):
    """A host NumPy copy of any backend array (a no-op view for NumPy arrays)."""
    if hasattr(a, "get"):  # cupy.ndarray
        return a.get()
    return numpy.asarray(a)


def rng(seed):
    """A seeded NumPy Generator; draw with it and move with `asarray` so that every backend
    sees the same numbers for the same seed."""
    return numpy.random.default_rng(seed)


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



# ---------------------------------------------------------------------------------------------
# Fused elementwise chains
# ---------------------------------------------------------------------------------------------
class FusedElementwise:
    """An elementwise chain with two definitions of the same arithmetic side by side: `plain`, xp
    code (the specification; NumPy and autograd run it), and `cuda_body`, the body of one CuPy
    ElementwiseKernel that the cupy backend runs instead. On a GPU a chain of k xp operations costs
    k kernel launches and k round trips through memory; the kernel costs one of each. On NumPy the
    plain chain runs in cache-sized chunks on the BLAS threads (`cpu_threads.chunked_elementwise`:
    the same numbers for any thread count). Tests check that each path gives the plain
    definition's numbers (`.plain` is the xp definition)."""

    def __init__(self, plain, in_params, out_params, cuda_body):
        functools.update_wrapper(self, plain)
        self.plain = plain
        self._kernel_spec = (in_params, out_params, cuda_body, f"refham_{plain.__name__}")
        self._kernel = None

    def __call__(self, *args):
        if _State.name == "numpy":
            return chunked_elementwise(self.plain, args)
        if _State.name != "cupy":
            return self.plain(*args)
        if self._kernel is None:  # compiled on first use: importing refham needs no CUDA
            self._kernel = _State.module.ElementwiseKernel(*self._kernel_spec)
        return self._kernel(*args)


def fused_elementwise(in_params, out_params, cuda_body):
    """Decorator: the xp function below becomes the plain half of a `FusedElementwise` whose CuPy
    kernel has parameters `in_params`, `out_params` (CuPy's "T x, T y" syntax) and body
    `cuda_body`. Pass scalars as arrays' dtype scalars (`x.dtype.type(v)`) so that T binds."""
    return lambda plain: FusedElementwise(plain, in_params, out_params, cuda_body)


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
    u = xp.clip(xp.abs(x), 0.0, _GAUSS_CUTOFF)  # clip: SIMD; minimum(u, scalar) is not
    gauss = xp.exp(u * (u * -0.5))
    tail = gauss * (_polynomial(_MILLS_P, u) / _polynomial(_MILLS_Q, u, monic=True))
    cdf = _copysign_float32(0.5 - tail, x) + 0.5
    return x * cdf, cdf + x * (gauss * INV_SQRT_2PI)


def _copysign_float32(magnitude, sign_of):
    """copysign(magnitude, sign_of) for float32 magnitude ≥ 0 (or +0): the sign bit of sign_of
    ORed into magnitude's bits; 3× faster than NumPy's copysign, which has no SIMD loop."""
    sign_bit = sign_of.view(numpy.int32) & numpy.int32(-2 ** 31)
    return (magnitude.view(numpy.int32) | sign_bit).view(numpy.float32)


@fused_elementwise("T x", "T gelu, T deriv", """
    const T cdf = (T)0.5 * erfc(x * (T)-0.70710678118654752);
    gelu = x * cdf;
    deriv = cdf + x * (T)0.39894228040143268 * exp((T)-0.5 * x * x);
""")
def gelu_and_deriv(x):
    """(GELU(x), GELU′(x)) = (x·Φ_N(x), Φ_N(x) + x·φ(x)), sharing Φ_N between the two.

    float32 on NumPy: `_gelu_and_deriv_float32` (a rational tail, no erf: scipy's erf costs
    ~20 ns per element); otherwise, and under autograd, the exact erf form below."""
    if _State.name == "numpy" and x.dtype == numpy.float32:
        return _gelu_and_deriv_float32(x)
    cdf = normal_cdf(x)
    return x * cdf, cdf + x * normal_pdf(x)


# ---------------------------------------------------------------------------------------------
# Host memory
# ---------------------------------------------------------------------------------------------
def retain_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the system.

    By default glibc serves every block over 32 MiB (e.g. the (B, S, 4C) hidden layer of `small`
    at batch 128) with a fresh mmap, whose pages the kernel faults in and zero-fills on first
    touch, and trims freed heap memory; on the 2-core VM of the benchmarks that cost 10–40% of a
    float32 CPU training step (and as much for PyTorch, which allocates through the same
    malloc). Process-wide; the process then keeps its peak heap. Returns False (and does
    nothing) where the C library is not glibc."""
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3   # glibc's <malloc.h> parameter numbers
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 1 << 30))


# ---------------------------------------------------------------------------------------------
# TF32 matmuls on the GPU
# ---------------------------------------------------------------------------------------------
def set_tf32(enabled):
    """Let CuPy's float32 matmuls use TF32 tensor cores (10-bit mantissa inputs, float32
    accumulation): faster on Ampere and later, less accurate. Off by default, as in PyTorch.
    Needs the cupy backend active."""
    if _State.name != "cupy":
        raise BackendError(f"TF32 is a CuPy (GPU) matmul mode; the active backend is "
                           f"{_State.name!r}: call set_backend('cupy') first")
    from cupy._core import _routines_linalg as linalg  # CuPy's switch (env CUPY_TF32 at start)
    linalg.set_compute_type(numpy.float32, linalg.COMPUTE_TYPE_TF32 if enabled
                            else linalg.COMPUTE_TYPE_DEFAULT)


def tf32_enabled():
    """Whether float32 matmuls run in TF32 (always False off the GPU)."""
    if _State.name != "cupy":
        return False
    from cupy._core import _routines_linalg as linalg
    return linalg.get_compute_type(numpy.float32) == linalg.COMPUTE_TYPE_TF32

_env_backend = os.environ.get("REFHAM_BACKEND")
if _env_backend:
    set_backend(_env_backend)
