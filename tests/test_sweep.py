"""The sweep's bookkeeping with a stand-in for `train`: which runs exist, skipping finished ones,
stopping on a signal and continuing, diverged runs, the table's statistics, the plot."""
import json
import math
import os

import pytest

import refham.sweep as sweep
from refham.sweep import (
    SWEEP_LAMS, SweepError, markdown_table, plot_accuracy_vs_lambda, run_sweep, summarize,
    sweep_runs)
from refham.train import TrainingDiverged


def test_sweep_runs_vary_lambda_for_the_asymmixer_only():
    runs = sweep_runs()
    assert len(runs) == (3 + len(SWEEP_LAMS)) * 4
    assert {lam for model, lam, _ in runs if model != "asymmixer"} == {0.0}
    assert sorted({lam for model, lam, _ in runs if model == "asymmixer"}) == sorted(SWEEP_LAMS)
    with pytest.raises(SweepError, match="models from"):
        sweep_runs(models=("paramixer", "mlp"))
    with pytest.raises(SweepError, match="λ values for asymmixer"):
        sweep_runs(models=("asymmixer",), lams=())


class FakeTrain:
    """Accuracy = 0.5 + λ/10 + seed/100; diverges or is interrupted on request."""

    def __init__(self, diverge=(), interrupt=()):
        self.calls, self.diverge, self.interrupt = [], set(diverge), set(interrupt)

    def __call__(self, cfg, resume=False):
        key = (cfg.model, cfg.lam, cfg.seed)
        self.calls.append((key, resume))
        os.makedirs(cfg.out, exist_ok=True)
        if key in self.interrupt:
            self.interrupt.discard(key)
            open(os.path.join(cfg.out, "last.npz"), "w").close()   # what an interrupt leaves
            return {"status": "interrupted", "signal": "SIGINT"}
        if key in self.diverge:
            raise TrainingDiverged("loss nan")
        return {"status": "finished", "test_acc": 0.5 + cfg.lam / 10 + cfg.seed / 100,
                "test_loss": 1.0, "train_loss": 1.0, "wall_time": 2.0, "symmetry": {}}


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
    assert not finished and len(results) == 2 and len(_lines(out)) == 2
    assert "stopped by SIGINT during asymmixer-lam1-seed0" in logged[-1]
    assert not os.path.exists(os.path.join(out, "results.md"))
    fake.calls.clear()
    results, finished = run_sweep(out, {"epochs": 3}, **kwargs)
    assert finished and len(results) == 6 and len(_lines(out)) == 6
    assert fake.calls[0] == (("asymmixer", 1.0, 0), True)   # resumed from its last.npz
    assert [resume for _, resume in fake.calls[1:]] == [False] * 3
    assert all(r["settings"]["eval_every"] == 3 for r in results)   # evaluate once, at the end
    fake.calls.clear()
    run_sweep(out, {"epochs": 3, "progress": True}, **kwargs)   # display-only change: all done
    assert fake.calls == []
    with pytest.raises(SweepError, match=r"differing: \['epochs'\]"):
        run_sweep(out, {"epochs": 4}, **kwargs)
    with pytest.raises(SweepError, match=r"sets \['seed'\] itself"):
        run_sweep(out, {"seed": 3}, **kwargs)


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
    assert finished and [key for key, _ in fake.calls] == [("symmixer", 0.0, 1),
                                                           ("symmixer", 0.0, 2)]
    assert [r["seed"] for r in results] == [0, 1, 2]


def test_diverged_runs_are_recorded_and_counted_apart(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep, "train", FakeTrain(diverge=[("asymmixer", 1.0, 1)]))
    results, finished = run_sweep(str(tmp_path), {"epochs": 1}, models=("asymmixer",),
                                  lams=(1.0,), seeds=(0, 1, 2), log=lambda line: None)
    assert finished and [r["status"] for r in results] == ["finished", "diverged", "finished"]
    assert "loss nan" in results[1]["error"]
    with open(tmp_path / "results.md", encoding="utf-8") as f:
        assert "| AsymMixer | 1 | 61.00 ± 1.41 | 2 (+1 diverged) | — |" in f.read()


def test_summary_statistics_and_table():
    symmetry = {"blocks.0.mlp_tokens.breaking_ratio": 0.2, "blocks.0.mlp_tokens.cos": 0.9,
                "blocks.0.mlp_channels.breaking_ratio": 0.4}
    results = [{"model": "paramixer", "lam": 0.0, "seed": s, "test_acc": a, "symmetry": {}}
               for s, a in enumerate([0.90, 0.92, 0.97])]
    results += [{"model": "asymmixer", "lam": 0.01, "seed": 0, "test_acc": 0.8,
                 "symmetry": symmetry}]
    rows = summarize(results, models=("paramixer", "asymmixer", "symmixer"), lams=(0.01, 0.0))
    para, asym, asym0, sym = rows
    assert (para["model"], para["lam"], para["runs"], para["diverged"]) == \
        ("paramixer", None, 3, 0)
    assert para["mean"] == pytest.approx(0.93)
    assert para["std"] == pytest.approx(math.sqrt(0.0013))       # sample std: n − 1
    assert (asym["mean"], asym["std"], asym["breaking"]) == (0.8, None, pytest.approx(0.3))
    assert (asym0["mean"], asym0["runs"], sym["runs"]) == (None, 0, 0)
    table = markdown_table(rows).splitlines()
    assert table[2] == "| ParaMixer | — | 93.00 ± 3.61 | 3 | — |"
    assert table[3] == "| AsymMixer | 0.01 | 80.00 | 1 | 0.3 |"
    assert table[4] == "| AsymMixer | 0 | — | 0 | — |"


def test_plot_is_written_or_its_absence_reported(tmp_path, monkeypatch):
    rows = summarize([{"model": "paramixer", "lam": 0.0, "seed": 0, "test_acc": 0.9},
                      {"model": "asymmixer", "lam": 0.1, "seed": 0, "test_acc": 0.85},
                      {"model": "asymmixer", "lam": 0.0, "seed": 0, "test_acc": 0.88}],
                     models=("paramixer", "asymmixer"), lams=(0.1, 0.0))
    pytest.importorskip("matplotlib")
    path = tmp_path / "plot.png"
    assert plot_accuracy_vs_lambda(rows, str(path)) is True
    assert path.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(__import__("sys").modules, "matplotlib.figure", None)
    assert plot_accuracy_vs_lambda(rows, str(tmp_path / "none.png")) is False
    assert not (tmp_path / "none.png").exists()
