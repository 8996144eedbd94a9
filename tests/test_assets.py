"""The real assets: each one is fetched for real (cached under $NEUROPRUNE_CACHE) and checked by content.

Debian-only assets (austen, headlines, translation) are skipped where apt-get/dpkg-deb are missing, and
austen/translation where their optional readers (rdata, pysword) are not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import assets

pytestmark = pytest.mark.real

needs_apt = pytest.mark.skipif(
    shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None,
    reason="Debian-only asset: needs apt-get and dpkg-deb",
)


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_smollm2_reloads_as_plain_checkpoint_and_knows_paris():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = assets.smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (9, 3, 1536)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.dtype == torch.float32
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    assert torch.isfinite(logits).all()
    assert tokenizer.decode(logits[0, -1].argmax()) == " Paris"


def test_minilm_embeds_paraphrases_closer_and_loads_for_classification():
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    path = assets.minilm_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    encoder = AutoModel.from_pretrained(path)
    batch = tokenizer(["A man is eating food.", "A man is eating a meal.", "The stock market fell sharply."],
                      padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state  # (3, seq, 384)
    mask = batch.attention_mask.unsqueeze(-1)
    emb = torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)
    assert emb[0] @ emb[1] > 0.8 > emb[0] @ emb[2] + 0.5
    classifier = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    with torch.no_grad():
        assert classifier(**batch).logits.shape == (3, 2)


def test_t5_tokenizer_matches_sentencepiece_on_botchan():
    import sentencepiece
    from transformers import AutoTokenizer

    path = assets.t5_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert type(tokenizer).__name__ == "T5Tokenizer"
    ids = (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert ids == (0, 1, 2) and len(tokenizer) == 1100
    reference = sentencepiece.SentencePieceProcessor(model_file=str(path / "spiece.model"))
    lines = [line for line in assets.botchan_text().read_text(encoding="utf-8").splitlines() if line.strip()]
    for line in lines[:300]:
        assert tokenizer(line, add_special_tokens=False).input_ids == reference.encode(line), line
    text = "I saw a girl with a telescope."
    ids = tokenizer(text).input_ids
    assert ids[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert tokenizer.convert_ids_to_tokens(tokenizer("3", add_special_tokens=False).input_ids)[-1] == "<unk>"


def test_gpt2_tokenizer_gives_gpt2_ids_and_loads_as_bart():
    from transformers import AutoTokenizer, BartTokenizer

    path = assets.gpt2_tokenizer_dir()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer("Hello world").input_ids == [15496, 995]
    assert tokenizer(" Hello world").input_ids == [18435, 995]
    assert tokenizer(" the<|endoftext|>").input_ids == [262, 50256]
    specials = (tokenizer.bos_token_id, tokenizer.pad_token_id, tokenizer.eos_token_id,
                tokenizer.unk_token_id, tokenizer.mask_token_id)
    assert specials == (50257, 50258, 50259, 50260, 50261) and len(tokenizer) == 50262
    text = "Naïve café — “quotes”,\ttabs and emoji 😀"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    bart = BartTokenizer.from_pretrained(path)
    assert bart("Hello world").input_ids == [50257, 15496, 995, 50259]


@needs_apt
def test_austen_text_holds_six_novels_in_publication_order():
    pytest.importorskip("rdata", reason="austen_text needs the optional package rdata")
    text = assets.austen_text().read_text(encoding="utf-8")
    titles = ["SENSE AND SENSIBILITY", "PRIDE AND PREJUDICE", "MANSFIELD PARK", "EMMA", "NORTHANGER ABBEY",
              "Persuasion"]
    starts = [text.index(title) for title in titles]
    assert starts == sorted(starts) and starts[0] == 0
    assert "It is a truth universally acknowledged, that a single man in possession" in text
    assert len(text) == 4_025_033


def test_botchan_text_is_clean_utf8():
    text = assets.botchan_text().read_text(encoding="utf-8")
    assert text.startswith("Project Gutenberg's Botchan (Master Darling), by Kin-nosuke Natsume\n")
    assert "\r" not in text and len(text.splitlines()) == 4288


def test_rotten_tomatoes_has_10072_balanced_records():
    records = _records(assets.rotten_tomatoes_jsonl())
    assert len(records) == 10_072
    assert sum(r["label"] for r in records) == 4996
    assert all(set(r) == {"text", "label"} and r["text"] and r["label"] in (0, 1) for r in records)
    assert records[2] == {"text": "Effective but too tepid biopic", "label": 0}


def test_rotten_tomatoes_split_is_fixed_disjoint_and_balanced():
    train, test = assets.rotten_tomatoes_split()
    assert assets.rotten_tomatoes_split() == (train, test)
    train_lines, test_lines = train.read_text().splitlines(), test.read_text().splitlines()
    everything = assets.rotten_tomatoes_jsonl().read_text().splitlines()
    assert (len(train_lines), len(test_lines)) == (9072, 1000)
    assert sorted(train_lines + test_lines) == sorted(everything)
    assert 0.45 < sum(json.loads(line)["label"] for line in test_lines) / 1000 < 0.55
    _, other_test = assets.rotten_tomatoes_split(n_test=1000, seed=1)
    assert other_test.read_text() != test.read_text()
    with pytest.raises(ValueError, match="n_test=0 must be between 1 and 10071"):
        assets.rotten_tomatoes_split(n_test=0)


@needs_apt
def test_headlines_are_70_reuters_articles_with_titles():
    records = _records(assets.headlines_jsonl())
    assert len(records) == 70
    assert records[0]["target"] == "DIAMOND SHAMROCK (DIA) CUTS CRUDE PRICES"
    assert records[0]["source"].startswith("Diamond Shamrock Corp said that effective today it had cut")
    assert all(r["source"] and r["target"] and not r["source"].lower().endswith("reuter") for r in records)


@needs_apt
def test_translation_pairs_are_verse_aligned_plain_text():
    pytest.importorskip("pysword", reason="translation_jsonl needs the optional package pysword")
    records = _records(assets.translation_jsonl())
    assert len(records) == assets.TRANSLATION_MAX_PAIRS
    assert records[0] == {"source": "In the beginning, God created the heavens and the earth.",
                          "target": "EN el principio crió Dios los cielos y la tierra."}
    assert not any("<" in r["source"] + r["target"] or "  " in r["source"] + r["target"] for r in records)


def test_verify_accepts_the_warm_cache_and_names_unknown_assets():
    assert assets.verify("botchan") == assets.botchan_text()
    with pytest.raises(ValueError, match="unknown asset 'wikitext'"):
        assets.verify("wikitext")


def test_verify_reports_a_corrupt_archive(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROPRUNE_CACHE", str(tmp_path))
    source = assets.SOURCES["sentencepiece"]
    (assets.cache_root() / "data").mkdir(parents=True)
    (assets.cache_root() / "data" / "botchan.txt").write_text("stale")
    (assets.cache_root() / "archives").mkdir()
    (assets.cache_root() / "archives" / source.filename).write_bytes(b"not the sdist")
    with pytest.raises(RuntimeError, match="is pinned to"):
        assets.verify("botchan")


def test_debian_asset_without_apt_names_the_missing_tool(tmp_path, monkeypatch):
    monkeypatch.setenv("NEUROPRUNE_CACHE", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(RuntimeError, match=r"asset 'headlines'.*`apt-get` is not on PATH"):
        assets.headlines_jsonl()


def test_concurrent_fetches_build_once(tmp_path):
    env = {**os.environ, "NEUROPRUNE_CACHE": str(tmp_path)}
    code = "import assets; print(assets.botchan_text())"
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=Path(assets.__file__).parent, env=env,
                              stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    outputs = [proc.communicate(timeout=300)[0].strip() for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0]
    assert outputs[0] == outputs[1] == str(tmp_path / assets.LAYOUT_VERSION / "data" / "botchan.txt")
    leftovers = [p.name for p in (tmp_path / assets.LAYOUT_VERSION).rglob("*") if p.name.startswith(".")
                 and not p.name.endswith(".lock")]
    assert leftovers == []
    assert [p.name for p in (tmp_path / assets.LAYOUT_VERSION / "archives").iterdir()
            if not p.name.endswith(".lock")] == [assets.SOURCES["sentencepiece"].filename]
