"""SparseGPT (Frantar & Alistarh 2023): one-shot pruning with an optimal-brain-surgeon weight update.

For a linear layer W [d_out, d_in] and the Hessian of its reconstruction loss H = mean(2 x x^T) over
calibration tokens, columns are processed left to right in blocks. Inside a block the mask drops the
weights with the smallest w^2 / [H^-1]_jj^2 (over the whole block, or N of every M inputs per row);
each pruned column's error is then spread over the not-yet-processed columns through the upper
Cholesky factor of H^-1, so that the layer's outputs on the calibration data change as little as
possible. Pure tensor functions: no model, no I/O.

Deviation from the reference (IST-DASLab/sparsegpt): the unstructured mask drops exactly
int(sparsity * block size) weights per block (topk) where the reference's `score <= thresh` drops
one more, and more on ties; so the achieved sparsity is the requested one rounded down per block.
"""

from __future__ import annotations

import torch

from vllm_adaspkv.errors import AdaspkvError


def accumulate_hessian(hessian: torch.Tensor | None, count: int, inputs: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Running mean of 2 x x^T over tokens: inputs [..., d_in] -> (H [d_in, d_in], tokens so far)."""
    x = inputs.reshape(-1, inputs.shape[-1]).float()  # [t, d_in]
    t = x.shape[0]
    update = 2.0 * x.T @ x  # [d_in, d_in], summed over the t tokens
    if hessian is None:
        return update / t, t
    return hessian * (count / (count + t)) + update / (count + t), count + t


def sparsegpt_prune(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float,
                    nm: tuple[int, int] | None = None, blocksize: int = 128,
                    percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (updated weight [d_out, d_in] with exact zeros where pruned, keep mask bool [d_out, d_in]).
    With `nm`, N of every M consecutive inputs of each row are pruned and `sparsity` is ignored."""
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D [d_out, d_in], got shape {tuple(weight.shape)}")
    d_out, d_in = weight.shape
    if hessian.shape != (d_in, d_in):
        raise ValueError(f"hessian shape {tuple(hessian.shape)} does not match d_in={d_in}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity} must be in [0, 1)")
    if blocksize < 1 or percdamp < 0:
        raise ValueError(f"blocksize={blocksize} must be >= 1 and percdamp={percdamp} >= 0")
    if nm is not None:
        n, m = nm
        if not 0 < n < m or d_in % m or blocksize % m:
            raise ValueError(f"N:M = {n}:{m}: need 0 < N < M, with M dividing d_in={d_in} and the block size")
    # copies, in float32 for the inversions; the Hessian may come from a cache on another device
    w = weight.detach().to(torch.float32, copy=True)  # [d_out, d_in]
    h = hessian.detach().to(w.device, torch.float32, copy=True)  # [d_in, d_in]
    if not torch.isfinite(h).all():
        raise AdaspkvError("the Hessian has non-finite entries (inf / NaN in the calibration activations?)")
    dead = torch.diag(h) == 0  # inputs never active: their weights cannot matter
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h.diagonal().add_(percdamp * torch.diag(h).mean())  # dampening keeps a rank-deficient H invertible
    try:
        hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    except RuntimeError:  # torch.linalg.LinAlgError subclasses it
        raise AdaspkvError("the Hessian is not positive definite even after dampening; use more calibration "
                         "tokens or a larger percdamp") from None
    mask = torch.ones_like(w, dtype=torch.bool)
    for start in range(0, d_in, blocksize):
        end = min(start + blocksize, d_in)
        w1 = w[:, start:end].clone()  # [d_out, b]
        hinv1 = hinv[start:end, start:end]  # [b, b]
        err1 = torch.zeros_like(w1)
        mask1 = torch.ones_like(w1, dtype=torch.bool)
        if nm is None and sparsity > 0:
            score = w1.pow(2) / torch.diag(hinv1).pow(2)[None, :]  # [d_out, b]
            drop = int(score.numel() * sparsity)  # exact count, not the reference's `<= thresh`
            if drop:
                mask1.view(-1)[torch.topk(score.flatten(), drop, largest=False).indices] = False
        for j in range(end - start):
            if nm is not None and j % nm[1] == 0:  # choose this group of M from the updated weights
                group = w1[:, j:j + nm[1]].pow(2) / torch.diag(hinv1)[j:j + nm[1]].pow(2)[None, :]  # [d_out, m]
                lowest = torch.topk(group, nm[0], dim=1, largest=False).indices
                mask1[:, j:j + nm[1]].scatter_(1, lowest, False)
            col = w1[:, j]
            quantized = col * mask1[:, j]
            err = (col - quantized) / hinv1[j, j]  # [d_out]
            w1[:, j:] -= err[:, None] * hinv1[j, j:][None, :]
            w1[:, j] = quantized
            err1[:, j] = err
        w[:, start:end] = w1
        mask[:, start:end] = mask1
        w[:, end:] -= err1 @ hinv[start:end, end:]  # carry the block's error to later columns
    # Dead inputs' weights were zeroed above: the mask says so, so that it counts every zero the weight
    # has (the achieved sparsity may then exceed the requested one).
    mask[:, dead] = False
    return (w * mask).to(weight.dtype), mask
