#!/usr/bin/env bash
# The prepared GPU check (docs/gpu.md): collectives, ZeRO-3 equality with the CPU reference, accelerate,
# the trainer on a SmolLM2-135M-shaped model (sparsity, head pruning, save + resume, activation
# checkpointing, tokens/s) and a compact export; one summary at the end, exit 1 if a check failed.
#
#   tools/gpu_check.sh [--cpu] [--model DIR] [OUT_DIR]     # from the repository root, venv active
#
# --cpu: the same checks at a tiny size on 2 CPU ranks (gloo), what CI runs. OUT_DIR [runs/gpu_check].
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONWARNINGS=ignore PYTHONUNBUFFERED=1
exec "${NEUROPRUNE_PYTHON:-python}" tools/gpu_check.py "$@"
