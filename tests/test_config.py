"""Config loading, overrides, range rules, DeepSpeed JSON cross-checks and `neuroprune validate`."""

from __future__ import annotations

import functools
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from neuroprune_ds.config import ModelConfig, RunConfig
from neuroprune_ds.config_loader import (RULES, ConfigError, config_from_dict, config_to_dict, load_config, save_config,
                                         validate)
from neuroprune_ds.deepspeed_config import DEEPSPEED_TOP_LEVEL_KEYS, check_deepspeed_config, load_deepspeed_config

REPO = Path(__file__).resolve().parents[1]
VALID = {"model": {"name_or_path": "tiny-llama"}, "data": {"train": "train.txt"}}


def errors_of(raw: dict, overrides: list[str] = ()) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw, overrides)
    return caught.value.errors


# --- unknown keys ------------------------------------------------------------------------------------------


def test_typo_suggests_the_nearest_key_of_its_section():
    raw = {**VALID, "neuroprune": {"mlp_lamda": 1e-4}}
    assert errors_of(raw) == ["unknown key 'neuroprune.mlp_lamda' — did you mean 'neuroprune.mlp_lambda'?"]


def test_misplaced_key_suggests_where_it_belongs():
    assert errors_of({**VALID, "mlp_lambda": 1e-4}) == [
        "unknown key 'mlp_lambda' — did you mean 'neuroprune.mlp_lambda'?"]
    assert errors_of({**VALID, "model": {"name_or_path": "m", "lr": 1e-4}}) == [
        "unknown key 'model.lr' — did you mean 'schedule.lr'?"]


def test_misspelled_section_is_suggested():
    assert errors_of({**VALID, "neuroprne": {"theta": 0.1}}) == [
        "unknown key 'neuroprne' — did you mean 'neuroprune'?"]


def test_unknown_key_without_a_close_match_lists_the_valid_keys():
    (error,) = errors_of({**VALID, "checkpoint": {"zzzz": 1}})
    assert error == "unknown key 'checkpoint.zzzz'; valid keys in 'checkpoint': every_steps, keep_last, resume, on_nonfinite"


def test_all_errors_are_reported_at_once_one_per_line():
    raw = {"model": {"name_or_path": "m", "dtype": "fp8"}, "data": {"train": "t", "eval_fraction": 2.0},
           "schedule": {"max_step": 10, "micro_batch_size": "eight"}}
    with pytest.raises(ConfigError) as caught:
        config_from_dict(raw, ["neuroprune.theta=-1"])
    errors = caught.value.errors
    assert len(errors) == 5
    assert [line.removeprefix("  - ") for line in str(caught.value).splitlines()[1:]] == errors
    for fragment in ("'schedule.max_step' — did you mean 'schedule.max_steps'?",
                     "schedule.micro_batch_size: 'eight' is not an integer", "model.dtype: 'fp8'",
                     "data.eval_fraction: 2.0", "neuroprune.theta: -1.0"):
        assert sum(fragment in error for error in errors) == 1, fragment
    assert isinstance(caught.value, ValueError)


# --- range rules -------------------------------------------------------------------------------------------

