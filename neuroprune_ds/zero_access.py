"""One interface over DeepSpeed ZeRO stages 0-3 to this rank's part of each parameter.

For every parameter a rank owns a contiguous range of the flattened tensor (``FlatSlice``): all of it at
ZeRO-0 in fp32, a fragment at ZeRO-1/2 and under DeepSpeed's bf16 optimizer (``param._hp_mapping``, the
tensor-fragment mapping DeepSpeed's universal checkpoint uses), the rank's partition at ZeRO-3
(``deepspeed.utils.safe_get_local_*``). This module hands out that range of the fp32 master weights, of the
gradient (between backward and step) and of the optimizer moments, and writes edits to both the fp32 master
and the 16-bit/working copy (writing the working copy alone is undone by the next optimizer step).
Each shard is handed out where DeepSpeed keeps it: on the accelerator, or in CPU memory when ZeRO-3
offloads the optimizer (see :meth:`ZeroAccess._offloaded`); callers move their per-group factors to it.
No NeuroPrune math lives here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param, safe_get_local_grad,
                             safe_get_local_optimizer_state, safe_set_local_fp32_param, safe_set_local_grad,
                             safe_set_local_optimizer_state)

from neuroprune_ds.flat_slice import FlatSlice

SliceEdit = Callable[[torch.Tensor, FlatSlice], None]
"""An in-place edit of a 1-D local tensor that knows which slice of the parameter it holds."""


def _shape(param: torch.nn.Parameter) -> torch.Size:
    return param.ds_shape if hasattr(param, "ds_id") else param.shape


class ZeroAccess:
    """Local shards of parameters of a DeepSpeed engine, for any ZeRO stage, fp32 or bf16.

    Args:
        engine: a ``deepspeed.DeepSpeedEngine`` (data parallel only: no tensor or pipeline parallelism).
    """

    def __init__(self, engine):
        if getattr(engine, "mpu", None) is not None:
            raise ValueError("neuroprune_ds supports data parallelism (ZeRO 0-3); tensor/pipeline model "
                             "parallelism (engine.mpu) is not supported")
        self.engine = engine
        self._optimizer_keys: list[str] = []
        self.stage = engine.zero_optimization_stage()
        self.world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        offload = engine.zero_offload_optimizer() if self.stage == 3 else None
        # NVMe offload swaps the partitions in and out around each access: only DeepSpeed's own API keeps that.
        self.cpu_offload = offload is not None and str(getattr(offload.device, "value", offload.device)) == "cpu"
        for name, param in engine.module.named_parameters():
            hidden_master = param.dtype != torch.float32 and not self.is_partitioned(param)
            if param.requires_grad and hidden_master:
                raise ValueError(
                    f"parameter {name} is {param.dtype} at ZeRO stage {self.stage}: DeepSpeed keeps its fp32 "
                    "master copy inside FP16_Optimizer, which offers no public per-parameter access, so "
                    "penalties and masks cannot reach it. Use zero_optimization.stage >= 1 with bf16 "
                    "(the same memory on one rank), or fp32 at stage 0.")

    # -- where this rank's slice lies -------------------------------------------------------------------
    def local_slice(self, param: torch.nn.Parameter) -> FlatSlice:
        """The range of the flattened parameter whose master weights, gradient and moments this rank owns."""
        shape = _shape(param)
        if hasattr(param, "ds_id"):
            partition = param.ds_tensor.ds_numel
            start = min(dist.get_rank(group=param.ds_process_group) * partition, param.ds_numel)
            return FlatSlice.of(shape, start, min(partition, param.ds_numel - start))
        mapping = getattr(param, "_hp_mapping", "replicated")
        if mapping == "replicated":
            return FlatSlice.of(shape)
        if mapping is None:
            return FlatSlice.of(shape, 0, 0)
        address = mapping.lp_fragment_address
        return FlatSlice.of(shape, address.start, address.numel)

    def is_partitioned(self, param: torch.nn.Parameter) -> bool:
        """True when each element is owned by exactly one rank (so per-group sums need an all-reduce)."""
        return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")

    # -- reads -----------------------------------------------------------------------------------------
    def master(self, param: torch.nn.Parameter) -> torch.Tensor:
        """This rank's slice of the fp32 master weights (1-D). Treat as read-only; edit with ``edit_weights``."""
        if hasattr(param, "ds_id"):
            master = self._offloaded(param) if self.cpu_offload else safe_get_local_fp32_param(param)
            return master.detach()[:self.local_slice(param).numel]
        mapping = getattr(param, "_hp_mapping", "replicated")
        if mapping == "replicated":
            return param.detach().view(-1)
        if mapping is None:
            return param.data.new_empty(0, dtype=torch.float32)
        return mapping.get_hp_fragment().detach().view(-1)

    def full_fp32(self, param: torch.nn.Parameter) -> torch.Tensor:
        """The whole fp32 master parameter, gathered from all ranks (collective at ZeRO 1-3 / bf16)."""
        if self.is_partitioned(param):
            return safe_get_full_fp32_param(param).detach().float().reshape(_shape(param))
        return param.data.detach().float().clone()

    def optimizer_keys(self) -> list[str]:
        """Names of the per-element optimizer states (e.g. exp_avg, exp_avg_sq); empty before the first step."""
        if not self._optimizer_keys:  # fixed once the optimizer has stepped: found once, not on every edit
            optimizer = self.engine.optimizer
            inner = getattr(optimizer, "optimizer", optimizer)
            keys = set()
            for state in inner.state.values():
                keys.update(k for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0)
            self._optimizer_keys = sorted(keys)
        return self._optimizer_keys

    # -- edits -----------------------------------------------------------------------------------------
    def local_grad(self, param: torch.nn.Parameter) -> torch.Tensor:
        """This rank's slice of the reduced gradient (1-D), to read between backward and step."""
        piece = self.local_slice(param)
        if hasattr(param, "ds_id"):
            grad = self._offloaded(param, grad=True) if self.cpu_offload else safe_get_local_grad(param)
            return grad[:piece.numel]
        mapping = getattr(param, "_hp_mapping", "replicated")
        if mapping == "replicated":
            return param.grad.view(-1)
        if mapping is None:
            return param.new_empty(0)
        grad = mapping.get_lp_grad_fragment(param._index_in_param_group).view(-1)
        if grad.numel() == param.numel():  # the bf16 optimizer keeps a full-size gradient buffer
            grad = grad.narrow(0, piece.offset, piece.numel)
        return grad

    @torch.no_grad()
    def edit_grad(self, param: torch.nn.Parameter, edit: SliceEdit) -> None:
        """Apply ``edit`` to this rank's slice of the (reduced, averaged) gradient between backward and step."""
        piece = self.local_slice(param)
        if piece.numel == 0:
            return
        if hasattr(param, "ds_id"):
            grad = self._offloaded(param, grad=True) if self.cpu_offload else safe_get_local_grad(param)
            edit(grad[:piece.numel], piece)
            safe_set_local_grad(param, grad)  # offloaded: a copy onto itself, but DeepSpeed re-takes its norm
            return
        edit(self.local_grad(param), piece)

    def working(self, param: torch.nn.Parameter) -> tuple[torch.Tensor, FlatSlice]:
        """The working (module) copy as this rank holds it, 1-D, and the slice it covers: the local partition
        at ZeRO-3 (the whole parameter when it is persistent), the whole parameter otherwise. Read only."""
        if hasattr(param, "ds_id") and not getattr(param, "ds_persist", False):
            piece = self.local_slice(param)
            return param.ds_tensor.data.view(-1)[:piece.numel], piece
        return param.data.view(-1), FlatSlice.of(_shape(param))

    def _moment_keys(self, moments: bool | Sequence[str], available: Iterable[str]) -> list[str]:
        return [key for key in available if moments is True or (moments and key in moments)]

    @torch.no_grad()
    def edit_weights(self, param: torch.nn.Parameter, edit: SliceEdit, moments: bool | Sequence[str] = False) -> None:
        """Apply ``edit`` to the fp32 master, the working (16-bit or fp32 module) copy, and the optimizer
        moments of ``param`` named in ``moments`` (True: every one). Every rank calls this with the same edit."""
        piece = self.local_slice(param)
        if hasattr(param, "ds_id"):
            self._edit_zero3(param, piece, edit, moments)
            return
        mapping = getattr(param, "_hp_mapping", "replicated")
        if mapping == "replicated":
            edit(param.data.view(-1), piece)
            state = getattr(self.engine.optimizer, "state", {}).get(param, {})
            for key in self._moment_keys(moments, self.optimizer_keys()):
                if key in state:
                    edit(state[key].view(-1), piece)
            return
        # ZeRO-1/2 and bf16: every rank holds the whole working copy, and a fragment of the master/moments.
        edit(param.data.view(-1), FlatSlice.of(param.shape))
        if mapping is None or piece.numel == 0:
            return
        edit(mapping.get_hp_fragment().view(-1), piece)
        if mapping.optim_fragment:
            for key in self._moment_keys(moments, mapping.get_optim_state_keys()):
                edit(mapping.get_hp_fragment(key).view(-1), piece)

    def _edit_zero3(self, param, piece: FlatSlice, edit: SliceEdit, moments: bool | Sequence[str]) -> None:
        if piece.numel and self.cpu_offload:  # edited in place where ZeRO-Offload keeps them
            edit(self._offloaded(param)[:piece.numel], piece)
            edit(param.ds_tensor.data.view(-1)[:piece.numel], piece)
            for key in self._moment_keys(moments, self.optimizer_keys()) if moments else ():
                edit(self._offloaded(param, key)[:piece.numel], piece)
        elif piece.numel:
            master = safe_get_local_fp32_param(param)
            edit(master[:piece.numel], piece)
            safe_set_local_fp32_param(param, master)
            edit(param.ds_tensor.data.view(-1)[:piece.numel], piece)
            if moments:
                for key in self._moment_keys(moments, self.optimizer_keys()):
                    state = safe_get_local_optimizer_state(param, key)
                    edit(state[:piece.numel], piece)
                    safe_set_local_optimizer_state(param, state, key)
        if getattr(param, "ds_persist", False):  # persistent parameters also keep a full copy in .data
            edit(param.data.view(-1), FlatSlice.of(_shape(param)))

    def _offloaded(self, param: torch.nn.Parameter, key: str | None = None, grad: bool = False) -> torch.Tensor:
        """This rank's partition of ``param`` in ZeRO-Offload's CPU buffers, as a view (1-D, padded like
        ``ds_tensor``): the fp32 master (``key`` None), an optimizer state, or the fp32 gradient.

        ``safe_get_local_*`` copy these to the accelerator and ``safe_set_local_*`` copy them back: about 36
        bytes of PCIe traffic per penalised element and step. This reads the same buffers through the
        offsets DeepSpeed's own ``safe_*`` functions use, and waits for the gradient copies as they do.
        """
        optimizer = self.engine.optimizer
        if not get_accelerator().resolves_data_dependency():
            optimizer.reduce_and_partition_stream.synchronize()
        group, offset, numel = optimizer.grad_position[optimizer.get_param_id(param)]
        flat = optimizer.fp32_partitioned_groups_flat[group]
        source = flat.grad if grad else flat if key is None else optimizer.optimizer.state[flat][key]
        return source.narrow(0, offset, numel)

    # -- communication ---------------------------------------------------------------------------------
    def all_reduce_sum(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sum same-dtype tensors over ranks in ONE collective (flatten, all-reduce, split)."""
        if self.world_size == 1 or not tensors:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        # Statistics of offloaded shards are computed in CPU memory; NCCL reduces accelerator tensors only.
        reduced = flat.to(self.engine.device)
        dist.all_reduce(reduced)
        flat = reduced.to(flat.device)
        return [piece.view_as(t) for piece, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s value of ``tensor`` on every rank (in place)."""
        if self.world_size > 1:
            dist.broadcast(tensor, src=src)
        return tensor
