"""Convert a pruned NeuroPrune DeepSpeed checkpoint into a Hugging Face model directory, dense or compact.

``dense``: the stock architecture and config with pruned weights exactly zero. ``compact``: pruned heads and
dead FFN units physically removed, per-layer sizes in config.json read by the model classes of
``neuroprune_ds.export.compact_models`` (copied into the export and registered through ``auto_map``), or a
stock config when the kept sizes happen to be uniform. Floating-point tensors are written in the chosen
dtype (default: the dtype the run trained in). Both formats are written to a temporary directory beside
OUT_DIR, checked against the masked model's logits, and renamed into place.

Memory: nothing holds the model. Every pass reads one tensor at a time from the checkpoint (DeepSpeed's
lazy ``zero_to_fp32`` at ZeRO-3): the plan pass reads the FFN matrices (which units a compact export can
drop), the write pass masks, slices, casts and writes each tensor, and the two verification passes run the
model layer by layer (:mod:`neuroprune_ds.export.stream`), once on the masked checkpoint weights rounded to
the export dtype and once on the written files. Peak RSS is the imports plus a few copies of the largest
tensor.

Verification: both forward passes compute in fp32, so an export whose tensors are the masked weights rounded
to the dtype and sliced matches to fp32 round-off (:data:`VERIFY_ATOL`) whatever the dtype. A compact export
that folds constant FFN units into an output bias rounds that bias once more; in a 16-bit dtype the check
then also allows as much difference as rounding the whole model to that dtype makes (a third pass, on the
fp32 masked weights).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import resource
import secrets
import shutil
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, PreTrainedConfig

from neuroprune_ds.arch import (ARCHITECTURES, AUTO_MODEL_CLASSES, CompactFamily, ResolvedArchitecture,
                                architecture_spec, auto_model_class, model_task, penalised_weights,
                                resolve_architecture)
from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.export import NEUROPRUNE_JSON
from neuroprune_ds.export.checkpoint import CheckpointInfo, CheckpointWeights, read_checkpoint
from neuroprune_ds.export.compact_models import load_module, module_source
from neuroprune_ds.export.plan import (ExportPlan, SparsityCount, compact_shape, compact_tensor, make_plan,
                                       mask_rules, mask_tensor_)
from neuroprune_ds.export.safetensors_stream import (SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, TensorSpec,
                                                     write_safetensors)
from neuroprune_ds.export.stream import Fetch, streamed_logits, tied_names

FORMATS = ("dense", "compact")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
VERIFY_ATOL = 1e-4
"""Max |logits diff| between two fp32 computations of the same function in other summation orders."""
DEFAULT_MAX_SHARD_BYTES = 2 * 2**30
TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json")


@dataclass(frozen=True, slots=True)
class ExportReport:
    """What an export wrote and measured."""

    out_dir: str
    format: str
    config_kind: str
    """'stock' (stock architecture and config) or the compact model_type registered through auto_map."""
    dtype: str
    """'bf16', 'fp16' or 'fp32': the written floating-point tensors."""
    dense_parameters: int
    parameters: int
    weight_sparsity: float
    structural_sparsity: float
    max_abs_diff: float | None
    """Max |logits(export) - logits(masked model rounded to dtype)| on the verification batch, both in fp32;
    None with verify off."""
    atol: float | None
    """The bound max_abs_diff was checked against; None with verify off."""


def dtype_name(dtype: torch.dtype) -> str:
    return next(name for name, value in DTYPES.items() if value == dtype)


def check_out_dir(out_dir: str, overwrite: bool, source: str | None = None) -> None:
    """Raise ValueError when OUT_DIR is a file, is a non-empty directory and overwrite is off, or (with
    ``source``) is the source directory, contains it or lies inside it: nothing of the source may be
    replaced, whatever ``overwrite`` says."""
    if os.path.isfile(out_dir):
        raise ValueError(f"{out_dir} is a file; OUT_DIR must be a directory")
    if source is not None:
        out, src = os.path.realpath(out_dir), os.path.realpath(source)
        if out == src or src.startswith(out + os.sep):
            relation = "is" if out == src else "contains"
            raise ValueError(f"OUT_DIR {out_dir} {relation} the checkpoint {source}: writing the export there "
                             "would delete it; choose an OUT_DIR outside it")
        if out.startswith(src + os.sep):
            raise ValueError(f"OUT_DIR {out_dir} lies inside the checkpoint {source}; choose an OUT_DIR outside it")
    if os.path.isdir(out_dir) and os.listdir(out_dir) and not overwrite:
        raise ValueError(f"{out_dir} is not empty; pass --overwrite to replace it")


def check_threshold(threshold: float | None) -> None:
    """Raise ValueError unless ``threshold`` is None or a finite number >= 0."""
    if threshold is not None and not (math.isfinite(threshold) and threshold >= 0):
        raise ValueError(f"--threshold {threshold!r} is out of range: EPS must be a finite number >= 0 (and below "
                         "the largest |w| of a penalised matrix)")


def empty_model(config: PreTrainedConfig, task: str) -> torch.nn.Module:
    """The stock model for ``task``: parameters on the meta device (no memory), buffers real."""
    with init_empty_weights():
        model = auto_model_class(task, config.model_type).from_config(config)
    model.tie_weights()  # as from_pretrained does: tied names share one parameter
    return model.eval()


def checkpoint_skeleton(info: CheckpointInfo) -> torch.nn.Module:
    """The checkpoint's stock model as an empty skeleton (its weights are read later, one at a time)."""
    config = AutoConfig.from_pretrained(info.ckpt_dir)
    if model_task(info.task, config.model_type) == "classification" and info.num_labels:
        config.num_labels = info.num_labels
    return empty_model(config, info.task)


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


