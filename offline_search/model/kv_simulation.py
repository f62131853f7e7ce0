"""Simulated KV-cache quantization inside a transformers LLaVA: every decoder layer's K and V pass
through the serving quantizer (vllm_adaspkv.kv.quant) at that layer's bit width before attention,
so that what the search and `adaspkv eval --artifact` measure is what the plugin serves.

Uses transformers' AttentionInterface (a registered attention function, selected for the language
model only): keys arrive after RoPE, as vLLM caches them, and past tokens are re-quantized from
their original values at every step, which gives the same numbers as quantizing once on write.
"""

from __future__ import annotations

from offline_search.model.llava import decoder_layers, model_geometry
from vllm_adaspkv.errors import ConfigError
from vllm_adaspkv.format.schema import KVQuantScheme
from vllm_adaspkv.kv.quant import check_layout, fake_quantize, fake_quantize_rotated, hadamard

ATTENTION_NAME = "adaspkv_fake_kv"
BASE_ATTENTION = "sdpa"


def _fake_kv_attention(module, query, key, value, attention_mask, **kwargs):
    """key, value [batch, kv_heads, tokens, head_dim]: quantized per token and head, then SDPA."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    bits, group, rotate_keys, fp8 = module.adaspkv_kv
    if bits != 16:
        key = (fake_quantize_rotated if rotate_keys else fake_quantize)(key, bits, group, fp8)
        value = fake_quantize(value, bits, group, fp8)
    return ALL_ATTENTION_FUNCTIONS[BASE_ATTENTION](module, query, key, value, attention_mask, **kwargs)


def apply_kv_plan(model, bits_per_layer: list[int], scheme: KVQuantScheme) -> None:
    """Makes the model's language-model attention read K/V through the quantizer, layer by layer,
    stored as `scheme` says (group size, keys in the Hadamard basis or not, the 8-bit format)."""
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import sdpa_mask

    layers = decoder_layers(model)
    if len(bits_per_layer) != len(layers):
        raise ConfigError(f"KV plan has {len(bits_per_layer)} layers; the model has {len(layers)}")
    head_dim = model_geometry(model).head_dim
    group, rotate_keys = scheme.group_size, scheme.key_rotation == "hadamard"
    for bits in set(bits_per_layer):
        check_layout(bits, head_dim, group, scheme.fp8(bits))
    if rotate_keys:
        hadamard(head_dim)  # fails early on a head_dim that is not a power of two
    AttentionInterface.register(ATTENTION_NAME, _fake_kv_attention)  # same function every time
    # Without a mask function of its own, transformers passes no mask to an attention function it
    # does not know, and the left padding of batched prompts is attended to.
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    for layer, bits in zip(layers, bits_per_layer):
        layer.self_attn.adaspkv_kv = (bits, group, rotate_keys, scheme.fp8(bits))
    model.set_attn_implementation({"text_config": ATTENTION_NAME})


def remove_kv_plan(model) -> None:
    for layer in decoder_layers(model):
        if hasattr(layer.self_attn, "adaspkv_kv"):
            del layer.self_attn.adaspkv_kv
    model.set_attn_implementation({"text_config": BASE_ATTENTION})
