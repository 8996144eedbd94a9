"""One prepared check of neuroprune_ds on a GPU machine, with a tiny CPU mode that CI runs (docs/gpu.md).

    tools/gpu_check.sh [--cpu] [--model DIR] [OUT_DIR]

Every check runs in its own processes; one summary line per check at the end, exit status 1 if any failed:

- collectives: NCCL (gloo with --cpu) all_reduce, broadcast and all_gather_object, each rank bound to device
  LOCAL_RANK by the trainer's own set-up;
- equality: tests/dist_worker.py at ZeRO-3 (fp32, bf16, activation checkpointing, persistent parameters)
  against the single-process CPU reference of tests/test_zero_equivalence.py, 4 steps;
- accelerate: NeuroPrune in an `accelerate launch` loop (ZeRO-2 and 3) equals the pruner driven by hand;
- trainer: a SmolLM2-135M-shaped LLaMA (random init, or the weights in --model) with planted redundant
  heads, ZeRO-3 bf16 through launch/torchrun.sh, NeuroPrune at a target sparsity: sparsity reached, planted
  heads pruned, save + resume continues with the same losses, activation checkpointing gives the same
  losses, tokens/s with and without the pruner;
- export: compact export of the trainer's checkpoint, logits verified by the converter.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
sys.path[:0] = [str(ROOT), str(TESTS)]


@dataclass(frozen=True, slots=True)
class Mode:
    """What one run of the check does: the GPU budget (<= 8 minutes on one H200) or the CPU plumbing test."""

    cpu: bool
    ranks: int
    model_shape: dict
    dtype: str
    steps: int
    micro_batch_size: int
    max_length: int
    sparsity_floor: float  # fraction of the target sparsity the trainer must reach in `steps`
    loss_rtol: float  # save + resume and activation checkpointing against the uninterrupted run
    accelerate_stages: tuple[int, ...]


SMOLLM2_135M = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, max_position_embeddings=2048, rms_norm_eps=1e-5,
                    rope_theta=100000.0, tie_word_embeddings=True)
TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=64, max_position_embeddings=64)
TARGET_SPARSITY = 0.3
THETA = 0.05  # planted pairs differ by ~3e-3, random heads at init std 0.02 by ~0.1 and more


def gpu_mode() -> Mode:
    # bf16 kernels may use atomics (attention backward): reruns agree to bf16 noise, not bit for bit.
    return Mode(cpu=False, ranks=min(torch.cuda.device_count(), 8), model_shape=SMOLLM2_135M, dtype="bf16",
                steps=80, micro_batch_size=8, max_length=256, sparsity_floor=0.5, loss_rtol=2e-3,
                accelerate_stages=(2, 3))


def cpu_mode() -> Mode:
    return Mode(cpu=True, ranks=2, model_shape=TINY, dtype="fp32", steps=6, micro_batch_size=2, max_length=16,
                sparsity_floor=0.0, loss_rtol=1e-6, accelerate_stages=(3,))


@dataclass
class Result:
    name: str
    ok: bool
    detail: str
    seconds: float = 0.0


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), str(TESTS), env.get("PYTHONPATH", "")]),
               PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def run(command: list[str], log: Path, timeout: int = 600, **env) -> int:
    """Run a command with its output in ``log``; returns its exit status."""
    with open(log, "w") as out:
        return subprocess.run([str(c) for c in command], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**environment(), **env}, timeout=timeout).returncode


def free_port() -> int:
    from neuroprune_ds.distributed import free_port as pick

    return pick()


def torchrun(mode: Mode, *args) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(mode.ranks), *args]


def tail(log: Path, lines: int = 3) -> str:
    return " | ".join(log.read_text().strip().splitlines()[-lines:]) if log.exists() else "(no log)"


# ------------------------------------------------------------------------------------------- collectives


def collectives_worker(out: str) -> None:
    """Under torchrun: the trainer's process-group set-up, then collectives on the engine's device."""
    from neuroprune_ds.distributed import barrier_and_exit, setup_distributed_env

    setup_distributed_env()
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from neuroprune_ds.train import init_distributed

    rank, world = init_distributed()
    device = torch.device(get_accelerator().current_device_name())
    total = torch.tensor([rank + 1.0], device=device)
    dist.all_reduce(total)
    source = torch.tensor([rank + 10], device=device)
    dist.broadcast(source, src=0)
    devices = [None] * world
    dist.all_gather_object(devices, str(device))
    if rank == 0:
        Path(out).write_text(json.dumps({"backend": dist.get_backend(), "world": world, "sum": total.item(),
                                         "broadcast": int(source.item()), "devices": devices}))
    barrier_and_exit(0)


def check_collectives(mode: Mode, out: Path) -> Result:
    record = out / "collectives.json"
    code = run(torchrun(mode, __file__, "--collectives-worker", record), out / "collectives.log")
    if code or not record.exists():
        return Result("collectives", False, f"exit {code}: {tail(out / 'collectives.log')}")
    r = json.loads(record.read_text())
    world = r["world"]
    ok = (r["backend"] == ("gloo" if mode.cpu else "nccl") and r["sum"] == world * (world + 1) / 2
          and r["broadcast"] == 10 and (mode.cpu or len(set(r["devices"])) == world))
    return Result("collectives", ok, f"{r['backend']}, {world} rank(s) on {', '.join(r['devices'])}: all_reduce "
                                     f"{r['sum']:g}, broadcast {r['broadcast']}, all_gather_object ok")


# ---------------------------------------------------------------------------------------------- equality


EQUALITY_SCENARIOS = ("llama:3:fp32", "llama:3:bf16", "llama:3:fp32:gc", "llama:3:fp32:persist")


def check_equality(mode: Mode, out: Path) -> Result:
    """ZeRO-3 on this machine's devices against the single-process fp32 CPU reference (4 steps, lr 1e-3)."""
    import dist_worker as W
    from test_zero_equivalence import reference_run
    from tiny_models import equivalence_model

    results = out / "equality.pt"
    code = run(torchrun(mode, TESTS / "dist_worker.py", results, *EQUALITY_SCENARIOS), out / "equality.log")
    if code or not results.exists():
        return Result("equality", False, f"exit {code}: {tail(out / 'equality.log')}")
    got = torch.load(results, weights_only=False, map_location="cpu")
    reference = reference_run("llama", 1, ranks=mode.ranks)
    init = dict(equivalence_model("llama").named_parameters())
    details, ok = [], True
    for scenario in EQUALITY_SCENARIOS:
        result = got[scenario]
        if "error" in result:
            ok = False
            details.append(f"{scenario}: {result['error'].strip().splitlines()[-1]}")
            continue
        same_heads = all(torch.equal(result["alive"][k].cpu(), v) for k, v in reference["alive"].items())
        if "bf16" in scenario:  # bounded as in tests/test_zero_equivalence.py: the update within 2.5%
            names = [n for n in reference["params"] if n.endswith("proj.weight") and "o_proj" not in n]
            update = torch.cat([(result["master"][n].cpu() - init[n].detach()).flatten() for n in names])
            ref_update = torch.cat([(reference["params"][n] - init[n].detach()).flatten() for n in names])
            relative = float((update - ref_update).norm() / ref_update.norm())
            passed, measure = relative <= 0.025, f"update {relative:.2%} off"
        else:  # fp32 on another device: summation order only; K biases excluded (true gradient 0)
            diff = max(float((result["master"][n].cpu() - v).abs().max()) for n, v in reference["params"].items()
                       if not n.endswith("k_proj.bias"))
            passed, measure = diff <= 2e-5, f"max |w - w_ref| {diff:.1e}"
        ok &= passed and same_heads
        details.append(f"{scenario.removeprefix('llama:3:')} {measure}{'' if same_heads else ', heads differ'}")
    return Result("equality", ok, f"ZeRO-3 vs CPU reference ({mode.ranks} rank(s), {W.STEPS} steps): "
                                  + "; ".join(details))


