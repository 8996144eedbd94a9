"""The structure NeuroPrune removes: redundant heads (KV groups) and weak FFN units, their masks and pruning.

A pruned unit stays exactly zero: its Q, K, V rows (and biases) and output-projection columns, or its FFN
input rows (and biases) and output column, are zeroed in the weights, the fp32 master and every optimizer
moment when it is pruned and after every optimizer step, and its gradients before every step. Masks are
monotone: a pruned unit never comes back. Head pruning gathers one attention block at a time and follows rank
0's decision (docs/algorithm.md section 4); FFN units are pruned from all-reduced connection counts, which
are identical on every rank, or, under a structural target, by rank 0's ranking, broadcast (docs/sparsity.md).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from neuroprune_ds.arch import AttentionBlock, FFNBlock, ResolvedArchitecture
from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.flat_slice import COL, ROW, FlatSlice
from neuroprune_ds.heads import decide_redundant_units, fold_output_projection
from neuroprune_ds.zero_access import ZeroAccess

MaskEntry = tuple[str, str, torch.Tensor]
"""(parameter name, axis, 0/1 keep vector along that axis)."""


class Structure:
    """Which heads (KV groups) and FFN units are alive, on a DeepSpeed engine's shards.

    Args:
        access: the engine's shards.
        params: the model's parameters by name.
        arch: the resolved blocks.
        config: the NeuroPrune settings (theta, theta_mode, fold, prune_heads, prune_ffn_units_below).
    """

    def __init__(self, access: ZeroAccess, params: dict[str, torch.nn.Parameter], arch: ResolvedArchitecture,
                 config: NeuroPruneConfig):
        self.access, self.params, self.arch, self.config = access, params, arch, config
        device = access.device  # of every mask, as of every tensor the pruner keeps
        self.alive = {block.name: torch.ones(block.num_units, dtype=torch.bool, device=device)
                      for block in arch.attention}
        self.ffn_kept = {block.name: torch.ones(block.width, dtype=torch.bool, device=device) for block in arch.ffn}
        self.closest_pairs: dict[str, tuple[float, float]] = {}  # block -> (closest unit distance, theta used)
        taylor = config.prune_ffn_units_fraction is not None and config.ffn_unit_score == "taylor"
        self.ffn_saliency = {block.name: torch.zeros(block.width, dtype=torch.float64, device=device)
                             for block in arch.ffn} if taylor else {}
        """Per FFN block, each unit's (w * g)^2 summed over its weights and the optimizer steps so far (the
        'taylor' score of prune_ffn_units_fraction; identical on every rank, empty when not used)."""

    # -- masks -----------------------------------------------------------------------------------------
    @property
    def blocks(self) -> tuple[AttentionBlock | FFNBlock, ...]:
        """Every block that has a mask: attention blocks, then FFN blocks."""
        return self.arch.attention + self.arch.ffn

    def intact(self) -> torch.Tensor:
        """Per block of :attr:`blocks`, True when nothing of it is pruned (bool, on the device: no host sync)."""
        masks = [self.alive[b.name] for b in self.arch.attention] + [self.ffn_kept[b.name] for b in self.arch.ffn]
        if not masks:
            return torch.ones(0, dtype=torch.bool, device=self.access.device)
        return torch.stack([mask.all() for mask in masks])

    def pruned_blocks(self, intact: list[float] | None = None) -> list[AttentionBlock | FFNBlock]:
        """The blocks with pruned units, from :meth:`intact`'s values on the host (read now when None: one sync)."""
        intact = self.intact().tolist() if intact is None else intact
        return [block for block, whole in zip(self.blocks, intact) if not whole]

    def mask(self, blocks: list[AttentionBlock | FFNBlock], grads: bool) -> None:
        """Zero the pruned units of ``blocks``: their gradients, or their weights, fp32 master and moments."""
        for block in blocks:
            entries = self.mask_entries(block) if isinstance(block, AttentionBlock) else self.ffn_mask_entries(block)
            for name, axis, keep in entries:
                def zero(tensor: torch.Tensor, piece: FlatSlice, axis=axis, keep=keep) -> None:
                    piece.scale_(tensor, keep, axis)

                if grads:
                    self.access.edit_grad(self.params[name], zero)
                else:
                    self.access.edit_weights(self.params[name], zero, moments=True)

    def mask_entries(self, block: AttentionBlock) -> Iterator[MaskEntry]:
        """What a head mask zeroes: the Q, K, V rows (and biases) and output-projection columns of pruned units."""
        layout, alive = block.layout, self.alive[block.name]
        q_keep, kv_keep = layout.q_keep(alive), layout.kv_keep(alive)
        for linear, keep in ((block.q, q_keep), (block.k, kv_keep), (block.v, kv_keep)):
            yield linear.weight, ROW, keep
            if linear.bias:
                yield linear.bias, ROW, keep
        yield block.o.weight, COL, q_keep

    def ffn_mask_entries(self, block: FFNBlock) -> Iterator[MaskEntry]:
        """What an FFN unit mask zeroes: the input rows (and biases) and the output column of pruned units."""
        keep = self.ffn_kept[block.name].to(dtype=torch.float32)
        for linear in block.inputs:
            yield linear.weight, ROW, keep
            if linear.bias:
                yield linear.bias, ROW, keep
        yield block.output.weight, COL, keep

    # -- pruning ---------------------------------------------------------------------------------------
    def prune_heads(self, should_stop: Callable[[], bool] | None = None) -> dict[str, dict[int, int]]:
        """Redundant-head pruning on every attention block, one block's gathered weights at a time (collective).

        Args:
            should_stop: asked before each block (collective: every rank asks at the same blocks, e.g. the
                agreed preemption flag); when it returns True the pass ends there. The blocks done stay
                pruned; the others are pruned at the next scheduled pass.

        Returns:
            Per block, the units pruned now and the unit that absorbed each (identical on every rank).
        """
        if not self.config.prune_heads:
            return {}
        changes = {}
        for block in self.arch.attention:
            if should_stop is not None and should_stop():
                break
            newly_pruned = self._decide(block)
            if not newly_pruned:
                continue
            if self.config.fold == "output_projection":
                self._fold(block, newly_pruned)
            for i in newly_pruned:
                self.alive[block.name][i] = False
            self.mask([block], grads=False)
            changes[block.name] = newly_pruned
        return changes

    def _decide(self, block: AttentionBlock) -> dict[int, int]:
        """Rank 0's decision for ``block``, on every rank: live unit pruned now -> the unit that absorbs it."""
        q, k, v = (self.access.full_fp32(self.params[lin.weight]) for lin in (block.q, block.k, block.v))
        decision = decide_redundant_units(q, k, v, block.layout, self.alive[block.name], self.config.theta,
                                          relative=self.config.theta_mode == "relative")
        self.closest_pairs[block.name] = (decision.closest_distance, decision.theta)
        del q, k, v
        survivor = torch.arange(block.num_units, device=self.access.device)
        for pruned, kept in decision.replaced_by.items():
            survivor[pruned] = kept
        survivor = self.access.broadcast(survivor)  # rank 0 decides for everyone
        replaced_by = {i: int(j) for i, j in enumerate(survivor.tolist()) if i != j}
        return {i: j for i, j in replaced_by.items() if self.alive[block.name][i]}

    def _fold(self, block: AttentionBlock, replaced_by: dict[int, int]) -> None:
        param = self.params[block.o.weight]
        folded = fold_output_projection(self.access.full_fp32(param), replaced_by, block.layout).view(-1)

        def write(tensor: torch.Tensor, piece: FlatSlice) -> None:
            tensor.copy_(folded[piece.offset:piece.offset + piece.numel])

        self.access.edit_weights(param, write)

    def prune_ffn_units(self, connectivity: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        """Prune the FFN units whose connectivity is below ``prune_ffn_units_below``; masks stay pruned.

        Args:
            connectivity: per FFN block, each unit's smaller fractional connectivity (in or out), from
                all-reduced counts, so identical on every rank: nothing needs a broadcast.

        Returns:
            Per FFN block, the units pruned now.
        """
        threshold = self.config.prune_ffn_units_below
        changes = {}
        for block in self.arch.ffn:
            weak = (connectivity[block.name] < threshold).to(self.access.device) & self.ffn_kept[block.name]
            if not bool(weak.any()):
                continue
            self.ffn_kept[block.name] &= ~weak
            self.mask([block], grads=False)
            changes[block.name] = torch.nonzero(weak).flatten().tolist()
        return changes

    def add_saliency(self, summed: torch.Tensor) -> None:
        """Add one step's all-reduced :meth:`~neuroprune_ds.group_statistics.GroupStatistics.unit_saliency`."""
        for block, part in zip(self.arch.ffn, summed.split([block.width for block in self.arch.ffn])):
            self.ffn_saliency[block.name] += part

    def prune_ffn_units_to_share(self, share: float, order: dict[str, torch.Tensor]) -> dict[str, list[int]]:
        """Per FFN block, prune the first live units of ``order`` until floor(share * width) units are pruned
        (collective: rank 0's masks are broadcast, so every rank prunes the same units whatever rounding its
        scores saw). Units already pruned count towards the share; masks stay pruned.

        Args:
            share: the share of every block's units to be pruned once this returns.
            order: per FFN block, its units from the least to the most important (on the device).

        Returns:
            Per FFN block, the units pruned now.
        """
        kept_before = {block.name: self.ffn_kept[block.name].clone() for block in self.arch.ffn}
        pruned_counts = torch.stack([(~kept).sum() for kept in kept_before.values()]).tolist() if kept_before else []
        for block, pruned in zip(self.arch.ffn, pruned_counts):
            extra = int(share * block.width) - pruned
            if extra > 0:
                ranked = order[block.name]
                live = ranked[self.ffn_kept[block.name][ranked]]
                self.ffn_kept[block.name][live[:extra]] = False
        if not self.arch.ffn:
            return {}
        masks = self.access.broadcast(torch.cat([self.ffn_kept[b.name] for b in self.arch.ffn]).to(torch.uint8))
        changes = {}
        for block, mask in zip(self.arch.ffn, masks.split([b.width for b in self.arch.ffn])):
            self.ffn_kept[block.name] = mask.bool()
            newly = kept_before[block.name] & ~self.ffn_kept[block.name]
            if bool(newly.any()):
                self.mask([block], grads=False)
                changes[block.name] = torch.nonzero(newly).flatten().tolist()
        return changes

    # -- state -----------------------------------------------------------------------------------------
    def load_masks(self, alive: dict[str, torch.Tensor], ffn_kept: dict[str, torch.Tensor], device) -> None:
        """Restore saved masks onto ``device`` (a state without FFN masks, from before FFN unit pruning, keeps
        every unit); the blocks must match this model's."""
        missing = set(self.alive) ^ set(alive)
        if missing:
            raise ValueError(f"pruner state does not match this model: blocks differ: {sorted(missing)[:4]}")
        unknown = set(ffn_kept) - set(self.ffn_kept)
        if unknown:
            raise ValueError(f"pruner state does not match this model: FFN blocks differ: {sorted(unknown)[:4]}")
        for name, mask in ffn_kept.items():
            if mask.numel() != self.ffn_kept[name].numel():
                raise ValueError(f"pruner state does not match this model: FFN block {name} has "
                                 f"{mask.numel()} units saved, {self.ffn_kept[name].numel()} in the model")
        self.alive = {name: mask.to(device, dtype=torch.bool, copy=True) for name, mask in alive.items()}
        for name, mask in ffn_kept.items():
            self.ffn_kept[name] = mask.to(device, dtype=torch.bool, copy=True)
