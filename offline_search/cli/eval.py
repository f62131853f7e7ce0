"""Evaluate a LLaVA: WikiText-2 test perplexity (with a unigram baseline) and ShapesVQA test
accuracy, offline through transformers or through a running OpenAI-compatible server (--server)."""

from __future__ import annotations

import argparse
from pathlib import Path

from offline_search.evaluation.harness import TASKS, EvalConfig

HELP = "WikiText-2 perplexity and ShapesVQA accuracy, offline or through a server"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="bundled model name (shapes-llava) or LLaVA checkpoint directory; with "
                             "--server, the checkpoint the server runs (its tokenizer is used)")
    parser.add_argument("--artifact", default=None,
                        help="an adaspkv artifact directory made from --model: evaluate with its pruned weights "
                             "(masks, packed linears or checkpoint) and simulated KV cache (offline only)")
    parser.add_argument("--tasks", default=",".join(TASKS),
                        help="comma-separated, from: %(default)s")
    parser.add_argument("--limit", type=int, default=None,
                        help="at most N WikiText windows and N ShapesVQA questions (default: all; "
                             "the ShapesVQA test split has 1000)")
    parser.add_argument("--questions", type=int, default=None,
                        help="ShapesVQA test questions, the first N (default: --limit, else all 1000)")
    parser.add_argument("--server", default=None,
                        help="evaluate through this OpenAI-compatible server, e.g. http://127.0.0.1:8000")
    parser.add_argument("--served-model", default=None,
                        help="model name on the server (default: the first one it lists)")
    parser.add_argument("--seq-len", type=int, default=None,
                        help="perplexity window length (default: the model's max_position_embeddings)")
    parser.add_argument("--batch-size", type=int, default=16, help="offline batch size (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, dest="json_out",
                        help="write the results (and the settings) to this JSON file")


def run(args: argparse.Namespace) -> int:
    from offline_search.data.bundled_models import resolve_model
    from offline_search.evaluation.harness import evaluate
    from offline_search.evaluation.results import format_table, write_results

    config = EvalConfig(model=args.model, artifact=args.artifact, tasks=tuple(t for t in args.tasks.split(",") if t),
                        limit=args.limit, questions=args.questions, server=args.server, served_model=args.served_model,
                        seq_len=args.seq_len, batch_size=args.batch_size)
    results = evaluate(config, resolve_model(config.model))
    print(format_table(results))
    if args.json_out:
        write_results(results, config, args.json_out)
        print(f"results written to {args.json_out}")
    return 0
