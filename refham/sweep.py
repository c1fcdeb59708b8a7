"""The symmetry-breaking experiment in small (:ref:`sec-sweep`): vanilla, ParaMixer, SymMixer and
AsymMixer(λ) for λ ∈ {1, 1e-1, 1e-2, 1e-3, 1e-4, 0}, each over several seeds, on one protocol.

    results = run_sweep("runs/sweep")     # the docs' sweep defaults: 36 runs, ~5 min on 2 CPU cores

The paper's claim: SymMixer trails ParaMixer/vanilla, and AsymMixer moves from SymMixer's level
(large λ pins W₂ ≈ 0) to ParaMixer's (λ → 0) as λ falls. Every run trains in
`out/runs/<name>/` (checkpoints, so an interrupted run resumes); `out/results.jsonl` gets one
line per finished run, so re-running the sweep skips what is done; `out/results.md` holds the
table (mean ± sample std over seeds, and the mean breaking ratio ‖W_out − W_inᵀ‖/‖W_in‖ of the
trained MLPs) and `out/accuracy_vs_lambda.png` the plot (matplotlib).
"""
import json
import math
import os

from refham.checkpoint import atomic_write, read_json_lines
from refham.distributed import get_communicator
from refham.mixer import MODELS
from refham.outputs import prepare_folder
from refham.runlock import RunLock
from refham.train import TrainingDiverged, train
from refham.train_config import RESUMABLE_CHANGES, TrainConfig

SWEEP_SETTINGS = dict(data="digits", train_fraction=0.25, input_noise=0.6, size="digits",
                      epochs=40, batch_size=64, optimizer="adamw", lr=2e-3, weight_decay=0.05,
                      warmup=0.05, label_smoothing=0.1, progress=False)
SWEEP_LAMS = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 0.0)
SWEEP_SEEDS = (0, 1, 2, 3)
PER_RUN = ("model", "lam", "seed", "out", "comm")      # set by the sweep for each run
LABELS = {"vanilla": "vanilla", "paramixer": "ParaMixer", "symmixer": "SymMixer",
          "asymmixer": "AsymMixer"}


class SweepError(ValueError):
    """A sweep that cannot run as asked (e.g. its folder holds results of other settings)."""


def sweep_runs(models=MODELS, lams=SWEEP_LAMS, seeds=SWEEP_SEEDS):
    """(model, λ, seed) of every run: λ varies for the AsymMixer only; the others have λ = 0."""
    unknown = sorted(set(models) - set(MODELS))
    if unknown or not models or not seeds or ("asymmixer" in models and not lams):
        raise SweepError(f"a sweep needs models from {', '.join(MODELS)} (got {list(models)}), "
                         f"one or more seeds, and λ values for asymmixer")
    if any(not (isinstance(lam, (int, float)) and 0 <= lam < math.inf) for lam in lams):
        raise SweepError(f"λ values must be finite and ≥ 0, got {list(lams)}")
    return [(model, float(lam), seed) for model in models
            for lam in (lams if model == "asymmixer" else (0.0,)) for seed in seeds]


def run_name(model, lam, seed):
    """The run's folder name under out/runs: `asymmixer-lam0.01-seed2`, `symmixer-seed0`."""
    return f"{model}-lam{lam:g}-seed{seed}" if model == "asymmixer" else f"{model}-seed{seed}"


def _read_results(path):
    """The complete records of results.jsonl; a line cut short by a crash or damaged otherwise
    is ignored, so that its run is trained again."""
    kinds = {"model": str, "lam": (int, float), "seed": int, "settings": dict,
             "test_acc": (int, float, type(None)), "symmetry": (dict, type(None))}

    def is_record(value):
        return isinstance(value, dict) and all(
            isinstance(value.get(key), kind) and not isinstance(value.get(key), bool)
            for key, kind in kinds.items())
    return read_json_lines(path, is_record, SweepError)[0]


def run_sweep(out, settings=None, models=MODELS, lams=SWEEP_LAMS, seeds=SWEEP_SEEDS, log=print):
    """Train every run of `sweep_runs` not yet in `out`/results.jsonl, then write the table
    and the plot. `settings`: TrainConfig fields overriding SWEEP_SETTINGS (not model, lam,
    seed, out); evaluation happens once, after the last epoch, unless eval_every is given.
    Returns (results, finished) — finished is False when a signal stopped the sweep.
    Under mpiexec the runs go round-robin to the ranks, each run on one rank (one process);
    rank 0 writes results.jsonl, the table and the plot, the same as a serial sweep's."""
    settings = {**SWEEP_SETTINGS, **(settings or {})}
    clash = sorted(set(settings) & set(PER_RUN))
    if clash:
        raise SweepError(f"the sweep sets {clash} itself for each run; use models/lams/seeds/out")
    settings.setdefault("eval_every", settings["epochs"])
    runs = sweep_runs(models, lams, seeds)
    TrainConfig(**settings)                                  # fail fast on bad settings
    comm = get_communicator("auto")
    if comm.rank:                     # rank 0 alone writes in `out`
        return _sweep_in_locked_folder(out, settings, runs, models, lams, log, comm)
    prepare_folder(out, "sweep folder")
    with RunLock(out):                # one sweep per folder: results.jsonl has one writer
        return _sweep_in_locked_folder(out, settings, runs, models, lams, log, comm)


