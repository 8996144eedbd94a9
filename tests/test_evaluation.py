"""Evaluation metrics on hand-checked examples, and each task's eval pass on tiny random models (one rank)."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from synthetic_text import WORDS, save_word_tokenizer, sentence, write_jsonl

from neuroprune_ds.config import DataConfig, ModelConfig, RunConfig
from neuroprune_ds.data import build_task_data, load_tokenizer
from neuroprune_ds.evaluation import classification_metrics, evaluate, text_generation_metrics, token_nll

VOCAB = len(WORDS) + 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return load_tokenizer(ModelConfig(name_or_path=save_word_tokenizer(tmp_path_factory.mktemp("tok"))))


def test_classification_metrics_hand_checked():
    # tp=2, tn=1, fp=1, fn=0: precision 2/3, recall 1 -> F1 0.8; MCC = (2*1 - 1*0) / sqrt(3*2*1*2).
    metrics = classification_metrics([1, 0, 1, 1], [1, 0, 0, 1], num_labels=2)
    assert metrics["eval/accuracy"] == pytest.approx(0.75)
    assert metrics["eval/f1"] == pytest.approx(0.8)
    assert metrics["eval/matthews"] == pytest.approx(2 / math.sqrt(12))
    # A generated label that names no class (-1) is wrong and not a positive.
    assert classification_metrics([-1, 0], [1, 0], num_labels=2)["eval/accuracy"] == 0.5
    assert classification_metrics([0, 1, 2, 2], [0, 1, 2, 1], num_labels=3)["eval/f1"] == pytest.approx(
        (1 + 2 / 3 + 2 / 3) / 3
    )


def test_text_generation_metrics_bounds_and_partial_overlap():
    same = text_generation_metrics(["the cat sat on the mat"], ["the cat sat on the mat"])
    assert all(value == pytest.approx(100.0) for value in same.values())
    assert set(same) == {"eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/bleu"}
    disjoint = text_generation_metrics(["dog ran"], ["the cat sat"])
    assert all(value == pytest.approx(0.0) for value in disjoint.values())
    # ROUGE-1: 2 of 3 unigrams shared both ways -> F 2/3.
    assert text_generation_metrics(["cat sat down"], ["the cat sat"])["eval/rouge1"] == pytest.approx(200 / 3)


def test_token_nll_matches_the_model_loss():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.randint(0, 7, (2, 5))
    labels[1, 3:] = -100
    nll, tokens = token_nll(logits, labels, shift=True)
    assert tokens.tolist() == [4.0, 2.0]
    expected = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 7), labels[:, 1:].reshape(-1))
    assert float(nll.sum() / tokens.sum()) == pytest.approx(float(expected), rel=1e-6)


def _model(kind: str):
    torch.manual_seed(0)
    if kind == "llama":
        config = transformers.LlamaConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, vocab_size=VOCAB)
        return transformers.LlamaForCausalLM(config).eval()
    if kind == "t5":
        config = transformers.T5Config(d_model=16, d_kv=8, d_ff=24, num_layers=1, num_heads=2, vocab_size=VOCAB,
                                       decoder_start_token_id=0, pad_token_id=1, eos_token_id=1)
        return transformers.T5ForConditionalGeneration(config).eval()
    config = transformers.BertConfig(hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                                     num_attention_heads=2, vocab_size=VOCAB, num_labels=2, pad_token_id=1)
    return transformers.BertForSequenceClassification(config).eval()


def test_perplexity_is_exp_of_mean_token_nll(tmp_path, tokenizer):
    (tmp_path / "t.txt").write_text("".join(sentence(i) + "\n" for i in range(30)))
    run = RunConfig(task="causal_lm", data=DataConfig(train=str(tmp_path / "t.txt"), max_length=6))
    data = build_task_data(run, tokenizer)
    model = _model("llama")
    metrics = evaluate(model, data, tokenizer, batch_size=2, max_new_tokens=4)
    with torch.no_grad():
        expected = model(**data.collate([data.eval[i] for i in range(len(data.eval))])).loss
    assert metrics["eval/loss"] == pytest.approx(float(expected), rel=1e-5)
    assert metrics["eval/perplexity"] == pytest.approx(math.exp(float(expected)), rel=1e-5)


def test_seq2seq_generates_and_scores(tmp_path, tokenizer):
    rows = [{"source": sentence(i), "target": sentence(i + 1)} for i in range(6)]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    data = build_task_data(RunConfig(task="seq2seq", data=DataConfig(train=path, eval=path)), tokenizer)
    metrics = evaluate(_model("t5"), data, tokenizer, batch_size=4, max_new_tokens=5)
    assert set(metrics) == {"eval/loss", "eval/rouge1", "eval/rouge2", "eval/rougeL", "eval/bleu"}
    assert all(0.0 <= metrics[k] <= 100.0 for k in metrics if k != "eval/loss") and metrics["eval/loss"] > 0


def test_classification_head_and_text_to_text(tmp_path, tokenizer):
    rows = [{"text": sentence(i), "label": ["bad", "good"][i % 2]} for i in range(9)]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    run = RunConfig(task="classification", data=DataConfig(train=path, eval=path))
    data = build_task_data(run, tokenizer)
    model = _model("bert")
    metrics = evaluate(model, data, tokenizer, batch_size=4, max_new_tokens=3)
    with torch.no_grad():
        logits = model(**data.collate([data.eval[i] for i in range(9)])).logits
    expected = classification_metrics(logits.argmax(-1).tolist(), data.eval_references, num_labels=2)
    assert {k: metrics[k] for k in expected} == pytest.approx(expected)

    t2t = build_task_data(run, tokenizer, text_to_text=True)
    metrics = evaluate(_model("t5"), t2t, tokenizer, batch_size=4, max_new_tokens=3)
    assert 0.0 <= metrics["eval/unparsed_fraction"] <= 1.0 and 0.0 <= metrics["eval/accuracy"] <= 1.0
