#!/usr/bin/env bash
# GPU check: NeuroPrune in an accelerate loop under `accelerate launch` with the DeepSpeed plugin, ZeRO-2 and
# ZeRO-3, WITHOUT naming a backend (the CPU machine needs InitProcessGroupKwargs(backend="gloo"): on CPU,
# accelerate counts 1 process per rank otherwise). Uses 2 ranks when there are >= 2 GPUs, else 1.
# Checks: accelerate's process count equals the launched ranks and its gather works; the loop's fp32
# weights equal the NeuroPruner driven by hand on the same batches; the planted redundant heads are pruned.
#
#   tools/gpu_check_accelerate.sh [OUT_DIR]      # from the repository root, with the venv active
set -euo pipefail
out=$(realpath -m "${1:-$(mktemp -d)}")
mkdir -p "$out"
gpus=$(nvidia-smi -L | wc -l)
nproc=$(( gpus >= 2 ? 2 : 1 ))
export PYTHONWARNINGS=ignore OMP_NUM_THREADS=1
for stage in 2 3; do
    cat > "$out/zero$stage.json" <<EOF
{"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": $((2 * nproc)),
 "gradient_clipping": 1.0, "zero_optimization": {"stage": $stage, "stage3_param_persistence_threshold": 0},
 "bf16": {"enabled": false}, "zero_allow_untested_optimizer": true, "steps_per_print": 1000000000}
EOF
    python -m accelerate.commands.launch --use_deepspeed --deepspeed_config_file "$out/zero$stage.json" \
        --num_processes "$nproc" --num_machines 1 --mixed_precision no --dynamo_backend no \
        tests/accelerate_worker.py "$out/zero$stage.pt" --backend auto --probe-default-backend
done
python - "$out" "$nproc" <<'EOF'
import sys, torch
out, nproc = sys.argv[1], int(sys.argv[2])
failed = False
for stage in (2, 3):
    r = torch.load(f"{out}/zero{stage}.pt", weights_only=False)
    run, hand, probe = r["accelerate"], r["by_hand"], r["probe"]
    diff = max(float((run["master"][k] - hand["master"][k]).abs().max()) for k in hand["master"])
    pruned = not all(bool(m.all()) for m in run["alive"].values())
    same_masks = all(torch.equal(run["alive"][k], hand["alive"][k]) for k in hand["alive"])
    ok = (probe["num_processes"] == nproc and probe["gather_error"] is None and run["num_processes"] == nproc
          and run["zero_stage"] == stage and run["optimizer_steps"] == 4 and diff <= 1e-5 and pruned and same_masks
          and (nproc == 1 or run["ranks_saw_different_batches"]))
    failed |= not ok
    print(f"ZeRO-{stage}, {nproc} rank(s): {'OK' if ok else 'FAILED'}; accelerate without a backend: "
          f"{probe['num_processes']} process(es), gather error {probe['gather_error']!r}; max |w - w_by_hand| "
          f"{diff:.2e}; heads pruned {pruned}, masks equal {same_masks}")
sys.exit(1 if failed else 0)
EOF