def _sweep_in_locked_folder(out, settings, runs, models, lams, log, comm):
    """`run_sweep` once it holds the lock on `out` (rank 0) and has checked its arguments."""
    results_path = os.path.join(out, "results.jsonl")
    results = {(r["model"], r["lam"], r["seed"]): r for r in _read_results(results_path)}
    for key, previous in results.items():
        changed = sorted(k for k in set(settings) | set(previous["settings"])
                         if settings.get(k) != previous["settings"].get(k)
                         and k not in RESUMABLE_CHANGES)
        if changed:
            raise SweepError(f"{out} holds results of a sweep with other settings (differing: "
                             f"{changed}, run {run_name(*key)}); choose another --out")
    todo = [run for run in runs if run not in results]
    log = log if comm.rank == 0 else lambda line: None
    for first in range(0, len(todo), comm.size):          # one run per rank at a time
        mine = todo[first + comm.rank:first + comm.rank + 1]
        records = comm.allgather(_train_run(out, settings, *mine[0]) if mine else None)
        for record in filter(None, records):
            key = (record["model"], record["lam"], record["seed"])
            if record["status"] == "interrupted":
                log(f"sweep stopped by {record['signal']} during {run_name(*key)}; "
                    f"run it again to continue")
                continue
            if comm.rank == 0:
                with open(results_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(record) + "\n")
                    f.flush()
                    os.fsync(f.fileno())
            results[key] = record
            accuracy = ("diverged" if record["test_acc"] is None
                        else f"test top-1 {100 * record['test_acc']:.2f}%")
            log(f"[{runs.index(key) + 1}/{len(runs)}] {run_name(*key)}: {accuracy} "
                f"({record['wall_time'] or 0:.0f} s)")
        if any(record and record["status"] == "interrupted" for record in records):
            return list(results.values()), False
    chosen = [results[run] for run in runs]
    if comm.rank == 0:
        write_report(out, chosen, models, lams, log)
    return chosen, True


def _train_run(out, settings, model, lam, seed):
    """Train (or resume) one run of the sweep in one process → its results.jsonl record."""
    cfg = TrainConfig(**settings, model=model, lam=lam, seed=seed, comm="none",
                      out=os.path.join(out, "runs", run_name(model, lam, seed)))
    try:
        summary = train(cfg, resume=os.path.exists(os.path.join(cfg.out, "last.npz")))
    except TrainingDiverged as exc:
        summary = {"status": "diverged", "error": str(exc), "test_acc": None}
    stopped = {"signal": summary["signal"]} if summary["status"] == "interrupted" else {}
    return {"model": model, "lam": lam, "seed": seed, "settings": settings, **stopped,
            **{k: summary.get(k) for k in ("status", "test_acc", "test_loss", "train_loss",
                                           "wall_time", "symmetry", "error")}}


def _mean_breaking_ratio(record):
    """Mean over blocks and MLPs of ‖W_out − W_inᵀ‖/‖W_in‖ (mixer_energy.symmetry_measures;
    for the AsymMixer that is ‖W₂‖/‖W₁‖), or None when the run logged none."""
    ratios = [v for k, v in (record.get("symmetry") or {}).items()
              if k.endswith(".breaking_ratio") and math.isfinite(v)]
    return sum(ratios) / len(ratios) if ratios else None


