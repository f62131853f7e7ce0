import math

import pytest
import torch

from offline_search.core.masks import keep_mask, mask_from_order, nm_keep_mask, parse_nm, prune_order
from offline_search.core.metrics import activation_scores, lognorm_scores, magnitude_scores, wanda_scores


def test_wanda_one_by_four_by_hand():
    weight = torch.tensor([[1.0, -2.0, 3.0, -4.0]])
    in_sq = torch.tensor([16.0, 1.0, 1.0, 0.25])  # ||X_j|| = 4, 1, 1, 0.5
    scores = wanda_scores(weight, in_sq)
    assert scores.tolist() == [[4.0, 2.0, 3.0, 2.0]]
    # Wanda drops inputs 1 and 3 (tie broken by position); magnitude would drop 0 and 1.
    assert keep_mask(scores, 0.5, per_row=True).tolist() == [[True, False, True, False]]
    assert keep_mask(magnitude_scores(weight), 0.5).tolist() == [[False, False, True, True]]


def test_lognorm_by_hand():
    weight = torch.tensor([[3.0, 4.0], [0.0, 0.0]])  # row norm 5; column norms 3 and 4
    in_sq = torch.tensor([1.0, 16.0])  # fourth roots 1 and 2
    scores = lognorm_scores(weight, in_sq)
    expected = [[math.log(1 + 3 / 5 + 3 / 3) * 1, math.log(1 + 4 / 5 + 4 / 4) * 2], [0.0, 0.0]]
    assert torch.allclose(scores, torch.tensor(expected))


def test_activation_scores_dispatch_and_errors():
    weight, in_sq = torch.randn(3, 4), torch.rand(4)
    assert torch.equal(activation_scores("wanda", weight, in_sq), wanda_scores(weight, in_sq))
    assert torch.equal(activation_scores("magnitude", weight, None), weight.abs())
    with pytest.raises(ValueError, match="metric 'lognorm' needs calibration statistics"):
        activation_scores("lognorm", weight, None)
    with pytest.raises(ValueError, match=r"metric 'sparsegpt' has no score function"):
        activation_scores("sparsegpt", weight, in_sq)
    with pytest.raises(ValueError, match=r"weight \(3, 4\) and input statistics \(3,\) do not match"):
        wanda_scores(weight, torch.rand(3))


def test_two_four_by_hand():
    scores = torch.tensor([[1.0, 4.0, 2.0, 3.0, 8.0, 7.0, 6.0, 5.0]])
    assert nm_keep_mask(scores, 2, 4).tolist() == [[False, True, False, True, True, True, False, False]]


@pytest.mark.parametrize(("n", "m"), [(2, 4), (4, 8)])
def test_nm_pattern_holds_in_every_group(n, m):
    mask = nm_keep_mask(torch.randn(16, 64), n, m)
    assert (mask.reshape(16, -1, m).sum(-1) == m - n).all()


def test_nm_errors():
    with pytest.raises(ValueError, match="N:M = 2:4 needs a 2-D score matrix whose 6 inputs divide"):
        nm_keep_mask(torch.ones(2, 6), 2, 4)
    with pytest.raises(ValueError, match="N:M = 4:4: need 0 < N < M"):
        nm_keep_mask(torch.ones(2, 8), 4, 4)
    assert parse_nm("2:4") == (2, 4)
    with pytest.raises(ValueError, match="N:M pattern 'two:4': write it as two integers"):
        parse_nm("two:4")
    with pytest.raises(ValueError, match=r"N:M pattern '4:2': need 0 < N < M"):
        parse_nm("4:2")


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.75])
def test_ranking_once_gives_the_same_masks_as_sorting_each_time(per_row, sparsity):
    scores = torch.randn(8, 24)
    order = prune_order(scores, per_row)
    assert torch.equal(mask_from_order(order, scores.shape, sparsity), keep_mask(scores, sparsity, per_row))
