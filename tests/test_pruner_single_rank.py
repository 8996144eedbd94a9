"""The pruner on a one-rank engine, by hand: ``penalty: l1`` and ``stop_at_zero``."""

import copy
import math
import re

import pytest
import torch

from neuroprune_ds.arch import penalised_weights
from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.pruner import NeuroPruner
from tiny_models import batch, equivalence_model, init_single_rank, tiny_model

MLP_LAMBDA, ATTN_LAMBDA = 3e-3, 7e-3
# Q, K, V and the FFN matrices of each family, by module name (the output projections o_proj, out_proj, o and
# attention.output.dense are not penalised)
ATTENTION_INPUTS = re.compile(r"\.(self_attn|encoder_attn|SelfAttention|EncDecAttention|attention\.self)"
                              r"\.(q_proj|k_proj|v_proj|q|k|v|query|key|value)\.weight$")
FFN_MATRICES = re.compile(r"\.(mlp\.(gate_proj|up_proj|down_proj)|fc1|fc2|DenseReluDense\.(wi|wi_0|wi_1|wo)"
                          r"|intermediate\.dense|layer\.\d+\.output\.dense)\.weight$")


def qkv_and_ffn_weights(model) -> set[str]:
    return {name for name, _ in model.named_parameters() if ATTENTION_INPUTS.search(name) or FFN_MATRICES.search(name)}


@pytest.mark.dist
@pytest.mark.parametrize("family", ["llama", "opt", "t5", "bart", "bert"])
def test_the_penalised_weights_are_q_k_v_and_the_ffn_matrices(family):
    """One definition: the penalty acts on, and the weight sparsity counts, exactly Q, K, V and the FFN
    matrices of every block; no output projection."""
    model = tiny_model(family)
    expected = qkv_and_ffn_weights(model)
    engine = _one_rank_engine(model)
    pruner = NeuroPruner(engine, NeuroPruneConfig())
    assert set(pruner.penalised_names) == expected and len(pruner.penalised_names) == len(expected)
    assert set(penalised_weights(pruner.arch)) == expected  # the export and the report use the same definition
    counted = sum(engine.module.get_parameter(name).numel() for name in expected)
    assert sum(weights for _, weights in pruner.stats.block_sparsity(pruner.statistics()).values()) == counted
    engine.destroy()


@pytest.mark.dist
@pytest.mark.parametrize("family", ["llama", "bert"])
def test_l1_penalty_adds_lambda_times_sign_to_penalised_weights_only(family):
    import deepspeed

    init_single_rank()
    model = equivalence_model(family)
    reference = copy.deepcopy(model)
    inputs = batch(family, 0, 0)
    reference(**inputs).loss.backward()
    task_grads = {name: p.grad.clone() for name, p in reference.named_parameters()}

    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                      config={"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9,
                                              "zero_optimization": {"stage": 0}})
    pruner = NeuroPruner(engine, NeuroPruneConfig(penalty="l1", mlp_lambda=MLP_LAMBDA, attn_lambda=ATTN_LAMBDA,
                                                  prune_heads=False))
    engine.backward(engine(**inputs).loss)
    pruner.after_backward()

    lambdas = {name: ATTN_LAMBDA if ATTENTION_INPUTS.search(name) else MLP_LAMBDA
               for name in qkv_and_ffn_weights(engine.module)}
    assert set(pruner.penalised_names) == set(lambdas)
    l1 = {"mlp": 0.0, "attn": 0.0}
    for name, param in engine.module.named_parameters():
        expected = task_grads[name] + lambdas.get(name, 0.0) * torch.sign(param.detach())
        torch.testing.assert_close(param.grad, expected, rtol=0, atol=1e-7, msg=name)
        if name in lambdas:
            l1["mlp" if lambdas[name] == MLP_LAMBDA else "attn"] += float(param.detach().double().abs().sum())
    assert pruner.last_penalties["mlp"] == pytest.approx(l1["mlp"], rel=1e-7)  # group sums run in float32
    assert pruner.last_penalties["attn"] == pytest.approx(l1["attn"], rel=1e-7)  # group sums run in float32
    engine.destroy()


