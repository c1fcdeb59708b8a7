"""refham.files.datafiles: the CIFAR and IDX/MNIST readers on files generated here, hostile files.

CIFAR archives are built in tmp_path with the official member names (written out here, not taken
from refham, so a wrong name in refham fails); pixels are random so any reordering shows.
"""
import builtins
import dataclasses
import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
from hypothesis import given, strategies as st

from refham.training import data as D
from refham.files import datafiles as F
from refham.backend import rng


def test_file_readers_are_reexported_from_refham_data():
    for name in ("DataError", "read_cifar", "restricted_unpickle", "load_idx", "load_mnist"):
        assert getattr(D, name) is getattr(F, name)


# ------------------------------------------------------------------------------------- CIFAR
BATCHES = [f"data_batch_{i}" for i in range(1, 6)]
OFFICIAL = {  # (format, classes): (archive, folder, train members, test members)
    ("python", 10): ("cifar-10-python.tar.gz", "cifar-10-batches-py", BATCHES, ["test_batch"]),
    ("python", 100): ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], ["test"]),
    ("binary", 10): ("cifar-10-binary.tar.gz", "cifar-10-batches-bin",
                     [b + ".bin" for b in BATCHES], ["test_batch.bin"]),
    ("binary", 100): ("cifar-100-binary.tar.gz", "cifar-100-binary", ["train.bin"], ["test.bin"]),
}


