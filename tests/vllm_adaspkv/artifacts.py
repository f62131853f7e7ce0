"""Artifacts built in the tests: magnitude masks over a checkpoint and a KV bit width per layer."""

from __future__ import annotations

from pathlib import Path

from safetensors import safe_open

from offline_search.core.masks import keep_mask
from vllm_adaspkv.format import (
    LINEARS,
    BaseCheckpoint,
    KVQuantScheme,
    LayerPlan,
    Plan,
    canonical_key,
    mask_key,
    model_sha256,
    read_geometry,
    write_artifact,
)


def linear_weights(model_dir: Path) -> dict:
    """The language model's linear weights keyed like the artifact's masks."""
    weights = {}
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                weights[canonical_key(key)] = f.get_tensor(key)
    return weights


def make_artifact(out: Path, model_dir: Path, kv_bits: list[int], sparsity: float = 0.0, group: int = 32,
                  key_rotation: str = "none", weight_format: str = "masked", packed_weights: bool = False,
                  eight_bit: str = "int8") -> Path:
    """Every linear pruned to `sparsity` by magnitude (exact counts), KV bits per layer as given; with
    `packed_weights` the pruned linears are stored packed instead of as masks."""
    weights = linear_weights(model_dir)
    masks = {mask_key(i, name): keep_mask(weights[mask_key(i, name)].abs(), sparsity)
             for i in range(len(kv_bits)) for name in LINEARS} if sparsity else {}
    layers = tuple(LayerPlan(sparsity={name: 1.0 - float(masks[mask_key(i, name)].float().mean())
                                       for name in LINEARS} if sparsity else {}, kv_bits=bits)
                   for i, bits in enumerate(kv_bits))
    plan = Plan(base_model=BaseCheckpoint(path=str(Path(model_dir).resolve()), sha256=model_sha256(model_dir)),
                layers=layers, metric="magnitude" if sparsity else "none",
                kv_quant=KVQuantScheme(group_size=group, key_rotation=key_rotation, eight_bit=eight_bit),
                weight_format=weight_format,
                packed_weights=packed_weights)
    return write_artifact(out, plan, masks or None, weight=lambda key: weights[key] * masks[key],
                          dtype=next(iter(weights.values())).dtype)


def num_layers(model_dir: Path) -> int:
    return read_geometry(model_dir).num_layers
