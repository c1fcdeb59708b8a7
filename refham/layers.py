"""Layer primitives of the Mixer family as forward/backward pairs (:ref:`sec-mixer`,
:ref:`sec-backprop`).

Every op is a pair written side by side:

    y, cache = <op>_forward(x, *params)
    dx, *param_grads = <op>_backward(cache, dy)      # param-free ops return dx alone

The forward functions are pure `xp` code without in-place updates, so the tests run them under
autograd.numpy and compare the hand-written backward functions with autograd's gradients.

Axis convention for a Mixer state x (B, S, C): the channel axis is −1 and the token axis is −2.
`linear_forward(..., axis=−2)` maps every column x[b, :, c] (S → out) with a left matmul W @ x;
the MLPs instead gather the vectors of either axis as the rows of one matrix (`_as_matrix`), the
layout BLAS runs fastest.
"""
import math

from refham.errors import RefhamError
from refham.backend import accelerated, xp
from refham.special import gelu_and_deriv

CHANNEL_AXIS = -1
TOKEN_AXIS = -2
MLP_KINDS = ("vanilla", "sym", "asym")


class InputError(RefhamError, ValueError):
    """An array handed to a layer has the wrong shape, dtype or values."""


def _other_axes(ndim, axis):
    """All axes of an ndim-array except `axis` (the ones a weight gradient sums over)."""
    return tuple(a for a in range(ndim) if a != ndim + axis)


# ---------------------------------------------------------------------------------------------
# Linear map along an axis
# ---------------------------------------------------------------------------------------------
def linear_forward(x, weight, bias=None, axis=CHANNEL_AXIS):
    """y = W x + b applied to every vector along `axis` of x; W: (out, in), b: (out,) or None.

    axis −1: y = x Wᵀ + b, x (…, in) → (…, out)  (torch's Linear), one GEMM over all rows.
    axis −2: y = W x + b[:, None], x (…, in, C) → (…, out, C)  (each column mapped); one GEMM
    for a matrix x, one per leading index otherwise (mlp_forward hands it one matrix).
    """
    if axis not in (CHANNEL_AXIS, TOKEN_AXIS):
        raise InputError(f"linear axis must be -1 (rows) or -2 (columns), got {axis}")
    if weight.ndim != 2 or x.ndim < -axis or x.shape[axis] != weight.shape[1]:
        raise InputError(f"linear: weight {tuple(weight.shape)} (out, in) does not fit input "
                         f"{tuple(x.shape)} along axis {axis}")
    if axis == CHANNEL_AXIS:  # rows flattened first: NumPy runs x (B, S, in) @ Wᵀ as B GEMMs
        y = (x.reshape(-1, weight.shape[1]) @ weight.T).reshape(x.shape[:-1] + weight.shape[:1])
        if bias is not None:
            y = y + bias
    else:
        y = weight @ x
        if bias is not None:
            y = y + bias[:, None]
    return y, (x, weight, bias is not None, axis)


def linear_backward(cache, dy, need_dx=True):
    """dx = Wᵀ dy, dW = Σ dy xᵀ, db = Σ dy (sums over every axis but the mapped one).

    Returns (dx, dW, db); dx is None when need_dx is False (the stem: no image gradient), db is
    None without a bias.
    """
    x, weight, has_bias, axis = cache
    n_out, n_in = weight.shape
    if axis == CHANNEL_AXIS:  # one GEMM over all rows: (out, N) @ (N, in)
        dweight = dy.reshape(-1, n_out).T @ x.reshape(-1, n_in)
    elif dy.ndim == 2:  # the columns of one matrix: one GEMM (out, N) @ (N, in)
        dweight = dy @ x.T
    else:  # a GEMM per leading index, then summed: small (…, out, in) intermediates
        dweight = (dy @ xp.swapaxes(x, -1, -2)).reshape(-1, n_out, n_in).sum(axis=0)
    dbias = dy.sum(axis=_other_axes(dy.ndim, axis)) if has_bias else None
    if not need_dx:
        return None, dweight, dbias
    if axis == CHANNEL_AXIS:
        dx = (dy.reshape(-1, n_out) @ weight).reshape(x.shape)
    else:
        dx = weight.T @ dy
    return dx, dweight, dbias


