"""Runs NeuroPrune on a real DeepSpeed engine for several scenarios in one 2-rank launch.

    torchrun --nproc_per_node 2 tests/dist_worker.py OUT.pt family:stage:dtype[:gas][:option ...][@variant] ...

Options: ``gc`` (activation checkpointing through the trainer's switch), ``persist`` (ZeRO-3 keeps parameters
of at most PERSIST_NUMEL elements whole on every rank: in the equivalence model the attention matrices, while
the FFN matrices stay partitioned), ``offload`` (ZeRO-3 optimizer offload to CPU memory). For each scenario it trains the equivalence model a few steps with the pruner, then records (collectively)
the gathered fp32 master weights, the working weights, the optimizer moments of pruned entries, the pruner's
metrics and decisions. Rank 0 writes everything to OUT.pt; the test compares it with a single-process
reference. A scenario that DeepSpeed cannot run records the exact exception text instead.
"""

import os
import sys

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_optimizer_state

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import batch, equivalence_model  # noqa: E402
from worker_harness import (build_engine, ds_config, gathered_masters, join_process_group,  # noqa: E402
                            run_scenarios, save_and_exit, train_step)

from neuroprune_ds.arch import resolve_architecture  # noqa: E402
from neuroprune_ds.config import NeuroPruneConfig  # noqa: E402
from neuroprune_ds.pruner import NeuroPruner  # noqa: E402
from neuroprune_ds.train import enable_activation_checkpointing  # noqa: E402

STEPS = 4
LR = 1e-3
CLIP = 1.0
NEUROPRUNE = NeuroPruneConfig(mlp_lambda=1e-2, attn_lambda=1e-2, theta=0.05, prune_every_steps=2)
PERSIST_NUMEL = 1100  # q/o 32x32 = 1024 and k/v 16x32 persist; FFN 48x32 = 1536 and embeddings are partitioned
# Decoupled proximal steps of lr * lambda * f (2e-3 for a fully connected FFN unit) zero about a third of the
# weights in 3 steps (init std 0.02). The connectivity thresholds prune a few FFN units (LLaMA 4 and 3, OPT 13
# of 96) at steps 2 and 3; step 4 recovers. Theta 0.4 relative is ~0.04 here (largest |w| ~0.1).
VARIANTS = {
    "": NEUROPRUNE,
    "decoupled": NeuroPruneConfig(update="decoupled", mlp_lambda=2.0, attn_lambda=2.0, theta=0.4,
                                  theta_mode="relative", prune_every_steps=2, prune_ffn_units_below=0.6,
                                  recover_steps=1),
    "gradient_recovery": NeuroPruneConfig(mlp_lambda=1e-2, attn_lambda=1e-2, theta=0.05, prune_every_steps=2,
                                          prune_ffn_units_below=0.75, recover_steps=1),
    # the structural target: half of every FFN block's units, 0.5 * (1 - (1 - 2/4)^3) = 43.75% at step 2 and the
    # whole 50% when recovery starts at step 3; by the accumulated Taylor score, or by connectivity (L1 ties)
    "decoupled_unit_target": NeuroPruneConfig(update="decoupled", mlp_lambda=2.0, attn_lambda=2.0, theta=0.4,
                                              theta_mode="relative", prune_every_steps=2, recover_steps=1,
                                              prune_ffn_units_fraction=0.5, target_ramp_steps=4),
    "gradient_unit_target": NeuroPruneConfig(mlp_lambda=1e-2, attn_lambda=1e-2, theta=0.05, prune_every_steps=2,
                                             recover_steps=1, prune_ffn_units_fraction=0.25, target_ramp_steps=4,
                                             ffn_unit_score="connectivity"),
}


def parse(scenario: str) -> tuple[str, int, str, int, set[str], str]:
    """``family:stage:dtype[:gas][:option ...][@variant]`` -> (family, stage, dtype, gas, options, variant)."""
    head, _, variant = scenario.partition("@")
    family, stage, dtype, *rest = head.split(":")
    gas = int(rest.pop(0)) if rest and rest[0].isdigit() else 1
    return family, int(stage), dtype, gas, set(rest), variant


ROUND_TRIPS = ("safe_get_local_fp32_param", "safe_set_local_fp32_param", "safe_get_local_grad")
"""DeepSpeed's local-shard functions the pruner may call that copy an offloaded shard to the accelerator (get)
and back (set). (Optimizer moments are reached as views of the optimizer's own state, never through them.)"""


def count_round_trips() -> dict[str, int]:
    """Count the pruner's calls of :data:`ROUND_TRIPS` (patched into neuroprune_ds.zero_access)."""
    from neuroprune_ds import zero_access

    counts = dict.fromkeys(ROUND_TRIPS, 0)
    for name in ROUND_TRIPS:
        def counted(*args, name=name, original=getattr(zero_access, name)):
            counts[name] += 1
            return original(*args)

        setattr(zero_access, name, counted)
    return counts