@pytest.mark.dist
def test_output_rows_penalises_every_row_of_every_ffn_matrix_by_its_own_connectivity():
    """``mlp_groups: output_rows``: row i of gate, up and down is its own group with omega = 1 / max(c_i, c_min)
    (c_i its share of |w| >= epsilon); down's columns are only counted (FFN units alive), not penalised again."""
    model = equivalence_model("llama")
    params = dict(model.named_parameters())
    with torch.no_grad():
        params["model.layers.0.mlp.gate_proj.weight"][0, 8:] = 0  # c = 8/32 -> omega 4
        params["model.layers.0.mlp.down_proj.weight"][1, 1:] = 0  # c = 1/48 -> omega 1 / c_min = 20
        params["model.layers.1.mlp.down_proj.weight"][:, 5] = 0  # unit 5 has no out connection
    reference = copy.deepcopy(model)
    inputs = batch("llama", 0, 0)
    reference(**inputs).loss.backward()
    engine = _one_rank_engine(model)
    pruner = NeuroPruner(engine, NeuroPruneConfig(mlp_groups="output_rows", mlp_lambda=MLP_LAMBDA, attn_lambda=0.0,
                                                  prune_heads=False))
    engine.backward(engine(**inputs).loss)
    pruner.after_backward()
    assert set(pruner.penalised_names) == qkv_and_ffn_weights(engine.module)
    assert len(pruner.penalised_names) == len(set(pruner.penalised_names))  # each matrix in one penalised set
    checked = 0
    for name, param in engine.module.named_parameters():
        expected = dict(reference.named_parameters())[name].grad
        if FFN_MATRICES.search(name):
            weight = param.detach()
            omega = 1.0 / (weight.abs() >= 1e-4).double().mean(dim=1).clamp(min=0.05)
            expected = expected + MLP_LAMBDA * omega.float().unsqueeze(1) * torch.sign(weight)
            checked += int(omega.max() == 20) + int(omega.max() == 4)
        torch.testing.assert_close(param.grad, expected, rtol=0, atol=1e-6, msg=name)
    assert checked == 2  # the two planted rows were weighted as computed here
    assert pruner.ffn_alive() == {"model.layers.0.mlp": 48, "model.layers.1.mlp": 47}
    engine.destroy()


@pytest.mark.dist
@pytest.mark.parametrize("stop_at_zero", [True, False])
def test_a_step_across_zero_lands_on_exactly_zero_and_the_weight_stays_below_epsilon(stop_at_zero):
    """Two AdamW steps (lr 1e-3, no decay) of a planted weight 1e-5 under an L1 penalty of lambda 1, which
    dominates its task gradient, against Adam written out by hand from the gradients the pruner leaves.

    Step 1 moves it by about lr towards zero: it crosses. With stop_at_zero it lands on exactly 0 with its first
    moment cleared and its second moment kept; at an exact 0 the penalty gradient is 0, so step 2 is the task
    gradient's alone from a zero first moment, a fraction of lr: the weight stays below epsilon (1e-4). Without
    it, the weight sits at 1e-5 - 1e-3 and step 2 starts from there with the momentum of step 1."""
    lr, beta1, beta2, adam_eps, epsilon = 1e-3, 0.9, 0.999, 1e-8, 1e-4

    def adam(w: float, m: float, v: float, g: float, t: int) -> tuple[float, float, float]:
        m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
        return w - lr * (m / (1 - beta1 ** t)) / (math.sqrt(v) / math.sqrt(1 - beta2 ** t) + adam_eps), m, v

    model = equivalence_model("llama")
    name = "model.layers.0.mlp.up_proj.weight"
    with torch.no_grad():
        dict(model.named_parameters())[name][0, :2] = torch.tensor([1e-5, 0.5])
    engine = _one_rank_engine(model, lr=lr, weight_decay=0.0, clip=0.0)  # 0: no clipping
    pruner = NeuroPruner(engine, NeuroPruneConfig(penalty="l1", mlp_lambda=1.0, attn_lambda=1.0, prune_heads=False,
                                                  stop_at_zero=stop_at_zero, epsilon=epsilon))
    param = dict(engine.module.named_parameters())[name]
    w, m, v = 1e-5, 0.0, 0.0
    for step in (1, 2):
        engine.backward(engine(**batch("llama", step, 0)).loss)
        task = float(param.grad[0, 0])
        assert abs(task) < 0.1  # lambda dominates
        pruner.after_backward()
        grad = float(param.grad[0, 0])
        assert grad == pytest.approx(task + math.copysign(1.0, w) * (w != 0), abs=1e-7)  # lambda sign(w)
        engine.step()
        pruner.after_step()
        w, m, v = adam(w, m, v, grad, step)
        if step == 1:
            assert w < 0 and float(param.detach()[0, 1]) == pytest.approx(0.5 - lr, abs=1e-6)
            if stop_at_zero:
                w, m = 0.0, 0.0
        state = engine.optimizer.state[param]
        assert float(param.detach()[0, 0]) == pytest.approx(w, abs=1e-9), step
        assert float(state["exp_avg"][0, 0]) == pytest.approx(m, rel=1e-6, abs=1e-12), step  # float32 moments
        assert float(state["exp_avg_sq"][0, 0]) == pytest.approx(v, rel=1e-5), step  # kept by stop_at_zero
    if stop_at_zero:
        assert 0 < abs(w) < epsilon
    else:
        assert abs(w) > 5 * epsilon
    engine.destroy()


