import pytest
import torch

from offline_search.masks import keep_mask
from offline_search.sparsegpt import accumulate_hessian, sparsegpt_prune


def test_identity_hessian_is_magnitude_pruning_without_update():
    # With H = I the inverse has no off-diagonal terms: no compensation, w^2 / 1 ranks like |w|.
    weight = torch.tensor([[0.1, -0.4, 0.3, -0.2], [2.0, 1.0, -3.0, 0.5]])
    new, mask = sparsegpt_prune(weight, torch.eye(4), 0.5, percdamp=0.0)
    # the block is the whole 2x4 matrix: the 4 smallest |w| over it go (0.1, 0.2, 0.3, 0.4)
    assert mask.tolist() == [[False, False, False, False], [True, True, True, True]]
    assert torch.equal(new, weight * mask)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_nm_pattern(n, m):
    x = torch.randn(128, 32)
    h, _ = accumulate_hessian(None, 0, x)
    new, mask = sparsegpt_prune(torch.randn(8, 32), h, 0.0, nm=(n, m))
    assert (mask.reshape(8, -1, m).sum(-1) == m - n).all()
    assert (new[~mask] == 0).all()


@pytest.mark.parametrize("d_in", [40, 200])  # one partial block; one full block and a partial one
def test_exact_sparsity_and_zeros(d_in):
    x = torch.randn(256, d_in)
    h, _ = accumulate_hessian(None, 0, x)
    new, mask = sparsegpt_prune(torch.randn(16, d_in), h, 0.5)
    blocks = -(-d_in // 128)
    assert abs(int((~mask).sum()) - 16 * d_in // 2) <= blocks
    assert (new[~mask] == 0).all()


def test_update_reduces_the_reconstruction_error():
    generator = torch.Generator().manual_seed(0)
    # correlated inputs, as activations are: rank 8 plus a little noise
    x = (torch.randn(256, 8, generator=generator) @ torch.randn(8, 32, generator=generator)
         + 0.1 * torch.randn(256, 32, generator=generator))
    weight = torch.randn(16, 32, generator=generator)
    h, _ = accumulate_hessian(None, 0, x)
    new, mask = sparsegpt_prune(weight, h, 0.5)

    def error(w):
        return float((x @ weight.T - x @ w.T).norm())

    assert error(new) < 0.5 * error(weight * mask)  # the OBS update, not only the mask, helps
    best = torch.zeros_like(weight)  # the least-squares optimum for this mask bounds it from below
    for row in range(weight.shape[0]):
        kept = mask[row].nonzero().flatten()
        best[row, kept] = torch.linalg.lstsq(x[:, kept], x @ weight[row]).solution
    assert error(new) >= error(best) - 1e-3
    assert error(new) < error(weight * keep_mask(weight.abs(), 0.5))


def test_dead_inputs_inputs_untouched_and_errors():
    x = torch.randn(64, 8)
    x[:, 3] = 0  # an input that is never active
    h, _ = accumulate_hessian(None, 0, x)
    weight = torch.randn(4, 8)
    before = weight.clone()
    new, _ = sparsegpt_prune(weight, h, 0.25)
    assert (new[:, 3] == 0).all() and torch.equal(weight, before)
    with pytest.raises(ValueError, match=r"hessian shape \(4, 4\) does not match d_in=8"):
        sparsegpt_prune(weight, torch.eye(4), 0.5)
    with pytest.raises(ValueError, match=r"sparsity=1.0 must be in \[0, 1\)"):
        sparsegpt_prune(weight, h, 1.0)
    with pytest.raises(ValueError, match=r"N:M = 2:3: need 0 < N < M, with M dividing d_in=8"):
        sparsegpt_prune(weight, h, 0.0, nm=(2, 3))


def test_hessian_accumulates_like_one_shot():
    a, b = torch.randn(10, 6), torch.randn(30, 6)
    h, count = accumulate_hessian(None, 0, a)
    h, count = accumulate_hessian(h, count, b)
    one, total = accumulate_hessian(None, 0, torch.cat([a, b]))
    assert count == total == 40 and torch.allclose(h, one, atol=1e-5)
