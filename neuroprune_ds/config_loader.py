"""Load a :class:`~neuroprune_ds.config.RunConfig` from YAML or JSON, apply ``key=value`` overrides, validate
it and save it (the DeepSpeed JSON's rules are in :mod:`neuroprune_ds.deepspeed_config`).

Every problem found is collected and reported at once in one :class:`ConfigError`, one line per problem,
each naming the dotted field, the offending value and what is allowed. The per-field range rules live in
one table, ``RULES``.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import types
import typing
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from neuroprune_ds.config import RunConfig, ScheduleConfig


class ConfigError(ValueError):
    """Every problem found in a configuration; ``errors`` holds one message per problem."""

    def __init__(self, errors: Iterable[str]):
        self.errors = list(errors)
        lines = "\n".join(f"  - {error}" for error in self.errors)
        super().__init__(f"{len(self.errors)} error(s) in the configuration:\n{lines}")


# ---------------------------------------------------------------------------------------------------------
# Loading and overrides


def load_config(path: str | Path, overrides: Iterable[str] = ()) -> RunConfig:
    """Read a run configuration file and apply command-line overrides.

    Args:
        path: a ``.json`` file, or YAML (any other suffix). Sections and keys mirror :class:`RunConfig`.
        overrides: ``dotted.key=value`` strings applied in order; values are parsed as YAML
            (``neuroprune.attention_kinds=[self]``, ``neuroprune.target_modules=null``).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: the file cannot be read or parsed, or any key, type or range is wrong (all reported).
    """
    path = Path(path)
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        reason = error.strerror if isinstance(error, OSError) else "not UTF-8 text"
        raise ConfigError([f"cannot read config file {str(path)!r}: {reason}"]) from error
    duplicates: list[str] = []
    try:
        if path.suffix == ".json":
            raw = json.loads(text, object_pairs_hook=_dict_noting_duplicates(duplicates))
        else:
            loader = _UniqueKeyLoader(text)
            try:
                raw = loader.get_single_data()
            finally:
                loader.dispose()
            duplicates += loader.duplicates
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError([f"cannot parse {str(path)!r}: {_one_line(error)}"]) from error
    if duplicates:
        raise ConfigError([f"{str(path)!r}: key {key} appears more than once (only one value would be used)"
                           for key in duplicates])
    return config_from_dict({} if raw is None else raw, overrides)


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.safe_load`` that records every key repeated within one mapping (PyYAML keeps the last value)."""

    def __init__(self, stream):
        super().__init__(stream)
        self.duplicates: list[str] = []

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            first_line: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<' merges are meant to be overridden
                key = self.construct_object(key_node, deep=True)
                line = key_node.start_mark.line + 1
                if key in first_line:
                    self.duplicates.append(f"{key!r} (lines {first_line[key]} and {line})")
                else:
                    first_line[key] = line
        return super().construct_mapping(node, deep=deep)


