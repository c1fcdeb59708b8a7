"""Datasets, augmentation and batching.

A `Dataset` lives on the HOST as NumPy arrays: images (N, C_in, H, W) float32, labels (N,) int64.
`batches` moves one mini-batch at a time to the active backend; the augmentations (normalise,
random crop, horizontal flip, Gaussian noise) then run with `xp` on that backend. All randomness
is drawn on the host from a NumPy Generator and moved with `asarray`, so one seed gives the same
augmented batch on NumPy and CuPy.

Sources: scikit-learn's bundled handwritten digits (the default, no download; DESIGN §9), CIFAR-10
and CIFAR-100 from the official archives (python pickles through a restricted unpickler, or the
binary version; DESIGN §8), a synthetic learnable set for tests, and MNIST's IDX files (DESIGN §4).
Every malformed, hostile or mismatched file raises `DataError` naming the file and the problem.
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

from refham.backend import asarray, rng, xp

DATASETS = ("digits", "cifar10", "cifar100", "synthetic")


class DataError(ValueError):
    """A dataset file or argument is missing, malformed, hostile or inconsistent."""


@dataclass
class Dataset:
    """One split on the host. `mean`/`std` are the per-channel constants the training loop
    normalises with, x ← (x − mean_c)/std_c: the official training split's statistics for CIFAR,
    identity for digits (already in [−1, 1]) and synthetic (already centred)."""
    images: numpy.ndarray  # (N, C_in, H, W) float32
    labels: numpy.ndarray  # (N,) int64 in [0, num_classes)
    num_classes: int
    name: str
    mean: tuple
    std: tuple

    def __post_init__(self):
        """Shapes, dtypes, label range, finiteness and per-channel constants, or DataError."""
        images, labels = self.images, self.labels
        if not isinstance(images, numpy.ndarray) or images.ndim != 4 \
                or images.dtype != numpy.float32:
            raise DataError(f"{self.name}: images must be a host numpy float32 array (N, C, H, W), "
                            f"got {type(images).__name__} {getattr(images, 'shape', '')} "
                            f"{getattr(images, 'dtype', '')}")
        if not isinstance(labels, numpy.ndarray) or labels.shape != images.shape[:1] \
                or labels.dtype != numpy.int64:
            raise DataError(f"{self.name}: labels must be a host numpy int64 array of shape "
                            f"({len(images)},), got {getattr(labels, 'shape', '')} "
                            f"{getattr(labels, 'dtype', type(labels).__name__)}")
        if len(labels) == 0:
            raise DataError(f"{self.name}: the split is empty")
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise DataError(f"{self.name}: labels span [{labels.min()}, {labels.max()}], outside "
                            f"[0, {self.num_classes}) for {self.num_classes} classes")
        if not numpy.isfinite(images).all():
            raise DataError(f"{self.name}: images contain NaN or inf")
        _check_channel_stats(self.mean, self.std, images.shape[1])

    def __len__(self):
        return len(self.labels)

    @property
    def image_shape(self):
        """(C_in, H, W)."""
        return self.images.shape[1:]


def _check_channel_stats(mean, std, channels):
    """One finite mean and one finite, positive std per channel, or DataError."""
    if len(mean) != channels or len(std) != channels:
        raise DataError(f"mean and std need one value per channel ({channels}), "
                        f"got {len(mean)} and {len(std)}")
    if not all(math.isfinite(s) and s > 0 for s in std) or not all(map(math.isfinite, mean)):
        raise DataError(f"mean must be finite and std finite and positive, got {mean}, {std}")


def load_dataset(name, path=None, *, train_fraction=None, seed=0, verify_md5=False,
                 **synthetic_kw):
    """(train, test) for `name` in DATASETS. `train_fraction`: for digits the share of the 1,797
    images used for training (the rest is the test split; default 0.8); for the others a seeded,
    stratified subsample of the training split (the test split is kept whole)."""
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}: choose one of {', '.join(DATASETS)}")
    if synthetic_kw and name != "synthetic":
        raise DataError(f"options {sorted(synthetic_kw)} apply only to the synthetic dataset")
    if name.startswith("cifar"):
        if path is None:
            raise DataError(f"{name} needs path=: the official archive (cifar-{name[5:]}-python."
                            f"tar.gz or the binary version) or its extracted folder")
        train, test = load_cifar(path, num_classes=int(name[5:]), verify_md5=verify_md5)
    elif path is not None or verify_md5:
        raise DataError(f"{name} is generated or bundled: it takes no path and no MD5 check")
    elif name == "digits":
        return load_digits(0.8 if train_fraction is None else train_fraction, seed)
    else:
        train, test = make_synthetic(seed=seed, **synthetic_kw)
    if train_fraction is not None:
        keep, _ = _stratified_split(train.labels, _check_fraction(train_fraction, True), rng(seed))
        train = Dataset(train.images[keep], train.labels[keep], train.num_classes, train.name,
                        train.mean, train.std)
    return train, test


def _check_fraction(fraction, allow_one):
    """A fraction in (0, 1), or (0, 1] where `allow_one`, returned as a float."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction
            and (fraction < 1 or allow_one and fraction == 1)):
        raise DataError(f"train_fraction must be a number in (0, 1{']' if allow_one else ')'}, "
                        f"got {fraction!r}")
    return float(fraction)


