"""Checkpoints the trainer can trust: on a schedule, at the end and on preemption; atomic; exact to resume.

Layout (the exporter, :mod:`neuroprune_ds.export.checkpoint`, reads the same)::

    <output_dir>/checkpoints/
        config.json, tokenizer files   the model's HF config and tokenizer, written by rank 0 at a run's first save
        step_<N>/                      what ``engine.save_checkpoint(dir, tag="step_<N>", client_state=...)`` writes
        step_<N>/complete              written LAST by rank 0, after a barrier: every rank's files are on disk
        latest                         names the newest complete tag; replaced atomically (rename) by rank 0

A tag without ``complete`` is a save that died half-way (a rank killed, a node lost): resume never looks
at it, ``latest`` never names it, and the next save of that step replaces it.

The client state holds, besides DeepSpeed's own module/optimizer/LR-scheduler state:
``neuroprune`` (the pruner's masks and schedule), ``neuroprune_config``, ``model`` (name, task, labels) and
``resume``: the data position, every rank's RNG states (torch, python, numpy) and unlogged loss window, the
world size, the metrics logged so far and whether an evaluation was interrupted.

The manager also owns the run's :class:`~neuroprune_ds.preemption.Preemption` (a save on a signal, every
rank at the same step) and :class:`~neuroprune_ds.finite_guard.FiniteGuard` (nothing of a non-finite state
is saved), which the training loop asks at every step.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuroprune_ds.collectives import all_gather_object, barrier, broadcast_object
from neuroprune_ds.finite_guard import FiniteGuard
from neuroprune_ds.preemption import Preemption

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
COMPLETE = "complete"
_TAG = re.compile(r"step_(\d+)")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be resumed as asked; the message says what to do instead."""


# --------------------------------------------------------------------------------------- rank state


def rng_state() -> dict[str, Any]:
    """This process's RNG states: torch (CPU and, when present, CUDA), python ``random`` and numpy."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _window_state(window) -> dict[str, float] | None:
    if window is None:
        return None
    return {"loss_sum": window.loss_sum, "micro_batches": window.micro_batches, "tokens": window.tokens}


def restore_window(window, state: dict[str, float] | None) -> None:
    if state:
        window.loss_sum, window.micro_batches, window.tokens = (state["loss_sum"], state["micro_batches"],
                                                                state["tokens"])


# ------------------------------------------------------------------------------------------ on disk


def tag_for(step: int) -> str:
    return f"step_{step}"


def tag_step(tag: str) -> int | None:
    match = _TAG.fullmatch(tag)
    return int(match.group(1)) if match else None


def is_complete(tag_dir: Path) -> bool:
    """Whether every rank finished writing this tag (its ``complete`` marker exists)."""
    return (tag_dir / COMPLETE).is_file()


def complete_tags(ckpt_dir: Path) -> list[str]:
    """Complete ``step_<N>`` tags, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and tag_step(p.name) is not None and is_complete(p)]
    return sorted(tags, key=tag_step)


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file, fsync it, rename it over ``path``, fsync the directory."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def find_resume_tag(ckpt_dir: Path) -> str | None:
    """The tag ``latest`` names if it is complete, else the newest complete tag, else None."""
    latest = ckpt_dir / LATEST
    if latest.is_file():
        tag = latest.read_text().strip()
        if is_complete(ckpt_dir / tag):
            return tag
        log.warning("%s names %r, which is not a complete checkpoint; using the newest complete one", latest, tag)
    tags = complete_tags(ckpt_dir)
    return tags[-1] if tags else None


def universal_command(tag_dir: Path, zero_stage: int) -> str:
    """The command that converts a ZeRO checkpoint into DeepSpeed's world-size independent form."""
    inject = " --inject_missing_state" if zero_stage == 2 else ""
    return (f"python -m deepspeed.checkpoint.ds_to_universal --input_folder {tag_dir} "
            f"--output_folder {tag_dir}_universal{inject}")


def _is_universal(tag_dir: Path) -> bool:
    return (tag_dir / "zero").is_dir()


