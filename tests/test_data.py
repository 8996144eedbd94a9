"""Data loading, task pipelines and the sharded, resumable loader.

The default tests use tiny synthetic files and a word-level tokenizer built in place; the ``real`` tests run
every pipeline on real text with real tokenizers from tools/assets.py.
"""

from __future__ import annotations

import datasets
import pytest
import torch
from synthetic_text import save_word_tokenizer, sentence, write_jsonl

from neuroprune_ds.config import DataConfig, ModelConfig, RunConfig, ScheduleConfig
from neuroprune_ds.data import (
    ShardedBatchLoader,
    build_task_data,
    eval_batches,
    load_raw_dataset,
    load_tokenizer,
    uses_text_to_text,
)


@pytest.fixture(scope="module")
def word_tokenizer_dir(tmp_path_factory):
    return save_word_tokenizer(tmp_path_factory.mktemp("tok"))


@pytest.fixture(scope="module")
def tokenizer(word_tokenizer_dir):
    return load_tokenizer(ModelConfig(name_or_path=word_tokenizer_dir))


def _run(task: str, **data) -> RunConfig:
    return RunConfig(task=task, data=DataConfig(**data), schedule=ScheduleConfig(seed=3))


def test_pad_token_falls_back_to_eos(tokenizer):
    assert tokenizer.pad_token == "[EOS]"


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet"])
def test_load_local_file_formats(tmp_path, suffix):
    rows = [{"text": sentence(i), "label": i % 2} for i in range(6)]
    path = tmp_path / f"d{suffix}"
    table = datasets.Dataset.from_list(rows)
    {".jsonl": table.to_json, ".json": table.to_json, ".csv": table.to_csv, ".parquet": table.to_parquet}[suffix](
        str(path)
    )
    loaded = load_raw_dataset(str(path))
    assert loaded["text"] == [r["text"] for r in rows] and loaded["label"] == [r["label"] for r in rows]


def test_load_text_keeps_line_breaks_and_directory(tmp_path):
    (tmp_path / "a.txt").write_text("one two\nthree\n")
    (tmp_path / "b.txt").write_text("four\n")
    assert load_raw_dataset(str(tmp_path / "a.txt"))["text"] == ["one two\n", "three\n"]
    assert load_raw_dataset(str(tmp_path))["text"] == ["one two\n", "three\n", "four\n"]


def test_load_saved_dataset_directory(tmp_path):
    datasets.DatasetDict({"validation": datasets.Dataset.from_dict({"text": ["x", "y"]})}).save_to_disk(tmp_path)
    assert load_raw_dataset(str(tmp_path), default_split="validation")["text"] == ["x", "y"]
    with pytest.raises(ValueError, match="splits"):
        load_raw_dataset(str(tmp_path), default_split="train")


