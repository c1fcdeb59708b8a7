"""Neuron-layer Lagrangians (:ref:`sec-lagrangians`): value L, activation g = ∂L/∂x, Hessian-vector
product Hv, and the neuron energy ⟨x, g⟩ − L (the Legendre transform).

| name                     | L(x)                | g(x)               | Hv                       |
|--------------------------|---------------------|--------------------|--------------------------|
| identity                 | ½Σx²                | x                  | v                        |
| relu                     | ½Σ relu(x)²         | relu(x)            | 1[x>0]·v                 |
| repu(n), n ≥ 2           | (1/n)Σ relu(x)^n    | relu(x)^{n−1}      | (n−1)relu(x)^{n−2}·v     |
| tanh(β)                  | (1/β)Σ log cosh(βx) | tanh(βx)           | β(1−g²)·v                |
| sigmoid(β)               | (1/β)Σ softplus(βx) | σ(βx)              | βg(1−g)·v                |
| softmax(β, axis)         | (1/β) logsumexp(βx) | softmax(βx)        | βg⊙(v − ⟨g, v⟩_axis)     |
| gelu (not convex)        | Σ Φ(x)              | GELU(x) = x·Φ_N(x) | (Φ_N(x) + xφ(x))·v       |
| layernorm(γ, δ, ε, axes) | γ·D·σ + ⟨δ, x⟩      | γ(x − x̄)/σ + δ     | (γ/σ)(Pv − x̂⟨x̂, Pv⟩/D)   |
| spherical(γ, δ, ε, axes) | γ·r + ⟨δ, x⟩        | γx/r + δ           | (γ/r)(v − x⟨x, v⟩/r²)    |

Φ(x) = ¼(x² + (x²−1)erf(x/√2) + x√(2/π)e^{−x²/2}); layernorm: x̄, var over `axes` (D elements),
σ = √(var + ε), Pv = v − mean(v), x̂ = (x − x̄)/σ; spherical: r = √(Σ_axes x² + ε).

Shapes. A layer state x has leading batch axes and then the layer's own ("event") axes; `value`
and `neuron_energy` take `event_ndim`, the number of trailing event axes, sum over them and keep the batch
axes. `activation` and `hvp` return arrays of x's shape. `axis`/`axes` count from the end
(negative) and must lie inside the event axes; where they cover only part of the event axes (a
softmax over the tokens of an (S, C) layer, say) L is summed over the remaining event axes.

Numerics: tanh, sigmoid and softmax are written in overflow-free forms (finite at |βx| ~ 1e3 and
beyond), their Hessians in forms free of cancellation where g saturates (β sech², βσ(y)σ(−y), a
re-centred softmax Hv); Φ is written so that x² − x² does not cancel for x ≪ 0; layernorm and
spherical return their energy in closed form (−γDε/σ, −γε/r), since ⟨x, g⟩ − L cancels
catastrophically once the state is large against ε. Inputs are not scanned for NaN/inf here (a
device sync per call on CuPy); callers validate their states once.
"""
import abc
import dataclasses
import math
import numbers
import operator

from refham.backend import gelu, gelu_deriv, normal_cdf, normal_pdf, xp

LOG_2 = math.log(2.0)


class LagrangianError(ValueError):
    """A Lagrangian was given invalid parameters or an array it cannot act on."""


# ---------------------------------------------------------------- shared shape helpers

def event_axes(event_ndim, ndim):
    """The trailing `event_ndim` axes of an `ndim`-dimensional state, as negative indices."""
    try:
        event_ndim = operator.index(event_ndim)
    except TypeError:
        raise LagrangianError(f"event_ndim must be an integer, got {event_ndim!r}") from None
    if not 1 <= event_ndim <= ndim:
        raise LagrangianError(
            f"event_ndim={event_ndim} does not fit a state with {ndim} axes: it must be between 1 "
            f"and the number of axes (the layer's own axes are the trailing ones)")
    return tuple(range(-event_ndim, 0))


def sum_over_events(a, event_ndim):
    """Σ over the trailing `event_ndim` axes of `a`; the leading batch axes are kept."""
    return xp.sum(a, axis=event_axes(event_ndim, a.ndim))


