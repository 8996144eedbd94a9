"""Read a NeuroPrune DeepSpeed checkpoint: the trainer's client state and the fp32 weights, one at a time.

The checkpoint contract: ``CKPT_DIR/<tag>/`` is what ``engine.save_checkpoint(CKPT_DIR, tag, client_state=
{"neuroprune": pruner.state_dict(), "neuroprune_config": asdict(NeuroPruneConfig), "model": {"name_or_path",
"task", "num_labels"}})`` writes, ``CKPT_DIR/latest`` names the newest tag, and ``CKPT_DIR`` holds the HF
``config.json`` (and tokenizer files when there is a tokenizer).

Weights come from DeepSpeed's ``zero_to_fp32`` (ZeRO 1-3; at ZeRO-3 in its lazy mode, which gathers one
parameter at a time from the memory-mapped optimizer shards) or, at ZeRO-0, from the module state in the
model-states file, one parameter at a time (:class:`CheckpointWeights`). Pages of memory-mapped shards that
a parameter was read from are handed back to the kernel right after, so the resident set holds the tensor
asked for and not also a copy of the files.

A tag is exported only when the trainer's ``complete`` marker is in it (``allow_incomplete`` overrides).
"""

from __future__ import annotations

import ctypes
import glob
import mmap
import os
import pickle
import sys
import warnings
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import (get_fp32_state_dict_from_zero_checkpoint, get_model_state_files,
                                          get_optim_files)

from neuroprune_ds.checkpoint import CHECKPOINTS_DIR, COMPLETE, is_complete
from neuroprune_ds.config import NeuroPruneConfig

TASKS = ("causal_lm", "seq2seq", "classification")


@dataclass(frozen=True, slots=True)
class CheckpointInfo:
    """What the trainer recorded beside the weights."""

    ckpt_dir: str
    tag: str
    task: str
    num_labels: int | None
    name_or_path: str
    alive: dict[str, torch.Tensor]
    """bool (num_units,) per attention block name."""
    optimizer_steps: int
    training_dtype: torch.dtype
    """The dtype DeepSpeed trained the module in (bf16/fp16 when enabled in its config, else fp32)."""
    neuroprune: NeuroPruneConfig
    """The run's NeuroPrune settings known to this version (epsilon, target/exclude patterns)."""
    neuroprune_settings: dict
    """The run's NeuroPrune settings exactly as saved."""

    @property
    def ds_dir(self) -> str:
        return os.path.join(self.ckpt_dir, self.tag)


def resolve_tag(ckpt_dir: str, tag: str | None) -> str:
    """``tag``, or the one ``CKPT_DIR/latest`` names; raises ValueError when neither leads to a directory."""
    if tag is None:
        latest = os.path.join(ckpt_dir, "latest")
        if not os.path.isfile(latest):
            raise ValueError(f"{ckpt_dir}: no 'latest' file; pass --tag (one of: {_tags(ckpt_dir)})")
        with open(latest) as f:
            tag = f.read().strip()
    if not os.path.isdir(os.path.join(ckpt_dir, tag)):
        raise ValueError(f"{ckpt_dir}: tag {tag!r} is not a checkpoint directory; tags: {_tags(ckpt_dir)}")
    return tag


def _tags(ckpt_dir: str) -> str:
    tags = sorted(d for d in os.listdir(ckpt_dir) if os.path.isdir(os.path.join(ckpt_dir, d))) \
        if os.path.isdir(ckpt_dir) else []
    return ", ".join(tags) or "none"


