"""Mixer weights in and out of refham, with timm's names and PyTorch's layouts
(:ref:`sec-parameters`).

refham stores every parameter in PyTorch's layout (Linear weights (out, in), the stem a Conv2d
kernel (C, C_in, p, p)) under the paper's timm names, so exported weights load into the paper's
models (or examples/torch_mixer.py) with `load_state_dict(..., strict=True)` as they are:

    export_weights("runs/para/best.npz", "para.safetensors", "safetensors")
    import_weights("para.safetensors", "para_params.npz")            # → a refham params file

Files:
    exported .npz           {timm name: array} and nothing else (a state dict)
    exported .safetensors   the same tensors; the header metadata holds `format` and the
                            MixerConfig as JSON (`model`), so import needs no model options
    params .npz (import)    meta/config (0-d str, JSON: format "refham-params", version, model)
                            and param/<timm name> — the same layout as a golden file's params
A refham training checkpoint, a params .npz and a Mixer golden file are all valid export sources.
The energy-exact model (norm_affine="scalar": one γ per block norm) exports its γ broadcast to the
paper's per-element shape — the same function, loadable into the paper's models — and imports a
per-element γ only where it is constant.
safetensors is the optional `safetensors` extra.
"""
import dataclasses
import json
import os

import numpy

from refham.files.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from refham.files.memory import mixer_bytes, require
from refham.mixer import MixerConfig, from_timm_state, make_config, param_shapes, to_timm_state
from refham.oracle.golden import META_KEY, GoldenError, load_npz
from refham.files.outputs import atomic_write, check_output_file
from refham.errors import RefhamError, short_list
from refham.files.safefiles import check_safetensors_header

FORMATS = ("safetensors", "npz")
IMPORT_AS = ("params", "checkpoint")
PARAMS_FORMAT = "refham-params"
WEIGHTS_FORMAT = "refham-weights"
VERSION = 1


class InteropError(RefhamError, ValueError):
    """A weights file that cannot be exported or imported as asked."""


def _safetensors():
    """The `safetensors` package (its numpy API loaded), or a clear error without it."""
    try:
        import safetensors
        import safetensors.numpy
    except ImportError:
        raise InteropError("safetensors files need the optional `safetensors` package: "
                           "pip install 'refham[safetensors]' (or use the npz format)") from None
    return safetensors


def _mixer_config(fields, path):
    try:
        return MixerConfig(**fields)
    except (TypeError, ValueError) as exc:
        raise InteropError(f"{path}: its model config is not a valid MixerConfig ({exc})") from exc


def config_overrides(pairs):
    """['dim=6', 'bias=true', …] → {field: value} typed as MixerConfig's fields."""
    types = {f.name: f.type for f in dataclasses.fields(MixerConfig) if f.name != "model"}
    overrides = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or key not in types:
            raise InteropError(f"--set {pair!r} must read FIELD=VALUE with FIELD one of "
                               f"{', '.join(types)}")
        kind = types[key]
        if kind is bool:
            if text.lower() not in ("true", "false", "1", "0"):
                raise InteropError(f"--set {pair!r}: {key} takes true or false")
            overrides[key] = text.lower() in ("true", "1")
            continue
        try:
            overrides[key] = kind(text)
        except ValueError:
            raise InteropError(f"--set {pair!r}: {key} takes {kind.__name__} values") from None
    return overrides


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------
def read_refham_weights(path):
    """(MixerConfig, {timm name: host array}) from a refham training checkpoint, a params .npz
    or a Mixer golden file."""
    try:
        tensors = load_npz(path)
    except GoldenError as exc:
        raise InteropError(str(exc)) from exc
    if "meta/json" in tensors:  # a training checkpoint: load it again, verified
        try:
            ck = load_checkpoint(path)
        except CheckpointError as exc:
            raise InteropError(str(exc)) from exc
        return _mixer_config(ck.config.get("model", {}), path), ck.params
    try:
        meta = json.loads(str(tensors[META_KEY])) if META_KEY in tensors else {}
    except json.JSONDecodeError as exc:
        raise InteropError(f"{path}: {META_KEY} is not valid JSON ({exc})") from exc
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise InteropError(f"{path} is not a refham checkpoint, params file or Mixer golden "
                           f"file (no Mixer config inside)")
    params = {name[len("param/"):]: value for name, value in tensors.items()
              if name.startswith("param/")}
    return _mixer_config(meta["model"], path), params


def export_weights(source, out, fmt="safetensors", force=False):
    """Write the Mixer weights of `source` (see read_refham_weights) to `out` as a timm state
    dict in `fmt` ('safetensors' | 'npz'), atomically; an existing `out` only with `force`,
    never over a training checkpoint. Non-finite weights are refused. Returns the MixerConfig."""
    if fmt not in FORMATS:
        raise InteropError(f"unknown format {fmt!r}: choose one of {', '.join(FORMATS)}")
    check_output_file(out, force)
    config, params = read_refham_weights(source)
    state = _per_element_norms(config, to_timm_state(config, params))
    bad = [name for name, value in state.items() if not numpy.all(numpy.isfinite(value))]
    if bad:
        raise InteropError(f"{source} holds NaN or inf in {short_list(bad)}: a diverged model; "
                           f"export a checkpoint from before the divergence")
    if fmt == "npz":
        atomic_write(out, lambda f: numpy.savez(f, **state))
    else:
        metadata = {"format": WEIGHTS_FORMAT, "version": str(VERSION),
                    "model": json.dumps(dataclasses.asdict(config))}
        data = _safetensors().numpy.save({k: numpy.ascontiguousarray(v) for k, v in state.items()},
                                   metadata=metadata)
        atomic_write(out, lambda f: f.write(data))
    return config


