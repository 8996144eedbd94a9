"""The figures tools/demo.py derives itself (the demo runs real models; these are checked by hand)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from tiny_models import tiny_model

TOOLS = Path(__file__).parent.parent / "tools"


@pytest.fixture(scope="module")
def demo():
    sys.path.insert(0, str(TOOLS))  # demo.py imports its sibling tools, as when run as a script
    try:
        spec = importlib.util.spec_from_file_location("demo", TOOLS / "demo.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(TOOLS))
    return module


def test_prefill_flops_by_hand(demo):
    # tiny LLaMA: hidden 32, 4 heads of 8 (2 KV heads), FFN 48, 2 layers, vocab 64 (tied LM head)
    per_layer = 32 * 32 + 2 * 16 * 32 + 32 * 32 + 3 * 48 * 32  # q, k, v, o, gate/up/down
    linear = 2 * per_layer + 64 * 32  # + the LM head, which a prefill runs at every position
    tokens = 10
    assert demo.prefill_flops(tiny_model("llama"), tokens) == 2 * tokens * linear + 4 * tokens ** 2 * 2 * 32


def figures(ppl_eval: float, ppl_news: float, removed: int, speedup: float, sparsity: float) -> dict:
    reference = {"eval": 20.0, "news": 40.0}
    return {"perplexity": {"dense_fine_tune": reference, "neuroprune": {"eval": ppl_eval, "news": ppl_news}},
            "target_sparsity": 0.3, "weight_sparsity": sparsity, "ffn_units_removed": removed, "ffn_units": 100,
            "prefill_speedup": speedup, "flop_ratio": 2.0}


def test_goals_on_either_side_of_their_boundaries(demo):
    met = dict(demo.goals(figures(22.99, 45.99, 25, 1.8, 0.3199), minutes=20.0))
    assert all(met.values()), met
    missed = dict(demo.goals(figures(23.01, 46.01, 24, 1.79, 0.3201), minutes=20.01))
    assert not any(missed.values()), missed
