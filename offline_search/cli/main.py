"""The `adaspkv` command: one entry point, one subcommand per job.

A subcommand is a module with HELP, add_arguments(parser) and run(args) -> int: this package's
search, prune, eval and train-tiny, and those other packages register under the entry-point group
`adaspkv.commands` (the demo registers `demo`, so that nothing here imports the demo). Optuna, Gradio
and the other libraries of an extra are imported inside `run`; `run` first calls `require_extra`, so
that a missing extra is named before any model is loaded.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from types import ModuleType

from offline_search.cli import eval as eval_command
from offline_search.cli import prune, search, train, train_smol
from vllm_adaspkv import __version__
from vllm_adaspkv.errors import AdaspkvError

GROUP = "adaspkv.commands"
OWN_COMMANDS: dict[str, ModuleType] = {"search": search, "prune": prune, "eval": eval_command, "train-tiny": train,
                                       "train-smol": train_smol}


def subcommands() -> dict[str, ModuleType]:
    """This package's subcommands, then those registered by other installed packages."""
    found = dict(OWN_COMMANDS)
    for entry in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        if entry.name not in found:
            found[entry.name] = entry.load()
    return found


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adaspkv",
        description=(
            "Compress LLaVA models (per-layer weight sparsity and KV-cache bit widths, searched "
            "offline with Optuna) and serve them with vLLM."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of a user error too (bad input is one line without it)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in subcommands().items():
        sub = subparsers.add_parser(name, help=module.HELP, description=module.__doc__)
        module.add_arguments(sub)
        sub.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return args.run(args)
    except AdaspkvError as exc:  # bad input: one line; anything else is unexpected and keeps its traceback
        if args.debug:
            raise
        raise SystemExit(f"adaspkv {args.command}: error: {exc}") from None


if __name__ == "__main__":
    sys.exit(main())
