import pytest
import torch

from offline_search.core.allocation import (
    block_grid,
    block_means,
    centred_blocks,
    expand_blocks,
    layer_blocks,
    outlier_share,
    owl_plan,
    uniform_plan,
)


def test_owl_by_hand():
    # keep ratios spread over 2 x 0.08 by outlier share, centred on 1 - S = 0.5
    plan = owl_plan([0.1, 0.2, 0.3], 0.5, lam=0.08)
    assert plan == pytest.approx([0.58, 0.5, 0.42])  # more outliers, more kept
    assert owl_plan([0.2, 0.2], 0.5) == [0.5, 0.5]


def test_outlier_share_by_hand():
    scores = [torch.ones(9), torch.tensor([100.0])]  # mean 10.9: only 100 exceeds 5 x mean
    assert outlier_share(scores) == pytest.approx(0.1)


def test_blocks_and_grid():
    assert [list(b) for b in layer_blocks(32, 8)] == [list(range(i, i + 4)) for i in range(0, 32, 4)]
    assert [len(b) for b in layer_blocks(5, 5)] == [1] * 5
    assert block_grid(0.5) == [0.45, 0.475, 0.5, 0.525, 0.55]
    with pytest.raises(ValueError, match="--blocks 9: must be between 1 and the number of layers \\(4\\)"):
        layer_blocks(4, 9)
    with pytest.raises(ValueError, match=r"--sparsity 0.05: a search of \+-0.05 per block needs 0.1 <= S < 0.9"):
        block_grid(0.05)
    assert expand_blocks([0.4, 0.6], layer_blocks(4, 2)) == [0.4, 0.4, 0.6, 0.6]
    assert uniform_plan(3, 0.5) == [0.5] * 3


def test_centring_puts_every_plan_exactly_on_target():
    # weighted mean (0.45 + 0.55 + 2 x 0.55) / 4 = 0.525: every block moves down by 0.025
    assert centred_blocks([0.45, 0.55, 0.55], [1, 1, 2], 0.5) == pytest.approx([0.425, 0.525, 0.525])
    generator = torch.Generator().manual_seed(0)
    grid = block_grid(0.5)
    for _ in range(50):
        values = [grid[i] for i in torch.randint(0, len(grid), (8,), generator=generator).tolist()]
        weights = torch.randint(1, 10, (8,), generator=generator).tolist()
        centred = centred_blocks(values, weights, 0.5)
        assert sum(c * w for c, w in zip(centred, weights)) / sum(weights) == pytest.approx(0.5, abs=1e-12)


def test_block_means_snap_a_layer_plan_to_the_grid():
    assert block_means([0.58, 0.5, 0.46, 0.42], layer_blocks(4, 2), block_grid(0.5)) == [0.55, 0.45]
