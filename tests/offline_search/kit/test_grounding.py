import pytest
import torch

from offline_search.kit.grounding import PatchProbe, alignment_loss, norm_penalty, word_targets


def test_word_targets_sum_the_naming_words_of_occupied_patches():
    embeddings = torch.eye(4)  # word i -> unit vector i
    word_ids = torch.tensor([[[0, 1], [2, 3]]])  # [batch 1, patches 2, words 2]
    present = torch.tensor([[True, False]])
    assert torch.equal(word_targets(embeddings, word_ids, present), torch.tensor([[1.0, 1.0, 0.0, 0.0]]))


def test_alignment_loss_is_one_minus_cosine_over_occupied_patches():
    projected = torch.tensor([[[1.0, 0.0], [0.0, 5.0], [7.0, 7.0]]])  # [1, 3, 2]
    present = torch.tensor([[True, True, False]])
    targets = torch.tensor([[2.0, 0.0], [0.0, -1.0]])  # same way (loss 0), opposite way (loss 2)
    assert alignment_loss(projected, targets, present).item() == pytest.approx(1.0)


def test_alignment_loss_of_an_empty_batch_is_zero_and_differentiable():
    projected = torch.ones(1, 2, 3, requires_grad=True)
    loss = alignment_loss(projected, torch.zeros(0, 3), torch.zeros(1, 2, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(projected.grad, torch.zeros(1, 2, 3))


def test_norm_penalty_is_the_mean_squared_norm_gap():
    assert norm_penalty(torch.tensor([[3.0, 4.0], [0.0, 1.0]]), 1.0).item() == pytest.approx((16 + 0) / 2)


def test_patch_probe_loss_is_low_for_a_probe_that_is_right():
    probe = PatchProbe(width=2, num_kinds=1, num_colours=1)  # classes: kind 0 / empty, colour 0 / empty
    with torch.no_grad():
        for head in (probe.kind, probe.colour):
            head.weight.copy_(torch.tensor([[10.0, 0.0], [0.0, 10.0]]))
            head.bias.zero_()
    features = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # patch 0 holds the shape, patch 1 is empty
    right = probe.loss(features, torch.tensor([[[0, 0], [1, 1]]]))
    wrong = probe.loss(features, torch.tensor([[[1, 1], [0, 0]]]))
    assert right.item() < 1e-3 < 10 < wrong.item()


def test_token_alignment_loss_is_one_minus_cosine_plus_the_relative_norm_gap():
    from offline_search.kit.grounding import token_alignment_loss

    targets = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])  # [1 batch, 2 tokens, 2]
    same_way_same_size = torch.tensor([[[2.0, 0.0], [0.0, 1.0]]])
    assert token_alignment_loss(same_way_same_size, targets).item() == pytest.approx(0.0)
    # token 0: same way, twice the size (relative gap 1); token 1: opposite way, same size (cosine -1)
    projected = torch.tensor([[[4.0, 0.0], [0.0, -1.0]]])
    assert token_alignment_loss(projected, targets, norm_weight=0.5).item() == pytest.approx((0 + 2) / 2 + 0.5 * (1 + 0) / 2)