# ---------------------------------------------------------------------------------------------
# GELU (exact erf form)
# ---------------------------------------------------------------------------------------------
def gelu_forward(x):
    """y = GELU(x) = x·Φ_N(x). The cache is GELU′(x) = Φ_N(x) + x·φ(x), formed in the same pass
    from the same Φ_N (special.gelu_and_deriv), so backward needs neither erf nor x."""
    return gelu_and_deriv(x)


@accelerated
def gelu_backward(cache, dy):
    """dx = GELU′(x)·dy (on NumPy in chunks on the BLAS threads, like every fused chain)."""
    return dy * cache


# ---------------------------------------------------------------------------------------------
# Layer norm over trailing axes, per-element or scalar affine
# ---------------------------------------------------------------------------------------------
def _affine_shape_ok(param, normalized_shape):
    return param.ndim == 0 or tuple(param.shape) == normalized_shape


def layernorm_forward(x, weight, bias, eps=1e-6, n_axes=None):
    """y = γ ⊙ x̂ + δ, x̂ = (x − x̄)/σ, σ = sqrt(var + ε), mean and (biased) variance over the last
    n_axes axes (D elements): the joint norm over n_axes = 2. Implements :eq:`X-joint-norm`.

    With a scalar γ this is g = ∇L of the layernorm Lagrangian :eq:`L-layernorm`,
    L = γDσ + ⟨δ, x⟩ (δ may be per-element). With a per-element γ it is the paper's LayerNorm but
    the gradient of no Lagrangian: its Jacobian γ ⊙ (∂x̂/∂x) is not symmetric.

    γ (weight) and δ (bias) each have the normalised shape x.shape[−n_axes:] (per-element affine,
    the paper's models) or are 0-d arrays (scalar affine, the energy-exact form). n_axes defaults
    to weight.ndim; a scalar weight needs it given.
    """
    if n_axes is None:
        n_axes = weight.ndim
    if not 1 <= n_axes <= x.ndim:
        raise InputError(f"layernorm: n_axes must be in 1..{x.ndim} for input {tuple(x.shape)}, "
                         f"got {n_axes} (pass n_axes= with a scalar weight)")
    normalized_shape = tuple(x.shape[x.ndim - n_axes:])
    for name, param in (("weight", weight), ("bias", bias)):
        if not _affine_shape_ok(param, normalized_shape):
            raise InputError(f"layernorm {name} has shape {tuple(param.shape)}; expected "
                             f"{normalized_shape} (per-element) or () (scalar)")
    axes = tuple(range(x.ndim - n_axes, x.ndim))
    centred = x - _row_means(x, n_axes)
    rows = _as_rows(centred, n_axes)  # Σ (x − x̄)² per row as one pass, without a temporary:
    variance = xp.einsum("nd,nd->n", rows, rows).reshape(_stat_shape(x, n_axes)) / rows.shape[1]
    inv_sigma = 1.0 / xp.sqrt(variance + eps)
    x_hat, y = _normalise_affine(centred, inv_sigma, weight, bias)
    return y, (x_hat, inv_sigma, weight, bias.ndim, axes)


def _as_rows(t, n_axes):
    """t as a matrix (N, D): one row per normalised slice of its last n_axes axes (a view of a
    contiguous t)."""
    return t.reshape(-1, math.prod(t.shape[t.ndim - n_axes:]))


def _stat_shape(t, n_axes):
    """The shape of a per-slice statistic kept for broadcasting: (…, 1, …, 1)."""
    return tuple(t.shape[:t.ndim - n_axes]) + (1,) * n_axes


def _row_means(t, n_axes, weight=None):
    """mean over the last n_axes axes of t, or of γ ⊙ t: a matrix-vector product with γ (or
    with the ones), so that γ ⊙ t is never formed; keepdims shape."""
    rows = _as_rows(t, n_axes)
    if weight is None:
        sums = rows.sum(axis=1)
    else:  # γ per element or scalar: either way one value per element of a slice
        sums = rows @ xp.broadcast_to(weight, t.shape[t.ndim - n_axes:]).reshape(-1)
    return sums.reshape(_stat_shape(t, n_axes)) / rows.shape[1]


@accelerated
def _normalise_affine(centred, inv_sigma, weight, bias):
    """x̂ = (x − x̄)/σ and y = γ ⊙ x̂ + δ (one fused kernel on the GPU)."""
    x_hat = centred * inv_sigma
    return x_hat, weight * x_hat + bias


