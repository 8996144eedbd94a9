"""Compact LLaMA-like decoders exported by NeuroPrune (LLaMA, Mistral, Qwen2): per-layer attention heads, KV
heads and MLP width.

Self-contained (imports only torch and transformers): the converter copies this file into the export
directory and registers it through ``auto_map``, so ``AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)`` works without neuroprune_ds. Every module is the family's stock one, built from a
per-layer view of the config; pruned KV groups (their query heads, K/V heads and output-projection columns)
and dead MLP units are simply absent from the weights. The three families differ only in their stock
modules (Qwen2: Q/K/V biases and per-layer sliding windows; Mistral: a sliding window), so one builder
serves them all.
"""

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.llama import modeling_llama as llama
from transformers.models.llama.configuration_llama import LlamaConfig
from transformers.models.mistral import modeling_mistral as mistral
from transformers.models.mistral.configuration_mistral import MistralConfig
from transformers.models.qwen2 import modeling_qwen2 as qwen2
from transformers.models.qwen2.configuration_qwen2 import Qwen2Config

PER_LAYER_FIELDS = ("num_attention_heads_per_layer", "num_key_value_heads_per_layer", "intermediate_size_per_layer")


class LayerConfig:
    """The config one layer sees: its own sizes override the model's; every other attribute, including the
    attention implementation chosen after construction, is read live from the model config."""

    def __init__(self, config, **overrides):
        self.__dict__.update(_config=config, _overrides=overrides)

    def __getattr__(self, name):
        try:
            config, overrides = self.__dict__["_config"], self.__dict__["_overrides"]
        except KeyError:
            raise AttributeError(name) from None
        return overrides[name] if name in overrides else getattr(config, name)


class PerLayerSizes:
    """Mixin of the compact configs: fills, checks and serves the per-layer sizes (``head_dim`` stays the
    original head size: pruning keeps it)."""

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        layers = self.num_hidden_layers
        self.num_attention_heads_per_layer = list(self.num_attention_heads_per_layer
                                                  or [self.num_attention_heads] * layers)
        self.num_key_value_heads_per_layer = list(self.num_key_value_heads_per_layer
                                                  or [self.num_key_value_heads] * layers)
        self.intermediate_size_per_layer = list(self.intermediate_size_per_layer
                                                or [self.intermediate_size] * layers)

    def validate_architecture(self):
        super().validate_architecture()
        for name in PER_LAYER_FIELDS:
            if len(getattr(self, name)) != self.num_hidden_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {self.num_hidden_layers} layers")
        groups = self.num_attention_heads // self.num_key_value_heads
        for layer, (heads, kv_heads) in enumerate(zip(self.num_attention_heads_per_layer,
                                                      self.num_key_value_heads_per_layer)):
            if kv_heads < 1 or heads != kv_heads * groups:
                raise ValueError(f"layer {layer}: {heads} query heads and {kv_heads} KV heads; expected "
                                 f"{groups} query heads per KV head and at least one KV head")

    def layer_config(self, layer: int) -> LayerConfig:
        # head_dim explicitly: a config without one (Qwen2) makes the layer derive it from its own head count
        head_dim = getattr(self, "head_dim", None) or self.hidden_size // self.num_attention_heads
        return LayerConfig(self, num_attention_heads=self.num_attention_heads_per_layer[layer],
                           num_key_value_heads=self.num_key_value_heads_per_layer[layer],
                           intermediate_size=self.intermediate_size_per_layer[layer], head_dim=head_dim)


@strict
class NeuroPruneLlamaConfig(PerLayerSizes, LlamaConfig):
    model_type = "neuroprune_llama"
    num_attention_heads_per_layer: list[int] | None = None
    num_key_value_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None


@strict
class NeuroPruneMistralConfig(PerLayerSizes, MistralConfig):
    model_type = "neuroprune_mistral"
    num_attention_heads_per_layer: list[int] | None = None
    num_key_value_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None


@strict
class NeuroPruneQwen2Config(PerLayerSizes, Qwen2Config):
    model_type = "neuroprune_qwen2"
    num_attention_heads_per_layer: list[int] | None = None
    num_key_value_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None


