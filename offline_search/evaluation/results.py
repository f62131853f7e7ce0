"""Evaluation results as a table for the terminal and as a JSON file with the settings that made them."""

from __future__ import annotations

import json
from pathlib import Path

from offline_search.evaluation.harness import EvalConfig


def write_results(results: dict, config: EvalConfig, path: Path) -> None:
    """The results with the settings that produced them, as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**results, "settings": config.model_dump(mode="json")}, indent=1))


def format_table(results: dict) -> str:
    rows = [("model", results["model"]), ("backend", results["backend"])]
    if "artifact" in results:
        rows.append(("artifact", results["artifact"]))
    if "wikitext2_ppl" in results:
        rows += [("wikitext2 perplexity", f"{results['wikitext2_ppl']:.2f} (standard error {results['wikitext2_ppl_se']:.2f})"),
                 ("  unigram baseline", f"{results['unigram_ppl']:.2f}"),
                 ("  windows x tokens", f"{results['wikitext2_windows']} x {results['wikitext2_seq_len']}")]
    if "shapesvqa_accuracy" in results:
        rows += [("shapesvqa accuracy", f"{results['shapesvqa_accuracy']:.4f}"),
                 ("  questions", str(results["shapesvqa_questions"]))]
        rows += [(f"  {kind}", f"{acc:.3f}") for kind, acc in results["shapesvqa_by_type"].items()]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
