"""Datasets, task pipelines and the rank-sharded, resumable batch loader.

Raw examples come through `datasets` (local files, directories, or hub names). Each task turns them into
model inputs:

- ``causal_lm``: tokenize the text column, concatenate and cut into blocks of ``max_length`` tokens;
  ``labels`` equal ``input_ids`` (the model shifts them). Blocks are the examples that ``eval_fraction``
  and ``max_*_examples`` count, so held-out text is contiguous and never split mid-block.
- ``seq2seq``: ``source_prefix + source`` → ``target``; labels are padded with -100 by the collator.
- ``classification``: ``text`` [+ ``text_pair``] → class id; for text-to-text models (T5) the target is
  the label's name as text and evaluation generates it.

The order of training examples is a pure function of (seed, epoch, rank, world size): every rank computes
the same permutation and takes its own interleaved share, as ``torch.utils.data.DistributedSampler`` does.
"""

from __future__ import annotations

import difflib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import pyarrow.compute
import torch
from transformers import (
    AutoTokenizer,
    DataCollatorForSeq2Seq,
    DataCollatorWithPadding,
    PreTrainedTokenizerBase,
    default_data_collator,
)

from neuroprune_ds.config import DataConfig, ModelConfig, RunConfig

TASKS = ("causal_lm", "seq2seq", "classification")

# HF model types whose classification is trained text-to-text (label name as the target) instead of with a
# sequence-classification head.
TEXT_TO_TEXT_MODEL_TYPES = frozenset({"t5", "mt5", "umt5", "longt5"})

_BUILDER_BY_SUFFIX = {
    ".json": "json",
    ".jsonl": "json",
    ".csv": "csv",
    ".parquet": "parquet",
    ".txt": "text",
    ".text": "text",
}


@dataclass(kw_only=True, slots=True)
class TaskData:
    """Tokenized train/eval sets of one task, with what evaluation needs beyond the batches."""

    task: str
    train: datasets.Dataset
    eval: datasets.Dataset
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]
    text_to_text: bool = False
    """Classification trained text-to-text: evaluation generates label names."""
    label_names: list[str] | None = None
    """Classification: class id → name (the generated target of text-to-text models)."""
    eval_references: list[Any] | None = None
    """Per eval example: the target text (seq2seq) or the class id (classification)."""


def uses_text_to_text(task: str, model_type: str) -> bool:
    """Whether a classification run trains this model type text-to-text rather than with a class head."""
    return task == "classification" and model_type in TEXT_TO_TEXT_MODEL_TYPES


# ----------------------------------------------------------------------------------------------- loading


