"""The measurements of tools/bench_quality.py, by hand on tiny models (the benchmark itself runs real models)."""

import importlib.util
from pathlib import Path

import pytest
import torch

from neuroprune_ds.arch import resolve_architecture
from neuroprune_ds.arch import penalised_weights
from tiny_models import plant_redundant_units, tiny_model

_spec = importlib.util.spec_from_file_location("bench_quality", Path(__file__).parent.parent / "tools" / "bench_quality.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


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


# ------------------------------------------------------------------------------ tools/baselines.py

_bspec = importlib.util.spec_from_file_location("baselines", Path(__file__).parent.parent / "tools" / "baselines.py")
baselines = importlib.util.module_from_spec(_bspec)
_bspec.loader.exec_module(baselines)


@pytest.mark.parametrize("fraction", [0.25, 0.5, 0.7])
def test_unstructured_magnitude_pruning_hits_the_fraction_with_one_threshold(fraction):
    model = tiny_model("llama")
    names = penalised_weights(resolve_architecture(model))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    baselines.magnitude_pruned(model, names, fraction)
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in names)
    zeros = sum(int((params[n] == 0).sum()) for n in names)
    assert int(fraction * total) == zeros  # random init: no ties, no weight exactly 0 before
    kept_min = min(float(params[n][params[n] != 0].abs().min()) for n in names)
    pruned_max = max(float(before[n][params[n] == 0].abs().max()) for n in names)
    assert pruned_max < kept_min
    for n in params:  # nothing outside the penalised matrices moves, nothing kept changes
        assert torch.equal(params[n][params[n] != 0], before[n][params[n] != 0]), n


