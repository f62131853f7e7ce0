"""Pruning masks from importance scores: pure tensor functions (no model, no I/O)."""

from __future__ import annotations

import torch


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|: the magnitude baseline's importance of each weight. [d_out, d_in] -> same."""
    return weight.abs()


def keep_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Boolean mask, True = keep: drops the floor(sparsity * n) lowest scores, where n is the size
    of the whole matrix or, with `per_row`, of each output row (weights compete only in their row).
    Ties are broken by position, so exactly that many weights go. scores [d_out, d_in]."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D [d_out, d_in] matrix, got shape {tuple(scores.shape)}")
    groups = scores if per_row else scores.reshape(1, -1)  # [groups, n]
    prune = int(groups.shape[1] * sparsity)
    mask = torch.ones_like(groups, dtype=torch.bool)
    if prune:
        lowest = torch.topk(groups, prune, dim=1, largest=False).indices  # [groups, prune]
        mask.scatter_(1, lowest, False)
    return mask.reshape(scores.shape)
