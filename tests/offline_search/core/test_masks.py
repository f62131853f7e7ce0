import pytest
import torch

from offline_search.core.masks import keep_mask
from offline_search.core.metrics import magnitude_scores


def test_one_by_four_layer_by_hand():
    weight = torch.tensor([[0.1, -0.4, 0.3, -0.2]])
    mask = keep_mask(magnitude_scores(weight), 0.5)
    assert mask.tolist() == [[False, True, True, False]]


def test_per_row_and_per_matrix_differ():
    scores = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    assert keep_mask(scores, 0.5).tolist() == [[False, False], [True, True]]
    assert keep_mask(scores, 0.5, per_row=True).tolist() == [[False, True], [False, True]]


def test_exact_count_with_ties_and_zero_sparsity():
    scores = torch.ones(3, 8)
    assert int((~keep_mask(scores, 0.5)).sum()) == 12
    per_row = keep_mask(scores, 0.3, per_row=True)  # round(0.3 * 24) = 7 in all: rows lose 3, 2, 2
    assert (~per_row).sum(1).tolist() == [3, 2, 2]
    assert keep_mask(scores, 0.0).all()


@pytest.mark.parametrize(
    ("scores", "sparsity", "message"),
    [(torch.ones(2, 2), 1.0, r"sparsity=1.0 must be in \[0, 1\)"),
     (torch.ones(2, 2), -0.1, r"sparsity=-0.1 must be in \[0, 1\)"),
     (torch.ones(4), 0.5, r"scores must be a 2-D \[d_out, d_in\] matrix, got shape \(4,\)")],
)
def test_keep_mask_errors(scores, sparsity, message):
    with pytest.raises(ValueError, match=message):
        keep_mask(scores, sparsity)
