"""The settings of a training run: `TrainConfig` (one validated field per setting, each with the
help text of its `refham train` option), the model it implies, and the command-line options made
from it.

    cfg = TrainConfig(model="symmixer", epochs=40, input_noise=0.6, out="runs/sym")
    print(cfg)                      # one aligned line per setting
    TrainConfig.from_dict(json.load(open("runs/sym/config.json"))["train"]) == cfg
"""
import argparse
import dataclasses
import math
import numbers

import numpy

from refham.backend import backend_name
from refham.errors import RefhamError
from refham.training.data import DATASETS
from refham.asym_init import ASYM_INITS
from refham.training.distributed import COMMS
from refham.training.noise import NOISE_RNGS
from refham.files.memory import mixer_bytes, require
from refham.mixer import MODELS, NORM_AFFINES, NORMS, SIZES, ConfigError, make_config
from refham.optim import OPTIMIZERS

CROP_PAD = 4                          # random-crop padding for `augment` (the CIFAR recipe)

# settings that may differ on resume: they do not change the numbers a run computes
RESUMABLE_CHANGES = ("out", "progress", "backend", "tf32", "eval_every", "checkpoint_every", "comm",
                     "max_memory")


class TrainConfigError(RefhamError, ValueError):
    """A training setting that is out of range or inconsistent with the others."""