def _scale_units(model, arch, ffn_scales, attention_scales):
    """Every FFN weight of layer 0 (and every Q/K/V/O weight of layer 0) = 0.1 * the scale of its unit."""
    params = dict(model.named_parameters())
    ffn, attention = arch.ffn[0], arch.attention[0]
    with torch.no_grad():
        s = torch.tensor(ffn_scales, dtype=torch.float32)
        params[ffn.output.weight].copy_(0.1 * s.expand_as(params[ffn.output.weight]))
        for linear in ffn.inputs:
            params[linear.weight].copy_(0.1 * s.unsqueeze(1).expand_as(params[linear.weight]))
        a = torch.tensor(attention_scales, dtype=torch.float32)
        for linear in (attention.q, attention.k, attention.v):
            w = params[linear.weight]
            w.copy_(0.1 * a.repeat_interleave(w.shape[0] // len(a)).unsqueeze(1).expand_as(w))
        o = params[attention.o.weight]
        o.copy_(0.1 * a.repeat_interleave(o.shape[1] // len(a)).expand_as(o))


def test_structured_magnitude_removes_exactly_the_k_lowest_norm_units():
    # tiny llama: FFN width 48 (gate, up: 48 x 32, down: 32 x 48) -> a unit has 3 * 32 weights;
    # attention: 2 units (KV groups) of 2 query heads, head_dim 8 -> a unit has 16 + 8 + 8 rows of Q/K/V (x 32)
    # and 16 columns of O (x 32) -> 48 * 32 weights.
    model = tiny_model("llama")
    arch = resolve_architecture(model)
    ffn_scales = torch.randperm(48, generator=torch.Generator().manual_seed(1)).add(1).tolist()
    _scale_units(model, arch, ffn_scales, [3.0, 2.0])
    params = dict(model.named_parameters())
    norms = baselines.ffn_unit_norms(params, arch.ffn[0])
    assert torch.allclose(norms, 0.1 * torch.tensor(ffn_scales, dtype=torch.float32) * 96 ** 0.5)
    heads = baselines.attention_unit_norms(params, arch.attention[0])
    assert torch.allclose(heads, 0.1 * torch.tensor([3.0, 2.0]) * (48 * 32) ** 0.5)
    other = {n: p.detach().clone() for n, p in params.items()}
    alive = baselines.structured_magnitude_pruned(model, arch, {arch.ffn[0].name: 5}, {arch.attention[0].name: 1})
    removed = [i for i, s in enumerate(ffn_scales) if s <= 5]  # scales 1..5: the five lowest norms
    ffn = arch.ffn[0]
    dead = (params[ffn.output.weight] == 0).all(dim=0)
    assert torch.nonzero(dead).flatten().tolist() == removed
    for linear in ffn.inputs:
        assert torch.nonzero((params[linear.weight] == 0).all(dim=1)).flatten().tolist() == removed
    assert alive[arch.attention[0].name].tolist() == [True, False]  # unit 1 (scale 2) is the lower one
    assert alive[arch.attention[1].name].tolist() == [True, True]  # not listed: nothing removed
    for n in params:  # layer 1 and every kept unit untouched
        if n not in (ffn.output.weight, *(lin.weight for lin in ffn.inputs)):
            assert torch.equal(params[n], other[n]), n
    with pytest.raises(ValueError, match="cannot remove 49 of 48"):
        baselines.structured_magnitude_pruned(model, arch, {ffn.name: 49}, {})
    with pytest.raises(ValueError, match="cannot remove 2 of 2"):  # an attention block keeps one unit
        baselines.structured_magnitude_pruned(model, arch, {}, {arch.attention[0].name: 2})
    baselines.structured_magnitude_pruned(model, arch, {ffn.name: 48}, {})  # an FFN block may lose every unit
    assert (params[ffn.output.weight] == 0).all()


def test_cubic_schedule_at_start_middle_and_end():
    # s_t = s_f + (s_i - s_f) (1 - (t - t0) / (t_end - t0))^3 with s_i 0.1, s_f 0.9, t0 10, t_end 30
    assert baselines.cubic_sparsity(0, 0.9, 10, 30, initial=0.1) == pytest.approx(0.1)
    assert baselines.cubic_sparsity(10, 0.9, 10, 30, initial=0.1) == pytest.approx(0.1)
    assert baselines.cubic_sparsity(20, 0.9, 10, 30, initial=0.1) == pytest.approx(0.9 - 0.8 / 8)  # (1/2)^3
    assert baselines.cubic_sparsity(25, 0.9, 10, 30, initial=0.1) == pytest.approx(0.9 - 0.8 / 64)  # (1/4)^3
    assert baselines.cubic_sparsity(30, 0.9, 10, 30, initial=0.1) == pytest.approx(0.9)
    assert baselines.cubic_sparsity(99, 0.9, 10, 30, initial=0.1) == pytest.approx(0.9)
    with pytest.raises(ValueError, match="start step 30 must be before end step 30"):
        baselines.cubic_sparsity(0, 0.9, 30, 30)


def test_gradual_magnitude_pruning_follows_the_schedule_and_keeps_pruned_weights_at_zero():
    model = tiny_model("llama")
    names = penalised_weights(resolve_architecture(model))
    params = dict(model.named_parameters())
    total = sum(params[n].numel() for n in names)
    gmp = baselines.GradualMagnitudePruning(model, names, final=0.8, start=0, end=8, every_steps=4)

    def zeros() -> int:
        return sum(int((params[n] == 0).sum()) for n in names)

    reached, scheduled = {}, {}
    for step in range(1, 11):
        with torch.no_grad():
            for n in names:  # an "optimizer step" that moves every weight, the masked ones too
                params[n].add_(1e-3)
        gmp.after_step(step)
        reached[step], scheduled[step] = zeros(), gmp.sparsity
    assert reached[1] == reached[3] == 0  # not due before step 4 (step 0 would be 0 anyway)
    assert reached[4] == int(0.7 * total) and scheduled[4] == pytest.approx(0.7)  # 0.8 - 0.8 / 8
    assert reached[5] == reached[7] == reached[4]  # masks re-applied between pruning steps
    assert reached[8] == reached[9] == reached[10] == int(0.8 * total)


# ------------------------------------------------------------------------------ tools/gpu_bench_quality.sh


@pytest.mark.real
def test_gpu_script_tiny_mode_runs_every_method_and_matches_the_structure(tmp_path):
    """``--cpu``: the GPU script's jobs, derived baselines and report on a random 2-layer LLaMA, 4 steps."""
    import json
    import os
    import subprocess
    import sys

    root = Path(__file__).parent.parent
    env = dict(os.environ, GPU_BENCH_OUT=str(tmp_path), PYTHON=sys.executable, HF_HUB_OFFLINE="1")
    done = subprocess.run([str(root / "tools" / "gpu_bench_quality.sh"), "--cpu"], env=env, cwd=root,
                          capture_output=True, text=True, timeout=2400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = {p.parent.name: json.loads(p.read_text()) for p in (tmp_path / "lm").glob("*/result.json")}
    expected = {"dense", "neuroprune_50", "neuroprune_decoupled_50", "neuroprune_structural_50", "l1_50", "gmp_50",
                "structured_neuroprune_50", "structured_neuroprune_decoupled_50", "structured_neuroprune_structural_50",
                "magnitude_50"}
    assert set(results) == expected
    assert results["neuroprune_structural_50"]["row"]["ffn_units_removed_share"] >= 0.5  # the structural target
    for mode in ("neuroprune", "neuroprune_decoupled", "neuroprune_structural"):
        trained, cut = results[f"{mode}_50"]["row"], results[f"structured_{mode}_50"]["row"]
        assert cut["ffn_removed"] == trained["ffn_removed"]  # the same units per block, so the same shapes
        assert cut["attention_units_removed"] == trained["attention_units_removed"]
        assert cut["parameters_compact"] == trained["parameters_compact"]
    assert results["gmp_50"]["row"]["weight_sparsity"] == pytest.approx(0.5, abs=0.01)  # cubic schedule's end
    assert results["magnitude_50"]["row"]["weight_sparsity"] == pytest.approx(0.5, abs=0.01)
    table = (tmp_path / "results.md").read_text()
    for label in ("dense fine-tuned", "NeuroPrune, update: gradient", "NeuroPrune, update: decoupled",
                  "L1, update: gradient", "gradual magnitude (cubic)", "structured magnitude, matched to NP gradient",
                  "structured magnitude, matched to NP decoupled", "NeuroPrune, decoupled + structural target",
                  "structured magnitude, matched to NP structural", "unstructured magnitude (one-shot)"):
        assert f"| {label} |" in table, label
