"""Cases for an implementation of the quantized KV cache's `write` and `attend` (the Triton kernels,
the C++ CPU kernels) against the PyTorch reference (kv.paged).

Not collected by itself: a module that imports these tests provides the fixtures `ops` (the
module under test) and `device` (where its tensors live): triton_cases.py, test_cpu_kernels.py.
"""

from __future__ import annotations

import pytest
import torch

from vllm_adaspkv.kv import paged
from vllm_adaspkv.kv.paged import KVFormat

KV_HEADS = 2


def garbage_cache(blocks: int, block_size: int, fmt: KVFormat, tokens_first: bool, gen,
                  device: str) -> torch.Tensor:
    """A cache [B, H, N, C] as vLLM hands it out: never zeroed. Random bytes, with every third
    block all 0xFF (NaN fp16 scales and values) and every third + 1 filled with fp16 +inf; tokens-first
    is vLLM's [B, N, H, C] allocation seen through a transpose (non-contiguous)."""
    shape = (blocks, block_size, KV_HEADS, fmt.token_head_bytes) if tokens_first else \
        (blocks, KV_HEADS, block_size, fmt.token_head_bytes)
    cache = torch.randint(0, 256, shape, dtype=torch.uint8, generator=gen)
    cache[0::3] = 0xFF
    cache[1::3] = torch.tensor([0x00, 0x7C], dtype=torch.uint8).repeat(fmt.token_head_bytes // 2)  # 0x7C00
    cache = cache.to(device)
    return cache.transpose(1, 2) if tokens_first else cache


def special_values(x: torch.Tensor, bits: int, group: int, gen) -> None:
    """Rows that stress the rounding: exact .5 ties (range 0..levels, so scale 1 and zero 0 in fp16:
    round-half-even decides the codes), a constant group (scale 0: divide by 1), a wide range and
    values beyond fp16's range."""
    levels = 2 ** min(bits, 8) - 1
    ties = torch.randint(0, 2 * levels + 1, (group,), generator=gen).float() / 2
    ties[0], ties[1] = 0.0, float(levels)
    x[0, 0, :group] = ties
    x[1, 0, :group] = 1.7
    x[2, 1] *= 100
    x[3, 0] *= 1e5  # beyond fp16's range: scales, zero points and 16-bit values are clamped, never inf


WRITE_CASES = [(bits, 64, group, rotate, tokens_first)
               for bits in (16, 8, 6, 4, 2) for group in ((32,) if bits == 16 else (32, 64))
               for rotate in (False, True) for tokens_first in (False, True)]
# head_dim / group that are not powers of two: padded, masked lanes in the kernel's tiles
WRITE_CASES += [(6, 96, 48, False, False), (4, 96, 32, False, True), (2, 80, 16, False, False)]


def write_id(case) -> str:
    bits, head_dim, group, rotate, tokens_first = case
    return f"{bits}bit-d{head_dim}-g{group}{'-rot' if rotate else ''}-{'tokens' if tokens_first else 'heads'}first"


@pytest.mark.parametrize(("bits", "head_dim", "group", "rotate", "tokens_first"), WRITE_CASES,
                         ids=map(write_id, WRITE_CASES))
def test_write_is_byte_for_byte_paged_kv_write(ops, device, bits, head_dim, group, rotate, tokens_first):
    """Exact bytes: the kernel does the reference's arithmetic in the same order (fp16 scale/zero,
    IEEE division, ties to even), so no tolerance is needed. Keys are fp32 for the heads-first
    cache and bf16 (vLLM's usual dtype) for the tokens-first one; two rows past the slot mapping
    are padding; two slots are negative."""
    gen = torch.Generator().manual_seed(bits * 1000 + head_dim + group + rotate * 7 + tokens_first)
    fmt = KVFormat(bits, head_dim, group, rotate)
    block_size, blocks, tokens = 4, 6, 10
    cache = garbage_cache(blocks, block_size, fmt, tokens_first, gen, device)
    dtype = torch.bfloat16 if tokens_first else torch.float32
    key = torch.randn(tokens + 2, KV_HEADS, head_dim, generator=gen)
    value = torch.randn(tokens + 2, KV_HEADS, head_dim, generator=gen)
    special_values(value, bits, group, gen)  # values: keys may be rotated, which would undo the ties
    special_values(key, bits, group, gen)
    slots = torch.randperm(blocks * block_size, generator=gen)[:tokens]
    slots[[3, 7]] = -1
    key, value, slots = key.to(device, dtype), value.to(device, dtype), slots.to(device)

    expected = cache.clone()
    paged.write(expected, key, value, slots, fmt)
    ops.write(cache, key, value, slots, fmt)
    assert torch.equal(cache, expected), f"{int((cache != expected).sum())} bytes differ"


# (bits, head_dim, group, queries per KV head, rotate, tokens-first cache, block size, query dtype)
ATTEND_CASES = [
    (16, 64, 32, 1, False, False, 4, torch.float32),
    (16, 64, 32, 4, True, True, 8, torch.bfloat16),
    (8, 64, 32, 2, False, True, 4, torch.float32),
    (8, 64, 64, 4, True, False, 8, torch.float32),
    (6, 64, 32, 4, False, False, 4, torch.float32),
    (6, 64, 64, 1, True, True, 4, torch.float16),
    (4, 64, 32, 1, True, False, 8, torch.float32),
    (4, 64, 64, 2, False, True, 4, torch.bfloat16),
    (2, 64, 32, 2, True, False, 4, torch.float32),
    (2, 64, 64, 4, False, True, 8, torch.float32),
    (6, 96, 48, 3, False, False, 4, torch.float32),  # padded head_dim, group and query heads
    (4, 80, 16, 2, False, True, 4, torch.float32),
]
# One batch: decode, prefill, chunked prefill (a prefix cached), prefix hit, decode at a block
# edge, decode over a longer context (the online softmax rescales across many pages)
SEQ_LENS, Q_LENS = [9, 6, 14, 11, 8, 37], [1, 6, 5, 3, 1, 1]


def attend_id(case) -> str:
    bits, head_dim, group, qpk, rotate, tokens_first, block_size, dtype = case
    return (f"{bits}bit-d{head_dim}-g{group}-gqa{qpk}{'-rot' if rotate else ''}"
            f"-{'tokens' if tokens_first else 'heads'}first-bs{block_size}-{str(dtype)[6:]}")


@pytest.mark.parametrize(("bits", "head_dim", "group", "qpk", "rotate", "tokens_first", "block_size", "dtype"),
                         ATTEND_CASES, ids=map(attend_id, ATTEND_CASES))
def test_attend_matches_paged_kv_attend(ops, device, bits, head_dim, group, qpk, rotate, tokens_first,
                                        block_size, dtype):
    """Tolerance: fp32 1e-3 relative + 1e-4 absolute on outputs of order 1 (the reference's SDPA
    and the kernel's online exp2 softmax differ by ~1e-6 on CPU; the slack is for GPU exp2 and FMA);
    half-precision outputs one rounding step apart (1e-2, a bf16 step at |x| < 2 is 0.0078)."""
    gen = torch.Generator().manual_seed(bits * 100 + qpk * 10 + head_dim)
    fmt = KVFormat(bits, head_dim, group, rotate)
    blocks = 72
    cache = garbage_cache(blocks, block_size, fmt, tokens_first, gen, device)
    # Permuted block tables over the pool; columns past a request's length point at garbage blocks
    # (NaN / inf patterns) that must not be read.
    width = -(-max(SEQ_LENS) // block_size) + 1
    order = torch.randperm(blocks, generator=gen)
    table = order[:len(SEQ_LENS) * width].reshape(len(SEQ_LENS), width)
    for r, n in enumerate(SEQ_LENS):  # the cached tokens, written by the reference
        pos = torch.arange(n)
        slots = table[r][pos // block_size] * block_size + pos % block_size
        k, v = torch.randn(2, n, KV_HEADS, head_dim, generator=gen)
        paged.write(cache, k.to(device), v.to(device), slots.to(device), fmt)
    query = 3 * torch.randn(sum(Q_LENS), KV_HEADS * qpk, head_dim, generator=gen).to(device, dtype)
    qsl = torch.tensor([0, *torch.tensor(Q_LENS).cumsum(0).tolist()], dtype=torch.int32, device=device)
    seq_lens = torch.tensor(SEQ_LENS, dtype=torch.int32, device=device)
    table = table.to(device, torch.int32)
    args = (query, cache, table, seq_lens, qsl, max(Q_LENS), max(SEQ_LENS), head_dim**-0.5, fmt)

    out = ops.attend(*args)
    expected = paged.attend(*args)
    assert out.dtype == dtype and out.shape == query.shape
    assert torch.isfinite(out.float()).all()
    tol = dict(rtol=1e-3, atol=1e-4) if dtype == torch.float32 else dict(rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(out, expected, **tol)


def test_write_then_attend_round_trip(ops, device):
    """The two kernels together, as the backend calls them: a prefill written by the kernel, then a
    decode step (its token written first) read back by the attention kernel."""
    gen = torch.Generator().manual_seed(7)
    fmt = KVFormat(4, 64, 32, rotate_keys=True)
    cache = garbage_cache(6, 4, fmt, False, gen, device)
    reference = cache.clone()
    k, v = torch.randn(2, 7, KV_HEADS, 64, generator=gen).to(device)
    table = torch.tensor([[4, 1]], dtype=torch.int32, device=device)
    slots = torch.tensor([16, 17, 18, 19, 4, 5, 6], device=device)
    q = torch.randn(1, 2 * KV_HEADS, 64, generator=gen).to(device)
    for impl, c in ((ops, cache), (paged, reference)):
        impl.write(c, k[:6], v[:6], slots[:6], fmt)
        impl.write(c, k[6:], v[6:], slots[6:], fmt)
    assert torch.equal(cache, reference)
    seq = torch.tensor([7], dtype=torch.int32, device=device)
    qsl = torch.tensor([0, 1], dtype=torch.int32, device=device)
    out = ops.attend(q, cache, table, seq, qsl, 1, 7, 0.125, fmt)
    torch.testing.assert_close(out, paged.attend(q, reference, table, seq, qsl, 1, 7, 0.125, fmt),
                               rtol=1e-3, atol=1e-4)


def test_nothing_to_do(ops, device):
    fmt = KVFormat(8, 64)
    cache = garbage_cache(2, 4, fmt, False, torch.Generator().manual_seed(0), device)
    before = cache.clone()
    empty = torch.empty(0, KV_HEADS, 64, device=device)
    ops.write(cache, empty, empty, torch.empty(0, dtype=torch.long, device=device), fmt)
    assert torch.equal(cache, before)
    out = ops.attend(empty, cache, torch.zeros(0, 1, dtype=torch.int32, device=device),
                     torch.zeros(0, dtype=torch.int32, device=device),
                     torch.zeros(1, dtype=torch.int32, device=device), 0, 0, 0.1, fmt)
    assert out.shape == (0, KV_HEADS, 64)
