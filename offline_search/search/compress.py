"""`adaspkv search` and `adaspkv prune`: calibrate, allocate (or search), mask, export an artifact."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path

from offline_search.core import allocation
from offline_search.core.metrics import wanda_scores
from offline_search.data.bundled_models import resolve_model
from offline_search.data.calibration_cache import (
    HessianStore,
    default_cache_dir,
    load_statistics,
    save_statistics,
    statistics_file,
)
from offline_search.data.checkpoint import CheckpointWeights, load_llava
from offline_search.model.calibration import CalibrationConfig, calibrate
from offline_search.model.kv_simulation import apply_kv_plan, remove_kv_plan
from offline_search.model.llava import model_geometry, model_linears
from offline_search.model.objective import Objective
from offline_search.model.pruner import Pruner
from offline_search.search.config import CompressConfig
from offline_search.search.export import export_artifact
from vllm_adaspkv.format import LINEARS, Provenance, mask_key, model_sha256

logger = logging.getLogger(__name__)


def compress(config: CompressConfig) -> Path | None:
    """Runs the whole job and returns the artifact directory (None for an extra worker, which only
    runs trials of the shared study)."""
    model_dir = resolve_model(config.model)
    weights = CheckpointWeights(model_dir)  # the safetensors headers, read once
    model, processor = load_llava(model_dir, weights.dtype, config.resolved_device())
    num_layers = model_geometry(model).num_layers
    config = config.with_model_layers(num_layers)
    cache_dir = config.cache_dir or default_cache_dir()
    base_sha256 = model_sha256(model_dir)  # streamed over every weight file: once per run
    stats, cache_file, hit = cached_calibration(model, processor, base_sha256, config.calibration, cache_dir,
                                                config.show_progress)
    print(f"calibration statistics {'reused from' if hit else 'written to'} {cache_file}")
    pruner = Pruner(model, weights, stats, config.metric, config.nm, config.amia,
                    ranked=config.allocation == "tpe" and rank_codes_fit(model), hessians=HessianStore(cache_file).get,
                    progress=config.show_progress, per_row=config.per_row)
    objective = Objective(model, processor, config.objective)
    start = time.perf_counter()
    dense_value = objective()
    bare_eval_seconds = time.perf_counter() - start
    print(f"dense model: {config.objective.describe()} = {dense_value:.6g} ({bare_eval_seconds:.2f} s)")

    sizes = pruner.sizes()
    layer_weights = [sum(sizes[mask_key(i, name)] for name in LINEARS) for i in range(num_layers)]
    provenance = {"calibration": {**config.calibration.model_dump(), "cache_file": str(cache_file)},
                  "objective": config.objective.describe(), "seed": config.seed}
    study = None
    kv_bits = [config.kv_bits] * num_layers
    plan = None if config.allocation == "tpe" else _fixed_plan(config, stats, pruner, num_layers)
    if config.searches:
        from offline_search.search.study import chosen_trial, completed_trials, run_search

        if plan is not None:
            pruner.apply(plan, keep_masks=False)  # a fixed sparsity plan: only the KV plan changes per trial

        def evaluate_plan(layer_sparsity: list[float] | None, bits: list[int] | None) -> float:
            if layer_sparsity is not None:
                pruner.apply(per_linear(layer_sparsity, num_layers), keep_masks=False)
            if bits is not None:
                apply_kv_plan(model, bits, config.kv_scheme)
            return objective()

        warm = _warm_start(config, stats, pruner, num_layers) if config.warm_start else None
        study = run_search(config, base_sha256, layer_weights, evaluate_plan, warm, bare_eval_seconds)
        if config.worker:
            print(f"worker done: study {study.study_name!r} has {completed_trials(study)} completed trials; "
                  "the search without --worker writes the artifact")
            return None
        best = chosen_trial(study, config)
        if plan is None:
            plan = per_linear(_layer_values(config, best.user_attrs["block_sparsity"], num_layers), num_layers)
        kv_bits = best.user_attrs.get("kv_bits", kv_bits)
        provenance |= {"study_name": study.study_name, "storage": without_password(config.storage_url()),
                       "trial": best.number, "objective_values": best.values,
                       "trials_completed": completed_trials(study),
                       "timing": study.user_attrs.get("timing")}
    masks = pruner.apply(plan, progress=config.show_progress)
    if any(b != 16 for b in kv_bits):
        apply_kv_plan(model, kv_bits, config.kv_scheme)
    value = objective()
    evaluation = {"objective": config.objective.describe(), "dense": dense_value, "pruned": value}
    print(f"compressed model: {config.objective.describe()} = {value:.6g}")
    if any(b != 16 for b in kv_bits):
        remove_kv_plan(model)  # the checkpoint, if written, holds weights only
    return export_artifact(config, model, processor, model_dir, base_sha256, masks, kv_bits,
                           Provenance(**provenance), evaluation, study)


# Measured on a 7B model (13.2 GiB of bf16 weights): a search trial holds 0.6 GiB beyond the weights
# (peak anonymous memory 13.8 GiB); the ranking holds one matrix's sort (0.4 GiB) at a time.
RANKING_HEADROOM_BYTES = 2 << 30


def rank_codes_fit(model) -> bool:
    """Whether a search can keep 1-byte rank codes of every pruned weight beside the model in this
    machine's memory. A search masks at many sparsities: with the codes, a trial's mask costs a
    comparison and the scores of one rank bucket; without them each trial selects every mask from the
    scores again (kthvalue: the same masks, minutes a trial for a 7B model). Said either way."""
    codes = sum(m.weight.numel() for m in model_linears(model).values())
    weights = sum(t.numel() * t.element_size() for t in model.parameters())
    memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    fits = weights + codes + RANKING_HEADROOM_BYTES <= memory
    verdict = "kept" if fits else "NOT kept: each trial selects its masks from the scores again (slower, same masks)"
    print(f"search masks: rank codes of {codes / 2**30:.1f} GiB beside {weights / 2**30:.1f} GiB of weights in "
          f"{memory / 2**30:.1f} GiB of memory: {verdict}")
    return fits


def without_password(url: str) -> str:
    """A storage URL fit to be written into an artifact: postgresql://user:***@host/db."""
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def cached_calibration(model, processor, base_sha256: str, config: CalibrationConfig,
                       cache_dir: Path, show_progress: bool = True) -> tuple[dict, Path, bool]:
    """(statistics, cache file, whether it was a cache hit): calibrated once per model (by content
    hash) and settings."""
    path = statistics_file(cache_dir, config.cache_key(base_sha256))
    stats = load_statistics(path)
    hessians_gone = config.hessian and not HessianStore(path).has_layers(model_geometry(model).num_layers)
    if stats is not None and not hessians_gone:
        return stats, path, True
    stats = calibrate(model, processor, config, show_progress, save_hessians=HessianStore(path).save_layer)
    save_statistics(path, stats)  # last: a cache hit has every layer's Hessians
    logger.info("calibration statistics cached in %s", path)
    return stats, path, False


