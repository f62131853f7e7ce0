"""The on-disk cache of calibration statistics: computed once per (model, calibration settings),
reused by every trial of a search and by every later run with the same settings."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

from offline_search.calibration import CalibrationConfig, calibrate
from vllm_adaspkv.artifact import model_sha256

logger = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    """$ADASPKV_CACHE_DIR, else ~/.cache/adaspkv (like Hugging Face's and vLLM's caches)."""
    return Path(os.environ.get("ADASPKV_CACHE_DIR", Path.home() / ".cache" / "adaspkv"))


def cached_calibration(model, processor, model_dir: Path, config: CalibrationConfig,
                       cache_dir: Path, show_progress: bool = True) -> tuple[dict, Path, bool]:
    """(statistics, cache file, whether it was a cache hit)."""
    path = Path(cache_dir) / "calibration" / f"{config.cache_key(model_sha256(model_dir))}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True), path, True
    stats = calibrate(model, processor, config, show_progress)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(f".{os.getpid()}.partial")
    torch.save(stats, partial)
    os.replace(partial, path)  # atomic: a killed run never leaves a truncated cache entry
    logger.info("calibration statistics cached in %s", path)
    return stats, path, False
