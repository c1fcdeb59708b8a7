"""refham.blocks: each block equation's backward against autograd on its own forward (S ≠ C,
N_s ≠ N_c, n_iter weight-tied iterations, drop-path masks), and each forward against the
equation written out with einsum on named axes."""
import pytest
from tests.oracle import autograd  # (the module skips without autograd)
import numpy as np
import scipy.special
from hypothesis import given, settings
from hypothesis import strategies as st

from refham.backend import asarray, rng, to_numpy
from refham.blocks import (
    BLOCK_LAYERS, parallel_block_backward, parallel_block_forward, serial_block_backward,
    serial_block_forward)
from refham.layers import InputError, mlp_param_shapes
from tests.oracle import TOL, autograd_numpy, rel_err

BLOCKS = {"serial": (serial_block_forward, serial_block_backward),
          "parallel": (parallel_block_forward, parallel_block_backward)}
KINDS = [("vanilla", False), ("vanilla", True), ("sym", False), ("asym", False)]


def draw_block(seed, layout, kind, bias, tokens, dim, joint):
    """Weights of one block by their names within it: norms near 1, MLPs N(0, 1/fan_in)."""
    r = rng(seed)
    norm_shape = (tokens, dim) if joint else (dim,)
    sizes = {"mlp_tokens": (tokens, tokens + 1), "mlp_channels": (dim, 2 * dim)}
    weights = {}
    for layer in BLOCK_LAYERS[layout]:
        if layer in sizes:
            for name, shape in mlp_param_shapes(kind, *sizes[layer], bias=bias).items():
                weights[f"{layer}.{name}"] = r.standard_normal(shape) / np.sqrt(shape[-1])
        else:
            weights[f"{layer}.weight"] = 1.0 + 0.3 * r.standard_normal(norm_shape)
            weights[f"{layer}.bias"] = 0.3 * r.standard_normal(norm_shape)
    return weights


def draw_masks(seed, n_iter, batch):
    """Per-sample drop-path masks 0 or 2 (rate ½) for both branches of every iteration."""
    r = rng(seed + 3)
    return [tuple(2.0 * (r.random((batch, 1, 1)) < 0.5) for _ in range(2))
            for _ in range(n_iter)]


@pytest.mark.parametrize("layout", BLOCKS)
@pytest.mark.parametrize("kind, bias", KINDS)
@settings(max_examples=10)
@given(seed=st.integers(0, 2**31 - 1), n_iter=st.integers(1, 3), joint=st.booleans(),
       tokens=st.integers(2, 5), dim=st.integers(3, 6), dropped=st.booleans())
def test_block_backward_matches_autograd(layout, kind, bias, seed, n_iter, joint, tokens, dim,
                                         dropped):
    if tokens == dim:
        dim += 1  # S ≠ C: swapped token and channel axes must fail
    forward, backward = BLOCKS[layout]
    weights = draw_block(seed, layout, kind, bias, tokens, dim, joint)
    r = rng(seed + 1)
    x, dy = r.standard_normal((2, 2, tokens, dim))
    masks = draw_masks(seed, n_iter, 2) if dropped else None
    n_axes = 2 if joint else 1

    def run(x, weights, masks=masks):
        return forward(x, weights, kind, n_iter, 1e-6, n_axes, masks)

    device_masks = masks and [tuple(asarray(m) for m in pair) for pair in masks]
    y, cache = run(asarray(x), {name: asarray(w) for name, w in weights.items()}, device_masks)
    dx, grads = backward(cache, asarray(dy))
    with autograd_numpy():
        expected_y = run(x, weights)[0]
        expected_dx, expected = autograd.grad(lambda x, w: (run(x, w)[0] * dy).sum(),
                                              (0, 1))(x, weights)
    assert rel_err(y, expected_y) <= 1e-13
    assert rel_err(dx, expected_dx) <= TOL
    assert sorted(grads) == sorted(weights)
    for name, grad in grads.items():
        assert rel_err(grad, expected[name]) <= TOL, name


def gelu(z):
    return z * 0.5 * (1.0 + scipy.special.erf(z / np.sqrt(2.0)))


# einsum specs per MLP: into the hidden layer, out by W₂, out by the tied W_inᵀ; bias shape
NAMED_AXES = {"mlp_tokens": ("ns,bsc->bnc", "sn,bnc->bsc", "ns,bnc->bsc", (-1, 1)),
              "mlp_channels": ("mc,bsc->bsm", "cm,bsm->bsc", "mc,bsm->bsc", (-1,))}


def named_axis_block(layout, kind, w, x, n_iter, joint):
    """The block equations with einsum on named axes: b batch, s tokens, c channels, n/m hidden
    units of the token/channel MLPs."""
    axes = (-2, -1) if joint else (-1,)

    def norm(x, layer):
        centred = x - x.mean(axis=axes, keepdims=True)
        sigma = np.sqrt((centred ** 2).mean(axis=axes, keepdims=True) + 1e-6)
        return w[f"{layer}.weight"] * centred / sigma + w[f"{layer}.bias"]

    def mlp(g, layer):
        into, out, tied, bias_shape = NAMED_AXES[layer]

        def bias(name):
            return w[f"{layer}.{name}"].reshape(bias_shape) if f"{layer}.{name}" in w else 0.0

        if kind == "sym":
            w_sym = w[f"{layer}.fc2.weight"]
            return np.einsum(tied, w_sym, gelu(np.einsum(into, w_sym, g)))
        w_in = w[f"{layer}.fc1.weight"]
        a = gelu(np.einsum(into, w_in, g) + bias("fc1.bias"))
        y = np.einsum(out, w[f"{layer}.fc2.weight"], a) + bias("fc2.bias")
        return y + np.einsum(tied, w_in, a) if kind == "asym" else y

    for _ in range(n_iter):
        if layout == "serial":
            x = x + mlp(norm(x, "norm1"), "mlp_tokens")
            x = x + mlp(norm(x, "norm2"), "mlp_channels")
        else:
            g = norm(x, "norm")
            x = x + mlp(g, "mlp_tokens") + mlp(g, "mlp_channels")
    return x


@pytest.mark.parametrize("layout", BLOCKS)
@pytest.mark.parametrize("kind, bias", KINDS)
@pytest.mark.parametrize("joint", [True, False])
def test_block_forward_is_its_equation(layout, kind, bias, joint):
    weights = draw_block(7, layout, kind, bias, 4, 3, joint)
    x = rng(8).standard_normal((2, 4, 3))
    seen = []
    y, _ = BLOCKS[layout][0](asarray(x), {n: asarray(w) for n, w in weights.items()}, kind,
                             n_iter=2, n_axes=2 if joint else 1,
                             observe=lambda t, state: seen.append((t, to_numpy(state))))
    assert rel_err(y, named_axis_block(layout, kind, weights, x, 2, joint)) <= 1e-12
    assert [t for t, _ in seen] == [0, 1, 2]
    assert rel_err(seen[0][1], x) == 0 and rel_err(seen[2][1], y) == 0
    assert rel_err(seen[1][1], named_axis_block(layout, kind, weights, x, 1, joint)) <= 1e-12


def test_masks_must_match_the_iterations():
    weights = draw_block(0, "parallel", "sym", False, 2, 3, True)
    weights = {name: asarray(w) for name, w in weights.items()}
    with pytest.raises(InputError, match="one .* pair per iteration"):
        parallel_block_forward(asarray(np.ones((1, 2, 3))), weights, "sym", n_iter=2,
                               masks=draw_masks(0, 1, 1))
