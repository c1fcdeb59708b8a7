"""The Energy MetaFormer (:ref:`sec-metaformer`; arXiv 2406.12220 Sec. 4.2, Figs. 2b and 2c): the
three-layer HAM s — v — c trained as a denoiser by backprop through its own dynamics.

    v: layernorm Lagrangian (γ = 1, δ = 0, ε = 1e-5) over the D pixels, g_v = LN(x_v)
    s, c: relu Lagrangians of N_h units;  E_sv = −⟨g_s, W_sv g_v⟩,  E_vc = −⟨g_v, W_vc g_c⟩
    x⁰ = {s: 0, v: clean + noise, c: 0},  x^{t+1} = x^t − α ∂E/∂g(x^t)    (H5), t < T
    loss = mean((g_v(x_v^T) − y)²),  y = clean ("clean", the paper's) or LN(clean) ("standardised")

`clean` is an image flattened and divided by its L2 norm; `noise` is 0.3·N(0,1) in training.
The paper's loss is bounded below by (1 − 1/√D)² (`loss_floor`): ‖g_v‖ = √D while ‖clean‖ = 1,
so it trains the cosine between g_v and the image; "standardised" is the well-posed variant.

    loss, grads = loss_and_grads(weights, clean, noise, T=10, alpha=0.1)   # {"sv", "vc"}
    summary = train(TrainSettings(data="digits", out="runs/metaformer"))
    write_figures("runs/metaformer/last.npz", "runs/metaformer")         # needs matplotlib

The gradient is hand-written: the forward keeps x⁰…x^T; the backward seeds ∂loss/∂x_v^T with the
layernorm Hessian-vector product (H is symmetric, so the VJP of g is Hv) and runs `HAM.step_vjp`
(the Lagrangians' hvp and the synapses' VJPs) back through the T steps, summing ∂loss/∂W.
"""
import dataclasses
import functools
import json
import math
import os
import time

import numpy
from tqdm import tqdm

from refham.backend import asarray, backend_name, get_dtype, rng, to_numpy, xp
from refham.checkpoint import (
    atomic_write, describe_names, load_checkpoint, nonfinite_entries, save_checkpoint)
from refham.data import load_digits, load_mnist, make_synthetic
from refham.distributed import (
    COMMS, ShardedGenerator, broadcast_state, combine_gradients, get_communicator, shard)
from refham.ham import HAM, Dense, Layer
from refham.lagrangians import LayerNorm, ReLU
from refham.memory import MemoryLimitError, check_limit, metaformer_bytes, require
from refham.optim import AdamW
from refham.outputs import check_output_file, prepare_folder
from refham.runlock import RunLock

NOISE_STD = 0.3
ALPHA = 0.1
TARGETS = ("clean", "standardised")
DATASETS = ("digits", "mnist", "synthetic")
PAPER_SETTINGS = dict(data="mnist", hidden=900, steps=10, lr=1e-4, batch_size=512, epochs=100)
EVAL_CHUNK = 1000  # test images per forward pass: bounds the memory of the kept states


class MetaFormerError(ValueError):
    """Bad weights, data or settings for the Energy MetaFormer, or a diverged training run."""


class PlottingUnavailable(RuntimeError):
    """matplotlib (the optional `plot` extra) is not installed."""


# ---------------------------------------------------------------- the model

def three_layer_ham(visible_shape, n_hidden, eps=1e-5):
    """The Energy MetaFormer's HAM s — v — c (:eq:`F-dynamics`): v has the layernorm Lagrangian
    (γ = 1, δ = 0, ε) over all its D elements, s and c are relu layers of n_hidden units, joined
    by dense synapses "sv" (W_sv ∈ R^{N_h×D}) and "vc" (W_vc ∈ R^{D×N_h}); all τ = 1."""
    shape = tuple(visible_shape) if isinstance(visible_shape, (tuple, list)) else (visible_shape,)
    visible = Layer(shape, LayerNorm(eps=eps, axes=tuple(range(-len(shape), 0))))
    hidden = Layer((n_hidden,), ReLU())
    return HAM({"s": hidden, "v": visible, "c": hidden},
               {"sv": Dense("s", "v"), "vc": Dense("v", "c")})


@functools.lru_cache(maxsize=8)
def _flat_ham(visible_size, n_hidden):
    return three_layer_ham(visible_size, n_hidden)


