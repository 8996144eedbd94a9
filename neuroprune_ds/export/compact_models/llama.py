"""Compact LLaMA exported by NeuroPrune: per-layer attention heads, KV heads and MLP width.

Self-contained (imports only torch and transformers): the converter copies this file into the export
directory and registers it through ``auto_map``, so ``AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)`` works without neuroprune_ds. Every module is the stock LLaMA one, built from a
per-layer view of the config; pruned KV groups (their query heads, K/V heads and output-projection columns)
and dead MLP units are simply absent from the weights.
"""

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.llama import modeling_llama as llama
from transformers.models.llama.configuration_llama import LlamaConfig


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


@strict
class NeuroPruneLlamaConfig(LlamaConfig):
    """LlamaConfig plus per-layer sizes; ``head_dim`` is the original head size (pruning keeps it)."""

    model_type = "neuroprune_llama"
    num_attention_heads_per_layer: list[int] | None = None
    num_key_value_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None

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
        for name in ("num_attention_heads_per_layer", "num_key_value_heads_per_layer", "intermediate_size_per_layer"):
            if len(getattr(self, name)) != self.num_hidden_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {self.num_hidden_layers} layers")
        groups = self.num_attention_heads // self.num_key_value_heads
        for layer, (heads, kv_heads) in enumerate(zip(self.num_attention_heads_per_layer,
                                                      self.num_key_value_heads_per_layer)):
            if kv_heads < 1 or heads != kv_heads * groups:
                raise ValueError(f"layer {layer}: {heads} query heads and {kv_heads} KV heads; expected "
                                 f"{groups} query heads per KV head and at least one KV head")

    def layer_config(self, layer: int) -> LayerConfig:
        return LayerConfig(self, num_attention_heads=self.num_attention_heads_per_layer[layer],
                           num_key_value_heads=self.num_key_value_heads_per_layer[layer],
                           intermediate_size=self.intermediate_size_per_layer[layer])


class NeuroPruneLlamaModel(llama.LlamaModel):
    config_class = NeuroPruneLlamaConfig

    def __init__(self, config: NeuroPruneLlamaConfig):
        llama.LlamaPreTrainedModel.__init__(self, config)
        self.padding_idx = config.pad_token_id
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, self.padding_idx)
        self.layers = nn.ModuleList([llama.LlamaDecoderLayer(config.layer_config(i), i)
                                     for i in range(config.num_hidden_layers)])
        self.norm = llama.LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = llama.LlamaRotaryEmbedding(config=config)
        self.gradient_checkpointing = False
        self.post_init()


class NeuroPruneLlamaForCausalLM(llama.LlamaForCausalLM):
    config_class = NeuroPruneLlamaConfig

    def __init__(self, config: NeuroPruneLlamaConfig):
        llama.LlamaPreTrainedModel.__init__(self, config)
        self.model = NeuroPruneLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()


class NeuroPruneLlamaForSequenceClassification(llama.LlamaForSequenceClassification):
    config_class = NeuroPruneLlamaConfig

    def __init__(self, config: NeuroPruneLlamaConfig):
        llama.LlamaPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = NeuroPruneLlamaModel(config)
        self.score = nn.Linear(config.hidden_size, self.num_labels, bias=False)
        self.post_init()
