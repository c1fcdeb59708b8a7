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

The gradient is hand-written: the forward keeps x⁰…x^T; the backward seeds ∂loss/∂x_v^T with the
layernorm Hessian-vector product (H is symmetric, so the VJP of g is Hv) and runs `HAM.step_vjp`
(the Lagrangians' hvp and the synapses' VJPs) back through the T steps, summing ∂loss/∂W.
Training is in refham.training.metaformer_train, the figures in refham.training.metaformer_figures.
"""
import dataclasses
import functools
import math

import numpy

from refham.checks import finite_real, integer_at_least
from refham.errors import RefhamError
from refham.backend import xp
from refham.ham import HAM, Dense, Layer
from refham.lagrangians import LayerNorm, ReLU

NOISE_STD = 0.3
ALPHA = 0.1
TARGETS = ("clean", "standardised")
EVAL_CHUNK = 1000  # test images per forward pass: bounds the memory of the kept states


class MetaFormerError(RefhamError, ValueError):
    """Bad weights, data or settings for the Energy MetaFormer, or a diverged training run."""


def check_choice(what, value, choices):
    """Raise MetaFormerError unless `value` is one of `choices` (a setting named `what`)."""
    if value not in choices:
        raise MetaFormerError(f"unknown {what} {value!r}: choose one of {', '.join(choices)}")


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
    check_choice("target", target, TARGETS)
    return clean if target == "clean" else LayerNorm(eps=1e-5).activation(clean)


def loss_floor(visible_size):
    """Implements :eq:`F-floor`: (1 − 1/√D)², the lower bound of the paper's loss: mean((g − y)²) = (‖g‖² −
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
    (implements :eq:`F-dynamics`); loss = mean((g_v(x_v^T) − y)²) over batch and pixels
    (implements :eq:`F-loss`).
    Returns (loss, UnrolledCache). `hidden_start` = {"s": (B, N_h), "c": (B, N_h)} replaces the
    zero hidden start states (with zeros g_s⁰ = g_c⁰ = 0, so W first acts in step 2 and T = 1 has
    zero gradient)."""
    ham = ham_for(weights)
    if getattr(clean, "shape", None) != getattr(noise, "shape", None) or clean.ndim != 2:
        raise MetaFormerError(f"clean and noise must both be (B, D), got "
                              f"{getattr(clean, 'shape', clean)} and "
                              f"{getattr(noise, 'shape', noise)}")
    integer_at_least("T, the number of unrolled steps,", T, 1, MetaFormerError)
    alpha = finite_real("alpha", alpha, MetaFormerError)
    if hidden_start is None:
        zeros = xp.zeros((clean.shape[0], ham.layers["s"].shape[0]), dtype=clean.dtype)
        hidden_start = {"s": zeros, "c": zeros}
    states = [{"s": hidden_start["s"], "v": clean + noise, "c": hidden_start["c"]}]
    ham._check(states[0], weights)        # once: the T steps run the unchecked core
    for _ in range(T):
        states.append(ham._step(states[-1], weights, alpha))
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
        cotangents, step_grads = ham._step_vjp(xs, cache.weights, cache.alpha, cotangents)
        grads = {name: grads[name] + step_grads[name] for name in grads}
    return grads


def loss_and_grads(weights, clean, noise, T, alpha=ALPHA, target="clean", hidden_start=None):
    """(loss, {"sv": ∂loss/∂W_sv, "vc": ∂loss/∂W_vc}) by hand-written backprop through the T
    steps of `forward` (same arguments); the loss is a 0-d array of the backend, left on the
    device (read it with `to_numpy`)."""
    loss, cache = forward(weights, clean, noise, T, alpha, target, hidden_start)
    return loss, backward(cache)


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

