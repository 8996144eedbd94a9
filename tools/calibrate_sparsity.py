"""Gradient vs decoupled penalty steps (with and without a recovery phase) at an equal step budget.

    python tools/calibrate_sparsity.py [--out runs/calibrate] [--steps 40] [--lr 1e-4] [--target 0.2]

SmolLM2-135M-Instruct fine-tuned in ONE process (real DeepSpeed engine, 1 rank, ZeRO-0 fp32) on the first 90%
of Botchan, 4 x 128 tokens per step, AdamW with a cosine schedule, the same data order for every run:
- ``dense``: NeuroPrune off (the baseline of the recipe);
- ``gradient``: ``update: gradient`` with ``target_sparsity`` (the controller sets lambda);
- ``decoupled``: ``update: decoupled``, same target;
- ``decoupled_recover``: the same, with the final quarter of the steps as ``recover_steps``.
Each model is scored with the penalised weights below epsilon zeroed (as the export does): perplexity on the
held-out last 10% of Botchan (the training domain) and on Reuters news articles (another domain), weight
sparsity, and FFN units below 10% connectivity. Writes ``<out>/results.json`` and prints a markdown table
(docs/sparsity.md quotes it).
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import assets  # noqa: E402 (tools/ is on sys.path when run as a script)
from bench_quality import split_text  # noqa: E402 (tools/ is on sys.path when run as a script)

RUNS = ("dense", "gradient", "decoupled", "decoupled_recover")
BLOCK = 128


def prepare_data(out: Path) -> dict[str, Path]:
    data = out / "data"
    split_text(assets.botchan_text(), data)
    news = [json.loads(line)["source"] for line in assets.headlines_jsonl().read_text(encoding="utf-8").splitlines()]
    (data / "news.txt").write_text("\n".join(news) + "\n", encoding="utf-8")
    return {"train": data / "train.txt", "eval": data / "eval.txt", "news": data / "news.txt"}


def run_config(name: str, data: dict[str, Path], out: Path, args) -> Path:
    neuroprune = {"enabled": name != "dense", "update": "gradient" if name == "gradient" else "decoupled",
                  "mlp_lambda": 1e-4 if name == "gradient" else 1.0,
                  "attn_lambda": 1e-4 if name == "gradient" else 1.0,
                  "target_sparsity": args.target, "target_ramp_steps": int(args.steps * 0.6),
                  "prune_heads": False, "recover_steps": args.steps // 4 if name == "decoupled_recover" else 0}
    config = {
        "task": "causal_lm", "output_dir": str(out / name), "deepspeed": str(ROOT / "ds_configs" / "zero0_fp32.json"),
        "model": {"name_or_path": str(assets.smollm2_dir()), "dtype": "fp32"},
        "data": {"train": str(data["train"]), "eval": str(data["eval"]), "max_length": BLOCK},
        "schedule": {"epochs": 100, "max_steps": args.steps, "micro_batch_size": 4, "lr": args.lr, "warmup_steps": 0,
                     "lr_scheduler": "cosine", "log_every_steps": 10, "seed": 0},
        "checkpoint": {"every_steps": 0, "resume": "never"},
        "neuroprune": neuroprune,
    }
    path = out / name / "run.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@torch.no_grad()
def perplexity(model, tokenizer, text: str, blocks: int) -> float:
    ids = tokenizer(text, return_tensors="pt").input_ids[0][:blocks * BLOCK]
    batch = ids[:len(ids) // BLOCK * BLOCK].view(-1, BLOCK)
    losses = [float(model(input_ids=chunk, labels=chunk).loss) for chunk in batch.split(8)]
    weights = [len(chunk) for chunk in batch.split(8)]
    return math.exp(sum(loss * w for loss, w in zip(losses, weights)) / sum(weights))


def measure(model, tokenizer, data: dict[str, Path], epsilon: float, args) -> dict:
    from neuroprune_ds.arch import resolve_architecture
    from neuroprune_ds.export.plan import penalised_weights

    arch = resolve_architecture(model)
    params = dict(model.named_parameters())
    names = penalised_weights(arch)
    with torch.no_grad():
        for name in names:
            params[name].masked_fill_(params[name].abs() < epsilon, 0.0)
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    weak_units = 0
    for block in arch.ffn:
        inputs = torch.cat([params[i.weight] for i in block.inputs], dim=1)
        weak_units += int(((inputs != 0).float().mean(dim=1) < 0.1).sum())
    model.eval()
    return {"sparsity": zeros / sum(params[n].numel() for n in names),
            "ffn_units_below_10pct": weak_units, "ffn_units": sum(b.width for b in arch.ffn),
            "ppl_botchan": perplexity(model, tokenizer, data["eval"].read_text(encoding="utf-8"), args.blocks),
            "ppl_news": perplexity(model, tokenizer, data["news"].read_text(encoding="utf-8"), args.blocks)}


def train_and_measure(name: str, data: dict[str, Path], out: Path, args) -> dict:
    import time

    from neuroprune_ds.train import setup

    session = setup(SimpleNamespace(config=run_config(name, data, out, args), overrides=[], deepspeed=None))
    engine, pruner = session.engine, session.pruner
    before = measure(engine.module, session.tokenizer, data, session.run.neuroprune.epsilon, args) \
        if name == "dense" else None
    started = time.perf_counter()
    engine.train()
    while engine.global_steps < args.steps:
        for batch in session.loader:
            engine.backward(engine(**batch).loss)
            if pruner is not None:
                pruner.after_backward()
            engine.step()
            if pruner is not None:
                pruner.after_step()
            if engine.global_steps >= args.steps:
                break
    result = {"run": name, "steps": args.steps, "lr": args.lr, "seconds": time.perf_counter() - started}
    result |= measure(engine.module, session.tokenizer, data, session.run.neuroprune.epsilon, args)
    if before is not None:
        result["pretrained"] = before
    print(json.dumps(result), flush=True)
    engine.destroy()
    del session, engine, pruner
    gc.collect()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "calibrate")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--target", type=float, default=0.2)
    parser.add_argument("--blocks", type=int, default=32, help="128-token blocks per perplexity text")
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=list(RUNS))
    args = parser.parse_args()
    import os
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.manual_seed(0)
    data = prepare_data(args.out)
    results = [train_and_measure(name, data, args.out, args) for name in args.runs]
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print("| run | weight sparsity | FFN units < 10% conn. | ppl Botchan (held out) | ppl Reuters news |")
    print("|---|---|---|---|---|")
    for r in results:
        if "pretrained" in r:
            p = r["pretrained"]
            print(f"| pretrained (no fine-tuning) | {p['sparsity']:.3f} | {p['ffn_units_below_10pct']} / "
                  f"{p['ffn_units']} | {p['ppl_botchan']:.2f} | {p['ppl_news']:.2f} |")
        print(f"| {r['run']} | {r['sparsity']:.3f} | {r['ffn_units_below_10pct']} / {r['ffn_units']} | "
              f"{r['ppl_botchan']:.2f} | {r['ppl_news']:.2f} |")


if __name__ == "__main__":
    main()
