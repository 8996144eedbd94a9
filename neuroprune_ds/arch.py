"""Architecture registry: what neuroprune_ds knows about each Hugging Face model family, in one place.

Everything family-specific is in ``ARCHITECTURES``: per ``config.model_type`` an ``ArchSpec`` with where
the attention blocks and FFNs live (training, export, report) and the compact model classes of its export
(``CompactFamily``). The rest of neuroprune_ds only sees the resolved ``AttentionBlock`` / ``FFNBlock``
records, which name parameters by their ``named_parameters()`` path, and the definitions made on them here:
which matrices NeuroPrune penalises (:func:`penalised_weights`) and which Auto factory builds a task's model
(:func:`auto_model_class`). To support a new family, add an ``ArchSpec`` under its ``config.model_type`` (or
call ``register_architecture``) -- see the README section "Adding an architecture".
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from dataclasses import dataclass, field, replace

import torch
from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoModelForSequenceClassification

from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.data import uses_text_to_text
from neuroprune_ds.heads import UnitLayout


@dataclass(frozen=True, slots=True)
class AttentionPattern:
    """Where one kind of attention block sits in a family's module tree.

    ``path`` is a regular expression fully matching the module path of the block, with a named group
    ``layer`` (and optionally ``stack``); q, k, v and o are the Linear submodules relative to that module.
    ``num_heads`` / ``num_kv_heads`` name config attributes, formatted with ``{stack}``.
    """

    path: str
    kind: str
    q: str
    k: str
    v: str
    o: str
    num_heads: str
    num_kv_heads: str | None = None
    relative_bias: str | None = None
    stack: str = "decoder"


@dataclass(frozen=True, slots=True)
class FFNPattern:
    """Where a family's FFN sits: ``inputs`` lists alternative sets of input projections (the first set
    whose modules all exist wins: T5 v1.1 gated ``wi_0``/``wi_1`` before v1.0 ``wi``)."""

    path: str
    inputs: tuple[tuple[str, ...], ...]
    output: str
    activation: str
    stack: str = "decoder"

    def input_set(self, exists: Callable[[str], bool]) -> tuple[str, ...] | None:
        """The first set of ``inputs`` whose every module ``exists`` (given its name relative to the block)."""
        return next((names for names in self.inputs if all(exists(name) for name in names)), None)


@dataclass(frozen=True, slots=True)
class CompactFamily:
    """How one family's kept sizes map onto its compact config (and, when uniform, its stock config).

    Keys are ``(stack, kind)`` of attention blocks and ``stack`` of FFN blocks, as the resolved blocks name
    them. The model classes are in ``neuroprune_ds/export/compact_models/<module>.py``.
    """

    module: str
    """File in ``neuroprune_ds.export.compact_models`` with the config and model classes."""
    config_class: str
    model_classes: dict[str, str]
    """model task ('causal_lm', 'seq2seq', 'classification'; see :func:`model_task`) -> model class name."""
    heads: dict[tuple[str, str], str]
    """per-layer field of kept query heads."""
    ffn: dict[str, str]
    """per-layer field of kept FFN units."""
    kv_heads: dict[tuple[str, str], str] = field(default_factory=dict)
    """per-layer field of kept KV heads (grouped-query attention)."""
    relative_bias: dict[str, str] = field(default_factory=dict)
    """per-layer field of each layer's relative-bias table columns."""
    stock_heads: dict[tuple[str, str], str] | None = None
    """uniform stock attribute of each head field; None: the stock config derives the head size from the
    head count, so only unpruned attention fits it."""
    stock_kv_heads: dict[tuple[str, str], str] = field(default_factory=dict)
    stock_ffn: dict[str, str] = field(default_factory=dict)
    name: str | None = None
    """the compact model_type's suffix where one module serves several families (default: ``module``)."""

    @property
    def model_type(self) -> str:
        return f"neuroprune_{self.name or self.module}"

    @property
    def file_name(self) -> str:
        """The modeling file's name inside an export directory."""
        return f"modeling_{self.model_type}.py"


@dataclass(frozen=True, slots=True)
class ArchSpec:
    """Everything neuroprune_ds knows about one family: its blocks and, when it has them, its compact model
    classes (None: ``--format compact`` refuses it)."""

    attention: tuple[AttentionPattern, ...]
    ffn: tuple[FFNPattern, ...]
    compact: CompactFamily | None = None