# -------------------------------------------------------------------------------------------- accelerate


def check_accelerate(mode: Mode, out: Path) -> Result:
    """The HF accelerate route (tests/accelerate_worker.py) at ZeRO-2 and ZeRO-3."""
    details, ok = [], True
    for stage in mode.accelerate_stages:
        ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "train_batch_size": 2 * mode.ranks,
              "gradient_clipping": 1.0, "zero_optimization": {"stage": stage, "stage3_param_persistence_threshold": 0},
              "bf16": {"enabled": False}, "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}
        (out / f"accelerate_zero{stage}.json").write_text(json.dumps(ds))
        backend = ["--backend", "gloo"] if mode.cpu else ["--backend", "auto", "--probe-default-backend"]
        record = out / f"accelerate_zero{stage}.pt"
        code = run([sys.executable, "-m", "accelerate.commands.launch", "--use_deepspeed", "--deepspeed_config_file",
                    out / f"accelerate_zero{stage}.json", "--num_processes", mode.ranks, "--num_machines", 1,
                    "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", free_port(),
                    TESTS / "accelerate_worker.py", record,
                    *backend], out / f"accelerate_zero{stage}.log")
        if code or not record.exists():
            ok = False
            details.append(f"ZeRO-{stage} exit {code}: {tail(out / f'accelerate_zero{stage}.log', 1)}")
            continue
        r = torch.load(record, weights_only=False)
        loop, hand = r["accelerate"], r["by_hand"]
        diff = max(float((loop["master"][k] - hand["master"][k]).abs().max()) for k in hand["master"])
        pruned = not all(bool(m.all()) for m in loop["alive"].values())
        masks = all(torch.equal(loop["alive"][k], hand["alive"][k]) for k in hand["alive"])
        same = (loop["num_processes"] == mode.ranks and loop["zero_stage"] == stage and diff <= 1e-5 and pruned
                and masks)
        ok &= same
        details.append(f"ZeRO-{stage} max |w - w_by_hand| {diff:.1e}, heads pruned {pruned}, same masks {masks}")
    return Result("accelerate", ok, "; ".join(details))


