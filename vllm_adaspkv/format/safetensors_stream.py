"""safetensors files written one tensor at a time, and their headers read without the tensors.

safetensors' own writer takes every tensor of a file at once; a 7B checkpoint is 14 GB and its packed
linears several GB. The format is simple (an 8-byte little-endian header length, a JSON header with each
tensor's dtype, shape and byte offsets, then the bytes), so the header is computed from the shapes alone
and the tensors are made and written one at a time: memory holds one tensor, whatever the model's size.
Files written here read back with `safetensors.safe_open` like any other.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

SAFETENSORS_DTYPES = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32", torch.uint8: "U8",
                      torch.int64: "I64"}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _header(specs: Sequence[TensorSpec], metadata: dict[str, str] | None) -> bytes:
    entries, offset = {"__metadata__": {"format": "pt", **(metadata or {})}}, 0
    for spec in specs:
        entries[spec.name] = {"dtype": SAFETENSORS_DTYPES[spec.dtype], "shape": list(spec.shape),
                              "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    text = json.dumps(entries, separators=(",", ":")).encode()
    return text + b" " * (-len(text) % 8)  # the data starts 8-byte aligned


def write_streamed(path: Path, specs: Sequence[TensorSpec], make: Callable[[TensorSpec], torch.Tensor],
                   metadata: dict[str, str] | None = None,
                   progress: Callable[[TensorSpec], None] | None = None) -> Path:
    """Writes the tensors `make(spec)` returns, in the order of `specs`, into one safetensors file; a made
    tensor whose shape or dtype differs from its spec is refused (the header is already written)."""
    header = _header(specs, metadata)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for spec in specs:
            tensor = make(spec)
            if tuple(tensor.shape) != spec.shape or tensor.dtype != spec.dtype:
                raise ValueError(f"{spec.name}: made {tuple(tensor.shape)} {tensor.dtype}, planned "
                                 f"{spec.shape} {spec.dtype}")
            f.write(tensor.contiguous().view(torch.uint8).numpy().tobytes())
            if progress is not None:
                progress(spec)
    return path


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