@dataclass(frozen=True, slots=True)
class Linear:
    """Parameter names and shape of one nn.Linear (weight is (out_features, in_features))."""

    weight: str
    bias: str | None
    out_features: int
    in_features: int


@dataclass(frozen=True, slots=True)
class AttentionBlock:
    """One attention block. The prunable unit is a KV group: ``heads_per_unit`` query heads sharing one K
    and one V head (1 for multi-head attention)."""

    name: str
    stack: str
    layer: int
    kind: str
    q: Linear
    k: Linear
    v: Linear
    o: Linear
    num_heads: int
    num_kv_heads: int
    head_dim: int
    relative_bias: str | None

    @property
    def num_units(self) -> int:
        return self.num_kv_heads

    @property
    def heads_per_unit(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def layout(self) -> UnitLayout:
        """How this block's weights split into prunable units."""
        return UnitLayout(self.num_units, self.heads_per_unit, self.head_dim)


@dataclass(frozen=True, slots=True)
class FFNBlock:
    """One feed-forward block; hidden unit i is row i of every input projection and column i of the output."""

    name: str
    stack: str
    layer: int
    inputs: tuple[Linear, ...]
    output: Linear
    activation: str

    @property
    def width(self) -> int:
        return self.output.in_features


@dataclass(frozen=True, slots=True)
class ResolvedArchitecture:
    model_type: str
    attention: tuple[AttentionBlock, ...]
    ffn: tuple[FFNBlock, ...]


def _llama_like(prefix: str) -> ArchSpec:
    """LLaMA, Mistral and Qwen2: the same modules, and one compact module (``llama.py``) with a class each."""
    return ArchSpec(
        attention=(
            AttentionPattern(r"(.*\.)?layers\.(?P<layer>\d+)\.self_attn", "self", "q_proj", "k_proj", "v_proj",
                             "o_proj", num_heads="num_attention_heads", num_kv_heads="num_key_value_heads"),
        ),
        ffn=(FFNPattern(r"(.*\.)?layers\.(?P<layer>\d+)\.mlp", (("gate_proj", "up_proj"),), "down_proj",
                        activation="hidden_act"),),
        compact=CompactFamily(
            "llama", f"NeuroPrune{prefix}Config",
            {"causal_lm": f"NeuroPrune{prefix}ForCausalLM",
             "classification": f"NeuroPrune{prefix}ForSequenceClassification"},
            heads={("decoder", "self"): "num_attention_heads_per_layer"},
            kv_heads={("decoder", "self"): "num_key_value_heads_per_layer"},
            ffn={"decoder": "intermediate_size_per_layer"},
            stock_heads={("decoder", "self"): "num_attention_heads"},
            stock_kv_heads={("decoder", "self"): "num_key_value_heads"},
            stock_ffn={"decoder": "intermediate_size"},
            name=prefix.lower()),
    )


_BART_ATTENTION = dict(q="q_proj", k="k_proj", v="v_proj", o="out_proj", num_heads="{stack}_attention_heads")

ARCHITECTURES: dict[str, ArchSpec] = {
    "llama": _llama_like("Llama"),
    "mistral": _llama_like("Mistral"),
    "qwen2": _llama_like("Qwen2"),
    "opt": ArchSpec(
        attention=(AttentionPattern(r"(.*\.)?decoder\.layers\.(?P<layer>\d+)\.self_attn", "self", "q_proj",
                                    "k_proj", "v_proj", "out_proj", num_heads="num_attention_heads"),),
        ffn=(FFNPattern(r"(.*\.)?decoder\.layers\.(?P<layer>\d+)", (("fc1",),), "fc2",
                        activation="activation_function"),),
        compact=CompactFamily(
            "opt", "NeuroPruneOPTConfig",
            {"causal_lm": "NeuroPruneOPTForCausalLM", "classification": "NeuroPruneOPTForSequenceClassification"},
            heads={("decoder", "self"): "num_attention_heads_per_layer"},
            ffn={"decoder": "ffn_dim_per_layer"},
            stock_ffn={"decoder": "ffn_dim"}),
    ),
    "bart": ArchSpec(
        attention=(
            AttentionPattern(r"(.*\.)?(?P<stack>encoder|decoder)\.layers\.(?P<layer>\d+)\.self_attn", "self",
                             **_BART_ATTENTION),
            AttentionPattern(r"(.*\.)?(?P<stack>decoder)\.layers\.(?P<layer>\d+)\.encoder_attn", "cross",
                             **_BART_ATTENTION),
        ),
        ffn=(FFNPattern(r"(.*\.)?(?P<stack>encoder|decoder)\.layers\.(?P<layer>\d+)", (("fc1",),), "fc2",
                        activation="activation_function"),),
        compact=CompactFamily(
            "bart", "NeuroPruneBartConfig",
            {"seq2seq": "NeuroPruneBartForConditionalGeneration",
             "classification": "NeuroPruneBartForSequenceClassification"},
            heads={("encoder", "self"): "encoder_attention_heads_per_layer",
                   ("decoder", "self"): "decoder_attention_heads_per_layer",
                   ("decoder", "cross"): "decoder_cross_attention_heads_per_layer"},
            ffn={"encoder": "encoder_ffn_dim_per_layer", "decoder": "decoder_ffn_dim_per_layer"},
            stock_ffn={"encoder": "encoder_ffn_dim", "decoder": "decoder_ffn_dim"}),
    ),
    "t5": ArchSpec(
        attention=(
            AttentionPattern(r"(.*\.)?(?P<stack>encoder|decoder)\.block\.(?P<layer>\d+)\.layer\.0\.SelfAttention",
                             "self", "q", "k", "v", "o", num_heads="num_heads",
                             relative_bias="relative_attention_bias"),
            AttentionPattern(r"(.*\.)?(?P<stack>decoder)\.block\.(?P<layer>\d+)\.layer\.1\.EncDecAttention",
                             "cross", "q", "k", "v", "o", num_heads="num_heads"),
        ),
        ffn=(FFNPattern(r"(.*\.)?(?P<stack>encoder|decoder)\.block\.(?P<layer>\d+)\.layer\.\d+\.DenseReluDense",
                        (("wi_0", "wi_1"), ("wi",)), "wo", activation="dense_act_fn"),),
        compact=CompactFamily(
            "t5", "NeuroPruneT5Config",
            {"seq2seq": "NeuroPruneT5ForConditionalGeneration"},
            heads={("encoder", "self"): "num_heads_per_layer", ("decoder", "self"): "decoder_num_heads_per_layer",
                   ("decoder", "cross"): "decoder_cross_num_heads_per_layer"},
            ffn={"encoder": "d_ff_per_layer", "decoder": "decoder_d_ff_per_layer"},
            relative_bias={"encoder": "relative_bias_heads_per_layer",
                           "decoder": "decoder_relative_bias_heads_per_layer"},
            stock_heads={("encoder", "self"): "num_heads", ("decoder", "self"): "num_heads",
                         ("decoder", "cross"): "num_heads"},
            stock_ffn={"encoder": "d_ff", "decoder": "d_ff"}),
    ),
    "bert": ArchSpec(
        attention=(AttentionPattern(r"(.*\.)?encoder\.layer\.(?P<layer>\d+)\.attention", "self", "self.query",
                                    "self.key", "self.value", "output.dense", num_heads="num_attention_heads",
                                    stack="encoder"),),
        ffn=(FFNPattern(r"(.*\.)?encoder\.layer\.(?P<layer>\d+)", (("intermediate.dense",),), "output.dense",
                        activation="hidden_act", stack="encoder"),),
        compact=CompactFamily(
            "bert", "NeuroPruneBertConfig",
            {"classification": "NeuroPruneBertForSequenceClassification"},
            heads={("encoder", "self"): "num_attention_heads_per_layer"},
            ffn={"encoder": "intermediate_size_per_layer"},
            stock_ffn={"encoder": "intermediate_size"}),
    ),
}
# mT5 has T5's modules; its compact export is not supported (no compact class has been checked against it).
ARCHITECTURES["mt5"] = replace(ARCHITECTURES["t5"], compact=None)

AUTO_MODEL_CLASSES = {"causal_lm": AutoModelForCausalLM, "seq2seq": AutoModelForSeq2SeqLM,
                      "classification": AutoModelForSequenceClassification}
"""model task -> the transformers Auto factory that builds its model."""


def register_architecture(model_type: str, spec: ArchSpec) -> None:
    """Add (or replace) the mapping for an HF ``config.model_type``."""
    ARCHITECTURES[model_type] = spec


def architecture_spec(model_type: str) -> ArchSpec:
    """The registered spec of ``model_type``.

    Raises:
        ValueError: ``model_type`` is not registered (the message lists those that are).
    """
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"model_type {model_type!r} is not supported; supported: {', '.join(sorted(ARCHITECTURES))}. "
            "To add it, map its attention and FFN modules with neuroprune_ds.arch.register_architecture("
            f"{model_type!r}, ArchSpec(...)) -- see the README section 'Adding an architecture'.")
    return ARCHITECTURES[model_type]


