"""What the worker scripts the tests launch share: joining the process group, the tiny engine and the
pruner's step, running scenarios, handing results back, exiting.

Two kinds of worker use it. Scenario workers (dist_worker.py, dist_export_worker.py, hf_trainer_worker.py,
accelerate_worker.py) build DeepSpeed engines themselves and drive the pruner by hand; rank 0 saves one
results file. Plan workers (checkpoint_worker.py, refusal_worker.py) run the real trainer or the command line
on a JSON plan. torch and deepspeed are imported inside the functions: a plan worker maps the launcher's
environment (OMP_NUM_THREADS among it) before torch is first imported.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from neuroprune_ds.distributed import barrier_and_exit, setup_distributed_env

TIMEOUT = timedelta(seconds=180)
"""Collective timeout of every worker: a rank that died fails the launch instead of hanging the test."""


def single_thread() -> None:
    """One intra-op thread per rank: the ranks of a launch share the machine's cores."""
    import torch

    torch.set_num_threads(1)


# ------------------------------------------------------------------------------------ plan workers


def start_plan_worker(plan_path: str) -> list[dict[str, Any]]:
    """Map the launcher's environment (before torch is imported), then read the plan."""
    setup_distributed_env()
    single_thread()
    return json.loads(Path(plan_path).read_text())


# -------------------------------------------------------------------------------- scenario workers


def join_process_group(backend: str = "gloo") -> None:
    """Join the launch's process group through DeepSpeed, as the engines of the scenarios expect."""
    import deepspeed

    deepspeed.init_distributed(dist_backend=backend, timeout=TIMEOUT)
    single_thread()


def ds_config(stage: int, dtype: str = "fp32", *, gas: int = 1, clip: float = 1.0, persist_numel: int = 0,
              offload: bool = False) -> dict[str, Any]:
    """The DeepSpeed JSON of a scenario: 2 examples per micro-batch, the client's AdamW, no printing.

    ``persist_numel``: ZeRO-3 keeps parameters of at most that many elements whole on every rank (0: none).
    ``offload``: ZeRO-3 offloads the optimizer to CPU memory.
    """
    zero = {"stage": stage, "stage3_param_persistence_threshold": persist_numel}
    if offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": gas,
        "gradient_clipping": clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
    }


def build_engine(model, config: dict[str, Any], *, lr: float, weight_decay: float):
    """A DeepSpeed engine of ``model`` with a torch AdamW, as a user's own DeepSpeed loop builds it."""
    import deepspeed
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    return engine


def train_step(engine, pruner, inputs: dict):
    """One micro-batch with the pruner's hooks where the trainer calls them; returns the loss."""
    loss = engine(**{key: value.to(engine.device) for key, value in inputs.items()}).loss
    engine.backward(loss)
    pruner.after_backward()
    engine.step()
    pruner.after_step()
    return loss


def gathered_masters(pruner) -> dict:
    """Every parameter's whole fp32 master weights (collective at ZeRO 1-3)."""
    return {name: pruner.access.full_fp32(param) for name, param in pruner.params.items()}


def run_scenarios(scenarios: list[str], run: Callable[[str], Any]) -> tuple[dict[str, Any], bool]:
    """``run(scenario)`` for each; one that raises is recorded as ``{"error": traceback}`` (and printed),
    and the others still run. Returns the results and whether any failed."""
    results, failed = {}, False
    for scenario in scenarios:
        try:
            results[scenario] = run(scenario)
        except Exception:  # recorded for the test to show; the other scenarios go on
            results[scenario] = {"error": traceback.format_exc()}
            failed = True
            print(f"{scenario}: {results[scenario]['error']}", file=sys.stderr, flush=True)
    return results, failed


def save_and_exit(results: dict[str, Any], out: str, code: int = 0) -> None:
    """Rank 0 saves ``results`` to ``out`` once every rank is done; then every rank exits together."""
    import torch
    import torch.distributed as dist

    dist.barrier()
    if dist.get_rank() == 0:
        torch.save(results, out)
    barrier_and_exit(code)