def _sum_to(t, ndim, axes):
    """Σ of t down to a parameter of `ndim` dims: all of it for a scalar, else over the leading
    (non-normalised) axes."""
    return t.sum() if ndim == 0 else t.sum(axis=tuple(range(axes[0])))


def layernorm_backward(cache, dy):
    """dx = (1/σ)(d̂ − mean(d̂) − x̂·mean(d̂ ⊙ x̂)) with d̂ = γ ⊙ dy; dγ = Σ dy ⊙ x̂; dδ = Σ dy.

    Returns (dx, dweight, dbias), each parameter gradient in its parameter's shape.
    """
    x_hat, inv_sigma, weight, bias_ndim, axes = cache
    n_axes = len(axes)
    dy_x_hat = dy * x_hat  # mean(d̂ ⊙ x̂) = mean(γ ⊙ (dy ⊙ x̂)): one product serves it and dγ
    dx = _layernorm_dx(dy * weight, x_hat, inv_sigma, _row_means(dy, n_axes, weight),
                       _row_means(dy_x_hat, n_axes, weight))
    return dx, _sum_to(dy_x_hat, weight.ndim, axes), _sum_to(dy, bias_ndim, axes)


@accelerated
def _layernorm_dx(d_hat, x_hat, inv_sigma, mean_d, mean_dx):
    """dx = (1/σ)(d̂ − mean(d̂) − x̂·mean(d̂ ⊙ x̂)), the means given (one fused GPU kernel)."""
    return inv_sigma * (d_hat - mean_d - x_hat * mean_dx)


# ---------------------------------------------------------------------------------------------
# Patch embedding: a stride-p p×p convolution with bias, as a matmul
# ---------------------------------------------------------------------------------------------
def patchify(images, patch):
    """(B, C_in, H, W) → (B, S, C_in·p·p): token i·(W/p) + j is patch (i, j) of the grid
    (row-major), its vector in (channel, row, column) order — a flattened conv kernel's order."""
    batch, chans, height, width = images.shape
    grid_h, grid_w = height // patch, width // patch
    x = images.reshape(batch, chans, grid_h, patch, grid_w, patch)
    x = xp.transpose(x, (0, 2, 4, 1, 3, 5))  # (B, grid_h, grid_w, C_in, p, p)
    return x.reshape(batch, grid_h * grid_w, chans * patch * patch)


