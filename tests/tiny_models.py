"""Tiny random configs of every supported family (shared by the tests)."""

import torch
import transformers

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=64),
    "opt": lambda: transformers.OPTConfig(
        hidden_size=32, ffn_dim=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
        word_embed_proj_dim=32, max_position_embeddings=64),
    "t5": lambda: transformers.T5Config(
        d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=64,
        feed_forward_proj="gated-gelu", decoder_start_token_id=0),
    "t5_v1_0": lambda: transformers.T5Config(
        d_model=32, d_kv=8, d_ff=48, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=64,
        feed_forward_proj="relu", decoder_start_token_id=0),
    "bart": lambda: transformers.BartConfig(
        d_model=32, encoder_ffn_dim=48, decoder_ffn_dim=48, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=4, decoder_attention_heads=4, vocab_size=64, max_position_embeddings=64),
    "bert": lambda: transformers.BertConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, vocab_size=64,
        max_position_embeddings=64),
}

MODEL_CLASSES = {
    "llama": transformers.AutoModelForCausalLM,
    "opt": transformers.AutoModelForCausalLM,
    "t5": transformers.AutoModelForSeq2SeqLM,
    "t5_v1_0": transformers.AutoModelForSeq2SeqLM,
    "bart": transformers.AutoModelForSeq2SeqLM,
    "bert": transformers.AutoModelForSequenceClassification,
}


def tiny_model(family: str, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised tiny model of ``family`` (deterministic for a seed)."""
    torch.manual_seed(seed)
    return MODEL_CLASSES[family].from_config(TINY_CONFIGS[family]())
