"""The 7B benchmark's pieces on a small model of the same family (the 7B run is the benchmark, not CI):
the config.json of llava-1.5-7b-hf with small sizes written in, sharded bf16 safetensors with an index,
the llava-hf tokenizer and chat template; pruned and searched in bf16 through the CLI."""

import json
import math

import pytest
import torch
from safetensors import safe_open

import vllm_adaspkv.format as art
from offline_search.cli.main import main
from offline_search.data.checkpoint import CheckpointWeights, load_llava
from offline_search.data.sharded_safetensors import INDEX_FILE
from tests.conftest import SMALL_FAMILY_CONFIG as SMALL_FAMILY


def test_the_checkpoint_is_sharded_bf16_with_an_index_and_the_config_verbatim(small_family_dir):
    assert (small_family_dir / "config.json").read_text() == SMALL_FAMILY.read_text()
    index = json.loads((small_family_dir / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((small_family_dir / s).is_file() for s in shards)
    with safe_open(str(small_family_dir / shards[0]), framework="pt") as f:
        assert all(f.get_slice(k).get_dtype() == "BF16" for k in f.keys())
    model, processor = load_llava(small_family_dir)  # in the checkpoint's dtype, not float32
    assert model.dtype == torch.bfloat16 and CheckpointWeights(small_family_dir).dtype == torch.bfloat16
    assert processor.tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    assert "USER:" in processor.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                                                    add_generation_prompt=True)


def prune_args(model_dir, out, cache, *extra):
    return ["--model", str(model_dir), "--sparsity", "0.5", "--out", str(out), "--cache-dir", str(cache),
            "--calibration-windows", "2", "--calibration-samples", "2", "--seq-len", "64",
            "--objective-windows", "2", "--objective-samples", "2", *extra]


@pytest.mark.parametrize("metric", ["magnitude", "wanda", "sparsegpt"])
def test_prune_in_bf16_meets_the_plan(small_family_dir, tmp_path, metric):
    out = tmp_path / "art"
    assert main(["prune", *prune_args(small_family_dir, out, tmp_path / "cache", "--metric", metric)]) == 0
    plan = art.read_plan(out)
    assert plan.evaluation.mean_sparsity == pytest.approx(0.5, abs=0.01)
    assert math.isfinite(plan.evaluation.pruned) and plan.evaluation.pruned != plan.evaluation.dense
    if metric == "sparsegpt":  # Hessians went to files beside the statistics, one per layer
        assert len(list((tmp_path / "cache").rglob("layer-*.safetensors"))) == 2
        pruned, _ = load_llava(out)
        assert pruned.dtype == torch.bfloat16


def test_search_in_bf16_gives_the_same_artifact_with_or_without_rank_codes(small_family_dir, tmp_path, monkeypatch,
                                                                          capsys):
    from offline_search.search import compress

    artifacts = []
    for codes_fit in (True, False):
        if not codes_fit:  # a machine too small for the rank codes: every trial selects its masks again
            monkeypatch.setattr(compress, "RANKING_HEADROOM_BYTES", 1 << 60)
        out = tmp_path / f"art-{codes_fit}"
        args = prune_args(small_family_dir, out, tmp_path / "cache", "--metric", "lognorm", "--trials", "3",
                          "--blocks", "2")
        assert main(["search", *args]) == 0
        assert ("NOT kept" in capsys.readouterr().out) == (not codes_fit)
        plan = art.read_plan(out)
        assert plan.provenance.trials_completed == 3 and plan.evaluation.mean_sparsity == pytest.approx(0.5, abs=0.01)
        artifacts.append((plan, art.read_masks(out)))
    (with_codes, masks), (without, other) = artifacts
    assert with_codes.evaluation == without.evaluation and with_codes.layers == without.layers
    assert all(torch.equal(masks[key], other[key]) for key in masks)


def test_checkpoint_weights_read_each_tensor_as_safetensors_does(small_family_dir):
    weights = CheckpointWeights(small_family_dir)
    index = json.loads((small_family_dir / INDEX_FILE).read_text())["weight_map"]
    for name in list(index)[::7]:
        with safe_open(str(small_family_dir / index[name]), framework="pt") as f:
            assert torch.equal(weights.get(art.canonical_key(name)), f.get_tensor(name)), name
