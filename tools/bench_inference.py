"""Compact vs dense export of a pruned causal LM on CPU: tokens/s of prefill and greedy generation, measured
side by side in one run, beside the theoretical FLOP ratio.

    python tools/bench_inference.py                                 # a random LLaMA, half its KV groups and
                                                                    # FFN units pruned, exported both ways
    python tools/bench_inference.py --dense D --compact C           # two existing exports of one checkpoint
    python tools/bench_inference.py --family opt --prune 0.5 --threads 2

The two models run alternately (prefill, then generation), each timing the median of --repeats runs, so
machine load affects both alike. Speed-up = dense time / compact time; FLOP speed-up = dense FLOPs / compact
FLOPs (2 per multiply-add of every Linear plus the attention scores and weighted sum at that context). The
last column is measured / FLOP speed-up (target >= 0.8). Nothing is asserted: the numbers are printed.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time

import torch
import transformers

from neuroprune_ds.arch import resolve_architecture
from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.export.convert import export_model


def synthetic_model(family: str, prune: float, seed: int) -> tuple[torch.nn.Module, dict]:
    """A random model whose layers lose about ``prune`` of their KV groups (varying by layer) and FFN units."""
    torch.manual_seed(seed)
    if family == "llama":
        config = transformers.LlamaConfig(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                          num_attention_heads=16, num_key_value_heads=8, vocab_size=8192,
                                          max_position_embeddings=1024)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.OPTConfig(hidden_size=1024, ffn_dim=4096, num_hidden_layers=8, num_attention_heads=16,
                                        vocab_size=8192, word_embed_proj_dim=1024, max_position_embeddings=1024)
        model = transformers.OPTForCausalLM(config)
    arch = resolve_architecture(model)
    params = dict(model.named_parameters())
    alive = {}
    with torch.no_grad():
        for block in arch.attention:
            pruned = min(block.num_units - 1, round(block.num_units * prune) + block.layer % 2)
            mask = torch.ones(block.num_units, dtype=torch.bool)
            mask[torch.randperm(block.num_units)[:pruned]] = False
            alive[block.name] = mask
        for block in arch.ffn:
            dead = torch.randperm(block.width)[:round(block.width * prune)]
            params[block.output.weight][:, dead] = 0
    return model.eval(), alive


def export_pair(model: torch.nn.Module, alive: dict, root: str) -> tuple[str, str]:
    """Export ``model`` both ways (export_model consumes its model, so dense gets a copy)."""
    dirs = []
    for fmt in ("dense", "compact"):
        out = f"{root}/{fmt}"
        report = export_model(copy.deepcopy(model) if fmt == "dense" else model, alive, out, fmt, task="causal_lm",
                              neuroprune=NeuroPruneConfig())
        print(f"exported {fmt}: {report.parameters:,} parameters, verified max |diff| {report.max_abs_diff:.1e}")
        dirs.append(out)
    return dirs[0], dirs[1]


def linear_flops_per_token(model: torch.nn.Module) -> int:
    """2 x multiply-adds of every Linear (the LM head included) for one token."""
    return 2 * sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))


def attention_flops_per_token(model: torch.nn.Module, context: int) -> int:
    """2 x multiply-adds of Q K^T and of the weighted sum of V, for one query over ``context`` keys."""
    query_width = sum(m.out_features for name, m in model.named_modules() if name.endswith("q_proj"))
    return 2 * 2 * query_width * context


def flops(model: torch.nn.Module, prompt: int, new_tokens: int) -> tuple[float, float]:
    """FLOPs of a prefill of ``prompt`` tokens (causal: mean context prompt / 2) and of generating
    ``new_tokens`` after it."""
    prefill = prompt * (linear_flops_per_token(model) + attention_flops_per_token(model, prompt // 2))
    decode = sum(linear_flops_per_token(model) + attention_flops_per_token(model, prompt + i)
                 for i in range(new_tokens))
    return prefill, decode


def seconds(run) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


@torch.no_grad()
def bench(models: dict, prompt: int, new_tokens: int, repeats: int, vocab: int) -> dict:
    """Median seconds of prefill and generation per model, the models alternating."""
    ids = torch.randint(4, vocab, (1, prompt), generator=torch.Generator().manual_seed(0))
    short = ids[:, :16]
    out = {name: {} for name in models}
    for name, model in models.items():  # warm-up
        model(ids)
        model.generate(short, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    for _ in range(repeats):
        for name, model in models.items():
            out[name].setdefault("prefill", []).append(seconds(lambda: model(ids)))
            out[name].setdefault("generate", []).append(seconds(
                lambda: model.generate(short, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                                       do_sample=False)))
    return {name: {k: statistics.median(v) for k, v in times.items()} for name, times in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dense", help="dense export directory (with --compact)")
    parser.add_argument("--compact", help="compact export directory of the same checkpoint")
    parser.add_argument("--family", choices=("llama", "opt"), default="llama", help="synthetic model family")
    parser.add_argument("--prune", type=float, default=0.5, help="fraction of KV groups and FFN units pruned")
    parser.add_argument("--prompt", type=int, default=256, help="prefill length")
    parser.add_argument("--new-tokens", type=int, default=32, help="greedy tokens generated after a 16-token prompt")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as root:
        if args.dense and args.compact:
            dense_dir, compact_dir = args.dense, args.compact
        else:
            dense_dir, compact_dir = export_pair(*synthetic_model(args.family, args.prune, args.seed), root)
        models = {fmt: transformers.AutoModelForCausalLM.from_pretrained(d, trust_remote_code=True,
                                                                          dtype=torch.float32).eval()
                  for fmt, d in (("dense", dense_dir), ("compact", compact_dir))}
        times = bench(models, args.prompt, args.new_tokens, args.repeats, models["dense"].config.vocab_size)
    counts = {fmt: sum(p.numel() for p in m.parameters()) for fmt, m in models.items()}
    work = {fmt: flops(m, args.prompt, args.new_tokens) for fmt, m in models.items()}
    print(f"parameters: dense {counts['dense']:,}, compact {counts['compact']:,} "
          f"({counts['compact'] / counts['dense']:.3f}x); {args.threads} threads, median of {args.repeats}")
    print(f"{'phase':<10}{'dense tok/s':>13}{'compact tok/s':>15}{'speed-up':>10}{'FLOP speed-up':>15}"
          f"{'measured/FLOP':>15}")
    for i, (phase, tokens) in enumerate((("prefill", args.prompt), ("generate", args.new_tokens))):
        speedup = times["dense"][phase] / times["compact"][phase]
        flop_speedup = work["dense"][i] / work["compact"][i]
        print(f"{phase:<10}{tokens / times['dense'][phase]:>13.1f}{tokens / times['compact'][phase]:>15.1f}"
              f"{speedup:>10.2f}{flop_speedup:>15.2f}{speedup / flop_speedup:>15.2f}")


if __name__ == "__main__":
    main()
