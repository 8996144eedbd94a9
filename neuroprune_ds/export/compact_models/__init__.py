"""Compact model classes per family, and how an export plan becomes their config.

Each module here (``llama.py`` for LLaMA, Mistral and Qwen2, ``opt.py``, ``t5.py``, ``bart.py``,
``bert.py``) is self-contained: it imports
only torch and transformers, so the converter copies it into the export directory as
``modeling_neuroprune_<family>.py`` and points ``auto_map`` at it. That is why each file repeats the small
``LayerConfig`` helper: remote code is one file. ``COMPACT_FAMILIES`` says, per HF
``model_type``, which per-layer config fields hold the kept sizes of which blocks and when a stock config
can express them instead. Importing this package registers the classes with the ``Auto*`` factories, so an
export also loads without ``trust_remote_code`` wherever neuroprune_ds is installed.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field

from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM,
                          AutoModelForSequenceClassification)

AUTO_CLASSES = {"causal_lm": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM,
                "classification": AutoModelForSequenceClassification}


@dataclass(frozen=True, slots=True)
class CompactFamily:
    """How one family's kept sizes map onto its compact config (and, when uniform, its stock config).

    Keys are ``(stack, kind)`` of attention blocks and ``stack`` of FFN blocks, as ``neuroprune_ds.arch``
    names them.
    """

    module: str
    """File in this package with the config and model classes."""
    config_class: str
    model_classes: dict[str, str]
    """task ('causal_lm', 'seq2seq', 'classification') -> model class name."""
    heads: dict[tuple[str, str], str]
    """per-layer field of kept query heads."""
    ffn: dict[str, str]
    """per-layer field of kept FFN units."""
    kv_heads: dict[tuple[str, str], str] = field(default_factory=dict)
    """per-layer field of kept KV heads (grouped-query attention)."""
    relative_bias: dict[str, str] = field(default_factory=dict)
    """per-layer field of each layer's relative-bias table columns."""
    stock_heads: dict[tuple[str, str], str] | None = None
    """uniform stock attribute of each head field; None: the stock config derives the head size from the
    head count, so only unpruned attention fits it."""
    stock_kv_heads: dict[tuple[str, str], str] = field(default_factory=dict)
    stock_ffn: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    """the compact model_type's suffix where one module serves several families (default: ``module``)."""

    @property
    def model_type(self) -> str:
        return f"neuroprune_{self.name or self.module}"

    @property
    def file_name(self) -> str:
        """The modeling file's name inside an export directory."""
        return f"modeling_{self.model_type}.py"

    @property
    def source(self) -> str:
        return os.path.join(os.path.dirname(__file__), f"{self.module}.py")

    def load(self):
        return importlib.import_module(f"{__name__}.{self.module}")


def _llama_like(prefix: str) -> CompactFamily:
    """LLaMA, Mistral and Qwen2: one module (``llama.py``), one class per family."""
    return CompactFamily(
        "llama", f"NeuroPrune{prefix}Config",
        {"causal_lm": f"NeuroPrune{prefix}ForCausalLM", "classification": f"NeuroPrune{prefix}ForSequenceClassification"},
        heads={("decoder", "self"): "num_attention_heads_per_layer"},
        kv_heads={("decoder", "self"): "num_key_value_heads_per_layer"},
        ffn={"decoder": "intermediate_size_per_layer"},
        stock_heads={("decoder", "self"): "num_attention_heads"},
        stock_kv_heads={("decoder", "self"): "num_key_value_heads"},
        stock_ffn={"decoder": "intermediate_size"},
        name=prefix.lower())


COMPACT_FAMILIES: dict[str, CompactFamily] = {
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "qwen2": _llama_like("Qwen2"),
    "opt": CompactFamily(
        "opt", "NeuroPruneOPTConfig",
        {"causal_lm": "NeuroPruneOPTForCausalLM", "classification": "NeuroPruneOPTForSequenceClassification"},
        heads={("decoder", "self"): "num_attention_heads_per_layer"},
        ffn={"decoder": "ffn_dim_per_layer"},
        stock_ffn={"decoder": "ffn_dim"}),
    "bart": CompactFamily(
        "bart", "NeuroPruneBartConfig",
        {"seq2seq": "NeuroPruneBartForConditionalGeneration",
         "classification": "NeuroPruneBartForSequenceClassification"},
        heads={("encoder", "self"): "encoder_attention_heads_per_layer",
               ("decoder", "self"): "decoder_attention_heads_per_layer",
               ("decoder", "cross"): "decoder_cross_attention_heads_per_layer"},
        ffn={"encoder": "encoder_ffn_dim_per_layer", "decoder": "decoder_ffn_dim_per_layer"},
        stock_ffn={"encoder": "encoder_ffn_dim", "decoder": "decoder_ffn_dim"}),
    "t5": CompactFamily(
        "t5", "NeuroPruneT5Config",
        {"seq2seq": "NeuroPruneT5ForConditionalGeneration"},
        heads={("encoder", "self"): "num_heads_per_layer", ("decoder", "self"): "decoder_num_heads_per_layer",
               ("decoder", "cross"): "decoder_cross_num_heads_per_layer"},
        ffn={"encoder": "d_ff_per_layer", "decoder": "decoder_d_ff_per_layer"},
        relative_bias={"encoder": "relative_bias_heads_per_layer",
                       "decoder": "decoder_relative_bias_heads_per_layer"},
        stock_heads={("encoder", "self"): "num_heads", ("decoder", "self"): "num_heads",
                     ("decoder", "cross"): "num_heads"},
        stock_ffn={"encoder": "d_ff", "decoder": "d_ff"}),
    "bert": CompactFamily(
        "bert", "NeuroPruneBertConfig",
        {"classification": "NeuroPruneBertForSequenceClassification"},
        heads={("encoder", "self"): "num_attention_heads_per_layer"},
        ffn={"encoder": "intermediate_size_per_layer"},
        stock_ffn={"encoder": "intermediate_size"}),
}


def register_auto_classes() -> None:
    """Register every compact config and model class with transformers' Auto factories."""
    for family in COMPACT_FAMILIES.values():
        module = family.load()
        config_class = getattr(module, family.config_class)
        AutoConfig.register(family.model_type, config_class, exist_ok=True)
        for task, class_name in family.model_classes.items():
            AUTO_CLASSES[task].register(config_class, getattr(module, class_name), exist_ok=True)


register_auto_classes()
