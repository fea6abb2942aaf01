#!/usr/bin/env bash
# One GPU check, at most ~8 minutes on one H100: the CUDA tests and the throughput benchmark of the paper pair
# (WRN-34-10 -> ResNet-18, synthetic CIFAR-shaped data): batch 128 and 512, fp32 vs bf16, compile off/on, then
# 3 epochs for seconds per epoch and memory growth.
#
#   bash benchmarks/gpu_check.sh                 # from the repository root; tables go to $OUT (or benchmarks/results/gpu_check)
#
# Every step is independent (a failure or a timeout is reported and the script goes on), has its own time limit,
# and writes its log, JSON and Markdown rows to $OUT as it finishes; optional steps are skipped when the total
# budget (BUDGET_S, default 470 s) would be exceeded. Needs: torch with CUDA, torchvision, timm, tqdm, numpy, pytest
# (no torchattacks: the tests run here do not import it).
set -u
set -o pipefail

cd "$(dirname "$0")/.." || exit 1
ROOT="$PWD"
OUT="${OUT:-$ROOT/benchmarks/results/gpu_check}"
mkdir -p "$OUT"
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
PY="${PYTHON:-python}"
BUDGET_S="${BUDGET_S:-470}"
START=$(date +%s)
SUMMARY="$OUT/summary.md"
TABLE="$OUT/throughput.md"
printf '| step | exit code | seconds | last line |\n|---|---|---|---|\n' > "$SUMMARY"

elapsed() { echo $(( $(date +%s) - START )); }

# step NAME LIMIT_S MIN_S COMMAND...: runs COMMAND with a time limit of min(LIMIT_S, budget left); skipped when less
# than MIN_S of the budget is left. Output goes to the terminal and to $OUT/NAME.log.
step() {
    local name="$1" limit="$2" min="$3"; shift 3
    local left=$(( BUDGET_S - $(elapsed) ))
    if (( left < min )); then
        echo "=== [$name] SKIPPED: ${left}s of the ${BUDGET_S}s budget left, needs ${min}s"
        echo "| $name | skipped | 0 | budget |" >> "$SUMMARY"
        return 0
    fi
    (( limit > left )) && limit=$left
    echo
    echo "=== [$name] start at $(elapsed)s, limit ${limit}s: $*"
    local t0=$(date +%s)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    local dt=$(( $(date +%s) - t0 ))
    local last
    last=$(tail -n 1 "$OUT/$name.log" | tr '|' '/' | cut -c1-150)
    [[ $rc == 124 || $rc == 137 ]] && last="TIMED OUT after ${limit}s; $last"
    echo "=== [$name] exit code $rc in ${dt}s"
    echo "| $name | $rc | $dt | $last |" >> "$SUMMARY"
}

bench() {  # bench NAME LIMIT MIN ARGS...: the throughput benchmark, rows into $TABLE, JSON into $OUT
    local name="$1" limit="$2" min="$3"; shift 3
    step "$name" "$limit" "$min" "$PY" benchmarks/throughput.py --pair paper --device cuda --steps 4 --repeats 3 \
        --results "$TABLE" --json "$OUT/$name.json" "$@"
}

step env 60 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; \
    $PY -c 'import torch, torchvision, timm; print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, \
\"torchvision\", torchvision.__version__, \"timm\", timm.__version__, torch.cuda.get_device_name(0))'; \
    git -C '$ROOT' rev-parse --short HEAD 2>/dev/null || true"

# The throughput benchmark of the paper pair. Speedup: ardir (channels_last on CUDA, GPU-resident loader) against
# the reference loop (fp32, NCHW, DataLoader with 2 workers and torchvision transforms), alternated, median of 3.
bench b128_fp32 75 45 --batch-size 128 --precision fp32
bench b128_bf16 75 45 --batch-size 128 --precision bf16
bench b512_bf16 90 60 --batch-size 512 --precision bf16
bench b512_fp32 90 60 --batch-size 512 --precision fp32

# CUDA tests: no host sync in the attack, bf16/fp16 + channels_last, compile, memory across epochs, bf16 vs fp32
# robust accuracy (prints both), GPU loader, DDP on 2 CPU processes (gloo).
step tests 150 60 "$PY" -m pytest -q -rs -s -p no:cacheprovider -m "slow or not slow" tests/test_speed.py tests/test_ddp.py

# 3 CIFAR-10-sized epochs (50,000 synthetic images, GPU-resident loader) with the trainer, bf16, batch 512:
# seconds per epoch, and peak memory epoch 1 vs 3 (<= 5 %). Each epoch prints as it ends.
step epochs_b512_bf16 150 90 "$PY" benchmarks/throughput.py --pair paper --device cuda --batch-size 512 \
    --precision bf16 --epochs-check 3 --epoch-images 50000 --json "$OUT/epochs_b512_bf16.json"

# torch.compile of the attack's forward passes (compilation happens in the warm-up run).
bench b512_bf16_compile 200 120 --batch-size 512 --precision bf16 --compile
bench b128_bf16_compile 150 100 --batch-size 128 --precision bf16 --compile

# Candidates not yet measured on a GPU (run when the budget allows): CUDA graphs against batch 128's launch-bound
# steps, and kernel autotuning at batch 512. Either becomes a Trainer option once a row shows it pays.
bench b128_bf16_cudagraphs 150 100 --batch-size 128 --precision bf16 --compile-mode reduce-overhead
bench b512_bf16_autotune 240 180 --batch-size 512 --precision bf16 --compile-mode max-autotune-no-cudagraphs

echo
echo "=================== gpu_check done in $(elapsed)s; files in $OUT"
echo "--- steps"
cat "$SUMMARY"
echo "--- throughput (also $TABLE)"
[[ -f "$TABLE" ]] && grep '^|' "$TABLE"
grep -h "peak memory epoch\|seconds per" "$OUT"/epochs_*.log 2>/dev/null
grep -h "PGD-20 accuracy" "$OUT"/tests.log 2>/dev/null
for f in "$OUT"/b*.log; do [[ -f "$f" ]] && echo "$(basename "$f" .log): $(tail -n 1 "$f")"; done
exit 0
