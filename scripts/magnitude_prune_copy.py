"""Writes a copy of a LLaVA checkpoint whose language-model linears are magnitude-pruned.

    .venv/bin/python scripts/magnitude_prune_copy.py --model shapes-llava --sparsity 0.5 --out DIR

Used to show that the quality oracle is sensitive to pruning (the shapes-llava model card). The
product's pruning command, with every metric and the search, is `adaspkv prune` / `adaspkv search`.
"""

import argparse
from pathlib import Path

from offline_search.checkpoint import load_llava, save_llava_checkpoint
from offline_search.masks import magnitude_scores
from offline_search.model_registry import resolve_model
from offline_search.prune_model import prune_uniform

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True)
    parser.add_argument("--sparsity", type=float, required=True)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    model, processor = load_llava(resolve_model(args.model))
    achieved = prune_uniform(model, magnitude_scores, args.sparsity)
    save_llava_checkpoint(model, processor, args.out)
    print(f"{len(achieved)} linears pruned, mean sparsity {sum(achieved.values()) / len(achieved):.4f}; "
          f"written to {args.out}")
