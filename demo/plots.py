"""The compression profile of an artifact, as the demo shows it: figures and one line of KV capacity.

Everything comes from the artifact's plan (`vllm_adaspkv.format.read_plan`), the base model's geometry
(`vllm_adaspkv.format.read_geometry`) and the KV quantizer's byte counts (`vllm_adaspkv.kv.quant`).
"""

from __future__ import annotations

from pathlib import Path

from vllm_adaspkv.format import ModelGeometry, Plan


def capacity_summary(plan: Plan, geometry: ModelGeometry | None) -> str:
    """Markdown: KV bytes per token and how many more tokens the same memory holds than a 16-bit cache."""
    if geometry is None:
        return f"Mean KV bits: {plan.mean_kv_bits():g} (the base model's config is not readable here)."

    ours = plan.kv_bytes_per_token(geometry.num_kv_heads, geometry.head_dim)
    dense = plan.kv_quant.bytes_per_token([16] * plan.num_layers(), geometry.num_kv_heads, geometry.head_dim)
    return (f"**KV cache capacity: {dense / ours:.2f}x** the tokens of a 16-bit cache in the same memory "
            f"({ours:,} bytes per token against {dense:,}; mean {plan.mean_kv_bits():g} KV bits, "
            f"group {plan.kv_quant.group_size}).")


def profile_markdown(plan: Plan, artifact: Path, geometry: ModelGeometry | None) -> str:
    lines = [f"Artifact `{artifact}`: {plan.metric} / {plan.allocation} / {plan.structure}, {plan.num_layers()} layers"
             + (f", mean sparsity {plan.mean_sparsity(geometry.linear_sizes()):.3f}." if geometry else ".")]
    evaluation = plan.evaluation
    if evaluation is not None:
        lines.append(f"Search objective ({evaluation.objective}): dense {evaluation.dense:.3f}, "
                     f"compressed {evaluation.pruned:.3f}.")
    return "\n\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # figures for the browser, never a window
    import matplotlib.pyplot as plt

    return plt


def sparsity_figure(plan: Plan, geometry: ModelGeometry | None):
    """Each linear's sparsity as a dot; with the model's geometry, each layer's sparsity as a bar."""
    plt = _pyplot()
    layers = range(plan.num_layers())
    fig, ax = plt.subplots(figsize=(5, 2.8))
    if geometry is not None:
        ax.bar(layers, plan.layer_sparsity(geometry.linear_sizes()), color="tab:blue", label="layer")
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
