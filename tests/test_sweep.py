"""The sweep's bookkeeping with a stand-in for `train`: which runs a regime plans, the lr chosen
on validation (never on test), skipping finished runs, stopping on a signal and continuing,
diverged runs, disjoint parts, the table's statistics and the figures."""
import json
import math
import os

import threading

import pytest

import refham.study.sweep as sweep
from refham.study.sweep import Regime, Run, SweepError, execute, run_name, run_study, run_sweep
from refham.study.plan import STUDY, chosen_lr, plan
from refham.study.plots import plot_accuracy_vs_lambda, plot_curves, plot_regimes
from refham.study.report import markdown_table, summarize
from refham.training.train import TrainingDiverged


def test_a_regime_plans_lambda_and_inits_for_the_asymmixer_only():
    regime = Regime("r", models=("paramixer", "symmixer-exact", "asymmixer"), lams=(1.0, 0.0),
                    seeds=(0, 1), epochs=(2, 5), asym_inits=("official", "para"))
    runs, rates = plan([regime], {})
    assert len(runs) == 2 * (2 + 2 * 2) * 2 and len(set(runs)) == len(runs)
    assert {(r.lam, r.asym_init) for r in runs if r.model != "asymmixer"} == {(0.0, "official")}
    assert {(r.lam, r.asym_init) for r in runs if r.model == "asymmixer"} == {
        (1.0, "official"), (1.0, "para"), (0.0, "official"), (0.0, "para")}
    assert [r.seed for r in runs] == sorted(r.seed for r in runs)   # seed by seed
    assert set(rates.values()) == {2e-3}
    assert run_name(Run("asymmixer", 0.01, "para", 2e-3, 40, 2)) == \
        "asymmixer-lam0.01-para-lr0.002-e40-seed2"
    for bad, match in ((dict(models=("mlp",)), "models from"), (dict(lams=(-1.0,)), "λ values"),
                       (dict(tune_lr=(0.0,)), "learning rates"), (dict(epochs=(0,)), "epochs"),
                       (dict(asym_inits=("ones",)), "inits must be from")):
        with pytest.raises(SweepError, match=match):
            Regime("bad", **bad)


def _record(run, val_acc, val_loss=1.0, test_acc=0.5):
    return {**run._asdict(), "val_acc": val_acc, "val_loss": val_loss, "test_acc": test_acc}


def test_the_lr_is_chosen_on_validation_never_on_test():
    regime = Regime("t", models=("paramixer",), seeds=(0, 1, 2), tune_lr=(1e-3, 1e-2, 1e-1),
                    tune_seeds=(0, 1))
    group = ("paramixer", 0.0, "official", 40)
    grid = {lr: [Run("paramixer", 0.0, "official", lr, 40, s) for s in (0, 1)]
            for lr in (1e-3, 1e-2, 1e-1)}
    results = {grid[1e-3][0]: _record(grid[1e-3][0], 0.9, test_acc=0.99)}
    runs, rates = plan([regime], results)
    assert rates["t", group] is None and len(runs) == 6      # the grid only, until it is done
    results.update({grid[1e-3][1]: _record(grid[1e-3][1], 0.7, test_acc=0.99),    # mean 0.8
                    grid[1e-2][0]: _record(grid[1e-2][0], 0.85, 0.5),             # mean 0.85
                    grid[1e-2][1]: _record(grid[1e-2][1], 0.85, 0.5),
                    grid[1e-1][0]: _record(grid[1e-1][0], 0.85, 0.4),             # tie, lower loss
                    grid[1e-1][1]: _record(grid[1e-1][1], None, None)})            # diverged
    assert chosen_lr(regime, group, results) == 1e-1
    results[grid[1e-1][0]]["val_loss"] = 0.6
    assert chosen_lr(regime, group, results) == 1e-2
    runs, rates = plan([regime], results)
    assert rates["t", group] == 1e-2
    for lr in grid:                                                   # all diverged: smallest
        results.update({run: _record(run, None, None) for run in grid[lr]})
    assert chosen_lr(regime, group, results) == 1e-3
    results[grid[1e-2][0]]["val_acc"], results[grid[1e-2][0]]["val_loss"] = 0.85, 0.5
    assert {r for r in runs if r.lr == 1e-2} == {Run("paramixer", 0.0, "official", 1e-2, 40, s)
                                                 for s in (0, 1, 2)}


