"""Shared test set-up: hypothesis profiles and the autograd oracle.

HYPOTHESIS_PROFILE=ci (set by .ci/run) bounds the examples and removes deadlines so the suite
stays within a few minutes on 2 cores; `dev` (the default, what a user's `python -m pytest -q`
runs, with a random seed each time) draws a few more; `stress` draws many, with no example
database, for hunting seed-dependent failures (`--hypothesis-seed=N`, many N).
"""
import os

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