def per_linear(layer_sparsity: list[float], num_layers: int) -> dict[str, float]:
    """Per-layer sparsity -> the same sparsity for every pruned linear of that layer."""
    return {mask_key(i, name): layer_sparsity[i] for i in range(num_layers) for name in LINEARS}


def _layer_values(config: CompressConfig, block_values: list[float], num_layers: int) -> list[float]:
    return allocation.expand_blocks(block_values, allocation.layer_blocks(num_layers, config.blocks))


def _owl_layers(stats: dict, pruner: Pruner, sparsity: float, num_layers: int) -> list[float]:
    # OWL measures outliers in Wanda scores, whatever metric then ranks the weights.
    shares = [allocation.outlier_share([wanda_scores(pruner.dense(mask_key(i, n)), stats[mask_key(i, n)]["in_sq"])
                                        for n in LINEARS]) for i in range(num_layers)]
    return allocation.owl_plan(shares, sparsity)


def _das_linears(stats: dict, pruner: Pruner, sparsity: float) -> dict[str, float]:
    keys, sizes = zip(*pruner.sizes().items())
    return dict(zip(keys, allocation.das_plan(list(sizes), [stats[k]["diversity"] for k in keys], sparsity)))


def _fixed_plan(config: CompressConfig, stats: dict, pruner: Pruner, num_layers: int) -> dict[str, float]:
    if config.allocation == "owl":
        return per_linear(_owl_layers(stats, pruner, config.sparsity, num_layers), num_layers)
    if config.allocation == "das":
        return _das_linears(stats, pruner, config.sparsity)
    return per_linear(allocation.uniform_plan(num_layers, config.sparsity), num_layers)


def _warm_start(config: CompressConfig, stats: dict, pruner: Pruner, num_layers: int) -> list[float]:
    """The OWL or DAS plan as block values on the search grid."""
    if config.warm_start == "owl":
        layers = _owl_layers(stats, pruner, config.sparsity, num_layers)
    else:
        das = _das_linears(stats, pruner, config.sparsity)
        sizes = pruner.sizes()
        layers = [sum(das[mask_key(i, n)] * sizes[mask_key(i, n)] for n in LINEARS)
                  / sum(sizes[mask_key(i, n)] for n in LINEARS) for i in range(num_layers)]
    grid = allocation.block_grid(config.sparsity, config.radius, config.step)
    return allocation.block_means(layers, allocation.layer_blocks(num_layers, config.blocks), grid)