# (dotted field, a rejected value, an accepted boundary value), all written as override values.
RANGE_CASES = [
    ("neuroprune.mlp_lambda", "-1.0e-9", "0"),
    ("neuroprune.attn_lambda", "-1.0e-9", "0"),
    ("neuroprune.epsilon", "0", "1.0e-12"),
    ("neuroprune.c_min", "0", "1"),
    ("neuroprune.c_min", "1.01", "1.0e-6"),
    ("neuroprune.delta", "0", "1.0e-12"),
    ("neuroprune.theta", "-0.01", "0"),
    ("neuroprune.degree_every", "0", "1"),
    ("neuroprune.lambda_warmup_steps", "-1", "0"),
    ("neuroprune.prune_every_steps", "-1", "0"),
    ("neuroprune.prune_start_step", "-1", "0"),
    ("neuroprune.target_sparsity", "1.0", "0.5"),
    ("neuroprune.target_sparsity", "0.0", "0.01"),
    ("neuroprune.target_ramp_steps", "-1", "0"),
    ("neuroprune.controller_gain", "0", "0.1"),
    ("neuroprune.mlp_groups", "rows", "output_rows"),
    ("neuroprune.penalty", "lasso", "l1"),
    ("neuroprune.attention_kinds", "[]", "[cross]"),
    ("neuroprune.attention_kinds", "[self, encoder]", "[self, cross]"),
    ("neuroprune.fold", "sum", "none"),
    ("neuroprune.update", "proximal", "decoupled"),
    ("neuroprune.recover_steps", "-1", "0"),
    ("neuroprune.theta_mode", "scaled", "relative"),
    ("neuroprune.prune_ffn_units_below", "0.0", "1.0"),
    ("neuroprune.prune_ffn_units_fraction", "1.0", "0.25"),
    ("neuroprune.ffn_unit_score", "taylr", "connectivity"),
    ("task", "lm", "classification"),
    ("num_labels", "0", "1"),
    ("model.name_or_path", "''", "x"),
    ("model.dtype", "fp16", "bf16"),
    ("data.train", "'  '", "x"),
    ("data.eval_fraction", "1", "0"),
    ("data.eval_fraction", "-0.1", "0.99"),
    ("data.max_length", "0", "1"),
    ("data.max_target_length", "0", "1"),
    ("data.max_train_examples", "-1", "0"),
    ("data.max_eval_examples", "-1", "null"),
    ("data.num_proc", "0", "2"),
    ("schedule.epochs", "0", "1"),
    ("schedule.max_steps", "0", "1"),
    ("schedule.micro_batch_size", "0", "1"),
    ("schedule.gradient_accumulation_steps", "0", "1"),
    ("schedule.lr", "0", "1.0e-9"),
    ("schedule.weight_decay", "-0.1", "0"),
    ("schedule.optimizer", "adamw", "cpu_adam"),
    ("schedule.warmup_steps", "-1", "0"),
    ("schedule.lr_scheduler", "step", "cosine"),
    ("schedule.grad_clip", "-1", "0"),
    ("schedule.eval_every_steps", "-1", "0"),
    ("schedule.log_every_steps", "0", "1"),
    ("schedule.seed", "-1", "0"),
    ("checkpoint.every_steps", "-1", "0"),
    ("checkpoint.keep_last", "0", "1"),
    ("checkpoint.resume", "atuo", "never"),
    ("checkpoint.on_nonfinite", "ignore", "skip"),
]


@pytest.mark.parametrize(("path", "bad", "good"), RANGE_CASES)
def test_range_rule_rejects_with_the_field_named_and_accepts_the_boundary(path, bad, good):
    (error,) = errors_of(VALID, [f"{path}={bad}"])
    value = yaml.safe_load(bad)
    if isinstance(field_value(RunConfig(), path), float):
        value = float(value)
    assert error.startswith(f"{path}: {value!r} is not allowed; expected "), error
    config_from_dict(VALID, [f"{path}={good}"])


def field_value(config: RunConfig, path: str):
    return functools.reduce(getattr, path.split("."), config)


def test_every_rule_names_a_real_field_and_is_exercised():
    assert set(RULES) == {path for path, _, _ in RANGE_CASES}
    for path in RULES:
        field_value(RunConfig(), path)


def test_choice_errors_suggest_the_nearest_choice():
    assert errors_of(VALID, ["checkpoint.resume=atuo"])[0].endswith("— did you mean 'auto'?")
    assert errors_of(VALID, ["neuroprune.attention_kinds=[self, cros]"])[0].endswith("— did you mean 'cross'?")
    assert errors_of(VALID, ["schedule.lr_scheduler=cosin"])[0].endswith("— did you mean 'cosine'?")


def test_fp16_is_rejected_with_the_reason():
    (error,) = errors_of(VALID, ["model.dtype=fp16"])
    assert "fp16 does not run on CPU DeepSpeed and is not supported" in error


