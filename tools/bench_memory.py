"""Peak host memory per rank of ZeRO-3 fine-tuning through the real trainer, relative to the fp32 model size.

    python tools/bench_memory.py [--sizes 0.3b 0.55b] [--steps 3] [--work DIR] [--json OUT.json]

For each size a LLaMA-shaped model with random weights (GPT-2 tokenizer, safetensors shards of at most
--shard-mb) is saved once, then trained by ``launch/local.sh`` (the deepspeed launcher, 2 CPU ranks) with
the shipped ``ds_configs/zero3_fp32.json``, on Jane Austen's text: once plain (``neuroprune.enabled=false``)
and once with NeuroPrune on (target sparsity, head pruning every 2 steps). Each run ends with its checkpoint;
the NeuroPrune run of the largest size is then resumed for 2 more steps. Every rank runs this file as its
entry point (``NEUROPRUNE_ENTRY``), which calls ``neuroprune_ds.train.run_training`` unchanged and reads the
kernel's peak-RSS counter (VmHWM, reset through /proc/self/clear_refs) at three points:

- import: RSS once torch, deepspeed, transformers and datasets are imported (the baseline);
- load: peak during ``from_pretrained`` (the goal bounds its excess over the baseline by the largest
  checkpoint shard plus this rank's partition of the fp32 model); its excess over the RSS when loading
  starts (tokenizer and data already in memory) is reported too;
- setup: peak during the rest of setup (``deepspeed.initialize``, optimizer states, the pruner);
- steps: peak from there to the end (training steps, evaluation, checkpoint save; on resume, the load).

Prints one table row per run (GiB, and multiples of the fp32 model size) and writes them all to --json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 2**30

# name -> (hidden, layers, heads, intermediate); all multi-head (KV heads = heads), vocabulary of GPT-2.
SHAPES = {
    "smoke": (256, 2, 4, 688),  # checks the tool end to end in a few minutes; not part of the table
    "0.13b": (768, 8, 12, 2048),
    "0.3b": (1024, 16, 16, 2816),
    "0.55b": (1280, 22, 20, 3456),
}
NEUROPRUNE_ON = ["neuroprune.target_sparsity=0.3", "neuroprune.target_ramp_steps=2", "neuroprune.prune_every_steps=2",
                 "neuroprune.theta=1.0"]
NEUROPRUNE_OFF = ["neuroprune.enabled=false"]
RANK_OUT = "BENCH_MEMORY_RANK_OUT"


# ------------------------------------------------------------------------------------------------- rank side


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def _peak_and_reset() -> int:
    """Peak RSS (bytes) since the last reset, then restart the peak at the current RSS."""
    peak = _status_kib("VmHWM") * 1024
    Path("/proc/self/clear_refs").write_text("5")
    return peak


def rank_main(out_dir: Path, argv: list[str]) -> None:
    """Entry point of every rank: the trainer's run_training, with peak RSS read around its phases."""
    from neuroprune_ds.distributed import barrier_and_exit, setup_distributed_env

    added = setup_distributed_env()
    import torch

    from neuroprune_ds import train

    if "OMP_NUM_THREADS" in added:
        torch.set_num_threads(int(added["OMP_NUM_THREADS"]))
    marks = {"import": _status_kib("VmRSS") * 1024}
    load_model, setup = train.load_model, train.setup

    def measured_load_model(*args, **kwargs):
        _peak_and_reset()
        marks["before_load"] = _status_kib("VmRSS") * 1024  # the baseline plus tokenizer and data
        model = load_model(*args, **kwargs)
        marks["load"] = _peak_and_reset()
        marks["partitioned"] = all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
        marks["params"] = sum(int(getattr(p, "ds_numel", p.numel())) for p in model.parameters())
        return model

    def measured_setup(args):
        session = setup(args)
        marks["setup"] = _peak_and_reset()
        marks["rank"], marks["world_size"] = session.rank, session.world_size
        return session

    train.load_model, train.setup = measured_load_model, measured_setup
    code = train.run_training(train.parse_args(argv))
    marks["steps"] = _peak_and_reset()
    marks["code"] = code
    (out_dir / f"rank{marks.get('rank', os.environ.get('RANK', 0))}.json").write_text(json.dumps(marks))
    barrier_and_exit(code)


