"""Memory budgets: estimate the bytes a computation needs BEFORE allocating it, and refuse with
the estimate when it exceeds what the machine has (or a limit the user set).

    need = mixer_bytes(config, batch=64, itemsize=4, optimizer_slots=2)
    require(need, "training this Mixer", limit=cfg.max_memory)   # MemoryLimitError if too much

The estimates count the large arrays only (parameters, their gradients and optimiser moments, the
activations a forward pass keeps for the backward one) and are meant to be within a small factor
of the real peak: enough to refuse a `--depth 100000` in milliseconds instead of meeting the OOM
killer after minutes, not to predict the peak to the byte. The budget is the memory the kernel
reports as available (`MemAvailable` of /proc/meminfo, else os.sysconf's free pages) or the
user's limit, whichever is smaller; on the cupy backend the GPU's free memory too.
"""
import dataclasses
import math
import os

from refham.backend import device_memory
from refham.checks import finite_real
from refham.errors import RefhamError
from refham.mixer import param_shapes

GIB = 1 << 30


class MemoryLimitError(RefhamError, ValueError):
    """A computation or file would need more memory than the machine has or the user allows."""


def available_bytes():
    """Memory the kernel can give this process now without swapping: /proc/meminfo's
    MemAvailable, else free pages × page size from os.sysconf; None where neither exists."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_limit(limit, what="max_memory"):
    """`limit` in GiB (None: no user limit) after checking it is a finite number > 0."""
    return None if limit is None else finite_real(f"{what} (GiB)", limit, MemoryLimitError)


def budget(limit=None):
    """(bytes allowed, where the figure comes from): the smallest of the available memory, the
    free memory of the current GPU (cupy backend) and `limit` GiB."""
    limit = check_limit(limit)
    available = available_bytes()
    candidates = [(available, "available on this machine")] if available else []
    gpu = device_memory()       # on the cupy backend the arrays live in the GPU's memory
    if gpu is not None:
        candidates.append((gpu[0], "free on this GPU"))
    if limit is not None:
        candidates.append((int(limit * GIB), "allowed by --max-memory"))
    return min(candidates, default=(None, "unknown"), key=lambda c: c[0])


def describe(nbytes):
    """A byte count for people: '1.5 GiB', '12.0 MiB', '512 B'."""
    for unit, size in (("TiB", 1 << 40), ("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if nbytes >= size:
            return f"{nbytes / size:.1f} {unit}"
    return f"{int(nbytes)} B"


def require(nbytes, what, limit=None, advice="use a smaller model or batch"):
    """Raise MemoryLimitError when `nbytes` (the estimate of `what`) exceeds the budget."""
    allowed, source = budget(limit)
    if allowed is not None and nbytes > allowed:
        raise MemoryLimitError(f"{what} would need about {describe(nbytes)} of memory, more "
                               f"than the {describe(allowed)} {source}: {advice}")


def elements(*shapes):
    """Total number of elements of arrays of the given shapes (Python ints: never overflows)."""
    return sum(math.prod(int(d) for d in shape) for shape in shapes)


def mixer_bytes(config, batch, itemsize, optimizer_slots=2, training=True):
    """Estimated peak bytes of a Mixer (X-serial-block, X-parallel-block) with `config` on
    batches of `batch` images, training (one step of loss, gradients and T-adamw) or not:

        P·itemsize·(1 + training·(4 + slots))      parameters; gradients, optimiser moments
                                                   (slots: 2 AdamW, 1 SGD) and the update's
                                                   temporaries
      + B·(C_in·H·W + depth·n_iter·(4·S·C + 2·(C·N_s + S·N_c)))·itemsize
                                                   the images, and per residual step what the
                                                   forward caches for the backward (input, LN
                                                   statistics, normalised input, both MLPs'
                                                   hidden units before and after the activation)

    tests/test_safefiles.py holds it within 1.5× of tracemalloc's peak of a training step. P is
    read from the parameter layout `mixer.param_shapes` of the model at depths 1 and 2 (the stem
    and head, and one block), never by building the names of 10⁵ blocks."""
    one, two = (parameter_count(dataclasses.replace(config, depth=d)) for d in (1, 2))
    params = one + (config.depth - 1) * (two - one)
    S, C = config.num_tokens, config.dim
    per_image = config.in_chans * config.image_size ** 2 + config.depth * config.n_iter * (
        4 * S * C + 2 * (C * config.token_hidden + S * config.channel_hidden))
    return (params * (1 + training * (4 + optimizer_slots)) + batch * per_image) * itemsize


def parameter_count(config):
    """P, the number of parameters of a Mixer with `config` (`mixer.param_shapes`)."""
    return elements(*param_shapes(config).values())


def ham_descent_bytes(weight_shapes, layer_shapes, batch, steps, itemsize=8):
    """Estimated bytes of `steps` descent steps (H5) of a HAM: the weights (drawn in float64,
    then cast), and the states of every recorded step plus three steps' temporaries
    (activations, ∂E/∂g, the new state)."""
    weights = elements(*weight_shapes) * (itemsize + 8)
    states = batch * elements(*layer_shapes) * itemsize * (steps + 4)
    return weights + states


def require_three_layer_ham(visible, hidden, batch, steps, itemsize=8, limit=None):
    """MemoryLimitError, before the s — v — c HAM of the Energy MetaFormer (D = `visible`,
    N_h = `hidden`) is built, when its weights and `steps` recorded descent steps of `batch`
    states would not fit (the HAM itself allocates what it is asked for)."""
    need = ham_descent_bytes([(hidden, visible)] * 2, [(hidden,), (visible,), (hidden,)], batch,
                             steps, itemsize)
    require(need, f"the HAM s—v—c (D={visible}, N_h={hidden}) with {batch} state(s) × "
            f"{steps + 1} step(s)", limit,
            advice="use fewer or smaller layers, a smaller batch or fewer steps")


def metaformer_bytes(visible, hidden, batch, steps, itemsize):
    """Estimated peak bytes of training the Energy MetaFormer (F-dynamics, F-loss): the two
    weight matrices 2·D·N_h with their gradients, Adam moments and an update's copy (×5), and
    per image the states, activations and caches of T unrolled steps over the D + 2·N_h units
    (×4 per step) that backprop through the dynamics keeps."""
    units = visible + 2 * hidden
    return (5 * 2 * visible * hidden + batch * units * (4 * steps + 4)) * itemsize