def _check_same_shape(x, v):
    if tuple(v.shape) != tuple(x.shape):
        raise LagrangianError(
            f"hvp needs a direction v of the state's shape {tuple(x.shape)}, got {tuple(v.shape)}")


def _positive(name, value):
    """`value` as a float after checking that it is a finite positive real number."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise LagrangianError(f"{name} must be a positive real number, got {value!r}")
    if not (math.isfinite(value) and value > 0):
        raise LagrangianError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def _store_positive(lagrangian, field):
    """Validate a frozen dataclass's positive parameter `field` and store it as a float."""
    value = _positive(f"{lagrangian.name} {field}", getattr(lagrangian, field))
    object.__setattr__(lagrangian, field, value)


def _scalar_gamma(name, gamma):
    """γ as a float: a per-element γ makes ∂g/∂x non-symmetric, so no Lagrangian exists."""
    shape = (len(gamma),) if isinstance(gamma, (list, tuple)) else getattr(gamma, "shape", ())
    if shape != ():
        raise LagrangianError(
            f"{name} gamma must be a scalar, got one of shape {tuple(shape)}: a per-element γ "
            f"makes ∂g/∂x non-symmetric, so no Lagrangian exists (refham docs: Lagrangians); "
            f"use the per-element affine layer norm of refham.layers for that")
    if hasattr(gamma, "ndim"):  # a 0-d array (NumPy or CuPy)
        gamma = float(gamma)
    return _positive(f"{name} gamma", gamma)


def _negative_axes(axes):
    """`axes` (an int or a sequence of ints) as a sorted tuple of distinct negative indices."""
    if isinstance(axes, numbers.Integral):
        axes = (axes,)
    try:
        axes = tuple(operator.index(a) for a in axes)
    except TypeError:
        raise LagrangianError(f"axes must be negative integers, got {axes!r}") from None
    if not axes:
        raise LagrangianError("axes is empty: name at least one axis (e.g. axes=(-1,))")
    if any(a >= 0 for a in axes):
        raise LagrangianError(
            f"axes {axes} must be negative (counted from the end of the state, e.g. -1 for the "
            f"last axis) so that they mean the same with or without batch axes")
    if len(set(axes)) != len(axes):
        raise LagrangianError(f"axes {axes} repeat an axis")
    return tuple(sorted(axes))


def _check_axes_fit(axes, x, event_ndim=None):
    """Reject `axes` reaching beyond x's axes or, given `event_ndim`, beyond its event axes."""
    n_axes, what = x.ndim, "axes of the state"
    if event_ndim is not None:
        n_axes, what = len(event_axes(event_ndim, x.ndim)), "event axes"
    if -min(axes) > n_axes:
        raise LagrangianError(
            f"axes {axes} reach beyond the {n_axes} {what}: a Lagrangian's axis/axes must be "
            f"among the layer's own (trailing) axes; raise event_ndim or choose other axes")


# ---------------------------------------------------------------- the interface

class Lagrangian(abc.ABC):
    """A neuron layer's Lagrangian L(x): value, activation g = ∂L/∂x, Hv = (∂²L/∂x²)v, neuron energy."""

    convex = True  # is H(x) ⪰ 0 everywhere? (H4 needs it for the layers whose energy descends)
    name = None    # the registry name used by `get_lagrangian`

    @abc.abstractmethod
    def value(self, x, event_ndim=1):
        """L(x) summed over the trailing `event_ndim` axes; shape x.shape[:-event_ndim]."""

    @abc.abstractmethod
    def activation(self, x):
        """g(x) = ∂L/∂x, same shape as x."""

    @abc.abstractmethod
    def hvp(self, x, v):
        """H(x)v = (∂²L/∂x²)v, same shape as x (H is symmetric, so this is also the VJP of g)."""

    def neuron_energy(self, x, event_ndim=1):
        """Neuron energy E = ⟨x, g(x)⟩ − L(x) over the event axes (the Legendre transform),
        :eq:`L-energy`."""
        return self.activation_and_neuron_energy(x, event_ndim)[1]

    def activation_and_neuron_energy(self, x, event_ndim=1):
        """(g(x), ⟨x, g(x)⟩ − L(x)) from one evaluation of g, :eq:`L-energy`: what the HAM's
        combined energy-and-gradient pass needs of each layer."""
        g = self.activation(x)
        return g, sum_over_events(x * g, event_ndim) - self.value(x, event_ndim)


