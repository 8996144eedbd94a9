"""The architecture registry finds exactly the expected modules of every family."""

import pytest
import torch

from neuroprune_ds.arch import resolve_architecture
from neuroprune_ds.config import NeuroPruneConfig
from tiny_models import MODEL_CLASSES, TINY_CONFIGS


def meta_model(family):
    with torch.device("meta"):
        return MODEL_CLASSES[family].from_config(TINY_CONFIGS[family]())


EXPECTED_ATTENTION = {
    "llama": ["model.layers.{}.self_attn"],
    "opt": ["model.decoder.layers.{}.self_attn"],
    "bert": ["bert.encoder.layer.{}.attention"],
    "bart": ["model.encoder.layers.{}.self_attn", "model.decoder.layers.{}.self_attn",
             "model.decoder.layers.{}.encoder_attn"],
    "t5": ["encoder.block.{}.layer.0.SelfAttention", "decoder.block.{}.layer.0.SelfAttention",
           "decoder.block.{}.layer.1.EncDecAttention"],
}
EXPECTED_FFN_INPUTS = {
    "llama": ("model.layers.{}.mlp", ["gate_proj", "up_proj"], "down_proj"),
    "opt": ("model.decoder.layers.{}", ["fc1"], "fc2"),
    "bert": ("bert.encoder.layer.{}", ["intermediate.dense"], "output.dense"),
    "t5": ("encoder.block.{}.layer.1.DenseReluDense", ["wi_0", "wi_1"], "wo"),
    "t5_v1_0": ("encoder.block.{}.layer.1.DenseReluDense", ["wi"], "wo"),
}


@pytest.mark.parametrize("family", sorted(EXPECTED_ATTENTION))
def test_attention_blocks_per_layer(family):
    arch = resolve_architecture(meta_model(family))
    expected = sorted(p.format(layer) for p in EXPECTED_ATTENTION[family] for layer in range(2))
    assert sorted(b.name for b in arch.attention) == expected
    for block in arch.attention:
        assert block.kind == ("cross" if "encoder_attn" in block.name or "EncDec" in block.name else "self")
        assert block.num_heads == 4 and block.head_dim == 8
        assert block.num_kv_heads == (2 if family == "llama" else 4)
        assert block.q.weight == block.name + "." + {"llama": "q_proj", "opt": "q_proj", "bart": "q_proj",
                                                     "t5": "q", "bert": "self.query"}[family] + ".weight"
        assert (block.q.bias is not None) == (family in ("opt", "bart", "bert"))
    if family == "t5":
        with_bias = [b.name for b in arch.attention if b.relative_bias]
        assert with_bias == ["encoder.block.0.layer.0.SelfAttention", "decoder.block.0.layer.0.SelfAttention"]


@pytest.mark.parametrize("family", sorted(EXPECTED_FFN_INPUTS))
def test_ffn_blocks(family):
    arch = resolve_architecture(meta_model(family))
    path, inputs, output = EXPECTED_FFN_INPUTS[family]
    block = next(b for b in arch.ffn if b.name == path.format(0))
    assert [i.weight for i in block.inputs] == [f"{block.name}.{n}.weight" for n in inputs]
    assert block.output.weight == f"{block.name}.{output}.weight"
    assert block.width == 48
    assert len(arch.ffn) == (4 if family.startswith("t5") or family == "bart" else 2)


def test_attention_kinds_and_patterns_select_blocks():
    model = meta_model("bart")
    only_self = resolve_architecture(model, NeuroPruneConfig(attention_kinds=["self"]))
    assert all(b.kind == "self" for b in only_self.attention) and len(only_self.attention) == 4
    decoder = resolve_architecture(model, NeuroPruneConfig(target_modules=[r".*decoder.*"],
                                                           exclude_modules=["encoder_attn"]))
    assert sorted(b.name for b in decoder.attention) == ["model.decoder.layers.0.self_attn",
                                                         "model.decoder.layers.1.self_attn"]
    assert all("decoder" in b.name for b in decoder.ffn)


def test_patterns_that_match_nothing_are_errors():
    with pytest.raises(ValueError, match=r"neuroprune.target_modules: 'q_projj' matches no"):
        resolve_architecture(meta_model("llama"), NeuroPruneConfig(target_modules=["q_projj"]))
    with pytest.raises(ValueError, match=r"neuroprune.exclude_modules"):
        resolve_architecture(meta_model("llama"), NeuroPruneConfig(exclude_modules=["nothing_here"]))


def test_unknown_model_type_lists_supported_and_how_to_add():
    import transformers
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2))
    with pytest.raises(ValueError, match=r"'gpt2' is not supported; supported: bart, bert, .*register_architecture"):
        resolve_architecture(model)
