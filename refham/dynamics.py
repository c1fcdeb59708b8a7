"""Fixed-step integration of dx/dt = f(x), shared by the HAM (H3, H5) and the Mixer block (M3).

A state x is an array with a leading batch axis, or a dict of such arrays (a HAM's layers).

    trajectory = integrate(f, x0, dt=0.01, n_steps=100, method="rk4", energy=E)
    trajectory.energies        # (n_steps + 1, B): E along the way
"""
import dataclasses

from refham.checks import finite_real, integer_at_least
from refham.errors import RefhamError
from refham.backend import xp


class DynamicsError(RefhamError, ValueError):
    """An integration was asked for with bad settings, or its energy stopped being finite."""


@dataclasses.dataclass
class Trajectory:
    """States x⁰ … xⁿ (n = steps), energies (n+1, B) (None without an energy function), and
    whether a tolerance stopped the run early."""
    states: list
    energies: object
    steps: int
    converged: bool

    @property
    def final(self):
        """The last state xⁿ."""
        return self.states[-1]


def is_tree(x):
    """Is x a dict of arrays? (duck-typed: autograd passes dicts as DictBox, not dict)"""
    return hasattr(x, "keys") and hasattr(x, "__getitem__")


def _combine(x, terms):
    """x + Σ c·v over (c, v) in `terms`; x and each v are arrays or dicts of arrays alike."""
    if is_tree(x):
        return {k: _combine(x[k], [(c, v[k]) for c, v in terms]) for k in x}
    return x + sum(c * v for c, v in terms)


def euler_step(f, x, dt, fx=None):
    """x + dt·f(x); `fx`: f(x), when already computed."""
    return _combine(x, [(dt, f(x) if fx is None else fx)])


def rk4_step(f, x, dt, fx=None):
    """Classical Runge–Kutta: x + dt/6·(k₁ + 2k₂ + 2k₃ + k₄); `fx`: k₁ = f(x), when already
    computed."""
    k1 = f(x) if fx is None else fx
    k2 = f(_combine(x, [(dt / 2, k1)]))
    k3 = f(_combine(x, [(dt / 2, k2)]))
    k4 = f(_combine(x, [(dt, k3)]))
    return _combine(x, [(dt / 6, k1), (dt / 3, k2), (dt / 3, k3), (dt / 6, k4)])


STEPPERS = {"euler": euler_step, "rk4": rk4_step}


def _largest_change(x_old, x_new):
    """max over layers and samples of ‖x_new − x_old‖ (the L2 norm of each sample's state)."""
    if is_tree(x_old):
        return max(_largest_change(x_old[k], x_new[k]) for k in x_old)
    diff = xp.reshape(x_new - x_old, (x_old.shape[0], -1))
    return float(xp.max(xp.sqrt(xp.sum(diff * diff, axis=1))))


def _check_finite(energy, step):
    if not bool(xp.all(xp.isfinite(energy))):
        raise DynamicsError(f"the dynamics diverged: the energy is not finite after step {step}; "
                            f"use a smaller step (alpha or dt)")


def iterate(advance, x0, n_steps, energy, tol=None):
    """Apply `advance` up to n_steps times, recording states and energies; stop early when the
    largest state change falls below `tol`. `advance(x)` returns (next state, E(x)), E(x) None
    when no energy is recorded: a step that computes E(x) on its way (a HAM's combined pass)
    shares that work; `energy` (state -> (B,), or None) then gives only the last state's E.
    Raises DynamicsError when the energy stops being finite (a step too large for the
    weights), instead of recording NaN."""
    states, energies, converged = [x0], [], False
    for step in range(1, n_steps + 1):
        new, e = advance(states[-1])
        if e is not None:
            _check_finite(e, step - 1)
            energies.append(e)
        states.append(new)
        if tol is not None and _largest_change(states[-2], states[-1]) < tol:
            converged = True
            break
    if energy is not None:
        energies.append(energy(states[-1]))
        _check_finite(energies[-1], len(states) - 1)
    return Trajectory(states, xp.stack(energies) if energies else None, len(states) - 1,
                      converged)


def integrate(f, x0, dt, n_steps, method="rk4", energy=None, f_and_energy=None):
    """n_steps fixed steps of dx/dt = f(x) by `method` ("euler" | "rk4"); `energy`
    (state -> (B,)) is recorded along the way when given. `f_and_energy(x)` → (f(x), E(x)),
    when given, computes both in one pass at the start of each step."""
    if method not in STEPPERS:
        raise DynamicsError(f"unknown integration method {method!r}: choose one of "
                            f"{', '.join(STEPPERS)}")
    dt = finite_real("dt", dt, DynamicsError)
    n_steps = integer_at_least("n_steps", n_steps, 0, DynamicsError)
    stepper = STEPPERS[method]
    if f_and_energy is None:
        def f_and_energy(x):
            return f(x), None if energy is None else energy(x)

    def advance(x):
        fx, e = f_and_energy(x)
        return stepper(f, x, dt, fx), e
    return iterate(advance, x0, n_steps, energy)
