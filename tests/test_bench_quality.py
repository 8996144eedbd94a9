"""The measurements of tools/bench_quality.py, by hand on tiny models (the benchmark itself runs real models)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from neuroprune_ds.arch import resolve_architecture
from neuroprune_ds.export.plan import penalised_weights
from tiny_models import plant_redundant_units, tiny_model

_spec = importlib.util.spec_from_file_location("bench_quality", Path(__file__).parent.parent / "tools" / "bench_quality.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.7])
def test_magnitude_pruning_reaches_the_level_and_restores_the_weights(fraction):
    model = tiny_model("llama")
    names = penalised_weights(resolve_architecture(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with bench.zeroed(model, names, fraction=fraction):
        reached = bench.weight_sparsity(model, names, epsilon=1e-12)
        params = dict(model.named_parameters())
        kept_min = min(float(params[n][params[n] != 0].abs().min()) for n in names)
        pruned_max = max(float(before[n][params[n] == 0].abs().max()) for n in names)
    total = sum(before[n].numel() for n in names)
    assert fraction <= reached <= fraction + 1 / total  # random weights: no ties at the threshold
    assert pruned_max <= kept_min  # one global threshold: everything pruned is smaller than everything kept
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n


def test_epsilon_zeroing_touches_only_small_penalised_weights():
    model = tiny_model("llama")
    arch = resolve_architecture(model)
    names = penalised_weights(arch)
    params = dict(model.named_parameters())
    with torch.no_grad():
        params[names[0]][0, :3] = torch.tensor([5e-5, -5e-5, 2e-4])
        embed = next(n for n in params if "embed" in n)
        params[embed][0, 0] = 1e-5
    with bench.zeroed(model, names, threshold=1e-4):
        assert params[names[0]][0, :3].tolist() == [0.0, 0.0, pytest.approx(2e-4)]
        assert float(params[embed][0, 0]) == pytest.approx(1e-5)
    assert float(params[names[0]][0, 0]) == pytest.approx(5e-5)


def test_connectivity_spread_by_hand():
    # tiny llama: FFN width 48, inputs gate and up (32 columns each -> 64 connections per unit), 2 layers.
    # Layer 0: unit 0 keeps 16 of its 64 inputs (c = 0.25), unit 1 keeps 0 (c = 0); everything else c = 1.
    model = tiny_model("llama")
    arch = resolve_architecture(model)
    params = dict(model.named_parameters())
    gate, up = (params[lin.weight] for lin in arch.ffn[0].inputs)
    with torch.no_grad():
        for block in arch.ffn:
            for lin in block.inputs:
                params[lin.weight].add_(torch.sign(params[lin.weight]) * 1e-3)  # none of the init below epsilon
        gate[0, 16:] = 0
        up[0, :] = 0
        gate[1], up[1] = 0, 0
    c = torch.ones(96, dtype=torch.float64)
    c[0], c[1] = 0.25, 0.0
    spread = bench.connectivity_spread(model, arch, epsilon=1e-4)
    assert spread["connectivity_mean"] == pytest.approx(float(c.mean()))
    assert spread["connectivity_std"] == pytest.approx(float(c.std()))
    assert spread["units_below_10pct"] == pytest.approx(1 / 96)


def test_head_report_finds_the_closest_pair_and_counts_kept_heads():
    model = tiny_model("llama")
    plant_redundant_units(model, noise=1e-3)  # unit 1 = unit 0 + noise in every block (GQA: 2 heads per unit)
    arch = resolve_architecture(model)
    alive = {b.name: torch.tensor([True, False]) for b in arch.attention}
    full = bench.head_report(model, arch, None)
    assert [row["heads_kept"] for row in full] == [4, 4]
    assert all(row["min_linf"] < 5e-3 for row in full)  # the planted pair: ~3 * noise apart
    pruned = bench.head_report(model, arch, alive)
    assert [row["heads_kept"] for row in pruned] == [2, 2]
    assert all(row["min_linf"] is None for row in pruned)  # one unit left: no pair
