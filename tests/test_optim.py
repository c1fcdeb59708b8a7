"""Optimisers against textbook formulas written here independently, timm's decay grouping, the
warm-up + cosine schedule at its key points, clipping, and state round trips."""
import math

import numpy as np
import pytest
from hypothesis import given, strategies as st

from oracle import rel_err
from refham.backend import asarray, rng, to_numpy
from refham.optim import (
    SGD, AdamW, OptimizerError, clip_by_global_norm, cosine_lr, global_norm, is_decayed,
    make_optimizer)

# name → (shape, decayed by timm's default, decayed with decay_norms=False); S=6, C=4
PARAM_TABLE = {
    "stem.proj.weight": ((4, 1, 2, 2), True, True),
    "stem.proj.bias": ((4,), False, False),
    "blocks.0.norm.weight": ((6, 4), True, False),      # joint (S, C) norm weight: 2-D → decayed
    "blocks.0.norm.bias": ((6, 4), False, False),
    "blocks.1.norm1.weight": ((4,), False, False),      # per-token norm weight: 1-D
    "blocks.0.mlp_tokens.fc1.weight": ((3, 6), True, True),
    "blocks.0.mlp_tokens.fc1.bias": ((3,), False, False),
    "blocks.0.mlp_channels.fc2.weight": ((4, 16), True, True),
    "norm.weight": ((4,), False, False),
    "norm.bias": ((4,), False, False),
    "head.weight": ((5, 4), True, True),
    "head.bias": ((5,), False, False),
}


def _params(seed, scale=1.0):
    gen = rng(seed)
    return {name: asarray(scale * gen.standard_normal(shape))
            for name, (shape, _, _) in PARAM_TABLE.items()}


def _host(d):
    return {k: (to_numpy(v).copy() if hasattr(v, "shape") else v) for k, v in d.items()}


def test_decay_grouping_follows_timm_and_the_norm_option():
    for name, (shape, timm_default, without_norms) in PARAM_TABLE.items():
        assert is_decayed(name, shape) == timm_default, name
        assert is_decayed(name, shape, decay_norms=False) == without_norms, name


@pytest.mark.parametrize("decay_norms", [True, False])
def test_weight_decay_only_shrinks_the_decayed_group(decay_norms):
    params = _params(0)
    zero_grads = {k: 0 * v for k, v in params.items()}
    opt = AdamW(weight_decay=0.1, decay_norms=decay_norms)
    new, _ = opt.update(params, zero_grads, opt.init(params), lr=0.5)
    for name, (_, default, without_norms) in PARAM_TABLE.items():
        factor = 0.95 if (default if decay_norms else without_norms) else 1.0
        assert rel_err(new[name], factor * to_numpy(params[name])) <= 1e-15, name


def _reference_adamw(p, grads, lrs, wd, b1, b2, eps):
    """Textbook AdamW on one NumPy array: bias-corrected moments, decoupled decay."""
    m, v = np.zeros_like(p), np.zeros_like(p)
    for t, (g, lr) in enumerate(zip(grads, lrs), start=1):
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g ** 2
        m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        p = p - lr * wd * p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p


def _reference_sgd(p, grads, lrs, wd, mu, nesterov):
    buf = np.zeros_like(p)
    for g, lr in zip(grads, lrs):
        g = g + wd * p
        buf = mu * buf + g
        p = p - lr * (g + mu * buf if nesterov else buf)
    return p


def _run(opt, params, grad_seq, lrs):
    state = opt.init(params)
    for grads, lr in zip(grad_seq, lrs):
        params, state = opt.update(params, grads, state, lr)
    return params, state


@given(seed=st.integers(0, 2**16), wd=st.floats(0, 0.3), b1=st.floats(0, 0.95),
       b2=st.floats(0.5, 0.999), steps=st.integers(1, 5))
def test_adamw_matches_the_textbook_formula(seed, wd, b1, b2, steps):
    params = _params(seed)
    grad_seq = [_params(seed + 1 + k, scale=10.0 ** (k - 2)) for k in range(steps)]
    lrs = [0.1 / (k + 1) for k in range(steps)]
    got, state = _run(AdamW(weight_decay=wd, beta1=b1, beta2=b2, eps=1e-8), params, grad_seq, lrs)
    assert state["step"] == steps
    for name, (_, decayed, _) in PARAM_TABLE.items():
        expected = _reference_adamw(to_numpy(params[name]), [to_numpy(g[name]) for g in grad_seq],
                                    lrs, wd if decayed else 0.0, b1, b2, 1e-8)
        assert rel_err(got[name], expected) <= 1e-12, name


