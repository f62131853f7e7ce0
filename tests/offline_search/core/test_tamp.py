import math

import pytest
import torch

from offline_search.core.tamp import amia_select, cosine_stats, das_keep_counts, knn_graph, mmd2, token_diversity


def test_diversity_identical_outputs_is_zero():
    same = torch.ones(5, 4)
    assert token_diversity(same, torch.tensor([True, True, False, False, False])) == pytest.approx(0.0)


def test_diversity_by_hand():
    # visual tokens e0, e1 (orthogonal to each other and to the text), text tokens e2, e2 (identical):
    # c_v = 0, c_l = 1, c_vl = 0, so s = 3 minus the text term 1 = 2
    outputs = torch.eye(4)[[0, 1, 2, 2]] * 3.0  # scale does not matter: outputs are L2-normalised
    is_visual = torch.tensor([True, True, False, False])
    assert cosine_stats(outputs, is_visual) == (0.0, 1.0, 0.0)
    assert token_diversity(outputs, is_visual) == pytest.approx(2.0)
    # opposite visual tokens: cos = -1 counts as 0, not as negative similarity
    opposite = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    assert cosine_stats(opposite, is_visual) == pytest.approx((0.0, 0.0, 0.25))  # cross: 1, 0, -1 -> 0, 0
    # a single text token has no pair: c_l is taken as 1 (no diversity measurable)
    one_text = torch.eye(3)
    assert cosine_stats(one_text, torch.tensor([True, True, False])) == (0.0, 1.0, 0.0)


def test_diversity_errors():
    outputs = torch.eye(4)
    with pytest.raises(ValueError, match="needs both visual and text tokens"):
        token_diversity(outputs, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="needs both visual and text tokens"):
        token_diversity(outputs, torch.zeros(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="is_visual has shape"):
        token_diversity(outputs, torch.ones(3, dtype=torch.bool))


def test_das_counts_by_hand():
    # budget 100 * 2 * 0.5 = 100; s_max = 0.6, so each matrix keeps a base of 40; the 20 left are shared as
    # s_i n_i = 100 : 300, i.e. 5 and 15
    assert das_keep_counts([100, 100], [1.0, 3.0], 0.5) == [45, 55]
    assert das_keep_counts([100, 100], [2.0, 2.0], 0.5) == [50, 50]
    # without headroom every matrix sits at the target whatever its diversity
    assert das_keep_counts([100, 100], [1.0, 3.0], 0.5, max_extra=0.0) == [50, 50]


def test_das_equal_diversity_gives_uniform_sparsity():
    sizes = [4096 * 4096, 4096 * 11008, 1000, 37]
    kept = das_keep_counts(sizes, [1.3] * 4, 0.7)
    assert sum(kept) == round(sum(sizes) * 0.3)
    # each base ceil(0.2 n) is off by < 1 weight and the largest remainders add < 1 more
    assert all(abs(k - 0.3 * n) < 2 for k, n in zip(kept, sizes))


def test_das_clamps_at_the_matrix_size():
    # budget 55, bases 4 and 40; shares of the 11 left as 1000 : 100 would give the small matrix 4 + 10 > 10,
    # so it keeps all 10 and the other 5 go to the large one
    assert das_keep_counts([10, 100], [100.0, 1.0], 0.5) == [10, 45]


def test_das_tiny_matrices_still_hit_the_budget():
    # ceil(0.4) = 1 per matrix would keep 10 > budget 5: the bases fall back to floor(0.4) = 0
    kept = das_keep_counts([1] * 10, [float(i) for i in range(10)], 0.5)
    assert sum(kept) == 5 and all(0 <= k <= 1 for k in kept)
    assert das_keep_counts([3, 5], [0.0, 0.0], 0.5) == [2, 2]  # zero diversity shares by size; budget 4


@pytest.mark.parametrize("seed", range(20))
def test_das_counts_exact_on_random_inputs(seed):
    generator = torch.Generator().manual_seed(seed)
    m = int(torch.randint(1, 12, (1,), generator=generator))
    sizes = torch.randint(50, 5000, (m,), generator=generator).tolist()
    diversity = (torch.rand(m, generator=generator) * 3).tolist()
    sparsity = float(torch.rand(1, generator=generator)) * 0.85
    max_extra = float(torch.rand(1, generator=generator)) * (0.99 - sparsity)
    kept = das_keep_counts(sizes, diversity, sparsity, max_extra)
    assert sum(kept) == round(sum(sizes) * (1 - sparsity))
    assert all(math.ceil(n * (1 - sparsity - max_extra) - 1e-6) <= k <= n for k, n in zip(kept, sizes))
    # more diverse (per weight) never means sparser: keep fractions follow the diversity order
    order = sorted(range(m), key=lambda i: diversity[i])
    fractions = [kept[i] / sizes[i] for i in order]
    assert all(b >= a - 2 / min(sizes) for a, b in zip(fractions, fractions[1:]))


@pytest.mark.parametrize(("args", "message"), [
    (([10], [1.0, 2.0], 0.5), "1 matrix sizes but 2 diversity scores"),
    (([], [], 0.5), "0 matrix sizes but 0 diversity scores"),
    (([0], [1.0], 0.5), "matrix sizes must be >= 1"),
    (([10], [1.0], 1.0), "sparsity 1.0 must be in \\[0, 1\\)"),
    (([10], [1.0], -0.1), "sparsity -0.1 must be in \\[0, 1\\)"),
    (([10], [1.0], 0.95), "sparsity 0.95 \\+ max_extra 0.1 must stay below 1"),
    (([10], [1.0], 0.5, -0.1), "max_extra -0.1 must stay below 1, max_extra >= 0"),
    (([10], [-1.0], 0.5), "diversity scores must be finite and >= 0"),
    (([10], [math.nan], 0.5), "diversity scores must be finite and >= 0"),
])
def test_das_errors(args, message):
    with pytest.raises(ValueError, match=message):
        das_keep_counts(*args)


def test_knn_by_hand():
    # two pairs of near points, 90 degrees apart: each point's nearest is its partner
    points = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 2.0], [0.1, 1.0]])
    index, distance = knn_graph(points, k=1)
    assert index.flatten().tolist() == [1, 0, 3, 2]
    partner = 1 - 1 / math.sqrt(1.01)  # 1 - cos between (1, 0) and (1, 0.1)
    assert distance.flatten().tolist() == pytest.approx([partner] * 4, abs=1e-6)
    index, distance = knn_graph(points, k=10)  # capped at tokens - 1, nearest first
    assert index.shape == distance.shape == (4, 3)
    assert index[0].tolist() == [1, 3, 2] and (distance[:, 1:] >= distance[:, :-1]).all()
    with pytest.raises(ValueError, match="k must be >= 1"):
        knn_graph(points, k=0)


