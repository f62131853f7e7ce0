"""SmolLM2's real keys and values (smol-llava on a WikiText-2 window, every decoder layer): the C++
write stores exactly the bytes of `kv.quant.quantize` at every width, the values the search simulates.

Why this test exists: served with a 4-bit cache, smol-llava's perplexity is 0.5 % off the offline
simulation's (16 windows: 37.107 against 36.916) while 8 bits agree to 3e-5. Measured 2026-12-07 and
ruled out as a serving error: vLLM's float32 K/V enter the cache 3e-7 apart from transformers' (layer
0); at 4 bits a few codes flip, and the flips grow layer by layer into another, equally likely draw of
the quantization noise (offline runs with K/V jittered by 1e-6 give 36.96-37.15); given the same
inputs, write and attention agree exactly. This test pins the first half of that on real activations
(outlier channels, keys up to about 20 on this window) beside the random cases of kernel_cases.py.
"""

import pytest
import torch

from offline_search.data.calibration_data import text_tokens
from offline_search.data.checkpoint import load_llava
from offline_search.data.text_data import wikitext_path
from offline_search.model import kv_simulation
from vllm_adaspkv.format.schema import KVQuantScheme
from vllm_adaspkv.kv import cpu_kernels, paged
from vllm_adaspkv.kv.paged import KVFormat

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol_kv(smol_llava_dir):
    """Every layer's post-RoPE K and V [tokens, kv heads, head_dim] on one 256-token window."""
    model, processor = load_llava(smol_llava_dir)
    tokens = text_tokens(str(wikitext_path("test")), processor.tokenizer)[:256][None]  # [1, 256]
    captured = []

    def capture(x, bits, group, fp8=False):  # x [1, H, T, D], keys then values of each layer
        captured.append(x[0].transpose(0, 1).contiguous())
        return x

    kv_simulation.apply_kv_plan(model, [4] * len(kv_simulation.decoder_layers(model)), KVQuantScheme())
    original, kv_simulation.fake_quantize = kv_simulation.fake_quantize, capture
    try:
        with torch.no_grad():
            model(input_ids=tokens)
    finally:
        kv_simulation.fake_quantize = original
    return list(zip(captured[0::2], captured[1::2]))


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_the_cpp_write_of_real_keys_and_values_is_quant_quantize(smol_kv, bits):
    assert len(smol_kv) == 30 and max(float(k.abs().max()) for k, _ in smol_kv) > 10  # outlier channels
    for key, value in smol_kv:
        tokens, heads, head_dim = key.shape
        fmt = KVFormat(bits, head_dim, 32)
        cache = torch.full((-(-tokens // 16), heads, 16, fmt.token_head_bytes), 0xFF, dtype=torch.uint8)
        cpu_kernels.write(cache, key, value, torch.arange(tokens), fmt)
        stored = cache.permute(0, 2, 1, 3).flatten(0, 1)[:tokens]  # [tokens, heads, bytes]
        assert torch.equal(stored, paged.encode(key, value, fmt))