def _dict_noting_duplicates(duplicates: list[str]) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A ``json.loads`` object hook that appends each key an object repeats to ``duplicates``."""

    def pairs_to_dict(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        keys = [key for key, _ in pairs]
        duplicates.extend(repr(key) for key in sorted({key for key in keys if keys.count(key) > 1}))
        return dict(pairs)

    return pairs_to_dict


def config_from_dict(raw: Any, overrides: Iterable[str] = ()) -> RunConfig:
    """Build and validate a :class:`RunConfig` from plain data (as parsed from YAML/JSON).

    Args:
        raw: a mapping of sections and keys mirroring :class:`RunConfig`; it is not modified.
        overrides: ``dotted.key=value`` strings, as for :func:`load_config`.

    Returns:
        The validated configuration.

    Raises:
        ConfigError: any unknown key, malformed override, wrong type or value out of range (all reported).
    """
    if not isinstance(raw, dict):
        raise ConfigError([f"the configuration must be a mapping of sections and keys, got {raw!r}"])
    errors: list[str] = []
    raw = _deep_copy_dicts(raw)
    for override in overrides:
        _apply_override(raw, override, errors)
    bad_paths: set[str] = set()
    config = _build(RunConfig, raw, "", errors, bad_paths)
    errors += _rule_errors(config, skip=bad_paths)
    if not {"schedule", "schedule.warmup_steps", "schedule.max_steps"} & bad_paths:
        errors += warmup_errors(config.schedule, config.schedule.max_steps)
    if errors:
        raise ConfigError(errors)
    return config


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())


def _deep_copy_dicts(raw: dict) -> dict:
    return {key: _deep_copy_dicts(value) if isinstance(value, dict) else value for key, value in raw.items()}


def _apply_override(raw: dict, override: str, errors: list[str]) -> None:
    key, sep, value_text = override.partition("=")
    if not sep or not key:
        errors.append(f"override {override!r}: expected key=value, e.g. neuroprune.mlp_lambda=1e-4")
        return
    try:
        value = yaml.safe_load(value_text)
    except yaml.YAMLError as error:
        errors.append(f"override {override!r}: cannot parse {value_text!r} as a YAML value "
                      f"({_one_line(error)})")
        return
    cls, node, prefix = RunConfig, raw, ""
    *sections, leaf = key.split(".")
    for section in sections:
        if section not in _field_types(cls):
            # 'train.max_steps': unless the section is a near miss, its leaf says best which field was meant.
            homes = [path for path in _leaf_paths(RunConfig) if path.rpartition(".")[2] == leaf]
            near_miss = _nearest(section, _field_types(cls)) is not None
            errors.append(f"unknown key {key!r} — did you mean {homes[0]!r}?" if homes and not near_miss
                          else _unknown_key_message(cls, prefix, section))
            return
        field_type = _field_types(cls)[section]
        if not dataclasses.is_dataclass(field_type):
            errors.append(f"override {override!r}: {prefix + section!r} is a value, not a section")
            return
        child = node.setdefault(section, {})
        if not isinstance(child, dict):
            return  # the file's non-mapping section is reported when the config is built
        cls, node, prefix = field_type, child, f"{prefix}{section}."
    if leaf not in _field_types(cls):
        errors.append(_unknown_key_message(cls, prefix, leaf))
        return
    node[leaf] = value


# ---------------------------------------------------------------------------------------------------------
# Building typed dataclasses from plain data


@functools.cache
def _field_types(cls: type) -> dict[str, Any]:
    """Field name -> resolved annotation, in declaration order."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


_INVALID = object()


def _build(cls: type, raw: dict, prefix: str, errors: list[str], bad_paths: set[str]) -> Any:
    """Instantiate ``cls`` from ``raw``; wrong entries are reported and left at their defaults."""
    kwargs = {}
    for key, value in raw.items():
        key = str(key)
        if key not in _field_types(cls):
            errors.append(_unknown_key_message(cls, prefix, key))
            continue
        converted = _convert(value, _field_types(cls)[key], prefix + key, errors, bad_paths)
        if converted is _INVALID:
            bad_paths.add(prefix + key)
        else:
            kwargs[key] = converted
    return cls(**kwargs)


def _convert(value: Any, tp: Any, path: str, errors: list[str], bad_paths: set[str]) -> Any:
    """Check ``value`` against annotation ``tp``; return it (converted where lossless) or ``_INVALID``."""
    args = typing.get_args(tp)
    if isinstance(tp, types.UnionType) and type(None) in args:
        if value is None:
            return None
        (tp,) = (arg for arg in args if arg is not type(None))
    if dataclasses.is_dataclass(tp):
        if isinstance(value, dict):
            return _build(tp, value, path + ".", errors, bad_paths)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        number = _as_float(value)
        if number is not None:
            return number
    elif tp is str:
        if isinstance(value, str):
            return value
    elif typing.get_origin(tp) is list and typing.get_args(tp) == (str,):
        if isinstance(value, list) and all(isinstance(item, str) for item in value):
            return list(value)
    else:
        raise TypeError(f"{path}: annotation {tp!r} is not supported by the config loader")
    errors.append(f"{path}: {value!r} is not {_describe(tp)}{' or null' if type(None) in args else ''}"
                  f"{_quote_hint(tp, value)}")
    return _INVALID


