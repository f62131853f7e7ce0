import pytest

from demo.plots import capacity_summary, kv_bits_figure, profile_markdown, sparsity_figure
from vllm_adaspkv.format import BaseCheckpoint, KVQuantScheme, LayerPlan, ModelGeometry, Plan

SHA = "0" * 64


def _plan(bits=(16, 8, 6, 4), sparsity=({"mlp.up_proj": 0.4, "mlp.down_proj": 0.6}, {}, {"self_attn.q_proj": 0.3}, {}),
          group=32, **kw):
    layers = tuple(LayerPlan(sparsity=dict(s), kv_bits=b) for s, b in zip(sparsity, bits))
    return Plan(base_model=BaseCheckpoint(path="/models/x", sha256=SHA), layers=layers, metric="wanda",
                kv_quant=KVQuantScheme(group_size=group), **kw)


# hidden 64, one query head and 2 KV heads of 64, MLP 256: q and o hold 64 x 64 weights, k and v 128 x 64,
# gate, up and down 256 x 64: 73728 weights a layer
GEOMETRY = ModelGeometry(architectures=("LlavaForConditionalGeneration",), num_layers=4, hidden_size=64,
                         intermediate_size=256, num_heads=1, num_kv_heads=2, head_dim=64, max_position_embeddings=64)


def test_layer_sparsity_weighs_each_linear_by_its_size():
    sizes = GEOMETRY.linear_sizes()
    assert sizes["mlp.up_proj"] == 16384 and sizes["self_attn.q_proj"] == 4096 and sizes["self_attn.k_proj"] == 8192
    total = sum(sizes.values())
    assert total == 73728
    # layer 0: 0.4 x 16384 (up) + 0.6 x 16384 (down) zeros; layer 2: 0.3 x 4096 (q)
    assert _plan().layer_sparsity(sizes) == pytest.approx([16384 / total, 0.0, 0.3 * 4096 / total, 0.0])


def test_kv_capacity_by_hand():
    # per token and KV head, group 32 (two fp16 scale + zero pairs = 8 bytes): 16 bits 128 bytes,
    # 6 bits 48 + 8; times K and V, times 2 heads: 4 x 56 x 4 layers = 896 against 4 x 128 x 4 = 2048
    summary = capacity_summary(_plan(bits=(6, 6, 6, 6)), GEOMETRY)
    assert "**KV cache capacity: 2.29x**" in summary and "896 bytes per token against 2,048" in summary


def test_capacity_without_geometry_says_so():
    assert capacity_summary(_plan(), None).startswith("Mean KV bits: 8.5 (the base model")


def test_profile_text_and_figures(tmp_path):
    plan = _plan(evaluation={"objective": "wikitext2 ppl", "dense": 88.86, "pruned": 90.73, "mean_sparsity": 0.1})
    text = profile_markdown(plan, tmp_path, GEOMETRY)
    total = sum(GEOMETRY.linear_sizes().values())
    mean = (16384 + 0.3 * 4096) / total / 4
    assert f"wanda / uniform / unstructured, 4 layers, mean sparsity {mean:.3f}." in text
    assert "dense 88.860, compressed 90.730" in text
    sparsity, bits = sparsity_figure(plan, GEOMETRY), kv_bits_figure(plan)
    assert [p.get_height() for p in sparsity.axes[0].patches] == pytest.approx(plan.layer_sparsity(GEOMETRY.linear_sizes()))
    assert [p.get_height() for p in bits.axes[0].patches] == [16, 8, 6, 4]


def test_without_the_models_geometry_the_profile_shows_each_linear_only(tmp_path):
    plan = _plan()
    assert profile_markdown(plan, tmp_path, None).splitlines()[0].endswith("4 layers.")
    figure = sparsity_figure(plan, None)
    assert not figure.axes[0].patches  # no layer bars
    assert sorted(y for line in figure.axes[0].lines for y in line.get_ydata()) == [0.3, 0.4, 0.6]