def _check_finite_nonnegative(value, what):
    """A finite number ≥ 0 (noise levels), or DataError naming `what`."""
    if not (isinstance(value, (int, float)) and 0 <= value < math.inf):
        raise DataError(f"{what} must be a finite number ≥ 0, got {value!r}")


def _stratified_split(labels, fraction, gen):
    """Indices (chosen, rest), both sorted: round(fraction·n_k) random images of each class k."""
    chosen = []
    for k in numpy.unique(labels):
        members = gen.permutation(numpy.flatnonzero(labels == k))
        chosen.append(members[:round(fraction * len(members))])
    chosen = numpy.sort(numpy.concatenate(chosen))
    rest = numpy.setdiff1d(numpy.arange(len(labels)), chosen)
    if len(chosen) == 0 or (fraction < 1 and len(rest) == 0):
        raise DataError(f"train_fraction={fraction} leaves an empty split of {len(labels)} images")
    return chosen, rest


def load_digits(train_fraction=0.8, seed=0):
    """scikit-learn's handwritten digits (1,797 images, 8×8×1): pixels p ∈ {0…16} mapped to
    p/16·2 − 1 ∈ [−1, 1] (DESIGN §9), split into (train, test) by class with a seeded shuffle."""
    from sklearn.datasets import load_digits as sklearn_digits

    fraction = _check_fraction(train_fraction, False)
    bunch = sklearn_digits()
    images = (bunch.images / 16.0 * 2.0 - 1.0).astype(numpy.float32)[:, None]  # (1797, 1, 8, 8)
    labels = bunch.target.astype(numpy.int64)
    train, test = _stratified_split(labels, fraction, rng(seed))
    return tuple(Dataset(images[i], labels[i], 10, "digits", (0.0,), (1.0,)) for i in (train, test))


def make_synthetic(n_train=256, n_test=128, image_size=8, in_chans=1, num_classes=4, seed=0,
                   noise=0.5):
    """A learnable set: image = template_k + noise·N(0, 1), one N(0, 1) template per class k,
    balanced classes. Returns (train, test) sharing the templates."""
    sizes = dict(n_train=n_train, n_test=n_test, image_size=image_size, in_chans=in_chans)
    for key, value in dict(sizes, num_classes=num_classes).items():
        if not isinstance(value, int) or value < (2 if key == "num_classes" else 1):
            raise DataError(f"make_synthetic: {key} must be a positive integer "
                            f"(num_classes ≥ 2), got {value!r}")
    _check_finite_nonnegative(noise, "make_synthetic: noise")
    gen = rng(seed)
    shape = (in_chans, image_size, image_size)
    templates = gen.standard_normal((num_classes,) + shape)

    def split(n):
        """n balanced, shuffled samples around the shared templates."""
        labels = gen.permutation(numpy.arange(n) % num_classes)
        images = templates[labels] + noise * gen.standard_normal((n,) + shape)
        return Dataset(images.astype(numpy.float32), labels.astype(numpy.int64), num_classes,
                       "synthetic", (0.0,) * in_chans, (1.0,) * in_chans)
    return split(n_train), split(n_test)


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


def load_cifar(path, num_classes=10, verify_md5=False):
    """CIFAR-10/100 (train, test) from the official python or binary archive (.tar.gz, read in
    memory, never extracted), its extracted folder, or a folder holding the archive. Pixels
    p/255 as float32, (N, 3, 32, 32); CIFAR-100 uses the fine labels. `verify_md5` checks the
    archive against the published checksum before reading it."""
    if num_classes not in (10, 100):
        raise DataError(f"CIFAR has 10 or 100 classes, got num_classes={num_classes!r}")
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder; pass the CIFAR archive or its folder")
    layout, files = (_read_cifar_archive if os.path.isfile(path) else _read_cifar_folder)(
        path, num_classes, verify_md5)
    name = f"cifar{num_classes}"
    splits = []
    for members in (layout.train_files, layout.test_files):
        parts = [_parse_cifar_file(files[f"{layout.folder}/{m}"], layout, f"{path}: {m}")
                 for m in members]
        pixels = numpy.concatenate([p for p, _ in parts]).reshape(-1, 3, 32, 32)
        labels = numpy.concatenate([lab for _, lab in parts]).astype(numpy.int64)
        if labels.size and labels.max() >= num_classes:
            raise DataError(f"{path}: label {labels.max()} out of range for {num_classes} classes")
        splits.append((pixels, labels))
    mean, std = _pixel_stats(splits[0][0])
    return tuple(Dataset(numpy.divide(pixels, numpy.float32(255.0), dtype=numpy.float32), labels,
                         num_classes, name, mean, std) for pixels, labels in splits)


