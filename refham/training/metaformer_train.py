"""Training the Energy MetaFormer (:ref:`sec-metaformer`) as a denoiser: Adam on the unrolled
loss of refham.metaformer, minibatches with fresh noise, both test losses per epoch, a checkpoint
per epoch in a locked run folder, data-parallel under mpiexec.

    summary = train(TrainSettings(data="digits", out="runs/metaformer"))
"""
import dataclasses
import json
import os
import time

import numpy
from tqdm import tqdm

from refham.backend import asarray, backend_name, get_dtype, rng
from refham.checks import finite_real, integer_at_least
from refham.files.checkpoint import save_checkpoint
from refham.training.data import load_digits, load_mnist, make_synthetic
from refham.training.distributed import (
    COMMS, ShardedGenerator, broadcast_state, get_communicator, shard)
from refham.files.memory import metaformer_bytes, require
from refham.metaformer import (
    ALPHA, EVAL_CHUNK, NOISE_STD, TARGETS, MetaFormerError, check_choice, denoising_losses,
    init_weights, loss_and_grads, loss_floor, normalise_images)
from refham.optim import AdamW
from refham.training.run_folder import RunFolder
from refham.training.step import optimiser_step

DATASETS = ("digits", "mnist", "synthetic")
PAPER_SETTINGS = dict(data="mnist", hidden=900, steps=10, lr=1e-4, batch_size=512, epochs=100)


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """A training run. Defaults: built-in digits (D = 64; small matrices, so OMP_NUM_THREADS=1:
    BLAS threads only add overhead; its time is in docs/performance.md);
    `PAPER_SETTINGS` are the paper's MNIST ones (D = 784, N_h = 900, T = 10, lr 1e-4, batch 512,
    100 epochs). Adam with the notebook's optax.adam defaults (β = 0.9, 0.999, ε = 1e-8)."""
    data: str = "digits"
    data_path: str = None
    hidden: int = 256       # N_h
    steps: int = 10         # T
    alpha: float = ALPHA
    lr: float = 1e-3
    batch_size: int = 32
    epochs: int = 40
    target: str = "clean"
    seed: int = 0
    out: str = "runs/metaformer"
    progress: bool = True
    comm: str = "auto"      # data parallelism under mpiexec (refham.training.distributed.get_communicator)
    max_memory: float = None  # GiB the run may use (default: the memory available)

    def __post_init__(self):
        check_choice("data", self.data, DATASETS)
        check_choice("comm", self.comm, COMMS)
        check_choice("target", self.target, TARGETS)
        if (self.data == "mnist") != (self.data_path is not None):
            raise MetaFormerError("--data mnist needs --data-path DIR (the folder with "
                                  "train-images-idx3-ubyte[.gz]); the other datasets take none")
        for name, least in (("hidden", 1), ("steps", 1), ("batch_size", 1), ("epochs", 1),
                            ("seed", 0)):
            integer_at_least(name, getattr(self, name), least, MetaFormerError)
        if not isinstance(self.out, str) or not self.out.strip():
            raise MetaFormerError(f"out must name the run's folder, got {self.out!r}")
        if self.max_memory is not None:
            finite_real("max_memory (GiB)", self.max_memory, MetaFormerError)
        for name in ("alpha", "lr"):
            finite_real(name, getattr(self, name), MetaFormerError)