def _encode_batch(fmt, classes, pixels, labels, protocol=2):
    if fmt == "binary":
        label_bytes = [labels] if classes == 10 else [labels // 5, labels]  # (coarse,) fine
        return np.column_stack(label_bytes + [pixels]).astype(np.uint8).tobytes()
    batch = {"batch_label": "generated", "data": pixels, "filenames": ["x.png"] * len(labels),
             ("labels" if classes == 10 else "fine_labels"): labels.tolist()}
    if classes == 100:
        batch["coarse_labels"] = (labels // 5).tolist()
    return pickle.dumps(batch, protocol=protocol)


def _write_tar(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, raw in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(raw, str):  # a symbolic link to `raw`
                info.type, info.linkname = tarfile.SYMTYPE, raw
                tar.addfile(info)
                continue
            info.size = len(raw)
            tar.addfile(info, io.BytesIO(raw))
    return path


def _cifar_members(fmt, classes, n=3, seed=0, replace=None):
    """{member path: bytes} of a small archive, and the expected (pixels, labels) per split."""
    _, folder, train_names, test_names = OFFICIAL[(fmt, classes)]
    gen = rng(seed)
    members = {f"{folder}/readme.html": b"<html/>"}
    expected = []
    for names in (train_names, test_names):
        pixels = gen.integers(0, 256, (len(names) * n, 3072)).astype(np.uint8)
        labels = gen.integers(0, classes, len(names) * n)
        for i, name in enumerate(names):
            members[f"{folder}/{name}"] = _encode_batch(fmt, classes, pixels[i * n:(i + 1) * n],
                                                        labels[i * n:(i + 1) * n], 2 + i % 3)
        expected.append((pixels, labels))
    members.update(replace or {})
    return members, expected


def _as_source(tmp_path, members, fmt, classes, source):
    archive, folder, _, _ = OFFICIAL[(fmt, classes)]
    if source == "archive":
        return _write_tar(tmp_path / archive, members)
    if source == "folder with archive":
        _write_tar(tmp_path / archive, members)
        return tmp_path
    for name, raw in members.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(raw)
    return tmp_path if source == "parent folder" else tmp_path / folder


@pytest.mark.parametrize("fmt, classes", list(OFFICIAL))
@pytest.mark.parametrize("source", ["archive", "parent folder", "extracted folder",
                                    "folder with archive"])
def test_cifar_reads_every_format_and_source(tmp_path, fmt, classes, source):
    members, expected = _cifar_members(fmt, classes)
    path = _as_source(tmp_path, members, fmt, classes, source)
    splits = F.read_cifar(path, num_classes=classes)
    assert len(splits) == 2
    for (images, labels), (pixels, expected_labels) in zip(splits, expected):
        assert images.dtype == np.uint8 and labels.dtype == np.int64
        np.testing.assert_array_equal(images, pixels.reshape(-1, 3, 32, 32))
        np.testing.assert_array_equal(labels, expected_labels)


@pytest.mark.parametrize("fmt, classes, asked", [("python", 100, 10), ("binary", 10, 100)])
def test_cifar_class_count_mismatch_is_named(tmp_path, fmt, classes, asked):
    members, _ = _cifar_members(fmt, classes)
    path = _write_tar(tmp_path / "c.tar.gz", members)
    with pytest.raises(F.DataError, match=f"holds CIFAR-{classes}, not CIFAR-{asked}"):
        F.read_cifar(path, num_classes=asked)


def test_cifar_malformed_inputs_raise(tmp_path):
    cases = {
        "missing member": ({"cifar-10-batches-py/test_batch": None}, "not a complete"),
        "link member": ({"cifar-10-batches-py/test_batch": "/etc/passwd"}, "not a complete"),
        "label out of range": ({"cifar-10-batches-py/test_batch": _encode_batch(
            "python", 10, np.zeros((2, 3072), np.uint8), np.array([0, 10]))}, "out of range"),
        "wrong pixel count": ({"cifar-10-batches-py/test_batch": _encode_batch(
            "python", 10, np.zeros((2, 3000), np.uint8), np.array([0, 1]))}, "uint8 array"),
        "float pixels": ({"cifar-10-batches-py/test_batch": _encode_batch(
            "python", 10, np.zeros((2, 3072)), np.array([0, 1]))}, "uint8 array"),
        "count mismatch": ({"cifar-10-batches-py/test_batch": _encode_batch(
            "python", 10, np.zeros((2, 3072), np.uint8), np.array([0]))}, "2 images but 1"),
        "not a dict": ({"cifar-10-batches-py/test_batch": pickle.dumps([1, 2])}, "expected a dict"),
        "garbage pickle": ({"cifar-10-batches-py/test_batch": b"\x80\x04garbage"}, "refused"),
    }
    for name, (replace, message) in cases.items():
        members, _ = _cifar_members("python", 10)
        members = {k: v for k, v in {**members, **replace}.items() if v is not None}
        path = _write_tar(tmp_path / f"{name}.tar.gz", members)
        with pytest.raises(F.DataError, match=message):
            F.read_cifar(path)
    members, _ = _cifar_members("binary", 10)
    members["cifar-10-batches-bin/test_batch.bin"] += b"\0"
    with pytest.raises(F.DataError, match="whole number of 3073-byte records"):
        F.read_cifar(_write_tar(tmp_path / "b.tar.gz", members))
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive at all")
    with pytest.raises(F.DataError, match="not a readable tar archive"):
        F.read_cifar(tmp_path / "junk.tar.gz")
    with pytest.raises(F.DataError, match="no such file"):
        F.read_cifar(tmp_path / "absent")
    with pytest.raises(F.DataError, match="10 or 100"):
        F.read_cifar(tmp_path, num_classes=20)


@pytest.mark.parametrize("fmt, classes, published", [
    ("python", 10, "c58f30108f718f92721af3b95e74349a"),
    ("python", 100, "eb9058c3a382ffc7106e4002c42a8d85"),
    ("binary", 10, "c32a1d4ab5d03f1284b67883e8d87530"),
    ("binary", 100, "03b5dce01913d631647c71ecec9e9cb8")])
def test_cifar_md5_is_checked_against_the_published_sum(tmp_path, monkeypatch, fmt, classes,
                                                        published):
    members, _ = _cifar_members(fmt, classes)
    path = _as_source(tmp_path, members, fmt, classes, "archive")
    with pytest.raises(F.DataError, match=f"MD5 .* published checksum {published}"):
        F.read_cifar(path, classes, verify_md5=True)
    F.read_cifar(path, classes)  # the same file loads when no check is asked for
    actual = hashlib.md5(path.read_bytes()).hexdigest()
    monkeypatch.setattr(F, "_LAYOUTS", tuple(dataclasses.replace(lay, md5=actual)
                                             if lay.md5 == published else lay
                                             for lay in F._LAYOUTS))
    assert len(F.read_cifar(path, classes, verify_md5=True)[1][1]) == 3
    with pytest.raises(F.DataError, match="extracted folder"):
        F.read_cifar(_as_source(tmp_path / "x", members, fmt, classes, "parent folder"), classes,
                     verify_md5=True)


class _Payload:
    """Unpickling this runs `call(*args)`: what a hostile dataset file would do."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _hostile_payloads(marker):
    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "builtins.open": _Payload(builtins.open, str(marker), "w"),
        "numpy.save": _Payload(np.save, str(marker), np.zeros(1)),
    }


@pytest.mark.parametrize("kind", ["os.system", "builtins.exec", "builtins.open", "numpy.save"])
def test_hostile_pickle_in_cifar_archive_is_refused_and_never_runs(tmp_path, kind):
    marker = tmp_path / "payload-ran"
    payload = _hostile_payloads(marker)[kind]
    raw = pickle.dumps({"data": np.zeros((3, 3072), np.uint8), "labels": payload}, protocol=2)
    members, _ = _cifar_members("python", 10, replace={"cifar-10-batches-py/data_batch_3": raw})
    path = _write_tar(tmp_path / "cifar-10-python.tar.gz", members)
    with pytest.raises(F.DataError, match="refused global"):
        F.read_cifar(path)
    assert not list(tmp_path.glob("payload-ran*")), "the hostile payload ran"
    pickle.loads(raw)  # control: the same bytes through plain pickle DO run the payload
    assert list(tmp_path.glob("payload-ran*")), "the control payload did not run: test is void"


def test_restricted_unpickler_admits_only_empty_array_reconstruction():
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy's _reconstruct, whatever its module
    with pytest.raises(F.DataError, match="refused"):  # numpy.ndarray called directly
        F.restricted_unpickle(pickle.dumps(_Payload(np.ndarray, (1 << 40,)), protocol=4))
    with pytest.raises(F.DataError, match="unexpected arguments"):
        F.restricted_unpickle(pickle.dumps(_Payload(reconstruct, np.ndarray, (1 << 40,), b"b"),
                                           protocol=4))
    legacy = pickle.dumps(np.arange(6, dtype=np.uint8), protocol=2).replace(
        b"numpy._core.multiarray", b"numpy.core.multiarray")  # numpy < 2 and Python 2 spelling
    np.testing.assert_array_equal(F.restricted_unpickle(legacy), np.arange(6))


# --------------------------------------------------------------------------------- IDX, MNIST
IDX_CODES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _idx_bytes(array, code):
    header = bytes([0, 0, code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(IDX_CODES[code]).tobytes()


def _write(path, raw, gz=False):
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


@given(code=st.sampled_from(sorted(IDX_CODES)), shape=st.lists(st.integers(0, 4), min_size=1,
       max_size=3), gz=st.booleans(), seed=st.integers(0, 99))
def test_idx_round_trip(tmp_path_factory, code, shape, gz, seed):
    array = (rng(seed).standard_normal(shape) * 100).astype(IDX_CODES[code])
    path = _write(tmp_path_factory.mktemp("idx") / "a.idx", _idx_bytes(array, code), gz)
    loaded = F.load_idx(path)
    assert loaded.shape == tuple(shape)
    assert loaded.dtype == np.dtype(IDX_CODES[code]).newbyteorder("=")
    np.testing.assert_array_equal(loaded, array)


GOOD = _idx_bytes(np.arange(24, dtype=np.uint8).reshape(2, 3, 4), 0x08)


@pytest.mark.parametrize("raw, message", [
    (b"\x01\x00" + GOOD[2:], "bad magic"),
    (b"\x00", "bad magic"),
    (GOOD[:2] + b"\x0a" + GOOD[3:], "unknown IDX dtype code 0x0A"),
    (b"\x00\x00\x08\x00", "0 dimensions"),
    (GOOD[:10], "truncated header"),
    (GOOD[:-1], "truncated: 23 of the 24"),
    (GOOD + b"\x00", "trailing bytes"),
    (b"\x00\x00\x08\x03" + struct.pack(">3I", 1 << 31, 1 << 31, 1 << 31), "more than"),
])
@pytest.mark.parametrize("gz", [False, True])
def test_idx_malformed_files_raise(tmp_path, raw, message, gz):
    with pytest.raises(F.DataError, match=message):
        F.load_idx(_write(tmp_path / "bad", raw, gz))


def test_idx_damaged_gzip_and_missing_file(tmp_path):
    with pytest.raises(F.DataError, match="decompress"):
        F.load_idx(_write(tmp_path / "cut.gz", gzip.compress(GOOD)[:-6]))
    with pytest.raises(F.DataError, match="no such IDX file"):
        F.load_idx(tmp_path / "absent")


def _mnist_folder(folder, n, split="train", gz=True, dotted=False, labels=True):
    prefix = "train" if split == "train" else "t10k"
    sep = "." if dotted else "-"
    pixels = rng(n).integers(0, 256, (n, 28, 28)).astype(np.uint8)
    digits = rng(n + 1).integers(0, 10, n).astype(np.uint8)
    folder.mkdir(parents=True, exist_ok=True)
    ext = ".gz" if gz else ""
    _write(folder / f"{prefix}-images{sep}idx3-ubyte{ext}", _idx_bytes(pixels, 0x08), gz)
    if labels:
        _write(folder / f"{prefix}-labels{sep}idx1-ubyte{ext}", _idx_bytes(digits, 0x08), gz)
    return pixels, digits


@pytest.mark.parametrize("split, gz, dotted", [("train", True, False), ("test", False, False),
                                               ("train", False, True)])
def test_mnist_folder_and_file_paths(tmp_path, split, gz, dotted):
    pixels, digits = _mnist_folder(tmp_path, 5, split, gz, dotted)
    images, labels = F.load_mnist(tmp_path, split)
    assert images.dtype == np.float32 and images.shape == (5, 28, 28)
    np.testing.assert_array_equal(np.rint(images * 255), pixels)
    np.testing.assert_array_equal(labels, digits)
    assert labels.dtype == np.int64
    image_file = next(p for p in tmp_path.iterdir() if "images" in p.name)
    np.testing.assert_array_equal(F.load_mnist(image_file)[1], digits)


def test_mnist_errors(tmp_path):
    pixels, _ = _mnist_folder(tmp_path / "alone", 4, labels=False)
    images, labels = F.load_mnist(tmp_path / "alone")
    assert labels is None and images.shape == pixels.shape
    with pytest.raises(F.DataError, match="no t10k-images"):
        F.load_mnist(tmp_path / "alone", "test")
    with pytest.raises(F.DataError, match="'train' or 'test'"):
        F.load_mnist(tmp_path / "alone", "validation")
    _mnist_folder(tmp_path / "mismatch", 4)
    _write(tmp_path / "mismatch" / "train-labels-idx1-ubyte.gz",
           _idx_bytes(np.zeros(3, np.uint8), 0x08), gz=True)
    with pytest.raises(F.DataError, match=r"labels of shape \(4,\)"):
        F.load_mnist(tmp_path / "mismatch")
    renamed = _write(tmp_path / "digits.idx", _idx_bytes(np.zeros((4, 5, 5), np.uint8), 8))
    assert F.load_mnist(renamed)[1] is None  # no labels name to derive: not itself
    flat = _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(np.zeros((4, 784), np.uint8), 8))
    with pytest.raises(F.DataError, match="3 dims"):
        F.load_mnist(flat)
