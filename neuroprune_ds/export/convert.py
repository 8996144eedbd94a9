"""Convert a pruned NeuroPrune DeepSpeed checkpoint into a Hugging Face model directory, dense or compact.

``dense``: the stock architecture and config with pruned weights exactly zero. ``compact``: pruned heads and
dead FFN units physically removed, per-layer sizes in config.json read by the model classes of
``neuroprune_ds.export.compact_models`` (copied into the export and registered through ``auto_map``), or a
stock config when the kept sizes happen to be uniform. Both are written to a temporary directory beside
OUT_DIR, checked against the masked model's logits, and renamed into place.

Memory: the masked fp32 model is materialised once, one checkpoint tensor at a time, on an empty (meta)
skeleton; export tensors are built and written one at a time; the masked model is released before the
export is loaded back for verification. Peak RSS is about one fp32 model plus the largest tensor.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import shutil
import sys
import tempfile
from dataclasses import asdict, dataclass

import torch
from accelerate import init_empty_weights
from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig

from neuroprune_ds.arch import resolve_architecture
from neuroprune_ds.data import uses_text_to_text
from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.export.checkpoint import CheckpointInfo, iter_fp32_weights, read_checkpoint
from neuroprune_ds.export.compact_models import AUTO_CLASSES, COMPACT_FAMILIES, CompactFamily
from neuroprune_ds.export.plan import ExportPlan, apply_masks_, compact_shape, compact_tensor, make_plan, sparsity
from neuroprune_ds.export.safetensors_stream import TensorSpec, write_safetensors

FORMATS = ("dense", "compact")
VERIFY_ATOL = 1e-4
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")
NEUROPRUNE_JSON = "neuroprune.json"


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What an export wrote and measured."""

    out_dir: str
    format: str
    config_kind: str
    """'stock' (stock architecture and config) or the compact model_type registered through auto_map."""
    dense_parameters: int
    parameters: int
    weight_sparsity: float
    structural_sparsity: float
    max_abs_diff: float | None
    """Max |logits(export) - logits(masked model)| on the verification batch; None with verify off."""


def export_task(task: str, model_type: str) -> str:
    """The Auto factory's task: T5-style models classify text-to-text, as their seq2seq model."""
    return "seq2seq" if uses_text_to_text(task, model_type) else task


def check_out_dir(out_dir: str, overwrite: bool) -> None:
    """Raise ValueError when OUT_DIR is a non-empty directory (or a file) and overwrite is off."""
    if os.path.isfile(out_dir):
        raise ValueError(f"{out_dir} is a file; OUT_DIR must be a directory")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"{out_dir} is not empty; pass --overwrite to replace it")


def empty_model(config: PreTrainedConfig, task: str) -> torch.nn.Module:
    """The stock model for ``task``: parameters on the meta device (no memory), buffers real."""
    with init_empty_weights():
        model = AUTO_CLASSES[export_task(task, config.model_type)].from_config(config)
    return model.eval()


def load_checkpoint_model(info: CheckpointInfo) -> torch.nn.Module:
    """The checkpoint's fp32 weights in the stock model, filled one tensor at a time into an empty skeleton."""
    config = AutoConfig.from_pretrained(info.ckpt_dir)
    if export_task(info.task, config.model_type) == "classification" and info.num_labels:
        config.num_labels = info.num_labels
    model = empty_model(config, info.task)
    weights = dict(iter_fp32_weights(info, list(model.state_dict())))
    model.load_state_dict(weights, strict=True, assign=True)
    model.tie_weights()  # assign=True gave tied names separate Parameters (of one tensor)
    return model


def unique_names(model: torch.nn.Module) -> tuple[list[str], set[str]]:
    """Names to save (tied parameters once, under their first name; persistent buffers) and which of them
    are parameters."""
    parameters = [name for name, _ in model.named_parameters()]
    persistent = set(model.state_dict())
    buffers = [name for name, _ in model.named_buffers() if name in persistent]
    return parameters + buffers, set(parameters)


