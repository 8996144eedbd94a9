"""NeuroPrune's cost on a DeepSpeed step, measured side by side on 2 ranks for ZeRO stages 0-3.

    python tools/bench_overhead.py [--steps 8] [--layers 16] [--stages 0 1 2 3]

A LLaMA-config model of >= 50M parameters (random weights, fp32) trains on random tokens with the settings
users run: the degree-weighted penalty, ``stop_at_zero`` and a ``target_sparsity`` (the controller and its
ratio histogram). In one engine per stage, steps alternate between plain DeepSpeed (pruner disabled) and
DeepSpeed + NeuroPrune, so machine noise hits both alike; the first two steps of each kind are warm-up and
not timed. Reported per stage: median step time of each, their ratio, the bytes NeuroPrune all-reduces per
step against the bytes of the gradients DeepSpeed reduces per step, and what the pruner adds to one step
(``after_backward``, its optimizer-step hooks and ``after_step``; counted on rank 0 as the difference
between a step with and a step without it): aten ops (kernel launches plus views) and host syncs, each per
decoder layer. The last line is `overhead_zero3=<ratio> comm_fraction=<ratio>`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNC_OPS = ("aten._local_scalar_dense", "aten.nonzero", "aten.is_nonzero", "aten.equal", "aten.masked_select",
            "aten._unique2", "aten.unique_consecutive")
"""Aten ops whose result needs device values on the host (.item(), float/bool/int of a tensor, nonzero ...)."""


class _DispatchCounter(TorchDispatchMode):
    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket._qualified_op_name.replace("::", ".")
        self.counts["aten_ops"] += 1
        self.counts["views" if func.is_view else "kernels"] += 1
        if name in SYNC_OPS:
            self.counts["syncs"] += 1
        elif name == "aten._to_copy" and _leaves_device(args[0], kwargs):
            self.counts["syncs"] += 1
        return func(*args, **(kwargs or {}))


def _leaves_device(tensor, kwargs) -> bool:
    target = (kwargs or {}).get("device")
    return target is not None and torch.device(target).type == "cpu" and tensor.device.type != "cpu"


class _TolistCounter(TorchFunctionMode):
    """``Tensor.tolist`` reads the host copy without an aten op on CPU (on GPUs it is a device-to-host copy)."""

    def __init__(self, counts: Counter):
        super().__init__()
        self.counts = counts

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.Tensor.tolist:
            self.counts["syncs"] += 1
        return func(*args, **(kwargs or {}))


class OpCounter:
    """Counts the aten ops (``aten_ops``; of them ``kernels`` and ``views``) and the host syncs (``syncs``) run
    inside the ``with`` block, in ``self.counts``."""

    def __init__(self):
        self.counts: Counter = Counter()
        self._modes = (_TolistCounter(self.counts), _DispatchCounter(self.counts))

    def __enter__(self) -> OpCounter:
        for mode in self._modes:
            mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        for mode in reversed(self._modes):
            mode.__exit__(*exc)


def pruner_step_counts(engine, pruner, batch: dict) -> Counter:
    """What the pruner adds to one training step: the counts of a step with it minus those of one without.

    Forward and backward are not counted (the pruner does not touch them); ``after_backward``, the optimizer
    step (which runs the pruner's ``stop_at_zero`` hooks) and ``after_step`` are. The pruner must have stepped
    once already (its controller then histograms, as in every later step).
    """
    counts = {}
    for enabled in (False, True):
        pruner.config.enabled = enabled
        engine.backward(engine(**batch).loss)
        with OpCounter() as counter:
            pruner.after_backward()
            engine.step()
            pruner.after_step()
        counts[enabled] = counter.counts
    counts[True].subtract(counts[False])
    return counts[True]


def worker(args) -> None:
    import deepspeed
    import torch
    import torch.distributed as dist
    import transformers

    from neuroprune_ds.config import NeuroPruneConfig
    from neuroprune_ds.pruner import NeuroPruner

    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    rank = dist.get_rank()
    results = {}
    for stage in args.stages:
        torch.manual_seed(0)
        config = transformers.LlamaConfig(hidden_size=512, intermediate_size=1536, num_hidden_layers=args.layers,
                                          num_attention_heads=8, num_key_value_heads=4, vocab_size=8000,
                                          max_position_embeddings=args.seq)
        model = transformers.AutoModelForCausalLM.from_config(config)
        n_params = sum(p.numel() for p in model.parameters())
        grad_bytes = sum(p.numel() for p in model.parameters() if p.requires_grad) * 4
        ds_config = {"train_micro_batch_size_per_gpu": args.batch, "gradient_accumulation_steps": 1,
                     "gradient_clipping": 1.0, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
                     "zero_optimization": {"stage": stage}}
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        pruner = NeuroPruner(engine, NeuroPruneConfig(target_sparsity=0.5, target_ramp_steps=20))
        sent = []
        reduce = pruner.access.all_reduce_sum

        def counting_reduce(tensors):
            sent.append(sum(t.numel() * t.element_size() for t in tensors))
            return reduce(tensors)

        pruner.access.all_reduce_sum = counting_reduce
        times = {True: [], False: []}
        gen = torch.Generator().manual_seed(rank)
        for step in range(2 * (args.steps + 2)):
            with_pruner = step % 2 == 1
            pruner.config.enabled = with_pruner
            ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
            dist.barrier()
            start = time.perf_counter()
            loss = engine(input_ids=ids, labels=ids).loss
            engine.backward(loss)
            pruner.after_backward()
            engine.step()
            pruner.after_step()
            dist.barrier()
            if step >= 4:
                times[with_pruner].append(time.perf_counter() - start)
        ids = torch.randint(0, config.vocab_size, (args.batch, args.seq), generator=gen)
        counts = pruner_step_counts(engine, pruner, {"input_ids": ids, "labels": ids})
        results[stage] = {"aten_ops": counts["aten_ops"], "kernels": counts["kernels"], "syncs": counts["syncs"],
                          "params": n_params, "plain_s": statistics.median(times[False]),
                          "neuroprune_s": statistics.median(times[True]),
                          "neuroprune_bytes": max(sent) if sent else 0, "gradient_bytes": grad_bytes}
        engine.destroy()
        del engine, model, optimizer, pruner
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    os._exit(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=8, help="timed steps of each kind per stage")
    parser.add_argument("--layers", type=int, default=16, help="decoder layers (16 gives 58M parameters)")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "bench.json")
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29561",
               __file__, "--worker", "--out", out, "--steps", str(args.steps), "--layers", str(args.layers),
               "--seq", str(args.seq), "--batch", str(args.batch), "--stages", *map(str, args.stages)]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)
        with open(out) as f:
            results = {int(k): v for k, v in json.load(f).items()}
    print(f"model: LLaMA config, {results[args.stages[0]]['params'] / 1e6:.1f}M parameters, fp32, 2 ranks (gloo), "
          f"micro-batch {args.batch} x {args.seq} tokens, median of {args.steps} interleaved steps each")
    print("| ZeRO stage | DeepSpeed s/step | + NeuroPrune s/step | ratio | NeuroPrune bytes/step | "
          "gradient bytes/step | comm fraction | aten ops/layer | of them kernels | host syncs/step |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for stage, r in results.items():
        print(f"| {stage} | {r['plain_s']:.3f} | {r['neuroprune_s']:.3f} | {r['neuroprune_s'] / r['plain_s']:.3f} | "
              f"{r['neuroprune_bytes']:,} | {r['gradient_bytes']:,} | "
              f"{r['neuroprune_bytes'] / r['gradient_bytes']:.4%} | {r['aten_ops'] / args.layers:.1f} | "
              f"{r['kernels'] / args.layers:.1f} | {r['syncs']} |")
    last = results[max(results)]
    print(f"overhead_zero{max(results)}={last['neuroprune_s'] / last['plain_s']:.3f} "
          f"comm_fraction={last['neuroprune_bytes'] / last['gradient_bytes']:.5f}")


if __name__ == "__main__":
    main()
