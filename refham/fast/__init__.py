"""Faster ways to compute what the specification defines, with the same numbers.

Nothing here is the specification: each function in refham that is marked
`backend.accelerated` is a plain `xp` definition (run under autograd, and the reference), and
this subpackage holds the variants the array switch may run instead — the elementwise chain in
cache-sized chunks on the BLAS threads (`threads`), a float32 GELU without erf on NumPy and one
fused CUDA kernel per chain on CuPy (`kernels`) — and the process-wide speed settings
(`settings`). Tests hold every variant equal to its definition (tests/test_fast_paths.py).
This subpackage imports nothing else of refham: the switch hands it the definition to run.
"""
from refham.fast.compiled import COMPILED
from refham.fast.kernels import CUDA, NUMPY
from refham.fast.settings import apply_malloc_default, compiled_enabled
from refham.fast.threads import chunked_elementwise

_compiled = {}   # (key, module) -> CuPy ElementwiseKernel, compiled on first use


def key_of(plain):
    """The name an elementwise definition's variants are filed under: 'module.function'."""
    return f"{plain.__module__}.{plain.__name__}"


def numpy_variant(plain):
    """What runs for `plain` on NumPy, before chunking: its NumPy variant, or itself."""
    variant = NUMPY.get(key_of(plain))
    return variant(plain) if variant else plain


def run(plain, backend, module, args):
    """plain(*args) on `backend` ('numpy' or 'cupy', whose array module is `module`) through
    its fast variant: on NumPy its compiled variant (`compiled`, where numba is installed and
    the arguments are its case), else the chain (or its NumPy variant) in cache-sized chunks,
    either on the BLAS threads with the same numbers for any thread count, glibc's malloc set
    to retain freed memory on the first call (`settings.apply_malloc_default`); on CuPy one
    ElementwiseKernel."""
    key = key_of(plain)
    if backend == "numpy":
        apply_malloc_default()
        compiled = COMPILED.get(key) if compiled_enabled() else None
        result = compiled(args) if compiled else None
        return result if result is not None else chunked_elementwise(numpy_variant(plain), args)
    kernel = _compiled.get((key, module))
    if kernel is None:   # compiled on first use: importing refham needs no CUDA
        if key not in CUDA:
            raise KeyError(f"{key} is marked accelerated but has no CUDA kernel in "
                           f"refham.fast.kernels.CUDA")
        in_params, out_params, body = CUDA[key]
        kernel = _compiled[(key, module)] = module.ElementwiseKernel(
            in_params, out_params, body, "refham_" + key.rsplit(".", 1)[1].lstrip("_"))
    return kernel(*args)
