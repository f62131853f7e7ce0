"""packed_weights.safetensors (vllm_adaspkv.format.packed_weights): the pruned linears stored packed,
checked by hand, round trip, against the plan, and malformed."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_adaspkv.format import (
    LINEARS,
    MASK_FILE,
    PACKED_FILE,
    PLAN_FILE,
    ArtifactError,
    BaseCheckpoint,
    LayerPlan,
    PackedWeights,
    Plan,
    ZeroCount,
    checkpoint_files,
    mask_key,
    read_plan,
    write_artifact,
)
from vllm_adaspkv.format.safetensors_stream import TensorSpec, write_streamed
from vllm_adaspkv.sparse import packing

SHA = "0" * 64
KEY = mask_key(0, "self_attn.q_proj")


def plan(layers=1, sparsity=0.5, packed=True, **kwargs) -> Plan:
    return Plan(base_model=BaseCheckpoint(path="base", sha256=SHA), metric="magnitude",
                layers=tuple(LayerPlan(sparsity=dict.fromkeys(LINEARS, sparsity)) for _ in range(layers)),
                weight_format="packed" if packed else "masked", packed_weights=packed, **kwargs)


def half(shape=(4, 10), layers=1, seed=0) -> tuple[dict, dict]:
    """Random weights and masks keeping exactly half of each row."""
    g = torch.Generator().manual_seed(seed)
    weights, masks = {}, {}
    for i in range(layers):
        for name in LINEARS:
            w = torch.randn(shape, generator=g).to(torch.bfloat16)
            m = torch.zeros(shape, dtype=torch.bool)
            m.scatter_(1, torch.rand(shape, generator=g).argsort(1)[:, : shape[1] // 2], True)
            weights[mask_key(i, name)], masks[mask_key(i, name)] = w * m, m
    return weights, masks


def test_a_weight_by_hand(tmp_path):
    # q_proj 1 x 8 keeps columns 0, 2, 3, 7: bits 1, 4, 8, 128 -> byte 141; 4 x 10 for the others
    weights, masks = half()
    weights[KEY] = torch.tensor([[1.0, 0, 2, 3, 0, 0, 0, 4]], dtype=torch.bfloat16)
    masks[KEY] = weights[KEY] != 0
    write_artifact(tmp_path, plan(), masks, weight=weights.__getitem__, dtype=torch.bfloat16)
    assert sorted(p.name for p in tmp_path.iterdir()) == [PLAN_FILE, PACKED_FILE]  # no masks file
    with safe_open(str(tmp_path / PACKED_FILE), framework="pt") as f:
        assert f.get_tensor(f"{KEY}.bitmask").tolist() == [[141]]
        assert f.get_tensor(f"{KEY}.values").tolist() == [1.0, 2.0, 3.0, 4.0]
        assert f.get_tensor(f"{KEY}.row_offsets").tolist() == [0, 4]
        assert json.loads(f.metadata()["shapes"])[KEY] == [1, 8]
    # two rows of 10: two bitmask bytes a row, the second holding columns 8 and 9
    down = mask_key(0, "mlp.down_proj")
    stored = PackedWeights(tmp_path, read_plan(tmp_path)).get(down)
    assert stored.bitmask.shape == (4, 2) and stored.row_offsets.tolist() == [0, 5, 10, 15, 20]
    assert torch.equal(packing.unpack(stored), weights[down])


def test_round_trip_keeps_values_and_masks(tmp_path):
    weights, masks = half(shape=(6, 34), layers=2)  # 34: not a multiple of 8
    written = plan(layers=2)
    write_artifact(tmp_path, written, masks, weight=weights.__getitem__, dtype=torch.bfloat16)
    stored = PackedWeights(tmp_path, read_plan(tmp_path))
    assert set(stored.keys()) == set(masks) and stored.shapes[KEY] == (6, 34)
    for key in masks:
        packed = stored.get(key)
        assert packed.values.dtype == torch.bfloat16  # the checkpoint's dtype
        assert torch.equal(packing.keep_mask(packed), masks[key])
        assert torch.equal(packing.unpack(packed), weights[key])


def test_the_other_kind_of_file_is_removed(tmp_path):
    weights, masks = half()
    write_artifact(tmp_path, plan(packed=False), masks)
    assert (tmp_path / MASK_FILE).is_file()
    write_artifact(tmp_path, plan(), masks, weight=weights.__getitem__, dtype=torch.bfloat16)
    assert (tmp_path / PACKED_FILE).is_file() and not (tmp_path / MASK_FILE).exists()
    write_artifact(tmp_path, plan(packed=False), masks)
    assert (tmp_path / MASK_FILE).is_file() and not (tmp_path / PACKED_FILE).exists()
    for missing in ({"masks": masks}, {"masks": None, "weight": weights.__getitem__, "dtype": torch.bfloat16},
                    {"masks": {}, "weight": weights.__getitem__, "dtype": torch.bfloat16}):
        with pytest.raises(ValueError, match=r"packed_weights needs masks and the pruned weights \(weight=, dtype=\)"):
            write_artifact(tmp_path, plan(), **missing)
    assert not read_plan(tmp_path).packed_weights  # the last artifact written is untouched


def test_the_plan_refuses_packed_weights_with_a_full_checkpoint_or_masked_format():
    with pytest.raises(ArtifactError, match="packed_weights = true needs full_checkpoint = false and weight_format = "
                                            "'packed', not true and 'packed'"):
        plan(full_checkpoint=True, checkpoint_sha256="1" * 64)
    with pytest.raises(ArtifactError, match="not false and 'masked'"):
        Plan(base_model=BaseCheckpoint(path="b", sha256=SHA), metric="none", layers=(LayerPlan(sparsity={}),),
             packed_weights=True)


def test_checked_against_the_plan(tmp_path):
    weights, masks = half()
    write_artifact(tmp_path, plan(), masks, weight=weights.__getitem__, dtype=torch.bfloat16)
    with pytest.raises(ArtifactError, match=rf"packed_weights.safetensors: {KEY} has sparsity 0.5000; "
                                            r"adaspkv.json says layers\[0\].sparsity.self_attn.q_proj = 0.2500"):
        PackedWeights(tmp_path, plan(sparsity=0.25)).get(KEY)
    with pytest.raises(ArtifactError, match=r"no packed weight for language_model.model.layers.1.self_attn.q_proj.w"):
        PackedWeights(tmp_path, plan(layers=2))
    with pytest.raises(ArtifactError, match=r"no packed_weights.safetensors, but the plan says packed_weights = true"):
        PackedWeights(tmp_path / "elsewhere", plan())
    with pytest.raises(ArtifactError, match=r"elsewhere: no packed_weights.safetensors$"):
        PackedWeights(tmp_path / "elsewhere")


def test_n_of_m_structure_is_checked(tmp_path):
    w = torch.ones(1, 8)
    keep = torch.tensor([[True, True, False, False, True, False, False, True]])  # 2 of 4 in each group
    masks = {mask_key(0, name): keep for name in LINEARS}
    write_artifact(tmp_path, plan(structure="2:4"), masks, weight=lambda key: w * keep, dtype=torch.float32)
    PackedWeights(tmp_path, read_plan(tmp_path)).get(KEY)
    with pytest.raises(ArtifactError, match=r"row 0, inputs 0..3 keep 2 of 4; structure 3:4 allows 1"):
        PackedWeights(tmp_path, plan(structure="3:4", sparsity=0.5)).get(KEY)


def write_raw(path, tensors: dict, shapes: dict | None) -> None:
    save_file(tensors, str(path / PACKED_FILE), metadata=None if shapes is None else {"shapes": json.dumps(shapes)})


def test_malformed_files(tmp_path):
    weight = torch.tensor([[1.0, 0, 2, 3, 0, 0, 0, 4, 5, 0]])
    good = packing.pack(weight, weight != 0)
    parts = {f"{KEY}.bitmask": good.bitmask, f"{KEY}.values": good.values, f"{KEY}.row_offsets": good.row_offsets}
    write_raw(tmp_path, parts, None)
    with pytest.raises(ArtifactError, match="metadata 'shapes' missing or not a JSON object"):
        PackedWeights(tmp_path)
    write_raw(tmp_path, {k: v for k, v in parts.items() if "values" not in k}, {KEY: [1, 10]})
    with pytest.raises(ArtifactError, match=rf"tensors \['{KEY}.values'\] do not match the metadata 'shapes'"):
        PackedWeights(tmp_path)
    write_raw(tmp_path, parts, {KEY: [1, 10]})
    assert torch.equal(packing.unpack(PackedWeights(tmp_path).get(KEY)), packing.unpack(good))  # no plan: layout only
    cases = [
        ({f"{KEY}.bitmask": good.bitmask[:, :1]},
         r"bitmask is torch.uint8 \(1, 1\); a \[1, 10\] weight needs uint8 \(1, 2\)"),
        ({f"{KEY}.bitmask": good.bitmask | torch.tensor([[0, 4]], dtype=torch.uint8)}, "sets bits past column 9"),
        ({f"{KEY}.row_offsets": torch.tensor([0, 4])}, "row_offsets do not count the bits of each bitmask row"),
        ({f"{KEY}.row_offsets": torch.tensor([0, 5], dtype=torch.int32)}, r"row_offsets is torch.int32 \(2,\); int64"),
        ({f"{KEY}.values": good.values[:4]}, "values has 4 values; the bitmask keeps 5"),
        ({f"{KEY}.values": good.values.long()}, r"values is torch.int64; allowed torch.bfloat16, torch.float16, "),
    ]
    for change, message in cases:
        write_raw(tmp_path, parts | change, {KEY: [1, 10]})
        with pytest.raises(ArtifactError, match=message):
            PackedWeights(tmp_path).get(KEY)
    write_raw(tmp_path, parts, {KEY: [1, 10, 1]})
    with pytest.raises(ArtifactError, match=rf"metadata 'shapes': {KEY} has shape \[1, 10, 1\]; a packed weight has "
                                            r"\[rows, cols\]"):
        PackedWeights(tmp_path)
    (tmp_path / PACKED_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ArtifactError, match="packed_weights.safetensors: not a readable safetensors file"):
        PackedWeights(tmp_path)


def test_zero_count_of_a_packed_weight_counts_kept_zeros_too():
    # 2 x 4, keeps 5 of which one value is 0: 4 zeros of 8
    packed = packing.pack(torch.tensor([[1.0, 0.0, 2.0, 3.0], [0, 0, 0, 5.0]]),
                          torch.tensor([[1, 1, 1, 1], [0, 0, 0, 1]]).bool())
    zeros = ZeroCount(plan(sparsity=0.5))
    zeros.observe_packed(KEY, packed)
    assert zeros.measured[(0, "self_attn.q_proj")] == 0.5


def test_streamed_file_reads_back_and_refuses_a_tensor_off_its_spec(tmp_path):
    specs = [TensorSpec("a", (2, 3), torch.bfloat16), TensorSpec("b", (5,), torch.uint8),
             TensorSpec("c", (1,), torch.int64)]
    made = {"a": torch.arange(6.0).reshape(2, 3).bfloat16(), "b": torch.arange(5, dtype=torch.uint8),
            "c": torch.tensor([1 << 40])}
    write_streamed(tmp_path / "x.safetensors", specs, lambda spec: made[spec.name], metadata={"k": "v"})
    with safe_open(str(tmp_path / "x.safetensors"), framework="pt") as f:
        assert f.metadata()["k"] == "v" and all(torch.equal(f.get_tensor(n), t) for n, t in made.items())
    with pytest.raises(ValueError, match=r"a: made \(3, 2\) torch.bfloat16, planned \(2, 3\) torch.bfloat16"):
        write_streamed(tmp_path / "y.safetensors", specs, lambda spec: made[spec.name].reshape(3, 2))


def test_an_artifacts_own_files_are_not_checkpoint_files(tmp_path):
    for name in ("model.safetensors", MASK_FILE, PACKED_FILE):
        save_file({"x": torch.zeros(1)}, str(tmp_path / name))
    assert [p.name for p in checkpoint_files(tmp_path)] == ["model.safetensors"]
