"""Quality benchmark at matched structure: NeuroPrune vs plain L1 vs magnitude baselines, on real models.

    python tools/bench_quality.py --part cls --steps 150 --lr 1e-4 --levels 0.25 0.5 0.7
    python tools/bench_quality.py --part lm --steps 40 --lr 3e-4 --levels 0.25
    python tools/bench_quality.py --part lm --methods structured magnitude   # the derived rows only

Two parts, each trained in this process on a real DeepSpeed engine (1 rank, ZeRO-0 by default; the
pruner's equality across ZeRO stages and ranks is proved by tests/test_zero_equivalence.py):
- ``lm``: SmolLM2-135M-Instruct fine-tuned on Jane Austen's novels, held-out perplexity on the last 10%
  (``--tiny``: a random 2-layer LLaMA on Botchan, to check the logic in seconds);
- ``cls``: all-MiniLM-L6-v2 (BERT) with a fresh classifier head on Rotten Tomatoes, accuracy on 1000
  held-out reviews.

Trained methods (same data order, learning rate and step budget; the penalised ones aim at ``target_sparsity``
= level, the controller setting lambda, with the final quarter of the steps as ``recover_steps`` and FFN units
below ``--unit-threshold`` connectivity pruned every tenth of the run):
- ``neuroprune``: ``penalty: neuroprune``, ``update: gradient``, heads pruned by similarity;
- ``neuroprune_decoupled``: the same with ``update: decoupled``;
- ``neuroprune_structural``: ``neuroprune_decoupled`` with the structural target ``prune_ffn_units_fraction`` =
  level (that share of every FFN block's units removed by their Taylor scores on the target's ramp);
- ``l1``: ``penalty: l1``, ``update: gradient``, the same unit-removal rule, no head pruning;
- ``gmp``: gradual magnitude pruning during fine-tuning (tools/baselines.py, cubic schedule to the level over
  the first 60% of the steps, a global threshold every twentieth of the run);
- ``dense``: fine-tuning alone; its model is saved for the derived baselines.
Derived from the dense fine-tuned model (no training):
- ``structured``: per block, the same number of lowest-norm FFN units and attention units removed as the
  NeuroPrune run of that level removed (one row per NeuroPrune mode);
- ``magnitude``: unstructured one-shot magnitude pruning to the level (one global threshold).

Every model is exported with the project's compact export (``neuroprune_ds.export.convert.export_model``,
``--format compact``, |w| < epsilon zeroed, logits verified), and the export is what is measured: its
parameter count, its structure (FFN units and heads removed), its quality, and its prefill speed-up over the
dense model (256-token prefills, the two timed alternately in this process, median ratio).

Writes ``<out>/<part>/<run>/result.json`` per run (rerunning a run replaces its file), ``<out>/results.md``
(the tables of docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
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
sys.path.insert(0, str(ROOT / "tools"))

import assets  # noqa: E402 (tools/ is on sys.path when run as a script)
import baselines  # noqa: E402

TRAINED = ("dense", "neuroprune", "neuroprune_decoupled", "neuroprune_structural", "l1", "gmp")
DERIVED = ("structured", "magnitude")
METHODS = TRAINED + DERIVED
NEUROPRUNE_MODES = ("neuroprune", "neuroprune_decoupled", "neuroprune_structural")
LABELS = {"dense": "dense fine-tuned", "neuroprune": "NeuroPrune, update: gradient",
          "neuroprune_decoupled": "NeuroPrune, update: decoupled",
          "neuroprune_structural": "NeuroPrune, decoupled + structural target", "l1": "L1, update: gradient",
          "gmp": "gradual magnitude (cubic)", "structured_neuroprune": "structured magnitude, matched to NP gradient",
          "structured_neuroprune_decoupled": "structured magnitude, matched to NP decoupled",
          "structured_neuroprune_structural": "structured magnitude, matched to NP structural",
          "magnitude": "unstructured magnitude (one-shot)"}


# ---------------------------------------------------------------------------------------------- the parts


def split_text(text_file: Path, data: Path) -> None:
    """The non-empty lines of ``text_file``: the first 90% to ``data/train.txt``, the rest to ``data/eval.txt``."""
    lines = [line for line in text_file.read_text(encoding="utf-8").splitlines() if line.strip()]
    cut = int(len(lines) * 0.9)
    data.mkdir(parents=True, exist_ok=True)
    for name, part in (("train.txt", lines[:cut]), ("eval.txt", lines[cut:])):
        staged = data / f"{name}.{os.getpid()}"  # runs in parallel processes share the split: rename atomically
        staged.write_text("\n".join(part) + "\n", encoding="utf-8")
        os.replace(staged, data / name)


def tiny_llama(where: Path) -> Path:
    """A random 2-layer LLaMA (GQA, 4 heads on 2 KV heads) with SmolLM2's tokenizer: the benchmark's logic in
    seconds on a CPU (``--tiny``)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if not (where / "config.json").exists():
        tokenizer = AutoTokenizer.from_pretrained(assets.smollm2_dir())
        torch.manual_seed(0)
        config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=512,
                             tie_word_embeddings=True)
        LlamaForCausalLM(config).save_pretrained(where)
        tokenizer.save_pretrained(where)
    return where


