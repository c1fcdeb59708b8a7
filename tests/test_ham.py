"""refham.ham (docs: ham) against autograd on the same forward code, explicit index sums, and
the Lyapunov property (H4) along discrete and RK4 trajectories of drawn symmetric HAMs.

Test data are drawn with NumPy (backend.rng) and moved with `asarray` for the hand-written path;
autograd differentiates the same HAM code on NumPy. Every (S, C) layer has S ≠ C, N_s ≠ N_c.
"""
import dataclasses
import importlib.util
import pathlib
import sys

import pytest
from oracle import autograd  # (the module skips without autograd)
import numpy as np
from hypothesis import given, strategies as st

from oracle import TOL, autograd_numpy, rel_err
from refham.cli import commands as cli
from refham.backend import asarray, rng, to_numpy
from refham.dynamics import DynamicsError, euler_step, integrate, rk4_step
from refham.ham import HAM, ChannelMixing, Dense, HAMError, Layer, TokenMixing
from refham.lagrangians import LayerNorm, ReLU, Softmax, Tanh, get_lagrangian

CONVEX = ("identity", "relu", "repu", "tanh", "sigmoid", "softmax", "layernorm", "spherical")
ALPHA_MAX = 0.05
ENERGY_RTOL = 1e-10


def on_backend(arrays):
    return {k: asarray(v) for k, v in arrays.items()}


def on_host(arrays):
    return {k: to_numpy(v) for k, v in arrays.items()}


def inner(a, b):
    """⟨a, b⟩ per sample (NumPy or autograd arrays)."""
    return (a * b).reshape(a.shape[0], -1).sum(axis=1)


# ---------------------------------------------------------------- drawn HAMs

@st.composite
def lagrangian_specs(draw, ndim, names):
    """(name, params) of a Lagrangian for a layer with `ndim` axes."""
    name = draw(st.sampled_from(names))
    params = {}
    if name == "repu":
        params["n"] = draw(st.sampled_from([2.5, 3, 4]))
    if name in ("tanh", "sigmoid", "softmax"):
        params["beta"] = draw(st.floats(0.25, 2.0))
    if name == "softmax":
        params["axis"] = draw(st.sampled_from(range(-ndim, 0)))
    if name in ("layernorm", "spherical"):
        params["gamma"] = draw(st.floats(0.5, 2.0))
        axes = draw(st.lists(st.sampled_from(range(-ndim, 0)), min_size=1, unique=True))
        params["axes"] = tuple(axes)
    return name, params


@dataclasses.dataclass
class Case:
    ham: HAM
    specs: dict        # layer name -> (Lagrangian name, params)
    xs: dict           # NumPy states
    weights: dict      # NumPy weights, spectral norm <= 1


@st.composite
def hidden_layers(draw, name, S, C, kinds, partners):
    """(shape, synapse) of a hidden layer `name` joined by a synapse of a kind drawn from
    `kinds` to the visible (S, C) layer "v" (token, channel mixing) or, dense, to one of
    `partners` in either orientation."""
    kind = draw(st.sampled_from(kinds))
    if kind == "token":
        return (draw(st.integers(1, 3)), C), TokenMixing(name, "v")
    if kind == "channel":
        return (S, draw(st.integers(4, 6))), ChannelMixing(name, "v")
    other = draw(st.sampled_from(partners))
    shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=2)))
    return shape, Dense(name, other) if draw(st.booleans()) else Dense(other, name)


@st.composite
def cases(draw, names=CONVEX, batch=2):
    """A connected HAM of 2–4 layers around a visible (S, C) layer "v" (S ≠ C): the first hidden
    layer joins v by token or channel mixing, later ones by any synapse kind, plus an optional
    dense edge closing a cycle; random τ; weights W·u/‖W‖₂, u ∈ [0.1, 1]; states N(0,1)."""
    S, C = draw(st.lists(st.integers(2, 5), min_size=2, max_size=2, unique=True))
    shapes, synapses = {"v": (S, C)}, {}
    for i in range(draw(st.integers(1, 3))):
        kinds = ("token", "channel") if i == 0 else ("token", "channel", "dense")
        shapes[f"h{i}"], synapses[f"s{i}"] = draw(hidden_layers(f"h{i}", S, C, kinds,
                                                                sorted(shapes)))
    if len(shapes) > 2 and draw(st.booleans()):
        a, b = draw(st.lists(st.sampled_from(sorted(shapes)), min_size=2, max_size=2, unique=True))
        synapses["cycle"] = Dense(a, b)
    specs = {n: draw(lagrangian_specs(len(shape), names)) for n, shape in shapes.items()}
    layers = {n: Layer(shape, get_lagrangian(specs[n][0], **specs[n][1]),
                       tau=draw(st.floats(0.5, 2.0))) for n, shape in shapes.items()}
    ham = HAM(layers, synapses)
    gen = rng(draw(st.integers(0, 2**31)))
    weights = {}
    for name, shape in ham.weight_shapes().items():
        w = gen.standard_normal(shape)
        weights[name] = w * gen.uniform(0.1, 1.0) / np.linalg.norm(w, 2)
    xs = {n: gen.standard_normal((batch,) + shape) for n, shape in shapes.items()}
    return Case(ham, specs, xs, weights)


# ---------------------------------------------------------------- gradients against autograd

