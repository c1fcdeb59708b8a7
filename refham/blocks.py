"""The two Mixer block equations, each a forward/backward pair applying n_iter weight-tied
iterations to a state x (B, S, C):

    serial (vanilla), :eq:`X-serial-block`:    x ← x + T(LN₁(x));  x ← x + Ch(LN₂(x))
    parallel (the others), :eq:`X-parallel-block`:  g = LN(x);  x ← x + T(g) + Ch(g)

T is the token MLP (S → N_s → S along the token axis −2), Ch the channel MLP (C → N_c → C along
the channel axis −1), both of one MLP kind (`layers.mlp_forward`: 'vanilla', 'sym', 'asym').

    y, cache = parallel_block_forward(x, weights, "sym", n_iter=2)
    dx, grads = parallel_block_backward(cache, dy)        # grads keyed like `weights`

`weights` holds one block's parameters by their timm names within the block (BLOCK_LAYERS):
'norm.weight', 'mlp_tokens.fc2.weight', … (the model's 'blocks.{i}.' prefix removed). Drop path
(stochastic depth) enters as per-sample masks m (B, 1, 1) on each branch, one pair
(m_tokens, m_channels) per iteration: x ← x + m_t ⊙ T(·) … ; None keeps a branch whole.
"""
from refham.layers import (
    CHANNEL_AXIS, TOKEN_AXIS, InputError, layernorm_backward, layernorm_forward, mlp_backward,
    mlp_forward)

# The layers of one block, in the order of the paper's models' state_dict().
BLOCK_LAYERS = {"serial": ("norm1", "mlp_tokens", "norm2", "mlp_channels"),
                "parallel": ("norm", "mlp_tokens", "mlp_channels")}
BRANCH_AXIS = {"mlp_tokens": TOKEN_AXIS, "mlp_channels": CHANNEL_AXIS}


def _layer(weights, layer):
    """The weights of one layer ('norm1', 'mlp_tokens', …) by their names within that layer."""
    prefix = layer + "."
    return {name[len(prefix):]: w for name, w in weights.items() if name.startswith(prefix)}


def _masked(update, mask):
    """m ⊙ update (mask (B, 1, 1)), or the update itself when nothing is dropped."""
    return update if mask is None else update * mask


def _iteration_masks(masks, n_iter):
    """One (m_tokens, m_channels) pair per iteration; no masks: nothing dropped."""
    if masks is None:
        return [(None, None)] * n_iter
    if len(masks) != n_iter:
        raise InputError(f"drop-path masks: need one (tokens, channels) pair per iteration "
                         f"({n_iter}), got {len(masks)}")
    return list(masks)


def _add_grads(total, grads, layer=None):
    """total[layer.name] += grads[name] (names kept without a layer): tied weights and
    iterations sum their gradients."""
    for name, grad in grads.items():
        key = f"{layer}.{name}" if layer else name
        total[key] = total[key] + grad if key in total else grad


def _norm_forward(x, weights, layer, eps, n_axes):
    return layernorm_forward(x, weights[f"{layer}.weight"], weights[f"{layer}.bias"], eps, n_axes)


# ---------------------------------------------------------------------------------------------
# The parallel block's two branches, T(g) and Ch(g)
# ---------------------------------------------------------------------------------------------
def parallel_branches_forward(g, weights, kind, masks=(None, None)):
    """(m_t ⊙ T(g), m_c ⊙ Ch(g)) at g = LN(x) (B, S, C): the two terms a parallel block adds to
    x; their sum is the update u(g), for sym MLPs u = ∇_g F(g), :eq:`M1`. Returns (terms,
    cache)."""
    tokens, token_cache = mlp_forward(kind, _layer(weights, "mlp_tokens"), g, TOKEN_AXIS)
    channels, channel_cache = mlp_forward(kind, _layer(weights, "mlp_channels"), g, CHANNEL_AXIS)
    terms = (_masked(tokens, masks[0]), _masked(channels, masks[1]))
    return terms, (token_cache, channel_cache, masks)


def parallel_branches_backward(cache, du):
    """dg = Tᵀ(m_t ⊙ du) + Chᵀ(m_c ⊙ du), du the gradient of both terms (of their sum). Returns
    (dg, grads), grads keyed 'mlp_tokens.fc2.weight', …"""
    token_cache, channel_cache, (token_mask, channel_mask) = cache
    dg_tokens, token_grads = mlp_backward(token_cache, _masked(du, token_mask))
    dg_channels, channel_grads = mlp_backward(channel_cache, _masked(du, channel_mask))
    grads = {}
    _add_grads(grads, token_grads, "mlp_tokens")
    _add_grads(grads, channel_grads, "mlp_channels")
    return dg_tokens + dg_channels, grads


