"""Pruning masks from importance scores: pure tensor functions (no model, no I/O).

A mask is boolean, True = keep, with the weight's shape [d_out, d_in]. Every mask drops the
round(sparsity * numel) lowest scores (of the matrix or, per row, rows losing equal counts +-1), ties
broken by position: `keep_mask` finds them by selection (kthvalue, no sort), `mask_from_order` from a
full ranking, and `mask_from_codes` from 1-byte rank codes (`rank_codes`) plus the scores of one bucket,
which is how a search masks a 7B model at many sparsities without 8 bytes of ranking per weight.
"""

from __future__ import annotations

from collections.abc import Callable

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
    dropped = torch.arange(n, device=order.device)[None, :] < _drop_counts(groups, n, sparsity, order.device)[:, None]
    mask = torch.empty((groups, n), dtype=torch.bool, device=order.device)  # dropped: [groups, n], in rank order
    mask.scatter_(1, order, ~dropped)
    return mask.reshape(shape)


def _drop_counts(groups: int, n: int, sparsity: float, device=None) -> torch.Tensor:
    """Weights dropped per group: round(sparsity * groups * n) in all, the first groups one more. [groups]"""
    total = round(sparsity * groups * n)
    per_group = torch.full((groups,), total // groups, device=device)
    per_group[: total % groups] += 1
    return per_group


def keep_mask(scores: torch.Tensor, sparsity: float, per_row: bool = False) -> torch.Tensor:
    """Boolean mask, True = keep: drops the round(sparsity * numel) lowest scores of the whole
    matrix or, with `per_row`, the lowest of each output row (weights compete only in their row; rows
    lose equal counts, +-1). Ties are broken by position, so exactly that many go. scores [d_out, d_in]."""
    _check_sparsity(sparsity)
    if scores.dim() != 2:
        raise ValueError(f"scores must be a 2-D [d_out, d_in] matrix, got shape {tuple(scores.shape)}")
    groups = scores if per_row else scores.reshape(1, -1)  # [groups, n]
    g, n = groups.shape
    drop = _drop_counts(g, n, sparsity, scores.device)  # [g]: two values at most, q + 1 (first rows) and q
    threshold = torch.full((g,), float("-inf"), dtype=groups.dtype, device=scores.device)
    for count in drop.unique().tolist():
        if count:
            rows = drop == count
            threshold[rows] = torch.kthvalue(groups[rows], count, dim=1).values
    below = groups < threshold[:, None]  # [g, n], all dropped
    tied = groups == threshold[:, None]  # the first (drop - below) of these, by position, go too
    tied_needed = drop - below.sum(1)  # [g]
    dropped = below | (tied & (tied.cumsum(1) <= tied_needed[:, None]))
    return (~dropped).reshape(scores.shape)


RANK_LEVELS = 256  # rank buckets of a uint8 code


def rank_codes(scores: torch.Tensor, per_row: bool = False) -> torch.Tensor:
    """Each weight's rank bucket in its group (row, or the whole matrix), 1 byte a weight: rank r of
    n goes to bucket r * 256 // n. [d_out, d_in] -> uint8 [groups, n]."""
    order = prune_order(scores, per_row)  # [groups, n], transient int64
    n = order.shape[1]
    bucket = (torch.arange(n, device=order.device) * RANK_LEVELS // n).to(torch.uint8)  # [n]: bucket of each rank
    codes = torch.empty(order.shape, dtype=torch.uint8, device=order.device)
    codes.scatter_(1, order, bucket.expand_as(order))
    return codes


def mask_from_codes(codes: torch.Tensor, shape: torch.Size, sparsity: float,
                    scores_at: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """keep_mask(scores, sparsity, per_row) from `rank_codes` of those scores: buckets below the one that
    holds each group's first kept rank go, buckets above stay, and inside that one bucket the weights
    are ordered by `scores_at(flat positions)` (the scores of those weights only, about 1/256 of them).
    codes uint8 [groups, n] -> bool `shape`."""
    _check_sparsity(sparsity)
    groups, n = codes.shape
    drop = _drop_counts(groups, n, sparsity, codes.device)  # [groups]
    boundary = drop * RANK_LEVELS // n  # [groups]: the bucket of rank `drop`, the first kept one
    first_rank = -(-boundary * n // RANK_LEVELS)  # [groups]: the lowest rank in that bucket
    keep = codes > boundary[:, None]  # [groups, n]
    row, col = (codes == boundary[:, None]).nonzero(as_tuple=True)  # the boundary bucket, in position order
    by_score = torch.sort(scores_at(row * n + col), stable=True).indices
    order = by_score[torch.sort(row[by_score], stable=True).indices]  # by group, then score, then position
    row, col = row[order], col[order]
    starts = torch.cumsum(torch.bincount(row, minlength=groups), 0) - torch.bincount(row, minlength=groups)
    rank_in_bucket = torch.arange(row.numel(), device=codes.device) - starts[row]
    kept = rank_in_bucket >= (drop - first_rank)[row]
    keep[row[kept], col[kept]] = True
    return keep.reshape(shape)


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
