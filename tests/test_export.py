"""Dense and compact exports of tiny models of every family, pruned by hand, reloaded in a fresh process.

Each case prunes attention units (different ones per layer and per kind, so the compact model needs its
per-layer classes, T5 its per-layer relative-bias slices) and kills FFN units (zero input rows: a constant
activation, folded into the output bias where there is one; zero output columns), computes the masked
model's logits itself, exports both formats, and one fresh process -- where neuroprune_ds cannot be
imported -- loads every export (plain ``from_pretrained`` for dense, ``trust_remote_code=True`` for compact).
Logits must match the masked model's to 1e-4 and parameter counts the hand-computed ones.
"""

import copy
import dataclasses
import json
import os

import pytest
import tokenizers
import torch
import transformers
from safetensors.torch import load_file
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModelForCausalLM

from export_helpers import AUTO_CLASS, expected_parameters, export_inputs, reload_in_fresh_process
from neuroprune_ds import cli
from neuroprune_ds.arch import ARCHITECTURES, AttentionBlock, FFNBlock, Linear, resolve_architecture
from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.export import convert as convert_module
from neuroprune_ds.export.checkpoint import release_file_pages
from neuroprune_ds.export.convert import export_model
from neuroprune_ds.export.plan import AttentionKeep, apply_masks_, ffn_keep, relative_bias_keep
from neuroprune_ds.export.safetensors_stream import TensorSpec, write_safetensors
from neuroprune_ds.export.stream import streamed_logits
from tiny_models import tiny_model

TASKS = {"llama": "causal_lm", "mistral": "causal_lm", "qwen2": "causal_lm", "opt": "causal_lm", "t5": "seq2seq",
         "t5_v1_0": "seq2seq", "bart": "seq2seq", "bert": "classification"}
ALL = list(range(48))

# case -> (tiny family, pruned units per (stack, kind, layer), killed FFN units per (stack, layer):
#          {"rows": {input index: units}, "cols": units}, compact config expected to be stock, shard limit)
CASES = {
    "llama": ("llama", {("decoder", "self", 0): [0]},
              {("decoder", 0): {"rows": {0: [0], 1: [1]}, "cols": [2]}, ("decoder", 1): {"cols": ALL}}, False, None),
    "llama_uniform": ("llama", {("decoder", "self", 0): [1], ("decoder", "self", 1): [0]},
                      {("decoder", 0): {"cols": [3]}, ("decoder", 1): {"rows": {1: [7]}}}, True, None),
    "mistral": ("mistral", {("decoder", "self", 1): [1]},
                {("decoder", 0): {"rows": {1: [3]}, "cols": [5]}, ("decoder", 1): {"cols": [0, 1]}}, False, None),
    "qwen2": ("qwen2", {("decoder", "self", 0): [1]},  # layer 0 full attention, layer 1 a sliding window
              {("decoder", 0): {"cols": [4]}, ("decoder", 1): {"rows": {0: [2]}, "cols": [6, 7]}}, False, None),
    "opt": ("opt", {("decoder", "self", 0): [0, 2], ("decoder", "self", 1): [3]},
            {("decoder", 0): {"rows": {0: [0, 1, 9]}, "cols": [2]}, ("decoder", 1): {"rows": {0: [4]}}}, False, None),
    "opt_sharded": ("opt", {("decoder", "self", 1): [1]}, {("decoder", 0): {"cols": [5]}}, False, 20_000),
    "t5": ("t5", {("encoder", "self", 0): [1], ("encoder", "self", 1): [1, 2], ("decoder", "self", 1): [3],
                  ("decoder", "cross", 0): [2], ("decoder", "cross", 1): [0, 1]},
           {("encoder", 0): {"rows": {0: [0]}, "cols": [1]}, ("decoder", 1): {"rows": {1: [2, 3]}}}, False, None),
    "t5_uniform": ("t5", {(s, k, layer): [1] for s, k in (("encoder", "self"), ("decoder", "self"),
                                                          ("decoder", "cross")) for layer in (0, 1)},
                   {}, True, None),
    "t5_v1_0": ("t5_v1_0", {("encoder", "self", 1): [0], ("decoder", "self", 0): [2, 3]},
                {("encoder", 1): {"rows": {0: [6, 7]}}, ("decoder", 0): {"cols": [8]}}, False, None),
    "bart": ("bart", {("encoder", "self", 0): [3], ("decoder", "self", 1): [0, 1], ("decoder", "cross", 0): [2]},
             {("encoder", 0): {"rows": {0: [0, 1, 2]}}, ("decoder", 1): {"rows": {0: [3]}, "cols": [4]}},
             False, None),
    "bert": ("bert", {("encoder", "self", 0): [0], ("encoder", "self", 1): [1, 3]},
             {("encoder", 0): {"rows": {0: [0, 1]}, "cols": [2]}}, False, None),
}
FORMATS = ("dense", "compact")


