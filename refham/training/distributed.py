"""Data parallelism the ChainerMN way: SPMD under `mpiexec`, one communicator object per process.

    comm = get_communicator("auto", backend="numpy")   # SingleProcess, or MPI/NCCL under mpiexec
    rows = shard(len(labels), comm)                     # this rank's slice of the global batch
    grads, (loss, correct) = combine_gradients(comm, grads, n_local, n_global, (loss, correct))

Every rank draws the randomness of the WHOLE global batch exactly as one process does and keeps
its rows (`ShardedGenerator`), so the numbers do not depend on the number of ranks N. Rank r
computes ∇_r, the gradient of the mean loss over its n_r samples; one allreduce of one flat
buffer gives the gradient of the global mean,

    ∇ = Σ_r (n_r / n) ∇_r,      n = Σ_r n_r,

which is exact for uneven (last, partial) batches too. A term of the objective that does not
depend on the batch (the λ penalty) is in every rank's J_r and counted once, as Σ_r n_r/n = 1;
weight decay acts in the optimiser, after the reduce, on every rank alike.

Communicators (rank, size, local_rank, allreduce_mean_, bcast_, sum, allgather, any_of,
send_stop, stop_received, abort):
`SingleProcess` (never imports mpi4py), `MPICommunicator` (mpi4py; CuPy buffers staged through
the host) and `NCCLCommunicator` (cupy.cuda.nccl on device buffers, its unique id broadcast over
MPI, one GPU per rank: device = local rank). How a job of several ranks ends when one of
them fails is refham.training.launch's part.
"""
import hashlib
import os
import sys
import time

import numpy

from refham.errors import RefhamError
from refham.backend import asarray, to_numpy, xp

COMMS = ("auto", "none", "mpi", "nccl")
# what launchers (MPICH/Hydra and Slurm's PMI, Open MPI, MVAPICH) set in every rank's environment
_LAUNCHER_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
_LAUNCHER_RANK = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "MV2_COMM_WORLD_RANK")
POLL_SECONDS = 0.02        # how often a waiting rank looks whether the others have arrived
STOP_TAG = 1               # the tag of send_stop's messages (on MPICommunicator.ending)
FORWARD_SECONDS = 0.5      # what mpiexec needs to forward a rank's last lines before an abort
_MPI_HINT = 'pip install "refham[mpi]" (mpi4py and MPICH; on a cluster: pip install mpi4py ' \
            'against the site\'s MPI)'


class CommError(RefhamError, ValueError):
    """A data-parallel setting that cannot work here (missing mpi4py, NCCL without CuPy, ...)."""


def _launcher_value(names, least):
    """The first of the launcher variables `names` that is set, as an int ≥ `least`; None if
    none is; CommError for a value that is not such an int (a launcher never sets one)."""
    for name in names:
        if name in os.environ:
            text = os.environ[name]
            if not (text.strip().isdigit() and least <= int(text) < 1 << 24):
                raise CommError(f"the launcher variable {name}={text[:40]!r} is not a number of "
                                f"ranks or a rank: unset it, or start refham with mpiexec/srun")
            return int(text)
    return None


def launched_size():
    """How many ranks the launcher (mpiexec, srun) started, from the environment: 1 outside one.
    Read before importing mpi4py, so that a single-process run never loads MPI."""
    return _launcher_value(_LAUNCHER_SIZE, 1) or 1


def launched_rank():
    """This process's rank according to the launcher's environment (0 outside one)."""
    return _launcher_value(_LAUNCHER_RANK, 0) or 0


