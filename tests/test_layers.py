"""refham.layers: each backward against autograd on the same forward code (float64), and each
forward against an independent formula with named axes (S ≠ C so that swapped axes fail)."""
import pytest
from tests.oracle import autograd, anp  # (the module skips without autograd)
import numpy as np
import scipy.special
from hypothesis import given
from hypothesis import strategies as st

from refham import layers as L
from refham.backend import asarray, rng, to_numpy
from tests.oracle import TOL, autograd_numpy, rel_err

seeds = st.integers(0, 2**31 - 1)


def autograd_vjp(fn, args, dy):
    """Gradients of ⟨dy, fn(*args)⟩ with respect to every arg, by autograd on refham's code."""
    with autograd_numpy():
        return autograd.grad(lambda a: anp.sum(fn(*a) * dy))(tuple(args))


def assert_all_close(actual, expected, tol=TOL):
    for a, e in zip(actual, expected, strict=True):
        assert rel_err(a, e) <= tol


def on_backend(*arrays):
    return [asarray(a) for a in arrays]


# --------------------------------------------------------------------------------------------
@given(seed=seeds, lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
       n_in=st.integers(1, 5), n_out=st.integers(1, 5), cols=st.integers(1, 4),
       axis=st.sampled_from([-1, -2]), bias=st.booleans())
def test_linear_backward_matches_autograd(seed, lead, n_in, n_out, cols, axis, bias):
    r = rng(seed)
    x_shape = (*lead, n_in) if axis == -1 else (*lead, n_in, cols)
    x, w, b = r.standard_normal(x_shape), r.standard_normal((n_out, n_in)), r.standard_normal(n_out)
    y, cache = L.linear_forward(*on_backend(x, w), asarray(b) if bias else None, axis)
    dy = r.standard_normal(y.shape)
    dx, dw, db = L.linear_backward(cache, asarray(dy))
    args = (x, w, b) if bias else (x, w)
    expected = autograd_vjp(lambda *a: L.linear_forward(*a[:2], a[2] if bias else None, axis)[0],
                            args, dy)
    assert_all_close((dx, dw, db) if bias else (dx, dw), expected)
    assert bias or db is None
    assert L.linear_backward(cache, asarray(dy), need_dx=False)[0] is None


@given(seed=seeds, n_in=st.integers(1, 5), n_out=st.integers(1, 5), other=st.integers(1, 5))
def test_linear_maps_rows_or_columns(seed, n_in, n_out, other):
    r = rng(seed)
    w, b = r.standard_normal((n_out, n_in)), r.standard_normal(n_out)
    columns, rows = r.standard_normal((2, n_in, other)), r.standard_normal((2, other, n_in))
    y, _ = L.linear_forward(*on_backend(columns, w, b), axis=-2)
    assert rel_err(y, np.einsum("oi,bic->boc", w, columns) + b[None, :, None]) <= 1e-13
    y, _ = L.linear_forward(*on_backend(rows, w, b), axis=-1)
    assert rel_err(y, np.einsum("oi,bsi->bso", w, rows) + b) <= 1e-13


def test_linear_rejects_mismatched_weight_and_axis():
    x = asarray(np.ones((2, 3, 4)))
    with pytest.raises(L.InputError, match=r"weight \(5, 4\).*\(2, 3, 4\) along axis -2"):
        L.linear_forward(x, asarray(np.ones((5, 4))), axis=-2)
    with pytest.raises(L.InputError, match="axis must be -1"):
        L.linear_forward(x, asarray(np.ones((5, 4))), axis=0)


@given(seed=seeds, shape=st.lists(st.integers(1, 4), min_size=1, max_size=3))
def test_gelu_backward_matches_autograd(seed, shape):
    r = rng(seed)
    x, dy = 3 * r.standard_normal(shape), r.standard_normal(shape)
    y, cache = L.gelu_forward(asarray(x))
    # the bound of every path that may run it (the definition, numba's float64 loop: within
    # 2·eps·|x| of x·Φ_N(x), tests/test_fast_paths.py), absolute: GELU(x) is tiny for x ≪ 0
    exact = x * 0.5 * (1 + scipy.special.erf(x / np.sqrt(2)))
    assert np.all(np.abs(to_numpy(y) - exact) <= 4 * np.finfo(np.float64).eps * np.abs(x))
    assert_all_close([L.gelu_backward(cache, asarray(dy))],
                     autograd_vjp(lambda v: L.gelu_forward(v)[0], (x,), dy))


# --------------------------------------------------------------------------------------------
@given(seed=seeds, batch=st.integers(1, 3), tokens=st.integers(2, 4), chans=st.integers(5, 7),
       n_axes=st.sampled_from([1, 2]), affine=st.sampled_from(["element", "scalar"]))