def build_case(case: str):
    """The tiny model with random biases, its alive masks, and the FFN units the export removes."""
    family, pruned, killed, _, _ = CASES[case]
    model = tiny_model(family).eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias") and "relative_attention_bias" not in name:
                param.normal_(0.0, 0.1)  # HF inits biases to 0; constant activations must be non-trivial
    arch = resolve_architecture(model)
    alive = {}
    for block in arch.attention:
        mask = torch.ones(block.num_units, dtype=torch.bool)
        mask[pruned.get((block.stack, block.kind, block.layer), [])] = False
        alive[block.name] = mask
    dead_ffn = {}
    params = dict(model.named_parameters())
    with torch.no_grad():
        for block in arch.ffn:
            spec = killed.get((block.stack, block.layer), {})
            for index, units in spec.get("rows", {}).items():
                params[block.inputs[index].weight][units] = 0
            params[block.output.weight][:, spec.get("cols", [])] = 0
            dead = {u for units in spec.get("rows", {}).values() for u in units} | set(spec.get("cols", []))
            dead_ffn[block.name] = dead
    return model, alive, dead_ffn


def mask_by_hand(model, alive) -> None:
    """Zero pruned units' q/k/v rows (and biases) and o columns, written out without the export code."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for block in resolve_architecture(model).attention:
            for unit in torch.nonzero(~alive[block.name]).flatten().tolist():
                width = block.heads_per_unit * block.head_dim
                q = slice(unit * width, (unit + 1) * width)
                kv = slice(unit * block.head_dim, (unit + 1) * block.head_dim)
                for linear, rows in ((block.q, q), (block.k, kv), (block.v, kv)):
                    params[linear.weight][rows] = 0
                    if linear.bias:
                        params[linear.bias][rows] = 0
                params[block.o.weight][:, q] = 0


def inputs_for(family: str) -> dict:
    return export_inputs(TASKS[family] == "seq2seq", seed=3)


def save_word_tokenizer(path: str) -> transformers.PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny vocabulary ("w0".."w59" after 4 specials), saved at ``path``."""
    words = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(60)]
    backend = tokenizers.Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                                     eos_token="</s>", unk_token="<unk>")
    tokenizer.save_pretrained(path)
    return tokenizer


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Every case exported in both formats (the OPT case with a tokenizer), then all reloaded in one fresh
    process."""
    root = tmp_path_factory.mktemp("exports")
    save_word_tokenizer(str(root / "tokenizer"))
    cases, jobs = {}, []
    for case, (family, _, _, _, max_shard) in CASES.items():
        model, alive, dead_ffn = build_case(case)
        mask_by_hand(model, alive)
        inputs = inputs_for(family)
        with torch.no_grad():
            reference = model(**inputs).logits
        info = {"family": family, "alive": alive, "dead_ffn": dead_ffn, "reference": reference,
                "dense_parameters": sum(p.numel() for p in model.parameters()),
                "expected_compact": expected_parameters(model, alive, dead_ffn), "reports": {}, "dirs": {}}
        for fmt in FORMATS:
            out = str(root / f"{case}_{fmt}")
            kwargs = {"max_shard_bytes": max_shard} if max_shard else {}
            if case == "opt":
                kwargs["tokenizer_dir"] = str(root / "tokenizer")
            info["reports"][fmt] = export_model(copy.deepcopy(model), alive, out, fmt, task=TASKS[family],
                                                neuroprune=NeuroPruneConfig(), **kwargs)
            info["dirs"][fmt] = out
            jobs.append({"dir": out, "auto_class": AUTO_CLASS[TASKS[family]], "trust_remote_code": fmt == "compact",
                         "inputs": inputs, "generate": 3 if TASKS[family] != "classification" else 0,
                         "case": case, "format": fmt})
        cases[case] = info
    for job, result in zip(jobs, reload_in_fresh_process(jobs, str(root))):
        cases[job["case"]].setdefault("results", {})[job["format"]] = result
    return cases


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("case", list(CASES))
def test_export_reloads_with_masked_logits(exported, case, fmt):
    info = exported[case]
    result = info["results"][fmt]
    assert "error" not in result, result.get("error")
    diff = float((result["logits"] - info["reference"]).abs().max())
    assert diff <= 1e-4, f"{case}/{fmt}: max |logits diff| {diff}"
    expected = info["dense_parameters"] if fmt == "dense" else info["expected_compact"]
    assert result["parameters"] == expected == info["reports"][fmt].parameters
    stock = fmt == "dense" or CASES[case][3]
    assert result["module"].startswith("transformers.models." if stock else "transformers_modules."), result["module"]
    assert info["reports"][fmt].config_kind == ("stock" if stock else f"neuroprune_{info['family'].split('_')[0]}")
    assert info["reports"][fmt].max_abs_diff <= 1e-4


@pytest.mark.parametrize("case", [c for c in CASES if TASKS[CASES[c][0]] != "classification"])
def test_compact_generates_like_dense(exported, case):
    results = exported[case]["results"]
    assert torch.equal(results["compact"]["generated"], results["dense"]["generated"])


@pytest.mark.parametrize("case", list(CASES))
def test_dense_export_has_pruned_weights_exactly_zero(exported, case):
    info = exported[case]
    out = info["dirs"]["dense"]
    files = [f for f in os.listdir(out) if f.endswith(".safetensors")]
    weights = {k: v for f in files for k, v in load_file(os.path.join(out, f)).items()}
    model = tiny_model(info["family"])
    for block in resolve_architecture(model).attention:
        for unit in torch.nonzero(~info["alive"][block.name]).flatten().tolist():
            width = block.heads_per_unit * block.head_dim
            rows = slice(unit * width, (unit + 1) * width)
            assert not weights[block.q.weight][rows].any() and not weights[block.o.weight][:, rows].any()


@pytest.mark.parametrize("case", list(CASES))
def test_neuroprune_json_records_what_was_kept(exported, case):
    info = exported[case]
    with open(os.path.join(info["dirs"]["compact"], "neuroprune.json")) as f:
        record = json.load(f)
    model = tiny_model(info["family"])
    arch = resolve_architecture(model)
    heads = {a["name"]: a["kept_heads"] for a in record["attention"]}
    for block in arch.attention:
        units = torch.nonzero(info["alive"][block.name]).flatten().tolist()
        assert heads[block.name] == [u * block.heads_per_unit + h for u in units for h in range(block.heads_per_unit)]
    kept = {f["name"]: f["kept_units"] for f in record["ffn"]}
    assert kept == {b.name: b.width - len(info["dead_ffn"][b.name]) for b in arch.ffn}
    assert record["parameters"] == {"dense": info["dense_parameters"], "export": info["expected_compact"]}
    assert 0 < record["structural_sparsity"] < 1 and 0 <= record["weight_sparsity"] < 1
    assert record["neuroprune_config"]["theta"] == NeuroPruneConfig().theta


def test_sharded_export_writes_an_index(exported):
    out = exported["opt_sharded"]["dirs"]["dense"]
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    assert len(set(index["weight_map"].values())) > 1


@pytest.mark.parametrize("fmt", FORMATS)
def test_tokenizer_is_saved_beside_the_model(exported, fmt):
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported["opt"]["dirs"][fmt])
    assert tokenizer("w1 w2 w59 zz")["input_ids"] == [5, 6, 63, 3]
    assert not os.path.exists(os.path.join(exported["llama"]["dirs"][fmt], "tokenizer.json"))


def test_compact_export_loads_without_remote_code_where_neuroprune_ds_is_installed(exported):
    info = exported["opt"]
    model = AutoModelForCausalLM.from_pretrained(info["dirs"]["compact"], trust_remote_code=False).eval()
    assert type(model).__module__ == "neuroprune_ds.export.compact_models.opt"
    with torch.no_grad():
        logits = model(**inputs_for("opt")).logits
    assert float((logits - info["reference"]).abs().max()) <= 1e-4


def test_t5_layers_slice_their_own_relative_bias(exported):
    """Encoder layer 1 keeps heads {0, 3}; layer 0 pruned head 1 but keeps 2, so the compact table keeps
    columns {0, 2, 3} and layer 1 uses table columns [0, 2]."""
    with open(os.path.join(exported["t5"]["dirs"]["compact"], "config.json")) as f:
        config = json.load(f)
    assert config["relative_bias_heads_per_layer"] == [[0, 1, 2], [0, 2]]
    assert config["num_heads_per_layer"] == [3, 2]
    assert config["decoder_cross_num_heads_per_layer"] == [3, 2]
    weights = load_file(os.path.join(exported["t5"]["dirs"]["compact"], "model.safetensors"))
    assert weights["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"].shape == (32, 3)


# -- the pieces, on hand-checked examples -------------------------------------------------------------
def _ffn(width=4, d=2, bias=True, gated=False, activation="relu"):
    inputs = tuple(Linear(f"in{i}.weight", f"in{i}.bias" if bias else None, width, d) for i in range(1 + gated))
    return FFNBlock("ffn", "decoder", 0, inputs, Linear("out.weight", "out.bias" if bias else None, d, width),
                    activation)


def test_ffn_keep_folds_a_constant_activation_into_the_output_bias():
    block = _ffn()
    params = {"in0.weight": torch.tensor([[0.0, 0.0], [1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]),
              "in0.bias": torch.tensor([0.5, 0.1, -0.3, 0.7]),
              "out.weight": torch.tensor([[1.0, 1.0, 1.0, 0.0], [2.0, 1.0, 1.0, 0.0]]),
              "out.bias": torch.tensor([0.0, 1.0])}
    keep = ffn_keep(block, params)
    # unit 0: relu(0.5) = 0.5 folded as 0.5 * [1, 2]; unit 2: relu(-0.3) = 0, silent; unit 3: zero output column
    assert keep.units.tolist() == [1] and keep.num_folded == 1
    assert torch.allclose(keep.bias_delta.float(), torch.tensor([0.5, 1.0]))


def test_ffn_keep_keeps_a_constant_unit_without_an_output_bias():
    block = _ffn(bias=False, gated=True, activation="silu")
    params = {"in0.weight": torch.tensor([[0.0, 0.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0]]),
              "in1.weight": torch.tensor([[1.0, 1.0], [0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]),
              "out.weight": torch.ones(2, 4)}
    keep = ffn_keep(block, params)  # silu(0) * up = 0 and silu(gate) * 0 = 0: units 0 and 1 are silent
    assert keep.units.tolist() == [2, 3] and keep.bias_delta is None


def test_relative_bias_keeps_the_union_of_heads_and_indexes_each_layer():
    def keep(layer, units):
        block = AttentionBlock(f"l{layer}", "encoder", layer, "self", *[None] * 4, 4, 4, 8,
                               "table" if layer == 0 else None)
        return AttentionKeep(block, torch.tensor(units))

    bias = relative_bias_keep([keep(0, [0, 2, 3]), keep(1, [0, 3]), keep(2, [2])])["encoder"]
    assert bias.columns.tolist() == [0, 2, 3]
    assert bias.per_layer == {0: [0, 1, 2], 1: [0, 2], 2: [1]}


def test_apply_masks_zeroes_pruned_units_and_thresholds_penalised_weights():
    model = tiny_model("opt")
    arch = resolve_architecture(model)
    params = model.state_dict()
    block = arch.attention[0]
    alive = {block.name: torch.tensor([True, False, True, True])}
    before = {name: tensor.clone() for name, tensor in params.items()}
    apply_masks_(params, arch, alive)
    assert not params[block.q.weight][8:16].any() and not params[block.q.bias][8:16].any()
    assert not params[block.o.weight][:, 8:16].any()
    assert torch.equal(params[block.o.weight][:, :8], before[block.o.weight][:, :8])
    masked_o = params[block.o.weight].clone()
    apply_masks_(params, arch, {}, threshold=0.01)
    fc1 = params[arch.ffn[0].inputs[0].weight]
    assert fc1.count_nonzero() == (before[arch.ffn[0].inputs[0].weight].abs() >= 0.01).sum() > 0
    assert params[block.q.weight].count_nonzero() == (before[block.q.weight][:8].abs() >= 0.01).sum() + (
        before[block.q.weight][16:].abs() >= 0.01).sum()
    embed = "model.decoder.embed_tokens.weight"
    assert torch.equal(params[embed], before[embed])  # not a penalised matrix
    # nor is the attention output projection: it keeps its small weights (only pruned units' columns are 0)
    assert bool(((masked_o.abs() < 0.01) & (masked_o != 0)).any())
    assert torch.equal(params[block.o.weight], masked_o)


def test_export_threshold_leaves_the_output_projection_and_counts_the_penalised_set(tmp_path):
    """``--threshold`` zeroes small weights of Q, K, V and the FFN matrices only, and neuroprune.json's
    weight sparsity is the share of |w| < epsilon over exactly those matrices (docs/algorithm.md section 7)."""
    model, alive, _ = build_case("opt")
    arch = resolve_architecture(model)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    report = export_model(model, alive, str(tmp_path / "out"), "dense", task="causal_lm",
                          neuroprune=NeuroPruneConfig(epsilon=0.01), threshold=0.01)
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    penalised, small, total = [], 0, 0
    for block in arch.attention:
        o = written[block.o.weight]
        assert bool(((o.abs() < 0.01) & (o != 0)).any()), block.o.weight  # small O weights kept
        q_keep = block.layout.q_keep(alive[block.name])
        assert torch.equal(o, before[block.o.weight] * q_keep)
        penalised += [block.q.weight, block.k.weight, block.v.weight]
    for block in arch.ffn:
        penalised += [linear.weight for linear in (*block.inputs, block.output)]
    for name in penalised:
        assert not bool(((written[name].abs() < 0.01) & (written[name] != 0)).any()), name
        small += int((written[name].abs() < 0.01).sum())
        total += written[name].numel()
    assert report.weight_sparsity == pytest.approx(small / total, abs=1e-12)


def test_streamed_safetensors_round_trip(tmp_path):
    tensors = {"a": torch.randn(3, 5), "b": torch.arange(7), "c": torch.randn(4).bfloat16(), "d": torch.zeros(0, 3)}
    specs = [TensorSpec(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    names = write_safetensors(str(tmp_path), specs, tensors.__getitem__, max_shard_bytes=64)
    assert names[-1] == "model.safetensors.index.json" and len(names) > 2
    loaded = {k: v for f in names[:-1] for k, v in load_file(str(tmp_path / f)).items()}
    assert loaded.keys() == tensors.keys() and all(torch.equal(loaded[k], tensors[k]) for k in tensors)


@pytest.mark.parametrize("family", ["llama", "opt", "t5", "bart", "bert"])
def test_streamed_forward_equals_the_model_and_holds_one_module_at_a_time(family):
    """An empty skeleton fed tensor by tensor gives the model's logits, and at no moment holds more fetched
    weights than the largest module's own parameters."""
    model = tiny_model(family).eval()
    inputs = inputs_for(family)
    with torch.no_grad():
        expected = model(**inputs).logits
    state = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    largest = max(sum(p.numel() * 4 for p in m.parameters(recurse=False)) for m in model.modules())
    skeleton = convert_module.empty_model(model.config, TASKS[family])
    buffers = set(dict(skeleton.named_buffers()))
    peak = [0]

    def fetch(name):
        held = sum(p.numel() * 4 for m in skeleton.modules() for p in m._parameters.values()
                   if p is not None and not p.is_meta)
        peak[0] = max(peak[0], held + (0 if name in buffers else state[name].numel() * 4))
        return state[name].clone()

    logits = streamed_logits(skeleton, fetch, inputs)
    assert torch.allclose(logits, expected, atol=1e-6, rtol=0)
    assert 0 < peak[0] <= largest, (peak[0], largest)
    assert all(p.is_meta for p in skeleton.parameters())


