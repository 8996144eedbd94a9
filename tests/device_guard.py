"""Finds tensors that the library creates without saying on which device (a test helper).

Under CUDA + NCCL a tensor made by ``torch.zeros(n)`` lands on the CPU: a collective on it fails, and so does
arithmetic with a GPU shard. On a CPU-only machine nothing fails, so :class:`DevicelessFactories` records
every tensor factory called from ``neuroprune_ds`` code without ``device=``; a test asserts that none was.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import neuroprune_ds

FACTORIES = frozenset({
    torch.tensor, torch.as_tensor, torch.scalar_tensor, torch.empty, torch.empty_strided, torch.zeros, torch.ones,
    torch.full, torch.eye, torch.arange, torch.linspace, torch.logspace, torch.rand, torch.randn, torch.randint,
    torch.randperm,
})
PACKAGE = Path(neuroprune_ds.__file__).resolve().parent
TORCH = Path(torch.__file__).resolve().parent
# Batches are built on the host (the loop moves them to the engine's device) and the exporter runs on the CPU.
HOST_SIDE = (PACKAGE / "data.py", PACKAGE / "export")


class DevicelessFactories(TorchFunctionMode):
    """While active, ``found`` collects ``"path:line factory"`` for each such call from the library."""

    def __init__(self):
        super().__init__()
        self.found: set[str] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            caller = _library_caller()
            if caller is not None:
                self.found.add(f"{caller} {func.__name__}")
        return func(*args, **kwargs)


def _library_caller() -> str | None:
    """``path:line`` of the library code that called the factory, or None when the caller is not library code."""
    frame = sys._getframe(2)
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if not path.is_relative_to(TORCH):
            if path.is_relative_to(PACKAGE) and not any(path.is_relative_to(p) for p in HOST_SIDE):
                return f"{path.relative_to(PACKAGE.parent)}:{frame.f_lineno}"
            return None
        frame = frame.f_back
    return None
