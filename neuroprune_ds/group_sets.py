"""The group sets of a resolved architecture: which weights NeuroPrune penalises, grouped how, in which role.

A group set is a list of weight matrices whose rows or columns share group indices (docs/algorithm.md
sections 1 and 2). Its role says what its groups are; the pruner asks roles, never names:

- ``FFN_INPUT``: group i is FFN unit i's in connections, row i of the input projections (all of them in one
  set with ``mlp_groups: neuron``, one set per input projection with ``output_rows``);
- ``FFN_OUTPUT``: group i is FFN unit i's out connections, column i of the output projection;
- ``FFN_OUTPUT_ROWS``: group i is row i of the output projection (``mlp_groups: output_rows``);
- ``ATTENTION_INPUT``: group i is input dimension i of an attention block, column i of Q, K and V together.

"Penalised" means Q, K, V and the FFN matrices (:func:`neuroprune_ds.arch.penalised_weights`, which the
export and the report use): every one of them is in exactly one penalised set, and the weight sparsity and
``target_sparsity`` are measured over exactly those weights. The attention output
projection is not penalised (the paper's choice) and is in no set. With ``output_rows`` the output
projection's columns also form an ``FFN_OUTPUT`` set that is not penalised: it counts the units' out
connections (FFN units alive, unit pruning) while the rows set penalises and counts its weights.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from neuroprune_ds.arch import ResolvedArchitecture
from neuroprune_ds.flat_slice import COL, ROW


class Role(Enum):
    """What the groups of a group set are (see the module docstring)."""

    FFN_INPUT = "ffn_input"
    FFN_OUTPUT = "ffn_output"
    FFN_OUTPUT_ROWS = "ffn_output_rows"
    ATTENTION_INPUT = "attention_input"

    @property
    def attention(self) -> bool:
        """True for the attention penalty (l1^(1/2) groups, attn_lambda), False for the FFN's (degree-weighted)."""
        return self is Role.ATTENTION_INPUT


@dataclass(frozen=True, slots=True)
class GroupSet:
    """Weight matrices sharing group indices, in one role.

    penalised: the penalty acts on these weights and they count in the weight sparsity; False for a set that
    only measures connections.
    """

    key: str
    block: str
    role: Role
    members: tuple[tuple[str, str], ...]  # (parameter name, axis)
    penalised: bool = True

    @property
    def names(self) -> tuple[str, ...]:
        """The parameter names of the member matrices."""
        return tuple(name for name, _ in self.members)


def build_group_sets(arch: ResolvedArchitecture, mlp_groups: str) -> tuple[GroupSet, ...]:
    """The group sets of a resolved architecture, FFN blocks first (see docs/algorithm.md sections 1 and 2)."""
    sets = []
    for block in arch.ffn:
        inputs = tuple((linear.weight, ROW) for linear in block.inputs)
        output = ((block.output.weight, COL),)
        if mlp_groups == "neuron":
            sets.append(GroupSet(f"{block.name}:in", block.name, Role.FFN_INPUT, inputs))
            sets.append(GroupSet(f"{block.name}:out", block.name, Role.FFN_OUTPUT, output))
        else:  # output_rows: every row of every FFN weight is its own group
            sets += [GroupSet(f"{name}:rows", block.name, Role.FFN_INPUT, ((name, ROW),)) for name, _ in inputs]
            sets.append(GroupSet(f"{block.output.weight}:rows", block.name, Role.FFN_OUTPUT_ROWS,
                                 ((block.output.weight, ROW),)))
            sets.append(GroupSet(f"{block.name}:out", block.name, Role.FFN_OUTPUT, output, penalised=False))
    for block in arch.attention:
        sets.append(GroupSet(f"{block.name}:qkv", block.name, Role.ATTENTION_INPUT,
                             tuple((linear.weight, COL) for linear in (block.q, block.k, block.v))))
    return tuple(sets)


def penalised_names(group_sets: tuple[GroupSet, ...]) -> list[str]:
    """The penalised matrices (Q, K, V and the FFN's), each once, in group-set order."""
    return [name for s in group_sets if s.penalised for name in s.names]