def ham_for(weights):
    """The s — v — c HAM (flat visible layer of D pixels) that `weights` = {"sv": (N_h, D),
    "vc": (D, N_h)} belong to; the HAM itself checks "vc" and finiteness when it runs."""
    sv = weights.get("sv") if hasattr(weights, "get") else None
    if getattr(sv, "ndim", None) != 2:
        raise MetaFormerError(f"weights must be a dict {{'sv': (N_h, D), 'vc': (D, N_h)}}, got "
                              f"{type(weights).__name__} with 'sv' {getattr(sv, 'shape', sv)!r}")
    n_hidden, visible_size = sv.shape
    return _flat_ham(visible_size, n_hidden)


def init_weights(visible_size, n_hidden, seed):
    """{"sv": 0.02·N(0,1) (N_h, D), "vc": 0.02·N(0,1) (D, N_h)}, drawn with backend.rng(seed)."""
    return _flat_ham(visible_size, n_hidden).init_weights(seed, scale=0.02)


# ---------------------------------------------------------------- the denoising task

def normalise_images(images):
    """Host images (N, *shape) → (N, D) float64: each flattened and divided by its L2 norm."""
    flat = numpy.asarray(images, dtype=numpy.float64).reshape(len(images), -1)
    norms = numpy.linalg.norm(flat, axis=1, keepdims=True)
    blank = numpy.flatnonzero(~(norms[:, 0] > 0) | ~numpy.isfinite(norms[:, 0]))
    if blank.size:
        raise MetaFormerError(f"images {blank[:5].tolist()} are all zero or not finite: they "
                              f"cannot be divided by their L2 norm; remove them")
    return flat / norms


def denoising_target(clean, target):
    """y = clean ("clean", the loss :eq:`F-loss`) or LN(clean) ("standardised", scaled like g_v)."""
    _check_choice("target", target, TARGETS)
    return clean if target == "clean" else LayerNorm(eps=1e-5).activation(clean)


def loss_floor(visible_size):
    """:eq:`F-floor` (1 − 1/√D)², the lower bound of the paper's loss: mean((g − y)²) = (‖g‖² −
    2⟨g, y⟩ + 1)/D with ‖g‖² ≈ D and ⟨g, y⟩ ≤ √D."""
    return (1.0 - 1.0 / math.sqrt(visible_size)) ** 2


@dataclasses.dataclass
class UnrolledCache:
    """What the backward needs: the HAM, weights, α, the states x⁰ … x^T, g_v(x_v^T) − y."""
    ham: HAM
    weights: dict
    alpha: float
    states: list
    output: object    # g_v(x_v^T), (B, D)
    residual: object  # g_v(x_v^T) − y, (B, D)


def forward(weights, clean, noise, T, alpha=ALPHA, target="clean", hidden_start=None):
    """x⁰ = {s: 0, v: clean + noise, c: 0}; T steps of :eq:`H5` with α on all layers
    (:eq:`F-dynamics`); loss = mean((g_v(x_v^T) − y)²) (:eq:`F-loss`) over batch and pixels.
    Returns (loss, UnrolledCache). `hidden_start` = {"s": (B, N_h), "c": (B, N_h)} replaces the
    zero hidden start states (with zeros g_s⁰ = g_c⁰ = 0, so W first acts in step 2 and T = 1 has
    zero gradient)."""
    ham = ham_for(weights)
    if getattr(clean, "shape", None) != getattr(noise, "shape", None) or clean.ndim != 2:
        raise MetaFormerError(f"clean and noise must both be (B, D), got "
                              f"{getattr(clean, 'shape', clean)} and "
                              f"{getattr(noise, 'shape', noise)}")
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise MetaFormerError(f"T, the number of unrolled steps, must be an integer >= 1, "
                              f"got {T!r}")
    if hidden_start is None:
        zeros = xp.zeros((clean.shape[0], ham.layers["s"].shape[0]), dtype=clean.dtype)
        hidden_start = {"s": zeros, "c": zeros}
    states = [{"s": hidden_start["s"], "v": clean + noise, "c": hidden_start["c"]}]
    for _ in range(T):
        states.append(ham.step(states[-1], weights, alpha))
    output = ham.layers["v"].lagrangian.activation(states[-1]["v"])
    residual = output - denoising_target(clean, target)
    cache = UnrolledCache(ham, weights, alpha, states, output, residual)
    return xp.mean(residual * residual), cache


