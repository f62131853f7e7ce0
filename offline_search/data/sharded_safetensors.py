"""Sharded safetensors checkpoints written tensor by tensor, as published checkpoints are laid out
(`model-00001-of-00003.safetensors` ... and `model.safetensors.index.json`).

safetensors' own writer takes all tensors of a file at once; a 7B checkpoint is 14 GB. The format is
simple (an 8-byte little-endian header length, a JSON header with each tensor's dtype, shape and byte
offsets, then the bytes), so each shard's header is computed from the shapes alone and the tensors are
made and written one at a time: memory holds one tensor, whatever the model's size.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(specs: Sequence[TensorSpec], shard_bytes: int) -> list[list[TensorSpec]]:
    """Tensors in order, cut into shards of at most `shard_bytes` (a larger tensor gets a shard alone)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _header(shard: Sequence[TensorSpec]) -> bytes:
    entries, offset = {"__metadata__": {"format": "pt"}}, 0
    for spec in shard:
        entries[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # the data starts 8-byte aligned


def write_sharded(out_dir: Path, specs: Sequence[TensorSpec], make: Callable[[TensorSpec], torch.Tensor],
                  shard_bytes: int = 5 << 30, progress: Callable[[TensorSpec], None] | None = None) -> list[Path]:
    """Writes the tensors `make(spec)` returns into shards and the index; returns the shard files."""
    shards = plan_shards(specs, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards):
        header = _header(shard)
        with open(out_dir / name, "wb") as f:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            for spec in shard:
                tensor = make(spec)
                if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                    raise ValueError(f"{spec.name}: made {tuple(tensor.shape)} {tensor.dtype}, planned "
                                     f"{spec.shape} {spec.dtype}")
                f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
                weight_map[spec.name] = name
                if progress is not None:
                    progress(spec)
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / name for name in names]


@dataclass(frozen=True)
class StoredTensor:
    dtype: str  # safetensors' name: BF16, F16, F32, ...
    shape: tuple[int, ...]
    start: int  # byte offsets in the file
    end: int


def read_header(path: Path) -> dict[str, StoredTensor]:
    """The tensors of one safetensors file and where their bytes are (the file's header only)."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    base = 8 + length
    return {name: StoredTensor(entry["dtype"], tuple(entry["shape"]), base + entry["data_offsets"][0],
                               base + entry["data_offsets"][1]) for name, entry in header.items()}