def test_layernorm_backward_matches_autograd(seed, batch, tokens, chans, n_axes, affine):
    r = rng(seed)
    x = r.standard_normal((batch, tokens, chans)) * 2 + 1
    normalized = x.shape[3 - n_axes:]
    shape = normalized if affine == "element" else ()
    w, b = 1 + r.standard_normal(shape), r.standard_normal(shape)
    dy = r.standard_normal(x.shape)

    def forward(x_, w_, b_):
        return L.layernorm_forward(x_, w_, b_, eps=1e-5, n_axes=n_axes)[0]

    y, cache = L.layernorm_forward(*on_backend(x, w, b), eps=1e-5, n_axes=n_axes)
    grads = L.layernorm_backward(cache, asarray(dy))
    assert [tuple(g.shape) for g in grads] == [x.shape, shape, shape]
    assert_all_close(grads, autograd_vjp(forward, (x, w, b), dy))
    # forward: standardised over exactly the last n_axes axes
    axes = tuple(range(3 - n_axes, 3))
    x_hat = (x - x.mean(axes, keepdims=True)) / np.sqrt(x.var(axes, keepdims=True) + 1e-5)
    assert rel_err(y, w * x_hat + b) <= 1e-12


def test_layernorm_rejects_wrong_affine_shapes():
    x = asarray(np.ones((2, 3, 4)))
    with pytest.raises(L.InputError, match=r"weight has shape \(4, 3\); expected \(3, 4\)"):
        L.layernorm_forward(x, asarray(np.ones((4, 3))), asarray(np.zeros((3, 4))))
    with pytest.raises(L.InputError, match="n_axes"):
        L.layernorm_forward(x, asarray(1.0), asarray(0.0))
    with pytest.raises(L.InputError, match=r"bias has shape \(3,\)"):
        L.layernorm_forward(x, asarray(np.ones(4)), asarray(np.zeros(3)))