def backward(cache):
    """∂loss/∂W for W in {sv, vc}: seed c_v^T = H_v(x_v^T)·2(g_v − y)/(B·D), c_s^T = c_c^T = 0,
    then for t = T−1 … 0: (c^t, ∂W^t) = HAM.step_vjp(x^t, c^{t+1}); ∂loss/∂W = Σ_t ∂W^t (one W
    serves every step)."""
    ham, final = cache.ham, cache.states[-1]
    seed = 2.0 * cache.residual / cache.residual.size
    cotangents = {"s": xp.zeros_like(final["s"]), "c": xp.zeros_like(final["c"]),
                  "v": ham.layers["v"].lagrangian.hvp(final["v"], seed)}
    grads = {name: xp.zeros_like(w) for name, w in cache.weights.items()}
    for xs in reversed(cache.states[:-1]):
        cotangents, step_grads = ham.step_vjp(xs, cache.weights, cache.alpha, cotangents)
        grads = {name: grads[name] + step_grads[name] for name in grads}
    return grads


def loss_and_grads(weights, clean, noise, T, alpha=ALPHA, target="clean", hidden_start=None):
    """(loss, {"sv": ∂loss/∂W_sv, "vc": ∂loss/∂W_vc}) by hand-written backprop through the T
    steps of `forward` (same arguments)."""
    loss, cache = forward(weights, clean, noise, T, alpha, target, hidden_start)
    return float(loss), backward(cache)


def denoising_losses(weights, clean, noise, T, alpha=ALPHA, chunk=EVAL_CHUNK):
    """Both losses, {"clean": the paper's, "standardised": against LN(clean)}, of one run of the
    dynamics per chunk of `chunk` images, averaged over all images."""
    totals = dict.fromkeys(TARGETS, 0.0)
    for start in range(0, clean.shape[0], chunk):
        part = slice(start, start + chunk)
        _, cache = forward(weights, clean[part], noise[part], T, alpha)
        for target in TARGETS:
            residual = cache.output - denoising_target(clean[part], target)
            totals[target] += float(xp.sum(residual * residual))
    return {target: total / clean.size for target, total in totals.items()}


# ---------------------------------------------------------------- training

@dataclasses.dataclass(frozen=True)
class TrainSettings:
    """A training run. Defaults: built-in digits (D = 64), ~25 s on one CPU core (small matrices:
    OMP_NUM_THREADS=1 is fastest, BLAS threads only add overhead);
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
    comm: str = "auto"      # data parallelism under mpiexec (refham.distributed.get_communicator)
    max_memory: float = None  # GiB the run may use (default: the memory available)

    def __post_init__(self):
        _check_choice("data", self.data, DATASETS)
        _check_choice("comm", self.comm, COMMS)
        _check_choice("target", self.target, TARGETS)
        if (self.data == "mnist") != (self.data_path is not None):
            raise MetaFormerError("--data mnist needs --data-path DIR (the folder with "
                                  "train-images-idx3-ubyte[.gz]); the other datasets take none")
        for name, least in (("hidden", 1), ("steps", 1), ("batch_size", 1), ("epochs", 1),
                            ("seed", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < least:
                raise MetaFormerError(f"{name} must be an integer >= {least}, got {value!r}")
        if not isinstance(self.out, str) or not self.out.strip():
            raise MetaFormerError(f"out must name the run's folder, got {self.out!r}")
        try:
            check_limit(self.max_memory)
        except MemoryLimitError as exc:
            raise MetaFormerError(str(exc)) from None
        for name in ("alpha", "lr"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 < value < math.inf:
                raise MetaFormerError(f"{name} must be a finite number > 0, got {value!r}")


def _check_choice(what, value, choices):
    if value not in choices:
        raise MetaFormerError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")


def load_images(data, data_path=None, seed=0):
    """(train, test, test_split): host arrays (N, H, W) in the dataset's [0, 1] scaling — digits
    p/16 (the seeded 80/20 split of refham.data), MNIST p/255 (`data_path`: the folder or its
    training-images file; test: t10k-images… beside it, or else a seeded 10% of the training
    images, held out), synthetic: refham.data's templates + noise — and a word on the test split."""
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
    if comm.rank:
        return _train_in_locked_folder(settings, echo, comm)
    prepare_folder(settings.out)
    with RunLock(settings.out):
        return _train_in_locked_folder(settings, echo, comm)


