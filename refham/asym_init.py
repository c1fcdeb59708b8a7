"""Where an AsymMixer's training starts. Its MLPs compute out = (W₁ᵀ + W₂) GELU(W₁ z) with
W₁ = fc1 (h, in) and the breaking matrix W₂ = fc2 (in, h) (:eq:`X-mlp-asym`):

    official   the paper's (:eq:`X-init`): W₁ and W₂ both xavier-uniform, like two independent
               Linear layers. W_out = W₁ᵀ + W₂ then starts √2 larger than a ParaMixer's output
               matrix, with half of its energy symmetric: cos(W_out, W₁ᵀ) ≈ 1/√2. At λ = 0
               nothing in the loss removes that half.
    zero       W₂ = 0: the network starts as a SymMixer (W_out = W₁ᵀ, cos 1).
    para       W₂ = W_out − W₁ᵀ, with (W₁, W_out) = (fc1, fc2) of the ParaMixer init of the same
               seed: the network starts as that ParaMixer, the same function (cos ≈ 0).

    params = initial_params(make_config("asymmixer"), seed=0, asym_init="para")

The three differ only in W₂; every other parameter is the model's own init of that seed.
"""
import dataclasses

from refham.backend import xp
from refham.mixer import ConfigError, Mixer

ASYM_INITS = ("official", "zero", "para")


def initial_params(config, seed, asym_init="official"):
    """Fresh parameters of `config` for `seed` (Mixer.init), with the AsymMixer's W₂ set as
    `asym_init` says (module docstring): official Mixer.init; zero W₂ ← 0; para
    W₂ ← fc2 − fc1ᵀ of Mixer(paramixer config).init(seed)."""
    if asym_init not in ASYM_INITS:
        raise ConfigError(f"unknown asym_init {asym_init!r}: choose one of "
                          f"{', '.join(ASYM_INITS)}")
    if asym_init != "official" and config.mlp_kind != "asym":
        raise ConfigError(f"asym_init {asym_init!r} sets the AsymMixer's W₂; model "
                          f"{config.model!r} has none")
    model = "paramixer" if asym_init == "para" else config.model
    params = Mixer(dataclasses.replace(config, model=model)).init(seed)
    for name in params:
        if name.startswith("blocks.") and name.endswith(".fc2.weight"):
            if asym_init == "zero":
                params[name] = xp.zeros_like(params[name])
            elif asym_init == "para":
                params[name] = params[name] - params[name.replace(".fc2.", ".fc1.")].T
    return params
