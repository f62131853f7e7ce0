"""The human-readable side of an artifact: report.md and its PNG plots."""

from __future__ import annotations

from pathlib import Path

from vllm_adaspkv.format import LINEARS, ModelGeometry, Plan


def write_report(out: Path, plan: Plan, geometry: ModelGeometry, study=None) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    layers = range(plan.num_layers())
    layer_sparsity = plan.layer_sparsity(geometry.linear_sizes())
    plots = [_bar_plot(plt, out / "sparsity_per_layer.png", layer_sparsity, "sparsity",
                       f"{plan.metric} / {plan.allocation}")]
    bits = [layer.kv_bits for layer in plan.layers]
    if any(b != 16 for b in bits):
        plots.append(_bar_plot(plt, out / "kv_bits_per_layer.png", bits, "KV bits",
                               f"KV cache: mean {plan.mean_kv_bits():g} bits"))
    if study is not None:
        import warnings

        from optuna.visualization.matplotlib import plot_optimization_history

        with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental
            warnings.simplefilter("ignore")
            ax = plot_optimization_history(study, target=lambda t: t.values[0], target_name="objective")
        ax.figure.set_size_inches(6, 3.5)
        ax.figure.tight_layout()
        ax.figure.savefig(out / "optimization_history.png", dpi=100)
        plt.close(ax.figure)
        plots.append("optimization_history.png")
        if len(study.directions) == 2:
            from optuna.visualization.matplotlib import plot_pareto_front

            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                ax = plot_pareto_front(study, target_names=["objective", "mean KV bits"])
            ax.figure.set_size_inches(6, 4)
            ax.figure.tight_layout()
            ax.figure.savefig(out / "pareto_front.png", dpi=100)
            plt.close(ax.figure)
            plots.append("pareto_front.png")

    lines = [f"# adaspkv artifact: {plan.metric}, {plan.allocation}, {plan.structure}", "",
             f"Base model: `{plan.base_model.path}` (sha256 `{plan.base_model.sha256[:16]}...`)", ""]
    if plan.evaluation is not None:
        lines += ["| objective | dense | pruned |", "| --- | --- | --- |",
                  f"| {plan.evaluation.objective} | {plan.evaluation.dense:.6g} | {plan.evaluation.pruned:.6g} |", ""]
    if study is not None and "timing" in study.user_attrs:
        t = study.user_attrs["timing"]
        lines += [f"Search: {plan.provenance.trials_completed} trials, best trial "
                  f"{plan.provenance.trial}; mean trial {t['mean_trial_seconds']:.2f} s = "
                  f"{t['ratio']:.2f} x one bare evaluation ({t['bare_eval_seconds']:.2f} s).", ""]
    lines += ["| layer | KV bits | sparsity | " + " | ".join(LINEARS) + " |", "| --- " * (len(LINEARS) + 3) + "|"]
    lines += [f"| {i} | {bits[i]} | {layer_sparsity[i]:.4f} | "
              + " | ".join(f"{plan.layers[i].sparsity[n]:.3f}" for n in LINEARS) + " |" for i in layers]
    lines += [""] + [f"![{p}]({p})" for p in plots] + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def _bar_plot(plt, path: Path, values: list[float], ylabel: str, title: str) -> str:
    fig, ax = plt.subplots(figsize=(max(4, 0.35 * len(values)), 3))
    ax.bar(range(len(values)), values, color="tab:blue")
    ax.axhline(sum(values) / len(values), color="black", lw=0.8, ls="--", label="mean")
    ax.set(xlabel="decoder layer", ylabel=ylabel, title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name
