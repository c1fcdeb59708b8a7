"""Hierarchical associative memories (:ref:`sec-ham`): a graph of named neuron layers and synapses,
its energy, the closed-form gradient ∂E/∂g, and the dynamics that descend the energy.

    (H1)  E = Σ_A [⟨x_A, g_A⟩ − L_A(x_A)] + Σ_s E_s(g …)
    (H2)  ∂E/∂g_A = x_A + Σ_{s ∋ A} ∂E_s/∂g_A
    (H3)  τ_A dx_A/dt = −∂E/∂g_A
    (H4)  dE/dt = −Σ_A τ_A ⟨ẋ_A, H_A ẋ_A⟩ ≤ 0   (every H_A ⪰ 0)
    (H5)  x_A ← x_A − (α/τ_A) ∂E/∂g_A           (the Euler step of H3 with dt = α)

    ham = HAM({"v": Layer((S, C), LayerNorm(axes=(-2, -1))), "h": Layer((N_s, C), ReLU())},
              {"token": TokenMixing(hidden="h", visible="v")})
    weights = ham.init_weights(seed=0)                       # {"token": (N_s, S)}
    trajectory = ham.descend(ham.init_states(8, seed=1, scale=1.0), weights, alpha=0.1)

Conventions. States x, activations g and gradients are plain dicts {layer name: (B, *shape)}
with one leading batch axis; weights are {synapse name: matrix}. Dicts (not objects) so that the
Energy MetaFormer can backprop through `step` by hand, and autograd can differentiate everything.
Every synapse is bilinear, E_s = −⟨g_p, M_W(g_q)⟩ with one matrix W serving both directions, so
the weights are symmetric by construction. A layer connected to no synapse is an error: alone it
only decays to x = 0 and is almost surely a wiring mistake (a misspelt name in a synapse).
"""
import abc
import dataclasses
import math
import numbers
import operator
import types

from refham.backend import asarray, get_dtype, rng, xp
from refham.dynamics import euler_step, integrate, is_tree, iterate
from refham.lagrangians import Lagrangian, LagrangianError


class HAMError(ValueError):
    """A HAM graph, or a call on one, is invalid (unknown names, shapes, NaN states, …)."""


def _positive(name, value, allow_zero=False):
    """`value` as a float after checking that it is a finite real > 0 (≥ 0 with allow_zero)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        raise HAMError(f"{name} must be a finite real number {'>=' if allow_zero else '>'} 0, "
                       f"got {value!r}")
    return float(value)


def _count(name, value, minimum):
    """`value` as an int after checking that it is an integer ≥ `minimum`."""
    try:
        count = operator.index(value)
    except TypeError:
        raise HAMError(f"{name} must be an integer >= {minimum}, got {value!r}") from None
    if isinstance(value, bool) or count < minimum:
        raise HAMError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return count


def _batch_inner(a, b):
    """⟨a, b⟩ per sample: Σ over every axis but the leading batch axis; shape (B,)."""
    return xp.sum(xp.reshape(a * b, (a.shape[0], -1)), axis=1)


# ---------------------------------------------------------------- layers

@dataclasses.dataclass(frozen=True)
class Layer:
    """A neuron layer: state shape (without the batch axis), Lagrangian L, time constant τ > 0."""
    shape: tuple
    lagrangian: Lagrangian
    tau: float = 1.0

    def __post_init__(self):
        shape = tuple(self.shape) if isinstance(self.shape, (tuple, list)) else (self.shape,)
        if not shape or any(isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1
                            for n in shape):
            raise HAMError(f"a layer shape must be a non-empty tuple of positive integers, "
                           f"got {self.shape!r}")
        object.__setattr__(self, "shape", tuple(int(n) for n in shape))
        if not isinstance(self.lagrangian, Lagrangian):
            raise HAMError(f"a layer needs a refham.lagrangians.Lagrangian (e.g. ReLU()), got "
                           f"{self.lagrangian!r}")
        object.__setattr__(self, "tau", _positive("layer time constant tau", self.tau))
        probe = xp.zeros((1,) + self.shape)
        try:  # axes reaching beyond the layer, a delta of the wrong shape, …
            self.lagrangian.value(probe, event_ndim=len(self.shape))
            self.lagrangian.activation(probe)
        except LagrangianError as exc:
            raise HAMError(f"Lagrangian {self.lagrangian!r} does not fit a layer of shape "
                           f"{self.shape}: {exc}") from exc

    @property
    def event_ndim(self):
        """The number of the layer's own axes (all but the batch axis)."""
        return len(self.shape)


