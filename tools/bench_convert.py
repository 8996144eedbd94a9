"""Peak memory and time of ``neuroprune convert`` on a random LLaMA-config ZeRO checkpoint.

    python tools/bench_convert.py                       # TinyLlama-1.1B shape (1.1B parameters, 4.1 GiB fp32)
    python tools/bench_convert.py --layers 6 --hidden 1024 --intermediate 2816 --heads 16 --kv-heads 4 --stage 2

Two ranks (torchrun, gloo) build the model in bf16 partitioned from the start (``HfDeepSpeedConfig`` kept
alive, as transformers does under ZeRO-3), wrap it in a real DeepSpeed ZeRO bf16 engine (so the checkpoint
holds the fp32 master in DeepSpeed's per-rank optimizer shards; the optimizer is plain SGD, which keeps no
state, to keep the checkpoint and the machine small), mark about half of each layer's KV groups pruned in
the NeuroPrune client state, and save the checkpoint per the trainer's contract, ``complete`` marker
included (no training step: the memory question does not depend on the values). Then each export (by
default: compact and dense in the run's dtype, bf16, and compact in fp32) is converted in a fresh process,
verification included, which prints its peak RSS; this script prints it beside the fp32 model size and the
RSS of a process that only imported the converter.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPORTS = (("compact", None), ("dense", None), ("compact", "fp32"))  # (format, --dtype); None: the run's (bf16)


def make_checkpoint(args: argparse.Namespace, ckpt_dir: str) -> None:
    """Runs in each rank (torchrun): a real DeepSpeed ZeRO checkpoint of a random LLaMA."""
    import deepspeed
    import torch
    import torch.distributed as dist
    import transformers
    from transformers.integrations import HfDeepSpeedConfig

    from neuroprune_ds.checkpoint import COMPLETE
    from neuroprune_ds.config import NeuroPruneConfig
    from neuroprune_ds.pruner import NeuroPruner

    deepspeed.init_distributed(dist_backend="gloo")
    config = transformers.LlamaConfig(hidden_size=args.hidden, intermediate_size=args.intermediate,
                                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                                      num_key_value_heads=args.kv_heads, vocab_size=args.vocab,
                                      max_position_embeddings=2048)
    # small communication buckets: the checkpoint, not DeepSpeed's buffers, is what this measures
    ds_config = {"train_micro_batch_size_per_gpu": 1,
                 "zero_optimization": {"stage": args.stage, "reduce_bucket_size": 5e7, "allgather_bucket_size": 5e7,
                                       "stage3_prefetch_bucket_size": 5e7, "stage3_max_live_parameters": 1e8},
                 "bf16": {"enabled": True}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
    keep_alive = HfDeepSpeedConfig(ds_config) if args.stage == 3 else None  # noqa: F841 (zero.Init while alive)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
    num_parameters = sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-5)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    neuroprune = NeuroPruneConfig()
    pruner = NeuroPruner(engine, neuroprune)
    generator = torch.Generator().manual_seed(0)
    for block in pruner.arch.attention:
        pruned = torch.randperm(block.num_units, generator=generator)[:block.num_units // 2 + block.layer % 2]
        pruner.alive[block.name][pruned] = False
    client_state = {"neuroprune": pruner.state_dict(), "neuroprune_config": dataclasses.asdict(neuroprune),
                    "model": {"name_or_path": "random-llama", "task": "causal_lm", "num_labels": 2}}
    engine.save_checkpoint(ckpt_dir, tag="step_0", client_state=client_state)
    dist.barrier()
    if dist.get_rank() == 0:
        config.save_pretrained(ckpt_dir)
        open(os.path.join(ckpt_dir, "step_0", COMPLETE), "w").close()
        print(f"checkpoint: {num_parameters:,} parameters, ZeRO-{args.stage}, {dist.get_world_size()} ranks",
              flush=True)
    dist.barrier()


def run(cmd: list[str], threads: str | None = None) -> tuple[str, float]:
    start = time.perf_counter()
    env = dict(os.environ, OMP_NUM_THREADS=threads or os.environ.get("OMP_NUM_THREADS", "2"), PYTHONWARNINGS="ignore")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
    return proc.stdout, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=22)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=5632)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--stage", type=int, choices=(1, 2, 3), default=3, help="ZeRO stage of the checkpoint")
    parser.add_argument("--work-dir", help="where to put the checkpoint and exports (default: a temporary dir)")
    parser.add_argument("--make-checkpoint", metavar="DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.make_checkpoint:
        make_checkpoint(args, args.make_checkpoint)
        return
    with tempfile.TemporaryDirectory(dir=args.work_dir) as root:
        ckpt = os.path.join(root, "ckpt")
        shape = [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
                 if k in ("layers", "hidden", "intermediate", "heads", "kv_heads", "vocab", "stage")]
        out, seconds = run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                            str(29400 + os.getpid() % 500), os.path.abspath(__file__), *shape, "--make-checkpoint",
                            ckpt], threads="1")
        print(next(line for line in out.splitlines() if line.startswith("checkpoint:")), f"(saved in {seconds:.0f} s)")
        out, _ = run([sys.executable, "-c", "import resource, neuroprune_ds.export.convert; "
                      "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)"])
        baseline = int(out.strip().splitlines()[-1])
        print(f"RSS of a process that only imported the converter: {baseline / 2**30:.2f} GiB")
        for fmt, dtype in EXPORTS:
            out, seconds = run([sys.executable, os.path.join(REPO, "tools", "convert_to_hf.py"), ckpt,
                                os.path.join(root, f"{fmt}_{dtype or 'default'}"), "--format", fmt,
                                *(["--dtype", dtype] if dtype else [])])
            report = "\n".join(line for line in out.splitlines()
                               if line.startswith(("wrote", "parameters:", "verification:", "peak RSS")))
            peak = float(re.search(r"peak RSS ([\d.]+) GiB", report).group(1)) * 2**30
            fp32 = float(re.search(r"\(([\d.]+) GiB\)", report).group(1)) * 2**30
            print(f"== {fmt}, --dtype {dtype or '(default: the run dtype)'}: {seconds:.0f} s\n{report}\n"
                  f"peak RSS above the import baseline: {(peak - baseline) / 2**30:.2f} GiB = "
                  f"{(peak - baseline) / fp32:.2f}x the fp32 model")


if __name__ == "__main__":
    main()
