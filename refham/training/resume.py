"""Resuming a training run: what its folder's `last.npz` must be before any of it becomes the
run's state, and the metrics log cut back to the epochs that checkpoint has finished.

`load_checkpoint` has already checked the file itself (archive, digest, metadata types, finite
tensors). Here the checkpoint is held against the run that is to continue: it must come from
`refham train` (not `import --as checkpoint` or `metaformer train`), with the same settings as
the run and as the folder's config.json, hold exactly the model's parameters in the run's dtype,
an optimiser state of the run's optimiser whose every array matches its parameter in shape and
dtype, and a step within the run (0 ≤ step ≤ epochs · steps per epoch). Each failure is a
ResumeError that says what differs — or a CheckpointError for parameters that do not fit the
settings stored beside them, which `evaluate_checkpoint` refuses just the same.
"""
import dataclasses
import json
import math
import os
import warnings

from refham.errors import RefhamError
from refham.files.checkpoint import CheckpointError, describe_names, read_json_lines
from refham.files.outputs import atomic_write
from refham.mixer import ParamError, check_params, param_shapes
from refham.training.train_config import RESUMABLE_CHANGES, TrainConfig, TrainConfigError


class ResumeError(RefhamError, ValueError):
    """A run that cannot be started or resumed in this output folder."""


class MetricsLogWarning(UserWarning):
    """Lines of a run's metrics.jsonl that could not be read were left out of it."""


def last_checkpoint(out):
    """`out`/last.npz, the checkpoint a resume starts from; ResumeError if there is none."""
    path = os.path.join(out, "last.npz")
    if not os.path.exists(path):
        raise ResumeError(f"nothing to resume in {out}: no last.npz (start without --resume, "
                          f"or point --out at the run's folder)")
    return path


def saved_settings(ck, path):
    """The `refham train` settings (a dict) stored in checkpoint `ck`, read from `path`."""
    if not all(isinstance(ck.config.get(key), dict) for key in ("train", "model")):
        raise ResumeError(f"{path} is not a checkpoint of `refham train` (it records no training "
                          f"settings: `refham import --as checkpoint` and `metaformer train` "
                          f"write such files); it cannot be resumed — start a new run")
    return ck.config["train"]


def check_resumable(ck, path, cfg, model_config, optimizer, steps_per_epoch, rng_state):
    """Raise ResumeError unless checkpoint `ck` (from `path`) can continue the run of TrainConfig
    `cfg` on model `model_config` with `optimizer` (its SLOTS name the state arrays), whose
    epochs have `steps_per_epoch` steps and whose step t records `rng_state(t)`."""
    try:
        saved = TrainConfig.from_dict(saved_settings(ck, path)).to_dict()
    except TrainConfigError as exc:
        raise ResumeError(f"{path} holds unusable training settings: {exc}") from exc
    wanted = cfg.to_dict()
    changed = [f"{k}: {saved[k]!r} → {wanted[k]!r}" for k in saved
               if saved[k] != wanted[k] and k not in RESUMABLE_CHANGES]
    if changed:
        raise ResumeError(f"cannot resume {cfg.out} with different settings "
                          f"({'; '.join(changed)}); resume with the saved ones")
    model = json.loads(json.dumps(dataclasses.asdict(model_config)))   # as the file stores it
    if ck.config["model"] != model:
        raise ResumeError(f"{path} was written for another model ({ck.config['model']}) than "
                          f"its settings give ({model})")
    total_steps = cfg.epochs * steps_per_epoch
    if not ck.step <= total_steps or ck.epoch != ck.step // steps_per_epoch:
        raise ResumeError(f"{path} is at step {ck.step}, epoch {ck.epoch}: not a point of this "
                          f"run of {total_steps} steps in {cfg.epochs} epochs")
    if ck.rng_state != rng_state(ck.step):
        raise ResumeError(f"{path} records the random state {ck.rng_state!r}, not "
                          f"{rng_state(ck.step)!r}: it cannot be resumed exactly by this version")
    check_parameters(ck.params, path, cfg.dtype, model_config)
    _check_optimizer_state(ck, path, optimizer)


def check_parameters(params, path, dtype, model_config):
    """Raise CheckpointError unless `params` (from the checkpoint at `path`) are exactly the
    parameters of `model_config` — names and shapes — all of `dtype`: what the settings stored
    beside them imply (resume and evaluation both rely on it)."""
    try:
        check_params(param_shapes(model_config), params)
    except ParamError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    wrong = [f"{name} is {a.dtype}" for name, a in params.items() if a.dtype != dtype]
    if wrong:
        raise CheckpointError(f"{path}: its settings say {dtype}, but {describe_names(wrong)}")