def choose_resume(resume: str, ckpt_dir: Path) -> str | None | CheckpointError:
    """The tag directory ``checkpoint.resume`` selects, None for a fresh start, or the error to raise."""
    if resume == "never":
        return None
    if resume == "auto":
        tag = find_resume_tag(ckpt_dir)
        return str(ckpt_dir / tag) if tag else None
    path = Path(resume)
    if (path / LATEST).is_file() or complete_tags(path):
        tag = find_resume_tag(path)
        if tag is None:
            return CheckpointError(f"checkpoint.resume={resume}: no complete checkpoint in it")
        return str(path / tag)
    if is_complete(path) or _is_universal(path):
        return str(path)
    others = ", ".join(complete_tags(path.parent)) or "none"
    return CheckpointError(f"checkpoint.resume={resume}: not a complete checkpoint (no '{COMPLETE}' marker: "
                           f"its save was interrupted); complete tags beside it: {others}")


# HF config fields that set parameter shapes in the supported families (LLaMA, OPT, BART, T5, BERT).
_SHAPE_FIELDS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                 "num_attention_heads", "num_key_value_heads", "head_dim", "ffn_dim", "word_embed_proj_dim",
                 "max_position_embeddings", "d_model", "d_ff", "d_kv", "num_layers", "num_decoder_layers",
                 "num_heads", "encoder_layers", "decoder_layers", "encoder_ffn_dim", "decoder_ffn_dim",
                 "encoder_attention_heads", "decoder_attention_heads")


def _shape_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    return [f"{key} {saved[key]!r} there, {current[key]!r} here" for key in _SHAPE_FIELDS
            if key in saved and key in current and saved[key] != current[key]]


def output_dir_errors(run, *, zero_stage: int | None, load_universal: bool, read_model_config,
                      world_size: int | None) -> list[str]:
    """What makes a run's output_dir or ``checkpoint.resume`` unusable, found before anything is written.

    Args:
        run: the run configuration (output_dir, checkpoint.resume).
        zero_stage: the ZeRO stage of this run's DeepSpeed config; None: unknown (not checked).
        load_universal: whether the DeepSpeed config loads universal checkpoints (any stage, any world size).
        read_model_config: returns this run's HF model config; called only when a checkpoint is there to
            compare it with (it can take seconds for a GGUF file).
        world_size: the run's number of ranks, when known.

    Returns:
        One message per problem (what was found, and what to do); empty when the run can start.
    """
    ckpt_dir = Path(run.output_dir) / CHECKPOINTS_DIR
    resume = run.checkpoint.resume
    choice = choose_resume(resume, ckpt_dir)
    if isinstance(choice, CheckpointError):
        return [str(choice)]
    errors = []
    current: dict[str, Any] | None = None
    sources = [(ckpt_dir, f"output_dir {run.output_dir!r} holds checkpoints of another model", "nothing was "
                f"written: give this run its own output_dir, or move {str(ckpt_dir)!r} away to start afresh here")]
    if choice is not None and Path(choice).parent != ckpt_dir:
        sources.append((Path(choice).parent, f"checkpoint.resume={resume} was saved from another model",
                        "resume with the model it was trained from, or set checkpoint.resume=never"))
    for directory, problem, remedy in sources:
        saved = directory / "config.json"
        if not saved.is_file():
            continue
        current = current if current is not None else read_model_config().to_dict()
        differences = _shape_differences(json.loads(saved.read_text()), current)
        if differences:
            errors.append(f"{problem} ({'; '.join(differences)}); {remedy}")
    marker = Path(choice) / COMPLETE if choice is not None else None
    if marker is not None and marker.is_file() and not load_universal and zero_stage is not None:
        errors += _saved_layout_errors(run, Path(choice), json.loads(marker.read_text()), zero_stage, world_size)
    return errors


def _saved_layout_errors(run, tag_dir: Path, saved: dict[str, Any], zero_stage: int,
                         world_size: int | None) -> list[str]:
    """A checkpoint of another ZeRO stage, or partitioned over another number of ranks."""
    errors = []
    stage = saved["zero_stage"]
    # Stages 1 and 2 share DeepSpeed's optimizer and checkpoint layout; the others do not.
    if stage != zero_stage and not {stage, zero_stage} <= {1, 2}:
        errors.append(f"{tag_dir} was saved at ZeRO stage {stage}; the DeepSpeed config {run.deepspeed!r} has "
                      f"stage {zero_stage}: resume with zero_optimization.stage {stage}, or start afresh with "
                      "checkpoint.resume=never or another output_dir")
    if world_size is not None and saved["world_size"] != world_size and stage != 0:
        errors.append(
            f"{tag_dir} was saved by {saved['world_size']} ranks at ZeRO stage {stage}; this run has "
            f"{world_size}. ZeRO shards cannot be loaded at another world size directly. Convert it once:\n"
            f"    {universal_command(tag_dir, stage)}\n"
            f"then resume with checkpoint.resume={tag_dir}_universal and "
            f"\"checkpoint\": {{\"load_universal\": true}} in the DeepSpeed JSON")
    return errors