class MaskedWeights(Mapping):
    """name -> the fp32 tensor of the masked weights: pruned units zeroed and, with a threshold, every
    weight of a penalised matrix below it; read from ``weights`` on each access (nothing is kept). A tensor
    that masking changes is a copy; others (embeddings, norms) come as ``weights`` gives them: do not modify."""

    def __init__(self, weights: Fetch, names: list[str], arch: ResolvedArchitecture,
                 alive: Mapping[str, torch.Tensor], threshold: float | None):
        self._weights, self._names = weights, names
        self._rules = mask_rules(arch, alive)
        self._penalised = set(penalised_weights(arch))
        self.threshold = threshold
        self.largest = 0.0
        """Largest |w| of a penalised matrix seen so far, after unit masking and before the threshold."""

    def __getitem__(self, name: str) -> torch.Tensor:
        tensor = self._weights(name)
        penalised = name in self._penalised
        if name not in self._rules and not (penalised and self.threshold is not None):
            return tensor
        tensor = tensor.clone()
        mask_tensor_(tensor, self._rules.get(name, []), None)
        if penalised and self.threshold is not None:
            self.largest = max(self.largest, float(tensor.abs().max()) if tensor.numel() else 0.0)
            mask_tensor_(tensor, [], self.threshold)
        return tensor

    def __iter__(self):
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def _rounded(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def export_model(model: torch.nn.Module, alive: dict[str, torch.Tensor], out_dir: str, fmt: str, *,
                 task: str, neuroprune: NeuroPruneConfig, threshold: float | None = None,
                 source: dict | None = None, neuroprune_settings: dict | None = None,
                 tokenizer_dir: str | None = None, verify: bool = True, overwrite: bool = False,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, dtype: torch.dtype = torch.float32,
                 weights: Fetch | None = None) -> ExportReport:
    """Mask ``model`` and export it to ``out_dir``; consumes the model (it is left on the meta device).

    Args:
        model: a stock HF model with fp32 weights, or an empty skeleton (:func:`empty_model`) when ``weights``
            is given.
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
        verify: compare the export's logits with the masked model's (see the module docstring) and its
            parameter count, names and shapes with the expected ones.
        overwrite: replace a non-empty ``out_dir``.
        max_shard_bytes: safetensors shard size limit.
        dtype: of the written floating-point tensors.
        weights: name -> fp32 tensor of every state-dict entry of ``model`` (None: the model's own); called
            once per tensor per pass, the result not modified.

    Raises:
        ValueError: unknown format, a compact export the family or task does not support, a non-empty
            out_dir without overwrite, a threshold out of range, or a failed verification.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    check_out_dir(out_dir, overwrite)
    check_threshold(threshold)
    task = model_task(task, model.config.model_type)
    model_type = model.config.model_type
    arch = resolve_architecture(model)
    state = model.state_dict()
    names, parameter_names = unique_names(model)
    masked = MaskedWeights(weights or state.__getitem__, list(state), arch, alive, threshold)
    plan = make_plan(arch, masked, alive)  # reads the FFN matrices, one block at a time
    family = _compact_family(model, task, plan) if fmt == "compact" else None
    batch = verification_batch(model.config, task)
    reference = streamed_logits(model, lambda n: _rounded(masked[n], dtype), batch) if verify else None

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = _make_sibling_dir(out_dir, "tmp")
    try:
        if family is None:
            config_kind = "stock"
            _save_config(model, copy.deepcopy(model.config), tmp, dtype)
        else:
            config_kind = _write_compact_config(model, family, task, plan, tmp, dtype)
        penalised = penalised_weights(resolve_architecture(model, neuroprune))
        count = SparsityCount(neuroprune.epsilon)
        parameters = _write_weights(masked, names, state, parameter_names, penalised, count,
                                    None if family is None else plan, dtype, tmp, max_shard_bytes)
        _check_threshold_keeps_weights(masked)
        if tokenizer_dir and any(os.path.isfile(os.path.join(tokenizer_dir, f)) for f in TOKENIZER_FILES):
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
        max_abs_diff = atol = None
        if verify:
            atol = VERIFY_ATOL
            if dtype != torch.float32 and plan.bias_deltas() and family is not None:
                atol += float((streamed_logits(model, masked.__getitem__, batch) - reference).abs().max())
            max_abs_diff = _verify(tmp, task, batch, reference, parameters, atol, dtype)
        dense_parameters = sum(state[n].numel() for n in parameter_names)
        stats = count.figures()
        report = ExportReport(os.path.abspath(out_dir), fmt, config_kind, dtype_name(dtype), dense_parameters,
                              parameters, stats["weight_sparsity"], stats["structural_sparsity"], max_abs_diff, atol)
        _write_neuroprune_json(tmp, report, plan, neuroprune_settings or asdict(neuroprune), threshold, source,
                               model_type)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return report


def _write_weights(masked: MaskedWeights, names: list[str], state: Mapping[str, torch.Tensor],
                   parameter_names: set[str], penalised: list[str], count: SparsityCount, plan: ExportPlan | None,
                   dtype: torch.dtype, out_dir: str, max_shard_bytes: int) -> int:
    """Stream the masked weights (sliced per ``plan``; as they are when None), floating point ones cast to
    ``dtype``, to safetensors, counting the sparsity of the ``penalised`` matrices on the way.

    Args:
        state: the model's state dict (meta tensors of a skeleton will do): shapes and dtypes.

    Returns:
        The parameter count of the export (tied parameters once, buffers not counted).
    """
    selections, deltas = ({}, {}) if plan is None else (plan.selections(), plan.bias_deltas())
    specs = [TensorSpec(n, tuple(compact_shape(n, state[n].shape, selections)),
                        dtype if state[n].is_floating_point() else state[n].dtype) for n in names]
    kept = {spec.name: math.prod(spec.shape) for spec in specs}
    counted = set(penalised)

    def produce(name: str) -> torch.Tensor:
        tensor = masked[name]
        if name in counted:
            count.add(tensor, kept[name])
        return _rounded(compact_tensor(name, tensor, selections, deltas), dtype)

    write_safetensors(out_dir, specs, produce, max_shard_bytes)
    return sum(kept[n] for n in names if n in parameter_names)


def _check_threshold_keeps_weights(masked: MaskedWeights) -> None:
    """Raise ValueError when the threshold zeroed every penalised weight."""
    if masked.threshold is not None and masked.threshold > masked.largest:
        raise ValueError(f"--threshold {masked.threshold:g} zeroes every penalised weight (the largest |w| is "
                         f"{masked.largest:.4g}); allowed: 0 <= EPS <= {masked.largest:.4g}")


def convert(ckpt_dir: str, out_dir: str, fmt: str, *, tag: str | None = None, overwrite: bool = False,
            verify: bool = True, threshold: float | str | None = None, dtype: str | None = None,
            allow_incomplete: bool = False, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ExportReport:
    """Convert the checkpoint ``ckpt_dir`` (tag ``tag`` or 'latest') to ``out_dir``; see :func:`export_model`.

    ``threshold`` may be ``"epsilon"``: the run's ``neuroprune.epsilon``. ``dtype`` ('bf16', 'fp16', 'fp32';
    None: the dtype the run trained in) is that of the written floating-point tensors.

    Raises:
        ValueError: see :func:`export_model` and :func:`neuroprune_ds.export.checkpoint.read_checkpoint`; also
            an OUT_DIR that is, contains or lies inside the checkpoint.
    """
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r} is not one of {FORMATS}")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    check_out_dir(out_dir, overwrite, source=ckpt_dir)
    info = read_checkpoint(ckpt_dir, tag, allow_incomplete=allow_incomplete)
    if threshold == "epsilon":
        threshold = info.neuroprune.epsilon
    check_threshold(threshold)
    source = {"checkpoint": os.path.abspath(ckpt_dir), "tag": info.tag, "optimizer_steps": info.optimizer_steps,
              "name_or_path": info.name_or_path, "task": info.task}
    model = checkpoint_skeleton(info)
    weights = CheckpointWeights(info, list(model.state_dict()))
    return export_model(model, info.alive, out_dir, fmt, task=info.task, neuroprune=info.neuroprune,
                        threshold=threshold, source=source, neuroprune_settings=info.neuroprune_settings,
                        tokenizer_dir=ckpt_dir, verify=verify, overwrite=overwrite, max_shard_bytes=max_shard_bytes,
                        dtype=DTYPES[dtype] if dtype else info.training_dtype, weights=weights)


# -- compact config -------------------------------------------------------------------------------------
def _compact_family(model: torch.nn.Module, task: str, plan: ExportPlan) -> CompactFamily:
    model_type = model.config.model_type
    family = architecture_spec(model_type).compact
    if family is None:
        supported = sorted(name for name, spec in ARCHITECTURES.items() if spec.compact)
        raise ValueError(f"--format compact supports {', '.join(supported)}; {model_type!r} has no "
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
                          out_dir: str, dtype: torch.dtype) -> str:
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
            _save_config(model, config, out_dir, dtype)
            return "stock"
    module = load_module(family)
    settings = {k: v for k, v in model.config.to_dict().items()
                if k not in ("model_type", "architectures", "auto_map", "transformers_version")}
    config = getattr(module, family.config_class)(**settings, **fields)
    class_name = family.model_classes[task]
    stem = os.path.splitext(family.file_name)[0]
    config.architectures = [class_name]
    config.dtype = dtype
    config.auto_map = {"AutoConfig": f"{stem}.{family.config_class}",
                       AUTO_MODEL_CLASSES[task].__name__: f"{stem}.{class_name}"}
    config.save_pretrained(out_dir)
    _save_generation_config(model, out_dir)
    shutil.copyfile(module_source(family), os.path.join(out_dir, family.file_name))
    return family.model_type


def _save_config(model: torch.nn.Module, config: PreTrainedConfig, out_dir: str, dtype: torch.dtype) -> None:
    config.architectures = [type(model).__name__]
    config.dtype = dtype  # what from_pretrained(dtype="auto") loads
    config.save_pretrained(out_dir)
    _save_generation_config(model, out_dir)


def _save_generation_config(model: torch.nn.Module, out_dir: str) -> None:
    if model.can_generate():
        model.generation_config.save_pretrained(out_dir)


# -- verification and output ----------------------------------------------------------------------------
def _verify(out_dir: str, task: str, batch: dict, reference: torch.Tensor, expected_parameters: int,
            atol: float, dtype: torch.dtype) -> float:
    """Build the export's model as a user's ``from_pretrained`` would (its config.json, the registered compact
    classes), check that its files hold exactly the tensors that model has, shaped alike, and compare its
    logits (weights streamed from the files) with ``reference``."""
    model = empty_model(AutoConfig.from_pretrained(out_dir), task)
    state = model.state_dict()
    names, parameter_names = unique_names(model)
    files = ExportFiles(out_dir)
    if set(files.shapes) != set(names):
        extra, lacking = sorted(set(files.shapes) - set(names)), sorted(set(names) - set(files.shapes))
        raise ValueError(f"verification failed: the export's files hold {extra[:4]} beyond its model and lack "
                         f"{lacking[:4]}")
    wrong = [n for n in names if files.shapes[n] != tuple(state[n].shape)]
    if wrong:
        raise ValueError(f"verification failed: {wrong[0]} is stored as {files.shapes[wrong[0]]}, its model "
                         f"expects {tuple(state[wrong[0]].shape)}")
    parameters = sum(math.prod(files.shapes[n]) for n in parameter_names)
    if parameters != expected_parameters:
        raise ValueError(f"verification failed: the export loads with {parameters:,} parameters, "
                         f"expected {expected_parameters:,}")
    aliases = tied_names(model)
    diff = float((streamed_logits(model, lambda n: files.get(aliases.get(n, n)), batch) - reference).abs().max())
    if not diff <= atol:
        raise ValueError(f"verification failed: max |logits(export) - logits(masked model)| = {diff:.3g} > "
                         f"{atol:.3g} (weights {dtype_name(dtype)}, logits in fp32)")
    return diff


class ExportFiles:
    """The safetensors files of an export directory, read one tensor at a time.

    Each read opens the file anew: a ``safe_open`` handle keeps its file mapped, and every mapped page read
    stays in this process's resident set until the mapping goes (reading a whole export through one handle
    would end with the export resident).
    """

    def __init__(self, out_dir: str):
        index = os.path.join(out_dir, SAFE_WEIGHTS_INDEX_NAME)
        if os.path.isfile(index):
            with open(index) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
        else:
            files = [SAFE_WEIGHTS_NAME]
        self._file, self.shapes = {}, {}
        for file in files:
            path = os.path.join(out_dir, file)
            with safe_open(path, "pt") as handle:
                for name in handle.keys():
                    self._file[name] = path
                    self.shapes[name] = tuple(handle.get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        with safe_open(self._file[name], "pt") as handle:
            return handle.get_tensor(name)


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
        "dtype": report.dtype,
        "verification": {"max_abs_diff": report.max_abs_diff, "atol": report.atol,
                         "reference": f"masked model, weights rounded to {report.dtype}, logits in fp32"},
        "neuroprune_config": neuroprune_settings,
    }
    with open(os.path.join(out_dir, NEUROPRUNE_JSON), "w") as f:
        json.dump(record, f, indent=2)


def _make_sibling_dir(out_dir: str, kind: str) -> str:
    """A new hidden directory beside ``out_dir``, with the permissions of any directory the user creates
    (``os.mkdir`` applies the umask; ``tempfile.mkdtemp`` would make it 0700, and the export inherits them)."""
    parent, base = os.path.split(os.path.abspath(out_dir))
    while True:
        path = os.path.join(parent, f".{base}.{kind}-{secrets.token_hex(4)}")
        try:
            os.mkdir(path)
            return path
        except FileExistsError:
            continue


def _move_into_place(tmp: str, out_dir: str) -> None:
    """Rename the finished temporary directory to out_dir (an existing one goes only after that)."""
    if os.path.isdir(out_dir) and os.listdir(out_dir):
        old = _make_sibling_dir(out_dir, "old")
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
                         verify=not args.no_verify, threshold=args.threshold, dtype=args.dtype,
                         allow_incomplete=args.allow_incomplete)
    except ValueError as error:
        print(f"neuroprune convert: {error}", file=sys.stderr)
        return 2
    print(format_report(report))
    return 0


def format_report(report: ExportReport) -> str:
    """A few lines summarising an export, with this process's peak RSS."""
    fp32 = 4 * report.dense_parameters
    lines = [
        f"wrote {report.out_dir} ({report.format}, config {report.config_kind}, weights {report.dtype})",
        f"parameters: {report.dense_parameters:,} dense -> {report.parameters:,} exported "
        f"({report.parameters / report.dense_parameters:.3f}x); weight sparsity {report.weight_sparsity:.4f}, "
        f"structural sparsity {report.structural_sparsity:.4f}",
        "verification: skipped (--no-verify)" if report.max_abs_diff is None else
        f"verification: max |logits diff| {report.max_abs_diff:.2e} <= {report.atol:.2g} (against the masked model "
        f"rounded to {report.dtype}, logits in fp32)",
        f"peak RSS {peak_rss_bytes() / 2**30:.2f} GiB = {peak_rss_bytes() / fp32:.2f}x the fp32 model "
        f"({fp32 / 2**30:.2f} GiB)",
    ]
    return "\n".join(lines)