# --------------------------------------------------------------------------- communicators
class SingleProcess:
    """The communicator of one process: every collective is the identity."""
    rank, size, local_rank = 0, 1, 0

    def allreduce_mean_(self, flat):
        """flat ← mean over ranks of flat (in place); here: flat."""
        return flat

    def bcast_(self, flat, root=0):
        """flat ← rank `root`'s flat (in place); here: flat."""
        return flat

    def sum(self, values):
        """Σ_r values_r of a few host scalars → float64 NumPy array."""
        return numpy.asarray(values, dtype=numpy.float64)

    def allgather(self, obj):
        """[obj_0, …, obj_{N−1}]: one small picklable object from every rank."""
        return [obj]

    def any_of(self, flag):
        """True if `flag` is true on any rank; waits for every rank without spinning."""
        return bool(flag)

    def send_stop(self, name):
        """Tell every other rank, which may be busy with work of its own, that signal `name`
        stopped this one (they look with `stop_received`)."""

    def stop_received(self):
        """The name of the signal another rank said stopped it (`send_stop`), or None."""
        return None

    def abort(self, code=1):
        """End every rank of the job with exit status `code`."""
        sys.exit(code)


class MPICommunicator:
    """MPI through mpi4py on COMM_WORLD. NumPy buffers are reduced in place; CuPy buffers are
    copied to the host, reduced there and copied back (for MPIs that are not CUDA-aware)."""

    def __init__(self, mpi):
        self.mpi, self.comm = mpi, mpi.COMM_WORLD
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        node = self.comm.Split_type(mpi.COMM_TYPE_SHARED)
        self.local_rank = node.Get_rank()
        node.Free()
        # where ranks agree how the job ends (refham.training.launch): a communicator of its
        # own, so that a rank waiting there never meets another rank's training collectives
        self.ending = self.comm.Dup()

    def allreduce_mean_(self, flat):
        host = to_numpy(flat)
        self.comm.Allreduce(self.mpi.IN_PLACE, host, op=self.mpi.SUM)
        if host is not flat:  # a device buffer: bring the sum back
            flat[...] = asarray(host, dtype=flat.dtype)
        flat /= self.size
        return flat

    def bcast_(self, flat, root=0):
        host = numpy.ascontiguousarray(to_numpy(flat))
        self.comm.Bcast(host, root=root)
        if host is not flat:
            flat[...] = asarray(host, dtype=flat.dtype)
        return flat

    def sum(self, values):
        values = numpy.asarray(values, dtype=numpy.float64)
        self.comm.Allreduce(self.mpi.IN_PLACE, values, op=self.mpi.SUM)
        return values

    def allgather(self, obj):
        return self.comm.allgather(obj)

    def any_of(self, flag):
        result = numpy.zeros(1, dtype=numpy.int32)
        wait(self.comm.Iallreduce(numpy.array([int(bool(flag))], dtype=numpy.int32), result,
                                  op=self.mpi.MAX))
        return bool(result[0])

    def send_stop(self, name):
        sent = [self.ending.isend(name, dest=rank, tag=STOP_TAG)
                for rank in range(self.size) if rank != self.rank]
        for request in sent:
            wait(request)

    def stop_received(self):
        if not self.ending.iprobe(source=self.mpi.ANY_SOURCE, tag=STOP_TAG):
            return None
        return self.ending.recv(source=self.mpi.ANY_SOURCE, tag=STOP_TAG)

    def abort(self, code=1):
        for stream in (sys.stdout, sys.stderr, sys.__stderr__):
            stream.flush()
        time.sleep(FORWARD_SECONDS)   # mpiexec forwards the last lines before it kills the job
        self.comm.Abort(code)


def wait(request, deadline=None):
    """Wait for the MPI `request` without spinning a core (MPI's own waits busy-poll), and
    letting signal handlers run in between. → True when it completed, False at `deadline`
    (a time.monotonic() value; None: none)."""
    while not request.Test():
        if deadline is not None and time.monotonic() > deadline:
            return False
        time.sleep(POLL_SECONDS)
    return True


