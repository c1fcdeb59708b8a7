"""The normaliser Lagrangians (:ref:`sec-lagrangians`): layernorm and spherical, L = γ·ρ(x) +
⟨δ, x⟩ with ρ a smoothed norm over `axes`, so that g is a normalised x (layer normalisation,
projection onto a sphere) and the neuron energy has a closed form.

layernorm: x̄, var over `axes` (D elements), σ = √(var + ε), Pv = v − mean(v), x̂ = (x − x̄)/σ;
spherical: r = √(Σ_axes x² + ε). Both are re-exported by refham.lagrangians, whose registry
`get_lagrangian` builds them by name.
"""
import abc
import dataclasses
import math
import numbers

from refham.backend import accelerated, xp
from refham.checks import finite_real
from refham.lagrangian_base import (
    Lagrangian, LagrangianError, check_axes_fit, check_same_shape, negative_axes,
    store_positive, sum_over_events)


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
    return finite_real(f"{name} gamma", gamma, LagrangianError)


@accelerated
def scaled_normalised(centred, sigma, gamma, delta):
    """g = γ(x − x̄)/σ + δ from x − x̄ and σ (keepdims): layernorm's activation in one pass."""
    return gamma * (centred / sigma) + delta


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
        store_positive(self, "eps")
        object.__setattr__(self, "axes", negative_axes(self.axes))

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
        check_axes_fit(self.axes, x, event_ndim)
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
        check_axes_fit(self.axes, x, event_ndim)
        self._delta_for(x, event_ndim)  # validate δ against the event shape, as value does
        g, rho, offset = self._activation_and_radius(x)
        return g, sum_over_events(-self.gamma * offset / rho, event_ndim)


@dataclasses.dataclass(frozen=True, eq=False)
class LayerNorm(_Normalizer):
    """L = γ·D·σ + ⟨δ, x⟩,  g = γ(x − x̄)/σ + δ,  Hv = (γ/σ)(Pv − x̂⟨x̂, Pv⟩/D), over `axes`
    (D elements, σ = √(var + ε), x̂ = (x − x̄)/σ, Pv = v − mean v). Energy −γDε/σ.
    Implements :eq:`L-layernorm`."""
    name = "layernorm"

    def _size(self, x):
        """D, the number of elements normalised together."""
        return math.prod(x.shape[a] for a in self.axes)

    def _centred(self, a):
        return a - xp.mean(a, axis=self.axes, keepdims=True)

    def _normalised(self, x):
        """x̂ = (x − x̄)/σ and σ (keepdims)."""
        check_axes_fit(self.axes, x)
        centred = self._centred(x)
        sigma = self._sigma(centred)
        return centred / sigma, sigma

    def _sigma(self, centred):
        """σ = √(mean((x − x̄)²) + ε) over the axes (keepdims)."""
        return xp.sqrt(xp.mean(centred * centred, axis=self.axes, keepdims=True) + self.eps)

    def radius(self, x):
        """ρ = Dσ = √(D·Σ(x − x̄)² + D²ε), offset c = D²ε."""
        _, sigma = self._normalised(x)
        size = self._size(x)
        return size * sigma, size * size * self.eps

    def _activation_and_radius(self, x):
        """g = γx̂ + δ, ρ = Dσ, c = D²ε."""
        check_axes_fit(self.axes, x)
        centred = self._centred(x)
        sigma = self._sigma(centred)
        size = self._size(x)
        scalar = x.dtype.type   # a CUDA kernel's T binds to x's dtype, not to a Python float
        delta = self._delta_for(x)
        delta = scalar(delta) if isinstance(delta, numbers.Real) else delta
        return (scaled_normalised(centred, sigma, scalar(self.gamma), delta),
                size * sigma, size * size * self.eps)

    def hvp(self, x, v):
        """Hv = (γ/σ)(Pv − x̂⟨x̂, Pv⟩/D)."""
        check_same_shape(x, v)
        x_hat, sigma = self._normalised(x)
        pv = self._centred(v)
        projection = xp.sum(x_hat * pv, axis=self.axes, keepdims=True) / self._size(x)
        return self.gamma / sigma * (pv - x_hat * projection)


@dataclasses.dataclass(frozen=True, eq=False)
class Spherical(_Normalizer):
    """L = γ·r + ⟨δ, x⟩,  g = γx/r + δ,  Hv = (γ/r)(v − x⟨x, v⟩/r²), r = √(Σ_axes x² + ε).
    Energy −γε/r.  Implements :eq:`L-spherical`."""
    name = "spherical"

    def radius(self, x):
        """ρ = r = √(Σx² + ε), offset c = ε."""
        check_axes_fit(self.axes, x)
        return xp.sqrt(xp.sum(x * x, axis=self.axes, keepdims=True) + self.eps), self.eps

    def _activation_and_radius(self, x):
        """g = γx/r + δ, ρ = r, c = ε."""
        r, offset = self.radius(x)
        return self.gamma * x / r + self._delta_for(x), r, offset

    def hvp(self, x, v):
        """Hv = (γ/r)(v − x⟨x, v⟩/r²)."""
        check_same_shape(x, v)
        r, _ = self.radius(x)
        x_dot_v = xp.sum(x * v, axis=self.axes, keepdims=True)
        return self.gamma / r * (v - x * x_dot_v / (r * r))
