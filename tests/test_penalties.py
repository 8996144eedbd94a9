"""The penalty math against hand-worked examples, autograd, and the flat-slice decomposition."""

import math

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from neuroprune_ds.flat_slice import COL, ROW, Block, FlatSlice
from neuroprune_ds.penalties import (GroupMember, add_penalty_grad_, attention_group_scale, attention_penalty,
                                     attention_penalty_value, degree_weights, group_stats, mlp_penalty,
                                     mlp_penalty_value, soft_threshold_)


def full(weight, axis):
    return GroupMember(weight.flatten(), FlatSlice.of(weight.shape), axis)


# A gated FFN of width 2 on d = 3 (LLaMA layout: gate/up are (2, 3), down is (3, 2)).
GATE = torch.tensor([[1.0, 0.0, 0.0], [0.5, -0.5, 0.0]])
UP = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, 0.0]])
DOWN = torch.tensor([[1.0, 0.0], [0.0, 0.0], [-1.0, 0.0]])


def test_blocks_of_a_slice_cut_mid_row():
    # 3 x 4 matrix, elements 2..10: end of row 0, all of row 1, start of row 2.
    sl = FlatSlice.of((3, 4), offset=2, numel=9)
    assert sl.blocks() == [Block(0, 0, 1, 2, 2), Block(2, 1, 1, 0, 4), Block(6, 2, 1, 0, 3)]
    # Inside one row only.
    assert FlatSlice.of((3, 4), offset=5, numel=2).blocks() == [Block(0, 1, 1, 1, 2)]


def test_mlp_hand_worked_example():
    stats_in = group_stats([full(GATE, ROW), full(UP, ROW)], epsilon=1e-4)
    # unit 0: gate row 0 has 1 non-zero, up row 0 has 1 -> 2 of 6 connections; L1 = 1 + 2.
    # unit 1: gate row 1 has 2 non-zeros, up row 1 none -> 2 of 6; L1 = 0.5 + 0.5.
    assert stats_in.nonzero.tolist() == [2, 2] and stats_in.connections == 6
    assert stats_in.l1.tolist() == [3.0, 1.0]
    omega_in = degree_weights(stats_in, c_min=0.05)
    assert omega_in.tolist() == pytest.approx([3.0, 3.0])
    stats_out = group_stats([full(DOWN, COL)], epsilon=1e-4)
    # column 0 of down: 2 of 3 non-zero -> omega 1.5, L1 2; column 1 empty -> c = 0 -> omega 1 / c_min = 20.
    omega_out = degree_weights(stats_out, c_min=0.05)
    assert omega_out.tolist() == pytest.approx([1.5, 20.0])
    total = float(mlp_penalty_value(stats_in, omega_in) + mlp_penalty_value(stats_out, omega_out))
    assert total == pytest.approx(3 * 3 + 3 * 1 + 1.5 * 2 + 20 * 0)

    grad = torch.zeros(6)
    add_penalty_grad_(grad, full(GATE, ROW), omega_in, lam=0.1)
    torch.testing.assert_close(grad.view(2, 3), torch.tensor([[0.3, 0.0, 0.0], [0.3, -0.3, 0.0]]))


def test_epsilon_decides_what_counts_as_a_connection():
    w = torch.tensor([[1e-5, 2e-4, -1e-3]])
    assert group_stats([full(w, ROW)], epsilon=1e-4).nonzero.tolist() == [2]
    assert group_stats([full(w, ROW)], epsilon=1e-2).nonzero.tolist() == [0]


def test_attention_hand_worked_example():
    # GQA-shaped: q has 2 rows, k and v one each; groups are the 2 input columns.
    q = torch.tensor([[1.0, -1.0], [0.0, 2.0]])
    k = torch.tensor([[0.0, 1.0]])
    v = torch.tensor([[8.0, 0.0]])
    stats = group_stats([full(q, COL), full(k, COL), full(v, COL)], epsilon=1e-4)
    assert stats.l1.tolist() == [9.0, 4.0]  # |1|+|0|+|0|+|8|, |-1|+|2|+|1|+|0|
    assert float(attention_penalty_value(stats, delta=0.0)) == pytest.approx(3.0 + 2.0)
    scale = attention_group_scale(stats, delta=0.0)
    assert scale.tolist() == pytest.approx([1 / 6, 1 / 4])
    grad = torch.zeros(4)
    add_penalty_grad_(grad, full(q, COL), scale, lam=1.0)
    torch.testing.assert_close(grad.view(2, 2), torch.tensor([[1 / 6, -1 / 4], [0.0, 1 / 4]]))
    # delta keeps the gradient finite for an all-zero group and R_att(0) = 0.
    zero = torch.zeros(2, 2)
    zstats = group_stats([full(zero, COL)], epsilon=1e-4)
    assert float(attention_penalty_value(zstats, delta=1e-8)) == 0.0
    assert attention_group_scale(zstats, delta=1e-8).tolist() == pytest.approx([0.5e4, 0.5e4])


