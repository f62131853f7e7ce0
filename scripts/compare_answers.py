"""Compares two `adaspkv eval --json` files question by question.

    .venv/bin/python scripts/compare_answers.py offline.json served.json

Prints how many ShapesVQA answers agree exactly, the accuracy and perplexity of each run, and the
questions the first run answers right and the second wrong (and the reverse) with the exact
McNemar p-value: whether the accuracy gap is more than chance.
"""

import json
import sys

from offline_search.data import shapes_vqa

if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    a, b = (json.load(open(path)) for path in sys.argv[1:])
    pa, pb = a["shapesvqa_predictions"], b["shapesvqa_predictions"]
    if len(pa) != len(pb):
        sys.exit(f"the two runs answered different numbers of questions ({len(pa)} and {len(pb)})")
    agree = sum(x == y for x, y in zip(pa, pb))
    print(f"answers agreeing: {agree}/{len(pa)} = {agree / len(pa):.4f}")
    for name, run in zip(sys.argv[1:], (a, b)):
        ppl = run.get("wikitext2_ppl")
        print(f"{name}: shapesvqa accuracy {run['shapesvqa_accuracy']:.4f}"
              + (f", wikitext2 ppl {ppl:.3f}" if ppl is not None else "") + f" ({run['backend']})")
    print(f"accuracy difference: {abs(a['shapesvqa_accuracy'] - b['shapesvqa_accuracy']) * 100:.2f} points")
    lost, gained, p_value = shapes_vqa.compare_test_answers(pa, pb)
    print(f"right in the first, wrong in the second: {lost}; the reverse: {gained}; "
          f"exact McNemar p = {p_value:.2g}")