def load_images(data, data_path=None, seed=0):
    """(train, test, test_split): host arrays (N, H, W) in the dataset's [0, 1] scaling — digits
    p/16 (the seeded 80/20 split of refham.training.data), MNIST p/255 (`data_path`: the folder or its
    training-images file; test: t10k-images… beside it, or else a seeded 10% of the training
    images, held out), synthetic: refham.training.data's templates + noise — and a word on the test split."""
    if data == "digits":
        train, test = ((split.images[:, 0] + 1.0) / 2.0 for split in load_digits(0.8, seed))
        return train, test, "the digits test split (20%)"
    if data == "synthetic":
        train, test = (split.images[:, 0] for split in make_synthetic(seed=seed))
        return train, test, "the synthetic test split"
    train, _ = load_mnist(data_path, "train")
    folder = data_path if os.path.isdir(data_path) else os.path.dirname(data_path) or "."
    if any(name.startswith("t10k-images") for name in os.listdir(folder)):
        test = load_mnist(folder, "test")[0]
        if test.shape[1:] != train.shape[1:]:
            raise MetaFormerError(f"{folder}: test images are {test.shape[1:]}, training images "
                                  f"{train.shape[1:]}; both splits need one image size")
        return train, test, "MNIST t10k"
    if len(train) < 10:
        raise MetaFormerError(f"{data_path}: {len(train)} training images and no t10k file; "
                              f"at least 10 are needed to hold out a test split")
    held_out = rng(seed).permutation(len(train))[:len(train) // 10]
    keep = numpy.setdiff1d(numpy.arange(len(train)), held_out)
    return train[keep], train[held_out], "10% of the training images, held out (no t10k file)"


def train(settings, echo=False):
    """Adam on the denoising loss, minibatches with fresh noise 0.3·N(0,1); after every epoch both
    test losses (fixed noise), a line in `metrics.jsonl` and `last.npz` in `settings.out`, which
    is locked for the run (RunLocked if another process writes there). Raises MetaFormerError if
    `out` already holds a run or the loss or an update stops being finite.
    Under mpiexec each rank takes its shard of every batch (noise drawn for the whole batch, as
    one process does) and of the test set; one allreduce per step combines the gradients; rank 0
    alone locks and writes the folder."""
    comm = get_communicator(settings.comm, backend_name())
    with RunFolder(settings.out, comm) as folder:
        return _train_in_folder(settings, echo, comm, folder)


def _train_in_folder(settings, echo, comm, folder):
    """`train`, once rank 0 holds the lock on `folder` (a RunFolder)."""
    s = settings
    if s.batch_size % comm.size:
        raise MetaFormerError(f"batch_size {s.batch_size} is the global batch, split evenly over "
                              f"the {comm.size} ranks: choose a multiple of {comm.size}")
    train_images, test_images, test_split = load_images(s.data, s.data_path, s.seed)
    clean_train, clean_test = normalise_images(train_images), normalise_images(test_images)
    visible_size = clean_train.shape[1]
    batch = max(min(s.batch_size, len(clean_train)), min(EVAL_CHUNK, len(clean_test)))
    require(metaformer_bytes(visible_size, s.hidden, batch, s.steps, get_dtype()(0).itemsize),
            f"training the Energy MetaFormer (D = {visible_size}, N_h = {s.hidden}, T = "
            f"{s.steps}, batch {s.batch_size})", s.max_memory,
            advice="lower --hidden, --steps or --batch-size")
    if os.path.exists(folder.path("last.npz")):
        raise MetaFormerError(f"{s.out} already holds a run (last.npz); choose another --out")
    folder.write("metrics.jsonl", "")
    config = {**dataclasses.asdict(s), "visible": visible_size, "noise_std": NOISE_STD,
              "image_shape": train_images.shape[1:], "loss_floor": loss_floor(visible_size),
              "test_split": test_split, "world_size": comm.size}
    weights = init_weights(visible_size, s.hidden, s.seed)
    optimizer = AdamW(weight_decay=0.0)  # plain Adam, as the notebook's optax.adam(lr)
    opt_state, gen = optimizer.init(weights), rng(s.seed)
    if comm.size > 1:
        weights, opt_state = broadcast_state(comm, weights, opt_state)
    rows = shard(len(clean_test), comm)
    test_clean = asarray(clean_test[rows])
    test_noise = asarray(NOISE_STD * rng(s.seed + 1).standard_normal(clean_test.shape)[rows])

    def evaluate():
        losses = denoising_losses(weights, test_clean, test_noise, s.steps, s.alpha)
        if comm.size == 1:
            return losses
        share = (rows.stop - rows.start) / len(clean_test)
        return dict(zip(TARGETS, comm.sum([losses[t] * share for t in TARGETS])))

    history, started = [{"epoch": 0, **_prefixed(evaluate())}], time.perf_counter()
    for epoch in range(1, s.epochs + 1):
        weights, opt_state, train_loss = _train_epoch(
            s, epoch, comm, folder, clean_train, gen, optimizer, weights, opt_state)
        history.append({"epoch": epoch, "train_loss": train_loss, **_prefixed(evaluate()),
                        "seconds": time.perf_counter() - started})
        if not folder.writer:
            continue
        folder.append_line("metrics.jsonl", json.dumps(history[-1]))
        save_checkpoint(folder.path("last.npz"), weights, opt_state, step=opt_state["step"],
                        epoch=epoch, rng_state=gen.bit_generator.state, config=config,
                        metrics=history[-1])
        if echo:
            tqdm.write(_epoch_line(history[-1], s))
    return {"history": history, "out": s.out, "loss_floor": loss_floor(visible_size),
            "checkpoint": folder.path("last.npz"), "visible": visible_size,
            "test_split": test_split}


def _train_epoch(s, epoch, comm, folder, clean_train, gen, optimizer, weights, opt_state):
    """One pass over `clean_train` in the order `gen` draws, each batch with fresh noise drawn
    from `gen` and one shared optimiser step (refham.training.step) → (weights, optimiser
    state, mean training loss)."""
    order, loss_sum = gen.permutation(len(clean_train)), 0.0
    for start in tqdm(range(0, len(order), s.batch_size), leave=False, dynamic_ncols=True,
                      disable=not (s.progress and folder.writer), desc=f"epoch {epoch}/{s.epochs}"):
        batch = clean_train[order[start:start + s.batch_size]]
        part = shard(len(batch), comm)
        draw = gen if comm.size == 1 else ShardedGenerator(gen, len(batch), part)
        clean = asarray(batch[part])
        noise = asarray(NOISE_STD * draw.standard_normal(clean.shape))

        def denoising_loss(w, clean=clean, noise=noise):
            loss, grads = loss_and_grads(w, clean, noise, s.steps, s.alpha, s.target)
            return loss, 0, grads
        weights, opt_state, scalars = optimiser_step(
            weights, opt_state, denoising_loss, optimizer, s.lr,
            lambda what: _diverged(epoch, what), comm=comm, n_local=len(clean),
            n_global=len(batch))
        loss_sum += scalars.loss * len(batch)
    return weights, opt_state, loss_sum / len(order)


def _diverged(epoch, what):
    """The MetaFormerError of a step of `epoch` whose loss or update (`what`) is not finite:
    nothing of that step is kept, and the checkpoint of the epoch before stays."""
    kept = f"last.npz of epoch {epoch - 1} is kept" if epoch > 1 else "no checkpoint was written"
    return MetaFormerError(f"training diverged in epoch {epoch}: {what}; {kept}. Lower --lr or "
                           f"--alpha")


def _prefixed(losses):
    return {f"test_loss_{target}": value for target, value in losses.items()}


def _epoch_line(record, s):
    return (f"epoch {record['epoch']:>3}/{s.epochs}  train loss ({s.target}) "
            f"{record['train_loss']:.5f}  test loss: paper {record['test_loss_clean']:.5f}, "
            f"standardised {record['test_loss_standardised']:.5f}  [{record['seconds']:.0f} s]")

