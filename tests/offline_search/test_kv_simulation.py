import pytest
import torch

from offline_search.checkpoint import load_llava
from offline_search.kv_simulation import apply_kv_plan, remove_kv_plan


def test_kv_plan_changes_attention_as_the_quantizer_says(tiny_llava_dir):
    model, _ = load_llava(tiny_llava_dir)
    layers = model.config.text_config.num_hidden_layers
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        apply_kv_plan(model, [16] * layers, 32)
        assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-5)  # 16 bits: untouched
        apply_kv_plan(model, [8] * layers, 32)
        eight = model(input_ids=ids).logits
        apply_kv_plan(model, [2] * layers, 32)
        two = model(input_ids=ids).logits
        remove_kv_plan(model)
        assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-5)
    err8, err2 = (eight - dense).abs().max(), (two - dense).abs().max()
    assert 0 < err8 < err2  # quantization is applied, and fewer bits cost more


def test_kv_plan_errors(tiny_llava_dir):
    model, _ = load_llava(tiny_llava_dir)
    with pytest.raises(ValueError, match="KV plan has 1 layers; the model has"):
        apply_kv_plan(model, [8], 32)
    layers = model.config.text_config.num_hidden_layers
    with pytest.raises(ValueError, match="KV bits 5: allowed"):
        apply_kv_plan(model, [5] * layers, 32)
