"""Hypothesis strategies of Mixers and HAMs for differential testing (refham.testing.differential).

    mixer_cases()   MixerCase: one of the four variants (vanilla, paramixer, symmixer, asymmixer),
                    n_iter, joint or per-token norm, S ≠ C, batch, λ (AsymMixer), label
                    smoothing, biases (vanilla MLPs), each drawn the way `refham oracle write`
                    draws a golden file, so that the case's `command` writes its golden file
    ham_cases()     HAMCase: 2–4 layers of any Lagrangian of refham.lagrangians (with drawn β, n,
                    γ, δ, ε), dense synapses along a chain plus drawn extra edges (stars, cycles,
                    any connected graph), states, weights, a step size and 1–3 Euler steps

Every case is small (a few dozen parameters per axis) so that hundreds run in seconds, and
carries a `reference()` (refham.testing.reference) and its reproduction.
"""
import dataclasses
import json

import numpy
from hypothesis import strategies as st

from refham.backend import asarray
from refham.oracle.golden import mixer_golden, read_meta
from refham.testing.reference import (
    golden_command, golden_reference, ham_reference, on_the_host)

MODELS = ("vanilla", "paramixer", "symmixer", "asymmixer")


@dataclasses.dataclass(frozen=True, repr=False)
class MixerCase:
    """A drawn Mixer: config (MixerConfig), params {timm name: float64 array}, images
    (B, C_in, H, W), labels (B,), lam, label_smoothing; `golden` its golden tensors."""
    golden: dict

    @property
    def meta(self):
        return read_meta(self.golden)

    @property
    def config(self):
        from refham.mixer import MixerConfig
        return MixerConfig(**self.meta["model"])

    @property
    def params(self):
        return {name[len("param/"):]: value for name, value in self.golden.items()
                if name.startswith("param/")}

    @property
    def images(self):
        return self.golden["input/images"]

    @property
    def labels(self):
        return self.golden["input/labels"]

    @property
    def lam(self):
        return self.meta["settings"]["lam"]

    @property
    def label_smoothing(self):
        return self.meta["settings"]["label_smoothing"]

    @property
    def command(self):
        """The `refham oracle write` command of this case's golden file."""
        return golden_command(self.meta)

    def reference(self):
        return golden_reference(self.golden)

    def __repr__(self):
        return f"MixerCase({self.command})"


@st.composite
def mixer_settings(draw, models=MODELS):
    """Keyword arguments of refham.oracle.golden.mixer_golden: a small Mixer with S ≠ C."""
    model = draw(st.sampled_from(models))
    patch = draw(st.integers(1, 2))
    grid = draw(st.integers(1, 3))                     # S = grid² tokens
    dim = draw(st.integers(2, 8).filter(lambda c: c != grid * grid))
    overrides = dict(image_size=grid * patch, patch=patch, dim=dim,
                     in_chans=draw(st.integers(1, 2)), depth=draw(st.integers(1, 2)),
                     num_classes=draw(st.integers(2, 5)))
    if model in ("vanilla", "paramixer") and draw(st.booleans()):
        overrides["bias"] = True
    return dict(model=model, n_iter=draw(st.integers(1, 3)),
                norm=draw(st.sampled_from(("joint", "channel"))),
                lam=draw(st.sampled_from((0.0, 0.05, 0.5))) if model == "asymmixer" else 0.0,
                label_smoothing=draw(st.sampled_from((0.0, 0.1))),
                batch=draw(st.integers(1, 3)), seed=draw(st.integers(0, 2 ** 16)),
                perturb=draw(st.sampled_from((0.02, 0.1, 0.3))), **overrides)


def mixer_cases(models=MODELS):
    """MixerCase draws (see the module docstring); `models` restricts the variants."""
    return mixer_settings(models).map(lambda settings: MixerCase(mixer_golden(**settings)))


