"""Applies per-linear sparsities to a model in memory, many times, without reloading it.

The dense weights are kept aside and each metric's ranking is computed once; a search trial then
costs one scatter per matrix (SparseGPT excepted: its weight update depends on the sparsity, so it
re-runs per trial on the cached Hessians).
"""

from __future__ import annotations

import torch

from offline_search.core.masks import mask_from_order, nm_keep_mask, prune_order
from offline_search.core.metrics import PER_ROW, activation_scores
from offline_search.core.sparsegpt import sparsegpt_prune
from offline_search.model.llava import model_linears


class Pruner:
    """Masks the language-model linears of `model` in place; `apply` restarts from dense each time."""

    def __init__(self, model, stats: dict[str, dict], metric: str, nm: tuple[int, int] | None = None,
                 amia: bool = False):
        self.linears = model_linears(model)  # mask key -> nn.Linear
        self.metric, self.nm, self.stats = metric, nm, stats
        self.dense = {key: m.weight.detach().clone() for key, m in self.linears.items()}
        in_sq_name = "amia_in_sq" if amia else "in_sq"
        self._fixed_masks: dict[str, torch.Tensor] = {}
        self._orders: dict[str, torch.Tensor] = {}
        if metric == "sparsegpt":
            missing = [k for k in self.linears if "hessian" not in stats.get(k, {})]
            if missing:
                raise ValueError(f"SparseGPT needs Hessians; calibration has none for {missing[0]}")
            return
        for key, weight in self.dense.items():
            scores = activation_scores(metric, weight, stats.get(key, {}).get(in_sq_name))
            if nm:
                self._fixed_masks[key] = nm_keep_mask(scores, *nm)
            else:  # int32 halves the memory of the rankings; scatter needs int64 only per call
                self._orders[key] = prune_order(scores, PER_ROW[metric]).to(torch.int32)

    def sizes(self) -> dict[str, int]:
        return {key: w.numel() for key, w in self.dense.items()}

    @torch.no_grad()
    def apply(self, sparsity: dict[str, float]) -> dict[str, torch.Tensor]:
        """Masks every linear at its sparsity (ignored under N:M); returns the keep masks."""
        masks = {}
        for key, linear in self.linears.items():
            dense = self.dense[key]
            if self.metric == "sparsegpt":
                weight, mask = sparsegpt_prune(dense, self.stats[key]["hessian"], sparsity[key], self.nm)
                linear.weight.copy_(weight)
            else:
                if self.nm:
                    mask = self._fixed_masks[key]
                else:
                    mask = mask_from_order(self._orders[key].long(), dense.shape, sparsity[key])
                linear.weight.copy_(dense * mask)
            masks[key] = mask
        return masks

    @torch.no_grad()
    def restore(self) -> None:
        for key, linear in self.linears.items():
            linear.weight.copy_(self.dense[key])