@given(seed=st.integers(0, 2**16), wd=st.floats(0, 0.3), mu=st.floats(0.05, 0.95),
       nesterov=st.booleans(), steps=st.integers(1, 5))
def test_sgd_matches_the_textbook_formula(seed, wd, mu, nesterov, steps):
    params = _params(seed)
    grad_seq = [_params(seed + 1 + k) for k in range(steps)]
    lrs = [0.05] * steps
    got, _ = _run(SGD(momentum=mu, weight_decay=wd, nesterov=nesterov), params, grad_seq, lrs)
    for name, (_, decayed, _) in PARAM_TABLE.items():
        expected = _reference_sgd(to_numpy(params[name]), [to_numpy(g[name]) for g in grad_seq],
                                  lrs, wd if decayed else 0.0, mu, nesterov)
        assert rel_err(got[name], expected) <= 1e-12, name


@pytest.mark.parametrize("opt", [AdamW(weight_decay=0.05), SGD(momentum=0.9, nesterov=True)])
def test_state_round_trip_through_the_host_continues_identically(opt):
    params = _params(3)
    grad_seq = [_params(10 + k) for k in range(6)]
    straight, _ = _run(opt, params, grad_seq, [0.01] * 6)
    half, state = _run(opt, params, grad_seq[:3], [0.01] * 3)
    params, state = _host(half), _host(state)          # what a checkpoint stores
    params = {k: asarray(v) for k, v in params.items()}
    state = {k: (asarray(v) if hasattr(v, "shape") else v) for k, v in state.items()}
    for grads in grad_seq[3:]:
        params, state = opt.update(params, grads, state, 0.01)
    for name in straight:
        assert np.array_equal(to_numpy(params[name]), to_numpy(straight[name])), name


def test_cosine_schedule_key_points():
    base, total, warm = 0.1, 100, 10
    lr = [cosine_lr(t, total, base, warm, min_lr=0.001) for t in range(total + 1)]
    assert lr[0] == pytest.approx(base / warm)
    assert lr[warm - 1] == pytest.approx(base) and lr[warm] == pytest.approx(base)
    assert lr[total] == pytest.approx(0.001)
    assert lr[55] == pytest.approx(0.001 + 0.5 * (base - 0.001))      # half-way through the decay
    assert all(a < b for a, b in zip(lr[:warm], lr[1:warm]))           # rising warm-up
    assert all(a > b for a, b in zip(lr[warm:], lr[warm + 1:]))        # falling cosine
    assert cosine_lr(0, 10, 0.3) == pytest.approx(0.3)                 # no warm-up
    with pytest.raises(OptimizerError, match="warm-up"):
        cosine_lr(0, 10, 0.1, warmup_steps=10)


def test_clipping_by_global_norm():
    grads = _params(5)
    norm = float(to_numpy(global_norm(grads)))
    expected = math.sqrt(sum(float(np.sum(to_numpy(g) ** 2)) for g in grads.values()))
    assert norm == pytest.approx(expected, rel=1e-12)
    clipped, reported = clip_by_global_norm(grads, max_norm=norm / 4)
    assert float(to_numpy(reported)) == norm
    assert float(to_numpy(global_norm(clipped))) == pytest.approx(norm / 4, rel=1e-5)
    for name in grads:                                  # same direction: every tensor scaled alike
        assert rel_err(clipped[name], to_numpy(grads[name]) / 4) <= 1e-5
    for max_norm in (None, 0):
        unchanged, _ = clip_by_global_norm(grads, max_norm)
        assert all(unchanged[k] is grads[k] for k in grads)
    below, _ = clip_by_global_norm(grads, 2 * norm)     # a factor of 1: the same numbers
    assert all(np.array_equal(to_numpy(below[k]), to_numpy(grads[k])) for k in grads)


def test_bad_settings_and_mismatched_state_are_refused():
    with pytest.raises(OptimizerError, match="unknown optimizer 'adam'"):
        make_optimizer("adam", 0.0)
    with pytest.raises(OptimizerError, match="betas"):
        AdamW(beta1=1.0)
    with pytest.raises(OptimizerError, match="weight_decay"):
        SGD(weight_decay=-1)
    with pytest.raises(OptimizerError, match="nesterov"):
        SGD(momentum=0.0, nesterov=True)
    params = _params(0)
    opt = make_optimizer("adamw", 0.05)
    state = opt.init({k: v for k, v in params.items() if k != "head.bias"})
    with pytest.raises(OptimizerError, match="does not belong"):
        opt.update(params, params, state, 0.1)
    with pytest.raises(OptimizerError, match="gradients do not match"):
        opt.update(params, {"head.bias": params["head.bias"]}, opt.init(params), 0.1)
