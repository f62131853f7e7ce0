"""Applies per-linear sparsities to a model in memory, many times, without reloading it.

No second copy of the model: each linear's dense weight is read back from the checkpoint's files
(`CheckpointWeights`) when it is masked, one linear at a time. A search (`ranked=True`) keeps each
weight's 1-byte rank code (`masks.rank_codes`), so that a trial's mask costs a comparison and the scores
of one rank bucket; a single prune selects each mask from its scores once. SparseGPT's weight update
depends on the sparsity, so it re-runs per trial on the cached Hessians, on the model's device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm import tqdm

from offline_search.core.masks import keep_mask, mask_from_codes, nm_keep_mask, rank_codes
from offline_search.core.metrics import PER_ROW, activation_scores, lognorm_norms, scores_at
from offline_search.core.sparsegpt import sparsegpt_prune
from offline_search.data.checkpoint import CheckpointWeights
from offline_search.model.llava import model_linears
from vllm_adaspkv.errors import ConfigError
from vllm_adaspkv.format import PackedMaskMap


class Pruner:
    """Masks the language-model linears of `model` in place; `apply` restarts from dense each time."""

    def __init__(self, model, weights: CheckpointWeights, stats: dict[str, dict], metric: str,
                 nm: tuple[int, int] | None = None, amia: bool = False, ranked: bool = False,
                 hessians: Callable[[str], torch.Tensor] | None = None, progress: bool = False,
                 per_row: bool | None = None):
        self.linears = model_linears(model)  # mask key -> nn.Linear
        self.weights, self.metric, self.nm, self.stats = weights, metric, nm, stats
        self.per_row = PER_ROW[metric] if per_row is None else per_row  # the comparison group
        self.in_sq_name = "amia_in_sq" if amia else "in_sq"
        missing = [key for key in self.linears if key not in weights]
        if missing:
            raise ConfigError(f"{weights.model_dir}: the checkpoint has no weight {missing[0]} (the model has it)")
        self._fixed_masks: dict[str, torch.Tensor] = {}  # N:M: one mask whatever the sparsity
        self._codes: dict[str, torch.Tensor] = {}  # ranked: uint8 [groups, n] per linear
        self._norms: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # ranked lognorm: [d_out], [d_in]
        # SparseGPT's Hessians: from the calibration cache's files, or in the statistics (small models)
        self.hessian = hessians or (lambda key: stats[key]["hessian"])
        if metric == "sparsegpt":
            if hessians is None and any("hessian" not in stats.get(k, {}) for k in self.linears):
                raise ValueError("SparseGPT needs Hessians; the calibration statistics have none")
            return
        if nm or ranked:
            for key in tqdm(self.linears, desc="ranking", unit="linear", disable=not progress):
                dense = self.dense(key)  # read once for its scores and, for lognorm, its norms
                scores = self.scores(key, dense)
                if nm:
                    self._fixed_masks[key] = nm_keep_mask(scores, *nm)
                else:
                    self._codes[key] = rank_codes(scores, self.per_row)
                    if metric == "lognorm":
                        self._norms[key] = lognorm_norms(dense.abs().float())

    def dense(self, key: str) -> torch.Tensor:
        """The linear's dense weight, read from the checkpoint (on the CPU, in the checkpoint's dtype)."""
        return self.weights.get(key)

    def scores(self, key: str, dense: torch.Tensor | None = None) -> torch.Tensor:
        return activation_scores(self.metric, self.dense(key) if dense is None else dense, self._in_sq(key))

    def _in_sq(self, key: str) -> torch.Tensor | None:
        return self.stats.get(key, {}).get(self.in_sq_name)

    def sizes(self) -> dict[str, int]:
        return {key: m.weight.numel() for key, m in self.linears.items()}

    @torch.no_grad()
    def apply(self, sparsity: dict[str, float], progress: bool = False, keep_masks: bool = True) -> PackedMaskMap:
        """Masks every linear at its sparsity (ignored under N:M); returns the keep masks, held bit-packed
        (a search trial, `keep_masks=False`, needs none: 6.5 GB of bool masks for a 7B model)."""
        masks = PackedMaskMap()
        for key, linear in tqdm(self.linears.items(), desc="masking", unit="linear", disable=not progress):
            dense = self.dense(key)  # [d_out, d_in]
            if self.metric == "sparsegpt":
                weight, mask = sparsegpt_prune(dense.to(linear.weight.device), self.hessian(key),
                                               sparsity[key], self.nm)
                linear.weight.copy_(weight)
                mask = mask.cpu()
            else:
                mask = self._mask(key, dense, sparsity[key])
                linear.weight.copy_(dense * mask)
            if keep_masks:
                masks.add(key, mask)
        return masks

    def _mask(self, key: str, dense: torch.Tensor, sparsity: float) -> torch.Tensor:
        if self.nm:
            return self._fixed_masks[key]
        if key in self._codes:
            in_sq = self._in_sq(key)
            return mask_from_codes(self._codes[key], dense.shape, sparsity,
                                   lambda flat: scores_at(self.metric, dense, in_sq, flat, self._norms.get(key)))
        return keep_mask(self.scores(key, dense), sparsity, self.per_row)

    @torch.no_grad()
    def restore(self) -> None:
        for key, linear in self.linears.items():
            linear.weight.copy_(self.dense(key))