# ----------------------------------------------------------------------------------------------- driver side


def save_model(size: str, directory: Path, shard_mb: int) -> None:
    """A random LLaMA-shaped model of ``size`` with the GPT-2 tokenizer (kept if already saved)."""
    import torch
    import transformers

    import assets  # tools/ is on sys.path when run as a script

    hidden, layers, heads, intermediate = SHAPES[size]
    tokenizer = transformers.AutoTokenizer.from_pretrained(assets.gpt2_tokenizer_dir())
    if not (directory / "config.json").exists():
        config = transformers.LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                          num_key_value_heads=heads, intermediate_size=intermediate,
                                          vocab_size=len(tokenizer), max_position_embeddings=1024,
                                          tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
                                          eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        model.save_pretrained(directory, max_shard_size=f"{shard_mb}MB")
        tokenizer.save_pretrained(directory)


def model_facts(directory: Path) -> dict:
    """Parameters, fp32 bytes and the largest checkpoint shard of a saved model."""
    shards = sorted(directory.glob("*.safetensors"))
    params = _count_params(directory)
    return {"params": params, "fp32_bytes": 4 * params, "largest_shard_bytes": max(f.stat().st_size for f in shards),
            "shards": len(shards)}


def _count_params(directory: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in directory.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as handle:
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in handle.keys())
    return total


def write_run(work: Path, model_dir: Path, name: str, steps: int, deepspeed: Path) -> Path:
    import yaml

    import assets  # tools/ is on sys.path when run as a script

    text = work / "austen.txt"
    if not text.exists():
        text.write_text(assets.austen_text().read_text(encoding="utf-8")[:200_000], encoding="utf-8")
    run = {
        "task": "causal_lm",
        "output_dir": str(work / name),
        "deepspeed": str(deepspeed),
        "model": {"name_or_path": str(model_dir)},
        "data": {"train": str(text), "max_length": 128, "max_eval_examples": 2},
        "schedule": {"max_steps": steps, "micro_batch_size": 1, "lr": 1e-4, "log_every_steps": 1},
        "checkpoint": {"keep_last": 1},
        "neuroprune": {"mlp_lambda": 1e-4, "attn_lambda": 1e-4},
    }
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(run))
    return path


