"""Tiny random configs of every supported family (shared by the tests)."""

import torch
import transformers

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=64),
    "mistral": lambda: transformers.MistralConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=64, sliding_window=4),
    "qwen2": lambda: transformers.Qwen2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64, max_position_embeddings=64, use_sliding_window=True, sliding_window=4, max_window_layers=1),
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
    "mistral": transformers.AutoModelForCausalLM,
    "qwen2": transformers.AutoModelForCausalLM,
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


def plant_redundant_units(model: torch.nn.Module, noise: float = 1e-3, seed: int = 0) -> None:
    """Make unit 1 of every attention block a near-copy of unit 0 (so head pruning has something to find).

    Other units keep their random init, whose pairwise l_inf distances (~0.09 at std 0.02) exceed the
    test theta of 0.05, while the planted pair differs by ~3 * noise.
    """
    from neuroprune_ds.arch import resolve_architecture

    params = dict(model.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for block in resolve_architecture(model).attention:
            for linear, rows in ((block.q, block.heads_per_unit * block.head_dim), (block.k, block.head_dim),
                                 (block.v, block.head_dim)):
                weight = params[linear.weight]
                weight[rows:2 * rows] = weight[:rows] + noise * torch.randn(weight[:rows].shape, generator=gen)


# Dropout off so that DeepSpeed ranks and the single-process reference compute the same function.
NO_DROPOUT = {"opt": dict(dropout=0.0, attention_dropout=0.0), "t5": dict(dropout_rate=0.0),
              "bart": dict(dropout=0.0, attention_dropout=0.0, activation_dropout=0.0),
              "bert": dict(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "llama": {}}


def equivalence_model(family: str) -> torch.nn.Module:
    """The deterministic, dropout-free tiny model with planted redundant heads used by the ZeRO tests."""
    torch.manual_seed(0)
    config = TINY_CONFIGS[family]()
    for key, value in NO_DROPOUT.get(family, {}).items():
        setattr(config, key, value)
    model = MODEL_CLASSES[family].from_config(config)
    plant_redundant_units(model)
    return model


def batch(family: str, step: int, rank: int, micro: int = 0, size: int = 2, length: int = 8) -> dict:
    """A deterministic random batch for (step, rank, micro-step)."""
    gen = torch.Generator().manual_seed(1000 * step + 100 * micro + rank)
    ids = torch.randint(3, 64, (size, length), generator=gen)
    if family in ("t5", "t5_v1_0", "bart"):
        return {"input_ids": ids, "labels": torch.randint(3, 64, (size, length - 2), generator=gen)}
    if family == "bert":
        return {"input_ids": ids, "labels": torch.randint(0, 2, (size,), generator=gen)}
    return {"input_ids": ids, "labels": ids.clone()}


def init_single_rank() -> None:
    """A one-rank gloo process group in this process (for a real DeepSpeed engine without a launcher)."""
    import os
    import socket

    import deepspeed

    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # MASTER_* only for this call: this process now hosts the store on that port, and a trainer started later
    # by another test inherits os.environ (it failed with EADDRINUSE when these leaked)
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        deepspeed.init_distributed(dist_backend="gloo")
    finally:
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            os.environ.pop(key, None)