@pytest.mark.dist
def test_head_pruning_stopped_between_blocks_keeps_the_done_blocks_and_finishes_at_the_next_pass():
    """A preemption between blocks ends the pass there: the blocks before it are pruned (masks and weights),
    the rest untouched; the next pass prunes those, giving what one uninterrupted pass gives."""
    import deepspeed

    init_single_rank()
    engines = []
    for _ in range(2):
        model = equivalence_model("llama")
        engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-3),
                                          config={"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9,
                                                  "zero_optimization": {"stage": 0}})
        engines.append((engine, NeuroPruner(engine, NeuroPruneConfig(theta=0.2))))
    (reference, whole), (engine, cut) = engines
    expected = whole.prune_heads()
    blocks = [block.name for block in cut.arch.attention]
    assert len(blocks) >= 2 and set(expected) == set(blocks), "every block has planted redundant heads"

    asked = []
    changes = cut.prune_heads(should_stop=lambda: asked.append(1) or len(asked) > 1)
    assert len(asked) == 2 and list(changes) == blocks[:1]
    assert changes[blocks[0]] == expected[blocks[0]]
    assert all(bool(cut.alive[name].all()) for name in blocks[1:])
    assert torch.equal(cut.alive[blocks[0]], whole.alive[blocks[0]])

    assert cut.prune_heads() == {name: expected[name] for name in blocks[1:]}
    assert all(torch.equal(cut.alive[name], whole.alive[name]) for name in blocks)
    for (name, param), ref in zip(engine.module.named_parameters(), reference.module.parameters()):
        torch.testing.assert_close(param, ref, rtol=0, atol=0, msg=name)
    for e, _ in engines:
        e.destroy()


def _train(engine, pruner, steps: int) -> None:
    """``steps`` optimizer steps of the tiny LLaMA's batches with the pruner's hooks."""
    for step in range(steps):
        engine.backward(engine(**batch("llama", step, 0)).loss)
        pruner.after_backward()
        engine.step()
        pruner.after_step()


def _one_rank_engine(model, lr=1e-3, weight_decay=0.01, clip=1.0, cosine_steps=None):
    import deepspeed

    init_single_rank()
    config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9, "gradient_clipping": clip,
              "zero_optimization": {"stage": 0}}
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    schedule = None if cosine_steps is None else torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, cosine_steps)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, lr_scheduler=schedule)
    return engine


