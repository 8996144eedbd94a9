"""NeuroPrune through transformers' Trainer (``add_neuroprune``) equals the NeuroPruner driven by hand.

One torchrun launch (tests/hf_trainer_worker.py, 2 ranks, gloo, CPU) runs every scenario: the Trainer with
its DeepSpeed integration at ZeRO 0-3, with gradient accumulation, with heads pruned at epoch ends, and
stopped at a checkpoint then resumed by a new Trainer; then ``deepspeed.initialize`` + NeuroPruner called by
hand between ``engine.backward`` and ``engine.step`` on the very batches each rank's Trainer used, with the
same optimizer (torch AdamW, lr 1e-3, no weight decay, constant schedule) and clipping.

Tolerance: both runs execute the same DeepSpeed code on the same data; they differ only in how the loss is
normalised (the Trainer divides a token sum by the token count of all ranks and micro-batches and multiplies
by the world size; the hand loop takes the per-batch mean and lets DeepSpeed divide by the accumulation
steps) and in the optimizer's parameter groups (the Trainer's decay/no-decay split changes ZeRO's flat
buffers). Both are fp32 round-off: after 4 AdamW steps the fp32 master weights agree to 1e-6 absolute
(measured max 7.5e-9 at ZeRO-2). A Trainer that missed the penalty would be far outside it: dropping the
penalty changes the LLaMA update by 47% (tests/test_zero_equivalence.py), and pruned heads would revive.
"""

import os
import subprocess
import sys

import pytest
import torch
from transformers import Trainer, TrainingArguments

from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.hf_trainer import add_neuroprune, attach_neuroprune
from tiny_models import tiny_model

SCENARIOS = [f"{stage}:1:steps" for stage in range(4)] + ["3:2:steps", "2:1:epochs", "2:1:resume", "3:1:resume"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf_trainer")
    out = root / "results.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 1000), os.path.join(os.path.dirname(__file__), "hf_trainer_worker.py"),
           str(out), str(root), *SCENARIOS]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0 and out.exists(), proc.stdout[-3000:] + proc.stderr[-6000:]
    return torch.load(out, weights_only=False)


def result_of(results, scenario):
    if "error" in results[scenario]:
        pytest.fail(f"{scenario} failed:\n{results[scenario]['error']}")
    return results[scenario]["trainer"], results[scenario]["by_hand"]


@pytest.mark.dist
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_trainer_weights_equal_the_pruner_driven_by_hand(results, scenario):
    trainer, by_hand = result_of(results, scenario)
    assert trainer["master"].keys() == by_hand["master"].keys()
    for name, expected in by_hand["master"].items():
        torch.testing.assert_close(trainer["master"][name], expected, rtol=0, atol=1e-6,
                                   msg=lambda m: f"{name}: {m}")


@pytest.mark.dist
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_trainer_prunes_the_planted_heads_like_the_pruner(results, scenario):
    trainer, by_hand = result_of(results, scenario)
    assert {k: v.tolist() for k, v in trainer["alive"].items()} == {k: v.tolist() for k, v in by_hand["alive"].items()}
    assert not all(bool(mask.all()) for mask in trainer["alive"].values()), "no head was pruned"
    assert trainer["optimizer_steps"] == 4


@pytest.mark.dist
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_trainer_runs_two_real_data_parallel_ranks(results, scenario):
    trainer, _ = result_of(results, scenario)
    assert trainer["accelerate_num_processes"] == 2
    assert trainer["ranks_saw_different_batches"]
    assert trainer["step_hook_removed"], "engine.step is still wrapped after training"


@pytest.mark.dist
@pytest.mark.parametrize("scenario", ["0:1:steps", "3:2:steps"])
def test_neuroprune_metrics_reach_the_trainer_logs(results, scenario):
    trainer, _ = result_of(results, scenario)
    logged = [entry for entry in trainer["log_history"] if "sparsity/weight" in entry]
    assert [entry["step"] for entry in logged] == [2, 4]
    assert all(0.0 < entry["sparsity/weight"] < 1.0 for entry in logged)
    assert {"neuroprune/penalty_mlp", "neuroprune/penalty_attn"} <= logged[-1].keys()
    assert any(key.startswith("heads_kept/") for key in logged[-1])


def test_add_neuroprune_refuses_a_trainer_without_deepspeed(tmp_path):
    trainer = Trainer(model=tiny_model("llama"), args=TrainingArguments(output_dir=str(tmp_path), report_to=[]))
    with pytest.raises(ValueError, match=r"runs under DeepSpeed: set TrainingArguments\(deepspeed="):
        add_neuroprune(trainer, NeuroPruneConfig())


def test_attach_neuroprune_refuses_a_plain_module():
    with pytest.raises(ValueError, match="needs a DeepSpeedEngine, got LlamaForCausalLM"):
        attach_neuroprune(tiny_model("llama"), NeuroPruneConfig())