def load_raw_dataset(spec: str, dataset_config: str | None = None, *, default_split: str = "train"):
    """Load one split of raw examples.

    Args:
        spec: a local file (.json/.jsonl/.csv/.parquet/.txt), a directory of such files (one format) or
            saved with ``Dataset.save_to_disk``, or a hub dataset name, optionally ``name:split``.
        dataset_config: configuration name of a hub dataset (e.g. ``sst2`` of ``glue``).
        default_split: split used when ``spec`` does not name one.

    Returns:
        A ``datasets.Dataset``.

    Raises:
        ValueError: unknown file type, missing local path, empty directory, mixed formats, missing split.
        ConnectionError: a hub dataset that cannot be reached (message names the dataset).
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return _load_files(_builder_for(path), [path])
    if path.is_dir():
        return _load_directory(path, default_split)
    if looks_like_local_path(spec):
        raise ValueError(f"data file or directory {spec!r} does not exist")
    name, _, split = spec.partition(":")
    try:
        return datasets.load_dataset(name, dataset_config, split=split or default_split)
    except ConnectionError as err:
        offline = " (HF_HUB_OFFLINE is set)" if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") else ""
        raise ConnectionError(
            f"cannot reach the Hugging Face hub for dataset {name!r}{offline}; give a local file or directory "
            f"instead, or pre-download it into the datasets cache ({err})"
        ) from err


def looks_like_local_path(spec: str) -> bool:
    """Whether ``spec`` is spelled like a local path (./x, /x, ~/x, or a data-file suffix), not a hub name."""
    return spec.startswith((".", "/", "~")) or Path(spec).suffix.lower() in _BUILDER_BY_SUFFIX


def _builder_for(path: Path) -> str:
    builder = _BUILDER_BY_SUFFIX.get(path.suffix.lower())
    if builder is None:
        raise ValueError(
            f"{str(path)!r}: unsupported data file type {path.suffix!r}; use one of "
            f"{sorted(_BUILDER_BY_SUFFIX)}"
        )
    return builder


def _load_files(builder: str, files: list[Path]):
    for file in files:
        if file.stat().st_size == 0:
            raise ValueError(f"data file {str(file)!r} is empty")
    # Plain text keeps its line breaks so packed causal-LM blocks read like the source.
    extra = {"keep_linebreaks": True} if builder == "text" else {}
    try:
        return datasets.load_dataset(builder, data_files=[str(f) for f in files], split="train", **extra)
    except (datasets.exceptions.DatasetGenerationError, StopIteration) as err:
        cause = err.__cause__ or err
        for file in files:
            problem = _file_problem(file, builder)
            if problem:
                raise ValueError(f"data file {str(file)!r}: {problem}") from err
        raise ValueError(f"cannot load data files {[str(f) for f in files]}: {type(cause).__name__}: "
                         + " ".join(str(cause).split())) from err


def _file_problem(file: Path, builder: str) -> str | None:
    """Why ``datasets`` could not read ``file``: not UTF-8, or (JSON lines) the first line that is not JSON."""
    if builder not in ("text", "json", "csv"):
        return None
    line_number = 0
    with open(file, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                return f"line {line_number} is not UTF-8 text (byte {line[err.start]:#04x}); re-encode the file"
            if builder == "json" and text.strip() and not text.lstrip().startswith("["):
                try:
                    json.loads(text.rstrip("\r\n"))
                except json.JSONDecodeError as err:
                    return f"line {line_number} is not a JSON object ({err.msg}, column {err.colno})"
    if builder == "json" and line_number and file.read_bytes().lstrip().startswith(b"["):
        try:
            json.loads(file.read_text())
        except json.JSONDecodeError as err:
            return f"not valid JSON ({err.msg}, line {err.lineno} column {err.colno})"
    return None


def _load_directory(path: Path, split: str):
    if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split not in loaded:
                raise ValueError(f"{str(path)!r} has splits {sorted(loaded)}, not {split!r}")
            return loaded[split]
        return loaded
    files = sorted(f for f in path.rglob("*") if f.is_file() and f.suffix.lower() in _BUILDER_BY_SUFFIX)
    if not files:
        raise ValueError(f"directory {str(path)!r} has no data files ({sorted(_BUILDER_BY_SUFFIX)})")
    builders = {_builder_for(f) for f in files}
    if len(builders) > 1:
        raise ValueError(f"directory {str(path)!r} mixes data formats {sorted(builders)}; keep one format")
    return _load_files(builders.pop(), files)


def load_tokenizer(model: ModelConfig) -> PreTrainedTokenizerBase:
    """The run's tokenizer, with a pad token (decoder-only tokenizers often lack one: EOS, else UNK, is used)."""
    source = model.tokenizer or model.name_or_path
    kwargs: dict[str, Any] = {"trust_remote_code": model.trust_remote_code}
    if model.gguf_file and model.tokenizer is None:
        kwargs["gguf_file"] = model.gguf_file
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as err:
        message = (f"cannot load the tokenizer from {source!r} (model.tokenizer / model.name_or_path): "
                   + " ".join(str(err).split()))
        raise (OSError if isinstance(err, OSError) else ValueError)(message) from err
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"tokenizer {source!r} has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    return tokenizer


# --------------------------------------------------------------------------------------------- pipelines


