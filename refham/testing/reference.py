"""Reference tensors in memory, and `assert_matches`, for other projects' test suites.

    from refham.testing import assert_matches, mixer_reference
    reference = mixer_reference(config, params, images, labels, lam=0.0)
    assert_matches(reference, my_model_outputs, profile="float32")   # AssertionError if not

A Reference holds the tensors a golden file would (the same names: input/…, param/…, output/…,
grad/…, block/…; refham.oracle.golden), computed in float64 from the given config, parameters and
inputs — no file is written — and, per output tensor, the sensitivities from which a profile
derives its tolerances (refham.testing.tolerances). `assert_matches` pairs the candidate's
tensors with them by name under the rules of `refham oracle check` (refham.oracle.check: a
missing, extra, reshaped, NaN or out-of-tolerance tensor fails; the inputs all or none) and
raises AssertionError with the per-tensor report: the worst element, its index and the
tolerance that applied there.
"""
import contextlib
import dataclasses

import numpy

from refham.backend import active_backend
from refham.oracle.check import compare_by_name
from refham.oracle.golden import (
    computing_in_float64, ham_outputs, mixer_outputs, read_meta)
from refham.testing.tolerances import get_profile, sensitivities

INPUT_PREFIXES = ("input/", "param/")


@dataclasses.dataclass(frozen=True)
class Reference:
    """Reference tensors {name: float64 host array} (inputs first), the sensitivities (σ_s, σ_a)
    of each output, and `reproduce`: how to rebuild it (a `refham oracle write` command where
    one exists)."""
    tensors: dict
    sensitivity: dict
    reproduce: str = ""

    def outputs(self):
        """The names of the tensors a candidate computes (everything but the inputs)."""
        return [name for name in self.tensors if not name.startswith(INPUT_PREFIXES)]

    def tolerance(self, name, profile="float32"):
        """(rtol, atol) of tensor `name` under `profile` (atol an array of the tensor's shape
        for the outputs); see refham.testing.tolerances."""
        profile = get_profile(profile)
        if name.startswith(INPUT_PREFIXES):
            return profile.storage, 0.0
        return 2.0 * profile.storage, profile.atol(*self.sensitivity[name])



@contextlib.contextmanager
def on_the_host():
    """A reference is NumPy float64 on the host, the definitions' own numbers as in a golden
    file, whatever backend and dtype the caller runs: its error model perturbs NumPy's own
    operations (refham.testing.tolerances), and a candidate on a GPU is compared after its
    arrays are copied to the host."""
    with active_backend("numpy", "float64"), computing_in_float64():
        yield

def as_host_array(value):
    """A NumPy array of a candidate's tensor: NumPy, CuPy, PyTorch (any device, bfloat16
    widened to float32) or JAX arrays, or Python numbers."""
    if hasattr(value, "detach"):  # torch
        value = value.detach().cpu()
        value = value.float() if str(value.dtype) == "torch.bfloat16" else value
        return value.numpy()
    if hasattr(value, "get") and not isinstance(value, dict):  # cupy
        value = value.get()
    value = numpy.asarray(value)
    return value.astype(numpy.float32) if value.dtype.name == "bfloat16" else value


def assert_matches(reference, candidate, profile="float32"):
    """Raise AssertionError with the per-tensor report unless every tensor of `candidate`
    ({name: array}) matches `reference` (a Reference) under `profile` (a name of
    refham.testing.PROFILES or a Profile); return the Report otherwise."""
    if not isinstance(reference, Reference):
        raise TypeError(f"reference must be a refham.testing.Reference (mixer_reference, "
                        f"ham_reference, golden_reference), got {type(reference).__name__}")
    profile = get_profile(profile)
    report = compare_by_name(reference.tensors,
                             {name: as_host_array(v) for name, v in candidate.items()},
                             lambda name: reference.tolerance(name, profile))
    if not report.ok:
        how = f"\nreproduce the reference: {reference.reproduce}" if reference.reproduce else ""
        raise AssertionError(f"the candidate does not match refham (profile {profile.name}):\n"
                             f"{report}{how}")
    return report


