"""Pruning importance scores: pure tensor functions (no model, no I/O).

Every function maps a linear layer's weight W [d_out, d_in] (and, where the metric uses activations,
the mean squared input of each feature over the calibration tokens, `in_sq` [d_in]) to a score of the
same shape as W; higher means more important. SparseGPT is not here: it updates weights as it prunes
(offline_search/core/sparsegpt.py).
"""

from __future__ import annotations

from typing import Literal, get_args

import torch

Metric = Literal["magnitude", "wanda", "lognorm", "sparsegpt"]
METRICS: tuple[str, ...] = get_args(Metric)
# Metrics that rank weights inside each output row (Wanda's observation); magnitude ranks the whole
# matrix as in the Wanda paper's magnitude baseline. SparseGPT selects inside its column blocks.
PER_ROW = {"magnitude": False, "wanda": True, "lognorm": True, "sparsegpt": False}


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """|W|: the magnitude baseline's importance of each weight. [d_out, d_in] -> same."""
    return weight.abs()


def wanda_scores(weight: torch.Tensor, in_sq: torch.Tensor) -> torch.Tensor:
    """Wanda (Sun et al. 2023): |W_ij| * ||X_j||_2. weight [d_out, d_in], in_sq [d_in] -> [d_out, d_in]."""
    _check(weight, in_sq)
    return weight.abs() * in_sq.sqrt()[None, :]


def lognorm_scores(weight: torch.Tensor, in_sq: torch.Tensor) -> torch.Tensor:
    """The paper's metric (arXiv 2507.20613): log1p(|W_ij| / ||W_i,:|| + |W_ij| / ||W_:,j||)
    * (mean ||X_j||^2)^(1/4). The two relative magnitudes keep a weight that is large for its row
    or for its column; the fourth root damps the activation outliers that dominate Wanda."""
    _check(weight, in_sq)
    w = weight.abs().float()  # [d_out, d_in]
    row_norm, col_norm = lognorm_norms(w)
    return _lognorm(w, row_norm[:, None], col_norm[None, :], in_sq.float().pow(0.25)[None, :])


def lognorm_norms(w_abs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(row norms [d_out], column norms [d_in]) of |W| in float32: lognorm's whole-matrix part."""
    eps = torch.finfo(torch.float32).tiny  # an all-zero row or column scores 0, not NaN
    return w_abs.norm(dim=1).clamp_min(eps), w_abs.norm(dim=0).clamp_min(eps)  # [d_out], [d_in]


def _lognorm(w_abs, row_norm, col_norm, in_fourth_root):
    return torch.log1p(w_abs / row_norm + w_abs / col_norm) * in_fourth_root


def activation_scores(metric: str, weight: torch.Tensor, in_sq: torch.Tensor | None) -> torch.Tensor:
    """The score of `metric` (magnitude, wanda or lognorm) for one weight matrix."""
    _need_inputs(metric, in_sq)
    if metric == "magnitude":
        return magnitude_scores(weight)
    if metric == "wanda":
        return wanda_scores(weight, in_sq)
    return lognorm_scores(weight, in_sq)


def scores_at(metric: str, weight: torch.Tensor, in_sq: torch.Tensor | None, flat: torch.Tensor,
              norms: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """activation_scores(metric, weight, in_sq).reshape(-1)[flat], computed for those weights only.
    lognorm also needs the whole matrix's `lognorm_norms(|W|)`: pass them when they are known.
    flat int64 [k] -> [k]."""
    _need_inputs(metric, in_sq)
    d_in = weight.shape[1]
    rows, cols = flat // d_in, flat % d_in  # [k]
    w = weight.reshape(-1)[flat]  # [k]
    if metric == "magnitude":
        return w.abs()
    if metric == "wanda":
        _check(weight, in_sq)
        return w.abs() * in_sq.sqrt()[cols]
    _check(weight, in_sq)
    row_norm, col_norm = norms if norms is not None else lognorm_norms(weight.abs().float())
    return _lognorm(w.abs().float(), row_norm[rows], col_norm[cols], in_sq.float().pow(0.25)[cols])


def _need_inputs(metric: str, in_sq: torch.Tensor | None) -> None:
    if metric not in ("magnitude", "wanda", "lognorm"):
        raise ValueError(f"metric {metric!r} has no score function; choose from magnitude, wanda, lognorm")
    if metric != "magnitude" and in_sq is None:
        raise ValueError(f"metric {metric!r} needs calibration statistics of the layer's inputs")


def _check(weight: torch.Tensor, in_sq: torch.Tensor) -> None:
    if weight.dim() != 2 or in_sq.shape != (weight.shape[1],):
        raise ValueError(f"weight {tuple(weight.shape)} and input statistics {tuple(in_sq.shape)} "
                         "do not match: expected [d_out, d_in] and [d_in]")