def _train_in_locked_folder(settings, echo, comm):
    """`train`, once rank 0 holds the lock on settings.out."""
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
    paths = {name: os.path.join(s.out, name) for name in ("metrics.jsonl", "last.npz")}
    if os.path.exists(paths["last.npz"]):
        raise MetaFormerError(f"{s.out} already holds a run (last.npz); choose another --out")
    writer = comm.rank == 0     # the one gate of every write into the run folder
    if writer:
        atomic_write(paths["metrics.jsonl"], lambda f: None)
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
        order, loss_sum = gen.permutation(len(clean_train)), 0.0
        for start in tqdm(range(0, len(order), s.batch_size), disable=not (s.progress and writer),
                          desc=f"epoch {epoch}/{s.epochs}", leave=False, dynamic_ncols=True):
            batch = clean_train[order[start:start + s.batch_size]]
            part = shard(len(batch), comm)
            draw = gen if comm.size == 1 else ShardedGenerator(gen, len(batch), part)
            clean = asarray(batch[part])
            noise = asarray(NOISE_STD * draw.standard_normal(clean.shape))
            if len(clean):
                loss, grads = loss_and_grads(weights, clean, noise, s.steps, s.alpha, s.target)
            else:   # a last batch smaller than the number of ranks leaves this rank no image
                loss, grads = 0.0, {name: xp.zeros_like(w) for name, w in weights.items()}
            if comm.size > 1:
                grads, (batch_sum,) = combine_gradients(comm, grads, len(clean), len(batch),
                                                        (loss * len(clean),))
                loss = float(batch_sum) / len(batch)
            if not math.isfinite(loss):
                raise _diverged(epoch, f"loss {loss}")
            updated = optimizer.update(weights, grads, opt_state, s.lr)
            overflowed = nonfinite_entries({**updated[0], **updated[1]}, xp)
            if overflowed:
                raise _diverged(epoch, f"the update made {describe_names(overflowed)} NaN/inf")
            weights, opt_state = updated
            loss_sum += loss * len(batch)
        history.append({"epoch": epoch, "train_loss": loss_sum / len(order),
                        **_prefixed(evaluate()), "seconds": time.perf_counter() - started})
        if not writer:
            continue
        with open(paths["metrics.jsonl"], "a", encoding="utf-8") as f:
            f.write(json.dumps(history[-1]) + "\n")
        save_checkpoint(paths["last.npz"], weights, opt_state, step=opt_state["step"],
                        epoch=epoch, rng_state=gen.bit_generator.state, config=config,
                        metrics=history[-1])
        if echo:
            tqdm.write(_epoch_line(history[-1], s))
    return {"history": history, "out": s.out, "loss_floor": loss_floor(visible_size),
            "checkpoint": paths["last.npz"], "visible": visible_size, "test_split": test_split}


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


# ---------------------------------------------------------------- figures

def receptive_fields(weights, image_shape, count=100):
    """{"vc": the columns of W_vc, "sv": the rows of W_sv}, each the `count` of largest L2 norm
    (largest first) as images (count, H, W) divided by their max |w| (host arrays)."""
    fields = {"vc": to_numpy(weights["vc"]).T, "sv": to_numpy(weights["sv"])}  # (N_h, D) each
    chosen = {}
    for name, rows in fields.items():
        order = numpy.argsort(-numpy.linalg.norm(rows, axis=1), kind="stable")[:count]
        top = rows[order]
        top = top / numpy.maximum(numpy.abs(top).max(axis=1, keepdims=True), 1e-300)
        chosen[name] = top.reshape((len(top),) + tuple(image_shape))
    return chosen