def gathered_working(engine, param) -> torch.Tensor:
    """The 16-bit/working copy the forward pass uses, gathered (collective at ZeRO-3)."""
    with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
        return param.data.detach().float().clone()


def moments(engine, pruner, param) -> dict:
    keys = pruner.access.optimizer_keys()
    if pruner.access.is_partitioned(param):
        return {k: safe_get_full_optimizer_state(param, k).detach().float().reshape(param.ds_shape if hasattr(
            param, "ds_id") else param.shape).clone() for k in keys}
    state = engine.optimizer.state[param]
    return {k: state[k].detach().float().clone() for k in keys}


def run(family: str, stage: int, dtype: str, gas: int, options: set[str], variant: str = "",
        round_trips=None) -> dict:
    model = equivalence_model(family)
    if "gc" in options:
        enable_activation_checkpointing(model)
    # Under activation checkpointing a layer's submodules run again in the backward pass: count the calls of
    # the first FFN input projection (a pre-hook: the recompute stops once it has what backward needs).
    forward_calls = []
    ffn_input = resolve_architecture(model).ffn[0].inputs[0].weight.removesuffix(".weight")
    model.get_submodule(ffn_input).register_forward_pre_hook(lambda *_: forward_calls.append(1))
    persist_numel = PERSIST_NUMEL if "persist" in options else 0
    engine = build_engine(model, ds_config(stage, dtype, gas=gas, clip=CLIP, persist_numel=persist_numel,
                                           offload="offload" in options), lr=LR, weight_decay=0.01)
    pruner = NeuroPruner(engine, VARIANTS[variant])
    pruner.total_steps = STEPS
    # What stop_at_zero holds during a step (registered after the pruner's hook, so it sees the signs taken)
    sign_bytes = []
    pruner.access.inner_optimizer().register_step_pre_hook(lambda *_: sign_bytes.append(
        sum(t.numel() * t.element_size() for t in pruner._signs_before_step.values())))
    calls_before = dict(round_trips)
    rank = dist.get_rank()
    losses, penalties, support_at_recovery = [], [], None
    for step in range(STEPS):
        if pruner.config.recover_steps and step == STEPS - pruner.config.recover_steps:
            support_at_recovery = {name: pruner.access.full_fp32(pruner.params[name]) != 0
                                   for name in pruner.penalised_names}
        for micro in range(gas):
            losses.append(float(train_step(engine, pruner, batch(family, step, rank, micro)).detach()))
        penalties.append(dict(pruner.last_penalties))
    calls = {name: round_trips[name] - calls_before[name] for name in round_trips}
    partitioned = {name: not pruner.access.local_slice(p).is_full for name, p in pruner.params.items()}
    penalised = set(pruner.penalised_names)
    masked = {e[0] for b in pruner.arch.attention for e in pruner.structure.mask_entries(b)}
    masked |= {e[0] for b in pruner.arch.ffn for e in pruner.structure.ffn_mask_entries(b)} | penalised
    result = {
        "master": gathered_masters(pruner),
        "working": {name: gathered_working(engine, p) for name, p in pruner.params.items()},
        "moments": {name: moments(engine, pruner, pruner.params[name]) for name in sorted(masked)},
        "metrics": pruner.metrics(),
        "summary": pruner.summary(),
        "alive": {k: v.clone() for k, v in pruner.alive.items()},
        "ffn_kept": {k: v.clone() for k, v in pruner.ffn_kept.items()},
        "ffn_saliency": {k: v.clone() for k, v in pruner.structure.ffn_saliency.items()},
        "support_at_recovery": support_at_recovery,
        "closest_pairs": dict(pruner.closest_pairs),
        "losses": losses,
        "forward_calls": len(forward_calls),
        "penalties": penalties,
        "any_partitioned": any(partitioned.values()),
        "sign_bytes_max": max(sign_bytes),
        "penalised_numel": {"local": sum(pruner.access.local_slice(pruner.params[n]).numel for n in penalised),
                            "full": sum(pruner.params[n].ds_numel if hasattr(pruner.params[n], "ds_id")
                                        else pruner.params[n].numel() for n in penalised)},
        "persistent": sorted(name for name, p in pruner.params.items() if getattr(p, "ds_persist", False)),
        "offloaded": bool(engine.zero_offload_optimizer()),
        "round_trips": calls,
    }
    engine.destroy()
    return result


def main() -> None:
    out, scenarios = sys.argv[1], sys.argv[2:]
    join_process_group("nccl" if torch.cuda.is_available() else "gloo")  # tools/gpu_check.py runs it on GPUs
    round_trips = count_round_trips()
    # A scenario DeepSpeed cannot run here records its exact error for the test.
    results, _ = run_scenarios(scenarios, lambda scenario: run(*parse(scenario), round_trips=round_trips))
    save_and_exit(results, out)


if __name__ == "__main__":
    main()
