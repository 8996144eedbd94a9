"""Compact BERT (encoder) exported by NeuroPrune: per-layer attention heads and intermediate size.

Self-contained (imports only torch and transformers): the converter copies this file into the export
directory and registers it through ``auto_map``, so ``AutoModelForSequenceClassification.from_pretrained(
path, trust_remote_code=True)`` works without neuroprune_ds. Stock BERT derives the head size from
hidden_size / heads and sizes the attention output projection as hidden x hidden, so both are rebuilt here
with the original head size and each layer's own head count; forward passes are the stock ones.
"""

from huggingface_hub.dataclasses import strict
from torch import nn
from transformers.models.bert import modeling_bert as bert
from transformers.models.bert.configuration_bert import BertConfig


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
class NeuroPruneBertConfig(BertConfig):
    """BertConfig plus per-layer sizes; the head size stays hidden_size // num_attention_heads (the original)."""

    model_type = "neuroprune_bert"
    num_attention_heads_per_layer: list[int] | None = None
    intermediate_size_per_layer: list[int] | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        layers = self.num_hidden_layers
        self.num_attention_heads_per_layer = list(self.num_attention_heads_per_layer
                                                  or [self.num_attention_heads] * layers)
        self.intermediate_size_per_layer = list(self.intermediate_size_per_layer
                                                or [self.intermediate_size] * layers)

    def validate_architecture(self):
        super().validate_architecture()
        for name in ("num_attention_heads_per_layer", "intermediate_size_per_layer"):
            if len(getattr(self, name)) != self.num_hidden_layers:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries for {self.num_hidden_layers} layers")
        if min(self.num_attention_heads_per_layer) < 1:
            raise ValueError("every layer needs at least one attention head")
        if self.add_cross_attention:
            raise ValueError("the compact BERT export covers encoders; add_cross_attention is not supported")

    def layer_config(self, layer: int) -> LayerConfig:
        return LayerConfig(self, num_attention_heads=self.num_attention_heads_per_layer[layer],
                           intermediate_size=self.intermediate_size_per_layer[layer],
                           head_dim=self.hidden_size // self.num_attention_heads)


class NeuroPruneBertSelfAttention(bert.BertSelfAttention):
    """BertSelfAttention with ``config.num_attention_heads`` heads of ``config.head_dim`` each."""

    def __init__(self, config, is_causal: bool = False, layer_idx: int | None = None):
        nn.Module.__init__(self)
        self.config = config
        self.num_attention_heads = config.num_attention_heads
        self.attention_head_size = config.head_dim
        self.all_head_size = self.num_attention_heads * self.attention_head_size
        self.scaling = self.attention_head_size**-0.5
        self.query = nn.Linear(config.hidden_size, self.all_head_size)
        self.key = nn.Linear(config.hidden_size, self.all_head_size)
        self.value = nn.Linear(config.hidden_size, self.all_head_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)
        self.is_decoder = config.is_decoder
        self.is_causal = is_causal
        self.layer_idx = layer_idx


class NeuroPruneBertSelfOutput(bert.BertSelfOutput):
    """The attention output projection, from the kept heads back to hidden_size."""

    def __init__(self, config):
        nn.Module.__init__(self)
        self.dense = nn.Linear(config.num_attention_heads * config.head_dim, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)


class NeuroPruneBertAttention(bert.BertAttention):
    def __init__(self, config, is_causal: bool = False, layer_idx: int | None = None):
        nn.Module.__init__(self)
        self.is_cross_attention = False
        self.self = NeuroPruneBertSelfAttention(config, is_causal=is_causal, layer_idx=layer_idx)
        self.output = NeuroPruneBertSelfOutput(config)


class NeuroPruneBertLayer(bert.BertLayer):
    def __init__(self, config, layer_idx: int):
        nn.Module.__init__(self)
        self.chunk_size_feed_forward = config.chunk_size_feed_forward
        self.seq_len_dim = 1
        self.attention = NeuroPruneBertAttention(config, is_causal=config.is_decoder, layer_idx=layer_idx)
        self.is_decoder = config.is_decoder
        self.add_cross_attention = False
        self.intermediate = bert.BertIntermediate(config)
        self.output = bert.BertOutput(config)


class NeuroPruneBertEncoder(bert.BertEncoder):
    def __init__(self, config: NeuroPruneBertConfig):
        nn.Module.__init__(self)
        self.config = config
        self.layer = nn.ModuleList([NeuroPruneBertLayer(config.layer_config(i), i)
                                    for i in range(config.num_hidden_layers)])


class NeuroPruneBertModel(bert.BertModel):
    config_class = NeuroPruneBertConfig

    def __init__(self, config: NeuroPruneBertConfig, add_pooling_layer: bool = True):
        bert.BertPreTrainedModel.__init__(self, config)
        self.config = config
        self.gradient_checkpointing = False
        self.embeddings = bert.BertEmbeddings(config)
        self.encoder = NeuroPruneBertEncoder(config)
        self.pooler = bert.BertPooler(config) if add_pooling_layer else None
        self.post_init()


class NeuroPruneBertForSequenceClassification(bert.BertForSequenceClassification):
    config_class = NeuroPruneBertConfig

    def __init__(self, config: NeuroPruneBertConfig):
        bert.BertPreTrainedModel.__init__(self, config)
        self.num_labels = config.num_labels
        self.config = config
        self.bert = NeuroPruneBertModel(config)
        classifier_dropout = (config.classifier_dropout if config.classifier_dropout is not None
                              else config.hidden_dropout_prob)
        self.dropout = nn.Dropout(classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()
