"""``neuroprune report DIR``: what NeuroPrune pruned, as PNG plots and a markdown summary.

DIR is an export (``neuroprune convert`` output: ``neuroprune.json`` beside the safetensors weights) or a run
directory (``metrics.jsonl`` and ``neuroprune_summary.json`` written by the trainer). The report holds:

- ``heads_kept.png``: kept (1) and pruned (0) attention heads per layer, a panel per stack and attention kind;
- ``ffn_kept.png``: FFN units kept per layer, against the layer's width;
- ``ffn_degree.png`` (exports): the distribution of FFN units' degrees (input connections with |w| >= epsilon)
  on log-log axes, against the dense model (``--dense``: its weights; otherwise every unit at full degree);
- ``training.png``: loss (train and eval) and sparsity (weights, heads, FFN units) over optimizer steps,
  from ``metrics.jsonl`` (in DIR, or ``--run RUN_DIR`` for an export);
- ``report.md``: the numbers behind the plots.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure

from neuroprune_ds.arch import ffn_input_weights
from neuroprune_ds.config import NeuroPruneConfig
from neuroprune_ds.export import NEUROPRUNE_JSON
from neuroprune_ds.flat_slice import ROW, FlatSlice
from neuroprune_ds.logging_utils import METRICS_FILE, heads_kept_figure
from neuroprune_ds.penalties import GroupMember, group_stats

RUN_SUMMARY_FILE = "neuroprune_summary.json"
REPORT_FILE = "report.md"


@dataclass(frozen=True, slots=True)
class AttentionKept:
    name: str
    stack: str
    layer: int
    kind: str
    num_heads: int
    kept_heads: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class FFNKept:
    name: str
    stack: str
    layer: int
    width: int
    kept_units: int


@dataclass(frozen=True, slots=True)
class Pruning:
    """What was pruned, whichever file it comes from."""

    source: Path
    kind: str
    """'export' (neuroprune.json) or 'run' (the trainer's neuroprune_summary.json)."""
    model_type: str | None
    attention: tuple[AttentionKept, ...]
    ffn: tuple[FFNKept, ...]
    weight_sparsity: float
    structural_sparsity: float | None
    epsilon: float
    origin: dict
    """An export's ``source``: ``checkpoint`` (the run's checkpoint directory), ``name_or_path`` (base model)."""


def read_export(path: Path) -> Pruning:
    """Everything the report takes from an export's ``neuroprune.json`` (written by
    ``neuroprune_ds.export.convert``).

    Read: ``model_type``; ``attention[]``: name, stack, layer, kind, num_heads, kept_heads (query-head indices);
    ``ffn[]``: name, stack, layer, width, kept_units (a count); ``weight_sparsity``, ``structural_sparsity``;
    ``neuroprune_config.epsilon``; ``source`` (checkpoint and base model, when converted from a checkpoint).

    Raises:
        ValueError: a required key is missing (the message names it).
    """
    data = json.loads(path.read_text())
    try:
        attention = tuple(AttentionKept(a["name"], str(a["stack"]), int(a["layer"]), a["kind"], int(a["num_heads"]),
                                        tuple(int(h) for h in a["kept_heads"])) for a in data["attention"])
        ffn = tuple(FFNKept(f["name"], str(f["stack"]), int(f["layer"]), int(f["width"]), int(f["kept_units"]))
                    for f in data["ffn"])
        return Pruning(path, "export", data["model_type"], attention, ffn, float(data["weight_sparsity"]),
                       float(data["structural_sparsity"]), float(data["neuroprune_config"]["epsilon"]),
                       data.get("source") or {})
    except KeyError as error:
        raise ValueError(f"{path}: key {error} is missing; is it a neuroprune export?") from None


def read_run_summary(path: Path) -> Pruning:
    """The trainer's ``neuroprune_summary.json`` (``NeuroPruner.summary()``: kept KV-group units, FFN alive
    counts, weight sparsity; no structural sparsity before an export)."""
    data = json.loads(path.read_text())
    attention = []
    for a in data["attention"]:
        group = int(a.get("heads_per_unit", 1))
        heads = tuple(unit * group + i for unit in a["kept_units"] for i in range(group))
        attention.append(AttentionKept(a["name"], str(a["stack"]), int(a["layer"]), a["kind"],
                                       int(a["num_units"]) * group, heads))
    ffn = tuple(FFNKept(f["name"], str(f["stack"]), int(f["layer"]), int(f["width"]), int(f["alive_units"]))
                for f in data["ffn"])
    return Pruning(path, "run", None, tuple(attention), ffn, float(data["weight_sparsity"]), None,
                   NeuroPruneConfig().epsilon, {})


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (non-finite values were written as strings: read back as floats)."""
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            records.append({k: float(v) if isinstance(v, str) and k != "kind" else v for k, v in record.items()})
    return records


# -- FFN degrees from safetensors weights ----------------------------------------------------------------
def _weight_files(model_dir: Path) -> dict[str, Path]:
    """Parameter name -> safetensors file holding it (single file or sharded with an index)."""
    from safetensors import safe_open

    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return {name: model_dir / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    single = model_dir / "model.safetensors"
    if not single.is_file():
        raise ValueError(f"{model_dir}: no model.safetensors(.index.json): not a Hugging Face model directory")
    with safe_open(single, "pt") as handle:
        return {name: single for name in handle.keys()}


def unit_degrees(inputs: Iterable[torch.Tensor], epsilon: float) -> torch.Tensor:
    """Degree of each FFN hidden unit: its input connections with |w| >= epsilon, summed over the block's
    input projections (row i of each), counted as the pruner counts them (:func:`group_stats` on the full
    matrices, in fp32 so that the counts are exact); float64 (units,). The matrices are read one at a time.
    """
    total = 0
    for weight in inputs:
        weight = weight.detach().float()
        total = total + group_stats([GroupMember(weight.reshape(-1), FlatSlice.of(weight.shape), ROW)],
                                    epsilon).nonzero
    return total


def ffn_degrees(model_dir: Path, model_type: str, widths: dict[str, int], epsilon: float) -> dict[str, np.ndarray]:
    """Per FFN block, each hidden unit's number of input connections with |w| >= epsilon (summed over the
    input projections, as ``NeuroPruner.ffn_degrees``). Reads one weight matrix at a time.

    Args:
        widths: block name -> its full width; units a compact export removed count as degree 0.
    """
    from safetensors import safe_open

    files = _weight_files(model_dir)

    def read(name: str) -> torch.Tensor:
        with safe_open(files[name], "pt") as handle:
            return handle.get_tensor(name)

    degrees = {}
    for block, width in widths.items():
        count = unit_degrees(map(read, ffn_input_weights(model_type, block, files)), epsilon)
        total = np.zeros(width, dtype=np.int64)
        total[:len(count)] = count.numpy()
        degrees[block] = total
    return degrees


# -- figures ---------------------------------------------------------------------------------------------
def heads_figure(pruning: Pruning) -> Figure:
    summary = {"attention": [{"stack": a.stack, "kind": a.kind, "layer": a.layer, "num_units": a.num_heads,
                              "kept_units": list(a.kept_heads), "heads_per_unit": 1} for a in pruning.attention]}
    return heads_kept_figure(summary)


def ffn_figure(pruning: Pruning) -> Figure:
    stacks = sorted({f.stack for f in pruning.ffn})
    figure = Figure(figsize=(3.6 * len(stacks), 3.0), layout="constrained")
    for axes, stack in zip(np.atleast_1d(figure.subplots(1, len(stacks))), stacks):
        blocks = sorted((f for f in pruning.ffn if f.stack == stack), key=lambda f: f.layer)
        layers = [f.layer for f in blocks]
        axes.bar(layers, [f.width for f in blocks], color="lightgray", label="width")
        axes.bar(layers, [f.kept_units for f in blocks], color="tab:blue", label="kept")
        axes.set_title(f"{stack} FFN: {sum(f.kept_units for f in blocks)}/{sum(f.width for f in blocks)} kept",
                       fontsize=9)
        axes.set_xlabel("layer")
        axes.set_ylabel("units")
        axes.set_xticks(layers)
        axes.legend(fontsize=7)
    return figure


def degree_figure(degrees: dict[str, dict[str, np.ndarray]], full_degree: int) -> Figure:
    """Fraction of FFN units per degree on log-log axes (log-spaced bins), one curve per model; units at
    degree 0 cannot be drawn and are counted in the legend. Without a dense model's weights, the dense
    reference is drawn as what it is by definition: every unit at full degree."""
    figure = Figure(figsize=(4.8, 3.6), layout="constrained")
    axes = figure.subplots()
    bins = np.unique(np.geomspace(1, full_degree + 1, 40).astype(int))
    for label, per_block in degrees.items():
        values = np.concatenate(list(per_block.values()))
        counts, edges = np.histogram(values[values > 0], bins=bins)
        drawn = counts > 0
        axes.plot(np.sqrt(edges[:-1] * edges[1:])[drawn], (counts / len(values))[drawn], "o-", ms=3,
                  label=f"{label}: {int((values == 0).sum())} of {len(values)} units at degree 0")
    if len(degrees) == 1:
        axes.axvline(full_degree, color="tab:gray", ls="--", label=f"dense: every unit at degree {full_degree}")
    axes.set_xscale("log")
    axes.set_yscale("log")
    axes.set_xlabel("degree (input connections with |w| >= epsilon)")
    axes.set_ylabel("fraction of FFN units")
    axes.legend(fontsize=7)
    return figure


def training_figure(records: list[dict], pruning: Pruning) -> Figure:
    """Loss (train, eval) and sparsity (weights, heads kept, FFN units kept) over optimizer steps."""
    figure = Figure(figsize=(9.0, 3.4), layout="constrained")
    loss_axes, sparsity_axes = figure.subplots(1, 2)
    for kind, key, style in (("train", "train/loss", "-"), ("eval", "eval/loss", "o--")):
        points = [(r["step"], r[key]) for r in records if r.get("kind") == kind and key in r]
        if points:
            loss_axes.plot(*zip(*points), style, label=key)
    loss_axes.set_xlabel("optimizer step")
    loss_axes.set_ylabel("loss")
    loss_axes.legend(fontsize=7)
    train = [r for r in records if r.get("kind") == "train"]
    heads = {a.name: a.num_heads for a in pruning.attention}
    widths = {f.name: f.width for f in pruning.ffn}
    curves = {"weight sparsity": [(r["step"], r["sparsity/weight"]) for r in train if "sparsity/weight" in r],
              "heads pruned": _pruned_fraction(train, "heads_kept/", heads),
              "FFN units pruned": _pruned_fraction(train, "ffn_alive/", widths)}
    for label, points in curves.items():
        if points:
            sparsity_axes.plot(*zip(*points), label=label)
    sparsity_axes.set_xlabel("optimizer step")
    sparsity_axes.set_ylabel("fraction")
    sparsity_axes.set_ylim(0.0, 1.0)
    sparsity_axes.legend(fontsize=7)
    return figure


def _pruned_fraction(records: list[dict], prefix: str, totals: dict[str, int]) -> list[tuple[int, float]]:
    points = []
    for record in records:
        kept = {key[len(prefix):]: value for key, value in record.items() if key.startswith(prefix)}
        if kept and set(kept) <= set(totals):
            total = sum(totals[name] for name in kept)
            points.append((record["step"], 1.0 - sum(kept.values()) / total))
    return points


# -- the markdown summary --------------------------------------------------------------------------------
def summary_markdown(pruning: Pruning, degrees: dict[str, dict[str, np.ndarray]], full_degree: int | None,
                     metrics_path: Path | None, records: list[dict], plots: list[str]) -> str:
    """The report's markdown: totals, per-layer tables, degree statistics, the last logged metrics, plots."""
    lines = [f"# NeuroPrune report: {pruning.source.parent}", "",
             f"Source: `{pruning.source.name}` ({pruning.kind}); epsilon {pruning.epsilon:g}.", ""]
    lines += _structure_lines(pruning)
    lines += ["", "## FFN neuron degrees", ""] + _degree_lines(degrees, full_degree, pruning.epsilon)
    lines += ["", "## Training", ""] + _training_lines(metrics_path, records)
    lines += ["", "## Plots", ""] + [f"![{Path(p).stem}]({p})" for p in plots]
    return "\n".join(lines) + "\n"


