"""Writes the artifact of a pruning run: adaspkv.json, bit-packed masks, optionally the pruned
checkpoint, and the report (offline_search/search/report.py)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch

from offline_search.data.checkpoint import save_llava_checkpoint
from offline_search.model.llava import model_geometry, model_linears
from offline_search.search.config import CompressConfig
from offline_search.search.report import write_report
from vllm_adaspkv.format import (LINEARS, BaseCheckpoint, Evaluation, LayerPlan, Plan, Provenance,
                                 mask_key, model_sha256, retract_artifact, write_artifact)


def layer_plans(masks: Mapping[str, torch.Tensor], kv_bits: list[int]) -> tuple[LayerPlan, ...]:
    """Each linear's measured sparsity (not the requested one) and each layer's KV bits."""
    return tuple(
        LayerPlan(sparsity={name: 1.0 - float(masks[mask_key(i, name)].float().mean()) for name in LINEARS},
                  kv_bits=bits)
        for i, bits in enumerate(kv_bits))


def export_artifact(config: CompressConfig, model, processor, model_dir: Path, base_sha256: str,
                    masks: Mapping[str, torch.Tensor], kv_bits: list[int], provenance: Provenance,
                    evaluation: dict, study=None) -> Path:
    """Writes the artifact into config.out. The old plan goes first and the new one comes last, so a
    crash on the way (a checkpoint of 14 GB takes a while) leaves a folder that is no artifact, never
    one whose plan describes other files."""
    out = retract_artifact(config.out)
    # SparseGPT changes the kept weights too: masks over the base model cannot reproduce it, the full
    # checkpoint or the packed weights (which hold the kept values themselves) can.
    full = config.full_checkpoint or (config.metric == "sparsegpt" and not config.pack)
    checkpoint_sha256 = None
    if full:
        save_llava_checkpoint(model, processor, out)
        checkpoint_sha256 = model_sha256(out)
    zeroed = total = 0
    for mask in masks.values():  # one pass, one mask unpacked at a time (PackedMaskMap)
        zeroed, total = zeroed + int((~mask).sum()), total + mask.numel()
    mean_sparsity = zeroed / total
    # stored packed unless the full checkpoint holds them (then packed at load); a KV-only plan has none
    packed = config.pack and not full and zeroed > 0
    plan = Plan(
        # relative: an artifact moved together with its base model (or copied beside it) still finds it
        base_model=BaseCheckpoint(path=os.path.relpath(Path(model_dir).resolve(), out.resolve()), sha256=base_sha256),
        layers=layer_plans(masks, kv_bits),
        kv_quant=config.kv_scheme,
        metric=config.metric, structure=config.structure,
        allocation=config.allocation + ("+amia" if config.amia else ""),
        full_checkpoint=full, checkpoint_sha256=checkpoint_sha256, provenance=provenance,
        weight_format="packed" if config.pack else "masked", packed_weights=packed,
        evaluation=Evaluation(**evaluation, mean_sparsity=mean_sparsity))
    write_report(out, plan, model_geometry(model), study)
    linears = model_linears(model)
    write_artifact(out, plan, masks if zeroed else None,  # a KV-only plan needs no masks
                   weight=lambda key: linears[key].weight.detach().cpu(), dtype=next(iter(linears.values())).weight.dtype)
    stored = ", with the pruned checkpoint" if full else ", linears packed" if packed else ""
    print(f"artifact written to {out} (mean sparsity {mean_sparsity:.4f}, mean KV bits {plan.mean_kv_bits():g}"
          f"{stored}; the folder takes {folder_bytes(out) / 2**20:.1f} MiB on disk)")
    return out


def folder_bytes(out: Path) -> int:
    """What the artifact's folder takes on disk (not the base model it points at)."""
    return sum(path.stat().st_size for path in Path(out).rglob("*") if path.is_file())
