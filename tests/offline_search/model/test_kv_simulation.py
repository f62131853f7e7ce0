import pytest
import torch

from offline_search.data.checkpoint import load_llava
from offline_search.model.kv_simulation import apply_kv_plan, remove_kv_plan


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


def test_a_left_padded_row_reads_only_its_own_tokens(tiny_llava_dir):
    # transformers builds no attention mask for an attention function it does not know; batched
    # generation pads prompts on the left, so without one the pads were attended to.
    model, _ = load_llava(tiny_llava_dir)
    layers = model.config.text_config.num_hidden_layers
    ids = torch.randint(3, 200, (1, 12), generator=torch.Generator().manual_seed(1))
    padded = torch.cat([torch.full((1, 4), 1), ids], 1)
    mask = torch.cat([torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 12, dtype=torch.long)], 1)
    with torch.no_grad():
        alone = model(input_ids=ids).logits
        apply_kv_plan(model, [16] * layers, 32)
        in_batch = model(input_ids=padded, attention_mask=mask).logits[:, 4:]
    assert torch.allclose(in_batch, alone, atol=1e-5)
