"""Fine-tune a Hugging Face model with NeuroPrune under DeepSpeed.

Run as ``python -m neuroprune_ds.train --config run.yaml [--deepspeed ds.json] [key=value ...]`` under the
``deepspeed`` launcher, ``torchrun`` or ``srun`` (or alone, as one rank), or as ``neuroprune train``.

The recipe is four steps: :func:`setup` (environment, seed, config, DeepSpeed JSON, tokenizer, data, model,
optimizer, engine, pruner), :func:`train` (the loop, with evaluation on the schedule and at the end),
:func:`evaluate_and_log`, and cleanup in :func:`main`.
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import dataclasses
import functools
import inspect
import json
import logging
import os
import socket
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NoReturn

import datasets
import deepspeed
import torch
import torch.distributed as dist
import transformers
from deepspeed.accelerator import get_accelerator
from tqdm.auto import tqdm
from transformers import (
    AutoConfig,
    get_scheduler,
)
from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

from neuroprune_ds import config as config_module
from neuroprune_ds.arch import auto_model_class, model_task
from neuroprune_ds.checkpoint import CheckpointError, CheckpointManager, output_dir_errors, restore_window
from neuroprune_ds.collectives import all_reduce_sum
from neuroprune_ds.config import RunConfig
from neuroprune_ds.config_loader import (
    ConfigError,
    check_paths,
    load_config,
    save_config,
    warmup_errors,
)
from neuroprune_ds.data import ShardedBatchLoader, TaskData, build_task_data, load_tokenizer, uses_text_to_text
from neuroprune_ds.deepspeed_config import (check_deepspeed_config, fill_deepspeed_config, load_deepspeed_config,
                                            loads_universal, model_hidden_size, model_sized_errors,
                                            model_sized_keys, zero_stage)
from neuroprune_ds.distributed import EXIT_INVALID, EXIT_REQUEUE, barrier_and_exit, setup_distributed_env
from neuroprune_ds.evaluation import evaluate
from neuroprune_ds.finite_guard import NonFiniteError
from neuroprune_ds.logging_utils import MetricsLogger
from neuroprune_ds.preemption import Interrupted

_SCHEDULER_NAMES = {"linear": "linear", "cosine": "cosine", "constant": "constant_with_warmup"}


# ------------------------------------------------------------------------------------------ command line


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The train options (shared by ``python -m neuroprune_ds.train`` and ``neuroprune train``)."""
    parser.add_argument("--config", required=True, metavar="RUN.yaml", help="run config, YAML or JSON")
    parser.add_argument("--deepspeed", metavar="DS.json", help="DeepSpeed JSON (default: the config's 'deepspeed')")
    # The deepspeed launcher passes --local_rank; LOCAL_RANK in the environment says the same.
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides with dotted keys, values in YAML (listed below)")
    parser.epilog = "config keys (key=value overrides or YAML sections):\n" + config_reference()
    parser.formatter_class = argparse.RawDescriptionHelpFormatter


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m neuroprune_ds.train", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    return parser


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse train arguments; ``key=value`` overrides may come before or after the options."""
    parser = build_parser()
    args, extras = parser.parse_known_args(argv)
    if any(extra.startswith("-") or "=" not in extra for extra in extras):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    args.overrides += extras
    return args


def config_reference() -> str:
    """Every configuration field as ``section.key (type, default) — docstring``, from the dataclasses."""
    lines = []
    for path, field, doc in _documented_fields(RunConfig, ""):
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        lines.append(f"  {path}  ({field.type}, default {default!r})")
        lines += [f"      {line}" for line in doc.splitlines()]
    return "\n".join(lines)


def _documented_fields(cls: type, prefix: str):
    docs = _attribute_docstrings(cls)
    for field in dataclasses.fields(cls):
        section = getattr(config_module, str(field.type), None)
        if dataclasses.is_dataclass(section):
            yield from _documented_fields(section, f"{prefix}{field.name}.")
        else:
            yield prefix + field.name, field, docs.get(field.name, "")


def _attribute_docstrings(cls: type) -> dict[str, str]:
    """Field name → the string literal right below its annotation in the class body."""
    body = ast.parse(inspect.getsource(cls)).body[0].body
    docs = {}
    for node, following in zip(body, body[1:]):
        if (isinstance(node, ast.AnnAssign) and isinstance(following, ast.Expr)
                and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str)):
            docs[node.target.id] = inspect.cleandoc(following.value.value)
    return docs


# ------------------------------------------------------------------------------------------------- setup


@dataclasses.dataclass(kw_only=True)
class Session:
    """Everything the loop needs, built by :func:`setup`."""

    run: RunConfig
    engine: Any
    tokenizer: Any
    data: TaskData
    loader: ShardedBatchLoader
    pruner: Any
    logger: MetricsLogger
    rank: int
    world_size: int
    total_steps: int
    zero_stage: int
    partitioned_loading: HfDeepSpeedConfig | None = None
    """Under ZeRO-3, transformers' switch that builds and loads models partitioned; it only acts while it
    is referenced (transformers keeps a weak reference), so the session holds it for the engine's lifetime."""


