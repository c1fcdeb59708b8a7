"""refham.training.data: digits, synthetic, Dataset, load_dataset, CIFAR as Datasets, augmentation, batching.

The file readers behind load_cifar are tested in test_datafiles.py; its archive builders are reused
here to check what load_cifar adds: pixel scaling, the normalisation constants, the split names.
"""
import numpy as np
import pytest
from hypothesis import given, strategies as st

from refham.training import data as D
from refham.backend import rng, to_numpy, get_dtype
from tests.test_datafiles import OFFICIAL, _as_source, _cifar_members, _write_tar


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


@pytest.mark.parametrize("fmt, classes", list(OFFICIAL))
def test_load_cifar_scales_pixels_and_takes_the_training_split_statistics(tmp_path, fmt, classes):
    members, expected = _cifar_members(fmt, classes)
    splits = D.load_cifar(_as_source(tmp_path, members, fmt, classes, "archive"), classes)
    train_pixels = expected[0][0].reshape(-1, 3, 1024) / 255.0
    for split, (pixels, labels) in zip(splits, expected):
        assert split.name == f"cifar{classes}" and split.num_classes == classes
        assert split.images.shape == (len(labels), 3, 32, 32) and split.images.dtype == np.float32
        np.testing.assert_array_equal(split.images, pixels.reshape(-1, 3, 32, 32) / np.float32(255))
        np.testing.assert_array_equal(split.labels, labels)
        np.testing.assert_allclose(split.mean, train_pixels.mean(axis=(0, 2)), rtol=1e-6)
        np.testing.assert_allclose(split.std, train_pixels.std(axis=(0, 2)), rtol=1e-5)


def test_cifar_train_fraction_subsamples_only_the_training_split(tmp_path):
    members, expected = _cifar_members("python", 10, n=8)
    path = _write_tar(tmp_path / "c.tar.gz", members)
    train, test = D.load_dataset("cifar10", path, train_fraction=0.5)
    assert len(test) == 8 and 15 <= len(train) <= 25
    assert set(map(bytes, np.rint(train.images * 255).astype(np.uint8).reshape(len(train), -1))) \
        <= set(map(bytes, expected[0][0]))


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
