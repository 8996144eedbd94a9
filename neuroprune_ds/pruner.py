"""NeuroPrune bound to a live DeepSpeed engine (ZeRO stages 0-3, fp32 or bf16).

Per optimizer step, the pruner reads only this rank's shard of each penalised weight, computes per-group
statistics (L1 norms and connection counts per FFN unit / attention input dimension), sums them over ranks
in ONE coalesced all-reduce of O(sum of rows + columns) floats, and adds the penalty gradients to this rank's
gradient shard between ``engine.backward`` and ``engine.step`` (so gradient clipping and the optimizer see
task loss + penalty, exactly as if the penalty were in the loss). Head pruning gathers one attention block
at a time, decides on rank 0, broadcasts, folds and masks. Pruned heads stay exactly zero in the parameters,
the fp32 master and the optimizer moments.

With ``update: decoupled`` the penalties are instead a proximal soft-threshold step on this rank's fp32
master after ``engine.step`` (the same single all-reduce, then); ``recover_steps`` ends a run with the support
frozen and the penalty off; ``prune_ffn_units_below`` prunes weakly connected FFN units like heads
(docs/sparsity.md).

Usage::

    pruner = NeuroPruner(engine, run.neuroprune)
    loss = engine(**batch).loss
    engine.backward(loss)
    pruner.after_backward()
    engine.step()
    pruner.after_step()
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from neuroprune_ds.arch import AttentionBlock, FFNBlock, resolve_architecture
from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.flat_slice import COL, ROW, FlatSlice
from neuroprune_ds.heads import UnitLayout, decide_redundant_units, fold_output_projection
from neuroprune_ds.sparsity_control import (BINS, SAMPLE_STRIDE, SparsityController, add_ratio_histogram_,
                                            add_sampled_ratio_histogram_)
from neuroprune_ds.penalties import (GroupMember, GroupStats, add_penalty_grad_, attention_group_scale,
                                     attention_penalty_value, degree_weights, group_stats, mlp_penalty_value,
                                     soft_threshold_)
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
    """The group sets of a resolved architecture (see docs/algorithm.md sections 1 and 2)."""
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
        self.device = self.access.device  # of every tensor the pruner keeps: masks, factors, degree weights
        self.arch = resolve_architecture(engine.module, config)
        self.params = dict(engine.module.named_parameters())
        self.group_sets = build_group_sets(self.arch, config.mlp_groups)
        self.alive = {block.name: torch.ones(block.num_units, dtype=torch.bool, device=self.device)
                      for block in self.arch.attention}
        self.optimizer_steps = 0
        self.omega: dict[str, torch.Tensor] = {}
        self.last_penalties = {"mlp": 0.0, "attn": 0.0}
        self.lambda_multiplier = 1.0
        self.measured_sparsity = 0.0
        self.controller = SparsityController(config.controller_gain)
        self._penalty_factors: dict[str, torch.Tensor] = {}  # last step's per-group factor of each penalised set
        self._boundary_pending = False
        self._signs_before_step: dict[str, torch.Tensor] = {}  # of the master slices the current step updates
        self._partitioned = any(self.access.is_partitioned(p) for p in self.params.values())
        self.ffn_kept = {block.name: torch.ones(block.width, dtype=torch.bool, device=self.device)
                         for block in self.arch.ffn}
        self.closest_pairs: dict[str, tuple[float, float]] = {}  # block -> (closest unit distance, theta used)
        self.total_steps: int | None = None
        """The run's optimizer steps; ``recover_steps`` needs it (the trainer and the HF callback set it)."""
        self._decoupled_step = _DecoupledStep()
        if config.enabled and config.stop_at_zero and config.update == "gradient":
            self.access.around_master_steps(self._record_signs, self._stop_at_zero)

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

    def _ratio_histogram(self, displacement: dict[str, torch.Tensor] | None = None, lr: float = 1.0) -> torch.Tensor:
        """This rank's histogram of |task gradient| / (lambda * group factor) over its penalised shards, or, given
        ``displacement`` (the decoupled mode's |optimizer step| per parameter, sampled), of it / (lr * lambda * f)."""
        hist = torch.zeros(BINS, dtype=torch.float64, device=self.device)
        for group_set in self.group_sets:
            if group_set.key not in self._penalty_factors:
                continue
            lam = self.config.mlp_lambda if group_set.kind == "mlp" else self.config.attn_lambda
            inverse = 1.0 / (lr * lam * self._penalty_factors[group_set.key])
            for name, axis in group_set.members:
                param = self.params[name]
                if displacement is None:
                    add_ratio_histogram_(hist, self.access.local_grad(param), self.access.local_slice(param), axis,
                                         inverse)
                else:
                    add_sampled_ratio_histogram_(hist, displacement[name], self.access.local_slice(param), axis,
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
        if self.config.update == "decoupled" or self.recovering():
            self._before_step_without_penalty_gradient()
            return
        controlled = self.config.target_sparsity is not None
        local = self._local_statistics(("mlp", "attn", "count") if controlled else ("mlp", "attn"))
        hist = self._ratio_histogram() if controlled and self._penalty_factors else None
        stats, hist = self._reduce(local, hist)
        if controlled:
            self._control(stats, hist)
        terms, self.last_penalties = self._penalty_terms(stats, stats)
        for group_set, per_group, lam in terms:
            self._penalty_factors[group_set.key] = per_group
            if lam:
                for name, axis in group_set.members:
                    self._add_penalty_grad(name, axis, per_group, lam)
        self._mask(grads=True)
        self._mask_ffn_units(grads=True)

    def after_step(self, should_stop: Callable[[], bool] | None = None) -> None:
        """Keep pruned weights exactly zero and run step-scheduled head pruning; call after every ``engine.step``.

        ``should_stop`` is passed to :meth:`prune_heads`."""
        if not self._boundary_pending:
            return
        self._boundary_pending = False
        if self.config.enabled and self.config.update == "decoupled" and not self.recovering():
            self._proximal_step()
        self.optimizer_steps += 1
        if not self.config.enabled:
            return
        self._mask(grads=False)
        self._mask_ffn_units(grads=False)
        if self.config.recover_steps and self.optimizer_steps == self._recovery_start():
            self._start_recovery()
        every = self.config.prune_every_steps
        if every and self.optimizer_steps % every == 0 and self.optimizer_steps >= self.config.prune_start_step:
            self.prune_structure(should_stop)

    def on_epoch_end(self, should_stop: Callable[[], bool] | None = None) -> None:
        """Head pruning at an epoch end (the paper's schedule, used when ``prune_every_steps`` is 0)."""
        started = self.optimizer_steps >= self.config.prune_start_step
        if self.config.enabled and self.config.prune_every_steps == 0 and started:
            self.prune_structure(should_stop)

    def prune_structure(self, should_stop: Callable[[], bool] | None = None) -> dict[str, dict]:
        """Redundant heads, then FFN units below ``prune_ffn_units_below`` (collective); never while recovering.
        ``should_stop`` is checked between attention blocks and before the FFN units (see :meth:`prune_heads`).

        Returns:
            'heads': :meth:`prune_heads`' result; 'ffn_units': :meth:`prune_ffn_units`' result.
        """
        if self.recovering():
            return {"heads": {}, "ffn_units": {}}
        heads = self.prune_heads(should_stop)
        stopped = should_stop is not None and should_stop()
        return {"heads": heads, "ffn_units": {} if stopped else self.prune_ffn_units()}

    def _penalty_terms(self, stats: dict[str, GroupStats], attention_stats: dict[str, GroupStats]):
        """Per penalised group set (set, per-group factor f, lambda now), and the penalty values of ``stats``.

        Refreshes the degree weights from ``stats`` on their schedule; the attention scale is taken from
        ``attention_stats`` (the gradient mode's are ``stats``; the decoupled step's are after the step).
        """
        if not self.omega or self.optimizer_steps % self.config.degree_every == 0:
            self.omega = {s.key: degree_weights(stats[s.key], self.config.c_min)
                          for s in self.group_sets if s.kind == "mlp"}
        scale = self.lambda_scale()
        penalties, terms = {"mlp": 0.0, "attn": 0.0}, []
        for group_set in self.group_sets:
            if group_set.kind in ("mlp", "attn") and self.config.penalty == "l1":
                per_group = torch.ones_like(stats[group_set.key].l1)  # plain L1: the same factor everywhere
                lam = (self.config.mlp_lambda if group_set.kind == "mlp" else self.config.attn_lambda) * scale
                penalties[group_set.kind] += float(stats[group_set.key].l1.sum())
            elif group_set.kind == "mlp":
                per_group, lam = self.omega[group_set.key], self.config.mlp_lambda * scale
                penalties["mlp"] += mlp_penalty_value(stats[group_set.key], per_group)
            elif group_set.kind == "attn":
                per_group = attention_group_scale(attention_stats[group_set.key], self.config.delta)
                lam = self.config.attn_lambda * scale
                penalties["attn"] += attention_penalty_value(stats[group_set.key], self.config.delta)
            else:
                continue
            terms.append((group_set, per_group, lam))
        return terms, penalties

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

    def _record_signs(self, stepped: set[int]) -> None:
        """Before the optimizer updates the masters in ``stepped``: the signs of the penalised slices among them.

        One byte per element of this rank's fp32 master slices that this (sub-)group step updates, dropped
        after it: never more than this rank's shard, whatever the ZeRO stage. Not while recovering: the
        penalty is off then and zeros are frozen instead.
        """
        if not self.config.enabled or self.recovering():  # switched off after construction: the hooks stay
            self._signs_before_step = {}
            return
        self._signs_before_step = {
            name: torch.sign(self.access.master(self.params[name])).to(torch.int8) for name in self._penalised_names()
            if self.access.master_storage(self.params[name]) in stepped}

    def _stop_at_zero(self) -> None:
        """After that update: penalised weights whose step crossed zero become exactly 0, with their first
        moment (see config). Only the master and the moments are written; DeepSpeed then copies the masters
        into every rank's working copy."""
        signs_before, self._signs_before_step = self._signs_before_step, {}
        for name, before in signs_before.items():
            param = self.params[name]
            crossed = torch.sign(self.access.master(param)).to(torch.int8).mul_(before).lt(0)

            def clear(tensor: torch.Tensor, piece: FlatSlice, crossed=crossed) -> None:
                tensor.masked_fill_(crossed, 0)

            self.access.edit_master(param, clear, moments=("exp_avg",))

    # -- decoupled penalty steps and the recovery phase -------------------------------------------------
    def recovering(self) -> bool:
        """True during the final ``recover_steps`` optimizer steps: support frozen, penalty off."""
        return bool(self.config.recover_steps) and self.optimizer_steps >= self._recovery_start()

    def _recovery_start(self) -> int:
        if self.total_steps is None:
            raise ValueError("neuroprune.recover_steps needs the run's total optimizer steps: set "
                             "NeuroPruner.total_steps (the trainer and the HF Trainer callback do)")
        if not self.config.recover_steps < self.total_steps:
            raise ValueError(f"neuroprune.recover_steps: {self.config.recover_steps} is not allowed for a run of "
                             f"{self.total_steps} optimizer steps; expected fewer than that")
        return self.total_steps - self.config.recover_steps

    def _learning_rate(self) -> float:
        """The learning rate the coming optimizer step uses (the scheduler moves it only after the step)."""
        rates = set(self.engine.get_lr())
        if len(rates) != 1:
            raise ValueError(f"neuroprune.update: 'decoupled' scales its step by the learning rate, but the "
                             f"optimizer's parameter groups have several: {sorted(rates)}; use one learning rate "
                             "or update: 'gradient'")
        return float(rates.pop())

    def _before_step_without_penalty_gradient(self) -> None:
        """Before ``engine.step`` in decoupled mode or while recovering: mask the gradients of pruned heads and
        FFN units (recovering: of every zero penalised weight too); in decoupled mode record the step's learning
        rate, the statistics of the weights it starts from, and the controller's samples of them."""
        self._mask(grads=True)
        self._mask_ffn_units(grads=True)
        if self.recovering():
            self._freeze_zero_gradients()
            self.last_penalties = {"mlp": 0.0, "attn": 0.0}
            return
        controlled = self.config.target_sparsity is not None
        state = self._decoupled_step
        state.lr = self._learning_rate()
        state.stats = self._local_statistics(("mlp", "attn", "count") if controlled else ("mlp", "attn"))
        state.samples = {name: self.access.master(self.params[name])[::SAMPLE_STRIDE].clone()
                         for name in self._penalised_names()} if controlled and self._penalty_factors else {}

    def _proximal_step(self) -> None:
        """After ``engine.step``: the penalties' proximal step (soft threshold at lr * lambda * f per group, see
        :func:`~neuroprune_ds.penalties.soft_threshold_`) on this rank's fp32 master and working copy.

        One all-reduce carries the statistics before the step (degree weights, penalty values, the controller's
        measured sparsity: the gradient mode's), the attention groups' L1 after it (the proximal map is taken
        there), and the controller's histogram of optimizer displacements.
        """
        state = self._decoupled_step
        after = {f"{key}|after": value for key, value in self._local_statistics(("attn",)).items()}
        hist = None
        if state.samples and state.lr > 0:
            displacement = {name: (self.access.master(self.params[name])[::SAMPLE_STRIDE] - before).abs()
                            for name, before in state.samples.items()}
            hist = self._ratio_histogram(displacement, state.lr)
        reduced, hist = self._reduce(state.stats | after, hist)
        stats = {key: value for key, value in reduced.items() if not key.endswith("|after")}
        if self.config.target_sparsity is not None:
            self._control(stats, hist)
        attention_after = {key.removesuffix("|after"): value for key, value in reduced.items()
                           if key.endswith("|after")}
        terms, self.last_penalties = self._penalty_terms(stats, attention_after)
        for group_set, per_group, lam in terms:
            self._penalty_factors[group_set.key] = per_group
            if lam and state.lr:
                threshold = (state.lr * lam) * per_group
                for name, axis in group_set.members:
                    def shrink(tensor: torch.Tensor, piece: FlatSlice, axis=axis, threshold=threshold) -> None:
                        soft_threshold_(tensor, piece, threshold, axis)

                    self.access.edit_weights(self.params[name], shrink)
        self._decoupled_step = _DecoupledStep()

    def _start_recovery(self) -> None:
        """Choose the support for the recovery phase (collective): prune structure once more, then set every
        penalised weight with |w| < epsilon to exactly 0, with its optimizer moments."""
        if self.optimizer_steps >= self.config.prune_start_step:
            self.prune_heads()
            self.prune_ffn_units()
        epsilon = self.config.epsilon
        for name in self._penalised_names():
            param = self.params[name]
            master, local = self.access.master(param), self.access.local_slice(param)

            def clear(tensor: torch.Tensor, piece: FlatSlice, master=master, local=local) -> None:
                # a rank's full working copy at ZeRO-1/2 reaches beyond its master fragment: it decides by itself
                tensor.masked_fill_((master if piece == local else tensor).abs() < epsilon, 0)

            self.access.edit_weights(param, clear, moments=True)

    def _freeze_zero_gradients(self) -> None:
        """Zero the gradient of every penalised weight that is exactly 0: with zero moments it then stays 0."""
        for name in self._penalised_names():
            param = self.params[name]
            master = self.access.master(param)

            def freeze(grad: torch.Tensor, piece: FlatSlice, master=master) -> None:
                grad.masked_fill_(master == 0, 0)

            self.access.edit_grad(param, freeze)

    # -- FFN units ---------------------------------------------------------------------------------------
    def prune_ffn_units(self) -> dict[str, list[int]]:
        """Prune the FFN units whose in or out connectivity is below ``prune_ffn_units_below`` (collective).

        The decision comes from all-reduced connection counts (integers, exact in float64), identical on every
        rank, so nothing needs a broadcast. Pruned units stay pruned.

        Returns:
            Per FFN block, the units pruned now.
        """
        threshold = self.config.prune_ffn_units_below
        if threshold is None:
            return {}
        stats = self.statistics()
        changes = {}
        for block in self.arch.ffn:
            degrees_in = self._input_degrees(stats, block)
            connections_in = sum(stats[s.key].connections for s in self._input_sets(block))
            out = stats[f"{block.name}:out"]
            weak = (degrees_in / connections_in < threshold) | (out.nonzero / out.connections < threshold)
            weak = weak.to(self.device) & self.ffn_kept[block.name]
            if not bool(weak.any()):
                continue
            self.ffn_kept[block.name] &= ~weak
            self._mask_ffn_units(grads=False, blocks=[block])
            changes[block.name] = torch.nonzero(weak).flatten().tolist()
        return changes

    def _ffn_mask_entries(self, block: FFNBlock):
        keep = self.ffn_kept[block.name].to(device=self.engine.device, dtype=torch.float32)
        for linear in block.inputs:
            yield linear.weight, ROW, keep
            if linear.bias:
                yield linear.bias, ROW, keep
        yield block.output.weight, COL, keep

    def _mask_ffn_units(self, grads: bool, blocks: list[FFNBlock] | None = None) -> None:
        """Zero pruned FFN units' gradients, or their weights, fp32 master and optimizer moments."""
        for block in blocks or self.arch.ffn:
            if not bool(self.ffn_kept[block.name].all()):
                self._zero_entries(self._ffn_mask_entries(block), grads)

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
        """Zero pruned heads' gradients, or their weights, fp32 master and optimizer moments."""
        for block in blocks or self.arch.attention:
            if not bool(self.alive[block.name].all()):
                self._zero_entries(self._mask_entries(block), grads)

    def _zero_entries(self, entries, grads: bool) -> None:
        """Scale each (parameter, axis, keep) entry's gradient, or weights and moments, by its 0/1 keep mask."""
        for name, axis, keep in entries:
            def zero(tensor: torch.Tensor, piece: FlatSlice, axis=axis, keep=keep) -> None:
                piece.scale_(tensor, keep, axis)

            if grads:
                self.access.edit_grad(self.params[name], zero)
            else:
                self.access.edit_weights(self.params[name], zero, moments=True)

    # -- head pruning ----------------------------------------------------------------------------------
    def prune_heads(self, should_stop: Callable[[], bool] | None = None) -> dict[str, dict[int, int]]:
        """Redundant-head pruning on every attention block, one block's gathered weights at a time.

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
            q, k, v = (self.access.full_fp32(self.params[lin.weight]) for lin in (block.q, block.k, block.v))
            decision = decide_redundant_units(q, k, v, _layout(block), self.alive[block.name], self.config.theta,
                                              relative=self.config.theta_mode == "relative")
            self.closest_pairs[block.name] = (decision.closest_distance, decision.theta)
            del q, k, v
            survivor = torch.arange(block.num_units, device=self.device)
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
            if block.name in self.closest_pairs:
                out[f"heads_closest/{block.name}"], out[f"heads_theta/{block.name}"] = self.closest_pairs[block.name]
        out["neuroprune/recovering"] = float(self.recovering())
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

    def _input_sets(self, block: FFNBlock) -> list[GroupSet]:
        """The group sets over the rows of ``block``'s input projections."""
        return [s for s in self.group_sets
                if s.block == block.name and s.members[0][1] == ROW and s.members[0][0] != block.output.weight]

    def _input_degrees(self, stats: dict[str, GroupStats], block: FFNBlock) -> torch.Tensor:
        """Per unit of ``block``: connections with |w| >= epsilon over all its input projections."""
        return sum(stats[s.key].nonzero for s in self._input_sets(block))

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
                           "kept_units": torch.nonzero(self.alive[b.name]).flatten().tolist(),
                           "closest_distance": self.closest_pairs.get(b.name, (None, None))[0],
                           "theta": self.closest_pairs.get(b.name, (None, None))[1]}
                          for b in self.arch.attention],
            "ffn": [{"name": b.name, "stack": b.stack, "layer": b.layer, "width": b.width,
                     "alive_units": alive[b.name], "pruned_units": int((~self.ffn_kept[b.name]).sum())}
                    for b in self.arch.ffn],
            "weight_sparsity": zeros / max(weights, 1),
        }

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Masks, schedule position, controller state, and the last degree weights and penalty factors;
        tensors on the CPU, so that a checkpoint loads on any machine."""
        return {"alive": _on(self.alive, "cpu"),
                "optimizer_steps": self.optimizer_steps,
                "lambda_multiplier": self.lambda_multiplier,
                "controller": self.controller.state_dict(),
                "penalty_factors": _on(self._penalty_factors, "cpu"),
                "omega": _on(self.omega, "cpu"),
                "ffn_kept": _on(self.ffn_kept, "cpu")}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output; the blocks must match this model's."""
        missing = set(self.alive) ^ set(state["alive"])
        if missing:
            raise ValueError(f"pruner state does not match this model: blocks differ: {sorted(missing)[:4]}")
        self.alive = {name: mask.bool() for name, mask in _on(state["alive"], self.device).items()}
        self.optimizer_steps = int(state["optimizer_steps"])
        self.lambda_multiplier = float(state.get("lambda_multiplier", 1.0))
        if "controller" in state:
            self.controller.load_state_dict(state["controller"])
        self._penalty_factors = _on(state.get("penalty_factors", {}), self.device)
        self.omega = _on(state.get("omega", {}), self.device)
        self._load_ffn_kept(state.get("ffn_kept", {}))

    def _load_ffn_kept(self, saved: dict[str, torch.Tensor]) -> None:
        """Restore the FFN unit masks (a state without them, from before FFN unit pruning, keeps every unit)."""
        unknown = set(saved) - set(self.ffn_kept)
        if unknown:
            raise ValueError(f"pruner state does not match this model: FFN blocks differ: {sorted(unknown)[:4]}")
        for name, mask in saved.items():
            if mask.numel() != self.ffn_kept[name].numel():
                raise ValueError(f"pruner state does not match this model: FFN block {name} has "
                                 f"{mask.numel()} units saved, {self.ffn_kept[name].numel()} in the model")
            self.ffn_kept[name] = mask.to(self.device, dtype=torch.bool, copy=True)


def _on(tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """Copies of ``tensors`` on ``device`` (DeepSpeed loads client state on the CPU)."""
    return {key: value.to(device, copy=True) for key, value in tensors.items()}


@dataclass(slots=True)
class _DecoupledStep:
    """What the decoupled mode records before an optimizer step for the proximal step after it."""

    lr: float = 0.0
    stats: dict[str, GroupStats] = field(default_factory=dict)
    """Local statistics of the weights the step starts from."""
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per penalised parameter, its local fp32 master at the controller's sampled positions."""


def _numel(param: torch.nn.Parameter) -> int:
    return int(param.ds_numel) if hasattr(param, "ds_id") else param.numel()
