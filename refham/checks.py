"""The argument checks every part of refham shares — "an integer ≥ n", "a finite real number > 0
(or ≥ 0)" — written once; each raises the error class its caller names, so that a mistake is
reported in the caller's own terms (a HAMError from a HAM, a ConfigError from a Mixer config).

Checked public functions, unchecked cores. A public function or method of refham checks its
arguments (shapes, dtypes, finiteness, the numbers below) before it computes, and a mistake
becomes one error that says what is wrong. Its computation lives in a core of the same name with a
leading underscore (`HAM.step` checks, then runs `HAM._step`), which checks nothing: inner loops
(the steps of a trajectory, the unrolled steps of a training loss) call the core after checking
once, because a check repeated per step costs a device→host transfer each time on a GPU. Read the
core for the equation, the public function for what it accepts.

This module, like refham.errors, belongs to the foundation: it imports nothing of refham.
"""
import math
import numbers


def integer_at_least(name, value, minimum, error):
    """`value` as an int after checking it is an integer (not a bool) ≥ `minimum`; else
    `error` (the caller's class) naming the argument `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise error(f"{name} must be an integer ≥ {minimum}, got {value!r}")
    return int(value)


def finite_real(name, value, error, allow_zero=False):
    """`value` as a float after checking it is a finite real number (not a bool) > 0, or ≥ 0
    with `allow_zero`; else `error` (the caller's class) naming the argument `name`."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) \
            or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        raise error(f"{name} must be a finite real number {'≥' if allow_zero else '>'} 0, "
                    f"got {value!r}")
    return float(value)