def setup(args: argparse.Namespace) -> Session:
    """Build the run from parsed arguments (every rank does the same)."""
    started = time.perf_counter()
    timings = {}
    release_freed_host_memory()
    run = load_config(args.config, args.overrides)
    if args.deepspeed:
        run.deepspeed = args.deepspeed
    _raise_if(check_paths(run))
    rank, world_size = init_distributed()
    quiet_other_ranks(rank)
    transformers.set_seed(run.schedule.seed)
    ds_config = prepare_deepspeed_config(run, world_size)
    timings["setup/distributed_s"] = time.perf_counter() - started

    tokenizer = load_tokenizer(run.model)
    model_config = functools.cache(lambda: load_model_config(run))  # ~13 s from a GGUF file: only when needed
    _raise_if(run_errors(run, ds_config, model_config, world_size))
    text_to_text = run.task == "classification" and uses_text_to_text(run.task, model_config().model_type)
    with node_leader_first(rank, world_size):
        data = build_task_data(run, tokenizer, text_to_text=text_to_text)
    loader = ShardedBatchLoader(
        data.train, data.collate, batch_size=run.schedule.micro_batch_size, rank=rank, world_size=world_size,
        seed=run.schedule.seed, batches_multiple_of=run.schedule.gradient_accumulation_steps,
    )
    steps_per_epoch = len(loader) // run.schedule.gradient_accumulation_steps
    total_steps = run.schedule.max_steps or run.schedule.epochs * steps_per_epoch
    _raise_if(warmup_errors(run.schedule, total_steps))
    timings["setup/data_s"] = time.perf_counter() - started - sum(timings.values())

    partitioned = partitioned_loading(ds_config)
    engine = build_engine(run, tokenizer, ds_config, total_steps=total_steps)
    timings["setup/engine_s"] = time.perf_counter() - started - sum(timings.values())
    pruner = None
    if run.neuroprune.enabled:
        from neuroprune_ds.pruner import NeuroPruner

        pruner = NeuroPruner(engine, run.neuroprune)
        pruner.total_steps = total_steps
    timings["setup/pruner_s"] = time.perf_counter() - started - sum(timings.values())

    logger = MetricsLogger(run.output_dir, enabled=rank == 0)
    if rank == 0:
        save_config(run, Path(run.output_dir) / "run_config.yaml")
        Path(run.output_dir, "ds_config.json").write_text(json.dumps(ds_config, indent=2))
    logger.log(0, timings, kind="setup")
    return Session(
        run=run, engine=engine, tokenizer=tokenizer, data=data, loader=loader, pruner=pruner, logger=logger,
        rank=rank, world_size=world_size, total_steps=total_steps, zero_stage=engine.zero_optimization_stage(),
        partitioned_loading=partitioned,
    )


def run_errors(run: RunConfig, ds_config: dict[str, Any] | None, model_config: Callable[[], Any],
               world_size: int | None) -> list[str]:
    """Checks of the run against its model and output_dir, before anything is loaded or written (what
    ``neuroprune validate`` checks too).

    Args:
        run: the validated run configuration.
        ds_config: its DeepSpeed config; None when it could not be read (checkpoints are then not checked
            against its ZeRO stage; neither are they when that stage is malformed).
        model_config: returns the model's HF config; called only by checks that need it.
        world_size: the number of ranks, when known (a checkpoint of another world size is refused).
    """
    errors = []
    if run.task == "seq2seq" and not model_config().is_encoder_decoder:
        errors.append(f"task: 'seq2seq' needs an encoder-decoder model (T5, BART); {run.model.name_or_path!r} is "
                      f"a decoder-only {model_config().model_type!r}: use task: causal_lm for it")
    if ds_config is not None and model_sized_keys(ds_config):
        errors += model_sized_errors(ds_config, model_hidden_size(model_config()))
    stage = None if ds_config is None else zero_stage(ds_config)
    load_universal = ds_config is not None and loads_universal(ds_config)
    return errors + output_dir_errors(run, zero_stage=stage, load_universal=load_universal,
                                      read_model_config=model_config, world_size=world_size)