def test_load_errors_name_the_problem(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="does not exist"):
        load_raw_dataset("./missing.jsonl")
    (tmp_path / "x.xlsx").write_text("")
    with pytest.raises(ValueError, match="unsupported data file type '.xlsx'"):
        load_raw_dataset(str(tmp_path / "x.xlsx"))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("a\n")
    (tmp_path / "d" / "b.csv").write_text("text\nb\n")
    with pytest.raises(ValueError, match="mixes data formats"):
        load_raw_dataset(str(tmp_path / "d"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="'some-org/some-data'.*HF_HUB_OFFLINE"):
        load_raw_dataset("some-org/some-data:train")


def test_unreachable_hub_tokenizer_names_the_field(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"cannot load the tokenizer from 'some-org/some-model' \(model.tokenizer"):
        load_tokenizer(ModelConfig(name_or_path="some-org/some-model"))


def test_causal_lm_packs_blocks_and_splits_eval(tmp_path, tokenizer):
    path = tmp_path / "t.txt"
    path.write_text("".join(sentence(i) + "\n" for i in range(40)))
    run = _run("causal_lm", train=str(path), max_length=8, eval_fraction=0.25)
    data = build_task_data(run, tokenizer)
    n_tokens = sum(len(tokenizer(sentence(i) + "\n")["input_ids"]) for i in range(40))
    assert len(data.train) + len(data.eval) == n_tokens // 8
    assert len(data.eval) == -(-(n_tokens // 8) // 4)
    row = data.train[0]
    assert len(row["input_ids"]) == 8 and row["labels"] == row["input_ids"] and row["attention_mask"] == [1] * 8
    batch = data.collate([data.train[0], data.train[1]])
    assert batch["input_ids"].shape == (2, 8) and batch["labels"].dtype == torch.long
    again = build_task_data(run, tokenizer)
    assert again.train["input_ids"] == data.train["input_ids"]

    limited = build_task_data(_run("causal_lm", train=str(path), max_length=8, max_train_examples=3,
                                   max_eval_examples=1), tokenizer)
    assert (len(limited.train), len(limited.eval)) == (3, 1)
    with pytest.raises(ValueError, match="no causal-LM block of data.max_length=100000"):
        build_task_data(_run("causal_lm", train=str(path), max_length=100_000), tokenizer)


def test_seq2seq_prefix_truncation_and_label_padding(tmp_path, tokenizer):
    rows = [{"src": sentence(i), "tgt": sentence(i + 1)} for i in range(10)]
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    evaluation = write_jsonl(tmp_path / "eval.jsonl", rows[:3])
    run = _run("seq2seq", train=train, eval=evaluation, source_column="src", target_column="tgt",
               source_prefix="very ", max_length=4, max_target_length=3)
    data = build_task_data(run, tokenizer)
    assert data.eval_references == [r["tgt"] for r in rows[:3]]
    first = data.eval[0]
    assert first["input_ids"] == tokenizer("very " + rows[0]["src"])["input_ids"][:4]
    assert first["labels"] == tokenizer(rows[0]["tgt"])["input_ids"][:3]
    batch = data.collate([data.train[i] for i in range(4)])
    short = min(range(4), key=lambda i: len(data.train[i]["labels"]))
    assert (batch["labels"][short] == -100).sum() == 3 - len(data.train[short]["labels"])

    with pytest.raises(ValueError, match="no column 'source'.*did you mean 'src'"):
        build_task_data(_run("seq2seq", train=train, eval=evaluation), tokenizer)


def test_classification_labels_int_string_and_text_to_text(tmp_path, tokenizer):
    rows = [{"text": sentence(i), "other": sentence(i + 3), "label": ["neg", "pos"][i % 2]} for i in range(20)]
    train = write_jsonl(tmp_path / "c.jsonl", rows)
    run = _run("classification", train=train, text_pair_column="other", eval_fraction=0.2)
    data = build_task_data(run, tokenizer)
    assert data.label_names == ["neg", "pos"] and len(data.eval) == 4
    assert set(data.train["labels"]) == {0, 1} and data.eval_references == data.eval["labels"]
    batch = data.collate([data.train[i] for i in range(3)])
    assert batch["labels"].tolist() == data.train["labels"][:3] and batch["input_ids"].shape[0] == 3

    t2t = build_task_data(run, tokenizer, text_to_text=True)
    word_ids = {tuple(tokenizer(text_target=w)["input_ids"]) for w in ("neg", "pos")}
    assert all(tuple(ids) in word_ids for ids in t2t.train["labels"])
    assert uses_text_to_text("classification", "t5") and not uses_text_to_text("classification", "bart")

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"text": "a", "label": 5}, {"text": "b", "label": 0}])
    with pytest.raises(ValueError, match=r"outside \[0, num_labels=2\)"):
        build_task_data(_run("classification", train=bad, eval=bad), tokenizer)
    run.num_labels = 3
    with pytest.raises(ValueError, match="num_labels=3 but label column 'label' has 2 classes"):
        build_task_data(run, tokenizer)


def test_num_proc_tokenizes_in_worker_processes_to_the_same_examples(tmp_path, tokenizer):
    rows = [{"text": sentence(i), "label": i % 2} for i in range(40)]
    run = _run("classification", train=write_jsonl(tmp_path / "c.jsonl", rows), eval_fraction=0.25)
    alone = build_task_data(run, tokenizer)
    run.data.num_proc = 2
    split = build_task_data(run, tokenizer)
    assert len(split.train.cache_files) == 2  # one cache file per worker process
    assert split.train.to_dict() == alone.train.to_dict() and split.eval.to_dict() == alone.eval.to_dict()


