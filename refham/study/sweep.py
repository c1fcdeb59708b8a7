"""The symmetry-breaking experiment (the paper's claim, tested): vanilla, ParaMixer, SymMixer,
the energy-exact SymMixer (one γ per block norm) and AsymMixer(λ), each over several seeds, on
one protocol — and the controls that separate what symmetry costs from how fast a model learns.

    run_sweep("runs/sweep")                     # one fixed budget: 40 runs
    run_sweep("runs/t", tune_lr=(1e-3, 4e-3))   # lr per (model, λ) chosen on validation
    run_study("runs/study")                     # every regime of STUDY (docs/symmetry-study.md)

A sweep is a list of `Regime`s (refham.study.plan: what is trained, and the learning rate a
tuned regime chooses on validation). Each run trains in `out/runs/<run_name>/` (checkpoints: an
interrupted run resumes); `out/results.jsonl` gets one line per finished run, so re-running
skips what is done. `part=(i, n)` trains only the runs whose name hashes to part i of n, so n
processes share a sweep; under mpiexec the ranks are the parts (each run on one rank, one
thread). `_next_run` is the one place that decides what runs next. When every run is done,
refham.study.report writes results.md and the figures.
"""
import json
import math
import os
import time
import zlib

from refham.files.checkpoint import read_json_lines
from refham.training.distributed import get_communicator
from refham.files.outputs import prepare_folder
from refham.files.runlock import RunLock
from refham.study.plan import (  # noqa: F401  (re-exported: the sweep's public names)
    ARMS, STUDY, SWEEP_LAMS, SWEEP_SEEDS, SWEEP_SETTINGS, Regime, Run, SweepError, plan,
    run_name)
from refham.study.report import write_report
from refham.training.train import TrainingDiverged, train
from refham.training.train_config import RESUMABLE_CHANGES, TrainConfig

PER_RUN = ("model", "lam", "seed", "out", "asym_init", "norm_affine", "comm")   # set per run
PER_REGIME = ("lr", "epochs")          # the settings' values are the defaults of a regime


def _next_run(runs, results, part):
    """The first run of `runs` not in `results` that belongs to `part` ((i, n): the runs whose
    name hashes to i − 1 mod n; None: all), or None."""
    for run in runs:
        if run not in results and (part is None or
                                   zlib.crc32(run_name(run).encode()) % part[1] == part[0] - 1):
            return run
    return None


def _read_results(path):
    """{Run: record} of the complete lines of results.jsonl; a line cut short by a crash or
    damaged otherwise (not UTF-8 JSON, not a record) is ignored, so its run is trained again."""
    def is_record(value):
        return (isinstance(value, dict) and all(k in value for k in Run._fields)
                and isinstance(value.get("settings"), dict))
    records = read_json_lines(path, is_record, SweepError)[0]
    results = {}
    for record in records:
        try:
            results[Run(*(record[k] for k in Run._fields))] = record
        except TypeError:         # an unhashable field: a record damaged by hand
            continue
    return results


