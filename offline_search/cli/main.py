"""The `adaspkv` command: one entry point, one subcommand per job.

Subcommands are the modules registered under the entry-point group `adaspkv.commands` (this
package's search, prune, eval and train-tiny; the demo's own), each with HELP, add_arguments(parser)
and run(args) -> int. They import torch, Optuna and friends only inside `run`, so that
`adaspkv --help` answers at once. A subcommand whose extra is not installed says which to install.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from vllm_adaspkv import __version__

GROUP = "adaspkv.commands"
# What `pip install vllm-adaspkv` leaves out, by the module that would be missing: the extra that has it.
EXTRA_OF_MODULE = {"optuna": "search", "datasets": "search", "matplotlib": "search", "gradio": "demo"}


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
    for entry in sorted(entry_points(group=GROUP), key=lambda e: e.name):
        module = entry.load()
        sub = subparsers.add_parser(entry.name, help=module.HELP, description=module.__doc__)
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
    except ModuleNotFoundError as exc:
        extra = EXTRA_OF_MODULE.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        raise SystemExit(f"adaspkv {args.command}: needs {exc.name}, which comes with the {extra!r} extra: "
                         f"pip install 'vllm-adaspkv[{extra}]'") from None


if __name__ == "__main__":
    sys.exit(main())
