"""Compact OPT exported by NeuroPrune: per-layer attention heads and FFN width.

Self-contained (imports only torch and transformers): the converter copies this file into the export
directory and registers it through ``auto_map``, so ``AutoModelForCausalLM.from_pretrained(path,
trust_remote_code=True)`` works without neuroprune_ds. Stock OPT derives the head size from
hidden_size / num_heads, so the attention and the decoder layer are rebuilt here with the original head size
and the layer's own head count; forward passes are the stock ones.
"""

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.activations import ACT2FN
from transformers.models.opt import modeling_opt as opt
from transformers.models.opt.configuration_opt import OPTConfig


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
class NeuroPruneOPTConfig(OPTConfig):
    """OPTConfig plus per-layer sizes; the head size stays hidden_size // num_attention_heads (the original)."""

    model_type = "neuroprune_opt"
    num_attention_heads_per_layer: list[int] | None = None
    ffn_dim_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        layers = self.num_hidden_layers
        self.num_attention_heads_per_layer = list(self.num_attention_heads_per_layer
                                                  or [self.num_attention_heads] * layers)
        self.ffn_dim_per_layer = list(self.ffn_dim_per_layer or [self.ffn_dim] * layers)

    def validate_architecture(self):
        super().validate_architecture()
        for name in ("num_attention_heads_per_layer", "ffn_dim_per_layer"):
            if len(getattr(self, name)) != self.num_hidden_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {self.num_hidden_layers} layers")
        if min(self.num_attention_heads_per_layer) < 1:
            raise ValueError("every layer needs at least one attention head")

    def layer_config(self, layer: int) -> LayerConfig:
        return LayerConfig(self, num_attention_heads=self.num_attention_heads_per_layer[layer],
                           ffn_dim=self.ffn_dim_per_layer[layer],
                           head_dim=self.hidden_size // self.num_attention_heads)


class NeuroPruneOPTAttention(opt.OPTAttention):
    """OPTAttention with ``config.num_attention_heads`` heads of ``config.head_dim`` each."""

    def __init__(self, config, layer_idx: int):
        nn.Module.__init__(self)
        self.config = config
        self.embed_dim = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.dropout = config.attention_dropout
        self.enable_bias = config.enable_bias
        self.layer_idx = layer_idx
        self.head_dim = config.head_dim
        self.is_causal = True
        self.scaling = self.head_dim**-0.5
        inner = self.num_heads * self.head_dim
        self.k_proj = nn.Linear(self.embed_dim, inner, bias=self.enable_bias)
        self.v_proj = nn.Linear(self.embed_dim, inner, bias=self.enable_bias)
        self.q_proj = nn.Linear(self.embed_dim, inner, bias=self.enable_bias)
        self.out_proj = nn.Linear(inner, self.embed_dim, bias=self.enable_bias)


class NeuroPruneOPTDecoderLayer(opt.OPTDecoderLayer):
    def __init__(self, config, layer_idx: int):
        nn.Module.__init__(self)
        self.embed_dim = config.hidden_size
        self.self_attn = NeuroPruneOPTAttention(config, layer_idx)
        self.do_layer_norm_before = config.do_layer_norm_before
        self.dropout = config.dropout
        self.activation_fn = ACT2FN[config.activation_function]
        self.self_attn_layer_norm = nn.LayerNorm(self.embed_dim,
                                                 elementwise_affine=config.layer_norm_elementwise_affine)
        self.fc1 = nn.Linear(self.embed_dim, config.ffn_dim, bias=config.enable_bias)
        self.fc2 = nn.Linear(config.ffn_dim, self.embed_dim, bias=config.enable_bias)
        self.final_layer_norm = nn.LayerNorm(self.embed_dim, elementwise_affine=config.layer_norm_elementwise_affine)


class NeuroPruneOPTDecoder(opt.OPTDecoder):
    config_class = NeuroPruneOPTConfig

    def __init__(self, config: NeuroPruneOPTConfig):
        opt.OPTPreTrainedModel.__init__(self, config)
        self.dropout = config.dropout
        self.layerdrop = config.layerdrop
        self.padding_idx = config.pad_token_id
        self.max_target_positions = config.max_position_embeddings
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.word_embed_proj_dim, self.padding_idx)
        self.embed_positions = opt.OPTLearnedPositionalEmbedding(config.max_position_embeddings, config.hidden_size)
        projected = config.word_embed_proj_dim != config.hidden_size
        self.project_out = nn.Linear(config.hidden_size, config.word_embed_proj_dim, bias=False) if projected else None
        self.project_in = nn.Linear(config.word_embed_proj_dim, config.hidden_size, bias=False) if projected else None
        if config.do_layer_norm_before and not config._remove_final_layer_norm:
            self.final_layer_norm = nn.LayerNorm(config.hidden_size,
                                                 elementwise_affine=config.layer_norm_elementwise_affine)
        else:
            self.final_layer_norm = None
        self.layers = nn.ModuleList([NeuroPruneOPTDecoderLayer(config.layer_config(i), i)
                                     for i in range(config.num_hidden_layers)])
        self.gradient_checkpointing = False
        self.post_init()


class NeuroPruneOPTModel(opt.OPTModel):
    config_class = NeuroPruneOPTConfig

    def __init__(self, config: NeuroPruneOPTConfig):
        opt.OPTPreTrainedModel.__init__(self, config)
        self.decoder = NeuroPruneOPTDecoder(config)
        self.post_init()


class NeuroPruneOPTForCausalLM(opt.OPTForCausalLM):
    config_class = NeuroPruneOPTConfig

    def __init__(self, config: NeuroPruneOPTConfig):
        opt.OPTPreTrainedModel.__init__(self, config)
        self.model = NeuroPruneOPTModel(config)
        self.lm_head = nn.Linear(config.word_embed_proj_dim, config.vocab_size, bias=False)
        self.post_init()


class NeuroPruneOPTForSequenceClassification(opt.OPTForSequenceClassification):
    config_class = NeuroPruneOPTConfig

    def __init__(self, config: NeuroPruneOPTConfig):
        opt.OPTPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.model = NeuroPruneOPTModel(config)
        self.score = nn.Linear(config.word_embed_proj_dim, self.num_labels, bias=False)
        self.post_init()
