"""Shared test set-up: hypothesis profiles and the autograd oracle.

HYPOTHESIS_PROFILE=ci (set by .ci/run) bounds the examples and removes deadlines so the suite
stays within a few minutes on 2 cores; `dev` (the default, what a user's `python -m pytest -q`
runs, with a random seed each time) draws a few more; `stress` draws many, with no example
database, for hunting seed-dependent failures (`--hypothesis-seed=N`, many N).
"""
import os
import sys

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=20, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", max_examples=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "stress", max_examples=150, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# REFHAM_CUPY_STANDIN=1 (with REFHAM_BACKEND=cupy: .ci/run) runs the suite on the NumPy-backed CuPy
# stand-in, installed before refham.backend reads REFHAM_BACKEND; the subprocesses and mpiexec
# ranks that tests start get it through tests/standin_site/sitecustomize.py.
if os.environ.get("REFHAM_CUPY_STANDIN") == "1":
    from tests import cupy_standin
    cupy_standin.install()
    _site = os.path.join(os.path.dirname(os.path.abspath(__file__)), "standin_site")
    os.environ["PYTHONPATH"] = os.pathsep.join(
        [_site] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p])


@pytest.fixture
def standin(monkeypatch):
    """The CuPy stand-in (tests/cupy_standin.py) as the active `cupy` backend for one test, with
    fresh counters; the previous modules and backend come back afterwards."""
    from tests import cupy_standin
    from refham import backend
    before = backend.backend_name()
    for name, module in cupy_standin.modules().items():
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.setattr(backend, "_probed", set())
    monkeypatch.setitem(cupy_standin.SETTINGS, "gpus", 1)
    cupy_standin.reset()
    backend.set_backend("cupy")
    yield cupy_standin
    backend.set_backend("numpy")
    monkeypatch.undo()
    backend.set_backend(before)