def test_resume_accepts_an_existing_path(tmp_path):
    assert config_from_dict(VALID, [f"checkpoint.resume={tmp_path}"]).checkpoint.resume == str(tmp_path)
    (error,) = errors_of(VALID, [f"checkpoint.resume={tmp_path / 'missing'}"])
    assert error.startswith("checkpoint.resume:") and "existing checkpoint" in error


def test_validate_checks_configs_built_in_code():
    assert validate(RunConfig(model=ModelConfig(name_or_path="m"), data=config_from_dict(VALID).data)) == []
    errors = validate(RunConfig(model=ModelConfig(name_or_path="m", dtype="bf61")))
    assert errors == ["model.dtype: 'bf61' is not allowed; expected one of 'fp32', 'bf16' — did you mean 'bf16'?",
                      "data.train: '' is not allowed; expected a non-empty string"]


# --- types -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("override", "expected"), [
    ("schedule.max_steps=ten", "schedule.max_steps: 'ten' is not an integer or null"),
    ("data.max_length=1.5", "data.max_length: 1.5 is not an integer"),
    ("data.max_length=true", "data.max_length: True is not an integer"),
    ("neuroprune.enabled=maybe", "neuroprune.enabled: 'maybe' is not true or false"),
    ("neuroprune.theta=abc", "neuroprune.theta: 'abc' is not a finite number"),
    ("neuroprune.theta=.inf", "neuroprune.theta: inf is not a finite number"),
    ("neuroprune.theta=null", "neuroprune.theta: None is not a finite number"),
    ("output_dir=2024", "output_dir: 2024 is not a string (quote it to pass it as a string)"),
    ("neuroprune.attention_kinds=self", "neuroprune.attention_kinds: 'self' is not a list of strings"),
    ("neuroprune.exclude_modules=[1]", "neuroprune.exclude_modules: [1] is not a list of strings"),
    ("neuroprune.target_modules=q", "neuroprune.target_modules: 'q' is not a list of strings or null"),
])
def test_type_errors_name_field_value_and_expected_type(override, expected):
    assert errors_of(VALID, [override]) == [expected]


def test_section_that_is_not_a_mapping_is_reported_once():
    (error,) = errors_of({**VALID, "schedule": 5})
    assert error.startswith("schedule: 5 is not a mapping of ScheduleConfig keys (epochs, max_steps,")


def test_float_fields_accept_ints_and_yaml_exponents_without_a_dot():
    config = config_from_dict(VALID, ["neuroprune.theta=1", "neuroprune.mlp_lambda=1e-4"])
    assert config.neuroprune.theta == 1.0 and type(config.neuroprune.theta) is float
    assert config.neuroprune.mlp_lambda == 1e-4


# --- overrides ---------------------------------------------------------------------------------------------


def test_overrides_set_nested_values_lists_and_none():
    raw = {**VALID, "neuroprune": {"target_modules": ["mlp"]}, "model": {"name_or_path": "m", "gguf_file": "f"}}
    config = config_from_dict(raw, ["neuroprune.attention_kinds=[self]", "neuroprune.target_modules=null",
                                    "model.gguf_file=null", "schedule.max_steps=10", "data.eval=dev.jsonl",
                                    "task=seq2seq", "neuroprune.prune_heads=false"])
    assert config.neuroprune.attention_kinds == ["self"]
    assert config.neuroprune.target_modules is None and config.model.gguf_file is None
    assert config.model.name_or_path == "m" and config.schedule.max_steps == 10
    assert (config.data.eval, config.task, config.neuroprune.prune_heads) == ("dev.jsonl", "seq2seq", False)
    assert raw["neuroprune"] == {"target_modules": ["mlp"]}, "the input dict must not be modified"
    config_from_dict(raw).neuroprune.target_modules.append("q")
    assert raw["neuroprune"] == {"target_modules": ["mlp"]}, "the config must not share lists with the input"


