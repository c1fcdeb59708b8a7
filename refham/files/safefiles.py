"""Reading untrusted files without letting them decide how much memory refham allocates.

Every size a file declares (an .npy header's shape × itemsize, a zip member's uncompressed size,
a gzip stream's length, a safetensors header's offsets) is checked against the file's real size
and against the memory budget (refham.files.memory) BEFORE anything of that size is allocated:

    read_npz(path, error=CheckpointError)     # {name: array}; `error` for anything wrong
    check_compression(packed, unpacked, where, error)
    check_safetensors_header(path, error)     # {name: (dtype, shape)} of a safetensors file

A compressed member may expand at most MAX_RATIO times: refham writes uncompressed .npz files,
real image data compresses 2-10×, and a zip or gzip bomb (1 MB → GBs) expands ~1000×.
"""
import json
import math
import os
import struct
import zipfile
import zlib

import numpy

from refham.files.memory import budget, describe
from refham.errors import short_list

MAX_RATIO = 200           # largest accepted uncompressed / compressed size of one member
SLACK = 1 << 20           # members this small are never refused for their ratio
MAX_HEADER_BYTES = 1 << 20  # an .npy or safetensors header larger than this is not refham's


def check_compression(packed, unpacked, where, error):
    """Raise `error` when `unpacked` bytes from `packed` compressed ones exceed MAX_RATIO."""
    if unpacked > SLACK and unpacked > MAX_RATIO * max(packed, 1):
        raise error(f"{where}: {describe(packed)} claims to expand to {describe(unpacked)} "
                    f"({unpacked / max(packed, 1):.0f}×, more than the {MAX_RATIO}× real data "
                    f"reaches); refused as a decompression bomb")


def check_fits(nbytes, where, error):
    """Raise `error` when a file's declared `nbytes` exceed the memory budget."""
    allowed, source = budget()
    if allowed is not None and nbytes > allowed:
        raise error(f"{where} declares {describe(nbytes)} of data, more than the "
                    f"{describe(allowed)} {source}")


def _npy_header(stream, where, error):
    """(shape, dtype, header bytes) of the .npy stream's header, read without its data."""
    version = numpy.lib.format.read_magic(stream)
    reader = {(1, 0): numpy.lib.format.read_array_header_1_0,
              (2, 0): numpy.lib.format.read_array_header_2_0}.get(version)
    if reader is None:
        raise error(f"{where}: .npy format version {version} is not supported (1.0 or 2.0)")
    shape, _, dtype = reader(stream, max_header_size=MAX_HEADER_BYTES)
    if dtype.hasobject:
        raise error(f"{where} is not an .npz of plain arrays: it holds Python objects "
                    f"(refused: refham never unpickles)")
    return shape, dtype, stream.tell()


def read_npz(path, error):
    """{name: array} of every member of the .npz at `path`, each member's declared size checked
    against its real size, MAX_RATIO and the memory budget before it is read; CRCs verified.
    `error` (an exception class) for a missing, truncated, corrupted, hostile or non-.npz file."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise error(f"no file at {path}")
    with open(path, "rb") as f:
        if f.read(6) == numpy.lib.format.MAGIC_PREFIX:
            raise error(f"{path} holds a single .npy array, not an .npz archive")
    # what a damaged zip can raise; zipfile raises NotImplementedError for an unknown compression
    unreadable = (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError,
                  NotImplementedError, zlib.error, struct.error, RuntimeError)
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
            names = [m.filename for m in members]
            strange = [n for n in names if not n.endswith(".npy")]
            if strange or len(set(names)) != len(names):
                raise error(f"{path} is not an .npz of arrays: members "
                            f"{short_list(strange) or 'named twice'}")
            for member in members:
                check_compression(member.compress_size, member.file_size,
                                  f"{path}: member {member.filename}", error)
            check_fits(sum(m.file_size for m in members), path, error)
            return {m.filename[:-len(".npy")]: _read_member(archive, m, path, error)
                    for m in members}
    except error:
        raise
    except unreadable as exc:
        raise error(f"{path} is truncated, corrupted or not an .npz of plain arrays: "
                    f"{type(exc).__name__}: {exc}") from exc


def _read_member(archive, member, path, error):
    """One member's array, after its header's shape × itemsize matched the member's size."""
    where = f"{path}: member {member.filename}"
    with archive.open(member) as stream:
        shape, dtype, header = _npy_header(stream, where, error)
        declared = math.prod(shape) * dtype.itemsize
        if header + declared != member.file_size:
            raise error(f"{where}: its header declares shape {shape} of {dtype} = "
                        f"{describe(declared)}, but the member holds "
                        f"{describe(member.file_size - header)} of data")
    with archive.open(member) as stream:
        array = numpy.lib.format.read_array(stream, allow_pickle=False,
                                            max_header_size=MAX_HEADER_BYTES)
        stream.read(1)  # reaching the end makes zipfile verify the member's CRC
    return array


SAFETENSORS_DTYPES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2,
                      "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "C64": 8, "I64": 8,
                      "U64": 8, "F64": 8}


def check_safetensors_header(path, error):
    """{name: (dtype code, shape)} from the header of the safetensors file at `path`, after
    checking its length, JSON, dtypes, shapes and that each tensor's byte range lies inside
    the file and matches shape × itemsize; `error` otherwise."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        prefix = f.read(8)
        length = struct.unpack("<Q", prefix)[0] if len(prefix) == 8 else -1
        if not 0 < length <= min(MAX_HEADER_BYTES, size - 8):
            raise error(f"{path}: not a safetensors file (header length {length} for a file of "
                        f"{size} bytes)")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise error(f"{path}: the safetensors header is not valid JSON ({exc})") from exc
    if not isinstance(header, dict):
        raise error(f"{path}: the safetensors header is not a JSON object")
    tensors, data_bytes = {}, size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, offsets = (entry.get(k) if isinstance(entry, dict) else None
                                 for k in ("dtype", "shape", "data_offsets"))
        valid = (dtype in SAFETENSORS_DTYPES and isinstance(shape, list)
                 and all(isinstance(d, int) and d >= 0 for d in shape)
                 and isinstance(offsets, list) and len(offsets) == 2
                 and all(isinstance(o, int) for o in offsets)
                 and 0 <= offsets[0] <= offsets[1] <= data_bytes)
        if not valid or offsets[1] - offsets[0] != math.prod(shape) * SAFETENSORS_DTYPES[dtype]:
            raise error(f"{path}: tensor {name!r} has an invalid or inconsistent header entry "
                        f"(dtype, shape and byte range must agree and lie inside the file)")
        tensors[name] = (dtype, tuple(shape))
    check_fits(data_bytes, path, error)
    return tensors
