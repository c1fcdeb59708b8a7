"""Hierarchical associative memories (:ref:`sec-ham`): a graph of named neuron layers and synapses,
its energy, the closed-form gradient ∂E/∂g, and the dynamics that descend the energy.

    (H1)  E = Σ_A [⟨x_A, g_A⟩ − L_A(x_A)] + Σ_s E_s(g …)
    (H2)  ∂E/∂g_A = x_A + Σ_{s ∋ A} ∂E_s/∂g_A
    (H3)  τ_A dx_A/dt = −∂E/∂g_A
    (H4)  dE/dt = −Σ_A τ_A ⟨ẋ_A, H_A ẋ_A⟩ ≤ 0   (every H_A ⪰ 0)
    (H5)  x_A ← x_A − (α/τ_A) ∂E/∂g_A           (the Euler step of H3 with dt = α)
    (H6)  E(x) = ⟨x, g⟩ − L_v(x) − Σ_h L_h(W_h g)  (hidden layers at their fixed points)

    ham = HAM({"v": Layer((S, C), LayerNorm(axes=(-2, -1))), "h": Layer((N_s, C), ReLU())},
              {"token": TokenMixing(hidden="h", visible="v")})
    weights = ham.init_weights(seed=0)                       # {"token": (N_s, S)}
    trajectory = ham.descend(ham.init_states(8, seed=1, scale=1.0), weights, alpha=0.1)

Conventions. States x, activations g and gradients are plain dicts {layer name: (B, *shape)}
with one leading batch axis; weights are {synapse name: matrix}. Dicts (not objects) so that the
Energy MetaFormer can backprop through `step` by hand, and autograd can differentiate everything.
Every synapse (refham.synapses) is bilinear, E_s = −⟨g_p, M_W(g_q)⟩ with one matrix W serving
both directions, so the weights are symmetric by construction. A layer connected to no synapse is an error: alone it
only decays to x = 0 and is almost surely a wiring mistake (a misspelt name in a synapse).
"""
import dataclasses
import math
import numbers
import types

