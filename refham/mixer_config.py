"""The settings of a Mixer of :ref:`sec-mixer`: the four models, the named sizes, the norm kinds,
and `MixerConfig`, every setting checked when it is made (`make_config` builds one from a model,
a size and overrides). refham.mixer re-exports all of them.
"""
import dataclasses
import numbers

from refham.checks import finite_real, integer_at_least
from refham.errors import RefhamError, short_list

MODELS = ("vanilla", "paramixer", "symmixer", "asymmixer")
_MLP_KIND = {"vanilla": "vanilla", "paramixer": "vanilla", "symmixer": "sym", "asymmixer": "asym"}
NORMS = ("joint", "channel")
NORM_AFFINES = ("element", "scalar")
_224 = dict(image_size=224, in_chans=3)
SIZES = {
    "s16": dict(_224, patch=16, dim=512, depth=8), "s32": dict(_224, patch=32, dim=512, depth=8),
    "b16": dict(_224, patch=16, dim=768, depth=12), "b32": dict(_224, patch=32, dim=768, depth=12),
    "l16": dict(_224, patch=16, dim=1024, depth=24),
    "l32": dict(_224, patch=32, dim=1024, depth=24),
    "tiny": dict(image_size=32, in_chans=3, patch=4, dim=128, depth=4),
    "small": dict(image_size=32, in_chans=3, patch=4, dim=256, depth=8),
    "digits": dict(image_size=8, in_chans=1, patch=2, dim=64, depth=4),
}


class ConfigError(RefhamError, ValueError):
    """A Mixer configuration that cannot be built."""


# ---------------------------------------------------------------------------------------------
# Configuration
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class MixerConfig:
    """Everything that fixes a Mixer's parameters and computation (validated on creation)."""
    model: str
    image_size: int
    in_chans: int
    patch: int
    dim: int                      # C, channels per token
    depth: int                    # number of blocks
    num_classes: int = 10
    hidden_ratio: float = 1.0     # r in N_s = int(int(0.5·C)·r), N_c = int(int(4·C)·r)
    n_iter: int = 1               # applications of each block's update, same weights
    norm: str = "joint"           # "joint": LN over (S, C); "channel": per-token LN over C
    bias: bool = False            # MLP biases (vanilla MLPs only)
    ln_eps: float = 1e-6          # ε of every layer norm, the final one included
    drop_path: float = 0.0        # stochastic-depth rate, the same in every block
    norm_affine: str = "element"  # block norms' γ: "element" (the paper's) or "scalar", one γ
                                  # per norm: the Lagrangian's, so each SymMixer block is an
                                  # exact energy-descent step (:eq:`L-layernorm`, :eq:`M2`)
    token_hidden_units: int = 0   # N_s when > 0, in place of the paper's rule below (models
    channel_hidden_units: int = 0  # whose widths follow S, e.g. mlp-mixer-pytorch); N_c alike

    def __post_init__(self):
        _validate(self)

    @property
    def num_tokens(self):
        """S = (image_size / patch)²."""
        return (self.image_size // self.patch) ** 2

    @property
    def token_hidden(self):
        """N_s = int(int(0.5·C)·r): the token width follows C, not S, as in the paper's code;
        token_hidden_units when set."""
        return self.token_hidden_units or int(int(0.5 * self.dim) * self.hidden_ratio)

    @property
    def channel_hidden(self):
        """N_c = int(int(4·C)·r); channel_hidden_units when set."""
        return self.channel_hidden_units or int(int(4 * self.dim) * self.hidden_ratio)

    @property
    def serial(self):
        """True for the vanilla Mixer's serial block, False for the parallel block."""
        return self.model == "vanilla"

    @property
    def mlp_kind(self):
        """'vanilla' (vanilla, paramixer), 'sym' (symmixer) or 'asym' (asymmixer)."""
        return _MLP_KIND[self.model]


def _validate(cfg):
    if cfg.model not in MODELS:
        raise ConfigError(f"unknown model {cfg.model!r}: choose one of {', '.join(MODELS)}")
    if cfg.norm not in NORMS:
        raise ConfigError(f"unknown norm {cfg.norm!r}: choose one of {', '.join(NORMS)}")
    if cfg.norm_affine not in NORM_AFFINES:
        raise ConfigError(f"unknown norm_affine {cfg.norm_affine!r}: choose one of "
                          f"{', '.join(NORM_AFFINES)}")
    for name in ("image_size", "in_chans", "patch", "dim", "depth", "num_classes", "n_iter"):
        integer_at_least(name, getattr(cfg, name), 1, ConfigError)
    for name in ("token_hidden_units", "channel_hidden_units"):   # 0: the hidden_ratio rule
        integer_at_least(name, getattr(cfg, name), 0, ConfigError)
    if cfg.image_size % cfg.patch:
        raise ConfigError(f"patch {cfg.patch} does not divide image_size {cfg.image_size}: "
                          "pick a patch size that tiles the image")
    finite_real("hidden_ratio", cfg.hidden_ratio, ConfigError)
    if cfg.token_hidden < 1:
        raise ConfigError(f"hidden_ratio {cfg.hidden_ratio} with dim {cfg.dim} leaves the token "
                          f"MLP no hidden units (N_s = {cfg.token_hidden}): raise either")
    if not isinstance(cfg.bias, bool):
        raise ConfigError(f"bias must be True or False, got {cfg.bias!r}")
    if cfg.bias and cfg.mlp_kind != "vanilla":
        raise ConfigError(f"bias=True is for the vanilla MLPs (models vanilla, paramixer); "
                          f"{cfg.model} has tied {cfg.mlp_kind} MLPs without biases")
    finite_real("ln_eps", cfg.ln_eps, ConfigError)
    if isinstance(cfg.drop_path, bool) or not isinstance(cfg.drop_path, numbers.Real) \
            or not 0.0 <= cfg.drop_path < 1.0:
        raise ConfigError(f"drop_path must be in [0, 1), got {cfg.drop_path!r}")


def make_config(model, size="digits", **overrides):
    """A validated MixerConfig for a model name and a size from SIZES, with field overrides."""
    if size not in SIZES:
        raise ConfigError(f"unknown size {size!r}: choose one of {', '.join(SIZES)}")
    fields = [f.name for f in dataclasses.fields(MixerConfig) if f.name != "model"]
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ConfigError(f"unknown config field(s) {short_list(unknown)}: valid are "
                          f"{', '.join(fields)}")
    return MixerConfig(model=model, **{**SIZES[size], **overrides})