@pytest.mark.dist
def test_pruned_ffn_units_are_masked_recorded_and_removed_by_the_compact_export(tmp_path):
    """Unit 3 of layer 0 keeps 2 of its 64 input connections (3% < 10%): the pruner masks it (state, summary)
    and ``neuroprune convert --format compact`` drops it; unit 5 of layer 1 loses its output column instead."""
    import dataclasses
    import json

    from neuroprune_ds.checkpoint import COMPLETE
    from neuroprune_ds.export.convert import convert

    model = equivalence_model("llama")
    params = dict(model.named_parameters())
    with torch.no_grad():
        params["model.layers.0.mlp.gate_proj.weight"][3, 1:] = 0
        params["model.layers.0.mlp.up_proj.weight"][3, 1:] = 0
        params["model.layers.1.mlp.down_proj.weight"][:, 5] = 0
    engine = _one_rank_engine(model)
    config = NeuroPruneConfig(prune_ffn_units_below=0.1, prune_heads=False)
    pruner = NeuroPruner(engine, config)
    assert pruner.prune_ffn_units() == {"model.layers.0.mlp": [3], "model.layers.1.mlp": [5]}
    assert pruner.prune_ffn_units() == {}  # monotone: nothing new
    live = dict(engine.module.named_parameters())
    assert float(live["model.layers.0.mlp.gate_proj.weight"].detach()[3].abs().sum()) == 0.0
    assert float(live["model.layers.0.mlp.up_proj.weight"].detach()[3, 0]) == 0.0
    assert [f["pruned_units"] for f in pruner.summary()["ffn"]] == [1, 1]
    state = pruner.state_dict()
    fresh = NeuroPruner(engine, config)
    fresh.load_state_dict(state)
    assert {k: v.tolist() for k, v in fresh.ffn_kept.items()} == {k: v.tolist() for k, v in state["ffn_kept"].items()}

    ckpt = tmp_path / "ckpt"
    engine.save_checkpoint(str(ckpt), tag="step0", client_state={
        "neuroprune": state, "neuroprune_config": dataclasses.asdict(config),
        "model": {"name_or_path": "tiny-llama", "task": "causal_lm", "num_labels": 2}})
    engine.module.config.save_pretrained(str(ckpt))
    (ckpt / "step0" / COMPLETE).touch()  # the trainer's mark of a finished save, which convert requires
    report = convert(str(ckpt), str(tmp_path / "compact"), "compact")  # verifies logits against the masked model
    record = json.loads((tmp_path / "compact" / "neuroprune.json").read_text())
    assert [f["kept_units"] for f in record["ffn"]] == [47, 47]
    assert report.dense_parameters - report.parameters == 2 * (3 * 32)  # gate row, up row, down column per unit
    engine.destroy()


@pytest.mark.dist
@pytest.mark.parametrize("steps, ramp, target, lr, cosine", [(300, 100, 0.5, 1e-4, False), (30, 20, 0.3, 1e-3, True)],
                         ids=["300-steps", "30-steps-cosine"])
def test_decoupled_mode_lands_near_the_target_sparsity(steps, ramp, target, lr, cosine):
    """The controller drives lambda in decoupled mode too: 300 AdamW steps at lr 1e-4 (as the gradient-mode
    test), and a short run, 30 steps on a cosine schedule with the target ramped over 20, where the weights must
    reach zero in the steps left, not only be held there once they do (the old rule on |delta w| alone landed
    at 0.110 for 0.3)."""
    model = equivalence_model("llama")
    engine = _one_rank_engine(model, lr=lr, cosine_steps=steps if cosine else None)
    pruner = NeuroPruner(engine, NeuroPruneConfig(update="decoupled", mlp_lambda=1.0, attn_lambda=1.0,
                                                  target_sparsity=target, target_ramp_steps=ramp, prune_heads=False))
    _train(engine, pruner, steps)
    sparsity = pruner.metrics()["sparsity/weight"]
    assert abs(sparsity - target) <= 0.02, f"landed at {sparsity:.3f} for a target of {target}"
    engine.destroy()