def _setting(default, help, **extra):
    """A TrainConfig field; `help` (and `choices`) also make the CLI option. A callable
    `default` is called when a TrainConfig is made (the active backend, say)."""
    metadata = {"help": help, **extra}
    if callable(default):
        return dataclasses.field(default_factory=default, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _default(f):
    """The default of TrainConfig field `f` now."""
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Every setting of a training run (the CLI's `refham train` options, one per field)."""
    model: str = _setting("paramixer", "Mixer variant", choices=MODELS)
    size: str = _setting("digits", "model size preset (image size and channels follow the data)",
                         choices=tuple(SIZES))
    data: str = _setting("digits", "dataset", choices=DATASETS)
    data_path: str = _setting(None, "CIFAR archive or folder (cifar10 / cifar100)")
    train_fraction: float = _setting(
        None, "digits: share of the images used for training (default 0.8); others: share of "
              "the training split kept")
    data_seed: int = _setting(0, "seed of the train/test and train/validation splits (kept "
                                 "fixed across --seed)")
    val_fraction: float = _setting(
        0.1, "share of the training images held out (stratified) for validation, which chooses "
             "best.npz; 0: no validation split and no best.npz")
    epochs: int = _setting(20, "passes over the training set")
    batch_size: int = _setting(64, "images per optimiser step (under mpiexec: the global batch, "
                                   "split over the ranks, whose shares differ by at most one "
                                   "image)")
    drop_last: bool = _setting(True, "drop each epoch's last partial training batch, as timm's "
                                     "training loader does (evaluation keeps every image)")
    optimizer: str = _setting("adamw", "optimiser", choices=OPTIMIZERS)
    lr: float = _setting(2e-3, "peak learning rate")
    min_lr: float = _setting(0.0, "learning rate at the end of the cosine decay")
    warmup: float = _setting(0.05, "linear warm-up, as a fraction of all optimiser steps")
    weight_decay: float = _setting(0.05, "weight decay (AdamW: decoupled; SGD: L2)")
    decay_norms: bool = _setting(True, "decay the 2-D joint-norm weights like timm does")
    momentum: float = _setting(0.9, "SGD momentum")
    nesterov: bool = _setting(False, "SGD with Nesterov momentum")
    clip_grad: float = _setting(None, "clip gradients to this global norm (default: no clipping)")
    lam: float = _setting(0.0, "λ of the AsymMixer penalty λ Σ ‖W₂‖² (asymmixer only)")
    label_smoothing: float = _setting(0.1, "label smoothing of the training loss")
    n_iter: int = _setting(1, "applications of each block's update (same weights)")
    norm: str = _setting("joint", "layer norm over (S, C) jointly or per token over C",
                         choices=NORMS)
    norm_affine: str = _setting(
        "element", "γ of the block norms: per element (the paper's) or one scalar per norm "
                   "(every SymMixer block an exact energy-descent step)", choices=NORM_AFFINES)
    asym_init: str = _setting(
        "official", "AsymMixer init: the paper's (official), W₂ = 0 (zero: starts as a "
                    "SymMixer), or W₂ = W_out − W₁ᵀ of a ParaMixer init (para: starts as one)",
        choices=ASYM_INITS)
    dim: int = _setting(None, "override the size preset's channels C")
    depth: int = _setting(None, "override the size preset's number of blocks")
    patch: int = _setting(None, "override the size preset's patch size")
    hidden_ratio: float = _setting(None, "override the MLP hidden ratio r (default 1)")
    drop_path: float = _setting(0.0, "stochastic-depth rate, the same in every block")
    input_noise: float = _setting(0.0, "σ of Gaussian noise added to every training batch")
    augment: bool = _setting(False, f"random crop (pad {CROP_PAD}) and horizontal flip (CIFAR)")
    noise_rng: str = _setting(
        "host", "how --input-noise is drawn: on the host for the whole global batch (host), or "
                "on the device from a counter, each rank only its rows (counter: for GPUs; "
                "refham.training.noise)", choices=NOISE_RNGS)
    seed: int = _setting(0, "seed of the initialisation, batch order and augmentation")
    backend: str = _setting(backend_name, "array backend (default: the one REFHAM_BACKEND "
                                          "chooses, else numpy)", choices=("numpy", "cupy"))
    tf32: bool = _setting(False, "float32 matrix products on TF32 tensor cores (cupy backend, "
                                 "Ampere or later GPUs): faster, inputs rounded to 10-bit "
                                 "mantissas")
    threads: int = _setting(1, "BLAS threads on the CPU, 0: the BLAS default. 1 is as fast for "
                               "models this small, and OpenBLAS threads slow down 10-40x when "
                               "the cores are busy")
    comm: str = _setting("auto", "data parallelism: auto (MPI when started by mpiexec with more "
                               "than one rank, NCCL for the gradients with --backend cupy), "
                               "none, mpi or nccl", choices=COMMS)
    max_memory: float = _setting(
        None, "GiB of memory the run may use; it is refused before allocating anything when its "
              "estimate (parameters, optimiser state, activations) exceeds this or the memory "
              "available (default: the memory available)")
    dtype: str = _setting("float32", "float dtype of parameters and data",
                          choices=("float32", "float64"))
    out: str = _setting("runs/train", "output folder (config, metrics, checkpoints)")
    eval_every: int = _setting(1, "evaluate on the test split every N epochs (and at the end)")
    checkpoint_every: int = _setting(0, "also write last.npz every N steps (0: per epoch only)")
    progress: bool = _setting(True, "show progress bars")

    def __post_init__(self):
        """Validate every setting (types, choices, ranges, consistency)."""
        for f in dataclasses.fields(self):
            _check_type(f, getattr(self, f.name))
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise TrainConfigError(f"unknown {f.name} {getattr(self, f.name)!r}: choose one "
                                       f"of {', '.join(choices)}")
        positive = ["epochs", "batch_size", "lr", "eval_every", "n_iter"]
        positive += [k for k in ("dim", "depth", "patch", "hidden_ratio", "clip_grad",
                                 "train_fraction") if getattr(self, k) is not None]
        for key in positive:
            if not getattr(self, key) > 0:
                raise TrainConfigError(f"{key} must be > 0, got {getattr(self, key)!r}")
        if not self.out.strip():
            raise TrainConfigError("out is empty: name the run's folder")
        if self.max_memory is not None and not self.max_memory > 0:
            raise TrainConfigError(f"max_memory must be > 0 GiB, got {self.max_memory!r}")
        for key in ("min_lr", "weight_decay", "lam", "input_noise", "checkpoint_every",
                    "threads", "seed", "data_seed"):
            if not getattr(self, key) >= 0:
                raise TrainConfigError(f"{key} must be >= 0, got {getattr(self, key)!r}")
        for key, upper in (("warmup", 1), ("label_smoothing", 1), ("drop_path", 1),
                           ("momentum", 1)):
            if not 0 <= getattr(self, key) < upper:
                raise TrainConfigError(
                    f"{key} must lie in [0, {upper}), got {getattr(self, key)!r}")
        if self.lam and self.model != "asymmixer":
            raise TrainConfigError(f"lam = {self.lam} penalises the AsymMixer's W₂; model "
                                   f"{self.model!r} has none: use --model asymmixer or lam 0")
        if not 0 <= self.val_fraction < 1:
            raise TrainConfigError(f"val_fraction must lie in [0, 1), got {self.val_fraction!r}")
        if self.asym_init != "official" and self.model != "asymmixer":
            raise TrainConfigError(f"asym_init {self.asym_init!r} initialises the AsymMixer's "
                                   f"W₂; model {self.model!r} has none: use --model asymmixer")
        if self.tf32 and self.dtype != "float32":
            raise TrainConfigError("tf32 rounds float32 matrix products; with dtype float64 it "
                                   "has nothing to do: drop --tf32 or use --dtype float32")
        if self.min_lr > self.lr:
            raise TrainConfigError(f"min_lr {self.min_lr} exceeds the peak lr {self.lr}")

    def to_dict(self):
        """{setting: value}, JSON-able (what config.json and checkpoints store)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values):
        """A validated TrainConfig from a dict such as config.json's; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainConfigError(f"unknown training setting(s) {unknown}; valid: {sorted(known)}")
        return cls(**values)

    def __str__(self):
        """One aligned `name value` line per setting."""
        return "\n".join(f"  {key:<16} {value}" for key, value in self.to_dict().items())


def _check_type(f, value):
    """`value` fits field `f`: its type (an int is a fine float; a bool is not a number; floats
    finite), or None where the default is None."""
    if value is None and f.default is None:
        return
    if f.type is bool:
        ok = isinstance(value, bool)
    elif f.type is str:
        ok = isinstance(value, str)
    else:
        kind = numbers.Integral if f.type is int else numbers.Real
        ok = isinstance(value, kind) and not isinstance(value, bool) and math.isfinite(value)
    if not ok:
        raise TrainConfigError(f"{f.name} must be of type {f.type.__name__}"
                               f"{' (finite)' if f.type is float else ''}, got {value!r}")


def model_config(cfg, dataset):
    """The MixerConfig for `cfg` on images shaped like `dataset`'s (image size, channels and
    classes come from the data; the other fields from the size preset and the overrides)."""
    overrides = {key: getattr(cfg, key) for key in ("dim", "depth", "patch", "hidden_ratio")
                 if getattr(cfg, key) is not None}
    in_chans, image_size, width = dataset.image_shape
    if image_size != width:
        raise TrainConfigError(
            f"Mixers take square images; {dataset.name} has {image_size}×{width}")
    try:
        config = make_config(cfg.model, cfg.size, image_size=image_size, in_chans=in_chans,
                             num_classes=dataset.num_classes, n_iter=cfg.n_iter, norm=cfg.norm,
                             norm_affine=cfg.norm_affine, drop_path=cfg.drop_path, **overrides)
    except ConfigError as exc:
        raise TrainConfigError(f"size {cfg.size!r} on {dataset.name} images "
                               f"{dataset.image_shape}: {exc}") from exc
    batch = min(cfg.batch_size, len(dataset))  # a batch never holds more than the data
    need = mixer_bytes(config, batch, numpy.dtype(cfg.dtype).itemsize,
                       optimizer_slots=2 if cfg.optimizer == "adamw" else 1)
    require(need, f"training this {cfg.model} (depth {config.depth}, dim {config.dim}, hidden "
                  f"{config.token_hidden}/{config.channel_hidden}) on batches of {batch}",
            cfg.max_memory,
            advice="lower depth, dim, hidden_ratio or batch_size")
    return config


# --------------------------------------------------------------------------- command line
def add_config_options(parser, defaults=None, exclude=()):
    """Declare one `--option` per TrainConfig field (minus `exclude`), its help from the field.
    Every option defaults to None so that `given_settings` can tell which ones were typed; the
    default shown is TrainConfig's, or `defaults`' where given."""
    for f in dataclasses.fields(TrainConfig):
        if f.name in exclude:
            continue
        shown = (defaults or {}).get(f.name, _default(f))
        kwargs = dict(default=None, help=f"{f.metadata['help']} (default: {shown})")
        if f.type is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs.update(type=f.type, choices=f.metadata.get("choices"),
                          metavar=None if "choices" in f.metadata else f.name.upper())
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def given_settings(args, exclude=()):
    """{field: value} of the TrainConfig options typed on the command line (minus `exclude`)."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(TrainConfig)
            if f.name not in exclude and getattr(args, f.name, None) is not None}
