"""The array-module switch: every numeric line in refham is written against `xp`.

    from refham.backend import xp, erf
    y = xp.tanh(x)            # numpy.tanh on the CPU, cupy.tanh on the GPU

`xp` is a thin proxy that forwards each attribute to the active module, so a switch made with
`set_backend` (or the REFHAM_BACKEND environment variable at import time) reaches code that
imported `xp` earlier. An unusable REFHAM_BACKEND does not fail the import: `xp` raises its
BackendError until `set_backend` chooses a backend (`environment_error` tells). Tests swap in
`autograd.numpy` with `use_module` to differentiate the very same forward code that the
hand-written gradients are checked against.

Also here, because they depend on which module is active: erf (SciPy's or CuPy's), the default
float dtype, a seeded random generator that gives the same numbers on every backend (drawn with
NumPy, then moved), `asarray`/`to_numpy`, and `accelerated`, the mark of an elementwise chain
that the switch may run through a faster variant of the same arithmetic (refham.fast: chunked
on the BLAS threads on NumPy, one fused kernel on CuPy; the plain definition under autograd).
This module is the one part of refham that the specification imports.
"""
import contextlib
import functools
import os
import re
import warnings

import numpy
import scipy.special

from refham.errors import RefhamError

_BACKENDS = ("numpy", "cupy")


class BackendError(RefhamError, RuntimeError):
    """The requested array backend cannot be used here."""


class SeedError(RefhamError, ValueError):
    """A seed that is not an integer >= 0."""


class _State:
    name = "numpy"
    module = numpy
    erf = staticmethod(scipy.special.erf)
    dtype = numpy.float64
    unusable = None     # the BackendError of an unusable REFHAM_BACKEND, until set_backend


class _ModuleProxy:
    """Forwards attribute access to the active array module (numpy, cupy or autograd.numpy)."""

    def __getattr__(self, attr):
        if _State.unusable is not None:    # never compute silently on another backend
            raise _State.unusable
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


# a rank's index on its node, as Open MPI, MPICH (Hydra), MVAPICH and Slurm set it
_LAUNCHER_LOCAL_RANK = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID",
                        "MV2_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID")
# what a CuPy wheel needs beside the driver, by the library name in CuPy's "failed to load" error
_CUDA_PIECES = (("nvrtc", "NVRTC (CUDA's runtime compiler, which builds refham's fused kernels)"),
                ("cublas", "cuBLAS (CUDA's matrix products)"), ("curand", "cuRAND"),
                ("cudart", "the CUDA runtime"))
_probed = set()   # GPUs on which training's first kernel and GEMM have run in this process


def _local_gpu(n_gpus):
    """GPU (local rank mod n_gpus): one GPU per rank under a launcher, GPU 0 outside one (or the
    one GPU a launcher that binds a GPU per rank leaves visible)."""
    for name in _LAUNCHER_LOCAL_RANK:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name]) % n_gpus
    return 0


def _missing_piece(exc):
    """One line naming the CUDA library CuPy could not load, and the pip command that brings it."""
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    major = re.search(r"\.so\.(\d+)|_(\d+)\d_0\.dll", text)
    cuda = (major.group(1) or major.group(2)) if major else "12"
    piece = next((what for lib, what in _CUDA_PIECES if lib in text.lower()), None)
    found = f"{piece} is missing" if piece else "a CUDA library is missing or broken"
    return (f"backend 'cupy' cannot run training's first kernel and matrix product: {found} "
            f"({text}); CuPy's wheels need CUDA's libraries beside the driver: "
            f'pip install "cupy-cuda{cuda}x[ctk]" (or pip install "refham[cuda{cuda}]")')


def _probe(cupy):
    """Compile and run one of refham's fused kernels (NVRTC, CUDA's math library) and a float32
    GEMM (cuBLAS) on the current GPU, waiting for both: what training needs first, so that a
    missing library is one line here instead of a traceback at the first step."""
    from refham import fast      # deferred, as in Accelerated: it imports nothing of refham
    kernel = cupy.ElementwiseKernel(*fast.CUDA["refham.special.gelu_and_deriv"], "refham_probe")
    x = cupy.asarray(numpy.linspace(-2, 2, 16, dtype=numpy.float32).reshape(4, 4))
    gelu, _ = kernel(x)
    gelu @ x
    cupy.cuda.runtime.deviceSynchronize()


