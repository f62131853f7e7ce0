import json

import pytest

from demo.plots import (KVGeometry, capacity_summary, kv_bits_figure, kv_bytes_per_token, kv_geometry,
                        layer_sparsity, profile_markdown, sparsity_figure)
from offline_search.model_registry import resolve_model
from vllm_adaspkv.artifact import BaseModel, KVQuantScheme, LayerPlan, Plan

SHA = "0" * 64


def _plan(bits=(16, 8, 6, 4), sparsity=({"mlp.up_proj": 0.4, "mlp.down_proj": 0.6}, {}, {"self_attn.q_proj": 0.3}, {}),
          group=32, **kw):
    layers = tuple(LayerPlan(sparsity=dict(s), kv_bits=b) for s, b in zip(sparsity, bits))
    return Plan(base_model=BaseModel(path="/models/x", sha256=SHA), layers=layers, metric="wanda",
                kv_quant=KVQuantScheme(group_size=group), **kw)


def test_layer_sparsity_averages_the_pruned_linears():
    assert layer_sparsity(_plan()) == pytest.approx([0.5, 0.0, 0.3, 0.0])


def test_kv_bytes_per_token_by_hand():
    geometry = KVGeometry(num_kv_heads=2, head_dim=64)
    # per token and KV head, group 32 (two fp16 scale + zero pairs = 8 bytes): 16 bits 128 bytes,
    # 8 bits 64 + 8, 6 bits 48 + 8, 4 bits 32 + 8; times K and V, times 2 heads
    assert kv_bytes_per_token(_plan(), geometry) == 4 * (128 + 72 + 56 + 40)
    assert kv_bytes_per_token(_plan(), geometry, bits=16) == 4 * 128 * 4
    summary = capacity_summary(_plan(bits=(6, 6, 6, 6)), geometry)
    assert "**KV cache capacity: 2.29x**" in summary and "896 bytes per token against 2,048" in summary


def test_capacity_without_geometry_says_so():
    assert capacity_summary(_plan(), None).startswith("Mean KV bits: 8.5 (the base model")


def test_kv_geometry_of_shapes_llava_and_of_a_bad_config(tmp_path):
    assert kv_geometry(resolve_model("shapes-llava")) == KVGeometry(num_kv_heads=2, head_dim=32)
    (tmp_path / "config.json").write_text(json.dumps({"text_config": {"hidden_size": 256}}))
    with pytest.raises(ValueError, match=r"config.json: no num_key_value_heads / head_dim"):
        kv_geometry(tmp_path)


def test_profile_text_and_figures(tmp_path):
    plan = _plan(evaluation={"objective": "wikitext2 ppl", "dense": 88.86, "pruned": 90.73})
    text = profile_markdown(plan, tmp_path)
    assert "wanda / uniform / unstructured, 4 layers, mean layer sparsity 0.200" in text
    assert "dense 88.860, compressed 90.730" in text
    sparsity, bits = sparsity_figure(plan), kv_bits_figure(plan)
    assert [round(p.get_height(), 3) for p in sparsity.axes[0].patches] == [0.5, 0.0, 0.3, 0.0]
    assert [p.get_height() for p in bits.axes[0].patches] == [16, 8, 6, 4]
