"""Lagrangians (docs: lagrangians): every hand-written activation and Hessian-vector product
against autograd differentiating the same `value` code, values against plain-NumPy formulas of the
docs' table, the Legendre energy, symmetry and convexity of H, stability at extreme magnitudes, and
the error messages for bad parameters and shapes."""
import math
from dataclasses import dataclass

import pytest
from tests.oracle import autograd, anp  # (the module skips without autograd)
import numpy as np
import scipy.integrate
import scipy.special
from hypothesis import given
from hypothesis import strategies as st

from refham.backend import asarray, rng, to_numpy
from refham.special import gelu
from refham.lagrangians import (
    GELU, LAGRANGIANS, LagrangianError, LayerNorm, ReLU, RePU, Sigmoid, Softmax, Spherical, Tanh,
    get_lagrangian)
from tests.oracle import TOL, autograd_numpy, rel_err

NAMES = tuple(LAGRANGIANS)
CONVEX_NAMES = tuple(name for name, cls in LAGRANGIANS.items() if cls.convex)
NORMALIZERS = ("layernorm", "spherical")


@dataclass
class Case:
    """A Lagrangian, a batched state x (host NumPy), two directions u, v and the event rank."""
    lagr: object
    x: np.ndarray
    u: np.ndarray
    v: np.ndarray
    event_ndim: int

    @property
    def event_axes(self):
        return tuple(range(-self.event_ndim, 0))

    def hand(self, method, *arrays, **kw):
        """Run a hand-written method on the active backend; return a host array."""
        return to_numpy(getattr(self.lagr, method)(*(asarray(a) for a in arrays), **kw))


@st.composite
def lagrangian_for(draw, name, event_shape):
    """A Lagrangian called `name` with parameters valid for a layer of `event_shape`."""
    n_event = len(event_shape)
    if name in ("tanh", "sigmoid"):
        return get_lagrangian(name, beta=draw(st.floats(0.2, 5.0)))
    if name == "repu":
        return get_lagrangian(name, n=draw(st.sampled_from([2, 2.5, 3, 4])))
    if name == "softmax":
        return get_lagrangian(name, beta=draw(st.floats(0.2, 5.0)),
                              axis=-draw(st.integers(1, n_event)))
    if name in NORMALIZERS:
        axes = draw(st.lists(st.integers(-n_event, -1), min_size=1, max_size=n_event,
                             unique=True))
        n_delta = draw(st.integers(0, n_event))  # 0: scalar delta; else an array of a suffix shape
        if n_delta == 0:
            delta = draw(st.floats(-1.0, 1.0))
        else:
            shape = tuple(draw(st.sampled_from([1, d])) for d in event_shape[-n_delta:])
            delta = rng(draw(st.integers(0, 2**32 - 1))).standard_normal(shape)
        return get_lagrangian(name, gamma=draw(st.floats(0.2, 3.0)), delta=delta,
                              eps=draw(st.floats(1e-3, 1.0)), axes=axes)
    return get_lagrangian(name)


@st.composite
def cases(draw, names, scales=(0.3, 1.0, 3.0)):
    """1–3 event axes of distinct sizes (an axis mix-up changes the shape), 1–2 batch axes."""
    event_shape = tuple(draw(st.lists(st.integers(2, 5), min_size=1, max_size=3, unique=True)))
    batch_shape = tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    lagr = draw(lagrangian_for(draw(st.sampled_from(names)), event_shape))
    r = rng(draw(st.integers(0, 2**32 - 1)))
    shape = batch_shape + event_shape
    x = draw(st.sampled_from(scales)) * r.standard_normal(shape)
    return Case(lagr, x, r.standard_normal(shape), r.standard_normal(shape), len(event_shape))


def total_value(case):
    return lambda x: anp.sum(case.lagr.value(x, case.event_ndim))


def autograd_activation(case):
    """∂(Σ value)/∂x by reverse mode through `value` (activation is not used)."""
    with autograd_numpy():
        return autograd.grad(total_value(case))(case.x)