class _Elementwise(Lagrangian):
    """L(x) = Σ ℓ(x_i): g and the (diagonal) Hessian act element by element, Hv = ℓ″(x)⊙v."""

    @abc.abstractmethod
    def density(self, x):
        """ℓ(x), the per-element Lagrangian."""

    @abc.abstractmethod
    def curvature(self, x):
        """ℓ″(x), the Hessian's diagonal."""

    def value(self, x, event_ndim=1):
        """L = Σ_event ℓ(x)."""
        return sum_over_events(self.density(x), event_ndim)

    def hvp(self, x, v):
        """Hv = ℓ″(x)⊙v."""
        _check_same_shape(x, v)
        return self.curvature(x) * v


# ---------------------------------------------------------------- elementwise Lagrangians

@dataclasses.dataclass(frozen=True)
class Identity(_Elementwise):
    """L = ½Σx²,  g = x,  Hv = v :eq:`L-identity`"""
    name = "identity"

    def density(self, x):
        return 0.5 * x * x

    def activation(self, x):
        return x

    def curvature(self, x):
        return xp.ones_like(x)


@dataclasses.dataclass(frozen=True)
class ReLU(_Elementwise):
    """L = ½Σ relu(x)²,  g = relu(x),  Hv = 1[x>0]·v :eq:`L-relu`"""
    name = "relu"

    def density(self, x):
        return 0.5 * xp.maximum(x, 0.0) ** 2

    def activation(self, x):
        return xp.maximum(x, 0.0)

    def curvature(self, x):
        return xp.where(x > 0, xp.ones_like(x), xp.zeros_like(x))  # ones_like: keeps x's dtype


@dataclasses.dataclass(frozen=True)
class RePU(_Elementwise):
    """L = (1/n)Σ relu(x)^n,  g = relu(x)^{n−1},  Hv = (n−1)relu(x)^{n−2}·v  (n ≥ 2, real)
    :eq:`L-repu`"""
    n: float = 3
    name = "repu"

    def __post_init__(self):
        n = _positive("repu power n", self.n)
        if n < 2:
            raise LagrangianError(
                f"repu needs n >= 2, got n={n}: below 2 the Hessian (n−1)relu(x)^(n−2) is "
                f"infinite at x = 0 (and n <= 1 loses convexity and a continuous g); use relu "
                f"for n = 2")

    def density(self, x):
        return xp.maximum(x, 0.0) ** self.n / self.n

    def activation(self, x):
        return xp.maximum(x, 0.0) ** (self.n - 1)

    def curvature(self, x):
        # the 1[x>0] factor matters at n = 2, where relu(x)^0 would be 1 for x <= 0
        return xp.where(x > 0, (self.n - 1) * xp.maximum(x, 0.0) ** (self.n - 2), 0.0)


@dataclasses.dataclass(frozen=True)
class _Tempered(_Elementwise):
    """An elementwise Lagrangian of βx, with inverse temperature β > 0."""
    beta: float = 1.0

    def __post_init__(self):
        _store_positive(self, "beta")


@dataclasses.dataclass(frozen=True)
class Tanh(_Tempered):
    """L = (1/β)Σ log cosh(βx),  g = tanh(βx),  Hv = β(1 − g²)·v :eq:`L-tanh`"""
    name = "tanh"

    def density(self, x):
        """log cosh(y) = |y| + log1p(e^{−2|y|}) − log 2, y = βx: no overflow of cosh."""
        y = xp.abs(self.beta * x)
        return (y + xp.log1p(xp.exp(-2.0 * y)) - LOG_2) / self.beta

    def activation(self, x):
        return xp.tanh(self.beta * x)

    def curvature(self, x):
        """β(1 − tanh²y) = β·4e^{−2|y|}/(1 + e^{−2|y|})², free of the cancellation in 1 − g²."""
        t = xp.exp(-2.0 * xp.abs(self.beta * x))
        return self.beta * 4.0 * t / (1.0 + t) ** 2


