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

from collections.abc import Callable, Sequence

import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_local_fp32_param, safe_get_local_grad,
                             safe_set_local_fp32_param, safe_set_local_grad)

from neuroprune_ds import collectives
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
        self.device = engine.device
        """Where everything the pruner keeps lives and where collectives run (NCCL takes only GPU tensors)."""
        self._optimizer_keys: list[str] = []
        self.stage = engine.zero_optimization_stage()
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

    def inner_optimizer(self) -> torch.optim.Optimizer:
        """The torch optimizer that updates the fp32 masters (inside DeepSpeed's ZeRO or bf16 wrapper, if any)."""
        optimizer = self.engine.optimizer
        return getattr(optimizer, "optimizer", optimizer)

    def optimizer_keys(self) -> list[str]:
        """Names of the per-element optimizer states (e.g. exp_avg, exp_avg_sq); empty before the first step."""
        if not self._optimizer_keys:  # fixed once the optimizer has stepped: found once, not on every edit
            keys = set()
            for state in self.inner_optimizer().state.values():
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

    @torch.no_grad()
    def edit_weights(self, param: torch.nn.Parameter, edit: SliceEdit, moments: bool | Sequence[str] = False) -> None:
        """Apply ``edit`` to the fp32 master, the working (16-bit or fp32 module) copy, and the optimizer
        moments of ``param`` named in ``moments`` (True: every one). Every rank calls this with the same edit."""
        self.edit_master(param, edit, moments)
        if hasattr(param, "ds_id"):  # ZeRO-3: the local partition of the working copy
            piece = self.local_slice(param)
            if piece.numel:
                edit(param.ds_tensor.data.view(-1)[:piece.numel], piece)
            if getattr(param, "ds_persist", False):  # persistent parameters also keep a full copy in .data
                edit(param.data.view(-1), FlatSlice.of(_shape(param)))
        elif hasattr(param, "_hp_mapping"):  # ZeRO-1/2 and bf16: every rank holds the whole working copy
            edit(param.data.view(-1), FlatSlice.of(param.shape))

    @torch.no_grad()
    def edit_master(self, param: torch.nn.Parameter, edit: SliceEdit, moments: bool | Sequence[str] = False) -> None:
        """Apply ``edit`` to this rank's slice of the fp32 master and of the optimizer moments named in
        ``moments`` only (at ZeRO-0 in fp32 the master is the module's parameter). Inside the ``after`` hook of
        :meth:`around_master_steps` this is enough: DeepSpeed then copies the masters into the working copies."""
        piece = self.local_slice(param)
        if piece.numel == 0:
            return
        if hasattr(param, "ds_id") and self.cpu_offload:  # edited in place where ZeRO-Offload keeps it
            master = self._offloaded(param)[:piece.numel]
            edit(master, piece)
        elif hasattr(param, "ds_id"):
            partition = safe_get_local_fp32_param(param)
            master = partition[:piece.numel]
            edit(master, piece)
            safe_set_local_fp32_param(param, partition)
        else:
            master = self.master(param)
            edit(master, piece)
        if moments:
            states = self._state_slices(master)
            assert states or not self.is_partitioned(param) or not self.inner_optimizer().state, \
                "the optimizer state of a ZeRO partition was not found"
            for key, state in states.items():
                if moments is True or key in moments:
                    edit(state, piece)

    def _state_slices(self, master: torch.Tensor) -> dict[str, torch.Tensor]:
        """The per-element optimizer states (e.g. exp_avg) of the elements of ``master``, a 1-D view into a
        tensor the inner optimizer steps (a ZeRO flat partition, or the parameter itself at ZeRO-0).

        Found through the optimizer's own state, so they are there from inside the first step on (DeepSpeed's
        per-parameter links to them appear only after it).
        """
        address = master.untyped_storage().data_ptr()
        for stepped, state in self.inner_optimizer().state.items():
            if stepped.untyped_storage().data_ptr() == address:
                start = master.storage_offset() - stepped.storage_offset()
                return {key: value.view(-1).narrow(0, start, master.numel()) for key, value in state.items()
                        if torch.is_tensor(value) and value.shape == stepped.shape}
        return {}

    # -- the optimizer step ----------------------------------------------------------------------------
    def around_master_steps(self, before: Callable[[set[int]], None], after: Callable[[], None]) -> None:
        """Call ``before(stepped)`` and ``after()`` around every step of :meth:`inner_optimizer`.

        ``stepped`` holds the storage addresses (see :meth:`master_storage`) of the fp32 tensors that this step
        updates: DeepSpeed steps one parameter group (ZeRO-1/2) or sub-group (ZeRO-3) at a time, so a hook can
        limit itself to those. ``after`` runs before DeepSpeed copies the updated masters into the working
        copies (and gathers them at ZeRO 1-3, persistent ZeRO-3 parameters included), so an edit of the
        masters made there reaches every rank's working copy without any communication of its own.
        """
        optimizer = self.inner_optimizer()
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: before(_stepped(opt)))
        optimizer.register_step_post_hook(lambda opt, args, kwargs: after())

    def master_storage(self, param: torch.nn.Parameter) -> int:
        """Address of the storage behind this rank's fp32 master slice of ``param`` (0 when it owns none)."""
        if self.local_slice(param).numel == 0:
            return 0
        return self.master(param).untyped_storage().data_ptr()

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
        """Sum same-dtype tensors over ranks in ONE collective; the sums come back on the engine's device,
        also for statistics of shards offloaded to the CPU (:func:`neuroprune_ds.collectives.all_reduce_sum`)."""
        return collectives.all_reduce_sum(tensors, self.device)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        """Rank ``src``'s value of ``tensor`` (on the engine's device) on every rank (in place)."""
        return collectives.broadcast(tensor, self.device, src)


def _stepped(optimizer: torch.optim.Optimizer) -> set[int]:
    """Storage addresses of the tensors an optimizer step is about to update."""
    return {p.untyped_storage().data_ptr() for group in optimizer.param_groups for p in group["params"]}