def model_task(task: str, model_type: str) -> str:
    """The task of the model a run of ``task`` trains and exports: a text-to-text family (T5) classifies
    with its seq2seq model, generating the label names."""
    return "seq2seq" if uses_text_to_text(task, model_type) else task


def auto_model_class(task: str, model_type: str) -> type:
    """The transformers Auto factory (``AutoModelFor...``) of a run of ``task`` on ``model_type``."""
    return AUTO_MODEL_CLASSES[model_task(task, model_type)]


def penalised_weights(arch: ResolvedArchitecture) -> list[str]:
    """Names of the matrices NeuroPrune penalises: Q, K and V of every attention block (the attention
    inputs) and every FFN input and output projection. The attention output projection is not penalised
    (docs/algorithm.md section 2), so it is neither thresholded at export nor counted in the sparsity."""
    names = [lin.weight for b in arch.attention for lin in (b.q, b.k, b.v)]
    return names + [lin.weight for b in arch.ffn for lin in (*b.inputs, b.output)]


def ffn_input_weights(model_type: str, block: str, available: Collection[str]) -> list[str]:
    """Parameter names of the input projections of FFN ``block`` of a ``model_type`` model, from the weight
    names ``available`` (e.g. a safetensors file's) alone: the first complete set, as for a model.

    Raises:
        ValueError: unknown ``model_type``, or no complete set of input weights of ``block`` is available.
    """
    for pattern in architecture_spec(model_type).ffn:
        if re.fullmatch(pattern.path, block):
            names = pattern.input_set(lambda name: f"{block}.{name}.weight" in available)
            if names is not None:
                return [f"{block}.{name}.weight" for name in names]
    raise ValueError(f"FFN block {block!r}: its input projections are not among the weights")