# ---------------------------------------------------------------- synapses

def _contract(subscripts, a, b):
    """einsum of two operands; optimize=True routes it through BLAS (10× faster than without)."""
    return xp.einsum(subscripts, a, b, optimize=True)


class Synapse(abc.ABC):
    """A bilinear synapse E_s = −⟨g_p, M_W(g_q)⟩ between layers p and q = `self.layers`.

    A subclass names the axes of W, g_p and g_q in `subscripts` (einsum letters, b = batch);
    then M_W(g_q) = einsum(w,q→p), its adjoint M_Wᵀ(g_p) = einsum(w,p→q), and
    ∂⟨u, M_W(v)⟩/∂W = einsum(p,q→w) give the energy, both gradients and every VJP.
    """
    subscripts = None      # (w, p, q)
    flattens = False       # True: layer axes are flattened to one before contracting (dense)

    def __post_init__(self):
        names = self.layers
        if not all(isinstance(n, str) and n for n in names):
            raise HAMError(f"{type(self).__name__} needs layer names as non-empty strings, "
                           f"got {names!r}")
        if names[0] == names[1]:
            raise HAMError(f"{type(self).__name__} connects layer {names[0]!r} to itself; a "
                           f"synapse joins two different layers (add a hidden layer instead)")

    @property
    @abc.abstractmethod
    def layers(self):
        """The connected layer names (p, q)."""

    @abc.abstractmethod
    def _weight_shape(self, p_shape, q_shape):
        """W's shape for layers of these shapes; raises HAMError if they cannot be connected."""

    def weight_shape(self, layers):
        """W's shape given {name: Layer}; raises HAMError for unknown names or unfit shapes."""
        unknown = [n for n in self.layers if n not in layers]
        if unknown:
            raise HAMError(f"{self!r} names unknown layer(s) {', '.join(map(repr, unknown))}; "
                           f"the layers are {', '.join(map(repr, layers))}")
        return self._weight_shape(*(layers[n].shape for n in self.layers))

    def _view(self, g):
        """g as the contraction sees it: (B, N) for a flattening synapse, else unchanged."""
        return xp.reshape(g, (g.shape[0], -1)) if self.flattens else g

    def _map(self, W, g_q, p_shape):
        """M_W(g_q), shaped like g_p."""
        w, p, q = self.subscripts
        return xp.reshape(_contract(f"{w},{q}->{p}", W, self._view(g_q)), p_shape)

    def _adjoint(self, W, g_p, q_shape):
        """M_Wᵀ(g_p), shaped like g_q."""
        w, p, q = self.subscripts
        return xp.reshape(_contract(f"{w},{p}->{q}", W, self._view(g_p)), q_shape)

    def _outer(self, u_p, v_q):
        """∂⟨u_p, M_W(v_q)⟩/∂W, summed over the batch; W's shape."""
        w, p, q = self.subscripts
        return _contract(f"{p},{q}->{w}", self._view(u_p), self._view(v_q))

    def energy(self, gs, W):
        """E_s = −⟨g_p, M_W(g_q)⟩ per sample, shape (B,)."""
        p, q = self.layers
        return -_batch_inner(gs[p], self._map(W, gs[q], gs[p].shape))

    def grad(self, gs, W):
        """{p: ∂E_s/∂g_p = −M_W(g_q),  q: ∂E_s/∂g_q = −M_Wᵀ(g_p)}."""
        p, q = self.layers
        return {p: -self._map(W, gs[q], gs[p].shape), q: -self._adjoint(W, gs[p], gs[q].shape)}

    def vjp(self, gs, W, cotangents):
        """VJP of (g_p, g_q, W) ↦ grad: for cotangents c_p, c_q of the two gradients,
        dW = −(∂⟨c_p, M_W g_q⟩ + ∂⟨g_p, M_W c_q⟩)/∂W,  d g_p = −M_W(c_q),  d g_q = −M_Wᵀ(c_p).
        `cotangents` needs both layers' entries (zeros for none); other entries are ignored."""
        p, q = self.layers
        missing = [n for n in (p, q) if n not in cotangents]
        if missing:
            raise HAMError(f"{self!r}.vjp needs a cotangent for layer(s) {missing} (pass zeros)")
        c_p, c_q = cotangents[p], cotangents[q]
        dW = -(self._outer(c_p, gs[q]) + self._outer(gs[p], c_q))
        return dW, {p: -self._map(W, c_q, gs[p].shape), q: -self._adjoint(W, c_p, gs[q].shape)}


