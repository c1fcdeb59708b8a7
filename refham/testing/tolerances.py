"""Tolerance profiles: how far an honest implementation in a given floating-point format may
land from refham's float64 tensors, tensor by tensor and element by element (docs: oracle,
tolerances).

The error model is Monte Carlo arithmetic (Parker, 1997) run on refham's own computation: an
implementation that rounds to a format of unit roundoff u makes, at every operation, an error
of about u times the size of what that operation handles —

    storage        every stored result r (inputs, parameters, activations): r·(1 + u·ξ)
    accumulation   every sum — a GEMM's dot products, a reduction — additionally: u·ξ·Σ|terms|

ξ ~ N(0, 1) independent per element and per operation (the probabilistic rounding-error
analysis of Higham and Mary: errors of random sign add up as √n, not n). `sensitivities` runs
the float64 reference a few times with exactly these perturbations, of a tiny size h, injected
into every NumPy operation (an ndarray subclass whose ufuncs, GEMMs, reductions and einsums
perturb their results), and measures per element σ_s and σ_a, the root mean square of |ΔT|/h,
for the storage and the accumulation parts. Because the perturbations enter where the rounding
does, σ carries the size of the terms whose difference a tensor is (a gradient that cancels
exactly — a bias whose every consumer is a layer norm — still gets the size of its terms), the
depth of the computation and n_iter (the paths multiply), and the conditioning of every layer
norm and softmax on the way. A profile turns them into

    |candidate − reference| ≤ atol + rtol·|reference|,
    atol = safety·(σ + floor·max_T σ),   σ = √((u_s·σ_s)² + (u_a·σ_a)²),   rtol = 2u_s

per element, u_s and u_a the unit roundoffs of the candidate's storage and accumulation
formats: `safety` covers the constant of the rounding model and the scatter of a few random
runs, the floor (a fraction of the tensor's largest σ) the elements a few runs underrate, and
rtol the rounding of the output itself into the candidate's format. The inputs and parameters,
which a candidate only copies (and rounds to its format), get rtol = u_s and atol 0.

The model is refham's algorithm: a candidate that computes a quantity by a formula which
cancels where refham's does not (⟨x, g⟩ − L for a layer norm's energy, which refham writes in
closed form) makes errors beyond it, and the oracle reports them.
"""
import dataclasses
import math

import numpy

from refham.errors import RefhamError


class ProfileError(RefhamError, ValueError):
    """An unknown tolerance profile, or one with impossible settings."""


@dataclasses.dataclass(frozen=True)
class Profile:
    """A candidate's number format: unit roundoffs of storage (u_s) and accumulation (u_a), the
    safety factor and the per-tensor floor of the module docstring."""
    name: str
    storage: float
    accumulation: float
    safety: float = 32.0
    floor: float = 0.25

    def __post_init__(self):
        for field in ("storage", "accumulation", "safety", "floor"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, (int, float)) \
                    or not 0 <= value < math.inf:
                raise ProfileError(f"profile {self.name!r}: {field} must be a finite number "
                                   f">= 0, got {value!r}")

    def atol(self, storage_sensitivity, accumulation_sensitivity):
        """atol per element from σ_s, σ_a (arrays of the tensor's shape)."""
        sigma = numpy.hypot(self.storage * storage_sensitivity,
                            self.accumulation * accumulation_sensitivity)
        return self.safety * (sigma + self.floor * sigma.max(initial=0.0))


PROFILES = {
    "float64": Profile("float64", storage=2.0 ** -53, accumulation=2.0 ** -53),
    "float32": Profile("float32", storage=2.0 ** -24, accumulation=2.0 ** -24),
    # bfloat16 tensors, float32 accumulators (every bfloat16 GEMM on current hardware)
    # (the model is first order; at u_s = 2⁻⁸ the second-order terms are not negligible)
    "bfloat16": Profile("bfloat16", storage=2.0 ** -8, accumulation=2.0 ** -24, safety=64.0),
}


def get_profile(profile):
    """A Profile from its name (float64, float32, bfloat16) or itself."""
    if isinstance(profile, Profile):
        return profile
    try:
        return PROFILES[profile]
    except (KeyError, TypeError):
        raise ProfileError(f"unknown tolerance profile {profile!r}: choose one of "
                           f"{', '.join(PROFILES)} or pass a refham.testing.Profile") from None


