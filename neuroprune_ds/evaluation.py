"""Evaluation of a (DeepSpeed-wrapped) model on a task's eval set, sharded across ranks.

Every rank runs the same number of forward/generate calls on its share (ZeRO-3 gathers parameters
collectively inside each forward), then the per-example results are combined across ranks and scored with the
reference libraries: perplexity from the summed token negative log-likelihood; accuracy / F1 / Matthews from
scikit-learn; ROUGE from ``rouge-score``; BLEU from ``sacrebleu``. All ranks return the same metrics.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from neuroprune_ds import collectives
from neuroprune_ds.data import TaskData, eval_batches

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def evaluate(
    model: torch.nn.Module,
    data: TaskData,
    tokenizer,
    *,
    batch_size: int,
    max_new_tokens: int,
    rank: int = 0,
    world_size: int = 1,
    synced_generation: bool = False,
    should_stop: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Score ``model`` on ``data.eval``; every rank must call this (it is collective when world_size > 1).

    Args:
        model: the DeepSpeed engine (or a plain HF model); called as ``model(**batch)``; generation uses
            ``model.module.generate`` when it has a ``module``.
        data: the task data (from :func:`neuroprune_ds.data.build_task_data`).
        tokenizer: decodes generated ids.
        batch_size: examples per rank per forward.
        max_new_tokens: generation length limit (seq2seq and text-to-text classification).
        rank, world_size: this rank's share of the eval set.
        synced_generation: keep ranks generating in lock-step (required under ZeRO-3 with several ranks).
        should_stop: called before every batch (on every rank); it may raise to abandon the evaluation,
            e.g. the trainer's collective preemption check.

    Returns:
        ``eval/loss`` always; ``eval/perplexity`` (causal_lm); ``eval/accuracy``, ``eval/f1``,
        ``eval/matthews`` (classification); ``eval/rouge1|rouge2|rougeL``, ``eval/bleu`` (seq2seq).
    """
    was_training = model.training
    model.eval()
    generate = _generator(model, tokenizer, max_new_tokens, synced_generation)
    try:
        results = _collect(model, data, generate, batch_size, rank, world_size, should_stop)
    finally:
        if was_training:
            model.train()
    sums = [results.pop("nll"), results.pop("tokens")]
    nll, count = collectives.sum_floats(sums, _device(model)) if world_size > 1 else sums
    metrics = {"eval/loss": nll / max(count, 1.0)}
    if data.task == "causal_lm":
        metrics["eval/perplexity"] = math.exp(min(metrics["eval/loss"], 700.0))
        return metrics
    rows = results["rows"]
    if world_size > 1:
        rows = [row for part in collectives.all_gather_object(rows) for row in part]
    order = sorted(rows, key=lambda row: row[0])
    if data.task == "seq2seq":
        metrics |= text_generation_metrics([pred for _, pred in order], [data.eval_references[i] for i, _ in order])
        return metrics
    if data.text_to_text:
        index = {name: i for i, name in enumerate(data.label_names)}
        predictions = [index.get(text.strip(), -1) for _, text in order]
        metrics["eval/unparsed_fraction"] = sum(p == -1 for p in predictions) / len(predictions)
    else:
        predictions = [pred for _, pred in order]
    references = [data.eval_references[i] for i, _ in order]
    metrics |= classification_metrics(predictions, references, num_labels=len(data.label_names))
    return metrics


def classification_metrics(predictions: list[int], references: list[int], *, num_labels: int) -> dict[str, float]:
    """Accuracy, F1 and Matthews correlation (scikit-learn).

    F1 is of class 1 for two classes (the GLUE convention), else macro-averaged. A prediction of -1 (a
    generated text that names no class) counts as wrong.
    """
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef  # 2-3 s to import: only when used

    labels = [1] if num_labels == 2 else list(range(num_labels))
    return {
        "eval/accuracy": float(accuracy_score(references, predictions)),
        "eval/f1": float(f1_score(references, predictions, labels=labels, average="macro", zero_division=0.0)),
        "eval/matthews": float(matthews_corrcoef(references, predictions)),
    }


def text_generation_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F-measures (``rouge-score``, stemmed) and corpus BLEU (``sacrebleu``), both on a 0-100 scale."""
    import sacrebleu
    from rouge_score import rouge_scorer  # imports nltk (about 3 s): only when used

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    scores = [scorer.score(ref, pred) for pred, ref in zip(predictions, references, strict=True)]
    metrics = {f"eval/{kind}": 100.0 * sum(s[kind].fmeasure for s in scores) / len(scores) for kind in ROUGE_TYPES}
    metrics["eval/bleu"] = float(sacrebleu.corpus_bleu(predictions, [references]).score)
    return metrics


# -------------------------------------------------------------------------------------------------- passes


def _collect(model, data: TaskData, generate, batch_size: int, rank: int, world_size: int,
             should_stop: Callable[[], None] | None = None) -> dict[str, Any]:
    """This rank's summed NLL and token count, and (index, prediction) rows for generation/classification."""
    device = _device(model)
    nll = tokens = 0.0
    rows: list[tuple[int, Any]] = []
    with torch.no_grad():
        for batch in eval_batches(data.eval, data.collate, batch_size=batch_size, rank=rank, world_size=world_size):
            if should_stop is not None:
                should_stop()
            inputs = {key: value.to(device) for key, value in batch.inputs.items()}
            output = model(**inputs)
            valid = torch.tensor(batch.valid, device=device)
            if data.task == "classification" and not data.text_to_text:
                predictions = output.logits.argmax(dim=-1).tolist()
                rows += [(i, p) for i, p, ok in zip(batch.indices, predictions, batch.valid) if ok]
                row_nll = F.cross_entropy(output.logits.float(), inputs["labels"], reduction="none")
                row_tokens = torch.ones_like(row_nll)
            else:
                row_nll, row_tokens = token_nll(output.logits, inputs["labels"], shift=data.task == "causal_lm")
                if data.task != "causal_lm":
                    texts = generate(inputs)
                    rows += [(i, t) for i, t, ok in zip(batch.indices, texts, batch.valid) if ok]
            nll += float((row_nll * valid).sum())
            tokens += float((row_tokens * valid).sum())
    return {"nll": nll, "tokens": tokens, "rows": rows}


def token_nll(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row summed negative log-likelihood and count of scored tokens (labels of -100 are skipped).

    Args:
        logits: [batch, seq, vocab].
        labels: [batch, seq].
        shift: causal LM (token t predicts label t + 1) rather than encoder-decoder (aligned).

    Returns:
        (nll [batch], tokens [batch]), both float.
    """
    if shift:
        logits, labels = logits[:, :-1], labels[:, 1:]
    per_token = F.cross_entropy(logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return per_token.sum(dim=1), (labels != -100).sum(dim=1).float()


def _generator(model, tokenizer, max_new_tokens: int, synced: bool) -> Callable[[dict], list[str]]:
    module = getattr(model, "module", model)

    def generate(inputs: dict[str, torch.Tensor]) -> list[str]:
        output = module.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            num_beams=1,
            synced_gpus=synced,
        )
        return tokenizer.batch_decode(output, skip_special_tokens=True)

    return generate


def _device(model) -> torch.device:
    return getattr(model, "device", None) or next(model.parameters()).device
