"""Datasets, augmentation and batching.

A `Dataset` lives on the HOST as NumPy arrays: images (N, C_in, H, W) float32, labels (N,) int64.
`batches` moves one mini-batch at a time to the active backend; the augmentations (normalise,
random crop, horizontal flip, Gaussian noise) then run with `xp` on that backend. All randomness
is drawn on the host from a NumPy Generator and moved with `asarray`, so one seed gives the same
augmented batch on NumPy and CuPy.

Sources: scikit-learn's bundled handwritten digits (the default, no download; :ref:`sec-sweep`),
CIFAR-10 and CIFAR-100 and a synthetic learnable set for tests. The file formats (the CIFAR
archives, MNIST's IDX files, the restricted unpickler) are read by refham.files.datafiles; its public
names, `DataError` included, are re-exported here so that `refham.training.data` stays the one entry point.
"""
import math
from dataclasses import dataclass

import numpy

from refham.backend import asarray, rng, xp
from refham.checks import finite_real, integer_at_least
from refham.files.datafiles import (  # re-exported: the file readers' public names
    DataError, load_idx, load_mnist, read_cifar, restricted_unpickle)

__all__ = ["DATASETS", "DataError", "Dataset", "load_dataset", "hold_out", "load_digits",
           "make_synthetic",
           "load_cifar", "read_cifar", "load_idx", "load_mnist", "restricted_unpickle", "batches",
           "normalise", "random_crop", "horizontal_flip", "add_gaussian_noise"]

DATASETS = ("digits", "cifar10", "cifar100", "synthetic")


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
        train = _subset(train, keep)
    return train, test


def hold_out(dataset, fraction, gen):
    """(kept, held) Datasets: round(fraction·n_k) images of each class k, drawn with `gen`, are
    held out (a validation split: stratified, so every class with ≥ 1/(2·fraction) images is
    in it); both keep the original order and `dataset`'s normalisation constants."""
    held, kept = _stratified_split(dataset.labels, _check_fraction(fraction, False, "val_fraction"),
                                   _check_gen(gen), "val_fraction")
    return _subset(dataset, kept), _subset(dataset, held)


def check_every_class(dataset, what, advice):
    """DataError unless `dataset` (a split: `what`) holds images of every one of its classes:
    a model trained without some classes is silently another experiment."""
    present = len(numpy.unique(dataset.labels))
    if present < dataset.num_classes:
        raise DataError(f"the {what} holds images of only {present} of the {dataset.num_classes} "
                        f"classes of {dataset.name} ({len(dataset)} images): {advice}")


def _subset(dataset, index):
    """The images `index` of `dataset`, with its classes, name and normalisation constants."""
    return Dataset(dataset.images[index], dataset.labels[index], dataset.num_classes,
                   dataset.name, dataset.mean, dataset.std)


def _check_fraction(fraction, allow_one, what="train_fraction"):
    """A fraction in (0, 1), or (0, 1] where `allow_one`, returned as a float."""
    if not (isinstance(fraction, (int, float)) and 0 < fraction
            and (fraction < 1 or allow_one and fraction == 1)):
        raise DataError(f"{what} must be a number in (0, 1{']' if allow_one else ')'}, "
                        f"got {fraction!r}")
    return float(fraction)


def _stratified_split(labels, fraction, gen, what="train_fraction"):
    """Indices (chosen, rest), both sorted: round(fraction·n_k) random images of each class k."""
    chosen = []
    for k in numpy.unique(labels):
        members = gen.permutation(numpy.flatnonzero(labels == k))
        chosen.append(members[:round(fraction * len(members))])
    chosen = numpy.sort(numpy.concatenate(chosen))
    rest = numpy.setdiff1d(numpy.arange(len(labels)), chosen)
    if len(chosen) == 0 or (fraction < 1 and len(rest) == 0):
        raise DataError(f"{what}={fraction} leaves an empty split of {len(labels)} images")
    return chosen, rest


def load_digits(train_fraction=0.8, seed=0):
    """scikit-learn's handwritten digits (1,797 images, 8×8×1): pixels p ∈ {0…16} mapped to
    p/16·2 − 1 ∈ [−1, 1] (:ref:`sec-sweep`), split into (train, test) by class with a seeded
    shuffle."""
    from sklearn.datasets import load_digits as sklearn_digits

    fraction = _check_fraction(train_fraction, False)
    bunch = sklearn_digits()
    images = (bunch.images / 16.0 * 2.0 - 1.0).astype(numpy.float32)[:, None]  # (1797, 1, 8, 8)
    labels = bunch.target.astype(numpy.int64)
    train, test = _stratified_split(labels, fraction, rng(seed))
    return tuple(Dataset(images[i], labels[i], 10, "digits", (0.0,), (1.0,))
                 for i in (train, test))


def make_synthetic(n_train=256, n_test=128, image_size=8, in_chans=1, num_classes=4, seed=0,
                   noise=0.5):
    """A learnable set: image = template_k + noise·N(0, 1), one N(0, 1) template per class k,
    balanced classes. Returns (train, test) sharing the templates."""
    sizes = dict(n_train=n_train, n_test=n_test, image_size=image_size, in_chans=in_chans)
    for key, value in dict(sizes, num_classes=num_classes).items():
        if not isinstance(value, int) or value < (2 if key == "num_classes" else 1):
            raise DataError(f"make_synthetic: {key} must be a positive integer "
                            f"(num_classes ≥ 2), got {value!r}")
    finite_real("make_synthetic: noise", noise, DataError, allow_zero=True)
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
def load_cifar(path, num_classes=10, verify_md5=False):
    """CIFAR-10/100 (train, test) Datasets from what `read_cifar` accepts (the official archive,
    python or binary, or its folder): pixels p/255 as float32 (N, 3, 32, 32), normalised with the
    training split's per-channel mean and std."""
    splits = read_cifar(path, num_classes, verify_md5)  # ((uint8 (N, 3, 32, 32), labels (N,)),)*2
    mean, std = _pixel_stats(splits[0][0])
    name = f"cifar{num_classes}"
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


# --------------------------------------------------------------- batching and augmentation
def batches(dataset, batch_size, gen=None, drop_last=False, on_device=True):
    """Yield (images, labels) mini-batches on the active backend — images (B, C, H, W) in the
    default dtype, labels (B,) int64 — covering the dataset once, shuffled by `gen` if given.
    With on_device=False they stay host NumPy arrays (the dataset's own dtypes): a rank of a
    data-parallel run then uploads only its shard."""
    if not isinstance(dataset, Dataset):
        raise TypeError(f"batches needs a refham.training.data.Dataset, got {type(dataset).__name__}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise DataError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = numpy.arange(len(dataset)) if gen is None else _check_gen(gen).permutation(len(dataset))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for start in range(0, stop, batch_size):
        index = order[start:start + batch_size]
        if not on_device:
            yield dataset.images[index], dataset.labels[index]
            continue
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
    integer_at_least("pad", pad, 0, DataError)
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
    """x + σ·ε, ε ~ N(0, 1) fresh for every call (:ref:`sec-sweep`: every training batch)."""
    images = _check_images(images)
    finite_real("sigma", sigma, DataError, allow_zero=True)
    noise = asarray(_check_gen(gen).standard_normal(images.shape), dtype=images.dtype)
    return images + sigma * noise
