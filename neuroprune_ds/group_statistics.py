"""Per-group statistics of the group sets on this rank's shards, and what is read from them.

One measurement puts the L1 norm and the count of |w| >= epsilon of every group of several group sets into
ONE float64 buffer on the engine's device; the buffers of a step (and the controller's histogram) are summed
over ranks in ONE all-reduce; every number the host needs comes back in ONE transfer. The penalties, the
controller, FFN-unit pruning, the metrics and the summary all read the same :data:`Statistics`.
"""

from __future__ import annotations

import torch

from neuroprune_ds.arch import FFNBlock
from neuroprune_ds.flat_slice import COL, ROW
from neuroprune_ds.group_sets import GroupSet, Role
from neuroprune_ds.penalties import GroupMember, GroupStats, group_stats
from neuroprune_ds.zero_access import ZeroAccess

Statistics = dict[str, GroupStats]
"""Per group set key, its per-group statistics."""

Measurement = tuple[Statistics, torch.Tensor]
"""This rank's partial statistics, as views of one buffer, and that buffer."""


class GroupStatistics:
    """Measures group sets on this rank's fp32 master shards and sums them over ranks.

    Args:
        access: the engine's shards.
        params: the model's parameters by name.
        group_sets: every group set of the model.
        epsilon: magnitude below which a weight counts as absent.
    """

    def __init__(self, access: ZeroAccess, params: dict[str, torch.nn.Parameter], group_sets: tuple[GroupSet, ...],
                 epsilon: float):
        self.access, self.params, self.group_sets, self.epsilon = access, params, group_sets, epsilon
        self.device = access.device
        self.partitioned = any(access.is_partitioned(p) for p in params.values())
        self.numel = {s.key: sum(_numel(params[name]) for name in s.names) for s in group_sets}
        """Per group set, the elements of its full matrices."""

    def measure(self, group_sets: tuple[GroupSet, ...]) -> Measurement:
        """This rank's partial statistics of ``group_sets``, as views of ONE float64 (2, their groups) buffer
        on the device (row 0: L1 norms, row 1: counts of |w| >= epsilon), and that buffer."""
        members = {s.key: [GroupMember(self.access.master(self.params[name]),
                                       self.access.local_slice(self.params[name]), axis) for name, axis in s.members]
                   for s in group_sets}
        sizes = {key: m[0].slice.group_size(m[0].axis) for key, m in members.items()}
        buffer = torch.zeros(2, sum(sizes.values()), dtype=torch.float64, device=self.device)
        local, start = {}, 0
        for key, group_members in members.items():
            local[key] = group_stats(group_members, self.epsilon, out=buffer.narrow(1, start, sizes[key]))
            start += sizes[key]
        return local, buffer

    def all_reduce(self, measured: list[Measurement], extras: tuple[torch.Tensor | None, ...] = ()
                   ) -> tuple[list[Statistics], list[torch.Tensor | None]]:
        """Sum measurements (and extra float64 tensors, None: skipped) over ranks in ONE all-reduce."""
        if not self.partitioned:
            return [stats for stats, _ in measured], list(extras)
        present = [extra for extra in extras if extra is not None]
        reduced = self.access.all_reduce_sum([buffer for _, buffer in measured] + present)
        summed_extras = iter(reduced[len(measured):])
        out = []
        for (stats, _), buffer in zip(measured, reduced):
            views, start = {}, 0
            for key, s in stats.items():
                size = s.l1.numel()
                views[key] = GroupStats(buffer[0, start:start + size], buffer[1, start:start + size], s.connections)
                start += size
            out.append(views)
        return out, [None if extra is None else next(summed_extras) for extra in extras]

    def everything(self) -> Statistics:
        """The statistics of every group set, summed over ranks (collective)."""
        return self.all_reduce([self.measure(self.group_sets)])[0][0]

    def unit_saliency(self, blocks: tuple[FFNBlock, ...]) -> torch.Tensor:
        """This rank's part of every FFN unit's sum of (w * g)^2 over its weights (input rows and biases, output
        column), w the fp32 master and g the gradient now: float64, the blocks' units concatenated, on the
        device. Summed over ranks it is the full-matrix sum (call between backward and step)."""
        out = torch.zeros(sum(block.width for block in blocks), dtype=torch.float64, device=self.device)
        start = 0
        for block in blocks:
            piece_of_out = out.narrow(0, start, block.width)
            members = [(linear.weight, ROW) for linear in block.inputs]
            members += [(linear.bias, ROW) for linear in block.inputs if linear.bias]
            for name, axis in members + [(block.output.weight, COL)]:
                param = self.params[name]
                piece = self.access.local_slice(param)
                if piece.numel == 0:
                    continue
                product = self.access.master(param) * self.access.local_grad(param).to(torch.float32)
                piece.group_sums(product.square_(), axis, out=piece_of_out)
            start += block.width
        return out

    def to_host(self, tensors: list[torch.Tensor | None]) -> list[list[float] | None]:
        """The values of several tensors on the device (None: skipped) as host lists, in ONE transfer."""
        present = [t.reshape(-1).to(self.device, torch.float64) for t in tensors if t is not None]
        flat = torch.cat(present).tolist() if present else []
        out, start = [], 0
        for tensor in tensors:
            if tensor is None:
                out.append(None)
                continue
            out.append(flat[start:start + tensor.numel()])
            start += tensor.numel()
        return out

    # -- what is read from them --------------------------------------------------------------------------
    def block_sparsity(self, stats: Statistics) -> dict[str, tuple[float, int]]:
        """Per block: (weights with |w| < epsilon, all weights) of its penalised matrices (one host transfer)."""
        penalised = [s for s in self.group_sets if s.penalised]
        nonzero, = self.to_host([torch.stack([stats[s.key].nonzero.sum() for s in penalised])])
        counted = {}
        for group_set, present in zip(penalised, nonzero):
            zeros, weights = counted.get(group_set.block, (0.0, 0))
            counted[group_set.block] = (zeros + self.numel[group_set.key] - present, weights + self.numel[group_set.key])
        return counted

    def unit_connections(self, stats: Statistics, block: str, role: Role) -> tuple[torch.Tensor, int]:
        """Per FFN unit of ``block``: its connections with |w| >= epsilon over the sets in ``role`` (FFN_INPUT:
        its in connections, FFN_OUTPUT: its out connections), and how many connections it has there."""
        sets = [s for s in self.group_sets if s.block == block and s.role is role]
        return sum(stats[s.key].nonzero for s in sets), sum(stats[s.key].connections for s in sets)

    def ffn_connectivity(self, stats: Statistics, block: str) -> torch.Tensor:
        """Per FFN unit of ``block``: the smaller of its in and out fractional connectivity."""
        (in_present, in_total), (out_present, out_total) = (self.unit_connections(stats, block, role)
                                                            for role in (Role.FFN_INPUT, Role.FFN_OUTPUT))
        return torch.minimum(in_present / in_total, out_present / out_total)

    def unit_l1(self, stats: Statistics, block: str) -> torch.Tensor:
        """Per FFN unit of ``block``: the L1 norm of its in and out connections."""
        return sum(stats[s.key].l1 for s in self.group_sets if s.block == block and s.role in (Role.FFN_INPUT,
                                                                                                Role.FFN_OUTPUT))

    def ffn_alive(self, stats: Statistics, block: str) -> torch.Tensor:
        """How many FFN units of ``block`` have a connection >= epsilon both in and out (0-d, on the device)."""
        return ((self.unit_connections(stats, block, Role.FFN_INPUT)[0] > 0)
                & (self.unit_connections(stats, block, Role.FFN_OUTPUT)[0] > 0)).sum()


def overall_sparsity(sparsity: dict[str, tuple[float, int]]) -> float:
    """The weight sparsity over all blocks of per-block (zeros, weights)."""
    return sum(z for z, _ in sparsity.values()) / max(sum(w for _, w in sparsity.values()), 1)


def _numel(param: torch.nn.Parameter) -> int:
    return int(param.ds_numel) if hasattr(param, "ds_id") else param.numel()
