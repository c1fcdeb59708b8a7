"""refham.testing, the oracle API of other projects' tests: references in memory, assert_matches
with the pairing rules of `refham oracle check`, the tolerance profiles and the differential
driver. The profiles are tested the way they will be used: honest float32 implementations (refham
itself run in float32, and the independent PyTorch model examples/torch_mixer.py in float32) pass
on every drawn case; float32 implementations with one real bug each fail."""
import contextlib
import json
import pathlib
import re
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refham.backend import asarray, get_dtype, set_dtype, to_numpy
from refham.cli.commands import main
from refham.mixer import Mixer, make_config
from refham.oracle.golden import ham_golden, ham_outputs, mixer_golden, mixer_outputs, read_golden
from refham.testing import (
    PROFILES, Profile, ProfileError, assert_matches, check_case, check_ham_implementation,
    check_mixer_implementation, get_profile, golden_reference, ham_reference, mixer_cases,
    mixer_reference)
from refham.testing.strategies import HAMCase, MixerCase, ham_cases

EXAMPLES = str(pathlib.Path(__file__).resolve().parents[1] / "examples")


@contextlib.contextmanager
def refham_dtype(name):
    saved = get_dtype()
    set_dtype(name)
    try:
        yield
    finally:
        set_dtype(saved)


def refham_float32(case, drop_seed=None):
    """An honest float32 candidate: refham itself in float32, on float32-rounded inputs."""
    with refham_dtype("float32"):
        params = {k: asarray(np.float32(v)) for k, v in case.params.items()}
        drop_rng = None if drop_seed is None else np.random.default_rng(drop_seed)
        return mixer_outputs(Mixer(case.config), params, np.float32(case.images), case.labels,
                             case.lam, case.label_smoothing, drop_rng)


def ham_float32(case):
    """An honest float32 HAM candidate: refham's HAM in float32."""
    with refham_dtype("float32"):
        weights = {k: asarray(np.float32(v)) for k, v in case.weights.items()}
        states = {k: asarray(np.float32(v)) for k, v in case.states.items()}
        return ham_outputs(case.net, states, weights, case.alpha, case.steps)


# --------------------------------------------------------------------------------------------
# assert_matches: the report and the pairing rules of `refham oracle check`
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sym_case():
    return MixerCase(mixer_golden("symmixer", n_iter=2, batch=3, label_smoothing=0.1,
                                  image_size=6, patch=2, dim=6, depth=2, num_classes=5))


@pytest.fixture(scope="module")
def sym_reference(sym_case):
    return sym_case.reference()


def test_a_reference_holds_the_golden_tensors(sym_case, sym_reference):
    golden = sym_case.golden
    assert list(sym_reference.tensors) == [k for k in golden if k != "meta/config"]
    for name, value in sym_reference.tensors.items():
        np.testing.assert_array_equal(value, golden[name])
    assert set(sym_reference.outputs()) == {k for k in golden if k.startswith(
        ("output/", "grad/", "block/"))}


def test_refham_matches_its_own_reference_in_every_profile(sym_case, sym_reference):
    outputs = {k: v for k, v in sym_case.golden.items() if k != "meta/config"}
    for profile in PROFILES:
        assert assert_matches(sym_reference, outputs, profile).ok


def test_the_report_names_the_worst_element_its_index_and_its_tolerance(sym_case,
                                                                        sym_reference):
    candidate = refham_float32(sym_case)
    candidate["grad/head.weight"] = candidate["grad/head.weight"].copy()
    candidate["grad/head.weight"][3, 1] += 1e-3
    with pytest.raises(AssertionError) as failure:
        assert_matches(sym_reference, candidate, "float32")
    line, = [l for l in str(failure.value).splitlines() if l.startswith("NOT OK")]
    rtol, atol = sym_reference.tolerance("grad/head.weight", "float32")
    tolerance = atol[3, 1] + rtol * abs(sym_reference.tensors["grad/head.weight"][3, 1])
    assert "grad/head.weight" in line and "worst at (3, 1)" in line
    assert "atol per element" in line and f"> tolerance {tolerance:.3g}" in line
    assert "refham oracle write --model symmixer" in str(failure.value)


