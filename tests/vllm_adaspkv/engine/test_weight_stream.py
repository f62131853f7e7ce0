"""The weight stream a worker hands vLLM (vllm_adaspkv.engine.weight_stream), without an engine: masks
applied, stored packed weights put in place of the base model's, packed modules' weights held back."""

import pytest
import torch

from tests.vllm_adaspkv.artifacts import linear_weights, make_artifact, num_layers
from vllm_adaspkv.engine.serving_plan import describe_artifact
from vllm_adaspkv.engine.weight_stream import ArtifactWeights
from vllm_adaspkv.format import ArtifactError, mask_key, parse_mask_key, read_masks, read_plan, write_artifact
from vllm_adaspkv.sparse import packing


@pytest.fixture(scope="module")
def artifacts(tiny_llava_dir, tmp_path_factory):
    bits = [16] * num_layers(tiny_llava_dir)
    root = tmp_path_factory.mktemp("stream")
    base = linear_weights(tiny_llava_dir)
    masked = make_artifact(root / "masked", tiny_llava_dir, bits, sparsity=0.5)
    stored = make_artifact(root / "stored", tiny_llava_dir, bits, sparsity=0.5, weight_format="packed",
                           packed_weights=True)
    # stored values other than the base model's (as SparseGPT's are): the stream must serve these
    masks = read_masks(masked)
    write_artifact(stored, read_plan(stored), masks, weight=lambda key: (base[key] + 1) * masks[key],
                   dtype=base[next(iter(masks))].dtype)
    return masked, stored, base


@pytest.mark.parametrize("kind", ["masked", "stored"])
def test_the_stream_gives_each_weight_pruned_once_and_holds_back_the_packed(artifacts, kind):
    masked, stored, base = artifacts
    served = describe_artifact(masked if kind == "masked" else stored)
    to_pack = {mask_key(0, "self_attn.q_proj"), mask_key(0, "mlp.down_proj")}
    stream = ArtifactWeights(served, to_pack)
    out = dict(stream.stream(iter(base.items())))
    stream.check()
    expected = dict(ArtifactWeights(describe_artifact(masked), set()).stream(iter(base.items())))  # masked-dense
    if kind == "stored":  # the stored values: the base's + 1 where kept
        expected = {k: w + (w != 0) if parse_mask_key(k) is not None else w for k, w in expected.items()}
    assert set(out) == set(base) - to_pack and set(stream.packed) == to_pack
    for key, weight in out.items():
        assert weight.dtype == base[key].dtype and torch.equal(weight, expected[key])
        if parse_mask_key(key) is None:
            assert torch.equal(weight, base[key])  # embeddings, norms, vision tower: untouched
        else:
            assert 0.45 < float((weight == 0).float().mean()) < 0.55
    for key in to_pack:
        assert torch.equal(packing.unpack(stream.packed[key]), expected[key])


def test_a_pruned_weight_missing_from_the_stream_is_named(artifacts):
    _, stored, base = artifacts
    gone = mask_key(1, "mlp.up_proj")
    stream = ArtifactWeights(describe_artifact(stored), set())
    list(stream.stream((k, v) for k, v in base.items() if k != gone))
    with pytest.raises(ArtifactError, match=rf"pruned weights the checkpoint does not have: \['{gone}'\]"):
        stream.check()