@dataclasses.dataclass(frozen=True)
class Dense(Synapse):
    """:eq:`S-dense` E = −⟨g_a, W g_b⟩ with the layers flattened: W ∈ R^{N_a×N_b}, N = prod(layer
    shape)."""
    a: str
    b: str
    subscripts = ("ij", "bi", "bj")
    flattens = True

    @property
    def layers(self):
        return (self.a, self.b)

    def _weight_shape(self, a_shape, b_shape):
        return (math.prod(a_shape), math.prod(b_shape))


@dataclasses.dataclass(frozen=True)
class _Mixing(Synapse):
    """A hidden layer that mixes one axis of a visible (S, C) layer: it keeps the other axis
    (`kept_axis`) and replaces the mixed one by its own size N; W ∈ R^{N×(mixed size)}."""
    hidden: str
    visible: str
    kept_axis = None
    hidden_form = None  # the hidden shape for the error message, e.g. "(N_s, {C})"

    @property
    def layers(self):
        return (self.hidden, self.visible)

    def _weight_shape(self, hidden_shape, visible_shape):
        if len(visible_shape) != 2 or len(hidden_shape) != 2:
            raise HAMError(f"{self!r} needs 2-D layers, a visible (S, C) one and a hidden one; "
                           f"got visible {visible_shape} and hidden {hidden_shape}")
        kept, mixed = self.kept_axis, 1 - self.kept_axis
        if hidden_shape[kept] != visible_shape[kept]:
            S, C = visible_shape
            raise HAMError(f"{self!r}: for a visible layer of shape (S, C) = {visible_shape} the "
                           f"hidden layer must be {self.hidden_form.format(S=S, C=C)}, got "
                           f"{hidden_shape}")
        return (hidden_shape[mixed], visible_shape[mixed])


class TokenMixing(_Mixing):
    """:eq:`S-token` visible v (S, C), hidden h (N_s, C): E = −⟨g_h, W g_v⟩, W ∈ R^{N_s×S} (mixes
    tokens, the same W for every channel column)."""
    subscripts = ("ns", "bnc", "bsc")
    kept_axis, hidden_form = 1, "(N_s, C) = (N_s, {C})"


class ChannelMixing(_Mixing):
    """:eq:`S-channel` visible v (S, C), hidden h (S, N_c): E = −⟨g_h, g_v Wᵀ⟩, W ∈ R^{N_c×C}
    (mixes channels, the same W for every token row)."""
    subscripts = ("mc", "bsm", "bsc")
    kept_axis, hidden_form = 0, "(S, N_c) = ({S}, N_c)"


# ---------------------------------------------------------------- the HAM