def resolve_architecture(model: torch.nn.Module, config: NeuroPruneConfig | None = None) -> ResolvedArchitecture:
    """Find the attention blocks and FFNs of ``model`` that NeuroPrune works on.

    Works on meta-device models and on ZeRO-3 partitioned models (shapes come from ``ds_shape``).

    Args:
        model: a Hugging Face model (its ``config.model_type`` selects the mapping).
        config: target/exclude patterns and attention kinds; None selects every block.

    Returns:
        The selected blocks, in module order.

    Raises:
        ValueError: unknown model_type, a target or exclude pattern that matches no block, patterns that
            leave no block while NeuroPrune is enabled, or an
            attention block whose shapes disagree with the config.
    """
    config = config or NeuroPruneConfig()
    model_type = model.config.model_type
    spec = architecture_spec(model_type)
    modules = dict(model.named_modules())
    attention, ffn = [], []
    for path in modules:
        for pattern in spec.attention:
            match = re.fullmatch(pattern.path, path)
            if match:
                attention.append(_attention_block(model.config, modules, path, match, pattern))
        for pattern in spec.ffn:
            match = re.fullmatch(pattern.path, path)
            if match and _has_all(modules, path, (pattern.output,)):
                ffn.append(_ffn_block(model.config, modules, path, match, pattern))
    if not attention and not ffn:
        raise ValueError(f"no attention or FFN block of {model_type!r} found in {type(model).__name__}; "
                         "its module names differ from the registered mapping in neuroprune_ds.arch")
    attention = [b for b in attention if b.kind in config.attention_kinds]
    return _select(model_type, attention, ffn, config)


