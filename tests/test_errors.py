"""Bad input is refused clearly and loses nothing: every case runs through ``neuroprune validate`` and the real
``train`` set-up (one rank, one launch of tests/refusal_worker.py), and docs/errors.md's table is this test's
output (``NEUROPRUNE_WRITE_ERRORS_DOC=1`` rewrites it).

A case whose input ``validate`` can see must be refused by both, with the same message and exit status 2;
``validate`` reads local data files but leaves their columns (and values) to ``train``'s set-up. Nothing is
written into an output_dir whose checkpoints belong to another model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import transformers
import yaml
from tiny_models import TINY_CONFIGS

pytestmark = pytest.mark.dist

REPO = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "refusal_worker.py"
DOC = REPO / "docs" / "errors.md"
BEGIN, END = "<!-- begin: table written by tests/test_errors.py -->", "<!-- end of the table -->"

BASE = {
    "task": "causal_lm", "output_dir": "out", "model": {"name_or_path": "model"},
    "data": {"train": "train.txt", "max_length": 16, "max_eval_examples": 4},
    "schedule": {"max_steps": 1, "micro_batch_size": 2, "lr": 1e-3, "log_every_steps": 1},
    "checkpoint": {"every_steps": 0},
}

# name, bad input (as the table states it), commands, overrides, message fragment
CASES = [
    ("duplicate_key", "a key given twice in the YAML (`lr`)", "both", [], "key 'lr' (lines"),
    ("unknown_override", "launch/local.sh's old example `train.max_steps=20`", "both", ["train.max_steps=20"],
     "did you mean 'schedule.max_steps'?"),
    ("missing_train", "no `data.train`", "both", [], "data.train: '' is not allowed"),
    ("warmup", "`schedule.warmup_steps` beyond `schedule.max_steps`", "both", ["schedule.warmup_steps=5"],
     "schedule.warmup_steps: 5 is more than the run's 1 optimizer steps"),
    ("ds_optimizer", "an `optimizer` section in the DeepSpeed JSON", "both", [], "deepspeed.optimizer: remove it"),
    ("ds_scheduler", "a `scheduler` section in the DeepSpeed JSON", "both", [], "deepspeed.scheduler: remove it"),
    ("cpu_adam_no_offload", "`schedule.optimizer: cpu_adam` without optimizer offload", "both",
     ["schedule.optimizer=cpu_adam"], "schedule.optimizer: 'cpu_adam' (DeepSpeedCPUAdam) steps optimizer states"),
    ("zero_unknown_key", "a misspelt key inside `zero_optimization`", "both", [],
     "unknown key 'stage3_param_persistance_threshold'"),
    ("zero_not_object", "`zero_optimization` that is not a JSON object", "both", [],
     "deepspeed.zero_optimization: True is not a JSON object"),
    ("output_dir_file", "`output_dir` that is a file", "both", ["output_dir=a_file.txt"], "is a file"),
    ("model_missing", "`model.name_or_path` that does not exist", "both", ["model.name_or_path=./no_model"],
     "model.name_or_path: directory './no_model' does not exist"),
    ("model_no_config", "a model directory without config.json", "both", ["model.name_or_path=./empty_dir"],
     "has no config.json"),
    ("tokenizer_missing", "`model.tokenizer` pointing nowhere", "both", ["model.tokenizer=./no_tokenizer"],
     "model.tokenizer: directory './no_tokenizer' does not exist"),
    ("tokenizer_broken", "a tokenizer that cannot load", "both", ["model.tokenizer=./empty_dir"],
     "cannot load the tokenizer from './empty_dir'"),
    ("seq2seq_decoder", "`task: seq2seq` with a decoder-only model", "both", ["task=seq2seq"],
     "task: 'seq2seq' needs an encoder-decoder model"),
    ("exclude_all", "`exclude_modules` that excludes every block", "both", ["neuroprune.exclude_modules=['.*']"],
     "leave no attention/FFN block to prune"),
    ("other_model", "an output_dir holding checkpoints of another model (resume: auto)", "both",
     ["output_dir=trained", "model.name_or_path=./model_wide"], "holds checkpoints of another model"),
    ("other_stage", "resume of a ZeRO-3 checkpoint with a ZeRO-0 DeepSpeed config", "both",
     ["output_dir=trained"], "was saved at ZeRO stage 3"),
    ("resume_other_model", "`checkpoint.resume` of a checkpoint of another size", "both",
     ["model.name_or_path=./model_wide", "checkpoint.resume=trained/checkpoints"], "was saved from another model"),
    ("empty_file", "an empty data file", "both", ["data.train=empty.jsonl"], "is empty"),
    ("not_utf8", "a data file that is not UTF-8", "both", ["data.train=latin1.txt"], "is not UTF-8 text"),
    ("bad_jsonl", "a malformed JSONL row", "both", ["data.train=bad.jsonl"], "line 3 is not a JSON object"),
    ("null_text", "a null text field", "train", ["data.train=null.jsonl"], "has 1 empty (null) value(s)"),
]


def _write_model(path: Path, hidden: int) -> None:
    from synthetic_text import WORDS, save_word_tokenizer

    save_word_tokenizer(path)
    config = TINY_CONFIGS["opt"]()
    config.vocab_size = len(WORDS) + 2
    config.hidden_size = config.word_embed_proj_dim = hidden
    config.pad_token_id, config.eos_token_id, config.bos_token_id = 1, 1, 1
    transformers.set_seed(0)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)


def _ds(root: Path, name: str, stage: int, **extra) -> None:
    ds = json.loads((REPO / "ds_configs" / f"zero{stage}_fp32.json").read_text())
    if stage == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds.update(extra)
    (root / name).write_text(json.dumps(ds))


def _run_yaml(root: Path, name: str, **sections) -> str:
    run = {key: dict(value) if isinstance(value, dict) else value for key, value in BASE.items()}
    for section, values in sections.items():
        run[section] = {**run.get(section, {}), **values} if isinstance(values, dict) else values
    (root / name).write_text(yaml.safe_dump(run))
    return name


def _inputs(root: Path) -> list[dict]:
    """Write the models, data, configs and DeepSpeed JSONs; return the worker's plan."""
    from synthetic_text import sentence

    _write_model(root / "model", 32)
    _write_model(root / "model_wide", 48)
    (root / "train.txt").write_text("".join(sentence(i) + "\n" for i in range(80)))
    (root / "empty.jsonl").write_text("")
    (root / "latin1.txt").write_bytes("first line\ncaf\u00e9 au lait\n".encode("latin-1"))
    (root / "bad.jsonl").write_text('{"text": "a b"}\n{"text": "c d"}\n{"text": "e f"\n{"text": "g"}\n')
    (root / "null.jsonl").write_text("".join(json.dumps({"text": sentence(i)}) + "\n" for i in range(20))
                                     + '{"text": null}\n')
    (root / "a_file.txt").write_text("not a directory\n")
    (root / "empty_dir").mkdir()
    _ds(root, "ds3.json", 3)
    _ds(root, "ds0.json", 0)
    _ds(root, "ds_optimizer.json", 3, optimizer={"type": "AdamW", "params": {"lr": 1e-3}})
    _ds(root, "ds_scheduler.json", 3, scheduler={"type": "WarmupLR"})
    zero = json.loads((root / "ds3.json").read_text())
    zero["zero_optimization"]["stage3_param_persistance_threshold"] = 0
    (root / "ds_zero_typo.json").write_text(json.dumps(zero))
    _ds(root, "ds_zero_true.json", 0, zero_optimization=True)
    base = _run_yaml(root, "run.yaml")
    no_train = yaml.safe_load((root / "run.yaml").read_text())
    del no_train["data"]["train"]
    (root / "no_train.yaml").write_text(yaml.safe_dump(no_train))
    (root / "duplicate.yaml").write_text((root / "run.yaml").read_text().replace(
        "  lr: 0.001\n", "  lr: 0.001\n  lr: 0.5\n"))

    def entry(name, commands, config=base, deepspeed="ds3.json", overrides=(), env=None):
        return {"name": name, "commands": commands, "config": config, "deepspeed": deepspeed,
                "overrides": list(overrides), "env": env or {}}

    # A real ZeRO-3 run whose output_dir the cases below reuse, and one in which a shorter run replaces it.
    trained = _run_yaml(root, "trained.yaml", output_dir="trained", schedule={"max_steps": 2},
                        checkpoint={"every_steps": 1, "keep_last": 5})
    plan = [entry("train_it", ["train"], trained), entry("trained_before", ["snapshot"], "trained"),
            entry("stale_first", ["train"], trained, overrides=["output_dir=stale"]),
            entry("stale_rerun", ["train"], trained, overrides=["output_dir=stale", "checkpoint.resume=never",
                                                                "schedule.max_steps=1", "checkpoint.keep_last=1"])]
    special = {"duplicate_key": {"config": "duplicate.yaml"}, "missing_train": {"config": "no_train.yaml"},
               "ds_optimizer": {"deepspeed": "ds_optimizer.json"},
               "ds_scheduler": {"deepspeed": "ds_scheduler.json"},
               "zero_unknown_key": {"deepspeed": "ds_zero_typo.json"},
               "zero_not_object": {"deepspeed": "ds_zero_true.json"},
               "other_stage": {"deepspeed": "ds0.json"}}
    for name, _, commands, overrides, _ in CASES:
        plan.append(entry(name, ["validate", "train"] if commands == "both" else ["train"], overrides=overrides,
                          **special.get(name, {})))
    plan.append(entry("debug_traceback", ["train"], overrides=["data.train=empty.jsonl"],
                      env={"NEUROPRUNE_DEBUG": "1"}))
    plan.append(entry("trained_after", ["snapshot"], "trained"))
    # The shipped ZeRO-3 JSON keeps a tiny model's matrices whole on every rank (persistence threshold 1e5).
    plan.append(entry("shipped_zero3", ["validate", "train"], deepspeed=str(REPO / "ds_configs" / "zero3_fp32.json"),
                      overrides=["output_dir=shipped"]))
    return plan


