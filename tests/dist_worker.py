"""Runs NeuroPrune on a real DeepSpeed engine for several scenarios in one 2-rank launch.

    torchrun --nproc_per_node 2 tests/dist_worker.py OUT.pt family:stage:dtype[:gas[:offload]] ...

For each scenario it trains the equivalence model a few steps with the pruner, then records (collectively)
the gathered fp32 master weights, the working weights, the optimizer moments of pruned entries, the pruner's
metrics and decisions. Rank 0 writes everything to OUT.pt; the test compares it with a single-process
reference. A scenario that DeepSpeed cannot run records the exact exception text instead.
"""

import os
import sys
import traceback
from datetime import timedelta

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.utils import safe_get_full_optimizer_state

sys.path.insert(0, os.path.dirname(__file__))
from tiny_models import batch, equivalence_model  # noqa: E402

from neuroprune_ds.config import NeuroPruneConfig  # noqa: E402
from neuroprune_ds.pruner import NeuroPruner  # noqa: E402

STEPS = 4
LR = 1e-3
CLIP = 1.0
NEUROPRUNE = NeuroPruneConfig(mlp_lambda=1e-2, attn_lambda=1e-2, theta=0.05, prune_every_steps=2)


def ds_config(stage: int, dtype: str, gas: int, offload: bool = False) -> dict:
    zero = {"stage": stage, "stage3_param_persistence_threshold": 0}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": CLIP,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


ROUND_TRIPS = ("safe_get_local_fp32_param", "safe_set_local_fp32_param", "safe_get_local_grad",
               "safe_get_local_optimizer_state", "safe_set_local_optimizer_state")
"""DeepSpeed's local-shard functions that copy an offloaded shard to the accelerator (get) and back (set)."""


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


def run(family: str, stage: int, dtype: str, gas: int, offload: bool = False, round_trips=None) -> dict:
    model = equivalence_model(family)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config(stage, dtype, gas, offload))
    pruner = NeuroPruner(engine, NEUROPRUNE)
    calls_before = dict(round_trips)
    rank = dist.get_rank()
    losses, penalties = [], []
    for step in range(STEPS):
        for micro in range(gas):
            inputs = {k: v.to(engine.device) for k, v in batch(family, step, rank, micro).items()}
            loss = engine(**inputs).loss
            engine.backward(loss)
            pruner.after_backward()
            engine.step()
            pruner.after_step()
            losses.append(float(loss.detach()))
        penalties.append(dict(pruner.last_penalties))
    calls = {name: round_trips[name] - calls_before[name] for name in round_trips}
    partitioned = {name: not pruner.access.local_slice(p).is_full for name, p in pruner.params.items()}
    masked = {e[0] for b in pruner.arch.attention for e in pruner._mask_entries(b)}
    result = {
        "master": {name: pruner.access.full_fp32(p) for name, p in pruner.params.items()},
        "working": {name: gathered_working(engine, p) for name, p in pruner.params.items()},
        "moments": {name: moments(engine, pruner, pruner.params[name]) for name in sorted(masked)},
        "metrics": pruner.metrics(),
        "summary": pruner.summary(),
        "alive": {k: v.clone() for k, v in pruner.alive.items()},
        "losses": losses,
        "penalties": penalties,
        "any_partitioned": any(partitioned.values()),
        "offloaded": bool(engine.zero_offload_optimizer()),
        "round_trips": calls,
    }
    engine.destroy()
    return result


def main() -> None:
    out, scenarios = sys.argv[1], sys.argv[2:]
    deepspeed.init_distributed(dist_backend="gloo", timeout=timedelta(seconds=180))
    torch.set_num_threads(1)
    results = {}
    round_trips = count_round_trips()
    for scenario in scenarios:
        family, stage, dtype, *rest = scenario.split(":")
        try:
            results[scenario] = run(family, int(stage), dtype, int(rest[0]) if rest else 1,
                                    offload="offload" in rest, round_trips=round_trips)
        except Exception:  # DeepSpeed cannot run this scenario here: record its exact error for the test
            results[scenario] = {"error": traceback.format_exc()}
            if dist.get_rank() == 0:
                print(results[scenario]["error"], file=sys.stderr, flush=True)
    dist.barrier()
    if dist.get_rank() == 0:
        torch.save(results, out)
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
