"""The on-disk cache of calibration statistics: computed once per (model, calibration settings),
reused by every trial of a search and by every later run with the same settings.

An entry is KEY.pt (the per-linear statistics) and, for SparseGPT, KEY.hessians/ with one safetensors
file of Hessians per decoder layer (22 GB for a 7B model: written as each layer is calibrated, read
back one linear at a time). KEY.pt is written last, so a cache hit always has all its Hessians."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_adaspkv.format import parse_mask_key


def default_cache_dir() -> Path:
    """$ADASPKV_CACHE_DIR, else ~/.cache/adaspkv (like Hugging Face's and vLLM's caches)."""
    return Path(os.environ.get("ADASPKV_CACHE_DIR", Path.home() / ".cache" / "adaspkv"))


def statistics_file(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "calibration" / f"{key}.pt"


def load_statistics(path: Path) -> dict | None:
    """The cached statistics, or None when there are none yet."""
    return torch.load(path, weights_only=True) if path.is_file() else None


def save_statistics(path: Path, stats: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    torch.save(stats, partial)
    os.replace(partial, path)  # atomic: a killed run never leaves a truncated cache entry


class HessianStore:
    """The Hessians of one cache entry, a safetensors file per decoder layer (keys: mask keys)."""

    def __init__(self, stats_path: Path):
        self.directory = Path(stats_path).with_suffix(".hessians")

    def _file(self, layer: int) -> Path:
        return self.directory / f"layer-{layer:03d}.safetensors"

    def save_layer(self, layer: int, hessians: dict[str, torch.Tensor]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        partial = self._file(layer).with_suffix(f".{os.getpid()}.partial")
        stored, aliases = {}, {}  # linears reading one input share one Hessian tensor: stored once
        for key, hessian in hessians.items():
            first = next((k for k, h in stored.items() if h is hessian), None)
            if first is None:
                stored[key] = hessian
            aliases[key] = first or key
        save_file({key: h.detach().cpu().contiguous() for key, h in stored.items()}, str(partial),
                  metadata={"aliases": json.dumps(aliases)})
        os.replace(partial, self._file(layer))

    def has_layers(self, num_layers: int) -> bool:
        return all(self._file(i).is_file() for i in range(num_layers))

    def get(self, key: str) -> torch.Tensor:
        """The Hessian [d_in, d_in] (float32) of the linear whose mask key is `key`."""
        layer, _ = parse_mask_key(key)
        with safe_open(str(self._file(layer)), framework="pt") as f:
            return f.get_tensor(json.loads(f.metadata()["aliases"])[key])
