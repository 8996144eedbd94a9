"""Gradient vs decoupled penalty steps (with and without a recovery phase) at an equal step budget.

    python tools/calibrate_sparsity.py [--out runs/calibrate] [--steps 40] [--lr 1e-4] [--target 0.2]
        [--lambda 10] [--recover-steps 12] [--prune-units-below 0.3] [--runs dense decoupled_recover]

SmolLM2-135M-Instruct fine-tuned in ONE process (real DeepSpeed engine, 1 rank, ZeRO-0 fp32) on the first 90%
of Botchan, 4 x 128 tokens per step, AdamW with a cosine schedule, the same data order for every run:
- ``dense``: NeuroPrune off (the baseline of the recipe);
- ``gradient``: ``update: gradient`` with ``target_sparsity`` (the controller sets lambda);
- ``decoupled``: ``update: decoupled``, same target;
- ``decoupled_recover``: the same, with the final quarter of the steps (or ``--recover-steps``) as
  ``recover_steps``.
The recipe flags (``--lambda``, ``--target none``, ``--prune-units-below``, ``--units-fraction``, ``--unit-score``,
``--prune-every``, ``--theta-mode``, ``--lr-scheduler``)
apply to every NeuroPrune run. Each model is scored with the penalised weights below epsilon zeroed (as the export does): perplexity on the
held-out last 10% of Botchan (the training domain) and on Reuters news articles (another domain), weight
sparsity, FFN units pruned by the run (``prune_ffn_units_below``) and those below 10% connectivity, and
the KV-head groups kept. ``--structured 0.1 0.25`` first scores the pretrained model with that share of
each FFN block's lowest-norm units removed (``baselines.structured_magnitude_pruned``: what a rule that
ranks units by their weights removes), after printing the quantiles of the FFN weights' |w| and of the
units' mean |w|. Writes ``<out>/results.json`` and prints a markdown table
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


def recover_steps(name: str, args) -> int:
    if name != "decoupled_recover":
        return 0
    return args.steps // 4 if args.recover_steps is None else args.recover_steps


def neuroprune_section(name: str, args) -> dict:
    """The run's ``neuroprune:`` section; base lambda 1e-4 in gradient mode and 1.0 in decoupled mode unless
    ``--lambda`` is given (under a target the controller scales it)."""
    lam = args.lam if args.lam is not None else (1e-4 if name == "gradient" else 1.0)
    return {"enabled": name != "dense", "update": "gradient" if name == "gradient" else "decoupled",
            "mlp_lambda": lam, "attn_lambda": lam, "target_sparsity": args.target,
            "target_ramp_steps": int(args.steps * 0.6), "recover_steps": recover_steps(name, args),
            "prune_ffn_units_below": args.prune_units_below, "prune_every_steps": args.prune_every or args.steps,
            "prune_ffn_units_fraction": args.units_fraction, "ffn_unit_score": args.unit_score,
            "prune_heads": args.theta is not None, "theta": args.theta or 0.15, "theta_mode": args.theta_mode}


def run_config(name: str, data: dict[str, Path], out: Path, args) -> Path:
    neuroprune = neuroprune_section(name, args)
    config = {
        "task": "causal_lm", "output_dir": str(out / name), "deepspeed": str(ROOT / "ds_configs" / "zero0_fp32.json"),
        "model": {"name_or_path": str(assets.smollm2_dir()), "dtype": "fp32"},
        "data": {"train": str(data["train"]), "eval": str(data["eval"]), "max_length": BLOCK},
        "schedule": {"epochs": 100, "max_steps": args.steps, "micro_batch_size": 4, "lr": args.lr, "warmup_steps": 0,
                     "lr_scheduler": args.lr_scheduler, "log_every_steps": 10, "seed": 0},
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


def measure(model, tokenizer, data: dict[str, Path], epsilon: float, args, pruner=None) -> dict:
    from neuroprune_ds.arch import penalised_weights, resolve_architecture

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
    summary = pruner.summary() if pruner is not None else None
    return {"sparsity": zeros / sum(params[n].numel() for n in names),
            "ffn_units_pruned": sum(block["pruned_units"] for block in summary["ffn"]) if summary else 0,
            "kv_groups_kept": sum(len(block["kept_units"]) for block in summary["attention"]) if summary
            else sum(block.num_units for block in arch.attention),
            "ffn_units_below_10pct": weak_units, "ffn_units": sum(b.width for b in arch.ffn),
            "ppl_botchan": perplexity(model, tokenizer, data["eval"].read_text(encoding="utf-8"), args.blocks),
            "ppl_news": perplexity(model, tokenizer, data["news"].read_text(encoding="utf-8"), args.blocks)}


def unit_scales(model) -> dict[str, list[float]]:
    """Quantiles (1, 10, 25, 50, 75, 90%) of |w| over every FFN weight (every 7th element) and of each FFN
    unit's mean |w| over its in group (rows of every input projection) and its out group (output column)."""
    from neuroprune_ds.arch import resolve_architecture

    arch, params = resolve_architecture(model), dict(model.named_parameters())
    levels = torch.tensor([0.01, 0.1, 0.25, 0.5, 0.75, 0.9])
    weights, unit_in, unit_out = [], [], []
    for block in arch.ffn:
        inputs = torch.cat([params[i.weight].detach().abs() for i in block.inputs], dim=1)
        output = params[block.output.weight].detach().abs()
        weights += [inputs.flatten()[::7], output.flatten()[::7]]
        unit_in.append(inputs.mean(dim=1))
        unit_out.append(output.mean(dim=0))
    return {name: torch.quantile(torch.cat(values), levels).tolist()
            for name, values in (("abs_w", weights), ("unit_in_mean_abs_w", unit_in),
                                 ("unit_out_mean_abs_w", unit_out))}