# --------------------------------------------------------------------------------------------
def direct_convolution(images, kernel, bias):
    """Stride-p p×p convolution by loops; tokens in row-major order of the patch grid."""
    batch, _, height, width = images.shape
    chans, _, p, _ = kernel.shape
    tokens = []
    for i in range(height // p):
        for j in range(width // p):
            window = images[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p]
            tokens.append(np.einsum("bkuv,ckuv->bc", window, kernel) + bias)
    return np.stack(tokens, axis=1)


@given(seed=seeds, batch=st.integers(1, 2), chans_in=st.integers(1, 3), patch=st.integers(1, 3),
       grid_h=st.integers(1, 3), grid_w=st.integers(1, 3), chans=st.integers(1, 4))
def test_patch_embedding_is_the_convolution_and_backward_matches(seed, batch, chans_in, patch,
                                                                  grid_h, grid_w, chans):
    r = rng(seed)
    images = r.standard_normal((batch, chans_in, grid_h * patch, grid_w * patch))
    kernel, bias = r.standard_normal((chans, chans_in, patch, patch)), r.standard_normal(chans)
    tokens, cache = L.patch_embed_forward(*on_backend(images, kernel, bias))
    assert rel_err(tokens, direct_convolution(images, kernel, bias)) <= 1e-13
    dy = r.standard_normal(tokens.shape)
    grads = L.patch_embed_backward(cache, asarray(dy), need_dimages=True)
    assert_all_close(grads, autograd_vjp(lambda *a: L.patch_embed_forward(*a)[0],
                                         (images, kernel, bias), dy))
    assert L.patch_embed_backward(cache, asarray(dy))[0] is None
    patches = L.patchify(asarray(images), patch)
    assert rel_err(L.unpatchify(patches, images.shape, patch), images) == 0.0


def test_patch_embedding_rejects_images_it_does_not_tile():
    kernel, bias = asarray(np.ones((4, 3, 2, 2))), asarray(np.zeros(4))
    with pytest.raises(L.InputError, match=r"kernel \(4, 3, 2, 2\) does not tile"):
        L.patch_embed_forward(asarray(np.ones((1, 3, 5, 4))), kernel, bias)
    with pytest.raises(L.InputError, match=r"need \(B, 3, H, W\)"):
        L.patch_embed_forward(asarray(np.ones((1, 4, 4, 3))), kernel, bias)


@given(seed=seeds, batch=st.integers(1, 3), tokens=st.integers(1, 4), chans=st.integers(1, 4))
def test_token_mean_backward_matches_autograd(seed, batch, tokens, chans):
    r = rng(seed)
    x, dy = r.standard_normal((batch, tokens, chans)), r.standard_normal((batch, chans))
    y, cache = L.token_mean_forward(asarray(x))
    assert rel_err(y, x.mean(axis=1)) <= 1e-14
    assert_all_close([L.token_mean_backward(cache, asarray(dy))],
                     autograd_vjp(lambda v: L.token_mean_forward(v)[0], (x,), dy))


# --------------------------------------------------------------------------------------------
@given(seed=seeds, batch=st.integers(1, 4), classes=st.integers(2, 5),
       smoothing=st.sampled_from([0.0, 0.1, 0.37]))
def test_cross_entropy_is_timm_label_smoothing_and_backward_matches(seed, batch, classes,
                                                                     smoothing):
    r = rng(seed)
    logits, labels = 3 * r.standard_normal((batch, classes)), r.integers(0, classes, batch)
    loss, cache = L.cross_entropy_forward(asarray(logits), asarray(labels, labels.dtype),
                                          smoothing)
    expected, magnitude = 0.0, 0.0
    for z, y in zip(logits, labels):
        log_sum = np.log(np.sum(np.exp(z)))
        log_p = z - log_sum
        expected += (1 - smoothing) * -log_p[y] + smoothing * np.mean(-log_p)
        magnitude += abs(log_sum) + np.abs(z).max()
    # −log p_y = logsumexp(z) − z_y loses digits when p_y ≈ 1 (loss ≪ its terms): the error is
    # bounded by the size of the terms, not of their difference
    assert abs(float(to_numpy(loss)) - expected / batch) <= 1e-14 * magnitude / batch
    with autograd_numpy():
        expected_grad = autograd.grad(lambda z: L.cross_entropy_forward(z, labels, smoothing)[0])(
            logits)
    assert rel_err(L.cross_entropy_backward(cache), expected_grad) <= TOL
    assert rel_err(L.cross_entropy_backward(cache, 2.5), 2.5 * expected_grad) <= TOL


@pytest.mark.parametrize("labels, smoothing, match", [
    (np.array([0, 1]), 0.0, r"labels must have shape \(3,\)"),
    (np.array([0.0, 1.0, 2.0]), 0.0, "integer class indices"),
    (np.array([0, 1, 4]), 0.0, r"labels must lie in \[0, 4\), got range \[0, 4\]"),
    (np.array([-1, 1, 2]), 0.0, r"must lie in \[0, 4\)"),
    (np.array([0, 1, 2]), 1.0, r"smoothing must be in \[0, 1\)"),
])
def test_cross_entropy_rejects_bad_labels(labels, smoothing, match):
    with pytest.raises(L.InputError, match=match):
        L.cross_entropy_forward(asarray(np.zeros((3, 4))), labels, smoothing)


# --------------------------------------------------------------------------------------------
def gelu_np(z):
    return z * 0.5 * (1 + scipy.special.erf(z / np.sqrt(2)))


def mlp_reference(kind, w, z, axis):
    """The MLP kinds of the docs (mixer page) with named axes: z[b, i, c] along −2, z[b, s, i]
    along −1."""
    def apply(weight, x):  # weight (out, in) acting on the mapped axis i
        return np.einsum("oi,bic->boc" if axis == -2 else "oi,bsi->bso", weight, x)

    def add_bias(x, name):
        return x + (w[name][:, None] if axis == -2 else w[name]) if name in w else x

    if kind == "sym":
        return apply(w["fc2.weight"].T, gelu_np(apply(w["fc2.weight"], z)))
    a = gelu_np(add_bias(apply(w["fc1.weight"], z), "fc1.bias"))
    out = add_bias(apply(w["fc2.weight"], a), "fc2.bias")
    return out + apply(w["fc1.weight"].T, a) if kind == "asym" else out


@given(seed=seeds, kind_bias=st.sampled_from([("vanilla", False), ("vanilla", True),
                                               ("sym", False), ("asym", False)]),
       axis=st.sampled_from([-1, -2]), n_in=st.integers(2, 4), hidden=st.integers(5, 7),
       other=st.integers(1, 3))
def test_mlp_forward_and_backward(seed, kind_bias, axis, n_in, hidden, other):
    kind, bias = kind_bias
    r = rng(seed)
    shapes = L.mlp_param_shapes(kind, n_in, hidden, bias)
    w = {name: r.standard_normal(shape) for name, shape in shapes.items()}
    z = r.standard_normal((2, n_in, other) if axis == -2 else (2, other, n_in))
    out, cache = L.mlp_forward(kind, {k: asarray(v) for k, v in w.items()}, asarray(z), axis)
    assert rel_err(out, mlp_reference(kind, w, z, axis)) <= 1e-12
    dout = r.standard_normal(out.shape)
    dz, grads = L.mlp_backward(cache, asarray(dout))
    names = list(shapes)
    expected = autograd_vjp(
        lambda z_, *ws: L.mlp_forward(kind, dict(zip(names, ws)), z_, axis)[0],
        (z, *[w[n] for n in names]), dout)
    assert list(grads) == names
    assert_all_close([dz, *grads.values()], expected)


def test_mlp_rejects_unknown_kind_and_mismatched_weights():
    z = asarray(np.ones((2, 3, 4)))
    with pytest.raises(L.InputError, match="unknown MLP kind 'tied'"):
        L.mlp_forward("tied", {}, z)
    with pytest.raises(L.InputError, match=r"sym MLP acting on 4 inputs needs .*fc2.weight"):
        L.mlp_forward("sym", {"fc1.weight": asarray(np.ones((5, 4)))}, z)
    with pytest.raises(L.InputError, match=r"asym MLP .*'fc2.weight': \(4, 5\)"):
        L.mlp_forward("asym", {"fc1.weight": asarray(np.ones((5, 4))),
                               "fc2.weight": asarray(np.ones((4, 1)))}, z)
    with pytest.raises(L.InputError, match="biases exist for the vanilla MLP only"):
        L.mlp_param_shapes("asym", 4, 5, bias=True)
