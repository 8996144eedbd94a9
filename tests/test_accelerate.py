"""NeuroPrune in an accelerate loop started by ``accelerate launch`` with the DeepSpeed plugin, 2 ranks on CPU.

Each launch (tests/accelerate_worker.py) trains the equivalence model through ``accelerator.prepare`` +
``attach_neuroprune`` with accelerate's own accumulation and backward, then replays every rank's batches
through ``deepspeed.initialize`` + the NeuroPruner called by hand; the fp32 master weights must agree to 1e-6
(the same DeepSpeed code on the same data: measured identical). The ZeRO-2 launch also records what
accelerate does on CPU without a named backend: it counts 1 process on every rank and its gather fails.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

pytestmark = pytest.mark.dist
LAUNCHES = {"zero2_gas2": (2, 2), "zero3": (3, 1)}
CPU_GATHER_ERROR = "ProcessGroupGloo::allgather: invalid output tensor list at index 0 (expected length 2, got 1)"


def run_launch(name: str, root) -> dict:
    stage, gas = LAUNCHES[name]
    ds_config = root / "ds.json"
    ds_config.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": gas, "train_batch_size": 4 * gas,
        "gradient_clipping": 1.0, "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
        "bf16": {"enabled": False}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}))
    out = root / "out.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
           str(ds_config), "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "--main_process_port", str(29500 + (os.getpid() + stage) % 1000),
           os.path.join(os.path.dirname(__file__), "accelerate_worker.py"), str(out), "--backend", "gloo"]
    if stage == 2:
        cmd.append("--probe-default-backend")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    return {name: run_launch(name, tmp_path_factory.mktemp(name)) for name in LAUNCHES}


@pytest.mark.parametrize("name", sorted(LAUNCHES))
def test_accelerate_loop_equals_the_pruner_driven_by_hand(launches, name):
    stage, gas = LAUNCHES[name]
    run, by_hand = launches[name]["accelerate"], launches[name]["by_hand"]
    assert (run["zero_stage"], run["gradient_accumulation_steps"], run["optimizer_steps"]) == (stage, gas, 4)
    for name, expected in by_hand["master"].items():
        torch.testing.assert_close(run["master"][name], expected, rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")
    assert {k: v.tolist() for k, v in run["alive"].items()} == {k: v.tolist() for k, v in by_hand["alive"].items()}
    assert not all(bool(mask.all()) for mask in run["alive"].values()), "no head was pruned"


@pytest.mark.parametrize("name", sorted(LAUNCHES))
def test_named_backend_gives_accelerate_the_true_world_size(launches, name):
    run = launches[name]["accelerate"]
    assert (run["num_processes"], run["torch_world_size"]) == (2, 2)
    assert run["ranks_saw_different_batches"]


def test_without_a_named_backend_accelerate_counts_one_process_on_cpu(launches):
    assert launches["zero2_gas2"]["probe"] == {"num_processes": 1, "process_index": 0, "torch_world_size": 2,
                                "gather_error": CPU_GATHER_ERROR}