def _as_float(value: Any) -> float | None:
    # PyYAML reads '1e-4' (no dot) as a string, so numeric strings are accepted for float fields.
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        return None
    try:
        number = float(value)
    except ValueError:
        return None
    return number if math.isfinite(number) else None


_TYPE_NAMES = {bool: "true or false", int: "an integer", float: "a finite number", str: "a string",
               list[str]: "a list of strings"}


def _describe(tp: Any) -> str:
    if dataclasses.is_dataclass(tp):
        return f"a mapping of {tp.__name__} keys ({', '.join(_field_types(tp))})"
    return _TYPE_NAMES[tp]


def _quote_hint(tp: Any, value: Any) -> str:
    if tp is str and isinstance(value, int | float | bool | dict):
        return " (quote it to pass it as a string)"
    return ""


# ---------------------------------------------------------------------------------------------------------
# Unknown keys and nearest matches


def _nearest(word: str, candidates: Iterable[str]) -> str | None:
    matches = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return matches[0] if matches else None


def _leaf_paths(cls: type, prefix: str = "") -> Iterator[str]:
    """Dotted paths of every non-section field under ``cls``."""
    for name, field_type in _field_types(cls).items():
        if dataclasses.is_dataclass(field_type):
            yield from _leaf_paths(field_type, f"{prefix}{name}.")
        else:
            yield prefix + name


def _unknown_key_message(cls: type, prefix: str, key: str) -> str:
    """Suggest a key of the same section first, else a field of the same name anywhere (misplaced keys)."""
    local = _nearest(key, _field_types(cls))
    if local is not None:
        guess = prefix + local
    else:
        leaves = {path.rpartition(".")[2]: path for path in reversed(list(_leaf_paths(RunConfig)))}
        leaf = _nearest(key, leaves)
        guess = None if leaf is None else leaves[leaf]
    message = f"unknown key {prefix + key!r}"
    if guess is not None:
        return f"{message} — did you mean {guess!r}?"
    where = f"in {prefix[:-1]!r}" if prefix else "at the top level"
    return f"{message}; valid keys {where}: {', '.join(_field_types(cls))}"


# ---------------------------------------------------------------------------------------------------------
# Range rules: the one place that says which values each field accepts


@dataclasses.dataclass(frozen=True, slots=True)
class Rule:
    """What a field accepts: ``check(value)`` is true for allowed values, described by ``allowed``.
    ``choices`` feed the "did you mean" suggestion; ``notes`` explain specific rejected values."""

    check: Callable[[Any], bool]
    allowed: str
    choices: tuple[str, ...] = ()
    notes: dict[str, str] = dataclasses.field(default_factory=dict)


def _at_least(bound: float) -> Rule:
    return Rule(lambda value: value >= bound, f">= {bound}")


def _positive() -> Rule:
    return Rule(lambda value: value > 0, "> 0")


def _one_of(*choices: str, notes: dict[str, str] | None = None) -> Rule:
    return Rule(lambda value: value in choices, "one of " + ", ".join(map(repr, choices)), choices,
                notes or {})


def _non_empty_subset_of(*choices: str) -> Rule:
    return Rule(lambda value: bool(value) and set(value) <= set(choices),
                "a non-empty list of " + ", ".join(map(repr, choices)), choices)


_NON_EMPTY = Rule(lambda value: bool(value.strip()), "a non-empty string")

