"""Search per-block sparsity ratios with Optuna's TPE sampler (arXiv 2507.20613) and write a
compressed artifact. Calibration statistics are computed once and cached; every trial masks the
model in memory and measures the objective (WikiText-2 validation perplexity by default). The study
is stored in OUT/study.db (or --storage): run the same command again to resume a killed search."""

from __future__ import annotations

import argparse
from pathlib import Path

from offline_search.cli.extras import require_extra
from offline_search.core.masks import parse_nm
from offline_search.core.metrics import METRICS
from offline_search.model.calibration import CalibrationConfig
from offline_search.model.objective import OBJECTIVES, ObjectiveConfig
from offline_search.search.config import ALLOCATIONS, COMPARISONS, DEVICES, KV_SEARCHES, WARM_STARTS, CompressConfig
from vllm_adaspkv.errors import ConfigError
from vllm_adaspkv.format import EIGHT_BIT_FORMATS, KEY_ROTATIONS
from vllm_adaspkv.kv.quant import KV_BITS

HELP = "search per-layer sparsity with Optuna TPE and write a compressed artifact"


def add_common_arguments(parser: argparse.ArgumentParser, allocations: tuple[str, ...], default: str) -> None:
    """The options shared by `search` and `prune`."""
    parser.add_argument("--model", required=True, help="bundled model name (shapes-llava) or LLaVA checkpoint directory")
    parser.add_argument("--sparsity", type=float, required=True,
                        help="target share of language-model linear weights to zero, e.g. 0.5")
    parser.add_argument("--metric", choices=METRICS, default="lognorm",
                        help="weight importance: magnitude |W|; wanda |W|*||X||; lognorm, the paper's "
                             "log-normalised score; sparsegpt, second-order pruning with weight update "
                             "(default: %(default)s)")
    parser.add_argument("--allocation", choices=allocations, default=default,
                        help="how sparsity is shared among layers: uniform; owl (outlier-weighted); das "
                             "(TAMP diversity-aware, per matrix); tpe (searched) (default: %(default)s)")
    parser.add_argument("--nm", default=None, metavar="N:M",
                        help="semi-structured: prune N of every M consecutive weights (2:4, 4:8); "
                             "uniform allocation only")
    parser.add_argument("--amia", action="store_true",
                        help="TAMP's adaptive multimodal input activation: only selected tokens feed "
                             "the activation norms of wanda / lognorm")
    parser.add_argument("--comparison", choices=COMPARISONS, default=None,
                        help="weights compete inside their output row (Wanda's, lognorm's default) or in the "
                             "whole matrix (magnitude's default)")
    parser.add_argument("--kv-bits", type=int, default=16, choices=KV_BITS,
                        help="KV-cache bits of every decoder layer when they are not searched (default: %(default)s)")
    parser.add_argument("--kv-group", type=int, default=32,
                        help="KV quantization group size along the head dimension (default: %(default)s)")
    parser.add_argument("--kv-key-rotation", choices=KEY_ROTATIONS, default="none",
                        help="quantize keys in the Hadamard basis (spreads outlier channels; head_dim a "
                             "power of two) (default: %(default)s)")
    parser.add_argument("--kv-eight-bit", choices=EIGHT_BIT_FORMATS, default="int8",
                        help="how 8-bit KV layers are stored: int8 codes with a scale pair per group, or fp8_e4m3 "
                             "values (vLLM's fp8 cache: 1 byte a value, no scales; served on CPU only) "
                             "(default: %(default)s)")
    parser.add_argument("--out", type=Path, required=True, help="artifact directory to write")
    parser.add_argument("--full-checkpoint", action="store_true",
                        help="also write the pruned checkpoint (llava-hf layout) into --out "
                             "(done for sparsegpt, which updates weights, unless --pack)")
    parser.add_argument("--pack", action="store_true",
                        help="store the pruned linears packed (bitmask + kept values: 0.56x of dense bf16 at 50%% "
                             "sparsity, SparseGPT's updated values included) instead of masks (with "
                             "--full-checkpoint: the checkpoint), and serve them packed on CPU (C++ kernel: less "
                             "memory, faster decode from about 30%% sparsity)")
    parser.add_argument("--seed", type=int, default=0, help="sampler seed (default: %(default)s)")
    parser.add_argument("--device", choices=DEVICES, default="auto",
                        help="where the model runs for calibration, pruning and the objective; auto: cuda "
                             "when a GPU is there, else cpu (default: %(default)s)")
    group = parser.add_argument_group("calibration")
    group.add_argument("--calibration-text", default="wikitext2",
                       help="'wikitext2' (bundled validation split), a UTF-8 text file, "
                            "dataset:NAME[:CONFIG]:SPLIT (Hugging Face datasets, e.g. "
                            "dataset:wikitext:wikitext-2-raw-v1:train), or 'none' (default: %(default)s)")
    group.add_argument("--calibration-windows", type=int, default=32,
                       help="text windows of the model's context length (default: %(default)s)")
    group.add_argument("--calibration-images", default="shapesvqa",
                       help="'shapesvqa' (image + question + answer conversations), a folder of images "
                            "each with a NAME.txt prompt beside it, or 'none' (default: %(default)s)")
    group.add_argument("--calibration-samples", type=int, default=32,
                       help="image samples (default: %(default)s)")
    group.add_argument("--seq-len", type=int, default=None,
                       help="tokens per text window, for calibration and the objective (default: the model's "
                            "max_position_embeddings, 4096 for LLaVA-1.5-7B)")
    group.add_argument("--cache-dir", type=Path, default=None,
                       help="calibration cache (default: $ADASPKV_CACHE_DIR or ~/.cache/adaspkv)")
    group = parser.add_argument_group("objective (what the search minimises and the export reports)")
    group.add_argument("--objective", choices=OBJECTIVES, default="wikitext2",
                       help="wikitext2: validation perplexity; kl: KL divergence from the uncompressed model "
                            "on the same windows (resolves small differences between KV plans); "
                            "shapesvqa: validation answer loss; mix: weighted sum of perplexity's and "
                            "the answer loss's NLLs (default: %(default)s)")
    group.add_argument("--objective-windows", type=int, default=64, help="text windows (default: %(default)s)")
    group.add_argument("--objective-samples", type=int, default=64, help="ShapesVQA questions (default: %(default)s)")
    group.add_argument("--objective-weight", type=float, default=0.5, help="mix: answer NLL weight (default: %(default)s)")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, ALLOCATIONS, "tpe")
    group = parser.add_argument_group("search (--allocation tpe)")
    group.add_argument("--trials", type=int, default=50, help="completed trials to reach (default: %(default)s)")
    group.add_argument("--blocks", type=int, default=None,
                       help="contiguous groups of layers sharing one sparsity; the number of layers for "
                            "one per layer (default: 8, or one per layer if the model has fewer)")
    group.add_argument("--warm-start", choices=WARM_STARTS, default=None,
                       help="enqueue the OWL or DAS plan as the second trial (the uniform plan is the first)")
    group.add_argument("--storage", default=None,
                       help="Optuna storage URL, e.g. postgresql://user@host/db for many workers "
                            "(default: sqlite:///OUT/study.db)")
    group.add_argument("--study-name", default=None, help="default: derived from the model's hash and the settings")
    group.add_argument("--worker", action="store_true",
                       help="join the study (same --storage and settings) as an extra worker: run trials until it "
                            "has --trials completed, write no artifact (the run without --worker writes it)")
    group.add_argument("--heartbeat-interval", type=float, default=30.0, metavar="SECONDS",
                       help="a worker that has not beaten for 3 x this is taken as dead and its trial is run "
                            "again (default: %(default)s)")
    group = parser.add_argument_group("KV-cache bits per layer (searched jointly with sparsity, or alone "
                                      "with --allocation uniform)")
    group.add_argument("--kv-search", choices=KV_SEARCHES, default=None,
                       help="split: the paper's half 8-bit, half 6-bit; budget: mean bits at most "
                            "--kv-bits-budget; pareto: objective against mean bits, a Pareto front "
                            "(default: budget when --kv-bits-budget is given, else none)")
    group.add_argument("--kv-bits-budget", type=float, default=None,
                       help="mean KV bits per layer at most this (every trial meets it by construction)")
    group.add_argument("--kv-choices", default="2,4,6,8,16",
                       help="bit widths a layer may take in budget and pareto searches (default: %(default)s)")


