"""What a finished sweep reports: per regime, one row per (model, λ, init, budget) with the test
accuracy of the final epoch (mean ± sample std over seeds), the learning rate (chosen on
validation in a tuned regime), and the symmetry of the trained MLPs; the lr grid's validation
scores; results.md, and the figures of refham.study.plots.

    rows = summarize(regime, results, rates)    # results {Run: record}, rates from sweep_plan.plan
    print(markdown_table(rows))
"""
import math
import os

from refham.files.outputs import atomic_write
from refham.study.plan import Run
from refham.study.plots import plot_accuracy_vs_lambda, plot_curves, plot_regimes, row_label
from refham.training.train_config import RESUMABLE_CHANGES

REGIME_TITLES = {"fixed": "Fixed budget: 40 epochs at lr 2e-3 (the paper's protocol)",
                 "tuned": "Tuned learning rate: each row's lr chosen on validation (seed 0)",
                 "long": "Long training: 120 epochs at lr 2e-3",
                 "init": "AsymMixer(λ = 0) from other inits (zero: a SymMixer; para: a ParaMixer)",
                 "sweep": "Sweep"}


def mean_and_std(values):
    """(mean, sample std with n − 1) — std None below two values, both None for none."""
    if not values:
        return None, None
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))


def _block_mean(record, measure):
    """Mean over blocks and MLPs of a final symmetry measure (mixer_energy.symmetry_measures),
    or None when the run logged none."""
    values = [v for k, v in (record.get("symmetry") or {}).items()
              if k.endswith("." + measure) and math.isfinite(v)]
    return sum(values) / len(values) if values else None


def _mean_curve(records, key):
    """The per-epoch mean over runs of curves[key] (runs without curves are left out)."""
    curves = [r["curves"][key] for r in records if r.get("curves")]
    if not curves:
        return None
    return [mean_and_std([c[i] for c in curves if c[i] is not None])[0]
            for i in range(min(map(len, curves)))]


def summarize(regime, results, rates):
    """One row per group of `regime` (Regime.groups order): {regime, model, lam, init, epochs,
    lr (None: not chosen yet), mean, std (final test accuracy in [0, 1] over finished seeds),
    runs, diverged, best (mean test accuracy of best.npz, chosen on validation), breaking
    (mean ‖W_out − W_inᵀ‖/‖W_in‖), cos (mean cos(W_out, W_inᵀ)), val_curve (mean validation
    accuracy per epoch)}."""
    rows = []
    for group in regime.groups():
        model, lam, init, epochs = group
        lr = rates.get((regime.name, group))
        runs = [results.get(Run(model, lam, init, lr, epochs, seed)) for seed in regime.seeds]
        group_runs = [r for r in runs if r is not None]
        finished = [r for r in group_runs if r["test_acc"] is not None]
        mean, std = mean_and_std([r["test_acc"] for r in finished])
        rows.append(dict(
            regime=regime.name, model=model, lam=lam, init=init, epochs=epochs, lr=lr,
            mean=mean, std=std, runs=len(finished), diverged=len(group_runs) - len(finished),
            best=mean_and_std([r["best_test_acc"] for r in finished
                               if r.get("best_test_acc") is not None])[0],
            **{key: mean_and_std([b for b in (_block_mean(r, m) for r in finished)
                                  if b is not None])[0]
               for key, m in (("breaking", "breaking_ratio"), ("cos", "cos"))},
            val_curve=_mean_curve(finished, "val_acc")))
    return rows


def _percent(mean, std=None):
    if mean is None:
        return "—"
    return f"{100 * mean:.2f}" + ("" if std is None else f" ± {100 * std:.2f}")