def unpatchify(patches, image_shape, patch):
    """The inverse (and adjoint: a permutation) of `patchify`: (B, S, C_in·p·p) → image_shape."""
    batch, chans, height, width = image_shape
    x = patches.reshape(batch, height // patch, width // patch, chans, patch, patch)
    return xp.transpose(x, (0, 3, 1, 4, 2, 5)).reshape(image_shape)


def patch_embed_forward(images, weight, bias):
    """Implements :eq:`X-patch-embed`: tokens[b, s] = W_emb · patch_s(images[b]) + bias, the conv
    weight W_emb (C, C_in, p, p) seen as a (C, C_in·p·p) matrix; images (B, C_in, H, W) → tokens
    (B, S, C)."""
    chans_out, chans_in, patch, patch_w = weight.shape
    if images.ndim != 4 or images.shape[1] != chans_in or patch != patch_w \
            or images.shape[2] % patch or images.shape[3] % patch:
        raise InputError(f"patch embedding: kernel {tuple(weight.shape)} does not tile images "
                         f"{tuple(images.shape)} (need (B, {chans_in}, H, W), H and W multiples "
                         f"of {patch})")
    patches = patchify(images, patch)
    tokens, linear_cache = linear_forward(patches, weight.reshape(chans_out, -1), bias)
    return tokens, (linear_cache, tuple(images.shape), tuple(weight.shape))


def patch_embed_backward(cache, dtokens, need_dimages=False):
    """(dimages or None, dK (C, C_in, p, p), dbias): the linear backward, folded back to images
    and kernel shape. The image gradient costs a matmul, so it is computed only on request."""
    linear_cache, image_shape, weight_shape = cache
    dpatches, dweight, dbias = linear_backward(linear_cache, dtokens, need_dx=need_dimages)
    dimages = unpatchify(dpatches, image_shape, weight_shape[-1]) if need_dimages else None
    return dimages, dweight.reshape(weight_shape), dbias


# ---------------------------------------------------------------------------------------------
# Mean over tokens
# ---------------------------------------------------------------------------------------------
def token_mean_forward(x):
    """y[b, c] = (1/S) Σ_s x[b, s, c]."""
    return x.mean(axis=TOKEN_AXIS), tuple(x.shape)


def token_mean_backward(cache, dy):
    """dx[b, s, c] = dy[b, c]/S (a broadcast view, not a copy)."""
    shape = cache
    return xp.broadcast_to(dy[..., None, :] / shape[TOKEN_AXIS], shape)


# ---------------------------------------------------------------------------------------------
# Softmax cross-entropy with label smoothing
# ---------------------------------------------------------------------------------------------
def check_labels(labels, batch, classes):
    """Raise InputError unless `labels` are `batch` integer class indices in [0, `classes`)
    (the range check reads two numbers: two device→host transfers on a GPU)."""
    if tuple(labels.shape) != (batch,):
        raise InputError(f"labels must have shape ({batch},) to match the batch of {batch} "
                         f"logits, got {tuple(labels.shape)}")
    if labels.dtype.kind not in "iu":
        raise InputError(f"labels must be integer class indices, got dtype {labels.dtype}")
    if batch and not 0 <= int(labels.min()) <= int(labels.max()) < classes:
        raise InputError(f"labels must lie in [0, {classes}), got range "
                         f"[{int(labels.min())}, {int(labels.max())}]")


def cross_entropy_forward(logits, labels, smoothing=0.0):
    """J = −(1/B) Σ_b Σ_k q_bk log p_bk, p = softmax(z), q = (1 − s)·onehot(y) + s/K.

    That is timm's LabelSmoothingCrossEntropy: (1 − s)·NLL + s·mean_k(−log p_k), batch mean.
    logits (B, K), labels (B,) integers in [0, K). Returns the 0-d loss and the cache.
    """
    labels = xp.asarray(labels)
    if logits.ndim != 2:
        raise InputError(f"logits must be (B, K), got shape {tuple(logits.shape)}")
    check_labels(labels, *logits.shape)
    return _cross_entropy_forward(logits, labels, smoothing)


def _cross_entropy_forward(logits, labels, smoothing):
    """The unchecked core of `cross_entropy_forward` (see refham.checks): labels checked."""
    if not 0.0 <= smoothing < 1.0:     # a check on the host: it costs no transfer
        raise InputError(f"label smoothing must be in [0, 1), got {smoothing}")
    batch, classes = logits.shape
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_p = shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))
    onehot = (labels[:, None] == xp.arange(classes)).astype(log_p.dtype)
    target = (1.0 - smoothing) * onehot + smoothing / classes
    return -(target * log_p).sum() / batch, (log_p, target)


def cross_entropy_backward(cache, dloss=1.0):
    """dz = (p − q)·dJ/B."""
    log_p, target = cache
    return (xp.exp(log_p) - target) * (dloss / log_p.shape[0])


# ---------------------------------------------------------------------------------------------
# The three MLP kinds (docs: mixer), along an axis
# ---------------------------------------------------------------------------------------------
def mlp_param_shapes(kind, n_in, n_hidden, bias=False):
    """The parameters of one MLP, by their timm names within the MLP, with torch's shapes."""
    if kind not in MLP_KINDS:
        raise InputError(f"unknown MLP kind {kind!r}: choose one of {', '.join(MLP_KINDS)}")
    if bias and kind != "vanilla":
        raise InputError(f"MLP biases exist for the vanilla MLP only, not {kind!r}")
    if kind == "sym":
        return {"fc2.weight": (n_hidden, n_in)}
    shapes = {"fc1.weight": (n_hidden, n_in)}
    if bias:
        shapes["fc1.bias"] = (n_hidden,)
    shapes["fc2.weight"] = (n_in, n_hidden)
    if bias:
        shapes["fc2.bias"] = (n_in,)
    return shapes


def _check_mlp_weights(kind, weights, n_in):
    weight_in = weights.get("fc2.weight" if kind == "sym" else "fc1.weight")
    n_hidden = weight_in.shape[0] if weight_in is not None and weight_in.ndim == 2 else -1
    expected = mlp_param_shapes(kind, n_in, n_hidden, bias="fc1.bias" in weights)
    got = {name: tuple(w.shape) for name, w in weights.items()}
    if got != expected:
        raise InputError(f"{kind} MLP acting on {n_in} inputs needs parameters {expected}, "
                         f"got {got}")