def _mean_and_std(values):
    """(mean, sample std with n − 1) — std None below two values, both None for none."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def summarize(results, models=MODELS, lams=SWEEP_LAMS):
    """One row per model (per λ for asymmixer), in that order: {model, lam (None but for
    asymmixer), mean, std (test accuracy in [0, 1] over finished seeds), runs, diverged,
    breaking (mean breaking ratio)}."""
    rows = []
    for model in models:
        for lam in (lams if model == "asymmixer" else (None,)):
            group = [r for r in results if r["model"] == model and
                     (lam is None or r["lam"] == float(lam))]
            finished = [r for r in group if r["test_acc"] is not None]
            mean, std = _mean_and_std([r["test_acc"] for r in finished])
            breaking, _ = _mean_and_std([b for b in map(_mean_breaking_ratio, finished)
                                         if b is not None])
            rows.append(dict(model=model, lam=lam, mean=mean, std=std, runs=len(finished),
                             diverged=len(group) - len(finished), breaking=breaking))
    return rows


def markdown_table(rows):
    """The rows of `summarize` as a markdown table, accuracies in percent."""
    lines = ["| model | λ | test accuracy (%) | runs | ‖W_out − W_inᵀ‖/‖W_in‖ |",
             "|---|---|---|---|---|"]
    for row in rows:
        acc = "—" if row["mean"] is None else f"{100 * row['mean']:.2f}"
        if row["std"] is not None:
            acc += f" ± {100 * row['std']:.2f}"
        runs = f"{row['runs']}" + (f" (+{row['diverged']} diverged)" if row["diverged"] else "")
        lam = "—" if row["lam"] is None else f"{row['lam']:g}"
        breaking = "—" if row["breaking"] is None else f"{row['breaking']:.3g}"
        lines.append(f"| {LABELS[row['model']]} | {lam} | {acc} | {runs} | {breaking} |")
    return "\n".join(lines) + "\n"


def write_report(out, results, models=MODELS, lams=SWEEP_LAMS, log=print):
    """results.md (table and protocol) and, with matplotlib, accuracy_vs_lambda.png."""
    rows = summarize(results, models, lams)
    settings = results[0]["settings"] if results else {}
    seeds = sorted({r["seed"] for r in results})
    protocol = ", ".join(f"{k}={v}" for k, v in sorted(settings.items())
                         if k not in RESUMABLE_CHANGES)
    text = (f"# Symmetry-breaking sweep\n\nSeeds {seeds}; mean ± sample std over seeds.\n"
            f"Settings: {protocol}\n\n{markdown_table(rows)}")
    atomic_write(os.path.join(out, "results.md"), lambda f: f.write(text.encode()))
    log(markdown_table(rows))
    png = os.path.join(out, "accuracy_vs_lambda.png")
    if plot_accuracy_vs_lambda(rows, png, title=f"{settings.get('data', '')}: test accuracy, "
                                                f"{len(seeds)} seed(s)"):
        log(f"table in {out}/results.md, plot in {png}")
    else:
        log(f"table in {out}/results.md; matplotlib is not installed, so no plot "
            f"(pip install matplotlib, or refham[plot])")


def plot_accuracy_vs_lambda(rows, path, title=""):
    """AsymMixer accuracy against λ (log axis; λ = 0 drawn apart, left of a dotted break) with
    the other models as horizontal lines and ±std bands. False if matplotlib is absent."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return False
    asym = [(row["lam"], row["mean"], row["std"]) for row in rows
            if row["model"] == "asymmixer" and row["mean"] is not None]
    positive = sorted(lam for lam, _, _ in asym if lam > 0) or [1e-4, 1.0]
    zero_at = positive[0] / 30                                  # where λ = 0 is drawn
    lo, hi = zero_at / 3, positive[-1] * 3
    fig = Figure(figsize=(6.4, 4.2), layout="tight")
    ax = fig.add_subplot()
    ax.set_xscale("log")
    colours = {"vanilla": "tab:gray", "paramixer": "tab:blue", "symmixer": "tab:green"}
    for row in rows:
        model, mean, std = row["model"], row["mean"], row["std"]
        if model in colours and mean is not None:
            ax.axhline(100 * mean, color=colours[model], label=LABELS[model])
            if std is not None:
                ax.axhspan(100 * (mean - std), 100 * (mean + std), color=colours[model],
                           alpha=0.15, linewidth=0)
    if asym:
        xs = [lam if lam > 0 else zero_at for lam, _, _ in asym]
        ax.errorbar(xs, [100 * m for _, m, _ in asym], yerr=[100 * (s or 0) for _, _, s in asym],
                    color="tab:red", marker="o", capsize=3, linestyle="none",
                    label="AsymMixer(λ)")
        ax.axvline(math.sqrt(zero_at * positive[0]), color="black", linestyle=":", linewidth=1)
    ax.set_xlim(lo, hi)
    ticks = [zero_at] + positive
    ax.set_xticks(ticks, ["0"] + [f"{lam:g}" for lam in positive])
    ax.minorticks_off()
    ax.set(xlabel="λ (penalty on the symmetry-breaking W₂)", ylabel="test accuracy (%)",
           title=title)
    ax.legend(fontsize="small")
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    return True