RULES: dict[str, Rule] = {
    "task": _one_of("causal_lm", "seq2seq", "classification"),
    "num_labels": _at_least(1),
    "model.name_or_path": _NON_EMPTY,
    "model.dtype": _one_of("fp32", "bf16", notes={
        "fp16": "fp16 does not run on CPU DeepSpeed and is not supported; use 'bf16'"}),
    "data.train": _NON_EMPTY,
    "data.eval_fraction": Rule(lambda value: 0 <= value < 1, "in [0, 1)"),
    "data.max_length": _at_least(1),
    "data.max_target_length": _at_least(1),
    "data.max_train_examples": _at_least(0),
    "data.max_eval_examples": _at_least(0),
    "data.num_proc": _at_least(1),
    "schedule.epochs": _at_least(1),
    "schedule.max_steps": _at_least(1),
    "schedule.micro_batch_size": _at_least(1),
    "schedule.gradient_accumulation_steps": _at_least(1),
    "schedule.lr": _positive(),
    "schedule.weight_decay": _at_least(0),
    "schedule.optimizer": _one_of("torch", "fused", "cpu_adam"),
    "schedule.warmup_steps": _at_least(0),
    "schedule.lr_scheduler": _one_of("linear", "cosine", "constant"),
    "schedule.grad_clip": _at_least(0),
    "schedule.eval_every_steps": _at_least(0),
    "schedule.log_every_steps": _at_least(1),
    "schedule.seed": _at_least(0),
    "checkpoint.every_steps": _at_least(0),
    "checkpoint.keep_last": _at_least(1),
    "checkpoint.resume": Rule(lambda value: value in ("auto", "never") or Path(value).exists(),
                              "'auto', 'never' or the path of an existing checkpoint", ("auto", "never")),
    "checkpoint.on_nonfinite": _one_of("stop", "skip"),
    "neuroprune.penalty": _one_of("neuroprune", "l1"),
    "neuroprune.mlp_lambda": _at_least(0),
    "neuroprune.attn_lambda": _at_least(0),
    "neuroprune.lambda_warmup_steps": _at_least(0),
    "neuroprune.epsilon": _positive(),
    "neuroprune.c_min": Rule(lambda value: 0 < value <= 1, "in (0, 1]"),
    "neuroprune.delta": _positive(),
    "neuroprune.degree_every": _at_least(1),
    "neuroprune.mlp_groups": _one_of("neuron", "output_rows"),
    "neuroprune.attention_kinds": _non_empty_subset_of("self", "cross"),
    "neuroprune.theta": _at_least(0),
    "neuroprune.fold": _one_of("output_projection", "none"),
    "neuroprune.prune_every_steps": _at_least(0),
    "neuroprune.prune_start_step": _at_least(0),
    "neuroprune.target_sparsity": Rule(lambda value: 0 < value < 1, "in (0, 1)"),
    "neuroprune.target_ramp_steps": _at_least(0),
    "neuroprune.controller_gain": _positive(),
    "neuroprune.update": _one_of("gradient", "decoupled"),
    "neuroprune.recover_steps": _at_least(0),
    "neuroprune.theta_mode": _one_of("absolute", "relative"),
    "neuroprune.prune_ffn_units_below": Rule(lambda value: 0 < value <= 1, "in (0, 1]"),
    "neuroprune.prune_ffn_units_fraction": Rule(lambda value: 0 < value < 1, "in (0, 1)"),
    "neuroprune.ffn_unit_score": _one_of("taylor", "connectivity"),
}


def validate(config: RunConfig) -> list[str]:
    """Check every field of an already typed configuration against ``RULES``.

    Args:
        config: a configuration built in code (loaders call this themselves).

    Returns:
        One message per violated rule; empty when the configuration is valid.
    """
    return _rule_errors(config, skip=set())