class HAM:
    """A hierarchical associative memory: {name: Layer} and {name: Synapse}, checked at
    construction (names, shapes, every layer connected)."""

    def __init__(self, layers, synapses):
        self.layers = types.MappingProxyType(_checked_named("layer", layers, Layer))
        self.synapses = types.MappingProxyType(_checked_named("synapse", synapses, Synapse))
        clashes = sorted(set(self.layers) & set(self.synapses))
        if clashes:
            raise HAMError(f"names {clashes} are used for both a layer and a synapse; rename one")
        self._weight_shapes = {name: s.weight_shape(self.layers)
                               for name, s in self.synapses.items()}
        connected = {n for s in self.synapses.values() for n in s.layers}
        isolated = [n for n in self.layers if n not in connected]
        if isolated:
            raise HAMError(f"layer(s) {isolated} are connected to no synapse (an isolated layer "
                           f"only decays to 0: check the synapses' layer names)")

    def __repr__(self):
        return f"HAM(layers={dict(self.layers)!r}, synapses={dict(self.synapses)!r})"

    # -- set-up
    def weight_shapes(self):
        """{synapse name: W's shape}."""
        return dict(self._weight_shapes)

    def init_weights(self, seed, scale=0.02):
        """{synapse name: scale·N(0,1)} drawn in synapse order with backend.rng(seed)."""
        gen, scale = rng(seed), _positive("weight scale", scale, allow_zero=True)
        return {name: asarray(scale * gen.standard_normal(shape))
                for name, shape in self._weight_shapes.items()}

    def init_states(self, batch, seed=None, scale=0.0):
        """{layer name: (batch, *shape)}: zeros, or scale·N(0,1) drawn in layer order."""
        batch, scale = _count("batch", batch, 1), _positive("state scale", scale, allow_zero=True)
        if scale == 0:
            return {name: xp.zeros((batch,) + layer.shape, dtype=get_dtype())
                    for name, layer in self.layers.items()}
        if seed is None:
            raise HAMError("init_states with scale > 0 needs a seed (draws are reproducible)")
        gen = rng(seed)
        return {name: asarray(scale * gen.standard_normal((batch,) + layer.shape))
                for name, layer in self.layers.items()}

    # -- input checks
    def _check_states(self, xs, what="states", batch_of=None):
        """Every layer present with shape (B, *layer.shape), one B for all (that of `batch_of`,
        the states, when given), all finite."""
        _check_keys(what, xs, self.layers, "layer")
        batch = {name: x.shape[0] if getattr(x, "ndim", 0) >= 1 else None for name, x in xs.items()}
        for name, layer in self.layers.items():
            shape = getattr(xs[name], "shape", None)
            if shape is None or tuple(shape) != (batch[name],) + layer.shape:
                raise HAMError(f"{what}[{name!r}] has shape {shape}; layer {name!r} needs "
                               f"(B, *{layer.shape}) with a leading batch axis")
        if batch_of is not None:
            batch = {"states": next(iter(batch_of.values())).shape[0], **batch}
        if len(set(batch.values())) > 1:
            raise HAMError(f"{what} disagree on the batch size: {batch}")
        _check_finite(what, xs)

    def _check_weights(self, weights):
        """One weight per synapse with its shape, all finite."""
        _check_keys("weights", weights, self.synapses, "synapse")
        for name, expected in self._weight_shapes.items():
            shape = getattr(weights[name], "shape", None)
            if shape is None or tuple(shape) != expected:
                raise HAMError(f"weights[{name!r}] has shape {shape}; synapse {name!r} "
                               f"({self.synapses[name]!r}) needs {expected}")
        _check_finite("weights", weights)

    def _check(self, xs, weights):
        """Check states and weights, as every public method does before computing."""
        self._check_states(xs)
        self._check_weights(weights)

    # -- energy and its gradient (unchecked cores first, then the checked public methods)
    def _activations(self, xs):
        """Unchecked cores of the public methods below, for inner loops (dynamics, tests)."""
        return {name: layer.lagrangian.activation(xs[name]) for name, layer in self.layers.items()}

    def _energy_tree(self, xs, weights):
        gs = self._activations(xs)
        layers = {name: layer.lagrangian.energy(xs[name], event_ndim=layer.event_ndim)
                  for name, layer in self.layers.items()}
        synapses = {name: s.energy(gs, weights[name]) for name, s in self.synapses.items()}
        total = sum(layers.values()) + sum(synapses.values())
        return {"layers": layers, "synapses": synapses, "total": total}

    def _dEdg(self, xs, weights, gs=None):
        gs = self._activations(xs) if gs is None else gs
        grads = dict(xs)  # the Legendre term contributes exactly x_A
        for name, s in self.synapses.items():
            for layer_name, g in s.grad(gs, weights[name]).items():
                grads[layer_name] = grads[layer_name] + g
        return grads

    def _velocity(self, xs, weights):
        return {name: -g / self.layers[name].tau for name, g in self._dEdg(xs, weights).items()}

    def _step(self, xs, weights, alpha):
        return euler_step(lambda x: self._velocity(x, weights), xs, alpha)

    def activations(self, xs):
        """{A: g_A = ∂L_A/∂x_A}."""
        self._check_states(xs)
        return self._activations(xs)

    def energy_tree(self, xs, weights):
        """:eq:`H1` by component: {"layers": {A: ⟨x_A, g_A⟩ − L_A}, "synapses": {s: E_s},
        "total": E}, each of shape (B,)."""
        self._check(xs, weights)
        return self._energy_tree(xs, weights)

    def energy(self, xs, weights):
        """:eq:`H1` E = Σ_A [⟨x_A, g_A⟩ − L_A(x_A)] + Σ_s E_s(g), shape (B,)."""
        return self.energy_tree(xs, weights)["total"]

    def dEdg(self, xs, weights, gs=None):
        """:eq:`H2` ∂E/∂g_A = x_A + Σ_{s ∋ A} ∂E_s/∂g_A, closed form; `gs`: the activations, if
        already computed."""
        self._check(xs, weights)
        if gs is not None:
            self._check_states(gs, what="activations", batch_of=xs)
        return self._dEdg(xs, weights, gs)

    def velocity(self, xs, weights):
        """:eq:`H3` ẋ_A = −(∂E/∂g_A)/τ_A."""
        self._check(xs, weights)
        return self._velocity(xs, weights)

    def dEdt(self, xs, weights):
        """:eq:`H4` dE/dt = −Σ_A τ_A ⟨ẋ_A, H_A ẋ_A⟩, shape (B,)."""
        self._check(xs, weights)
        v = self._velocity(xs, weights)
        return -sum(layer.tau * _batch_inner(v[name], layer.lagrangian.hvp(xs[name], v[name]))
                    for name, layer in self.layers.items())

    # -- dynamics
    def step(self, xs, weights, alpha):
        """:eq:`H5` x_A ← x_A − (α/τ_A) ∂E/∂g_A for all layers at once."""
        self._check(xs, weights)
        return self._step(xs, weights, _positive("alpha", alpha))

    def step_vjp(self, xs, weights, alpha, cotangents):
        """Backprop through :eq:`H5`: for cotangents c_A of the new states x'_A returns
        ({A: ∂ℓ/∂x_A}, {s: ∂ℓ/∂W_s}) with, for d = {A: −(α/τ_A) c_A},
            ∂ℓ/∂x_A = c_A + d_A + H_A(x_A)·(Σ_s VJP_s(d))_A,   ∂ℓ/∂W_s = VJP_s(d)_W.
        H_A is symmetric, so the VJP of g_A = ∂L_A/∂x_A is the Hessian-vector product."""
        self._check(xs, weights)
        self._check_states(cotangents, what="cotangents", batch_of=xs)
        alpha = _positive("alpha", alpha)
        gs = self._activations(xs)
        d = {name: -alpha / layer.tau * cotangents[name] for name, layer in self.layers.items()}
        d_gs = {name: xp.zeros_like(g) for name, g in gs.items()}
        d_weights = {}
        for name, s in self.synapses.items():
            d_weights[name], d_g = s.vjp(gs, weights[name], d)
            for layer_name, g in d_g.items():
                d_gs[layer_name] = d_gs[layer_name] + g
        d_xs = {name: cotangents[name] + d[name] + layer.lagrangian.hvp(xs[name], d_gs[name])
                for name, layer in self.layers.items()}
        return d_xs, d_weights

    def integrate(self, xs, weights, dt, n_steps, method="rk4"):
        """n_steps fixed steps of :eq:`H3` by `method` ("euler" | "rk4"), recording E."""
        self._check(xs, weights)
        return integrate(lambda x: self._velocity(x, weights), xs, dt, n_steps, method,
                         energy=lambda x: self._energy_tree(x, weights)["total"])

    def descend(self, xs, weights, alpha, max_steps=100, tol=None):
        """Repeated :eq:`H5` steps, recording states and E; stops when the largest change of a
        layer's state (max over layers and samples of ‖Δx_A‖) is below `tol`, or at max_steps."""
        self._check(xs, weights)
        alpha = _positive("alpha", alpha)
        tol = None if tol is None else _positive("tol", tol)
        return iterate(lambda x: self._step(x, weights, alpha), xs,
                    _count("max_steps", max_steps, 0),
                    lambda x: self._energy_tree(x, weights)["total"], tol)


