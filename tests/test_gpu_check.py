"""examples/gpu_check_verdict.py, the pass/fail lines of examples/gpu_check.sh (the script itself
runs on a GPU machine; `gpu_check.sh OUT --dry-run` runs its parts here on the CuPy stand-in)."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
import gpu_check_verdict as verdict  # noqa: E402


def _bench_file(tmp_path, ratios):
    results = [{"model": model, "ratio": ratio, "refham": {"img_per_s": 100.0}}
               for model, ratio in ratios.items()]
    path = tmp_path / "bench.json"
    path.write_text(json.dumps({"environment": {}, "results": results}))
    return str(path)


@pytest.mark.parametrize("ratios, passed", [
    ({"vanilla": 1.2, "paramixer": 1.0, "symmixer": 1.4, "asymmixer": 1.1}, True),
    ({"vanilla": 1.2, "paramixer": 0.99, "symmixer": 1.4, "asymmixer": 1.1}, False),
])
def test_bench_passes_only_when_every_variant_reaches_the_target(tmp_path, ratios, passed):
    ok, line = verdict.bench_verdict(_bench_file(tmp_path, ratios))
    assert ok is passed and "paramixer" in line and "target" in line


def test_bench_without_the_peer_reports_refham_alone(tmp_path):
    ok, line = verdict.bench_verdict(_bench_file(tmp_path, {"vanilla": None}))
    assert ok and line.startswith("refham alone")


def test_digits_compares_the_gpu_run_with_the_cpu_run(standin, tmp_path, monkeypatch):
    accuracies = {"cupy": 0.912, "numpy": 0.918}

    def fake_train(cfg):
        return {"test_acc": accuracies[cfg.backend], "train_loss": 0.1, "img_per_s": 1.0,
                "wall_time": 1.0}
    monkeypatch.setattr("refham.training.train.train", fake_train)
    ok, line = verdict.digits_verdict(str(tmp_path / "digits.json"), 1)
    assert not ok and "gap 0.60 points" in line
    accuracies["cupy"] = 0.915
    assert verdict.digits_verdict(str(tmp_path / "digits.json"), 1)[0]
