"""Process-wide speed settings that change no definition: whether the compiled chains run
(`use_compiled`), and glibc's handling of large freed blocks on the CPU (retained by default
from the first accelerated chain on NumPy on: `retain_freed_memory`, `keep_glibc_malloc`).
(TF32 matmuls on the GPU change the numbers: refham.backend.set_tf32.)"""


class _Compiled:
    enabled = True


def use_compiled(enabled):
    """Run the accelerated chains on NumPy through their compiled variants (refham.fast.compiled,
    where numba is installed: the default) or as NumPy chains (False: benchmarks compare both)."""
    _Compiled.enabled = bool(enabled)


def compiled_enabled():
    """Whether `use_compiled` allows the compiled chains (numba may still be missing)."""
    return _Compiled.enabled


class _Malloc:
    retain = True     # the default; keep_glibc_malloc() before the first chain turns it off
    applied = False


def keep_glibc_malloc():
    """Leave glibc's malloc as configured (no `retain_freed_memory` on the first chain): for
    benchmarks of the page-fault cost, or a process that must hand memory back between steps."""
    _Malloc.retain = False


def apply_malloc_default():
    """`retain_freed_memory` once per process, unless `keep_glibc_malloc` was called: the
    accelerated chains on NumPy call this first (refham.fast.run)."""
    if _Malloc.retain and not _Malloc.applied:
        _Malloc.applied = True
        retain_freed_memory()


def retain_freed_memory():
    """Ask glibc's malloc to keep freed memory for reuse instead of returning it to the system.

    By default glibc serves every block over 32 MiB (e.g. the (B, S, 4C) hidden layer of `small`
    at batch 128) with a fresh mmap, whose pages the kernel faults in and zero-fills on first
    touch, and trims freed heap memory: a training step then pays page faults for its large
    arrays at every step (docs/performance.md measures the cost). Process-wide; the process then keeps its peak heap. Returns False (and does
    nothing) where the C library is not glibc."""
    import ctypes
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3   # glibc's <malloc.h> parameter numbers
    return bool(mallopt(m_mmap_threshold, 1 << 30) and mallopt(m_trim_threshold, 1 << 30))