def test_later_override_wins_and_values_may_contain_equals():
    config = config_from_dict(VALID, ["schedule.lr=1.0e-3", "schedule.lr=2.0e-3", "data.source_prefix=a=b"])
    assert config.schedule.lr == 2e-3 and config.data.source_prefix == "a=b"


def test_override_creates_missing_sections():
    config = config_from_dict({}, ["model.name_or_path=m", "data.train=t"])
    assert (config.model.name_or_path, config.data.train) == ("m", "t")


@pytest.mark.parametrize(("override", "expected"), [
    ("neuroprune.mlp_lamda=1", "unknown key 'neuroprune.mlp_lamda' — did you mean 'neuroprune.mlp_lambda'?"),
    ("neuroprun.mlp_lambda=1", "unknown key 'neuroprun' — did you mean 'neuroprune'?"),
    ("task.kind=x", "override 'task.kind=x': 'task' is a value, not a section"),
    ("schedule.lr", "override 'schedule.lr': expected key=value, e.g. neuroprune.mlp_lambda=1e-4"),
    ("=3", "override '=3': expected key=value, e.g. neuroprune.mlp_lambda=1e-4"),
])
def test_malformed_overrides(override, expected):
    assert errors_of(VALID, [override]) == [expected]


def test_override_with_unparsable_yaml():
    (error,) = errors_of(VALID, ["neuroprune.attention_kinds=[self"])
    assert error.startswith("override 'neuroprune.attention_kinds=[self': cannot parse '[self' as a YAML value")


# --- files -------------------------------------------------------------------------------------------------


def test_yaml_and_json_files_give_the_same_config(tmp_path):
    raw = {**VALID, "neuroprune": {"mlp_lambda": 0.001, "attention_kinds": ["cross"]}, "schedule": {"lr": 1}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(raw))
    (tmp_path / "run.json").write_text(json.dumps(raw))
    from_yaml = load_config(tmp_path / "run.yaml", ["schedule.epochs=3"])
    assert from_yaml == load_config(tmp_path / "run.json", ["schedule.epochs=3"])
    assert (from_yaml.neuroprune.mlp_lambda, from_yaml.schedule.epochs) == (0.001, 3)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")
    (tmp_path / "bad.json").write_text("{'single': quotes}")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(tmp_path / "list.yaml")


def test_a_key_given_twice_is_refused_with_its_lines_and_merge_keys_may_override(tmp_path):
    (tmp_path / "twice.yaml").write_text("model: {name_or_path: m}\ndata: {train: t.txt}\n"
                                         "schedule:\n  lr: 0.001\n  epochs: 2\n  lr: 0.5\n")
    with pytest.raises(ConfigError, match=r"twice.yaml': key 'lr' \(lines 4 and 6\) appears more than once"):
        load_config(tmp_path / "twice.yaml")
    (tmp_path / "twice.json").write_text('{"model": {"name_or_path": "m", "name_or_path": "n"}}')
    with pytest.raises(ConfigError, match="key 'name_or_path' appears more than once"):
        load_config(tmp_path / "twice.json")
    merged = "model: {name_or_path: m}\ndata: {train: t.txt}\nschedule:\n  <<: {lr: 0.001, epochs: 2}\n  lr: 0.5\n"
    (tmp_path / "merge.yaml").write_text(merged)
    assert load_config(tmp_path / "merge.yaml").schedule.lr == 0.5


def test_empty_file_reports_the_required_fields(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path / "empty.yaml")
    assert [error.split(":")[0] for error in caught.value.errors] == ["model.name_or_path", "data.train"]


def test_save_config_round_trips(tmp_path):
    config = config_from_dict(VALID, ["neuroprune.mlp_lambda=3.5e-5", "neuroprune.target_modules=[mlp, q]",
                                      "schedule.max_steps=7", "model.dtype=bf16"])
    save_config(config, tmp_path / "resolved.yaml")
    assert load_config(tmp_path / "resolved.yaml") == config
    assert yaml.safe_load((tmp_path / "resolved.yaml").read_text()) == config_to_dict(config)
    assert config_to_dict(config)["neuroprune"]["target_modules"] == ["mlp", "q"]


