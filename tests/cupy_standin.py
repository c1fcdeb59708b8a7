"""A strict, NumPy-backed stand-in for CuPy: refham's CuPy code path, run and checked on a CPU.

    from tests import cupy_standin
    cupy_standin.install()            # sys.modules["cupy"] (and cupyx, cupy.cuda…) = the stand-in
    set_backend("cupy")               # refham now runs its GPU code path on it

Device arrays (`ndarray`) wrap a NumPy array and keep CuPy's rules about the host/device line:
implicit conversion to NumPy and host arrays given to device functions raise CuPy's TypeErrors;
every device→host fetch is counted in `COUNTS` (`.get()`, `asnumpy`, `.tolist()`, and `float()`,
`int()`, `bool()`, `.item()`, `format()`, `operator.index()` of a device array); reductions
return 0-d device arrays. `ElementwiseKernel` runs only the kernels of refham.fast.kernels.CUDA,
as their plain definitions, recording first calls per dtype in `COMPILED` (CuPy compiles then).
`cuda.runtime`, `cuda.Device`, the TF32 switch and `cuda.nccl` (CuPy's signatures, reducing over
MPI on the memory behind the pointers) are there too.
What it proves and what it does not: docs/gpu.md.
Run as a script it is `refham` with the stand-in installed (for subprocess and mpiexec tests).
"""
import collections
import ctypes
import importlib
import os
import sys
import types

import numpy
import scipy.special

COUNTS = collections.Counter()      # kind of device→host fetch → how many
COMPILED = []                       # (kernel name, dtypes) in the order CuPy would compile them
SETTINGS = {"gpus": 1, "free": 8 << 30, "total": 16 << 30}   # what cuda.runtime reports
_STATE = {"device": 0, "tf32": False}

_IMPLICIT = ("Implicit conversion to a NumPy array is not allowed. Please use `.get()` to "
             "construct a NumPy array explicitly.")


def syncs():
    """All device→host fetches counted so far (transfers and scalar syncs)."""
    return sum(COUNTS.values())


def reset():
    COUNTS.clear()
    COMPILED.clear()


def _unsupported(value):
    return TypeError(f"Unsupported type {type(value)}")


