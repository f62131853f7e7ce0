"""TAMP (arXiv 2504.09897): token-adaptive pruning for multimodal models, as pure tensor functions.

- Diversity-Aware Sparsity (DAS): a linear layer whose output tokens are diverse (low cosine
  similarity among visual tokens, among text tokens and between the two) carries more information and
  keeps more weights.
- Adaptive Multimodal Input Activation (AMIA): instead of every calibration token, a small set that
  covers the output distribution (greedy on attention-weighted kNN scores until the MMD between the set
  and all tokens is small) feeds the activation norms of the Wanda score.
"""

from __future__ import annotations

import math

import torch


def _normalised(outputs: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(outputs.float(), dim=-1)  # [tokens, d]


def _mean_positive(cos: torch.Tensor) -> float:
    return float(cos.clamp_min(0).mean()) if cos.numel() else 1.0  # no pair: no diversity measurable


def cosine_stats(outputs: torch.Tensor, is_visual: torch.Tensor) -> tuple[float, float, float]:
    """(c_v, c_l, c_vl): mean positive pairwise cosine among visual tokens, among text tokens, and
    between visual and text tokens. outputs [tokens, d], is_visual bool [tokens]."""
    if is_visual.all() or not is_visual.any():
        raise ValueError("token diversity needs both visual and text tokens in the sample")
    y = _normalised(outputs)
    visual, text = y[is_visual], y[~is_visual]  # [v, d], [l, d]

    def within(group: torch.Tensor) -> float:
        cos = group @ group.T  # [g, g]
        off_diagonal = ~torch.eye(len(group), dtype=torch.bool)
        return _mean_positive(cos[off_diagonal])

    return within(visual), within(text), _mean_positive(visual @ text.T)


def token_diversity(outputs: torch.Tensor, is_visual: torch.Tensor) -> float:
    """DAS's s = (1 - c_v) + (1 - c_l) + (1 - c_vl) for one sample; 0 when all outputs point alike."""
    return sum(1.0 - c for c in cosine_stats(outputs, is_visual))


def das_keep_counts(sizes: list[int], diversity: list[float], sparsity: float, max_extra: float = 0.1) -> list[int]:
    """Weights to keep per matrix. Each keeps at least n (1 - s_max), s_max = sparsity + max_extra;
    the rest of the keep budget round(sum(n) (1 - sparsity)) is shared in proportion to s_i n_i (a
    matrix's diversity times its size), never above n; exact total by largest remainders."""
    if len(sizes) != len(diversity) or not sizes:
        raise ValueError(f"{len(sizes)} matrix sizes but {len(diversity)} diversity scores")
    if not 0.0 <= sparsity < 1.0 or sparsity + max_extra >= 1.0:
        raise ValueError(f"sparsity {sparsity} + max_extra {max_extra} must stay below 1")
    if min(diversity) < 0:
        raise ValueError(f"diversity scores must be >= 0, got {min(diversity)}")
    budget = round(sum(sizes) * (1.0 - sparsity))
    keep = [math.ceil(n * (1.0 - sparsity - max_extra)) for n in sizes]
    free = [True] * len(sizes)
    while True:  # share what is left; matrices that would exceed their size are filled and removed
        left = budget - sum(keep)
        weights = [s * n if f else 0.0 for s, n, f in zip(diversity, sizes, free)]
        if left <= 0 or sum(weights) == 0:
            weights = [float(n) if f else 0.0 for n, f in zip(sizes, free)]
        total = sum(weights)
        if left <= 0 or total == 0:
            return keep
        share = [left * w / total for w in weights]
        full = [i for i in range(len(sizes)) if free[i] and keep[i] + share[i] >= sizes[i]]
        if not full:
            break
        for i in full:
            keep[i], free[i] = sizes[i], False
    floors = [math.floor(s) for s in share]
    order = sorted(range(len(sizes)), key=lambda i: share[i] - floors[i], reverse=True)
    for rank, i in enumerate(order):
        keep[i] += floors[i] + (1 if rank < left - sum(floors) else 0)
    return keep


def knn_graph(outputs: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [tokens, k], cosine distances [tokens, k]) of each token's k nearest other tokens."""
    y = _normalised(outputs)
    distance = 1.0 - y @ y.T  # [tokens, tokens]
    distance.fill_diagonal_(float("inf"))
    k = min(k, len(y) - 1)
    nearest = torch.topk(distance, k, dim=1, largest=False)
    return nearest.indices, nearest.values.clamp_min(0)


def _rbf(x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.exp(-torch.cdist(x, y).pow(2) / (2 * sigma**2))  # [n, m]


def mmd2(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.0) -> float:
    """Biased MMD^2 between two point sets with a Gaussian RBF kernel. x [n, d], y [m, d]."""
    x, y = x.float(), y.float()
    return float(_rbf(x, x, sigma).mean() + _rbf(y, y, sigma).mean() - 2 * _rbf(x, y, sigma).mean())


def amia_select(outputs: torch.Tensor, attention: torch.Tensor, rho: float, k: int = 3, sigma: float = 1.0,
                damping: float = 0.2, max_tokens: int | None = None) -> torch.Tensor:
    """Bool mask [tokens] of the tokens AMIA keeps. outputs [tokens, d]; attention [tokens], the
    head-averaged attention of the last token; rho in [0, 1], the mean of the three cosines."""
    y = _normalised(outputs)  # [n, d]
    n = len(y)
    limit = min(max_tokens or n, n)
    threshold = 0.1 * math.sqrt(max(1.0 - rho, 0.0))
    a = attention.float()
    index, distance = knn_graph(y, k) if n > 1 else (torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0))
    score = a + (torch.exp(-distance) * a[index]).sum(1)  # [n]: own attention plus neighbours'
    kernel = _rbf(y, y, sigma)  # [n, n]
    all_term = kernel.mean()
    to_all = kernel.mean(1)  # [n]: mean kernel of each token to every token
    selected = torch.zeros(n, dtype=torch.bool)
    sum_to_all, sum_within = 0.0, 0.0  # running sums for an incremental MMD^2
    for count in range(1, limit + 1):
        t = int(torch.where(selected, torch.tensor(-float("inf")), score).argmax())
        sum_to_all += float(to_all[t])
        sum_within += float(2 * kernel[t, selected].sum() + kernel[t, t])
        selected[t] = True
        # neighbours of a chosen token are represented by it: make them less attractive
        score[index[t]] -= torch.exp(-damping * distance[t]) * max(float(score[t]), 0.0)
        if float(all_term) + sum_within / count**2 - 2 * sum_to_all / count < threshold:
            break
    return selected
