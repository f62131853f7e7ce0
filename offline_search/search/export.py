"""Writes the artifact of a pruning run: adaspkv.json, bit-packed masks, optionally the pruned
checkpoint, and the report (offline_search/search/report.py)."""

from __future__ import annotations

from pathlib import Path

import torch

from offline_search.data.checkpoint import save_llava_checkpoint
from offline_search.model.llava import model_geometry
from offline_search.search.config import CompressConfig
from offline_search.search.report import write_report
from vllm_adaspkv.format import (
    LINEARS,
    BaseCheckpoint,
    KVQuantScheme,
    LayerPlan,
    Plan,
    mask_key,
    model_sha256,
    write_artifact,
)


def layer_plans(masks: dict[str, torch.Tensor], kv_bits: list[int]) -> tuple[LayerPlan, ...]:
    """Each linear's measured sparsity (not the requested one) and each layer's KV bits."""
    return tuple(
        LayerPlan(sparsity={name: 1.0 - float(masks[mask_key(i, name)].float().mean()) for name in LINEARS},
                  kv_bits=bits)
        for i, bits in enumerate(kv_bits))


def export_artifact(config: CompressConfig, model, processor, model_dir: Path, masks: dict[str, torch.Tensor],
                    kv_bits: list[int], provenance: dict, evaluation: dict, study=None) -> Path:
    out = Path(config.out)
    # SparseGPT changes the kept weights too: masks over the base model cannot reproduce it.
    full = config.full_checkpoint or config.metric == "sparsegpt"
    zeroed = sum(int((~m).sum()) for m in masks.values())
    evaluation = {**evaluation, "mean_sparsity": zeroed / sum(m.numel() for m in masks.values())}
    plan = Plan(
        base_model=BaseCheckpoint(path=str(Path(model_dir).resolve()), sha256=model_sha256(model_dir)),
        layers=layer_plans(masks, kv_bits), kv_quant=KVQuantScheme(group_size=config.kv_group, key_rotation=config.kv_key_rotation),
        metric=config.metric, structure=config.structure,
        allocation=config.allocation + ("+amia" if config.amia else ""),
        full_checkpoint=full, provenance=provenance, evaluation=evaluation)
    pruned = any(not bool(m.all()) for m in masks.values())
    write_artifact(out, plan, masks if pruned else None)  # a KV-only plan needs no masks
    if full:
        save_llava_checkpoint(model, processor, out)
    write_report(out, plan, model_geometry(model), study)
    print(f"artifact written to {out} (mean sparsity {evaluation['mean_sparsity']:.4f}, "
          f"mean KV bits {plan.mean_kv_bits():g}"
          f"{', with the pruned checkpoint' if full else ''})")
    return out
