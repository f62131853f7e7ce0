import math

import pytest
import torch

from offline_search.tamp import amia_select, cosine_stats, das_keep_counts, knn_graph, mmd2, token_diversity


def test_diversity_by_hand():
    same = torch.ones(5, 4)
    assert token_diversity(same, torch.tensor([True, True, False, False, False])) == pytest.approx(0.0)
    # visual tokens e0, e1 (orthogonal), text tokens e2, e2 (identical): c_v = 0, c_l = 1, c_vl = 0
    outputs = torch.eye(4)[[0, 1, 2, 2]]
    is_visual = torch.tensor([True, True, False, False])
    assert cosine_stats(outputs, is_visual) == (0.0, 1.0, 0.0)
    assert token_diversity(outputs, is_visual) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="needs both visual and text tokens"):
        token_diversity(outputs, torch.ones(4, dtype=torch.bool))


def test_das_counts_by_hand():
    # S = 0.5, s_max = 0.6: each of two 100-weight matrices keeps 40; 20 are left to share as 1 : 3
    assert das_keep_counts([100, 100], [1.0, 3.0], 0.5) == [45, 55]
    assert das_keep_counts([100, 100], [2.0, 2.0], 0.5) == [50, 50]
    # a share beyond the matrix's size is clamped and the excess goes to the other matrix
    assert das_keep_counts([10, 100], [100.0, 1.0], 0.5) == [10, 45]


def test_das_counts_exact_on_random_inputs():
    generator = torch.Generator().manual_seed(0)
    for _ in range(30):
        sizes = torch.randint(10, 500, (7,), generator=generator).tolist()
        diversity = (torch.rand(7, generator=generator) * 3).tolist()
        kept = das_keep_counts(sizes, diversity, 0.5)
        assert sum(kept) == round(sum(sizes) * 0.5)
        assert all(math.ceil(n * 0.4) <= k <= n for k, n in zip(kept, sizes))


@pytest.mark.parametrize(("args", "message"), [
    (([10], [1.0, 2.0], 0.5), "1 matrix sizes but 2 diversity scores"),
    (([10], [1.0], 0.95), "sparsity 0.95 \\+ max_extra 0.1 must stay below 1"),
    (([10], [-1.0], 0.5), "diversity scores must be >= 0"),
])
def test_das_errors(args, message):
    with pytest.raises(ValueError, match=message):
        das_keep_counts(*args)


def test_knn_and_mmd_by_hand():
    points = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    index, distance = knn_graph(points, k=1)
    assert index.flatten().tolist() == [1, 0, 3, 2]
    assert (distance >= 0).all()
    assert mmd2(points, points) == pytest.approx(0.0, abs=1e-6)
    assert mmd2(points[:2], points[2:]) > 0.1


def test_amia_selection():
    generator = torch.Generator().manual_seed(0)
    outputs = torch.randn(20, 8, generator=generator)
    attention = torch.full((20,), 0.01)
    attention[7] = 1.0
    chosen = amia_select(outputs, attention, rho=0.5, max_tokens=1)
    assert chosen.dtype == torch.bool and chosen.tolist() == [i == 7 for i in range(20)]
    assert amia_select(torch.ones(6, 4), torch.rand(6), rho=0.0).sum() == 1  # one token covers identical ones
    assert amia_select(outputs, attention, rho=1.0).all()  # threshold 0: only the full set matches
    some = amia_select(outputs, attention, rho=0.0)
    assert 1 <= int(some.sum()) <= 20
