import math

import pytest
import torch

from offline_search.core.masks import (
    keep_mask,
    mask_from_codes,
    mask_from_order,
    nm_keep_mask,
    parse_nm,
    prune_order,
    rank_codes,
)
from offline_search.core.metrics import (
    activation_scores,
    lognorm_norms,
    lognorm_scores,
    magnitude_scores,
    scores_at,
    wanda_scores,
)


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
def test_ranking_once_gives_the_same_masks_as_selecting_each_time(per_row, sparsity):
    scores = torch.randn(8, 24)
    order = prune_order(scores, per_row)
    assert torch.equal(mask_from_order(order, scores.shape, sparsity), keep_mask(scores, sparsity, per_row))


def test_selection_breaks_ties_by_position_like_the_ranking():
    scores = torch.tensor([[1.0, 0.0, 1.0, 1.0, 0.0, 1.0]])  # two zeros, then four tied ones
    # 3 go: both zeros, then the first of the tied ones
    assert keep_mask(scores, 0.5).tolist() == [[False, False, True, True, False, True]]
    scores = torch.randint(0, 3, (16, 40)).float()  # many ties
    for per_row in (False, True):
        for sparsity in (0.1, 0.45, 0.9):
            assert torch.equal(keep_mask(scores, sparsity, per_row),
                               mask_from_order(prune_order(scores, per_row), scores.shape, sparsity))


@pytest.mark.parametrize("per_row", [False, True])
@pytest.mark.parametrize("shape", [(1, 8), (7, 300), (33, 1030)])
def test_one_byte_rank_codes_give_the_masks_of_the_scores(per_row, shape):
    scores = torch.randn(shape)
    scores[0, : shape[1] // 2] = 0.5  # ties across the bucket boundaries
    codes = rank_codes(scores, per_row)
    assert codes.dtype == torch.uint8 and codes.numel() == scores.numel()
    asked = []

    def at(flat):
        asked.append(flat.numel())
        return scores.reshape(-1)[flat]

    for sparsity in (0.0, 0.013, 0.3, 0.5, 0.77, 0.999):
        assert torch.equal(mask_from_codes(codes, scores.shape, sparsity, at), keep_mask(scores, sparsity, per_row))
    if scores.numel() > 10_000:  # only the boundary bucket's scores are asked for: ~1/256 of the weights
        assert max(asked) <= 2 * scores.numel() / 256 + codes.shape[0]


@pytest.mark.parametrize("metric", ["magnitude", "wanda", "lognorm"])
def test_scores_at_some_positions_equal_the_full_scores_there(metric):
    weight = torch.randn(12, 20).to(torch.bfloat16)
    weight[3] = 0  # an all-zero row: lognorm's clamped norm
    in_sq = torch.rand(20) * 100
    flat = torch.tensor([0, 5, 61, 70, 239, 120])
    expected = activation_scores(metric, weight, in_sq).reshape(-1)[flat]
    assert torch.equal(scores_at(metric, weight, in_sq, flat), expected)
    norms = lognorm_norms(weight.abs().float()) if metric == "lognorm" else None
    assert torch.equal(scores_at(metric, weight, in_sq, flat, norms), expected)
