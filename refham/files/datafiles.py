"""Readers of the on-disk dataset formats: the official CIFAR archives and MNIST's IDX files.

CIFAR-10 and CIFAR-100 come as the python version (pickles, loaded only through
`restricted_unpickle`, which admits plain arrays and nothing that could run code) or the binary
version, either as the .tar.gz archive (read in memory, never extracted) or its extracted folder;
`read_cifar` returns the raw uint8 pixels and labels, which refham.training.data wraps into `Dataset`s.
MNIST-format IDX files (:ref:`sec-metaformer`), plain or gzip, are read by `load_idx` and
`load_mnist`. Every malformed, hostile or mismatched file raises `DataError` naming the file and
the problem. Every size a file declares is checked against its real size,
refham.files.safefiles.MAX_RATIO and the memory budget before it is read. This module imports only
refham.files.safefiles: refham.training.data builds on it, never the reverse.
"""
import gzip
import hashlib
import io
import math
import os
import pickle
import struct
import tarfile
import zlib
from dataclasses import dataclass

import numpy

from refham.errors import RefhamError
from refham.files.safefiles import check_compression, check_fits


class DataError(RefhamError, ValueError):
    """A dataset file or argument is missing, malformed, hostile or inconsistent."""


# ----------------------------------------------------------------------------------- CIFAR
@dataclass(frozen=True)
class _CifarLayout:
    """Where one official CIFAR variant keeps its files, and how its records are laid out."""
    archive: str        # the official archive's name
    md5: str            # its published checksum
    folder: str         # the folder it extracts to
    train_files: tuple
    test_files: tuple
    label_key: str      # python version: the pickle's label entry
    label_bytes: int    # binary version: label bytes before each record's 3,072 pixels (0: python)
    num_classes: int

    def paths(self):
        """Every batch file as 'folder/name', as the archive stores it."""
        return [f"{self.folder}/{name}" for name in self.train_files + self.test_files]


_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
_LAYOUTS = (
    _CifarLayout("cifar-10-python.tar.gz", "c58f30108f718f92721af3b95e74349a",
                 "cifar-10-batches-py", _BATCHES, ("test_batch",), "labels", 0, 10),
    _CifarLayout("cifar-100-python.tar.gz", "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python",
                 ("train",), ("test",), "fine_labels", 0, 100),
    _CifarLayout("cifar-10-binary.tar.gz", "c32a1d4ab5d03f1284b67883e8d87530",
                 "cifar-10-batches-bin", tuple(f + ".bin" for f in _BATCHES), ("test_batch.bin",),
                 "", 1, 10),
    _CifarLayout("cifar-100-binary.tar.gz", "03b5dce01913d631647c71ecec9e9cb8", "cifar-100-binary",
                 ("train.bin",), ("test.bin",), "", 2, 100),
)
_CIFAR_PIXELS = 3 * 32 * 32
_MAX_MEMBER_BYTES = 256 << 20  # the largest official member (CIFAR-100 train) is ~155 MB


def read_cifar(path, num_classes=10, verify_md5=False):
    """CIFAR-10/100 ((train pixels, labels), (test pixels, labels)) from the official python or
    binary archive (.tar.gz, read in memory, never extracted), its extracted folder, or a folder
    holding the archive: pixels uint8 (N, 3, 32, 32), labels int64 (N,) in [0, num_classes) —
    CIFAR-100's fine labels. `verify_md5` checks the archive against the published checksum
    before reading it."""
    if num_classes not in (10, 100):
        raise DataError(f"CIFAR has 10 or 100 classes, got num_classes={num_classes!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder; pass the CIFAR archive or its folder")
    layout, files = (_read_cifar_archive if os.path.isfile(path) else _read_cifar_folder)(
        path, num_classes, verify_md5)
    splits = []
    for members in (layout.train_files, layout.test_files):
        parts = [_parse_cifar_file(files[f"{layout.folder}/{m}"], layout, f"{path}: {m}")
                 for m in members]
        pixels = numpy.concatenate([p for p, _ in parts]).reshape(-1, 3, 32, 32)
        labels = numpy.concatenate([lab for _, lab in parts]).astype(numpy.int64)
        if labels.size and labels.max() >= num_classes:
            raise DataError(f"{path}: label {labels.max()} out of range for {num_classes} classes")
        splits.append((pixels, labels))
    return tuple(splits)


