"""Elementwise NumPy chains in cache-sized chunks, spread over the threads BLAS may use.

    outputs = chunked_elementwise(chain, arrays)     # chain: plain xp code, elementwise

A chain of k NumPy operations over a large array makes k passes through main memory, on one
core: NumPy's ufuncs run single-threaded. Cut into chunks of ~`CHUNK` elements, every
temporary of the chain stays in cache; and since NumPy releases the GIL inside each ufunc, the
chunks run in parallel on a small persistent thread pool. The pool uses as many threads as
NumPy's BLAS may use right now (`blas_threads`: OpenBLAS's setting, so `threadpoolctl`'s
limits, OPENBLAS_NUM_THREADS and a benchmark's `--threads` all apply to it as well).

The chunks are fixed slices of the leading axis whatever the number of threads (threads take
the next free chunk, so a thread that a busy machine leaves waiting delays little), and an
elementwise chain computes each element from that element alone, so the numbers are the same
bit for bit for any thread count, and equal to one call of the chain on the whole arrays.
"""
import concurrent.futures
import itertools
import os
import threading

import numpy

CHUNK = 24 * 1024   # elements per chunk: a chain's float32 temporaries (96 KiB each) stay in
                    # L2 cache and below glibc's 128 KiB mmap threshold, so they reuse heap memory


class _Pool:
    """The worker threads (created on first use; recreated after a fork, which keeps no
    threads, or when more are needed) and the BLAS controllers they follow."""
    lock = threading.Lock()
    executor = None
    workers = 0
    pid = None
    blas = None


def _blas_controllers():
    """threadpoolctl's controllers of NumPy's BLAS (of every BLAS where none is NumPy's)."""
    if _Pool.blas is None:
        import threadpoolctl  # a dependency of refham; imported here: it inspects the process
        libraries = threadpoolctl.ThreadpoolController().select(user_api="blas").lib_controllers
        own = [lib for lib in libraries if "numpy" in lib.filepath]
        _Pool.blas = own or libraries
    return _Pool.blas


def blas_threads():
    """The number of threads NumPy's BLAS may use now (≥ 1; 1 when no BLAS is found)."""
    counts = [lib.get_num_threads() for lib in _blas_controllers()]
    return max(1, min((count for count in counts if count), default=1))


def _executor(workers):
    """A thread pool with at least `workers` threads, owned by this process."""
    with _Pool.lock:
        if _Pool.pid != os.getpid() or _Pool.workers < workers:
            # not shut down: a caller may still submit to it; its idle threads exit once
            # it is garbage-collected
            _Pool.executor = concurrent.futures.ThreadPoolExecutor(
                workers, thread_name_prefix="refham-elementwise")
            _Pool.pid, _Pool.workers = os.getpid(), workers
        return _Pool.executor


def _splittable(arrays):
    """The broadcast shape of `arrays` if a chunked evaluation applies to them (NumPy arrays
    and scalars only, at least two chunks of work), else None."""
    if not all(isinstance(a, (numpy.ndarray, numpy.generic, float, int)) for a in arrays):
        return None
    shape = numpy.broadcast_shapes(*(numpy.shape(a) for a in arrays))
    if len(shape) == 0 or shape[0] < 2 or numpy.prod(shape) < 2 * CHUNK:
        return None
    return shape


def chunked_elementwise(chain, arrays):
    """chain(*arrays), evaluated on slices of the leading axis of at most ~CHUNK elements
    each, on `blas_threads()` threads; the same numbers as chain(*arrays).

    `chain` must be elementwise with NumPy broadcasting (each output element depends on the
    matching input elements only) and return an array or a tuple of arrays of the broadcast
    shape. Arrays of the full rank and leading length are sliced; the others (lower rank, or
    leading length 1, or scalars) broadcast unchanged. Inputs that all share one shape are
    first flattened, so chunks are contiguous runs of elements. Anything else than NumPy
    arrays (autograd boxes, CuPy arrays) and small inputs go to `chain` directly."""
    shape = _splittable(arrays)
    if shape is None:
        return chain(*arrays)
    if all(numpy.shape(a) == shape for a in arrays):
        arrays = [a.reshape(-1) for a in arrays]
    full = numpy.broadcast_shapes(*(numpy.shape(a) for a in arrays))
    sliced = [numpy.ndim(a) == len(full) and numpy.shape(a)[0] == full[0] for a in arrays]
    rows = max(1, CHUNK // max(1, int(numpy.prod(full[1:]))))
    starts = range(0, full[0], rows)
    outputs, as_tuple = [], []

    def run(index):
        part = slice(starts[index], starts[index] + rows)
        result = chain(*(a[part] if cut else a for a, cut in zip(arrays, sliced)))
        results = result if isinstance(result, tuple) else (result,)
        if not outputs:  # the first chunk (run alone, below) fixes the outputs' dtypes
            outputs.extend(numpy.empty(full, dtype=r.dtype) for r in results)
            as_tuple.append(isinstance(result, tuple))
        for output, r in zip(outputs, results):
            output[part] = r

    run(0)
    run_chunks(run, len(starts), first=1)
    outputs = tuple(output.reshape(shape) for output in outputs)
    return outputs if as_tuple[0] else outputs[0]


def run_chunks(task, count, first=0):
    """task(index) for every index in first..count−1, on `blas_threads()` threads (the caller's
    among them), each thread taking the next index left: a thread the OS leaves waiting (a busy
    machine) holds up at most the one chunk it has started."""
    taken, lock = itertools.count(first), threading.Lock()

    def work():
        while True:
            with lock:
                index = next(taken)
            if index >= count:
                return
            task(index)

    n_workers = min(blas_threads(), count - first) - 1
    futures = [_executor(n_workers).submit(work) for _ in range(n_workers)] if n_workers > 0 \
        else []
    work()
    for future in futures:
        if not future.cancel():  # cancelled: it never started, and all chunks are done
            future.result()
