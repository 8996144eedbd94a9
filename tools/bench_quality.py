"""Quality benchmark: NeuroPrune vs plain L1 vs magnitude pruning at equal weight sparsity, on real models.

    python tools/bench_quality.py                      # both parts, defaults below (~45 min on 2 cores)
    python tools/bench_quality.py --part lm --steps 200 --lr 2e-3 --levels 0.25 0.5 0.7

Two parts, each trained in this process on a real DeepSpeed engine (1 rank, ZeRO-0 fp32; the pruner's
equality across ZeRO stages and ranks is proved by tests/test_zero_equivalence.py):
- ``lm``: SmolLM2-135M-Instruct fine-tuned on Jane Austen's novels, held-out perplexity on the last 10%;
- ``cls``: all-MiniLM-L6-v2 (BERT) with a fresh classifier head on Rotten Tomatoes, accuracy on 1000
  held-out reviews.

Per part, three runs with the same data order, learning rate and step budget:
- NeuroPrune (``penalty: neuroprune``) and plain L1 (``penalty: l1``), each with ``target_sparsity`` set a
  little above the highest level, so the controller sets lambda (no sweep); whenever the measured weight
  sparsity passes a level, the model is scored there (weights with |w| < epsilon zeroed, as the export does);
- dense fine-tuning (NeuroPrune off), then magnitude pruning of its penalised matrices (one global
  threshold) to each level, scored the same way.
It also records the paper's qualitative claims: the spread (std-dev) of FFN units' fractional connectivity
(inputs with |w| >= epsilon) for every method, and the heads NeuroPrune keeps per layer with the smallest
l_inf distance between two heads of a layer (theta must exceed it for a head to go).

Writes ``<out>/<part>/results.json``, ``<out>/results.md`` (the README tables) and ``<out>/<part>.png``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from neuroprune_ds import assets  # noqa: E402

METHODS = ("neuroprune", "l1", "dense")


# ---------------------------------------------------------------------------------------------- the parts


def lm_part(out: Path, args) -> dict:
    lines = [line for line in assets.austen_text().read_text(encoding="utf-8").splitlines() if line.strip()]
    cut = int(len(lines) * 0.9)
    data = out / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.txt").write_text("\n".join(lines[:cut]) + "\n", encoding="utf-8")
    (data / "eval.txt").write_text("\n".join(lines[cut:]) + "\n", encoding="utf-8")
    return {
        "task": "causal_lm",
        "model": {"name_or_path": str(assets.smollm2_dir()), "dtype": "fp32"},
        "data": {"train": str(data / "train.txt"), "eval": str(data / "eval.txt"), "max_length": 128,
                 "max_eval_examples": args.eval_examples},
        "schedule": {"micro_batch_size": 4},
        "metric": "eval/perplexity", "higher_is_better": False, "label": "SmolLM2-135M, Austen, perplexity",
    }


def cls_part(out: Path, args) -> dict:
    train, test = assets.rotten_tomatoes_split()
    return {
        "task": "classification", "num_labels": 2,
        "model": {"name_or_path": str(assets.minilm_dir()), "dtype": "fp32"},
        "data": {"train": str(train), "eval": str(test), "max_length": 64},
        "schedule": {"micro_batch_size": 32},
        "metric": "eval/accuracy", "higher_is_better": True, "label": "MiniLM-L6, Rotten Tomatoes, accuracy",
    }


PARTS = {"lm": lm_part, "cls": cls_part}


def run_config(part: dict, method: str, out: Path, args) -> Path:
    """Write the trainer config of one run; returns its path."""
    config = {
        "task": part["task"], "output_dir": str(out / method),
        "deepspeed": str(ROOT / "ds_configs" / "zero0_fp32.json"),
        "model": part["model"], "data": part["data"],
        "schedule": {"epochs": 100, "max_steps": args.steps, "lr": args.lr, "warmup_steps": 10,
                     "lr_scheduler": "constant", "log_every_steps": 10, "seed": 0, **part["schedule"]},
        "checkpoint": {"every_steps": 0, "resume": "never"},
        "neuroprune": {"enabled": method != "dense", "penalty": "l1" if method == "l1" else "neuroprune",
                       "mlp_lambda": 1e-4, "attn_lambda": 1e-4, "target_sparsity": min(0.99, max(args.levels) + 0.03),
                       "target_ramp_steps": int(args.steps * 0.8), "prune_heads": method == "neuroprune",
                       "prune_every_steps": 0, "theta": args.theta},
    }
    if "num_labels" in part:
        config["num_labels"] = part["num_labels"]
    path = out / method / "run.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------- measurement


@contextmanager
def zeroed(model, names: list[str], threshold: float | None = None, fraction: float | None = None):
    """Temporarily zero the penalised matrices' weights with |w| < threshold, or the smallest ``fraction`` of
    them (magnitude pruning, one global threshold); restores the weights afterwards."""
    params = dict(model.named_parameters())
    if fraction is not None:
        magnitudes = torch.cat([params[n].detach().abs().flatten() for n in names])
        threshold = float(torch.kthvalue(magnitudes, max(1, int(fraction * magnitudes.numel()))).values)
        del magnitudes
        below = lambda w: w.abs() <= threshold  # noqa: E731
    else:
        below = lambda w: w.abs() < threshold  # noqa: E731
    saved = {}
    with torch.no_grad():
        for n in names:
            mask = below(params[n])
            saved[n] = (mask, params[n][mask].clone())
            params[n][mask] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for n, (mask, values) in saved.items():
                params[n][mask] = values


def weight_sparsity(model, names: list[str], epsilon: float) -> float:
    params = dict(model.named_parameters())
    return sum(int((params[n].abs() < epsilon).sum()) for n in names) / sum(params[n].numel() for n in names)


def connectivity_spread(model, arch, epsilon: float) -> dict[str, float]:
    """Fractional connectivity c of each FFN unit (share of its input weights with |w| >= epsilon): mean,
    std-dev over all units of all layers, and the share of units with c < 0.1."""
    params = dict(model.named_parameters())
    per_unit = []
    for block in arch.ffn:
        present = sum((params[lin.weight].detach().abs() >= epsilon).sum(dim=1).double() for lin in block.inputs)
        per_unit.append(present / sum(lin.in_features for lin in block.inputs))
    c = torch.cat(per_unit)
    return {"connectivity_mean": float(c.mean()), "connectivity_std": float(c.std()),
            "units_below_10pct": float((c < 0.1).double().mean())}


def head_report(model, arch, alive: dict | None) -> list[dict]:
    """Per attention block: heads kept and the smallest l_inf distance between two live units."""
    from neuroprune_ds.heads import linf_distances, unit_parameters
    from neuroprune_ds.pruner import _layout

    params = dict(model.named_parameters())
    rows = []
    for block in arch.attention:
        keep = alive[block.name] if alive else torch.ones(block.num_units, dtype=torch.bool)
        units = unit_parameters(*(params[lin.weight].detach().float() for lin in (block.q, block.k, block.v)),
                                _layout(block))[keep]
        d = linf_distances(units)
        d.fill_diagonal_(float("inf"))
        rows.append({"block": block.name, "heads_kept": int(keep.sum()) * block.heads_per_unit,
                     "heads": block.num_heads, "min_linf": float(d.min()) if len(units) > 1 else None})
    return rows


def score(session, part: dict) -> float:
    from neuroprune_ds.evaluation import evaluate

    with torch.no_grad():
        metrics = evaluate(session.engine, session.data, session.tokenizer, batch_size=16, max_new_tokens=0)
    return metrics[part["metric"]]


def snapshot(session, part: dict, arch, names: list[str], epsilon: float, **extra) -> dict:
    model = session.engine.module
    with zeroed(model, names, threshold=epsilon):
        row = {"step": session.engine.global_steps, "sparsity": weight_sparsity(model, names, epsilon),
               "metric": score(session, part), **connectivity_spread(model, arch, epsilon)}
    return {**row, **extra}


# ------------------------------------------------------------------------------------------------ a run


def init_single_process() -> None:
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def train_and_measure(part: dict, method: str, out: Path, args) -> dict:
    """One run; NeuroPrune/L1 are scored at each level they pass, dense at the end with magnitude pruning."""
    from tqdm import tqdm

    from neuroprune_ds.arch import resolve_architecture
    from neuroprune_ds.export.plan import penalised_weights
    from neuroprune_ds.train import setup

    session = setup(SimpleNamespace(config=run_config(part, method, out, args), overrides=[], deepspeed=None))
    engine, pruner = session.engine, session.pruner
    arch = resolve_architecture(engine.module)
    names = penalised_weights(arch)
    epsilon = session.run.neuroprune.epsilon
    result = {"method": method, "levels": [], "steps": args.steps}
    if method == "dense":
        result["pretrained"] = snapshot(session, part, arch, names, epsilon)
    pending = sorted(args.levels)
    progress = tqdm(total=args.steps, desc=f"{part['name']}/{method}", unit="step", dynamic_ncols=True)
    started, engine_time = time.perf_counter(), 0.0
    engine.train()
    while engine.global_steps < args.steps and (pending or method == "dense"):
        for batch in session.loader:
            step_started = time.perf_counter()
            engine.backward(engine(**batch).loss)
            if pruner is not None:
                pruner.after_backward()
            engine.step()
            if pruner is not None:
                pruner.after_step()
            engine_time += time.perf_counter() - step_started
            progress.update(1)
            if pruner is not None and pending and pruner.measured_sparsity >= pending[0] - 0.02:
                measured = weight_sparsity(engine.module, names, epsilon)
                while pending and measured >= pending[0]:
                    if method == "neuroprune":
                        pruner.prune_heads()  # the paper prunes heads when a stage of training ends
                    row = snapshot(session, part, arch, names, epsilon, level=pending.pop(0))
                    row["heads"] = head_report(engine.module, arch, pruner.alive)
                    result["levels"].append(row)
                    progress.write(f"{method}: level {row['level']:.0%} at step {row['step']}: "
                                   f"{part['metric']} {row['metric']:.4g} (sparsity {row['sparsity']:.3f})")
                engine.train()
            if engine.global_steps >= args.steps or not (pending or method == "dense"):
                break
    progress.close()
    result["seconds_per_step"] = engine_time / max(engine.global_steps, 1)
    result["wall_s"] = time.perf_counter() - started
    result["final_step"] = engine.global_steps
    if method == "dense":
        result["fine_tuned"] = snapshot(session, part, arch, names, epsilon)
        result["fine_tuned"]["heads"] = head_report(engine.module, arch, None)
        for level in sorted(args.levels):
            with zeroed(engine.module, names, fraction=level):
                row = snapshot(session, part, arch, names, epsilon, level=level)
            result["levels"].append(row)
            print(f"magnitude: level {level:.0%}: {part['metric']} {row['metric']:.4g}", flush=True)
    else:
        result["missed_levels"] = pending
        result["final_sparsity"] = weight_sparsity(engine.module, names, epsilon)
    engine.destroy()
    del session, engine, pruner
    gc.collect()
    return result


# ------------------------------------------------------------------------------------------------ report


def tables(part: dict, results: dict, args) -> str:
    metric = part["metric"].split("/")[-1]
    dense = results["dense"]
    lines = [f"### {part['label']}", "",
             f"{args.steps} steps, lr {args.lr}, {part['schedule']['micro_batch_size']} sequences/step; "
             f"pretrained {metric} {dense['pretrained']['metric']:.4g}, dense fine-tuned "
             f"{dense['fine_tuned']['metric']:.4g} (connectivity std-dev "
             f"{dense['fine_tuned']['connectivity_std']:.3f}).", "",
             f"| target sparsity | NeuroPrune {metric} | L1 {metric} | magnitude {metric} | "
             "FFN connectivity std-dev NP / L1 / mag | step reached NP / L1 |", "|---|---|---|---|---|---|"]
    by_level = {m: {row["level"]: row for row in results[m]["levels"]} for m in METHODS}
    for level in sorted(args.levels):
        cells = [by_level[m].get(level) for m in METHODS]
        value = lambda row: f"{row['metric']:.4g}" if row else "not reached"  # noqa: E731
        spread = " / ".join(f"{row['connectivity_std']:.3f}" if row else "-" for row in cells)
        steps = " / ".join(str(row["step"]) if row else "-" for row in cells[:2])
        lines.append(f"| {level:.0%} | {' | '.join(value(row) for row in cells)} | {spread} | {steps} |")
    np_rows = results["neuroprune"]["levels"]
    if np_rows:
        last = np_rows[-1]
        kept = [h["heads_kept"] for h in last["heads"]]
        closest = min(h["min_linf"] for h in last["heads"] if h["min_linf"] is not None)
        lines += ["", f"NeuroPrune at {last['level']:.0%}: heads kept per attention block {kept} "
                      f"(of {last['heads'][0]['heads']}); closest pair of heads in any layer: l_inf "
                      f"{closest:.3f} (theta {args.theta})."]
    speed = " / ".join(f"{results[m]['seconds_per_step']:.2f}" for m in METHODS)
    lines += ["", f"Seconds per step NeuroPrune / L1 / dense: {speed}."]
    return "\n".join(lines)


def plot(part: dict, results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.5))
    axes = figure.add_subplot()
    for method, label in (("neuroprune", "NeuroPrune"), ("l1", "L1"), ("dense", "magnitude (dense fine-tune)")):
        rows = results[method]["levels"]
        axes.plot([r["sparsity"] for r in rows], [r["metric"] for r in rows], marker="o", label=label)
    axes.axhline(results["dense"]["fine_tuned"]["metric"], color="grey", linestyle=":", label="dense fine-tuned")
    axes.set_xlabel("weight sparsity of penalised matrices")
    axes.set_ylabel(part["metric"].split("/")[-1])
    axes.set_title(part["label"], fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_quality")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5, 0.7])
    parser.add_argument("--steps", type=int, default=None, help="step budget per run (default: lm 200, cls 200)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: lm 2e-3, cls 7e-4)")
    parser.add_argument("--theta", type=float, default=0.15)
    parser.add_argument("--eval-examples", type=int, default=64, help="held-out 128-token blocks (lm)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    args = parser.parse_args()
    for level in args.levels:
        if not 0 < level < 1:
            parser.error(f"--levels: {level} is not a sparsity in (0, 1)")
    init_single_process()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out.resolve()
    report = []
    for name in (PARTS if args.part == "all" else [args.part]):
        part_args = copy.copy(args)
        part_args.steps = args.steps or {"lm": 200, "cls": 200}[name]
        part_args.lr = args.lr or {"lm": 2e-3, "cls": 7e-4}[name]
        part_out = out / name
        part = {"name": name, **PARTS[name](part_out, part_args)}
        results_path = part_out / "results.json"
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        for method in args.methods:
            results[method] = train_and_measure(part, method, part_out, part_args)
            results_path.write_text(json.dumps(results, indent=1))
        if all(m in results for m in METHODS):
            report.append(tables(part, results, part_args))
            plot(part, results, out / f"{name}.png")
    if report:
        (out / "results.md").write_text("\n\n".join(report) + "\n")
        print("\n" + "\n\n".join(report))


if __name__ == "__main__":
    main()