def _choose_layout(available, num_classes, where):
    """The layout whose files are all in `available`, checked against the requested classes."""
    complete = [lay for lay in _LAYOUTS if set(lay.paths()) <= available]
    wanted = [lay for lay in complete if lay.num_classes == num_classes]
    if wanted:
        return wanted[0]
    if complete:
        raise DataError(f"{where} holds CIFAR-{complete[0].num_classes}, not CIFAR-{num_classes}: "
                        f"use the cifar{complete[0].num_classes} dataset")
    expected = "; ".join(f"{lay.archive}: {', '.join(lay.paths())}" for lay in _LAYOUTS
                         if lay.num_classes == num_classes)
    raise DataError(f"{where} is not a complete CIFAR-{num_classes} archive or folder; expected "
                    f"the files of one of {expected}")


def _read_cifar_archive(path, num_classes, verify_md5):
    """One pass over the tar members, keeping the regular files that some layout names."""
    wanted = {p for lay in _LAYOUTS for p in lay.paths()}
    files, archive_bytes, total = {}, os.path.getsize(path), 0
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name not in wanted or not member.isfile():
                    continue
                if member.size > _MAX_MEMBER_BYTES:
                    raise DataError(f"{path}: member {name} claims {member.size} bytes, more "
                                    f"than any official CIFAR file")
                total += member.size
                check_compression(archive_bytes, total, path, DataError)
                files[name] = tar.extractfile(member).read()
    except (tarfile.TarError, OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: not a readable tar archive ({exc}); pass the official "
                        f"cifar-*.tar.gz or its extracted folder") from exc
    layout = _choose_layout(set(files), num_classes, path)
    if verify_md5:
        _verify_md5(path, layout)
    return layout, files


def _read_cifar_folder(path, num_classes, verify_md5):
    """`path` is a layout's folder, its parent, or (failing both) a folder holding an archive."""
    found = {}  # layout path -> file on disk, for every complete layout here
    for layout in _LAYOUTS:
        for base in (os.path.join(path, layout.folder), path):
            local = {p: os.path.join(base, os.path.basename(p)) for p in layout.paths()}
            if all(map(os.path.isfile, local.values())):
                found.update(local)
    archives = [os.path.join(path, lay.archive) for lay in _LAYOUTS
                if lay.num_classes == num_classes]
    if not found and any(map(os.path.isfile, archives)):
        return _read_cifar_archive(next(filter(os.path.isfile, archives)), num_classes, verify_md5)
    layout = _choose_layout(set(found), num_classes, path)
    if verify_md5:
        raise DataError(f"{path} is an extracted folder: the published MD5 covers only the "
                        f".tar.gz archive; pass the archive to verify it")
    return layout, {p: _read_bytes(found[p]) for p in layout.paths()}


def _read_bytes(path):
    """The whole file as bytes, after checking it is no larger than any official CIFAR file."""
    size = os.path.getsize(path)
    if size > _MAX_MEMBER_BYTES:
        raise DataError(f"{path}: {size} bytes, more than any official CIFAR file "
                        f"({_MAX_MEMBER_BYTES} at most); not a CIFAR batch file")
    with open(path, "rb") as f:
        return f.read()


def _verify_md5(path, layout):
    """MD5 of the archive file (read in 1 MiB blocks) == the published checksum, or DataError."""
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != layout.md5:
        raise DataError(f"{path}: MD5 {digest.hexdigest()} differs from the published checksum "
                        f"{layout.md5} of {layout.archive}; the file is corrupt or not the "
                        f"official archive: download it again")