def structured_removal(data: dict[str, Path], args) -> list[dict]:
    """Perplexity of the pretrained model with each share ``args.structured`` of every FFN block's
    lowest-norm units removed."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from baselines import structured_magnitude_pruned
    from neuroprune_ds.arch import resolve_architecture

    tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_dir())
    texts = {key: data[key].read_text(encoding="utf-8") for key in ("eval", "news")}
    results = []
    for share in args.structured:
        model = AutoModelForCausalLM.from_pretrained(assets.smollm2_dir(), dtype=torch.float32).eval()
        arch = resolve_architecture(model)
        if not results:
            print(json.dumps({"pretrained_ffn_quantiles_1_10_25_50_75_90": unit_scales(model)}), flush=True)
        structured_magnitude_pruned(model, arch, {b.name: int(share * b.width) for b in arch.ffn}, {})
        results.append({"share": share} | {f"ppl_{key}": perplexity(model, tokenizer, text, args.blocks)
                                            for key, text in texts.items()})
        print(json.dumps(results[-1]), flush=True)
    return results


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
            if pruner is not None and engine.global_steps % 10 == 0:
                metrics = pruner.metrics()
                print(json.dumps({"step": engine.global_steps, "sparsity": metrics["sparsity/weight"],
                                  "lambda_scale": metrics["neuroprune/lambda_scale"]}), flush=True)
            if engine.global_steps >= args.steps:
                break
    result = {"run": name, "steps": args.steps, "lr": args.lr, "seconds": time.perf_counter() - started,
              "neuroprune": neuroprune_section(name, args)}
    result |= measure(engine.module, session.tokenizer, data, session.run.neuroprune.epsilon, args, pruner)
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
    parser.add_argument("--target", type=lambda v: None if v == "none" else float(v), default=0.2,
                        help="target weight sparsity, or 'none' for fixed lambdas")
    parser.add_argument("--lambda", dest="lam", type=float, default=None,
                        help="base lambda of both penalties (default 1e-4 gradient, 1.0 decoupled)")
    parser.add_argument("--recover-steps", type=int, default=None, help="decoupled_recover (default steps // 4)")
    parser.add_argument("--prune-units-below", type=float, default=None, help="prune_ffn_units_below")
    parser.add_argument("--units-fraction", type=float, default=None, help="prune_ffn_units_fraction")
    parser.add_argument("--unit-score", choices=("taylor", "connectivity"), default="taylor", help="ffn_unit_score")
    parser.add_argument("--prune-every", type=int, default=None, help="prune_every_steps (default: the run's steps)")
    parser.add_argument("--theta", type=float, default=None, help="prune heads at this theta (default: no)")
    parser.add_argument("--theta-mode", choices=("absolute", "relative"), default="absolute")
    parser.add_argument("--lr-scheduler", default="cosine")
    parser.add_argument("--blocks", type=int, default=32, help="128-token blocks per perplexity text")
    parser.add_argument("--runs", nargs="*", choices=RUNS, default=list(RUNS))
    parser.add_argument("--structured", nargs="*", type=float, default=[],
                        help="shares of FFN units to remove by weight norm from the pretrained model")
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
    removal = structured_removal(data, args)
    results = [train_and_measure(name, data, args.out, args) for name in args.runs]
    (args.out / "results.json").write_text(json.dumps({"structured": removal, "runs": results}, indent=1))
    if removal:
        print("| FFN units removed by weight norm (pretrained) | ppl Botchan (held out) | ppl Reuters news |")
        print("|---|---|---|")
        for r in removal:
            print(f"| {r['share']:.0%} | {r['ppl_eval']:.4g} | {r['ppl_news']:.4g} |")
    if not results:
        return
    print("| run | weight sparsity | FFN units pruned | FFN units < 10% conn. | KV groups kept | ppl Botchan "
          "(held out) | ppl Reuters news | s/step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        if "pretrained" in r:
            print(table_row("pretrained (no fine-tuning)", r["pretrained"], "-"))
        print(table_row(r["run"], r, f"{r['seconds'] / r['steps']:.1f}"))


def table_row(name: str, r: dict, seconds_per_step: str) -> str:
    return (f"| {name} | {r['sparsity']:.3f} | {r['ffn_units_pruned']} / {r['ffn_units']} | "
            f"{r['ffn_units_below_10pct']} / {r['ffn_units']} | {r['kv_groups_kept']} | {r['ppl_botchan']:.2f} | "
            f"{r['ppl_news']:.2f} | {seconds_per_step} |")


if __name__ == "__main__":
    main()