# ---------------------------------------------------------------------------------------------
# Import
# ---------------------------------------------------------------------------------------------
def read_state(path):
    """({timm name: array}, MixerConfig or None) of a state-dict file: .npz (by its zip
    signature) or safetensors (the MixerConfig when refham's metadata carries one)."""
    if not os.path.isfile(path):
        raise InteropError(f"no file at {path}")
    with open(path, "rb") as f:
        signature = f.read(4)
    if signature == b"PK\x03\x04":
        try:
            return load_npz(path), None
        except GoldenError as exc:
            raise InteropError(str(exc)) from exc
    safetensors = _safetensors()
    check_safetensors_header(path, InteropError)
    try:
        with safetensors.safe_open(path, framework="numpy") as handle:
            metadata = handle.metadata() or {}
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:  # safetensors raises its own SafetensorError for any bad header
        raise InteropError(f"{path} is neither an .npz nor a readable safetensors file: "
                           f"{type(exc).__name__}: {exc}") from exc
    if metadata.get("format") != WEIGHTS_FORMAT:
        return state, None
    try:
        fields = json.loads(metadata["model"])
    except (KeyError, json.JSONDecodeError) as exc:
        raise InteropError(f"{path}: refham metadata without a readable model config") from exc
    return state, _mixer_config(fields, path)


def import_weights(source, out, config=None, as_="params", force=False):
    """Read a timm state dict (.npz or .safetensors) and write it as a refham params .npz or a
    training checkpoint (`as_`), atomically. `config`: a MixerConfig, or (model, size,
    overrides) for make_config; needed unless the file carries refham's metadata. Names,
    shapes and finiteness are checked (mixer.ParamError), complex tensors refused (their
    imaginary part would be lost). `out` is replaced only with `force`, and a training
    checkpoint only by a checkpoint. Returns the MixerConfig."""
    if as_ not in IMPORT_AS:
        raise InteropError(f"unknown output kind {as_!r}: choose one of {', '.join(IMPORT_AS)}")
    check_output_file(out, force, checkpoint=as_ == "checkpoint")
    state, file_config = read_state(source)
    unreal = [name for name, value in state.items() if numpy.asarray(value).dtype.kind
              not in "biuf"]
    if unreal:
        raise InteropError(f"{source}: {short_list(unreal)} are not real numbers (complex or "
                           f"other dtypes); a Mixer's weights are real: convert them first")
    if isinstance(config, tuple):
        model, size, overrides = config
        config = make_config(model, size, **overrides)
    config = config or file_config
    if config is None:
        raise InteropError(f"{source} does not say which model it holds: give the model and "
                           f"size (refham import … --model NAME --size SIZE [--set FIELD=VALUE])")
    require(mixer_bytes(config, 0, 8, training=False), f"the weights of this {config.model} "
            f"(depth {config.depth}, dim {config.dim})", advice="check the model config")
    params = from_timm_state(config, _scalar_norms(config, state, source))
    model = dataclasses.asdict(config)
    if as_ == "checkpoint":
        save_checkpoint(out, params, {}, step=0, epoch=0, rng_state={},
                        config={"model": model, "imported_from": str(source)})
        return config
    meta = {"format": PARAMS_FORMAT, "version": VERSION, "model": model,
            "imported_from": str(source)}
    tensors = {META_KEY: numpy.array(json.dumps(meta, sort_keys=True)),
               **{f"param/{name}": value for name, value in to_timm_state(config, params).items()}}
    atomic_write(out, lambda f: numpy.savez(f, **tensors))
    return config


# ---------------------------------------------------------------------------------------------
# The energy-exact model's scalar γ in the paper's per-element layout
# ---------------------------------------------------------------------------------------------
def _scalar_norm_shapes(config):
    """{name: per-element shape} of the block norm weights that `config` holds as scalars."""
    if config.norm_affine != "scalar":
        return {}
    paper = param_shapes(dataclasses.replace(config, norm_affine="element"))
    return {name: paper[name] for name, shape in param_shapes(config).items() if shape == ()}


def _per_element_norms(config, state):
    """`state` with every scalar γ broadcast to the paper's per-element shape (γ·1)."""
    shapes = _scalar_norm_shapes(config)
    return {name: numpy.full(shapes[name], value, dtype=value.dtype) if name in shapes else value
            for name, value in state.items()}


def _scalar_norms(config, state, path):
    """`state` with each per-element γ that `config` holds as a scalar replaced by that scalar;
    InteropError if one varies (it is then not the energy-exact model)."""
    state = dict(state)
    for name, shape in _scalar_norm_shapes(config).items():
        if name in state and numpy.shape(state[name]) == shape:
            value = numpy.asarray(state[name])
            if not numpy.all(value == value.flat[0]):
                raise InteropError(f"{path}: {name} varies over its {shape} elements "
                                   f"(from {value.min():.4g} to {value.max():.4g}), but "
                                   f"norm_affine='scalar' has one γ per norm: import it with "
                                   f"--set norm_affine=element")
            state[name] = numpy.array(value.flat[0])
    return state