def _check_optimizer_state(ck, path, optimizer):
    """One array per slot of `optimizer` and parameter, each shaped and typed like its
    parameter, and a `step` that is the run's step (an int)."""
    wrong = []
    expected = {f"{slot}/{name}" for slot in optimizer.SLOTS for name in ck.params} | {"step"}
    missing, extra = sorted(expected - set(ck.optim_state)), sorted(set(ck.optim_state) - expected)
    if missing or extra:
        wrong.append(f"the optimiser state is not {type(optimizer).__name__}'s for these "
                     f"parameters (missing {missing[:3]}, unexpected {extra[:3]})")
    else:
        for key in sorted(expected - {"step"}):
            a, p = ck.optim_state[key], ck.params[key.split("/", 1)[1]]
            if a.shape != p.shape or a.dtype != p.dtype:
                wrong.append(f"{key} is {a.dtype}{list(a.shape)}, its parameter "
                             f"{p.dtype}{list(p.shape)}")
        if ck.optim_state["step"] != ck.step or not isinstance(ck.optim_state["step"], int):
            wrong.append(f"the optimiser's step {ck.optim_state['step']!r} is not the run's "
                         f"{ck.step}")
    if wrong:
        shown = "; ".join(wrong[:4]) + (f"; and {len(wrong) - 4} more" if len(wrong) > 4 else "")
        raise ResumeError(f"{path}: its optimiser state does not fit its parameters: {shown}")


def checked_progress(ck, path, progress_type):
    """`ck.metrics` as a `progress_type` (a dataclass of int and float fields with defaults):
    no unknown field, ints ≥ 0 for the int fields, finite numbers for the float ones; a field
    it lacks (one added after the checkpoint was written) takes its default."""
    fields = {f.name: f.type for f in dataclasses.fields(progress_type)}
    metrics = ck.metrics

    def fits(value, kind):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return value >= 0 and isinstance(value, int) if kind is int else math.isfinite(value)
    if not set(metrics) <= set(fields) or not all(fits(v, fields[k]) for k, v in metrics.items()):
        raise ResumeError(f"{path}: its progress record {metrics!r} is not one of `refham "
                          f"train` (expected the fields {sorted(fields)})")
    return progress_type(**metrics)


def check_same_run(ck, path, config_path):
    """Raise ResumeError if the folder's config.json (at `config_path`) describes another run
    than checkpoint `ck`: a last.npz copied from elsewhere would mix two runs in one folder.
    A missing config.json is written again from the checkpoint."""
    saved = {"train": ck.config["train"], "model": ck.config["model"]}
    if not os.path.exists(config_path):
        atomic_write(config_path, lambda f: f.write(json.dumps(saved, indent=2).encode()))
        return
    try:
        with open(config_path, "rb") as f:
            folder = json.loads(f.read())
        ours = {k: v for k, v in folder["train"].items() if k not in RESUMABLE_CHANGES}
        theirs = {k: v for k, v in saved["train"].items() if k not in RESUMABLE_CHANGES}
        same = ours == theirs and folder["model"] == saved["model"]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ResumeError(f"{config_path} is unreadable ({type(exc).__name__}: {exc}), so "
                          f"whether {path} belongs to this folder's run cannot be told; "
                          f"delete config.json to have it written again from {path}") from exc
    if not same:
        raise ResumeError(f"{path} comes from another run than the one {config_path} "
                          f"describes; resuming would mix the two: put the checkpoint back in "
                          f"its own folder")


def finished_records(metrics_path, epochs_done):
    """The metrics records (dicts) of epochs 1..`epochs_done` in `metrics_path` (none if it is
    absent). A line that is not UTF-8 JSON of an object with an integer epoch ≥ 1 is skipped
    with a MetricsLogWarning: the log is a report, the checkpoint the run's state, so a damaged
    report line must not stop the run (and a crash can leave the last line cut short)."""
    def is_record(value):
        epoch = value.get("epoch") if isinstance(value, dict) else None
        return isinstance(epoch, int) and not isinstance(epoch, bool) and epoch >= 1
    records, damaged = read_json_lines(metrics_path, is_record, ResumeError)
    if damaged:
        warnings.warn(f"{metrics_path}: left out {len(damaged)} damaged line(s) (line "
                      f"{', '.join(map(str, damaged[:5]))}{', …' if len(damaged) > 5 else ''}); "
                      f"the checkpoint is intact, only those lines of the log are lost",
                      MetricsLogWarning, stacklevel=3)
    return [r for r in records if r["epoch"] <= epochs_done]