def _append(path, record):
    """Append one JSON line with a single O_APPEND write, so that parts never interleave."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)


def _curves(out):
    """Per-epoch curves of a finished run, from its metrics.jsonl: train/validation accuracy and
    the means over blocks and MLPs of cos(W_out, W_inᵀ), the breaking ratio and ‖W_out‖."""
    with open(os.path.join(out, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    curves = {key: [r.get(key) for r in records] for key in ("train_acc", "val_acc")}
    for measure in ("cos", "breaking_ratio", "norm_out"):
        curves[measure] = [_mean([v for k, v in (r.get("symmetry") or {}).items()
                                  if k.endswith("." + measure) and math.isfinite(v)])
                           for r in records]
    return curves


def _mean(values):
    return sum(values) / len(values) if values else None


def _train_run(run, settings, out):
    """Train (or resume) one run → its results record, or None when a signal stopped it."""
    model, norm_affine = ARMS[run.model]
    cfg = TrainConfig(**{**settings, "eval_every": settings.get("eval_every") or run.epochs},
                      model=model, norm_affine=norm_affine, lam=run.lam, asym_init=run.asym_init,
                      lr=run.lr, epochs=run.epochs, seed=run.seed, comm="none",
                      out=os.path.join(out, "runs", run_name(run)))
    try:
        summary = train(cfg, resume=os.path.exists(os.path.join(cfg.out, "last.npz")))
        curves = _curves(cfg.out) if summary["status"] == "finished" else None
    except TrainingDiverged as exc:
        summary, curves = {"status": "diverged", "error": str(exc)}, None
    if summary["status"] == "interrupted":
        return None, summary["signal"]
    return {**run._asdict(), "settings": settings, "curves": curves,
            **{k: summary.get(k) for k in (
                "status", "test_acc", "test_loss", "val_acc", "val_loss", "train_acc",
                "train_loss", "best_epoch", "best_test_acc", "wall_time", "symmetry",
                "error")}}, None


def _settings(settings):
    """The TrainConfig settings shared by every run (SWEEP_SETTINGS, overridden), checked."""
    settings = {**SWEEP_SETTINGS, **(settings or {})}
    clash = sorted(set(settings) & set(PER_RUN))
    if clash:
        raise SweepError(f"the sweep sets {clash} itself for each run; use its model, λ, "
                         f"seed and init options")
    TrainConfig(**settings)                                  # fail fast on bad settings
    return {k: v for k, v in settings.items() if k not in PER_REGIME}


def execute(out, regimes, settings=None, part=None, log=print, poll=10.0, report_only=False):
    """Train every run the `regimes` need (those of `part` only, if given) that `out` has not
    finished, then — once every run of every part is done — write the report; `report_only`:
    train nothing and report what has finished, marked partial if anything is missing. Returns
    (results, finished): the records of the planned runs, and False when a signal stopped it."""
    shared = _settings(settings)
    comm = get_communicator("auto")
    if comm.size > 1:
        if part is not None:
            raise SweepError("--part splits a sweep over separate processes; under mpiexec the "
                             "ranks are the parts: drop --part")
        part = (comm.rank + 1, comm.size)
        log = log if comm.rank == 0 else (lambda line: None)
    prepare_folder(out, "sweep folder")
    # One sweep job per folder. The parts of one sweep (mpiexec ranks, or --part processes)
    # share it: each trains its own runs and appends whole lines to results.jsonl.
    lock = RunLock(out).acquire() if part is None or (comm.size > 1 and comm.rank == 0) else None
    try:
        return _execute(out, regimes, shared, part, log, poll, report_only, comm)
    finally:
        if lock:
            lock.release()


def _execute(out, regimes, shared, part, log, poll, report_only, comm):
    """`execute` once the folder is locked and the part of this process is known."""
    results_path = os.path.join(out, "results.jsonl")
    waiting_logged = False
    while True:
        results = _read_results(results_path)
        for run, previous in results.items():
            changed = sorted(k for k in set(shared) | set(previous["settings"])
                             if shared.get(k) != previous["settings"].get(k)
                             and k not in RESUMABLE_CHANGES)
            if changed:
                raise SweepError(f"{out} holds results of a sweep with other settings "
                                 f"(differing: {changed}, run {run_name(run)}); choose another "
                                 f"--out")
        runs, rates = plan(regimes, results)
        run = None if report_only else _next_run(runs, results, part)
        if run is None and report_only:
            break
        if run is None:
            if all(lr is not None for lr in rates.values()) or part is None:
                break
            if not waiting_logged:
                log(f"part {part[0]}/{part[1]}: waiting for the other parts' lr-tuning runs")
                waiting_logged = True
            time.sleep(poll)
            continue
        record, stopped_by = _train_run(run, shared, out)
        if record is None:
            log(f"sweep stopped by {stopped_by} during {run_name(run)}; run it again to "
                f"continue")
            return [results[r] for r in runs if r in results], False
        _append(results_path, record)
        accuracy = ("diverged" if record["test_acc"] is None
                    else f"test top-1 {100 * record['test_acc']:.2f}%")
        done = sum(r in results for r in runs) + 1
        log(f"[{done}/{len(runs)}] {run_name(run)}: {accuracy} ({record['wall_time'] or 0:.0f} s)")
    if comm.size > 1:                  # every rank's part is done: rank 0 reports for all
        comm.barrier()
        if comm.rank:
            return [], True
        results = _read_results(results_path)
        runs, rates = plan(regimes, results)
    chosen = [results[r] for r in runs if r in results]
    complete = len(chosen) == len(runs) and all(lr is not None for lr in rates.values())
    if complete or report_only:
        write_report(out, regimes, results, rates, log,
                     partial=None if complete else (len(chosen), len(runs)))
    else:
        log(f"this part is done; {len(runs) - len(chosen)} run(s) of other parts are pending "
            f"(the last part to finish writes the report)")
    return chosen, True


def run_sweep(out, settings=None, models=tuple(ARMS), lams=SWEEP_LAMS, seeds=SWEEP_SEEDS,
              epochs=None, tune_lr=(), tune_seeds=(0,), asym_inits=("official",), part=None,
              log=print, report_only=False):
    """One regime ("sweep") from these options; `settings`: TrainConfig fields overriding
    SWEEP_SETTINGS (their lr and epochs are the regime's when `epochs`/`tune_lr` are not
    given; model, λ, seed and the init are set per run). See `execute`."""
    merged = {**SWEEP_SETTINGS, **(settings or {})}
    regime = Regime("sweep", tuple(models), tuple(lams), tuple(seeds),
                    tuple(epochs or (merged["epochs"],)), merged["lr"], tuple(tune_lr),
                    tuple(tune_seeds), tuple(asym_inits))
    return execute(out, [regime], settings, part, log, report_only=report_only)


def run_study(out, settings=None, part=None, log=print, report_only=False):
    """Every regime of STUDY into `out` (see `execute`); `settings` may change the protocol
    but not the regimes' learning rates and budgets."""
    fixed = sorted(set(settings or {}) & set(PER_REGIME))
    if fixed:
        raise SweepError(f"the study sets {fixed} in its regimes (refham.study.plan.STUDY); "
                         f"drop those options, or run a sweep without --study")
    return execute(out, STUDY, settings, part, log, report_only=report_only)