# ------------------------------------------------------------------------------------------------ trainer


def prepare_model(mode: Mode, out: Path, model_dir: str | None) -> Path:
    """The model to fine-tune, with unit 1 of every attention block planted as a near-copy of unit 0."""
    import transformers
    from synthetic_text import WORDS, save_word_tokenizer, sentence
    from tiny_models import plant_redundant_units

    target = out / "model"
    transformers.set_seed(0)
    if model_dir:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        transformers.AutoTokenizer.from_pretrained(model_dir).save_pretrained(target)
    else:
        save_word_tokenizer(target)
        shape = dict(mode.model_shape, vocab_size=max(mode.model_shape["vocab_size"], len(WORDS) + 2))
        config = transformers.LlamaConfig(**shape, pad_token_id=1, eos_token_id=1, bos_token_id=1)
        model = transformers.AutoModelForCausalLM.from_config(config)
    plant_redundant_units(model)
    model.save_pretrained(target)
    # ~5 tokens a line: three times the tokens the longest run reads, plus the held-out blocks
    lines = 3 * mode.steps * mode.micro_batch_size * mode.ranks * mode.max_length // 5 + 100 * mode.max_length
    (out / "train.txt").write_text("".join(sentence(i) + "\n" for i in range(lines)))
    return target


def write_run(mode: Mode, out: Path, model: Path, name: str, steps: int, **changes) -> Path:
    run_config = {
        "task": "causal_lm", "output_dir": str(out / name),
        "deepspeed": str(ROOT / "ds_configs" / f"zero3_{mode.dtype}.json"),
        "model": {"name_or_path": str(model), "dtype": mode.dtype, "gradient_checkpointing": False},
        "data": {"train": str(out / "train.txt"), "max_length": mode.max_length, "max_eval_examples": 16},
        "schedule": {"max_steps": steps, "micro_batch_size": mode.micro_batch_size, "lr": 5e-4, "warmup_steps": 0,
                     "lr_scheduler": "constant", "log_every_steps": 1, "seed": 0},
        # The schedules follow mode.steps, so that shorter runs take the same first steps as "ref".
        "neuroprune": {"mlp_lambda": 1e-4, "attn_lambda": 1e-4, "target_sparsity": TARGET_SPARSITY,
                       "target_ramp_steps": mode.steps * 6 // 10, "prune_every_steps": min(10, mode.steps // 2),
                       "theta": THETA},
        "checkpoint": {"every_steps": mode.steps // 2, "keep_last": 2, "resume": "never"},
    }
    for key, value in changes.items():
        section, field = key.split("__")
        run_config[section][field] = value
    path = out / f"{name}.yaml"
    path.write_text(yaml.safe_dump(run_config, sort_keys=False))
    return path


def train_records(out: Path, name: str) -> list[dict]:
    lines = (out / name / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r.get("kind") == "train"]


def losses(out: Path, name: str) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in train_records(out, name)}


def tokens_per_s(out: Path, name: str) -> float:
    """Median over the steps after the first three (start-up and the first ZeRO-3 steps are slower)."""
    records = train_records(out, name)
    return statistics.median(r["train/tokens_per_s"] for r in records[min(3, len(records) - 1):])


def max_relative(a: dict[int, float], b: dict[int, float]) -> float:
    return max(abs(a[s] - b[s]) / abs(b[s]) for s in a)


