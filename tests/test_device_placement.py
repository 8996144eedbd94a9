"""Every tensor the trainer, pruner, evaluation and checkpointing create or restore lives on the engine's device.

Under CUDA + NCCL a tensor created without ``device=`` sits on the CPU, and the first collective or the first
product with a GPU shard fails. CPU-only machines see no failure, so the trainer runs here (2 ranks, ZeRO-3,
activation checkpointing, NeuroPrune with a target sparsity, head pruning and the structural target's Taylor
scores, evaluation, a preemption save
and a resume) under
tests/device_guard.py, which records every tensor factory the library calls without a device.
"""

from __future__ import annotations

import pytest
import torch
from test_checkpoint import STOP, assets, ds_json, launch, run_entry, write_run  # noqa: F401 (assets: fixture)

from neuroprune_ds.config import NeuroPruneConfig

pytestmark = pytest.mark.dist


def test_trainer_pruner_evaluation_and_resume_create_no_tensor_without_a_device(tmp_path, assets):
    sections = {"neuroprune": {"mlp_lambda": 1e-3, "attn_lambda": 1e-3, "theta": 0.2, "prune_every_steps": 2,
                               "target_sparsity": 0.3, "target_ramp_steps": 4, "prune_ffn_units_fraction": 0.25},
                "model": {"gradient_checkpointing": True}}
    config = write_run(tmp_path, assets, "guarded", **sections)
    ds = ds_json(tmp_path, 3)
    plan = [dict(run_entry("cut", config, ds, signal_at={"step": STOP, "rank": 1, "signal": "SIGTERM"}),
                 guard_devices=True),
            dict(run_entry("resume", config, ds), guard_devices=True)]
    code, output, results = launch(tmp_path, plan)
    assert code == 0, output[-6000:]
    for rank in (0, 1):
        assert results["cut", rank]["code"] == 85 and results["resume", rank]["code"] == 0, output[-3000:]
        assert results["resume", rank]["resumed_step"] == STOP
        assert not all(all(alive) for alive in results["resume", rank]["alive_after_resume"].values())
        for run in ("cut", "resume"):
            assert results[run, rank]["deviceless"] == [], (run, rank)


def test_pruner_state_restored_from_a_cpu_checkpoint_lands_on_the_pruners_device():
    """DeepSpeed loads client state on the CPU; the meta device stands in for the GPU an engine runs on."""
    import deepspeed
    from tiny_models import batch, equivalence_model, init_single_rank

    from neuroprune_ds.pruner import NeuroPruner

    init_single_rank()
    model = equivalence_model("llama")
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config={"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9,
                                              "zero_optimization": {"stage": 0}})
    pruner = NeuroPruner(engine, NeuroPruneConfig(theta=0.05, target_sparsity=0.3, prune_ffn_units_fraction=0.25))
    engine.backward(engine(**batch("llama", 0, 0)).loss)
    pruner.after_backward()
    engine.step()
    pruner.after_step()
    assert pruner.prune_heads()
    state = pruner.state_dict()
    saved = [t for key in ("alive", "omega", "penalty_factors", "ffn_saliency") for t in state[key].values()]
    assert saved and all(t.device.type == "cpu" for t in saved)
    pruner.device = torch.device("meta")
    pruner.load_state_dict(state)
    restored = [*pruner.alive.values(), *pruner.omega.values(), *pruner._penalty_factors.values(),
                *pruner.structure.ffn_saliency.values()]
    assert len(restored) == len(saved) and all(t.device.type == "meta" for t in restored)
    engine.destroy()
