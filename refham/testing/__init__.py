"""refham as the oracle of another project's test suite, in the style of numpy.testing:

    mixer_reference, ham_reference, golden_reference   reference tensors in memory (`reference`)
    assert_matches(reference, candidate, profile)      AssertionError with a per-tensor report
    PROFILES, Profile                                  float64 / float32 / bfloat16 tolerances
                                                       from an error analysis (`tolerances`)
    mixer_cases, ham_cases                             hypothesis strategies (`strategies`)
    check_mixer_implementation, check_ham_implementation
                                                       the property-based differential driver
                                                       (`differential`)

The strategies and the driver need hypothesis (refham's `test` extra); they load on first use.
"""
from refham.testing.tolerances import PROFILES, Profile, ProfileError, get_profile
from refham.testing.reference import (
    Reference, as_host_array, assert_matches, golden_reference, ham_reference, mixer_reference)

__all__ = ["PROFILES", "Profile", "ProfileError", "get_profile", "Reference", "as_host_array",
           "assert_matches", "golden_reference", "ham_reference", "mixer_reference", "HAMCase",
           "MixerCase", "ham_cases", "mixer_cases", "check_case", "check_ham_implementation",
           "check_mixer_implementation"]

_NEEDS_HYPOTHESIS = {"HAMCase": "strategies", "MixerCase": "strategies", "ham_cases": "strategies",
                     "mixer_cases": "strategies", "check_case": "differential",
                     "check_ham_implementation": "differential",
                     "check_mixer_implementation": "differential"}


def __getattr__(name):
    """The hypothesis-based names, imported when first used (PEP 562)."""
    if name not in _NEEDS_HYPOTHESIS:
        raise AttributeError(f"module 'refham.testing' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f"refham.testing.{_NEEDS_HYPOTHESIS[name]}"), name)
