"""NeuroPrune bound to a live DeepSpeed engine (ZeRO stages 0-3, fp32 or bf16).

Per optimizer step, the pruner reads only this rank's shard of each penalised weight (Q, K, V and the FFN
matrices), computes per-group statistics (L1 norms and connection counts per FFN unit / attention input
dimension) into ONE buffer, sums it over ranks in ONE all-reduce of O(sum of rows + columns) floats, brings
every number the host needs back in ONE transfer, and adds the penalty gradients to this rank's gradient
shard between ``engine.backward`` and ``engine.step`` (so gradient clipping and the optimizer see task loss +
penalty, exactly as if the penalty were in the loss). Pruned heads and FFN units (:mod:`neuroprune_ds.structure`)
stay exactly zero in the parameters, the fp32 master and the optimizer moments.

With ``update: decoupled`` the penalties are instead a proximal soft-threshold step on this rank's fp32
master after ``engine.step`` (the same single all-reduce and transfer, then); ``recover_steps`` ends a run
with the support frozen and the penalty off; ``prune_ffn_units_below`` prunes weakly connected FFN units like
heads (docs/sparsity.md).

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

from neuroprune_ds.arch import resolve_architecture
from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.flat_slice import FlatSlice
from neuroprune_ds.group_sets import GroupSet, Role, build_group_sets, penalised_names
from neuroprune_ds.group_statistics import GroupStatistics, Measurement, Statistics, overall_sparsity
from neuroprune_ds.penalties import GroupMember, Penalty, add_penalty_grad_, degree_weights, soft_threshold_
from neuroprune_ds.sparsity_control import (BINS, HORIZON, SAMPLE_STRIDE, SparsityController, add_histogram_,
                                            decoupled_drive, decoupled_horizon, sampled_inverse)
from neuroprune_ds.structure import Structure
from neuroprune_ds.zero_access import ZeroAccess

HISTOGRAM_BATCH = 1 << 22
"""Sampled ratios histogrammed at once: few kernels per step, temporaries bounded to a few 32 MB float64."""

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
        self.penalised_sets = tuple(s for s in self.group_sets if s.penalised)
        self.penalised_names = penalised_names(self.group_sets)
        """Q, K, V and the FFN matrices: what the penalty acts on and the weight sparsity counts."""
        self.penalty = Penalty.of(config)
        self.structure = Structure(self.access, self.params, self.arch, config)
        self.stats = GroupStatistics(self.access, self.params, self.group_sets, config.epsilon)
        self.optimizer_steps = 0
        self.omega: dict[str, torch.Tensor] = {}
        self.last_penalties = {"mlp": 0.0, "attn": 0.0}
        self.lambda_multiplier = 1.0
        self.measured_sparsity = 0.0
        self.controller = SparsityController(config.controller_gain,
                                             horizon=0 if config.update == "decoupled" else HORIZON)
        self._penalty_factors: dict[str, torch.Tensor] = {}  # last step's per-group factor of each penalised set
        self._boundary_pending = False
        self._pruned_blocks: list = []  # of this step, read with its host transfer; masked before and after it
        self._signs_before_step: dict[str, torch.Tensor] = {}  # of the master slices the current step updates
        self.total_steps: int | None = None
        """The run's optimizer steps; ``recover_steps`` needs it (the trainer and the HF callback set it)."""
        self._decoupled_step = _DecoupledStep()
        if config.enabled and config.stop_at_zero and config.update == "gradient":
            self.access.around_master_steps(self._record_signs, self._stop_at_zero)

    @property
    def alive(self) -> dict[str, torch.Tensor]:
        """Per attention block, which units (KV groups) are alive (bool, on the device)."""
        return self.structure.alive

    @property
    def ffn_kept(self) -> dict[str, torch.Tensor]:
        """Per FFN block, which units are not pruned (bool, on the device)."""
        return self.structure.ffn_kept

    @property
    def closest_pairs(self) -> dict[str, tuple[float, float]]:
        """Per attention block, the last pruning pass's closest distance of two live units and its theta."""
        return self.structure.closest_pairs

    # -- the per-step hooks ----------------------------------------------------------------------------
    def lambda_scale(self) -> float:
        """The factor applied to both lambdas now: linear warm-up times the target-sparsity controller's."""
        warmup = self.config.lambda_warmup_steps
        ramp = 1.0 if warmup <= 0 else min(1.0, self.optimizer_steps / warmup)
        return ramp * self.lambda_multiplier

    def target_now(self) -> float:
        """The controller's target at the current step: a cubic ramp from 0 to ``target_sparsity``."""
        return self.config.target_sparsity * self._ramp()

    def ffn_units_share_now(self) -> float:
        """The share of every FFN block's units ``prune_ffn_units_fraction`` has pruned by now: the cubic ramp
        of ``target_ramp_steps``, and the whole fraction from the recovery phase's start on."""
        return self.config.prune_ffn_units_fraction * (1.0 if self.recovering() else self._ramp())

    def _ramp(self) -> float:
        """1 - (1 - progress)^3 over ``target_ramp_steps`` optimizer steps (1 when that is 0)."""
        ramp = self.config.target_ramp_steps
        progress = 1.0 if ramp <= 0 else min(1.0, self.optimizer_steps / ramp)
        return 1.0 - (1.0 - progress) ** 3

    def after_backward(self) -> None:
        """Add the penalty gradients and mask pruned units' gradients; call after every ``engine.backward``.

        Acts only at a gradient-accumulation boundary, on the reduced gradient shards.
        """
        if not self.engine.is_gradient_accumulation_boundary():
            return
        self._boundary_pending = True
        if not self.config.enabled:
            return
        if self.config.update == "gradient" and not self.recovering():
            self._penalty_gradient_step()
            return
        self._pruned_blocks = self.structure.pruned_blocks()
        self.structure.mask(self._pruned_blocks, grads=True)
        if self.recovering():
            self._freeze_zero_gradients()
            self.last_penalties = {"mlp": 0.0, "attn": 0.0}
        else:
            self._record_decoupled_start()

    def after_step(self, should_stop: Callable[[], bool] | None = None) -> None:
        """Keep pruned weights exactly zero and run step-scheduled pruning; call after every ``engine.step``.

        ``should_stop`` is passed to :meth:`prune_structure`."""
        if not self._boundary_pending:
            return
        self._boundary_pending = False
        if self.config.enabled and self.config.update == "decoupled" and not self.recovering():
            self._proximal_step()
        self.optimizer_steps += 1
        if not self.config.enabled:
            return
        self.structure.mask(self._pruned_blocks, grads=False)
        if self.config.recover_steps and self.optimizer_steps == self._recovery_start():
            self._start_recovery()
        every = self.config.prune_every_steps
        if every and self.optimizer_steps % every == 0 and self.optimizer_steps >= self.config.prune_start_step:
            self.prune_structure(should_stop)

    def on_epoch_end(self, should_stop: Callable[[], bool] | None = None) -> None:
        """Pruning at an epoch end (the paper's schedule, used when ``prune_every_steps`` is 0)."""
        started = self.optimizer_steps >= self.config.prune_start_step
        if self.config.enabled and self.config.prune_every_steps == 0 and started:
            self.prune_structure(should_stop)

    # -- the two update modes, as pipelines --------------------------------------------------------------
    def _penalty_gradient_step(self) -> None:
        """Gradient mode, before ``engine.step``: local statistics (and the controller's histogram of the task
        gradient) -> one all-reduce -> degree weights and factors -> one host transfer -> controller ->
        penalty gradients -> masks."""
        controlled = self.config.target_sparsity is not None
        local = self.stats.measure(self.penalised_sets)
        hist = self._ratio_histogram(self._sampled_gradient) if controlled and self._penalty_factors else None
        saliency = self._local_saliency()
        (stats,), (hist, saliency) = self.stats.all_reduce([local], (hist, saliency))
        self._add_saliency(saliency)
        self._refresh_degree_weights(stats)
        factors = self._factors(stats, stats)
        self._settle_on_host(stats, hist, with_masks=True)
        self._apply(factors, self._add_penalty_grads)
        self.structure.mask(self._pruned_blocks, grads=True)

    def _record_decoupled_start(self) -> None:
        """Decoupled mode, before ``engine.step``: the step's learning rate, the local statistics of the weights
        it starts from, and (with a target sparsity) the master at the controller's sampled positions."""
        state = self._decoupled_step
        state.lr = self._learning_rate()
        state.local = self.stats.measure(self.penalised_sets)
        state.saliency = self._local_saliency()
        controlled = self.config.target_sparsity is not None
        state.samples = {name: self.access.master(self.params[name])[::SAMPLE_STRIDE].clone()
                         for name in self.penalised_names} if controlled and self._penalty_factors else {}

    def _proximal_step(self) -> None:
        """Decoupled mode, after ``engine.step``: the penalties' proximal step (soft threshold at lr * lambda * f
        per group, see :func:`~neuroprune_ds.penalties.soft_threshold_`) on this rank's fp32 master and working
        copy.

        One all-reduce carries the statistics before the step (degree weights, penalty values, the controller's
        measured sparsity: the gradient mode's), the attention groups' L1 after it (the proximal map is taken
        there), and the controller's histogram of what each threshold must cover (the optimizer's displacement
        plus the weight's share of the steps left, :func:`~neuroprune_ds.sparsity_control.decoupled_drive`); one
        host transfer follows.
        """
        state = self._decoupled_step
        after = self.stats.measure(tuple(s for s in self.penalised_sets if s.role.attention))
        hist = None
        if state.samples and state.lr > 0:
            horizon = decoupled_horizon(self.config.target_ramp_steps, self.optimizer_steps)
            hist = self._ratio_histogram(
                lambda name: (state.samples[name], self.access.master(self.params[name])[::SAMPLE_STRIDE]),
                lambda before, after: decoupled_drive(before, after, horizon), state.lr)
        (before, after), (hist, saliency) = self.stats.all_reduce([state.local, after], (hist, state.saliency))
        self._add_saliency(saliency)
        self._refresh_degree_weights(before)
        factors = self._factors(before, after)
        self._settle_on_host(before, hist, with_masks=False)
        if state.lr:
            self._apply(factors, lambda group_set, factor, lam: self._shrink(group_set, state.lr * lam * factor))
        self._decoupled_step = _DecoupledStep()

    def _local_saliency(self) -> torch.Tensor | None:
        """This rank's part of the step's FFN unit saliency (the 'taylor' score), from the task gradient."""
        return self.stats.unit_saliency(self.arch.ffn) if self.structure.ffn_saliency else None

    def _add_saliency(self, saliency: torch.Tensor | None) -> None:
        if saliency is not None:
            self.structure.add_saliency(saliency)

    def _refresh_degree_weights(self, stats: Statistics) -> None:
        """omega of every penalised FFN set from ``stats``, every ``degree_every`` steps."""
        if not self.omega or self.optimizer_steps % self.config.degree_every == 0:
            self.omega = {s.key: degree_weights(stats[s.key], self.config.c_min)
                          for s in self.penalised_sets if not s.role.attention}

    def _factors(self, stats: Statistics, attention_stats: Statistics) -> dict[str, torch.Tensor]:
        """Per penalised set, its per-group factor f (the attention scale from ``attention_stats``); kept for
        the next step's controller histogram and the checkpoint."""
        for s in self.penalised_sets:
            source = attention_stats if s.role.attention else stats
            self._penalty_factors[s.key] = self.penalty.factor(s.role, source[s.key], self.omega.get(s.key))
        return dict(self._penalty_factors)

    def _settle_on_host(self, stats: Statistics, hist: torch.Tensor | None, with_masks: bool) -> None:
        """ONE device-to-host transfer: the penalty values of ``stats``, with a target sparsity its counts of
        |w| >= epsilon and the summed histogram (then the controller sets the lambda scale), and with
        ``with_masks`` which blocks have pruned units."""
        values = torch.stack([self.penalty.value(s.role, stats[s.key], self.omega.get(s.key))
                              for s in self.penalised_sets])
        controlled = self.config.target_sparsity is not None
        nonzero = torch.stack([stats[s.key].nonzero.sum() for s in self.penalised_sets]) if controlled else None
        intact = self.structure.intact() if with_masks else None
        structural = controlled and self.config.prune_ffn_units_fraction is not None and self.arch.ffn
        pruned = torch.stack([(~self.ffn_kept[b.name]).sum() for b in self.arch.ffn]) if structural else None
        values, nonzero, hist, intact, pruned = self.stats.to_host([values, nonzero, hist, intact, pruned])
        self.last_penalties = {kind: sum((v for s, v in zip(self.penalised_sets, values)
                                          if s.role.attention == (kind == "attn")), 0.0) for kind in ("mlp", "attn")}
        if with_masks:
            self._pruned_blocks = self.structure.pruned_blocks(intact)
        if controlled:
            penalised = sum(self.stats.numel[s.key] for s in self.penalised_sets)
            self.measured_sparsity = (penalised - sum(nonzero)) / max(penalised, 1)
            aim = None
            if self.config.update == "decoupled":  # where H ends, less the zeros the structural target will add
                aim = self.config.target_sparsity - (self._structure_pending(pruned, penalised) if pruned else 0.0)
            self.lambda_multiplier = self.controller.update(hist, self.target_now(), self.measured_sparsity, aim)

    def _structure_pending(self, pruned: list[float], penalised: int) -> float:
        """The share of the penalised weights that ``prune_ffn_units_fraction`` will still zero by its ramp's end:
        the units each block has yet to lose (``pruned``: its units pruned now) times their connections."""
        fraction = self.config.prune_ffn_units_fraction
        pending = sum(max(int(fraction * block.width) - int(done), 0)
                      * (sum(linear.in_features for linear in block.inputs) + block.output.out_features)
                      for block, done in zip(self.arch.ffn, pruned))
        return pending / max(penalised, 1)

    def _apply(self, factors: dict[str, torch.Tensor], edit: Callable[[GroupSet, torch.Tensor, float], None]) -> None:
        """``edit(group set, f, lambda now)`` for every penalised set whose lambda is not zero."""
        scale = self.lambda_scale()
        for group_set in self.penalised_sets:
            lam = self.penalty.lam(group_set.role) * scale
            if lam:
                edit(group_set, factors[group_set.key], lam)

    def _add_penalty_grads(self, group_set: GroupSet, factor: torch.Tensor, lam: float) -> None:
        """grad += lam * f[group] * sign(w) on this rank's gradient shard of each member; f is cast to the
        gradient's dtype and device once per set."""
        casts: dict[tuple, torch.Tensor] = {}
        for name, axis in group_set.members:
            param = self.params[name]
            master = self.access.master(param)

            def add(grad: torch.Tensor, piece: FlatSlice, master=master, axis=axis) -> None:
                key = (grad.dtype, grad.device)
                if key not in casts:
                    casts[key] = factor.to(device=grad.device, dtype=grad.dtype)
                cast = casts[key]
                add_penalty_grad_(grad, GroupMember(master, piece, axis), cast, lam)

            self.access.edit_grad(param, add)

    def _shrink(self, group_set: GroupSet, threshold: torch.Tensor) -> None:
        """Soft-threshold every member's master and working copy at ``threshold`` per group."""
        for name, axis in group_set.members:
            def shrink(tensor: torch.Tensor, piece: FlatSlice, axis=axis) -> None:
                soft_threshold_(tensor, piece, threshold, axis)

            self.access.edit_weights(self.params[name], shrink)

    # -- statistics ------------------------------------------------------------------------------------
    def statistics(self) -> Statistics:
        """Per-group statistics of every group set, summed over ranks in one all-reduce (collective)."""
        return self.stats.everything()

    def _sampled_gradient(self, name: str) -> tuple[torch.Tensor]:
        return (self.access.local_grad(self.params[name])[::SAMPLE_STRIDE],)

    def _ratio_histogram(self, sampled: Callable[[str], tuple[torch.Tensor, ...]],
                         drive: Callable[..., torch.Tensor] = lambda x: x, lr: float = 1.0) -> torch.Tensor:
        """This rank's histogram of r = |x| / (lr * lambda * f) at the sampled positions of its penalised shards:
        x the task gradient (``lr`` 1), or the decoupled mode's drive (displacement plus |w| / H).

        ``sampled(name)`` gives the samples x is computed from, ``drive`` computes x from them. The samples of
        many matrices are concatenated and driven and histogrammed together (HISTOGRAM_BATCH at a time), so
        the work per matrix is its samples' groups alone."""
        hist = torch.zeros(BINS, dtype=torch.float64, device=self.device)
        pending, inverses, pending_numel = [], [], 0
        for group_set in self.penalised_sets:
            if group_set.key not in self._penalty_factors:  # a state saved without them: from the next step on
                continue
            inverse = 1.0 / (lr * self.penalty.lam(group_set.role) * self._penalty_factors[group_set.key])
            for name, axis in group_set.members:
                samples = sampled(name)
                count = samples[0].numel()
                inverses.append(sampled_inverse(self.access.local_slice(self.params[name]), axis, inverse, count,
                                                self.device))
                pending.append(samples)
                pending_numel += count
                if pending_numel >= HISTOGRAM_BATCH:
                    self._add_ratios(hist, pending, inverses, drive)
                    pending, inverses, pending_numel = [], [], 0
        if pending:
            self._add_ratios(hist, pending, inverses, drive)
        return hist

    def _add_ratios(self, hist: torch.Tensor, pending: list[tuple[torch.Tensor, ...]], inverses: list[torch.Tensor],
                    drive: Callable[..., torch.Tensor]) -> None:
        x = drive(*(torch.cat(parts).to(self.device) for parts in zip(*pending)))
        add_histogram_(hist, x.abs() * torch.cat(inverses))

    # -- stop_at_zero ------------------------------------------------------------------------------------
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
            name: torch.sign(self.access.master(self.params[name])).to(torch.int8) for name in self.penalised_names
            if self.access.master_storage(self.params[name]) in stepped}

    def _stop_at_zero(self) -> None:
        """After that update: penalised weights whose step crossed zero become exactly 0, with their first
        moment (see config). Only the master and the moments are written; DeepSpeed then copies the masters
        into every rank's working copy."""
        signs_before, self._signs_before_step = self._signs_before_step, {}
        for name, before in signs_before.items():
            param = self.params[name]
            crossed = torch.mul(self.access.master(param), before).lt(0)  # signs before * after, exactly

            def clear(tensor: torch.Tensor, piece: FlatSlice, crossed=crossed) -> None:
                tensor.masked_fill_(crossed, 0)

            self.access.edit_master(param, clear, moments=("exp_avg",))

    # -- the recovery phase ------------------------------------------------------------------------------
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

    def _start_recovery(self) -> None:
        """Choose the support for the recovery phase (collective): prune structure once more, then set every
        penalised weight with |w| < epsilon to exactly 0, with its optimizer moments."""
        if self.optimizer_steps >= self.config.prune_start_step:
            self.prune_heads()
            self.prune_ffn_units()
        epsilon = self.config.epsilon
        for name in self.penalised_names:
            param = self.params[name]
            master, local = self.access.master(param), self.access.local_slice(param)

            def clear(tensor: torch.Tensor, piece: FlatSlice, master=master, local=local) -> None:
                # a rank's full working copy at ZeRO-1/2 reaches beyond its master fragment: it decides by itself
                tensor.masked_fill_((master if piece == local else tensor).abs() < epsilon, 0)

            self.access.edit_weights(param, clear, moments=True)

    def _freeze_zero_gradients(self) -> None:
        """Zero the gradient of every penalised weight that is exactly 0: with zero moments it then stays 0."""
        for name in self.penalised_names:
            param = self.params[name]
            master = self.access.master(param)

            def freeze(grad: torch.Tensor, piece: FlatSlice, master=master) -> None:
                grad.masked_fill_(master == 0, 0)

            self.access.edit_grad(param, freeze)

    # -- structure -----------------------------------------------------------------------------------------
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

    def prune_heads(self, should_stop: Callable[[], bool] | None = None) -> dict[str, dict[int, int]]:
        """Redundant-head pruning (collective); see :meth:`neuroprune_ds.structure.Structure.prune_heads`."""
        return self.structure.prune_heads(should_stop)

    def prune_ffn_units(self) -> dict[str, list[int]]:
        """Prune the FFN units whose in or out connectivity is below ``prune_ffn_units_below``, then, with
        ``prune_ffn_units_fraction``, the least important live units up to :meth:`ffn_units_share_now`
        (collective).

        The threshold's decision comes from all-reduced connection counts (integers, exact in float64),
        identical on every rank; the structural target's ranking is rank 0's, broadcast. Pruned units stay
        pruned.

        Returns:
            Per FFN block, the units pruned now.
        """
        below, fraction = self.config.prune_ffn_units_below, self.config.prune_ffn_units_fraction
        if below is None and fraction is None:
            return {}
        stats = self.statistics()
        changes = {}
        if below is not None:
            changes = self.structure.prune_ffn_units({block.name: self.stats.ffn_connectivity(stats, block.name)
                                                      for block in self.arch.ffn})
        if fraction is not None:
            more = self.structure.prune_ffn_units_to_share(self.ffn_units_share_now(), self._unit_order(stats))
            for block, units in more.items():
                changes[block] = sorted(changes.get(block, []) + units)
        return changes

    def _unit_order(self, stats: Statistics) -> dict[str, torch.Tensor]:
        """Per FFN block, its units from the least to the most important by ``ffn_unit_score``."""
        if self.config.ffn_unit_score == "taylor":
            return {name: torch.argsort(saliency, stable=True) for name, saliency in self.structure.ffn_saliency.items()}
        order = {}
        for block in self.arch.ffn:  # connectivity, ties (e.g. every unit fully connected) broken by the L1 norm
            by_l1 = torch.argsort(self.stats.unit_l1(stats, block.name), stable=True)
            connectivity = self.stats.ffn_connectivity(stats, block.name)
            order[block.name] = by_l1[torch.argsort(connectivity[by_l1], stable=True)]
        return order

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
        sparsity = self.stats.block_sparsity(stats)
        for block, (zeros, weights) in sparsity.items():
            out[f"sparsity/weight/{block}"] = zeros / weights
        out["sparsity/weight"] = overall_sparsity(sparsity)
        for block in self.arch.attention:
            out[f"heads_kept/{block.name}"] = float(self.alive[block.name].sum()) * block.heads_per_unit
            if block.name in self.closest_pairs:
                out[f"heads_closest/{block.name}"], out[f"heads_theta/{block.name}"] = self.closest_pairs[block.name]
        out["neuroprune/recovering"] = float(self.recovering())
        for block, alive in self.ffn_alive(stats).items():
            out[f"ffn_alive/{block}"] = float(alive)
        return out

    def ffn_alive(self, stats: Statistics | None = None) -> dict[str, int]:
        """FFN units with at least one connection >= epsilon both in and out (collective when stats is None)."""
        stats = stats or self.statistics()
        counts, = self.stats.to_host([torch.stack([self.stats.ffn_alive(stats, b.name) for b in self.arch.ffn])]
                                     if self.arch.ffn else [None])
        return {block.name: int(count) for block, count in zip(self.arch.ffn, counts or [])}

    def ffn_degrees(self) -> dict[str, torch.Tensor]:
        """Per FFN block, each unit's number of input connections with |w| >= epsilon (collective)."""
        stats = self.statistics()
        return {block.name: self.stats.unit_connections(stats, block.name, Role.FFN_INPUT)[0]
                for block in self.arch.ffn}

    def summary(self) -> dict:
        """What is pruned, JSON-serialisable (collective)."""
        stats = self.statistics()
        alive = self.ffn_alive(stats)
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
            "weight_sparsity": overall_sparsity(self.stats.block_sparsity(stats)),
        }

    # -- state -----------------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """What a resumed run needs, tensors on the CPU (so that a checkpoint loads on any machine): the head
        masks ('alive') and FFN unit masks ('ffn_kept'), the schedule position ('optimizer_steps'), the
        controller's scale and state ('lambda_multiplier', 'controller'), and the last degree weights
        ('omega') and per-group penalty factors ('penalty_factors'), which the next step's controller
        histogram uses before the statistics refresh them, and the FFN units' accumulated 'taylor' scores
        ('ffn_saliency', identical on every rank, so a run resumes on any number of ranks)."""
        return {"alive": _on(self.alive, "cpu"),
                "optimizer_steps": self.optimizer_steps,
                "lambda_multiplier": self.lambda_multiplier,
                "controller": self.controller.state_dict(),
                "penalty_factors": _on(self._penalty_factors, "cpu"),
                "omega": _on(self.omega, "cpu"),
                "ffn_kept": _on(self.ffn_kept, "cpu"),
                "ffn_saliency": _on(self.structure.ffn_saliency, "cpu")}

    def load_state_dict(self, state: dict) -> None:
        """Restore ``state_dict()`` output onto the pruner's device; the blocks must match this model's."""
        self.structure.load_masks(state["alive"], state.get("ffn_kept", {}), self.device)
        self.optimizer_steps = int(state["optimizer_steps"])
        self.lambda_multiplier = float(state.get("lambda_multiplier", 1.0))
        if "controller" in state:
            self.controller.load_state_dict(state["controller"])
        self._penalty_factors = _on(state.get("penalty_factors", {}), self.device)
        self.omega = _on(state.get("omega", {}), self.device)
        for name, saliency in state.get("ffn_saliency", {}).items():
            if name in self.structure.ffn_saliency:
                self.structure.ffn_saliency[name] = saliency.to(self.device, torch.float64, copy=True)


def _on(tensors: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    """Copies of ``tensors`` on ``device`` (DeepSpeed loads client state on the CPU)."""
    return {key: value.to(device, copy=True) for key, value in tensors.items()}


@dataclass(slots=True)
class _DecoupledStep:
    """What the decoupled mode records before an optimizer step for the proximal step after it."""

    lr: float = 0.0
    local: Measurement | None = None
    """Local statistics of the weights the step starts from, and their buffer."""
    samples: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per penalised parameter, its local fp32 master at the controller's sampled positions."""
    saliency: torch.Tensor | None = None
    """This rank's part of the step's FFN unit saliency (with the 'taylor' structural target)."""