def build_task_data(run: RunConfig, tokenizer: PreTrainedTokenizerBase, *, text_to_text: bool = False) -> TaskData:
    """Load, split, limit and tokenize the run's data for its task.

    Args:
        run: the run configuration (task, data, seed).
        tokenizer: from :func:`load_tokenizer`.
        text_to_text: classification with label names as generated targets (see :func:`uses_text_to_text`).

    Raises:
        ValueError: unknown task, missing columns, labels inconsistent with ``num_labels``, too little data.
    """
    if run.task not in TASKS:
        raise ValueError(f"task {run.task!r} is not one of {TASKS}")
    data, seed = run.data, run.schedule.seed
    train_raw = load_raw_dataset(data.train, data.dataset_config, default_split="train")
    eval_raw = None
    if data.eval:
        eval_raw = load_raw_dataset(data.eval, data.dataset_config, default_split="validation")

    pretokenized = is_pretokenized(train_raw, data)
    if run.task == "causal_lm":
        column = "input_ids" if pretokenized else data.text_column
        _require_columns(train_raw, [column], "data.train")
        if eval_raw is not None:
            _require_columns(eval_raw, [column], "data.eval")
        packed_eval = _pack_causal(eval_raw, tokenizer, data, pretokenized) if eval_raw is not None else None
        train, eval_ = split_and_limit(_pack_causal(train_raw, tokenizer, data, pretokenized), packed_eval, data, seed)
        return TaskData(task=run.task, train=train, eval=eval_, collate=default_data_collator)

    train_raw, eval_raw = split_and_limit(train_raw, eval_raw, data, seed)
    if pretokenized:
        return _pretokenized_task_data(run, train_raw, eval_raw, tokenizer, text_to_text)
    if run.task == "seq2seq":
        for name, raw in (("data.train", train_raw), ("data.eval", eval_raw)):
            _require_columns(raw, [data.source_column, data.target_column], name)
        return TaskData(
            task=run.task,
            train=_tokenize_seq2seq(train_raw, tokenizer, data),
            eval=_tokenize_seq2seq(eval_raw, tokenizer, data),
            collate=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100),
            eval_references=list(eval_raw[data.target_column]),
        )

    columns = [data.text_column, data.label_column] + ([data.text_pair_column] if data.text_pair_column else [])
    for name, raw in (("data.train", train_raw), ("data.eval", eval_raw)):
        _require_columns(raw, columns, name)
    label_names, to_id = _label_mapping(train_raw, eval_raw, data.label_column, run.num_labels)
    tokenize = _tokenize_text_to_text if text_to_text else _tokenize_classification
    collate = (
        DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100)
        if text_to_text
        else DataCollatorWithPadding(tokenizer)
    )
    return TaskData(
        task=run.task,
        train=tokenize(train_raw, tokenizer, data, to_id, label_names),
        eval=tokenize(eval_raw, tokenizer, data, to_id, label_names),
        collate=collate,
        text_to_text=text_to_text,
        label_names=label_names,
        eval_references=[to_id(v) for v in eval_raw[data.label_column]],
    )


def is_pretokenized(raw, data: DataConfig) -> bool:
    """Whether the training data already holds model inputs: ``data.pretokenized``, or detected from an
    ``input_ids`` column when that is None.

    Raises:
        ValueError: ``data.pretokenized`` is true and there is no ``input_ids`` column.
    """
    has_ids = "input_ids" in raw.column_names
    if data.pretokenized and not has_ids:
        raise ValueError(f"data.pretokenized: true, but data.train has no input_ids column (columns: "
                         f"{raw.column_names}); give token ids, or set it to false to tokenize text")
    return has_ids if data.pretokenized is None else data.pretokenized


_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids", "labels")


def _pretokenized_task_data(run: RunConfig, train_raw, eval_raw, tokenizer, text_to_text: bool) -> TaskData:
    """seq2seq / classification from token ids: input_ids and labels (class ids, or target token ids)."""
    if text_to_text:
        raise ValueError("data.pretokenized: classification of text-to-text models (T5) generates label names, "
                         "which token ids do not give; use text data or a model with a classification head")
    for name, raw in (("data.train", train_raw), ("data.eval", eval_raw)):
        _require_columns(raw, ["input_ids", "labels"], name)
    train, eval_ = (raw.select_columns([c for c in _MODEL_INPUTS if c in raw.column_names])
                    for raw in (train_raw, eval_raw))
    if run.task == "seq2seq":
        references = [tokenizer.decode([t for t in ids if t >= 0], skip_special_tokens=True)
                      for ids in eval_["labels"]]
        return TaskData(task=run.task, train=train, eval=eval_, eval_references=references,
                        collate=DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=-100))
    label_names, to_id = _label_mapping(train_raw, eval_raw, "labels", run.num_labels)
    return TaskData(task=run.task, train=train, eval=eval_, collate=DataCollatorWithPadding(tokenizer),
                    label_names=label_names, eval_references=[to_id(v) for v in eval_["labels"]])


def split_and_limit(train, eval_, data: DataConfig, seed: int):
    """Hold out ``eval_fraction`` when there is no eval set, then apply ``max_train/eval_examples``.

    The held-out split and the training subset are drawn with ``seed``; the eval subset is its head.
    """
    if eval_ is None:
        if not 0.0 < data.eval_fraction < 1.0:
            raise ValueError(f"data.eval_fraction={data.eval_fraction} must be in (0, 1) when data.eval is unset")
        if len(train) < 2:
            raise ValueError(f"data.train has {len(train)} example(s); too few to hold out an eval split")
        parts = train.train_test_split(test_size=data.eval_fraction, seed=seed)
        train, eval_ = parts["train"], parts["test"]
    if data.max_train_examples is not None and data.max_train_examples < len(train):
        train = train.shuffle(seed=seed).select(range(data.max_train_examples))
    if data.max_eval_examples is not None and data.max_eval_examples < len(eval_):
        eval_ = eval_.select(range(data.max_eval_examples))
    return train, eval_


