import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

import vllm_adaspkv.format.artifact as art
from vllm_adaspkv.errors import ConfigError
from vllm_adaspkv.format import (
    LINEARS,
    MASK_FILE,
    PLAN_FILE,
    ArtifactError,
    BaseCheckpoint,
    KVQuantScheme,
    LayerPlan,
    Plan,
    check_base_model,
    check_mask_shapes,
    check_num_layers,
    mask_key,
    model_sha256,
    pack_mask,
    read_masks,
    read_plan,
    unpack_mask,
    write_artifact,
)

SHA = "0" * 64


def plan(layers=2, sparsity=0.5, **kwargs) -> Plan:
    return Plan(base_model=BaseCheckpoint(path="base", sha256=SHA), metric="wanda",
                layers=tuple(LayerPlan(sparsity=dict.fromkeys(LINEARS, sparsity)) for _ in range(layers)), **kwargs)


def half_masks(layers=2, shape=(4, 6)) -> dict[str, torch.Tensor]:
    mask = torch.zeros(shape, dtype=torch.bool)
    mask.view(-1)[::2] = True  # exactly half kept
    return {mask_key(i, n): mask for i in range(layers) for n in LINEARS}


def write_plan_json(folder, data) -> None:
    (folder / PLAN_FILE).write_text(json.dumps(data))


# --- bit packing ---------------------------------------------------------------------------------------------

def test_pack_by_hand():
    # big bit order: the first weight is the highest bit of the byte
    assert pack_mask(torch.tensor([[True, False, False, False, False, False, False, True]])).tolist() == [0b10000001]
    assert pack_mask(torch.tensor([True] + [False] * 7)).tolist() == [128]
    # 10 weights: the last byte holds weights 8 and 9 in its two high bits, zero padding after
    assert pack_mask(torch.tensor([False] * 8 + [True, True])).tolist() == [0, 0b11000000]


