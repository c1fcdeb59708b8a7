"""The interface of a neuron layer's Lagrangian (:ref:`sec-lagrangians`) and the shape and
parameter checks that every Lagrangian shares: the elementwise ones and softmax of
refham.lagrangians, the normalisers of refham.normalisers.

The shapes (batch and event axes, `event_ndim`) are described in refham.lagrangians.
"""
import abc
import numbers
import operator

from refham.checks import finite_real
from refham.errors import RefhamError
from refham.backend import xp


class LagrangianError(RefhamError, ValueError):
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


def check_same_shape(x, v):
    if tuple(v.shape) != tuple(x.shape):
        raise LagrangianError(
            f"hvp needs a direction v of the state's shape {tuple(x.shape)}, got {tuple(v.shape)}")


def store_positive(lagrangian, field):
    """Validate a frozen dataclass's positive parameter `field` and store it as a float."""
    value = finite_real(f"{lagrangian.name} {field}", getattr(lagrangian, field), LagrangianError)
    object.__setattr__(lagrangian, field, value)



def negative_axes(axes):
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


def check_axes_fit(axes, x, event_ndim=None):
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
        """(g(x), ⟨x, g(x)⟩ − L(x)) from one evaluation of g. Implements :eq:`L-energy`; what the HAM's
        combined energy-and-gradient pass needs of each layer."""
        g = self.activation(x)
        return g, sum_over_events(x * g, event_ndim) - self.value(x, event_ndim)
