"""Prune a LLaVA's language model with one metric and one allocation (no search) and write a
compressed artifact, the same as `adaspkv search` writes."""

from __future__ import annotations

import argparse

from offline_search.cli.search import add_common_arguments, run_command

HELP = "prune with one metric and allocation (no search) and write a compressed artifact"
PRUNE_ALLOCATIONS = ("uniform", "owl", "das")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, PRUNE_ALLOCATIONS, "uniform")


def run(args: argparse.Namespace) -> int:
    return run_command(args, "prune")
