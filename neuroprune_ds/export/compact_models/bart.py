"""Compact BART exported by NeuroPrune: per-layer heads of encoder self-, decoder self- and cross-attention,
and per-layer FFN width of both stacks.

Self-contained (imports only torch and transformers): the converter copies this file into the export
directory and registers it through ``auto_map``, so ``AutoModelForSeq2SeqLM.from_pretrained(path,
trust_remote_code=True)`` works without neuroprune_ds. Stock BART derives the head size from
d_model / heads, so attention and layers are rebuilt here with the original head size and each block's own
head count; forward passes are the stock ones.
"""

import math

import torch
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.bart import modeling_bart as bart
from transformers.models.bart.configuration_bart import BartConfig

_PER_LAYER = {  # field -> (number-of-layers attribute, uniform attribute it refines)
    "encoder_attention_heads_per_layer": ("encoder_layers", "encoder_attention_heads"),
    "decoder_attention_heads_per_layer": ("decoder_layers", "decoder_attention_heads"),
    "decoder_cross_attention_heads_per_layer": ("decoder_layers", "decoder_attention_heads"),
    "encoder_ffn_dim_per_layer": ("encoder_layers", "encoder_ffn_dim"),
    "decoder_ffn_dim_per_layer": ("decoder_layers", "decoder_ffn_dim"),
}


@strict
class NeuroPruneBartConfig(BartConfig):
    """BartConfig plus per-layer sizes; the head size stays d_model // heads of the original model."""

    model_type = "neuroprune_bart"
    encoder_attention_heads_per_layer: list[int] | None = None
    decoder_attention_heads_per_layer: list[int] | None = None
    decoder_cross_attention_heads_per_layer: list[int] | None = None
    encoder_ffn_dim_per_layer: list[int] | None = None
    decoder_ffn_dim_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        for name, (layers, uniform) in _PER_LAYER.items():
            setattr(self, name, list(getattr(self, name) or [getattr(self, uniform)] * getattr(self, layers)))

    def validate_architecture(self):
        super().validate_architecture()
        for name, (layers, _) in _PER_LAYER.items():
            if len(getattr(self, name)) != getattr(self, layers):
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {getattr(self, layers)} layers")
            if "heads" in name and min(getattr(self, name), default=1) < 1:
                raise ValueError(f"{name}: every attention block needs at least one head")

    @property
    def encoder_head_dim(self) -> int:
        return self.d_model // self.encoder_attention_heads

    @property
    def decoder_head_dim(self) -> int:
        return self.d_model // self.decoder_attention_heads


class NeuroPruneBartAttention(bart.BartAttention):
    """BartAttention with ``num_heads`` heads of ``head_dim`` each (head_dim no longer d_model / num_heads)."""

    def __init__(self, embed_dim: int, num_heads: int, head_dim: int, dropout: float = 0.0,
                 is_decoder: bool = False, is_causal: bool = False, config=None, layer_idx: int | None = None):
        nn.Module.__init__(self)
        self.embed_dim = embed_dim
        self.num_heads = num_heads
        self.dropout = dropout
        self.head_dim = head_dim
        self.config = config
        self.scaling = self.head_dim**-0.5
        self.is_decoder = is_decoder
        self.is_causal = is_causal
        self.layer_idx = layer_idx
        inner = num_heads * head_dim
        self.k_proj = nn.Linear(embed_dim, inner)
        self.v_proj = nn.Linear(embed_dim, inner)
        self.q_proj = nn.Linear(embed_dim, inner)
        self.out_proj = nn.Linear(inner, embed_dim)


