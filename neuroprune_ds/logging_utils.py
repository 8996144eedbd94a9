"""Run logging on rank 0: TensorBoard event files and ``metrics.jsonl`` in the output directory.

Every method is a no-op on other ranks (``enabled=False``), so the training loop calls them unconditionally.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


class MetricsLogger:
    """Scalars, images and histograms to TensorBoard, and one JSON record per call of :meth:`log`.

    Args:
        output_dir: the run's output directory; events go to ``output_dir/tensorboard``.
        enabled: true on rank 0 only.
    """

    def __init__(self, output_dir: str | Path, *, enabled: bool):
        self.enabled = enabled
        if not enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        self.tensorboard_dir = str(output_dir / TENSORBOARD_DIR)
        self.writer = SummaryWriter(log_dir=self.tensorboard_dir)
        self.metrics_path = output_dir / METRICS_FILE
        self.jsonl = self.metrics_path.open("a", buffering=1)

    def log(self, step: int, metrics: dict[str, float], *, kind: str) -> None:
        """Write scalars at optimizer step ``step``; ``kind`` ('train', 'eval') tags the JSON record."""
        if not self.enabled:
            return
        for tag, value in metrics.items():
            self.writer.add_scalar(tag, value, global_step=step)
        record = {"kind": kind, "step": step, "time": time.time(), **{k: _json_number(v) for k, v in metrics.items()}}
        self.jsonl.write(json.dumps(record) + "\n")

    def log_heads_kept(self, step: int, summary: dict[str, Any]) -> None:
        """A heads-kept heatmap (layers × heads, one panel per stack and attention kind) from a pruner summary."""
        if self.enabled and summary.get("attention"):
            self.writer.add_figure("neuroprune/heads_kept", heads_kept_figure(summary), global_step=step)

    def log_ffn_degrees(self, step: int, degrees: dict[str, torch.Tensor]) -> None:
        """One histogram per FFN block of its units' connection counts."""
        if not self.enabled:
            return
        for name, degree in degrees.items():
            self.writer.add_histogram(f"ffn_degree/{name}", degree.detach().float().cpu(), global_step=step)

    def records_through(self, step: int) -> list[dict[str, Any]]:
        """The ``metrics.jsonl`` records up to optimizer step ``step`` (what a checkpoint of that step keeps)."""
        if not self.enabled:
            return []
        return [record for record in self._records() if record.get("step", 0) <= step]

    def forget_after(self, step: int) -> None:
        """Forget what an interrupted run logged after ``step``, the step a resume restarts from.

        ``metrics.jsonl`` keeps its set-up records and those up to ``step``. In TensorBoard, a new event file
        starts with a session-start marker at ``step + 1``; TensorBoard drops every earlier event at or after
        that step, so the resumed run's curves replace, not overlay, the lost ones.
        """
        if not self.enabled:
            return
        from torch.utils.tensorboard import SummaryWriter

        records = self._records()
        kept = [r for r in records if r.get("kind") == "setup" or r.get("step", 0) <= step]
        if len(kept) != len(records):
            # This logger appends (O_APPEND): truncating and rewriting in place keeps its handle valid.
            with open(self.metrics_path, "r+") as f:
                f.seek(0)
                f.truncate()
                f.write("".join(json.dumps(r) + "\n" for r in kept))
        self.writer.close()
        self.writer = SummaryWriter(log_dir=self.tensorboard_dir, purge_step=step + 1)

    def _records(self) -> list[dict[str, Any]]:
        if not self.metrics_path.is_file():
            return []
        return [json.loads(line) for line in self.metrics_path.read_text().splitlines() if line.strip()]

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def heads_kept_figure(summary: dict[str, Any]) -> Figure:
    """Heatmap of kept (1) and pruned (0) attention units per layer, a panel per (stack, kind).

    A unit is a head, or a KV group of ``heads_per_unit`` query heads under grouped-query attention.

    Args:
        summary: ``NeuroPruner.summary()``; each attention entry has stack, layer, kind, num_units, kept_units
            (and optionally heads_per_unit).
    """
    from matplotlib.figure import Figure  # 0.7 s to import: only on rank 0, at the first heatmap

    panels: dict[tuple[str, str], list[dict]] = {}
    for block in summary["attention"]:
        panels.setdefault((str(block["stack"]), str(block["kind"])), []).append(block)
    figure = Figure(figsize=(3.2 * len(panels), 3.0), layout="constrained")
    for axes, ((stack, kind), blocks) in zip(np.atleast_1d(figure.subplots(1, len(panels))), panels.items()):
        blocks.sort(key=lambda b: b["layer"])
        width = max(b["num_units"] for b in blocks)
        grid = np.full((len(blocks), width), np.nan)
        for row, block in enumerate(blocks):
            grid[row, : block["num_units"]] = 0.0
            grid[row, list(block["kept_units"])] = 1.0
        axes.imshow(grid, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto", interpolation="nearest")
        axes.set_title(f"{stack} {kind}: {int(np.nansum(grid))}/{int(np.sum(~np.isnan(grid)))} kept", fontsize=9)
        group = blocks[0].get("heads_per_unit", 1)
        axes.set_xlabel("head" if group == 1 else f"KV group ({group} query heads)")
        axes.set_xticks(range(width))
        axes.set_ylabel("layer")
        axes.set_yticks(range(len(blocks)), [str(b["layer"]) for b in blocks])
    return figure


def _json_number(value: float) -> float | str:
    """JSON has no NaN/inf: write them as strings so a diverged run still leaves a readable file."""
    value = float(value)
    return value if math.isfinite(value) else str(value)