def energy_of_x_and_g(ham, xs, gs, weights):
    """(H1) with x and g independent: Σ_A [⟨x_A, g_A⟩ − L_A(x_A)] + Σ_s E_s(g)."""
    legendre = sum(inner(xs[n], gs[n]) - layer.lagrangian.value(xs[n], layer.event_ndim)
                   for n, layer in ham.layers.items())
    return legendre + sum(s.synapse_energy(gs, weights[n]) for n, s in ham.synapses.items())


@given(cases(names=CONVEX + ("gelu",)))
def test_dEdg_is_the_gradient_of_H1_in_g_with_x_fixed(case):
    ham, xs, weights = case.ham, case.xs, case.weights
    with autograd_numpy():
        gs = {n: layer.lagrangian.activation(xs[n]) for n, layer in ham.layers.items()}
        expected = autograd.grad(lambda g: energy_of_x_and_g(ham, xs, g, weights).sum())(gs)
        at_g_of_x = energy_of_x_and_g(ham, xs, gs, weights)
    actual = ham.dEdg(on_backend(xs), on_backend(weights))
    for name in ham.layers:
        assert rel_err(actual[name], expected[name]) <= TOL, name
    assert rel_err(ham.total_energy(on_backend(xs), on_backend(weights)), at_g_of_x) <= TOL
    given_gs = ham.dEdg(on_backend(xs), on_backend(weights), gs=on_backend(gs))
    assert all(rel_err(given_gs[n], expected[n]) <= TOL for n in ham.layers)
    energy, grads = ham.total_energy_and_dEdg(on_backend(xs), on_backend(weights))
    assert rel_err(energy, at_g_of_x) <= TOL
    assert all(rel_err(grads[n], expected[n]) <= TOL for n in ham.layers)


@given(cases(names=CONVEX + ("gelu",)))
def test_the_combined_pass_equals_the_separate_functions(case):
    """total_energy_and_dEdg shares activations and W·g products; it must change no digit
    that matters: equal to total_energy and dEdg to float64 rounding."""
    xs, weights = on_backend(case.xs), on_backend(case.weights)
    energy, grads = case.ham.total_energy_and_dEdg(xs, weights)
    tree = case.ham.energy_tree(xs, weights)
    parts = [*tree["layers"].values(), *tree["synapses"].values()]
    scale = sum(np.abs(to_numpy(part)) for part in parts)  # E may cancel to ~0: use its parts
    difference = to_numpy(energy) - to_numpy(tree["total"])
    assert np.all(np.abs(difference) <= 1e-13 * scale)
    separate = case.ham.dEdg(xs, weights)
    assert all(rel_err(grads[n], separate[n]) <= 1e-14 for n in case.ham.layers)


@given(cases(names=CONVEX + ("gelu",)))
def test_dEdt_is_the_chain_rule_and_nonpositive_for_convex_layers(case):
    ham, xs, weights = case.ham, case.xs, case.weights
    with autograd_numpy():
        grad_x = autograd.grad(lambda x: ham.total_energy(x, weights).sum())(xs)
    velocity = on_host(ham.velocity(on_backend(xs), on_backend(weights)))
    expected = sum(inner(grad_x[n], velocity[n]) for n in ham.layers)
    dEdt = ham.dEdt(on_backend(xs), on_backend(weights))
    assert rel_err(dEdt, expected) <= TOL
    if all(layer.lagrangian.convex for layer in ham.layers.values()):
        assert np.all(to_numpy(dEdt) <= 1e-12 * np.abs(expected).max())


SYNAPSE_KINDS = {  # kind -> (synapse, shape of p, shape of q, W shape) for S, C, N_s, N_c
    "dense": lambda S, C, n_s, n_c: (Dense("a", "b"), (S, n_s), (C, n_c), (S * n_s, C * n_c)),
    "token": lambda S, C, n_s, n_c: (TokenMixing("h", "v"), (n_s, C), (S, C), (n_s, S)),
    "channel": lambda S, C, n_s, n_c: (ChannelMixing("h", "v"), (S, n_c), (S, C), (n_c, C)),
}


@st.composite
def synapse_cases(draw):
    """(synapse, gs, W, cotangents) with S ≠ C and N_s ≠ N_c, batch 2, NumPy arrays."""
    S, C, n_s, n_c = draw(st.lists(st.integers(1, 5), min_size=4, max_size=4, unique=True))
    make = SYNAPSE_KINDS[draw(st.sampled_from(sorted(SYNAPSE_KINDS)))]
    synapse, p_shape, q_shape, w_shape = make(S, C, n_s, n_c)
    gen = rng(draw(st.integers(0, 2**31)))
    p, q = synapse.layers
    gs = {p: gen.standard_normal((2,) + p_shape), q: gen.standard_normal((2,) + q_shape)}
    cot = {p: gen.standard_normal((2,) + p_shape), q: gen.standard_normal((2,) + q_shape)}
    return synapse, gs, gen.standard_normal(w_shape), cot