def _raise_if(errors: list[str]) -> None:
    if errors:
        raise ConfigError(errors)


def release_freed_host_memory() -> None:
    """Make glibc's malloc return freed blocks of 1 MiB and more to the system at once.

    By default glibc serves blocks below its mmap threshold from heaps it rarely gives back, and raises the
    threshold (up to 32 MiB) whenever a larger block is freed; ZeRO-3's stream of gathered parameters,
    gradients and optimizer temporaries then leaves host RSS far above what is in use (docs/memory.md).
    Fixed thresholds turn that off. Settings given through MALLOC_MMAP_THRESHOLD_ / MALLOC_TRIM_THRESHOLD_
    win; without glibc (another libc, or jemalloc/tcmalloc preloaded) this changes nothing.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    for option, variable in ((_M_MMAP_THRESHOLD, "MALLOC_MMAP_THRESHOLD_"), (_M_TRIM_THRESHOLD, "MALLOC_TRIM_THRESHOLD_")):
        if variable not in os.environ:
            libc.mallopt(option, 1 << 20)


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h


def prepare_deepspeed_config(run: RunConfig, world_size: int) -> dict[str, Any]:
    """Read ``run.deepspeed``, cross-check it against the run, and fill in what the trainer decides."""
    ds_config = load_deepspeed_config(run.deepspeed)
    _raise_if(check_deepspeed_config(ds_config, run, world_size, get_accelerator().device_name()))
    hidden_size = model_hidden_size(load_model_config(run)) if model_sized_keys(ds_config) else None
    return fill_deepspeed_config(ds_config, run, world_size, hidden_size=hidden_size)


def partitioned_loading(ds_config: dict[str, Any]) -> HfDeepSpeedConfig | None:
    """Under ZeRO-3, make transformers build and load models partitioned (inside ``deepspeed.zero.Init``).

    Without it every rank would load the whole model before ``deepspeed.initialize`` partitions it. The
    returned object must stay referenced while models are loaded and the engine lives. At other stages any
    such switch left by an earlier run in this process is cleared.
    """
    if ds_config.get("zero_optimization", {}).get("stage", 0) == 3:
        return HfDeepSpeedConfig(ds_config)
    unset_hf_deepspeed_config()
    return None


def build_engine(run: RunConfig, tokenizer, ds_config: dict[str, Any], *, total_steps: int):
    """Model, AdamW and LR schedule wrapped by ``deepspeed.initialize``; returns the engine."""
    model = load_model(run, tokenizer)
    if run.model.gradient_checkpointing:
        enable_activation_checkpointing(model)
    optimizer = build_optimizer(model, run)
    scheduler = get_scheduler(_SCHEDULER_NAMES[run.schedule.lr_scheduler], optimizer,
                              num_warmup_steps=run.schedule.warmup_steps, num_training_steps=total_steps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
    return engine


def init_distributed() -> tuple[int, int]:
    """Join the process group described by the environment (see :func:`setup_distributed_env`) and bind this
    process to device LOCAL_RANK of those it sees, before the first collective (NCCL runs on that device)."""
    deepspeed.init_distributed()
    get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
    rank, world_size = dist.get_rank(), dist.get_world_size()
    release_shm_allreduce_buffer(rank, world_size)
    return rank, world_size


def release_shm_allreduce_buffer(rank: int, world_size: int) -> None:
    """Unlink the /dev/shm file of DeepSpeed's CPU shared-memory all-reduce once every rank has mapped it.

    When all ranks share one node (the deepspeed launcher's LOCAL_SIZE equals the world size), DeepSpeed 0.19
    creates ``/dev/shm/deepspeed_allreduce_buffer_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>`` (66 MB) per rank
    and never unlinks it, so every run leaked them. After the barrier every rank has mapped every buffer;
    the mappings outlive the name. The deepspeed-launcher test pins the file name.
    """
    if world_size > 1:
        dist.barrier()
    name = (f"deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR', '')}_"
            f"{os.environ.get('MASTER_PORT', '')}_{rank}")
    Path("/dev/shm", name).unlink(missing_ok=True)


def quiet_other_ranks(rank: int) -> None:
    """Rank 0 reports progress; the others log errors only. DeepSpeed's INFO chatter is off everywhere."""
    deepspeed.utils.logger.setLevel(logging.WARNING)
    if rank != 0:
        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        datasets.logging.set_verbosity_error()
        datasets.disable_progress_bars()


class node_leader_first:
    """Context: the first rank of every node runs the block first, filling the datasets cache that the node
    reads (shared between nodes or node-local), then the node's other ranks run it and reuse that cache
    instead of tokenizing again. Leaders of different nodes work at the same time (datasets writes each cache
    file under a temporary name and renames it, so a shared cache stays consistent); the others wait in one
    barrier.

    A node is a host name, gathered from every rank (collective): ``LOCAL_RANK`` cannot tell, since under
    SLURM's ``--gpus-per-task=1`` every task has ``LOCAL_RANK`` 0 (each sees only its own GPU)."""

    def __init__(self, rank: int, world_size: int, local_rank: int | None = None):
        self.wait = world_size > 1
        if local_rank is None:
            local_rank = _rank_among_its_host(rank, world_size)
        self.leader = local_rank == 0

    def __enter__(self):
        if self.wait and not self.leader:
            dist.barrier()

    def __exit__(self, *exc):
        if self.wait and self.leader and exc[0] is None:
            dist.barrier()
        return False


def _rank_among_its_host(rank: int, world_size: int) -> int:
    """How many lower ranks run on this rank's host (collective when world_size > 1)."""
    if world_size == 1:
        return 0
    hosts = [None] * world_size
    dist.all_gather_object(hosts, socket.gethostname())
    return hosts[:rank].count(hosts[rank])


def load_model_config(run: RunConfig):
    """The model's HF config (only its metadata is read, also from a GGUF file; read once per process)."""
    try:
        return _read_model_config(run.model.name_or_path, run.model.gguf_file, run.model.trust_remote_code)
    except OSError as err:
        raise _cannot_load_model(run, err) from err


@functools.lru_cache(maxsize=4)
def _read_model_config(name_or_path: str, gguf_file: str | None, trust_remote_code: bool):
    # Reading a config from a GGUF file takes ~13 s; setup needs it twice (buffer sizes, task head).
    return AutoConfig.from_pretrained(name_or_path, gguf_file=gguf_file, trust_remote_code=trust_remote_code)


def _cannot_load_model(run: RunConfig, err: OSError) -> OSError:
    return OSError(f"cannot load model.name_or_path={run.model.name_or_path!r} (a local directory, or a hub name "
                   f"with the hub reachable): {err}")


def load_model(run: RunConfig, tokenizer) -> torch.nn.Module:
    """The pretrained model with the task's head, in the training dtype.

    Under ZeRO-3 (see :func:`partitioned_loading`) it comes back partitioned: each rank holds its share of
    every parameter (``param.ds_tensor``), never the whole model.
    """
    dtype = torch.bfloat16 if run.model.dtype == "bf16" else torch.float32
    kwargs: dict[str, Any] = {"gguf_file": run.model.gguf_file, "trust_remote_code": run.model.trust_remote_code,
                              "dtype": dtype}
    model_type = load_model_config(run).model_type
    if model_task(run.task, model_type) == "classification":
        kwargs["num_labels"] = run.num_labels
    try:
        model = auto_model_class(run.task, model_type).from_pretrained(run.model.name_or_path, **kwargs)
    except OSError as err:
        raise _cannot_load_model(run, err) from err
    if model.config.pad_token_id is None:
        # Sequence classification of decoder models finds the last real token through the pad id.
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each layer's activations in the backward pass (``model.gradient_checkpointing``).

    Non-reentrant checkpointing recomputes through ZeRO-3's parameter hooks and needs no input that requires a
    gradient. In a checkpointed training forward transformers drops the KV cache itself; evaluation and
    generation (no gradients) keep it.

    Raises:
        ConfigError: the model's class does not support it.
    """
    if not model.supports_gradient_checkpointing:
        raise ConfigError([f"model.gradient_checkpointing: {type(model).__name__} does not support activation "
                           "checkpointing; set it to false"])
    # The name every transformers 5.x has (5.24 adds activation_checkpointing_enable and warns on this one).
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_optimizer(model: torch.nn.Module, run: RunConfig) -> torch.optim.Optimizer:
    """AdamW as ``schedule.optimizer`` chooses: torch's (nothing to compile), DeepSpeed's FusedAdam (GPU) or
    DeepSpeedCPUAdam (ZeRO-Offload). Biases and norm weights (1-D tensors) get no weight decay; under ZeRO-3
    the dimensions are those of the whole parameter (``ds_shape``), not of this rank's empty placeholder."""
    def dims(param: torch.nn.Parameter) -> int:
        return len(getattr(param, "ds_shape", param.shape))

    decay = [p for p in model.parameters() if p.requires_grad and dims(p) >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and dims(p) < 2]
    groups = [{"params": decay, "weight_decay": run.schedule.weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    if run.schedule.optimizer == "fused":
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(groups, lr=run.schedule.lr, adam_w_mode=True)
    if run.schedule.optimizer == "cpu_adam":
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, lr=run.schedule.lr, adamw_mode=True)
    return torch.optim.AdamW(groups, lr=run.schedule.lr)


# -------------------------------------------------------------------------------------------------- loop


def train(session: Session, checkpoints: CheckpointManager, resumed=None) -> dict[str, float] | None:
    """Run optimizer steps up to ``total_steps``; returns the final evaluation metrics, or None when a
    preemption signal stopped the run (after checkpointing)."""
    run, engine, pruner, loader = session.run, session.engine, session.pruner, session.loader
    schedule = run.schedule
    progress = tqdm(total=session.total_steps, initial=engine.global_steps, disable=session.rank != 0,
                    desc="train", unit="step", dynamic_ncols=True)
    window = _Window()
    engine.train()
    if resumed is not None:
        restore_window(window, resumed.window)
        if resumed.pending_eval and resumed.step < session.total_steps and not _evaluate(session, checkpoints, window):
            return None
    while engine.global_steps < session.total_steps:
        for batch in loader:
            batch = {key: value.to(engine.device) for key, value in batch.items()}
            loss = engine(**batch).loss
            engine.backward(loss)
            if pruner is not None:
                pruner.after_backward()
            checkpoints.guard.observe(loss)
            step_before = engine.global_steps
            engine.step()
            checkpoints.guard.after_step()
            if pruner is not None:
                pruner.after_step(should_stop=checkpoints.preemption.agreed)
            window.add(loss.item(), _count_tokens(batch))
            if engine.global_steps == step_before:
                continue
            step = engine.global_steps
            progress.update(1)
            if loader.batch_index == len(loader) and pruner is not None:
                pruner.on_epoch_end(should_stop=checkpoints.preemption.agreed)
            if step % schedule.log_every_steps == 0 or step == session.total_steps:
                metrics = log_train_step(session, window, step)
                progress.set_postfix(loss=f"{metrics['train/loss']:.4f}")
            if step == session.total_steps:
                break
            if schedule.eval_every_steps and step % schedule.eval_every_steps == 0:
                if not _evaluate(session, checkpoints, window):
                    return None
            if checkpoints.after_step(step, window):
                return None
    progress.close()
    metrics = _evaluate(session, checkpoints, window)
    if metrics is not None:
        checkpoints.save(engine.global_steps, window)
    return metrics


def _evaluate(session: Session, checkpoints: CheckpointManager, window: "_Window") -> dict[str, float] | None:
    """Evaluate and log at the current step; on a preemption signal checkpoint instead and return None."""
    eval_started = time.perf_counter()
    try:
        metrics = evaluate_and_log(session, session.engine.global_steps, should_stop=checkpoints.preemption.check)
    except Interrupted:
        checkpoints.save(session.engine.global_steps, window, pending_eval=True)
        return None
    window.start += time.perf_counter() - eval_started  # tokens/s measures training only
    return metrics


class _Window:
    """Losses and token counts of this rank since the last logged step."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.loss_sum, self.micro_batches, self.tokens, self.start = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, tokens: int):
        self.loss_sum += loss
        self.micro_batches += 1
        self.tokens += tokens


def _count_tokens(batch: dict[str, torch.Tensor]) -> int:
    mask = batch.get("attention_mask")
    return int(mask.sum()) if mask is not None else batch["input_ids"].numel()


def log_train_step(session: Session, window: _Window, step: int) -> dict[str, float]:
    """Average the window across ranks and log loss, lr, grad norm, tokens/s and the pruner's metrics (collective).

    tokens/s counts non-padding input tokens of all ranks (encoder inputs for seq2seq) over wall time.
    """
    device = session.engine.device
    (totals,) = all_reduce_sum([torch.tensor([window.loss_sum, window.micro_batches, window.tokens],
                                             dtype=torch.float64, device=device)], device)
    elapsed = time.perf_counter() - window.start
    metrics = {
        "train/loss": float(totals[0] / totals[1]),
        "train/lr": float(session.engine.get_lr()[0]),
        "train/tokens_per_s": float(totals[2] / elapsed),
        "train/epoch": step / (len(session.loader) // session.run.schedule.gradient_accumulation_steps),
    }
    grad_norm = session.engine.get_global_grad_norm()  # of the last step, before clipping; None if not computed
    if grad_norm is not None:
        metrics["train/grad_norm"] = float(grad_norm)
    if session.pruner is not None:
        metrics |= session.pruner.metrics()
    session.logger.log(step, metrics, kind="train")
    window.reset()
    return metrics


def evaluate_and_log(session: Session, step: int, should_stop=None) -> dict[str, float]:
    """Evaluate (all ranks), then log the metrics, the heads-kept heatmap and FFN-degree histograms.

    ``should_stop`` is called before every evaluation batch and may raise to abandon the evaluation.
    """
    run = session.run
    max_new_tokens = run.data.max_target_length
    metrics = evaluate(
        session.engine, session.data, session.tokenizer, batch_size=run.schedule.micro_batch_size,
        max_new_tokens=max_new_tokens, rank=session.rank, world_size=session.world_size,
        synced_generation=session.zero_stage == 3 and session.world_size > 1, should_stop=should_stop,
    )
    if session.pruner is not None:
        summary = session.pruner.summary()
        degrees = session.pruner.ffn_degrees()
        session.logger.log_heads_kept(step, summary)
        session.logger.log_ffn_degrees(step, degrees)
        if session.rank == 0:
            Path(run.output_dir, "neuroprune_summary.json").write_text(json.dumps(summary, indent=1))
    session.logger.log(step, metrics, kind="eval")
    if session.rank == 0:
        tqdm.write(f"step {step}: " + ", ".join(f"{k}={v:.4g}" for k, v in metrics.items()))
    return metrics


# ------------------------------------------------------------------------------------------------- entry


DEBUG_ENV = "NEUROPRUNE_DEBUG"


def run_training(args: argparse.Namespace) -> int:
    """Set up, train and close the logger; returns the exit status (:data:`EXIT_INVALID` for user errors).

    An error of set-up that the user must fix (ValueError: config, data, checkpoint choice; OSError: a path)
    is printed as one line; ``NEUROPRUNE_DEBUG=1`` adds the traceback.
    """
    try:
        session = setup(args)
        checkpoints = CheckpointManager(session)
        resumed = checkpoints.resume()
    except (ValueError, OSError, CheckpointError) as err:
        if os.environ.get(DEBUG_ENV, "0") not in ("", "0"):
            traceback.print_exc()
        print(f"{args.config}: {_user_message(err)}", file=sys.stderr)
        return EXIT_INVALID
    checkpoints.preemption.install()
    try:
        metrics = train(session, checkpoints, resumed)
    except NonFiniteError as err:  # raised on every rank at the same step
        print(f"error: {err}", file=sys.stderr)
        return 1
    finally:
        checkpoints.preemption.uninstall()
        session.logger.close()
    return 0 if metrics is not None else EXIT_REQUEUE


def _user_message(err: Exception) -> str:
    if isinstance(err, (ConfigError, CheckpointError)):
        return str(err)
    return f"error: {' '.join(str(err).split())} ({DEBUG_ENV}=1 shows the traceback)"


def main(argv: Sequence[str] | None = None) -> NoReturn:
    """Process entry point of ``python -m neuroprune_ds.train``."""
    run_and_exit(parse_args(argv))


def run_and_exit(args: argparse.Namespace) -> NoReturn:
    """Map the launcher's environment, train, then leave through a barrier so every rank exits together."""
    added = setup_distributed_env()
    if "OMP_NUM_THREADS" in added:  # torch read the variable when it was imported, before it was set
        torch.set_num_threads(int(added["OMP_NUM_THREADS"]))
    try:
        code = run_training(args)
    except Exception:  # noqa: BLE001 - reported, then the process exits non-zero
        traceback.print_exc()
        barrier_and_exit(1, barrier=False)  # the other ranks may be stuck in a collective
    # A rank that refused its input must not wait for ranks that may be stuck in a collective.
    barrier_and_exit(code, barrier=code != EXIT_INVALID)


if __name__ == "__main__":
    main()
