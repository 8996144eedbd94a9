"""``penalty: l1`` (the paper's L1 baseline): the gradient the pruner adds is exactly lambda * sign(w)."""

import copy

import pytest
import torch

from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.pruner import NeuroPruner
from tiny_models import batch, equivalence_model, init_single_rank

MLP_LAMBDA, ATTN_LAMBDA = 3e-3, 7e-3


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

    lambdas = {name: (MLP_LAMBDA if s.kind == "mlp" else ATTN_LAMBDA)
               for s in pruner.group_sets if s.kind in ("mlp", "attn") for name, _ in s.members}
    assert any("mlp" in n or "intermediate" in n or "output.dense" in n for n in lambdas)
    assert any("q" in n for n in lambdas)
    l1 = {"mlp": 0.0, "attn": 0.0}
    for name, param in engine.module.named_parameters():
        expected = task_grads[name] + lambdas.get(name, 0.0) * torch.sign(param.detach())
        torch.testing.assert_close(param.grad, expected, rtol=0, atol=1e-7, msg=name)
        if name in lambdas:
            l1["mlp" if lambdas[name] == MLP_LAMBDA else "attn"] += float(param.detach().double().abs().sum())
    # o_proj / attention.output.dense are not penalised: their gradient is the task gradient alone
    assert any(("o_proj" in n or "attention.output.dense" in n) and n not in lambdas for n in task_grads)
    assert pruner.last_penalties["mlp"] == pytest.approx(l1["mlp"], rel=1e-7)  # group sums run in float32
    assert pruner.last_penalties["attn"] == pytest.approx(l1["attn"], rel=1e-7)  # group sums run in float32
    engine.destroy()