def test_pairing_by_name_is_that_of_oracle_check(sym_case, sym_reference):
    good = refham_float32(sym_case)
    broken = {k: v for k, v in good.items() if k != "block/1/out"}   # missing
    broken["grad/head.weights"] = broken.pop("grad/head.weight")    # renamed: extra + missing
    broken["output/logits"] = good["output/logits"].T                # transposed
    broken["output/loss"] = np.float32("nan")
    with pytest.raises(AssertionError) as failure:
        assert_matches(sym_reference, broken, "float32")
    report = str(failure.value)
    for expected in (r"NOT OK +block/1/out +missing from the candidate",
                     r"NOT OK +grad/head.weight +missing from the candidate",
                     r"NOT OK +grad/head.weights +not in the golden file",
                     r"NOT OK +output/logits .*\(transposed\?\)",
                     r"NOT OK +output/loss .*1 NaN/inf"):
        assert re.search(expected, report), (expected, report)
    # the inputs: all (compared, to the candidate's storage rounding) or none
    some_inputs = {**good, "input/images": np.float32(sym_case.images)}
    with pytest.raises(AssertionError, match="param/.* missing from the candidate"):
        assert_matches(sym_reference, some_inputs, "float32")
    all_inputs = {**good, **{k: (np.float32(v) if v.dtype.kind == "f" else v)
                             for k, v in sym_reference.tensors.items()
                             if k.startswith(("input/", "param/"))}}
    assert assert_matches(sym_reference, all_inputs, "float32").ok


def test_torch_tensors_are_accepted_as_candidates(sym_case, sym_reference):
    torch = pytest.importorskip("torch", reason="PyTorch CPU wheel not installed")
    outputs = {k: torch.from_numpy(np.asarray(v)) for k, v in refham_float32(sym_case).items()}
    assert assert_matches(sym_reference, outputs, "float32").ok


def test_assert_matches_refuses_what_is_not_a_reference():
    with pytest.raises(TypeError, match="refham.testing.Reference"):
        assert_matches({"output/loss": np.zeros(())}, {}, "float32")


def test_profiles_by_name_and_their_errors():
    assert get_profile("float32") is PROFILES["float32"]
    custom = Profile("tf32", storage=2.0 ** -11, accumulation=2.0 ** -24)
    assert get_profile(custom) is custom
    with pytest.raises(ProfileError, match="unknown tolerance profile 'float16'"):
        get_profile("float16")
    with pytest.raises(ProfileError, match="safety must be a finite number"):
        Profile("x", 1e-3, 1e-3, safety=-1.0)
    assert isinstance(ProfileError("x"), ValueError)


def test_tolerances_follow_the_profile_and_the_size_of_the_terms(sym_reference):
    """bfloat16 ⊃ float32 ⊃ float64; and a gradient that is exactly zero in exact arithmetic
    still gets the size of its terms (a token-MLP output bias seen only by per-token norms)."""
    name = "grad/blocks.0.mlp_tokens.fc2.weight"
    atols = [sym_reference.tolerance(name, p)[1] for p in ("float64", "float32", "bfloat16")]
    assert np.all(atols[0] < atols[1]) and np.all(atols[1] < atols[2])
    reference = golden_reference(mixer_golden("vanilla", image_size=4, patch=2, dim=3, depth=1,
                                              norm="channel", bias=True))
    dead = "grad/blocks.0.mlp_tokens.fc2.bias"
    assert np.abs(reference.tensors[dead]).max() < 1e-15                 # cancels exactly
    assert reference.tolerance(dead, "float32")[1].min() > 1e-9          # not a zero tolerance