def _device(value):
    """`value` with device arrays unwrapped, refusing host arrays (CuPy's rule for arguments)."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, numpy.ndarray):
        raise _unsupported(value)
    if isinstance(value, (list, tuple)):
        return type(value)(_device(v) for v in value)
    if isinstance(value, dict):
        return {k: _device(v) for k, v in value.items()}
    return value


def _host_or_device(value):
    """`value` unwrapped where host data is allowed (uploads, index arrays), copying host arrays."""
    if isinstance(value, ndarray):
        return value._a
    if isinstance(value, (list, tuple)):
        return type(value)(_host_or_device(v) for v in value)
    return value


def _wrap(value):
    """NumPy results as device arrays (host scalars of reductions become 0-d arrays, as on CuPy)."""
    if isinstance(value, numpy.ndarray):
        return ndarray(value)
    if isinstance(value, numpy.generic):
        return ndarray(numpy.asarray(value))
    if isinstance(value, tuple):
        return tuple(_wrap(v) for v in value)
    if isinstance(value, list):
        return [_wrap(v) for v in value]
    return value


class ndarray:
    """A device array: a NumPy array that may leave the device only explicitly (and counted)."""
    __array_priority__ = 1000
    __hash__ = None

    def __init__(self, host):
        self._a = host

    # the host/device line
    def __array__(self, dtype=None, copy=None):
        raise TypeError(_IMPLICIT)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        return _wrap(getattr(ufunc, method)(*_device(inputs), **_device(kwargs)))

    def __array_function__(self, func, types_, args, kwargs):
        return _wrap(func(*_device(args), **_device(kwargs)))

    def get(self, stream=None, order="C", out=None):
        COUNTS["get"] += 1
        return numpy.array(self._a, order=order)

    def tolist(self):
        COUNTS["tolist"] += 1
        return self._a.tolist()

    def item(self):
        COUNTS["item"] += 1
        return self._a.item()

    def _scalar(self, kind, convert):
        COUNTS[kind] += 1
        return convert(self._a)

    def __float__(self):
        return self._scalar("float", float)

    def __int__(self):
        return self._scalar("int", int)

    def __bool__(self):
        return self._scalar("bool", bool)

    def __index__(self):
        return self._scalar("index", lambda a: a.__index__())

    def __format__(self, spec):
        return self._scalar("format", lambda a: format(a.item() if a.ndim == 0 else a, spec))

    def __repr__(self):
        return f"standin.{self._a!r}"

    @property
    def data(self):
        return types.SimpleNamespace(ptr=self._a.ctypes.data)

    # structure
    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (ndarray(row) if isinstance(row, numpy.ndarray) else _wrap(row)
                for row in self._a)

    def __getitem__(self, key):
        return _wrap(self._a[_host_or_device(key)])

    def __setitem__(self, key, value):
        self._a[_host_or_device(key)] = _host_or_device(value)

    def __getattr__(self, name):
        if name == "_a" or name.startswith("__"):   # no __array_interface__ & co: the data
            raise AttributeError(name)                # leaves only through get(); _a unset:
                                                      # copy/pickle, no recursion
        value = getattr(self._a, name)
        if callable(value):
            return lambda *args, **kwargs: _wrap(value(*_device(args), **_device(kwargs)))
        return _wrap(value)


def _operator(name, in_place=False):
    def op(self, *others):
        result = getattr(self._a, name)(*_device(others))
        if result is NotImplemented:
            return result
        return self if in_place else _wrap(result)
    op.__name__ = name
    return op


for _name in ("add sub mul truediv floordiv mod pow matmul and or xor lshift rshift lt le eq ne "
              "gt ge neg pos abs invert").split():
    setattr(ndarray, f"__{_name}__", _operator(f"__{_name}__"))
for _name in "add sub mul truediv floordiv mod pow matmul and or xor".split():
    setattr(ndarray, f"__r{_name}__", _operator(f"__r{_name}__"))
    setattr(ndarray, f"__i{_name}__", _operator(f"__i{_name}__", in_place=True))


# ----------------------------------------------------------------------------- functions
_UPLOADS = ("asarray", "array", "asanyarray", "ascontiguousarray")


def _device_function(fn, name):
    if name in _UPLOADS:
        def upload(data, *args, **kwargs):
            if isinstance(data, ndarray):
                return _wrap(numpy.asarray(data._a, *args, **kwargs))
            host = numpy.array(_host_or_device(data), *args, **kwargs)  # a copy: device memory
            return ndarray(host)
        return upload

    def call(*args, **kwargs):
        return _wrap(fn(*_device(args), **_device(kwargs)))
    call.__name__ = name
    return call


class _Namespace(types.ModuleType):
    """A module forwarding to a NumPy namespace, its functions made device functions."""

    def __init__(self, name, source, **own):
        super().__init__(name)
        self._source = source
        self.__dict__.update(own)

    def __getattr__(self, attr):
        value = getattr(self._source, attr)
        if isinstance(value, types.ModuleType):
            value = _Namespace(f"{self.__name__}.{attr}", value)
        elif callable(value) and not isinstance(value, type):
            value = _device_function(value, attr)
        setattr(self, attr, value)
        return value


def asnumpy(a, stream=None, order="C", out=None):
    if isinstance(a, ndarray):
        COUNTS["asnumpy"] += 1
        return numpy.array(a._a, order=order)
    return numpy.asarray(a, order=order)


class ElementwiseKernel:
    """A fused kernel of refham.fast.kernels.CUDA, run as its plain definition (see the module)."""

    def __init__(self, in_params, out_params, operation, name="kernel", **options):
        from refham.fast.kernels import CUDA
        keys = [k for k, source in CUDA.items() if source == (in_params, out_params, operation)]
        if len(keys) != 1:
            raise ValueError(f"the CuPy stand-in runs only the kernels of refham.fast.kernels."
                             f"CUDA; {name!r} is not one of them")
        module, function = keys[0].rsplit(".", 1)
        self.plain = getattr(importlib.import_module(module), function).plain
        self.name, self.n_in = name, len(in_params.split(","))
        self.n_out = len(out_params.split(","))
        self._seen = set()

    def __call__(self, *args):
        if len(args) != self.n_in:
            raise TypeError(f"Wrong number of arguments for {self.name!r}: {self.n_in} expected, "
                            f"{len(args)} given")
        dtypes = set()
        for arg in args:
            if isinstance(arg, numpy.ndarray):
                raise _unsupported(arg)
            if isinstance(arg, (ndarray, numpy.generic)):
                dtypes.add(arg.dtype)
            elif not isinstance(arg, (int, float)):
                raise _unsupported(arg)
        if len(dtypes) != 1:
            raise TypeError(f"Type is mismatched. {self.name} T binds {sorted(map(str, dtypes))}")
        dtype = dtypes.pop()
        signature = (dtype, tuple(a.ndim for a in args if isinstance(a, ndarray)))
        if signature not in self._seen:
            self._seen.add(signature)
            COMPILED.append((self.name, str(dtype)))
        outputs = self.plain(*args)
        outputs = outputs if self.n_out > 1 else (outputs,)
        shape = numpy.broadcast_shapes(*(a.shape for a in args if isinstance(a, ndarray)))
        result = tuple(ndarray(numpy.broadcast_to(_device(o), shape).astype(dtype))
                       for o in outputs)
        return result if self.n_out > 1 else result[0]


# ------------------------------------------------------------------------------ cuda
class CUDARuntimeError(RuntimeError):
    pass


class Device:
    def __init__(self, device=None):
        self.id = _STATE["device"] if device is None else int(device)
        if not 0 <= self.id < SETTINGS["gpus"]:
            raise CUDARuntimeError("cudaErrorInvalidDevice: invalid device ordinal")

    def use(self):
        _STATE["device"] = self.id

    def synchronize(self):
        pass


# --------------------------------------------------------------------------- nccl (fake)
class NcclError(RuntimeError):
    pass


_NCCL_TYPES = {7: ctypes.c_float, 8: ctypes.c_double}   # ncclFloat32, ncclFloat64


class NcclCommunicator:
    """cupy.cuda.nccl.NcclCommunicator(ndev, commId, rank) with its typed arguments, reducing
    over MPI.COMM_WORLD on the memory behind the integer pointers."""

    def __init__(self, ndev, commId, rank):
        if not (isinstance(ndev, int) and isinstance(rank, int) and isinstance(commId, tuple)
                and len(commId) == 128):
            raise TypeError("NcclCommunicator(int ndev, tuple commId (128), int rank)")
        from mpi4py import MPI
        self.comm = MPI.COMM_WORLD
        if (self.comm.Get_size(), self.comm.Get_rank()) != (ndev, rank):
            raise NcclError("NCCL_ERROR_INVALID_ARGUMENT: rank/ndev differ from the job's")
        if len(set(self.comm.allgather(commId))) != 1:
            raise NcclError("NCCL_ERROR_INVALID_USAGE: ranks hold different unique ids")

    @staticmethod
    def _buffer(ptr, count, datatype):
        for value in (ptr, count, datatype):
            if not isinstance(value, int):
                raise TypeError(f"NCCL arguments are integers (pointers, counts, codes); got "
                                f"{type(value).__name__}")
        return numpy.ctypeslib.as_array((_NCCL_TYPES[datatype] * count).from_address(ptr))

    def allReduce(self, sendbuf, recvbuf, count, datatype, op, stream):
        from mpi4py import MPI
        if op != 0 or not isinstance(stream, int):
            raise NcclError("the stand-in reduces with ncclSum (0) on an integer stream")
        send = self._buffer(sendbuf, count, datatype)
        recv = self._buffer(recvbuf, count, datatype)
        if sendbuf == recvbuf:
            self.comm.Allreduce(MPI.IN_PLACE, recv, op=MPI.SUM)
        else:
            self.comm.Allreduce(send, recv, op=MPI.SUM)

    def broadcast(self, sendbuf, recvbuf, count, datatype, root, stream):
        if not (isinstance(root, int) and isinstance(stream, int)):
            raise TypeError("broadcast(..., int root, intptr_t stream)")
        recv = self._buffer(recvbuf, count, datatype)
        if self.comm.Get_rank() == root:
            recv[...] = self._buffer(sendbuf, count, datatype)
        self.comm.Bcast(recv, root=root)


# ------------------------------------------------------------------------------ install
def _module(name, **attributes):
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


def modules(nccl=True):
    """{module name: module} of the stand-in (`nccl=False`: CuPy without NCCL, as its wheels)."""
    runtime = _module("cupy.cuda.runtime", getDeviceCount=lambda: SETTINGS["gpus"],
                      memGetInfo=lambda: (SETTINGS["free"], SETTINGS["total"]),
                      deviceSynchronize=lambda: None, runtimeGetVersion=lambda: 13000,
                      CUDARuntimeError=CUDARuntimeError)
    nccl_module = _module("cupy.cuda.nccl", available=nccl)
    if nccl:
        nccl_module.__dict__.update(
            get_unique_id=lambda: tuple(int(b) for b in os.urandom(128)),
            NcclCommunicator=NcclCommunicator, NcclError=NcclError,
            NCCL_FLOAT32=7, NCCL_FLOAT64=8, NCCL_SUM=0)
    cuda = _module("cupy.cuda", runtime=runtime, nccl=nccl_module, Device=Device,
                   get_current_stream=lambda: types.SimpleNamespace(ptr=0,
                                                                    synchronize=lambda: None))
    linalg = _module(   # the TF32 switch
        "cupy._core._routines_linalg", COMPUTE_TYPE_DEFAULT=1, COMPUTE_TYPE_TF32=7,
        set_compute_type=lambda dtype, kind: _STATE.__setitem__("tf32", kind == 7),
        get_compute_type=lambda dtype: 7 if _STATE["tf32"] else 1)
    core = _module("cupy._core", _routines_linalg=linalg)
    no_pool = types.SimpleNamespace(free_all_blocks=lambda: None, used_bytes=lambda: 0,
                                    total_bytes=lambda: 0)   # NumPy allocates
    cupy = _Namespace("cupy", numpy, ndarray=ndarray, asnumpy=asnumpy,
                      ElementwiseKernel=ElementwiseKernel, __version__="14.2.0-standin",
                      get_default_memory_pool=lambda: no_pool, cuda=cuda, _core=core)
    special = _module("cupyx.scipy.special", erf=_device_function(scipy.special.erf, "erf"))
    cupyx_scipy = _module("cupyx.scipy", special=special)
    cupyx = _module("cupyx", scipy=cupyx_scipy)
    return {"cupy": cupy, "cupy.cuda": cuda, "cupy.cuda.runtime": runtime,
            "cupy.cuda.nccl": nccl_module, "cupy._core": core,
            "cupy._core._routines_linalg": linalg, "cupyx": cupyx, "cupyx.scipy": cupyx_scipy,
            "cupyx.scipy.special": special}


def install(nccl=None):
    """Put the stand-in into sys.modules under CuPy's names (replacing any real CuPy); without
    NCCL where `nccl` is False or, by default, REFHAM_STANDIN_NCCL=0 (a CuPy wheel alone);
    REFHAM_STANDIN_GPUS GPUs (default 1)."""
    if nccl is None:
        nccl = os.environ.get("REFHAM_STANDIN_NCCL", "1") == "1"
    SETTINGS["gpus"] = int(os.environ.get("REFHAM_STANDIN_GPUS", "1"))
    sys.modules.update(modules(nccl))


def main(argv=None):
    """`refham` with the stand-in installed, the backend switched by REFHAM_BACKEND as usual."""
    install()
    from refham.cli import main as refham_main
    return refham_main(argv)


if __name__ == "__main__":
    sys.exit(main())
