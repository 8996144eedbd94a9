"""Read a NeuroPrune DeepSpeed checkpoint: the trainer's client state and the fp32 weights, one at a time.

The checkpoint contract: ``CKPT_DIR/<tag>/`` is what ``engine.save_checkpoint(CKPT_DIR, tag, client_state=
{"neuroprune": pruner.state_dict(), "neuroprune_config": asdict(NeuroPruneConfig), "model": {"name_or_path",
"task", "num_labels"}})`` writes, ``CKPT_DIR/latest`` names the newest tag, and ``CKPT_DIR`` holds the HF
``config.json`` (and tokenizer files when there is a tokenizer).

Weights come from DeepSpeed's ``zero_to_fp32`` (ZeRO 1-3; at ZeRO-3 in its lazy mode, which gathers one
parameter at a time from the memory-mapped optimizer shards) or, at ZeRO-0, from the module state in the
model-states file. Pages of memory-mapped shards that a parameter was read from are handed back to the
kernel right after, so the resident set holds the materialised weights and not also a second copy of the
files.
"""

from __future__ import annotations

import ctypes
import glob
import mmap
import os
import sys
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint, get_model_state_files

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


def read_checkpoint(ckpt_dir: str, tag: str | None = None) -> CheckpointInfo:
    """The client state of the checkpoint (rank 0's model-states file, memory-mapped: weights are not read).

    Raises:
        ValueError: no such checkpoint or tag, or client state missing what the contract requires.
    """
    if not os.path.isfile(os.path.join(ckpt_dir, "config.json")):
        raise ValueError(f"{ckpt_dir}: no config.json; the trainer saves the model's HF config beside the "
                         "DeepSpeed checkpoint (model.config.save_pretrained(ckpt_dir))")
    tag = resolve_tag(ckpt_dir, tag)
    state = torch.load(get_model_state_files(os.path.join(ckpt_dir, tag))[0], map_location="cpu", mmap=True,
                       weights_only=False)
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
                          int(state["neuroprune"]["optimizer_steps"]),
                          NeuroPruneConfig(**{k: v for k, v in settings.items() if k in known}), settings)


def iter_fp32_weights(info: CheckpointInfo, names: list[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, full fp32 tensor) for each of ``names``, one materialised at a time.

    Tied names (one parameter under several names) yield the same tensor object.

    Raises:
        ValueError: a name is not in the checkpoint.
    """
    if glob.glob(os.path.join(info.ds_dir, "*_optim_states.pt")):
        source = get_fp32_state_dict_from_zero_checkpoint(info.ckpt_dir, info.tag, lazy_mode=True)
    else:  # ZeRO-0: DeepSpeed keeps the (fp32) module weights in the model-states file itself
        source = torch.load(get_model_state_files(info.ds_dir)[0], map_location="cpu", mmap=True,
                            weights_only=False)["module"]
    absent = [name for name in names if name not in source]
    if absent:
        raise ValueError(f"{info.ds_dir}: the checkpoint has no weights for {absent[:4]} "
                         f"({len(absent)} missing); does config.json describe the trained model?")
    done: dict[int, torch.Tensor] = {}
    for name in names:
        lazy = source[name]
        if id(lazy) not in done:
            done[id(lazy)] = _materialise(lazy, info.ds_dir)
        yield name, done[id(lazy)]


def _materialise(lazy, ds_dir: str) -> torch.Tensor:
    """The fp32 tensor of a checkpoint entry in private memory; hands back the mapped file pages it came from."""
    if not isinstance(lazy, torch.Tensor):  # zero_to_fp32.GatheredTensor: slices of every rank's mapped shards
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
