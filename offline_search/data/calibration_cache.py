"""The on-disk cache of calibration statistics: computed once per (model, calibration settings),
reused by every trial of a search and by every later run with the same settings."""

from __future__ import annotations

import os
from pathlib import Path

import torch


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
