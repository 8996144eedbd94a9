"""Compact T5 exported by NeuroPrune: per-layer heads of encoder self-, decoder self- and cross-attention,
per-layer FFN width, and per-layer slices of the relative position bias.

Self-contained (imports only torch and transformers): the converter copies this file into the export
directory and registers it through ``auto_map``, so ``AutoModelForSeq2SeqLM.from_pretrained(path,
trust_remote_code=True)`` works without neuroprune_ds.

Relative position bias. In T5 the bias table lives in layer 0's self-attention of each stack and the bias
it computes, one map per head, is shared by every layer of the stack. Once layers prune different heads,
layer l needs the maps of *its* kept heads, which layer 0 may have pruned. So layer 0 keeps the table
columns of every head that some layer of its stack kept (``relative_bias_heads_per_layer`` indexes those
columns for each layer), computes the shared bias once, and each layer selects its own slice.
"""

import copy

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.t5 import modeling_t5 as t5
from transformers.models.t5.configuration_t5 import T5Config


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


_PER_LAYER = {  # field -> (number-of-layers attribute, uniform attribute it refines)
    "num_heads_per_layer": ("num_layers", "num_heads"),
    "decoder_num_heads_per_layer": ("num_decoder_layers", "num_heads"),
    "decoder_cross_num_heads_per_layer": ("num_decoder_layers", "num_heads"),
    "d_ff_per_layer": ("num_layers", "d_ff"),
    "decoder_d_ff_per_layer": ("num_decoder_layers", "d_ff"),
}


@strict
class NeuroPruneT5Config(T5Config):
    """T5Config plus per-layer sizes and, per stack, which columns of layer 0's relative-bias table each
    layer's heads use."""

    model_type = "neuroprune_t5"
    num_heads_per_layer: list[int] | None = None
    decoder_num_heads_per_layer: list[int] | None = None
    decoder_cross_num_heads_per_layer: list[int] | None = None
    d_ff_per_layer: list[int] | None = None
    decoder_d_ff_per_layer: list[int] | None = None
    relative_bias_heads_per_layer: list[list[int]] | None = None
    decoder_relative_bias_heads_per_layer: list[list[int]] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name, (layers, uniform) in _PER_LAYER.items():
            setattr(self, name, list(getattr(self, name) or [getattr(self, uniform)] * getattr(self, layers)))
        for prefix, layers in (("", self.num_layers), ("decoder_", self.num_decoder_layers)):
            name = f"{prefix}relative_bias_heads_per_layer"
            default = [list(range(self.num_heads))] * layers
            setattr(self, name, [list(heads) for heads in (getattr(self, name) or default)])

    def validate_architecture(self):
        super().validate_architecture()
        for name, (layers, _) in _PER_LAYER.items():
            if len(getattr(self, name)) != getattr(self, layers):
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {getattr(self, layers)} layers")
            if "heads" in name and min(getattr(self, name), default=1) < 1:
                raise ValueError(f"{name}: every attention block needs at least one head")
        for prefix in ("", "decoder_"):
            bias_heads = getattr(self, f"{prefix}relative_bias_heads_per_layer")
            heads = getattr(self, f"{prefix}num_heads_per_layer")
            if [len(columns) for columns in bias_heads] != heads:
                raise ValueError(f"{prefix}relative_bias_heads_per_layer must list one table column per kept head "
                                 f"of every layer ({heads} heads)")

    def stack_config(self, is_decoder: bool) -> "NeuroPruneT5Config":
        """The config of the encoder or decoder stack (the stock model deep-copies it the same way)."""
        config = copy.deepcopy(self)
        config.is_decoder = is_decoder
        if is_decoder:
            config.num_layers = self.num_decoder_layers
        else:
            config.use_cache = False
        return config

    def layer_sizes(self, layer: int) -> dict:
        """Heads (self, cross), FFN width and bias columns of ``layer`` in this (stack) config."""
        prefix = "decoder_" if self.is_decoder else ""
        return {"self_heads": getattr(self, f"{prefix}num_heads_per_layer")[layer],
                "cross_heads": self.decoder_cross_num_heads_per_layer[layer] if self.is_decoder else None,
                "d_ff": getattr(self, f"{prefix}d_ff_per_layer")[layer],
                "bias_heads": getattr(self, f"{prefix}relative_bias_heads_per_layer")[layer]}

    def bias_table_heads(self) -> int:
        """Columns of this stack's relative-bias table: every head that some layer kept."""
        prefix = "decoder_" if self.is_decoder else ""
        return 1 + max(max(columns) for columns in getattr(self, f"{prefix}relative_bias_heads_per_layer"))