class NCCLCommunicator(MPICommunicator):
    """NCCL (cupy.cuda.nccl) for device buffers, one GPU per rank; MPI for the rest (host
    scalars, objects, the NCCL unique id). No host copies in allreduce_mean_ and bcast_."""

    def __init__(self, mpi):
        super().__init__(mpi)
        from cupy.cuda import nccl
        self.nccl = nccl
        # every rank learns whether any lacks NCCL before the first NCCL call: all stop together
        missing = self.comm.allgather(None if getattr(nccl, "available", True) else self.rank)
        if any(rank is not None for rank in missing):
            raise CommError(f"--comm nccl: CuPy finds no NCCL library on rank(s) "
                            f"{', '.join(str(r) for r in missing if r is not None)}; install it "
                            f"with: pip install {_nccl_wheel()} (or use --comm mpi)")
        uid = self.comm.bcast(nccl.get_unique_id() if self.rank == 0 else None, root=0)
        try:
            self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        except nccl.NcclError as exc:
            raise CommError(f"NCCL could not start ({exc}): it needs a GPU of its own per rank; "
                            f"with fewer GPUs than ranks use --comm mpi") from exc

    def _call(self, op, flat, *args):
        import cupy
        kind = {numpy.dtype(numpy.float32): self.nccl.NCCL_FLOAT32,
                numpy.dtype(numpy.float64): self.nccl.NCCL_FLOAT64}[numpy.dtype(flat.dtype)]
        op(flat.data.ptr, flat.data.ptr, flat.size, kind, *args,
           cupy.cuda.get_current_stream().ptr)

    def allreduce_mean_(self, flat):
        self._call(self.nccl_comm.allReduce, flat, self.nccl.NCCL_SUM)
        flat /= self.size
        return flat

    def bcast_(self, flat, root=0):
        self._call(self.nccl_comm.broadcast, flat, root)
        return flat


def _nccl_wheel():
    """The NCCL wheel for this CuPy's CUDA major version (CuPy's wheels ship no NCCL)."""
    import cupy
    try:
        major = cupy.cuda.runtime.runtimeGetVersion() // 1000
    except Exception:   # a broken runtime: name the common one
        major = 12
    return f"nvidia-nccl-cu{major}"


# --------------------------------------------------------------------------- choosing one
_WORLD = {}   # kind → communicator: MPI is initialised once per process


def get_communicator(kind="auto", backend="numpy"):
    """The communicator for `kind` (COMMS). auto: MPI when the launcher started more than one
    rank (NCCL for the gradients when `backend` is cupy), else SingleProcess. With CuPy, each
    rank then uses the GPU of its local rank. Raises CommError if that cannot work here."""
    if kind not in COMMS:
        raise CommError(f"unknown comm {kind!r}: choose one of {', '.join(COMMS)}")
    if kind == "auto":
        kind = "none" if launched_size() == 1 else "nccl" if backend == "cupy" else "mpi"
    if kind == "none":
        return _WORLD.setdefault("none", SingleProcess())
    if kind == "nccl" and backend != "cupy":
        raise CommError("--comm nccl reduces GPU buffers: it needs --backend cupy (on CPUs use "
                        "--comm mpi)")
    if kind not in _WORLD:
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise CommError(f"--comm {kind} needs mpi4py: {_MPI_HINT}") from exc
        world = MPICommunicator(MPI)
        if backend == "cupy":
            _use_local_gpu(world)
        _WORLD[kind] = world if kind == "mpi" else NCCLCommunicator(MPI)
    return _WORLD[kind]


def started_world():
    """The MPI communicator this process started: None before MPI starts, or without MPI
    (`SingleProcess` where --comm none ruled MPI out)."""
    return _WORLD.get("mpi") or _WORLD.get("nccl") or _WORLD.get("none")


def _use_local_gpu(world):
    """Make GPU (local rank mod visible GPUs) current: GPU i for local rank i, or the one GPU
    a launcher that binds a GPU per rank (srun --gpus-per-task=1) leaves visible."""
    import cupy
    cupy.cuda.Device(world.local_rank % cupy.cuda.runtime.getDeviceCount()).use()