def verification_batch(config: PreTrainedConfig, task: str) -> dict[str, torch.Tensor]:
    """A fixed batch: 2 sequences of 12 tokens (6 decoder tokens for seq2seq), the second right-padded by 3,
    except for classification with an <eos> token, which then ends both rows (BART pools at <eos>).

    Token ids start at 4 so that special tokens (pad/bos/eos/unk sit below 4 in every supported family)
    appear only where placed.
    """
    text_config = config.get_text_config()
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(4, text_config.vocab_size, (2, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if task == "classification" and getattr(config, "eos_token_id", None) is not None:
        input_ids[:, -1] = config.eos_token_id
    else:
        attention_mask[1, -3:] = 0
    if config.is_encoder_decoder:
        batch["decoder_input_ids"] = torch.randint(4, text_config.vocab_size, (2, 6), generator=generator)
    return batch


@torch.no_grad()
def logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).logits.float()


def export_model(model: torch.nn.Module, alive: dict[str, torch.Tensor], out_dir: str, fmt: str, *,
                 task: str, neuroprune: NeuroPruneConfig, threshold: float | None = None,
                 source: dict | None = None, neuroprune_settings: dict | None = None,
                 tokenizer_dir: str | None = None, verify: bool = True, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportReport:
    """Mask ``model`` and export it to ``out_dir``; consumes the model (its weights are masked in place and
    released after writing, leaving it on the meta device).

    Args:
        model: a stock HF model with fp32 weights.
        alive: bool (num_units,) per attention block name (``NeuroPruner.state_dict()["alive"]``).
        out_dir: target directory (written through a temporary sibling and renamed).
        fmt: 'dense' or 'compact'.
        task: 'causal_lm', 'seq2seq' or 'classification'.
        neuroprune: the NeuroPrune config of the run (sparsity is reported over its penalised blocks).
        threshold: zero penalised weights with |w| < threshold first (None: no threshold).
        source: recorded in neuroprune.json under "source".
        neuroprune_settings: the run's NeuroPrune settings as saved, for neuroprune.json (default: asdict of
            ``neuroprune``).
        tokenizer_dir: a directory whose tokenizer is saved beside the model (None: no tokenizer).
        verify: compare the export's logits with the masked model's (max |diff| <= 1e-4) and its
            parameter count with the expected one.
        overwrite: replace a non-empty ``out_dir``.
        max_shard_bytes: safetensors shard size limit.

    Raises:
        ValueError: unknown format, a compact export the family or task does not support, a non-empty
            out_dir without overwrite, or a failed verification.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    check_out_dir(out_dir, overwrite)
    task = export_task(task, model.config.model_type)
    model_type = model.config.model_type
    arch = resolve_architecture(model)
    params = model.state_dict()
    apply_masks_(params, arch, alive, threshold)
    plan = make_plan(arch, params, alive)
    stats = sparsity(resolve_architecture(model, neuroprune), params, plan, neuroprune.epsilon)
    family = _compact_family(model, task, plan) if fmt == "compact" else None
    batch = verification_batch(model.config, task)
    reference = logits(model, batch) if verify else None

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.tmp-", dir=parent)
    try:
        if family is None:
            config_kind = "stock"
            _save_config(model, copy.deepcopy(model.config), tmp)
        else:
            config_kind = _write_compact_config(model, family, task, plan, tmp)
        dense_parameters, parameters = _write_weights(model, params, None if family is None else plan, tmp,
                                                      max_shard_bytes)
        if tokenizer_dir and any(os.path.isfile(os.path.join(tokenizer_dir, f)) for f in TOKENIZER_FILES):
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
        del params
        model.to("meta")  # release the masked weights before loading the export back
        max_abs_diff = _verify(tmp, task, batch, reference, parameters) if verify else None
        report = ExportReport(os.path.abspath(out_dir), fmt, config_kind, dense_parameters, parameters,
                              stats["weight_sparsity"], stats["structural_sparsity"], max_abs_diff)
        _write_neuroprune_json(tmp, report, plan, neuroprune_settings or asdict(neuroprune), threshold, source,
                               model_type)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write_weights(model: torch.nn.Module, params: dict[str, torch.Tensor], plan: ExportPlan | None, out_dir: str,
                   max_shard_bytes: int) -> tuple[int, int]:
    """Stream the weights (sliced per ``plan``; as they are when None) to safetensors.

    Returns:
        Parameter counts (tied parameters once, buffers not counted) of the model and of the export.
    """
    names, parameter_names = unique_names(model)
    selections, deltas = ({}, {}) if plan is None else (plan.selections(), plan.bias_deltas())
    specs = [TensorSpec(n, tuple(compact_shape(n, params[n].shape, selections)), params[n].dtype) for n in names]
    write_safetensors(out_dir, specs, lambda n: compact_tensor(n, params[n], selections, deltas), max_shard_bytes)
    dense = sum(params[n].numel() for n in parameter_names)
    return dense, sum(math.prod(s.shape) for s in specs if s.name in parameter_names)


def convert(ckpt_dir: str, out_dir: str, fmt: str, *, tag: str | None = None, overwrite: bool = False,
            verify: bool = True, threshold: float | str | None = None,
            max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportReport:
    """Convert the checkpoint ``ckpt_dir`` (tag ``tag`` or 'latest') to ``out_dir``; see :func:`export_model`.

    ``threshold`` may be ``"epsilon"``: the run's ``neuroprune.epsilon``.

    Raises:
        ValueError: see :func:`export_model` and :func:`neuroprune_ds.export.checkpoint.read_checkpoint`.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    check_out_dir(out_dir, overwrite)
    info = read_checkpoint(ckpt_dir, tag)
    if threshold == "epsilon":
        threshold = info.neuroprune.epsilon
    source = {"checkpoint": os.path.abspath(ckpt_dir), "tag": info.tag, "optimizer_steps": info.optimizer_steps,
              "name_or_path": info.name_or_path, "task": info.task}
    return export_model(load_checkpoint_model(info), info.alive, out_dir, fmt, task=info.task,
                        neuroprune=info.neuroprune, threshold=threshold, source=source,
                        neuroprune_settings=info.neuroprune_settings, tokenizer_dir=ckpt_dir,
                        verify=verify, overwrite=overwrite, max_shard_bytes=max_shard_bytes)


# -- compact config -------------------------------------------------------------------------------------
def _compact_family(model: torch.nn.Module, task: str, plan: ExportPlan) -> CompactFamily:
    model_type = model.config.model_type
    family = COMPACT_FAMILIES.get(model_type)
    if family is None:
        raise ValueError(f"--format compact supports {', '.join(sorted(COMPACT_FAMILIES))}; {model_type!r} has no "
                         "compact model classes (use --format dense)")
    if task not in family.model_classes:
        raise ValueError(f"--format compact for {model_type} supports tasks {sorted(family.model_classes)}, not "
                         f"{task!r} (use --format dense)")
    empty = [keep.block.name for keep in plan.attention if len(keep.units) == 0]
    if empty:
        raise ValueError(f"attention blocks {empty} keep no head; a compact layer needs at least one "
                         "(use --format dense)")
    return family


def per_layer_sizes(family: CompactFamily, plan: ExportPlan) -> dict[str, list]:
    """The family's per-layer config fields filled from the plan."""
    values: dict[str, dict[int, object]] = {}

    def put(field: str, layer: int, value) -> None:
        values.setdefault(field, {})[layer] = value

    for keep in plan.attention:
        key = (keep.block.stack, keep.block.kind)
        put(family.heads[key], keep.block.layer, len(keep.heads))
        if key in family.kv_heads:
            put(family.kv_heads[key], keep.block.layer, len(keep.units))
    for keep in plan.ffn:
        put(family.ffn[keep.block.stack], keep.block.layer, len(keep.units))
    for stack, bias in plan.relative_bias.items():
        for layer, columns in bias.per_layer.items():
            put(family.relative_bias[stack], layer, columns)
    fields = {}
    for field, by_layer in values.items():
        assert sorted(by_layer) == list(range(len(by_layer))), (field, sorted(by_layer))
        fields[field] = [by_layer[layer] for layer in range(len(by_layer))]
    return fields


def stock_overrides(family: CompactFamily, plan: ExportPlan, fields: dict[str, list]) -> dict | None:
    """Stock config attributes expressing the kept sizes, or None when they are not uniform enough.

    Uniform means: one value per stock attribute across the blocks it covers; heads unpruned where the
    stock config derives the head size from the head count; and (T5) every layer of a stack keeping the same
    heads, so that layer 0's table serves them all.
    """
    overrides: dict = {}

    def assign(attribute: str, values: list) -> bool:
        if len(set(values)) != 1 or overrides.get(attribute, values[0]) != values[0]:
            return False
        overrides[attribute] = values[0]
        return True

    if family.stock_heads is None:
        if any(len(keep.units) != keep.block.num_units for keep in plan.attention):
            return None
    else:
        for key, field in family.heads.items():
            if not assign(family.stock_heads[key], fields[field]):
                return None
    for key, field in family.kv_heads.items():
        if not assign(family.stock_kv_heads[key], fields[field]):
            return None
    for stack, field in family.ffn.items():
        if not assign(family.stock_ffn[stack], fields[field]):
            return None
    for field in family.relative_bias.values():
        if any(columns != list(range(len(columns))) for columns in fields[field]):
            return None
    return overrides


def _write_compact_config(model: torch.nn.Module, family: CompactFamily, task: str, plan: ExportPlan,
                          out_dir: str) -> str:
    """Write config.json (stock when uniform, else the family's compact config and modeling file)."""
    fields = per_layer_sizes(family, plan)
    overrides = stock_overrides(family, plan, fields)
    if overrides is not None:
        config = copy.deepcopy(model.config)
        for attribute, value in overrides.items():
            setattr(config, attribute, value)
        try:
            config = type(config).from_dict(config.to_dict())  # the stock config's own validation decides
        except ValueError:  # e.g. LlamaConfig insists hidden_size % num_attention_heads == 0
            pass
        else:
            _save_config(model, config, out_dir)
            return "stock"
    module = family.load()
    settings = {k: v for k, v in model.config.to_dict().items()
                if k not in ("model_type", "architectures", "auto_map", "transformers_version")}
    config = getattr(module, family.config_class)(**settings, **fields)
    class_name = family.model_classes[task]
    stem = os.path.splitext(family.file_name)[0]
    config.architectures = [class_name]
    config.auto_map = {"AutoConfig": f"{stem}.{family.config_class}",
                       AUTO_CLASSES[task].__name__: f"{stem}.{class_name}"}
    config.save_pretrained(out_dir)
    _save_generation_config(model, out_dir)
    shutil.copyfile(family.source, os.path.join(out_dir, family.file_name))
    return family.model_type


def _save_config(model: torch.nn.Module, config: PreTrainedConfig, out_dir: str) -> None:
    config.architectures = [type(model).__name__]
    config.save_pretrained(out_dir)
    _save_generation_config(model, out_dir)


def _save_generation_config(model: torch.nn.Module, out_dir: str) -> None:
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)


# -- verification and output ----------------------------------------------------------------------------
def _verify(out_dir: str, task: str, batch: dict, reference: torch.Tensor, expected_parameters: int) -> float:
    """Load the export as a user would (registered compact classes, no remote code) and compare."""
    exported = AUTO_CLASSES[task].from_pretrained(out_dir, dtype=torch.float32).eval()
    parameters = sum(p.numel() for p in exported.parameters())
    if parameters != expected_parameters:
        raise ValueError(f"verification failed: the export loads with {parameters:,} parameters, "
                         f"expected {expected_parameters:,}")
    diff = float((logits(exported, batch) - reference).abs().max())
    if not diff <= VERIFY_ATOL:
        raise ValueError(f"verification failed: max |logits(export) - logits(masked model)| = {diff:.3g} > "
                         f"{VERIFY_ATOL:g} (fp32)")
    return diff


def _write_neuroprune_json(out_dir: str, report: ExportReport, plan: ExportPlan, neuroprune_settings: dict,
                           threshold: float | None, source: dict | None, model_type: str) -> None:
    record = {
        "format": report.format,
        "config": report.config_kind,
        "model_type": model_type,
        "source": source or {},
        "attention": [{"name": k.block.name, "stack": k.block.stack, "layer": k.block.layer, "kind": k.block.kind,
                       "num_heads": k.block.num_heads, "num_kv_heads": k.block.num_kv_heads,
                       "kept_heads": k.heads, "kept_kv_heads": k.units.tolist()} for k in plan.attention],
        "ffn": [{"name": k.block.name, "stack": k.block.stack, "layer": k.block.layer, "width": k.block.width,
                 "kept_units": len(k.units), "folded_units": k.num_folded} for k in plan.ffn],
        "parameters": {"dense": report.dense_parameters, "export": report.parameters},
        "weight_sparsity": report.weight_sparsity,
        "structural_sparsity": report.structural_sparsity,
        "threshold": threshold,
        "verification": {"max_abs_diff": report.max_abs_diff, "atol": VERIFY_ATOL},
        "neuroprune_config": neuroprune_settings,
    }
    with open(os.path.join(out_dir, NEUROPRUNE_JSON), "w") as f:
        json.dump(record, f, indent=2)


def _move_into_place(tmp: str, out_dir: str) -> None:
    """Rename the finished temporary directory to out_dir (an existing one goes only after that)."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        old = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.abspath(out_dir))}.old-",
                               dir=os.path.dirname(os.path.abspath(out_dir)))
        os.replace(out_dir, os.path.join(old, "previous"))
        os.replace(tmp, out_dir)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out_dir)


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# -- command line ---------------------------------------------------------------------------------------
def parse_threshold(text: str) -> float | str:
    """``--threshold`` value: a float, or 'epsilon' for the run's neuroprune.epsilon."""
    if text == "epsilon":
        return text
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is neither a number nor 'epsilon'") from None


def run_convert(args: argparse.Namespace) -> int:
    """Execute ``neuroprune convert``; returns the exit status (2 for errors a user can fix)."""
    try:
        report = convert(args.ckpt_dir, args.out_dir, args.format, tag=args.tag, overwrite=args.overwrite,
                         verify=not args.no_verify, threshold=args.threshold)
    except ValueError as error:
        print(f"neuroprune convert: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


def format_report(report: ExportReport) -> str:
    """A few lines summarising an export, with this process's peak RSS."""
    fp32 = 4 * report.dense_parameters
    lines = [
        f"wrote {report.out_dir} ({report.format}, config {report.config_kind})",
        f"parameters: {report.dense_parameters:,} dense -> {report.parameters:,} exported "
        f"({report.parameters / report.dense_parameters:.3f}x); weight sparsity {report.weight_sparsity:.4f}, "
        f"structural sparsity {report.structural_sparsity:.4f}",
        "verification: skipped (--no-verify)" if report.max_abs_diff is None else
        f"verification: max |logits diff| {report.max_abs_diff:.2e} <= {VERIFY_ATOL:g} (fp32)",
        f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB = {peak_rss_bytes() / fp32:.2f}x the fp32 model "
        f"({fp32 / 2**30:.2f} GiB)",
    ]
    return "\n".join(lines)
