"""Quality benchmark: NeuroPrune vs plain L1 vs magnitude pruning at equal weight sparsity, on real models.

    python tools/bench_quality.py                      # both parts, defaults below (~85 minutes on 2 cores)
    python tools/bench_quality.py --part lm --steps 100 --lr 3e-3 --levels 0.25 0.5 0.7

Two parts, each trained in this process on a real DeepSpeed engine (1 rank, ZeRO-0 fp32; the pruner's
equality across ZeRO stages and ranks is proved by tests/test_zero_equivalence.py):
- ``lm``: SmolLM2-135M-Instruct fine-tuned on Jane Austen's novels, held-out perplexity on the last 10%;
- ``cls``: all-MiniLM-L6-v2 (BERT) with a fresh classifier head on Rotten Tomatoes, accuracy on 1000
  held-out reviews.

Per part, with the same data order, learning rate and step budget:
- for each level, a NeuroPrune run (``penalty: neuroprune``) and a plain L1 run (``penalty: l1``) with
  ``target_sparsity`` = level, so the controller sets lambda (no sweep); scored at the end of the budget
  (weights with |w| < epsilon zeroed, as the export does);
- one dense fine-tuning run (NeuroPrune off), then magnitude pruning of its penalised matrices (one global
  threshold) to each level, scored the same way.
It also records the paper's qualitative claims: the spread (std-dev) of FFN units' fractional connectivity
(inputs with |w| >= epsilon) for every method, and the heads NeuroPrune keeps per layer with the smallest
l_inf distance between two heads of a layer (theta must exceed it for a head to go).

Writes ``<out>/<part>/results.json``, ``<out>/results.md`` (the tables of docs/benchmarks.md) and ``<out>/<part>.png``.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
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

import assets  # noqa: E402 (tools/ is on sys.path when run as a script)

METHODS = ("neuroprune", "l1", "dense")


# ---------------------------------------------------------------------------------------------- the parts


def split_text(text_file: Path, data: Path) -> None:
    """The non-empty lines of ``text_file``: the first 90% to ``data/train.txt``, the rest to ``data/eval.txt``."""
    lines = [line for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    cut = int(len(lines) * 0.9)
    data.mkdir(parents=True, exist_ok=True)
    (data / "train.txt").write_text("\n".join(lines[:cut]) + "\n", encoding="utf-8")
    (data / "eval.txt").write_text("\n".join(lines[cut:]) + "\n", encoding="utf-8")


def lm_part(out: Path, args) -> dict:
    data = out / "data"
    split_text(assets.austen_text(), data)
    return {
        "task": "causal_lm",
        "model": {"name_or_path": str(assets.smollm2_dir()), "dtype": "fp32"},
        "data": {"train": str(data / "train.txt"), "eval": str(data / "eval.txt"), "max_length": 128,
                 "max_eval_examples": args.eval_examples},
        "schedule": {"micro_batch_size": 2},
        "metric": "eval/perplexity", "higher_is_better": False, "label": "SmolLM2-135M, Austen, perplexity",
    }


def cls_part(out: Path, args) -> dict:
    train, test = assets.rotten_tomatoes_split()
    return {
        "task": "classification", "num_labels": 2,
        "model": {"name_or_path": str(assets.minilm_dir()), "dtype": "fp32"},
        "data": {"train": str(train), "eval": str(test), "max_length": 64},
        "schedule": {"micro_batch_size": 16},
        "metric": "eval/accuracy", "higher_is_better": True, "label": "MiniLM-L6, Rotten Tomatoes, accuracy",
    }


PARTS = {"lm": lm_part, "cls": cls_part}


def run_name(method: str, level: float | None) -> str:
    return method if level is None else f"{method}_{round(level * 100)}"


def run_config(part: dict, method: str, level: float | None, out: Path, args) -> Path:
    """Write the trainer config of one run; returns its path."""
    config = {
        "task": part["task"], "output_dir": str(out / run_name(method, level)),
        "deepspeed": str(ROOT / "ds_configs" / "zero0_fp32.json"),
        "model": part["model"], "data": part["data"],
        "schedule": {"epochs": 100, "max_steps": args.steps, "lr": args.lr, "warmup_steps": 10,
                     "lr_scheduler": "constant", "log_every_steps": 10, "seed": 0, **part["schedule"]},
        "checkpoint": {"every_steps": 0, "resume": "never"},
        "neuroprune": {"enabled": method != "dense", "penalty": "l1" if method == "l1" else "neuroprune",
                       "mlp_lambda": 1e-4, "attn_lambda": 1e-4, "target_sparsity": level,
                       "target_ramp_steps": int(args.steps * 0.8), "prune_heads": method == "neuroprune",
                       "prune_every_steps": 0, "theta": args.theta},
    }
    if "num_labels" in part:
        config["num_labels"] = part["num_labels"]
    path = out / run_name(method, level) / "run.yaml"
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
        threshold = float(torch.kthvalue(magnitudes, max(1, math.ceil(fraction * magnitudes.numel()))).values)
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

    params = dict(model.named_parameters())
    rows = []
    for block in arch.attention:
        keep = alive[block.name] if alive else torch.ones(block.num_units, dtype=torch.bool)
        units = unit_parameters(*(params[lin.weight].detach().float() for lin in (block.q, block.k, block.v)),
                                block.layout)[keep]
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


def train_and_measure(part: dict, method: str, level: float | None, out: Path, args) -> dict:
    """One run of the step budget. NeuroPrune/L1 aim at ``level`` and are scored at the end; dense is scored
    before and after fine-tuning and after magnitude pruning to each level."""
    from tqdm import tqdm

    from neuroprune_ds.arch import resolve_architecture
    from neuroprune_ds.export.plan import penalised_weights
    from neuroprune_ds.train import setup

    config = run_config(part, method, level, out, args)
    session = setup(SimpleNamespace(config=config, overrides=[], deepspeed=None))
    engine, pruner = session.engine, session.pruner
    arch = resolve_architecture(engine.module)
    names = penalised_weights(arch)
    epsilon = session.run.neuroprune.epsilon
    result = {"method": method, "level": level, "steps": args.steps, "lr": args.lr, "sparsity_by_step": [],
              "lambda_scale_by_step": [], "pushed_by_step": []}
    if method == "dense":
        result["pretrained"] = snapshot(session, part, arch, names, epsilon)
    progress = tqdm(total=args.steps, desc=f"{part['name']}/{run_name(method, level)}", unit="step",
                    dynamic_ncols=True)
    started, engine_time = time.perf_counter(), 0.0
    engine.train()
    while engine.global_steps < args.steps:
        for batch in session.loader:
            step_started = time.perf_counter()
            engine.backward(engine(**batch).loss)
            if pruner is not None:
                pruner.after_backward()
            engine.step()
            if pruner is not None:
                pruner.after_step()
                result["sparsity_by_step"].append(pruner.measured_sparsity)
                result["lambda_scale_by_step"].append(pruner.lambda_scale())
                result["pushed_by_step"].append(pruner.controller.pushed_fraction)
            engine_time += time.perf_counter() - step_started
            progress.update(1)
            if engine.global_steps >= args.steps:
                break
    progress.close()
    if method == "neuroprune":
        pruner.prune_heads()  # the paper prunes heads at the end of a stage of training
    result["seconds_per_step"] = engine_time / max(engine.global_steps, 1)
    result["wall_s"] = time.perf_counter() - started
    if method == "dense":
        result["fine_tuned"] = snapshot(session, part, arch, names, epsilon, heads=head_report(engine.module, arch,
                                                                                                None))
        result["levels"] = []
        for target in sorted(args.levels):
            with zeroed(engine.module, names, fraction=target):
                result["levels"].append(snapshot(session, part, arch, names, epsilon, level=target))
    else:
        result["final"] = snapshot(session, part, arch, names, epsilon, level=level,
                                   heads=head_report(engine.module, arch, pruner.alive))
    print(f"{run_name(method, level)}: {json.dumps({k: v for k, v in result.items() if not k.endswith('_by_step')})[:400]}",
          flush=True)
    engine.destroy()
    del session, engine, pruner
    gc.collect()
    return result


def rows_by_level(results: dict, method: str) -> dict[float, dict]:
    """Per level, the scored row of ``method`` (NeuroPrune/L1: one run per level; dense: magnitude pruning)."""
    if method == "dense":
        return {row["level"]: row for row in results.get("dense", {}).get("levels", [])}
    return {run["level"]: run["final"] for key, run in results.items() if key.startswith(method + "_")}


# ------------------------------------------------------------------------------------------------ report


def tables(part: dict, results: dict, args) -> str:
    metric = part["metric"].split("/")[-1]
    dense = results["dense"]
    lines = [f"### {part['label']}", "",
             f"{args.steps} steps per run, lr {args.lr}, {part['schedule']['micro_batch_size']} sequences per step; "
             f"pretrained {metric} {dense['pretrained']['metric']:.4g}, dense fine-tuned "
             f"{dense['fine_tuned']['metric']:.4g} (FFN connectivity std-dev "
             f"{dense['fine_tuned']['connectivity_std']:.3f}).", "",
             f"| target | NeuroPrune {metric} (sparsity) | L1 {metric} (sparsity) | magnitude {metric} | "
             "FFN connectivity std-dev NP / L1 / mag | FFN units with c < 10% NP / L1 / mag |",
             "|---|---|---|---|---|---|"]
    by_level = {m: rows_by_level(results, m) for m in METHODS}
    for level in sorted(args.levels):
        cells = [by_level[m].get(level) for m in METHODS]
        value = lambda row: f"{row['metric']:.4g} ({row['sparsity']:.1%})" if row else "-"  # noqa: E731
        spread = " / ".join(f"{row['connectivity_std']:.3f}" if row else "-" for row in cells)
        dead = " / ".join(f"{row['units_below_10pct']:.1%}" if row else "-" for row in cells)
        magnitude = f"{cells[2]['metric']:.4g}" if cells[2] else "-"
        lines.append(f"| {level:.0%} | {value(cells[0])} | {value(cells[1])} | {magnitude} | {spread} | {dead} |")
    np_rows = by_level["neuroprune"]
    if np_rows:
        def removed(row: dict) -> str:
            cut = [f"{h['block']} {h['heads_kept']}/{h['heads']}" for h in row["heads"] if h["heads_kept"] < h["heads"]]
            return ", ".join(cut) or "none"

        def closest(row: dict) -> float:
            return min(h["min_linf"] for h in row["heads"] if h["min_linf"] is not None)

        lines += ["", f"Heads NeuroPrune removed (theta {args.theta}): "
                  + "; ".join(f"{level:.0%}: {removed(row)}" for level, row in sorted(np_rows.items()))
                  + ". Closest pair of heads in any layer (l_inf): "
                  + ", ".join(f"{level:.0%}: {closest(row):.3f}" for level, row in sorted(np_rows.items()))
                  + f"; dense fine-tuned: {closest(dense['fine_tuned']):.3f}."]
    speeds = {m: [r["seconds_per_step"] for k, r in results.items() if k == m or k.startswith(m + "_")] for m in METHODS}
    lines += ["", "Seconds per step NeuroPrune / L1 / dense: "
              + " / ".join(f"{sum(v) / len(v):.2f}" if v else "-" for v in speeds.values()) + "."]
    return "\n".join(lines)


def plot(part: dict, results: dict, path: Path) -> None:
    from matplotlib.figure import Figure

    figure = Figure(figsize=(5, 3.5))
    axes = figure.add_subplot()
    for method, label in (("neuroprune", "NeuroPrune"), ("l1", "L1"), ("dense", "magnitude (dense fine-tune)")):
        rows = [row for _, row in sorted(rows_by_level(results, method).items())]
        axes.plot([r["sparsity"] for r in rows], [r["metric"] for r in rows], marker="o", label=label)
    axes.axhline(results["dense"]["fine_tuned"]["metric"], color="grey", linestyle=":", label="dense fine-tuned")
    if not part["higher_is_better"]:
        axes.set_yscale("log")  # perplexities span orders of magnitude
    axes.set_xlabel("weight sparsity of penalised matrices")
    axes.set_ylabel(part["metric"].split("/")[-1])
    axes.set_title(part["label"], fontsize=9)
    axes.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=120)


def results_path_of(part_out: Path) -> Path:
    return part_out / "results.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_quality")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5, 0.7])
    parser.add_argument("--steps", type=int, default=None, help="step budget per run (default: lm 100, cls 300)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: lm 3e-3, cls 3e-4)")
    parser.add_argument("--theta", type=float, default=0.15)
    parser.add_argument("--eval-examples", type=int, default=48, help="held-out 128-token blocks (lm)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--report-only", action="store_true", help="rebuild tables and plots from results.json")
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
        part_args.steps = args.steps or {"lm": 100, "cls": 300}[name]
        part_args.lr = args.lr or {"lm": 3e-3, "cls": 3e-4}[name]
        part_out = out / name
        part = {"name": name, **PARTS[name](part_out, part_args)}
        if args.report_only and results_path_of(part_out).exists():
            saved = json.loads(results_path_of(part_out).read_text())
            part_args.steps, part_args.lr = saved["dense"]["steps"], saved["dense"].get("lr", part_args.lr)
        results_path = results_path_of(part_out)
        results = json.loads(results_path.read_text()) if results_path.exists() else {}
        runs = [("dense", None)] if "dense" in args.methods else []
        runs += [(m, level) for level in sorted(args.levels) for m in ("neuroprune", "l1") if m in args.methods]
        for method, level in ([] if args.report_only else runs):
            results[run_name(method, level)] = train_and_measure(part, method, level, part_out, part_args)
            results_path.write_text(json.dumps(results, indent=1))
        if "dense" in results:
            report.append(tables(part, results, part_args))
            plot(part, results, out / f"{name}.png")
    if report:
        (out / "results.md").write_text("\n\n".join(report) + "\n")
        print("\n" + "\n\n".join(report))


if __name__ == "__main__":
    main()