# ------------------------------------------------------------------------------------------- manager


@dataclasses.dataclass(kw_only=True)
class Resumed:
    """What the loop needs from a loaded checkpoint besides the engine and pruner state."""

    step: int
    tag_dir: Path
    pending_eval: bool
    window: dict[str, float] | None


class CheckpointManager:
    """Save and resume a :class:`neuroprune_ds.train.Session` (every rank builds one and calls it alike).

    Args:
        session: the trainer's session (run config, engine, pruner, loader, tokenizer, logger, rank).
    """

    def __init__(self, session):
        self.session = session
        self.config = session.run.checkpoint
        self.ckpt_dir = Path(session.run.output_dir) / CHECKPOINTS_DIR
        self.engine = session.engine
        self.rank, self.world_size = session.rank, session.world_size
        self.preemption = Preemption(self.engine.device)
        self.guard = FiniteGuard(self.engine, self.config.on_nonfinite, self.rank)
        self.last_saved_step: int | None = None
        self._model_files_written = False

    # -- schedule -----------------------------------------------------------------------------------
    def due(self, step: int) -> bool:
        every = self.config.every_steps
        return bool(every) and step % every == 0

    def after_step(self, step: int, window) -> bool:
        """Save when scheduled or preempted (collective); returns True when the loop must stop (preempted)."""
        preempted = self.preemption.agreed()
        if preempted or self.due(step):
            self.save(step, window)
        if preempted:
            log.warning("rank %d: preemption signal (%s on some rank): checkpointed step %d, exiting for requeue",
                        self.rank, self.preemption.received or "received", step)
        return preempted

    # -- save ---------------------------------------------------------------------------------------
    def save(self, step: int, window=None, *, pending_eval: bool = False) -> Path:
        """Save ``step_<step>`` atomically (collective). Returns the tag directory."""
        tag = tag_for(step)
        tag_dir = self.ckpt_dir / tag
        if step == self.last_saved_step and not pending_eval:
            return tag_dir
        started = time.perf_counter()
        if self.rank == 0:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            if tag_dir.exists():  # an interrupted save of this step, or a run restarted with resume=never
                shutil.rmtree(tag_dir)
            self._write_model_files()
        barrier()
        rank_states = all_gather_object({"rng": rng_state(), "window": _window_state(window)})
        self.engine.save_checkpoint(str(self.ckpt_dir), tag=tag, client_state=self._client_state(
            step, rank_states, pending_eval), save_latest=False)
        barrier()  # every rank's shards are written
        if self.rank == 0:
            marker = {"step": step, "world_size": self.world_size, "zero_stage": self.session.zero_stage,
                      "time": time.time()}
            _write_atomic(tag_dir / COMPLETE, json.dumps(marker) + "\n")
            _write_atomic(self.ckpt_dir / LATEST, tag + "\n")
            self._remove_old(keep=tag)
        barrier()
        self.last_saved_step = step
        self.session.logger.log(step, {"checkpoint/save_s": time.perf_counter() - started}, kind="checkpoint")
        return tag_dir

    def _client_state(self, step: int, rank_states: list, pending_eval: bool) -> dict[str, Any]:
        run = self.session.run
        state = {
            "neuroprune_config": dataclasses.asdict(run.neuroprune),
            "model": {"name_or_path": run.model.name_or_path, "task": run.task, "num_labels": run.num_labels},
            "resume": {
                "step": step,
                "world_size": self.world_size,
                "zero_stage": self.session.zero_stage,
                "data": self.session.loader.state_dict(),
                "ranks": rank_states,
                "pending_eval": pending_eval,
                "metrics": self.session.logger.records_through(step) if self.rank == 0 else None,
                "skipped_steps": self.guard.skipped_steps,
            },
        }
        if self.session.pruner is not None:
            state["neuroprune"] = self.session.pruner.state_dict()
        return state

    def _write_model_files(self) -> None:
        """(rank 0) This run's HF config and tokenizer, at its first save: files left by an earlier run in
        this output_dir are replaced, each by a rename, so a kill never leaves one half-written."""
        if self._model_files_written:
            return
        staging = self.ckpt_dir / f".model_files.tmp.{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        self.engine.module.config.save_pretrained(staging)
        if self.session.tokenizer is not None:
            self.session.tokenizer.save_pretrained(staging)
        for file in staging.iterdir():
            os.replace(file, self.ckpt_dir / file.name)
        staging.rmdir()
        self._model_files_written = True

    def _remove_old(self, keep: str) -> None:
        """Keep the newest ``keep_last`` complete tags up to ``keep``; drop incomplete tags older than it, and
        tags beyond it: an earlier run's, which this one (resume=never, or resumed from an older tag) replaces
        (rank 0)."""
        newest = tag_step(keep)
        complete = [tag for tag in complete_tags(self.ckpt_dir) if tag_step(tag) <= newest]
        doomed = set(complete[:-self.config.keep_last]) if len(complete) > self.config.keep_last else set()
        for path in self.ckpt_dir.iterdir():
            step = tag_step(path.name)
            if step is None or not path.is_dir() or path.name == keep:
                continue
            if step > newest:
                log.warning("removing %s: left by an earlier run in this output_dir, replaced by this one", path)
            if path.name in doomed or step > newest or (step < newest and not is_complete(path)):
                shutil.rmtree(path, ignore_errors=True)

    # -- resume -------------------------------------------------------------------------------------
    def resume(self) -> Resumed | None:
        """Load the checkpoint ``checkpoint.resume`` asks for, if any (collective).

        Raises:
            CheckpointError: the path is not a complete checkpoint. (Another model, ZeRO stage or world size
                is refused before, by :func:`output_dir_errors`.)
        """
        tag_dir = broadcast_object(self._choose() if self.rank == 0 else None)
        if isinstance(tag_dir, CheckpointError):
            raise tag_dir
        if tag_dir is None:
            return None
        tag_dir = Path(tag_dir)
        load_path, client = self.engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name,
                                                        load_optimizer_states=True, load_lr_scheduler_states=True)
        if load_path is None:
            raise CheckpointError(f"DeepSpeed could not load {tag_dir}")
        state = client["resume"]
        if self.session.pruner is not None:
            self.session.pruner.load_state_dict(client["neuroprune"])
        same_world = state["world_size"] == self.world_size
        self.session.loader.load_state_dict(self._data_position(state))
        ranks = state["ranks"]
        set_rng_state(ranks[self.rank % len(ranks)]["rng"])
        self.guard.skipped_steps = state.get("skipped_steps", 0)
        self.session.logger.forget_after(state["step"])  # what the interrupted run logged after the checkpoint
        self.last_saved_step = state["step"]
        if self.rank == 0:
            log.warning("resumed from %s at step %d%s", tag_dir, state["step"],
                        "" if same_world else f" (saved by {state['world_size']} ranks, now {self.world_size})")
        window = ranks[self.rank]["window"] if same_world else None
        return Resumed(step=state["step"], tag_dir=tag_dir, pending_eval=state["pending_eval"], window=window)

    def _choose(self):
        """(rank 0) The tag directory to resume from, None for a fresh start, or the error to raise."""
        if self.config.resume == "never" and complete_tags(self.ckpt_dir):
            log.warning("checkpoint.resume=never: starting afresh; checkpoints in %s will be replaced",
                        self.ckpt_dir)
        return choose_resume(self.config.resume, self.ckpt_dir)

    def _data_position(self, state: dict) -> dict:
        data = dict(state["data"])
        if state["world_size"] != self.world_size:
            # Same fraction of the epoch; the order of examples differs anyway (their split among ranks does).
            loader = self.session.loader
            multiple = self.session.run.schedule.gradient_accumulation_steps
            index = data["batch_index"] * state["world_size"] // self.world_size // multiple * multiple
            data.update(world_size=self.world_size, batch_index=min(index, len(loader) - multiple))
            log.warning("world size changed (%d -> %d): data continues at epoch %d batch %d, not in the exact order",
                        state["world_size"], self.world_size, data["epoch"], data["batch_index"])
        return data
