"""Training checkpoints: one .npz file, no pickle, written atomically, verified when read.

Layout of the archive (every entry a plain numeric array, so `numpy.load(allow_pickle=False)`
reads it):

    param/<timm name>   the model parameters, in their dtype
    optim/<key>         the optimiser's array state (`optim/m/<name>`, `optim/v/<name>`, ...)
    meta/json           UTF-8 bytes (uint8) of a JSON object: format, version, step, epoch,
                        rng_state, config, metrics, the optimiser's scalar state, and `sha256`,
                        a digest over every `param/` and `optim/` array (name, dtype, shape, bytes)

Writing is refham.files.outputs' `atomic_write`: a crash leaves either the old file or the new
one, never half of one. Reading checks the archive (truncation, corruption), the format tag
and version, the keys, the digest and the metadata's types, and raises CheckpointError saying
which. Every array must be finite: a NaN/inf tensor is refused when writing and when reading, so
a diverged state can neither become nor pass for a checkpoint. `read_npz` serves other files
too (golden files).
"""
import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import numpy

from refham.files import safefiles
from refham.files.outputs import atomic_write
from refham.backend import to_numpy
from refham.errors import RefhamError, short_list

FORMAT = "refham-checkpoint"
VERSION = 1


class CheckpointError(RefhamError, ValueError):
    """A file that is not a readable, intact refham checkpoint of a supported version."""


@dataclass
class Checkpoint:
    """What `load_checkpoint` returns: host NumPy arrays and the JSON metadata."""
    params: dict
    optim_state: dict          # arrays and the optimiser's scalars (e.g. `step`), as saved
    step: int
    epoch: int
    rng_state: dict
    config: dict
    metrics: dict = field(default_factory=dict)


