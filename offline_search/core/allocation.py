"""Sparsity allocations: how a target sparsity S is shared among layers and matrices.

Pure functions over numbers (no model, no I/O): uniform, OWL (outlier-weighted layer sparsity),
TAMP's diversity-aware sparsity (DAS), and the block plans that the TPE search samples.
"""

from __future__ import annotations

import math

import torch

from offline_search.core.tamp import das_keep_counts
from vllm_adaspkv.errors import ConfigError


def uniform_plan(num_layers: int, sparsity: float) -> list[float]:
    return [sparsity] * num_layers


def outlier_share(layer_scores: list[torch.Tensor], m: float = 5.0) -> float:
    """OWL's D_l: the share of a layer's Wanda scores (all its matrices together) above m x their mean."""
    flat = torch.cat([s.flatten().float() for s in layer_scores])  # [all weights of the layer]
    return float((flat > m * flat.mean()).float().mean())


def owl_plan(shares: list[float], sparsity: float, lam: float = 0.08) -> list[float]:
    """OWL (Yin et al. 2024): keep ratios spread linearly over [1-S-lam, 1-S+lam] by outlier share,
    centred on 1-S (layers of a Llama have equal size, so the mean is also the weighted mean)."""
    low, high = min(shares), max(shares)
    if high == low:  # no layer has more outliers than another: nothing to reallocate
        return uniform_plan(len(shares), sparsity)
    keep = [(d - low) / (high - low) * 2 * lam for d in shares]
    centre = sum(keep) / len(keep)
    return [1.0 - (k - centre + 1.0 - sparsity) for k in keep]


def das_plan(sizes: list[int], diversity: list[float], sparsity: float) -> list[float]:
    """TAMP's diversity-aware sparsity per matrix: diverse outputs keep more weights."""
    kept = das_keep_counts(sizes, diversity, sparsity)
    return [1.0 - k / n for k, n in zip(kept, sizes)]


def layer_blocks(num_layers: int, blocks: int) -> list[range]:
    """Contiguous groups of layers, sizes differing by at most one (8 blocks of 4 for 32 layers)."""
    if not 1 <= blocks <= num_layers:
        raise ConfigError(f"--blocks {blocks}: must be between 1 and the number of layers ({num_layers})")
    edges = [round(b * num_layers / blocks) for b in range(blocks + 1)]
    return [range(edges[b], edges[b + 1]) for b in range(blocks)]


def block_grid(sparsity: float, radius: float = 0.05, step: float = 0.025) -> list[float]:
    """The values a block may take: S - radius ... S + radius in steps (the paper: +-0.05 by 0.025)."""
    count = round(radius / step)
    if not math.isclose(count * step, radius) or count < 1:
        raise ConfigError(f"search radius {radius} is not a positive multiple of the step {step}")
    # Centring (centred_blocks) moves a block by up to one more radius.
    if sparsity - 2 * radius < 0 or sparsity + 2 * radius >= 1:
        raise ConfigError(f"--sparsity {sparsity}: a search of +-{radius} per block needs "
                         f"{2 * radius:g} <= S < {1 - 2 * radius:g}")
    return [round(sparsity + i * step, 6) for i in range(-count, count + 1)]


def centred_blocks(values: list[float], weights: list[float], sparsity: float) -> list[float]:
    """Shifts sampled block sparsities by one common offset so that their weighted mean is exactly
    `sparsity`. The reference search discards off-target trials; shifting keeps every trial on the
    target and costs the sampler nothing (plans differing by a constant map to the same plan)."""
    mean = sum(v * w for v, w in zip(values, weights)) / sum(weights)
    shifted = [v - mean + sparsity for v in values]
    if min(shifted) < 0 or max(shifted) >= 1:
        raise ValueError(f"block sparsities {shifted} leave [0, 1)")
    return shifted


def expand_blocks(block_values: list[float], blocks: list[range]) -> list[float]:
    """Per-layer sparsity from per-block values."""
    return [value for value, layers in zip(block_values, blocks) for _ in layers]


def block_means(layer_values: list[float], blocks: list[range], grid: list[float]) -> list[float]:
    """A per-layer plan (OWL, DAS) summarised per block and snapped to the grid: a TPE warm start."""
    means = [sum(layer_values[i] for i in layers) / len(layers) for layers in blocks]
    return [min(grid, key=lambda g: abs(g - m)) for m in means]