class _Rounding(numpy.ndarray):
    """A float64 array whose NumPy operations perturb their results as the module docstring's
    rounding model says (part 0: storage, part 1: accumulation), with draws from `generator`
    and size `step` (class attributes, set by `sensitivities`)."""
    part = 0
    step = 0.0
    generator = None

    @classmethod
    def _perturbed(cls, result, size):
        if isinstance(result, numpy.floating):  # a full reduction's scalar: a 0-d array
            result = numpy.asarray(result)
        if not isinstance(result, numpy.ndarray) or result.dtype.kind != "f":
            return result
        noise = cls.step * size * cls.generator.standard_normal(result.shape)
        return (result + noise).view(cls)

    @staticmethod
    def _plain(values):
        return tuple(v.view(numpy.ndarray) if isinstance(v, _Rounding) else v for v in values)

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        if "out" in kwargs:  # in place: computed, not perturbed
            kwargs["out"] = self._plain(kwargs["out"])
            return getattr(ufunc, method)(*self._plain(inputs), **kwargs)
        inputs = self._plain(inputs)
        result = getattr(ufunc, method)(*inputs, **kwargs)
        if method not in ("__call__", "reduce") or \
                (method == "reduce" and ufunc not in (numpy.add, numpy.multiply)):
            return self._perturbed(result, 0.0)  # max, min, …: exact
        if self.part == 0:
            return self._perturbed(result, numpy.abs(result))
        if ufunc is numpy.matmul:
            return self._perturbed(result, numpy.matmul(*(numpy.abs(v) for v in inputs)))
        if method == "reduce" and ufunc is numpy.add:
            return self._perturbed(result, numpy.add.reduce(numpy.abs(inputs[0]), **kwargs))
        return self._perturbed(result, 0.0)

    def __array_function__(self, func, types, args, kwargs):
        plain = [self._plain(a) if isinstance(a, (list, tuple)) else self._plain((a,))[0]
                 for a in args]
        result = func(*plain, **kwargs)
        if func is numpy.einsum and self.part == 1:
            magnitudes = [numpy.abs(a) if isinstance(a, numpy.ndarray) else a for a in plain]
            return self._perturbed(result, numpy.einsum(*magnitudes, **kwargs))
        if func in (numpy.einsum, numpy.dot, numpy.tensordot, numpy.inner):
            return self._perturbed(result, numpy.abs(result) if self.part == 0 else 0.0)
        return self._perturbed(result, 0.0)


def sensitivities(evaluate, inputs, runs=4, seed=0, step=2.0 ** -26):
    """(outputs, {output name: (σ_s, σ_a)}) of the module docstring. `evaluate(inputs)` →
    {name: float64 host array} is refham's computation on NumPy, `inputs` {name: array}
    (float inputs rounded and tracked; integer ones, such as labels, passed as they are). The
    draws come from a fixed seed, so the result is a function of the inputs alone."""
    import scipy.special

    from refham.backend import use_module
    reference = evaluate(inputs)
    generator = numpy.random.default_rng(seed)
    sums = {name: [numpy.zeros(numpy.shape(value)), numpy.zeros(numpy.shape(value))]
            for name, value in reference.items()}
    _Rounding.step, _Rounding.generator = step, generator
    # a module name of its own: the accelerated chains run their plain definitions, as ufuncs
    with use_module(numpy, scipy.special.erf, name="refham.testing rounding"):
        for part in (0, 1):
            _Rounding.part = part
            for _ in range(runs):
                tracked = {}
                for name, value in inputs.items():
                    value = numpy.asarray(value)
                    if value.dtype.kind == "f":
                        noise = step * generator.standard_normal(value.shape) if part == 0 else 0
                        value = (value * (1.0 + noise)).view(_Rounding)
                    tracked[name] = value
                for name, value in evaluate(tracked).items():
                    delta = numpy.asarray(value).view(numpy.ndarray) - reference[name]
                    sums[name][part] += (delta / step) ** 2
    return reference, {name: tuple(numpy.sqrt(s / runs) for s in pair)
                       for name, pair in sums.items()}