@given(synapse_cases())
def test_synapse_grad_and_vjp_match_autograd(case):
    synapse, gs, W, cot = case
    p, q = synapse.layers
    with autograd_numpy():
        d_energy = autograd.grad(lambda g: synapse.synapse_energy(g, W).sum())(gs)

        def pulled_back(g, w):
            grads = synapse.grad(g, w)
            return sum(inner(cot[n], grads[n]).sum() for n in (p, q))
        d_gs = autograd.grad(pulled_back, 0)(gs, W)
        d_W = autograd.grad(pulled_back, 1)(gs, W)
    grads = synapse.grad(on_backend(gs), asarray(W))
    dW, dg = synapse.vjp(on_backend(gs), asarray(W), on_backend({**cot, "other": np.ones(3)}))
    for n in (p, q):
        assert rel_err(grads[n], d_energy[n]) <= TOL
        assert rel_err(dg[n], d_gs[n]) <= TOL
    assert rel_err(dW, d_W) <= TOL
    with pytest.raises(HAMError, match="cotangent"):
        synapse.vjp(on_backend(gs), asarray(W), {p: asarray(cot[p])})


@given(synapse_cases())
def test_synapse_energies_equal_explicit_index_sums(case):
    """Written with loops over named axes: a token/channel swap or a wrong flattening fails."""
    synapse, gs, W, _ = case
    p, q = synapse.layers
    g_p, g_q = gs[p], gs[q]
    expected = np.zeros(2)
    for b in range(2):
        if isinstance(synapse, Dense):  # rows of W index a's elements in C order
            expected[b] = -sum(g_p[b].ravel()[i] * W[i, j] * g_q[b].ravel()[j]
                               for i in range(W.shape[0]) for j in range(W.shape[1]))
        elif isinstance(synapse, TokenMixing):  # h[n, c] ← Σ_s W[n, s] v[s, c]
            expected[b] = -sum(g_p[b][n, c] * W[n, s] * g_q[b][s, c] for n in range(W.shape[0])
                               for s in range(W.shape[1]) for c in range(g_q.shape[2]))
        else:  # ChannelMixing: h[s, m] ← Σ_c W[m, c] v[s, c]
            expected[b] = -sum(g_p[b][s, m] * W[m, c] * g_q[b][s, c] for m in range(W.shape[0])
                               for c in range(W.shape[1]) for s in range(g_q.shape[1]))
    assert rel_err(synapse.synapse_energy(on_backend(gs), asarray(W)), expected) <= TOL


@given(cases(names=CONVEX + ("gelu",)), st.floats(0.01, 0.5))
def test_step_vjp_matches_autograd(case, alpha):
    ham, xs, weights = case.ham, case.xs, case.weights
    cot = {n: rng(1).standard_normal(x.shape) for n, x in xs.items()}

    def pulled_back(x, w):
        new = ham.step(x, w, alpha)
        return sum(inner(cot[n], new[n]).sum() for n in ham.layers)
    with autograd_numpy():
        d_xs = autograd.grad(pulled_back, 0)(xs, weights)
        d_ws = autograd.grad(pulled_back, 1)(xs, weights)
    actual_xs, actual_ws = ham.step_vjp(on_backend(xs), on_backend(weights), alpha, on_backend(cot))
    assert all(rel_err(actual_xs[n], d_xs[n]) <= TOL for n in ham.layers)
    assert all(rel_err(actual_ws[n], d_ws[n]) <= TOL for n in ham.synapses)


# ---------------------------------------------------------------- the adiabatic limit (H6)

@st.composite
def star_cases(draw, batch=2):
    """A visible (S, C) layer "v" (S ≠ C) and 1–3 hidden layers, each joined to v alone by a
    token, channel or dense synapse (dense in either orientation); any Lagrangian, gelu too;
    weights 0.5·N(0,1), visible states N(0,1)."""
    S, C = draw(st.lists(st.integers(2, 5), min_size=2, max_size=2, unique=True))
    shapes, synapses = {"v": (S, C)}, {}
    for i in range(draw(st.integers(1, 3))):
        shapes[f"h{i}"], synapses[f"s{i}"] = draw(hidden_layers(
            f"h{i}", S, C, ("token", "channel", "dense"), ["v"]))
    specs = {n: draw(lagrangian_specs(len(shape), CONVEX + ("gelu",)))
             for n, shape in shapes.items()}
    ham = HAM({n: Layer(shape, get_lagrangian(specs[n][0], **specs[n][1]))
               for n, shape in shapes.items()}, synapses)
    gen = rng(draw(st.integers(0, 2**31)))
    weights = {n: 0.5 * gen.standard_normal(shape) for n, shape in ham.weight_shapes().items()}
    return ham, gen.standard_normal((batch, S, C)), weights


def at_fixed_points(ham, x, weights):
    """{v: x, h: x_h*} with every hidden x_h* = −∂E_s/∂g_h, read off the HAM's own (H2) at
    x_h = 0 (so ∂E/∂g_h = 0 at x_h*): the hidden layers' fixed points for this visible state."""
    zeros = {n: np.zeros((x.shape[0],) + layer.shape) for n, layer in ham.layers.items()}
    grads = on_host(ham.dEdg(on_backend({**zeros, "v": x}), on_backend(weights)))
    return {**{n: -grads[n] for n in ham.layers if n != "v"}, "v": x}


