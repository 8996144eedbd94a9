"""Write Hugging Face safetensors checkpoints one tensor at a time.

``safetensors.torch.save_file`` needs every tensor of a file in memory at once and copies each to bytes.
The format is simple (8-byte little-endian header length, a JSON header with each tensor's dtype, shape
and byte range, then the raw little-endian data), and the header only needs shapes, so this writer takes
the shapes first and asks for each tensor when its turn comes: the extra memory is one tensor, not a
shard. Files and index are named as ``save_pretrained`` names them.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch

SAFE_WEIGHTS_NAME = "model.safetensors"
SAFE_WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
           torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
           torch.bool: "BOOL"}


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """Name, shape and dtype of one tensor to write."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Split ``specs`` in order into shards of at most ``max_shard_bytes`` (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def write_safetensors(out_dir: str, specs: list[TensorSpec], produce: Callable[[str], torch.Tensor],
                      max_shard_bytes: int) -> list[str]:
    """Write the tensors of ``specs`` as one file or as shards plus ``model.safetensors.index.json``.

    Args:
        out_dir: an existing directory.
        specs: what to write, in order.
        produce: returns the tensor of a name; called once per tensor, in order (it may build the tensor).
        max_shard_bytes: shard size limit.

    Returns:
        The file names written.
    """
    shards = plan_shards(specs, max_shard_bytes)
    if len(shards) == 1:
        names = [SAFE_WEIGHTS_NAME]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        _write_file(os.path.join(out_dir, name), shard, produce)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in specs)},
                 "weight_map": {spec.name: name for name, shard in zip(names, shards) for spec in shard}}
        with open(os.path.join(out_dir, SAFE_WEIGHTS_INDEX_NAME), "w") as f:
            json.dump(index, f, indent=2)
        names.append(SAFE_WEIGHTS_INDEX_NAME)
    return names


def _write_file(path: str, specs: list[TensorSpec], produce: Callable[[str], torch.Tensor]) -> None:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in specs:
        header[spec.name] = {"dtype": _DTYPES[spec.dtype], "shape": list(spec.shape),
                             "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for spec in specs:
            tensor = produce(spec.name)
            assert tuple(tensor.shape) == spec.shape and tensor.dtype == spec.dtype, (spec, tensor.shape, tensor.dtype)
            # a uint8 view of the contiguous tensor goes to the file without another copy (x86/ARM are little-endian)
            f.write(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