def _as_matrix(z, axis):
    """The vectors of z along `axis` as the rows of one matrix (N, n): a view for the channel
    axis; for the token axis the last two axes swapped first (one copy of z). One matrix turns
    the B small GEMMs NumPy would run on a stack (B, n, C) into one large GEMM, and vectors as
    rows give it the tall-skinny layout (N ≫ n) that BLAS runs fastest (faster than the same
    vectors as the columns of a wide (n, N) matrix)."""
    if axis == CHANNEL_AXIS:
        return z.reshape(-1, z.shape[-1])
    return xp.swapaxes(z, CHANNEL_AXIS, TOKEN_AXIS).reshape(-1, z.shape[TOKEN_AXIS])


def _from_matrix(matrix, shape, axis):
    """The inverse of `_as_matrix` for an array of `shape` (a view, no copy)."""
    if axis == CHANNEL_AXIS:
        return matrix.reshape(shape)
    swapped = matrix.reshape(tuple(shape[:TOKEN_AXIS]) + (shape[-1], shape[TOKEN_AXIS]))
    return xp.swapaxes(swapped, CHANNEL_AXIS, TOKEN_AXIS)


def mlp_forward(kind, weights, z, axis=CHANNEL_AXIS):
    """out = MLP(z) applied to every vector along `axis` of z (h: hidden units):

        vanilla: out = W₂ GELU(W₁ z + b₁) + b₂      W₁ = fc1 (h, in), W₂ = fc2 (in, h), b optional
        sym:     out = Wᵀ GELU(W z)                 W = fc2 (h, in), used twice (tied)
        asym:    out = W₁ᵀ GELU(W₁ z) + W₂ GELU(W₁ z) = (W₁ᵀ + W₂) GELU(W₁ z)

    The asym output is computed as the single matmul with M = W₁ᵀ + W₂: equal by linearity and
    cheaper than two; sym is the same path with M = Wᵀ. The vectors are gathered into one matrix
    first (`_as_matrix`), so each linear map is a single GEMM. `weights` maps the names within
    the MLP ('fc1.weight', …) to arrays. Returns (out, cache). Implements the three
    kinds, :eq:`X-mlp-vanilla`, :eq:`X-mlp-sym` and :eq:`X-mlp-asym`.
    """
    if kind not in MLP_KINDS:
        raise InputError(f"unknown MLP kind {kind!r}: choose one of {', '.join(MLP_KINDS)}")
    _check_mlp_weights(kind, weights, z.shape[axis])
    if kind == "vanilla":
        weight_in, weight_out = weights["fc1.weight"], weights["fc2.weight"]
    elif kind == "sym":
        weight_in = weights["fc2.weight"]
        weight_out = weight_in.T
    else:
        weight_in = weights["fc1.weight"]
        weight_out = weight_in.T + weights["fc2.weight"]
    hidden, in_cache = linear_forward(_as_matrix(z, axis), weight_in, weights.get("fc1.bias"))
    activation, gelu_cache = gelu_forward(hidden)
    out, out_cache = linear_forward(activation, weight_out, weights.get("fc2.bias"))
    return _from_matrix(out, z.shape, axis), (kind, axis, in_cache, gelu_cache, out_cache,
                                              z.shape)


def mlp_backward(cache, dout):
    """(dz, grads): grads keyed like the MLP's weights. The output matrix M gets dM = Σ dout aᵀ;
    tied weights add the gradients of both uses: sym dW = dW_in + dMᵀ, asym dW₁ = dW_in + dMᵀ and
    dW₂ = dM."""
    kind, axis, in_cache, gelu_cache, out_cache, shape = cache
    dactivation, dweight_out, dbias_out = linear_backward(out_cache, _as_matrix(dout, axis))
    dhidden = gelu_backward(gelu_cache, dactivation)
    dz, dweight_in, dbias_in = linear_backward(in_cache, dhidden)
    dz = _from_matrix(dz, shape, axis)
    if kind == "sym":
        return dz, {"fc2.weight": dweight_in + dweight_out.T}
    if kind == "asym":
        return dz, {"fc1.weight": dweight_in + dweight_out.T, "fc2.weight": dweight_out}
    grads = {"fc1.weight": dweight_in, "fc1.bias": dbias_in,
             "fc2.weight": dweight_out, "fc2.bias": dbias_out}
    return dz, {name: grad for name, grad in grads.items() if grad is not None}
