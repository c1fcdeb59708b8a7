"""The sweep's figures (matplotlib, optional: each function returns False without it):
accuracy against λ, per-epoch validation curves, and the regimes side by side. Rows are
refham.study.report.summarize's."""
import math

from refham.files.outputs import atomic_write
from refham.study.plan import LABELS

COLOURS = {"vanilla": "tab:gray", "paramixer": "tab:blue", "symmixer": "tab:green",
           "symmixer-exact": "tab:olive"}
ASYM_COLOURS = ("tab:red", "tab:orange", "tab:brown", "tab:pink", "tab:purple", "tab:cyan",
                "black")                   # AsymMixer rows, by λ in the order they come


def _figure(size):
    """A matplotlib Figure (no pyplot state), or None without matplotlib."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    return Figure(figsize=size, layout="tight")


def _save(fig, path):
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))
    return True


def row_label(row):
    """'AsymMixer λ=0.01 (para init)', 'SymMixer (exact)', … for a row of a summary."""
    label = LABELS[row["model"]]
    if row["model"] == "asymmixer":
        label += f" λ={row['lam']:g}" + ("" if row["init"] == "official"
                                         else f" ({row['init']} init)")
    return label


def plot_accuracy_vs_lambda(rows, path, title=""):
    """AsymMixer accuracy against λ (log axis; λ = 0 drawn apart, left of a dotted break) with
    the other models as horizontal lines and ±std bands."""
    fig = _figure((6.4, 4.2))
    if fig is None:
        return False
    asym = [(row["lam"], row["mean"], row["std"]) for row in rows
            if row["model"] == "asymmixer" and row["mean"] is not None]
    positive = sorted(lam for lam, _, _ in asym if lam > 0) or [1e-4, 1.0]
    zero_at = positive[0] / 30                                  # where λ = 0 is drawn
    ax = fig.add_subplot()
    ax.set_xscale("log")
    for row in rows:
        model, mean, std = row["model"], row["mean"], row["std"]
        if model in COLOURS and mean is not None:
            ax.axhline(100 * mean, color=COLOURS[model], label=LABELS[model])
            if std is not None:
                ax.axhspan(100 * (mean - std), 100 * (mean + std), color=COLOURS[model],
                           alpha=0.15, linewidth=0)
    if asym:
        xs = [lam if lam > 0 else zero_at for lam, _, _ in asym]
        ax.errorbar(xs, [100 * m for _, m, _ in asym], yerr=[100 * (s or 0) for _, _, s in asym],
                    color="tab:red", marker="o", capsize=3, linestyle="none",
                    label="AsymMixer(λ)")
        ax.axvline(math.sqrt(zero_at * positive[0]), color="black", linestyle=":", linewidth=1)
    ax.set_xlim(zero_at / 3, positive[-1] * 3)
    ax.set_xticks([zero_at] + positive, ["0"] + [f"{lam:g}" for lam in positive])
    ax.minorticks_off()
    ax.set(xlabel="λ (penalty on the symmetry-breaking W₂)", ylabel="test accuracy (%)",
           title=title)
    ax.legend(fontsize="small")
    return _save(fig, path)


def plot_curves(rows, path):
    """Mean validation accuracy per epoch of every row, one panel per (regime, budget)."""
    panels = list(dict.fromkeys((row["regime"], row["epochs"]) for row in rows
                                if row["val_curve"]))
    fig = _figure((5.2 * min(len(panels), 3), 4.0 * math.ceil(len(panels) / 3) or 4.0))
    if fig is None:
        return False
    for index, (regime, epochs) in enumerate(panels, start=1):
        ax = fig.add_subplot(math.ceil(len(panels) / 3), min(len(panels), 3), index)
        lams = list(dict.fromkeys(row["lam"] for row in rows if row["model"] == "asymmixer"))
        for row in rows:
            if (row["regime"], row["epochs"]) == (regime, epochs) and row["val_curve"]:
                curve = row["val_curve"]
                colour = COLOURS.get(row["model"]) or \
                    ASYM_COLOURS[lams.index(row["lam"]) % len(ASYM_COLOURS)]
                ax.plot(range(1, len(curve) + 1), [100 * (v or 0) for v in curve], color=colour,
                        label=row_label(row), linewidth=1.2,
                        linestyle="-" if row["init"] == "official" else "--")
        ax.set(xlabel="epoch", ylabel="validation accuracy (%)", title=f"{regime}, {epochs} "
                                                                        f"epochs")
        ax.set_ylim(40, 100)
        ax.legend(fontsize="x-small")
    return _save(fig, path)


def plot_regimes(summaries, path):
    """Final test accuracy (mean ± std over seeds) of every row that two or more (regime,
    budget) series share, the series side by side: the one picture of the study."""
    series = {}
    for regime, rows in summaries.items():
        for row in rows:
            if row["mean"] is not None:
                series.setdefault(f"{regime}, {row['epochs']} epochs", {})[row_label(row)] = row
    counts = {}
    for rows in series.values():
        for label in rows:
            counts[label] = counts.get(label, 0) + 1
    labels = [label for label, n in counts.items() if n >= 2]
    fig = _figure((min(13.0, max(8.0, 0.45 * len(labels) * max(len(series), 1))), 4.6))
    if fig is None:
        return False
    ax = fig.add_subplot()
    width = 0.8 / max(len(series), 1)
    for k, (name, rows) in enumerate(series.items()):
        xs = [i + (k - (len(series) - 1) / 2) * width for i, label in enumerate(labels)
              if label in rows]
        present = [rows[label] for label in labels if label in rows]
        ax.bar(xs, [100 * r["mean"] for r in present], width,
               yerr=[100 * (r["std"] or 0) for r in present], capsize=2, label=name)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize="small")
    low = min((100 * r["mean"] for rows in series.values() for r in rows.values()), default=0)
    ax.set_ylim(max(0, 5 * math.floor(low / 5) - 5), 100)
    ax.set(ylabel="test accuracy (%)", title="digits, final epoch: the regimes side by side")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)