# --------------------------------------------------------------------------------------------
# The golden-file way in agrees with the in-memory one
# --------------------------------------------------------------------------------------------
def test_the_printed_command_writes_the_golden_file_of_the_case(tmp_path, capsys):
    case = MixerCase(mixer_golden("asymmixer", lam=0.05, n_iter=2, norm="channel", batch=2,
                                  seed=7, perturb=0.1, image_size=4, patch=2, dim=3, depth=1,
                                  num_classes=3))
    out = tmp_path / "golden.npz"
    argv = case.command.split()[1:]
    argv[argv.index("--out") + 1] = str(out)
    assert main(argv) == 0
    _, written = read_golden(out)
    assert written.keys() == case.golden.keys()
    for name in written:
        if name != "meta/config":
            np.testing.assert_array_equal(written[name], case.golden[name])


def test_mixer_reference_from_arrays_equals_the_golden_route(sym_case, sym_reference):
    reference = mixer_reference(sym_case.config, sym_case.params, sym_case.images,
                                sym_case.labels, lam=sym_case.lam,
                                label_smoothing=sym_case.label_smoothing)
    for name, value in sym_reference.tensors.items():
        np.testing.assert_array_equal(reference.tensors[name], value)
        if name in sym_reference.sensitivity:
            np.testing.assert_array_equal(reference.sensitivity[name][1],
                                          sym_reference.sensitivity[name][1])


def test_a_ham_golden_file_has_a_reference_too():
    golden = ham_golden(visible=6, hidden=5, batch=2)
    reference = golden_reference(golden)
    assert reference.reproduce.startswith("refham oracle write --ham metaformer")
    outputs = {k: v for k, v in golden.items() if k.startswith("output/")}
    assert assert_matches(reference, outputs, "float64").ok


# --------------------------------------------------------------------------------------------
# Honest float32 implementations pass on every draw
# --------------------------------------------------------------------------------------------
@settings(max_examples=10)
@given(mixer_cases())
def test_refham_in_float32_passes_the_float32_profile(case):
    check_case(case, refham_float32, "float32")


@settings(max_examples=10)
@given(ham_cases())
def test_refham_ham_in_float32_passes_the_float32_profile(case):
    check_case(case, ham_float32, "float32")


def test_the_driver_runs_a_ham_candidate():
    check_ham_implementation(ham_float32, "float32", max_examples=5)


def test_a_drop_path_reference_takes_the_masks_from_its_seed():
    config = make_config("paramixer", image_size=4, patch=2, dim=3, depth=2, n_iter=2,
                         drop_path=0.3)
    case = _case_of(config, seed=3)
    reference = mixer_reference(config, case.params, case.images, case.labels, drop_seed=11)
    assert assert_matches(reference, refham_float32(case, drop_seed=11), "float32").ok
    with pytest.raises(AssertionError):   # other masks: another function
        assert_matches(reference, refham_float32(case, drop_seed=12), "float32")
    with pytest.raises(ValueError, match="drop_seed"):
        mixer_reference(config, case.params, case.images, case.labels)


def _case_of(config, seed=0, batch=3):
    """A MixerCase-like object for configs golden files refuse (drop_path > 0)."""
    generator = np.random.default_rng(seed)
    params = {k: to_numpy(v) + 0.05 * generator.standard_normal(v.shape)
              for k, v in Mixer(config).init(seed).items()}

    class Case:
        pass
    case = Case()
    case.config, case.params, case.lam, case.label_smoothing = config, params, 0.0, 0.0
    case.images = generator.standard_normal((batch, config.in_chans, config.image_size,
                                             config.image_size))
    case.labels = generator.integers(0, config.num_classes, batch)
    return case


# --------------------------------------------------------------------------------------------
# The independent PyTorch model in float32: honest passes, each one-bug variant fails
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def torch_peer():
    torch = pytest.importorskip("torch", reason="PyTorch CPU wheel not installed")
    if EXAMPLES not in sys.path:
        sys.path.insert(0, EXAMPLES)
    import torch_mixer
    return torch, torch_mixer


