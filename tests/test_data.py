"""refham.data: dataset loaders on files generated here, hostile files, augmentation, batching.

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

from refham import data as D
from refham.backend import rng, to_numpy, get_dtype

# ------------------------------------------------------------------------------------ digits


@given(fraction=st.floats(0.1, 0.9), seed=st.integers(0, 2**16))
def test_digits_split_is_a_seeded_stratified_partition(fraction, seed):
    from sklearn.datasets import load_digits
    full = load_digits()
    train, test = D.load_digits(fraction, seed)
    for split in (train, test):
        assert split.images.shape[1:] == (1, 8, 8) and split.images.dtype == np.float32
        assert split.labels.dtype == np.int64 and split.num_classes == 10
        assert split.mean == (0.0,) and split.std == (1.0,)
    both = np.concatenate([train.images, test.images])
    assert both.min() == -1.0 and both.max() == 1.0
    # a partition: every original image (with its label) used exactly once
    def rows(imgs, labs):
        return sorted(map(tuple, np.column_stack([imgs.reshape(len(imgs), -1), labs])))
    assert rows(both, np.concatenate([train.labels, test.labels])) == \
        rows((full.images / 16 * 2 - 1).astype(np.float32), full.target)
    per_class = np.bincount(full.target, minlength=10)
    np.testing.assert_array_equal(np.bincount(train.labels, minlength=10),
                                  [round(fraction * n) for n in per_class])
    again, _ = D.load_digits(fraction, seed)
    np.testing.assert_array_equal(again.images, train.images)
    other, _ = D.load_digits(fraction, seed + 1)
    assert not np.array_equal(other.images, train.images)


@pytest.mark.parametrize("fraction", [0, 1, 1.5, -0.2, float("nan"), "0.5"])
def test_digits_rejects_impossible_fraction(fraction):
    with pytest.raises(D.DataError, match="train_fraction"):
        D.load_digits(fraction)


# ------------------------------------------------------------------------- Dataset, synthetic


def test_synthetic_is_learnable_by_nearest_class_mean():
    train, test = D.make_synthetic(n_train=64, n_test=200, image_size=4, in_chans=2, num_classes=5)
    assert train.images.shape == (64, 2, 4, 4) and test.images.shape == (200, 2, 4, 4)
    assert np.array_equal(np.bincount(test.labels), [40] * 5)
    means = np.stack([train.images[train.labels == k].mean(0) for k in range(5)]).reshape(5, -1)
    dist = ((test.images.reshape(200, 1, -1) - means[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == test.labels).mean() > 0.95
    again, _ = D.make_synthetic(n_train=64, n_test=200, image_size=4, in_chans=2, num_classes=5)
    np.testing.assert_array_equal(again.images, train.images)


@pytest.mark.parametrize("kwargs", [dict(n_train=0), dict(image_size=2.5), dict(num_classes=1),
                                    dict(noise=-1.0), dict(noise=float("inf"))])
def test_synthetic_rejects_bad_arguments(kwargs):
    with pytest.raises(D.DataError, match="make_synthetic"):
        D.make_synthetic(**kwargs)


def _dataset(n=6, **changes):
    fields = dict(images=np.zeros((n, 1, 2, 2), np.float32), labels=np.arange(n) % 3,
                  num_classes=3, name="t", mean=(0.0,), std=(1.0,))
    fields["labels"] = fields["labels"].astype(np.int64)
    return D.Dataset(**{**fields, **changes})


@pytest.mark.parametrize("changes, message", [
    (dict(images=np.zeros((6, 2, 2), np.float32)), "images must be"),
    (dict(images=np.zeros((6, 1, 2, 2))), "float32"),
    (dict(labels=np.zeros(5, np.int64)), "labels must be"),
    (dict(labels=np.full(6, 1, np.int32)), "labels must be"),
    (dict(labels=np.full(6, 3, np.int64)), "outside"),
    (dict(images=np.full((6, 1, 2, 2), np.nan, np.float32)), "NaN"),
    (dict(mean=(0.0, 0.0)), "per channel"),
    (dict(std=(0.0,)), "positive"),
])
def test_dataset_rejects_inconsistent_fields(changes, message):
    with pytest.raises(D.DataError, match=message):
        _dataset(**changes)


def test_load_dataset_dispatch_and_errors(tmp_path):
    train, test = D.load_dataset("synthetic", train_fraction=0.5, seed=1, n_train=40, n_test=8)
    assert (len(train), len(test)) == (20, 8) and np.array_equal(np.bincount(train.labels), [5] * 4)
    train, test = D.load_dataset("digits", train_fraction=0.25)
    assert len(train) + len(test) == 1797 and abs(len(train) - 0.25 * 1797) < 10
    with pytest.raises(D.DataError, match="unknown dataset 'mnist'.*digits, cifar10"):
        D.load_dataset("mnist")
    with pytest.raises(D.DataError, match="cifar100 needs path"):
        D.load_dataset("cifar100")
    with pytest.raises(D.DataError, match="no path"):
        D.load_dataset("digits", tmp_path)
    with pytest.raises(D.DataError, match="only to the synthetic"):
        D.load_dataset("digits", n_train=3)


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
def test_cifar_loads_every_format_and_source(tmp_path, fmt, classes, source):
    members, expected = _cifar_members(fmt, classes)
    path = _as_source(tmp_path, members, fmt, classes, source)
    splits = D.load_cifar(path, num_classes=classes)
    for split, (pixels, labels) in zip(splits, expected):
        assert split.name == f"cifar{classes}" and split.num_classes == classes
        assert split.images.shape == (len(labels), 3, 32, 32) and split.images.dtype == np.float32
        np.testing.assert_array_equal(np.rint(split.images * 255), pixels.reshape(-1, 3, 32, 32))
        np.testing.assert_array_equal(split.labels, labels)
        train_pixels = expected[0][0].reshape(-1, 3, 1024) / 255.0
        np.testing.assert_allclose(split.mean, train_pixels.mean(axis=(0, 2)), rtol=1e-6)
        np.testing.assert_allclose(split.std, train_pixels.std(axis=(0, 2)), rtol=1e-5)


def test_cifar_train_fraction_subsamples_only_the_training_split(tmp_path):
    members, expected = _cifar_members("python", 10, n=8)
    path = _write_tar(tmp_path / "c.tar.gz", members)
    train, test = D.load_dataset("cifar10", path, train_fraction=0.5)
    assert len(test) == 8 and 15 <= len(train) <= 25
    assert set(map(bytes, np.rint(train.images * 255).astype(np.uint8).reshape(len(train), -1))) \
        <= set(map(bytes, expected[0][0]))


@pytest.mark.parametrize("fmt, classes, asked", [("python", 100, 10), ("binary", 10, 100)])
def test_cifar_class_count_mismatch_is_named(tmp_path, fmt, classes, asked):
    members, _ = _cifar_members(fmt, classes)
    path = _write_tar(tmp_path / "c.tar.gz", members)
    with pytest.raises(D.DataError, match=f"holds CIFAR-{classes}, not CIFAR-{asked}"):
        D.load_cifar(path, num_classes=asked)


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
        with pytest.raises(D.DataError, match=message):
            D.load_cifar(path)
    members, _ = _cifar_members("binary", 10)
    members["cifar-10-batches-bin/test_batch.bin"] += b"\0"
    with pytest.raises(D.DataError, match="whole number of 3073-byte records"):
        D.load_cifar(_write_tar(tmp_path / "b.tar.gz", members))
    (tmp_path / "junk.tar.gz").write_bytes(b"not an archive at all")
    with pytest.raises(D.DataError, match="not a readable tar archive"):
        D.load_cifar(tmp_path / "junk.tar.gz")
    with pytest.raises(D.DataError, match="no such file"):
        D.load_cifar(tmp_path / "absent")
    with pytest.raises(D.DataError, match="10 or 100"):
        D.load_cifar(tmp_path, num_classes=20)


@pytest.mark.parametrize("fmt, classes, published", [
    ("python", 10, "c58f30108f718f92721af3b95e74349a"),
    ("python", 100, "eb9058c3a382ffc7106e4002c42a8d85"),
    ("binary", 10, "c32a1d4ab5d03f1284b67883e8d87530"),
    ("binary", 100, "03b5dce01913d631647c71ecec9e9cb8")])
def test_cifar_md5_is_checked_against_the_published_sum(tmp_path, monkeypatch, fmt, classes,
                                                        published):
    members, _ = _cifar_members(fmt, classes)
    path = _as_source(tmp_path, members, fmt, classes, "archive")
    with pytest.raises(D.DataError, match=f"MD5 .* published checksum {published}"):
        D.load_cifar(path, classes, verify_md5=True)
    D.load_cifar(path, classes)  # the same file loads when no check is asked for
    actual = hashlib.md5(path.read_bytes()).hexdigest()
    monkeypatch.setattr(D, "_LAYOUTS", tuple(dataclasses.replace(lay, md5=actual)
                                             if lay.md5 == published else lay
                                             for lay in D._LAYOUTS))
    assert len(D.load_cifar(path, classes, verify_md5=True)[1]) == 3
    with pytest.raises(D.DataError, match="extracted folder"):
        D.load_cifar(_as_source(tmp_path / "x", members, fmt, classes, "parent folder"), classes,
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
    with pytest.raises(D.DataError, match="refused global"):
        D.load_cifar(path)
    assert not list(tmp_path.glob("payload-ran*")), "the hostile payload ran"
    pickle.loads(raw)  # control: the same bytes through plain pickle DO run the payload
    assert list(tmp_path.glob("payload-ran*")), "the control payload did not run: test is void"


def test_restricted_unpickler_admits_only_empty_array_reconstruction():
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy's _reconstruct, whatever its module
    with pytest.raises(D.DataError, match="refused"):  # numpy.ndarray called directly
        D.restricted_unpickle(pickle.dumps(_Payload(np.ndarray, (1 << 40,)), protocol=4))
    with pytest.raises(D.DataError, match="unexpected arguments"):
        D.restricted_unpickle(pickle.dumps(_Payload(reconstruct, np.ndarray, (1 << 40,), b"b"),
                                           protocol=4))
    legacy = pickle.dumps(np.arange(6, dtype=np.uint8), protocol=2).replace(
        b"numpy._core.multiarray", b"numpy.core.multiarray")  # numpy < 2 and Python 2 spelling
    np.testing.assert_array_equal(D.restricted_unpickle(legacy), np.arange(6))


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
    loaded = D.load_idx(path)
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
    with pytest.raises(D.DataError, match=message):
        D.load_idx(_write(tmp_path / "bad", raw, gz))


def test_idx_damaged_gzip_and_missing_file(tmp_path):
    with pytest.raises(D.DataError, match="decompress"):
        D.load_idx(_write(tmp_path / "cut.gz", gzip.compress(GOOD)[:-6]))
    with pytest.raises(D.DataError, match="no such IDX file"):
        D.load_idx(tmp_path / "absent")


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
    images, labels = D.load_mnist(tmp_path, split)
    assert images.dtype == np.float32 and images.shape == (5, 28, 28)
    np.testing.assert_array_equal(np.rint(images * 255), pixels)
    np.testing.assert_array_equal(labels, digits)
    assert labels.dtype == np.int64
    image_file = next(p for p in tmp_path.iterdir() if "images" in p.name)
    np.testing.assert_array_equal(D.load_mnist(image_file)[1], digits)


def test_mnist_errors(tmp_path):
    pixels, _ = _mnist_folder(tmp_path / "alone", 4, labels=False)
    images, labels = D.load_mnist(tmp_path / "alone")
    assert labels is None and images.shape == pixels.shape
    with pytest.raises(D.DataError, match="no t10k-images"):
        D.load_mnist(tmp_path / "alone", "test")
    with pytest.raises(D.DataError, match="'train' or 'test'"):
        D.load_mnist(tmp_path / "alone", "validation")
    _mnist_folder(tmp_path / "mismatch", 4)
    _write(tmp_path / "mismatch" / "train-labels-idx1-ubyte.gz",
           _idx_bytes(np.zeros(3, np.uint8), 0x08), gz=True)
    with pytest.raises(D.DataError, match=r"labels of shape \(4,\)"):
        D.load_mnist(tmp_path / "mismatch")
    renamed = _write(tmp_path / "digits.idx", _idx_bytes(np.zeros((4, 5, 5), np.uint8), 8))
    assert D.load_mnist(renamed)[1] is None  # no labels name to derive: not itself
    flat = _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(np.zeros((4, 784), np.uint8), 8))
    with pytest.raises(D.DataError, match="3 dims"):
        D.load_mnist(flat)


# ----------------------------------------------------------------- augmentation and batching


def _images(n=16, c=2, h=5, w=6, seed=0):
    return rng(seed).standard_normal((n, c, h, w))


@pytest.mark.parametrize("augment", [
    lambda x, g: D.random_crop(x, 2, g), D.horizontal_flip,
    lambda x, g: D.add_gaussian_noise(x, 0.3, g)])
def test_augmentation_is_deterministic_under_a_seed_and_leaves_input_alone(augment):
    x = _images()
    before = x.copy()
    a, b = (to_numpy(augment(x, rng(7))) for _ in range(2))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, to_numpy(augment(x, rng(8))))
    np.testing.assert_array_equal(x, before)
    assert a.shape == x.shape


@given(pad=st.integers(0, 3), seed=st.integers(0, 999))
def test_random_crop_is_a_shifted_window_of_the_zero_padded_image(pad, seed):
    x = _images(n=40, seed=seed)
    out = to_numpy(D.random_crop(x, pad, rng(seed)))
    padded = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    offsets = set()
    for n in range(len(x)):
        found = [(dy, dx) for dy in range(2 * pad + 1) for dx in range(2 * pad + 1)
                 if np.array_equal(out[n], padded[n, :, dy:dy + 5, dx:dx + 6])]
        assert len(found) == 1, f"sample {n} is not one window of its padded image"
        offsets |= set(found)
    assert len(offsets) > min(4, (2 * pad + 1) ** 2 - 1)  # offsets differ between samples


@given(seed=st.integers(0, 999))
def test_flip_mirrors_about_half_the_samples_and_twice_is_identity(seed):
    x = _images(n=200, seed=seed)
    once = to_numpy(D.horizontal_flip(x, rng(seed)))
    mirrored = np.array([np.array_equal(o, s[..., ::-1]) for o, s in zip(once, x)])
    kept = np.array([np.array_equal(o, s) for o, s in zip(once, x)])
    assert np.all(mirrored ^ kept) and 70 <= mirrored.sum() <= 130
    np.testing.assert_array_equal(to_numpy(D.horizontal_flip(once, rng(seed))), x)


def test_gaussian_noise_statistics_and_freshness():
    x = _images(n=64, c=1, h=8, w=8)
    gen = rng(3)
    first, second = (to_numpy(D.add_gaussian_noise(x, 0.6, gen)) - x for _ in range(2))
    for noise in (first, second):
        assert abs(noise.mean()) < 0.03 and abs(noise.std() - 0.6) < 0.03
    assert abs(np.corrcoef(first.ravel(), second.ravel())[0, 1]) < 0.05  # fresh per batch
    np.testing.assert_array_equal(to_numpy(D.add_gaussian_noise(x, 0.0, gen)), x)


def test_normalise_per_channel():
    scale, shift = np.array([1.0, 2.0, 5.0]), np.array([0.0, 3.0, -4.0])
    x = _images(n=30, c=3) * scale[:, None, None] + shift[:, None, None]
    mean, std = x.mean(axis=(0, 2, 3)), x.std(axis=(0, 2, 3))
    out = to_numpy(D.normalise(x, tuple(mean), tuple(std)))
    np.testing.assert_allclose(out.mean(axis=(0, 2, 3)), 0, atol=1e-12)
    np.testing.assert_allclose(out.std(axis=(0, 2, 3)), 1, rtol=1e-12)
    np.testing.assert_allclose(out[:, 1], (x[:, 1] - mean[1]) / std[1], rtol=1e-12)


def test_augmentation_argument_errors():
    x = _images()
    with pytest.raises(D.DataError, match="per channel"):
        D.normalise(x, (0.0,), (1.0,))
    with pytest.raises(D.DataError, match="positive"):
        D.normalise(x, (0.0, 0.0), (1.0, -1.0))
    with pytest.raises(D.DataError, match=r"\(N, C, H, W\)"):
        D.horizontal_flip(x[0], rng(0))
    with pytest.raises(D.DataError, match="pad"):
        D.random_crop(x, -1, rng(0))
    with pytest.raises(D.DataError, match="sigma"):
        D.add_gaussian_noise(x, float("nan"), rng(0))
    with pytest.raises(TypeError, match="numpy Generator"):
        D.random_crop(x, 1, 0)


@given(n=st.integers(1, 40), batch_size=st.integers(1, 12), drop_last=st.booleans(),
       seed=st.none() | st.integers(0, 99))
def test_batches_cover_the_dataset_once_per_epoch(n, batch_size, drop_last, seed):
    dataset = _dataset(n, images=np.arange(n, dtype=np.float32)[:, None, None, None]
                       * np.ones((1, 1, 2, 2), np.float32))
    gen = None if seed is None else rng(seed)
    seen = []
    for images, labels in D.batches(dataset, batch_size, gen, drop_last):
        assert images.dtype == get_dtype() and labels.dtype == np.int64
        index = to_numpy(images)[:, 0, 0, 0].astype(int)
        np.testing.assert_array_equal(to_numpy(labels), index % 3)
        assert len(index) == batch_size or not drop_last
        seen.extend(index)
    expected = n - n % batch_size if drop_last else n
    assert len(seen) == len(set(seen)) == expected
    if gen is None:
        assert seen == list(range(expected))
    elif not drop_last and n >= 8:
        assert seen != list(range(n))  # shuffled (identity has probability 1/n!)


def test_batches_argument_errors():
    with pytest.raises(D.DataError, match="batch_size"):
        next(D.batches(_dataset(), 0))
    with pytest.raises(TypeError, match="Dataset"):
        next(D.batches(np.zeros((4, 1, 2, 2)), 2))
