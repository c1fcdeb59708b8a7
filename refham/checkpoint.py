"""Training checkpoints: one .npz file, no pickle, written atomically, verified when read.

Layout of the archive (every entry a plain numeric array, so `numpy.load(allow_pickle=False)`
reads it):

    param/<timm name>   the model parameters, in their dtype
    optim/<key>         the optimiser's array state (`optim/m/<name>`, `optim/v/<name>`, ...)
    meta/json           UTF-8 bytes (uint8) of a JSON object: format, version, step, epoch,
                        rng_state, config, metrics, the optimiser's scalar state, and `sha256`,
                        a digest over every `param/` and `optim/` array (name, dtype, shape, bytes)

Writing goes to a temporary file in the target folder, is flushed and fsync'ed, then renamed over
the target with `os.replace` — a crash leaves either the old file or the new one, never half of
one. Reading checks the archive (truncation, corruption), the format tag and version, the keys and
the digest, and raises CheckpointError saying which. `atomic_write` and `read_npz` serve other
files too (config and metrics logs, golden files).
"""
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field

import numpy

from refham import safefiles
from refham.backend import to_numpy

FORMAT = "refham-checkpoint"
VERSION = 1


class CheckpointError(ValueError):
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


def save_checkpoint(path, params, optim_state, *, step, epoch, rng_state, config, metrics=None):
    """Write a checkpoint to `path` atomically (see the module docstring for the layout).

    `rng_state`, `config`, `metrics` and the non-array entries of `optim_state` must be JSON-able
    (a NumPy Generator's state is: `gen.bit_generator.state`)."""
    arrays = {f"param/{name}": to_numpy(a) for name, a in params.items()}
    scalars = {}
    for key, value in optim_state.items():
        if hasattr(value, "shape"):
            arrays[f"optim/{key}"] = to_numpy(value)
        else:
            scalars[key] = value
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


def atomic_write(path, write):
    """Create or replace the file `path` atomically: `write(f)` fills a temporary binary file in
    the same folder, which is fsync'ed and renamed over `path`. On any failure (Ctrl-C included)
    the temporary file is removed and `path` keeps its previous content. The file gets the
    usual permissions (0o666 less the umask), not mkstemp's private 0o600."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        os.fchmod(fd, 0o666 & ~_current_umask())
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    _fsync_folder(folder)


def _current_umask():
    """The process umask (reading it means setting it; it is put straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _fsync_folder(folder):
    """Make the rename itself durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


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
        raise CheckpointError(f"{path}: unexpected entries [{safefiles.short_list(unknown)}] or "
                              f"no parameters")
    if _digest(arrays) != meta["sha256"]:
        raise CheckpointError(
            f"{path}: SHA-256 of the arrays does not match the one recorded at save time — the "
            f"file was modified or an entry is missing; do not use it")
    params = {k[len("param/"):]: a for k, a in arrays.items() if k.startswith("param/")}
    optim_state = {k[len("optim/"):]: a for k, a in arrays.items() if k.startswith("optim/")}
    optim_state.update(meta["optim_scalars"])
    return Checkpoint(params=params, optim_state=optim_state, step=meta["step"],
                      epoch=meta["epoch"], rng_state=meta["rng_state"], config=meta["config"],
                      metrics=meta.get("metrics", {}))


def read_npz(path, error=CheckpointError):
    """{name: array} of every entry of the .npz at `path`, read without pickle, decompressed and
    CRC-checked, every declared size checked before it is read (refham.safefiles.read_npz);
    `error` (an exception class) for a missing, truncated, corrupted or hostile file, one that
    is not an .npz, or one that holds objects."""
    return safefiles.read_npz(path, error)
