import json

import numpy as np
import pytest
import torch

from vllm_adaspkv.artifact import (LINEARS, MASK_FILE, PLAN_FILE, ArtifactError, BaseModel, KVQuantScheme,
                                   LayerPlan, Plan, check_mask_shapes, check_num_layers, mask_key, model_sha256,
                                   pack_mask, read_masks, read_plan, unpack_mask, write_artifact)

SHA = "0" * 64


def plan(layers=2, sparsity=0.5, **kwargs) -> Plan:
    return Plan(base_model=BaseModel("base", SHA), metric="wanda",
                layers=tuple(LayerPlan(dict.fromkeys(LINEARS, sparsity)) for _ in range(layers)), **kwargs)


def half_masks(layers=2, shape=(4, 6)) -> dict[str, torch.Tensor]:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.view(-1)[::2] = True  # exactly half kept
    return {mask_key(i, n): mask for i in range(layers) for n in LINEARS}


def test_pack_by_hand():
    mask = torch.tensor([[True, False, False, False, False, False, False, True]])
    assert pack_mask(mask).tolist() == [0b10000001]  # big bit order: first weight = highest bit


@pytest.mark.parametrize("shape", [(1,), (3, 5), (7, 9), (16, 8), (2, 3, 11)])
def test_pack_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.numel() == -(-mask.numel() // 8)
    assert torch.equal(unpack_mask(packed, shape), mask)


def test_write_read_round_trip(tmp_path):
    masks = half_masks()
    written = plan(kv_quant=KVQuantScheme(group_size=64), provenance={"seed": 3})
    write_artifact(tmp_path, written, masks)
    assert read_plan(tmp_path) == written
    read = read_masks(tmp_path, written)
    assert read.keys() == masks.keys() and all(torch.equal(read[k], masks[k]) for k in masks)
    assert sorted(p.name for p in tmp_path.iterdir()) == [PLAN_FILE, MASK_FILE]  # no temporary left


def test_mean_sparsity_and_bits_by_hand():
    p = Plan(base_model=BaseModel("b", SHA), metric="wanda",
             layers=(LayerPlan({"self_attn.q_proj": 0.2, "mlp.up_proj": 0.6}, kv_bits=8), LayerPlan({}, kv_bits=4)))
    sizes = dict.fromkeys(LINEARS, 0) | {"self_attn.q_proj": 100, "mlp.up_proj": 300}
    # zeroed: 20 + 180 in layer 0, none in layer 1, of 800 weights
    assert p.mean_sparsity(sizes) == pytest.approx(200 / 800)
    assert p.mean_kv_bits() == 6


@pytest.mark.parametrize(("change", "message"), [
    ({"format_version": 2}, r"adaspkv.json: format_version = 2: this release reads 1"),
    ({"layers": []}, r"layers: empty"),
    ({"metric": "foo"}, r"metric = 'foo': allowed magnitude, wanda, lognorm, sparsegpt, none"),
    ({"structure": "4:2"}, r"structure = '4:2': allowed 'unstructured' or 'N:M'"),
    ({"base_model": {"path": "b", "sha256": "xyz"}}, r"base_model.sha256 = 'xyz': must be 64"),
    ({"kv_quant": {"group_size": 0}}, r"kv_quant.group_size = 0"),
    ({"kv_quant": {"scale_dtype": "int8"}}, r"kv_quant.scale_dtype = 'int8': allowed float16"),
])
def test_bad_plan_fields(tmp_path, change, message):
    data = plan().to_json() | change
    (tmp_path / PLAN_FILE).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=message):
        read_plan(tmp_path)


@pytest.mark.parametrize(("layer", "message"), [
    ({"sparsity": {"self_attn.q_proj": 1.0}}, r"layers\[1\].sparsity.self_attn.q_proj = 1.0: must be in \[0, 1\)"),
    ({"sparsity": {"mlp.fc1": 0.5}}, r"layers\[1\].sparsity: unknown linear 'mlp.fc1'"),
    ({"sparsity": {}, "kv_bits": 5}, r"layers\[1\].kv_bits = 5: allowed 16, 8, 6, 4, 2"),
    ({"kv_bits": 8}, r"layers\[1\]: needs a 'sparsity' object"),
])
def test_bad_layer_fields(tmp_path, layer, message):
    data = plan().to_json()
    data["layers"][1] = layer
    (tmp_path / PLAN_FILE).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=message):
        read_plan(tmp_path)


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ArtifactError, match=r"not an adaspkv artifact \(no adaspkv.json\)"):
        read_plan(tmp_path)
    (tmp_path / PLAN_FILE).write_text("{")
    with pytest.raises(ArtifactError, match=r"adaspkv.json: invalid JSON"):
        read_plan(tmp_path)


def test_masks_must_match_the_plan(tmp_path):
    write_artifact(tmp_path, plan(sparsity=0.25), half_masks())
    with pytest.raises(ArtifactError, match=r"has sparsity 0.5000; adaspkv.json says layers\[0\].sparsity"):
        read_masks(tmp_path, plan(sparsity=0.25))
    with pytest.raises(ArtifactError, match=r"is for layer 1; the plan has 1 layers"):
        read_masks(tmp_path, plan(layers=1, sparsity=0.5))
    with pytest.raises(ArtifactError, match=r"mask language_model.model.layers.0.self_attn.q_proj.weight has "
                                            r"shape \(4, 6\), the weight \(6, 4\)"):
        check_mask_shapes(half_masks(), {k: (6, 4) for k in half_masks()}, "art")
    with pytest.raises(ArtifactError, match=r"layers has 2 entries; the model has 4 decoder layers"):
        check_num_layers(plan(), 4, "art")


def test_model_hash_follows_the_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(np.arange(10, dtype=np.uint8).tobytes())
    before = model_sha256(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(np.arange(1, 11, dtype=np.uint8).tobytes())
    assert model_sha256(tmp_path) != before and len(before) == 64