def read_checkpoint(ckpt_dir: str, tag: str | None = None, *, allow_incomplete: bool = False) -> CheckpointInfo:
    """The client state of the checkpoint (rank 0's model-states file, memory-mapped: weights are not read).

    Args:
        allow_incomplete: accept a tag without the trainer's ``complete`` marker (a save that may have died
            half-way, or a checkpoint written by other code than the trainer).

    Raises:
        ValueError: no such checkpoint or tag, an incomplete tag, an unreadable file, or client state
            missing what the contract requires.
    """
    _check_is_checkpoint_dir(ckpt_dir)
    tag = resolve_tag(ckpt_dir, tag)
    if not allow_incomplete and not is_complete(Path(ckpt_dir, tag)):
        raise ValueError(f"{ckpt_dir}: tag {tag!r} has no '{COMPLETE}' marker: its save did not finish (the "
                         f"trainer refuses to resume from it); complete tags: {_complete_tags(ckpt_dir)}; pass "
                         "--allow-incomplete to export it anyway")
    state = load_checkpoint_file(get_model_state_files(os.path.join(ckpt_dir, tag))[0])
    missing = [key for key in ("neuroprune", "neuroprune_config", "model") if key not in state]
    if missing:
        raise ValueError(f"{ckpt_dir}/{tag}: client state lacks {missing}; a NeuroPrune checkpoint is saved with "
                         "client_state={'neuroprune': pruner.state_dict(), 'neuroprune_config': asdict(config), "
                         "'model': {'name_or_path', 'task', 'num_labels'}}")
    model = state["model"]
    if model.get("task") not in TASKS:
        raise ValueError(f"{ckpt_dir}/{tag}: client_state['model']['task'] is {model.get('task')!r}; "
                         f"expected one of {TASKS}")
    settings = dict(state["neuroprune_config"])
    known = {f.name for f in fields(NeuroPruneConfig)}
    unknown = sorted(set(settings) - known)
    if unknown:
        warnings.warn(f"{ckpt_dir}/{tag}: neuroprune_config fields {unknown} are unknown to this version; "
                      "they are recorded in neuroprune.json but play no part in the conversion")
    return CheckpointInfo(ckpt_dir, tag, model["task"], model.get("num_labels"), model.get("name_or_path", ""),
                          {name: mask.clone().bool() for name, mask in state["neuroprune"]["alive"].items()},
                          int(state["neuroprune"]["optimizer_steps"]), _training_dtype(state.get("ds_config")),
                          NeuroPruneConfig(**{k: v for k, v in settings.items() if k in known}), settings)


def _check_is_checkpoint_dir(ckpt_dir: str) -> None:
    """Raise ValueError, with the right path when it is near, unless ``ckpt_dir`` holds config.json."""
    if os.path.isfile(os.path.join(ckpt_dir, "config.json")):
        return
    inner = os.path.join(ckpt_dir, CHECKPOINTS_DIR)
    if os.path.isfile(os.path.join(inner, "config.json")):
        raise ValueError(f"{ckpt_dir} is a run directory; its checkpoints are in {inner}: convert {inner}")
    parent = os.path.dirname(os.path.abspath(ckpt_dir))
    if os.path.isfile(os.path.join(parent, "config.json")) and glob.glob(os.path.join(ckpt_dir, "*model_states.pt")):
        raise ValueError(f"{ckpt_dir} is one checkpoint tag; convert its parent: {parent} "
                         f"--tag {os.path.basename(os.path.abspath(ckpt_dir))}")
    raise ValueError(f"{ckpt_dir}: no config.json; the trainer saves the model's HF config beside the "
                     "DeepSpeed checkpoint (model.config.save_pretrained(ckpt_dir))")


def _complete_tags(ckpt_dir: str) -> str:
    tags = [t for t in _tags(ckpt_dir).split(", ") if t != "none" and is_complete(Path(ckpt_dir, t))]
    return ", ".join(tags) or "none"