def launch(config: Path, overrides: list[str], out_dir: Path, fp32_bytes: int, patience_s: int) -> list[dict]:
    """Train with launch/local.sh (2 ranks); returns each rank's measurements."""
    out_dir.mkdir(parents=True, exist_ok=True)
    wait_for_memory(2 * 4 * fp32_bytes + GIB, patience_s)
    env = dict(os.environ, NEUROPRUNE_ENTRY="tools.bench_memory", NEUROPRUNE_NPROC="2", OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               NEUROPRUNE_PYTHON=sys.executable, **{RANK_OUT: str(out_dir)})
    done = subprocess.run(["bash", str(REPO / "launch" / "local.sh"), str(config), *overrides], env=env, cwd=REPO,
                          capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{config.name} {' '.join(overrides)} failed:\n{(done.stdout + done.stderr)[-5000:]}")
    return [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]


def row(size: str, facts: dict, label: str, ranks: list[dict]) -> dict:
    fp32 = facts["fp32_bytes"]
    partition = fp32 / len(ranks)
    out = {"size": size, "run": label, "params": facts["params"], "fp32_gib": fp32 / GIB,
           "largest_shard_gib": facts["largest_shard_bytes"] / GIB,
           "partitioned_on_load": all(r.get("partitioned", False) for r in ranks) if "load" in ranks[0] else None}
    for phase in ("import", "load", "setup", "steps"):
        if phase in ranks[0]:
            peak = max(r[phase] for r in ranks)
            out[f"{phase}_gib"], out[f"{phase}_x_fp32"] = peak / GIB, peak / fp32
    if "load" in ranks[0]:  # per rank: transformers reads the checkpoint's values on rank 0 only
        out["load_above_import_gib"] = [(r["load"] - r["import"]) / GIB for r in ranks]
        out["load_above_start_gib"] = [(r["load"] - r["before_load"]) / GIB for r in ranks]
        out["load_bound_gib"] = (facts["largest_shard_bytes"] + partition) / GIB
    return out


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=["0.3b", "0.55b"], choices=list(SHAPES))
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--shard-mb", type=int, default=500, help="largest safetensors shard of the saved models")
    parser.add_argument("--work", type=Path, help="models and runs go here (default: a temporary directory)")
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument("--deepspeed", type=Path, default=REPO / "ds_configs" / "zero3_fp32.json")
    parser.add_argument("--patience", type=int, default=900,
                        help="seconds to wait for 8x the fp32 model size of free memory before each launch")
    parser.add_argument("--modes", nargs="+", default=["plain", "neuroprune"], choices=["plain", "neuroprune"])
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="bench_memory_"))
    rows = []
    for size in args.sizes:
        model_dir = work / f"model-{size}"
        # A process of its own, so the driver does not hold a whole model's memory while the ranks run.
        subprocess.run([sys.executable, __file__, "--save-model", size, str(model_dir), str(args.shard_mb)],
                       check=True, cwd=REPO)
        facts = model_facts(model_dir)
        for label, overrides in (("plain", NEUROPRUNE_OFF), ("neuroprune", NEUROPRUNE_ON)):
            if label not in args.modes:
                continue
            config = write_run(work, model_dir, f"{size}-{label}", args.steps, args.deepspeed)
            marks = launch(config, overrides, work / f"marks-{size}-{label}", facts["fp32_bytes"], args.patience)
            rows.append(row(size, facts, label, marks))
            _print(rows[-1])
            if args.json:  # after every run: a later one may be stopped by the machine
                args.json.write_text(json.dumps(rows, indent=1))
            if label == "neuroprune" and size == args.sizes[-1]:
                resumed = launch(config, [*overrides, f"schedule.max_steps={args.steps + 2}"],
                                 work / f"marks-{size}-resume", facts["fp32_bytes"], args.patience)
                rows.append(row(size, facts, "neuroprune resumed", resumed))
                _print(rows[-1])
        if len(args.modes) == 2:
            plain, pruned = (r for r in rows if r["size"] == size and r["run"] in ("plain", "neuroprune"))
            print(f"{size}: step peak NeuroPrune / plain = {pruned['steps_gib'] / plain['steps_gib']:.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


def _gib(values: list[float]) -> str:
    return "/".join(f"{v:.2f}" for v in values) + " GiB"


def wait_for_memory(needed: int, patience_s: int) -> None:
    """On a shared machine, wait (up to ``patience_s``) until ``needed`` bytes are available, so that the
    kernel's OOM killer is not what ends a run (or somebody else's)."""
    for _ in range(patience_s // 10):
        available = next(int(line.split()[1]) * 1024 for line in Path("/proc/meminfo").read_text().splitlines()
                         if line.startswith("MemAvailable:"))
        if available >= needed:
            return
        print(f"waiting: {available / GIB:.1f} GiB available, {needed / GIB:.1f} GiB wanted", flush=True)
        time.sleep(10)


def _print(r: dict) -> None:
    phases = "  ".join(f"{p} {r[p + '_gib']:.2f} GiB ({r[p + '_x_fp32']:.2f}x)" for p in ("import", "load", "setup", "steps")
                       if p + "_gib" in r)
    print(f"{r['size']} {r['run']}: {r['params'] / 1e6:.0f}M params, fp32 {r['fp32_gib']:.2f} GiB; {phases}; "
          f"load above import per rank {_gib(r['load_above_import_gib'])}, above its start "
          f"{_gib(r['load_above_start_gib'])} (bound: largest shard + partition = {r['load_bound_gib']:.2f} GiB); "
          f"partitioned on load: {r['partitioned_on_load']}", flush=True)


if __name__ == "__main__":
    if RANK_OUT in os.environ:
        rank_main(Path(os.environ[RANK_OUT]), sys.argv[1:])
    elif sys.argv[1:2] == ["--save-model"]:
        save_model(sys.argv[2], Path(sys.argv[3]), int(sys.argv[4]))
    else:
        main()