def _rule_errors(config: RunConfig, skip: set[str]) -> list[str]:
    errors = []
    for path, rule in RULES.items():
        if any(path == bad or path.startswith(bad + ".") for bad in skip):
            continue  # its type error is already reported
        value = functools.reduce(getattr, path.split("."), config)
        if value is None or rule.check(value):
            continue
        message = f"{path}: {value!r} is not allowed; expected {rule.allowed}"
        items = value if isinstance(value, list) else [value]
        rejected = [item for item in items if item not in rule.choices]
        guess = _nearest(rejected[0], rule.choices) if rule.choices and rejected else None
        note = rule.notes.get(value) if isinstance(value, str) else None
        if note is not None:
            message += f" ({note})"
        elif guess is not None:
            message += f" — did you mean {guess!r}?"
        errors.append(message)
    return errors


def warmup_errors(schedule: ScheduleConfig, total_steps: int | None) -> list[str]:
    """A warm-up longer than the run (``total_steps``: max_steps, or the epochs' steps once the data is known).

    Returns:
        One message when ``schedule.warmup_steps`` exceeds ``total_steps``; empty otherwise.
    """
    if total_steps is None or schedule.warmup_steps is None or schedule.warmup_steps <= total_steps:
        return []
    return [f"schedule.warmup_steps: {schedule.warmup_steps} is more than the run's {total_steps} optimizer steps "
            f"(the learning rate would never reach schedule.lr = {schedule.lr}); expected at most {total_steps}"]


# ---------------------------------------------------------------------------------------------------------
# Paths the run reads or writes


def check_paths(run: RunConfig) -> list[str]:
    """Check the local paths of a run before anything is loaded: model, tokenizer, data and output_dir.

    Names that do not look like local paths are taken as hub names and left to the loaders.

    Returns:
        One message per path that cannot work; empty when none is wrong.
    """
    from neuroprune_ds.data import looks_like_local_path  # imports transformers: only where paths are checked

    errors = []
    output_dir = Path(run.output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        errors.append(f"output_dir: {run.output_dir!r} is a file; expected a directory (it is created if missing)")
    errors += _model_dir_errors("model.name_or_path", run.model.name_or_path, run.model.gguf_file)
    if run.model.tokenizer is not None:
        errors += _model_dir_errors("model.tokenizer", run.model.tokenizer, None, needs_config=False)
    for field, spec in (("data.train", run.data.train), ("data.eval", run.data.eval)):
        if spec and looks_like_local_path(spec) and not Path(spec).expanduser().exists():
            errors.append(f"{field}: {spec!r} does not exist; expected a data file, a directory of them, or a "
                          f"hub dataset name")
    return errors


def _model_dir_errors(field: str, name: str, gguf_file: str | None, needs_config: bool = True) -> list[str]:
    from neuroprune_ds.data import looks_like_local_path

    path = Path(name).expanduser()
    if path.is_dir():
        if gguf_file is not None and not (path / gguf_file).is_file():
            return [f"model.gguf_file: {gguf_file!r} is not a file in {name!r}"]
        if gguf_file is None and needs_config and not (path / "config.json").is_file():
            return [f"{field}: {name!r} has no config.json; expected a Hugging Face model directory "
                    "(what save_pretrained writes), or set model.gguf_file to a GGUF file inside it"]
        return []
    if path.exists():
        return [f"{field}: {name!r} is a file; expected a directory (for a GGUF file: its directory here and its "
                "name in model.gguf_file)"]
    # Hub ids are 'name' or 'owner/name'; anything else (./x, /x, ~/x, a/b/c) is a local path.
    if looks_like_local_path(name) or name.count("/") > 1:
        return [f"{field}: directory {name!r} does not exist; expected a local model directory or a hub name"]
    return []


# ---------------------------------------------------------------------------------------------------------
# Saving


def config_to_dict(config: RunConfig) -> dict[str, Any]:
    """Plain nested dict of a configuration (what :func:`config_from_dict` reads back)."""
    return dataclasses.asdict(config)


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved configuration as YAML, so a run records exactly what it ran with."""
    Path(path).write_text(yaml.safe_dump(config_to_dict(config), sort_keys=False))