def test_pretokenized_saved_datasets_train_without_tokenizing(tmp_path, tokenizer):
    """A datasets.save_to_disk directory with input_ids is used as model inputs (detected or declared)."""
    texts = [sentence(i) + "\n" for i in range(40)]
    text = tmp_path / "t.txt"
    text.write_text("".join(texts))
    ids = [tokenizer(t)["input_ids"] for t in texts]
    datasets.Dataset.from_dict({"input_ids": ids, "text": texts}).save_to_disk(tmp_path / "causal")
    from_text = build_task_data(_run("causal_lm", train=str(text), max_length=8), tokenizer)
    from_ids = build_task_data(_run("causal_lm", train=str(tmp_path / "causal"), max_length=8), tokenizer)
    assert from_ids.train.to_dict() == from_text.train.to_dict() and from_ids.eval.to_dict() == from_text.eval.to_dict()

    targets = [tokenizer(sentence(i + 1))["input_ids"] for i in range(10)]
    datasets.Dataset.from_dict({"input_ids": ids[:10], "labels": targets, "note": ["x"] * 10}).save_to_disk(
        tmp_path / "s2s")
    data = build_task_data(_run("seq2seq", train=str(tmp_path / "s2s"), eval_fraction=0.3, pretokenized=True),
                           tokenizer)
    assert data.train.column_names == ["input_ids", "labels"] and len(data.eval) == 3
    assert data.eval_references == [tokenizer.decode(r, skip_special_tokens=True) for r in data.eval["labels"]]
    assert data.collate([data.train[i] for i in range(3)])["labels"].shape[0] == 3

    datasets.Dataset.from_dict({"input_ids": ids[:10], "labels": [i % 2 for i in range(10)]}).save_to_disk(
        tmp_path / "cls")
    run = _run("classification", train=str(tmp_path / "cls"), eval_fraction=0.3)
    data = build_task_data(run, tokenizer)
    assert data.label_names == ["0", "1"] and data.eval_references == data.eval["labels"]
    with pytest.raises(ValueError, match="text-to-text models"):
        build_task_data(run, tokenizer, text_to_text=True)
    with pytest.raises(ValueError, match=r"data.pretokenized: true, but data.train has no input_ids column"):
        build_task_data(_run("causal_lm", train=str(text), pretokenized=True), tokenizer)
    # Declared false, token ids are ignored and the text column is tokenized.
    assert build_task_data(_run("causal_lm", train=str(tmp_path / "causal"), max_length=8, pretokenized=False),
                           tokenizer).train.to_dict() == from_text.train.to_dict()


def test_sharded_loader_partitions_each_epoch_and_resumes(tokenizer):
    dataset = datasets.Dataset.from_dict({"input_ids": [[i] for i in range(23)]})
    collate = lambda rows: torch.tensor([r["input_ids"][0] for r in rows])  # noqa: E731
    loaders = [ShardedBatchLoader(dataset, collate, batch_size=2, rank=r, world_size=2, seed=5,
                                  batches_multiple_of=2) for r in range(2)]
    assert len(loaders[0]) == 4  # 11 per rank -> 5 batches -> rounded down to whole steps of 2
    epoch0 = [torch.cat(list(loader)).tolist() for loader in loaders]
    assert not set(epoch0[0]) & set(epoch0[1]) and len(epoch0[0]) == 8
    epoch1 = torch.cat(list(loaders[0])).tolist()
    assert epoch1 != epoch0[0] and loaders[0].state_dict()["epoch"] == 2

    fresh = ShardedBatchLoader(dataset, collate, batch_size=2, rank=0, world_size=2, seed=5, batches_multiple_of=2)
    iterator = iter(fresh)
    seen = [next(iterator).tolist() for _ in range(3)]
    state = fresh.state_dict()
    assert state["epoch"] == 0 and state["batch_index"] == 3
    resumed = ShardedBatchLoader(dataset, collate, batch_size=2, rank=0, world_size=2, seed=5, batches_multiple_of=2)
    resumed.load_state_dict(state)
    assert sum(seen, []) + torch.cat(list(resumed)).tolist() == epoch0[0]
    assert torch.cat(list(resumed)).tolist() == epoch1

    with pytest.raises(ValueError, match="world_size=2 cannot resume exactly with world_size=1"):
        ShardedBatchLoader(dataset, collate, batch_size=2, rank=0, world_size=1, seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="no complete step"):
        ShardedBatchLoader(dataset, collate, batch_size=8, rank=0, world_size=2, seed=5, batches_multiple_of=2)


