"""The ``neuroprune`` command line.

Each subcommand is one ``add_<name>(subparsers)`` function that declares its arguments and sets ``run`` to
the function executing it (which returns the exit status); ``SUBCOMMANDS`` registers it.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from neuroprune_ds.arch import ResolvedArchitecture, auto_model_class, model_task, resolve_architecture
from neuroprune_ds import train
from neuroprune_ds.config import RunConfig
from neuroprune_ds.data import load_raw_dataset, load_tokenizer
from neuroprune_ds.config_loader import ConfigError, check_paths, load_config
from neuroprune_ds.deepspeed_config import check_deepspeed_config, load_deepspeed_config
from neuroprune_ds.distributed import EXIT_INVALID


def build_meta_model(run: RunConfig, model_config=None) -> torch.nn.Module:
    """Instantiate the run's model on the meta device from its config alone (no weights are read).

    Args:
        run: the run configuration (model path, GGUF file, task, num_labels).
        model_config: the model's HF config when already read (default: read it).

    Returns:
        The ``AutoModelFor<task>`` model with meta tensors: shapes without storage.

    Raises:
        OSError: the model directory or hub name cannot be found.
        ValueError: transformers does not know the model type for this task.
    """
    model_config = copy.deepcopy(model_config or train.load_model_config(run))
    if model_task(run.task, model_config.model_type) == "classification":
        model_config.num_labels = run.num_labels
    auto_class = auto_model_class(run.task, model_config.model_type)
    with torch.device("meta"):
        return auto_class.from_config(model_config, trust_remote_code=run.model.trust_remote_code)


def summarize_architecture(model: torch.nn.Module, arch: ResolvedArchitecture) -> str:
    """A few lines describing the blocks NeuroPrune will work on."""
    num_parameters = sum(parameter.numel() for parameter in model.parameters())
    kinds = Counter(block.kind for block in arch.attention)

    def values(items) -> str:
        return "/".join(str(value) for value in sorted(set(items))) or "-"

    return "\n".join([
        f"model: {arch.model_type} ({type(model).__name__}), {num_parameters:,} parameters "
        "(meta device, no weights loaded)",
        f"attention: {len(arch.attention)} blocks ("
        + (", ".join(f"{kind} {count}" for kind, count in sorted(kinds.items())) or "none")
        + f"); heads {values(b.num_heads for b in arch.attention)}, "
        f"KV heads {values(b.num_kv_heads for b in arch.attention)}, "
        f"head dim {values(b.head_dim for b in arch.attention)}",
        f"FFN: {len(arch.ffn)} blocks; width {values(b.width for b in arch.ffn)}",
    ])


def add_validate(subparsers: argparse._SubParsersAction) -> None:
    """Register ``neuroprune validate``."""
    parser = subparsers.add_parser(
        "validate", help="check a run config, its DeepSpeed JSON and the model's architecture",
        description="Load and validate CONFIG (with key=value overrides), cross-check the DeepSpeed JSON, "
        "and resolve the model's attention and FFN blocks on a meta-device model (no weights loaded). "
        f"Exits 0 when everything is valid, {EXIT_INVALID} otherwise, listing every problem.")
    parser.add_argument("config", metavar="CONFIG", help="run config, YAML or JSON")
    parser.add_argument("--deepspeed", metavar="DS.json",
                        help="DeepSpeed JSON (default: the config's 'deepspeed' field)")
    parser.add_argument("--world-size", type=int, metavar="N",
                        help="data-parallel ranks the job will use; checks train_batch_size exactly")
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="overrides with dotted keys, values in YAML: neuroprune.mlp_lambda=1e-4, "
                        "neuroprune.attention_kinds=[self]")
    parser.set_defaults(run=run_validate)


def run_validate(args: argparse.Namespace) -> int:
    """Execute ``neuroprune validate``: every check of the trainer's set-up before data is read; returns the
    exit status."""
    try:
        run = load_config(args.config, args.overrides)
    except ConfigError as error:
        print(f"{args.config}: {error}", file=sys.stderr)
        return EXIT_INVALID
    if args.deepspeed:
        run.deepspeed = args.deepspeed
    errors = check_paths(run)
    try:
        ds = load_deepspeed_config(run.deepspeed)
        errors += check_deepspeed_config(ds, run, args.world_size)
    except ConfigError as error:
        ds = None
        errors += error.errors
    wrong_paths = {error.partition(":")[0] for error in errors}
    if not wrong_paths & {"model.name_or_path", "model.tokenizer", "model.gguf_file"}:
        errors += _tokenizer_errors(run)
    errors += _data_file_errors(run)
    summary = None
    if not wrong_paths & {"model.name_or_path", "model.gguf_file"}:
        summary = _check_model(run, ds, errors, args.world_size)
    if errors:
        print(f"{args.config}: {ConfigError(errors)}", file=sys.stderr)
        return EXIT_INVALID
    print(summary)
    print(f"deepspeed: {run.deepspeed}")
    print(f"{args.config}: valid")
    return 0


def _tokenizer_errors(run: RunConfig) -> list[str]:
    try:
        load_tokenizer(run.model)
    except (OSError, ValueError) as error:
        return [" ".join(str(error).split())]
    return []


def _data_file_errors(run: RunConfig) -> list[str]:
    """Read the local data files as set-up does (empty, not UTF-8, malformed JSON); hub datasets are not
    fetched. The task's columns are checked by ``train``'s set-up."""
    errors = []
    for spec, split in ((run.data.train, "train"), (run.data.eval, "validation")):
        if spec and Path(spec).expanduser().exists():
            try:
                load_raw_dataset(spec, run.data.dataset_config, default_split=split)
            except ValueError as error:
                errors.append(" ".join(str(error).split()))
    return errors


def _check_model(run: RunConfig, ds: dict | None, errors: list[str], world_size: int | None) -> str | None:
    """Append the model's problems to ``errors``; the architecture summary when it resolves."""
    try:
        model_config = train.load_model_config(run)
        found = train.run_errors(run, ds, lambda: model_config, world_size)
        errors += found
        if found:
            return None
        model = build_meta_model(run, model_config)
        arch = resolve_architecture(model, run.neuroprune)
    except (OSError, ValueError) as error:
        errors += str(error).splitlines()  # each line names its field (the same lines as train's set-up)
        return None
    return summarize_architecture(model, arch)


