import pytest
import torch

from offline_search.core.masks import keep_mask
from offline_search.core.sparsegpt import accumulate_hessian, sparsegpt_prune


def randn(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_identity_hessian_is_magnitude_pruning_without_update():
    # With H = I the inverse has no off-diagonal terms: no compensation, w^2 / 1 ranks like |w|.
    weight = torch.tensor([[0.1, -0.4, 0.3, -0.2], [2.0, 1.0, -3.0, 0.5]])
    new, mask = sparsegpt_prune(weight, torch.eye(4), 0.5, percdamp=0.0)
    # the block is the whole 2x4 matrix: the 4 smallest |w| over it go (0.1, 0.2, 0.3, 0.4)
    assert mask.tolist() == [[False, False, False, False], [True, True, True, True]]
    assert torch.equal(new, weight * mask)
    # the default dampening adds a multiple of I: still diagonal, still no compensation
    new, mask = sparsegpt_prune(weight[:1], torch.eye(4), 0.5)
    assert mask.tolist() == [[False, True, True, False]] and torch.equal(new, weight[:1] * mask)


def test_identity_hessian_two_four_keeps_the_two_largest_of_each_group():
    weight = torch.tensor([[0.1, -0.4, 0.3, -0.2, 5.0, -1.0, 0.0, 2.0]])
    new, mask = sparsegpt_prune(weight, torch.eye(8), 0.0, nm=(2, 4))
    assert mask.tolist() == [[False, True, True, False, True, False, False, True]]
    assert torch.equal(new, weight * mask)


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_nm_pattern(n, m):
    h, _ = accumulate_hessian(None, 0, randn(128, 32, seed=1))
    new, mask = sparsegpt_prune(randn(8, 32, seed=2), h, 0.0, nm=(n, m))
    assert (mask.reshape(8, -1, m).sum(-1) == m - n).all()
    assert (new[~mask] == 0).all()


@pytest.mark.parametrize("d_in", [40, 200])  # one partial block; one full block and a partial one
def test_exact_sparsity_and_zeros(d_in):
    h, _ = accumulate_hessian(None, 0, randn(256, d_in, seed=1))
    new, mask = sparsegpt_prune(randn(16, d_in, seed=2), h, 0.5)
    blocks = -(-d_in // 128)
    assert abs(int((~mask).sum()) - 16 * d_in // 2) <= blocks
    assert (new[~mask] == 0).all()


def test_dtype_kept_and_computed_in_float32():
    h, _ = accumulate_hessian(None, 0, randn(64, 16, seed=1))
    weight = randn(4, 16, seed=2)
    new, mask = sparsegpt_prune(weight.to(torch.bfloat16), h, 0.5)
    assert new.dtype == torch.bfloat16 and mask.dtype == torch.bool
    reference, _ = sparsegpt_prune(weight.to(torch.bfloat16).float(), h, 0.5)
    assert torch.equal(new, reference.to(torch.bfloat16))


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
    x = randn(64, 8, seed=1)
    x[:, 3] = 0  # an input that is never active
    h, _ = accumulate_hessian(None, 0, x)
    weight = randn(4, 8, seed=2)
    before, h_before = weight.clone(), h.clone()
    new, _ = sparsegpt_prune(weight, h, 0.25)
    assert (new[:, 3] == 0).all() and new.isfinite().all()
    assert torch.equal(weight, before) and torch.equal(h, h_before)
    with pytest.raises(ValueError, match=r"weight must be 2-D \[d_out, d_in\], got shape \(8,\)"):
        sparsegpt_prune(weight[0], h, 0.5)
    with pytest.raises(ValueError, match=r"hessian shape \(4, 4\) does not match d_in=8"):
        sparsegpt_prune(weight, torch.eye(4), 0.5)
    with pytest.raises(ValueError, match=r"sparsity=1.0 must be in \[0, 1\)"):
        sparsegpt_prune(weight, h, 1.0)
    with pytest.raises(ValueError, match=r"N:M = 2:3: need 0 < N < M, with M dividing d_in=8"):
        sparsegpt_prune(weight, h, 0.0, nm=(2, 3))
    with pytest.raises(ValueError, match=r"N:M = 4:4: need 0 < N < M"):
        sparsegpt_prune(weight, h, 0.0, nm=(4, 4))
    with pytest.raises(ValueError, match=r"N:M = 2:4: .* and the block size"):
        sparsegpt_prune(weight, h, 0.0, nm=(2, 4), blocksize=6)
    with pytest.raises(ValueError, match=r"blocksize=0 must be >= 1 and percdamp=0.01 >= 0"):
        sparsegpt_prune(weight, h, 0.5, blocksize=0)
    with pytest.raises(ValueError, match=r"not positive definite even after dampening; use more calibration"):
        sparsegpt_prune(weight, -torch.eye(8), 0.5)
    with pytest.raises(ValueError, match=r"non-finite entries"):
        sparsegpt_prune(weight, torch.full((8, 8), float("nan")), 0.5)


def test_hessian_accumulates_like_one_shot():
    a, b = randn(10, 6, seed=1), randn(2, 15, 6, seed=2)  # leading dims are flattened into tokens
    h, count = accumulate_hessian(None, 0, a)
    h, count = accumulate_hessian(h, count, b)
    one, total = accumulate_hessian(None, 0, torch.cat([a, b.reshape(30, 6)]))
    assert count == total == 40 and torch.allclose(h, one, atol=1e-5)
    h, count = accumulate_hessian(None, 0, torch.tensor([[1.0, 2.0], [3.0, 0.0]]))
    assert count == 2 and h.tolist() == [[10.0, 2.0], [2.0, 4.0]]  # (2 x x^T summed) / 2 tokens


@pytest.mark.parametrize(("sparsity", "nm"), [(0.0, None), (0.25, None), (0.5, (2, 4))])
def test_dead_inputs_are_pruned_in_the_mask_too(sparsity, nm):
    """An input never active in calibration has its weights zeroed; the mask must say so, or the measured
    zeros exceed the plan and the plugin's zero count refuses the artifact."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 8, generator=gen)
    x[:, [2, 5]] = 0.0  # inputs 2 and 5 never active
    hessian, _ = accumulate_hessian(None, 0, x)
    weight, mask = sparsegpt_prune(torch.randn(4, 8, generator=gen), hessian, sparsity, nm, blocksize=8)
    assert not mask[:, [2, 5]].any()
    assert torch.equal(weight == 0, ~mask)  # every zero is in the mask, every pruned weight is zero