@given(star_cases())
def test_adiabatic_energy_is_H1_with_the_hidden_layers_at_their_fixed_points(case):
    """Equal energies, and equal ∂E/∂x_v (the hidden states held fixed in H1: at a fixed point
    ∂E/∂x_h = H_h·∂E/∂g_h = 0, so moving them with x_v changes nothing to first order)."""
    ham, x, weights = case
    full = at_fixed_points(ham, x, weights)
    residual = on_host(ham.dEdg(on_backend(full), on_backend(weights)))
    assert all(np.abs(residual[n]).max() <= 1e-12 * (1 + np.abs(full[n]).max())
               for n in ham.layers if n != "v")
    tree = ham.energy_tree(on_backend(full), on_backend(weights))
    parts = [to_numpy(part) for part in [*tree["layers"].values(), *tree["synapses"].values()]]
    scale = sum(np.abs(part) for part in parts)  # E may cancel to ~0: bound by its parts
    adiabatic = to_numpy(ham.adiabatic_energy(asarray(x), on_backend(weights), "v"))
    assert adiabatic.shape == (2,)
    assert np.all(np.abs(adiabatic - to_numpy(tree["total"])) <= 1e-12 * scale)
    with autograd_numpy():
        expected = autograd.grad(lambda v: ham.total_energy({**full, "v": v}, weights).sum())(x)
        actual = autograd.grad(lambda v: ham.adiabatic_energy(v, weights, "v").sum())(x)
    assert rel_err(actual, expected) <= TOL


# ---------------------------------------------------------------- the energy descends

def assert_energy_never_increases(energies):
    """E_{t+1} ≤ E_t + 1e-10·max(1, |E_t|) for every step and sample (the floor 1 keeps the
    relative tolerance meaningful where E passes through 0)."""
    energies = to_numpy(energies)
    rise = energies[1:] - energies[:-1]
    allowed = ENERGY_RTOL * np.maximum(1.0, np.abs(energies[:-1]))
    assert np.all(rise <= allowed), f"energy rose by {rise.max():.3g} (allowed {allowed.max():.3g})"


def group_norms(a, axes):
    """‖a‖ over `axes` for every group (the other axes), flattened per sample: (B, groups)."""
    return np.sqrt((a * a).sum(axis=axes)).reshape(a.shape[0], -1)


def hessian_bound(spec, x, dx):
    """K with H_A(y) ⪯ K·I for every y on the segment [x, x + dx], per sample (B,).

    identity, relu: 1; tanh(β): β; sigmoid(β): β/4; softmax(β): β/2 (λ_max(diag p − ppᵀ) ≤ ½);
    repu(n): (n−1)·max relu(y)^{n−2}, and relu(x + t·dx) ≤ relu(x) + |dx|;
    layernorm(γ): γ/σ, eigenvalues of (γ/σ)(P − x̂x̂ᵀ/D) lie in [0, γ/σ], and along the segment
    ‖P y‖ ≥ ‖P x‖ − ‖P dx‖ bounds σ below; spherical(γ): γ/r with r ≥ √((‖x‖ − ‖dx‖)₊² + ε)."""
    name, params = spec
    B = x.shape[0]
    if name in ("identity", "relu"):
        return np.ones(B)
    if name in ("tanh", "sigmoid", "softmax"):
        return np.full(B, params["beta"] * {"tanh": 1.0, "sigmoid": 0.25, "softmax": 0.5}[name])
    if name == "repu":
        peak = (np.maximum(x, 0) + np.abs(dx)).reshape(B, -1).max(axis=1)
        return (params["n"] - 1) * peak ** (params["n"] - 2)
    axes, gamma, eps = params["axes"], params["gamma"], 1e-5
    if name == "layernorm":
        size = np.prod([x.shape[a] for a in axes])
        centred = [a - a.mean(axis=axes, keepdims=True) for a in (x, dx)]
        gap = np.maximum(group_norms(centred[0], axes) - group_norms(centred[1], axes), 0)
        return (gamma / np.sqrt(gap ** 2 / size + eps)).max(axis=1)
    gap = np.maximum(group_norms(x, axes) - group_norms(dx, axes), 0)
    return (gamma / np.sqrt(gap ** 2 + eps)).max(axis=1)


def safe_alpha(case, xs, weights):
    """The largest α ≤ ALPHA_MAX for which a (H5) step from xs provably does not raise E:
    `HAM.descent_step_bound` with each K_A bounded on the segment of the largest step
    (α = ALPHA_MAX), which contains every smaller one, and over the batch."""
    ham = case.ham
    grads = on_host(ham.dEdg(on_backend(xs), on_backend(weights)))
    curvature = {n: float(np.max(hessian_bound(case.specs[n], xs[n],
                                               ALPHA_MAX / layer.tau * grads[n])))
                 for n, layer in ham.layers.items()}
    return min(ALPHA_MAX, ham.descent_step_bound(on_backend(weights), curvature))


def descend_provably(case, alpha, n_steps):
    """n_steps of (H5) from case.xs, each of size min(alpha, safe_alpha): (states, energies)."""
    ham, weights = case.ham, on_backend(case.weights)
    xs = on_backend(case.xs)
    energies = [to_numpy(ham.total_energy(xs, weights))]
    for _ in range(n_steps):
        xs = ham.step(xs, weights, min(alpha, safe_alpha(case, on_host(xs), case.weights)))
        energies.append(to_numpy(ham.total_energy(xs, weights)))
    return xs, np.stack(energies)


@given(cases(), st.floats(0.005, ALPHA_MAX))
def test_energy_never_increases_along_discrete_steps(case, alpha):
    """40 steps: long enough to near a fixed point, where a broken symmetry shows (a q-side
    gradient scaled by 3 fails here, while it passes in the first 15 steps)."""
    assert_energy_never_increases(descend_provably(case, alpha, 40)[1])