class FakeTrain:
    """Accuracy = 0.5 + λ/10 + seed/100 (+ lr for the validation split); diverges or is
    interrupted on request; writes the metrics log the sweep reads its curves from."""

    def __init__(self, diverge=(), interrupt=()):
        self.calls, self.diverge, self.interrupt = [], set(diverge), set(interrupt)

    def __call__(self, cfg, resume=False, force=False):
        key = (cfg.model, cfg.lam, cfg.seed)
        self.calls.append((key, resume, cfg, threading.current_thread().name))
        os.makedirs(cfg.out, exist_ok=True)
        if key in self.interrupt:
            self.interrupt.discard(key)
            open(os.path.join(cfg.out, "last.npz"), "w").close()   # what an interrupt leaves
            return {"status": "interrupted", "signal": "SIGINT"}
        if key in self.diverge:
            raise TrainingDiverged("loss nan")
        acc = 0.5 + cfg.lam / 10 + cfg.seed / 100
        with open(os.path.join(cfg.out, "metrics.jsonl"), "w", encoding="utf-8") as f:
            for epoch in range(cfg.epochs):
                f.write(json.dumps({"epoch": epoch + 1, "train_acc": acc, "val_acc": acc,
                                    "symmetry": {"blocks.0.mlp_tokens.cos": 0.5}}) + "\n")
        return {"status": "finished", "test_acc": acc, "test_loss": 1.0, "train_loss": 1.0,
                "val_acc": acc + cfg.lr, "val_loss": 1.0, "wall_time": 2.0, "symmetry": {}}


