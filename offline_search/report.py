"""The human-readable side of an artifact: report.md and its PNG plots."""

from __future__ import annotations

from pathlib import Path

from vllm_adaspkv.artifact import LINEARS, Plan, mask_key


def write_report(out: Path, plan: Plan, sizes: dict[str, int], study=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    layers = range(plan.num_layers())
    layer_sparsity = [sum(plan.layers[i].sparsity[n] * sizes[mask_key(i, n)] for n in LINEARS)
                      / sum(sizes[mask_key(i, n)] for n in LINEARS) for i in layers]
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(layer_sparsity)), 3))
    ax.bar(list(layers), layer_sparsity, color="tab:blue")
    ax.axhline(sum(layer_sparsity) / len(layer_sparsity), color="black", lw=0.8, ls="--", label="mean")
    ax.set(xlabel="decoder layer", ylabel="sparsity", title=f"{plan.metric} / {plan.allocation}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "sparsity_per_layer.png", dpi=100)
    plt.close(fig)
    plots = ["sparsity_per_layer.png"]
    if study is not None:
        import warnings

        from optuna.visualization.matplotlib import plot_optimization_history

        with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
            warnings.simplefilter("ignore")
            ax = plot_optimization_history(study)
        ax.figure.set_size_inches(6, 3.5)
        ax.figure.tight_layout()
        ax.figure.savefig(out / "optimization_history.png", dpi=100)
        plt.close(ax.figure)
        plots.append("optimization_history.png")

    lines = [f"# adaspkv artifact: {plan.metric}, {plan.allocation}, {plan.structure}", "",
             f"Base model: `{plan.base_model.path}` (sha256 `{plan.base_model.sha256[:16]}...`)", ""]
    if plan.evaluation:
        lines += ["| objective | dense | pruned |", "| --- | --- | --- |",
                  f"| {plan.evaluation['objective']} | {plan.evaluation['dense']:.4f} | "
                  f"{plan.evaluation['pruned']:.4f} |", ""]
    if study is not None and "timing" in study.user_attrs:
        t = study.user_attrs["timing"]
        lines += [f"Search: {plan.provenance.get('trials_completed')} trials, best trial "
                  f"{plan.provenance.get('trial')}; mean trial {t['mean_trial_seconds']:.2f} s = "
                  f"{t['ratio']:.2f} x one bare evaluation ({t['bare_eval_seconds']:.2f} s).", ""]
    lines += ["| layer | sparsity | " + " | ".join(LINEARS) + " |", "| --- " * (len(LINEARS) + 2) + "|"]
    lines += [f"| {i} | {layer_sparsity[i]:.4f} | "
              + " | ".join(f"{plan.layers[i].sparsity[n]:.3f}" for n in LINEARS) + " |" for i in layers]
    lines += [""] + [f"![{p}]({p})" for p in plots] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