@given(cases(), st.floats(0.002, 0.01))
def test_energy_never_increases_along_rk4_trajectories(case, dt):
    """10 RK4 steps from the state after 40 provable Euler steps (near a fixed point, where a
    broken symmetry shows), with dt no larger than that state's provably safe Euler step: RK4
    has no such proof, but it is stable there, and the flow is short (t ≤ 0.1), which matters
    with repu layers, whose flow can blow up in finite time (ẋ ~ x^{n−1})."""
    warm, _ = descend_provably(case, ALPHA_MAX, 40)
    dt = min(dt, safe_alpha(case, on_host(warm), case.weights))
    trajectory = case.ham.integrate(warm, on_backend(case.weights), dt, 10)
    assert trajectory.energies.shape == (11, 2)
    assert_energy_never_increases(trajectory.energies)


@given(st.integers(1, 4), st.integers(1, 4), st.floats(0.2, 5.0), st.integers(0, 2**31))
def test_the_step_bound_lies_within_a_factor_two_of_where_E_rises(n_a, n_b, norm, seed):
    """Identity layers a, b (τ = 1) and W of spectral norm w: E = ½xᵀQx, Q = [[I, −W], [−Wᵀ, I]],
    whose largest eigenvalue λ = 1 + w has the eigenvector (u, −v) (u, v: W's top singular
    pair). A step x ← (I − αQ)x multiplies that component by 1 − αλ, so E rises there exactly
    when α > 2/(1 + w). The bound is 1/(1 + w/2) = 2/(2 + w), below that by (2 + w)/(1 + w) ≤ 2:
    a step of the bound lowers E, a step 1% beyond 2/(1 + w) raises it."""
    W = rng(seed).standard_normal((n_a, n_b))
    W *= norm / np.linalg.norm(W, 2)
    u, _, vt = np.linalg.svd(W)
    ham = HAM({"a": Layer((n_a,), get_lagrangian("identity")),
               "b": Layer((n_b,), get_lagrangian("identity"))}, {"ab": Dense("a", "b")})
    weights, xs = {"ab": asarray(W)}, on_backend({"a": u[:, :1].T, "b": -vt[:1]})
    bound = ham.descent_step_bound(weights, {"a": 1.0, "b": 1.0})
    assert abs(bound - 2 / (2 + norm)) <= 1e-12

    def rise(alpha):
        energies = to_numpy(ham.descend(xs, weights, alpha, max_steps=1).energies)
        return energies[1, 0] - energies[0, 0]
    assert rise(bound) < 0 < rise(1.01 * 2 / (1 + norm))


def test_the_step_bound_takes_tau_and_refuses_nonconvex_layers():
    """τ_b = 0.5 halves b's bound: min(1, 0.5)/(1 + 1·3/2) = 0.2 for W = 3·I; a gelu layer has
    no bound, and every layer needs its K."""
    layers = {"a": Layer((2,), get_lagrangian("identity")),
              "b": Layer((2,), get_lagrangian("identity"), tau=0.5)}
    ham = HAM(layers, {"ab": Dense("a", "b")})
    weights = {"ab": asarray(3 * np.eye(2))}
    assert abs(ham.descent_step_bound(weights, {"a": 1.0, "b": 1.0}) - 0.2) <= 1e-15
    gelu = HAM({**layers, "b": Layer((2,), get_lagrangian("gelu"))}, {"ab": Dense("a", "b")})
    with pytest.raises(HAMError, match="not convex"):
        gelu.descent_step_bound(weights, {"a": 1.0, "b": 1.0})
    with pytest.raises(HAMError, match="curvature"):
        ham.descent_step_bound(weights, {"a": 1.0})


def identity_pair(n):
    """Layers "a" and "b" of n units with the identity Lagrangian (g = x, E_A = ½‖x‖²)."""
    return {name: Layer((n,), get_lagrangian("identity")) for name in "ab"}


@dataclasses.dataclass(frozen=True, eq=False)
class MismatchedDense(Dense):
    """The energy uses W (E = −⟨g_a, W g_b⟩), but the update of b uses V in place of Wᵀ:
    ∂E/∂g_b is replaced by −V g_a. No energy has this pair of updates when V ≠ Wᵀ."""
    backward: np.ndarray = None

    def synapse_energy_and_signals(self, gs, W):
        energy, signals = super().synapse_energy_and_signals(gs, W)
        return energy, {**signals, self.b: gs[self.a] @ self.backward.T}


@given(st.integers(1, 5), st.floats(0.1, 0.9), st.integers(0, 1000))
def test_a_mismatched_backward_matrix_raises_the_energy(n, w, seed):
    """Identity layers a, b (n each), W = w·I, V = (2/w)·I, x_a = W x_b (so ∂E/∂g_a = 0).
    One step of α moves only b: x_b ← x_b − α(x_b − V x_a) = (1 + α)x_b, and with
    E = ½‖x_a‖² + ½‖x_b‖² − w⟨x_a, x_b⟩ the energy changes by exactly α(1 + α/2 − w²)‖x_b‖² > 0.
    The monotonicity check must catch it, while the symmetric HAM passes."""
    alpha = ALPHA_MAX
    layers = identity_pair(n)
    x_b = rng(seed).standard_normal((1, n)) + 0.1
    xs, W = on_backend({"a": w * x_b, "b": x_b}), {"ab": asarray(w * np.eye(n))}
    broken = HAM(layers, {"ab": MismatchedDense("a", "b", backward=asarray(2 / w * np.eye(n)))})
    energies = broken.descend(xs, W, alpha, max_steps=1).energies
    rise = to_numpy(energies[1] - energies[0])
    assert rel_err(rise, alpha * (1 + alpha / 2 - w * w) * (x_b ** 2).sum(axis=1)) <= 1e-12
    with pytest.raises(AssertionError, match="energy rose"):
        assert_energy_never_increases(energies)
    assert_energy_never_increases(HAM(layers, {"ab": Dense("a", "b")}).descend(
        xs, W, alpha, max_steps=5).energies)


