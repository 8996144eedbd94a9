"""What an export keeps: the masks applied to full fp32 weights, the attention units and FFN units that a
compact export keeps, the constant activations folded into output biases, and the sparsity figures.

Pure tensor functions on full (gathered) weights, keyed by parameter name as in ``neuroprune_ds.arch``;
nothing here reads files or knows a model family beyond the resolved blocks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from transformers.activations import ACT2FN

from neuroprune_ds.arch import AttentionBlock, FFNBlock, ResolvedArchitecture, penalised_weights
from neuroprune_ds.flat_slice import COL, ROW


def _dim(axis: str) -> int:
    """The tensor dimension of an axis: a row axis indexes dim 0 (also of a bias), a column axis dim 1."""
    return 0 if axis == ROW else 1


def mask_rules(arch: ResolvedArchitecture,
               alive: Mapping[str, torch.Tensor]) -> dict[str, list[tuple[str, torch.Tensor]]]:
    """parameter name -> (axis ROW or COL, 0/1 keep vector along it) that zero the pruned units: their q/k/v
    rows and biases and o columns.

    Args:
        alive: bool (num_units,) per attention block name; blocks not listed keep every unit.
    """
    rules: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for block in arch.attention:
        if block.name not in alive or bool(alive[block.name].all()):
            continue
        layout = block.layout
        q_keep, kv_keep = layout.q_keep(alive[block.name]), layout.kv_keep(alive[block.name])
        for linear, keep in ((block.q, q_keep), (block.k, kv_keep), (block.v, kv_keep)):
            rules.setdefault(linear.weight, []).append((ROW, keep))
            if linear.bias:
                rules.setdefault(linear.bias, []).append((ROW, keep))
        rules.setdefault(block.o.weight, []).append((COL, q_keep))
    return rules


@torch.no_grad()
def mask_tensor_(tensor: torch.Tensor, rules: list[tuple[str, torch.Tensor]], threshold: float | None) -> None:
    """Apply one parameter's ``rules`` (see :func:`mask_rules`) in place, then, when ``threshold`` is set (for
    a penalised matrix), zero every weight with |w| < threshold."""
    for axis, keep in rules:
        tensor.mul_(keep.unsqueeze(1) if axis == ROW and tensor.dim() == 2 else keep)
    if threshold is not None:
        tensor.masked_fill_(tensor.abs() < threshold, 0.0)


def apply_masks_(params: Mapping[str, torch.Tensor], arch: ResolvedArchitecture, alive: Mapping[str, torch.Tensor],
                 threshold: float | None = None) -> None:
    """Zero pruned units in place (:func:`mask_rules`); then, when ``threshold`` is set, every weight of a
    penalised matrix with |w| < threshold.

    Args:
        params: full fp32 tensors by parameter name.
        arch: the blocks of the model.
        alive: bool (num_units,) per attention block name; blocks not listed keep every unit.
        threshold: the hard threshold epsilon, or None for none.
    """
    rules = mask_rules(arch, alive)
    penalised = set(penalised_weights(arch)) if threshold is not None else set()
    for name in set(rules) | penalised:
        mask_tensor_(params[name], rules.get(name, []), threshold if name in penalised else None)


@dataclass(frozen=True, slots=True)
class AttentionKeep:
    """The units (KV groups) of one attention block that an export keeps."""

    block: AttentionBlock
    units: torch.Tensor
    """int64 indices of the kept units, ascending."""

    @property
    def q_rows(self) -> torch.Tensor:
        """Rows of q (and columns of o) of the kept query heads."""
        return _expand(self.units, self.block.heads_per_unit * self.block.head_dim)

    @property
    def kv_rows(self) -> torch.Tensor:
        """Rows of k and v of the kept KV heads."""
        return _expand(self.units, self.block.head_dim)

    @property
    def heads(self) -> list[int]:
        """Indices of the kept query heads."""
        return _expand(self.units, self.block.heads_per_unit).tolist()


@dataclass(frozen=True, slots=True)
class FFNKeep:
    """The hidden units of one FFN block that an export keeps, and the output-bias correction for the rest."""

    block: FFNBlock
    units: torch.Tensor
    """int64 indices of the kept units, ascending."""
    bias_delta: torch.Tensor | None
    """(out_features,) constant contribution of removed units whose activation is constant and non-zero;
    None when there is none."""
    num_folded: int


def _expand(units: torch.Tensor, size: int) -> torch.Tensor:
    """Indices of ``size`` consecutive rows per unit."""
    return (units.unsqueeze(1) * size + torch.arange(size)).flatten()


def attention_keep(block: AttentionBlock, alive: torch.Tensor | None) -> AttentionKeep:
    """The kept units of ``block`` given its alive mask (None: all alive)."""
    units = torch.arange(block.num_units) if alive is None else torch.nonzero(alive).flatten()
    return AttentionKeep(block, units)


@torch.no_grad()
def ffn_keep(block: FFNBlock, params: Mapping[str, torch.Tensor]) -> FFNKeep:
    """Which hidden units of ``block`` a compact export can drop without changing the function.

    A unit whose input rows are all zero has a constant pre-activation (its bias, or 0), hence a constant
    output act(b) (act(b_gate) * b_up when gated), whose contribution W_out[:, i] * value can move into the
    output bias. A unit goes when its output column is zero, when its activation is identically zero (gated:
    either factor is), or when it is constant and the output projection has a bias to absorb it.
    """
    assert len(block.inputs) in (1, 2), block.inputs
    width = block.width
    w_out = params[block.output.weight]
    out_zero = ~w_out.any(dim=0)
    const, value = [], []
    for linear in block.inputs:
        const.append(~params[linear.weight].any(dim=1))
        value.append(params[linear.bias].float() if linear.bias else torch.zeros(width))
    act = ACT2FN[block.activation]
    gate_value = act(value[0])
    if len(block.inputs) == 1:
        constant, constant_value = const[0], gate_value
        silent = constant & (constant_value == 0)
    else:  # act(x W_gate + b_gate) * (x W_up + b_up): either factor identically zero silences the unit
        constant, constant_value = const[0] & const[1], gate_value * value[1]
        silent = ((const[0] & (gate_value == 0)) | (const[1] & (value[1] == 0))
                  | (constant & (constant_value == 0)))
    folded = constant & ~silent & ~out_zero
    if block.output.bias is None:
        folded = torch.zeros_like(folded)
    removed = out_zero | silent | folded
    delta = None
    if bool(folded.any()):
        delta = w_out[:, folded].double() @ constant_value[folded].double()
    return FFNKeep(block, torch.nonzero(~removed).flatten(), delta, int(folded.sum()))


@dataclass(frozen=True, slots=True)
class RelativeBiasKeep:
    """T5-style relative position bias of one stack: the table (in layer 0's self-attention) keeps the
    columns of every head some self-attention layer of the stack kept; each layer indexes its own."""

    table: str
    """Parameter name of the (num_buckets, num_heads) table."""
    columns: torch.Tensor
    """int64 original head indices kept in the table, ascending."""
    per_layer: dict[int, list[int]]
    """layer -> positions in ``columns`` of that layer's kept heads, in the layer's head order."""


def relative_bias_keep(attention: list[AttentionKeep]) -> dict[str, RelativeBiasKeep]:
    """Per stack whose layer 0 holds a relative bias table, what the compact table and layers keep."""
    out = {}
    tables = {k.block.stack: k.block.relative_bias for k in attention if k.block.relative_bias}
    for stack, table in tables.items():
        layers = {k.block.layer: k.heads for k in attention if k.block.stack == stack and k.block.kind == "self"}
        columns = sorted({head for heads in layers.values() for head in heads})
        position = {head: i for i, head in enumerate(columns)}
        out[stack] = RelativeBiasKeep(table, torch.tensor(columns, dtype=torch.long),
                                      {layer: [position[h] for h in heads] for layer, heads in layers.items()})
    return out


@dataclass(frozen=True, slots=True)
class ExportPlan:
    """Everything a compact export removes, by parameter: index along an axis, and bias corrections."""

    attention: list[AttentionKeep]
    ffn: list[FFNKeep]
    relative_bias: dict[str, RelativeBiasKeep]

    def selections(self) -> dict[str, tuple[str, torch.Tensor]]:
        """parameter name -> (axis ROW or COL, kept indices along it) for every parameter the compact export
        slices."""
        out = {}
        for keep in self.attention:
            block = keep.block
            for linear, rows in ((block.q, keep.q_rows), (block.k, keep.kv_rows), (block.v, keep.kv_rows)):
                out[linear.weight] = (ROW, rows)
                if linear.bias:
                    out[linear.bias] = (ROW, rows)
            out[block.o.weight] = (COL, keep.q_rows)
        for keep in self.ffn:
            for linear in keep.block.inputs:
                out[linear.weight] = (ROW, keep.units)
                if linear.bias:
                    out[linear.bias] = (ROW, keep.units)
            out[keep.block.output.weight] = (COL, keep.units)
        for bias in self.relative_bias.values():
            out[bias.table] = (COL, bias.columns)
        return out

    def bias_deltas(self) -> dict[str, torch.Tensor]:
        """output-bias parameter name -> (out_features,) float64 correction to add."""
        return {k.block.output.bias: k.bias_delta for k in self.ffn if k.bias_delta is not None}


def make_plan(arch: ResolvedArchitecture, params: Mapping[str, torch.Tensor],
              alive: Mapping[str, torch.Tensor]) -> ExportPlan:
    """The compact export of masked weights ``params`` (see :func:`apply_masks_`)."""
    attention = [attention_keep(b, alive.get(b.name)) for b in arch.attention]
    return ExportPlan(attention, [ffn_keep(b, params) for b in arch.ffn], relative_bias_keep(attention))


def compact_tensor(name: str, tensor: torch.Tensor, selections: Mapping[str, tuple[str, torch.Tensor]],
                   bias_deltas: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """``tensor`` (parameter ``name``) as the compact export stores it; the tensor itself when unchanged."""
    if name in selections:
        axis, index = selections[name]
        tensor = tensor.index_select(_dim(axis), index)
    if name in bias_deltas:
        tensor = (tensor.double() + bias_deltas[name]).to(tensor.dtype)
    return tensor


def compact_shape(name: str, shape: torch.Size, selections: Mapping[str, tuple[str, torch.Tensor]]) -> torch.Size:
    """The shape :func:`compact_tensor` gives parameter ``name`` of ``shape``."""
    if name not in selections:
        return torch.Size(shape)
    axis, index = selections[name]
    return torch.Size(len(index) if i == _dim(axis) else n for i, n in enumerate(shape))


@dataclass(slots=True)
class SparsityCount:
    """Weight sparsity (|w| < epsilon) and structural sparsity (what the compact export removes) of the
    penalised matrices of an architecture (:func:`neuroprune_ds.arch.penalised_weights`; docs/algorithm.md
    section 7), counted one tensor at a time."""

    epsilon: float
    total: int = 0
    small: int = 0
    removed: int = 0

    def add(self, masked: torch.Tensor, kept_numel: int) -> None:
        """Count one penalised matrix: its masked weights and the size the compact export keeps of it."""
        self.total += masked.numel()
        self.small += int((masked.abs() < self.epsilon).sum())
        self.removed += masked.numel() - kept_numel

    def figures(self) -> dict[str, float]:
        total = max(self.total, 1)
        return {"weight_sparsity": self.small / total, "structural_sparsity": self.removed / total}
