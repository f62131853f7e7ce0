"""The front end's checks of an artifact, the start-up table and the load-time zero count (no engine)."""

import json
import shutil

import pytest
import torch

from tests.vllm_adaspkv.artifacts import linear_weights, make_artifact
from vllm_adaspkv.engine.serving_plan import kv_formats, open_artifact, startup_table
from vllm_adaspkv.format import (
    MASK_FILE,
    PLAN_FILE,
    ArtifactError,
    Plan,
    ZeroCount,
    canonical_key,
    is_artifact,
    mask_key,
    read_plan,
)
from vllm_adaspkv.kv.paged import KVFormat


@pytest.fixture
def artifact(tmp_path, tiny_llava_dir):
    return make_artifact(tmp_path / "art", tiny_llava_dir, [8, 4], sparsity=0.5)


def rewrite_plan(art, **changes):
    data = json.loads((art / PLAN_FILE).read_text())
    for key, value in changes.items():
        target = data
        *path, last = key.split(".")
        for part in path:
            target = target[int(part)] if part.isdigit() else target[part]
        target[last] = value
    (art / PLAN_FILE).write_text(json.dumps(data))


def test_open_artifact_serves_the_base_model(artifact, tiny_llava_dir):
    served = open_artifact(artifact)
    assert is_artifact(artifact) and not is_artifact(tiny_llava_dir)
    assert served.model_dir == tiny_llava_dir.resolve()
    assert (served.geometry.head_dim, served.geometry.num_kv_heads, served.geometry.num_layers) == (32, 2, 2)
    assert kv_formats(served) == [KVFormat(8, 32, 32), KVFormat(4, 32, 32)]


def test_sixteen_bit_layers_keep_vllms_cache(tmp_path, tiny_llava_dir):
    served = open_artifact(make_artifact(tmp_path / "a", tiny_llava_dir, [16, 2]))
    assert kv_formats(served) == [None, KVFormat(2, 32, 32)]


def test_startup_table_by_hand(tmp_path, tiny_llava_dir):
    served = open_artifact(make_artifact(tmp_path / "a", tiny_llava_dir, [16, 4]))
    table = startup_table(served, dense_element_bytes=2, budget_bytes=1 << 20, block_size=16)
    # 16-bit layer: 2 KV heads x (K + V) x 32 x 2 bytes = 256; 4-bit: 2 x 2 x (16 codes + 4 scale bytes) = 80
    assert "    0      16         256    0.000" in table
    assert "    1       4          80    0.000" in table
    assert "KV bytes per token: 336 (16-bit cache: 512)" in table and "1.52x" in table
    # 2^20 / (16 x 336) = 195 whole blocks of 16 tokens; 2^20 / (16 x 512) = 128 blocks
    assert "KV budget 1048576 bytes: 3120 tokens (16-bit cache: 2048)" in table
    assert "one fp16 scale + zero per 32 of 32 values of a head\n" in table


def test_startup_table_names_the_group_and_the_key_rotation(tmp_path, tiny_llava_dir):
    art = make_artifact(tmp_path / "a", tiny_llava_dir, [16, 4])
    rewrite_plan(art, **{"kv_quant.group_size": 16, "kv_quant.key_rotation": "hadamard"})
    table = startup_table(open_artifact(art), dense_element_bytes=2, budget_bytes=None, block_size=16)
    # 4-bit at group 16: 2 KV heads x (K + V) x (16 code bytes + 2 groups x 4 scale bytes) = 96
    assert "    1       4          96    0.000" in table
    assert "one fp16 scale + zero per 16 of 32 values of a head, keys Hadamard-rotated" in table


