"""Geometry of a contiguous slice of a flattened weight matrix: what one ZeRO rank holds.

ZeRO flattens every parameter row-major and gives each rank a contiguous range ``[offset, offset + numel)``
of it, so a rank may hold the end of one row, some whole rows, and the start of another. ``FlatSlice.blocks``
cuts such a range into at most three rectangles, each a plain 2-D view of the local 1-D tensor; per-row and
per-column reductions and broadcasts are then ordinary tensor ops on those views. A full matrix is the
slice with offset 0 and numel rows * cols, so the same code serves the single-process reference.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

ROW = "row"
COL = "col"


@dataclass(frozen=True, slots=True)
class Block:
    """Rows ``row .. row + nrows`` x columns ``col .. col + ncols`` of the matrix, stored contiguously at
    ``local_start`` of the local tensor."""

    local_start: int
    row: int
    nrows: int
    col: int
    ncols: int

    def view(self, local: torch.Tensor) -> torch.Tensor:
        """This block of a local tensor (..., numel) as an (..., nrows, ncols) view."""
        return local.narrow(-1, self.local_start, self.nrows * self.ncols).unflatten(-1, (self.nrows, self.ncols))


@dataclass(frozen=True, slots=True)
class FlatSlice:
    """Elements ``offset .. offset + numel`` of a (rows, cols) matrix flattened row-major.

    1-D tensors (biases) are treated as (n, 1) matrices, so element i is "row" i.
    """

    rows: int
    cols: int
    offset: int
    numel: int

    @classmethod
    def of(cls, shape: tuple[int, ...] | torch.Size, offset: int = 0, numel: int | None = None) -> FlatSlice:
        """The slice of a tensor of ``shape``; the whole tensor when numel is None."""
        if len(shape) == 1:
            rows, cols = shape[0], 1
        elif len(shape) == 2:
            rows, cols = shape
        else:
            raise ValueError(f"FlatSlice supports 1-D and 2-D tensors, got shape {tuple(shape)}")
        total = rows * cols
        numel = total - offset if numel is None else numel
        if not (0 <= offset and 0 <= numel and offset + numel <= total):
            raise ValueError(f"slice [{offset}, {offset + numel}) outside a tensor of {total} elements")
        return cls(rows, cols, offset, numel)

    @property
    def is_full(self) -> bool:
        return self.offset == 0 and self.numel == self.rows * self.cols

    def blocks(self) -> list[Block]:
        """The slice as at most three rectangles: a partial first row, whole rows, a partial last row."""
        blocks = []
        position, end, local = self.offset, self.offset + self.numel, 0
        if position < end and position % self.cols:
            row, col = divmod(position, self.cols)
            width = min(self.cols - col, end - position)
            blocks.append(Block(local, row, 1, col, width))
            position, local = position + width, local + width
        whole_rows = (end - position) // self.cols
        if whole_rows:
            blocks.append(Block(local, position // self.cols, whole_rows, 0, self.cols))
            position, local = position + whole_rows * self.cols, local + whole_rows * self.cols
        if position < end:
            blocks.append(Block(local, position // self.cols, 1, 0, end - position))
        return blocks

    def group_size(self, axis: str) -> int:
        """Number of groups along ``axis``: rows for ROW, columns for COL."""
        return self.rows if axis == ROW else self.cols

    def group_sums(self, local: torch.Tensor, axis: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Per-row (ROW) or per-column (COL) sums of this slice's elements (float64); zero for groups it misses.

        ``local`` is (..., numel): leading dimensions (e.g. |w| stacked on a presence mask) are reduced in the
        same pass, giving (..., groups). Each block is reduced in ``local``'s dtype (fast), the partial sums
        are added in float64, into ``out`` when given (float64 (..., groups), on any device: the sums move to
        it). Sums from the slices of all ranks add up to the sums over the full matrix.
        """
        if out is None:
            out = torch.zeros(local.shape[:-1] + (self.group_size(axis),), dtype=torch.float64, device=local.device)
        for block in self.blocks():
            if axis == ROW:
                start, sums = block.row, block.view(local).sum(dim=-1)
            else:
                start, sums = block.col, block.view(local).sum(dim=-2)
            out.narrow(-1, start, sums.shape[-1]).add_(sums.to(out.device))
        return out

    def group_values(self, per_group: torch.Tensor, block: Block, axis: str) -> torch.Tensor:
        """``per_group`` (one value per row or column) shaped to broadcast over ``block``'s view."""
        if axis == ROW:
            return per_group[block.row:block.row + block.nrows].unsqueeze(1)
        return per_group[block.col:block.col + block.ncols].unsqueeze(0)

    def scale_(self, local: torch.Tensor, per_group: torch.Tensor, axis: str) -> None:
        """Multiply every element in place by the value of its row (ROW) or column (COL)."""
        per_group = per_group.to(device=local.device, dtype=local.dtype)
        for block in self.blocks():
            block.view(local).mul_(self.group_values(per_group, block, axis))

    def add_scaled_(self, target: torch.Tensor, source: torch.Tensor, per_group: torch.Tensor, axis: str,
                    alpha: float) -> None:
        """``target += alpha * per_group[group of element] * source``, in place on the local tensors."""
        per_group = per_group.to(device=target.device, dtype=target.dtype)
        for block in self.blocks():
            weights = self.group_values(per_group, block, axis)
            block.view(target).addcmul_(block.view(source), weights, value=alpha)
