"""A transformers LLaVA as the search sees it: its decoder layers, its prunable linears by mask key,
and its geometry (the one `vllm_adaspkv.format.ModelGeometry`, read from the loaded model's config)."""

from __future__ import annotations

import torch

from vllm_adaspkv.format import LINEARS, ModelGeometry, mask_key


def decoder_layers(model) -> torch.nn.ModuleList:
    """The language model's decoder layers of a transformers LlavaForConditionalGeneration."""
    return model.model.language_model.layers


def model_linears(model) -> dict[str, torch.nn.Module]:
    """llava-hf weight name (the artifact's mask key) -> linear module, every decoder layer."""
    return {mask_key(i, name): layer.get_submodule(name)
            for i, layer in enumerate(decoder_layers(model)) for name in LINEARS}


def model_geometry(model) -> ModelGeometry:
    return ModelGeometry.from_config(model.config)
