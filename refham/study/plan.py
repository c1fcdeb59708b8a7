"""What a sweep trains (the plan): the `Regime`s of an experiment, the `Run`s they need, and the
learning rate a tuned regime chooses on the validation split.

A regime trains its models × λ (AsymMixer only) × AsymMixer inits × budgets (epochs) × seeds at
one learning rate, or — with `tune_lr` — first every rate of the grid on `tune_seeds`, then all
seeds at the rate whose runs end with the best mean validation accuracy (`chosen_lr`; the test
split is never looked at). Runs are shared between regimes: the fixed-budget regime's lr-2e-3
seed-0 run is also a point of the lr grid.
"""
import collections
import dataclasses
import math

from refham.errors import RefhamError
from refham.asym_init import ASYM_INITS

SWEEP_SETTINGS = dict(data="digits", train_fraction=0.25, input_noise=0.6, size="digits",
                      epochs=40, batch_size=64, optimizer="adamw", lr=2e-3, weight_decay=0.05,
                      warmup=0.05, label_smoothing=0.1, progress=False)
SWEEP_LAMS = (1.0, 1e-1, 1e-2, 1e-3, 1e-4, 0.0)
SWEEP_SEEDS = (0, 1, 2, 3)
# what the sweep calls a model: a Mixer variant and its block norms' affine
LABELS = {"vanilla": "vanilla", "paramixer": "ParaMixer", "symmixer": "SymMixer",
          "symmixer-exact": "SymMixer (exact)", "asymmixer": "AsymMixer"}
ARMS = {"vanilla": ("vanilla", "element"), "paramixer": ("paramixer", "element"),
        "symmixer": ("symmixer", "element"), "symmixer-exact": ("symmixer", "scalar"),
        "asymmixer": ("asymmixer", "element")}
Run = collections.namedtuple("Run", "model lam asym_init lr epochs seed")


class SweepError(RefhamError, ValueError):
    """A sweep that cannot run as asked (e.g. its folder holds results of other settings)."""


@dataclasses.dataclass(frozen=True)
class Regime:
    """One arm of a sweep: every (model, λ, init) × epochs × seeds at `lr`, or at the rate of
    `tune_lr` chosen on validation with `tune_seeds` (the lr grid's runs), per (model, λ, init,
    epochs). λ applies to the AsymMixer only, as do `asym_inits`."""
    name: str
    models: tuple = tuple(ARMS)
    lams: tuple = SWEEP_LAMS
    seeds: tuple = SWEEP_SEEDS
    epochs: tuple = (40,)
    lr: float = 2e-3
    tune_lr: tuple = ()
    tune_seeds: tuple = (0,)
    asym_inits: tuple = ("official",)

    def __post_init__(self):
        unknown = sorted(set(self.models) - set(ARMS))
        if unknown or not self.models or not self.seeds or not self.epochs or (
                "asymmixer" in self.models and not (self.lams and self.asym_inits)):
            raise SweepError(f"a sweep needs models from {', '.join(ARMS)} (got "
                             f"{list(self.models)}), seeds, epochs, and λ values and inits for "
                             f"asymmixer")
        if any(not (isinstance(lam, (int, float)) and 0 <= lam < math.inf) for lam in self.lams):
            raise SweepError(f"λ values must be finite and ≥ 0, got {list(self.lams)}")
        rates = (self.lr,) + tuple(self.tune_lr)
        if any(not (isinstance(r, (int, float)) and 0 < r < math.inf) for r in rates):
            raise SweepError(f"learning rates must be finite and > 0, got {list(rates)}")
        if any(not (isinstance(e, int) and e > 0) for e in self.epochs):
            raise SweepError(f"epochs must be positive integers, got {list(self.epochs)}")
        if sorted(set(self.asym_inits) - set(ASYM_INITS)):
            raise SweepError(f"AsymMixer inits must be from {', '.join(ASYM_INITS)}, got "
                             f"{list(self.asym_inits)}")
        if self.tune_lr and not self.tune_seeds:
            raise SweepError("tuning the learning rate needs one or more tune seeds")

    def groups(self):
        """(model, λ, init, epochs) of every row of this regime, in table order."""
        return [(model, float(lam), init, epochs) for epochs in self.epochs
                for model in self.models
                for lam in (self.lams if model == "asymmixer" else (0.0,))
                for init in (self.asym_inits if model == "asymmixer" else ("official",))]


# The full study (docs/symmetry-study.md, which counts its runs): `refham sweep --study`.
STUDY_RATES = (2e-3, 8e-3, 3.2e-2)
STUDY_LAMS = (1.0, 1e-2, 0.0)
STUDY = (Regime("fixed"),
         Regime("long", lams=STUDY_LAMS, epochs=(120,)),
         Regime("tuned", lams=STUDY_LAMS, tune_lr=STUDY_RATES),
         Regime("init", models=("asymmixer",), lams=(0.0,), epochs=(40, 120),
                asym_inits=("zero", "para")))


def run_name(run):
    """The run's folder under out/runs, e.g. `asymmixer-lam0.01-para-lr0.002-e40-seed2`."""
    lam = f"-lam{run.lam:g}" if run.model == "asymmixer" else ""
    init = f"-{run.asym_init}" if run.asym_init != "official" else ""
    return f"{run.model}{lam}{init}-lr{run.lr:g}-e{run.epochs}-seed{run.seed}"


def chosen_lr(regime, group, results):
    """The rate of `regime.tune_lr` whose runs of `group` on the tune seeds end with the best
    mean validation accuracy (ties: the lower validation loss, then the smaller rate); the
    smallest rate when every rate diverged; None while some of those runs are missing."""
    model, lam, init, epochs = group
    scores = []
    for lr in regime.tune_lr:
        runs = [results.get(Run(model, lam, init, float(lr), epochs, seed))
                for seed in regime.tune_seeds]
        if None in runs:
            return None
        finished = [r for r in runs if r["val_acc"] is not None]
        if finished:
            scores.append((-sum(r["val_acc"] for r in finished) / len(finished),
                           sum(r["val_loss"] for r in finished) / len(finished), lr))
    return float(min(scores)[2] if scores else min(regime.tune_lr))


def plan(regimes, results):
    """(runs, rates): every Run the regimes need now, in order, and
    {(regime name, group): lr or None} — None for a tuned group whose grid is unfinished."""
    runs, rates = [], {}
    for regime in regimes:
        for group in regime.groups():
            model, lam, init, epochs = group
            if regime.tune_lr:
                runs += [Run(model, lam, init, float(lr), epochs, seed)
                         for lr in regime.tune_lr for seed in regime.tune_seeds]
                lr = chosen_lr(regime, group, results)
            else:
                lr = float(regime.lr)
            rates[regime.name, group] = lr
            if lr is not None:
                runs += [Run(model, lam, init, lr, epochs, seed) for seed in regime.seeds]
    # seed by seed, so that a sweep cut short has every regime on fewer seeds
    ordered = sorted(dict.fromkeys(runs), key=lambda run: run.seed)
    return ordered, rates
