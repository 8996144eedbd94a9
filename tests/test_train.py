"""The trainer's pure parts: arguments, --help, DeepSpeed config completion, and the metrics logger."""

from __future__ import annotations

import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
import torch

from neuroprune_ds import config as config_module
from neuroprune_ds.config import ModelConfig, RunConfig, ScheduleConfig
from neuroprune_ds.config_loader import ConfigError
from neuroprune_ds.deepspeed_config import fill_deepspeed_config, model_hidden_size, optimizer_errors
from neuroprune_ds.logging_utils import METRICS_FILE, TENSORBOARD_DIR, MetricsLogger, heads_kept_figure
from neuroprune_ds.train import build_optimizer, config_reference, parse_args, prepare_deepspeed_config, run_errors


def _leaf_paths(cls, prefix=""):
    for field in dataclasses.fields(cls):
        section = getattr(config_module, str(field.type), None)
        if dataclasses.is_dataclass(section):
            yield from _leaf_paths(section, f"{prefix}{field.name}.")
        else:
            yield prefix + field.name


def test_help_documents_every_config_field_with_its_docstring(capsys):
    reference = config_reference()
    for path in _leaf_paths(RunConfig):
        assert f"  {path}  (" in reference, path
    assert "alpha: weight of the preferential-attachment weighted L1 penalty" in reference
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert "neuroprune.mlp_lambda  (float, default 1e-05)" in capsys.readouterr().out


def test_parse_args_overrides_before_and_after_options_and_launcher_local_rank():
    args = parse_args(["a.x=1", "--config", "run.yaml", "--local_rank=1", "--deepspeed", "ds.json", "b=2"])
    assert (args.config, args.deepspeed, args.local_rank, args.overrides) == ("run.yaml", "ds.json", 1, ["a.x=1", "b=2"])
    with pytest.raises(SystemExit):
        parse_args(["--config", "run.yaml", "--bogus"])


def _run(**schedule) -> RunConfig:
    return RunConfig(model=ModelConfig(name_or_path="m", dtype="bf16"), schedule=ScheduleConfig(**schedule))


def test_fill_deepspeed_config_completes_auto_fields_from_the_schedule():
    ds = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto", "gradient_clipping": "auto",
          "bf16": {"enabled": "auto"}, "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}}
    filled = fill_deepspeed_config(ds, _run(micro_batch_size=3, gradient_accumulation_steps=4, grad_clip=0.5), 2)
    assert filled["train_micro_batch_size_per_gpu"] == 3 and filled["gradient_accumulation_steps"] == 4
    assert filled["train_batch_size"] == 24 and filled["gradient_clipping"] == 0.5
    assert filled["bf16"] == {"enabled": True}
    assert filled["zero_allow_untested_optimizer"] is True and filled["zero_force_ds_cpu_optimizer"] is False
    assert ds["train_batch_size"] == "auto"  # the input is not modified
    assert "zero_force_ds_cpu_optimizer" not in fill_deepspeed_config({"zero_optimization": {"stage": 2}}, _run(), 1)


def test_prepared_deepspeed_config_refuses_optimizer_scheduler_and_other_clipping(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"optimizer": {"type": "AdamW"}, "scheduler": {"type": "WarmupLR"},
                                "gradient_clipping": 2.0, "bf16": {"enabled": "auto"},
                                "zero_optimization": {"stage": 1}}))
    run = _run(grad_clip=1.0)
    run.deepspeed = str(path)
    with pytest.raises(ConfigError) as error:
        prepare_deepspeed_config(run, 1)
    assert len(error.value.errors) == 3
    assert "deepspeed.optimizer: remove it; the trainer uses torch.optim.AdamW" in str(error.value)
    assert "deepspeed.gradient_clipping: 2.0 disagrees with schedule.grad_clip = 1.0" in str(error.value)