def tile(images, gap=1):
    """(n, H, W) images → one 2-D mosaic of ⌈√n⌉ columns, separated by `gap` NaN pixels (drawn
    in the colormap's "bad" colour, apart from every value)."""
    n, height, width = images.shape
    columns = math.ceil(math.sqrt(n))
    rows = math.ceil(n / columns)
    mosaic = numpy.full((rows * (height + gap) - gap, columns * (width + gap) - gap), numpy.nan)
    for i, image in enumerate(images):
        top, left = (height + gap) * (i // columns), (width + gap) * (i % columns)
        mosaic[top:top + height, left:left + width] = image
    return mosaic


def energy_descent(weights, samples=8, seed=0, steps=28, alpha=0.5, state_scale=10.0):
    """Descent of (H1) from x⁰ = state_scale·N(0,1) on all layers (drawn with rng(seed)):
    `steps` steps of (H5) with α. Returns the Trajectory (energies: (steps + 1, samples))."""
    ham = ham_for(weights)
    start = ham.init_states(samples, seed=seed, scale=state_scale)
    return ham.descend(start, weights, alpha, max_steps=steps)


def _matplotlib():
    """(Figure, colormaps) from matplotlib, or PlottingUnavailable saying how to install it."""
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError:
        raise PlottingUnavailable(
            "matplotlib is not installed, so no figures can be drawn: pip install matplotlib "
            "(or refham[plot]) and run the command again") from None
    return Figure, colormaps


def write_figures(checkpoint, out, samples=8, seed=0, steps=28, alpha=0.5, state_scale=10.0,
                  force=False):
    """From a `train` checkpoint write into `out`: receptive_fields.png, energy_descent.png,
    energy_descent.json (the energies, E[t][sample], and the settings) and
    energy_descent_start.npz (the start states x⁰, for independent re-evaluation of (H1)).
    Raises PlottingUnavailable first when matplotlib is missing, OutputError when a file
    exists and `force` is not given. Returns (paths, energies)."""
    Figure, colormaps = _matplotlib()
    paths = {name: os.path.join(prepare_folder(out), name) for name in (
        "receptive_fields.png", "energy_descent.png", "energy_descent.json",
        "energy_descent_start.npz")}
    for path in paths.values():
        check_output_file(path, force)
    saved = load_checkpoint(checkpoint)
    weights = {name: asarray(w) for name, w in saved.params.items()}
    image_shape = tuple(saved.config.get("image_shape") or ())
    if sorted(weights) != ["sv", "vc"] or math.prod(image_shape) != weights["vc"].shape[0]:
        raise MetaFormerError(f"{checkpoint} is not a checkpoint of `refham metaformer train`: "
                              f"it holds {sorted(weights)[:4]} and image shape {image_shape}, "
                              f"not W_sv, W_vc and the shape of their D pixels")
    trajectory = energy_descent(weights, samples, seed, steps, alpha, state_scale)
    energies = to_numpy(trajectory.energies)

    fields = receptive_fields(weights, image_shape)
    figure = Figure(figsize=(9.2, 4.6), layout="constrained")
    axes = figure.subplots(1, 2)
    diverging = colormaps["RdBu_r"].with_extremes(bad="0.7")  # gaps between tiles: grey
    for ax, name, title in zip(axes, ("vc", "sv"), ("columns of $W_{vc}$", "rows of $W_{sv}$")):
        image = ax.imshow(tile(fields[name]), cmap=diverging, vmin=-1, vmax=1,
                          interpolation="nearest")
        ax.set_title(f"{title}: {len(fields[name])} of largest norm", fontsize=10)
        ax.set_axis_off()
    figure.colorbar(image, ax=axes, shrink=0.8, label="w / max|w| (each field)")
    atomic_write(paths["receptive_fields.png"], lambda f: figure.savefig(f, format="png", dpi=90))

    figure = Figure(figsize=(9, 3.6), layout="constrained")
    linear, logarithmic = figure.subplots(1, 2)
    linear.plot(energies, marker="o", markersize=2.5, linewidth=1)
    linear.set(xlabel="step t", ylabel="energy E (H1)")
    logarithmic.semilogy(energies[:-1] - energies[-1], marker="o", markersize=2.5, linewidth=1)
    logarithmic.set(xlabel="step t", ylabel=f"E(t) − E({steps})")
    figure.suptitle(f"energy descent: {samples} samples from {state_scale:g}·N(0,1), "
                    f"{steps} steps of α = {alpha:g}", fontsize=10)
    atomic_write(paths["energy_descent.png"], lambda f: figure.savefig(f, format="png", dpi=90))

    record = {"checkpoint": os.fspath(checkpoint), "samples": samples, "seed": seed,
              "steps": steps, "alpha": alpha, "state_scale": state_scale,
              "energies": energies.tolist()}
    atomic_write(paths["energy_descent.json"], lambda f: f.write(json.dumps(record).encode()))
    start = {name: to_numpy(x) for name, x in trajectory.states[0].items()}
    atomic_write(paths["energy_descent_start.npz"], lambda f: numpy.savez(f, **start))
    return paths, energies
