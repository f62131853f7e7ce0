"""The compression profile of an artifact, as the demo shows it: figures and one line of KV capacity.

Everything comes from the artifact's plan (`vllm_adaspkv.artifact.read_plan`) and, for the cache
geometry, from the base model's config.json; byte counts come from the one KV quantizer module.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from vllm_adaspkv.artifact import Plan
from vllm_adaspkv.kv_quant import bytes_per_token_head


@dataclass(frozen=True)
class KVGeometry:
    num_kv_heads: int
    head_dim: int


def kv_geometry(model_dir: str | Path) -> KVGeometry:
    """KV heads and head size of a LLaVA checkpoint's language model (llava-hf config.json)."""
    path = Path(model_dir) / "config.json"
    config = json.loads(path.read_text())
    text = config.get("text_config", config)
    heads = text.get("num_attention_heads")
    head_dim = text.get("head_dim") or (text["hidden_size"] // heads if heads else None)
    kv_heads = text.get("num_key_value_heads") or heads
    if not head_dim or not kv_heads:
        raise ValueError(f"{path}: no num_key_value_heads / head_dim in text_config")
    return KVGeometry(num_kv_heads=int(kv_heads), head_dim=int(head_dim))


def layer_sparsity(plan: Plan) -> list[float]:
    """Per decoder layer: the sparsity of its pruned linears, averaged (0 where none is pruned)."""
    return [sum(layer.sparsity.values()) / len(layer.sparsity) if layer.sparsity else 0.0
            for layer in plan.layers]


def kv_bytes_per_token(plan: Plan, geometry: KVGeometry, bits: int | None = None) -> int:
    """Cache bytes one token takes over all layers, K and V, scales included; `bits` overrides the
    plan's per-layer widths (16: the dense cache)."""
    group = plan.kv_quant.group_size
    return sum(2 * geometry.num_kv_heads * bytes_per_token_head(bits or layer.kv_bits, geometry.head_dim, group)
               for layer in plan.layers)


def capacity_summary(plan: Plan, geometry: KVGeometry | None) -> str:
    """Markdown: KV bytes per token and how many more tokens the same memory holds than a 16-bit cache."""
    if geometry is None:
        return f"Mean KV bits: {plan.mean_kv_bits():g} (the base model's config is not readable here)."
    ours, dense = kv_bytes_per_token(plan, geometry), kv_bytes_per_token(plan, geometry, bits=16)
    return (f"**KV cache capacity: {dense / ours:.2f}x** the tokens of a 16-bit cache in the same memory "
            f"({ours:,} bytes per token against {dense:,}; mean {plan.mean_kv_bits():g} KV bits, "
            f"group {plan.kv_quant.group_size}).")


def profile_markdown(plan: Plan, artifact: Path) -> str:
    sparsity = layer_sparsity(plan)
    evaluation = plan.evaluation
    lines = [f"Artifact `{artifact}`: {plan.metric} / {plan.allocation} / {plan.structure}, "
             f"{plan.num_layers()} layers, mean layer sparsity {sum(sparsity) / len(sparsity):.3f}."]
    if {"objective", "dense", "pruned"} <= evaluation.keys():
        lines.append(f"Search objective ({evaluation['objective']}): dense {evaluation['dense']:.3f}, "
                     f"compressed {evaluation['pruned']:.3f}.")
    return "\n\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # figures for the browser, never a window
    import matplotlib.pyplot as plt

    return plt


def sparsity_figure(plan: Plan):
    plt = _pyplot()
    layers = range(plan.num_layers())
    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.bar(layers, layer_sparsity(plan), color="tab:blue", label="layer mean")
    for i, layer in enumerate(plan.layers):  # every linear of the layer as a dot
        ax.plot([i] * len(layer.sparsity), list(layer.sparsity.values()), "k.", ms=3)
    ax.set(xlabel="decoder layer", ylabel="weight sparsity", ylim=(0, 1), title="Sparsity per layer",
           xticks=list(layers))
    fig.tight_layout()
    plt.close(fig)  # Gradio renders the figure object; pyplot need not keep it
    return fig


def kv_bits_figure(plan: Plan):
    plt = _pyplot()
    layers = range(plan.num_layers())
    fig, ax = plt.subplots(figsize=(5, 2.8))
    ax.bar(layers, [layer.kv_bits for layer in plan.layers], color="tab:orange")
    ax.axhline(16, color="black", lw=0.8, ls="--", label="dense (16 bits)")
    ax.set(xlabel="decoder layer", ylabel="KV bits", ylim=(0, 17), title="KV-cache bits per layer",
           xticks=list(layers), yticks=[2, 4, 6, 8, 16])
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    plt.close(fig)
    return fig