def autograd_hvp(case):
    """Hv = ∇(⟨∇L, v⟩), reverse over reverse through `value` (activation is not used;
    autograd's forward mode has no rule for erf)."""
    with autograd_numpy():
        return autograd.hessian_tensor_product(total_value(case))(case.x, case.v)


# ---------------------------------------------------------------- gradients against autograd

@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_activation_is_gradient_of_value(name, data):
    case = data.draw(cases((name,)))
    assert rel_err(case.hand("activation", case.x), autograd_activation(case)) <= TOL


def normalised_reference(lagr, x):
    """(x − x̄)/σ and σ for layernorm, x/r and r for spherical, over lagr.axes (keepdims)."""
    if lagr.name == "layernorm":
        sigma = np.sqrt(np.var(x, axis=lagr.axes, keepdims=True) + lagr.eps)
        return (x - np.mean(x, axis=lagr.axes, keepdims=True)) / sigma, sigma
    r = np.sqrt(np.sum(x * x, axis=lagr.axes, keepdims=True) + lagr.eps)
    return x / r, r


def hessian_norm_bound(case):
    """An upper bound on ‖H(x)‖ over the batch, from the Lagrangian table."""
    lagr, x = case.lagr, case.x
    if lagr.name in NORMALIZERS:  # ‖H‖ ≤ γ/σ (layernorm), γ/r (spherical)
        _, rho = normalised_reference(lagr, x)
        return lagr.gamma / np.min(rho)
    return {
        "identity": lambda: 1.0, "relu": lambda: 1.0,
        "repu": lambda: (lagr.n - 1) * np.max(np.maximum(x, 0.0)) ** (lagr.n - 2),
        "tanh": lambda: lagr.beta, "sigmoid": lambda: lagr.beta / 4, "softmax": lambda: lagr.beta,
        "gelu": lambda: 1.13,  # max GELU′ = GELU′(√2) ≈ 1.129
    }[lagr.name]()


def hvp_error(case, hvp, expected):
    """max|hvp − expected| relative to max(max|expected|, ‖H‖·max|v|). autograd's own rounding
    is of size ε‖H‖‖v‖: where g saturates in every element (tanh at |βx| ≳ 9 throughout) the
    exact Hv is far smaller and a plain relative error would measure the oracle's noise. The
    saturated tails are checked element by element against stable references further below."""
    assert np.all(np.isfinite(hvp)), "hand-written Hv is not finite"
    scale = max(np.max(np.abs(expected)), hessian_norm_bound(case) * np.max(np.abs(case.v)),
                1e-300)
    return np.max(np.abs(hvp - expected)) / scale


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_hvp_is_second_derivative_of_value(name, data):
    case = data.draw(cases((name,)))
    assert hvp_error(case, case.hand("hvp", case.x, case.v), autograd_hvp(case)) <= TOL


# ---------------------------------------------------------------- values against the docs' table

def reference_value(lagr, x, event_axes):
    """L summed over `event_axes`, written directly from the docs' Lagrangian table in NumPy (naive
    forms, fine at the moderate magnitudes used here)."""
    relu = np.maximum(x, 0.0)
    if lagr.name in NORMALIZERS:
        if lagr.name == "layernorm":
            size = math.prod(x.shape[a] for a in lagr.axes)
            rho = size * np.sqrt(np.var(x, axis=lagr.axes, keepdims=True) + lagr.eps)
        else:
            rho = np.sqrt(np.sum(x * x, axis=lagr.axes, keepdims=True) + lagr.eps)
        return (np.sum(lagr.gamma * rho, axis=event_axes)
                + np.sum(lagr.delta * x, axis=event_axes))
    if lagr.name == "softmax":
        lse = scipy.special.logsumexp(lagr.beta * x, axis=lagr.axis, keepdims=True) / lagr.beta
        return np.sum(lse, axis=event_axes)
    density = {
        "identity": lambda: 0.5 * x**2,
        "relu": lambda: 0.5 * relu**2,
        "repu": lambda: relu**lagr.n / lagr.n,
        "tanh": lambda: np.log(np.cosh(lagr.beta * x)) / lagr.beta,
        "sigmoid": lambda: np.log1p(np.exp(lagr.beta * x)) / lagr.beta,
        "gelu": lambda: 0.25 * (x**2 + (x**2 - 1) * scipy.special.erf(x / np.sqrt(2))
                                + x * np.sqrt(2 / np.pi) * np.exp(-x**2 / 2)),
    }[lagr.name]()
    return np.sum(density, axis=event_axes)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_value_matches_design_table_and_keeps_batch_axes(name, data):
    case = data.draw(cases((name,)))
    value = case.hand("value", case.x, event_ndim=case.event_ndim)
    assert value.shape == case.x.shape[:-case.event_ndim]
    assert rel_err(value, reference_value(case.lagr, case.x, case.event_axes)) <= TOL