def torch_candidate(torch_peer, case, dtype="float32", bug=None, drop_seed=None):
    """examples/torch_mixer.py on a case, in `dtype`, with one of the bugs: 'transposed' (block
    0's token fc1 weight loaded transposed; it is square in the cases below), 'drop_path' (the
    kept branches not divided by 1 − p), 'gelu_sign' (GELU' = Φ − zφ instead of Φ + zφ)."""
    torch, peer = torch_peer
    dtype = getattr(torch, dtype)
    params = dict(case.params)
    if bug == "transposed":
        params["blocks.0.mlp_tokens.fc1.weight"] = params["blocks.0.mlp_tokens.fc1.weight"].T
    model = peer.from_refham(case.config, params, dtype=dtype)
    patches = []
    if drop_seed is not None:
        model.train()
        keep = 1.0 - case.config.drop_path
        draws = np.random.default_rng(drop_seed)

        def drop_path(update, rate, training):  # refham's masks, in refham's order
            mask = torch.from_numpy(draws.random(update.shape[0]) < keep).to(dtype)
            mask = mask if bug == "drop_path" else mask / keep
            return update * mask.reshape(-1, 1, 1)
        patches.append(("drop_path", drop_path))
    if bug == "gelu_sign":
        class WrongGelu(torch.autograd.Function):
            @staticmethod
            def forward(ctx, z):
                ctx.save_for_backward(z)
                return torch.nn.functional.gelu(z)

            @staticmethod
            def backward(ctx, grad):
                z, = ctx.saved_tensors
                cdf = 0.5 * (1 + torch.special.erf(z / 2 ** 0.5))
                pdf = torch.exp(-0.5 * z * z) / (2 * np.pi) ** 0.5
                return grad * (cdf - z * pdf)
        patches.append(("F", _FunctionalWith(torch.nn.functional, gelu=WrongGelu.apply)))
    saved = {name: getattr(peer, name) for name, _ in patches}
    try:
        for name, value in patches:
            setattr(peer, name, value)
        images = torch.from_numpy(np.asarray(case.images)).to(dtype)
        labels = torch.from_numpy(np.asarray(case.labels))
        logits = model(images)
        loss = peer.objective(model, logits, labels, case.lam, case.label_smoothing)
        loss.backward()
    finally:
        for name, value in saved.items():
            setattr(peer, name, value)
    return {"output/logits": logits, "output/loss": loss,
            **{f"grad/{name}": p.grad for name, p in model.named_parameters()}}


class _FunctionalWith:
    """torch.nn.functional with some functions replaced."""

    def __init__(self, functional, **replaced):
        self._functional, self._replaced = functional, replaced

    def __getattr__(self, name):
        return self._replaced.get(name) or getattr(self._functional, name)


FORWARD_AND_GRADIENTS = ["output/*", "grad/*"]


def _selected(reference, names):
    from refham.testing.differential import _selected as select
    return type(reference)(select(reference.tensors, names), reference.sensitivity,
                           reference.reproduce)


@settings(max_examples=10)
@given(mixer_cases())
def test_the_torch_model_in_float32_passes_the_float32_profile(torch_peer, case):
    check_case(case, lambda c: torch_candidate(torch_peer, c), "float32",
               FORWARD_AND_GRADIENTS)


@settings(max_examples=5)
@given(mixer_cases())
def test_the_torch_model_in_float64_passes_the_float64_profile(torch_peer, case):
    check_case(case, lambda c: torch_candidate(torch_peer, c, "float64"), "float64",
               FORWARD_AND_GRADIENTS)


@settings(max_examples=5)
@given(mixer_cases())
def test_the_torch_model_in_bfloat16_passes_the_bfloat16_profile(torch_peer, case):
    check_case(case, lambda c: torch_candidate(torch_peer, c, "bfloat16"), "bfloat16",
               FORWARD_AND_GRADIENTS)


# S = 4 tokens, C = 3 channels, token hidden N_s = 4: block 0's token fc1 (N_s, S) is square
BUG_CONFIG = dict(image_size=4, patch=2, dim=3, depth=2, num_classes=4, token_hidden_units=4)


@pytest.mark.parametrize("model, bug", [
    (model, bug) for model in ("vanilla", "paramixer", "symmixer", "asymmixer")
    for bug in ("transposed", "gelu_sign")
    if not (model, bug) == ("symmixer", "transposed")])   # the SymMixer has no fc1