def _require_columns(raw, columns: list[str], field_name: str) -> None:
    for column in columns:
        if column not in raw.column_names:
            close = difflib.get_close_matches(column, raw.column_names, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"{field_name} has no column {column!r} (columns: {raw.column_names}){hint} "
                f"Set the data.*_column fields to the dataset's column names."
            )
        values = raw.data.column(column)
        if values.null_count:
            row = pyarrow.compute.index(pyarrow.compute.is_null(values), True).as_py()
            raise ValueError(f"{field_name}: column {column!r} has {values.null_count} empty (null) value(s), the "
                             f"first in row {row + 1}; fill or drop those rows")


def _pack_causal(raw, tokenizer: PreTrainedTokenizerBase, data: DataConfig, pretokenized: bool = False):
    block = data.max_length

    def tokenize(batch):
        return {"input_ids": tokenizer(batch[data.text_column], add_special_tokens=True)["input_ids"]}

    def pack(batch):
        # Concatenate one map batch of documents and cut it into whole blocks; the tail is dropped.
        flat = [token for ids in batch["input_ids"] for token in ids]
        blocks = [flat[i : i + block] for i in range(0, len(flat) - block + 1, block)]
        return {"input_ids": blocks, "attention_mask": [[1] * block for _ in blocks], "labels": blocks}

    if pretokenized:
        ids = raw.select_columns(["input_ids"])
    else:
        ids = raw.map(tokenize, batched=True, remove_columns=raw.column_names, num_proc=data.num_proc,
                      desc="tokenize")
    packed = ids.map(pack, batched=True, batch_size=1000, remove_columns=ids.column_names, num_proc=data.num_proc,
                     desc=f"pack into blocks of {block}")
    if len(packed) == 0:
        raise ValueError(
            f"data gives no causal-LM block of data.max_length={block} tokens; lower max_length or add text"
        )
    return packed


def _tokenize_seq2seq(raw, tokenizer: PreTrainedTokenizerBase, data: DataConfig):
    def tokenize(batch):
        sources = [data.source_prefix + text for text in batch[data.source_column]]
        features = tokenizer(sources, max_length=data.max_length, truncation=True)
        targets = tokenizer(text_target=batch[data.target_column], max_length=data.max_target_length, truncation=True)
        features["labels"] = targets["input_ids"]
        return features

    return raw.map(tokenize, batched=True, remove_columns=raw.column_names, num_proc=data.num_proc,
                   desc="tokenize seq2seq")


def _encode_texts(batch, tokenizer, data: DataConfig, prefix: str = ""):
    texts = [prefix + text for text in batch[data.text_column]]
    pairs = batch[data.text_pair_column] if data.text_pair_column else None
    return tokenizer(texts, pairs, max_length=data.max_length, truncation=True)


def _tokenize_classification(raw, tokenizer, data: DataConfig, to_id, label_names):
    def tokenize(batch):
        features = _encode_texts(batch, tokenizer, data)
        features["labels"] = [to_id(v) for v in batch[data.label_column]]
        return features

    return raw.map(tokenize, batched=True, remove_columns=raw.column_names, num_proc=data.num_proc,
                   desc="tokenize classification")


def _tokenize_text_to_text(raw, tokenizer, data: DataConfig, to_id, label_names):
    def tokenize(batch):
        features = _encode_texts(batch, tokenizer, data, prefix=data.source_prefix)
        words = [label_names[to_id(v)] for v in batch[data.label_column]]
        features["labels"] = tokenizer(text_target=words, max_length=data.max_target_length, truncation=True)[
            "input_ids"
        ]
        return features

    return raw.map(tokenize, batched=True, remove_columns=raw.column_names, num_proc=data.num_proc,
                   desc="tokenize text-to-text")


def _label_mapping(train_raw, eval_raw, column: str, num_labels: int):
    """Class names and a raw-label → class-id function, from a ClassLabel, string or integer label column."""
    feature = train_raw.features[column]
    if isinstance(feature, datasets.ClassLabel):
        names = list(feature.names)
    elif getattr(feature, "dtype", None) in ("string", "large_string"):
        names = sorted(set(train_raw[column]) | set(eval_raw[column]))
    elif getattr(feature, "dtype", "").startswith(("int", "uint", "bool")):
        names = [str(i) for i in range(num_labels)]
        seen = set(train_raw[column]) | set(eval_raw[column])
        bad = sorted(v for v in seen if not 0 <= int(v) < num_labels)
        if bad:
            raise ValueError(f"label column {column!r} has values {bad[:5]} outside [0, num_labels={num_labels})")
    else:
        raise ValueError(f"label column {column!r} has type {feature}; use integer, string or ClassLabel labels")
    if len(names) != num_labels:
        raise ValueError(f"num_labels={num_labels} but label column {column!r} has {len(names)} classes: {names[:10]}")
    index = {name: i for i, name in enumerate(names)}

    def to_id(value) -> int:
        return index[value] if isinstance(value, str) else int(value)

    return names, to_id


