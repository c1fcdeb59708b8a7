"""Shared test set-up: hypothesis profiles and the autograd oracle.

HYPOTHESIS_PROFILE=ci (set by .ci/run) bounds the examples and removes deadlines so the suite
stays within a few minutes on 2 cores; `dev` (the default) draws a few more.
"""
import os

from hypothesis import HealthCheck, settings

settings.register_profile(
    "ci", max_examples=20, deadline=None, derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile(
    "dev", max_examples=40, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