def _lines(out):
    with open(os.path.join(out, "results.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_interrupted_sweep_continues_where_it_stopped(tmp_path, monkeypatch):
    out, logged = str(tmp_path), []
    fake = FakeTrain(interrupt=[("asymmixer", 1.0, 0)])
    monkeypatch.setattr(sweep, "train", fake)
    kwargs = dict(models=("symmixer", "asymmixer"), lams=(1.0, 0.0), seeds=(0, 1),
                  log=logged.append)
    results, finished = run_sweep(out, {"epochs": 3}, **kwargs)
    assert not finished and len(results) == 1 and len(_lines(out)) == 1
    assert "stopped by SIGINT during asymmixer-lam1-lr0.002-e3-seed0" in logged[-1]
    assert not os.path.exists(os.path.join(out, "results.md"))
    fake.calls.clear()
    results, finished = run_sweep(out, {"epochs": 3}, **kwargs)
    assert finished and len(results) == 6 and len(_lines(out)) == 6
    assert fake.calls[0][:2] == (("asymmixer", 1.0, 0), True)   # resumed from its last.npz
    assert [call[1] for call in fake.calls[1:]] == [False] * 4
    assert all(call[2].eval_every == 3 for call in fake.calls)   # test once, at the end
    assert results[0]["curves"]["val_acc"] == [results[0]["test_acc"]] * 3
    fake.calls.clear()
    run_sweep(out, {"epochs": 3, "progress": True}, **kwargs)   # display-only change: all done
    assert fake.calls == []
    with pytest.raises(SweepError, match=r"differing: \['weight_decay'\]"):
        run_sweep(out, {"epochs": 3, "weight_decay": 0.1}, **kwargs)
    with pytest.raises(SweepError, match=r"sets \['seed'\] itself"):
        run_sweep(out, {"seed": 3}, **kwargs)
    with pytest.raises(SweepError, match=r"the study sets \['lr'\]"):
        run_study(out, {"lr": 0.1})


def test_damaged_results_lines_are_ignored_and_their_runs_trained_again(tmp_path, monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(sweep, "train", fake)
    kwargs = dict(models=("symmixer",), seeds=(0, 1, 2), log=lambda line: None)
    run_sweep(str(tmp_path), {"epochs": 1}, **kwargs)
    lines = open(tmp_path / "results.jsonl", "rb").read().splitlines()
    damaged = [b"[1, 2]", b"\xff" + lines[1], lines[2].replace(b'"seed": 2', b'"seed": [2]')]
    (tmp_path / "results.jsonl").write_bytes(b"\n".join([lines[0], *damaged]) + b"\n")
    fake.calls.clear()
    results, finished = run_sweep(str(tmp_path), {"epochs": 1}, **kwargs)
    assert finished and [call[0] for call in fake.calls] == [("symmixer", 0.0, 1),
                                                             ("symmixer", 0.0, 2)]
    assert [r["seed"] for r in results] == [0, 1, 2]


def test_diverged_runs_are_recorded_and_counted_apart(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "train", FakeTrain(diverge=[("asymmixer", 1.0, 1)]))
    results, finished = run_sweep(str(tmp_path), {"epochs": 1}, models=("asymmixer",),
                                  lams=(1.0,), seeds=(0, 1, 2), log=lambda line: None)
    assert finished and [r["status"] for r in results] == ["finished", "diverged", "finished"]
    assert "loss nan" in results[1]["error"]
    with open(tmp_path / "results.md", encoding="utf-8") as f:
        assert "| AsymMixer λ=1 | 1 | 0.002 | 61.00 ± 1.41 | — | 2 (+1 diverged) |" in f.read()


def test_parts_train_disjoint_runs_and_the_last_one_writes_the_report(tmp_path, monkeypatch):
    fake = FakeTrain()
    monkeypatch.setattr(sweep, "train", fake)
    regimes = [Regime("fixed", models=("paramixer", "asymmixer"), lams=(0.1, 0.0),
                      seeds=(0, 1, 2), epochs=(1,)),
               Regime("tuned", models=("asymmixer",), lams=(0.0,), seeds=(0, 1), epochs=(1,),
                      tune_lr=(1e-3, 2e-3))]
    logged, done = {1: [], 2: []}, {}

    def part(i):
        done[i] = execute(str(tmp_path), regimes, {}, part=(i, 2), log=logged[i].append,
                          poll=0.01)[0]
    other = threading.Thread(target=part, args=(1,), name="part 1")
    other.start()
    part(2)
    other.join(timeout=60)
    outs = {i: [call[2].out for call in fake.calls if (call[3] == "part 1") == (i == 1)]
            for i in (1, 2)}
    assert not set(outs[1]) & set(outs[2])
    # fixed: 3 paramixer + 6 asymmixer runs; tuned: the grid's lr 1e-3 run (its 2e-3 runs,
    # the chosen rate, are the fixed regime's own)
    assert len(outs[1]) + len(outs[2]) == 10 == len(_lines(str(tmp_path)))
    # the part that finishes last writes the report; when both finish together both may
    assert sum("other parts are pending" in lines[-1] for lines in logged.values()) <= 1
    assert len(done[1]) == 10 or len(done[2]) == 10
    text = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "Validation accuracy (%) of the lr grid" in text
    assert "| AsymMixer λ=0 | 1 | 0.002 |" in text


def test_summary_statistics_and_table():
    regime = Regime("fixed", models=("paramixer", "asymmixer", "symmixer"), lams=(0.01, 0.0),
                    seeds=(0, 1, 2))
    results = {}
    for seed, acc in enumerate([0.90, 0.92, 0.97]):
        run = Run("paramixer", 0.0, "official", 2e-3, 40, seed)
        results[run] = {"test_acc": acc, "best_test_acc": acc - 0.01, "symmetry": {},
                        "curves": {"val_acc": [0.5, acc]}}
    run = Run("asymmixer", 0.01, "official", 2e-3, 40, 0)
    results[run] = {"test_acc": 0.8, "symmetry": {
        "blocks.0.mlp_tokens.breaking_ratio": 0.2, "blocks.0.mlp_tokens.cos": 0.9,
        "blocks.0.mlp_channels.breaking_ratio": 0.4}, "curves": None}
    rates = {("fixed", group): 2e-3 for group in regime.groups()}
    para, asym, asym0, sym = summarize(regime, results, rates)
    assert (para["model"], para["runs"], para["diverged"]) == ("paramixer", 3, 0)
    assert para["mean"] == pytest.approx(0.93) and para["best"] == pytest.approx(0.92)
    assert para["std"] == pytest.approx(math.sqrt(0.0013))       # sample std: n − 1
    assert para["val_curve"] == pytest.approx([0.5, 0.93])
    assert (asym["mean"], asym["std"], asym["breaking"], asym["cos"]) == \
        (0.8, None, pytest.approx(0.3), pytest.approx(0.9))
    assert (asym0["mean"], asym0["runs"], sym["runs"]) == (None, 0, 0)
    table = markdown_table([para, asym, asym0]).splitlines()
    assert table[2] == "| ParaMixer | 40 | 0.002 | 93.00 ± 3.61 | 92.00 | 3 | — | — |"
    assert table[3] == "| AsymMixer λ=0.01 | 40 | 0.002 | 80.00 | — | 1 | 0.3 | 0.9 |"
    assert table[4] == "| AsymMixer λ=0 | 40 | 0.002 | — | — | 0 | — | — |"


def test_the_study_covers_every_regime_and_the_exact_symmixer():
    runs, rates = plan(STUDY, {})
    assert {r.model for r in runs} >= {"symmixer-exact", "vanilla", "paramixer", "asymmixer"}
    assert {name for name, _ in rates} == {"fixed", "tuned", "long", "init"}
    assert all(("symmixer-exact", 0.0, "official", 120) in [g for n, g in rates if n == name]
               for name in ("long",))
    assert sum(r.epochs for r in runs) / 40 < 200          # its cost, before the tuned runs


def test_figures_are_written_or_their_absence_reported(tmp_path, monkeypatch):
    rows = [dict(regime="fixed", model="paramixer", lam=0.0, init="official", epochs=40,
                 mean=0.9, std=0.01, val_curve=[0.5, 0.9]),
            dict(regime="fixed", model="asymmixer", lam=0.1, init="official", epochs=40,
                 mean=0.85, std=None, val_curve=[0.4, 0.85]),
            dict(regime="fixed", model="asymmixer", lam=0.0, init="para", epochs=40,
                 mean=0.88, std=0.02, val_curve=None)]
    long = [dict(row, regime="long", epochs=120, mean=row["mean"] + 0.05) for row in rows]
    pytest.importorskip("matplotlib")
    for name, draw in (("lam.png", lambda p: plot_accuracy_vs_lambda(rows, p)),
                       ("curves.png", lambda p: plot_curves(rows + long, p)),
                       ("regimes.png", lambda p: plot_regimes({"fixed": rows, "long": long},
                                                              p))):
        assert draw(str(tmp_path / name)) is True
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    assert plot_curves(rows, str(tmp_path / "none.png")) is False
    assert not (tmp_path / "none.png").exists()


def test_report_only_trains_nothing_and_marks_a_partial_sweep(tmp_path, monkeypatch):
    fake = FakeTrain(interrupt=[("paramixer", 0.0, 1)])
    monkeypatch.setattr(sweep, "train", fake)
    kwargs = dict(models=("paramixer",), seeds=(0, 1, 2), log=lambda line: None)
    run_sweep(str(tmp_path), {"epochs": 2}, **kwargs)           # seed 0 done, then stopped
    fake.calls.clear()
    results, _ = run_sweep(str(tmp_path), {"epochs": 2}, report_only=True, **kwargs)
    assert fake.calls == [] and len(results) == 1
    text = (tmp_path / "results.md").read_text(encoding="utf-8")
    assert "**Partial: 1 of the 3 runs planned so far have finished**" in text
    assert "| ParaMixer | 2 | 0.002 | 50.00 | — | 1 |" in text
