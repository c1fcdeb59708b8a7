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
| gelu (not convex)        | Σ G(x)              | GELU(x) = x·Φ_N(x) | (Φ_N(x) + xφ(x))·v       |
| layernorm(γ, δ, ε, axes) | γ·D·σ + ⟨δ, x⟩      | γ(x − x̄)/σ + δ     | (γ/σ)(Pv − x̂⟨x̂, Pv⟩/D)   |
| spherical(γ, δ, ε, axes) | γ·r + ⟨δ, x⟩        | γx/r + δ           | (γ/r)(v − x⟨x, v⟩/r²)    |

G(x) = ¼(x² + (x²−1)erf(x/√2) + x√(2/π)e^{−x²/2}); layernorm: x̄, var over `axes` (D elements),
σ = √(var + ε), Pv = v − mean(v), x̂ = (x − x̄)/σ; spherical: r = √(Σ_axes x² + ε).

Shapes. A layer state x has leading batch axes and then the layer's own ("event") axes; `value`
and `neuron_energy` take `event_ndim`, the number of trailing event axes, sum over them and keep the batch
axes. `activation` and `hvp` return arrays of x's shape. `axis`/`axes` count from the end
(negative) and must lie inside the event axes; where they cover only part of the event axes (a
softmax over the tokens of an (S, C) layer, say) L is summed over the remaining event axes.

Numerics: tanh, sigmoid and softmax are written in overflow-free forms (finite at |βx| ~ 1e3 and
beyond), their Hessians in forms free of cancellation where g saturates (β sech², βσ(y)σ(−y), a
re-centred softmax Hv); G is written so that x² − x² does not cancel for x ≪ 0; layernorm and
spherical return their energy in closed form (−γDε/σ, −γε/r), since ⟨x, g⟩ − L cancels
catastrophically once the state is large against ε. Inputs are not scanned for NaN/inf here (a
device sync per call on CuPy); callers validate their states once.