def test_zero_count_checks_every_linear_against_the_plan(artifact):
    plan = read_plan(artifact)
    weights = linear_weights(open_artifact(artifact).model_dir)
    key = mask_key(0, "self_attn.q_proj")
    count = ZeroCount(plan)
    count.observe(key, weights[key])  # not masked: no zeros, the plan says 0.5
    count.observe("language_model.model.layers.0.input_layernorm.weight", torch.zeros(4))  # not a linear
    with pytest.raises(ArtifactError, match=r"layer 0 self_attn.q_proj was loaded with sparsity 0.0000; "
                                            r"adaspkv.json says 0.5000"):
        count.check("adaspkv.json")
    half = weights[key].clone()
    half.view(-1)[: half.numel() // 2] = 0
    count.observe(key, half)
    count.check("adaspkv.json")


def test_canonical_key_maps_the_new_llava_hf_layout():
    assert canonical_key("model.language_model.layers.3.mlp.up_proj.weight") == mask_key(3, "mlp.up_proj")
    assert canonical_key(mask_key(3, "mlp.up_proj")) == mask_key(3, "mlp.up_proj")


def test_missing_plan_file(tmp_path):
    with pytest.raises(ArtifactError, match=r"not an adaspkv artifact \(no adaspkv.json\)"):
        open_artifact(tmp_path)


def test_missing_masks_file(artifact):
    (artifact / MASK_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"no masks.safetensors"):
        open_artifact(artifact)


def test_wrong_layer_count(tmp_path, tiny_llava_dir):
    art = make_artifact(tmp_path / "a", tiny_llava_dir, [8, 8])
    data = json.loads((art / PLAN_FILE).read_text())
    data["layers"].append(data["layers"][0])
    (art / PLAN_FILE).write_text(json.dumps(data))
    with pytest.raises(ArtifactError, match=r"layers has 3 entries; the model has 2 decoder layers"):
        open_artifact(art)


def test_bits_not_allowed(artifact):
    rewrite_plan(artifact, **{"layers.1.kv_bits": 3})
    with pytest.raises(ArtifactError, match=r"layers\[1\]\.kv_bits = 3: allowed 16, 8, 6, 4 or 2$"):
        open_artifact(artifact)


def test_masks_of_the_wrong_shape(tmp_path, tiny_llava_dir):
    other = make_artifact(tmp_path / "other", tiny_llava_dir, [8, 4], sparsity=0.5)
    masks_file = other / MASK_FILE
    # a mask file whose q_proj mask is transposed, consistent with itself and the plan
    from vllm_adaspkv.format import read_masks, write_artifact
    masks = read_masks(other)
    key = mask_key(0, "self_attn.q_proj")
    masks[key] = masks[key].t().contiguous()
    write_artifact(other, read_plan(other), masks)
    assert masks_file.is_file()
    with pytest.raises(ArtifactError, match=rf"mask {key} has shape \(64, 128\), the weight \(128, 64\)"):
        open_artifact(other)


def test_packed_weights_are_checked_before_serving(tmp_path, tiny_llava_dir):
    art = make_artifact(tmp_path / "p", tiny_llava_dir, [8, 4], sparsity=0.5, weight_format="packed",
                        packed_weights=True)
    served = open_artifact(art)
    assert served.plan.packed_weights and not served.has_masks  # the packed weights replace, nothing is masked
    from vllm_adaspkv.format import read_masks, write_artifact
    key = mask_key(0, "self_attn.q_proj")
    masks = read_masks(make_artifact(tmp_path / "m", tiny_llava_dir, [8, 4], sparsity=0.5))
    base = linear_weights(tiny_llava_dir)
    masks[key] = masks[key].t().contiguous()  # consistent with itself and the plan, not with the model
    write_artifact(art, served.plan, masks, weight=lambda k: (base[k].t() if k == key else base[k]) * masks[k],
                   dtype=base[key].dtype)
    with pytest.raises(ArtifactError, match=rf"packed_weights.safetensors: packed weight {key} has shape \(64, 128\), "
                                            r"the weight \(128, 64\)"):
        open_artifact(art)
    (art / "packed_weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match=r"no packed_weights.safetensors, but the plan says packed_weights = true"):
        open_artifact(art)


def test_other_base_model(tmp_path, tiny_llava_dir, artifact):
    base = tmp_path / "base-copy"
    shutil.copytree(tiny_llava_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-3
    (base / "config.json").write_text(json.dumps(config))
    rewrite_plan(artifact, **{"base_model.path": str(base)})
    with pytest.raises(ArtifactError, match=r"this artifact was made from another model"):
        open_artifact(artifact)


def test_base_model_gone(artifact, tmp_path):
    rewrite_plan(artifact, **{"base_model.path": str(tmp_path / "nowhere")})
    with pytest.raises(ArtifactError, match=r"the base model \(sha256 [0-9a-f]{12}...\) is not at .*nowhere \(base_model.path = .*, no config.json "
                                      r"there\); put it there, set ADASPKV_BASE_MODEL to its directory, or export with "
                                      r"--full-checkpoint"):
        open_artifact(artifact)


def test_unsupported_architecture(tmp_path, tiny_llava_dir):
    base = tmp_path / "base"
    shutil.copytree(tiny_llava_dir, base)
    config = json.loads((base / "config.json").read_text())
    config["architectures"] = ["Qwen2VLForConditionalGeneration"]
    (base / "config.json").write_text(json.dumps(config))
    art = make_artifact(tmp_path / "a", base, [8, 8])
    with pytest.raises(ArtifactError, match=r"architectures = \['Qwen2VLForConditionalGeneration'\]; the adaspkv "
                                            r"plugin serves LlavaForConditionalGeneration only"):
        open_artifact(art)


@pytest.mark.parametrize("change,message", [
    ({"kv_quant.symmetric": True}, r"symmetric=True, scale_dtype='float16': the serving quantizer stores "
                                   r"asymmetric codes with float16 scales only"),
    ({"kv_quant.group_size": 24}, r"cannot be served for head_dim 32: KV group size 24 must divide head_dim 32"),
])
def test_schemes_the_backend_cannot_serve(artifact, change, message):
    rewrite_plan(artifact, **change)
    with pytest.raises(ArtifactError, match=message):
        open_artifact(artifact)


def test_plan_round_trip_is_unchanged_by_opening(artifact):
    before = (artifact / PLAN_FILE).read_text()
    open_artifact(artifact)
    assert (artifact / PLAN_FILE).read_text() == before
    assert isinstance(read_plan(artifact), Plan)


@pytest.mark.parametrize("tokenizer", [None, "artifact", "other"])
def test_routing_serves_the_base_model_and_its_tokenizer(artifact, tiny_llava_dir, tmp_path, tokenizer):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_adaspkv.engine.routing import route_artifact

    given = {"artifact": str(artifact), "other": str(tmp_path / "tok")}.get(tokenizer)
    args = EngineArgs(model=str(artifact), tokenizer=given)
    route_artifact(args)
    assert args.model == str(tiny_llava_dir.resolve())
    assert args.served_model_name == str(artifact)
    assert args.hf_overrides["architectures"] == ["AdaspkvLlavaForConditionalGeneration"]
    # --tokenizer ART_DIR (what `vllm bench` sets by default) means the base model's tokenizer
    assert args.tokenizer == (given if tokenizer == "other" else str(tiny_llava_dir.resolve()))


def _prune(model_dir, out, cache, *extra):
    from offline_search.cli.main import main

    assert main(["prune", "--model", str(model_dir), "--out", str(out), "--cache-dir", str(cache), "--metric",
                 "magnitude", "--sparsity", "0.5", "--calibration-windows", "1", "--calibration-samples", "1",
                 "--objective-windows", "1", "--objective-samples", "1", *extra]) == 0
    return out


def test_a_moved_artifact_finds_its_moved_base_model(tmp_path, tiny_llava_dir):
    """Prune a copy of a base model, move the base and the artifact to another folder: still served."""
    shutil.copytree(tiny_llava_dir, tmp_path / "old" / "base")
    _prune(tmp_path / "old" / "base", tmp_path / "old" / "art", tmp_path / "cache")
    assert read_plan(tmp_path / "old" / "art").base_model.path == "../base"
    shutil.move(tmp_path / "old", tmp_path / "new")
    served = open_artifact(tmp_path / "new" / "art")
    assert served.model_dir == (tmp_path / "new" / "base").resolve() and served.has_masks


def test_the_base_model_can_be_pointed_at_and_is_checked_by_hash(tmp_path, tiny_llava_dir, monkeypatch):
    from vllm.engine.arg_utils import EngineArgs

    from vllm_adaspkv.engine.routing import route_artifact
    from vllm_adaspkv.engine.serving_plan import BASE_MODEL_ENV
    from vllm_adaspkv.engine.settings import served_model_dir

    shutil.copytree(tiny_llava_dir, tmp_path / "base")
    art = _prune(tmp_path / "base", tmp_path / "art", tmp_path / "cache")
    shutil.move(tmp_path / "base", tmp_path / "elsewhere")
    with pytest.raises(ArtifactError, match=r"is not at .*/base \(base_model.path = '../base'.*set ADASPKV_BASE_MODEL"):
        route_artifact(EngineArgs(model=str(art)))
    monkeypatch.setenv(BASE_MODEL_ENV, str(tmp_path / "elsewhere"))
    args = EngineArgs(model=str(art))
    route_artifact(args)
    assert args.model == str((tmp_path / "elsewhere").resolve())
    assert served_model_dir(args.additional_config) == args.model  # what the workers load
    other = tmp_path / "other"
    shutil.copytree(tiny_llava_dir, other)
    config = json.loads((other / "config.json").read_text())
    config["text_config"]["rms_norm_eps"] = 1e-3
    (other / "config.json").write_text(json.dumps(config))
    monkeypatch.setenv(BASE_MODEL_ENV, str(other))
    with pytest.raises(ArtifactError, match="this artifact was made from another model"):
        route_artifact(EngineArgs(model=str(art)))


def test_a_full_checkpoint_is_checked_by_its_hash(tmp_path, tiny_llava_dir):
    from safetensors.torch import load_file, save_file

    art = _prune(tiny_llava_dir, tmp_path / "art", tmp_path / "cache", "--full-checkpoint")
    plan = read_plan(art)
    assert plan.full_checkpoint and plan.checkpoint_sha256
    assert open_artifact(art).model_dir == art.resolve()
    weights = load_file(art / "model.safetensors")
    key = next(k for k in weights if k.endswith("mlp.up_proj.weight"))
    weights[key] = weights[key] * 2  # same zeros, other weights
    save_file(weights, art / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ArtifactError, match=r"checkpoint_sha256 [0-9a-f]{12}... does not match the checkpoint in "
                                            r".*art \(hash [0-9a-f]{12}...\): its files were changed after export"):
        open_artifact(art)


def test_fp8_layers_in_the_plan_and_the_startup_table(tmp_path, tiny_llava_dir):
    art = make_artifact(tmp_path / "a", tiny_llava_dir, [8, 4])
    rewrite_plan(art, **{"kv_quant.eight_bit": "fp8_e4m3"})
    served = open_artifact(art)
    assert kv_formats(served) == [KVFormat(8, 32, 32, fp8=True), KVFormat(4, 32, 32)]
    table = startup_table(served, dense_element_bytes=2, budget_bytes=None, block_size=16)
    # fp8: 2 KV heads x (K + V) x 32 one-byte values = 128 (int8 codes at group 32: 2 x 2 x (32 + 4) = 144)
    assert "    0     fp8         128    0.000" in table and "    1       4          80    0.000" in table
    assert "8 bits (fp8) as float8 e4m3 values, no scales" in table


def test_an_unknown_eight_bit_format_is_refused_by_name(tmp_path, tiny_llava_dir):
    art = make_artifact(tmp_path / "a", tiny_llava_dir, [8, 4])
    rewrite_plan(art, **{"kv_quant.eight_bit": "fp8_e5m2"})
    with pytest.raises(ArtifactError, match=r"adaspkv.json: kv_quant.eight_bit = 'fp8_e5m2': allowed 'int8' or 'fp8_e4m3'$"):
        open_artifact(art)
