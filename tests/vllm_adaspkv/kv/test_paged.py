"""The paged quantized KV cache against plain attention over fake-quantized K/V."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from vllm_adaspkv.kv import quant
from vllm_adaspkv.kv.paged import KVFormat, attend, decode, encode, write

HEAD_DIM, KV_HEADS, Q_HEADS, BLOCK = 32, 2, 4, 4


def reference(q, k, v, scale):
    """Causal attention of the last q.shape[0] positions over k, v [S, Hkv, D] (GQA by repeat)."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    s, lq = k.shape[0], q.shape[0]
    mask = torch.arange(s)[None, :] <= (s - lq + torch.arange(lq))[:, None]  # [Lq, S]
    return F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                          attn_mask=mask, scale=scale).transpose(0, 1)


def stored(x, fmt, key):
    """What attention reads back for K (in the original basis) or V."""
    if key and fmt.rotate_keys:
        return quant.fake_quantize_rotated(x, fmt.bits, fmt.group)
    return quant.fake_quantize(x, fmt.bits, fmt.group)


def test_format_bytes_by_hand():
    # 4-bit, head_dim 32, groups of 32: 16 code bytes + 4 scale bytes, for K and for V
    assert KVFormat(4, 32).token_head_bytes == 2 * (16 + 4)
    assert KVFormat(16, 32).token_head_bytes == 2 * 64
    with pytest.raises(ValueError, match="KV bits 3: allowed 16, 8, 6, 4, 2"):
        KVFormat(3, 32)
    with pytest.raises(ValueError, match="power-of-two head_dim"):
        KVFormat(8, 96, group=32, rotate_keys=True)


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_encode_decode_roundtrip_is_the_quantizer(bits):
    fmt = KVFormat(bits, HEAD_DIM)
    k, v = torch.randn(5, KV_HEADS, HEAD_DIM), torch.randn(5, KV_HEADS, HEAD_DIM)
    rows = encode(k, v, fmt)
    assert rows.shape == (5, KV_HEADS, fmt.token_head_bytes) and rows.dtype == torch.uint8
    k2, v2 = decode(rows, fmt, torch.float32)
    torch.testing.assert_close(k2, quant.fake_quantize(k, bits, 32))
    torch.testing.assert_close(v2, quant.fake_quantize(v, bits, 32))


def test_write_places_rows_by_slot_and_skips_padding():
    fmt = KVFormat(8, HEAD_DIM)
    cache = torch.zeros(3, KV_HEADS, BLOCK, fmt.token_head_bytes, dtype=torch.uint8)
    k, v = torch.randn(3, KV_HEADS, HEAD_DIM), torch.randn(3, KV_HEADS, HEAD_DIM)
    write(cache, k, v, torch.tensor([9, -1, 2]), fmt)  # slot 9 = block 2 position 1
    assert torch.equal(cache[2, :, 1], encode(k[:1], v[:1], fmt)[0])
    assert torch.equal(cache[0, :, 2], encode(k[2:], v[2:], fmt)[0])
    assert int((cache != 0).any(-1).sum()) == 2 * KV_HEADS  # nothing else written


@pytest.mark.parametrize("q_lens", [[7, 1, 5], [1, 3, 1], [1, 1, 1], [7, 2, 5]])
@pytest.mark.parametrize("bits,rotate", [(16, False), (8, False), (6, False), (4, True), (2, False)])
def test_attend_matches_attention_over_fake_quantized_kv(bits, rotate, q_lens):
    """Three requests at once (e.g. a prefill, a decode step, and a chunk after a cached prefix;
    decodes first, last, alone, or none), with blocks scattered over a pool whose unused blocks
    hold garbage (NaN once decoded)."""
    torch.manual_seed(0)
    fmt = KVFormat(bits, HEAD_DIM, rotate_keys=rotate)
    pool = torch.randint(0, 256, (16, KV_HEADS, BLOCK, fmt.token_head_bytes), dtype=torch.uint8)
    seq_lens = [7, 10, 13]
    block_table = torch.tensor([[3, 11, 0, 0], [5, 1, 14, 0], [2, 9, 7, 12]])
    scale = HEAD_DIM**-0.5
    ks = [torch.randn(n, KV_HEADS, HEAD_DIM) for n in seq_lens]
    vs = [torch.randn(n, KV_HEADS, HEAD_DIM) for n in seq_lens]
    for r, n in enumerate(seq_lens):
        pos = torch.arange(n)
        write(pool, ks[r], vs[r], block_table[r][pos // BLOCK] * BLOCK + pos % BLOCK, fmt)
    qs = [torch.randn(q, Q_HEADS, HEAD_DIM) for q in q_lens]
    qsl = torch.tensor([0, *itertools.accumulate(q_lens)])
    out = attend(torch.cat(qs), pool, block_table, torch.tensor(seq_lens), qsl, max(q_lens),
                 max(seq_lens), scale, fmt)
    expected = torch.cat([reference(q, stored(k, fmt, True), stored(v, fmt, False), scale)
                          for q, k, v in zip(qs, ks, vs)])
    assert out.shape == (sum(q_lens), Q_HEADS, HEAD_DIM)
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=1e-4)


def test_attend_keeps_dtype_and_ignores_stale_blocks():
    fmt = KVFormat(4, HEAD_DIM)
    pool = torch.full((4, KV_HEADS, BLOCK, fmt.token_head_bytes), 255, dtype=torch.uint8)  # NaN scales
    k, v = torch.randn(2, KV_HEADS, HEAD_DIM), torch.randn(2, KV_HEADS, HEAD_DIM)
    write(pool, k, v, torch.tensor([4, 5]), fmt)  # block 1, positions 0 and 1 of 4
    q = torch.randn(1, Q_HEADS, HEAD_DIM, dtype=torch.bfloat16)
    out = attend(q, pool, torch.tensor([[1, 2]]), torch.tensor([2]), torch.tensor([0, 1]), 1, 2, 0.2, fmt)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()
