"""The architecture registry finds exactly the expected modules of every family."""

import pytest
import torch

from neuroprune_ds.arch import (ARCHITECTURES, auto_model_class, ffn_input_weights, penalised_weights,
                                resolve_architecture)
from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.heads import UnitLayout
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


def test_penalised_weights_are_q_k_v_and_every_ffn_matrix():
    """The attention output projection is not penalised (docs/algorithm.md section 2)."""
    arch = resolve_architecture(meta_model("llama"))
    attention = [f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "k_proj", "v_proj")]
    ffn = [f"model.layers.{i}.mlp.{p}.weight" for i in range(2) for p in ("gate_proj", "up_proj", "down_proj")]
    assert penalised_weights(arch) == attention + ffn


def test_attention_block_layout_splits_gqa_into_kv_groups():
    block = resolve_architecture(meta_model("llama")).attention[0]
    assert block.layout == UnitLayout(num_units=2, heads_per_unit=2, head_dim=8)
    assert block.layout.q_rows_per_unit == 16


@pytest.mark.parametrize("family", ["t5", "t5_v1_0", "llama", "bert"])
def test_ffn_input_weights_from_weight_names_alone(family):
    """What the report reads from an export's safetensors names equals what the model resolves to."""
    model = meta_model(family)
    available = {name for name, _ in model.named_parameters()}
    for block in resolve_architecture(model).ffn:
        assert ffn_input_weights(model.config.model_type, block.name, available) == [i.weight for i in block.inputs]
    with pytest.raises(ValueError, match="input projections are not among the weights"):
        ffn_input_weights(model.config.model_type, block.name, available - {block.inputs[0].weight})


def test_task_selects_the_auto_model_class():
    import transformers
    assert auto_model_class("causal_lm", "llama") is transformers.AutoModelForCausalLM
    assert auto_model_class("seq2seq", "bart") is transformers.AutoModelForSeq2SeqLM
    assert auto_model_class("classification", "bart") is transformers.AutoModelForSequenceClassification
    assert auto_model_class("classification", "t5") is transformers.AutoModelForSeq2SeqLM  # text-to-text


def test_every_compact_family_names_classes_its_module_has():
    from neuroprune_ds.export.compact_models import load_module

    for model_type, spec in ARCHITECTURES.items():
        if spec.compact is None:
            continue
        module = load_module(spec.compact)
        for class_name in (spec.compact.config_class, *spec.compact.model_classes.values()):
            assert hasattr(module, class_name), (model_type, class_name)