def _build_decoder(model, config, modeling, prefix: str) -> None:
    """The stock ``<prefix>Model.__init__`` with one layer config per decoder layer."""
    getattr(modeling, f"{prefix}PreTrainedModel").__init__(model, config)
    model.padding_idx = config.pad_token_id
    model.vocab_size = config.vocab_size
    model.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, model.padding_idx)
    layer_class = getattr(modeling, f"{prefix}DecoderLayer")
    model.layers = nn.ModuleList([layer_class(config.layer_config(i), i) for i in range(config.num_hidden_layers)])
    model.norm = getattr(modeling, f"{prefix}RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
    model.rotary_emb = getattr(modeling, f"{prefix}RotaryEmbedding")(config=config)
    model.gradient_checkpointing = False
    if getattr(config, "layer_types", None) is not None:  # Qwen2: which layers use the sliding window
        model.has_sliding_layers = "sliding_attention" in config.layer_types
    model.post_init()


def _build_causal_lm(model, config, modeling, prefix: str, body) -> None:
    getattr(modeling, f"{prefix}PreTrainedModel").__init__(model, config)
    model.model = body(config)
    model.vocab_size = config.vocab_size
    model.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
    model.post_init()


def _build_classifier(model, config, modeling, prefix: str, body) -> None:
    getattr(modeling, f"{prefix}PreTrainedModel").__init__(model, config)
    model.num_labels = config.num_labels
    model.model = body(config)
    model.score = nn.Linear(config.hidden_size, model.num_labels, bias=False)
    model.post_init()


class NeuroPruneLlamaModel(llama.LlamaModel):
    config_class = NeuroPruneLlamaConfig

    def __init__(self, config: NeuroPruneLlamaConfig):
        _build_decoder(self, config, llama, "Llama")


class NeuroPruneLlamaForCausalLM(llama.LlamaForCausalLM):
    config_class = NeuroPruneLlamaConfig

    def __init__(self, config: NeuroPruneLlamaConfig):
        _build_causal_lm(self, config, llama, "Llama", NeuroPruneLlamaModel)


class NeuroPruneLlamaForSequenceClassification(llama.LlamaForSequenceClassification):
    config_class = NeuroPruneLlamaConfig

    def __init__(self, config: NeuroPruneLlamaConfig):
        _build_classifier(self, config, llama, "Llama", NeuroPruneLlamaModel)


class NeuroPruneMistralModel(mistral.MistralModel):
    config_class = NeuroPruneMistralConfig

    def __init__(self, config: NeuroPruneMistralConfig):
        _build_decoder(self, config, mistral, "Mistral")


class NeuroPruneMistralForCausalLM(mistral.MistralForCausalLM):
    config_class = NeuroPruneMistralConfig

    def __init__(self, config: NeuroPruneMistralConfig):
        _build_causal_lm(self, config, mistral, "Mistral", NeuroPruneMistralModel)


class NeuroPruneMistralForSequenceClassification(mistral.MistralForSequenceClassification):
    config_class = NeuroPruneMistralConfig

    def __init__(self, config: NeuroPruneMistralConfig):
        _build_classifier(self, config, mistral, "Mistral", NeuroPruneMistralModel)


class NeuroPruneQwen2Model(qwen2.Qwen2Model):
    config_class = NeuroPruneQwen2Config

    def __init__(self, config: NeuroPruneQwen2Config):
        _build_decoder(self, config, qwen2, "Qwen2")


class NeuroPruneQwen2ForCausalLM(qwen2.Qwen2ForCausalLM):
    config_class = NeuroPruneQwen2Config

    def __init__(self, config: NeuroPruneQwen2Config):
        _build_causal_lm(self, config, qwen2, "Qwen2", NeuroPruneQwen2Model)


class NeuroPruneQwen2ForSequenceClassification(qwen2.Qwen2ForSequenceClassification):
    config_class = NeuroPruneQwen2Config

    def __init__(self, config: NeuroPruneQwen2Config):
        _build_classifier(self, config, qwen2, "Qwen2", NeuroPruneQwen2Model)
