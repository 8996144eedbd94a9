"""tools/gpu_check.sh in its CPU mode: every check of the GPU script runs (tiny, 2 gloo ranks) and passes.

The GPU mode differs only in sizes, dtype (bf16), backend (NCCL) and tolerances (tools/gpu_check.py:
gpu_mode), so this keeps the script that a GPU machine runs from rotting between GPU runs.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("collectives", "equality", "accelerate", "sparsity", "head pruning", "save + resume", "activation ckpt",
          "tokens/s", "compact export")


def test_gpu_check_cpu_mode_runs_every_check_and_passes(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(NEUROPRUNE_PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run([str(ROOT / "tools" / "gpu_check.sh"), "--cpu", str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=1200)
    summary = done.stdout[done.stdout.index("==== neuroprune_ds GPU check"):] if "====" in done.stdout else ""
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-3000:]
    for check in CHECKS:
        assert f"OK   {check:<16}" in summary, (check, summary)
    assert f"==== {len(CHECKS)} of {len(CHECKS)} checks passed ====" in summary
