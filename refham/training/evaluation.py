"""Evaluation of a Mixer: loss and top-1 accuracy over a dataset (sharded over MPI ranks when
there are several), and of a saved checkpoint on the test split it was trained against.

    result = evaluate_checkpoint("runs/train/best.npz")     # {"loss", "acc", "n", "step", …}
"""
import dataclasses
import math

from refham.backend import active_backend, asarray, get_dtype
from refham.checks import integer_at_least
from refham.files.checkpoint import CheckpointError, load_checkpoint
from refham.training.data import batches, load_dataset, normalise
from refham.training.distributed import SingleProcess, shard
from refham.layers import _cross_entropy_forward
from refham.files.memory import mixer_bytes, require
from refham.mixer import Mixer, MixerConfig, check_params
from refham.training.resume import check_parameters
from refham.training.step import fetch_scalars
from refham.training.train_config import TrainConfig, TrainConfigError


def evaluate(model, params, dataset, batch_size=256, comm=SingleProcess()):
    """Plain cross-entropy (no smoothing, no penalty) and top-1 accuracy over `dataset`, whose
    images are normalised with its own per-channel mean/std. → {"loss", "acc", "n"}.
    Under a communicator of N ranks each rank evaluates its shard (`distributed.shard`) and the
    sums of loss and correct are reduced, so that every rank gets the whole set's numbers.
    The parameters are checked once; each batch runs the unchecked cores (the dataset's images
    and labels were checked when it was made) and makes one device→host transfer
    (`fetch_scalars`)."""
    check_params(model.param_shapes, params)
    dtype = params["stem.proj.weight"].dtype
    total_loss, correct = 0.0, 0
    rows = shard(len(dataset), comm)
    part = dataset if comm.size == 1 else dataclasses.replace(
        dataset, images=dataset.images[rows], labels=dataset.labels[rows])
    for images, labels in batches(part, batch_size) if rows.stop > rows.start else ():
        x = normalise(images, dataset.mean, dataset.std).astype(dtype, copy=False)
        logits, _ = model._forward(params, x)
        loss, _ = _cross_entropy_forward(logits, labels, 0.0)
        batch_loss, batch_correct = fetch_scalars(loss, (logits.argmax(axis=-1) == labels).sum())
        total_loss += batch_loss * len(labels)
        correct += int(batch_correct)
    if comm.size > 1:
        total_loss, correct = comm.sum([total_loss, correct])
    return {"loss": total_loss / len(dataset), "acc": int(correct) / len(dataset),
            "n": len(dataset)}


def evaluate_checkpoint(path, data_path=None, batch_size=256, backend=None, threads=1):
    """Test loss and accuracy of the checkpoint at `path`, rebuilding its model and test split
    from the settings stored in it (`data_path` overrides where the CIFAR archive now lives),
    on `backend` (None: the active one, as REFHAM_BACKEND chose)."""
    integer_at_least("batch_size", batch_size, 1, TrainConfigError)
    integer_at_least("threads", threads, 0, TrainConfigError)
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
