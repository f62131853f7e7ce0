"""Sharded safetensors checkpoints written tensor by tensor, as published checkpoints are laid out
(`model-00001-of-00003.safetensors` ... and `model.safetensors.index.json`): each shard is one
`write_streamed` file, so memory holds one tensor whatever the model's size.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from vllm_adaspkv.format.safetensors_stream import TensorSpec, write_streamed

INDEX_FILE = "model.safetensors.index.json"


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


def write_sharded(out_dir: Path, specs: Sequence[TensorSpec], make: Callable[[TensorSpec], torch.Tensor],
                  shard_bytes: int = 5 << 30, progress: Callable[[TensorSpec], None] | None = None) -> list[Path]:
    """Writes the tensors `make(spec)` returns into shards and the index; returns the shard files."""
    shards = plan_shards(specs, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for name, shard in zip(names, shards):
        write_streamed(out_dir / name, shard, make, progress=progress)
    weight_map = {spec.name: name for name, shard in zip(names, shards) for spec in shard}
    index = {"metadata": {"total_size": sum(s.nbytes for s in specs)}, "weight_map": weight_map}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return [out_dir / name for name in names]