# ---------------------------------------------------------------- dynamics bookkeeping

def small_ham():
    return HAM({"v": Layer((3, 2), LayerNorm(axes=(-2, -1)), tau=0.5),
                "h": Layer((4, 2), Tanh(beta=1.5), tau=2.0), "c": Layer((3, 5), ReLU())},
               {"t": TokenMixing("h", "v"), "m": ChannelMixing("c", "v")})


def test_step_is_H5_and_descend_repeats_it():
    ham = small_ham()
    weights = ham.init_weights(seed=0, scale=0.3)
    xs = ham.init_states(2, seed=1, scale=1.0)
    grads = ham.dEdg(xs, weights)
    stepped = ham.step(xs, weights, 0.1)
    for n, layer in ham.layers.items():
        assert rel_err(stepped[n], xs[n] - 0.1 / layer.tau * grads[n]) <= 1e-14
    trajectory = ham.descend(xs, weights, 0.1, max_steps=3)
    assert trajectory.steps == 3 and not trajectory.converged
    assert len(trajectory.states) == 4 and trajectory.energies.shape == (4, 2)
    again = ham.step(ham.step(stepped, weights, 0.1), weights, 0.1)
    assert all(rel_err(trajectory.final[n], again[n]) <= 1e-14 for n in ham.layers)
    euler = ham.integrate(xs, weights, dt=0.1, n_steps=3, method="euler")
    assert all(rel_err(euler.final[n], again[n]) <= 1e-14 for n in ham.layers)
    assert rel_err(trajectory.energies[-1], ham.total_energy(again, weights)) <= 1e-14


def test_descend_stops_at_tolerance():
    ham = small_ham()
    weights = ham.init_weights(seed=0, scale=0.3)
    trajectory = ham.descend(ham.init_states(2, seed=1, scale=1.0), weights, 0.2, max_steps=500,
                             tol=1e-3)
    assert trajectory.converged and trajectory.steps < 500
    last = {n: to_numpy(trajectory.states[-1][n] - trajectory.states[-2][n]) for n in ham.layers}
    assert max(np.sqrt((d ** 2).reshape(2, -1).sum(axis=1)).max() for d in last.values()) < 1e-3
    before = {n: to_numpy(trajectory.states[-2][n] - trajectory.states[-3][n]) for n in ham.layers}
    assert max(np.sqrt((d ** 2).reshape(2, -1).sum(axis=1)).max() for d in before.values()) >= 1e-3


def test_rk4_and_euler_steps_are_the_textbook_formulas():
    """On ẋ = λx one step gives the Taylor polynomial of e^{λdt} of order 4 (RK4) and 1 (Euler);
    dict states are stepped leaf by leaf."""
    lam, dt = -1.3, 0.2
    x = asarray(rng(0).standard_normal((2, 3)))
    z = lam * dt
    taylor4 = 1 + z + z ** 2 / 2 + z ** 3 / 6 + z ** 4 / 24
    assert rel_err(rk4_step(lambda y: lam * y, x, dt), taylor4 * to_numpy(x)) <= 1e-14
    assert rel_err(euler_step(lambda y: lam * y, x, dt), (1 + z) * to_numpy(x)) <= 1e-14
    tree = rk4_step(lambda t: {"a": lam * t["a"], "b": 2 * lam * t["b"]}, {"a": x, "b": x}, dt)
    z2 = 2 * z
    taylor4_of_2z = 1 + z2 + z2 ** 2 / 2 + z2 ** 3 / 6 + z2 ** 4 / 24
    assert rel_err(tree["b"], taylor4_of_2z * to_numpy(x)) <= 1e-14
    trajectory = integrate(lambda y: lam * y, x, dt, 5, energy=lambda y: (y * y).sum(axis=1))
    assert rel_err(trajectory.final, taylor4 ** 5 * to_numpy(x)) <= 1e-13
    assert trajectory.energies.shape == (6, 2) and trajectory.steps == 5
    assert integrate(lambda y: lam * y, x, dt, 2).energies is None


def test_energy_tree_adds_up_and_states_initialise():
    ham = small_ham()
    weights = ham.init_weights(seed=3)
    assert {n: tuple(w.shape) for n, w in weights.items()} == {"t": (4, 3), "m": (5, 2)}
    assert rel_err(weights["t"], 0.02 * rng(3).standard_normal((4, 3))) <= 1e-15
    assert rel_err(ham.init_weights(seed=3)["m"], weights["m"]) == 0
    xs = ham.init_states(3, seed=4, scale=10.0)
    assert rel_err(xs["v"], 10 * rng(4).standard_normal((3, 3, 2))) <= 1e-15
    assert all(np.all(to_numpy(x) == 0) for x in ham.init_states(3).values())
    tree = ham.energy_tree(xs, weights)
    parts = sum(tree["layers"].values()) + sum(tree["synapses"].values())
    assert rel_err(tree["total"], parts) <= 1e-14 and tree["total"].shape == (3,)
    # layernorm's neuron energy is −γDε/σ (docs: lagrangians), over the D = 6 elements of v
    sigma = np.sqrt(to_numpy(xs["v"]).reshape(3, -1).var(axis=1) + 1e-5)
    assert rel_err(tree["layers"]["v"], -6 * 1e-5 / sigma) <= 1e-10


