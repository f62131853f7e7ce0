"""TAMP (Lee et al., "Token-Adaptive Layerwise Pruning in Multimodal LLMs", arXiv 2504.09897), as pure
tensor functions: no model, no hooks, no I/O.

- Diversity-Aware Sparsity (DAS): a linear layer whose output tokens are diverse (low cosine similarity
  among visual tokens, among text tokens and between the two) carries more information, so its matrix
  keeps more weights; no matrix is pruned beyond the target sparsity + max_extra.
- Adaptive Multimodal Input Activation (AMIA): instead of every calibration token, a small set of tokens
  feeds the activation norms of the Wanda score. Tokens are scored by their attention plus that of their
  kNN neighbours, picked greedily (picking a token damps its neighbours) until the maximum mean discrepancy
  between the picked set and all tokens falls below 0.1 sqrt(1 - rho), rho = how alike the tokens are.
"""

from __future__ import annotations

import math

import torch

from vllm_adaspkv.errors import ConfigError


def _normalised(outputs: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(outputs.float(), dim=-1)  # [tokens, d]


def _mean_within(cos: torch.Tensor) -> float:
    """Mean of max(cos, 0) over the off-diagonal pairs of a square block; 1 (no diversity measurable) when
    the group has a single token and so no pair."""
    g = len(cos)
    if g < 2:
        return 1.0
    positive = cos.clamp_min(0)  # [g, g]
    return float((positive.sum() - positive.diagonal().sum()) / (g * (g - 1)))


def cosine_stats(outputs: torch.Tensor, is_visual: torch.Tensor) -> tuple[float, float, float]:
    """(c_v, c_l, c_vl): mean over token pairs of max(cos, 0) among visual tokens, among text tokens, and
    between visual and text tokens, for one sample. outputs [tokens, d], is_visual bool [tokens]."""
    if is_visual.shape != outputs.shape[:1]:
        raise ValueError(f"is_visual has shape {tuple(is_visual.shape)}, expected ({len(outputs)},)")
    is_visual = is_visual.to(device=outputs.device, dtype=torch.bool)
    if is_visual.all() or not is_visual.any():
        raise ConfigError("token diversity needs both visual and text tokens in the sample")
    y = _normalised(outputs)
    visual, text = y[is_visual], y[~is_visual]  # [v, d], [l, d]
    c_vl = float((visual @ text.T).clamp_min(0).mean())  # every pair is off-diagonal here
    return _mean_within(visual @ visual.T), _mean_within(text @ text.T), c_vl


def token_diversity(outputs: torch.Tensor, is_visual: torch.Tensor) -> float:
    """DAS's s = (1 - c_v) + (1 - c_l) + (1 - c_vl) for one sample, in [0, 3]: 0 when all outputs point
    alike, 3 when they are pairwise orthogonal. A group of one token adds 0 (its c is taken as 1)."""
    return sum(1.0 - c for c in cosine_stats(outputs, is_visual))


def _base_counts(sizes: list[int], keep_fraction: float, budget: int) -> list[int]:
    """Per-matrix floor of the keep count, n (1 - s_max), rounded so that the bases fit in the budget."""
    # ceil keeps every matrix at sparsity <= s_max; the tolerance stops float dust (0.6 * 10 = 6.0000001)
    # from costing a weight. When tiny matrices make the ceilings overshoot the budget, floors always fit.
    base = [math.ceil(n * keep_fraction - 1e-6) for n in sizes]
    if sum(base) > budget:
        base = [math.floor(n * keep_fraction) for n in sizes]
    while sum(base) > budget:  # only float dust with max_extra ~ 0 can get here: trim the largest
        base[base.index(max(base))] -= 1
    return base


def das_keep_counts(sizes: list[int], diversity: list[float], sparsity: float, max_extra: float = 0.1) -> list[int]:
    """Number of weights each matrix keeps under DAS. sizes [matrices] weights per matrix, diversity
    [matrices] its averaged s. Each matrix keeps a base ceil(n (1 - s_max)), s_max = sparsity + max_extra;
    the rest of the budget round(sum(n) (1 - sparsity)) is shared in proportion to s_i n_i (so equal
    diversity gives every matrix the target sparsity), a matrix never keeps more than n (the excess goes to
    the others), and the total is exactly the budget (largest remainders). All-zero diversity shares by n."""
    if not sizes or len(sizes) != len(diversity):
        raise ValueError(f"{len(sizes)} matrix sizes but {len(diversity)} diversity scores")
    if min(sizes) < 1:
        raise ValueError(f"matrix sizes must be >= 1, got {min(sizes)}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity} must be in [0, 1)")
    if max_extra < 0 or sparsity + max_extra >= 1.0:
        raise ValueError(f"sparsity {sparsity} + max_extra {max_extra} must stay below 1, max_extra >= 0")
    if not all(math.isfinite(s) and s >= 0 for s in diversity):
        raise ValueError(f"diversity scores must be finite and >= 0, got {diversity}")
    budget = round(sum(sizes) * (1.0 - sparsity))
    keep = _base_counts(sizes, 1.0 - sparsity - max_extra, budget)
    free = [i for i, n in enumerate(sizes) if keep[i] < n]
    left = budget - sum(keep)
    while left > 0:  # water-filling: a share beyond a matrix's size fills it, the rest is shared again
        weight = {i: diversity[i] * sizes[i] for i in free}
        if sum(weight.values()) == 0:
            weight = {i: float(sizes[i]) for i in free}
        total = sum(weight.values())
        share = {i: left * w / total for i, w in weight.items()}
        full = [i for i in free if keep[i] + share[i] >= sizes[i]]
        if full:
            for i in full:
                left -= sizes[i] - keep[i]
                keep[i] = sizes[i]
            free = [i for i in free if i not in full]
            continue
        whole = {i: math.floor(s) for i, s in share.items()}
        for i in free:
            keep[i] += whole[i]
        # keep + share < n for every free matrix, so one more weight still fits within n
        by_remainder = sorted(free, key=lambda i: share[i] - whole[i], reverse=True)
        for i in by_remainder[: left - sum(whole.values())]:
            keep[i] += 1
        break
    return keep


def _nearest(distance: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """k nearest other tokens in a [tokens, tokens] distance matrix (k capped at tokens - 1)."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    others = distance.clone()
    others.fill_diagonal_(float("inf"))  # a token is not its own neighbour
    nearest = torch.topk(others, min(k, len(distance) - 1), dim=1, largest=False)
    return nearest.indices, nearest.values  # [tokens, k] each


def _cosine_distance(y: torch.Tensor) -> torch.Tensor:
    return (1.0 - y @ y.T).clamp_min(0)  # [tokens, tokens]; clamp: float dust below 0 on the diagonal


def knn_graph(outputs: torch.Tensor, k: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(indices [tokens, k], cosine distances 1 - cos [tokens, k]) of each token's k nearest other tokens,
    nearest first. outputs [tokens, d]; k is capped at tokens - 1."""
    return _nearest(_cosine_distance(_normalised(outputs)), k)


def _rbf(x: torch.Tensor, y: torch.Tensor, sigma: float) -> torch.Tensor:
    return torch.exp(-torch.cdist(x, y).pow(2) / (2 * sigma**2))  # [n, m]


def mmd2(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.0) -> float:
    """Biased (V-statistic) MMD^2 between point sets x [n, d] and y [m, d], Gaussian kernel
    exp(-||x - y||^2 / (2 sigma^2)), on the points as given (AMIA passes L2-normalised outputs)."""
    x, y = x.double(), y.double()
    return float(_rbf(x, x, sigma).mean() + _rbf(y, y, sigma).mean() - 2 * _rbf(x, y, sigma).mean())


def amia_select(outputs: torch.Tensor, attention: torch.Tensor, rho: float, k: int = 3, sigma: float = 1.0,
                damping: float = 0.2, max_tokens: int | None = None) -> torch.Tensor:
    """Bool mask [tokens] (on outputs' device) of the tokens AMIA keeps for one linear and one sample.

    outputs [tokens, d], the linear's outputs; attention [tokens] >= 0, the head-averaged attention row of
    the last token; rho in [0, 1], the mean of cosine_stats. Score g_i = a_i + sum_{j in kNN(i)} exp(-d_ij)
    a_j; pick the best unpicked token t, damp its neighbours g_j -= exp(-damping d_tj) max(g_t, 0); stop
    once MMD^2(all, picked) <= 0.1 sqrt(1 - rho) or max_tokens (default all) are picked."""
    n = len(outputs)
    if n == 0 or attention.shape != (n,):
        raise ValueError(f"attention has shape {tuple(attention.shape)}, expected ({n},) with tokens > 0")
    if not 0.0 <= rho <= 1.0:
        raise ValueError(f"rho {rho} must be in [0, 1]")
    if max_tokens is not None and max_tokens < 1:
        raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
    if sigma <= 0:
        raise ValueError(f"sigma must be > 0, got {sigma}")
    if (attention < 0).any():
        raise ValueError("attention weights must be >= 0")
    distance = _cosine_distance(_normalised(outputs))  # [n, n]
    a = attention.to(distance)  # [n]
    if n > 1:
        index, near = _nearest(distance, k)  # [n, k] each
        score = a + (torch.exp(-near) * a[index]).sum(1)  # [n]: own attention plus the neighbours'
    else:
        index, near, score = torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, 0), a
    kernel = torch.exp(-distance / sigma**2)  # [n, n]: the RBF kernel, since ||y_i - y_j||^2 = 2 d_ij
    # The greedy loop is sequential and touches O(n) numbers per step: on the CPU no step waits for a
    # device round trip; float64 keeps the running sums of the incremental MMD^2 exact enough.
    kernel, score = kernel.cpu().double(), score.cpu().double()
    index, damp = index.cpu(), torch.exp(-damping * near).cpu().double()  # [n, k] each
    all_mean = float(kernel.mean())  # mean k(x, x') over all pairs: the fixed part of MMD^2
    to_all = kernel.mean(1).tolist()  # [n]: mean kernel from each token to every token
    to_picked = torch.zeros(n, dtype=torch.float64)  # [n]: kernel summed from each token to the picked
    picked = torch.zeros(n, dtype=torch.bool)
    threshold = 0.1 * math.sqrt(1.0 - rho)
    sum_to_all = sum_within = 0.0  # sum over picked t of to_all[t]; sum over picked pairs of the kernel
    for count in range(1, min(max_tokens or n, n) + 1):
        t = int(score.argmax())
        gain = max(float(score[t]), 0.0)
        score[t] = -math.inf  # never picked twice; damped neighbours already picked stay at -inf
        # a picked token stands for its close neighbours: make them less attractive, the closer the more
        score[index[t]] -= damp[t] * gain
        picked[t] = True
        sum_within += 2 * float(to_picked[t]) + float(kernel[t, t])  # new pairs (t, s), (s, t) and (t, t)
        to_picked += kernel[t]
        sum_to_all += to_all[t]
        if all_mean + sum_within / count**2 - 2 * sum_to_all / count <= threshold:
            break
    return picked.to(outputs.device)