def test_mlp_gradient_equals_autograd():
    torch.manual_seed(0)
    gate, up, down = torch.randn(6, 5), torch.randn(6, 5), torch.randn(5, 6)
    gate[2].zero_()
    stats_in = group_stats([full(gate, ROW), full(up, ROW)], 1e-4)
    stats_out = group_stats([full(down, COL)], 1e-4)
    omega_in, omega_out = degree_weights(stats_in, 0.05), degree_weights(stats_out, 0.05)
    params = [t.clone().requires_grad_() for t in (gate, up, down)]
    value = mlp_penalty([(params[0], ROW), (params[1], ROW)], omega_in) + mlp_penalty([(params[2], COL)], omega_out)
    value.backward()
    assert float(value.detach()) == pytest.approx(float(mlp_penalty_value(stats_in, omega_in) + mlp_penalty_value(stats_out, omega_out)))
    for param, (weight, axis, omega) in zip(params, [(gate, ROW, omega_in), (up, ROW, omega_in), (down, COL, omega_out)]):
        grad = torch.zeros(weight.numel())
        add_penalty_grad_(grad, full(weight, axis), omega, lam=1.0)
        torch.testing.assert_close(grad.view_as(weight), param.grad, rtol=1e-6, atol=1e-7)


def test_attention_gradient_equals_autograd():
    torch.manual_seed(1)
    q, k, v = torch.randn(8, 6), torch.randn(4, 6), torch.randn(4, 6)
    q[:, 3] = 0
    k[:, 3] = 0
    v[:, 3] = 0
    params = [t.clone().requires_grad_() for t in (q, k, v)]
    attention_penalty(*params, delta=1e-8).backward()
    stats = group_stats([full(t, COL) for t in (q, k, v)], 1e-4)
    assert float(attention_penalty(q, k, v, 1e-8)) == pytest.approx(float(attention_penalty_value(stats, 1e-8)), rel=1e-6)
    scale = attention_group_scale(stats, 1e-8)
    for param, weight in zip(params, (q, k, v)):
        grad = torch.zeros(weight.numel())
        add_penalty_grad_(grad, full(weight, COL), scale, lam=1.0)
        torch.testing.assert_close(grad.view_as(weight), param.grad, rtol=1e-5, atol=1e-6)


@st.composite
def matrix_and_cuts(draw):
    rows = draw(st.integers(1, 7))
    cols = draw(st.integers(1, 9))
    total = rows * cols
    cuts = sorted(set(draw(st.lists(st.integers(0, total), max_size=5))) | {0, total})
    axis = draw(st.sampled_from([ROW, COL]))
    one_d = draw(st.booleans()) and rows == 1
    return (cols,) if one_d else (rows, cols), cuts, axis


@settings(max_examples=200, deadline=None)
@given(matrix_and_cuts(), st.integers(0, 2**16))
@example(((2, 8), [0, 10, 16], ROW), 5185)  # fp32 sums of the two row pieces differ from one sum by 1.2e-7
def test_slices_decompose_the_full_computation(case, seed):
    shape, cuts, axis = case
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(shape, generator=gen)
    weight[weight.abs() < 0.3] = 0.0
    flat = weight.flatten()
    sl_full = FlatSlice.of(shape)
    per_group = torch.rand(sl_full.group_size(axis), generator=gen, dtype=torch.float64)

    full_stats = group_stats([GroupMember(flat, sl_full, axis)], 1e-4)
    full_grad = torch.zeros_like(flat)
    add_penalty_grad_(full_grad, GroupMember(flat, sl_full, axis), per_group, lam=0.5)
    full_scaled = flat.clone()
    sl_full.scale_(full_scaled, per_group, axis)

    l1 = torch.zeros_like(full_stats.l1)
    nonzero = torch.zeros_like(full_stats.nonzero)
    grads, scaled, covered = [], [], 0
    for start, end in zip(cuts[:-1], cuts[1:]):
        sl = FlatSlice.of(shape, start, end - start)
        assert sum(b.nrows * b.ncols for b in sl.blocks()) == end - start
        local = flat[start:end].clone()
        member = GroupMember(local, sl, axis)
        stats = group_stats([member], 1e-4)
        l1 += stats.l1
        nonzero += stats.nonzero
        grad = torch.zeros_like(local)
        add_penalty_grad_(grad, member, per_group, lam=0.5)
        grads.append(grad)
        sl.scale_(local, per_group, axis)
        scaled.append(local)
        covered += end - start
    assert covered == flat.numel()
    # Each group's L1 is a sum of n non-negative fp32 terms, in pieces or at once: either order is within
    # (n - 1) * 2^-24 of the exact sum (relative), so the two are within twice that of each other.
    n = sl_full.cols if axis == ROW else sl_full.rows
    torch.testing.assert_close(l1, full_stats.l1, rtol=2 * n * 2.0**-24, atol=0.0)
    assert torch.equal(nonzero, full_stats.nonzero)
    assert torch.equal(torch.cat(grads), full_grad)
    assert torch.equal(torch.cat(scaled), full_scaled)


