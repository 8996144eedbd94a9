"""Target-sparsity control: the quantile math by hand, and a real run landing at its target."""

import math

import pytest
import torch

from neuroprune_ds.flat_slice import COL, FlatSlice
from neuroprune_ds.sparsity_control import (BINS, LOG_MAX, LOG_MIN, SparsityController, add_histogram_,
                                            add_ratio_histogram_, decoupled_drive, decoupled_horizon, fraction_below,
                                            quantile_scale)


def test_ratio_histogram_and_quantile_by_hand():
    # |g| = [2e-3, 3e-2, 3e-1, 2] on a 2 x 2 matrix (row-major); per-column inverse penalties [1, 10]:
    # ratios = [2e-3, 0.3, 0.3, 20]. A quarter of them are <= 2e-3, three quarters <= 0.3, all <= 20; the
    # quantile is the upper edge of the 0.05-decade bin holding that ratio.
    grad = torch.tensor([2e-3, -3e-2, 3e-1, -2.0])
    hist = torch.zeros(BINS, dtype=torch.float64)
    add_ratio_histogram_(hist, grad, FlatSlice.of((2, 2)), COL, torch.tensor([1.0, 10.0], dtype=torch.float64),
                         stride=1)
    assert float(hist.sum()) == 4
    bin_factor = 10 ** ((LOG_MAX - LOG_MIN) / BINS)
    for fraction, ratio in ((0.25, 2e-3), (0.75, 0.3), (1.0, 20.0)):
        assert ratio <= quantile_scale(hist, fraction) <= ratio * bin_factor
    assert quantile_scale(torch.zeros(BINS, dtype=torch.float64), 0.5) == 1.0
    # a slice cut mid-row samples with the right groups: elements 1 and 3 of the matrix -> ratios 0.3 and 20
    sampled = torch.zeros(BINS, dtype=torch.float64)
    add_ratio_histogram_(sampled, grad[1:], FlatSlice.of((2, 2), offset=1, numel=3), COL,
                         torch.tensor([1.0, 10.0], dtype=torch.float64), stride=2)
    assert float(sampled.sum()) == 2
    assert 0.3 <= quantile_scale(sampled, 0.5) <= 0.3 * bin_factor
    assert 20 <= quantile_scale(sampled, 1.0) <= 20 * bin_factor


def test_decoupled_drive_by_hand():
    # before [0, 0.01, -0.02, 0.5], after [1e-3, 0.012, -0.018, 0.5], H 4: a weight at zero before needs only its
    # displacement held (1e-3); the others also a quarter of |w after| per step: 2e-3 + 3e-3, 2e-3 + 4.5e-3, 0.125
    before = torch.tensor([0.0, 0.01, -0.02, 0.5], dtype=torch.float64)
    after = torch.tensor([1e-3, 0.012, -0.018, 0.5], dtype=torch.float64)
    expected = torch.tensor([1e-3, 5e-3, 6.5e-3, 0.125], dtype=torch.float64)
    torch.testing.assert_close(decoupled_drive(before, after, 4), expected, rtol=1e-12, atol=1e-15)
    # H counts this step: 20-step ramp, 5 steps done -> 15 left; at and after the ramp's end 1; no ramp 1
    assert [decoupled_horizon(20, k) for k in (0, 5, 19, 20, 40)] == [20, 15, 1, 1, 1]
    assert decoupled_horizon(0, 3) == 1


def test_controller_quantile_at_the_aim_and_integral_on_the_target():
    # 100 ratios 10^(-2 + k/50): aiming at 0.8 takes the 0.8 quantile (about 10^-0.4) while the integral term
    # sees target == measured and stays 0; with horizon 0 a fast-rising sparsity shifts nothing
    hist = torch.zeros(BINS, dtype=torch.float64)
    add_histogram_(hist, torch.logspace(-2, 0, 100, dtype=torch.float64))
    controller = SparsityController(gain=1.0, horizon=0)
    controller.update(hist, target=0.0, measured=0.0, aim=0.8)
    scale = controller.update(hist, target=0.5, measured=0.5, aim=0.8)
    assert controller.integral == 0
    assert 10 ** -0.42 <= scale <= 10 ** -0.35
    assert controller.pushed_fraction == pytest.approx(0.8, abs=0.02)


def test_controller_integral_is_bounded_and_acts_on_the_error():
    controller = SparsityController(gain=1.0)
    for _ in range(100):
        scale = controller.update(None, target=0.5, measured=0.0)
    assert scale == pytest.approx(math.exp(3.0))  # the integral term saturates at e^3
    state = controller.state_dict()
    other = SparsityController(gain=1.0)
    other.load_state_dict(state)
    assert other.update(None, 0.5, 0.0) == controller.update(None, 0.5, 0.0)


def test_pushed_fraction_reports_how_many_weights_the_penalty_outweighs():
    # ratios 10^-3 .. 10^0.96 in 0.04-decade steps: 100 weights spread evenly over four decades
    ratios = 10.0 ** (torch.arange(100, dtype=torch.float64) * 0.04 - 3.0)
    hist = torch.zeros(BINS, dtype=torch.float64)
    add_ratio_histogram_(hist, ratios, FlatSlice.of((1, 100)), COL, torch.ones(100, dtype=torch.float64), stride=1)
    assert fraction_below(hist, 1e-3) == 0.0 and fraction_below(hist, 1e3) == 1.0
    assert fraction_below(hist, 10 ** -1.0) == pytest.approx(0.50, abs=0.02)
    controller = SparsityController(gain=1.0)
    controller.update(hist, target=0.2, measured=0.2)
    assert controller.pushed_fraction == pytest.approx(0.2, abs=0.02)  # on target: the 20% quantile
    for _ in range(50):  # measured sparsity far behind: the integral winds up to e^3 above that quantile,
        controller.update(hist, target=0.2, measured=0.0)  # 3 / ln(10) = 1.3 decades = 33 more weights
    assert controller.pushed_fraction == pytest.approx(0.53, abs=0.02)


@pytest.mark.dist
@pytest.mark.parametrize("target", [0.3, 0.5])
def test_a_real_run_lands_within_two_points_of_the_target(target):
    """300 AdamW steps (lr 1e-4) of a tiny LLaMA on a real DeepSpeed engine (1 rank, ZeRO-0)."""
    import deepspeed
    from neuroprune_ds.config import NeuroPruneConfig
    from neuroprune_ds.pruner import NeuroPruner
    from tiny_models import batch, equivalence_model, init_single_rank

    init_single_rank()
    model = equivalence_model("llama")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config={
        "train_micro_batch_size_per_gpu": 2, "gradient_clipping": 1.0, "steps_per_print": 10**9,
        "zero_optimization": {"stage": 0}})
    pruner = NeuroPruner(engine, NeuroPruneConfig(mlp_lambda=1e-3, attn_lambda=1e-3, target_sparsity=target,
                                                  target_ramp_steps=100, prune_heads=False))
    for step in range(300):
        engine.backward(engine(**batch("llama", step, 0)).loss)
        pruner.after_backward()
        engine.step()
        pruner.after_step()
    sparsity = pruner.metrics()["sparsity/weight"]
    assert abs(sparsity - target) <= 0.02, f"landed at {sparsity:.3f} for a target of {target}"
    engine.destroy()
