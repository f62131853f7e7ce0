"""Perplexity with the protocol of the pruning papers, and a unigram baseline.

Protocol (SparseGPT, Wanda): the test text joined with "\\n\\n", tokenized once, cut into
non-overlapping windows of the model's sequence length (the tail shorter than one window is dropped),
every window scored independently; perplexity = exp(mean next-token NLL over all windows).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from vllm_adaspkv.errors import ConfigError


def windows(tokens: torch.Tensor, seq_len: int, limit: int | None = None) -> torch.Tensor:
    """[num_windows, seq_len] non-overlapping windows of a 1-D token stream."""
    if seq_len < 2:
        raise ValueError(f"seq_len={seq_len} must be >= 2")
    count = tokens.numel() // seq_len
    if limit is not None:
        count = min(count, limit)
    if count == 0:
        raise ConfigError(f"{tokens.numel()} tokens make no window of {seq_len}")
    return tokens[: count * seq_len].view(count, seq_len)


def window_nll(logits: torch.Tensor, window: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL of each window: logits [B, L, V], window [B, L] -> [B]."""
    logprobs = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return -logprobs.gather(-1, window[:, 1:, None]).squeeze(-1).sum(dim=1)


def perplexity(score_windows: Callable[[torch.Tensor], torch.Tensor], batches: list[torch.Tensor]) -> float:
    """exp(mean NLL); `score_windows` maps [B, L] token windows to their summed NLL [B]."""
    total, count = 0.0, 0
    for batch in batches:
        total += float(score_windows(batch).sum())
        count += batch.shape[0] * (batch.shape[1] - 1)
    return math.exp(total / count)


def window_mean_nll(score_windows: Callable[[torch.Tensor], torch.Tensor], batches) -> torch.Tensor:
    """Mean next-token NLL of every window, [num_windows] float64: exp(mean) is the perplexity (the
    windows are of equal length), and their spread gives its standard error."""
    means = [score_windows(batch).double() / (batch.shape[1] - 1) for batch in batches]
    return torch.cat(means) if means else torch.zeros(0, dtype=torch.float64)


def perplexity_standard_error(window_means: torch.Tensor) -> float:
    """Standard error of exp(mean) over windows (delta method: ppl x SE of the mean log-loss), for a
    subset of windows taken as a sample of the test text. Two methods scored on the same windows are
    compared by their paired differences (`window_mean_nll` of each), which vary much less."""
    n = window_means.numel()
    if n < 2:
        return float("nan")
    return math.exp(float(window_means.mean())) * float(window_means.std()) / math.sqrt(n)


def unigram_perplexity(train_tokens: torch.Tensor, test_tokens: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of add-one-smoothed token frequencies of `train_tokens` on `test_tokens`."""
    counts = torch.bincount(train_tokens, minlength=vocab_size).double() + 1.0
    logprobs = torch.log(counts / counts.sum())
    return math.exp(float(-logprobs[test_tokens].mean()))
