"""Installs the CuPy stand-in (tests/cupy_standin.py) at start-up in every Python process whose
PYTHONPATH holds this folder: tests/conftest.py puts it there when REFHAM_CUPY_STANDIN=1, so that
the subprocesses and mpiexec ranks a test starts run on the stand-in as the test itself does."""
import os
import sys

if os.environ.get("REFHAM_CUPY_STANDIN") == "1":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from tests import cupy_standin
    cupy_standin.install()