# ---------------------------------------------------------------------------------------------
# Mixer references
# ---------------------------------------------------------------------------------------------
def mixer_reference(config, params, images, labels, *, lam=0.0, label_smoothing=0.0,
                    drop_seed=None, reproduce=""):
    """The Reference of a Mixer (refham.mixer_config.MixerConfig `config`, {timm name: array}
    `params`, images (B, C_in, H, W), integer labels (B,)): input/images, input/labels,
    param/<name>, output/logits, output/loss, grad/<name>, block/<i>/out and (SymMixer)
    block/<i>/energy, as in a golden file. With drop_path > 0, `drop_seed` seeds the drop-path
    masks (numpy.random.default_rng(drop_seed), drawn as refham.mixer.Mixer.forward documents)."""
    from refham.mixer import ConfigError, Mixer
    if config.drop_path and drop_seed is None:
        raise ConfigError(f"drop_path {config.drop_path} needs drop_seed: the reference and the "
                          f"candidate must draw the same masks")
    host = {"input/images": numpy.asarray(images, dtype=numpy.float64),
            "input/labels": numpy.asarray(labels).astype(numpy.int64),
            **{f"param/{name}": numpy.asarray(as_host_array(value), dtype=numpy.float64)
               for name, value in params.items()}}

    def evaluate(inputs):
        drop_rng = None if drop_seed is None else numpy.random.default_rng(drop_seed)
        params64 = {name[len("param/"):]: value for name, value in inputs.items()
                    if name.startswith("param/")}
        return mixer_outputs(Mixer(config), params64, inputs["input/images"],
                             inputs["input/labels"], lam, label_smoothing, drop_rng)

    with on_the_host():
        outputs, sensitivity = sensitivities(evaluate, host)
    return Reference({**host, **outputs}, sensitivity, reproduce)


# ---------------------------------------------------------------------------------------------
# HAM references
# ---------------------------------------------------------------------------------------------
def ham_reference(net, states, weights, *, alpha=0.1, steps=1, reproduce=""):
    """The Reference of a refham.ham.HAM `net` at states {A: (B, *shape)} and weights
    {s: matrix}: input/state/<A>, param/<s>, and the outputs of a HAM golden file
    (activations, energies by component, ∂E/∂g, dE/dt, `steps` Euler steps of size alpha)."""
    host = {**{f"input/state/{name}": numpy.asarray(as_host_array(x), dtype=numpy.float64)
               for name, x in states.items()},
            **{f"param/{name}": numpy.asarray(as_host_array(w), dtype=numpy.float64)
               for name, w in weights.items()}}

    def evaluate(inputs):
        xs = {name: inputs[f"input/state/{name}"] for name in states}
        ws = {name: inputs[f"param/{name}"] for name in weights}
        return ham_outputs(net, xs, ws, alpha, steps)

    with on_the_host():
        outputs, sensitivity = sensitivities(evaluate, host)
    return Reference({**host, **outputs}, sensitivity, reproduce)


# ---------------------------------------------------------------------------------------------
# From a golden file's settings
# ---------------------------------------------------------------------------------------------
def golden_command(meta):
    """The `refham oracle write` command that writes the golden file of `meta` (a golden
    file's parsed meta/config)."""
    settings = dict(meta["settings"])
    which = f"--ham {settings.pop('ham')}" if meta["kind"] == "ham" else \
        f"--model {settings.pop('model')}"
    overrides = settings.pop("overrides", {})
    options = " ".join(f"--{key.replace('_', '-')} {value}" for key, value in settings.items())
    fields = " ".join(f"{key}={str(value).lower() if isinstance(value, bool) else value}"
                      for key, value in overrides.items())
    return (f"refham oracle write {which} {options}" + (f" --set {fields}" if fields else "")
            + " --out golden.npz")


def golden_reference(golden):
    """The Reference of a golden file's settings ({name: array}, e.g. from
    refham.oracle.golden.mixer_golden or read_golden): the same tensors (train/… aside: the
    AdamW steps are checked by `refham oracle check`), with sensitivities."""
    from refham.mixer import MixerConfig
    meta = read_meta(golden)
    settings, command = meta["settings"], golden_command(meta)
    params = {name[len("param/"):]: value for name, value in golden.items()
              if name.startswith("param/")}
    if meta["kind"] == "ham":
        from refham.metaformer import three_layer_ham
        net = three_layer_ham(settings["visible"], settings["hidden"])
        states = {name[len("input/state/"):]: value for name, value in golden.items()
                  if name.startswith("input/state/")}
        return ham_reference(net, states, params, alpha=settings["alpha"], reproduce=command)
    return mixer_reference(MixerConfig(**meta["model"]), params, golden["input/images"],
                           golden["input/labels"], lam=settings["lam"],
                           label_smoothing=settings["label_smoothing"], reproduce=command)
