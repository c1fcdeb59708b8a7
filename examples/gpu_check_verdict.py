"""The pass/fail judgements of examples/gpu_check.sh, one line each (exit 0: PASS, 1: FAIL).

    python examples/gpu_check_verdict.py bench bench32.json       # every refham/torch ratio ≥ 1.0
    python examples/gpu_check_verdict.py digits digits.json 20    # GPU vs CPU digits run, 20 epochs
"""
import json
import sys
import tempfile

TARGET_RATIO = 1.0        # refham at least as fast as PyTorch eager on the same GPU
ACCURACY_POINTS = 0.5     # GPU and CPU test accuracy within half a percentage point


def bench_verdict(path):
    """(passed, line) from examples/bench.py's --json file."""
    with open(path, encoding="utf-8") as f:
        results = json.load(f)["results"]
    ratios = {r["model"]: r.get("ratio") for r in results}
    if any(ratio is None for ratio in ratios.values()):   # --no-torch (dry run): no peer timed
        return True, "refham alone: " + ", ".join(
            f"{r['model']} {r['refham']['img_per_s']:.0f} img/s" for r in results)
    line = ", ".join(f"{model} {ratio:.2f}x" for model, ratio in ratios.items())
    return min(ratios.values()) >= TARGET_RATIO, f"refham/torch img/s: {line} (target ≥ " \
                                                 f"{TARGET_RATIO}x)"


def digits_verdict(path, epochs):
    """Train ParaMixer on digits with the same seed on cupy and on numpy; (passed, line)."""
    from refham.training.train import train
    from refham.training.train_config import TrainConfig
    results = {}
    for backend in ("cupy", "numpy"):
        with tempfile.TemporaryDirectory() as out:
            summary = train(TrainConfig(model="paramixer", data="digits", epochs=epochs, seed=0,
                                        backend=backend, out=out, progress=False))
        results[backend] = {k: summary[k] for k in ("test_acc", "train_loss", "img_per_s",
                                                    "wall_time")}
        print(backend, results[backend], flush=True)
    gap = 100 * abs(results["cupy"]["test_acc"] - results["numpy"]["test_acc"])
    results["gap_points"] = gap
    with open(path, "w", encoding="utf-8") as f:
        json.dump(results, f, indent=1)
    return gap <= ACCURACY_POINTS, (f"test accuracy GPU {100 * results['cupy']['test_acc']:.2f}%, "
                                    f"CPU {100 * results['numpy']['test_acc']:.2f}% (gap {gap:.2f} "
                                    f"points, allowed {ACCURACY_POINTS})")


def main(argv):
    kind, path = argv[0], argv[1]
    passed, line = bench_verdict(path) if kind == "bench" else digits_verdict(path, int(argv[2]))
    print(line)
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
