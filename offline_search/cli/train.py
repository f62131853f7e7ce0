"""Train shapes-llava from scratch on ShapesVQA and WikiText-2 validation text (about 30 minutes on
2 CPU cores), then save it in the llava-hf layout. A killed run resumes with the same command."""

from __future__ import annotations

import argparse
from pathlib import Path

from offline_search.kit.train_shapes_llava import TrainConfig

HELP = "train shapes-llava, the project's small LLaVA, from scratch"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    parser.add_argument("--steps", type=int, default=TrainConfig.model_fields["steps"].default, help="(default: %(default)s)")
    parser.add_argument("--seed", type=int, default=TrainConfig.model_fields["seed"].default, help="(default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from offline_search.kit.train_shapes_llava import train

    config = TrainConfig(out_dir=args.out, steps=args.steps, seed=args.seed)
    print(f"shapes-llava written to {train(config)}")
    return 0