def test_gelu_lagrangian_is_the_integral_of_gelu():
    """Φ(x) = ∫₀ˣ GELU (Φ(0) = 0) by quadrature, and Φ(−∞) = ¼."""
    lagr = GELU()
    points = np.array([-7.0, -2.0, -0.75, 0.3, 1.7, 5.0])
    integrals = [scipy.integrate.quad(lambda t: float(to_numpy(gelu(asarray(t)))), 0.0, b,
                                      epsabs=0.0, epsrel=1e-13, limit=200)[0] for b in points]
    assert rel_err(to_numpy(lagr.density(asarray(points))), np.array(integrals)) <= TOL
    assert to_numpy(lagr.density(asarray(np.zeros(1))))[0] == 0.0
    tail = scipy.integrate.quad(lambda t: float(to_numpy(gelu(asarray(t)))), -np.inf, 0.0,
                                epsabs=0.0, epsrel=1e-13)[0]
    assert abs(tail + 0.25) <= 1e-12
    assert abs(float(to_numpy(lagr.density(asarray(np.array([-40.0]))))[0]) - 0.25) <= 1e-15


# ---------------------------------------------------------------- energy and Hessian structure

@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_neuron_energy_is_legendre_transform(name, data):
    """neuron_energy = ⟨x, g⟩ − L with the batch shape, and the combined pass returns the same g
    and energy. layernorm and spherical compute energy in closed
    form (−γDε/σ, −γε/r; checked against NumPy below), so this also shows that the Legendre
    transform of γ·D·σ + ⟨δ, x⟩ is −γDε/σ (docs: lagrangians)."""
    case = data.draw(cases((name,)))
    g = case.hand("activation", case.x)
    value = case.hand("value", case.x, event_ndim=case.event_ndim)
    legendre = np.sum(case.x * g, axis=case.event_axes) - value
    energy = case.hand("neuron_energy", case.x, event_ndim=case.event_ndim)
    assert energy.shape == case.x.shape[:-case.event_ndim]
    assert rel_err(energy, legendre) <= TOL
    g_once, energy_once = case.lagr.activation_and_neuron_energy(asarray(case.x),
                                                                  case.event_ndim)
    assert rel_err(g_once, g) == 0 and rel_err(energy_once, energy) == 0


def batch_inner(a, b, case):
    return np.sum(a * b, axis=case.event_axes)


@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_hessian_is_symmetric(name, data):
    """⟨u, Hv⟩ = ⟨Hu, v⟩ per batch element, up to rounding of the size ‖u‖‖Hv‖ + ‖Hu‖‖v‖."""
    case = data.draw(cases((name,)))
    hu, hv = case.hand("hvp", case.x, case.u), case.hand("hvp", case.x, case.v)
    scale = (np.sqrt(batch_inner(case.u, case.u, case) * batch_inner(hv, hv, case))
             + np.sqrt(batch_inner(hu, hu, case) * batch_inner(case.v, case.v, case)))
    asymmetry = np.abs(batch_inner(case.u, hv, case) - batch_inner(hu, case.v, case))
    assert np.all(asymmetry <= TOL * scale + 1e-300)