def _structure_lines(pruning: Pruning) -> list[str]:
    heads_total = sum(a.num_heads for a in pruning.attention)
    heads_kept = sum(len(a.kept_heads) for a in pruning.attention)
    structural = ("n/a (export the run)" if pruning.structural_sparsity is None
                  else f"{pruning.structural_sparsity:.6f}")
    lines = ["| quantity | value |", "|---|---|",
             f"| weight sparsity | {pruning.weight_sparsity:.6f} |",
             f"| structural sparsity | {structural} |",
             f"| attention heads kept | {heads_kept} / {heads_total} |",
             f"| FFN units kept | {sum(f.kept_units for f in pruning.ffn)} / {sum(f.width for f in pruning.ffn)} |",
             "", "## Attention heads kept per layer", "",
             "| block | stack | kind | layer | heads kept | heads | kept heads |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {a.name} | {a.stack} | {a.kind} | {a.layer} | {len(a.kept_heads)} | {a.num_heads} | "
              f"{', '.join(map(str, a.kept_heads))} |" for a in pruning.attention]
    lines += ["", "## FFN units kept per layer", "", "| block | stack | layer | units kept | width |",
              "|---|---|---|---|---|"]
    return lines + [f"| {f.name} | {f.stack} | {f.layer} | {f.kept_units} | {f.width} |" for f in pruning.ffn]