def test_eval_batches_cover_each_example_once_in_lockstep():
    dataset = datasets.Dataset.from_dict({"x": list(range(7))})
    collate = lambda rows: torch.tensor([r["x"] for r in rows])  # noqa: E731
    shards = [list(eval_batches(dataset, collate, batch_size=2, rank=r, world_size=3)) for r in range(3)]
    assert {len(s) for s in shards} == {2}
    counted = sorted(i for s in shards for b in s for i, ok in zip(b.indices, b.valid) if ok)
    assert counted == list(range(7))
    assert all(b.inputs.tolist() == b.indices for s in shards for b in s)


# ---------------------------------------------------------------------------------------------- real text


@pytest.mark.real
def test_real_causal_lm_on_austen_with_gpt2_tokenizer(tmp_path):
    import assets

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(assets.gpt2_tokenizer_dir())))
    novel = assets.austen_text().read_text(encoding="utf-8")[:20_000]
    (tmp_path / "austen.txt").write_text(novel)
    data = build_task_data(_run("causal_lm", train=str(tmp_path / "austen.txt"), max_length=64), tokenizer)
    assert len(data.train) > 50 and len(data.eval) >= 3
    assert tokenizer.decode(data.train[0]["input_ids"]) in novel  # packing keeps the text and its line breaks


@pytest.mark.real
def test_real_seq2seq_headlines_with_t5_sentencepiece():
    import assets

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(assets.t5_tokenizer_dir())))
    run = _run("seq2seq", train=str(assets.headlines_jsonl()), source_prefix="summarize: ", max_length=128,
               max_target_length=24, eval_fraction=0.2)
    data = build_task_data(run, tokenizer)
    assert len(data.eval) == len(data.eval_references) == 14
    row = data.train[0]
    assert 0 < len(row["labels"]) <= 24 and len(row["input_ids"]) <= 128
    assert row["labels"][-1] == tokenizer.eos_token_id and row["input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(data.eval[0]["input_ids"], skip_special_tokens=True).startswith("summarize:")


@pytest.mark.real
def test_real_translation_with_bart_tokenizer():
    import assets

    tokenizer = load_tokenizer(ModelConfig(name_or_path=str(assets.gpt2_tokenizer_dir())))
    run = _run("seq2seq", train=str(assets.translation_jsonl()), max_length=64, max_target_length=64,
               max_train_examples=100, max_eval_examples=20)
    data = build_task_data(run, tokenizer)
    assert (len(data.train), len(data.eval)) == (100, 20)
    decoded = tokenizer.decode(data.eval[0]["labels"], skip_special_tokens=True)
    assert decoded and data.eval_references[0].startswith(decoded.strip())  # truncated at 64 tokens at most
    batch = data.collate([data.train[i] for i in range(8)])
    assert (batch["labels"] == -100).any() and (batch["attention_mask"] == 0).any()


@pytest.mark.real
def test_real_classification_rotten_tomatoes_head_and_text_to_text():
    import assets

    run = _run("classification", train=str(assets.rotten_tomatoes_jsonl()), max_length=64,
               max_train_examples=200, max_eval_examples=50)
    gpt2 = load_tokenizer(ModelConfig(name_or_path=str(assets.gpt2_tokenizer_dir())))
    data = build_task_data(run, gpt2)
    assert (len(data.train), len(data.eval)) == (200, 50) and set(data.train["labels"]) == {0, 1}
    assert data.label_names == ["0", "1"]
    batch = data.collate([data.train[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 and (batch["attention_mask"] == 0).any()

    t5 = load_tokenizer(ModelConfig(name_or_path=str(assets.t5_tokenizer_dir())))
    t2t = build_task_data(run, t5, text_to_text=True)
    assert t5.decode(t2t.train[0]["labels"], skip_special_tokens=True) == t2t.label_names[data.train[0]["labels"]]