# --------------------------------------------------------------------------- data parallel
def shard(n, comm):
    """Rank r's rows of n samples: slice(⌊r·n/N⌋, ⌊(r+1)·n/N⌋) (sizes differ by at most 1)."""
    return slice(comm.rank * n // comm.size, (comm.rank + 1) * n // comm.size)


class ShardedGenerator(numpy.random.Generator):
    """A NumPy Generator (sharing `gen`'s bit generator, so its stream) whose draws are made for
    the whole global batch and cut to this rank's `rows`: a draw of size (n_r, …) takes
    (n, …) values from the stream exactly as one process would and returns rows [rows]. Every
    draw the training step makes (crop offsets, flips, noise, drop-path masks) has the batch as
    its first axis."""

    def __init__(self, gen, n, rows):
        super().__init__(gen.bit_generator)
        self.n, self.rows = n, rows

    def _global(self, size):
        size = (size,) if numpy.ndim(size) == 0 else tuple(size)
        if size[0] != self.rows.stop - self.rows.start:
            raise ValueError(f"ShardedGenerator draws per sample of the batch: size {size} does "
                             f"not start with this rank's {self.rows.stop - self.rows.start} rows")
        return (self.n,) + size[1:]

    def random(self, size=None, dtype=numpy.float64, out=None):
        return super().random(self._global(size), dtype)[self.rows]

    def integers(self, low, high=None, size=None, dtype=numpy.int64, endpoint=False):
        return super().integers(low, high, self._global(size), dtype, endpoint)[self.rows]

    def standard_normal(self, size=None, dtype=numpy.float64, out=None):
        return super().standard_normal(self._global(size), dtype)[self.rows]


def _flatten(arrays):
    """One contiguous 1-D buffer holding `arrays` (same dtype, active backend) in order."""
    return xp.concatenate([a.reshape(-1) for a in arrays])


def _unflatten(flat, like):
    """{name: view of `flat` shaped like like[name]}, in like's order (inverse of _flatten)."""
    out, start = {}, 0
    for name, a in like.items():
        out[name] = flat[start:start + a.size].reshape(a.shape)
        start += a.size
    return out


def combine_gradients(comm, grads, n_local, n_global, sums=()):
    """∇ = Σ_r (n_r/n) ∇_r and Σ_r s_r for each scalar s of `sums` (host numbers or 0-d arrays
    of the backend), through ONE allreduce of one flat buffer. `grads` holds ∇_r, the gradient
    of this rank's mean loss over its n_local samples (any values if n_local = 0). → (grads
    dict, float64 array of the sums on the device: no host transfer). For one process callers
    skip it: it would only round their numbers."""
    dtype = next(iter(grads.values())).dtype
    tail = (xp.stack([xp.asarray(s, dtype=xp.float64) for s in sums]) * comm.size).astype(dtype) \
        if len(sums) else xp.zeros(0, dtype=dtype)
    flat = _flatten(list(grads.values()) + [tail])
    weight = comm.size * n_local / n_global    # 1 for even shards: the mean is the answer
    if weight != 1:
        flat[:flat.size - tail.size] *= weight
    comm.allreduce_mean_(flat)
    combined = _unflatten(flat, grads)
    return combined, flat[flat.size - tail.size:].astype(xp.float64)


def broadcast_state(comm, *states):
    """Every dict of `states` with rank 0's arrays (non-array entries are kept), verified: the
    ranks' SHA-256 over the broadcast buffer must agree. → the dicts, in order."""
    arrays = {(i, k): v for i, s in enumerate(states) for k, v in s.items()
              if hasattr(v, "shape")}
    flat = comm.bcast_(_flatten(list(arrays.values())))
    digest = hashlib.sha256(to_numpy(flat).tobytes()).hexdigest()
    if len(set(comm.allgather(digest))) != 1:
        raise RuntimeError("ranks hold different parameters after the broadcast from rank 0")
    copies = {key: a.copy() for key, a in _unflatten(flat, arrays).items()}
    return tuple({k: copies.get((i, k), v) for k, v in s.items()} for i, s in enumerate(states))