@pytest.mark.parametrize("name", CONVEX_NAMES)
@given(data=st.data())
def test_convex_lagrangians_have_positive_semidefinite_hessian(name, data):
    case = data.draw(cases((name,)))
    hv = case.hand("hvp", case.x, case.v)
    curvature = batch_inner(case.v, hv, case)
    scale = np.sqrt(batch_inner(case.v, case.v, case) * batch_inner(hv, hv, case))
    assert np.all(curvature >= -TOL * scale)


def test_gelu_is_flagged_non_convex_and_has_negative_curvature():
    """GELU′(x) < 0 below x ≈ −0.752 (docs: lagrangians): ⟨v, Hv⟩ < 0 there."""
    assert not GELU.convex and all(LAGRANGIANS[name].convex for name in CONVEX_NAMES)
    assert set(NAMES) - set(CONVEX_NAMES) == {"gelu"}
    v = np.ones(4)
    for x_value, sign in ((-1.5, -1.0), (-0.5, 1.0)):  # either side of −0.752
        case = Case(GELU(), np.full(4, x_value), v, v, 1)
        assert sign * np.sum(v * case.hand("hvp", case.x, v)) > 0


# ---------------------------------------------------------------- layer norm and sphere

def closed_form_energy(lagr, x, event_axes):
    """−γDε/σ (layernorm) or −γε/r (spherical), summed over the other event axes."""
    _, rho = normalised_reference(lagr, x)
    size = math.prod(x.shape[a] for a in lagr.axes) if lagr.name == "layernorm" else 1
    return np.sum(-lagr.gamma * size * lagr.eps / rho, axis=event_axes)


@pytest.mark.parametrize("name", NORMALIZERS)
@given(data=st.data())
def test_normalizers_are_layer_norm_and_sphere_at_any_scale(name, data):
    """g = γ(x − x̄)/σ + δ (resp. γx/r + δ), finite and exact from 1e-8 to 1e8 (relative to
    ε); the energy equals its closed form; Hv still matches autograd."""
    case = data.draw(cases((name,), scales=(1e-8, 1e-3, 1.0, 1e3, 1e8)))
    lagr = case.lagr
    normalised, _ = normalised_reference(lagr, case.x)
    expected = lagr.gamma * normalised + lagr.delta
    assert rel_err(case.hand("activation", case.x), expected) <= TOL
    energy = case.hand("neuron_energy", case.x, event_ndim=case.event_ndim)
    assert rel_err(energy, closed_form_energy(lagr, case.x, case.event_axes)) <= TOL
    # at the scale ‖H‖‖v‖ (see hvp_error): where the normalised axes hold D = 2 elements, the
    # exact layernorm Hv is only its radial part, ε/σ² smaller than that
    assert hvp_error(case, case.hand("hvp", case.x, case.v), autograd_hvp(case)) <= TOL


# ---------------------------------------------------------------- saturating Lagrangians

def assert_each_close(actual, expected):
    """Relative error ≤ TOL element by element: `rel_err` scales by the largest entry and would
    hide a wrong small entry next to a huge one."""
    np.testing.assert_allclose(to_numpy(actual), expected, rtol=TOL, atol=1e-300)


def saturating_references(lagr, x, v):
    """(L per row, g, Hv) from NumPy's and SciPy's own stable routines, in forms free of
    cancellation (β sech²y = 4βσ(2y)σ(−2y) rather than β(1 − tanh²y))."""
    y = lagr.beta * x
    if lagr.name == "tanh":
        density, g = (np.logaddexp(y, -y) - np.log(2.0)) / lagr.beta, np.tanh(y)
        curvature = 4.0 * lagr.beta * scipy.special.expit(2 * y) * scipy.special.expit(-2 * y)
    elif lagr.name == "sigmoid":
        density, g = np.logaddexp(0.0, y) / lagr.beta, scipy.special.expit(y)
        curvature = lagr.beta * g * scipy.special.expit(-y)
    else:
        g = scipy.special.softmax(y, axis=-1)
        # v_i − ⟨g, v⟩ = Σ_j g_j (v_i − v_j): no cancellation when g is nearly one-hot
        pairwise = v[..., :, None] - v[..., None, :]  # (rows, i, j): v_i − v_j
        hv = lagr.beta * g * np.sum(g[..., None, :] * pairwise, axis=-1)
        return scipy.special.logsumexp(y, axis=-1) / lagr.beta, g, hv
    return np.sum(density, axis=-1), g, curvature * v


