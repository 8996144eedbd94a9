"""NeuroPrune bound to a live DeepSpeed engine (ZeRO stages 0-3, fp32 or bf16).

Per optimizer step, the pruner reads only this rank's shard of each penalised weight, computes per-group
statistics (L1 norms and connection counts per FFN unit / attention input dimension), sums them over ranks
in ONE coalesced all-reduce of O(sum of rows + columns) floats, and adds the penalty gradients to this rank's
gradient shard between ``engine.backward`` and ``engine.step`` (so gradient clipping and the optimizer see
task loss + penalty, exactly as if the penalty were in the loss). Head pruning gathers one attention block
at a time, decides on rank 0, broadcasts, folds and masks. Pruned heads stay exactly zero in the parameters,
the fp32 master and the optimizer moments.

Usage::

    pruner = NeuroPruner(engine, run.neuroprune)
    loss = engine(**batch).loss
    engine.backward(loss)
    pruner.after_backward()
    engine.step()
    pruner.after_step()
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neuroprune_ds.arch import AttentionBlock, FFNBlock, resolve_architecture
from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.flat_slice import COL, ROW, FlatSlice
from neuroprune_ds.heads import UnitLayout, decide_redundant_units, fold_output_projection
from neuroprune_ds.sparsity_control import BINS, SparsityController, add_ratio_histogram_
from neuroprune_ds.penalties import (GroupMember, GroupStats, add_penalty_grad_, attention_group_scale,
                                     attention_penalty_value, degree_weights, group_stats, mlp_penalty_value)
from neuroprune_ds.zero_access import ZeroAccess


@dataclass(frozen=True, slots=True)
class GroupSet:
    """Weight matrices sharing group indices, with what the pruner does with them.

    kind: 'mlp' (degree-weighted L1), 'attn' (l1^(1/2) over input dimensions), or 'count' (statistics for
    metrics only).
    """

    key: str
    block: str
    kind: str
    members: tuple[tuple[str, str], ...]  # (parameter name, axis)


def _layout(block: AttentionBlock) -> UnitLayout:
    return UnitLayout(block.num_units, block.heads_per_unit, block.head_dim)


def build_group_sets(arch, mlp_groups: str) -> list[GroupSet]:
    """The group sets of a resolved architecture (see ALGORITHM.md sections 1 and 2)."""
    sets = []
    for block in arch.ffn:
        inputs = tuple((linear.weight, ROW) for linear in block.inputs)
        output = ((block.output.weight, COL),)
        if mlp_groups == "neuron":
            sets.append(GroupSet(f"{block.name}:in", block.name, "mlp", inputs))
            sets.append(GroupSet(f"{block.name}:out", block.name, "mlp", output))
        else:  # output_rows: every row of every FFN weight is its own group
            for name, _ in inputs + ((block.output.weight, ROW),):
                sets.append(GroupSet(f"{name}:rows", block.name, "mlp", ((name, ROW),)))
            sets.append(GroupSet(f"{block.name}:out", block.name, "count", output))
    for block in arch.attention:
        sets.append(GroupSet(f"{block.name}:qkv", block.name, "attn",
                             tuple((linear.weight, COL) for linear in (block.q, block.k, block.v))))
        sets.append(GroupSet(f"{block.name}:o", block.name, "count", ((block.o.weight, ROW),)))
    return sets


class NeuroPruner:
    """NeuroPrune's penalties, masks and head pruning on a DeepSpeed engine.

    Args:
        engine: the engine returned by ``deepspeed.initialize`` (any ZeRO stage; fp32 or bf16).
        config: the NeuroPrune settings.

    Raises:
        ValueError: the model's architecture is not supported, or target/exclude patterns match nothing.
    """

    def __init__(self, engine, config: NeuroPruneConfig):
        self.engine = engine
        self.config = config
        self.access = ZeroAccess(engine)
        self.arch = resolve_architecture(engine.module, config)
        self.params = dict(engine.module.named_parameters())
        self.group_sets = build_group_sets(self.arch, config.mlp_groups)
        self.alive = {block.name: torch.ones(block.num_units, dtype=torch.bool) for block in self.arch.attention}
        self.optimizer_steps = 0
        self.omega: dict[str, torch.Tensor] = {}
        self.last_penalties = {"mlp": 0.0, "attn": 0.0}
        self.lambda_multiplier = 1.0
        self.measured_sparsity = 0.0
        self.controller = SparsityController(config.controller_gain)
        self._penalty_factors: dict[str, torch.Tensor] = {}  # last step's per-group factor of each penalised set
        self._boundary_pending = False
        self._signs_before_step: dict[str, torch.Tensor] = {}  # sign of each penalised weight before the step
        self._partitioned = any(self.access.is_partitioned(p) for p in self.params.values())

    # -- the per-step hooks ----------------------------------------------------------------------------
    def lambda_scale(self) -> float:
        """The factor applied to both lambdas now: linear warm-up times the target-sparsity controller's."""
        warmup = self.config.lambda_warmup_steps
        ramp = 1.0 if warmup <= 0 else min(1.0, self.optimizer_steps / warmup)
        return ramp * self.lambda_multiplier

    def target_now(self) -> float:
        """The controller's target at the current step: a cubic ramp from 0 to ``target_sparsity``."""
        ramp = self.config.target_ramp_steps
        progress = 1.0 if ramp <= 0 else min(1.0, self.optimizer_steps / ramp)
        return self.config.target_sparsity * (1.0 - (1.0 - progress) ** 3)

    def _control(self, stats: dict[str, GroupStats], hist: torch.Tensor | None) -> None:
        """Set the lambda scale for the target sparsity (see neuroprune_ds.sparsity_control); same on all ranks."""
        sparsity = self._block_sparsity(stats)
        zeros, total = sum(z for z, _ in sparsity.values()), max(sum(w for _, w in sparsity.values()), 1)
        self.measured_sparsity = zeros / total
        penalised = [s for s in self.group_sets if s.kind in ("mlp", "attn")]
        zeros_unpenalised = sum(_numel(self.params[s.members[0][0]]) - float(stats[s.key].nonzero.sum())
                                for s in self.group_sets if s.key.endswith(":o"))
        n_penalised = sum(_numel(self.params[name]) for s in penalised for name, _ in s.members)
        target = self.target_now()
        needed = (target * total - zeros_unpenalised) / max(n_penalised, 1)
        self.lambda_multiplier = self.controller.update(hist, needed, target, self.measured_sparsity)

    def _ratio_histogram(self) -> torch.Tensor:
        """This rank's histogram of |task gradient| / (lambda * group factor) over its penalised shards."""
        hist = torch.zeros(BINS, dtype=torch.float64)
        for group_set in self.group_sets:
            if group_set.key not in self._penalty_factors:
                continue
            lam = self.config.mlp_lambda if group_set.kind == "mlp" else self.config.attn_lambda
            inverse = 1.0 / (lam * self._penalty_factors[group_set.key])
            for name, axis in group_set.members:
                param = self.params[name]
                add_ratio_histogram_(hist, self.access.local_grad(param), self.access.local_slice(param), axis,
                                     inverse)
        return hist

    def after_backward(self) -> None:
        """Add the penalty gradients and mask pruned heads' gradients; call after every ``engine.backward``.

        Acts only at a gradient-accumulation boundary, on the reduced gradient shards.
        """
        if not self.engine.is_gradient_accumulation_boundary():
            return
        self._boundary_pending = True
        if not self.config.enabled:
            return
        controlled = self.config.target_sparsity is not None
        local = self._local_statistics(("mlp", "attn", "count") if controlled else ("mlp", "attn"))
        hist = self._ratio_histogram() if controlled and self._penalty_factors else None
        stats, hist = self._reduce(local, hist)
        if controlled:
            self._control(stats, hist)
        if not self.omega or self.optimizer_steps % self.config.degree_every == 0:
            self.omega = {s.key: degree_weights(stats[s.key], self.config.c_min)
                          for s in self.group_sets if s.kind == "mlp"}
        scale = self.lambda_scale()
        penalties = {"mlp": 0.0, "attn": 0.0}
        for group_set in self.group_sets:
            if group_set.kind in ("mlp", "attn") and self.config.penalty == "l1":
                per_group = torch.ones_like(stats[group_set.key].l1)  # plain L1: the same factor everywhere
                lam = (self.config.mlp_lambda if group_set.kind == "mlp" else self.config.attn_lambda) * scale
                penalties[group_set.kind] += float(stats[group_set.key].l1.sum())
            elif group_set.kind == "mlp":
                per_group, lam = self.omega[group_set.key], self.config.mlp_lambda * scale
                penalties["mlp"] += mlp_penalty_value(stats[group_set.key], per_group)
            elif group_set.kind == "attn":
                per_group = attention_group_scale(stats[group_set.key], self.config.delta)
                lam = self.config.attn_lambda * scale
                penalties["attn"] += attention_penalty_value(stats[group_set.key], self.config.delta)
            else:
                continue
            self._penalty_factors[group_set.key] = per_group
            if lam:
                for name, axis in group_set.members:
                    self._add_penalty_grad(name, axis, per_group, lam)
        self.last_penalties = penalties
        self._mask(grads=True)
        if self.config.stop_at_zero:
            self._signs_before_step = {name: torch.sign(self.access.working(self.params[name])[0]).to(torch.int8)
                                       for name in self._penalised_names()}

    def after_step(self) -> None:
        """Keep pruned weights exactly zero and run step-scheduled head pruning; call after every ``engine.step``."""
        if not self._boundary_pending:
            return
        self._boundary_pending = False
        self.optimizer_steps += 1
        if not self.config.enabled:
            return
        self._stop_at_zero()
        self._mask(grads=False)
        every = self.config.prune_every_steps
        if every and self.optimizer_steps % every == 0 and self.optimizer_steps >= self.config.prune_start_step:
            self.prune_heads()

    def on_epoch_end(self) -> None:
        """Head pruning at an epoch end (the paper's schedule, used when ``prune_every_steps`` is 0)."""
        started = self.optimizer_steps >= self.config.prune_start_step
        if self.config.enabled and self.config.prune_every_steps == 0 and started:
            self.prune_heads()

    # -- statistics ------------------------------------------------------------------------------------
    def statistics(self) -> dict[str, GroupStats]:
        """Per-group statistics of every group set, summed over ranks in one all-reduce (collective)."""
        return self._reduce(self._local_statistics(("mlp", "attn", "count")))[0]

    def _local_statistics(self, kinds: tuple[str, ...]) -> dict[str, GroupStats]:
        local = {}
        for group_set in self.group_sets:
            if group_set.kind in kinds:
                members = [GroupMember(self.access.master(self.params[name]),
                                       self.access.local_slice(self.params[name]), axis)
                           for name, axis in group_set.members]
                local[group_set.key] = group_stats(members, self.config.epsilon)
        return local

    def _reduce(self, local: dict[str, GroupStats], extra: torch.Tensor | None = None):
        """Sum local statistics (and an optional extra float64 tensor) over ranks in ONE all-reduce."""
        if not self._partitioned:
            return local, extra
        flat = [t for s in local.values() for t in (s.l1, s.nonzero)] + ([extra] if extra is not None else [])
        reduced = self.access.all_reduce_sum(flat)
        pieces = iter(reduced)
        stats = {key: GroupStats(next(pieces), next(pieces), s.connections) for key, s in local.items()}
        return stats, (reduced[-1] if extra is not None else None)

    def _add_penalty_grad(self, name: str, axis: str, per_group: torch.Tensor, lam: float) -> None:
        param = self.params[name]
        master = self.access.master(param)

        def add(grad: torch.Tensor, piece: FlatSlice) -> None:
            add_penalty_grad_(grad, GroupMember(master, piece, axis), per_group, lam)

        self.access.edit_grad(param, add)

    def _penalised_names(self) -> list[str]:
        return [name for s in self.group_sets if s.kind in ("mlp", "attn") for name, _ in s.members]

    def _stop_at_zero(self) -> None:
        """Penalised weights whose step crossed zero become exactly 0, with their first moment (see config)."""
        signs_before, self._signs_before_step = self._signs_before_step, {}
        for name, before in signs_before.items():
            param = self.params[name]
            now, covered = self.access.working(param)
            crossed = torch.sign(now).to(torch.int8).mul_(before).lt(0)

            def clear(tensor: torch.Tensor, piece: FlatSlice, crossed=crossed, start=covered.offset) -> None:
                mask = crossed[piece.offset - start:piece.offset - start + piece.numel]
                tensor.masked_fill_(mask.to(tensor.device), 0)  # the master may be offloaded to CPU

            self.access.edit_weights(param, clear, moments=("exp_avg",))

    # -- masks -----------------------------------------------------------------------------------------
    def _mask_entries(self, block: AttentionBlock):
        layout, alive = _layout(block), self.alive[block.name]
        q_keep, kv_keep = layout.q_keep(alive), layout.kv_keep(alive)
        for linear, keep in ((block.q, q_keep), (block.k, kv_keep), (block.v, kv_keep)):
            yield linear.weight, ROW, keep
            if linear.bias:
                yield linear.bias, ROW, keep
        yield block.o.weight, COL, q_keep

    def _mask(self, grads: bool, blocks: list[AttentionBlock] | None = None) -> None:
        for block in blocks or self.arch.attention:
            if bool(self.alive[block.name].all()):
                continue
            for name, axis, keep in self._mask_entries(block):
                def zero(tensor: torch.Tensor, piece: FlatSlice, axis=axis, keep=keep) -> None:
                    piece.scale_(tensor, keep, axis)

                if grads:
                    self.access.edit_grad(self.params[name], zero)
                else:
                    self.access.edit_weights(self.params[name], zero, moments=True)

    # -- head pruning ----------------------------------------------------------------------------------
    def prune_heads(self) -> dict[str, dict[int, int]]:
        """Redundant-head pruning on every attention block, one block's gathered weights at a time.

        Returns:
            Per block, the units pruned now and the unit that absorbed each (identical on every rank).
        """
        if not self.config.prune_heads:
            return {}
        changes = {}
        for block in self.arch.attention:
            q, k, v = (self.access.full_fp32(self.params[lin.weight]) for lin in (block.q, block.k, block.v))
            decision = decide_redundant_units(q, k, v, _layout(block), self.alive[block.name], self.config.theta)
            del q, k, v
            survivor = torch.arange(block.num_units)
            for pruned, kept in decision.replaced_by.items():
                survivor[pruned] = kept
            survivor = self.access.broadcast(survivor)  # rank 0 decides for everyone
            replaced_by = {i: int(j) for i, j in enumerate(survivor.tolist()) if i != j}
            newly_pruned = {i: j for i, j in replaced_by.items() if self.alive[block.name][i]}
            if not newly_pruned:
                continue
            if self.config.fold == "output_projection":
                self._fold(block, newly_pruned)
            for i in newly_pruned:
                self.alive[block.name][i] = False
            self._mask(grads=False, blocks=[block])
            changes[block.name] = newly_pruned
        return changes

    def _fold(self, block: AttentionBlock, replaced_by: dict[int, int]) -> None:
        param = self.params[block.o.weight]
        folded = fold_output_projection(self.access.full_fp32(param), replaced_by, _layout(block)).view(-1)

        def write(tensor: torch.Tensor, piece: FlatSlice) -> None:
            tensor.copy_(folded[piece.offset:piece.offset + piece.numel])

        self.access.edit_weights(param, write)

    # -- reporting -------------------------------------------------------------------------------------
    def metrics(self) -> dict[str, float]:
        """Scalars for logging (collective: every rank calls it). No weights are gathered."""
        stats = self.statistics()
        out = {"neuroprune/penalty_mlp": self.last_penalties["mlp"],
               "neuroprune/penalty_attn": self.last_penalties["attn"],
               "neuroprune/lambda_scale": self.lambda_scale()}
        if self.config.target_sparsity is not None:
            out["neuroprune/target_sparsity"] = self.target_now()
            out["neuroprune/controller_integral"] = self.controller.integral
            out["neuroprune/pushed_fraction"] = self.controller.pushed_fraction
        zeros_total, weights_total = 0.0, 0
        for block, (zeros, weights) in self._block_sparsity(stats).items():
            out[f"sparsity/weight/{block}"] = zeros / weights
            zeros_total, weights_total = zeros_total + zeros, weights_total + weights
        out["sparsity/weight"] = zeros_total / max(weights_total, 1)
        for block in self.arch.attention:
            out[f"heads_kept/{block.name}"] = float(self.alive[block.name].sum()) * block.heads_per_unit
        for block, alive in self.ffn_alive(stats).items():
            out[f"ffn_alive/{block}"] = float(alive)
        return out

    def _block_sparsity(self, stats) -> dict[str, tuple[float, int]]:
        """Per block: (weights with |w| < epsilon, all weights) of its penalised matrices."""
        counted = {}
        for group_set in self.group_sets:
            if group_set.kind == "count" and group_set.key.endswith(":out"):
                continue  # output_rows mode: the output projection is already counted by its row set
            nonzero = float(stats[group_set.key].nonzero.sum())
            weights = sum(_numel(self.params[name]) for name, _ in group_set.members)
            zeros_before, weights_before = counted.get(group_set.block, (0.0, 0))
            counted[group_set.block] = (zeros_before + weights - nonzero, weights_before + weights)
        return counted

    def _input_degrees(self, stats: dict[str, GroupStats], block: FFNBlock) -> torch.Tensor:
        """Per unit of ``block``: connections with |w| >= epsilon over all its input projections."""
        return sum(stats[s.key].nonzero for s in self.group_sets
                   if s.block == block.name and s.members[0][1] == ROW and s.members[0][0] != block.output.weight)

    def ffn_alive(self, stats: dict[str, GroupStats] | None = None) -> dict[str, int]:
        """FFN units with at least one connection >= epsilon both in and out (collective when stats is None)."""
        stats = stats or self.statistics()
        return {block.name: int(((self._input_degrees(stats, block) > 0)
                                 & (stats[f"{block.name}:out"].nonzero > 0)).sum())
                for block in self.arch.ffn}

    def ffn_degrees(self) -> dict[str, torch.Tensor]:
        """Per FFN block, each unit's number of input connections with |w| >= epsilon (collective)."""
        stats = self.statistics()
        return {block.name: self._input_degrees(stats, block) for block in self.arch.ffn}

    def summary(self) -> dict:
        """What is pruned, JSON-serialisable (collective)."""
        stats = self.statistics()
        alive = self.ffn_alive(stats)
        sparsity = self._block_sparsity(stats)
        zeros = sum(z for z, _ in sparsity.values())
        weights = sum(w for _, w in sparsity.values())
        return {
            "attention": [{"name": b.name, "stack": b.stack, "layer": b.layer, "kind": b.kind,
                           "num_units": b.num_units, "heads_per_unit": b.heads_per_unit,
                           "kept_units": torch.nonzero(self.alive[b.name]).flatten().tolist()}
                          for b in self.arch.attention],
            "ffn": [{"name": b.name, "stack": b.stack, "layer": b.layer, "width": b.width,
                     "alive_units": alive[b.name]} for b in self.arch.ffn],
            "weight_sparsity": zeros / max(weights, 1),
        }

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Masks and schedule position (the degree weights are recomputed from the weights)."""
        return {"alive": {name: mask.clone() for name, mask in self.alive.items()},
                "optimizer_steps": self.optimizer_steps,
                "lambda_multiplier": self.lambda_multiplier,
                "controller": self.controller.state_dict(),
                "penalty_factors": {key: value.clone() for key, value in self._penalty_factors.items()},
                "omega": {key: value.clone() for key, value in self.omega.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output; the blocks must match this model's."""
        missing = set(self.alive) ^ set(state["alive"])
        if missing:
            raise ValueError(f"pruner state does not match this model: blocks differ: {sorted(missing)[:4]}")
        self.alive = {name: mask.clone().bool() for name, mask in state["alive"].items()}
        self.optimizer_steps = int(state["optimizer_steps"])
        self.lambda_multiplier = float(state.get("lambda_multiplier", 1.0))
        if "controller" in state:
            self.controller.load_state_dict(state["controller"])
        self._penalty_factors = {key: value.clone() for key, value in state.get("penalty_factors", {}).items()}
        self.omega = {key: value.clone() for key, value in state.get("omega", {}).items()}


def _numel(param: torch.nn.Parameter) -> int:
    return int(param.ds_numel) if hasattr(param, "ds_id") else param.numel()