# ---------------------------------------------------------------- bad graphs, bad calls

def relu_graph(shapes, synapses):
    """A HAM of relu layers of these shapes (for graph checks, the Lagrangian does not matter)."""
    return HAM({name: Layer(shape, ReLU()) for name, shape in shapes.items()}, synapses)


@pytest.mark.parametrize("build, message", [
    (lambda: Layer((0, 3), ReLU()), "positive integers"),
    (lambda: Layer((), ReLU()), "non-empty"),
    (lambda: Layer((3,), ReLU(), tau=0), "tau"),
    (lambda: Layer((3,), ReLU(), tau=float("nan")), "tau"),
    (lambda: Layer((3,), "relu"), "Lagrangian"),
    (lambda: Layer((3,), LayerNorm(axes=(-2, -1))), "does not fit"),
    (lambda: Layer((3, 2), Softmax(axis=-3)), "does not fit"),
    (lambda: Dense("a", "a"), "itself"),
    (lambda: TokenMixing("", "v"), "non-empty"),
    (lambda: relu_graph({"a": (3,)}, {"s": Dense("a", "b")}), "unknown layer.*'b'"),
    (lambda: relu_graph({"a": (3,), "b": (2,), "c": (1,)}, {"s": Dense("a", "b")}),
     r"\['c'\] are connected to no synapse"),
    (lambda: relu_graph({"a": (3,), "b": (2,)}, {"a": Dense("a", "b")}), "both a layer and a syn"),
    (lambda: HAM({}, {}), "at least one layer"),
    (lambda: HAM({"a": Layer((3,), ReLU()), "b": (2,)}, {"s": Dense("a", "b")}), "must be a Layer"),
    (lambda: HAM([Layer((3,), ReLU())], {}), "must be a dict"),
    (lambda: relu_graph({"a": (3,), "b": (2,)}, {"s": ("a", "b")}), "must be a Synapse"),
    (lambda: relu_graph({"h": (4, 2), "v": (6,)}, {"t": TokenMixing("h", "v")}), "2-D"),
    (lambda: relu_graph({"h": (4, 3), "v": (5, 2)}, {"t": TokenMixing("h", "v")}), r"\(N_s, 2\)"),
    (lambda: relu_graph({"h": (4, 3), "v": (5, 2)}, {"t": ChannelMixing("h", "v")}), r"\(5, N_c\)"),
])
def test_bad_graphs_raise_at_construction(build, message):
    with pytest.raises(HAMError, match=message):
        build()


def first_sample(xs):
    return {name: x[:1] for name, x in xs.items()}


@pytest.mark.parametrize("call, message", [
    (lambda h, x, w: h.total_energy({"v": x["v"]}, w), r"missing \['h', 'c'\]"),
    (lambda h, x, w: h.total_energy({**x, "z": x["v"]}, w), r"unknown \['z'\]"),
    (lambda h, x, w: h.total_energy({**x, "v": x["v"][0]}, w), "leading batch axis"),
    (lambda h, x, w: h.total_energy({**x, "v": x["v"][:1]}, w), "batch size"),
    (lambda h, x, w: h.total_energy({**x, "h": x["h"] * np.nan}, w), r"\['h'\] contain NaN"),
    (lambda h, x, w: h.total_energy(x, {**w, "t": w["t"].T}), r"weights\['t'\] has shape \(3, 4\)"),
    (lambda h, x, w: h.total_energy(x, {**w, "m": w["m"] * np.inf}), "NaN or inf"),
    (lambda h, x, w: h.total_energy(x, {"t": w["t"]}), r"missing \['m'\]"),
    (lambda h, x, w: h.step(x, w, alpha=-0.1), "alpha"),
    (lambda h, x, w: h.descend(x, w, 0.1, max_steps=2.5), "max_steps"),
    (lambda h, x, w: h.descend(x, w, 0.1, tol=0), "tol"),
    (lambda h, x, w: h.step_vjp(x, w, 0.1, {"v": x["v"]}), "cotangents"),
    (lambda h, x, w: h.step_vjp(x, w, 0.1, first_sample(x)), "cotangents disagree"),
    (lambda h, x, w: h.dEdg(x, w, gs=first_sample(x)), "activations disagree"),
    (lambda h, x, w: h.adiabatic_energy(x["v"], w, "z"), "'z' is not a layer"),
    (lambda h, x, w: h.adiabatic_energy(x["h"], w, "h"), "'m' .* does not"),
    (lambda h, x, w: h.adiabatic_energy(x["v"][0], w, "v"), "visible states have shape"),
    (lambda h, x, w: h.adiabatic_energy(x["v"] * np.nan, w, "v"), "NaN"),
    (lambda h, x, w: h.init_states(0), "batch"),
    (lambda h, x, w: h.init_states(2, scale=1.0), "needs a seed"),
    (lambda h, x, w: h.init_weights(0, scale=-1), "scale"),
])
def test_bad_calls_raise_clear_errors(call, message):
    ham = small_ham()
    with pytest.raises(HAMError, match=message):
        call(ham, ham.init_states(2, seed=1, scale=1.0), ham.init_weights(seed=0, scale=0.3))