def _parse_cifar_file(raw, layout, where):
    """(pixels (n, 3072) uint8, labels (n,)) from one batch file of either version."""
    if layout.label_bytes:
        record = layout.label_bytes + _CIFAR_PIXELS
        if len(raw) % record:
            raise DataError(f"{where}: {len(raw)} bytes is not a whole number of "
                            f"{record}-byte records (truncated?)")
        rows = numpy.frombuffer(raw, numpy.uint8).reshape(-1, record)
        return rows[:, layout.label_bytes:], rows[:, layout.label_bytes - 1]
    batch = restricted_unpickle(raw, where)
    if not isinstance(batch, dict):
        raise DataError(f"{where}: expected a dict of arrays, got {type(batch).__name__}")
    batch = {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in batch.items()}
    pixels, labels = batch.get("data"), batch.get(layout.label_key)
    if not (isinstance(pixels, numpy.ndarray) and pixels.dtype == numpy.uint8
            and pixels.ndim == 2 and pixels.shape[1] == _CIFAR_PIXELS):
        raise DataError(f"{where}: 'data' must be a uint8 array (n, {_CIFAR_PIXELS}), got "
                        f"{getattr(pixels, 'dtype', type(pixels).__name__)} "
                        f"{getattr(pixels, 'shape', '')}")
    if not (isinstance(labels, (list, numpy.ndarray))
            and all(isinstance(v, (int, numpy.integer)) and 0 <= v < layout.num_classes
                    for v in labels)):
        raise DataError(f"{where}: {layout.label_key!r} must be a list of integers in "
                        f"[0, {layout.num_classes})")
    if len(labels) != len(pixels):
        raise DataError(f"{where}: {len(pixels)} images but {len(labels)} labels")
    return pixels, numpy.asarray(labels, dtype=numpy.int64)


_EMPTY_ARRAY_CLASS = object()  # what the pickle's `numpy.ndarray` becomes: usable by nothing else


def _reconstruct_empty_array(subtype, shape, dtype_code):
    """The only constructor a dataset pickle may call: numpy's `_reconstruct(ndarray, (0,), 'b')`
    makes an empty array whose dtype, shape and bytes the pickle's BUILD then sets from the file."""
    if subtype is not _EMPTY_ARRAY_CLASS or tuple(shape) != (0,):
        raise pickle.UnpicklingError("array reconstruction with unexpected arguments")
    return numpy.empty(0, numpy.int8)


def _latin1_bytes(text, encoding):
    """Python 3 protocol-2 pickles spell bytes b as _codecs.encode(b.decode('latin1'), 'latin1')."""
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode admitted only for latin1 text")
    return text.encode("latin1")


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Admits dicts, lists, tuples, numbers, strings, bytes and numpy arrays; any other global
    (os.system, builtins.eval, numpy.load, …) is refused before it could be called."""
    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"): _reconstruct_empty_array,
                ("numpy._core.multiarray", "_reconstruct"): _reconstruct_empty_array,
                ("numpy", "ndarray"): _EMPTY_ARRAY_CLASS,
                ("numpy", "dtype"): numpy.dtype,
                ("_codecs", "encode"): _latin1_bytes}

    def find_class(self, module, name):
        """The admitted stand-in for `module.name`; any other global is refused here."""
        try:
            return self._ALLOWED[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"refused global {module}.{name}: dataset pickles may "
                                         f"hold only plain arrays, lists, dicts and strings")


def restricted_unpickle(raw, where="pickle"):
    """Load a dataset pickle through `_ArrayOnlyUnpickler` (latin1 decodes Python 2 strings, as
    the official CIFAR files are); anything refused or malformed raises DataError."""
    try:
        return _ArrayOnlyUnpickler(io.BytesIO(raw), encoding="latin1").load()
    except Exception as exc:  # a malformed pickle can raise almost any type; none may escape raw
        raise DataError(f"{where}: refused to load the pickle ({exc}); it is not a plain-array "
                        f"dataset file — use the official archive") from exc


# ------------------------------------------------------------------------------- IDX / MNIST
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_IDX_MAX_BYTES = 1 << 31


def load_idx(path):
    """An IDX file (plain or gzip, detected by content): magic 0x00 0x00 <dtype code> <ndim>,
    ndim big-endian uint32 dims, then the big-endian data; returned in native byte order."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such IDX file")
    with open(path, "rb") as f:
        gzipped = f.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open if gzipped else open)(path, "rb") as stream:
            return _read_idx(stream, path, os.path.getsize(path), gzipped)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot decompress ({exc}); the .gz file is damaged") from exc


