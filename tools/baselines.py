"""Pruning baselines that NeuroPrune is compared with (tools/bench_quality.py, tools/demo.py), and the
prefill timing of a compact export against its dense model.

- unstructured magnitude pruning: one global |w| threshold over the penalised matrices;
- structured magnitude pruning: per block, the k FFN units / attention units (KV groups) of lowest L2 norm;
- gradual magnitude pruning during fine-tuning with the cubic schedule of Zhu & Gupta 2017 ("To prune, or not
  to prune", arXiv 1710.01878), the standard strong baseline for training-time unstructured sparsity.

Everything here works on full, unpartitioned weights in one process (the benchmarks run ZeRO-0 fp32, where
the module's parameters are the optimizer's); it is benchmark code, not part of the trainer.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Mapping

import torch

from neuroprune_ds.arch import AttentionBlock, FFNBlock, ResolvedArchitecture


# ------------------------------------------------------------------------------ unstructured magnitude


def magnitude_threshold(params: Mapping[str, torch.Tensor], names: list[str], fraction: float) -> float:
    """The |w| at or below which the ``fraction`` smallest weights of the matrices ``names`` lie."""
    if not 0 < fraction < 1:
        raise ValueError(f"magnitude pruning: fraction {fraction} is not in (0, 1)")
    magnitudes = torch.cat([params[n].detach().abs().flatten().float() for n in names])
    k = max(1, int(fraction * magnitudes.numel()))
    return float(torch.kthvalue(magnitudes, k).values)


def magnitude_pruned(model: torch.nn.Module, names: list[str], sparsity: float) -> torch.nn.Module:
    """Zero, in place, the smallest-|w| fraction ``sparsity`` of the matrices ``names`` (one global
    threshold); returns the model."""
    params = dict(model.named_parameters())
    threshold = magnitude_threshold(params, names, sparsity)
    with torch.no_grad():
        for n in names:
            params[n].masked_fill_(params[n].abs() <= threshold, 0.0)
    return model


# -------------------------------------------------------------------------------- structured magnitude


def ffn_unit_norms(params: Mapping[str, torch.Tensor], block: FFNBlock) -> torch.Tensor:
    """(width,) L2 norm of each hidden unit's weights: its rows of every input projection (and their biases)
    and its column of the output projection."""
    squares = params[block.output.weight].detach().float().pow(2).sum(dim=0)
    for linear in block.inputs:
        squares = squares + params[linear.weight].detach().float().pow(2).sum(dim=1)
        if linear.bias:
            squares = squares + params[linear.bias].detach().float().pow(2)
    return squares.sqrt()


def attention_unit_norms(params: Mapping[str, torch.Tensor], block: AttentionBlock) -> torch.Tensor:
    """(num_units,) L2 norm of each attention unit's weights (a unit is a KV group: its query heads' rows of
    Q and columns of O, its rows of K and V; the export keeps or removes units whole)."""
    units = block.num_units

    def rows(name: str) -> torch.Tensor:
        return params[name].detach().float().reshape(units, -1).pow(2).sum(dim=1)

    squares = rows(block.q.weight) + rows(block.k.weight) + rows(block.v.weight)
    squares = squares + params[block.o.weight].detach().float().t().reshape(units, -1).pow(2).sum(dim=1)
    return squares.sqrt()


def lowest_removed(norms: torch.Tensor, k: int, keep_one: bool = False) -> torch.Tensor:
    """bool keep mask over ``norms`` with the k smallest removed (ties broken by index, deterministic).

    ``keep_one``: at least one unit must stay (an attention block; an FFN block may lose every unit, as a
    NeuroPrune run's compact export can remove them all)."""
    limit = norms.numel() - 1 if keep_one else norms.numel()
    if not 0 <= k <= limit:
        raise ValueError(f"structured pruning: cannot remove {k} of {norms.numel()} units (0 <= k <= {limit})")
    keep = torch.ones(norms.numel(), dtype=torch.bool, device=norms.device)
    keep[torch.sort(norms, stable=True).indices[:k]] = False
    return keep


def structured_magnitude_pruned(model: torch.nn.Module, arch: ResolvedArchitecture,
                                ffn_removed: Mapping[str, int],
                                attention_removed: Mapping[str, int]) -> dict[str, torch.Tensor]:
    """Remove, per block, the given number of lowest-norm FFN units (their input rows, input biases and
    output column become 0 in place, so the compact export drops them) and attention units.

    Args:
        ffn_removed: FFN block name -> units to remove (blocks not listed: none).
        attention_removed: attention block name -> units (KV groups) to remove.

    Returns:
        The alive masks, bool (num_units,) per attention block, in the form ``NeuroPruner.state_dict()["alive"]``
        and the export take; the attention weights themselves are not changed (the export masks them).
    """
    params = dict(model.named_parameters())
    with torch.no_grad():
        for block in arch.ffn:
            keep = lowest_removed(ffn_unit_norms(params, block), ffn_removed.get(block.name, 0))
            params[block.output.weight][:, ~keep] = 0
            for linear in block.inputs:
                params[linear.weight][~keep] = 0
                if linear.bias:
                    params[linear.bias][~keep] = 0
    return {block.name: lowest_removed(attention_unit_norms(params, block), attention_removed.get(block.name, 0),
                                       keep_one=True)
            for block in arch.attention}


# -------------------------------------------------------------------------------- gradual magnitude


def cubic_sparsity(step: int, final: float, start: int, end: int, initial: float = 0.0) -> float:
    """Zhu & Gupta's schedule: s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t_end - t0))^3 on [t0, t_end],
    s_i before t0 and s_f after t_end."""
    if not start < end:
        raise ValueError(f"cubic schedule: start step {start} must be before end step {end}")
    progress = min(max((step - start) / (end - start), 0.0), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


class GradualMagnitudePruning:
    """Gradual magnitude pruning of the matrices ``names`` while fine-tuning: every ``every_steps`` optimizer
    steps from ``start`` to ``end``, the smallest-|w| weights (one global threshold; pruned weights are 0, so
    they stay among the smallest) are masked up to the cubic schedule's sparsity; call :meth:`after_step`
    after every optimizer step, which also re-applies the masks (the optimizer moves masked weights)."""

    def __init__(self, model: torch.nn.Module, names: list[str], final: float, start: int, end: int,
                 every_steps: int):
        if every_steps < 1:
            raise ValueError(f"gradual magnitude pruning: every_steps {every_steps} must be >= 1")
        cubic_sparsity(start, final, start, end)  # validates start < end
        self.params = {n: p for n, p in model.named_parameters() if n in set(names)}
        self.names, self.final, self.start, self.end, self.every_steps = names, final, start, end, every_steps
        self.masks: dict[str, torch.Tensor] = {}
        self.sparsity = 0.0

    def due(self, step: int) -> bool:
        return self.start <= step <= self.end and ((step - self.start) % self.every_steps == 0 or step == self.end)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """``step``: optimizer steps taken so far."""
        if self.due(step):
            target = cubic_sparsity(step, self.final, self.start, self.end)
            if target > 0:
                threshold = magnitude_threshold(self.params, self.names, target)
                self.masks = {n: p.abs() > threshold for n, p in self.params.items()}
                self.sparsity = target
        for n, keep in self.masks.items():
            self.params[n].mul_(keep)


# ---------------------------------------------------------------------------------------- speed


def _synchronize(model: torch.nn.Module) -> None:
    device = next(model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prefill_speed_ratio(fast: torch.nn.Module, slow: torch.nn.Module, vocab: int, repeats: int = 7,
                        length: int = 256) -> float:
    """Median time of ``slow`` over ``fast`` on one ``length``-token prefill, the two timed alternately in this
    process (noise hits both); > 1 when ``fast`` is faster. Both models on the same device."""
    device = next(fast.parameters()).device
    ids = torch.randint(0, vocab, (1, length), generator=torch.Generator().manual_seed(0)).to(device)
    times: dict[int, list[float]] = {id(fast): [], id(slow): []}
    with torch.no_grad():
        for model in (fast, slow):
            model(input_ids=ids)
        for _ in range(repeats):
            for model in (fast, slow):
                _synchronize(model)
                start = time.perf_counter()
                model(input_ids=ids)
                _synchronize(model)
                times[id(model)].append(time.perf_counter() - start)
    return statistics.median(times[id(slow)]) / statistics.median(times[id(fast)])
