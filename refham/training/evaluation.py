"""Evaluation of a Mixer: loss and top-1 accuracy over a dataset (sharded over MPI ranks when
there are several), and of a saved checkpoint on the test split it was trained against.

    result = evaluate_checkpoint("runs/train/best.npz")     # {"loss", "acc", "n", "step", …}
"""
import contextlib
import dataclasses
import math
import os
import warnings

from threadpoolctl import threadpool_limits

from refham.backend import asarray, backend_name, get_dtype, set_backend, set_dtype, to_numpy
from refham.files.checkpoint import CheckpointError, load_checkpoint
from refham.training.data import batches, load_dataset, normalise
from refham.training.distributed import SingleProcess, shard
from refham.layers import cross_entropy_forward
from refham.files.memory import mixer_bytes, require
from refham.mixer import Mixer, MixerConfig
from refham.training.resume import check_parameters
from refham.training.train_config import TrainConfig, TrainConfigError


@contextlib.contextmanager
def active_backend(name, dtype, threads=0):
    """Run with backend `name`, default dtype `dtype` and at most `threads` BLAS threads (0: as
    the BLAS library likes; threadpoolctl, a scikit-learn dependency, sets it; more than the
    cores this process may use: that many, with a warning); restore after."""
    saved = backend_name(), get_dtype()
    set_backend(name)
    set_dtype(dtype)
    available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count() or 1
    if threads > available:     # more would only make the threads wait for each other
        warnings.warn(f"--threads {threads} exceeds the {available} cores this process may use: "
                      f"using {available}", stacklevel=3)
        threads = available
    try:
        with threadpool_limits(limits=threads or None, user_api="blas"):
            yield
    finally:
        set_backend(saved[0])
        set_dtype(saved[1])



def evaluate(model, params, dataset, batch_size=256, comm=SingleProcess()):
    """Plain cross-entropy (no smoothing, no penalty) and top-1 accuracy over `dataset`, whose
    images are normalised with its own per-channel mean/std. → {"loss", "acc", "n"}.
    Under a communicator of N ranks each rank evaluates its shard (`distributed.shard`) and the
    sums of loss and correct are reduced, so that every rank gets the whole set's numbers."""
    total_loss, correct = 0.0, 0
    rows = shard(len(dataset), comm)
    part = dataset if comm.size == 1 else dataclasses.replace(
        dataset, images=dataset.images[rows], labels=dataset.labels[rows])
    for images, labels in batches(part, batch_size) if rows.stop > rows.start else ():
        logits, _ = model.forward(params, normalise(images, dataset.mean, dataset.std))
        loss, _ = cross_entropy_forward(logits, labels)
        total_loss += float(to_numpy(loss)) * len(labels)
        correct += int(to_numpy((logits.argmax(axis=-1) == labels).sum()))
    if comm.size > 1:
        total_loss, correct = comm.sum([total_loss, correct])
    return {"loss": total_loss / len(dataset), "acc": int(correct) / len(dataset),
            "n": len(dataset)}


def evaluate_checkpoint(path, data_path=None, batch_size=256, backend="numpy", threads=1):
    """Test loss and accuracy of the checkpoint at `path`, rebuilding its model and test split
    from the settings stored in it (`data_path` overrides where the CIFAR archive now lives)."""
    for name, value, least in (("batch_size", batch_size, 1), ("threads", threads, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise TrainConfigError(f"{name} must be an integer >= {least}, got {value!r}")
    ck = load_checkpoint(path)
    try:
        cfg = TrainConfig.from_dict(ck.config["train"])
        config = MixerConfig(**ck.config["model"])
    except (KeyError, TypeError) as exc:
        raise CheckpointError(f"{path}: no usable training/model settings ({exc})") from exc
    check_parameters(ck.params, path, cfg.dtype, config)
    dtype = cfg.dtype
    with active_backend(backend, dtype, threads):
        _, test = load_dataset(cfg.data, data_path or cfg.data_path,
                               train_fraction=cfg.train_fraction, seed=cfg.data_seed)
        require(mixer_bytes(config, min(batch_size, len(test)), get_dtype()(0).itemsize,
                            training=False),
                f"evaluating {path} on batches of {batch_size}", advice="lower --batch-size")
        params = {k: asarray(v, dtype=v.dtype) for k, v in ck.params.items()}
        result = evaluate(Mixer(config), params, test, batch_size)
    if not math.isfinite(result["loss"]):
        raise CheckpointError(f"{path}: the test loss is {result['loss']} — the model's outputs "
                              f"overflow in {dtype} (weights up to "
                              f"{max(float(abs(a).max()) for a in ck.params.values()):.3g}); it "
                              f"holds a diverging run, use an earlier checkpoint")
    return {**result, "step": ck.step, "epoch": ck.epoch, "data": cfg.data, "model": cfg.model}
