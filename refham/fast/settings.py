"""A process-wide speed setting that changes no definition: glibc's handling of large freed
blocks on the CPU. (TF32 matmuls on the GPU change the numbers: refham.backend.set_tf32.)"""


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
