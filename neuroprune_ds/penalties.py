"""The two NeuroPrune penalties, their statistics and their gradients (pure tensor functions).

A *group set* is a list of weight matrices whose rows or columns share group indices:
- MLP (``mlp_groups: neuron``): FFN hidden unit i is row i of every input projection and column i of the
  output projection; the "in" set and the "out" set each get their own degree weights.
- Attention: input dimension i is column i of q, k and v together.

Everything works on a ``FlatSlice`` of each matrix (a contiguous range of the flattened weight, what a ZeRO
rank holds) so that per-group statistics of the slices of all ranks add up to those of the full matrices.
The penalty weights and group scales are then computed from the summed statistics, identically on every
rank, and the gradient of each local element needs only its own group's value. Nothing here communicates.

Formulas (HF layout; see docs/algorithm.md sections 1 and 2):
- degree weight of group i: omega_i = 1 / max(c_i, c_min), c_i = #{|w| >= epsilon} / #connections.
- R_MLP = sum_i omega_i * ||group_i||_1, gradient omega_i * sign(w) (omega held constant).
- R_att = sum_i (sqrt(g_i + delta) - sqrt(delta)), g_i = ||group_i||_1, gradient 0.5 (g_i + delta)^-1/2
  sign(w). The delta smoothing keeps the gradient finite at g_i = 0 and makes R_att(0) = 0.
- Decoupled update (``update: decoupled``): after the optimizer step, w <- sign(w) max(|w| - t_i, 0) with
  t_i = lr * lambda * f_i, f_i the same per-group factor (omega_i, or 0.5 (g_i + delta)^-1/2 with g_i taken
  on the weights the optimizer step produced); see :func:`soft_threshold_` for why that is the proximal step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.flat_slice import ROW, FlatSlice
from neuroprune_ds.group_sets import Role


@dataclass(frozen=True, slots=True)
class GroupMember:
    """One matrix's part in a group set: its local values (1-D), their slice, and the group axis."""

    local: torch.Tensor
    slice: FlatSlice
    axis: str

    @property
    def connections_per_group(self) -> int:
        """How many weights of the FULL matrix belong to each group."""
        return self.slice.cols if self.axis == ROW else self.slice.rows


@dataclass(frozen=True, slots=True)
class GroupStats:
    """Per-group statistics of a group set: L1 norm, count of |w| >= epsilon, and total connections."""

    l1: torch.Tensor
    nonzero: torch.Tensor
    connections: int


def group_stats(members: list[GroupMember], epsilon: float, out: torch.Tensor | None = None) -> GroupStats:
    """Per-group L1 norms and counts of |w| >= epsilon over the local slices of ``members`` (float64).

    One pass per member: |w| and its presence mask are stacked and reduced together.

    Args:
        members: matrices sharing group indices; all must have the same number of groups.
        epsilon: magnitude below which a weight counts as absent.
        out: float64 zeros of shape (2, groups) to accumulate into (row 0: L1, row 1: counts), e.g. a piece
            of one buffer for all group sets; a new one when None.

    Returns:
        Partial statistics (views of ``out``): summing those of every rank's slices gives the full-matrix
        statistics.
    """
    sizes = {m.slice.group_size(m.axis) for m in members}
    assert len(sizes) == 1, f"group set members disagree on the number of groups: {sizes}"
    if out is None:
        out = torch.zeros(2, sizes.pop(), dtype=torch.float64, device=members[0].local.device)
    for m in members:
        magnitude_and_present = m.local.new_empty((2, m.local.numel()))
        magnitude = torch.abs(m.local, out=magnitude_and_present[0])
        # a float 0/1 tensor straight from the comparison: several times faster to reduce than a bool one
        torch.ge(magnitude, epsilon, out=magnitude_and_present[1])
        m.slice.group_sums(magnitude_and_present, m.axis, out=out)
    return GroupStats(out[0], out[1], sum(m.connections_per_group for m in members))


def degree_weights(stats: GroupStats, c_min: float) -> torch.Tensor:
    """omega_i = 1 / max(c_i, c_min): sparsely connected units are penalised more (preferential attachment)."""
    connectivity = stats.nonzero / stats.connections
    return 1.0 / connectivity.clamp(min=c_min)


def mlp_penalty_value(stats: GroupStats, omega: torch.Tensor) -> torch.Tensor:
    """R_MLP of one group set, a 0-d tensor where the statistics are: sum_i omega_i * ||group_i||_1."""
    return (omega * stats.l1).sum()


def attention_group_scale(stats: GroupStats, delta: float) -> torch.Tensor:
    """d R_att / d g_i = 0.5 / sqrt(g_i + delta): the per-group factor of the attention gradient."""
    return 0.5 / torch.sqrt(stats.l1 + delta)


def attention_penalty_value(stats: GroupStats, delta: float) -> torch.Tensor:
    """R_att of one attention block, a 0-d tensor where the statistics are: sum_i sqrt(g_i + delta) - sqrt(delta)."""
    return (torch.sqrt(stats.l1 + delta) - math.sqrt(delta)).sum()