def markdown_table(rows):
    """The rows of `summarize` as a markdown table, accuracies in percent."""
    lines = ["| model | epochs | lr | test accuracy (%) | best.npz test (%) | runs | "
             "‖W_out − W_inᵀ‖/‖W_in‖ | cos(W_out, W_inᵀ) |", "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        runs = f"{row['runs']}" + (f" (+{row['diverged']} diverged)" if row["diverged"] else "")
        lr = "—" if row["lr"] is None else f"{row['lr']:g}"
        measures = ["—" if row[k] is None else f"{row[k]:.3g}" for k in ("breaking", "cos")]
        lines.append(f"| {row_label(row)} | {row['epochs']} | {lr} | "
                     f"{_percent(row['mean'], row['std'])} | {_percent(row['best'])} | {runs} | "
                     f"{' | '.join(measures)} |")
    return "\n".join(lines) + "\n"


def tuning_table(regime, results):
    """Mean final validation accuracy (%) of each lr of the grid on the tune seeds, per group."""
    lines = ["| model | epochs | " + " | ".join(f"lr {lr:g}" for lr in regime.tune_lr) + " |",
             "|---|---|" + "---|" * len(regime.tune_lr)]
    for model, lam, init, epochs in regime.groups():
        cells = []
        for lr in regime.tune_lr:
            runs = [results.get(Run(model, lam, init, float(lr), epochs, s))
                    for s in regime.tune_seeds]
            scores = [r["val_acc"] for r in runs if r and r["val_acc"] is not None]
            cells.append(_percent(mean_and_std(scores)[0]))
        row = dict(model=model, lam=lam, init=init)
        lines.append(f"| {row_label(row)} | {epochs} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(out, regimes, results, rates, log=print, partial=None):
    """results.md (protocol, a table per regime, the lr grids) and, with matplotlib,
    accuracy_vs_lambda.png, curves.png and (several regimes) regimes.png. `partial`:
    (finished, planned) run counts of a sweep not yet complete, stated at the top."""
    summaries = {regime.name: summarize(regime, results, rates) for regime in regimes}
    settings = next(iter(results.values()))["settings"] if results else {}
    protocol = ", ".join(f"{k}={v}" for k, v in sorted(settings.items())
                         if k not in RESUMABLE_CHANGES)
    parts = [f"# Symmetry-breaking sweep\n\nFinal-epoch test accuracy, mean ± sample std over "
             f"seeds; best.npz is the epoch of best validation accuracy.\nSettings: "
             f"{protocol}\n"]
    if partial:
        parts.append(f"\n**Partial: {partial[0]} of the {partial[1]} runs planned so far have "
                     f"finished**; rows average the seeds that have.\n")
    for regime in regimes:
        parts.append(f"\n## {REGIME_TITLES.get(regime.name, regime.name)}\n\nSeeds "
                     f"{list(regime.seeds)}.\n\n{markdown_table(summaries[regime.name])}")
        if regime.tune_lr:
            parts.append(f"\nValidation accuracy (%) of the lr grid, seeds "
                         f"{list(regime.tune_seeds)}:\n\n{tuning_table(regime, results)}")
    text = "".join(parts)
    atomic_write(os.path.join(out, "results.md"), lambda f: f.write(text.encode()))
    log(text)
    first = regimes[0]
    lam_rows = [r for r in summaries[first.name] if r["epochs"] == first.epochs[0]
                and r["init"] == "official"]
    figures = {"accuracy_vs_lambda.png": lambda path: plot_accuracy_vs_lambda(
                   lam_rows, path, title=f"test accuracy, {first.epochs[0]} epochs, "
                                         f"{len(first.seeds)} seed(s)"),
               "curves.png": lambda path: plot_curves(
                   [r for rows in summaries.values() for r in rows], path)}
    if len(regimes) > 1:
        figures["regimes.png"] = lambda path: plot_regimes(summaries, path)
    drawn = [name for name, draw in figures.items() if draw(os.path.join(out, name))]
    if drawn:
        log(f"table in {out}/results.md, figures {', '.join(drawn)} in {out}")
    else:
        log(f"table in {out}/results.md; matplotlib is not installed, so no figures "
            f"(pip install matplotlib, or refham[plot])")