def _read_idx(stream, path, size, gzipped):
    """Header, dims and data of one IDX stream, each checked against what the header claims;
    the claimed length against the file's `size` in bytes (for a gzip file: against the
    compression ratio, to refuse a decompression bomb) and the memory budget before reading."""
    header = stream.read(4)
    if len(header) < 4 or header[:2] != b"\0\0":
        raise DataError(f"{path}: bad magic {header.hex()!r}, not an IDX file (IDX starts with "
                        f"two zero bytes, a dtype code and the number of dimensions)")
    code, ndim = header[2], header[3]
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in _IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX dtype code 0x{code:02X} (known: {known})")
    if ndim == 0:
        raise DataError(f"{path}: the IDX header claims 0 dimensions")
    dim_bytes = stream.read(4 * ndim)
    if len(dim_bytes) < 4 * ndim:
        raise DataError(f"{path}: truncated header: {ndim} dimensions need {4 * ndim} bytes")
    dims = struct.unpack(f">{ndim}I", dim_bytes)
    dtype = numpy.dtype(_IDX_DTYPES[code])
    nbytes = math.prod(dims) * dtype.itemsize
    if nbytes > _IDX_MAX_BYTES:
        raise DataError(f"{path}: the header claims dims {dims} = {nbytes} bytes, more than the "
                        f"{_IDX_MAX_BYTES} refham reads; the header is corrupt")
    if gzipped:
        check_compression(size, nbytes, path, DataError)
    elif nbytes > size - 4 - 4 * ndim:
        raise DataError(f"{path}: truncated: {max(size - 4 - 4 * ndim, 0)} of the {nbytes} "
                        f"data bytes that dims {dims} need")
    check_fits(nbytes, path, DataError)
    data = stream.read(nbytes)
    if len(data) < nbytes:
        raise DataError(f"{path}: truncated: {len(data)} of the {nbytes} data bytes that dims "
                        f"{dims} need")
    if stream.read(1):
        raise DataError(f"{path}: trailing bytes after the {nbytes} data bytes of dims {dims}")
    return numpy.frombuffer(data, dtype).reshape(dims).astype(dtype.newbyteorder("="))


_MNIST_STEMS = {"train": "train-images-idx3-ubyte", "test": "t10k-images-idx3-ubyte"}


def load_mnist(path, split="train"):
    """MNIST-format images p/255 as float32 (N, H, W) and labels int64 (N,) — or None when the
    labels file is absent. `path`: the images IDX file (plain or .gz), or the folder holding
    the standard files of `split` ('train' or 't10k' test; names with '.idx' also found)."""
    path = os.fspath(path)
    if os.path.isdir(path):
        if split not in _MNIST_STEMS:
            raise DataError(f"split must be 'train' or 'test', got {split!r}")
        images_path = _find_idx(path, _MNIST_STEMS[split])
        if images_path is None:
            raise DataError(f"{path}: no {_MNIST_STEMS[split]}[.gz] (nor the '.idx3' spelling)")
    else:
        images_path = path
    folder, base = os.path.split(images_path)
    labels_stem = base.removesuffix(".gz").replace("images", "labels").replace("idx3", "idx1")
    renamed = labels_stem == base.removesuffix(".gz")  # no labels name to derive
    labels_path = None if renamed else _find_idx(folder, labels_stem)
    images = load_idx(images_path)
    if images.ndim != 3 or images.dtype != numpy.uint8 or 0 in images.shape:
        raise DataError(f"{images_path}: MNIST images are uint8 with 3 dims (N, H, W), none of "
                        f"them 0, got {images.dtype} {images.shape}")
    labels = None
    if labels_path is not None:
        labels = load_idx(labels_path)
        if labels.shape != images.shape[:1] or labels.dtype != numpy.uint8:
            raise DataError(f"{labels_path}: expected uint8 labels of shape ({len(images)},) to "
                            f"match {images_path}, got {labels.dtype} {labels.shape}")
        labels = labels.astype(numpy.int64)
    return images.astype(numpy.float32) / numpy.float32(255.0), labels


def _find_idx(folder, stem):
    """The first existing of stem, stem.gz and their '.idx' spellings in `folder`, or None."""
    for name in (stem, stem.replace("-idx", ".idx")):
        for candidate in (name, name + ".gz"):
            if os.path.isfile(os.path.join(folder, candidate)):
                return os.path.join(folder, candidate)
    return None