The interface and the shared checks are in refham.lagrangian_base, layernorm and spherical in
refham.normalisers; this module re-exports them, so every Lagrangian is importable from here.
"""
import abc
import dataclasses
import math
import numbers

from refham.backend import accelerated, xp
from refham.checks import finite_real
from refham.special import gelu, gelu_deriv, normal_cdf, normal_pdf
from refham.lagrangian_base import (  # Lagrangian, LagrangianError, event_axes: public here too
    Lagrangian, LagrangianError, check_axes_fit, check_same_shape, event_axes, negative_axes,
    store_positive, sum_over_events)
from refham.normalisers import LayerNorm, Spherical  # re-exported: the registry's normalisers

LOG_2 = math.log(2.0)


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
        check_same_shape(x, v)
        return self.curvature(x) * v


# ---------------------------------------------------------------- elementwise Lagrangians

@dataclasses.dataclass(frozen=True)
class Identity(_Elementwise):
    """L = ½Σx²,  g = x,  Hv = v.  Implements :eq:`L-identity`."""
    name = "identity"

    def density(self, x):
        return 0.5 * x * x

    def activation(self, x):
        return x

    def curvature(self, x):
        return xp.ones_like(x)


@accelerated
def relu_and_half_square(x):
    """(g, ½g²) with g = relu(x) = max(x, 0)."""
    g = xp.maximum(x, 0.0)
    return g, 0.5 * g * g


@dataclasses.dataclass(frozen=True)
class ReLU(_Elementwise):
    """L = ½Σ relu(x)²,  g = relu(x),  Hv = 1[x>0]·v.  Implements :eq:`L-relu`."""
    name = "relu"

    def density(self, x):
        return 0.5 * xp.maximum(x, 0.0) ** 2

    def activation(self, x):
        return xp.maximum(x, 0.0)

    def curvature(self, x):
        return xp.where(x > 0, xp.ones_like(x), xp.zeros_like(x))  # ones_like: keeps x's dtype

    def activation_and_neuron_energy(self, x, event_ndim=1):
        """(g, E) with E = ⟨x, g⟩ − ½Σg² = ½Σg² (x·g = g² element by element): the same
        numbers as the Legendre form (S − S/2 = S/2 exactly), g and ½g² from one pass."""
        g, half_square = relu_and_half_square(x)
        return g, sum_over_events(half_square, event_ndim)


@dataclasses.dataclass(frozen=True)
class RePU(_Elementwise):
    """L = (1/n)Σ relu(x)^n,  g = relu(x)^{n−1},  Hv = (n−1)relu(x)^{n−2}·v  (n ≥ 2, real).
    Implements :eq:`L-repu`."""
    n: float = 3
    name = "repu"

    def __post_init__(self):
        n = finite_real("repu power n", self.n, LagrangianError)
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
        store_positive(self, "beta")


@dataclasses.dataclass(frozen=True)
class Tanh(_Tempered):
    """L = (1/β)Σ log cosh(βx),  g = tanh(βx),  Hv = β(1 − g²)·v.  Implements :eq:`L-tanh`."""
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
    """L = (1/β)Σ softplus(βx),  g = σ(βx),  Hv = βg(1 − g)·v.  Implements :eq:`L-sigmoid`."""
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
    """L = Σ G(x),  g = GELU(x) = x·Φ_N(x),  Hv = (Φ_N(x) + xφ(x))·v.  Not convex: GELU′ < 0
    below x ≈ −0.752.  Implements :eq:`L-gelu`."""
    name = "gelu"
    convex = False

    def density(self, x):
        """G(x) = ¼(x² + (x²−1)erf(x/√2) + x√(2/π)e^{−x²/2}) = ½(x²−1)Φ_N(x) + ½xφ(x) + ¼
        (erf(x/√2) = 2Φ_N − 1, √(2/π)e^{−x²/2} = 2φ). The second form avoids the cancellation
        x² − x² for x ≪ 0. G′ = xΦ_N + ½(x²−1)φ + ½φ − ½x²φ = xΦ_N = GELU (φ′ = −xφ);
        G(0) = 0 and G(−∞) = ¼."""
        return 0.5 * (x * x - 1.0) * normal_cdf(x) + 0.5 * x * normal_pdf(x) + 0.25

    def activation(self, x):
        return gelu(x)

    def curvature(self, x):
        return gelu_deriv(x)


# ---------------------------------------------------------------- softmax

@accelerated
def quotient_and_product(e, x, total):
    """(g, x⊙g) with g = e/Σe (the sum keepdims): softmax's probabilities and ⟨x, g⟩'s terms."""
    g = e / total
    return g, x * g


@dataclasses.dataclass(frozen=True)
class Softmax(Lagrangian):
    """L = (1/β) logsumexp(βx) along `axis` (summed over the other event axes),
    g = softmax(βx) along `axis`,  Hv = βg⊙(v − ⟨g, v⟩_axis).  Implements :eq:`L-softmax`."""
    beta: float = 1.0
    axis: int = -1
    name = "softmax"

    def __post_init__(self):
        store_positive(self, "beta")
        if not isinstance(self.axis, numbers.Integral) or isinstance(self.axis, bool):
            raise LagrangianError(f"softmax axis must be one negative integer, got {self.axis!r}")
        object.__setattr__(self, "axis", negative_axes(self.axis)[0])

    def _shifted(self, x):
        """βx − max(βx) along the axis, and that max (keepdims): e^{βx − max} never overflows."""
        check_axes_fit((self.axis,), x)
        y = self.beta * x
        y_max = xp.max(y, axis=self.axis, keepdims=True)
        return y - y_max, y_max

    def value(self, x, event_ndim=1):
        """(1/β)(m + log Σ e^{βx − m}), m = max βx: the max-shifted logsumexp."""
        check_axes_fit((self.axis,), x, event_ndim)
        shifted, y_max = self._shifted(x)
        return self._value_from(y_max, xp.sum(xp.exp(shifted), axis=self.axis, keepdims=True),
                                event_ndim)

    def _value_from(self, y_max, exp_sum, event_ndim):
        """L = Σ_event (1/β)(m + log Σ e^{βx − m}) from m and the sum (keepdims)."""
        return sum_over_events((y_max + xp.log(exp_sum)) / self.beta, event_ndim)

    def _probabilities(self, shifted):
        """softmax from the max-shifted βx."""
        e = xp.exp(shifted)
        return e / xp.sum(e, axis=self.axis, keepdims=True)

    def activation_and_neuron_energy(self, x, event_ndim=1):
        """(g, ⟨x, g⟩ − L) with one exponential pass shared by g and L."""
        check_axes_fit((self.axis,), x, event_ndim)
        shifted, y_max = self._shifted(x)
        e = xp.exp(shifted)
        exp_sum = xp.sum(e, axis=self.axis, keepdims=True)
        g, x_g = quotient_and_product(e, x, exp_sum)
        return g, sum_over_events(x_g, event_ndim) - self._value_from(y_max, exp_sum,
                                                                      event_ndim)

    def activation(self, x):
        """softmax(βx) = e^{βx − m}/Σ e^{βx − m}."""
        return self._probabilities(self._shifted(x)[0])

    def hvp(self, x, v):
        """Hv = βg⊙(v − ⟨g, v⟩_axis), evaluated as βg⊙(w − ⟨g, w⟩_axis) with w = v − c and c the
        mean of v where βx is largest along the axis (any c gives the same since Σg = 1): when g
        is nearly one-hot, ⟨g, v⟩ ≈ v there and v − ⟨g, v⟩ would cancel; w − ⟨g, w⟩ does not."""
        check_same_shape(x, v)
        shifted, _ = self._shifted(x)
        g = self._probabilities(shifted)
        at_max = xp.where(shifted == 0, xp.ones_like(x), xp.zeros_like(x))  # shifted is 0 exactly
        w = v - xp.sum(at_max * v, axis=self.axis, keepdims=True) / xp.sum(
            at_max, axis=self.axis, keepdims=True)
        return self.beta * g * (w - xp.sum(g * w, axis=self.axis, keepdims=True))


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
