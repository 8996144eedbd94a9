"""NeuroPrune in a transformers ``Trainer`` or an accelerate loop running under DeepSpeed (ZeRO 0-3).

One line in an existing Trainer script::

    trainer = Trainer(model=model, args=TrainingArguments(..., deepspeed="ds_config.json"), ...)
    add_neuroprune(trainer, NeuroPruneConfig(mlp_lambda=1e-5, attn_lambda=1e-5))
    trainer.train()

and one line after ``accelerator.prepare`` in an accelerate loop (the loop itself is unchanged)::

    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    pruner = attach_neuroprune(model, config)  # model is the DeepSpeed engine here

Where the penalty goes. :class:`~neuroprune_ds.pruner.NeuroPruner` must run between ``engine.backward`` (the
gradients are reduced into this rank's shards) and ``engine.step`` (clipping and the optimizer). Neither the
Trainer nor accelerate stops at that point under DeepSpeed: ``Trainer.training_step`` calls
``accelerator.backward(loss)``, whose ``DeepSpeedEngineWrapper.backward`` calls ``engine.backward(loss)`` and,
at an accumulation boundary, ``engine.step()`` in one function. The Trainer's own ``optimizer.step()`` is a
no-op (``DeepSpeedOptimizerWrapper.step``), so ``on_pre_optimizer_step``/``on_optimizer_step`` callbacks run
after the update is already applied. The seams considered:

- a ``TrainerCallback`` alone: no callback event falls between backward and step (above);
- overriding ``Trainer.training_step``: copies its body (context parallelism, loss scaling, LOMO), drifts with
  every transformers release, and does nothing for accelerate loops;
- replacing accelerate's ``DeepSpeedEngineWrapper``: copies its body (boundary, backward, step) and depends
  on ``accelerator.deepspeed_engine_wrapped``, an internal attribute;
- **wrapping** ``step`` **of the one engine instance** (chosen): ``engine.step`` is DeepSpeed's public API and
  the exact contract under which the pruner is proved equal to the single-process reference
  (``tests/test_zero_equivalence.py``). Nothing runs between ``engine.backward`` and ``engine.step``, so
  calling ``after_backward()`` first thing in ``step`` is the same as calling it right after backward,
  whoever drives the engine: the Trainer, an accelerate loop, or a hand-written one. The accumulation
  boundary is already decided when ``step`` starts (accelerate sets it before backward; otherwise DeepSpeed's
  micro-step counter, which ``step`` advances at its end), and the pruner acts only at it. The wrapper is an
  attribute of this engine instance, removed at the end of training; the class and other engines are
  untouched.

The callback does the rest at Trainer events: it binds the pruner once the engine exists (``on_train_begin``,
after ``accelerator.prepare``), prunes heads at epoch ends, adds the pruner's metrics to the Trainer's logs,
and saves/restores the masks with the Trainer's checkpoints.

Multiple ranks on CPU. accelerate decides its world size from the backend it detects; on a machine without
GPUs it detects none in DeepSpeed mode and reports 1 process on every rank (no data split, ``gather`` fails).
Naming the backend fixes it: :func:`init_deepspeed_cpu_state` (Trainer) or
``Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])`` (accelerate loops).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
import torch.distributed as dist
from accelerate import PartialState
from deepspeed import DeepSpeedEngine
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.pruner import NeuroPruner

logger = logging.getLogger(__name__)

PRUNER_STATE_FILE = "neuroprune_pruner.pt"


def attach_neuroprune(engine: DeepSpeedEngine, config: NeuroPruneConfig) -> NeuroPruner:
    """Bind a NeuroPruner to ``engine.step``, so that every call of it applies NeuroPrune.

    From then on ``engine.step()`` runs ``after_backward()``, the step, and ``after_step()``; a training loop
    that calls ``engine.backward`` and ``engine.step`` (directly or through accelerate) needs no other change.
    Epoch-end head pruning (``prune_every_steps`` = 0) still needs ``pruner.on_epoch_end()`` from the loop.

    Args:
        engine: a ``DeepSpeedEngine`` (what ``deepspeed.initialize`` and ``accelerator.prepare`` return).
        config: the NeuroPrune settings.

    Returns:
        The pruner (metrics, summary, state_dict).

    Raises:
        ValueError: ``engine`` is not a DeepSpeed engine, NeuroPrune is already attached to it, DeepSpeed's
            gradient accumulation is unmanaged (gradients are only reduced inside ``step``), or the model is
            not supported by the pruner.
    """
    if not isinstance(engine, DeepSpeedEngine):
        raise ValueError(f"NeuroPrune needs a DeepSpeedEngine, got {type(engine).__name__}: run under DeepSpeed "
                         "(TrainingArguments(deepspeed=...), or accelerate with its DeepSpeed plugin)")
    if "step" in vars(engine):
        raise ValueError("NeuroPrune is already attached to this engine")
    if not engine.managed_gradient_accumulation():
        raise ValueError("NeuroPrune needs DeepSpeed's managed gradient accumulation (the default): with "
                         "managed_gradient_accumulation=false the gradients are reduced inside engine.step, "
                         "after the point where the penalty must be added")
    pruner = NeuroPruner(engine, config)
    engine_step = engine.step

    def step_with_neuroprune(*args, **kwargs):
        pruner.after_backward()
        result = engine_step(*args, **kwargs)
        pruner.after_step()
        return result

    engine.step = step_with_neuroprune
    return pruner


def detach_neuroprune(engine: DeepSpeedEngine) -> None:
    """Undo :func:`attach_neuroprune`: ``engine.step`` is DeepSpeed's again."""
    vars(engine).pop("step", None)