def test_mmd_by_hand():
    points = torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]])
    assert mmd2(points, points) == pytest.approx(0.0, abs=1e-12)
    assert mmd2(points[:2], points[2:]) > 0.1
    # one point each, distance^2 = 2: 1 + 1 - 2 exp(-1)
    assert mmd2(points[:1], points[2:3]) == pytest.approx(2 - 2 * math.exp(-1))


def test_amia_picks_the_high_attention_token_first():
    outputs = torch.randn(20, 8, generator=torch.Generator().manual_seed(0))
    attention = torch.full((20,), 0.01)
    attention[7] = 1.0
    chosen = amia_select(outputs, attention, rho=0.5, max_tokens=1)
    assert chosen.dtype == torch.bool and chosen.shape == (20,)
    assert chosen.tolist() == [i == 7 for i in range(20)]


def test_amia_damps_the_neighbours_of_a_picked_token():
    # A and its near twin A' score 1.5 each (own attention + the twin's); B scores 0.8 + e^-0.99 0.5 = 0.99.
    # Picking A damps A' by about 1.5, so B comes second, not the redundant A'.
    outputs = torch.tensor([[1.0, 0.0], [1.0, 0.01], [0.0, 1.0]])
    attention = torch.tensor([1.0, 0.5, 0.8])
    assert amia_select(outputs, attention, rho=1.0, k=1, max_tokens=2).tolist() == [True, False, True]


def test_amia_stopping_rule():
    # identical tokens: one covers them all (MMD^2 = 0)
    assert int(amia_select(torch.ones(6, 4), torch.rand(6), rho=0.0).sum()) == 1
    outputs = torch.randn(30, 8, generator=torch.Generator().manual_seed(1))
    attention = torch.rand(30, generator=torch.Generator().manual_seed(2))
    assert amia_select(outputs, attention, rho=1.0).all()  # threshold 0: only the full set matches
    assert int(amia_select(outputs, attention, rho=1.0, max_tokens=4).sum()) == 4
    # the incremental MMD^2 agrees with mmd2: the set stops at the first prefix at or below the threshold
    rho = 0.2
    threshold = 0.1 * math.sqrt(1 - rho)
    chosen = amia_select(outputs, attention, rho)
    count = int(chosen.sum())
    assert 1 < count < 30
    y = torch.nn.functional.normalize(outputs, dim=-1)
    assert mmd2(y, y[chosen]) <= threshold
    shorter = amia_select(outputs, attention, rho, max_tokens=count - 1)
    assert (shorter <= chosen).all() and mmd2(y, y[shorter]) > threshold


def test_amia_single_token_and_errors():
    assert amia_select(torch.randn(1, 4), torch.ones(1), rho=0.3).tolist() == [True]
    outputs, attention = torch.randn(5, 4), torch.rand(5)
    with pytest.raises(ValueError, match="attention has shape"):
        amia_select(outputs, torch.rand(4), 0.5)
    with pytest.raises(ValueError, match="rho 1.5 must be in"):
        amia_select(outputs, attention, 1.5)
    with pytest.raises(ValueError, match="max_tokens must be >= 1"):
        amia_select(outputs, attention, 0.5, max_tokens=0)
    with pytest.raises(ValueError, match="attention weights must be >= 0"):
        amia_select(outputs, -attention, 0.5)