def add_train(subparsers: argparse._SubParsersAction) -> None:
    """Register ``neuroprune train`` (the same options as ``python -m neuroprune_ds.train``)."""
    parser = subparsers.add_parser(
        "train", help="fine-tune with NeuroPrune under DeepSpeed (run one process per rank)",
        description="Fine-tune a Hugging Face model with NeuroPrune under DeepSpeed. Start one process per rank "
        "(deepspeed --no_python / torchrun --no-python / srun), or run it alone as a single rank.")
    train.add_arguments(parser)
    parser.set_defaults(run=train.run_and_exit)


def add_convert(subparsers: argparse._SubParsersAction) -> None:
    """Register ``neuroprune convert``."""
    from neuroprune_ds.export.convert import parse_threshold, run_convert  # imported when the parser is built

    parser = subparsers.add_parser(
        "convert", help="export a pruned DeepSpeed checkpoint as a Hugging Face model (dense or compact)",
        description="Convert CKPT_DIR (a NeuroPrune DeepSpeed checkpoint of any ZeRO stage, with config.json "
        "beside it) to OUT_DIR. 'dense' keeps the stock architecture with pruned weights exactly zero; "
        "'compact' removes pruned heads and dead FFN units (per-layer sizes, model code shipped in OUT_DIR and "
        "registered through auto_map). The export is written to a temporary directory, its logits are checked "
        "against the masked model's (weights rounded to the export dtype, both in fp32: max |diff| <= 1e-4), and "
        "it is then renamed to OUT_DIR. Weights are read, written and checked one tensor at a time (peak memory "
        "a few times the largest tensor, not the model). "
        f"Exits 0 on success, {EXIT_INVALID} on errors a user can fix.")
    parser.add_argument("ckpt_dir", metavar="CKPT_DIR", help="DeepSpeed checkpoint directory (holds 'latest')")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write the Hugging Face model")
    parser.add_argument("--format", choices=("dense", "compact"), required=True, help="export format")
    parser.add_argument("--tag", help="checkpoint tag (default: the one named in CKPT_DIR/latest)")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    parser.add_argument("--no-verify", action="store_true", help="skip the logits and parameter-count check")
    parser.add_argument("--threshold", nargs="?", type=parse_threshold, const="epsilon", metavar="EPS",
                        help="first set penalised weights with |w| < EPS to 0 (EPS: a finite number >= 0, below "
                        "the largest |w|; defaults to the run's neuroprune.epsilon)")
    parser.add_argument("--dtype", choices=("bf16", "fp16", "fp32"),
                        help="dtype of the written weights (default: the dtype the run trained in, from its "
                        "DeepSpeed config: bf16/fp16 when enabled, else fp32)")
    parser.add_argument("--allow-incomplete", action="store_true",
                        help="export a tag without the trainer's 'complete' marker (a save that may have died "
                        "half-way, or a checkpoint not written by the trainer)")
    parser.set_defaults(run=run_convert)


def add_report(subparsers: argparse._SubParsersAction) -> None:
    """Register ``neuroprune report``."""
    from neuroprune_ds import report

    parser = subparsers.add_parser(
        "report", help="plots and a markdown summary of what NeuroPrune pruned",
        description="Plot heads kept per layer, FFN units kept per layer, the FFN degree distribution against "
        "the dense model, and loss and sparsity over steps; write them with a markdown summary to DIR/report.")
    report.add_arguments(parser)
    parser.set_defaults(run=report.run)


SUBCOMMANDS = (add_validate, add_train, add_convert, add_report)


def build_parser() -> argparse.ArgumentParser:
    """The ``neuroprune`` argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="neuroprune",
                                     description="NeuroPrune sparse fine-tuning under DeepSpeed.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add_subcommand in SUBCOMMANDS:
        add_subcommand(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neuroprune`` console script; returns the exit status."""
    parser = build_parser()
    # argparse fills a '*' positional at its first chance, so key=value pairs after an option
    # (CONFIG --deepspeed X a=1) come back as extras; they are appended to the overrides in order.
    args, extras = parser.parse_known_args(argv)
    if extras and ("overrides" not in vars(args) or any(extra.startswith("-") for extra in extras)):
        parser.error(f"unrecognized arguments: {' '.join(extras)}")
    if extras:
        args.overrides += extras
    return args.run(args)