def _pixel_stats(pixels):
    """Per-channel mean and standard deviation of p/255 over (N, H, W), exact in float64, from
    each channel's histogram of the 256 byte values (no float copy of 50,000 images needed)."""
    values = numpy.arange(256) / 255.0
    counts = numpy.stack([numpy.bincount(pixels[:, c].ravel(), minlength=256)
                          for c in range(pixels.shape[1])])  # (C, 256)
    mean = counts @ values / counts.sum(axis=1)
    std = numpy.sqrt(numpy.maximum(counts @ (values * values) / counts.sum(axis=1) - mean**2, 0))
    return tuple(map(float, mean)), tuple(float(s) if s > 0 else 1.0 for s in std)


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
    files = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                name = member.name[2:] if member.name.startswith("./") else member.name
                if name not in wanted or not member.isfile():
                    continue
                if member.size > _MAX_MEMBER_BYTES:
                    raise DataError(f"{path}: member {name} claims {member.size} bytes, more "
                                    f"than any official CIFAR file")
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
    """The whole file as bytes."""
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
            and all(isinstance(v, (int, numpy.integer)) and v >= 0 for v in labels)):
        raise DataError(f"{where}: {layout.label_key!r} must be a list of non-negative integers")
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
            return _read_idx(stream, path)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: cannot decompress ({exc}); the .gz file is damaged") from exc


def _read_idx(stream, path):
    """Header, dims and data of one IDX stream, each checked against what the header claims."""
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
    if images.ndim != 3 or images.dtype != numpy.uint8:
        raise DataError(f"{images_path}: MNIST images are uint8 with 3 dims (N, H, W), got "
                        f"{images.dtype} {images.shape}")
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


# --------------------------------------------------------------- batching and augmentation
def batches(dataset, batch_size, gen=None, drop_last=False):
    """Yield (images, labels) mini-batches on the active backend — images (B, C, H, W) in the
    default dtype, labels (B,) int64 — covering the dataset once, shuffled by `gen` if given."""
    if not isinstance(dataset, Dataset):
        raise TypeError(f"batches needs a refham.data.Dataset, got {type(dataset).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = numpy.arange(len(dataset)) if gen is None else _check_gen(gen).permutation(len(dataset))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]
        yield asarray(dataset.images[index]), asarray(dataset.labels[index], dtype=xp.int64)


def _check_gen(gen):
    """`gen` itself if it is a NumPy Generator, the one source of randomness here."""
    if not isinstance(gen, numpy.random.Generator):
        raise TypeError(f"gen must be a numpy Generator (refham.backend.rng(seed)), "
                        f"got {type(gen).__name__}")
    return gen


def _check_images(images):
    """`images` as an array of the active backend, required to be (N, C, H, W)."""
    images = xp.asarray(images)
    if images.ndim != 4:
        raise DataError(f"expected a batch of images (N, C, H, W), got shape {images.shape}")
    return images


def normalise(images, mean, std):
    """x_nchw ← (x_nchw − mean_c)/std_c, per channel c."""
    images = _check_images(images)
    _check_channel_stats(tuple(mean), tuple(std), images.shape[1])
    mean = asarray(mean, dtype=images.dtype).reshape(1, -1, 1, 1)
    std = asarray(std, dtype=images.dtype).reshape(1, -1, 1, 1)
    return (images - mean) / std


def random_crop(images, pad, gen):
    """Zero-pad each side by `pad`, then crop back to H×W at a per-sample offset
    (dy, dx) ∈ {0…2·pad}² drawn from `gen`: out_n = padded_n[:, dy:dy+H, dx:dx+W]."""
    images = _check_images(images)
    if not isinstance(pad, int) or pad < 0:
        raise DataError(f"pad must be an integer ≥ 0, got {pad!r}")
    n, c, h, w = images.shape
    offsets = asarray(_check_gen(gen).integers(0, 2 * pad + 1, size=(n, 2)), dtype=xp.int64)
    padded = xp.pad(images, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    rows = offsets[:, 0:1] + xp.arange(h)  # (N, H)
    cols = offsets[:, 1:2] + xp.arange(w)  # (N, W)
    return padded[xp.arange(n)[:, None, None, None], xp.arange(c)[None, :, None, None],
                  rows[:, None, :, None], cols[:, None, None, :]]


def horizontal_flip(images, gen):
    """Mirror each sample left–right with probability ½ (one draw per sample from `gen`)."""
    images = _check_images(images)
    flip = asarray(_check_gen(gen).random(images.shape[0]) < 0.5, dtype=bool)
    return xp.where(flip[:, None, None, None], images[..., ::-1], images)


def add_gaussian_noise(images, sigma, gen):
    """x + σ·ε, ε ~ N(0, 1) fresh for every call (DESIGN §9: every training batch)."""
    images = _check_images(images)
    _check_finite_nonnegative(sigma, "sigma")
    noise = asarray(_check_gen(gen).standard_normal(images.shape), dtype=images.dtype)
    return images + sigma * noise
