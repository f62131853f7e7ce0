import pytest
import torch

from offline_search.masks import keep_mask, magnitude_scores
from offline_search.prune_model import PRUNED_LINEARS, language_model_linears, prune_uniform
from offline_search.tiny_llava import TinyLlavaSpec, build_tiny_llava


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
    assert int((~keep_mask(scores, 0.3, per_row=True)).sum()) == 3 * 2  # floor(0.3 * 8) per row
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


def test_prune_uniform_touches_only_language_model_linears():
    model, _ = build_tiny_llava(TinyLlavaSpec(num_layers=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    achieved = prune_uniform(model, magnitude_scores, 0.5)
    assert len(achieved) == 2 * len(PRUNED_LINEARS)
    assert all(s == pytest.approx(0.5) for s in achieved.values())
    pruned = {f"{name}.weight" for name in language_model_linears(model)}
    for key, value in model.state_dict().items():
        if key in pruned:
            assert (value == 0).float().mean() == pytest.approx(0.5)
        else:
            assert torch.equal(value, before[key]), key