# ---------------------------------------------------------------------------------------------
# HAM graphs
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True, repr=False)
class HAMCase:
    """A drawn HAM: `spec` (JSON-able: layers {name: [shape, lagrangian name, params, τ]},
    synapses {name: [layer, layer]}, seeds, scales, alpha, steps), and from it `net`
    (refham.ham.HAM), `states`, `weights` (float64)."""
    spec: dict

    @property
    def net(self):
        return build_ham(self.spec)

    @property
    def states(self):
        with on_the_host():
            return {name: numpy.asarray(x) for name, x in self.net.init_states(
                self.spec["batch"], seed=self.spec["seed"] + 1,
                scale=self.spec["state_scale"]).items()}

    @property
    def weights(self):
        with on_the_host():
            return {name: numpy.asarray(w) for name, w in self.net.init_weights(
                self.spec["seed"], scale=self.spec["weight_scale"]).items()}

    @property
    def alpha(self):
        return self.spec["alpha"]

    @property
    def steps(self):
        return self.spec["steps"]

    @property
    def command(self):
        """Python that rebuilds this case's reference (no golden-file command writes an
        arbitrary HAM graph)."""
        return (f"refham.testing.strategies.HAMCase(json.loads({json.dumps(json.dumps(self.spec))}"
                f")).reference()")

    def reference(self):
        with on_the_host():
            weights = {name: asarray(w) for name, w in self.weights.items()}
            states = {name: asarray(x) for name, x in self.states.items()}
        return ham_reference(self.net, states, weights, alpha=self.alpha, steps=self.steps,
                             reproduce=self.command)

    def __repr__(self):
        return f"HAMCase({json.dumps(self.spec)})"


def build_ham(spec):
    """refham.ham.HAM of a HAMCase spec."""
    from refham.ham import HAM, Dense, Layer
    from refham.lagrangians import get_lagrangian
    layers = {name: Layer(tuple(shape), get_lagrangian(kind, **params), tau)
              for name, (shape, kind, params, tau) in spec["layers"].items()}
    return HAM(layers, {name: Dense(a, b) for name, (a, b) in spec["synapses"].items()})


_LAGRANGIAN_PARAMS = {
    "identity": st.just({}), "relu": st.just({}), "gelu": st.just({}),
    "repu": st.fixed_dictionaries({"n": st.integers(2, 4)}),
    "tanh": st.fixed_dictionaries({"beta": st.sampled_from((0.5, 1.0, 2.0))}),
    "sigmoid": st.fixed_dictionaries({"beta": st.sampled_from((0.5, 1.0, 2.0))}),
    "softmax": st.fixed_dictionaries({"beta": st.sampled_from((0.5, 1.0, 2.0))}),
    "layernorm": st.fixed_dictionaries({"gamma": st.sampled_from((0.5, 1.0, 2.0)),
                                        "delta": st.sampled_from((0.0, 0.3)),
                                        "eps": st.sampled_from((1e-5, 1e-2))}),
    "spherical": st.fixed_dictionaries({"gamma": st.sampled_from((0.5, 1.0, 2.0)),
                                        "eps": st.sampled_from((1e-5, 1e-2))}),
}


@st.composite
def ham_specs(draw, lagrangians=tuple(_LAGRANGIAN_PARAMS)):
    """A HAMCase spec: 2–4 layers, a chain of dense synapses and drawn extra edges."""
    n_layers = draw(st.integers(2, 4))
    names = [f"l{i}" for i in range(n_layers)]
    layers = {}
    for name in names:
        kind = draw(st.sampled_from(lagrangians))
        size = draw(st.integers(2 if kind in ("layernorm", "softmax") else 1, 6))
        layers[name] = [[size], kind, draw(_LAGRANGIAN_PARAMS[kind]),
                        draw(st.sampled_from((1.0, 0.5, 2.0)))]
    edges = [(names[i], names[i + 1]) for i in range(n_layers - 1)]
    pairs = [(a, b) for i, a in enumerate(names) for b in names[i + 2:]]
    if pairs:
        edges += draw(st.lists(st.sampled_from(pairs), unique=True, max_size=len(pairs)))
    return {"layers": layers,
            "synapses": {f"W_{a}_{b}": [a, b] for a, b in edges},
            "batch": draw(st.integers(1, 3)), "seed": draw(st.integers(0, 2 ** 16)),
            "state_scale": draw(st.sampled_from((0.3, 1.0, 3.0))),
            "weight_scale": draw(st.sampled_from((0.1, 0.5))),
            "alpha": draw(st.sampled_from((0.01, 0.1))), "steps": draw(st.integers(1, 3))}


def ham_cases(lagrangians=tuple(_LAGRANGIAN_PARAMS)):
    """HAMCase draws (see the module docstring); `lagrangians` restricts the layer kinds."""
    return ham_specs(lagrangians).map(HAMCase)
