"""What a training run does on a GPU before its first timed step: the TF32 matmul mode of the run,
and a warm-up step that compiles every kernel the step launches.

    with tf32_mode(cfg.tf32):            # restores the previous mode afterwards
        warm_up(run, prepare_batch)      # outside the timed steps: CuPy compiles on first use

CuPy compiles each elementwise, reduction and fused kernel (refham.fast) the first time it meets
a dtype and shape rank, a second or more per kernel without its disk cache; inside the first step
that time would count as training time and throughput. Off the GPU both are no-ops (TF32 on a
CPU backend is an error: it is a GPU matmul mode).
"""
import contextlib

from refham.backend import backend_name, rng, set_tf32, tf32_enabled, xp
from refham.training.distributed import shard
from refham.training.noise import step_generator
from refham.training.train_config import TrainConfigError

WARM_UP_STREAM = 4      # rng((seed, 4)): the warm-up's throwaway draws, apart from training's


@contextlib.contextmanager
def tf32_mode(enabled):
    """Run with float32 matrix products in TF32 (`enabled`) or in float32, then restore."""
    if backend_name() != "cupy":
        if enabled:
            raise TrainConfigError("--tf32 is a GPU matmul mode: it needs --backend cupy")
        yield
        return
    previous = tf32_enabled()
    set_tf32(enabled)
    try:
        yield
    finally:
        set_tf32(previous)


def warm_up(run, prepare_batch):
    """On the cupy backend, run one training step's computation on this rank's first shard-sized
    batch and discard it — augmentation (`prepare_batch(images, dataset, cfg, gen)`), loss and
    gradients with drop path, the optimiser update, the accuracy count — so that CuPy compiles
    its kernels here, outside the timed steps. `run` is the training loop's run (model, params,
    optimizer, opt_state, train_set, cfg, comm); its state is not changed."""
    if backend_name() != "cupy":
        return
    cfg, dataset = run.cfg, run.train_set
    n = min(cfg.batch_size, len(dataset))
    rows = shard(n, run.comm)
    if rows.stop == rows.start:
        return
    from refham.training.data import batches
    images, labels = next(batches(dataset, n))
    images, labels = images[rows], labels[rows]
    gen = step_generator(rng((cfg.seed, WARM_UP_STREAM)), cfg.noise_rng,
                         (cfg.seed, WARM_UP_STREAM, 0), n, rows)   # the steps' noise kernels too
    x = prepare_batch(images, dataset, cfg, gen)
    _, logits, grads = run.model.loss_and_grads(
        run.params, x, labels, label_smoothing=cfg.label_smoothing, drop_rng=gen)
    run.optimizer.update(run.params, grads, run.opt_state, cfg.lr)
    (logits.argmax(axis=-1) == labels).sum()
    xp.cuda.runtime.deviceSynchronize()
