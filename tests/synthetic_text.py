"""Tiny synthetic text and a word-level tokenizer for fast tests (no fetched assets)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = "the a cat dog sat ran on mat log good bad film plot was is very dull fine".split()


def save_word_tokenizer(path: Path) -> str:
    """A word-level tokenizer over WORDS without a pad token (as decoder-only tokenizers often are)."""
    vocab = {"[UNK]": 0, "[EOS]": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="[EOS]").save_pretrained(path)
    return str(path)


def sentence(i: int) -> str:
    """A deterministic sentence of 3-7 words."""
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(3 + i % 5))


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)
