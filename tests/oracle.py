"""The test oracle: run refham's own forward code under autograd.numpy and compare.

    with autograd_numpy():
        expected = autograd.grad(lambda x: lagr.value(x).sum())(x)
    assert rel_err(lagr.activation(x), expected) <= 1e-8

Hand-written quantities run on the active backend (NumPy, or CuPy with REFHAM_BACKEND=cupy);
autograd always runs on NumPy; `rel_err` moves both to the host before comparing.
"""
import numpy as np
import pytest

# Without autograd (a GPU machine with the run-time packages only) every test module that takes it
# from here skips, with this reason; the rest of the suite runs.
autograd = pytest.importorskip("autograd", reason="autograd checks the gradients: pip install "
                                                  "refham[test]")
import autograd.numpy as anp  # noqa: E402  (after the skip)
import autograd.scipy.special as asp  # noqa: E402

from refham.backend import to_numpy, use_module

TOL = 1e-8  # relative error of every hand-written gradient against autograd (docs: reading guide)


def autograd_numpy():
    """Context in which refham's `xp` is autograd.numpy (and `erf` autograd's erf)."""
    return use_module(anp, asp.erf, name="autograd")


def rel_err(actual, expected):
    """max|actual − expected| / max(max|expected|, 1e-300), after moving both to the host."""
    a = np.asarray(to_numpy(actual), dtype=np.float64)
    e = np.asarray(to_numpy(expected), dtype=np.float64)
    assert a.shape == e.shape, f"shape {a.shape} != expected {e.shape}"
    assert np.all(np.isfinite(a)), "hand-written value is not finite"
    scale = max(float(np.max(np.abs(e), initial=0.0)), 1e-300)
    return float(np.max(np.abs(a - e), initial=0.0)) / scale