from refham.backend import asarray, get_dtype, rng, to_numpy, xp
from refham.checks import finite_real, integer_at_least
from refham.dynamics import euler_step, integrate, is_tree, iterate
from refham.lagrangians import Lagrangian, LagrangianError
from refham.synapses import (  # noqa: F401  (the synapses are part of the HAM's interface)
    ChannelMixing, Dense, HAMError, Synapse, TokenMixing, batch_inner)


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
        object.__setattr__(self, "tau", finite_real("layer time constant tau", self.tau, HAMError))
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
        gen, scale = rng(seed), finite_real("weight scale", scale, HAMError, allow_zero=True)
        return {name: asarray(scale * gen.standard_normal(shape))
                for name, shape in self._weight_shapes.items()}

    def init_states(self, batch, seed=None, scale=0.0):
        """{layer name: (batch, *shape)}: zeros, or scale·N(0,1) drawn in layer order."""
        batch = integer_at_least("batch", batch, 1, HAMError)
        scale = finite_real("state scale", scale, HAMError, allow_zero=True)
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
        gs, layers = {}, {}
        for name, layer in self.layers.items():
            gs[name], layers[name] = layer.lagrangian.activation_and_neuron_energy(
                xs[name], layer.event_ndim)
        synapses = {name: s.synapse_energy(gs, weights[name]) for name, s in self.synapses.items()}
        total = sum(layers.values()) + sum(synapses.values())
        return {"layers": layers, "synapses": synapses, "total": total}

    def _dEdg(self, xs, weights, gs=None):
        gs = self._activations(xs) if gs is None else gs
        grads = dict(xs)  # the Legendre term contributes exactly x_A
        for name, s in self.synapses.items():
            for layer_name, signal in s.synapse_energy_and_signals(gs, weights[name])[1].items():
                grads[layer_name] = grads[layer_name] - signal   # ∂E_s/∂g = −signal
        return grads

    def _total_energy_and_dEdg(self, xs, weights):
        gs, energy = {}, 0
        for name, layer in self.layers.items():
            gs[name], e = layer.lagrangian.activation_and_neuron_energy(xs[name], layer.event_ndim)
            energy = energy + e
        grads = dict(xs)  # the Legendre term contributes exactly x_A
        for name, s in self.synapses.items():
            e, signals = s.synapse_energy_and_signals(gs, weights[name])
            energy = energy + e
            for layer_name, signal in signals.items():
                grads[layer_name] = grads[layer_name] - signal   # ∂E_s/∂g = −signal
        return energy, grads

    def _velocity(self, xs, weights):
        return self._velocity_of(self._dEdg(xs, weights))

    def _velocity_of(self, grads):
        """(H3) ẋ_A = −(∂E/∂g_A)/τ_A from the gradients."""
        return {name: -g / self.layers[name].tau for name, g in grads.items()}

    def _velocity_and_energy(self, xs, weights):
        """(ẋ, E) from one combined pass."""
        energy, grads = self._total_energy_and_dEdg(xs, weights)
        return self._velocity_of(grads), energy

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

    def total_energy(self, xs, weights):
        """E = Σ_A [⟨x_A, g_A⟩ − L_A(x_A)] + Σ_s E_s(g), shape (B,). Implements :eq:`H1`."""
        return self.energy_tree(xs, weights)["total"]

    def dEdg(self, xs, weights, gs=None):
        """∂E/∂g_A = x_A + Σ_{s ∋ A} ∂E_s/∂g_A in closed form. Implements :eq:`H2`; `gs`: the
        activations, if already computed."""
        self._check(xs, weights)
        if gs is not None:
            self._check_states(gs, what="activations", batch_of=xs)
        return self._dEdg(xs, weights, gs)

    def total_energy_and_dEdg(self, xs, weights):
        """(E, {A: ∂E/∂g_A}): :eq:`H1` and :eq:`H2` from one pass that evaluates each
        activation once and each W·g product once, for loops that need both (descend,
        integrate, value-and-gradient benchmarks). E has shape (B,)."""
        self._check(xs, weights)
        return self._total_energy_and_dEdg(xs, weights)

    def velocity(self, xs, weights):
        """ẋ_A = −(∂E/∂g_A)/τ_A. Implements :eq:`H3`."""
        self._check(xs, weights)
        return self._velocity(xs, weights)

    def dEdt(self, xs, weights):
        """dE/dt = −Σ_A τ_A ⟨ẋ_A, H_A ẋ_A⟩, shape (B,). Implements :eq:`H4`."""
        self._check(xs, weights)
        v = self._velocity(xs, weights)
        return -sum(layer.tau * batch_inner(v[name], layer.lagrangian.hvp(xs[name], v[name]))
                    for name, layer in self.layers.items())

    def adiabatic_energy(self, x, weights, visible):
        """The energy of the visible layer alone once every hidden layer sits at its fixed
        point (the adiabatic limit τ_h → 0). Implements :eq:`H6`:

            E(x) = ⟨x, g⟩ − L_v(x) − Σ_h L_h(W_h g),   g = g_v(x),

        where W_h g is what hidden layer h receives from its synapse (M_W(g) or M_Wᵀ(g)), so
        that x_h = W_h g makes ∂E/∂g_h = 0 and E_h + E_s = ⟨x_h, g_h⟩ − L_h − ⟨g_h, x_h⟩ = −L_h.
        It equals (H1) at those hidden states and has the same ∂E/∂x_v there. This HAM must be a
        star: every other layer joined to `visible` by one synapse and to nothing else.
        `x`: the visible states (B, *shape); returns shape (B,)."""
        if visible not in self.layers:
            raise HAMError(f"visible layer {visible!r} is not a layer of this HAM; the layers "
                           f"are {', '.join(map(repr, self.layers))}")
        hidden = {}  # hidden layer name -> its synapse's name
        for name, s in self.synapses.items():
            if visible not in s.layers:
                raise HAMError(f"adiabatic_energy needs every synapse to touch the visible layer "
                               f"{visible!r}; {name!r} ({s!r}) does not")
            other = s.layers[1] if s.layers[0] == visible else s.layers[0]
            if other in hidden:
                raise HAMError(f"hidden layer {other!r} has two synapses to {visible!r} "
                               f"({hidden[other]!r}, {name!r}); adiabatic_energy needs one each")
            hidden[other] = name
        layer = self.layers[visible]
        shape = getattr(x, "shape", None)
        if shape is None or len(shape) != 1 + layer.event_ndim or tuple(shape[1:]) != layer.shape:
            raise HAMError(f"the visible states have shape {shape}; layer {visible!r} needs "
                           f"(B, *{layer.shape}) with a leading batch axis")
        _check_finite("visible states", {visible: x})
        self._check_weights(weights)
        g, energy = layer.lagrangian.activation_and_neuron_energy(x, layer.event_ndim)
        for name, synapse_name in hidden.items():
            h = self.layers[name]
            drive = self.synapses[synapse_name].signal_to(
                name, {visible: g}, weights[synapse_name], (x.shape[0],) + h.shape)
            energy = energy - h.lagrangian.value(drive, h.event_ndim)
        return energy

    # -- dynamics
    def descent_step_bound(self, weights, curvature):
        """The step size up to which a step of :eq:`H5` provably does not raise E:

            α ≤ min_A τ_A / (1 + K_A ρ_A),   ρ_A = ½ Σ_{s ∋ A} ‖W_s‖₂,

        where `curvature` = {A: K_A} bounds the largest eigenvalue of the Hessian H_A along the
        step, from x_A to x'_A: 1 for identity and relu, β for tanh, β/4 for sigmoid, β/2 for
        softmax; state-dependent for repu ((n−1)·max relu(x)^{n−2}), layernorm (γ/σ, σ its
        smallest value on the step) and spherical (γ/r). Every layer must be convex.

        Proof: E = Σ_A L*_A(g_A) + Σ_s E_s(g) with L*_A(g_A) = ⟨x_A, g_A⟩ − L_A(x_A) convex
        and x_A ∈ ∂L*_A(g_A), so L*_A(g'_A) − L*_A(g_A) ≤ ⟨x'_A, Δg_A⟩; a bilinear E_s changes
        by its linear term plus −⟨Δg_p, M_W Δg_q⟩ ≤ ‖W_s‖₂(‖Δg_p‖² + ‖Δg_q‖²)/2. With
        x'_A + ∂E_syn/∂g_A = ∂E/∂g_A + Δx_A = −(τ_A/α − 1)Δx_A and ⟨Δx_A, Δg_A⟩ ≥ ‖Δg_A‖²/K_A
        (Δg_A = H̄_A Δx_A, H̄_A the mean Hessian on the step, 0 ⪯ H̄_A ⪯ K_A):
            ΔE ≤ Σ_A [ρ_A − (τ_A/α − 1)/K_A] ‖Δg_A‖²,  ≤ 0 within the bound.
        The bound is sufficient, not necessary, and E can rise beyond it
        (:ref:`sec-ham-step-size`)."""
        self._check_weights(weights)
        _check_keys("curvature", curvature, self.layers, "layer")
        nonconvex = [n for n, layer in self.layers.items() if not layer.lagrangian.convex]
        if nonconvex:
            raise HAMError(f"layer(s) {nonconvex} have a Lagrangian that is not convex: no step "
                           f"size guarantees that E falls")
        norms = {name: float(xp.max(xp.linalg.svd(W, compute_uv=False)))
                 for name, W in weights.items()}
        bound = math.inf
        for name, layer in self.layers.items():
            k = finite_real(f"curvature[{name!r}]", curvature[name], HAMError, allow_zero=True)
            rho = 0.5 * sum(norms[s] for s, synapse in self.synapses.items()
                            if name in synapse.layers)
            bound = min(bound, layer.tau / (1 + k * rho))
        return bound

    def step(self, xs, weights, alpha):
        """x_A ← x_A − (α/τ_A) ∂E/∂g_A for all layers at once. Implements :eq:`H5`. E does not rise for
        any α within `descent_step_bound`; beyond it, it may."""
        self._check(xs, weights)
        return self._step(xs, weights, finite_real("alpha", alpha, HAMError))

    def step_vjp(self, xs, weights, alpha, cotangents):
        """Backprop through :eq:`H5`: for cotangents c_A of the new states x'_A returns
        ({A: ∂ℓ/∂x_A}, {s: ∂ℓ/∂W_s}) with, for d = {A: −(α/τ_A) c_A},
            ∂ℓ/∂x_A = c_A + d_A + H_A(x_A)·(Σ_s VJP_s(d))_A,   ∂ℓ/∂W_s = VJP_s(d)_W.
        H_A is symmetric, so the VJP of g_A = ∂L_A/∂x_A is the Hessian-vector product."""
        self._check(xs, weights)
        self._check_states(cotangents, what="cotangents", batch_of=xs)
        return self._step_vjp(xs, weights, finite_real("alpha", alpha, HAMError), cotangents)

    def _step_vjp(self, xs, weights, alpha, cotangents):
        """The unchecked core of `step_vjp` (see refham.checks), for backprop through T steps."""
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
        """n_steps fixed steps of :eq:`H3` by `method` ("euler" | "rk4"), recording E; E and the
        first velocity of each step come from one `total_energy_and_dEdg` pass."""
        self._check(xs, weights)
        return integrate(lambda x: self._velocity(x, weights), xs, dt, n_steps, method,
                         energy=lambda x: self._energy_tree(x, weights)["total"],
                         f_and_energy=lambda x: self._velocity_and_energy(x, weights))

    def descend(self, xs, weights, alpha, max_steps=100, tol=None):
        """Repeated :eq:`H5` steps, recording states and E (one `total_energy_and_dEdg` pass per
        step); stops when the largest change of a layer's state (max over layers and samples of
        ‖Δx_A‖) is below `tol`, or at max_steps. E is guaranteed not to rise only for α within
        `descent_step_bound`; see there for what larger steps do."""
        self._check(xs, weights)
        alpha = finite_real("alpha", alpha, HAMError)
        tol = None if tol is None else finite_real("tol", tol, HAMError)
        steps = integer_at_least("max_steps", max_steps, 0, HAMError)

        def advance(x):
            velocity, energy = self._velocity_and_energy(x, weights)
            return euler_step(lambda y: self._velocity(y, weights), x, alpha, velocity), energy
        return iterate(advance, xs, steps, lambda x: self._energy_tree(x, weights)["total"], tol)


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
    """No NaN or inf in any of the arrays (one device→host transfer for all of them)."""
    if not arrays:
        return
    finite = to_numpy(xp.stack([xp.all(xp.isfinite(a)) for a in arrays.values()]))
    bad = [name for name, ok in zip(arrays, finite) if not ok]
    if bad:
        raise HAMError(f"{what} {bad} contain NaN or inf")