# ---------------------------------------------------------------------------------------------
# Parallel block: g = LN(x); x ← x + T(g) + Ch(g)
# ---------------------------------------------------------------------------------------------
def parallel_block_forward(x, weights, kind, n_iter=1, eps=1e-6, n_axes=None, masks=None,
                           observe=None):
    """n_iter iterations of g = LN(x), x ← x + T(g) + Ch(g) (implements :eq:`X-parallel-block`), with the
    same weights ('norm.weight', 'norm.bias', 'mlp_tokens.…', 'mlp_channels.…').

    n_axes: the axes the norm reduces over (2: the joint (S, C) norm, 1: per token over C);
    default the norm weight's ndim. masks: None or one (m_tokens, m_channels) pair per
    iteration. observe(t, x), if given, sees the states x⁽ᵗ⁾, t = 0..n_iter (x⁽⁰⁾ = the input).
    Returns (x⁽ⁿ_iter⁾, cache).
    """
    caches = []
    for t, iteration_masks in enumerate(_iteration_masks(masks, n_iter)):
        if observe is not None:
            observe(t, x)
        g, norm_cache = _norm_forward(x, weights, "norm", eps, n_axes)
        (tokens, channels), branch_cache = parallel_branches_forward(g, weights, kind,
                                                                     iteration_masks)
        x = x + tokens + channels
        caches.append((norm_cache, branch_cache))
    if observe is not None:
        observe(n_iter, x)
    return x, caches


def parallel_block_backward(cache, dy):
    """dx = dy + LN′ᵀ(dg), dg = Tᵀ(m_t ⊙ dy) + Chᵀ(m_c ⊙ dy), per iteration in reverse.
    Returns (dx, grads): grads keyed like the forward's weights, summed over the iterations."""
    grads = {}
    for norm_cache, branch_cache in reversed(cache):
        dg, branch_grads = parallel_branches_backward(branch_cache, dy)
        dx_norm, dweight, dbias = layernorm_backward(norm_cache, dg)
        dy = dy + dx_norm
        _add_grads(grads, {"weight": dweight, "bias": dbias}, "norm")
        _add_grads(grads, branch_grads)
    return dy, grads


# ---------------------------------------------------------------------------------------------
# Serial block: x ← x + T(LN₁(x)); x ← x + Ch(LN₂(x))
# ---------------------------------------------------------------------------------------------
def _residual_forward(x, weights, kind, norm, mlp, mask, eps, n_axes):
    """x + m ⊙ MLP(LN(x)), one half of a serial block."""
    g, norm_cache = _norm_forward(x, weights, norm, eps, n_axes)
    update, mlp_cache = mlp_forward(kind, _layer(weights, mlp), g, BRANCH_AXIS[mlp])
    return x + _masked(update, mask), (norm, mlp, norm_cache, mlp_cache, mask)


def _residual_backward(cache, dy, grads):
    """dy + LN′ᵀ(MLPᵀ(m ⊙ dy)), adding the layer gradients to `grads`."""
    norm, mlp, norm_cache, mlp_cache, mask = cache
    dg, mlp_grads = mlp_backward(mlp_cache, _masked(dy, mask))
    dx_norm, dweight, dbias = layernorm_backward(norm_cache, dg)
    _add_grads(grads, {"weight": dweight, "bias": dbias}, norm)
    _add_grads(grads, mlp_grads, mlp)
    return dy + dx_norm


def serial_block_forward(x, weights, kind, n_iter=1, eps=1e-6, n_axes=None, masks=None,
                         observe=None):
    """n_iter iterations of x ← x + T(LN₁(x)); x ← x + Ch(LN₂(x)) (implements :eq:`X-serial-block`), with
    the same weights ('norm1.…', 'mlp_tokens.…', 'norm2.…', 'mlp_channels.…'); the vanilla
    Mixer's block. Arguments and return as `parallel_block_forward`."""
    caches = []
    for t, (token_mask, channel_mask) in enumerate(_iteration_masks(masks, n_iter)):
        if observe is not None:
            observe(t, x)
        x, token_cache = _residual_forward(x, weights, kind, "norm1", "mlp_tokens", token_mask,
                                           eps, n_axes)
        x, channel_cache = _residual_forward(x, weights, kind, "norm2", "mlp_channels",
                                             channel_mask, eps, n_axes)
        caches.append((token_cache, channel_cache))
    if observe is not None:
        observe(n_iter, x)
    return x, caches


def serial_block_backward(cache, dy):
    """Per iteration in reverse: dy ← dy + LN₂′ᵀ(Chᵀ(m_c ⊙ dy)), then dy ← dy + LN₁′ᵀ(Tᵀ(m_t ⊙
    dy)). Returns (dx, grads) as `parallel_block_backward`."""
    grads = {}
    for token_cache, channel_cache in reversed(cache):
        dy = _residual_backward(channel_cache, dy, grads)
        dy = _residual_backward(token_cache, dy, grads)
    return dy, grads
