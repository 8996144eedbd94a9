"""The DeepSpeed JSON of a run: reading it, every rule it must follow, and what the trainer fills in.

``neuroprune validate`` and ``train``'s set-up refuse a JSON through the same :func:`check_deepspeed_config`
(one line per problem, each naming the ``deepspeed.<key>``, its value and what is allowed); ``train`` then
completes it with :func:`fill_deepspeed_config`.
"""

from __future__ import annotations

import copy
import json
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydantic
from deepspeed.autotuning.constants import AUTOTUNING
from deepspeed.comm.constants import COMMS_LOGGER
from deepspeed.datastates.config import DATASTATES_CHECKPOINTING
from deepspeed.monitor.config import DeepSpeedMonitorConfig
from deepspeed.profiling.constants import FLOPS_PROFILER
from deepspeed.runtime import constants as ds_constants
from deepspeed.runtime.activation_checkpointing.config import ACT_CHKPT
from deepspeed.runtime.config import EXPERT_PARALLEL
from deepspeed.runtime.data_pipeline.constants import DATA_EFFICIENCY
from deepspeed.runtime.swap_tensor.constants import AIO
from deepspeed.runtime.zero.config import ZERO_OPTIMIZATION, DeepSpeedZeroConfig
from deepspeed.utils.config import TIMERS

from neuroprune_ds.config import RunConfig
from neuroprune_ds.config_loader import ConfigError, _dict_noting_duplicates, _nearest


# Top-level keys DeepSpeed 0.19 reads: DeepSpeedConfig._initialize_params (deepspeed/runtime/config.py) and
# deepspeed.initialize (deepspeed/__init__.py), named by DeepSpeed's own constants where it has them.
DEEPSPEED_TOP_LEVEL_KEYS: frozenset[str] = frozenset({
    ds_constants.TRAIN_BATCH_SIZE, ds_constants.TRAIN_MICRO_BATCH_SIZE_PER_GPU,
    ds_constants.GRADIENT_ACCUMULATION_STEPS, ds_constants.MANAGED_GRADIENT_ACCUMULATION,
    ds_constants.OPTIMIZER, ds_constants.SCHEDULER, ds_constants.ZERO_ALLOW_UNTESTED_OPTIMIZER,
    ds_constants.ZERO_FORCE_DS_CPU_OPTIMIZER, ds_constants.STEPS_PER_PRINT, ds_constants.DUMP_STATE,
    ds_constants.DISABLE_PYTHON_GC, ds_constants.DISABLE_ALLGATHER, ds_constants.COMMUNICATION_DATA_TYPE,
    ds_constants.SEQ_PARALLEL_COMMUNICATION_DATA_TYPE, ds_constants.PRESCALE_GRADIENTS,
    ds_constants.GRADIENT_PREDIVIDE_FACTOR, ds_constants.GRADIENT_ALLREDUCE_OP,
    ds_constants.GRADIENT_CLIPPING,
    ds_constants.FP16, ds_constants.BFLOAT16, ds_constants.BFLOAT16_OLD, ds_constants.TORCH_AUTOCAST,
    ds_constants.WALL_CLOCK_BREAKDOWN, ds_constants.MEMORY_BREAKDOWN,
    ds_constants.USE_DATA_BEFORE_EXPERT_PARALLEL, ds_constants.CHECKPOINT, ds_constants.DATA_TYPES,
    ds_constants.DATALOADER_DROP_LAST, ds_constants.LOG_LEVEL, ds_constants.VOCABULARY_SIZE,
    ZERO_OPTIMIZATION, ACT_CHKPT, COMMS_LOGGER, FLOPS_PROFILER, AUTOTUNING, DATA_EFFICIENCY, AIO,
    DATASTATES_CHECKPOINTING, TIMERS, EXPERT_PARALLEL, *DeepSpeedMonitorConfig.model_fields,
    # Read as string literals (no constant) in deepspeed/runtime/config.py and deepspeed/__init__.py.
    "hybrid_engine", "pipeline", "weight_quantization", "compile", "tensor_parallel",
    "sequence_parallel_size", "data_parallel_size",
})