def test_fill_deepspeed_config_sizes_auto_zero_buffers_from_the_hidden_size():
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto", "stage3_prefetch_bucket_size": "auto",
                                "stage3_param_persistence_threshold": "auto", "stage3_max_live_parameters": 10,
                                "stage3_max_reuse_distance": "auto", "sub_group_size": "auto"}}
    zero = fill_deepspeed_config(ds, _run(), 2, hidden_size=1000)["zero_optimization"]
    assert zero == {"stage": 3, "reduce_bucket_size": 10**6, "stage3_prefetch_bucket_size": 900_000,
                    "stage3_param_persistence_threshold": 10_000, "stage3_max_live_parameters": 10,
                    "stage3_max_reuse_distance": 16 * 10**6, "sub_group_size": 16 * 10**6}
    # At 70B sizes the live/reuse limits stop at DeepSpeed's own default.
    assert fill_deepspeed_config(ds, _run(), 2, hidden_size=8192)["zero_optimization"]["stage3_max_reuse_distance"] == 10**9
    with pytest.raises(ConfigError) as error:
        fill_deepspeed_config(ds, _run(), 2)
    assert len(error.value.errors) == 5
    assert str(error.value.errors[0]).startswith('deepspeed.zero_optimization.reduce_bucket_size: "auto" needs')


def test_validate_refuses_auto_zero_buffers_of_a_model_without_hidden_size_as_train_does(tmp_path):
    ds = {"zero_optimization": {"stage": 3, "reduce_bucket_size": "auto"}}
    run = _run()
    run.output_dir = str(tmp_path / "out")
    (error,) = run_errors(run, ds, SimpleNamespace, 1)  # what validate checks against the model
    with pytest.raises(ConfigError) as refused:
        fill_deepspeed_config(ds, run, 1)  # where train's set-up refuses it
    assert refused.value.errors == [error]
    assert error.startswith('deepspeed.zero_optimization.reduce_bucket_size: "auto" needs the model\'s hidden_size')
    assert run_errors(run, ds, lambda: SimpleNamespace(hidden_size=8), 1) == []


def test_hidden_size_of_configs_with_one_several_or_a_nested_text_config():
    import transformers

    assert model_hidden_size(transformers.T5Config(d_model=48)) == 48  # d_model through the attribute map
    assert model_hidden_size(SimpleNamespace(hidden_sizes=[8, 64, 32])) == 64
    assert model_hidden_size(SimpleNamespace(text_config=transformers.LlamaConfig(hidden_size=64))) == 64
    assert model_hidden_size(SimpleNamespace()) is None


@pytest.mark.parametrize(("optimizer", "offload", "message"), [
    ("cpu_adam", None, "schedule.optimizer: 'cpu_adam' (DeepSpeedCPUAdam) steps optimizer states held in CPU memory"),
    ("fused", "cpu", "schedule.optimizer: 'fused' (DeepSpeed FusedAdam) runs on the accelerator, but"),
    ("fused", None, "schedule.optimizer: 'fused' (DeepSpeed FusedAdam) is a GPU kernel and the DeepSpeed accelerator "
                    "here is 'cpu'"),
    ("cpu_adam", "cpu", None), ("torch", "cpu", None), ("torch", None, None),
])
def test_optimizer_choice_is_checked_against_offload_and_accelerator(optimizer, offload, message):
    zero = {"stage": 3} | ({"offload_optimizer": {"device": offload}} if offload else {})
    errors = optimizer_errors({"zero_optimization": zero}, _run(optimizer=optimizer), "cpu")
    assert errors == ([] if message is None else [errors[0]]) and "\n" not in "".join(errors)
    if message:
        assert errors[0].startswith(message), errors


def test_build_optimizer_exempts_biases_and_norms_from_weight_decay():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    optimizer = build_optimizer(model, _run(weight_decay=0.1, lr=3e-4))
    decay, no_decay = optimizer.param_groups
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])] and decay["weight_decay"] == 0.1
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0 and decay["lr"] == 3e-4


def test_build_optimizer_reads_whole_shapes_of_zero3_partitioned_parameters():
    """A ZeRO-3 parameter loaded partitioned holds an empty placeholder; its dimensions are in ds_shape."""
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    for param in model.parameters():
        param.ds_shape = param.shape
        param.data = torch.empty(0)
    decay, no_decay = build_optimizer(model, _run(weight_decay=0.1)).param_groups
    assert [p.ds_shape for p in decay["params"]] == [torch.Size([4, 3])] and len(no_decay["params"]) == 3


