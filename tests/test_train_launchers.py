"""The training entry point end to end under real launchers, 2 ranks each, with NeuroPrune on.

Each scenario builds a tiny random model of one family with a REAL tokenizer and trains it a few steps on
REAL text (tools/assets.py), launched by the ``deepspeed`` launcher (``--module neuroprune_ds.train``) or
by ``torchrun`` (``-m neuroprune_ds.train``, or the ``neuroprune train`` console script). The test then reads
back ``metrics.jsonl`` and the TensorBoard event files.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import transformers
import yaml
from tiny_models import TINY_CONFIGS

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MAX_STEPS = 4
LOG_EVERY = 2


@dataclass(frozen=True)
class Scenario:
    launcher: str  # 'deepspeed', 'deepspeed-no-ssh', 'torchrun', 'torchrun-cli'
    family: str
    task: str
    ds_config: str
    data: dict
    eval_keys: tuple[str, ...]
    neuroprune: dict = field(default_factory=dict)


SCENARIOS = {
    "deepspeed-llama-causal_lm-zero3_bf16": Scenario(
        "deepspeed", "llama", "causal_lm", "zero3_bf16.json",
        {"train": "austen", "max_length": 32, "max_eval_examples": 8},
        ("eval/loss", "eval/perplexity"),
        # theta this large makes every head of a layer redundant: pruning must leave one unit per layer.
        {"theta": 100.0, "prune_every_steps": 2}),
    "torchrun-t5-seq2seq-zero2_fp32": Scenario(
        "torchrun", "t5", "seq2seq", "zero2_fp32.json",
        {"train": "headlines", "source_prefix": "summarize: ", "max_length": 48, "max_target_length": 12,
         "eval_fraction": 0.1, "max_eval_examples": 4},
        ("eval/loss", "eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/bleu")),
    "torchrun-cli-opt-classification-zero1_fp32": Scenario(
        "torchrun-cli", "opt", "classification", "zero1_fp32.json",
        {"train": "rotten_tomatoes", "max_length": 32, "max_train_examples": 64, "max_eval_examples": 16},
        ("eval/loss", "eval/accuracy", "eval/f1", "eval/matthews")),
    "deepspeed-no-ssh-bart-translation-zero3_offload_fp32": Scenario(
        "deepspeed-no-ssh", "bart", "seq2seq", "zero3_offload_fp32.json",
        {"train": "translation", "max_length": 32, "max_target_length": 12, "max_train_examples": 64,
         "max_eval_examples": 4},
        ("eval/loss", "eval/rouge1", "eval/bleu")),
}


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_launch_trains_with_neuroprune_and_logs(name, tmp_path):
    scenario = SCENARIOS[name]
    run_yaml, ds_json = _write_run(scenario, tmp_path)
    port = _free_port()
    done = subprocess.run(_command(scenario.launcher, run_yaml, ds_json, tmp_path, port), env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=240)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    # DeepSpeed's shared-memory all-reduce buffers (made under the deepspeed launcher) are released by the trainer.
    assert not list(Path("/dev/shm").glob(f"deepspeed_allreduce_buffer_*_{port}_*"))
    assert output.count(f"step {MAX_STEPS}: eval/") == 1, output[-3000:]  # only rank 0 reports

    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["kind"] == "train"]
    evals = [r for r in records if r["kind"] == "eval"]
    assert [r["step"] for r in train] == [2, 4] and [r["step"] for r in evals] == [2, 4]
    for record in train:
        assert math.isfinite(record["train/loss"]) and record["train/tokens_per_s"] > 0, record
        assert {"train/lr", "neuroprune/penalty_mlp", "neuroprune/penalty_attn", "neuroprune/lambda_scale",
                "sparsity/weight"} <= set(record)
        assert 0.0 <= record["sparsity/weight"] <= 1.0
    for record in evals:
        assert set(scenario.eval_keys) <= set(record) and all(math.isfinite(record[k]) for k in scenario.eval_keys)
    heads = {k: v for k, v in train[-1].items() if k.startswith("heads_kept/")}
    ffn = [k.removeprefix("ffn_alive/") for k in train[-1] if k.startswith("ffn_alive/")]
    expected_blocks = 2 * (3 if scenario.family in ("t5", "bart") else 1)  # 2 layers; enc self, dec self+cross
    assert len(heads) == expected_blocks and len(ffn) == (4 if scenario.family in ("t5", "bart") else 2)
    summary = json.loads((tmp_path / "out" / "neuroprune_summary.json").read_text())
    assert len(summary["attention"]) == expected_blocks
    if scenario.neuroprune.get("theta"):  # one unit (a KV group of query heads under GQA) left per layer
        assert all(len(block["kept_units"]) == 1 for block in summary["attention"]), summary["attention"]
        assert all(heads[f"heads_kept/{b['name']}"] == b["heads_per_unit"] for b in summary["attention"]), heads

    events = _events(tmp_path / "out" / "tensorboard")
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "sparsity/weight", *scenario.eval_keys} <= scalars
    assert set(heads) <= scalars
    assert [event.step for event in events.Scalars("train/loss")] == [2, 4]
    assert len(events.Images("neuroprune/heads_kept")) == 2
    assert {f"ffn_degree/{block}" for block in ffn} <= set(events.Tags()["histograms"])


def _events(directory: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(directory), size_guidance={"images": 0, "histograms": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


# --------------------------------------------------------------------------------------------- set-up


def _write_run(scenario: Scenario, tmp_path: Path) -> tuple[Path, Path]:
    import assets

    model_dir = _save_tiny_model(scenario.family, tmp_path / "model")
    data = dict(scenario.data)
    source = data.pop("train")
    if source == "austen":
        text = tmp_path / "austen.txt"
        text.write_text(assets.austen_text().read_text(encoding="utf-8")[:30_000], encoding="utf-8")
        data["train"] = str(text)
    else:
        data["train"] = str({"headlines": assets.headlines_jsonl, "rotten_tomatoes": assets.rotten_tomatoes_jsonl,
                             "translation": assets.translation_jsonl}[source]())
    ds = json.loads((REPO / "ds_configs" / scenario.ds_config).read_text())
    if ds["zero_optimization"]["stage"] == 3:
        ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even tiny tensors
    ds_json = tmp_path / "ds.json"
    ds_json.write_text(json.dumps(ds))
    run = {
        "task": scenario.task,
        "output_dir": str(tmp_path / "out"),
        "deepspeed": str(REPO / "ds_configs" / "zero0_fp32.json"),  # replaced by --deepspeed
        "model": {"name_or_path": str(model_dir), "dtype": "bf16" if "bf16" in scenario.ds_config else "fp32"},
        "data": data,
        "schedule": {"max_steps": MAX_STEPS, "micro_batch_size": 2, "gradient_accumulation_steps": 2,
                     "lr": 1e-3, "log_every_steps": LOG_EVERY, "eval_every_steps": 2, "seed": 7},
        "neuroprune": {"mlp_lambda": 1e-3, "attn_lambda": 1e-3, **scenario.neuroprune},
    }
    run_yaml = tmp_path / "run.yaml"
    run_yaml.write_text(yaml.safe_dump(run))
    return run_yaml, ds_json


def _save_tiny_model(family: str, directory: Path) -> Path:
    """A randomly initialised 2-layer model of ``family`` sized for its real tokenizer."""
    import assets

    if family == "t5":
        tokenizer = transformers.AutoTokenizer.from_pretrained(assets.t5_tokenizer_dir())
    elif family == "bart":
        tokenizer = transformers.BartTokenizer.from_pretrained(assets.gpt2_tokenizer_dir())
    else:
        tokenizer = transformers.AutoTokenizer.from_pretrained(assets.gpt2_tokenizer_dir())
    config = TINY_CONFIGS[family]()
    config.vocab_size = len(tokenizer)
    config.pad_token_id, config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    if family == "t5":
        config.decoder_start_token_id = tokenizer.pad_token_id
    else:
        config.bos_token_id = tokenizer.bos_token_id
    if family == "bart":
        config.decoder_start_token_id = tokenizer.eos_token_id
        config.forced_eos_token_id = tokenizer.eos_token_id
    auto_class = transformers.AutoModelForSeq2SeqLM if family in ("t5", "bart") else transformers.AutoModelForCausalLM
    transformers.set_seed(0)
    auto_class.from_config(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _command(launcher: str, run_yaml: Path, ds_json: Path, tmp_path: Path, port: int) -> list[str]:
    args = ["--config", str(run_yaml), "--deepspeed", str(ds_json)]
    port = str(port)
    if launcher.startswith("deepspeed"):
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("localhost slots=2\n")
        ssh = ["--no_ssh", "--node_rank", "0"] if launcher == "deepspeed-no-ssh" else ["--no_ssh_check"]
        return [str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--num_nodes", "1", *ssh,
                "--master_addr", "127.0.0.1", "--master_port", port, "--module", "neuroprune_ds.train", *args]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    if launcher == "torchrun-cli":
        return [*torchrun, "--no-python", str(BIN / "neuroprune"), "train", *args]
    return [*torchrun, "-m", "neuroprune_ds.train", *args]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning", HF_HUB_OFFLINE="1",
               TORCH_EXTENSIONS_DIR=env.get("TORCH_EXTENSIONS_DIR", str(Path(sys.prefix) / "torch_extensions")),
               PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}")
    return env


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_single_rank_without_launcher_and_without_neuroprune(tmp_path):
    """Started by hand (a world of one) with neuroprune.enabled=false: the same loop, no pruner, no pruner logs."""
    from synthetic_text import WORDS, save_word_tokenizer, sentence

    model_dir = tmp_path / "model"
    save_word_tokenizer(model_dir)
    config = TINY_CONFIGS["llama"]()
    config.vocab_size = len(WORDS) + 2
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
    (tmp_path / "train.txt").write_text("".join(sentence(i) + "\n" for i in range(200)))
    run = {"task": "causal_lm", "output_dir": str(tmp_path / "out"), "deepspeed": str(REPO / "ds_configs" / "zero2_fp32.json"),
           "model": {"name_or_path": str(model_dir)}, "data": {"train": str(tmp_path / "train.txt"), "max_length": 16},
           "schedule": {"max_steps": 3, "micro_batch_size": 4, "log_every_steps": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    env = {k: v for k, v in _env().items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    done = subprocess.run([sys.executable, "-m", "neuroprune_ds.train", "--config", str(tmp_path / "run.yaml"),
                           "neuroprune.enabled=false"], env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-5000:]
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records if r["kind"] != "checkpoint"] == ["setup", "train", "train", "train", "eval"]
    assert not any(key.startswith(("neuroprune/", "sparsity/", "heads_kept/")) for r in records for key in r)
    assert not (tmp_path / "out" / "neuroprune_summary.json").exists()
    assert "neuroprune/heads_kept" not in _events(tmp_path / "out" / "tensorboard").Tags()["images"]


def test_configuration_errors_exit_2_and_list_every_problem(tmp_path):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": "m"}, "data": {"train": "t.txt"}}))
    done = subprocess.run([sys.executable, "-m", "neuroprune_ds.train", "--config", str(tmp_path / "run.yaml"),
                           "schedule.lr=-1", "neuroprune.mlp_lamda=1"], env=_env(), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "schedule.lr" in done.stderr and "did you mean 'neuroprune.mlp_lambda'" in done.stderr


def test_scenarios_cover_every_family_launcher_and_task():
    assert {s.family for s in SCENARIOS.values()} == {"llama", "opt", "t5", "bart"}
    assert {s.task for s in SCENARIOS.values()} == {"causal_lm", "seq2seq", "classification"}
    assert {s.launcher.split("-")[0] for s in SCENARIOS.values()} == {"deepspeed", "torchrun"}
    assert shutil.which("deepspeed", path=str(BIN)) and shutil.which("neuroprune", path=str(BIN))
