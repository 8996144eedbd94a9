"""The collectives the library uses, each a no-op in a world of one process.

Every tensor collective runs on the device it is given, the engine's (``engine.device``): NCCL reduces and
broadcasts GPU tensors only, and gloo, which the tests run on, would accept a CPU tensor that NCCL refuses,
so the device is part of every call rather than left to the caller's tensors. Sums are coalesced: one
collective for any number of tensors. The object collectives (pickled Python values: RNG states, evaluation
rows, a resume choice) let torch.distributed choose the transport itself.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """Whether a process group of more than one rank is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensors: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Sum same-dtype tensors over ranks in ONE collective (flatten on ``device``, all-reduce, split).

    Returns:
        The sums, shaped like ``tensors``, on ``device`` (also for tensors that were elsewhere, e.g. the
        statistics of shards offloaded to the CPU); ``tensors`` themselves in a world of one.
    """
    if not is_distributed() or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1).to(device) for t in tensors])
    dist.all_reduce(flat)
    return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]


def sum_floats(values: list[float], device: torch.device) -> list[float]:
    """Sum Python numbers over ranks in one collective, in float64 on ``device``."""
    (total,) = all_reduce_sum([torch.tensor(values, dtype=torch.float64, device=device)], device)
    return total.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if ``flag`` is true on any rank."""
    if not is_distributed():
        return flag
    tensor = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def broadcast(tensor: torch.Tensor, device: torch.device, src: int = 0) -> torch.Tensor:
    """Rank ``src``'s value of ``tensor``, which must live on ``device``, on every rank (in place)."""
    assert tensor.device == device, f"broadcast of a tensor on {tensor.device}, not on {device}"
    if is_distributed():
        dist.broadcast(tensor, src=src)
    return tensor


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a world of one)."""
    if not is_distributed():
        return [obj]
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