def _degree_lines(degrees: dict[str, dict[str, np.ndarray]], full_degree: int | None, epsilon: float) -> list[str]:
    if not degrees:
        return ["Needs weights: report an export (`neuroprune convert`) for the degree distribution."]
    lines = [f"Degree: input connections with |w| >= {epsilon:g}; full degree {full_degree}; units a compact "
             "export removed count as degree 0.", "",
             "| model | units | degree 0 | median degree | mean degree |", "|---|---|---|---|---|"]
    for label, per_block in degrees.items():
        values = np.concatenate(list(per_block.values()))
        lines.append(f"| {label} | {len(values)} | {int((values == 0).sum())} | {np.median(values):g} | "
                     f"{values.mean():.1f} |")
    return lines


def _training_lines(metrics_path: Path | None, records: list[dict]) -> list[str]:
    train = [r for r in records if r.get("kind") == "train"]
    if not train:
        return [f"No {METRICS_FILE} found (give the run directory with --run)."]
    last = train[-1]
    lines = [f"From `{metrics_path}`.", "", "| quantity | value |", "|---|---|",
             f"| last logged step | {last['step']} |"]
    lines += [f"| {key} at step {last['step']} | {last[key]:.6g} |"
              for key in ("train/loss", "sparsity/weight") if key in last]
    evals = [r for r in records if r.get("kind") == "eval"]
    if evals:
        lines += [f"| {key} at step {evals[-1]['step']} | {value:.6g} |" for key, value in evals[-1].items()
                  if key.startswith("eval/") and isinstance(value, float) and math.isfinite(value)]
    return lines


