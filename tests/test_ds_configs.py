"""Every DeepSpeed JSON shipped in ds_configs/ starts an engine and trains, on 2 ranks.

All files run in ONE 2-rank torchrun launch (this file is also the worker script), to pay process start-up
once. ZeRO-3 files get ``stage3_param_persistence_threshold: 0`` so the tiny model really is partitioned.
The offload files also run with ``schedule.optimizer: cpu_adam`` (DeepSpeedCPUAdam, compiled once).
"""

from __future__ import annotations

import gc
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted((REPO / "ds_configs").glob("*.json"))
STEPS = 3
HIDDEN = 32  # the tiny model's hidden size, which the "auto" ZeRO buffer sizes follow
CPU_ADAM = " + cpu_adam"


def test_shipped_zero_buffers_are_sized_from_the_model_and_offload_pins_memory():
    from neuroprune_ds.config import ModelConfig, RunConfig
    from neuroprune_ds.deepspeed_config import fill_deepspeed_config

    sized = {"reduce_bucket_size": HIDDEN**2, "stage3_prefetch_bucket_size": int(0.9 * HIDDEN**2),
             "stage3_param_persistence_threshold": 10 * HIDDEN, "stage3_max_live_parameters": 16 * HIDDEN**2,
             "stage3_max_reuse_distance": 16 * HIDDEN**2, "sub_group_size": 16 * HIDDEN**2}
    for path in SHIPPED:
        ds = json.loads(path.read_text())
        zero = ds["zero_optimization"]
        dtype = "bf16" if "bf16" in path.name else "fp32"
        filled = fill_deepspeed_config(ds, RunConfig(model=ModelConfig(dtype=dtype)), 2, hidden_size=HIDDEN)
        expected = {k: v for k, v in sized.items() if zero["stage"] == 3 or k == "reduce_bucket_size"}
        if zero["stage"] < 2:
            expected = {}
        assert {k: zero.get(k) for k in expected} == dict.fromkeys(expected, "auto"), path.name
        assert {k: filled["zero_optimization"][k] for k in expected} == expected, path.name
        if "offload" in path.name:
            assert zero["offload_optimizer"] == {"device": "cpu", "pin_memory": True}, path.name


@pytest.mark.dist
def test_every_shipped_deepspeed_config_trains_on_two_ranks(tmp_path):
    assert len(SHIPPED) >= 10, SHIPPED
    out = tmp_path / "results.json"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning", LOCAL_SIZE="2",
               TORCH_EXTENSIONS_DIR=os.environ.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), __file__, str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=480)  # + compiling CPUAdam
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    results = json.loads(out.read_text())

    offloaded = [p.name for p in SHIPPED if "offload" in p.name]
    assert sorted(results) == sorted([p.name for p in SHIPPED] + [name + CPU_ADAM for name in offloaded])
    for name, result in results.items():
        stage = 3 if name.startswith("zero3") else int(name[len("zero")])
        assert result["stage"] == stage, name
        assert result["bf16"] == ("bf16" in name), name
        assert all(math.isfinite(loss) for loss in result["losses"]), (name, result)
        assert result["losses"][-1] < result["losses"][0], (name, result)  # it trains
        assert result["partitioned"] == (stage == 3), name
        assert result["offload"] == ("offload" in name), name
    for name in offloaded:
        assert results[name + CPU_ADAM]["optimizer_class"] == "DeepSpeedCPUAdam"
        assert results[name]["optimizer_class"] == "AdamW"
    # Every fp32 stage computes the same update as ZeRO-0, and every bf16 ZeRO stage the same as ZeRO-1;
    # DeepSpeedCPUAdam the same as torch AdamW (same formula; vectorised fp32 arithmetic).
    for name, result in results.items():
        reference = results["zero1_bf16.json" if "bf16" in name else "zero0_fp32.json"]["losses"]
        if name == "zero0_bf16.json":
            # DeepSpeed wraps a client optimizer at ZeRO-0 + bf16 in FP16_UnfusedOptimizer, which takes one
            # zero-gradient optimizer step at start-up: AdamW's bias correction then starts at step 2 and the
            # first updates are ~25% smaller (see ds_configs/README.md).
            assert result["optimizer"] == "FP16_UnfusedOptimizer"
            assert result["losses"] == pytest.approx(reference, abs=5e-2), name
        else:
            assert result["losses"] == pytest.approx(reference, abs=1e-5 if "fp32" in name else 1e-3), name


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(out: Path) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    import transformers

    from neuroprune_ds.config import ModelConfig, NeuroPruneConfig, RunConfig, ScheduleConfig
    from neuroprune_ds.deepspeed_config import check_deepspeed_config, fill_deepspeed_config, load_deepspeed_config
    from neuroprune_ds.train import release_shm_allreduce_buffer

    deepspeed.init_distributed()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    # LOCAL_SIZE (set by the test, as the deepspeed launcher does) switches on DeepSpeed's shm all-reduce.
    buffer = Path("/dev/shm") / (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ['MASTER_ADDR']}_"
                                 f"{os.environ['MASTER_PORT']}_{rank}")
    assert buffer.exists(), sorted(Path("/dev/shm").glob("deepspeed_allreduce_buffer_*"))
    release_shm_allreduce_buffer(rank, world_size)
    assert not buffer.exists()
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=96)
    inputs = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(rank))
    results = {}
    for path in SHIPPED:
        dtype = "bf16" if "bf16" in path.name else "fp32"
        # The engine alone is under test; zero0_bf16 is for dense runs (the config check refuses NeuroPrune there).
        run = RunConfig(model=ModelConfig(name_or_path="tiny", dtype=dtype),
                        schedule=ScheduleConfig(micro_batch_size=2, lr=1e-2, grad_clip=1.0),
                        neuroprune=NeuroPruneConfig(enabled=False))
        ds = load_deepspeed_config(path)
        errors = check_deepspeed_config(ds, run, world_size)
        assert not errors, (path.name, errors)
        ds = fill_deepspeed_config(ds, run, world_size, hidden_size=config.hidden_size)
        if ds["zero_optimization"]["stage"] == 3:
            ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
        optimizers = ["torch", "cpu_adam"] if "offload" in path.name else ["torch"]
        for choice in optimizers:
            run.schedule.optimizer = choice
            name = path.name + (CPU_ADAM if choice == "cpu_adam" else "")
            results[name] = _train(ds, run, config, inputs, world_size)
    if rank == 0:
        out.write_text(json.dumps(results, indent=1))
    dist.barrier()
    sys.stdout.flush()
    os._exit(0)  # skips an occasional abort in DeepSpeed/gloo teardown (see distributed.barrier_and_exit)


def _train(ds, run, config, inputs, world_size) -> dict:
    import deepspeed
    import torch
    import torch.distributed as dist
    import transformers

    from neuroprune_ds.train import build_optimizer

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    optimizer = build_optimizer(model, run)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds)
    losses = []
    for _ in range(STEPS):
        loss = engine(input_ids=inputs, labels=inputs).loss
        engine.backward(loss)
        engine.step()
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(float(mean) / world_size)
    params = list(engine.module.parameters())
    result = {
        "losses": losses,
        "stage": engine.zero_optimization_stage(),
        "bf16": engine.bfloat16_enabled(),
        "partitioned": all(hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel for p in params),
        "offload": bool(engine.zero_offload_optimizer()),
        "optimizer": type(engine.optimizer).__name__,
        "optimizer_class": type(optimizer).__name__,
    }
    engine.destroy()
    del engine, model, optimizer
    gc.collect()
    return result


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