@dataclasses.dataclass(frozen=True)
class Sigmoid(_Tempered):
    """L = (1/β)Σ softplus(βx),  g = σ(βx),  Hv = βg(1 − g)·v :eq:`L-sigmoid`"""
    name = "sigmoid"

    def density(self, x):
        """softplus(y) = max(y, 0) + log1p(e^{−|y|}), y = βx."""
        y = self.beta * x
        return (xp.maximum(y, 0.0) + xp.log1p(xp.exp(-xp.abs(y)))) / self.beta

    def activation(self, x):
        """σ(y) = e^{min(y,0)}/(1 + e^{−|y|}): exact in the tails, no overflow."""
        y = self.beta * x
        return xp.exp(xp.minimum(y, 0.0)) / (1.0 + xp.exp(-xp.abs(y)))

    def curvature(self, x):
        """βσ(y)σ(−y) = βe^{−|y|}/(1 + e^{−|y|})², free of the cancellation in 1 − g."""
        t = xp.exp(-xp.abs(self.beta * x))
        return self.beta * t / (1.0 + t) ** 2


@dataclasses.dataclass(frozen=True)
class GELU(_Elementwise):
    """L = Σ Φ(x),  g = GELU(x) = x·Φ_N(x),  Hv = (Φ_N(x) + xφ(x))·v.  Not convex: GELU′ < 0
    below x ≈ −0.752 :eq:`L-gelu`"""
    name = "gelu"
    convex = False

    def density(self, x):
        """Φ(x) = ¼(x² + (x²−1)erf(x/√2) + x√(2/π)e^{−x²/2}) = ½(x²−1)Φ_N(x) + ½xφ(x) + ¼
        (erf(x/√2) = 2Φ_N − 1, √(2/π)e^{−x²/2} = 2φ). The second form avoids the cancellation
        x² − x² for x ≪ 0. Φ′ = xΦ_N + ½(x²−1)φ + ½φ − ½x²φ = xΦ_N = GELU (φ′ = −xφ);
        Φ(0) = 0 and Φ(−∞) = ¼."""
        return 0.5 * (x * x - 1.0) * normal_cdf(x) + 0.5 * x * normal_pdf(x) + 0.25

    def activation(self, x):
        return gelu(x)

    def curvature(self, x):
        return gelu_deriv(x)


# ---------------------------------------------------------------- softmax

@dataclasses.dataclass(frozen=True)
class Softmax(Lagrangian):
    """L = (1/β) logsumexp(βx) along `axis` (summed over the other event axes),
    g = softmax(βx) along `axis`,  Hv = βg⊙(v − ⟨g, v⟩_axis) :eq:`L-softmax`"""
    beta: float = 1.0
    axis: int = -1
    name = "softmax"

    def __post_init__(self):
        _store_positive(self, "beta")
        if not isinstance(self.axis, numbers.Integral) or isinstance(self.axis, bool):
            raise LagrangianError(f"softmax axis must be one negative integer, got {self.axis!r}")
        object.__setattr__(self, "axis", _negative_axes(self.axis)[0])

    def _shifted(self, x):
        """βx − max(βx) along the axis, and that max (keepdims): e^{βx − max} never overflows."""
        _check_axes_fit((self.axis,), x)
        y = self.beta * x
        y_max = xp.max(y, axis=self.axis, keepdims=True)
        return y - y_max, y_max

    def value(self, x, event_ndim=1):
        """(1/β)(m + log Σ e^{βx − m}), m = max βx: the max-shifted logsumexp."""
        _check_axes_fit((self.axis,), x, event_ndim)
        shifted, y_max = self._shifted(x)
        log_sum = xp.log(xp.sum(xp.exp(shifted), axis=self.axis, keepdims=True))
        return sum_over_events((y_max + log_sum) / self.beta, event_ndim)

    def _probabilities(self, shifted):
        """softmax from the max-shifted βx."""
        e = xp.exp(shifted)
        return e / xp.sum(e, axis=self.axis, keepdims=True)

    def activation(self, x):
        """softmax(βx) = e^{βx − m}/Σ e^{βx − m}."""
        return self._probabilities(self._shifted(x)[0])

    def hvp(self, x, v):
        """Hv = βg⊙(v − ⟨g, v⟩_axis), evaluated as βg⊙(w − ⟨g, w⟩_axis) with w = v − c and c the
        mean of v where βx is largest along the axis (any c gives the same since Σg = 1): when g
        is nearly one-hot, ⟨g, v⟩ ≈ v there and v − ⟨g, v⟩ would cancel; w − ⟨g, w⟩ does not."""
        _check_same_shape(x, v)
        shifted, _ = self._shifted(x)
        g = self._probabilities(shifted)
        at_max = xp.where(shifted == 0, xp.ones_like(x), xp.zeros_like(x))  # shifted is 0 exactly
        w = v - xp.sum(at_max * v, axis=self.axis, keepdims=True) / xp.sum(
            at_max, axis=self.axis, keepdims=True)
        return self.beta * g * (w - xp.sum(g * w, axis=self.axis, keepdims=True))