# --- DeepSpeed JSON ----------------------------------------------------------------------------------------


@pytest.fixture
def run() -> RunConfig:
    return config_from_dict(VALID, ["schedule.micro_batch_size=4", "schedule.gradient_accumulation_steps=2"])


def test_consistent_deepspeed_config_passes(run):
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto",
          "zero_optimization": {"stage": 3}, "bf16": {"enabled": False}, "gradient_clipping": 1,
          "steps_per_print": 10, "wall_clock_breakdown": False}
    assert check_deepspeed_config(ds, run) == []
    assert check_deepspeed_config({}, run) == []


def test_unknown_deepspeed_key_suggests_the_nearest(run):
    assert check_deepspeed_config({"zero_optimisation": {"stage": 2}, "foo_bar_baz": 1}, run) == [
        "deepspeed: unknown top-level key 'zero_optimisation' — did you mean 'zero_optimization'?",
        "deepspeed: unknown top-level key 'foo_bar_baz' (DeepSpeed does not read it)"]


def test_deepspeed_keys_come_from_deepspeed():
    from deepspeed.runtime.config import _REMOVED_TOP_LEVEL_CONFIG_KEYS
    from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION
    assert {ZERO_OPTIMIZATION, "train_micro_batch_size_per_gpu", "bf16", "tensorboard"} <= DEEPSPEED_TOP_LEVEL_KEYS
    assert not DEEPSPEED_TOP_LEVEL_KEYS & set(_REMOVED_TOP_LEVEL_CONFIG_KEYS)