def test_one_dimensional_tensors_are_columns():
    bias = torch.tensor([1.0, -2.0, 0.0])
    sl = FlatSlice.of(bias.shape, offset=1, numel=2)
    keep = torch.tensor([1.0, 0.0, 1.0])
    local = bias[1:].clone()
    sl.scale_(local, keep, ROW)
    assert local.tolist() == [-0.0, 0.0]
    assert math.isclose(float(sl.group_sums(bias[1:].abs(), ROW).sum()), 2.0)


# ---- the decoupled mode's proximal step --------------------------------------------------------------
def test_soft_threshold_by_hand_per_row_and_per_column():
    w = torch.tensor([[0.3, -0.05, 0.0], [-0.2, 0.15, 1.0]])
    rows = w.flatten().clone()
    soft_threshold_(rows, FlatSlice.of(w.shape), torch.tensor([0.1, 0.5]), ROW)
    torch.testing.assert_close(rows.view(2, 3), torch.tensor([[0.2, 0.0, 0.0], [0.0, 0.0, 0.5]]))
    cols = w.flatten().clone()
    soft_threshold_(cols, FlatSlice.of(w.shape), torch.tensor([0.25, 0.0, 2.0]), COL)
    torch.testing.assert_close(cols.view(2, 3), torch.tensor([[0.05, -0.05, 0.0], [0.0, 0.15, 0.0]]))


def test_soft_threshold_on_slices_equals_the_full_matrix():
    torch.manual_seed(0)
    w = torch.randn(5, 7)
    for axis, threshold in ((ROW, torch.rand(5)), (COL, torch.rand(7))):
        expected = w.flatten().clone()
        soft_threshold_(expected, FlatSlice.of(w.shape), threshold, axis)
        for start, end in ((0, 9), (9, 23), (23, 35)):
            piece = w.flatten()[start:end].clone()
            soft_threshold_(piece, FlatSlice.of(w.shape, start, end - start), threshold, axis)
            assert torch.equal(piece, expected[start:end])


def test_attention_proximal_step_by_hand_and_it_descends():
    """One group y = (3, -1, 0.5), step s = 1, delta = 0: g = 4.5, t = 0.5 / sqrt(4.5) = 0.2357."""
    y = torch.tensor([[3.0], [-1.0], [0.5]])  # (out = 3, in = 1): one attention input dimension
    stats = group_stats([full(y, COL)], epsilon=1e-4)
    t = attention_group_scale(stats, delta=0.0)
    assert float(t) == pytest.approx(0.5 / math.sqrt(4.5))
    w = y.flatten().clone()
    soft_threshold_(w, FlatSlice.of(y.shape), t, COL)
    assert w.tolist() == pytest.approx([3 - 0.2357023, -(1 - 0.2357023), 0.5 - 0.2357023], abs=1e-6)

    def objective(a):  # 1/2 ||a - y||^2 + s sqrt(||a||_1): the proximal problem
        return 0.5 * float(((a - y.flatten()) ** 2).sum()) + math.sqrt(float(a.abs().sum()))

    assert objective(w) < objective(y.flatten())
    # the exact proximal point is the fixed point G = sum max(|y| - 1 / (2 sqrt G), 0); one step is close to it
    g = 4.5
    for _ in range(50):
        g = float((y.abs() - 0.5 / math.sqrt(g)).clamp(min=0).sum())
    exact = torch.sign(y.flatten()) * (y.flatten().abs() - 0.5 / math.sqrt(g)).clamp(min=0)
    assert objective(exact) <= objective(w) <= objective(exact) + 1e-2