# ----------------------------------------------------------------------------------------------- batches


class ShardedBatchLoader:
    """Training batches of one rank: deterministic per (seed, epoch), resumable at any batch.

    Every epoch draws a permutation of the dataset from ``seed + epoch``, drops the tail that does not divide
    evenly among ranks, and gives rank r the indices r, r + world_size, ... (DistributedSampler's split).
    Only whole batches are used, and the count per epoch is rounded down to a multiple of
    ``batches_multiple_of`` (the gradient-accumulation steps) so epochs end on an optimizer step.

    Iterating yields the remaining batches of the current epoch and then moves to the next one; the
    position (``epoch``, ``batch_index`` = batches already handed out) is in :meth:`state_dict`.
    """

    def __init__(
        self,
        dataset,
        collate: Callable,
        *,
        batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        batches_multiple_of: int = 1,
    ):
        self.dataset = dataset
        self.collate = collate
        self.batch_size = batch_size
        self.rank = rank
        self.world_size = world_size
        self.seed = seed
        self.shuffle = shuffle
        self.epoch = 0
        self.batch_index = 0
        per_rank = len(dataset) // world_size
        self.batches_per_epoch = (per_rank // batch_size) // batches_multiple_of * batches_multiple_of
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(dataset)} training examples over {world_size} rank(s) give no complete step of "
                f"micro_batch_size={batch_size} × gradient_accumulation_steps={batches_multiple_of}; "
                f"add data or lower those"
            )

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """This rank's example indices for each batch of ``epoch``."""
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        mine = order[: n - n % self.world_size][self.rank :: self.world_size]
        return [mine[b * self.batch_size : (b + 1) * self.batch_size] for b in range(self.batches_per_epoch)]

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        batches = self.epoch_batches(self.epoch)
        while self.batch_index < self.batches_per_epoch:
            indices = batches[self.batch_index]
            self.batch_index += 1
            yield self.collate([self.dataset[i] for i in indices])
        self.epoch += 1
        self.batch_index = 0

    def state_dict(self) -> dict[str, int]:
        """The data position: the next batch handed out is batch ``batch_index`` of epoch ``epoch``."""
        if self.batch_index >= self.batches_per_epoch:
            return {"epoch": self.epoch + 1, "batch_index": 0, "seed": self.seed, "world_size": self.world_size}
        return {"epoch": self.epoch, "batch_index": self.batch_index, "seed": self.seed, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a saved position. A different seed or world size gives a different order."""
        for key in ("seed", "world_size"):
            if state[key] != getattr(self, key):
                raise ValueError(
                    f"data position saved with {key}={state[key]} cannot resume exactly with {key}={getattr(self, key)}"
                )
        if not 0 <= state["batch_index"] < self.batches_per_epoch:
            raise ValueError(f"saved batch_index={state['batch_index']} outside [0, {self.batches_per_epoch})")
        self.epoch, self.batch_index = state["epoch"], state["batch_index"]


@dataclass(kw_only=True, slots=True)
class EvalBatch:
    """One evaluation batch of a rank: the inputs, the dataset indices, and which rows are real."""

    inputs: dict[str, torch.Tensor]
    indices: list[int]
    valid: list[bool]
    """False for padding rows that only keep ranks in step (ZeRO-3 needs every rank in every forward)."""


def eval_batches(dataset, collate: Callable, *, batch_size: int, rank: int, world_size: int) -> Iterator[EvalBatch]:
    """Rank ``rank``'s share of an eval set, in order, as the same number of batches on every rank.

    Examples are dealt round-robin (rank r gets r, r + world_size, ...); short shards are padded with
    example 0 marked invalid, so every example is counted exactly once across ranks.
    """
    n = len(dataset)
    if n == 0:
        raise ValueError("the evaluation set is empty")
    per_rank = -(-n // world_size)
    mine = list(range(rank, n, world_size))
    valid = [True] * len(mine) + [False] * (per_rank - len(mine))
    mine += [0] * (per_rank - len(mine))
    for start in range(0, per_rank, batch_size):
        indices = mine[start : start + batch_size]
        yield EvalBatch(
            inputs=collate([dataset[i] for i in indices]), indices=indices, valid=valid[start : start + batch_size]
        )
