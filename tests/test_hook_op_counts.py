"""What the pruner adds to a training step, counted in aten ops and host syncs (tools/bench_overhead.py's
counter) on a one-rank engine with the settings users run (degree-weighted penalty, stop_at_zero, a target
sparsity), and in the decoupled mode. The counts are deterministic: the bounds are what the fused hot path
reaches, so a change that adds a pass per penalised matrix (at least 6 kernels per LLaMA layer) or a host
sync per matrix or block fails."""

import importlib.util
from pathlib import Path

import pytest
import torch

from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.pruner import NeuroPruner
from tiny_models import MODEL_CLASSES, TINY_CONFIGS, batch, init_single_rank

_spec = importlib.util.spec_from_file_location("bench_overhead",
                                               Path(__file__).parent.parent / "tools" / "bench_overhead.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

# measured with torch 2.13.0 / deepspeed 0.19.8. Gradient mode: 145 kernels and 334 aten ops per layer, 1 sync
# per step (the step's one host transfer). Decoupled mode (statistics before the step and the attention groups'
# again after it): 166 kernels and 313 aten ops per layer, 2 syncs (the masks' check before the step, the
# transfer after it). Before the fused path: 309 / 339 kernels per layer and 12 syncs per layer + 5.
MAX_KERNELS_PER_LAYER = {"gradient": 150, "decoupled": 170}
MAX_ATEN_OPS_PER_LAYER = {"gradient": 340, "decoupled": 320}
SYNCS_PER_STEP = {"gradient": 1, "decoupled": 2}


def _hook_counts(layers: int, update: str):
    import deepspeed

    torch.manual_seed(0)
    config = TINY_CONFIGS["llama"]()
    config.num_hidden_layers = layers
    model = MODEL_CLASSES["llama"].from_config(config)
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config={"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9,
                                              "zero_optimization": {"stage": 0}})
    pruner = NeuroPruner(engine, NeuroPruneConfig(target_sparsity=0.5, target_ramp_steps=20, update=update))
    for step in range(2):  # from the second step on the controller histograms the previous step's factors
        engine.backward(engine(**batch("llama", step, 0)).loss)
        pruner.after_backward()
        engine.step()
        pruner.after_step()
    counts = bench.pruner_step_counts(engine, pruner, batch("llama", 2, 0))
    engine.destroy()
    return counts


@pytest.mark.dist
@pytest.mark.parametrize("update", ["gradient", "decoupled"])
def test_the_hooks_cost_a_bounded_number_of_kernels_per_layer_and_a_constant_number_of_syncs(update):
    init_single_rank()
    two, four = _hook_counts(2, update), _hook_counts(4, update)
    assert two["kernels"] > 0 and four["kernels"] > two["kernels"]  # the counter sees the hooks' work
    kernels_per_layer = (four["kernels"] - two["kernels"]) / 2
    aten_ops_per_layer = (four["aten_ops"] - two["aten_ops"]) / 2
    assert kernels_per_layer <= MAX_KERNELS_PER_LAYER[update], (two, four)
    assert aten_ops_per_layer <= MAX_ATEN_OPS_PER_LAYER[update], (two, four)
    assert four["syncs"] == two["syncs"] == SYNCS_PER_STEP[update], (two, four)
