"""The `adaspkv` command: one entry point, one subcommand per job.

Each subcommand lives in the package that owns its job and exposes `add_arguments(parser)` and
`run(args) -> int`. Those modules import torch, vLLM and friends only inside `run`, so that
`adaspkv --help` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from vllm_adaspkv import __version__

# subcommand -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "search": (
        "offline_search.search_command",
        "search per-layer sparsity with Optuna TPE and write a compressed artifact",
    ),
    "prune": (
        "offline_search.prune_command",
        "prune with one metric and allocation (no search) and write a compressed artifact",
    ),
    "eval": (
        "offline_search.eval_command",
        "WikiText-2 perplexity and ShapesVQA accuracy, offline or through a server",
    ),
    "train-tiny": (
        "offline_search.train_command",
        "train shapes-llava, the project's small LLaVA, from scratch",
    ),
    "demo": (
        "demo.cli",
        "image chat in the browser with a compressed LLaVA served by vllm serve --plugin adaspkv",
    ),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaspkv",
        description=(
            "Compress LLaVA models (per-layer weight sparsity and KV-cache bit widths, searched "
            "offline with Optuna) and serve them with vLLM."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        sub = subparsers.add_parser(name, help=help_text, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