def _load_cupy():
    try:
        import cupy
        import cupyx.scipy.special as cupy_special
    except ImportError as exc:
        raise BackendError(
            f"backend 'cupy' needs CuPy ({exc}): install it with its CUDA libraries and NCCL: "
            f'pip install "refham[cuda12]" (or [cuda13] for a CUDA 13 driver)') from exc
    try:
        n_gpus = cupy.cuda.runtime.getDeviceCount()
    except Exception as exc:  # CUDA driver missing or broken: cupy raises its own error types
        raise BackendError(f"backend 'cupy' found no usable GPU: {exc}") from exc
    if n_gpus < 1:
        raise BackendError("backend 'cupy' found no GPU (getDeviceCount() == 0); use 'numpy'")
    gpu = _local_gpu(n_gpus)
    cupy.cuda.Device(gpu).use()
    if gpu not in _probed:
        try:
            _probe(cupy)
        except Exception as exc:  # CuPy's RuntimeError/ImportError/CompileException/CUBLASError
            raise BackendError(_missing_piece(exc)) from exc
        _probed.add(gpu)
    return cupy, cupy_special.erf


def device_memory():
    """(free, total) bytes of the current GPU on the cupy backend; None on any other."""
    if _State.name != "cupy":
        return None
    return tuple(_State.module.cuda.runtime.memGetInfo())


def set_backend(name):
    """Make `name` ('numpy' or 'cupy') the array module behind `xp` and `erf`."""
    if name not in _BACKENDS:
        raise BackendError(f"unknown backend {name!r}: choose one of {', '.join(_BACKENDS)}")
    if name == "cupy":
        module, erf_fn = _load_cupy()
    else:
        module, erf_fn = numpy, scipy.special.erf
    _State.name, _State.module, _State.erf, _State.unusable = name, module, erf_fn, None


def environment_error():
    """The BackendError of an unusable REFHAM_BACKEND (until set_backend chooses one), or
    None: importing refham never fails on it, computing does."""
    return _State.unusable


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


@contextlib.contextmanager
def active_backend(name, dtype, threads=0):
    """Run with backend `name` (None: the active one, as REFHAM_BACKEND or `set_backend` chose),
    default dtype `dtype` and at most `threads` BLAS threads (0: as the BLAS library likes;
    threadpoolctl sets it; more than the cores this process may use: that many, with a
    warning); restore all three after."""
    from threadpoolctl import threadpool_limits

    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    if threads > available:     # more would only make the threads wait for each other
        warnings.warn(f"--threads {threads} exceeds the {available} cores this process may use: "
                      f"using {available}", stacklevel=3)
        threads = available
    saved = backend_name(), get_dtype()
    switch = bool(name) and name != saved[0]
    if switch:
        set_backend(name)
    set_dtype(dtype)
    try:
        with threadpool_limits(limits=threads or None, user_api="blas"):
            yield
    finally:
        if switch:
            set_backend(saved[0])
        set_dtype(saved[1])


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
    sees the same numbers for the same seed. `seed`: an int ≥ 0 or a tuple of them (SeedError
    otherwise, where NumPy would raise its own error)."""
    parts = seed if isinstance(seed, tuple) else (seed,)
    if not parts or not all(isinstance(p, (int, numpy.integer)) and not isinstance(p, bool)
                            and p >= 0 for p in parts):
        raise SeedError(f"a seed must be an integer >= 0 (or a tuple of them), got {seed!r}")
    return numpy.random.default_rng(seed)


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


class Accelerated:
    """An elementwise xp function (the specification) that the switch may run faster: on NumPy
    and CuPy through `refham.fast.run` (the same arithmetic: chunked on the BLAS threads, or one
    CuPy kernel), on any other module (autograd) as written. `.plain` is the definition."""

    def __init__(self, plain):
        functools.update_wrapper(self, plain)
        self.plain = plain

    def __call__(self, *args):
        if _State.name not in _BACKENDS:
            return self.plain(*args)
        from refham import fast   # deferred: the variants import nothing of refham
        return fast.run(self.plain, _State.name, _State.module, args)


def accelerated(plain):
    """Decorator: mark `plain`, an elementwise xp definition, as an `Accelerated` chain."""
    return Accelerated(plain)


_env_backend = os.environ.get("REFHAM_BACKEND")
if _env_backend:
    try:
        set_backend(_env_backend)
    except BackendError as _exc:
        _State.unusable = BackendError(f"REFHAM_BACKEND={_env_backend!r}: {_exc}; unset it or "
                                       f"set it to numpy or cupy")