@pytest.mark.filterwarnings("error")  # an overflow in exp would warn
@pytest.mark.parametrize("lagr", [Tanh(beta=0.5), Tanh(beta=2.0), Sigmoid(beta=0.5),
                                  Sigmoid(beta=2.0), Softmax(beta=0.5), Softmax(beta=2.0)])
def test_saturating_lagrangians_are_exact_at_large_beta_x(lagr):
    """|βx| from 1e-3 to ~3e3: value, g and Hv finite and correct element by element (one
    element per row for the elementwise ones, so that each value is checked); Hv also matches
    autograd (whose own rounding in the far tails only allows a comparison at the largest entry's
    scale)."""
    r = rng(7)
    shape = (24, 2) if lagr.name == "softmax" else (24, 1)  # pairs: many nearly one-hot rows
    x = r.choice([-1.0, 1.0], shape) * 10.0 ** r.uniform(-3, 3.5, shape) / lagr.beta
    case = Case(lagr, x, x, r.standard_normal(shape), 1)
    value_ref, activation_ref, hvp_ref = saturating_references(lagr, x, case.v)
    assert_each_close(case.hand("value", x), value_ref)
    assert_each_close(case.hand("activation", x), activation_ref)
    hvp = case.hand("hvp", x, case.v)
    assert_each_close(hvp, hvp_ref)
    assert rel_err(hvp, autograd_hvp(case)) <= TOL


def test_gelu_at_extreme_magnitudes():
    """Φ(x) → ½(x² − 1) + ¼ for x ≫ 0 and → ¼ for x ≪ 0, without the cancellation x² − x²."""
    x = np.array([-1e8, -1e3, -40.0, 40.0, 1e3, 1e8])
    case = Case(GELU(), x, x, np.ones_like(x), 1)
    expected_density = np.where(x > 0, 0.5 * (x * x - 1.0) + 0.25, 0.25)
    assert_each_close(GELU().density(asarray(x)), expected_density)
    assert_each_close(case.hand("activation", x), np.maximum(x, 0.0))
    assert_each_close(case.hand("hvp", x, case.v), (x > 0).astype(float))


# ---------------------------------------------------------------- dtype

@pytest.mark.parametrize("name", NAMES)
@given(data=st.data())
def test_float32_in_float32_out(name, data):
    case = data.draw(cases((name,)))
    x = asarray(case.x, dtype=np.float32)
    results = [case.lagr.value(x, case.event_ndim), case.lagr.activation(x),
               case.lagr.hvp(x, x), case.lagr.neuron_energy(x, case.event_ndim)]
    assert [r.dtype for r in results] == [np.float32] * 4


# ---------------------------------------------------------------- registry and errors

def test_registry_builds_each_lagrangian_with_its_parameters():
    assert set(NAMES) == {"identity", "relu", "repu", "tanh", "sigmoid", "softmax", "gelu",
                          "layernorm", "spherical"}
    for name, cls in LAGRANGIANS.items():
        assert type(get_lagrangian(name)) is cls and cls.name == name
    assert get_lagrangian("softmax", beta=2.0, axis=-2) == Softmax(beta=2.0, axis=-2)
    assert get_lagrangian("repu", n=4).n == 4
    assert get_lagrangian("layernorm", axes=-2).axes == (-2,)
    assert get_lagrangian("spherical", axes=[-1, -3]).axes == (-3, -1)
    assert ReLU() != RePU(n=2) and Tanh(beta=2.0) != Tanh(beta=1.0)