# -- behaviour of the converter -------------------------------------------------------------------------
def test_refuses_a_non_empty_out_dir_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    model, alive, _ = build_case("opt")
    with pytest.raises(ValueError, match="not empty; pass --overwrite"):
        export_model(copy.deepcopy(model), alive, str(out), "dense", task="causal_lm", neuroprune=NeuroPruneConfig())
    assert (out / "keep.txt").exists()
    export_model(model, alive, str(out), "dense", task="causal_lm", neuroprune=NeuroPruneConfig(), overwrite=True)
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").exists()
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temporary or old directory left behind


def test_failed_verification_writes_nothing(tmp_path, monkeypatch):
    corrupt = convert_module.compact_tensor

    def wrong(name, tensor, selections, deltas):
        out = corrupt(name, tensor, selections, deltas)
        return out * 1.01 if name.endswith("fc1.weight") else out

    monkeypatch.setattr(convert_module, "compact_tensor", wrong)
    model, alive, _ = build_case("opt")
    with pytest.raises(ValueError, match="verification failed"):
        export_model(model, alive, str(tmp_path / "out"), "compact", task="causal_lm", neuroprune=NeuroPruneConfig())
    assert os.listdir(tmp_path) == []


def test_compact_needs_a_family_with_compact_classes(tmp_path, monkeypatch):
    # as for an architecture a user registers without compact classes
    monkeypatch.setitem(ARCHITECTURES, "qwen2", dataclasses.replace(ARCHITECTURES["qwen2"], compact=None))
    model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=64))
    with pytest.raises(ValueError, match="no compact model classes"):
        export_model(model, {}, str(tmp_path / "out"), "compact", task="causal_lm", neuroprune=NeuroPruneConfig())


def test_cli_convert_reports_a_missing_checkpoint(tmp_path, capsys):
    status = cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out"), "--format", "dense"])
    assert status == cli.EXIT_INVALID
    assert "no config.json" in capsys.readouterr().err


def test_release_file_pages_touches_only_mapped_checkpoint_files(tmp_path):
    torch.save({"w": torch.arange(300_000, dtype=torch.float32)}, tmp_path / "shard.pt")
    mapped = torch.load(tmp_path / "shard.pt", mmap=True)["w"]
    assert torch.equal(mapped, torch.arange(300_000, dtype=torch.float32))  # pages now resident
    assert release_file_pages(mapped, str(tmp_path))
    assert torch.equal(mapped, torch.arange(300_000, dtype=torch.float32))  # re-read from the file
    assert not release_file_pages(mapped, str(tmp_path / "elsewhere"))
    private = torch.arange(300_000, dtype=torch.float32)
    assert not release_file_pages(private, str(tmp_path)) and private[-1] == 299_999
