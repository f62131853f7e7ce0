"""Pruning masks from importance scores: pure tensor functions (no model, no I/O).

A mask is boolean, True = keep, with the weight's shape [d_out, d_in]. `prune_order` ranks the scores
once, so that masks at many sparsities (one per search trial) cost a scatter, not a sort.
"""

from __future__ import annotations

import torch

from vllm_adaspkv.errors import ConfigError


def _check_sparsity(sparsity: float) -> None:
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")


def prune_order(scores: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """Positions from least to most important, within each row (`per_row`) or over the whole
    matrix: [d_out, d_in] -> [d_out, d_in] or [1, d_out * d_in]. Ties keep the earlier position."""
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D [d_out, d_in] matrix, got shape {tuple(scores.shape)}")
    groups = scores if per_row else scores.reshape(1, -1)  # [groups, n]
    return torch.sort(groups, dim=1, stable=True).indices


def mask_from_order(order: torch.Tensor, shape: torch.Size, sparsity: float) -> torch.Tensor:
    """Drops round(sparsity * numel) weights in all, the first positions of each group of `order`
    (see prune_order); with several groups (rows), counts differ by at most one between groups, so
    the matrix sparsity is exact even where sparsity * row length is not an integer."""
    _check_sparsity(sparsity)
    groups, n = order.shape
    total = round(sparsity * groups * n)
    per_group = torch.full((groups, 1), total // groups)
    per_group[: total % groups] += 1  # [groups, 1]
    dropped = torch.arange(n)[None, :] < per_group  # [groups, n], in rank order
    mask = torch.empty((groups, n), dtype=torch.bool)
    mask.scatter_(1, order, ~dropped)
    return mask.reshape(shape)


def keep_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Boolean mask, True = keep: drops the round(sparsity * numel) lowest scores of the whole
    matrix or, with `per_row`, the lowest of each output row (weights compete only in their row; rows
    lose equal counts, +-1). Ties are broken by position, so exactly that many go. scores [d_out, d_in]."""
    _check_sparsity(sparsity)
    return mask_from_order(prune_order(scores, per_row), scores.shape, sparsity)


def parse_nm(text: str) -> tuple[int, int]:
    """"2:4" -> (2, 4): N of every M consecutive weights are pruned."""
    try:
        n, m = (int(part) for part in text.split(":"))
    except ValueError:
        raise ConfigError(f"N:M pattern {text!r}: write it as two integers such as 2:4") from None
    if not 0 < n < m:
        raise ConfigError(f"N:M pattern {text!r}: need 0 < N < M")
    return n, m


def nm_keep_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """N:M semi-structured mask: in every row, each group of M consecutive inputs loses its N
    lowest scores (2:4 keeps two of every four). scores [d_out, d_in], d_in divisible by M."""
    if not 0 < n < m:
        raise ValueError(f"N:M = {n}:{m}: need 0 < N < M")
    if scores.dim() != 2 or scores.shape[1] % m:
        raise ConfigError(f"N:M = {n}:{m} needs a 2-D score matrix whose {scores.shape[-1]} "
                         f"inputs divide into groups of {m}")
    groups = scores.reshape(scores.shape[0], -1, m)  # [d_out, d_in / m, m]
    mask = torch.ones_like(groups, dtype=torch.bool)
    lowest = torch.topk(groups, n, dim=2, largest=False).indices  # [d_out, d_in / m, n]
    mask.scatter_(2, lowest, False)
    return mask.reshape(scores.shape)
