"""NeuroPrune in an accelerate training loop under ``accelerate launch`` with the DeepSpeed plugin.

    accelerate launch --use_deepspeed --deepspeed_config_file DS.json --num_processes 2 \\
        tests/accelerate_worker.py OUT.pt [--backend gloo|auto] [--probe-default-backend]

The loop is the plain accelerate one (``accelerator.accumulate`` + ``accelerator.backward``) plus one line,
``attach_neuroprune(model, config)`` after ``accelerator.prepare``. It records the batches each rank trained
on, then trains a fresh copy with ``deepspeed.initialize`` and the NeuroPruner called by hand on them. Rank 0
writes both runs' gathered fp32 master weights and masks, and what accelerate believed about the world, to
OUT.pt.

``--backend gloo`` names the backend (``InitProcessGroupKwargs``): what DeepSpeed on CPU needs; ``auto``
leaves it to accelerate (GPUs). ``--probe-default-backend`` first builds an ``Accelerator()`` without the
backend and records its process count and the exact error of ``gather`` (the CPU misbehaviour), then
starts afresh.
"""

import argparse
import json
import os
import sys

import torch
import torch.distributed as dist
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import InitProcessGroupKwargs

sys.path.insert(0, os.path.dirname(__file__))
from hf_trainer_worker import FAMILY, LR, examples, neuroprune_config  # noqa: E402
from tiny_models import equivalence_model  # noqa: E402
from worker_harness import (TIMEOUT, build_engine, gathered_masters, save_and_exit, single_thread,  # noqa: E402
                            train_step)

from neuroprune_ds.hf_trainer import attach_neuroprune  # noqa: E402
from neuroprune_ds.pruner import NeuroPruner  # noqa: E402

STEPS = 4


def probe_default_backend() -> dict:
    """What accelerate believes without a named backend, and what its ``gather`` does then."""
    accelerator = Accelerator()
    found = {"num_processes": accelerator.num_processes, "process_index": accelerator.process_index,
             "torch_world_size": dist.get_world_size(), "gather_error": None}
    try:
        accelerator.gather(torch.tensor([dist.get_rank()], device=accelerator.device))
    except RuntimeError as error:
        found["gather_error"] = str(error).splitlines()[0]
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return found


def train_with_accelerate(model, backend: str) -> tuple[dict, list]:
    handlers = [InitProcessGroupKwargs(backend=backend, timeout=TIMEOUT)] if backend != "auto" else []
    accelerator = Accelerator(kwargs_handlers=handlers)
    # accelerate takes the accumulation steps from the DeepSpeed config (its own attribute stays 1)
    gas = accelerator.state.deepspeed_plugin.deepspeed_config["gradient_accumulation_steps"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    loader = torch.utils.data.DataLoader(examples(STEPS * gas * 2 * accelerator.num_processes), batch_size=2)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    pruner = attach_neuroprune(model, neuroprune_config("steps"))  # the one added line
    recorded = []
    model.train()
    for batch in loader:
        with accelerator.accumulate(model):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad()
        recorded.append({key: value.detach().cpu().clone() for key, value in batch.items()})
    first = torch.stack([r["input_ids"] for r in recorded]).to(accelerator.device)
    result = {"master": {k: v.cpu() for k, v in gathered_masters(pruner).items()},
              "alive": {name: mask.clone() for name, mask in pruner.alive.items()},
              "optimizer_steps": pruner.optimizer_steps,
              "gradient_accumulation_steps": model.gradient_accumulation_steps(),
              "zero_stage": model.zero_optimization_stage(), "num_processes": accelerator.num_processes,
              "process_index": accelerator.process_index, "torch_world_size": dist.get_world_size(),
              "ranks_saw_different_batches": bool((accelerator.gather(first[None]) != first[None]).any())}
    return result, recorded


def train_by_hand(model, recorded: list, ds_config: dict) -> dict:
    engine = build_engine(model, ds_config, lr=LR, weight_decay=0.0)
    pruner = NeuroPruner(engine, neuroprune_config("steps"))
    for inputs in recorded:
        train_step(engine, pruner, inputs)
    result = {"master": {k: v.cpu() for k, v in gathered_masters(pruner).items()},
              "alive": {name: mask.clone() for name, mask in pruner.alive.items()}}
    engine.destroy()
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--backend", default="gloo")
    parser.add_argument("--probe-default-backend", action="store_true")
    args = parser.parse_args()
    single_thread()
    # Both models before any Accelerator: a ZeRO-3 Accelerator makes transformers build models inside
    # deepspeed.zero.Init, where planting the redundant heads into partitioned weights would do nothing.
    models = [equivalence_model(FAMILY) for _ in range(2)]
    results = {"probe": probe_default_backend() if args.probe_default_backend else None}
    results["accelerate"], recorded = train_with_accelerate(models[0], args.backend)
    ds_config = json.loads(open(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"]).read())
    results["by_hand"] = train_by_hand(models[1], recorded, ds_config)
    save_and_exit(results, args.out)


if __name__ == "__main__":
    main()