class NeuroPruneBartEncoderLayer(bart.BartEncoderLayer):
    def __init__(self, config: NeuroPruneBartConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.embed_dim = config.d_model
        self.self_attn = NeuroPruneBartAttention(
            self.embed_dim, config.encoder_attention_heads_per_layer[layer_idx], config.encoder_head_dim,
            dropout=config.attention_dropout, config=config, layer_idx=layer_idx)
        self.self_attn_layer_norm = nn.LayerNorm(self.embed_dim)
        self.dropout = config.dropout
        self.activation_fn = ACT2FN[config.activation_function]
        self.activation_dropout = config.activation_dropout
        self.fc1 = nn.Linear(self.embed_dim, config.encoder_ffn_dim_per_layer[layer_idx])
        self.fc2 = nn.Linear(config.encoder_ffn_dim_per_layer[layer_idx], self.embed_dim)
        self.final_layer_norm = nn.LayerNorm(self.embed_dim)


class NeuroPruneBartDecoderLayer(bart.BartDecoderLayer):
    def __init__(self, config: NeuroPruneBartConfig, layer_idx: int):
        nn.Module.__init__(self)
        self.embed_dim = config.d_model
        self.self_attn = NeuroPruneBartAttention(
            self.embed_dim, config.decoder_attention_heads_per_layer[layer_idx], config.decoder_head_dim,
            dropout=config.attention_dropout, is_decoder=True, is_causal=True, config=config, layer_idx=layer_idx)
        self.dropout = config.dropout
        self.activation_fn = ACT2FN[config.activation_function]
        self.activation_dropout = config.activation_dropout
        self.self_attn_layer_norm = nn.LayerNorm(self.embed_dim)
        self.encoder_attn = NeuroPruneBartAttention(
            self.embed_dim, config.decoder_cross_attention_heads_per_layer[layer_idx], config.decoder_head_dim,
            dropout=config.attention_dropout, is_decoder=True, config=config, layer_idx=layer_idx)
        self.encoder_attn_layer_norm = nn.LayerNorm(self.embed_dim)
        self.fc1 = nn.Linear(self.embed_dim, config.decoder_ffn_dim_per_layer[layer_idx])
        self.fc2 = nn.Linear(config.decoder_ffn_dim_per_layer[layer_idx], self.embed_dim)
        self.final_layer_norm = nn.LayerNorm(self.embed_dim)


class NeuroPruneBartEncoder(bart.BartEncoder):
    config_class = NeuroPruneBartConfig

    def __init__(self, config: NeuroPruneBartConfig):
        bart.BartPreTrainedModel.__init__(self, config)
        self.dropout = config.dropout
        self.layerdrop = config.encoder_layerdrop
        self.padding_idx = config.pad_token_id
        self.max_source_positions = config.max_position_embeddings
        embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_tokens = bart.BartScaledWordEmbedding(config.vocab_size, config.d_model, self.padding_idx,
                                                         embed_scale=embed_scale)
        self.embed_positions = bart.BartLearnedPositionalEmbedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList([NeuroPruneBartEncoderLayer(config, i) for i in range(config.encoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        self.gradient_checkpointing = False
        self.post_init()


class NeuroPruneBartDecoder(bart.BartDecoder):
    config_class = NeuroPruneBartConfig

    def __init__(self, config: NeuroPruneBartConfig):
        bart.BartPreTrainedModel.__init__(self, config)
        self.dropout = config.dropout
        self.layerdrop = config.decoder_layerdrop
        self.padding_idx = config.pad_token_id
        self.max_target_positions = config.max_position_embeddings
        embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.embed_tokens = bart.BartScaledWordEmbedding(config.vocab_size, config.d_model, self.padding_idx,
                                                         embed_scale=embed_scale)
        self.embed_positions = bart.BartLearnedPositionalEmbedding(config.max_position_embeddings, config.d_model)
        self.layers = nn.ModuleList([NeuroPruneBartDecoderLayer(config, i) for i in range(config.decoder_layers)])
        self.layernorm_embedding = nn.LayerNorm(config.d_model)
        self.gradient_checkpointing = False
        self.post_init()


class NeuroPruneBartModel(bart.BartModel):
    config_class = NeuroPruneBartConfig

    def __init__(self, config: NeuroPruneBartConfig):
        bart.BartPreTrainedModel.__init__(self, config)
        embed_scale = math.sqrt(config.d_model) if config.scale_embedding else 1.0
        self.shared = bart.BartScaledWordEmbedding(config.vocab_size, config.d_model, config.pad_token_id,
                                                   embed_scale=embed_scale)
        self.encoder = NeuroPruneBartEncoder(config)
        self.decoder = NeuroPruneBartDecoder(config)
        self.post_init()


class NeuroPruneBartForConditionalGeneration(bart.BartForConditionalGeneration):
    config_class = NeuroPruneBartConfig

    def __init__(self, config: NeuroPruneBartConfig):
        bart.BartPreTrainedModel.__init__(self, config)
        self.model = NeuroPruneBartModel(config)
        self.final_logits_bias = nn.Buffer(torch.zeros((1, self.model.shared.num_embeddings)))
        self.lm_head = nn.Linear(config.d_model, self.model.shared.num_embeddings, bias=False)
        self.post_init()


class NeuroPruneBartForSequenceClassification(bart.BartForSequenceClassification):
    config_class = NeuroPruneBartConfig

    def __init__(self, config: NeuroPruneBartConfig):
        bart.BartPreTrainedModel.__init__(self, config)
        self.model = NeuroPruneBartModel(config)
        self.classification_head = bart.BartClassificationHead(config.d_model, config.d_model, config.num_labels,
                                                               config.classifier_dropout)
        self.post_init()
