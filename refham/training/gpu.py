"""What a training run does on a GPU before its first timed step: the TF32 matmul mode of the run,
and a warm-up step that compiles every kernel the step launches.

    with tf32_mode(cfg.tf32):            # restores the previous mode afterwards
        warm_up(loop.warm_up_step, train_set, cfg.batch_size)   # CuPy compiles on first use

CuPy compiles each elementwise, reduction and fused kernel (refham.fast) the first time it meets
a dtype and shape rank, a second or more per kernel without its disk cache; inside the first step
that time would count as training time and throughput. Off the GPU both are no-ops (TF32 on a
CPU backend is an error: it is a GPU matmul mode).
"""
import contextlib

from refham.backend import backend_name, set_tf32, tf32_enabled, xp
from refham.training.data import batches
from refham.training.train_config import TrainConfigError


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


def warm_up(trial_step, dataset, batch_size):
    """On the cupy backend, run `trial_step(images, labels)` — one whole training step (batch
    preparation, loss and gradients, allreduce, clipping, the optimiser update, the step's fetch)
    whose result the caller discards — on the first global batch of `dataset`, so that CuPy
    compiles its kernels here, outside the timed steps. Elsewhere nothing runs."""
    if backend_name() != "cupy":
        return
    trial_step(*next(batches(dataset, min(batch_size, len(dataset)))))
    xp.cuda.runtime.deviceSynchronize()