@pytest.mark.parametrize("settings, message", [
    (dict(dt=0.1, n_steps=2, method="heun"), "heun"), (dict(dt=0.1, n_steps=-1), "n_steps"),
    (dict(dt=0.0, n_steps=2), "dt"), (dict(dt=0.1, n_steps=2.5), "n_steps"),
])
def test_bad_integration_settings_raise_clear_errors(settings, message):
    ham = small_ham()
    with pytest.raises(DynamicsError, match=message):
        ham.integrate(ham.init_states(2, seed=1, scale=1.0), ham.init_weights(seed=0), **settings)


def test_diverging_dynamics_raise_instead_of_recording_nan():
    """Identity layers joined by W = 1e100·I: each unit step multiplies the states by 1e100."""
    ham = HAM(identity_pair(2), {"ab": Dense("a", "b")})
    xs, weights = ham.init_states(1, seed=0, scale=1.0), {"ab": asarray(1e100 * np.eye(2))}
    with np.errstate(over="ignore", invalid="ignore"):  # the overflow is the point here
        with pytest.raises(DynamicsError, match="diverged: the energy is not finite after step [1-9]"):
            ham.descend(xs, weights, alpha=1.0)
        with pytest.raises(DynamicsError, match="diverged"):
            ham.integrate(xs, weights, dt=1.0, n_steps=100)


# ---------------------------------------------------------------- the demo command and example

DEMO_ARGS = ["--visible", "6", "--hidden", "5", "--steps", "4", "--batch", "2"]


def test_descend_command_prints_the_energy_table(capsys, tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "descent.png"
    assert cli.main(["descend", *DEMO_ARGS, "--out", str(out)]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines() if ln.strip()[:1].isdigit()]
    assert [int(r[0]) for r in rows] == [0, 1, 2, 3, 4]
    assert_energy_never_increases(np.array([[float(r[1])] for r in rows]))
    assert out.stat().st_size > 0


def test_descend_command_without_matplotlib_says_so(capsys, tmp_path, monkeypatch):
    for module in ("matplotlib", "matplotlib.figure"):  # an import of either now fails
        monkeypatch.setitem(sys.modules, module, None)
    assert cli.main(["descend", *DEMO_ARGS, "--out", str(tmp_path / "x.png")]) == 0
    printed = capsys.readouterr().out
    assert "matplotlib is not installed" in printed and not (tmp_path / "x.png").exists()


def test_step_sizes_example_finds_no_rise_within_the_bound(capsys):
    """examples/step_sizes.py on a small s — v — c HAM: its table has a row per α, and no step
    within the proven bound raised E, while α = 2 (far beyond it) raised E somewhere."""
    path = pathlib.Path(__file__).parents[1] / "examples" / "step_sizes.py"
    spec = importlib.util.spec_from_file_location("step_sizes", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main(["--visible", "12", "--hidden", "10", "--batch", "4", "--steps", "10",
                         "--seeds", "2", "--weight-scale", "0.3", "--alphas", "0.05", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[2:]]  # after 2 headers
    assert [float(r[0]) for r in rows] == [0.05, 2.0]
    assert all(int(r[2]) == 0 for r in rows) and int(rows[0][1]) > 0 and int(rows[1][4]) > 0


def test_energy_and_dEdg_agree_with_hamux(monkeypatch):
    """An independent implementation as oracle (where the bench extra is installed): hamux
    0.2.2 differentiates its own energy with jax; examples/bench_ham.py's v — h1 — h2 HAM
    (layernorm, relu, softmax) must give the same E and ∂E/∂g in float64."""
    jax = pytest.importorskip("jax")
    pytest.importorskip("hamux")
    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).parents[1] / "examples"))
    bench_ham = importlib.import_module("bench_ham")
    previous = jax.config.read("jax_enable_x64")
    jax.config.update("jax_enable_x64", True)
    try:
        sizes, gen = (7, 6, 5), rng(0)
        ham = bench_ham.refham_ham(sizes)
        weights = {n: 0.5 * gen.standard_normal(shape) for n, shape in ham.weight_shapes().items()}
        xs = {n: 2 * gen.standard_normal((3,) + layer.shape) for n, layer in ham.layers.items()}
        their_energy, their_grads = bench_ham.hamux_evaluation(sizes, weights)(
            {n: jax.numpy.asarray(x) for n, x in xs.items()})
    finally:
        jax.config.update("jax_enable_x64", previous)
    energy, grads = ham.total_energy_and_dEdg(on_backend(xs), on_backend(weights))
    assert rel_err(energy, np.asarray(their_energy)) <= 1e-12
    assert all(rel_err(grads[n], np.asarray(their_grads[n])) <= 1e-12 for n in ham.layers)


def test_example_main_runs_the_same_demo(capsys):
    path = pathlib.Path(__file__).parents[1] / "examples" / "energy_descent.py"
    spec = importlib.util.spec_from_file_location("energy_descent", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    assert example.main([*DEMO_ARGS, "--out", ""]) == 0  # '' : no plot written
    assert "step" in capsys.readouterr().out