@pytest.mark.dist
def test_structural_target_prunes_the_lowest_taylor_scores_on_the_cubic_ramp():
    """prune_ffn_units_fraction 0.5 with target_ramp_steps 4: the scores are the sums over steps of (w * g)^2
    over each unit's gate and up rows and down column, computed here by hand from the weights before each step
    and the gradients; after step 2 the pruner prunes floor(0.5 * (1 - (1/2)^3) * 48) = 21 units per block,
    the lowest-scored, and the full 24 when recovery starts (step 3 of 4); the scores travel in the state."""
    model = equivalence_model("llama")
    engine = _one_rank_engine(model)
    config = NeuroPruneConfig(update="decoupled", mlp_lambda=0.0, attn_lambda=0.0, prune_heads=False,
                              prune_every_steps=2, recover_steps=1, prune_ffn_units_fraction=0.5, target_ramp_steps=4)
    pruner = NeuroPruner(engine, config)
    pruner.total_steps = 4
    params = dict(engine.module.named_parameters())
    blocks = pruner.arch.ffn
    by_hand = {b.name: torch.zeros(b.width, dtype=torch.float64) for b in blocks}
    pruned_after = []
    for step in range(4):
        engine.backward(engine(**batch("llama", step, 0)).loss)
        if step < 3:  # not while recovering
            for b in blocks:
                for linear in b.inputs:
                    w = params[linear.weight]
                    by_hand[b.name] += ((w.detach() * w.grad) ** 2).double().sum(dim=1)
                w = params[b.output.weight]
                by_hand[b.name] += ((w.detach() * w.grad) ** 2).double().sum(dim=0)
        pruner.after_backward()
        engine.step()
        pruner.after_step()
        pruned_after.append([int((~pruner.ffn_kept[b.name]).sum()) for b in blocks])
        if step == 1:  # the first pruning: exactly the 21 lowest scores of each block
            for b in blocks:
                lowest = set(torch.argsort(by_hand[b.name])[:21].tolist())
                assert set(torch.nonzero(~pruner.ffn_kept[b.name]).flatten().tolist()) == lowest
    assert pruned_after == [[0, 0], [21, 21], [24, 24], [24, 24]]
    for b in blocks:
        # the pruner sums each row / column in fp32 (<= 64 positive terms: relative error <= 64 * 2^-24 = 4e-6)
        torch.testing.assert_close(pruner.structure.ffn_saliency[b.name], by_hand[b.name], rtol=1e-5, atol=0)
        assert float(params[b.output.weight].detach()[:, ~pruner.ffn_kept[b.name]].abs().sum()) == 0.0
    fresh = NeuroPruner(engine, config)
    fresh.load_state_dict(pruner.state_dict())
    assert all(torch.equal(fresh.structure.ffn_saliency[b.name], pruner.structure.ffn_saliency[b.name])
               for b in blocks)
    engine.destroy()


@pytest.mark.dist
def test_structural_target_by_connectivity_prunes_the_least_connected_then_the_smallest():
    """ffn_unit_score 'connectivity': units 3 and 7 of layer 0 keep half their input connections, so they go
    first; the third unit of a 3-unit quota (floor(0.0625 * 48)) is the fully connected unit of least L1."""
    model = equivalence_model("llama")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name in ("model.layers.0.mlp.gate_proj.weight", "model.layers.0.mlp.up_proj.weight"):
            params[name][[3, 7], ::2] = 0
        params["model.layers.0.mlp.down_proj.weight"][:, 11] *= 0.01
    engine = _one_rank_engine(model)
    pruner = NeuroPruner(engine, NeuroPruneConfig(prune_heads=False, prune_ffn_units_fraction=0.0625,
                                                  target_ramp_steps=0, ffn_unit_score="connectivity"))
    changes = pruner.prune_ffn_units()
    assert changes["model.layers.0.mlp"] == [3, 7, 11]
    assert len(changes["model.layers.1.mlp"]) == 3
    assert pruner.prune_ffn_units() == {}  # the share is reached: nothing more
    engine.destroy()


@pytest.mark.dist
def test_decoupled_controller_counts_the_units_the_structural_target_will_remove():
    """The main job's schedule on a tiny LLaMA: target 0.25, a quarter of the FFN units removed on the same
    14-step ramp (pruned every 2 steps), 6 recovery steps of 24, lr 1e-4 cosine. The units' weights are about
    0.17 of the penalised ones, and the controller aims its threshold at the rest only: 0.274. Aiming at the
    whole 0.25 (the rule before) shrinks as if no unit were going and lands at 0.297."""
    model = equivalence_model("llama")
    steps = 24
    engine = _one_rank_engine(model, lr=1e-4, cosine_steps=steps)
    pruner = NeuroPruner(engine, NeuroPruneConfig(update="decoupled", mlp_lambda=1.0, attn_lambda=1.0,
                                                  target_sparsity=0.25, target_ramp_steps=14, prune_heads=False,
                                                  prune_every_steps=2, prune_ffn_units_fraction=0.25,
                                                  recover_steps=6))
    pruner.total_steps = steps
    _train(engine, pruner, steps)
    sparsity = pruner.metrics()["sparsity/weight"]
    assert [int((~kept).sum()) for kept in pruner.ffn_kept.values()] == [12, 12]
    assert abs(sparsity - 0.25) <= 0.03, f"landed at {sparsity:.3f} for a target of 0.25"
    engine.destroy()