# ---------------------------------------------------------------- normalisers

@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: delta may be an array
class _Normalizer(Lagrangian):
    """L = γ·ρ(x) + ⟨δ, x⟩ with ρ = √(q(x) + c) over `axes`, q a positive semidefinite quadratic
    form: ρ is a smoothed norm, so L is convex, g is a normalised x, and the Legendre energy is
    γ(⟨x, ∇ρ⟩ − ρ) = γ(q − ρ²)/ρ = −γc/ρ in closed form (the ⟨δ, x⟩ terms cancel)."""
    gamma: float = 1.0
    delta: object = 0.0  # a scalar, or an array broadcastable to the event shape
    eps: float = 1e-5
    axes: tuple = (-1,)

    def __post_init__(self):
        object.__setattr__(self, "gamma", _scalar_gamma(self.name, self.gamma))
        _store_positive(self, "eps")
        object.__setattr__(self, "axes", _negative_axes(self.axes))

    def _delta_for(self, x, event_ndim=None):
        """δ as an array of x's backend and dtype, after checking that it broadcasts to x's
        event shape without adding axes (which would silently broadcast over the batch)."""
        if isinstance(self.delta, numbers.Real):
            return self.delta
        delta = xp.asarray(self.delta, dtype=x.dtype)
        n_event = x.ndim if event_ndim is None else event_ndim
        event_shape = tuple(x.shape[x.ndim - n_event:])
        if delta.ndim > n_event or any(
                d not in (1, e) for d, e in zip(delta.shape[::-1], event_shape[::-1])):
            raise LagrangianError(
                f"{self.name} delta of shape {tuple(delta.shape)} does not broadcast to the event "
                f"shape {event_shape}; give a scalar or an array of (a suffix of) that shape")
        return delta

    @abc.abstractmethod
    def radius(self, x):
        """(ρ, c): the smoothed norm ρ = √(q(x) + c) over `axes` (keepdims) and its offset c."""

    def value(self, x, event_ndim=1):
        """L = Σ_event γρ + ⟨δ, x⟩."""
        _check_axes_fit(self.axes, x, event_ndim)
        rho, _ = self.radius(x)
        return sum_over_events(self.gamma * rho, event_ndim) + sum_over_events(
            self._delta_for(x, event_ndim) * x, event_ndim)

    @abc.abstractmethod
    def _activation_and_radius(self, x):
        """(g, ρ, c) from one normalisation pass over x."""

    def activation(self, x):
        """g = γ∇ρ + δ."""
        return self._activation_and_radius(x)[0]

    def activation_and_neuron_energy(self, x, event_ndim=1):
        """(g, E) with E = ⟨x, g⟩ − L = −Σ_event γc/ρ in closed form (no cancellation for
        large x), :eq:`L-energy`."""
        _check_axes_fit(self.axes, x, event_ndim)
        self._delta_for(x, event_ndim)  # validate δ against the event shape, as value does
        g, rho, offset = self._activation_and_radius(x)
        return g, sum_over_events(-self.gamma * offset / rho, event_ndim)