def _training_dtype(ds_config) -> torch.dtype:
    """bf16 or fp16 when the DeepSpeed config saved with the checkpoint enables it, else fp32."""
    ds_config = ds_config if isinstance(ds_config, dict) else {}
    for key, dtype in (("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16)):
        if (ds_config.get(key) or {}).get("enabled") in (True, "true", "True"):
            return dtype
    return torch.float32


def load_checkpoint_file(path: str):
    """``torch.load`` of a checkpoint file, memory-mapped; raises ValueError naming the file when it is
    truncated or corrupt (torch says only ``OSError: [Errno 22]`` or a zip error)."""
    try:
        return torch.load(path, map_location="cpu", mmap=True, weights_only=False)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile) as error:
        raise ValueError(f"{path}: cannot be read ({type(error).__name__}: {error}); the file is truncated or "
                         f"corrupt ({os.path.getsize(path):,} bytes): export another tag") from None


def iter_fp32_weights(info: CheckpointInfo, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full fp32 tensor) for each of ``names``, one materialised at a time.

    Tied names (one parameter under several names) yield the same tensor object.

    Raises:
        ValueError: a name is not in the checkpoint.
    """
    weights = CheckpointWeights(info, names)
    done: dict[int, torch.Tensor] = {}
    for name in names:
        key = weights.identity(name)
        if key not in done:
            done[key] = weights(name)
        yield name, done[key]


class CheckpointWeights:
    """The fp32 weights of a checkpoint by name, each materialised in private memory when asked for.

    At ZeRO-3 a parameter is gathered from every rank's memory-mapped optimizer shard, and the mapped pages
    are handed back right after: asking for one tensor costs that tensor. At ZeRO-1/2 DeepSpeed's
    ``zero_to_fp32`` merges the rank partitions into one fp32 vector when the checkpoint is opened (about
    one fp32 model); at ZeRO-0 the module state is mapped from the model-states file.

    Args:
        info: the checkpoint.
        names: every name that will be asked for (checked up front).

    Raises:
        ValueError: a name is not in the checkpoint, or a checkpoint file is unreadable (named).
    """

    def __init__(self, info: CheckpointInfo, names: list[str]):
        self.ds_dir = info.ds_dir
        optim_files = glob.glob(os.path.join(info.ds_dir, "*_optim_states.pt"))
        if optim_files:
            self._source = _open_zero_checkpoint(info)
        else:  # ZeRO-0: DeepSpeed keeps the (fp32) module weights in the model-states file itself
            self._source = load_checkpoint_file(get_model_state_files(info.ds_dir)[0])["module"]
        absent = [name for name in names if name not in self._source]
        if absent:
            raise ValueError(f"{info.ds_dir}: the checkpoint has no weights for {absent[:4]} "
                             f"({len(absent)} missing); does config.json describe the trained model?")

    def identity(self, name: str) -> int:
        """Equal for names of one (tied) parameter."""
        return id(self._source[name])

    def __call__(self, name: str) -> torch.Tensor:
        """The tensor of ``name``, fp32 when floating point; it may be memory the source keeps: do not modify."""
        return _materialise(self._source[name], self.ds_dir)


def _open_zero_checkpoint(info: CheckpointInfo) -> dict:
    """DeepSpeed's lazy fp32 state dict of a ZeRO-1/2/3 checkpoint; an unreadable file is named."""
    try:
        return get_fp32_state_dict_from_zero_checkpoint(info.ckpt_dir, info.tag, lazy_mode=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile):
        for path in get_model_state_files(info.ds_dir) + get_optim_files(info.ds_dir):
            load_checkpoint_file(path)  # raises ValueError naming the first unreadable file
        raise


def _materialise(lazy, ds_dir: str) -> torch.Tensor:
    """The fp32 tensor of a checkpoint entry in private memory; hands back the mapped file pages it came from."""
    if not isinstance(lazy, torch.Tensor):  # zero_to_fp32.GatheredTensor: slices of every rank's mapped shards
        with torch.no_grad():  # the shards were saved as parameters: the gathered tensor needs no graph
            tensor = lazy.contiguous()
        for rank_groups in lazy.flat_groups:
            for group in rank_groups:
                release_file_pages(group, ds_dir)
    elif _mapped_range(lazy, ds_dir):  # ZeRO-0: the module state, mapped from the model-states file
        tensor = lazy.detach().clone()
        release_file_pages(lazy, ds_dir)
    else:  # ZeRO-1/2: a view of the fp32 vector zero_to_fp32 merged in memory, ours already
        tensor = lazy.detach()
    return tensor.float() if tensor.is_floating_point() else tensor


_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None
_MADV_DONTNEED = 4


def release_file_pages(tensor: torch.Tensor, under: str) -> bool:
    """Hand back this process's resident pages of ``tensor``'s storage if it lies in a private mapping of a
    file under directory ``under`` that nothing wrote to (the kernel re-reads the pages if touched again).

    Anonymous memory is never touched: MADV_DONTNEED would zero it. Returns whether pages were released.
    """
    pages = _mapped_range(tensor, under)
    return bool(pages) and _LIBC.madvise(ctypes.c_void_p(pages[0]), ctypes.c_size_t(pages[1] - pages[0]),
                                         _MADV_DONTNEED) == 0


def _mapped_range(tensor: torch.Tensor, under: str) -> tuple[int, int] | None:
    """The page-aligned start and the end of ``tensor``'s storage when it lies in one private mapping of a
    file below directory ``under`` (from /proc/self/maps); None otherwise or off Linux."""
    if _LIBC is None:
        return None
    storage = tensor.untyped_storage()
    start = storage.data_ptr() // mmap.PAGESIZE * mmap.PAGESIZE
    end = storage.data_ptr() + storage.nbytes()
    under = os.path.realpath(under)
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            low, high = (int(x, 16) for x in fields[0].split("-"))
            if low <= start < high:
                path = fields[5].strip() if len(fields) == 6 else ""
                private_file = fields[1][3] == "p" and path.startswith(under + os.sep)
                return (start, end) if end <= high and end > start and private_file else None
    return None