def _message(stderr: str) -> str:
    """The first problem of an error report, as one line."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    items = [line[2:] for line in lines if line.startswith("- ")]
    text = items[0] if items else lines[-1].split(": ", 1)[1]
    return re.sub(r" \(NEUROPRUNE_DEBUG=1 shows the traceback\)$", "", text.removeprefix("error: "))


def table(results: dict) -> str:
    rows = ["| bad input | `neuroprune validate` | `train` set-up | message (the first line of the report) |",
            "|---|---|---|---|"]
    for name, description, commands, _, _ in CASES:
        outcome = results[name]
        validate = f"exit {outcome['validate']['code']}" if "validate" in outcome else "columns not read"
        message = _message(outcome["train"]["stderr"]).replace("|", "\\|")
        rows.append(f"| {description} | {validate} | exit {outcome['train']['code']} | {message} |")
    return "\n".join(rows)


def test_every_bad_input_is_refused_alike_by_validate_and_train_and_loses_nothing(tmp_path):
    plan = _inputs(tmp_path)
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                            "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
               PYTHONPATH=f"{REPO / 'tests'}{os.pathsep}{REPO}{os.pathsep}{env.get('PYTHONPATH', '')}")

    # The worker runs the cases in plan order; 'other_model' comes after 'train_it' wrote the run.
    done = subprocess.run([sys.executable, str(WORKER), "plan.json"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=600)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    results = json.loads((tmp_path / "plan.json.results.json").read_text())
    assert results["train_it"]["train"]["code"] == 0, results["train_it"]

    for name, _, commands, _, fragment in CASES:
        outcome = results[name]
        for command, result in outcome.items():
            assert result["code"] == 2, (name, command, result["stderr"][-3000:])
            assert fragment in result["stderr"], (name, command, result["stderr"][-3000:])
            assert "Traceback" not in result["stderr"], (name, command, result["stderr"][-3000:])
        if commands == "both":
            assert _message(outcome["validate"]["stderr"]) == _message(outcome["train"]["stderr"]), name
    assert "Traceback" in results["debug_traceback"]["train"]["stderr"]
    assert results["debug_traceback"]["train"]["code"] == 2

    # Nothing of the trained run was touched by the refused runs pointed at it (other_model, other_stage).
    before, after = results["trained_before"]["snapshot"]["files"], results["trained_after"]["snapshot"]["files"]
    assert "run_config.yaml" in before and "metrics.jsonl" in before and "checkpoints/step_2/complete" in before
    assert after == before

    # validate and train agree on the shipped ZeRO-3 JSON with matrices below its persistence threshold.
    assert [results["shipped_zero3"][c]["code"] for c in ("validate", "train")] == [0, 0], results["shipped_zero3"]

    # resume: never in a used output_dir replaces the earlier run: keep_last counts this run's tags only.
    assert results["stale_first"]["train"]["code"] == results["stale_rerun"]["train"]["code"] == 0
    stale = tmp_path / "stale" / "checkpoints"
    assert sorted(p.name for p in stale.iterdir() if p.name.startswith("step_")) == ["step_1"]
    assert (stale / "latest").read_text().strip() == "step_1"

    expected = table(results)
    if os.environ.get("NEUROPRUNE_WRITE_ERRORS_DOC") == "1":
        text = DOC.read_text()
        DOC.write_text(text[:text.index(BEGIN) + len(BEGIN)] + "\n" + expected + "\n" + text[text.index(END):])
    doc = DOC.read_text()
    assert doc[doc.index(BEGIN) + len(BEGIN):doc.index(END)].strip() == expected, \
        "docs/errors.md is out of date: rerun with NEUROPRUNE_WRITE_ERRORS_DOC=1"
