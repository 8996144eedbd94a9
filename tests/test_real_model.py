"""The real pretrained SmolLM2-135M (LLaMA, GQA) through the real trainer with NeuroPrune, then both exports.

Bound: after 6 steps at lr 1e-4 with NeuroPrune on (lambda 1e-5), the held-out perplexity of the exported
model stays within 10% of the dense pretrained model's (measured 65.47 vs 72.23 on its 32 eval blocks). Both
exports reload with plain transformers and give the same logits.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import assets

pytestmark = pytest.mark.real
REPO = Path(__file__).resolve().parents[1]


def perplexity(model, config_path: Path) -> float:
    from neuroprune_ds.config_loader import load_config
    from neuroprune_ds.data import build_task_data, load_tokenizer
    from neuroprune_ds.evaluation import evaluate

    run = load_config(config_path, [])
    tokenizer = load_tokenizer(run.model)
    with torch.no_grad():
        return evaluate(model, build_task_data(run, tokenizer), tokenizer, batch_size=4,
                        max_new_tokens=0)["eval/perplexity"]


def test_smollm2_short_neuroprune_run_keeps_perplexity_and_exports_match(tmp_path):
    from transformers import AutoModelForCausalLM

    lines = [line for line in assets.botchan_text().read_text(encoding="utf-8").splitlines() if line.strip()]
    (tmp_path / "train.txt").write_text("\n".join(lines[:2000]) + "\n")
    (tmp_path / "eval.txt").write_text("\n".join(lines[-300:]) + "\n")
    run = {"task": "causal_lm", "output_dir": str(tmp_path / "run"),
           "deepspeed": str(REPO / "ds_configs" / "zero0_fp32.json"),
           "model": {"name_or_path": str(assets.smollm2_dir())},
           "data": {"train": str(tmp_path / "train.txt"), "eval": str(tmp_path / "eval.txt"), "max_length": 64,
                    "max_eval_examples": 32},
           "schedule": {"max_steps": 6, "micro_batch_size": 2, "lr": 1e-4, "log_every_steps": 2, "seed": 0},
           "checkpoint": {"resume": "never"},
           "neuroprune": {"mlp_lambda": 1e-5, "attn_lambda": 1e-5, "prune_every_steps": 6}}
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(run))
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}  # a fresh job
    env = dict(inherited, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore", OMP_NUM_THREADS="2")
    subprocess.run([sys.executable, "-m", "neuroprune_ds.train", "--config", str(config)], env=env, check=True,
                   timeout=1200)
    neuroprune = Path(sys.executable).parent / "neuroprune"
    for fmt in ("dense", "compact"):
        subprocess.run([str(neuroprune), "convert", str(tmp_path / "run" / "checkpoints"), str(tmp_path / fmt),
                        "--format", fmt], env=env, check=True, timeout=1200)

    dense = AutoModelForCausalLM.from_pretrained(assets.smollm2_dir(), dtype=torch.float32)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "dense", dtype=torch.float32)
    compact = AutoModelForCausalLM.from_pretrained(tmp_path / "compact", dtype=torch.float32,
                                                   trust_remote_code=True)
    ids = torch.randint(0, dense.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(compact(input_ids=ids).logits, exported(input_ids=ids).logits,
                                   rtol=0, atol=1e-4)
    base, pruned = perplexity(dense, config), perplexity(exported, config)
    print(f"held-out perplexity: dense {base:.2f}, after NeuroPrune {pruned:.2f}")
    assert pruned <= 1.10 * base