def test_metrics_logger_forgets_what_an_interrupted_run_logged_after_the_resume_step(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    crashed = MetricsLogger(tmp_path, enabled=True)
    for step in range(1, 6):
        crashed.log(step, {"train/loss": float(step)}, kind="train")
    crashed.writer.flush()  # SIGKILL: no close; the checkpoint of step 2 is the last complete one
    resumed = MetricsLogger(tmp_path, enabled=True)
    resumed.forget_after(2)
    for step in (3, 4):
        resumed.log(step, {"train/loss": 10.0 * step}, kind="train")
    resumed.close()
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("train/loss")] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def test_metrics_logger_writes_jsonl_and_tensorboard(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logger = MetricsLogger(tmp_path, enabled=True)
    logger.log(2, {"train/loss": 1.5, "train/lr": float("nan")}, kind="train")
    summary = {"attention": [{"name": f"l{i}", "stack": "decoder", "layer": i, "kind": "self", "num_units": 4,
                              "kept_units": [0, 3]} for i in range(2)]}
    logger.log_heads_kept(2, summary)
    logger.log_ffn_degrees(2, {"l0.mlp": torch.tensor([3, 0, 5])})
    logger.close()
    record = json.loads((tmp_path / METRICS_FILE).read_text())
    assert record["kind"] == "train" and record["step"] == 2 and record["train/loss"] == 1.5
    assert record["train/lr"] == "nan"
    events = EventAccumulator(str(tmp_path / TENSORBOARD_DIR), size_guidance={"images": 0, "histograms": 0})
    events.Reload()
    assert events.Scalars("train/loss")[0].value == 1.5
    assert len(events.Images("neuroprune/heads_kept")) == 1
    assert events.Histograms("ffn_degree/l0.mlp")[0].histogram_value.num == 3

    quiet = MetricsLogger(tmp_path / "rank1", enabled=False)
    quiet.forget_after(1)
    quiet.log(1, {"x": 1.0}, kind="train")
    quiet.close()
    assert not (tmp_path / "rank1").exists()


def test_heads_kept_figure_has_a_panel_per_stack_and_kind():
    attention = [{"name": f"{s}.{k}.{layer}", "stack": s, "layer": layer, "kind": k, "num_units": 3,
                  "kept_units": [layer]} for s, k in (("encoder", "self"), ("decoder", "cross")) for layer in range(2)]
    figure = heads_kept_figure({"attention": attention})
    titles = [axes.get_title() for axes in figure.axes]
    assert titles == ["encoder self: 2/6 kept", "decoder cross: 2/6 kept"]
    grid = figure.axes[0].images[0].get_array()
    assert grid.tolist() == [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]


def test_freed_tensors_go_back_to_the_system_after_release_freed_host_memory():
    """Half of 64 tensors of 2 MiB freed in a checkerboard leaves holes that glibc keeps by default (once a
    larger block has raised its mmap threshold); with fixed thresholds each block is its own mapping."""
    import subprocess
    import sys

    script = """
import sys, torch
from neuroprune_ds.train import release_freed_host_memory
def anon_mib():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("RssAnon:")) / 1024
if sys.argv[1] == "release":
    release_freed_host_memory()
big = torch.ones(4 * 2**20)  # 16 MiB: freeing it raises glibc's mmap threshold to 16 MiB
del big
blocks = [torch.ones(2**19) for _ in range(64)]  # 2 MiB each
before = anon_mib()
del blocks[::2]
print(before - anon_mib())
"""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    freed = {mode: float(subprocess.run([sys.executable, "-c", script, mode], env=env, capture_output=True, text=True,
                                        check=True).stdout.split()[-1]) for mode in ("default", "release")}
    assert freed["release"] >= 60 > 8 >= freed["default"], freed  # 32 blocks of 2 MiB = 64 MiB