@pytest.mark.parametrize("build, error, match", [
    (lambda: get_lagrangian("swish"), LagrangianError, "unknown Lagrangian 'swish'.*identity"),
    (lambda: get_lagrangian("tanh", gamma=1.0), TypeError, "no parameter.*gamma.*beta"),
    (lambda: get_lagrangian("relu", beta=1.0), TypeError, "no parameters"),
    (lambda: Tanh(beta=0.0), LagrangianError, "beta must be a finite real number > 0"),
    (lambda: Sigmoid(beta=-1.0), LagrangianError, "beta must be a finite real number > 0"),
    (lambda: Softmax(beta=float("nan")), LagrangianError, "beta must be a finite real number > 0"),
    (lambda: Tanh(beta=float("inf")), LagrangianError, "beta must be a finite real number > 0"),
    (lambda: Tanh(beta="2"), LagrangianError, "beta must be a finite real number > 0"),
    (lambda: RePU(n=1.5), LagrangianError, "n >= 2"),
    (lambda: Softmax(axis=0), LagrangianError, "must be negative"),
    (lambda: Softmax(axis=1), LagrangianError, "must be negative"),
    (lambda: Softmax(axis=(-1, -2)), LagrangianError, "one negative integer"),
    (lambda: LayerNorm(axes=(0,)), LagrangianError, "must be negative"),
    (lambda: LayerNorm(axes=()), LagrangianError, "axes is empty"),
    (lambda: Spherical(axes=(-1, -1)), LagrangianError, "repeat an axis"),
    (lambda: LayerNorm(axes=("a",)), LagrangianError, "negative integers"),
    (lambda: LayerNorm(eps=0.0), LagrangianError, "eps must be a finite real number > 0"),
    (lambda: Spherical(eps=-1e-5), LagrangianError, "eps must be a finite real number > 0"),
    (lambda: LayerNorm(gamma=np.ones(3)), LagrangianError, "gamma must be a scalar.*per-element"),
    (lambda: Spherical(gamma=[1.0, 2.0]), LagrangianError, "gamma must be a scalar.*per-element"),
    (lambda: LayerNorm(gamma=0.0), LagrangianError, "gamma must be a finite real number > 0"),
])
def test_bad_parameters_are_rejected(build, error, match):
    with pytest.raises(error, match=match):
        build()


def test_scalar_arrays_are_accepted_as_gamma():
    assert LayerNorm(gamma=np.float64(2.0)).gamma == 2.0
    assert Spherical(gamma=np.array(0.5)).gamma == 0.5


X = asarray(np.ones((2, 3, 4)))  # on the active backend, so the checks (not the backend) fail


@pytest.mark.parametrize("call, match", [
    (lambda: Tanh().value(X, event_ndim=0), "event_ndim=0 does not fit"),
    (lambda: Tanh().value(X, event_ndim=4), "event_ndim=4 does not fit"),
    (lambda: Tanh().neuron_energy(X, event_ndim=1.5), "event_ndim must be an integer"),
    (lambda: Softmax(axis=-2).value(X, event_ndim=1), "beyond the 1 event axes"),
    (lambda: Softmax(axis=-4).activation(X), "beyond the 3 axes of the state"),
    (lambda: LayerNorm(axes=(-2, -1)).value(X, event_ndim=1), "beyond the 1 event axes"),
    (lambda: LayerNorm(axes=(-3,)).neuron_energy(X, event_ndim=2), "beyond the 2 event axes"),
    (lambda: Spherical(axes=(-4,)).hvp(X, X), "beyond the 3 axes of the state"),
    (lambda: Sigmoid().hvp(X, X[0]), "direction v of the state's shape"),
    (lambda: Softmax().hvp(X, X[..., :2]), "direction v of the state's shape"),
    (lambda: LayerNorm(delta=np.ones(3)).activation(X), r"delta of shape \(3,\) does not"),
    (lambda: LayerNorm(delta=np.ones((2, 3, 4))).value(X, 2), "does not broadcast"),
    (lambda: Spherical(delta=np.ones((2, 3, 4))).neuron_energy(X, 1), "does not broadcast"),
])
def test_bad_shapes_are_rejected(call, match):
    with pytest.raises(LagrangianError, match=match):
        call()