def lm_part(out: Path, args) -> dict:
    data = out / "data"
    split_text(assets.botchan_text() if args.tiny else assets.austen_text(), data)  # tiny: a short novel
    model = tiny_llama(out / "tiny_model") if args.tiny else assets.smollm2_dir()
    return {
        "task": "causal_lm",
        "model": {"name_or_path": str(model), "dtype": "fp32"},
        "data": {"train": str(data / "train.txt"), "eval": str(data / "eval.txt"),
                 "max_length": args.max_length or 128, "max_eval_examples": args.eval_examples},
        "schedule": {"micro_batch_size": args.micro_batch or 2},
        "metric": "eval/perplexity", "higher_is_better": False,
        "label": "tiny random LLaMA (--tiny), Botchan, perplexity" if args.tiny else "SmolLM2-135M, Austen, perplexity",
    }


def cls_part(out: Path, args) -> dict:
    train, test = assets.rotten_tomatoes_split()
    return {
        "task": "classification", "num_labels": 2,
        "model": {"name_or_path": str(assets.minilm_dir()), "dtype": "fp32"},
        "data": {"train": str(train), "eval": str(test), "max_length": args.max_length or 64},
        "schedule": {"micro_batch_size": args.micro_batch or 16},
        "metric": "eval/accuracy", "higher_is_better": True, "label": "MiniLM-L6, Rotten Tomatoes, accuracy",
    }


PARTS = {"lm": lm_part, "cls": cls_part}


def run_name(method: str, level: float | None) -> str:
    return method if level is None else f"{method}_{round(level * 100)}"


def recover_steps(args) -> int:
    return args.steps // 4