def _digest(arrays):
    """SHA-256 over (name, dtype, shape, bytes) of every array, in sorted name order."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = numpy.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def nonfinite_entries(arrays, module=numpy):
    """Names of the entries of the dict `arrays` that hold a NaN or ±inf, in dict order (entries
    without a shape, such as an optimiser's `step`, are skipped). `module` (numpy, or the backend
    `xp` for device arrays) computes isfinite(a).all() per array; one host transfer in all."""
    names = [name for name, a in arrays.items() if hasattr(a, "shape")]
    if not names:
        return []
    finite = to_numpy(module.stack([module.isfinite(arrays[name]).all() for name in names]))
    return [name for name, ok in zip(names, finite) if not ok]


def describe_names(names, limit=3):
    """`a, b, c and 4 more`: the first `limit` names of a possibly long list, and a count."""
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def save_checkpoint(path, params, optim_state, *, step, epoch, rng_state, config, metrics=None):
    """Write a checkpoint to `path` atomically (see the module docstring for the layout).

    `rng_state`, `config`, `metrics` and the non-array entries of `optim_state` must be JSON-able
    (a NumPy Generator's state is: `gen.bit_generator.state`). Raises CheckpointError, leaving
    any previous file at `path` as it was, when a parameter or optimiser array is not finite."""
    arrays = {f"param/{name}": to_numpy(a) for name, a in params.items()}
    scalars = {}
    for key, value in optim_state.items():
        if hasattr(value, "shape"):
            arrays[f"optim/{key}"] = to_numpy(value)
        else:
            scalars[key] = value
    overflowed = nonfinite_entries(arrays)
    if overflowed:
        raise CheckpointError(f"refusing to write {path}: NaN/inf in "
                              f"{describe_names(overflowed)} (a diverged state); the previous "
                              f"file, if any, is kept")
    meta = {"format": FORMAT, "version": VERSION, "step": int(step), "epoch": int(epoch),
            "rng_state": rng_state, "config": config, "metrics": metrics or {},
            "optim_scalars": scalars, "sha256": _digest(arrays)}
    try:
        meta_bytes = json.dumps(meta, sort_keys=True, allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise CheckpointError(
            f"checkpoint metadata must be finite, JSON-able values: {exc}") from exc
    arrays["meta/json"] = numpy.frombuffer(meta_bytes, dtype=numpy.uint8)
    atomic_write(path, lambda f: numpy.savez(f, **arrays))


def load_checkpoint(path):
    """Read and verify a checkpoint written by `save_checkpoint` → Checkpoint (host arrays)."""
    path = os.fspath(path)
    arrays = read_npz(path)
    if "meta/json" not in arrays:
        raise CheckpointError(f"{path} is not a refham checkpoint (no meta/json entry)")
    try:
        meta = json.loads(arrays.pop("meta/json").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: unreadable metadata ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a refham checkpoint (format tag missing)")
    if meta.get("version") != VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {meta.get('version')!r}; this refham reads "
            f"version {VERSION} only")
    missing = [k for k in ("step", "epoch", "rng_state", "config", "optim_scalars", "sha256")
               if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: metadata lacks {missing}")
    unknown = sorted(k for k in arrays if not k.startswith(("param/", "optim/")))
    if unknown or not any(k.startswith("param/") for k in arrays):
        raise CheckpointError(f"{path}: unexpected entries [{short_list(unknown)}] or "
                              f"no parameters")
    if _digest(arrays) != meta["sha256"]:
        raise CheckpointError(
            f"{path}: SHA-256 of the arrays does not match the one recorded at save time — the "
            f"file was modified or an entry is missing; do not use it")
    _check_meta_types(path, meta)
    overflowed = nonfinite_entries(arrays)
    if overflowed:
        raise CheckpointError(f"{path} holds NaN/inf in {describe_names(overflowed)}: it records "
                              f"a diverged state, unfit for evaluation, resume or export; use an "
                              f"earlier checkpoint")
    params = {k[len("param/"):]: a for k, a in arrays.items() if k.startswith("param/")}
    optim_state = {k[len("optim/"):]: a for k, a in arrays.items() if k.startswith("optim/")}
    clash = sorted(set(optim_state) & set(meta["optim_scalars"]))
    if clash:
        raise CheckpointError(f"{path}: optimiser entries {clash} are both arrays and scalars")
    optim_state.update(meta["optim_scalars"])
    return Checkpoint(params=params, optim_state=optim_state, step=meta["step"],
                      epoch=meta["epoch"], rng_state=meta["rng_state"], config=meta["config"],
                      metrics=meta["metrics"])


def _is_count(value):
    """An int ≥ 0 that is not a bool (JSON's true would pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _check_meta_types(path, meta):
    """Raise CheckpointError unless step and epoch are ints ≥ 0, rng_state, config and metrics
    are JSON objects and every optimiser scalar is a finite number — what a checkpoint whose
    digest matches can still get wrong when its metadata was written by hand."""
    wrong = [f"{key} {meta[key]!r} (an integer >= 0 expected)" for key in ("step", "epoch")
             if not _is_count(meta[key])]
    meta.setdefault("metrics", {})
    wrong += [f"{key} of type {type(meta[key]).__name__} (an object expected)"
              for key in ("rng_state", "config", "metrics", "optim_scalars")
              if not isinstance(meta[key], dict)]
    if isinstance(meta["optim_scalars"], dict):
        wrong += [f"optimiser scalar {key} = {value!r} (a finite number expected)"
                  for key, value in meta["optim_scalars"].items()
                  if isinstance(value, bool) or not isinstance(value, (int, float))
                  or not math.isfinite(value)]
    if wrong:
        raise CheckpointError(f"{path}: metadata has {'; '.join(wrong)}; the file was not "
                              f"written by refham as it is")


def read_json_lines(path, is_record, error=CheckpointError):
    """(records, damaged) of the JSON-lines file at `path`: the values of the lines that are
    UTF-8 JSON passing `is_record`, in order, and the 1-based numbers of the other lines (a line
    cut short by a crash, or one damaged by hand). A missing file has neither; `error` (an
    exception class) for a path that cannot be read (a folder, no permission)."""
    if not os.path.exists(path):
        return [], []
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines()
    except OSError as exc:
        raise error(f"{path} cannot be read ({exc.strerror}): move it out of the way") from exc
    records, damaged = [], []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line.decode("utf-8"))
        except ValueError:                              # UnicodeDecodeError and JSONDecodeError
            damaged.append(number)
            continue
        if is_record(record):
            records.append(record)
        else:
            damaged.append(number)
    return records, damaged


def read_npz(path, error=CheckpointError):
    """{name: array} of every entry of the .npz at `path`, read without pickle, decompressed and
    CRC-checked, every declared size checked before it is read (refham.files.safefiles.read_npz);
    `error` (an exception class) for a missing, truncated, corrupted or hostile file, one that
    is not an .npz, or one that holds objects."""
    return safefiles.read_npz(path, error)
