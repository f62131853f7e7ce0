import pytest
import torch

from offline_search.data.checkpoint import load_llava
from offline_search.model.kv_simulation import apply_kv_plan, remove_kv_plan
from vllm_adaspkv.format.schema import KVQuantScheme

GROUP_32 = KVQuantScheme(group_size=32)


def test_kv_plan_changes_attention_as_the_quantizer_says(tiny_llava_dir):
    model, _ = load_llava(tiny_llava_dir)
    layers = model.config.text_config.num_hidden_layers
    ids = torch.randint(3, 200, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        apply_kv_plan(model, [16] * layers, GROUP_32)
        assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-5)  # 16 bits: untouched
        apply_kv_plan(model, [8] * layers, GROUP_32)
        eight = model(input_ids=ids).logits
        apply_kv_plan(model, [2] * layers, GROUP_32)
        two = model(input_ids=ids).logits
        remove_kv_plan(model)
        assert torch.allclose(model(input_ids=ids).logits, dense, atol=1e-5)
    err8, err2 = (eight - dense).abs().max(), (two - dense).abs().max()
    assert 0 < err8 < err2  # quantization is applied, and fewer bits cost more


def test_kv_plan_errors(tiny_llava_dir):
    model, _ = load_llava(tiny_llava_dir)
    with pytest.raises(ValueError, match="KV plan has 1 layers; the model has"):
        apply_kv_plan(model, [8], GROUP_32)
    layers = model.config.text_config.num_hidden_layers
    with pytest.raises(ValueError, match="KV bits 5: allowed"):
        apply_kv_plan(model, [5] * layers, GROUP_32)


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
        apply_kv_plan(model, [16] * layers, GROUP_32)
        in_batch = model(input_ids=padded, attention_mask=mask).logits[:, 4:]
    assert torch.allclose(in_batch, alone, atol=1e-5)


@pytest.mark.parametrize(("bits", "rotate", "fp8"), [(8, False, False), (4, False, False), (2, False, False),
                                                    (4, True, False), (8, False, True), (8, True, True)])
def test_the_simulated_cache_reads_what_the_served_cache_stores(tiny_llava_dir, monkeypatch, bits, rotate, fp8):
    """Layer 0's K/V as the simulation attends over them equal the rows the served cache stores for the
    same K/V (the C++ write the plugin calls on CPU), decoded: the search measures what is served."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from vllm_adaspkv.kv import cpu_kernels, paged, quant
    from vllm_adaspkv.kv.paged import KVFormat

    model, _ = load_llava(tiny_llava_dir)
    layers = model.config.text_config.num_hidden_layers
    ids = torch.randint(3, 200, (1, 20), generator=torch.Generator().manual_seed(2))
    seen = []
    sdpa = ALL_ATTENTION_FUNCTIONS["sdpa"]

    def recording(module, query, key, value, *args, **kwargs):
        seen.append((key.detach().clone(), value.detach().clone()))  # [1, kv heads, tokens, head_dim]
        return sdpa(module, query, key, value, *args, **kwargs)

    monkeypatch.setitem(ALL_ATTENTION_FUNCTIONS, "sdpa", recording)
    with torch.no_grad():
        apply_kv_plan(model, [16] * layers, GROUP_32)
        model(input_ids=ids)
        raw_key, raw_value = seen[0]  # layer 0: its K/V do not depend on the plan
        seen.clear()
        scheme = KVQuantScheme(group_size=32, key_rotation="hadamard" if rotate else "none",
                               eight_bit="fp8_e4m3" if fp8 else "int8")
        apply_kv_plan(model, [bits] + [16] * (layers - 1), scheme)
        model(input_ids=ids)
    sim_key, sim_value = seen[0]
    fmt = KVFormat(bits, raw_key.shape[-1], 32, rotate, fp8)
    tokens = raw_key.shape[2]
    cache = torch.zeros(tokens, raw_key.shape[1], 1, fmt.token_head_bytes, dtype=torch.uint8)  # a slot a block
    key, value = raw_key[0].transpose(0, 1), raw_value[0].transpose(0, 1)  # [tokens, kv heads, head_dim]
    cpu_kernels.write(cache, key, value, torch.arange(tokens), fmt)
    assert torch.equal(cache[:, :, 0], paged.encode(key, value, fmt))  # the bytes paged_kv and the search use
    stored_key, stored_value = paged.decode(cache[:, :, 0], fmt, torch.float32)  # [tokens, kv heads, head_dim]
    assert torch.equal(stored_value, sim_value[0].transpose(0, 1))
    if rotate:  # keys are stored in the Hadamard basis; the simulation rotates them back
        h = quant.hadamard(fmt.head_dim)
        torch.testing.assert_close(stored_key @ h, sim_key[0].transpose(0, 1), rtol=0, atol=1e-6)
    else:
        assert torch.equal(stored_key, sim_key[0].transpose(0, 1))