class NeuroPruneT5Attention(t5.T5Attention):
    """T5Attention whose self-attention adds its own heads' slice of the stack's shared position bias.

    The bias computed here (layer 0) or received from layer 0 has one map per table column; it is handed on
    unsliced, so every layer can select its own heads. Cross-attention has no position bias (zeros).
    """

    def __init__(self, config, has_relative_attention_bias: bool = False, layer_idx: int | None = None,
                 is_causal: bool = False, bias_heads: list[int] | None = None, table_heads: int = 0):
        super().__init__(config, has_relative_attention_bias=False, layer_idx=layer_idx, is_causal=is_causal)
        self.has_relative_attention_bias = has_relative_attention_bias
        if has_relative_attention_bias:
            self.relative_attention_bias = nn.Embedding(self.relative_attention_num_buckets, table_heads)
        identity = bias_heads is None or list(bias_heads) == list(range(table_heads))
        self.bias_heads = None if identity else list(bias_heads)

    def forward(self, hidden_states, mask=None, key_value_states=None, position_bias=None, cache=None, **kwargs):
        if position_bias is None:
            query_length = hidden_states.shape[1]
            if key_value_states is not None:
                position_bias = hidden_states.new_zeros((1, 1, query_length, key_value_states.shape[1]))
            else:
                past_seen_tokens = cache.get_seq_length(self.layer_idx) if cache is not None else 0
                position_bias = self.compute_bias(query_length, past_seen_tokens + query_length,
                                                  device=hidden_states.device, past_seen_tokens=past_seen_tokens)
        own_bias = position_bias if self.bias_heads is None else position_bias[:, self.bias_heads]
        output, _, weights = super().forward(hidden_states, mask=mask, key_value_states=key_value_states,
                                             position_bias=own_bias, cache=cache, **kwargs)
        return output, position_bias, weights


class NeuroPruneT5LayerSelfAttention(t5.T5LayerSelfAttention):
    def __init__(self, config, layer_idx: int, heads: int, bias_heads: list[int], table_heads: int):
        nn.Module.__init__(self)
        self.SelfAttention = NeuroPruneT5Attention(
            LayerConfig(config, num_heads=heads), has_relative_attention_bias=layer_idx == 0, layer_idx=layer_idx,
            is_causal=config.is_decoder, bias_heads=bias_heads, table_heads=table_heads)
        self.layer_norm = t5.T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)


class NeuroPruneT5LayerCrossAttention(t5.T5LayerCrossAttention):
    def __init__(self, config, layer_idx: int, heads: int):
        nn.Module.__init__(self)
        self.EncDecAttention = NeuroPruneT5Attention(LayerConfig(config, num_heads=heads), layer_idx=layer_idx)
        self.layer_norm = t5.T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)


class NeuroPruneT5Block(t5.T5Block):
    def __init__(self, config: NeuroPruneT5Config, layer_idx: int):
        nn.Module.__init__(self)
        sizes = config.layer_sizes(layer_idx)
        self.is_decoder = config.is_decoder
        self.layer = nn.ModuleList()
        self.layer.append(NeuroPruneT5LayerSelfAttention(config, layer_idx, sizes["self_heads"], sizes["bias_heads"],
                                                         config.bias_table_heads()))
        if self.is_decoder:
            self.layer.append(NeuroPruneT5LayerCrossAttention(config, layer_idx, sizes["cross_heads"]))
        self.layer.append(t5.T5LayerFF(LayerConfig(config, d_ff=sizes["d_ff"])))


class NeuroPruneT5Stack(t5.T5Stack):
    config_class = NeuroPruneT5Config

    def __init__(self, config: NeuroPruneT5Config):
        t5.T5PreTrainedModel.__init__(self, config)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.d_model)
        self.is_decoder = config.is_decoder
        self.block = nn.ModuleList([NeuroPruneT5Block(config, i) for i in range(config.num_layers)])
        self.final_layer_norm = t5.T5LayerNorm(config.d_model, eps=config.layer_norm_epsilon)
        self.dropout = nn.Dropout(config.dropout_rate)
        self.post_init()
        self.gradient_checkpointing = False


class NeuroPruneT5ForConditionalGeneration(t5.T5ForConditionalGeneration):
    config_class = NeuroPruneT5Config

    def __init__(self, config: NeuroPruneT5Config):
        t5.T5PreTrainedModel.__init__(self, config)
        self.model_dim = config.d_model
        self.shared = nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = NeuroPruneT5Stack(config.stack_config(is_decoder=False))
        self.decoder = NeuroPruneT5Stack(config.stack_config(is_decoder=True))
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.post_init()
