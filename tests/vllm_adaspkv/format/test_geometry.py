"""Model geometry through transformers' AutoConfig, on the verbatim config.json of llava-1.5-7b-hf."""

import json
import shutil

import pytest

from tests.conftest import REPO
from vllm_adaspkv.engine.serving_plan import describe_artifact, kv_formats, startup_table
from vllm_adaspkv.format import (
    ArtifactError,
    BaseCheckpoint,
    LayerPlan,
    ModelGeometry,
    Plan,
    read_geometry,
    write_artifact,
)
from vllm_adaspkv.kv.paged import KVFormat

LLAVA_7B = REPO / "tests" / "fixtures" / "llava-1.5-7b-hf"


def test_the_published_7b_config_has_llamas_default_geometry():
    # the file gives no layer count, heads, hidden or MLP size: transformers' LlamaConfig defaults fill them
    text = json.loads((LLAVA_7B / "config.json").read_text())["text_config"]
    assert not {"num_hidden_layers", "num_attention_heads", "hidden_size", "intermediate_size"} & text.keys()
    assert read_geometry(LLAVA_7B) == ModelGeometry(
        architectures=("LlavaForConditionalGeneration",), num_layers=32, hidden_size=4096, intermediate_size=11008,
        num_heads=32, num_kv_heads=32, head_dim=128, max_position_embeddings=4096)


def test_linear_shapes_by_hand():
    shapes = read_geometry(LLAVA_7B).linear_shapes()
    assert shapes["self_attn.q_proj"] == shapes["self_attn.o_proj"] == (4096, 4096)
    assert shapes["mlp.gate_proj"] == shapes["mlp.up_proj"] == (11008, 4096) and shapes["mlp.down_proj"] == (4096, 11008)
    # 4 x 4096^2 + 3 x 4096 x 11008 per decoder layer, 6.48B in 32 layers
    assert sum(read_geometry(LLAVA_7B).linear_sizes().values()) == 4 * 4096**2 + 3 * 4096 * 11008


def test_grouped_query_geometry_of_the_bundled_model():
    geometry = read_geometry(REPO / "offline_search" / "data" / "models" / "shapes-llava")
    assert (geometry.num_layers, geometry.num_heads, geometry.num_kv_heads, geometry.head_dim) == (4, 4, 2, 32)
    assert geometry.linear_shapes()["self_attn.k_proj"] == (64, 64)


def test_the_plugin_sees_32_layers_of_32_kv_heads_of_128(tmp_path):
    base = tmp_path / "llava-1.5-7b-hf"
    shutil.copytree(LLAVA_7B, base)
    plan = Plan(base_model=BaseCheckpoint(path=str(base), sha256="0" * 64), metric="none",
                layers=tuple(LayerPlan(sparsity={}, kv_bits=4 if i % 2 else 8) for i in range(32)))
    served = describe_artifact(write_artifact(tmp_path / "art", plan))
    assert served.geometry.num_layers == 32 and kv_formats(served)[:2] == [KVFormat(8, 128, 32), KVFormat(4, 128, 32)]
    table = startup_table(served, dense_element_bytes=2, budget_bytes=None, block_size=16)
    # per token and layer: 32 KV heads x (K + V) x (128 codes + 4 groups x 4 scale bytes) at 8 bits: 9216;
    # at 4 bits 32 x 2 x (64 + 16) = 5120; a 16-bit layer 32 x 2 x 256 = 16384
    assert "    0       8        9216" in table and "    1       4        5120" in table
    assert f"KV bytes per token: {16 * (9216 + 5120)} (16-bit cache: {32 * 16384})" in table


def test_a_config_transformers_cannot_read_is_refused_in_one_line(tmp_path):
    with pytest.raises(ArtifactError, match=r"no config.json; not a checkpoint directory"):
        read_geometry(tmp_path)
    (tmp_path / "config.json").write_text('{"model_type": "no-such-model"}')
    with pytest.raises(ArtifactError, match=r"config.json: transformers cannot read it \(ValueError: "):
        read_geometry(tmp_path)
