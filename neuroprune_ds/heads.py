"""Redundant-head pruning: the paper's Algorithms 2 (FIND_DOMINATING) and 3 (ELIM_REDUNDANT), the fold of a
pruned head's output projection into its replacement, and the head masks. Pure tensor functions on full
(gathered) weights; nothing here communicates.

The prunable unit is a KV group (its query heads, its K and V head, their output-projection columns). With
as many KV heads as query heads, a unit is exactly one head.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True, slots=True)
class UnitLayout:
    """How an attention block's weights split into prunable units."""

    num_units: int
    heads_per_unit: int
    head_dim: int

    @property
    def q_rows_per_unit(self) -> int:
        return self.heads_per_unit * self.head_dim

    def q_keep(self, alive: torch.Tensor) -> torch.Tensor:
        """Per-row keep factors (1.0 / 0.0) of q (rows) and o (columns) for units marked ``alive``."""
        return alive.to(torch.float32).repeat_interleave(self.q_rows_per_unit)

    def kv_keep(self, alive: torch.Tensor) -> torch.Tensor:
        """Per-row keep factors of k and v."""
        return alive.to(torch.float32).repeat_interleave(self.head_dim)


def unit_parameters(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: UnitLayout) -> torch.Tensor:
    """A_u = [Q_u, K_u, V_u] of every unit, flattened: shape (num_units, parameters per unit).

    q is (num_heads * head_dim, d); k and v are (num_kv_heads * head_dim, d) in HF layout.
    """
    units = layout.num_units
    return torch.cat([q.reshape(units, -1), k.reshape(units, -1), v.reshape(units, -1)], dim=1)


def linf_distances(units: torch.Tensor) -> torch.Tensor:
    """||A_i - A_j||_inf (max absolute element difference) for every pair: (num_units, num_units)."""
    return torch.stack([(units - units[i]).abs().amax(dim=1) for i in range(units.shape[0])])


def similarity(distances: torch.Tensor, theta: float) -> torch.Tensor:
    """S = I; S[i, j] = 1 where ||A_i - A_j||_inf <= theta (int64 0/1 matrix)."""
    s = (distances <= theta).long()
    s.fill_diagonal_(1)
    return s


def find_dominating(s: torch.Tensor) -> torch.Tensor:
    """FIND_DOMINATING(S) exactly as the paper's Algorithm 2 states it.

    D = I; for each i: j* = i; for each j: d = S[j*] - S[j]; if (d has no +1 and some -1) or (d == 0 and
    j* < j) then j* = j. Set D[i, j*] = 1. A later head whose neighbourhood contains j*'s wins.
    """
    k = s.shape[0]
    d = torch.eye(k, dtype=torch.long, device=s.device)
    for i in range(k):
        best = i
        for j in range(k):
            diff = s[best] - s[j]
            strictly_contained = not bool((diff == 1).any()) and bool((diff == -1).any())
            equal_and_later = not bool(diff.any()) and best < j
            if strictly_contained or equal_and_later:
                best = j
        d[i, best] = 1
    return d


def eliminate_redundant(d: torch.Tensor) -> list[int]:
    """ELIM_REDUNDANT: every unit i with D[i, j] = 1 for some j != i is pruned in favour of j.

    Returns:
        ``survivor[i]``: i for a kept unit, else the kept unit that finally replaces it. Chains are
        followed (j may itself be replaced); each replacement moves strictly up the order "larger
        neighbourhood, or equal and later", so chains end.
    """
    k = d.shape[0]
    target = []
    for i in range(k):
        others = [j for j in range(k) if j != i and d[i, j]]
        target.append(others[0] if others else i)
    survivor = []
    for i in range(k):
        j, seen = i, {i}
        while target[j] != j:
            j = target[j]
            assert j not in seen, f"replacement chain loops at unit {j}: D = {d.tolist()}"
            seen.add(j)
        survivor.append(j)
    return survivor


@dataclass(frozen=True, slots=True)
class PruneDecision:
    """Outcome of redundant-unit pruning for one attention block."""

    alive: torch.Tensor
    """bool (num_units,): alive after this decision."""
    replaced_by: dict[int, int]
    """newly pruned unit -> the kept unit whose output projection absorbs it."""
    closest_distance: float
    """The smallest l_inf distance between two live units before this decision (inf with fewer than two)."""
    theta: float
    """The threshold the decision used, in weight units (theta itself, or theta times the weight scale)."""


def closest_distance(distances: torch.Tensor) -> float:
    """The smallest off-diagonal entry of a distance matrix (inf when it has fewer than two rows)."""
    if distances.shape[0] < 2:
        return float("inf")
    off_diagonal = ~torch.eye(distances.shape[0], dtype=torch.bool, device=distances.device)
    return float(distances[off_diagonal].min())


def decide_redundant_units(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: UnitLayout,
                           alive: torch.Tensor, theta: float, relative: bool = False) -> PruneDecision:
    """Algorithms 2 and 3 on the units that are still alive (pruned units never come back).

    Args:
        q, k, v: full weights of the block (HF layout, fp32).
        layout: unit geometry.
        alive: bool (num_units,) mask before this decision.
        theta: l_inf similarity threshold.
        relative: theta is relative to the block's weight scale, the largest |w| of the live units' [Q, K, V]
            (an l_inf norm like the distance, so distance / scale lies in [0, 2] whatever the model's scale).
    """
    alive_index = torch.nonzero(alive).flatten().tolist()
    units = unit_parameters(q.float(), k.float(), v.float(), layout)[alive_index]
    if relative:
        theta = theta * float(units.abs().max()) if units.numel() else 0.0
    distances = linf_distances(units) if alive_index else units.new_zeros(0, 0)
    closest = closest_distance(distances)
    s = similarity(distances, theta)
    if int(s.sum()) == len(alive_index):
        return PruneDecision(alive.clone(), {}, closest, theta)
    survivor = eliminate_redundant(find_dominating(s))
    new_alive = alive.clone()
    replaced_by = {}
    for local, kept in enumerate(survivor):
        if kept != local:
            new_alive[alive_index[local]] = False
            replaced_by[alive_index[local]] = alive_index[kept]
    return PruneDecision(new_alive, replaced_by, closest, theta)


def fold_output_projection(o: torch.Tensor, replaced_by: dict[int, int], layout: UnitLayout) -> torch.Tensor:
    """Add each pruned unit's output-projection columns into its replacement's (o is (d, heads * head_dim)).

    Since o(H) = sum_h H_h W_h and H_i ~ H_j, H_i W_i + H_j W_j ~ H_j (W_i + W_j). Query head t of the
    pruned group goes into query head t of the kept group. Returns a new tensor; pruned columns keep their
    values here and are zeroed by the mask.
    """
    folded = o.clone()
    width = layout.q_rows_per_unit
    for pruned, kept in sorted(replaced_by.items()):
        folded[:, kept * width:(kept + 1) * width] += o[:, pruned * width:(pruned + 1) * width]
    return folded
