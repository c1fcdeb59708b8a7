"""The property-based differential driver: the same hypothesis draws go to refham and to a
candidate, and every tensor is compared under a tolerance profile.

    from refham.testing import check_mixer_implementation

    def my_mixer(case):                     # case: refham.testing.strategies.MixerCase
        model = MyMixer.from_timm_state(case.config, case.params)
        return {"output/logits": ..., "output/loss": ..., "grad/<timm name>": ...,
                "block/<i>/out": ..., "block/<i>/energy": ...}   # the golden names

    def test_my_mixer_matches_refham():
        check_mixer_implementation(my_mixer, profile="float32")

A failing draw is shrunk by hypothesis to the smallest failing case; the AssertionError shows
that case, the per-tensor report and the `refham oracle write …` command that writes its golden
file (for a HAM graph, the Python that rebuilds its reference).
"""
import fnmatch

from hypothesis import HealthCheck, given, settings

from refham.testing.reference import assert_matches
from refham.testing.strategies import ham_cases, mixer_cases


def _selected(tensors, names):
    """{name: value} whose names match one of the fnmatch patterns `names` (all if None)."""
    if names is None:
        return tensors
    return {n: v for n, v in tensors.items() if any(fnmatch.fnmatchcase(n, p) for p in names)}


def check_case(case, candidate, profile="float32", names=None):
    """Compare candidate(case) with case.reference() (only the tensors matching `names`,
    fnmatch patterns such as 'output/*', or a function of the case giving them, if given);
    AssertionError naming the case if not."""
    reference = case.reference()
    names = names(case) if callable(names) else names
    if names is not None:
        reference = type(reference)(_selected(reference.tensors, names),
                                    reference.sensitivity, reference.reproduce)
    try:
        assert_matches(reference, _selected(candidate(case), names), profile)
    except AssertionError as failure:
        raise AssertionError(f"{case!r}\n{failure}") from None


def _drive(strategy, candidate, profile, names, max_examples):
    options = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                         HealthCheck.data_too_large])
    if max_examples is not None:
        options["max_examples"] = max_examples

    @settings(**options)
    @given(strategy)
    def differential(case):
        check_case(case, candidate, profile, names)

    differential()


def check_mixer_implementation(candidate, profile="float32", names=None, max_examples=None,
                               models=None):
    """Run `candidate(MixerCase) → {golden name: array}` on drawn Mixers (refham.testing.
    strategies.mixer_cases; `models` restricts the variants) against refham under `profile`;
    `names` restricts the compared tensors to fnmatch patterns (or a function of the case
    giving them); max_examples defaults to the
    active hypothesis profile's."""
    cases = mixer_cases() if models is None else mixer_cases(tuple(models))
    _drive(cases, candidate, profile, names, max_examples)


def check_ham_implementation(candidate, profile="float32", names=None, max_examples=None,
                             lagrangians=None):
    """Run `candidate(HAMCase) → {golden name: array}` on drawn HAM graphs (refham.testing.
    strategies.ham_cases; `lagrangians` restricts the layer kinds) against refham."""
    cases = ham_cases() if lagrangians is None else ham_cases(tuple(lagrangians))
    _drive(cases, candidate, profile, names, max_examples)