def neuroprune_settings(method: str, level: float | None, args) -> dict:
    """The ``neuroprune`` section of one run (dense and gmp: NeuroPrune off)."""
    decoupled = method in ("neuroprune_decoupled", "neuroprune_structural")
    return {"enabled": method in NEUROPRUNE_MODES + ("l1",),
            "penalty": "l1" if method == "l1" else "neuroprune", "update": "decoupled" if decoupled else "gradient",
            # gradient mode: lambda is a gradient weight; decoupled: the shrinkage per unit of lr (docs/sparsity.md)
            "mlp_lambda": 1.0 if decoupled else 1e-4, "attn_lambda": 1.0 if decoupled else 1e-4,
            "target_sparsity": level, "target_ramp_steps": ramp_steps(args),
            "recover_steps": recover_steps(args), "prune_ffn_units_below": args.unit_threshold,
            "prune_heads": method != "l1", "prune_every_steps": max(1, args.steps // 10),
            "theta": args.theta, "theta_mode": args.theta_mode,
            "prune_ffn_units_fraction": level if method == "neuroprune_structural" else None}


def ramp_steps(args) -> int:
    return max(1, int(args.steps * 0.6))


def run_config(part: dict, method: str, level: float | None, out: Path, args) -> Path:
    """Write the trainer config of one run; returns its path."""
    config = {
        "task": part["task"], "output_dir": str(out / run_name(method, level)),
        "deepspeed": str(args.deepspeed),
        "model": part["model"], "data": part["data"],
        "schedule": {"epochs": 1000, "max_steps": args.steps, "lr": args.lr, "warmup_steps": min(10, args.steps // 10),
                     "lr_scheduler": "constant", "log_every_steps": 10, "seed": 0, **part["schedule"]},
        "checkpoint": {"every_steps": 0, "resume": "never"},
        "neuroprune": neuroprune_settings(method, level, args),
    }
    if "num_labels" in part:
        config["num_labels"] = part["num_labels"]
    path = out / run_name(method, level) / "run.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# ------------------------------------------------------------------------------------------- measurement


@contextmanager
def zeroed(model, names: list[str], threshold: float):
    """Temporarily zero the penalised matrices' weights with |w| < threshold; restores them afterwards."""
    params = dict(model.named_parameters())
    saved = {}
    with torch.no_grad():
        for n in names:
            mask = params[n].abs() < threshold
            saved[n] = (mask, params[n][mask].clone())
            params[n][mask] = 0
    try:
        yield
    finally:
        with torch.no_grad():
            for n, (mask, values) in saved.items():
                params[n][mask] = values


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
        units = unit_parameters(*(params[lin.weight].detach().float() for lin in (block.q, block.k, block.v)),
                                block.layout)
        keep = (alive[block.name].to(units.device) if alive
                else torch.ones(block.num_units, dtype=torch.bool, device=units.device))
        units = units[keep]
        d = linf_distances(units)
        d.fill_diagonal_(float("inf"))
        rows.append({"block": block.name, "heads_kept": int(keep.sum()) * block.heads_per_unit,
                     "heads": block.num_heads, "min_linf": float(d.min()) if len(units) > 1 else None})
    return rows


class Scorer:
    """The held-out data of a part and the metric on it."""

    def __init__(self, data, tokenizer, part: dict):
        self.data, self.tokenizer, self.metric = data, tokenizer, part["metric"]

    @classmethod
    def of_run(cls, config: Path, part: dict) -> Scorer:
        """The held-out data of the run config ``config``."""
        from neuroprune_ds.config_loader import load_config
        from neuroprune_ds.data import build_task_data, load_tokenizer

        run = load_config(config, [])
        tokenizer = load_tokenizer(run.model)
        return cls(build_task_data(run, tokenizer), tokenizer, part)

    def __call__(self, model) -> float:
        from neuroprune_ds.evaluation import evaluate

        was_training = model.training
        model.eval()
        with torch.no_grad():
            metrics = evaluate(model, self.data, self.tokenizer, batch_size=16, max_new_tokens=0)
        model.train(was_training)
        return metrics[self.metric]


def export_structure(record: dict) -> dict:
    """Structure of a compact export from its neuroprune.json: units removed per block and their shares."""
    ffn_removed = {b["name"]: b["width"] - b["kept_units"] for b in record["ffn"]}
    heads_removed = {b["name"]: b["num_heads"] - len(b["kept_heads"]) for b in record["attention"]}
    units_removed = {b["name"]: b["num_kv_heads"] - len(b["kept_kv_heads"]) for b in record["attention"]}
    return {"ffn_removed": ffn_removed, "attention_units_removed": units_removed,
            "ffn_units_removed_share": sum(ffn_removed.values()) / max(1, sum(b["width"] for b in record["ffn"])),
            "heads_removed_share": sum(heads_removed.values()) / max(1, sum(b["num_heads"] for b in record["attention"])),
            "parameters_dense": record["parameters"]["dense"], "parameters_compact": record["parameters"]["export"],
            "weight_sparsity": record["weight_sparsity"], "structural_sparsity": record["structural_sparsity"]}


def auto_class(task: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    return {"causal_lm": AutoModelForCausalLM, "classification": AutoModelForSequenceClassification}[task]


def measure(model, alive: dict, neuroprune, part: dict, scorer: Scorer, where: Path, args) -> dict:
    """Export ``model`` (fp32, unchanged) compact with ``alive`` head masks, then score the export, count its
    structure and parameters and time its prefill against ``model``; the export directory is removed after."""
    import neuroprune_ds.export  # noqa: F401 (registers the compact model classes with the Auto factories)
    from neuroprune_ds.arch import penalised_weights, resolve_architecture
    from neuroprune_ds.export.convert import export_model

    arch = resolve_architecture(model)
    names = penalised_weights(arch)
    with zeroed(model, names, neuroprune.epsilon):
        extra = {**connectivity_spread(model, arch, neuroprune.epsilon), "heads": head_report(model, arch, alive)}
    compact_dir = where / "compact"
    export_model(copy.deepcopy(model).float().cpu().eval(), {k: v.cpu() for k, v in alive.items()}, str(compact_dir),
                 "compact", task=part["task"], neuroprune=neuroprune, threshold=neuroprune.epsilon, overwrite=True)
    record = json.loads((compact_dir / "neuroprune.json").read_text())
    device = next(model.parameters()).device
    compact = auto_class(part["task"]).from_pretrained(compact_dir, dtype=torch.float32,
                                                       trust_remote_code=True).to(device).eval()
    was_training = model.training
    model.eval()
    row = {**export_structure(record), "metric": scorer(compact),
           "prefill_speedup": baselines.prefill_speed_ratio(compact, model, model.config.vocab_size,
                                                            repeats=args.prefill_repeats, length=args.prefill_tokens),
           **extra}
    model.train(was_training)
    del compact
    shutil.rmtree(compact_dir)
    return row


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
    """One run of the step budget, measured at its end; dense is also scored before fine-tuning and saved."""
    from tqdm import tqdm

    from neuroprune_ds.arch import penalised_weights, resolve_architecture
    from neuroprune_ds.train import setup

    config = run_config(part, method, level, out, args)
    session = setup(SimpleNamespace(config=config, overrides=[], deepspeed=None))
    engine, pruner = session.engine, session.pruner
    names = penalised_weights(resolve_architecture(engine.module))
    scorer = Scorer(session.data, session.tokenizer, part)
    gmp = None
    if method == "gmp":
        gmp = baselines.GradualMagnitudePruning(engine.module, names, level, start=0, end=ramp_steps(args),
                                                every_steps=max(1, args.steps // 20))
    result = {"method": method, "level": level, "steps": args.steps, "lr": args.lr, "sparsity_by_step": []}
    if method == "dense":
        result["pretrained"] = scorer(engine.module)
    progress = tqdm(total=args.steps, desc=f"{part['name']}/{run_name(method, level)}", unit="step",
                    dynamic_ncols=True, mininterval=10)
    started, engine_time = time.perf_counter(), 0.0
    engine.train()
    while engine.global_steps < args.steps:
        for batch in session.loader:
            step_started = time.perf_counter()
            batch = {key: value.to(engine.device) for key, value in batch.items()}
            engine.backward(engine(**batch).loss)
            if pruner is not None:
                pruner.after_backward()
            engine.step()
            if pruner is not None:
                pruner.after_step()
                result["sparsity_by_step"].append(pruner.measured_sparsity)
            if gmp is not None:
                gmp.after_step(engine.global_steps)
                result["sparsity_by_step"].append(gmp.sparsity)
            engine_time += time.perf_counter() - step_started
            progress.update(1)
            if engine.global_steps >= args.steps:
                break
    progress.close()
    if method in NEUROPRUNE_MODES and not recover_steps(args):
        pruner.prune_heads()  # without a recovery phase, the paper's pruning at the end of the stage
    result["seconds_per_step"] = engine_time / max(engine.global_steps, 1)
    result["wall_s"] = time.perf_counter() - started
    alive = dict(pruner.alive) if pruner is not None and method != "l1" else {}
    result["row"] = measure(engine.module, alive, session.run.neuroprune, part, scorer, out / run_name(method, level),
                            args)
    if method == "dense":
        engine.module.save_pretrained(out / "dense" / "model")
    print(f"{run_name(method, level)}: {json.dumps({k: v for k, v in result.items() if not k.endswith('_by_step')})[:600]}",
          flush=True)
    engine.destroy()
    del session, engine, pruner, gmp
    gc.collect()
    return result


def derived_rows(part: dict, out: Path, results: dict, args, methods: list[str]) -> dict:
    """The baselines cut from the saved dense fine-tuned model, per level: structured magnitude matched to
    each NeuroPrune run's removed units, and unstructured magnitude."""
    from neuroprune_ds.arch import resolve_architecture
    from neuroprune_ds.config_loader import load_config
    from neuroprune_ds.arch import penalised_weights

    config = out / "dense" / "run.yaml"
    if not (out / "dense" / "model").exists():
        raise ValueError(f"derived baselines need the dense run's model at {out / 'dense' / 'model'}: "
                         "run --methods dense first")
    neuroprune = load_config(config, []).neuroprune
    scorer = Scorer.of_run(config, part)
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dense = auto_class(part["task"]).from_pretrained(out / "dense" / "model", dtype=torch.float32).to(device).eval()
    arch = resolve_architecture(dense)
    derived = {}
    for level in sorted(args.levels):
        jobs = []
        if "structured" in methods:
            jobs += [(f"structured_{mode}", results[run_name(mode, level)]["row"])
                     for mode in NEUROPRUNE_MODES if run_name(mode, level) in results]
        if "magnitude" in methods:
            jobs.append(("magnitude", None))
        for name, matched in jobs:
            model = copy.deepcopy(dense)
            if matched is None:
                baselines.magnitude_pruned(model, penalised_weights(arch), level)
                alive = {}
            else:
                alive = baselines.structured_magnitude_pruned(model, arch, matched["ffn_removed"],
                                                              matched["attention_units_removed"])
            where = out / run_name(name, level)
            where.mkdir(parents=True, exist_ok=True)
            derived[run_name(name, level)] = {"method": name, "level": level,
                                              "row": measure(model, alive, neuroprune, part, scorer, where, args)}
            print(f"{run_name(name, level)}: {json.dumps(derived[run_name(name, level)]['row'])[:400]}", flush=True)
            del model
            gc.collect()
    return derived


# ------------------------------------------------------------------------------------------------ report


def load_results(part_out: Path) -> dict:
    return {p.parent.name: json.loads(p.read_text()) for p in sorted(part_out.glob("*/result.json"))}


def save_result(part_out: Path, name: str, result: dict) -> None:
    (part_out / name).mkdir(parents=True, exist_ok=True)
    (part_out / name / "result.json").write_text(json.dumps(result, indent=1))


def table(part: dict, results: dict) -> str:
    metric = part["metric"].split("/")[-1]
    dense = results.get("dense")
    steps_lr = next(((r["steps"], r["lr"]) for r in results.values() if "steps" in r), (None, None))
    head = [f"### {part['label']}", "",
            f"{steps_lr[0]} steps per run, lr {steps_lr[1]}, {part['schedule']['micro_batch_size']} sequences of "
            f"{part['data']['max_length']} tokens per step"
            + (f"; pretrained {metric} {dense['pretrained']:.4g}." if dense else "."), "",
            f"| target | method | weight sparsity | FFN units removed | heads removed | parameters (compact) | "
            f"prefill speed-up | {metric} | FFN connectivity std-dev |",
            "|---|---|---|---|---|---|---|---|---|"]
    levels = sorted({r["level"] for r in results.values() if r.get("level") is not None})
    order = ["neuroprune", "neuroprune_decoupled", "neuroprune_structural", "l1", "gmp", "structured_neuroprune",
             "structured_neuroprune_decoupled", "structured_neuroprune_structural", "magnitude"]
    lines = []

    def cells(target: str, label: str, row: dict) -> str:
        return (f"| {target} | {label} | {row['weight_sparsity']:.1%} | {row['ffn_units_removed_share']:.1%} | "
                f"{row['heads_removed_share']:.1%} | {row['parameters_compact'] / 1e6:.2f}M | "
                f"{row['prefill_speedup']:.2f}x | {row['metric']:.4g} | {row['connectivity_std']:.3f} |")

    if dense:
        lines.append(cells("-", LABELS["dense"], dense["row"]))
    for level in levels:
        for method in order:
            run = results.get(run_name(method, level))
            if run:
                lines.append(cells(f"{level:.0%}", LABELS[method], run["row"]))
    speeds = {m: [r["seconds_per_step"] for r in results.values() if r.get("method") == m and "seconds_per_step" in r]
              for m in TRAINED}
    tail = ["", "Seconds per training step: " + ", ".join(
        f"{LABELS[m]} {sum(v) / len(v):.2f}" for m, v in speeds.items() if v) + "."]
    return "\n".join(head + lines + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", choices=[*PARTS, "all"], default="all")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_quality")
    parser.add_argument("--levels", type=float, nargs="+", default=[0.25, 0.5, 0.7])
    parser.add_argument("--steps", type=int, default=None, help="step budget per run (default: lm 40, cls 150)")
    parser.add_argument("--lr", type=float, default=None, help="learning rate (default: lm 3e-4, cls 1e-4: at 3e-4 the dense MiniLM run diverges)")
    parser.add_argument("--micro-batch", type=int, default=None, help="sequences per step (default: lm 2, cls 16)")
    parser.add_argument("--max-length", type=int, default=None, help="tokens per sequence (default: lm 128, cls 64)")
    parser.add_argument("--unit-threshold", type=float, default=0.1, help="neuroprune.prune_ffn_units_below")
    parser.add_argument("--theta", type=float, default=0.15)
    parser.add_argument("--theta-mode", choices=["absolute", "relative"], default="absolute")
    parser.add_argument("--eval-examples", type=int, default=48, help="held-out 128-token blocks (lm)")
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--prefill-repeats", type=int, default=21, help="timed prefills per model (median)")
    parser.add_argument("--deepspeed", type=Path, default=ROOT / "ds_configs" / "zero0_fp32.json")
    parser.add_argument("--tf32", action="store_true", help="TF32 matmuls on CUDA (fp32 weights, faster)")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--tiny", action="store_true",
                        help="lm part: a random 2-layer LLaMA on Botchan instead of SmolLM2 on Austen (the logic in seconds)")
    parser.add_argument("--report-only", action="store_true", help="rebuild the tables from the result files")
    args = parser.parse_args()
    for level in args.levels:
        if not 0 < level < 1:
            parser.error(f"--levels: {level} is not a sparsity in (0, 1)")
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    init_single_process()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    out = args.out.resolve()
    report = []
    for name in (PARTS if args.part == "all" else [args.part]):
        part_args = copy.copy(args)
        part_args.steps = args.steps or {"lm": 40, "cls": 150}[name]
        part_args.lr = args.lr or {"lm": 3e-4, "cls": 1e-4}[name]
        part_out = out / name
        part = {"name": name, **PARTS[name](part_out, part_args)}
        trained = [m for m in TRAINED if m in args.methods]
        runs = ([("dense", None)] if "dense" in trained else [])
        runs += [(m, level) for level in sorted(args.levels) for m in trained if m != "dense"]
        for method, level in ([] if args.report_only else runs):
            save_result(part_out, run_name(method, level), train_and_measure(part, method, level, part_out, part_args))
        derived = [m for m in DERIVED if m in args.methods]
        if derived and not args.report_only:
            for key, result in derived_rows(part, part_out, load_results(part_out), part_args, derived).items():
                save_result(part_out, key, result)
        results = load_results(part_out)
        if results:
            report.append(table(part, results))
    if report:
        (out / "results.md").write_text("\n\n".join(report) + "\n")
        print("\n" + "\n\n".join(report))


if __name__ == "__main__":
    main()