def check_trainer(mode: Mode, out: Path, model_dir: str | None) -> list[Result]:
    model = prepare_model(mode, out, model_dir)
    half = mode.steps // 2
    runs = {
        "ref": write_run(mode, out, model, "ref", mode.steps),
        "resume": write_run(mode, out, model, "resume", mode.steps,
                            checkpoint__resume=str(out / "ref" / "checkpoints" / f"step_{half}")),
        "gc": write_run(mode, out, model, "gc", half, model__gradient_checkpointing=True, checkpoint__every_steps=0),
        "dense": write_run(mode, out, model, "dense", half, neuroprune__enabled=False, checkpoint__every_steps=0),
    }
    codes = {}
    for name, config in runs.items():
        codes[name] = run([ROOT / "launch" / "torchrun.sh", config], out / f"{name}.log",
                          NEUROPRUNE_NPROC=str(mode.ranks), NEUROPRUNE_PYTHON=sys.executable)
    failed = [f"{name} exit {code}: {tail(out / f'{name}.log', 2)}" for name, code in codes.items() if code]
    if failed:
        return [Result("trainer", False, "; ".join(failed))]
    ref = losses(out, "ref")
    summary = json.loads((out / "ref" / "neuroprune_summary.json").read_text())
    last = train_records(out, "ref")[-1]
    sparsity = last["sparsity/weight"]
    heads_ok = all(len(block["kept_units"]) < block["num_units"] for block in summary["attention"])
    kept = sum(len(block["kept_units"]) for block in summary["attention"])
    units = sum(block["num_units"] for block in summary["attention"])
    resumed = {s: v for s, v in losses(out, "resume").items() if s > half}
    resume_diff = max_relative(resumed, ref)
    gc_diff = max_relative(losses(out, "gc"), ref)
    with_pruner, without = tokens_per_s(out, "ref"), tokens_per_s(out, "dense")
    return [
        Result("sparsity", sparsity >= mode.sparsity_floor * TARGET_SPARSITY,
               f"weight sparsity {sparsity:.3f} after {mode.steps} steps (target {TARGET_SPARSITY}, ramp "
               f"{mode.steps * 6 // 10} steps); loss {ref[1]:.3f} -> {ref[mode.steps]:.3f}"),
        Result("head pruning", heads_ok, f"{kept} of {units} KV units kept; planted: one redundant per block"),
        Result("save + resume", len(resumed) == mode.steps - half and resume_diff <= mode.loss_rtol,
               f"steps {half + 1}-{mode.steps} after resuming step_{half}: max relative loss diff {resume_diff:.1e}"),
        Result("activation ckpt", gc_diff <= mode.loss_rtol,
               f"{half} steps with model.gradient_checkpointing: max relative loss diff {gc_diff:.1e}"),
        Result("tokens/s", with_pruner > 0 and without > 0,
               f"{with_pruner:,.0f} with NeuroPrune, {without:,.0f} without (ratio {with_pruner / without:.3f}), "
               f"{mode.ranks} rank(s), {mode.micro_batch_size} x {mode.max_length} tokens per rank and step"),
    ]


def check_export(out: Path) -> Result:
    export = out / "compact"
    log = out / "export.log"
    code = run([sys.executable, "-c", "from neuroprune_ds.cli import main; main()", "convert",
                out / "ref" / "checkpoints", export, "--format", "compact", "--overwrite"], log)
    found = re.search(r"max \|logits diff\| (\S+)", log.read_text()) if log.exists() else None
    return Result("compact export", code == 0 and found is not None,
                  f"exit {code}; logits of the export vs the masked model: "
                  f"{found.group(1) if found else tail(log, 2)}")


# ---------------------------------------------------------------------------------------------------- main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", default="runs/gpu_check", help="where logs and runs go")
    parser.add_argument("--cpu", action="store_true", help="the tiny CPU mode (gloo, 2 ranks): what CI runs")
    parser.add_argument("--model", help="an HF LLaMA checkpoint (e.g. SmolLM2-135M) instead of a random one")
    parser.add_argument("--collectives-worker", metavar="OUT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.collectives_worker:
        collectives_worker(args.collectives_worker)
    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible; use --cpu for the CPU mode", file=sys.stderr)
        return 2
    mode = cpu_mode() if args.cpu else gpu_mode()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results = []
    checks = [("collectives", lambda: [check_collectives(mode, out)]),
              ("equality", lambda: [check_equality(mode, out)]),
              ("accelerate", lambda: [check_accelerate(mode, out)]),
              ("trainer", lambda: check_trainer(mode, out, args.model)),
              ("export", lambda: [check_export(out)])]
    for name, check in checks:
        begun = time.perf_counter()
        try:
            found = check()
        except Exception as error:  # noqa: BLE001 - one broken check must not hide the others' results
            found = [Result(name, False, f"{type(error).__name__}: {error}")]
        for result in found:
            result.seconds = time.perf_counter() - begun
        results += found
        print(f"gpu_check: {name} done in {time.perf_counter() - begun:.0f} s", flush=True)
    device = "CPU (gloo)" if mode.cpu else torch.cuda.get_device_name(0)
    print(f"\n==== neuroprune_ds GPU check: {device}, {mode.ranks} rank(s), "
          f"{time.perf_counter() - started:.0f} s, logs in {out} ====")
    for result in results:
        print(f"{'OK  ' if result.ok else 'FAIL'} {result.name:<16} {result.detail}")
    failed = sum(not r.ok for r in results)
    print(f"==== {len(results) - failed} of {len(results)} checks passed ====")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
