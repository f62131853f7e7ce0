"""Applies masks to the language-model linear layers of a transformers LLaVA (in place)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from offline_search.masks import keep_mask

# The linear layers of a Llama decoder layer that the pruning papers prune.
PRUNED_LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                  "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def language_model_linears(model) -> dict[str, torch.nn.Linear]:
    """`model.language_model.layers.{i}.{linear}` -> module, for every decoder layer."""
    layers = model.model.language_model.layers
    return {f"model.language_model.layers.{i}.{name}": layer.get_submodule(name)
            for i, layer in enumerate(layers) for name in PRUNED_LINEARS}


@torch.no_grad()
def prune_uniform(model, score: Callable[[torch.Tensor], torch.Tensor], sparsity: float,
                  per_row: bool = False) -> dict[str, float]:
    """Zeroes the lowest-scoring `sparsity` share of every pruned linear; returns each one's sparsity."""
    achieved = {}
    for name, linear in language_model_linears(model).items():
        mask = keep_mask(score(linear.weight), sparsity, per_row)
        linear.weight.mul_(mask)
        achieved[name] = 1.0 - mask.float().mean().item()
    return achieved