# -- the command -----------------------------------------------------------------------------------------
def make_report(directory: Path, out_dir: Path | None = None, run_dir: Path | None = None,
                dense_dir: Path | None = None) -> Path:
    """Write the plots and ``report.md`` for a run or export directory; returns the report's path.

    Args:
        directory: an export (has ``neuroprune.json``) or a run directory (has ``neuroprune_summary.json``).
        out_dir: where to write (default ``directory/report``).
        run_dir: where ``metrics.jsonl`` is, when ``directory`` is an export (default: the export's source
            checkpoint directory or its parent, when one of them has it).
        dense_dir: a Hugging Face model directory with the dense weights, the reference of the degree
            distribution (default: the export's base model, when it is a local directory).

    Raises:
        ValueError: ``directory`` holds neither file, ``dense_dir`` is given for a run directory, ``out_dir``
            is a file, or ``run_dir`` is not a directory with ``metrics.jsonl``.
    """
    if out_dir is not None and out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--out {out_dir} is a file; give a directory to write the report in")
    if run_dir is not None and not (run_dir / METRICS_FILE).is_file():
        what = "has no " + METRICS_FILE if run_dir.is_dir() else "is not a directory"
        raise ValueError(f"--run {run_dir} {what}; give the run's output directory (where the trainer writes "
                         f"{METRICS_FILE})")
    if (directory / NEUROPRUNE_JSON).is_file():
        pruning = read_export(directory / NEUROPRUNE_JSON)
    elif (directory / RUN_SUMMARY_FILE).is_file():
        pruning = read_run_summary(directory / RUN_SUMMARY_FILE)
    else:
        raise ValueError(f"{directory}: neither {NEUROPRUNE_JSON} (an export) nor {RUN_SUMMARY_FILE} (a run) is there")
    if dense_dir is not None and pruning.kind != "export":
        raise ValueError("--dense compares degree distributions, which need an export's weights; "
                         f"{directory} is a run directory: report its export instead")
    out_dir = out_dir or directory / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = {"heads_kept.png": heads_figure(pruning), "ffn_kept.png": ffn_figure(pruning)}
    degrees, full_degree = {}, None
    if pruning.kind == "export" and pruning.ffn:
        widths = {f.name: f.width for f in pruning.ffn}
        degrees["NeuroPrune"] = ffn_degrees(directory, pruning.model_type, widths, pruning.epsilon)
        base = Path(pruning.origin.get("name_or_path") or "")
        dense_dir = dense_dir or (base if base.parts and (base / "config.json").is_file() else None)
        if dense_dir is not None:
            degrees[f"dense ({dense_dir.name})"] = ffn_degrees(dense_dir, pruning.model_type, widths,
                                                               pruning.epsilon)
        files = _weight_files(directory)
        full_degree = sum(_in_features(files[name], name)
                          for name in ffn_input_weights(pruning.model_type, pruning.ffn[0].name, files))
        figures["ffn_degree.png"] = degree_figure(degrees, full_degree)
    checkpoint = Path(pruning.origin["checkpoint"]) if pruning.origin.get("checkpoint") else None
    candidates = [directory, run_dir, checkpoint, checkpoint.parent if checkpoint else None]
    metrics_path = next((d / METRICS_FILE for d in candidates if d and (d / METRICS_FILE).is_file()), None)
    records = read_metrics(metrics_path) if metrics_path else []
    if records:
        figures["training.png"] = training_figure(records, pruning)
    for name, figure in figures.items():
        figure.savefig(out_dir / name, dpi=110)
    report = out_dir / REPORT_FILE
    report.write_text(summary_markdown(pruning, degrees, full_degree, metrics_path, records, list(figures)))
    return report


def _in_features(file: Path, name: str) -> int:
    from safetensors import safe_open

    with safe_open(file, "pt") as handle:
        return int(handle.get_slice(name).get_shape()[1])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The report options (``neuroprune report``)."""
    parser.add_argument("directory", metavar="RUN_OR_EXPORT_DIR", type=Path,
                        help=f"an export ({NEUROPRUNE_JSON}) or a run directory ({RUN_SUMMARY_FILE}, {METRICS_FILE})")
    parser.add_argument("--out", type=Path, metavar="DIR", help="output directory (default: DIR/report)")
    parser.add_argument("--run", type=Path, dest="run_dir", metavar="RUN_DIR",
                        help=f"the run's directory, for {METRICS_FILE} when DIR is an export")
    parser.add_argument("--dense", type=Path, metavar="MODEL_DIR",
                        help="the dense model (HF directory) to compare FFN degree distributions with")


def run(args: argparse.Namespace) -> int:
    """Execute ``neuroprune report``; returns the exit status (2 for unusable inputs)."""
    try:
        report = make_report(args.directory, args.out, args.run_dir, args.dense)
    except (ValueError, OSError) as error:
        print(f"neuroprune report: {error}", file=sys.stderr)
        return 2
    print(report)
    return 0