@dataclasses.dataclass(frozen=True, eq=False)
class LayerNorm(_Normalizer):
    """L = γ·D·σ + ⟨δ, x⟩,  g = γ(x − x̄)/σ + δ,  Hv = (γ/σ)(Pv − x̂⟨x̂, Pv⟩/D), over `axes`
    (D elements, σ = √(var + ε), x̂ = (x − x̄)/σ, Pv = v − mean v). Energy −γDε/σ.
    :eq:`L-layernorm`"""
    name = "layernorm"

    def _size(self, x):
        """D, the number of elements normalised together."""
        return math.prod(x.shape[a] for a in self.axes)

    def _centred(self, a):
        return a - xp.mean(a, axis=self.axes, keepdims=True)

    def _normalised(self, x):
        """x̂ = (x − x̄)/σ and σ (keepdims)."""
        _check_axes_fit(self.axes, x)
        centred = self._centred(x)
        sigma = xp.sqrt(xp.mean(centred * centred, axis=self.axes, keepdims=True) + self.eps)
        return centred / sigma, sigma

    def radius(self, x):
        """ρ = Dσ = √(D·Σ(x − x̄)² + D²ε), offset c = D²ε."""
        _, sigma = self._normalised(x)
        size = self._size(x)
        return size * sigma, size * size * self.eps

    def _activation_and_radius(self, x):
        """g = γx̂ + δ, ρ = Dσ, c = D²ε."""
        x_hat, sigma = self._normalised(x)
        size = self._size(x)
        return self.gamma * x_hat + self._delta_for(x), size * sigma, size * size * self.eps

    def hvp(self, x, v):
        """Hv = (γ/σ)(Pv − x̂⟨x̂, Pv⟩/D)."""
        _check_same_shape(x, v)
        x_hat, sigma = self._normalised(x)
        pv = self._centred(v)
        projection = xp.sum(x_hat * pv, axis=self.axes, keepdims=True) / self._size(x)
        return self.gamma / sigma * (pv - x_hat * projection)


@dataclasses.dataclass(frozen=True, eq=False)
class Spherical(_Normalizer):
    """L = γ·r + ⟨δ, x⟩,  g = γx/r + δ,  Hv = (γ/r)(v − x⟨x, v⟩/r²), r = √(Σ_axes x² + ε).
    Energy −γε/r :eq:`L-spherical`"""
    name = "spherical"

    def radius(self, x):
        """ρ = r = √(Σx² + ε), offset c = ε."""
        _check_axes_fit(self.axes, x)
        return xp.sqrt(xp.sum(x * x, axis=self.axes, keepdims=True) + self.eps), self.eps

    def _activation_and_radius(self, x):
        """g = γx/r + δ, ρ = r, c = ε."""
        r, offset = self.radius(x)
        return self.gamma * x / r + self._delta_for(x), r, offset

    def hvp(self, x, v):
        """Hv = (γ/r)(v − x⟨x, v⟩/r²)."""
        _check_same_shape(x, v)
        r, _ = self.radius(x)
        x_dot_v = xp.sum(x * v, axis=self.axes, keepdims=True)
        return self.gamma / r * (v - x * x_dot_v / (r * r))


# ---------------------------------------------------------------- registry

LAGRANGIANS = {cls.name: cls for cls in
               (Identity, ReLU, RePU, Tanh, Sigmoid, Softmax, GELU, LayerNorm, Spherical)}


def get_lagrangian(name, **params):
    """The Lagrangian called `name` (identity relu repu tanh sigmoid softmax gelu layernorm
    spherical) built with `params`, e.g. get_lagrangian("softmax", beta=2.0, axis=-2)."""
    try:
        cls = LAGRANGIANS[name]
    except (KeyError, TypeError):
        raise LagrangianError(
            f"unknown Lagrangian {name!r}: choose one of {', '.join(LAGRANGIANS)}") from None
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise TypeError(
            f"Lagrangian {name!r} has no parameter(s) {', '.join(unknown)}; it takes "
            f"{', '.join(allowed) or 'no parameters'}")
    return cls(**params)
