"""Training-only losses that ground shapes-llava's image tokens in its own word embeddings.

Pure tensor math: no model, no data loading. Real LLaVAs start from a pretrained CLIP and a
pretrained language model; shapes-llava starts from nothing, and its language model never learned
to read the kind of a shape from image tokens whose norm was ~1000x that of a word embedding (see
the model card). These losses stand in for that pretraining:

- `PatchProbe`: linear heads on the vision features, the kind and colour of the shape in each
  patch's quadrant, so the vision tower learns what is where from a dense per-patch signal.
- `alignment_loss`: each projected image token points the way of the sum of the word embeddings
  that name its shape and place ("red" + "circle" + "left" + "top"), so the language model reads
  an image token as it reads those words.
- `norm_penalty`: keeps projected image tokens near the norm of those words.

smol-llava's frozen, pretrained language model reads words far better than sums of them; its image
tokens are aimed at one word each instead (`token_alignment_loss`), the 16 words of
`shapes_vqa.caption_slots` in order, so that the image reads like "red circle top left no shape top right ...".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class PatchProbe(torch.nn.Module):
    """Kind and colour classifiers on per-patch vision features; class `num_kinds` / `num_colours`
    means "no shape in this patch's quadrant". Not part of the saved model."""

    def __init__(self, width: int, num_kinds: int, num_colours: int):
        super().__init__()
        self.kind = torch.nn.Linear(width, num_kinds + 1)
        self.colour = torch.nn.Linear(width, num_colours + 1)

    def loss(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        # features: [batch, patches, width]; labels: [batch, patches, 2] (kind, colour)
        kind = F.cross_entropy(self.kind(features).flatten(0, 1), labels[..., 0].flatten())
        colour = F.cross_entropy(self.colour(features).flatten(0, 1), labels[..., 1].flatten())
        return kind + colour


def word_targets(embeddings: torch.Tensor, word_ids: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Sum of the word embeddings naming each patch's shape and place.

    embeddings: [vocab, hidden]; word_ids: [batch, patches, words]; present: [batch, patches]
    (False where the quadrant is empty: those rows are left out). Returns [n_present, hidden].
    """
    return embeddings[word_ids[present]].sum(dim=1)


def alignment_loss(projected: torch.Tensor, targets: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
    """Mean (1 - cosine) between the projected tokens of occupied patches and their word targets.

    projected: [batch, patches, hidden]; targets: [n_present, hidden]; present: [batch, patches].
    """
    if not bool(present.any()):
        return projected.sum() * 0.0  # keeps the graph; an image with no shape has nothing to align
    return (1 - F.cosine_similarity(projected[present], targets, dim=-1)).mean()


def norm_penalty(projected: torch.Tensor, target_norm: float) -> torch.Tensor:
    """Mean squared gap between each projected token's norm and `target_norm`. projected: [..., hidden]."""
    return ((projected.norm(dim=-1) - target_norm) ** 2).mean()


def token_alignment_loss(projected: torch.Tensor, targets: torch.Tensor, norm_weight: float = 0.1) -> torch.Tensor:
    """Mean (1 - cosine) between each projected image token and its own target word embedding, plus
    `norm_weight` x the mean squared gap of their norms relative to the target's (so that a token also
    has a word's size).

    projected, targets: [batch, tokens, hidden].
    """
    cosine = F.cosine_similarity(projected, targets, dim=-1)  # [batch, tokens]
    target_norm = targets.norm(dim=-1)
    norm_gap = ((projected.norm(dim=-1) - target_norm) / target_norm) ** 2
    return (1 - cosine).mean() + norm_weight * norm_gap.mean()