def load_deepspeed_config(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON file, rejecting duplicate keys (JSON would silently keep the last one).

    Raises:
        ConfigError: the file cannot be read, is not JSON, repeats a key or is not an object.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise ConfigError([f"deepspeed: cannot read {str(path)!r} (relative paths are relative to the "
                           f"current directory): {error.strerror}"]) from error
    duplicates: list[str] = []
    try:
        ds = json.loads(text, object_pairs_hook=_dict_noting_duplicates(duplicates))
    except json.JSONDecodeError as error:
        raise ConfigError([f"deepspeed: cannot parse {str(path)!r} as JSON: {error}"]) from error
    errors = [f"deepspeed: key {key} appears more than once in {str(path)!r}" for key in duplicates]
    if not isinstance(ds, dict):
        errors.append(f"deepspeed: {str(path)!r} must hold a JSON object, got {type(ds).__name__}")
    if errors:
        raise ConfigError(errors)
    return ds


# ------------------------------------------------------------------------------------------------- rules


def check_deepspeed_config(ds: dict[str, Any], run: RunConfig, world_size: int | None = None,
                           accelerator: str | None = None) -> list[str]:
    """Cross-check a DeepSpeed config against the run config: every rule by which ``neuroprune validate``
    and ``train``'s set-up refuse it.

    Batch sizes given as ``"auto"`` or left out are fine: the trainer fills them from ``schedule``.

    Args:
        ds: the parsed DeepSpeed JSON.
        run: the validated run configuration.
        world_size: number of data-parallel ranks, when known; without it ``train_batch_size`` only has to
            be a multiple of micro_batch_size * gradient_accumulation_steps.
        accelerator: DeepSpeed's accelerator name where the ranks run, when known (``train`` passes its own;
            ``validate`` may run on another machine, such as a login node without GPUs).

    Returns:
        One message per problem; empty when consistent.
    """
    errors = _object_errors(ds)
    for key in ds:
        if key not in DEEPSPEED_TOP_LEVEL_KEYS:
            guess = _nearest(key, DEEPSPEED_TOP_LEVEL_KEYS)
            hint = f" — did you mean {guess!r}?" if guess else " (DeepSpeed does not read it)"
            errors.append(f"deepspeed: unknown top-level key {key!r}{hint}")
    errors += [f"deepspeed.{key}: remove it; the trainer uses torch.optim.AdamW with the schedule.* settings"
               for key in (ds_constants.OPTIMIZER, ds_constants.SCHEDULER) if key in ds]
    errors += _schedule_errors(ds, run, world_size)
    errors += _dtype_errors(ds, run)
    errors += _zero_errors(ds)
    errors += _neuroprune_errors(ds, run)
    errors += _activation_checkpointing_errors(ds)
    errors += optimizer_errors(ds, run, accelerator)
    return errors


# Sections the trainer reads, which must be JSON objects, with an example of each for the message.
_OBJECT_SECTIONS: dict[str, dict[str, Any]] = {
    ds_constants.FP16: {"enabled": False}, ds_constants.BFLOAT16: {"enabled": False},
    ds_constants.BFLOAT16_OLD: {"enabled": False}, ZERO_OPTIMIZATION: {"stage": 2},
    ds_constants.CHECKPOINT: {"load_universal": True},
}


def _object_errors(ds: dict[str, Any]) -> list[str]:
    return [f"deepspeed.{key}: {ds[key]!r} is not a JSON object like {json.dumps(example)}"
            for key, example in _OBJECT_SECTIONS.items() if key in ds and not isinstance(ds[key], dict)]


def _activation_checkpointing_errors(ds: dict[str, Any]) -> list[str]:
    """DeepSpeed's section configures ``deepspeed.checkpointing.checkpoint``, which HF models never call."""
    if ACT_CHKPT not in ds:
        return []
    return [f"deepspeed.{ACT_CHKPT}: has no effect on Hugging Face models (they do not call DeepSpeed's "
            "checkpointing); remove it and set model.gradient_checkpointing=true instead"]


def _neuroprune_errors(ds: dict[str, Any], run: RunConfig) -> list[str]:
    """Combinations the pruner cannot serve (see neuroprune_ds.zero_access)."""
    if run.neuroprune.enabled and run.model.dtype == "bf16" and zero_stage(ds) == 0:
        return ["deepspeed.zero_optimization.stage: 0 with model.dtype = 'bf16' keeps the fp32 master weights "
                "inside DeepSpeed's FP16_Optimizer, out of NeuroPrune's reach; use stage 1 (same memory on "
                "one rank), or fp32, or neuroprune.enabled=false"]
    return []


def _schedule_errors(ds: dict[str, Any], run: RunConfig, world_size: int | None) -> list[str]:
    errors = []
    micro, accumulation = run.schedule.micro_batch_size, run.schedule.gradient_accumulation_steps
    mirrored = ((ds_constants.TRAIN_MICRO_BATCH_SIZE_PER_GPU, micro, "micro_batch_size"),
                (ds_constants.GRADIENT_ACCUMULATION_STEPS, accumulation, "gradient_accumulation_steps"),
                (ds_constants.GRADIENT_CLIPPING, run.schedule.grad_clip, "grad_clip"))
    for key, expected, field in mirrored:
        if key in ds and ds[key] != "auto" and (isinstance(ds[key], bool) or ds[key] != expected):
            errors.append(f"deepspeed.{key}: {ds[key]!r} disagrees with schedule.{field} = {expected}; "
                          "set it to \"auto\" or remove it (the trainer fills it in)")
    key = ds_constants.TRAIN_BATCH_SIZE
    if key not in ds or ds[key] == "auto":
        return errors
    total = ds[key]
    per_rank = micro * accumulation
    if world_size is not None and (not _is_int(total) or total != per_rank * world_size):
        errors.append(f"deepspeed.{key}: {total!r} is not micro_batch_size * gradient_accumulation_steps * "
                      f"world size = {micro} * {accumulation} * {world_size} = {per_rank * world_size}; "
                      "set it to \"auto\" or remove it")
    elif world_size is None and (not _is_int(total) or total <= 0 or total % per_rank):
        errors.append(f"deepspeed.{key}: {total!r} is not a positive multiple of micro_batch_size * "
                      f"gradient_accumulation_steps = {micro} * {accumulation} = {per_rank}; "
                      "set it to \"auto\" or remove it")
    return errors


def _dtype_errors(ds: dict[str, Any], run: RunConfig) -> list[str]:
    errors = []
    if _enabled(ds, ds_constants.FP16) is True:
        errors.append("deepspeed.fp16.enabled: true is not supported (fp16 does not run on CPU DeepSpeed); "
                      "set model.dtype=bf16 and bf16.enabled instead")
    # DeepSpeed reads 'bfloat16' only when 'bf16' is absent (runtime/precision_config.py).
    old_key_only = ds_constants.BFLOAT16 not in ds and ds_constants.BFLOAT16_OLD in ds
    bf16_key = ds_constants.BFLOAT16_OLD if old_key_only else ds_constants.BFLOAT16
    enabled = _enabled(ds, bf16_key)
    wanted = run.model.dtype == "bf16"
    if enabled != "auto" and (not isinstance(enabled, bool) or enabled != wanted):
        errors.append(f"deepspeed.{bf16_key}.enabled: {json.dumps(enabled)} disagrees with model.dtype = "
                      f"{run.model.dtype!r}; set it to {json.dumps(wanted)} or \"auto\"")
    return errors


def _enabled(ds: dict[str, Any], section: str) -> Any:
    """The ``enabled`` value of a precision section; DeepSpeed's default (false) when absent."""
    if section in ds and isinstance(ds[section], dict) and "enabled" in ds[section]:
        return ds[section]["enabled"]
    return False


def _zero_errors(ds: dict[str, Any]) -> list[str]:
    zero = ds.get(ZERO_OPTIMIZATION)
    if not isinstance(zero, dict):  # absent, or reported by _object_errors
        return []
    if zero_stage(ds) is None:
        return [f"deepspeed.{ZERO_OPTIMIZATION}.stage: {zero['stage']!r} is not allowed; "
                "expected 0, 1, 2 or 3"]
    try:
        DeepSpeedZeroConfig(**zero)  # DeepSpeed's own model of the section: unknown keys, types, ranges
    except pydantic.ValidationError as error:
        return [_zero_field_error(problem) for problem in error.errors()]
    return []


def _zero_field_error(problem: dict[str, Any]) -> str:
    """One pydantic problem of the zero_optimization section as one line naming the key."""
    where = ".".join(str(part) for part in problem["loc"])
    if problem["type"] == "extra_forbidden":
        known = DeepSpeedZeroConfig.model_fields
        for part in problem["loc"][:-1]:  # a nested section such as offload_optimizer
            annotation = known[part].annotation if part in known else None
            known = getattr(next((a for a in typing.get_args(annotation) if hasattr(a, "model_fields")),
                                 annotation), "model_fields", {})
        spellings = [name for key, field in known.items() for name in (field.alias, key) if name]
        guess = _nearest(str(problem["loc"][-1]), spellings)
        hint = f" — did you mean {guess!r}?" if guess else " (DeepSpeed does not read it)"
        return f"deepspeed.{ZERO_OPTIMIZATION}: unknown key {where!r}{hint}"
    return (f"deepspeed.{ZERO_OPTIMIZATION}.{where}: {problem.get('input')!r} is not allowed "
            f"({problem['msg']})")


def zero_stage(ds: dict[str, Any]) -> int | None:
    """The ZeRO stage ``ds`` asks for (0 when it names none); None when its section or stage is malformed
    (which :func:`check_deepspeed_config` reports)."""
    zero = ds.get(ZERO_OPTIMIZATION, {})
    stage = zero.get("stage", 0) if isinstance(zero, dict) else None
    return stage if _is_int(stage) and 0 <= stage <= 3 else None


def loads_universal(ds: dict[str, Any]) -> bool:
    """Whether ``ds`` resumes from a universal checkpoint (``checkpoint.load_universal``)."""
    section = ds.get(ds_constants.CHECKPOINT)
    return isinstance(section, dict) and bool(section.get("load_universal", False))


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def optimizer_errors(ds: dict[str, Any], run: RunConfig, accelerator: str | None = None) -> list[str]:
    """Where ``schedule.optimizer`` cannot run with this DeepSpeed config and accelerator (one line).

    Args:
        accelerator: DeepSpeed's accelerator name (``get_accelerator().device_name()``) where the ranks run,
            when known; None skips the check that needs it.
    """
    choice, offloaded = run.schedule.optimizer, _offloads_optimizer(ds)
    if choice == "cpu_adam" and not offloaded:
        return ["schedule.optimizer: 'cpu_adam' (DeepSpeedCPUAdam) steps optimizer states held in CPU memory; "
                "it needs deepspeed.zero_optimization.offload_optimizer.device 'cpu' (ds_configs/zero3_offload_*"
                ".json); without offload use 'torch' or, on GPUs, 'fused'"]
    if choice == "fused" and offloaded:
        return ["schedule.optimizer: 'fused' (DeepSpeed FusedAdam) runs on the accelerator, but "
                "deepspeed.zero_optimization.offload_optimizer keeps the optimizer states in CPU memory; use "
                "'cpu_adam' (or 'torch')"]
    if choice == "fused" and accelerator == "cpu":
        return ["schedule.optimizer: 'fused' (DeepSpeed FusedAdam) is a GPU kernel and the DeepSpeed "
                "accelerator here is 'cpu'; use 'torch'"]
    return []


def _offloads_optimizer(ds: dict[str, Any]) -> bool:
    """Whether ZeRO-Offload keeps the optimizer states off the accelerator (False for a malformed section,
    which :func:`_zero_errors` reports)."""
    zero = ds.get(ZERO_OPTIMIZATION)
    offload = zero.get("offload_optimizer") if isinstance(zero, dict) else None
    return isinstance(offload, dict) and offload.get("device", "none") not in ("none", None)


# ----------------------------------------------------------------------------------------------- filling


def fill_deepspeed_config(ds: dict[str, Any], run: RunConfig, world_size: int, *,
                          hidden_size: int | None = None) -> dict[str, Any]:
    """Complete a DeepSpeed config from the run: batch sizes, clipping and bf16 given as "auto" or absent,
    and the ZeRO buffer sizes given as "auto" from the model's hidden size (:data:`MODEL_SIZED_KEYS`).

    The optimizer and LR schedule are the trainer's (``schedule.optimizer``, ``schedule.*``). A JSON that
    defines its own, or disagrees on batch sizes, clipping or dtype, is refused by ``check_deepspeed_config``
    first.

    Raises:
        ConfigError: it has model-sized "auto" keys and no ``hidden_size`` is given.
    """
    errors = model_sized_errors(ds, hidden_size)
    if errors:
        raise ConfigError(errors)
    ds = copy.deepcopy(ds)
    sized = model_sized_keys(ds)
    schedule = run.schedule
    ds["train_micro_batch_size_per_gpu"] = schedule.micro_batch_size
    ds["gradient_accumulation_steps"] = schedule.gradient_accumulation_steps
    ds["train_batch_size"] = schedule.micro_batch_size * schedule.gradient_accumulation_steps * world_size
    ds["gradient_clipping"] = schedule.grad_clip
    bf16 = ds.setdefault("bf16", {})
    if bf16.get("enabled", "auto") == "auto":
        bf16["enabled"] = run.model.dtype == "bf16"
    for key in sized:
        ds["zero_optimization"][key] = MODEL_SIZED_KEYS[key](hidden_size)
    # A client torch optimizer needs no compiled op; ZeRO only accepts it when told so, and ZeRO-Offload
    # additionally insists on DeepSpeedCPUAdam unless zero_force_ds_cpu_optimizer is false.
    ds["zero_allow_untested_optimizer"] = True
    if _offloads_optimizer(ds):
        ds.setdefault("zero_force_ds_cpu_optimizer", False)
    return ds


MODEL_SIZED_KEYS: dict[str, Callable[[int], int]] = {
    # The HF Trainer's rules for "auto" (transformers.integrations.HfTrainerDeepSpeedConfig).
    "reduce_bucket_size": lambda hidden: hidden * hidden,
    "stage3_prefetch_bucket_size": lambda hidden: int(0.9 * hidden * hidden),
    "stage3_param_persistence_threshold": lambda hidden: 10 * hidden,
    # About one decoder layer (12-16 hidden^2 in LLaMA/OPT/T5 shapes), at most DeepSpeed's default 1e9: the
    # default keeps every parameter of a model under 1e9 gathered from forward to backward on every rank.
    "stage3_max_live_parameters": lambda hidden: min(16 * hidden * hidden, 10**9),
    "stage3_max_reuse_distance": lambda hidden: min(16 * hidden * hidden, 10**9),
    # The optimizer steps one sub-group at a time, with a flattened fp32 gradient and AdamW's temporaries of
    # that size: DeepSpeed's default 1e9 makes them as large as this rank's whole partition.
    "sub_group_size": lambda hidden: min(16 * hidden * hidden, 10**9),
}
"""ZeRO buffer sizes (elements) a DeepSpeed JSON may give as "auto": hidden size → value."""


def model_sized_keys(ds: dict[str, Any]) -> list[str]:
    """The ``zero_optimization`` keys of ``ds`` that are "auto" and sized from the model."""
    zero = ds.get("zero_optimization", {})
    return [key for key in MODEL_SIZED_KEYS if isinstance(zero, dict) and zero.get(key) == "auto"]


def model_sized_errors(ds: dict[str, Any], hidden_size: int | None) -> list[str]:
    """The model-sized "auto" keys of ``ds`` that cannot be sized, the model's config giving no hidden size
    (checked by ``train``'s set-up through :func:`fill_deepspeed_config`, by ``validate`` with the model)."""
    if hidden_size is not None:
        return []
    return [f"deepspeed.zero_optimization.{key}: \"auto\" needs the model's hidden_size, which its config does "
            "not give; set a number" for key in model_sized_keys(ds)]


def model_hidden_size(model_config) -> int | None:
    """The hidden size the "auto" ZeRO buffer sizes follow (the largest one; a text config's if nested)."""
    for config in (model_config, getattr(model_config, "text_config", None)):
        if getattr(config, "hidden_size", None):
            return int(config.hidden_size)
        if getattr(config, "hidden_sizes", None):
            return int(max(config.hidden_sizes))
    return None
