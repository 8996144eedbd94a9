"""The real trainer with NeuroPrune under the shipped sbatch scripts on a real (local) SLURM:
1 node x 2 tasks and 2 nodes x 1 task. Each job trains a tiny OPT a few steps, exits 0, and leaves
metrics.jsonl and TensorBoard events that are read back here."""

import os
import sys
from pathlib import Path

import pytest

from test_checkpoint import _env, assets, ds_json, records, write_run  # noqa: F401 (assets is a fixture)
from test_slurm import SBATCH_DIR, sbatch_wait, slurm_cluster  # noqa: F401 (slurm_cluster is a fixture)

pytestmark = pytest.mark.integration
STEPS = 4


@pytest.mark.parametrize("script,nodelist", [("one_node.sbatch", "node1"), ("multi_node.sbatch", "node[1-2]")])
def test_shipped_sbatch_trains_with_neuroprune(slurm_cluster, assets, tmp_path, script, nodelist):  # noqa: F811
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    config = write_run(tmp_path, assets, "job", schedule={"max_steps": STEPS})
    env = {k: v for k, v in _env().items() if not k.startswith(("SLURM_", "PYTEST_"))}
    env.update(slurm_cluster, NEUROPRUNE_PYTHON=sys.executable,
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}")
    job_id, log, secs = sbatch_wait(SBATCH_DIR / script, [config, ds_json(tmp_path, 3)], env, tmp_path)
    print(f"{script}: job {job_id} trained in {secs:.1f} s")
    assert f"run 1 on {nodelist}" in log, log[-3000:]

    train = records(tmp_path / "job", "train")
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all("sparsity/weight" in r and r["train/loss"] > 0 for r in train)
    assert records(tmp_path / "job", "eval")
    events = EventAccumulator(str(tmp_path / "job" / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "train/loss" in scalars and "sparsity/weight" in scalars and "neuroprune/penalty_mlp" in scalars
    assert len(events.Scalars("train/loss")) == STEPS