def test_a_float32_torch_model_with_one_bug_fails(torch_peer, model, bug):
    case = MixerCase(mixer_golden(model, n_iter=2, batch=3, perturb=0.1, **BUG_CONFIG))
    reference = _selected(case.reference(), FORWARD_AND_GRADIENTS)
    assert assert_matches(reference, torch_candidate(torch_peer, case), "float32").ok
    with pytest.raises(AssertionError, match="NOT OK"):
        assert_matches(reference, torch_candidate(torch_peer, case, bug=bug), "float32")


@pytest.mark.parametrize("model", ["vanilla", "paramixer", "symmixer", "asymmixer"])
def test_a_float32_drop_path_without_its_rescaling_fails(torch_peer, model):
    config = make_config(model, n_iter=2, drop_path=0.25, **BUG_CONFIG)
    case = _case_of(config, seed=1)
    reference = _selected(mixer_reference(config, case.params, case.images, case.labels,
                                          drop_seed=5), FORWARD_AND_GRADIENTS)
    honest = torch_candidate(torch_peer, case, drop_seed=5)
    assert assert_matches(reference, honest, "float32").ok
    with pytest.raises(AssertionError, match="NOT OK"):
        assert_matches(reference, torch_candidate(torch_peer, case, bug="drop_path",
                                                  drop_seed=5), "float32")


def test_the_driver_shrinks_a_failure_and_prints_its_golden_command():
    def buggy(case):
        outputs = refham_float32(case)
        name = "grad/head.bias"
        outputs[name] = -outputs[name]         # a wrong sign in one gradient
        return outputs

    with pytest.raises(AssertionError) as failure:
        check_mixer_implementation(buggy, "float32", max_examples=5, models=["paramixer"])
    message = str(failure.value)
    assert "MixerCase(refham oracle write --model" in message
    assert "NOT OK  grad/head.bias" in message
    command = message[message.index("refham oracle write"):].splitlines()[0]
    assert "--out golden.npz" in command


def test_a_ham_candidate_with_a_wrong_sign_fails():
    case = HAMCase(json.loads(json.dumps({
        "layers": {"v": [[4], "layernorm", {}, 1.0], "h": [[3], "relu", {}, 1.0]},
        "synapses": {"W": ["v", "h"]}, "batch": 2, "seed": 0, "state_scale": 1.0,
        "weight_scale": 0.5, "alpha": 0.1, "steps": 2})))

    def buggy(case):
        outputs = ham_float32(case)
        outputs["output/dEdg/h"] = 2 * case.states["h"] - outputs["output/dEdg/h"]
        return outputs
    check_case(case, ham_float32, "float32")
    with pytest.raises(AssertionError, match="NOT OK +output/dEdg/h"):
        check_case(case, buggy, "float32")


# --------------------------------------------------------------------------------------------
# The rounding model itself
# --------------------------------------------------------------------------------------------
def test_the_rounding_model_sizes_a_sum_by_its_terms_not_its_result():
    """Σ (1e8, 1, −1e8) = 1: storage rounds each term (σ_s ~ 1e8) and the accumulation is off by
    the summands' size (σ_a ~ 2e8), though the result is 1; a GEMM likewise by |A|·|B|."""
    from refham.testing.tolerances import sensitivities
    terms = np.array([1e8, 1.0, -1e8])
    _, sigma = sensitivities(lambda x: {"sum": np.asarray(x["t"].sum())}, {"t": terms})
    storage, accumulation = (float(s) for s in sigma["sum"])
    assert 1e7 < storage < 1e9 and 5e7 < accumulation < 1e9
    a = np.array([[3.0, -3.0], [1.0, 1.0]])
    b = np.array([[1.0], [1.0]])
    _, sigma = sensitivities(lambda x: {"ab": np.asarray(x["a"] @ x["b"])}, {"a": a, "b": b})
    accumulation = sigma["ab"][1].ravel()
    assert 0.5 < accumulation[0] / 6.0 < 3 and 0.5 < accumulation[1] / 2.0 < 3
    _, sigma = sensitivities(lambda x: {"ab": np.asarray(x["a"].max())}, {"a": a})
    assert float(sigma["ab"][1]) == 0.0          # no sum, no accumulation error
