#!/usr/bin/env bash
# GPU verification of refham, for a machine with an NVIDIA GPU, CuPy and PyTorch (CUDA).
#
#   bash examples/gpu_check.sh [OUT_DIR] [bench|train|tests|dist|all]  (default: gpu_check_out all)
#
# Writes into OUT_DIR (at most 8 files):
#   env.txt                   nvidia-smi, versions
#   bench_32px.{txt,json}     refham (CuPy) vs torch (CUDA) eager, float32, TF32 off: 32×32 images,
#                             patch 4, C=256, depth 8 (`small`), batch 512, all four variants
#   bench_s16.{txt,json}      the same at Mixer-S/16 (224×224, patch 16, C=512, depth 8), batch 128
#   train.json                digits, ParaMixer, same seed and budget on the GPU and on the CPU:
#                             final test accuracy of each (they should agree within noise)
#   tests_cupy.log            the whole test suite with REFHAM_BACKEND=cupy
#   dist.log                  data parallelism, `mpiexec -n 2` against one process:
#                             2 ranks on CuPy arrays over MPI (staged through the host; one GPU
#                             is enough) and, with two or more GPUs, 2 ranks over NCCL
# Missing Python packages: autograd (tests only) and mpi4py + mpich (dist) are installed from
# ./.whl if that folder holds their wheels (no network needed), else from PyPI.
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check_out}
PARTS=${2:-all}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
status=0

want() { [ "$PARTS" = all ] || [ "$PARTS" = "$1" ]; }

need() {  # need MODULE PACKAGE...: if MODULE is missing, install the packages from ./.whl, else PyPI
    local module=$1 wheels=()
    shift
    $PY -c "import $module" 2>/dev/null && return
    for package in "$@"; do wheels+=(.whl/"$package"-*.whl); done
    if ls "${wheels[@]}" >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --target /tmp/refham_site "${wheels[@]}"
        export PYTHONPATH="$PYTHONPATH:/tmp/refham_site" PATH="$PATH:/tmp/refham_site/bin"
    else
        $PY -m pip install -q "$@"
    fi
}

{
    nvidia-smi
    $PY -c "import numpy, cupy, torch; print('numpy', numpy.__version__, '| cupy', cupy.__version__,
'| torch', torch.__version__, '| cuda', torch.version.cuda, '|', torch.cuda.get_device_name())"
} > "$OUT/env.txt" 2>&1

if want bench; then
    $PY examples/bench.py --backend cupy --config small --batch 512 --steps 20 --warmup 5 \
        --json "$OUT/bench_32px.json" 2>&1 | tee "$OUT/bench_32px.txt" || status=1
    $PY examples/bench.py --backend cupy --config s16 --batch 128 --steps 10 --warmup 3 \
        --json "$OUT/bench_s16.json" 2>&1 | tee "$OUT/bench_s16.txt" || status=1
fi

if want train; then
    $PY - "$OUT/train.json" <<'EOF' || status=1
import json, sys, tempfile, time
from refham.training.train import train
from refham.training.train_config import TrainConfig

results = {}
for backend in ("cupy", "numpy"):
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        summary = train(TrainConfig(model="paramixer", data="digits", epochs=20, seed=0,
                                    backend=backend, out=out, progress=False))
        results[backend] = {"test_acc": summary["test_acc"], "train_loss": summary["train_loss"],
                            "img_per_s": summary["img_per_s"],
                            "seconds": time.perf_counter() - started}
        print(backend, results[backend], flush=True)
results["abs_acc_difference"] = abs(results["cupy"]["test_acc"] - results["numpy"]["test_acc"])
with open(sys.argv[1], "w") as f:
    json.dump(results, f, indent=1)
EOF
fi

if want tests || want dist; then
    need autograd autograd
fi
if want tests; then
    REFHAM_BACKEND=cupy HYPOTHESIS_PROFILE=ci $PY -m pytest -q -p no:cacheprovider tests \
        2>&1 | tee "$OUT/tests_cupy.log" || status=1
fi
if want dist; then
    need mpi4py mpi4py mpich
    HYPOTHESIS_PROFILE=ci $PY -m pytest -q -p no:cacheprovider -rs tests/test_distributed.py \
        -k "cupy or nccl" 2>&1 | tee "$OUT/dist.log" || status=1
fi
echo "results in $OUT (exit $status)"
exit $status
