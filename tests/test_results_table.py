"""scripts/results_table.py: its rows, and the table it writes from row JSONs (no model run)."""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("results_table", REPO / "scripts" / "results_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("table", ["pruning", "kv", "ablation"])
def test_rows_are_unique_and_searches_run_once_per_seed(script, table):
    rows = {"pruning": script.pruning_rows, "kv": script.kv_rows, "ablation": script.ablation_rows}[table](
        "smol-llava", 20, [0, 1, 2])
    ids = [row for row, _, _ in rows]
    assert len(ids) == len(set(ids))
    assert rows[0] == ("dense", rows[0][1], None)
    assert {"lognorm-tpe", "lognorm-tpe-seed1", "lognorm-tpe-seed2"} <= set(ids) or table != "pruning"
    if table == "kv":
        assert {"uniform4", "search4_5", "search4_5-seed1", "search4_5-seed2", "search6-seed2"} <= set(ids)
    if table == "ablation":  # one change a row
        assert dict((r, c[c.index("--metric"):]) for r, _, c in rows[1:])["wanda-images-only"] == [
            "--metric", "wanda", "--calibration-text", "none"]
    for row, label, command in rows[1:]:
        assert command[command.index("--model") + 1] == "smol-llava"
        if "-seed" in row:
            assert command[-2:] == ["--seed", row.rsplit("seed", 1)[1]] and label.endswith(f"seed {command[-1]}")


def test_table_gives_each_seed_and_their_mean_and_spread(script, tmp_path):
    out = tmp_path / "pruning"
    out.mkdir()
    rows = script.seeded("tpe", "lognorm, TPE", ["search", "--model", "smol-llava"], [0, 1])
    for (row, _, _), ppl, acc in zip(rows, (30.0, 32.0), (0.8, 0.9)):
        (out / f"{row}.json").write_text(json.dumps({"wikitext2_ppl": ppl, "wikitext2_ppl_se": 0.5,
                                                      "shapesvqa_accuracy": acc}))
    args = argparse.Namespace(model="smol-llava", table="pruning", trials=20, seeds="0,1")
    script.write_table("title", "protocol", [("dense", "dense", None), *rows], out, ["adaspkv x"], 2, args)
    text = (tmp_path / "pruning.md").read_text()
    assert "| dense | not run |" in text
    assert "| lognorm, TPE, seed 1 | 32.00 +- 0.50 | 0.900 |" in text
    assert "| lognorm, TPE: mean of 2 seeds (min-max) | 31.00 (30.00-32.00) | 0.850 (0.800-0.900) |" in text
    assert "ShapesVQA test accuracy (500 questions)" in text
    assert "--trials 20 --seeds 0,1" in text