@pytest.mark.parametrize("shape", [(1,), (3, 5), (7, 9), (16, 8), (2, 3, 11), (13, 64)])
def test_pack_round_trip(shape):
    mask = torch.rand(shape, generator=torch.Generator().manual_seed(0)) > 0.5
    packed = pack_mask(mask)
    assert packed.dtype == torch.uint8 and packed.shape == (-(-mask.numel() // 8),)
    assert torch.equal(unpack_mask(packed, shape), mask)


def test_pack_rejects_wrong_inputs():
    with pytest.raises(TypeError, match="must be bool, not torch.float32"):
        pack_mask(torch.ones(8))
    with pytest.raises(ValueError, match=r"1 torch.uint8 values cannot hold a mask of shape \(3, 5\) \(2 uint8"):
        unpack_mask(torch.zeros(1, dtype=torch.uint8), (3, 5))


# --- writing and reading ---------------------------------------------------------------------------------------

def test_write_read_round_trip(tmp_path):
    masks = half_masks(shape=(4, 8))  # every other weight kept: also 2 of every 4
    written = plan(structure="2:4", allocation="owl", kv_quant=KVQuantScheme(group_size=64, symmetric=True),
                   full_checkpoint=True, checkpoint_sha256="1" * 64, provenance={"seed": 3, "trial": 7},
                   evaluation={"objective": "ppl", "dense": 12.0, "pruned": 12.5, "mean_sparsity": 0.5})
    assert write_artifact(tmp_path / "art", written, masks) == tmp_path / "art"  # creates the folder
    assert read_plan(tmp_path / "art") == written
    read = read_masks(tmp_path / "art", written)
    assert read.keys() == masks.keys() and all(torch.equal(read[k], masks[k]) for k in masks)
    assert read_masks(tmp_path / "art").keys() == masks.keys()  # without a plan: no cross-check
    assert sorted(p.name for p in (tmp_path / "art").iterdir()) == [PLAN_FILE, MASK_FILE]  # no temporary left
    text = (tmp_path / "art" / PLAN_FILE).read_text()
    assert text.startswith('{\n  "format_version": 1,\n  "base_model": {')  # indent 2, version first


def test_json_lists_linears_in_canonical_order_and_layers_in_order(tmp_path):
    p = Plan(base_model=BaseCheckpoint(path="b", sha256=SHA), metric="none",
             layers=[LayerPlan(sparsity={"mlp.down_proj": 0.1, "self_attn.q_proj": 0.2}, kv_bits=8), LayerPlan(sparsity={}, kv_bits=4)])
    assert isinstance(p.layers, tuple)  # a list is turned into a tuple, so the round trip compares equal
    data = p.to_json()
    assert list(data["layers"][0]["sparsity"]) == ["self_attn.q_proj", "mlp.down_proj"]
    assert [layer["kv_bits"] for layer in data["layers"]] == [8, 4]
    write_artifact(tmp_path, p)
    assert read_plan(tmp_path) == p


def test_plan_without_masks_removes_stale_masks(tmp_path):
    write_artifact(tmp_path, plan(), half_masks())
    write_artifact(tmp_path, plan(sparsity=0.0))  # a KV-only plan into the same folder
    assert not (tmp_path / MASK_FILE).exists()


def test_a_crash_while_writing_leaves_no_artifact_and_no_half_file(tmp_path, monkeypatch):
    """The old plan goes first, the new one comes last: a crash in between leaves a folder that is no
    artifact (not an old plan over new files), and the file being written is never half replaced."""
    write_artifact(tmp_path, plan(), half_masks())
    before = (tmp_path / MASK_FILE).read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"half a fi")
        raise OSError("disk full")

    monkeypatch.setattr(art, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        write_artifact(tmp_path, plan(), half_masks())
    assert (tmp_path / MASK_FILE).read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [MASK_FILE]  # the temporary is gone, and the plan
    with pytest.raises(ArtifactError, match="not an adaspkv artifact"):
        read_plan(tmp_path)


# --- derived values ----------------------------------------------------------------------------------------------

def test_mean_sparsity_and_bits_by_hand():
    one = Plan(base_model=BaseCheckpoint(path="b", sha256=SHA), metric="wanda",
               layers=(LayerPlan(sparsity={"self_attn.q_proj": 0.2, "mlp.up_proj": 0.6}),))
    # 0.2 * 100 + 0.6 * 300 = 200 zeroed of 400
    assert one.mean_sparsity({"self_attn.q_proj": 100, "mlp.up_proj": 300}) == pytest.approx(0.5)
    two = Plan(base_model=BaseCheckpoint(path="b", sha256=SHA), metric="wanda",
               layers=(LayerPlan(sparsity={"self_attn.q_proj": 0.2, "mlp.up_proj": 0.6}, kv_bits=8), LayerPlan(sparsity={}, kv_bits=4)))
    sizes = dict.fromkeys(LINEARS, 0) | {"self_attn.q_proj": 100, "mlp.up_proj": 300}
    # 200 zeroed in layer 0, none in layer 1, of 800 weights
    assert two.mean_sparsity(sizes) == pytest.approx(200 / 800)
    assert two.mean_kv_bits() == 6 and two.num_layers() == 2
    with pytest.raises(ValueError, match="the plan prunes mlp.up_proj but params_per_linear has no size for it"):
        one.mean_sparsity({"self_attn.q_proj": 100})


# --- validation of the plan --------------------------------------------------------------------------------------

@pytest.mark.parametrize(("change", "message"), [
    ({"format_version": 2}, r"adaspkv.json: format_version = 2: this release reads 1"),
    ({"format_version": "1"}, r"format_version = '1': this release reads 1"),
    ({"layers": []}, r"adaspkv.json: layers = \[\]: must have one entry per decoder layer"),
    ({"layers": {"0": {}}}, r"layers = \{'0': \{\}\}: must be a list"),
    ({"metric": "foo"}, r"metric = 'foo': allowed 'magnitude', 'wanda', 'lognorm', 'sparsegpt' or 'none'"),
    ({"structure": "4:2"}, r"structure = '4:2': allowed 'unstructured' or 'N:M' with 1 <= N < M"),
    ({"structure": "0:4"}, r"structure = '0:4': allowed"),
    ({"structure": "2-4"}, r"structure = '2-4': allowed"),
    ({"base_model": {"path": "b", "sha256": "xyz"}}, r"base_model.sha256 = 'xyz': must match pattern '\^\[0-9a-f\]\{64\}\$'"),
    ({"base_model": {"path": "b", "sha256": "A" * 64}}, r"base_model.sha256 = 'A{64}': must match pattern"),
    ({"base_model": {"path": "b"}}, r"base_model.sha256: missing"),
    ({"base_model": "b"}, r"base_model = 'b': must be an object"),
    ({"kv_quant": {"group_size": 0}}, r"kv_quant.group_size = 0: must be greater than 0"),
    ({"kv_quant": {"group_size": 32.0}}, r"kv_quant.group_size = 32.0: must be a valid integer"),
    ({"kv_quant": {"scale_dtype": "int8"}}, r"kv_quant.scale_dtype = 'int8': allowed 'float16', 'float32' or 'bfloat16'"),
    ({"kv_quant": {"key_rotation": "x"}}, r"kv_quant.key_rotation = 'x': allowed 'none' or 'hadamard'"),
    ({"kv_quant": {"groupsize": 8}}, r"kv_quant.groupsize: unknown field; allowed group_size, symmetric"),
    ({"metrc": "wanda"}, r"adaspkv.json: metrc: unknown field; allowed format_version, base_model, layers, metric, structure"),
    ({"full_checkpoint": "yes"}, r"full_checkpoint = 'yes': must be true or false"),
    ({"provenance": []}, r"provenance = \[\]: must be an object"),
    # informational fields are checked like the rest
    ({"evaluation": {"objective": "ppl", "dense": 1.0, "pruned": 2.0, "mean_sparsity": 1.5}},
     r"evaluation.mean_sparsity = 1.5: must be less than 1$"),
    ({"evaluation": {"objective": "ppl", "dense": "1.0", "pruned": 2.0, "mean_sparsity": 0.5}},
     r"evaluation.dense = '1.0': must be a valid number$"),
    ({"evaluation": {"ppl": 12.5}}, r"evaluation.objective: missing"),
    ({"provenance": {"trial": -1}}, r"provenance.trial = -1: must be greater than or equal to 0$"),
    ({"provenance": {"trail": 3}}, r"provenance.trail: unknown field; allowed calibration, objective, seed"),
    ({"full_checkpoint": True}, r"full_checkpoint = true needs checkpoint_sha256"),
    ({"checkpoint_sha256": "1" * 64}, r"checkpoint_sha256 is set but full_checkpoint is false"),
])
def test_bad_plan_fields(tmp_path, change, message):
    write_plan_json(tmp_path, plan().to_json() | change)
    with pytest.raises(ArtifactError, match=message):
        read_plan(tmp_path)


@pytest.mark.parametrize("name", ["format_version", "metric", "layers", "base_model"])
def test_missing_plan_fields(tmp_path, name):
    data = plan().to_json()
    del data[name]
    write_plan_json(tmp_path, data)
    expected = "format_version = 'missing'" if name == "format_version" else f"{name}: missing"
    with pytest.raises(ArtifactError, match=rf"adaspkv.json: {expected}"):
        read_plan(tmp_path)


@pytest.mark.parametrize(("layer", "message"), [
    ({"sparsity": {"self_attn.q_proj": 1.0}}, r"layers\[1\].sparsity.self_attn.q_proj = 1.0: must be less than 1$"),
    ({"sparsity": {"self_attn.q_proj": -0.1}}, r"layers\[1\].sparsity.self_attn.q_proj = -0.1: must be greater than or equal to 0$"),
    ({"sparsity": {"self_attn.q_proj": True}}, r"layers\[1\].sparsity.self_attn.q_proj = True: must be a valid number$"),
    ({"sparsity": {"mlp.fc1": 0.5}}, r"layers\[1\].sparsity: unknown key 'mlp.fc1'; allowed 'self_attn.q_proj', 'self_attn.k_proj'"),
    ({"sparsity": {}, "kv_bits": 5}, r"adaspkv.json: layers\[1\].kv_bits = 5: allowed 16, 8, 6, 4 or 2$"),
    ({"sparsity": {}, "kv_bits": 8.0}, r"layers\[1\].kv_bits = 8.0: must be an integer$"),
    ({"kv_bits": 8}, r"layers\[1\].sparsity: missing"),
    ({"sparsity": [0.5]}, r"layers\[1\].sparsity = \[0.5\]: must be an object"),
    ({"sparsity": {}, "bits": 8}, r"layers\[1\].bits: unknown field; allowed sparsity, kv_bits"),
    (3, r"layers\[1\] = 3: must be an object"),
])
def test_bad_layer_fields(tmp_path, layer, message):
    data = plan().to_json()
    data["layers"][1] = layer
    write_plan_json(tmp_path, data)
    with pytest.raises(ArtifactError, match=message):
        read_plan(tmp_path)


def test_constructors_validate_too():
    with pytest.raises(ArtifactError, match=r"^kv_bits = 5: allowed 16, 8, 6, 4 or 2$"):
        LayerPlan(sparsity={}, kv_bits=5)
    with pytest.raises(ArtifactError, match=r"^group_size = -1: must be greater than 0$"):
        KVQuantScheme(group_size=-1)
    with pytest.raises(ArtifactError, match=r"^layers = \(\): must have one entry per decoder layer$"):
        Plan(base_model=BaseCheckpoint(path="b", sha256=SHA), layers=(), metric="wanda")


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ArtifactError, match=r"nowhere: not an adaspkv artifact \(no adaspkv.json\)"):
        read_plan(tmp_path / "nowhere")
    with pytest.raises(ArtifactError, match=r": not an adaspkv artifact \(no adaspkv.json\)"):
        read_plan(tmp_path)
    (tmp_path / PLAN_FILE).write_text("{")
    with pytest.raises(ArtifactError, match=r"adaspkv.json: invalid JSON"):
        read_plan(tmp_path)
    (tmp_path / PLAN_FILE).write_text("[]")
    with pytest.raises(ArtifactError, match=r"adaspkv.json: the top level must be a JSON object"):
        read_plan(tmp_path)
    with pytest.raises(ArtifactError, match=r": no masks.safetensors"):
        read_masks(tmp_path)


# --- masks against the plan and the model -------------------------------------------------------------------------

def test_masks_must_match_the_plan(tmp_path):
    write_artifact(tmp_path, plan(sparsity=0.5), half_masks())
    # which linear is named first depends on the file's key order; the message names that one twice
    with pytest.raises(ArtifactError, match=r"masks.safetensors: language_model.model.layers.0.(\S+).weight has "
                                            r"sparsity 0.5000; adaspkv.json says layers\[0\].sparsity.\1 = 0.2500"):
        read_masks(tmp_path, plan(sparsity=0.25))
    with pytest.raises(ArtifactError, match=r"masks.safetensors: language_model.model.layers.1.\S+.weight is for "
                                            r"layer 1; the plan has 1 layers"):
        read_masks(tmp_path, plan(layers=1, sparsity=0.5))
    with pytest.raises(ArtifactError, match=r"no mask for language_model.model.layers.2.self_attn.q_proj.weight; "
                                            r"adaspkv.json says layers\[2\].sparsity.self_attn.q_proj = 0.5000"):
        read_masks(tmp_path, plan(layers=3, sparsity=0.5))


def test_write_refuses_masks_that_would_not_read_back(tmp_path):
    with pytest.raises(ArtifactError, match=r"has sparsity 0.5000; adaspkv.json says"):
        write_artifact(tmp_path, plan(sparsity=0.25), half_masks())
    bad = {"vision_tower.layers.0.q_proj.weight": torch.ones(2, 2, dtype=torch.bool)}
    with pytest.raises(ArtifactError, match=r"'vision_tower.layers.0.q_proj.weight' is not a language-model linear"):
        write_artifact(tmp_path, plan(sparsity=0.0), bad)
    with pytest.raises(ArtifactError, match=r"self_attn.q_proj.weight: a mask must be bool, not torch.float32"):
        write_artifact(tmp_path, plan(sparsity=0.0), {mask_key(0, "self_attn.q_proj"): torch.ones(2, 2)})
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_malformed_mask_files(tmp_path):
    write_artifact(tmp_path, plan(sparsity=0.0))
    key = mask_key(0, "self_attn.q_proj")
    save_file({key: torch.zeros(1, dtype=torch.uint8)}, str(tmp_path / MASK_FILE))
    with pytest.raises(ArtifactError, match=r"masks.safetensors: metadata 'shapes' missing"):
        read_masks(tmp_path)
    save_file({key: torch.zeros(1, dtype=torch.uint8)}, str(tmp_path / MASK_FILE), metadata={"shapes": "{}"})
    with pytest.raises(ArtifactError, match=rf"masks.safetensors: {key}: no shape in the metadata"):
        read_masks(tmp_path)
    save_file({key: torch.zeros(1, dtype=torch.uint8)}, str(tmp_path / MASK_FILE),
              metadata={"shapes": json.dumps({key: [4, 4]})})
    with pytest.raises(ArtifactError, match=rf"masks.safetensors: {key}: unpack_mask: 1 torch.uint8 values cannot"):
        read_masks(tmp_path)
    (tmp_path / MASK_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError, match=r"masks.safetensors: not a readable safetensors file"):
        read_masks(tmp_path)


def test_checks_against_the_model():
    masks = half_masks()
    check_mask_shapes({k: tuple(m.shape) for k, m in masks.items()}, {k: (4, 6) for k in masks}, "art")
    with pytest.raises(ArtifactError, match=r"art: mask language_model.model.layers.0.self_attn.q_proj.weight has "
                                            r"shape \(4, 6\), the weight \(6, 4\)"):
        check_mask_shapes({k: tuple(m.shape) for k, m in masks.items()}, {k: (6, 4) for k in masks}, "art")
    with pytest.raises(ArtifactError, match=r"art: mask language_model.model.layers.0.self_attn.q_proj.weight has "
                                            r"shape \(4, 6\), but the model has no such weight"):
        check_mask_shapes({k: tuple(m.shape) for k, m in masks.items()}, {}, "art")
    check_num_layers(plan(), 2, "art")
    with pytest.raises(ArtifactError, match=r"art: layers has 2 entries; the model has 4 decoder layers"):
        check_num_layers(plan(), 4, "art")


# --- the base model's hash ------------------------------------------------------------------------------------------

def test_model_hash_by_hand_and_follows_the_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model-2.safetensors").write_bytes(b"\x02" * 3)
    (tmp_path / "model-1.safetensors").write_bytes(bytes(range(10)))
    (tmp_path / "tokenizer.json").write_text("{}")  # not hashed
    (tmp_path / MASK_FILE).write_bytes(b"masks")  # not hashed: not part of the base model
    expected = hashlib.sha256(b"config.json{}" + b"model-1.safetensors" + bytes(range(10))
                              + b"model-2.safetensors" + b"\x02" * 3).hexdigest()
    assert model_sha256(tmp_path) == expected
    (tmp_path / "model-1.safetensors").write_bytes(bytes(range(1, 11)))
    assert model_sha256(tmp_path) != expected
    with pytest.raises(ConfigError, match="no config.json; not a checkpoint directory"):
        model_sha256(tmp_path / "nowhere")


def test_check_base_model(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"weights")
    same = Plan(base_model=BaseCheckpoint(path="m", sha256=model_sha256(tmp_path)), layers=(LayerPlan(sparsity={}),), metric="none")
    check_base_model(same, tmp_path, "art/adaspkv.json")
    with pytest.raises(ArtifactError, match=r"art/adaspkv.json: base_model.sha256 000000000000... does not match "
                                            r".* \(hash [0-9a-f]{12}...\): this artifact was made from another model"):
        check_base_model(plan(), tmp_path, "art/adaspkv.json")


def test_n_of_m_masks_are_checked_group_by_group(tmp_path):
    two_of_four = torch.tensor([[True, False, True, False, False, True, True, False]])  # 2 of each 4 kept
    masks = {mask_key(0, name): two_of_four for name in LINEARS}
    nm_plan = plan(layers=1, sparsity=0.5, structure="2:4")
    write_artifact(tmp_path, nm_plan, masks)
    assert read_masks(tmp_path, nm_plan).keys() == masks.keys()
    # the same sparsity, but three of the first four inputs kept
    masks[mask_key(0, "mlp.up_proj")] = torch.tensor([[True, True, True, False, False, False, True, False]])
    with pytest.raises(ArtifactError, match=r"mlp.up_proj.weight: row 0, inputs 0..3 keep 3 of 4; structure 2:4 "
                                            r"allows 2$"):
        write_artifact(tmp_path, nm_plan, masks)
    masks[mask_key(0, "mlp.up_proj")] = torch.tensor([[True, False, True, False, True, False]])
    with pytest.raises(ArtifactError, match=r"a 2:4 mask needs rows divisible into groups of 4, not shape \(1, 6\)"):
        write_artifact(tmp_path, nm_plan, masks)


def test_a_mask_is_applied_on_the_weights_device():
    # loaders may yield weights on the GPU while masks are read on the CPU; the meta device stands in here
    from vllm_adaspkv.format import mask_weight

    masked = mask_weight(torch.ones(2, 4, device="meta"), torch.tensor([[True, False, True, False]] * 2))
    assert masked.device.type == "meta" and masked.shape == (2, 4)
    assert mask_weight(torch.ones(1, 4), torch.tensor([[True, False, True, False]])).tolist() == [[1, 0, 1, 0]]


def test_packed_mask_map_holds_one_bit_a_weight_and_reads_back_bool_masks():
    from vllm_adaspkv.format import PackedMaskMap

    masks = PackedMaskMap()
    mask = torch.tensor([[True, False, True], [False, False, True]])
    masks.add("language_model.model.layers.0.mlp.up_proj.weight", mask)
    assert list(masks) == ["language_model.model.layers.0.mlp.up_proj.weight"] and len(masks) == 1
    assert torch.equal(masks["language_model.model.layers.0.mlp.up_proj.weight"], mask)
    assert masks._packed["language_model.model.layers.0.mlp.up_proj.weight"][0].tolist() == [0b10100100]