def _checked_named(kind, items, cls):
    """`items` as a dict after checking it maps non-empty strings to `cls` instances."""
    if not is_tree(items):
        raise HAMError(f"{kind}s must be a dict {{name: {cls.__name__}}}, got "
                       f"{type(items).__name__}")
    for name, item in items.items():
        if not isinstance(name, str) or not name:
            raise HAMError(f"{kind} names must be non-empty strings, got {name!r}")
        if not isinstance(item, cls):
            raise HAMError(f"{kind} {name!r} must be a {cls.__name__}, got {item!r}")
    if kind == "layer" and not items:
        raise HAMError("a HAM needs at least one layer")
    return dict(items)


def _check_keys(what, given, expected, kind):
    """`given` is a dict with exactly the names of `expected`."""
    if not is_tree(given):
        raise HAMError(f"{what} must be a dict {{{kind} name: array}}, got {type(given).__name__}")
    missing = [n for n in expected if n not in given]
    unknown = [n for n in given if n not in expected]
    if missing or unknown:
        raise HAMError(f"{what} must have one entry per {kind} ({', '.join(map(repr, expected))})"
                       f": missing {missing}, unknown {unknown}")


def _check_finite(what, arrays):
    """No NaN or inf in any of the arrays (one host sync per array)."""
    bad = [name for name, a in arrays.items() if not bool(xp.all(xp.isfinite(a)))]
    if bad:
        raise HAMError(f"{what} {bad} contain NaN or inf")
