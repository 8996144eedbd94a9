#!/usr/bin/env bash
# The SmolLM2 quality table at matched structure (tools/bench_quality.py) on ONE H200, in at most 9 minutes:
# NeuroPrune (update: gradient, update: decoupled, decoupled + structural target), L1, gradual magnitude,
# dense, then structured and
# unstructured magnitude cut from the dense model, at 25 / 50 / 70% target sparsity, lr 2e-4, 2000 steps.
#
#   tools/gpu_bench_quality.sh            # one H200 (prints the table; results in runs/gpu_bench_quality/)
#   tools/gpu_bench_quality.sh --cpu      # the same logic on CPU in seconds (random 2-layer LLaMA on Botchan, 4 steps)
#
# Sizes, from arithmetic (not measured: no GPU run of this script has been made):
# - tokens per step: 8 sequences x 128 tokens = 1024; 2000 steps = 2.0M tokens per run (about two passes
#   over the 90% of Austen's novels used for training); held-out perplexity on 256 blocks of 128 tokens.
#   2000 steps at lr 2e-4: under Adam a weight travels at most ~lr per step, 0.4 in all, above the |w| of
#   the 70% quantile of SmolLM2's penalised weights (0.19, docs/benchmarks.md), so every level is reachable.
# - work per step: 6 x 134.5M parameters x 1024 tokens = 0.83 TFLOP; TF32 matmuls (--tf32) at an assumed
#   30% of the H200's ~495 TFLOPS dense TF32 on GEMMs this small (1024 x 576 x 1536) = 150 TFLOPS: ~5.5 ms.
#   NeuroPrune adds ~10 memory passes over the 106M fp32 penalised weights per step (4.3 GB): ~1.5 ms at
#   ~3 TB/s. One process alone would be launch-bound (~2-3k kernels per step at ~5 us: ~12 ms per step).
# - so the 16 training runs go as 16 processes at once on the one GPU (each ~6 GB: fp32 weights, gradients,
#   Adam moments and activations; 96 GB in all of 139 GB; 16 CPU cores feed them). Summed GPU work:
#   16 x ~7 ms = ~110 ms per step of every run, 2000 steps = ~220 s; with start-up (~30 s) and each run's
#   compact export, verification, evaluation and timing (~30 s), ~4 minutes. Each run is cut off at 450 s.
# - the derived baselines (structured magnitude matched to each NeuroPrune run, unstructured magnitude) go as
#   one process per level (4 exports each, ~20 s apiece): ~1.5 minutes, cut off at 120 s. Worst case
#   450 + 120 + the report: under 9 minutes.
set -uo pipefail
cd "$(dirname "$0")/.."

MODE=gpu
if [[ "${1:-}" == "--cpu" ]]; then
    MODE=cpu
elif [[ $# -gt 0 ]]; then
    echo "usage: $0 [--cpu]" >&2
    exit 2
fi
OUT=${GPU_BENCH_OUT:-runs/gpu_bench_quality}
PYTHON=${PYTHON:-python}
if [[ $MODE == gpu ]]; then
    LEVELS=(0.25 0.5 0.7)
    COMMON=(--part lm --out "$OUT" --steps 2000 --lr 2e-4 --micro-batch 8 --max-length 128 --eval-examples 256
            --tf32)
    TRAIN_TIMEOUT=450 DERIVE_TIMEOUT=120
else
    LEVELS=(0.5)
    COMMON=(--part lm --out "$OUT" --steps 4 --lr 3e-4 --micro-batch 2 --max-length 32 --eval-examples 2
            --tiny --prefill-tokens 32 --prefill-repeats 3)
    TRAIN_TIMEOUT=1200 DERIVE_TIMEOUT=600  # guards against a hang only: a loaded CPU must not trip them
fi
TRAINED=(neuroprune neuroprune_decoupled neuroprune_structural l1 gmp)
mkdir -p "$OUT/logs"

# Jobs: on the GPU one process per run (dense, and every method at every level), on the CPU one process for
# all of them (process start-up dominates there). Same runs, same result files.
JOBS=()
if [[ $MODE == gpu ]]; then
    JOBS+=("--methods dense --levels ${LEVELS[0]}")
    for level in "${LEVELS[@]}"; do
        for method in "${TRAINED[@]}"; do
            JOBS+=("--methods $method --levels $level")
        done
    done
else
    JOBS+=("--methods dense ${TRAINED[*]} --levels ${LEVELS[*]}")
fi

run_jobs() {  # run_jobs TIMEOUT JOB...: all at once, each under TIMEOUT seconds; returns the failures
    local limit=$1 failed=0 i=0 pids=() names=()
    shift
    for job in "$@"; do
        name=$(echo "$job" | tr -c 'a-z0-9.\n' '_')
        # shellcheck disable=SC2086  # a job is a list of options
        timeout "$limit" "$PYTHON" tools/bench_quality.py "${COMMON[@]}" $job >"$OUT/logs/$name.log" 2>&1 &
        pids+=($!) names+=("$name")
    done
    for pid in "${pids[@]}"; do
        if ! wait "$pid"; then
            echo "FAILED (or cut off): ${names[$i]}, see $OUT/logs/${names[$i]}.log" >&2
            failed=$((failed + 1))
        fi
        i=$((i + 1))
    done
    return "$failed"
}

started=$(date +%s)
run_jobs "$TRAIN_TIMEOUT" "${JOBS[@]}"
train_failed=$?
echo "training runs: $(( $(date +%s) - started )) s, ${train_failed} failed" >&2
DERIVED=()
for level in "${LEVELS[@]}"; do
    DERIVED+=("--methods structured magnitude --levels $level")
done
run_jobs "$DERIVE_TIMEOUT" "${DERIVED[@]}"
derive_failed=$?
"$PYTHON" tools/bench_quality.py "${COMMON[@]}" --levels "${LEVELS[@]}" --report-only
echo "total: $(( $(date +%s) - started )) s; results: $OUT/results.md" >&2
exit $(( train_failed + derive_failed > 0 ))
