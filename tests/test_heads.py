"""FIND_DOMINATING / ELIM_REDUNDANT, the fold and the GQA unit against hand-worked cases."""

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from neuroprune_ds.heads import (UnitLayout, decide_redundant_units, eliminate_redundant, find_dominating,
                                 fold_output_projection, linf_distances, similarity, unit_parameters)


def kept(s):
    survivor = eliminate_redundant(find_dominating(torch.tensor(s)))
    return sorted(set(survivor)), survivor


def test_clique_keeps_only_the_last_head():
    assert kept([[1] * 4] * 4) == ([3], [3, 3, 3, 3])


def test_path_keeps_the_middle_head():
    assert kept([[1, 1, 0], [1, 1, 1], [0, 1, 1]]) == ([1], [1, 1, 1])


def test_path_of_four_worked_by_hand():
    # S rows: 0:{0,1} 1:{0,1,2} 2:{1,2,3} 3:{2,3}. From 0: S0 - S1 = (0,0,-1,0) -> j* = 1, and S1 - S2 has a
    # +1, so 0 -> 1. From 3: S3 - S2 = (0,-1,0,0) -> 3 -> 2. Units 1 and 2 keep themselves.
    s = [[1, 1, 0, 0], [1, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 1]]
    d = find_dominating(torch.tensor(s))
    assert d.tolist() == [[1, 1, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert kept(s) == ([1, 2], [1, 1, 2, 2])


def test_no_similar_pair_changes_nothing():
    assert kept(torch.eye(5, dtype=torch.long).tolist()) == ([0, 1, 2, 3, 4], [0, 1, 2, 3, 4])


def test_similarity_and_linf_distance():
    units = torch.tensor([[0.0, 0.0], [0.1, -0.05], [0.3, 0.0]])
    dist = linf_distances(units)
    torch.testing.assert_close(dist, torch.tensor([[0.0, 0.1, 0.3], [0.1, 0.0, 0.2], [0.3, 0.2, 0.0]]))
    assert similarity(dist, theta=0.15).tolist() == [[1, 1, 0], [1, 1, 0], [0, 0, 1]]


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 8), st.integers(0, 2**16), st.floats(0.05, 0.6))
def test_every_pruned_unit_has_a_kept_neighbour_within_theta(k, seed, theta):
    gen = torch.Generator().manual_seed(seed)
    units = torch.rand(k, 3, generator=gen) * 0.8
    s = similarity(linf_distances(units), theta)
    survivor = eliminate_redundant(find_dominating(s))
    assert any(survivor[i] == i for i in range(k))
    for i, j in enumerate(survivor):
        assert survivor[j] == j
        assert torch.dist(units[i], units[j], p=float('inf')) <= theta


def test_gqa_units_group_query_heads_with_their_kv_head():
    layout = UnitLayout(num_units=2, heads_per_unit=2, head_dim=1)
    q = torch.arange(4.0).view(4, 1)  # heads 0,1 -> unit 0; heads 2,3 -> unit 1
    k = torch.tensor([[10.0], [11.0]])
    v = torch.tensor([[20.0], [21.0]])
    assert unit_parameters(q, k, v, layout).tolist() == [[0, 1, 10, 20], [2, 3, 11, 21]]
    assert layout.q_keep(torch.tensor([True, False])).tolist() == [1, 1, 0, 0]
    assert layout.kv_keep(torch.tensor([True, False])).tolist() == [1, 0]


def test_decision_only_among_alive_units_and_fold():
    layout = UnitLayout(num_units=3, heads_per_unit=1, head_dim=2)
    d = 2
    q = torch.zeros(6, d)
    k = torch.zeros(6, d)
    v = torch.zeros(6, d)
    v[4:6] = 1.0  # unit 2 differs from 0 and 1 by 1.0; units 0 and 1 are identical
    o = torch.arange(12.0).view(2, 6)
    decision = decide_redundant_units(q, k, v, layout, torch.tensor([True, True, True]), theta=0.15)
    assert decision.alive.tolist() == [False, True, True]
    assert decision.replaced_by == {0: 1}
    folded = fold_output_projection(o, decision.replaced_by, layout)
    expected = o.clone()
    expected[:, 2:4] += o[:, 0:2]
    torch.testing.assert_close(folded, expected)
    # Unit 1 already dead: 0 and 2 are not similar, nothing changes; a dead unit never absorbs another.
    again = decide_redundant_units(q, k, v, layout, torch.tensor([True, False, True]), theta=0.15)
    assert again.alive.tolist() == [True, False, True] and again.replaced_by == {}


def test_fold_preserves_the_output_of_identical_heads():
    torch.manual_seed(0)
    layout = UnitLayout(num_units=3, heads_per_unit=2, head_dim=2)
    heads = torch.randn(5, 3, layout.q_rows_per_unit)  # (batch, unit, head outputs)
    heads[:, 0] = heads[:, 2]  # unit 0 computes exactly what unit 2 computes
    o = torch.randn(4, 3 * layout.q_rows_per_unit)
    before = heads.flatten(1) @ o.T
    folded = fold_output_projection(o, {0: 2}, layout)
    keep = layout.q_keep(torch.tensor([False, True, True]))
    after = (heads.flatten(1) * keep) @ (folded * keep).T
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_on_every_graph_of_five_units_each_pruned_unit_is_replaced_by_a_kept_neighbour():
    pairs = list(itertools.combinations(range(5), 2))
    for bits in range(2 ** len(pairs)):
        s = torch.eye(5, dtype=torch.long)
        for b, (i, j) in enumerate(pairs):
            if bits >> b & 1:
                s[i, j] = s[j, i] = 1
        survivor = eliminate_redundant(find_dominating(s))
        for i, j in enumerate(survivor):
            assert survivor[j] == j and s[i, j] == 1


def test_relative_theta_scales_with_the_weights_and_the_closest_pair_is_reported():
    """Three units of one parameter each: 0 and 1 are 0.2 apart, 2 is 0.8 from 1; the largest |w| is 1.0."""
    layout = UnitLayout(num_units=3, heads_per_unit=1, head_dim=1)
    q = torch.tensor([[0.0], [0.2], [1.0]])
    k = v = torch.zeros(3, 1)
    alive = torch.ones(3, dtype=torch.bool)
    absolute = decide_redundant_units(q, k, v, layout, alive, theta=0.15)
    assert absolute.replaced_by == {} and absolute.theta == 0.15
    assert absolute.closest_distance == pytest.approx(0.2)
    relative = decide_redundant_units(q, k, v, layout, alive, theta=0.25, relative=True)  # 0.25 * 1.0
    assert relative.replaced_by == {0: 1} and relative.theta == pytest.approx(0.25)
    # the same heads at 10x the scale: the absolute decision changes, the relative one does not
    scaled = decide_redundant_units(10 * q, k, v, layout, alive, theta=0.25, relative=True)
    assert scaled.replaced_by == {0: 1} and scaled.theta == pytest.approx(2.5)
    assert scaled.closest_distance == pytest.approx(2.0)
    assert decide_redundant_units(10 * q, k, v, layout, alive, theta=0.25).replaced_by == {}
    one_left = decide_redundant_units(q, k, v, layout, torch.tensor([False, False, True]), theta=0.15)
    assert one_left.closest_distance == float("inf") and one_left.replaced_by == {}