def config_from_args(args: argparse.Namespace) -> CompressConfig:
    text = None if args.calibration_text == "none" else args.calibration_text
    images = None if args.calibration_images == "none" else args.calibration_images
    warm = getattr(args, "warm_start", None)
    calibration = CalibrationConfig(
        text=text, text_windows=args.calibration_windows, seq_len=args.seq_len, images=images,
        image_samples=args.calibration_samples, hessian=args.metric == "sparsegpt",
        diversity=args.allocation == "das" or warm == "das", amia=args.amia)
    objective = ObjectiveConfig(kind=args.objective, windows=args.objective_windows, seq_len=args.seq_len,
                                vqa_samples=args.objective_samples, mix_weight=args.objective_weight)
    return CompressConfig(
        model=args.model, out=args.out, sparsity=args.sparsity, metric=args.metric,
        allocation=args.allocation, nm=parse_nm(args.nm) if args.nm else None,
        blocks=getattr(args, "blocks", None), trials=getattr(args, "trials", 1),
        storage=getattr(args, "storage", None), study_name=getattr(args, "study_name", None),
        worker=getattr(args, "worker", False), heartbeat_s=getattr(args, "heartbeat_interval", 30.0),
        seed=args.seed, warm_start=warm, amia=args.amia, comparison=args.comparison, objective=objective, calibration=calibration,
        full_checkpoint=args.full_checkpoint, pack=args.pack, cache_dir=args.cache_dir, device=args.device,
        kv_bits=args.kv_bits, kv_group=args.kv_group, kv_key_rotation=args.kv_key_rotation,
        kv_eight_bit=args.kv_eight_bit, **_kv_search_args(args))


def _kv_search_args(args: argparse.Namespace) -> dict:
    budget = getattr(args, "kv_bits_budget", None)
    mode = getattr(args, "kv_search", None) or ("budget" if budget is not None else "none")
    try:
        choices = tuple(int(c) for c in getattr(args, "kv_choices", "2,4,6,8,16").split(","))
    except ValueError:
        raise ConfigError(f"--kv-choices {args.kv_choices!r}: write bit widths such as 2,4,6,8,16") from None
    return {"kv_search": mode, "kv_bits_budget": budget, "kv_choices": choices}


def run_command(args: argparse.Namespace, command: str) -> int:
    require_extra(command, *(("optuna", "matplotlib") if command == "search" else ("matplotlib",)))  # the report's plots
    from offline_search.search.compress import compress

    config = config_from_args(args)
    try:
        compress(config)
    except KeyboardInterrupt:
        resume = " (finished trials are kept: run the same command to resume)" if command == "search" else ""
        raise SystemExit(f"adaspkv {command}: interrupted{resume}") from None
    return 0


def run(args: argparse.Namespace) -> int:
    return run_command(args, "search")