def _select(model_type, attention, ffn, config) -> ResolvedArchitecture:
    names = [b.name for b in attention] + [b.name for b in ffn]
    errors = []
    for field_name, patterns in (("target_modules", config.target_modules or []),
                                 ("exclude_modules", config.exclude_modules)):
        for pattern in patterns:
            if not any(_matches(pattern, name) for name in names):
                errors.append(f"neuroprune.{field_name}: {pattern!r} matches no attention/FFN block; "
                              f"blocks look like {names[:1] + names[-1:]}")
    if errors:
        raise ValueError("\n".join(errors))

    def selected(block) -> bool:
        if config.target_modules is not None and not any(_matches(p, block.name) for p in config.target_modules):
            return False
        return not any(_matches(p, block.name) for p in config.exclude_modules)

    kept = ResolvedArchitecture(model_type, tuple(b for b in attention if selected(b)),
                                tuple(b for b in ffn if selected(b)))
    if config.enabled and not kept.attention and not kept.ffn:
        raise ValueError(f"neuroprune.target_modules={config.target_modules!r} with neuroprune.exclude_modules="
                         f"{config.exclude_modules!r} leave no attention/FFN block to prune; select at least one, "
                         "or set neuroprune.enabled=false for plain fine-tuning")
    return kept


def _matches(pattern: str, name: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def _has_all(modules, path, names) -> bool:
    return all(f"{path}.{n}" in modules for n in names)


def _linear(modules, path) -> Linear:
    module = modules[path]
    weight = module.weight
    out_features, in_features = tuple(getattr(weight, "ds_shape", weight.shape))
    bias = f"{path}.bias" if getattr(module, "bias", None) is not None else None
    return Linear(f"{path}.weight", bias, out_features, in_features)


def _stack(match, pattern) -> str:
    return match.groupdict().get("stack") or pattern.stack


def _attention_block(model_config, modules, path, match, pattern) -> AttentionBlock:
    stack = _stack(match, pattern)
    q, k, v, o = (_linear(modules, f"{path}.{name}") for name in (pattern.q, pattern.k, pattern.v, pattern.o))
    num_heads = getattr(model_config, pattern.num_heads.format(stack=stack))
    num_kv_heads = num_heads
    if pattern.num_kv_heads is not None:
        num_kv_heads = getattr(model_config, pattern.num_kv_heads, None) or num_heads
    head_dim = q.out_features // num_heads
    problems = []
    if q.out_features != num_heads * head_dim or o.in_features != q.out_features:
        problems.append(f"q has {q.out_features} outputs and o {o.in_features} inputs for {num_heads} heads")
    if k.out_features != num_kv_heads * head_dim or v.out_features != k.out_features:
        problems.append(f"k/v have {k.out_features}/{v.out_features} outputs, expected "
                        f"{num_kv_heads} KV heads x {head_dim}")
    if not q.in_features == k.in_features == v.in_features:
        problems.append("q, k and v have different input sizes, so input dimension groups are undefined")
    if num_heads % num_kv_heads:
        problems.append(f"{num_heads} heads do not split into {num_kv_heads} KV groups")
    if problems:
        raise ValueError(f"attention block {path}: " + "; ".join(problems))
    relative_bias = None
    if pattern.relative_bias and f"{path}.{pattern.relative_bias}" in modules:
        relative_bias = f"{path}.{pattern.relative_bias}.weight"
    return AttentionBlock(path, stack, int(match.group("layer")), pattern.kind, q, k, v, o, num_heads,
                          num_kv_heads, head_dim, relative_bias)


def _ffn_block(model_config, modules, path, match, pattern) -> FFNBlock:
    names = pattern.input_set(lambda name: f"{path}.{name}" in modules)
    if names is None:
        raise ValueError(f"FFN block {path}: none of the input projections {pattern.inputs} exist")
    inputs = tuple(_linear(modules, f"{path}.{n}") for n in names)
    output = _linear(modules, f"{path}.{pattern.output}")
    if any(i.out_features != output.in_features for i in inputs):
        raise ValueError(f"FFN block {path}: input projections {[i.out_features for i in inputs]} do not "
                         f"match the output projection's {output.in_features} inputs")
    return FFNBlock(path, _stack(match, pattern), int(match.group("layer")), inputs, output,
                    str(getattr(model_config, pattern.activation)))