@dataclass(frozen=True, slots=True)
class Penalty:
    """The run's penalty, chosen once (``penalty: neuroprune`` or ``l1``), for the gradient and the decoupled mode.

    A penalised group set's gradient is ``lam * f[group] * sign(w)`` and its proximal threshold
    ``lr * lam * f[group]``, with ``lam`` and the per-group factor ``f`` from here: mlp_lambda for FFN sets and
    attn_lambda for attention sets; f the degree weights omega (FFN) or the attention scale, or 1 everywhere
    for plain L1.
    """

    plain_l1: bool
    mlp_lambda: float
    attn_lambda: float
    delta: float

    @classmethod
    def of(cls, config: NeuroPruneConfig) -> Penalty:
        return cls(config.penalty == "l1", config.mlp_lambda, config.attn_lambda, config.delta)

    def lam(self, role: Role) -> float:
        """The configured lambda of a set in ``role`` (before warm-up and the controller's scale)."""
        return self.attn_lambda if role.attention else self.mlp_lambda

    def factor(self, role: Role, stats: GroupStats, omega: torch.Tensor | None) -> torch.Tensor:
        """f per group of a set in ``role``; ``omega`` its degree weights (FFN sets), ``stats`` its statistics."""
        if self.plain_l1:
            return torch.ones_like(stats.l1)
        return attention_group_scale(stats, self.delta) if role.attention else omega

    def value(self, role: Role, stats: GroupStats, omega: torch.Tensor | None) -> torch.Tensor:
        """The penalty of a set in ``role`` without its lambda, a 0-d tensor: sum_i ||group_i||_1 for plain
        L1, R_MLP or R_att otherwise."""
        if self.plain_l1:
            return stats.l1.sum()
        return attention_penalty_value(stats, self.delta) if role.attention else mlp_penalty_value(stats, omega)


def add_penalty_grad_(grad: torch.Tensor, member: GroupMember, per_group: torch.Tensor, lam: float) -> None:
    """``grad += lam * per_group[group] * sign(w)`` on a local slice (per_group: omega or the attention scale).

    Args:
        grad: this slice's gradient (1-D, same length as ``member.local``), updated in place.
        member: the weights and their slice.
        per_group: one factor per group of the full matrix.
        lam: the penalty's lambda.
    """
    member.slice.add_scaled_(grad, torch.sign(member.local), per_group, member.axis, lam)


def mlp_penalty(matrices: list[tuple[torch.Tensor, str]], omega: torch.Tensor) -> torch.Tensor:
    """Differentiable R_MLP on full matrices (the autograd reference): omega is treated as a constant.

    Args:
        matrices: (weight, axis) pairs of one group set; axis ROW groups rows, COL groups columns.
        omega: degree weights, one per group.
    """
    total = 0.0
    for weight, axis in matrices:
        l1 = weight.abs().sum(dim=1 if axis == ROW else 0)
        total = total + (omega.detach().to(weight.dtype) * l1).sum()
    return total


def attention_penalty(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, delta: float) -> torch.Tensor:
    """Differentiable R_att on full (out, in) q/k/v weights: one group per input dimension (column)."""
    g = q.abs().sum(dim=0) + k.abs().sum(dim=0) + v.abs().sum(dim=0)
    return (torch.sqrt(g + delta) - math.sqrt(delta)).sum()


def soft_threshold_(local: torch.Tensor, piece: FlatSlice, threshold: torch.Tensor, axis: str) -> None:
    """The proximal step of the penalties, in place on a local slice: w <- sign(w) * max(|w| - t[group], 0).

    Why this is the proximal step (docs/sparsity.md gives the same derivation). For step size s = lr * lambda
    the proximal map of a penalty R is prox(y) = argmin_w 1/2 ||w - y||^2 + s R(w), taken at y, the weights the
    optimizer step produced (ISTA; AdamW's decoupled weight decay is the same construction for an L2 term).
    - Degree-weighted L1, R = sum_i omega_i ||w_i||_1 with omega held constant: the problem separates per
      element into 1/2 (w - y)^2 + s omega_i |w|, whose minimiser is the soft threshold at t_i = s omega_i.
    - Attention group l1^(1/2), R = sum_i sqrt(||w_i||_1 + delta): not separable and not convex. Its KKT
      conditions say the minimiser is a soft threshold of y with the group's own t_i = s / (2 sqrt(G_i +
      delta)), where G_i is the minimiser's L1, a fixed point. sqrt is concave, so its tangent at g_i =
      ||y_i||_1 majorises it: sqrt(G + delta) <= sqrt(g + delta) + (G - g) / (2 sqrt(g + delta)). Minimising the
      majoriser is an L1 proximal problem, solved by the soft threshold at t_i = s * 0.5 / sqrt(g_i + delta)
      (:func:`attention_group_scale` of the post-step statistics, times s). This is one majorise-minimise
      iteration of the exact proximal map: the objective never rises above its value at y, and it differs from
      the fixed point by a relative O(n_i t_i / g_i), the share of the group's L1 that one step removes.

    Args:
        local: this slice's weights (1-D), updated in place.
        piece: which elements of the matrix ``local`` holds.
        threshold: t, one value >= 0 per group of the full matrix.
        axis: ROW (a group is a row) or COL (a column).
    """
    threshold = threshold.to(device=local.device, dtype=local.dtype)  # once, where the shard is (offload: CPU)
    for block in piece.blocks():
        view = block.view(local)
        shrunk = (view.abs() - piece.group_values(threshold, block, axis)).clamp_(min=0)
        view.copy_(shrunk.mul_(torch.sign(view)))