@pytest.mark.parametrize(("ds", "fragment"), [
    ({"train_micro_batch_size_per_gpu": 8}, "train_micro_batch_size_per_gpu: 8 disagrees with "
                                            "schedule.micro_batch_size = 4"),
    ({"gradient_accumulation_steps": 1}, "gradient_accumulation_steps: 1 disagrees with "
                                         "schedule.gradient_accumulation_steps = 2"),
    ({"gradient_accumulation_steps": "2"}, "gradient_accumulation_steps: '2' disagrees"),
    ({"gradient_accumulation_steps": True}, "gradient_accumulation_steps: True disagrees"),
    ({"gradient_clipping": 0.5}, "gradient_clipping: 0.5 disagrees with schedule.grad_clip = 1.0"),
    ({"train_batch_size": 12}, "train_batch_size: 12 is not a positive multiple of micro_batch_size * "
                               "gradient_accumulation_steps = 4 * 2 = 8"),
    ({"train_batch_size": 0}, "train_batch_size: 0 is not a positive multiple"),
    ({"bf16": {"enabled": True}}, "bf16.enabled: true disagrees with model.dtype = 'fp32'"),
    ({"bfloat16": {"enabled": True}}, "bfloat16.enabled: true disagrees with model.dtype = 'fp32'"),
    ({"bf16": {"enabled": "yes"}}, "bf16.enabled: \"yes\" disagrees"),
    ({"bf16": True}, "deepspeed.bf16: True is not a JSON object"),
    ({"fp16": {"enabled": True}}, "fp16.enabled: true is not supported (fp16 does not run on CPU DeepSpeed)"),
    ({"zero_optimization": {"stage": 4}}, "zero_optimization.stage: 4 is not allowed; expected 0, 1, 2 or 3"),
    ({"zero_optimization": {"stage": "3"}}, "zero_optimization.stage: '3' is not allowed"),
    ({"zero_optimization": {"stage": True}}, "zero_optimization.stage: True is not allowed"),
    ({"zero_optimization": True}, "zero_optimization: True is not a JSON object"),
    ({"checkpoint": True}, 'deepspeed.checkpoint: True is not a JSON object like {"load_universal": true}'),
    ({"zero_optimization": {"stage": 3, "stage3_prefetch_bucket_sise": 1}},
     "zero_optimization: unknown key 'stage3_prefetch_bucket_sise' — did you mean 'stage3_prefetch_bucket_size'?"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu", "pin_memroy": True}}},
     "zero_optimization: unknown key 'offload_optimizer.pin_memroy' — did you mean 'pin_memory'?"),
    ({"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "gpu"}}},
     "zero_optimization.offload_optimizer.device: 'gpu' is not allowed (Input should be 'none', 'cpu' or 'nvme')"),
    ({"optimizer": {"type": "AdamW"}}, "deepspeed.optimizer: remove it; the trainer uses torch.optim.AdamW"),
    ({"scheduler": {"type": "WarmupLR"}}, "deepspeed.scheduler: remove it"),
])
def test_deepspeed_inconsistencies(run, ds, fragment):
    (error,) = check_deepspeed_config(ds, run)
    assert error.startswith("deepspeed") and fragment in error, error


def test_train_batch_size_against_a_known_world_size(run):
    assert check_deepspeed_config({"train_batch_size": 16}, run) == []
    assert check_deepspeed_config({"train_batch_size": 16}, run, world_size=2) == []
    (error,) = check_deepspeed_config({"train_batch_size": 16}, run, world_size=4)
    assert "micro_batch_size * gradient_accumulation_steps * world size = 4 * 2 * 4 = 32" in error


def test_optimizer_choice_is_checked_against_offload_always_and_against_the_accelerator_when_known(run):
    run.schedule.optimizer = "cpu_adam"
    (error,) = check_deepspeed_config({"zero_optimization": {"stage": 3}}, run)
    assert error.startswith("schedule.optimizer: 'cpu_adam' (DeepSpeedCPUAdam) steps optimizer states held in CPU")
    offloaded = {"zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    assert check_deepspeed_config(offloaded, run) == []
    # A malformed offload section is reported (by DeepSpeed's model of the section), not a crash.
    errors = check_deepspeed_config({"zero_optimization": {"stage": 3, "offload_optimizer": "cpu"}}, run)
    assert errors[0].startswith("deepspeed.zero_optimization.offload_optimizer: 'cpu' is not allowed"), errors
    assert errors[1].startswith("schedule.optimizer: 'cpu_adam'"), errors
    run.schedule.optimizer = "fused"
    assert check_deepspeed_config({}, run) == []  # validate need not run where the job will
    (error,) = check_deepspeed_config({}, run, accelerator="cpu")
    assert error.startswith("schedule.optimizer: 'fused' (DeepSpeed FusedAdam) is a GPU kernel")
    assert check_deepspeed_config({}, run, accelerator="cuda") == []


def test_bf16_must_be_enabled_for_a_bf16_model():
    run = config_from_dict(VALID, ["model.dtype=bf16"])
    stage1 = {"zero_optimization": {"stage": 1}}
    assert check_deepspeed_config({"bf16": {"enabled": True}, **stage1}, run) == []
    assert check_deepspeed_config({"bf16": {"enabled": "auto"}, **stage1}, run) == []
    for ds in (stage1, {"bf16": {"enabled": False}, **stage1}, {"bf16": {}, **stage1}):
        (error,) = check_deepspeed_config(ds, run)
        assert error == "deepspeed.bf16.enabled: false disagrees with model.dtype = 'bf16'; set it to true or \"auto\""


def test_load_deepspeed_config_rejects_duplicates_and_non_objects(tmp_path):
    (tmp_path / "dup.json").write_text('{"zero_optimization": {"stage": 1}, "zero_optimization": {"stage": 3}}')
    with pytest.raises(ConfigError, match="'zero_optimization' appears more than once"):
        load_deepspeed_config(tmp_path / "dup.json")
    (tmp_path / "list.json").write_text("[]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        load_deepspeed_config(tmp_path / "list.json")
    with pytest.raises(ConfigError, match="cannot read"):
        load_deepspeed_config(tmp_path / "missing.json")
    (tmp_path / "ok.json").write_text('{"zero_optimization": {"stage": 2}}')
    assert load_deepspeed_config(tmp_path / "ok.json") == {"zero_optimization": {"stage": 2}}


# --- neuroprune validate -----------------------------------------------------------------------------------


def neuroprune(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([str(Path(sys.executable).parent / "neuroprune"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def run_dir(tmp_path) -> Path:
    (tmp_path / "ds.json").write_text(json.dumps({"train_micro_batch_size_per_gpu": "auto",
                                                  "zero_optimization": {"stage": 3}}))
    (tmp_path / "run.yaml").write_text(yaml.safe_dump({"model": {"name_or_path": "tiny"},
                                                       "data": {"train": "train.txt"}}))
    return tmp_path


def test_cli_validate_names_the_nearest_key_and_exits_non_zero(run_dir):
    result = neuroprune("validate", "run.yaml", "neuroprune.mlp_lamda=1e-4", "schedule.micro_batch_size=0",
                        cwd=run_dir)
    assert result.returncode == 2, result.stderr
    assert "unknown key 'neuroprune.mlp_lamda' — did you mean 'neuroprune.mlp_lambda'?" in result.stderr
    assert "schedule.micro_batch_size: 0 is not allowed" in result.stderr


def test_cli_validate_resolves_a_meta_model(run_dir):
    import transformers  # imported here: only this test needs it, and it is slow to import
    from synthetic_text import save_word_tokenizer

    save_word_tokenizer(run_dir / "tiny")
    (run_dir / "train.txt").write_text("some text\n")
    transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2).save_pretrained(run_dir / "tiny")
    result = neuroprune("validate", "run.yaml", "--deepspeed", "ds.json", "neuroprune.mlp_lambda=1e-4",
                        cwd=run_dir)
    assert result.returncode == 0, result.stderr
    assert "model: llama (LlamaForCausalLM)" in result.stdout
    assert "attention: 2 blocks (self 2); heads 4, KV heads 2, head dim 8" in result.stdout
    assert "FFN: 2 blocks; width 48" in result.stdout


def test_meta_model_class_follows_the_task(tmp_path):
    import transformers

    from neuroprune_ds.cli import build_meta_model
    transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                             num_attention_heads=4).save_pretrained(tmp_path / "llama")
    transformers.T5Config(vocab_size=64, d_model=32, d_ff=48, d_kv=8, num_layers=1,
                          num_heads=4).save_pretrained(tmp_path / "t5")
    llama = build_meta_model(config_from_dict(VALID, [f"model.name_or_path={tmp_path / 'llama'}",
                                                      "task=classification", "num_labels=3"]))
    assert type(llama).__name__ == "LlamaForSequenceClassification" and llama.score.out_features == 3
    assert llama.score.weight.device.type == "meta"
    t5 = build_meta_model(config_from_dict(VALID, [f"model.name_or_path={tmp_path / 't5'}",
                                                   "task=classification"]))
    assert type(t5).__name__ == "T5ForConditionalGeneration", "T5 classifies text-to-text"


def test_neuroprune_with_bf16_at_zero_stage_0_is_refused():
    run = RunConfig()
    run.model.dtype = "bf16"
    errors = check_deepspeed_config({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}, run)
    assert any("FP16_Optimizer" in e and "zero_optimization.stage: 0" in e for e in errors)
    run.neuroprune.enabled = False
    assert not check_deepspeed_config({"bf16": {"enabled": True}, "zero_optimization": {"stage": 0}}, run)
    run.neuroprune.enabled = True
    assert not check_deepspeed_config({"bf16": {"enabled": True}, "zero_optimization": {"stage": 1}}, run)


def test_the_launch_scripts_usage_examples_use_real_config_keys():
    scripts = [REPO / "launch" / "local.sh", *sorted((REPO / "launch" / "slurm").glob("*.sbatch"))]
    overrides = [word for script in scripts for line in script.read_text().splitlines()[:12]
                 if line.startswith("# ") for word in line.split() if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+=\S+", word)]
    assert "schedule.max_steps=20" in overrides
    config_from_dict(VALID, overrides)  # raises on an unknown key