def init_deepspeed_cpu_state(backend: str = "gloo") -> PartialState:
    """Set up accelerate's distributed state for DeepSpeed on CPU with the true world size.

    Call it first thing in the script, then pass ``accelerator_config={"use_configured_state": True}`` to
    ``TrainingArguments``. Without it, on a machine without GPUs, accelerate finds no backend in DeepSpeed
    mode and reports ``num_processes == 1`` and ``process_index == 0`` on every rank (the Trainer then feeds
    every rank the same batches and every rank acts as the main process). Not needed on GPUs. accelerate
    then allows one DeepSpeed ``Accelerator``, so one such Trainer, per process.

    Args:
        backend: the ``torch.distributed`` backend DeepSpeed uses on CPU.

    Returns:
        The initialised ``PartialState`` (the Trainer's Accelerator reuses it).
    """
    previous = os.environ.get("ACCELERATE_USE_DEEPSPEED")
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    try:
        return PartialState(backend=backend)
    finally:
        if previous is None:
            del os.environ["ACCELERATE_USE_DEEPSPEED"]
        else:
            os.environ["ACCELERATE_USE_DEEPSPEED"] = previous


class NeuroPruneCallback(TrainerCallback):
    """NeuroPrune's penalties, masks and head pruning for a ``Trainer`` running under DeepSpeed.

    Use :func:`add_neuroprune`. After ``train()`` starts, ``pruner`` is the bound
    :class:`~neuroprune_ds.pruner.NeuroPruner`. Logging steps add the pruner's metrics (sparsity, heads kept,
    FFN units alive, penalties) to the Trainer's logs; checkpoints get the masks in ``neuroprune_pruner.pt``,
    restored when training resumes from a checkpoint in ``args.output_dir`` or from
    ``args.resume_from_checkpoint``.

    Args:
        trainer: the Trainer; its ``args.deepspeed`` must be set.
        config: the NeuroPrune settings.
    """

    def __init__(self, trainer: Trainer, config: NeuroPruneConfig):
        self.trainer = trainer
        self.config = config
        self.pruner: NeuroPruner | None = None
        self._metrics_to_log: dict[str, float] | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        _warn_on_world_size_mismatch(self.trainer)
        previous = self.pruner.state_dict() if self.pruner is not None else None
        self.pruner = attach_neuroprune(self.trainer.model_wrapped, self.config)
        self.pruner.total_steps = state.max_steps
        if state.global_step > 0:
            self.pruner.load_state_dict(torch.load(self._resumed_state_file(args, state.global_step)))
        elif previous is not None:  # a second train() call builds a new engine: keep the masks
            self.pruner.load_state_dict(previous)

    def on_epoch_end(self, args, state, control, **kwargs):
        self.pruner.on_epoch_end()

    def on_step_end(self, args, state, control, **kwargs):
        if control.should_log:  # the same decision on every rank; metrics() is collective
            self._metrics_to_log = self.pruner.metrics()

    def on_log(self, args, state, control, logs=None, **kwargs):
        # Logged as an entry of its own right after the Trainer's: the reporting callbacks (TensorBoard,
        # W&B...) run before this one, so adding to ``logs`` here would reach only the log history.
        if self._metrics_to_log is not None:
            metrics, self._metrics_to_log = self._metrics_to_log, None
            self.trainer.log(metrics)

    def on_save(self, args, state, control, **kwargs):
        # Masks and schedule are identical on every rank; rank 0 writes them (accelerate's "main process" is
        # not trusted here: on CPU it can be every rank, see init_deepspeed_cpu_state).
        if not dist.is_initialized() or dist.get_rank() == 0:
            folder = Path(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
            torch.save(self.pruner.state_dict(), folder / PRUNER_STATE_FILE)

    def on_train_end(self, args, state, control, **kwargs):
        detach_neuroprune(self.trainer.model_wrapped)

    @staticmethod
    def _resumed_state_file(args, global_step: int) -> Path:
        candidates = [Path(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{global_step}", PRUNER_STATE_FILE)]
        if isinstance(args.resume_from_checkpoint, str):
            candidates.insert(0, Path(args.resume_from_checkpoint, PRUNER_STATE_FILE))
        for candidate in candidates:
            if candidate.is_file():
                return candidate
        raise ValueError(f"resuming at step {global_step}, but no NeuroPrune state is at "
                         f"{' or '.join(map(str, candidates))}: without it the pruned heads' masks are lost. "
                         "Resume from a checkpoint saved with NeuroPrune, in output_dir or named by "
                         "TrainingArguments.resume_from_checkpoint")


def add_neuroprune(trainer: Trainer, config: NeuroPruneConfig) -> NeuroPruneCallback:
    """Apply NeuroPrune in ``trainer``'s training; call before ``trainer.train()``.

    Args:
        trainer: a ``transformers.Trainer`` (or subclass) whose ``TrainingArguments`` name a DeepSpeed config.
        config: the NeuroPrune settings.

    Returns:
        The callback; its ``pruner`` attribute is set once training starts.

    Raises:
        ValueError: the Trainer does not run under DeepSpeed.
    """
    if not trainer.is_deepspeed_enabled:
        raise ValueError("NeuroPrune's Trainer integration runs under DeepSpeed: set TrainingArguments(deepspeed="
                         "'ds_config.json') (any ZeRO stage 0-3)")
    callback = NeuroPruneCallback(trainer, config)
    trainer.add_callback(callback)
    return callback


def _warn_on_world_size_mismatch(trainer: Trainer) -> None:
    if dist.is_initialized() and trainer.accelerator.num_processes != dist.get_world_size():
        logger.warning(
            "accelerate counts %d process(es) but torch.distributed has %d ranks: every rank gets the same "
            "batches and acts as the main process. On CPU, call neuroprune_ds.hf_trainer."
            "init_deepspeed_cpu_state() first and pass TrainingArguments(accelerator_config="
            "{'use_configured_state': True})", trainer.accelerator.num_processes, dist.get_world_size())
