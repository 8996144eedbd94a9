"""Shared by the export tests: expected compact sizes computed by hand, and reloading in a fresh process."""

import os
import subprocess
import sys

import torch

from neuroprune_ds.arch import resolve_architecture

AUTO_CLASS = {"causal_lm": "AutoModelForCausalLM", "seq2seq": "AutoModelForSeq2SeqLM",
              "classification": "AutoModelForSequenceClassification"}
RELOAD = os.path.join(os.path.dirname(__file__), "export_reload.py")


def export_inputs(seq2seq: bool, seed: int) -> dict:
    """Two rows of 9 tokens of the tiny vocabulary (ids 4..63, no special tokens), the second right-padded
    by 2; 4 decoder tokens for seq2seq."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 64, (2, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if seq2seq:
        inputs["decoder_input_ids"] = torch.randint(4, 64, (2, 4), generator=gen)
    return inputs


def expected_parameters(model: torch.nn.Module, alive: dict, dead_ffn: dict) -> int:
    """Parameters of the compact export: the model's, minus every pruned unit's q/k/v rows (and biases) and o
    columns, minus every removed FFN unit's input rows (and biases) and output column, minus the relative-bias
    table columns of heads no self-attention layer of the stack keeps.

    Args:
        alive: bool mask of units per attention block name (absent: all alive).
        dead_ffn: FFN block name -> set of unit indices the export removes.
    """
    arch = resolve_architecture(model)
    total = sum(p.numel() for p in model.parameters())
    kept_heads = {}
    for block in arch.attention:
        mask = alive.get(block.name, torch.ones(block.num_units, dtype=torch.bool))
        pruned = int((~mask).sum())
        q_rows = pruned * block.heads_per_unit * block.head_dim
        kv_rows = pruned * block.head_dim
        total -= q_rows * (block.q.in_features + (block.q.bias is not None))
        total -= kv_rows * (block.k.in_features + (block.k.bias is not None))
        total -= kv_rows * (block.v.in_features + (block.v.bias is not None))
        total -= q_rows * block.o.out_features
        if block.kind == "self":
            kept_heads.setdefault(block.stack, set()).update(
                h for u in torch.nonzero(mask).flatten().tolist()
                for h in range(u * block.heads_per_unit, (u + 1) * block.heads_per_unit))
    for block in arch.attention:
        if block.relative_bias:
            num_buckets = dict(model.named_parameters())[block.relative_bias].shape[0]
            total -= num_buckets * (block.num_heads - len(kept_heads[block.stack]))
    for block in arch.ffn:
        removed = len(dead_ffn.get(block.name, ()))
        total -= removed * sum(lin.in_features + (lin.bias is not None) for lin in block.inputs)
        total -= removed * block.output.out_features
    return total


def reload_in_fresh_process(jobs: list[dict], work_dir: str) -> list[dict]:
    """Run tests/export_reload.py on ``jobs`` (see its docstring) with neuroprune_ds not importable."""
    jobs_file, results_file = os.path.join(work_dir, "jobs.pt"), os.path.join(work_dir, "results.pt")
    torch.save(jobs, jobs_file)
    env = dict(os.environ, HF_MODULES_CACHE=os.path.join(work_dir, "hf_modules"), HF_HUB_OFFLINE="1",
               OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.pop("PYTHONPATH", None)
    proc = subprocess.run([sys.executable, RELOAD, jobs_file, results_file], cwd=work_dir, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return torch.load(results_file, weights_only=False)
