#!/usr/bin/env bash
# The GPU check of refham, sized for a lent GPU machine: ≤ 8 minutes, no network, only what that
# machine has (Python 3.12, CUDA 13, cupy-cuda13x, NCCL, mpi4py, PyTorch, scipy, scikit-learn,
# tqdm, threadpoolctl, pytest, hypothesis) plus any wheels in ./.whl (docs/gpu.md says which and
# how to download them). Each part has its own time limit and a PASS/FAIL line in summary.txt.
#
#   bash examples/gpu_check.sh OUT_DIR              # on the GPU machine
#   bash examples/gpu_check.sh OUT_DIR --dry-run    # here: every part's logic on the CPU, the
#                                                   # CuPy stand-in as cupy, tiny sizes
# Parts (OUT_DIR files):
#   env       env.txt           nvidia-smi, versions
#   suite     suite.log         the suite with REFHAM_BACKEND=cupy (autograd tests skip without it)
#   bench32   bench32.{json,txt} refham (CuPy) vs PyTorch eager, float32, TF32 off, 32×32 images,
#                               `small` (patch 4, C 256, depth 8), batch 512, all four variants:
#                               PASS when every refham/torch throughput ratio is ≥ 1.0
#   bench_s16 bench_s16.{json,txt} the same at Mixer-S/16 (224², patch 16, C 512), batch 128
#   digits    digits.json       ParaMixer on digits, same seed and budget on the GPU and the CPU:
#                               PASS when the test accuracies differ by ≤ 0.5 points
set -u -o pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: gpu_check.sh OUT_DIR [--dry-run]}
DRY=${2:-}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HYPOTHESIS_PROFILE=ci
if ls .whl/*.whl >/dev/null 2>&1; then    # carried wheels (no network there)
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/refham_site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/refham_site"
fi
# sizes of each part: on the GPU, and in the dry run (the stand-in is NumPy: tiny sizes)
if [ "$DRY" = --dry-run ]; then
    export REFHAM_CUPY_STANDIN=1 PYTHONPATH="$PWD/tests/standin_site:$PYTHONPATH"
    SUITE=(tests/test_cupy_standin.py tests/test_backend.py) BENCH_TORCH=--no-torch
    B32=(--config tiny --batch 8 --depth 1 --steps 1 --warmup 1)
    BS16=(--config tiny --batch 4 --depth 1 --steps 1 --warmup 0) EPOCHS=2
else
    SUITE=(tests -n 4) BENCH_TORCH=
    B32=(--config small --batch 512 --steps 20 --warmup 5)
    BS16=(--config s16 --batch 128 --steps 6 --warmup 3) EPOCHS=20
fi
: > "$OUT/summary.txt"
verdict() {  # verdict PART STATUS DETAIL: one summary line
    local word=PASS
    [ "$2" -eq 0 ] || word=FAIL
    [ "$2" -eq 124 ] && word="FAIL (time limit)"
    echo "$1: $word $3" | tee -a "$OUT/summary.txt"
}

# env (10 s)
{ timeout 30 nvidia-smi 2>&1 || echo "no nvidia-smi"
  timeout 60 $PY -c "import numpy, cupy, torch; print('numpy', numpy.__version__, '| cupy',
cupy.__version__, '| torch', torch.__version__, '| cuda', torch.version.cuda)"
} > "$OUT/env.txt" 2>&1

# suite (≤ 180 s): collection errors or failures fail the part; skips are listed in the log
REFHAM_BACKEND=cupy timeout 180 $PY -m pytest -q -p no:cacheprovider -rs "${SUITE[@]}" \
    > "$OUT/suite.log" 2>&1
verdict suite $? "($(tail -1 "$OUT/suite.log"))"

bench() {  # bench NAME LIMIT ARGS...: refham vs torch; PASS if every ratio ≥ 1.0
    local name=$1 limit=$2 status
    shift 2
    timeout "$limit" $PY examples/bench.py --backend cupy --dtype float32 $BENCH_TORCH "$@" \
        --json "$OUT/$name.json" > "$OUT/$name.txt" 2>&1
    status=$?
    if [ $status -eq 0 ]; then
        detail=$($PY examples/gpu_check_verdict.py bench "$OUT/$name.json")
        status=$?
    else
        detail="(bench exited $status; see $name.txt)"
    fi
    verdict "$name" $status "$detail"
}
bench bench32 90 "${B32[@]}"
bench bench_s16 90 "${BS16[@]}"

# digits (≤ 100 s): the same run on the GPU and on the CPU, test accuracy within 0.5 points
timeout 100 $PY examples/gpu_check_verdict.py digits "$OUT/digits.json" "$EPOCHS" \
    > "$OUT/digits.txt" 2>&1
status=$?
verdict digits $status "$(tail -1 "$OUT/digits.txt")"
grep -q FAIL "$OUT/summary.txt" && exit 1
exit 0
