"""The C++ CPU kernels (vllm_adaspkv.kv.cpu_kernels) against the PyTorch reference: the shared KV
kernel cases (kernel_cases.py: every bit width, both page layouts, garbage pages, permuted
block tables, GQA ratios, mixed prefill/decode batches), plus a decode batch as a serving step
sees it. The first test to run builds the extension (about a minute; cached afterwards)."""

from __future__ import annotations

import pytest
import torch

from tests.vllm_adaspkv.kv.kernel_cases import (  # noqa: F401  (the tests)
    KV_HEADS,
    garbage_cache,
    test_attend_matches_paged_kv_attend,
    test_nothing_to_do,
    test_write_is_byte_for_byte_paged_kv_write,
    test_write_then_attend_round_trip,
)
from vllm_adaspkv.kv import cpu_kernels, paged
from vllm_adaspkv.kv.paged import KVFormat


@pytest.fixture
def ops():
    cpu_kernels.load()
    return cpu_kernels


@pytest.fixture
def device():
    return "cpu"


@pytest.mark.parametrize("bits", [16, 8, 6, 4, 2])
def test_decode_step_over_many_pages(ops, bits):
    """30 decode requests of 1 to 300 tokens over 16-token pages of a vLLM-like strided cache view
    (one layer's slice of pages that hold every layer), bf16 queries, 4 query heads per KV head."""
    gen = torch.Generator().manual_seed(bits)
    fmt = KVFormat(bits, 64, 32)
    block_size, blocks = 16, 700
    pages = garbage_cache(blocks, block_size, fmt, False, gen, "cpu")
    cache = torch.stack([pages, pages.clone()], 1)[:, 1]  # [B, H, N, C] with a block stride of two layers
    seq_lens = torch.randint(1, 301, (30,), generator=gen, dtype=torch.int32)
    table = torch.randperm(blocks, generator=gen)[:30 * 19].reshape(30, 19).int()
    for r, n in enumerate(seq_lens.tolist()):
        pos = torch.arange(n)
        k, v = torch.randn(2, n, KV_HEADS, 64, generator=gen)
        paged.write(cache, k, v, table[r][pos // block_size].long() * block_size + pos % block_size, fmt)
    query = torch.randn(30, 4 * KV_HEADS, 64, generator=gen)
    args = (query, cache, table, seq_lens, torch.arange(31, dtype=torch.int32), 1, int(seq_lens.max()), 0.125, fmt)
    # fp32: within 1e-3 of the reference, as the README says; bf16: one rounding step (2^-7 relative)
    torch.testing.assert_close(ops.attend(*args), paged.attend(*args), rtol=1e-3, atol=1e-4)
    bf16 = (query.bfloat16(), *args[1:])
    torch.testing.assert_close(ops.attend(*bf16), paged.attend(*bf16), rtol=2**-7, atol=2**-7)


def test_a_slot_outside_the_cache_is_refused(ops):
    fmt = KVFormat(8, 64, 32)
    cache = torch.zeros(6, KV_HEADS, 4, fmt.token_head_bytes, dtype=torch.uint8)
    kv = torch.zeros(2, KV_HEADS, 64)
    with pytest.raises(RuntimeError, match=r"slot 24 of token 1 is outside the cache of 6 blocks x 4 slots"):
        ops.write(cache, kv, kv, torch.tensor([3, 24]), fmt)
    assert not cache.any()  # refused before anything was written
    with pytest.raises(RuntimeError, match=r"kv has 3 KV heads, the cache 2"):
        ops.write(cache, torch.zeros(2, 3, 64), torch.zeros(2, 3, 64), torch.tensor([3, 4]), fmt)


def test_a_block_outside_the_cache_is_refused(ops):
    fmt = KVFormat(4, 64, 32)
    cache = torch.zeros(6, KV_HEADS, 4, fmt.token_head_bytes, dtype=torch.uint8)
    query = torch.zeros(2, KV_HEADS, 64)
    args = (cache, torch.tensor([[0, 1], [2, 6]], dtype=torch.int32), torch.tensor([5, 5], dtype=torch.int32),
            torch.arange(3, dtype=torch.int32), 1, 5, 0.125, fmt)
    with pytest.raises(RuntimeError, match=r"request 1 block 1 is 6, outside the cache of 6 blocks"):
        ops.attend(query, *args)
    with pytest.raises(RuntimeError, match=r"request 0 has 9 tokens, more than its block table holds"):
        ops.attend(query, *args[:2], torch.tensor([9, 5], dtype=torch.int32), *args[3:])


def test_a_bad_cache_is_refused_by_name(ops):
    fmt = KVFormat(4, 64, 32)
    with pytest.raises(RuntimeError, match=r"cache must be uint8 \[blocks, kv heads, block_size, 80\]"):
        ops.write(torch.zeros(2, 2, 4, 79, dtype=torch.uint8), torch.zeros(1, 2, 64), torch.zeros(1, 2, 64),
                  torch.zeros(1, dtype=torch.long), fmt)


@pytest.mark.parametrize(("rotate", "tokens_first"), [(False, False), (True, True)])
def test_fp8_rows_written_byte_for_byte_and_attended_as_the_reference(ops, rotate, tokens_first):
    """The fp8 tier (float8 e4m3 rows, CPU only): the kernel's bytes equal quant.quantize's, values
    beyond +-448 and e4m3 ties included; decode and prefill attention over NaN-filled garbage pages
    equal paged.attend's."""
    gen = torch.Generator().manual_seed(8 + rotate)
    fmt = KVFormat(8, 64, 32, rotate, fp8=True)
    assert fmt.token_head_bytes == 2 * 64
    block_size, blocks = 4, 40
    cache = garbage_cache(blocks, block_size, fmt, tokens_first, gen, "cpu")
    seq_lens, q_lens = [9, 6, 14, 11], [1, 6, 5, 1]
    table = torch.randperm(blocks, generator=gen)[:4 * 5].reshape(4, 5)
    for r, n in enumerate(seq_lens):
        pos = torch.arange(n)
        k, v = torch.randn(2, n, KV_HEADS, 64, generator=gen) * 3
        k[0, 0, :4] = torch.tensor([1000.0, -1000.0, 1.0625, 0.484375])  # clipped, then two e4m3 ties
        v[1, 1, :2] = torch.tensor([448.5, -2.0e4])
        slots = (table[r][pos // block_size] * block_size + pos % block_size).long()
        expected = cache.clone()
        paged.write(expected, k, v, slots, fmt)
        ops.write(cache, k, v, slots, fmt)
        assert torch.equal(cache, expected), f"request {r}: {int((cache != expected).sum())} bytes differ"
    query = torch.randn(sum(q_lens), 2 * KV_HEADS, 64, generator=gen)
    starts = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    args = (query, cache, table.int(), torch.tensor(seq_lens, dtype=torch.int32), starts, max(q_lens),
            max(seq_lens), 0.125, fmt)
    out = ops.attend(*args)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, paged.attend(*args), rtol=1e-3, atol=1e-4)


# The kernel has an instantiation per (head_dim, group) for 64/32, 64/64, 128/32, 128/64, 128/128
# and one that reads both at run time (96/48, 128/16): every one, every format, against the reference.
SHAPES = [(64, 32), (64, 64), (128, 32), (128, 64), (128, 128), (96, 48), (128, 16)]


@pytest.mark.parametrize(("head_dim", "group"), SHAPES, ids=[f"d{d}-g{g}" for d, g in SHAPES])
@pytest.mark.parametrize("name", ["16", "8", "fp8", "6", "4", "2"])
def test_decode_attention_for_each_compiled_shape(ops, head_dim, group, name):
    gen = torch.Generator().manual_seed(head_dim + group)
    fmt = KVFormat(8, head_dim, fp8=True) if name == "fp8" else KVFormat(int(name), head_dim, group)
    block_size, blocks, seq_lens = 16, 12, [1, 17, 40]
    cache = garbage_cache(blocks, block_size, fmt, False, gen, "cpu")
    table = torch.randperm(blocks, generator=gen)[:9].reshape(3, 3)
    for r, n in enumerate(seq_lens):
        pos = torch.arange(n)
        k, v = torch.randn(2, n, KV_HEADS, head_dim, generator=gen)
        ops.write(cache, k, v, (table[r][pos // block_size] * block_size + pos % block_size).long(), fmt)
    query = torch.randn(3, 3 * KV_HEADS, head_dim, generator=gen)
    args = (query, cache, table.int(), torch.tensor(seq_lens, dtype=torch.int32),
            torch.arange(4, dtype=torch.int32), 1, max(seq_lens), head_dim**-0.5, fmt)
    torch.testing.assert_close(ops.attend(*args), paged.attend(*args), rtol=1e-3, atol=1e-4)


def test_fp8_decode_is_exact_for_every_byte(ops):
    """A context of one token attends with probability exactly 1, so the output is that token's V
    row as the kernel decodes it: every float8 e4m3 byte must come out as torch's own conversion,
    subnormals included, and the two NaN bytes (what a NaN value is stored as) as NaN."""
    fmt = KVFormat(8, 64, fp8=True)
    values = torch.arange(256, dtype=torch.uint8)
    cache = torch.zeros(4, 1, 1, fmt.token_head_bytes, dtype=torch.uint8)
    cache[:, 0, 0, 64:] = values.view(4, 64)  # V rows; K rows 0
    out = ops.attend(torch.ones(4, 1, 64), cache, torch.arange(4, dtype=torch.int32).view(4, 1),
                     torch.ones(4, dtype=torch.int32), torch.arange(5, dtype=torch.int32), 1, 1, 0.125, fmt)
    expected = values.view(torch.float8_e4m3fn).float().view(4, 1, 64)
    assert int(expected.isnan().sum()) == 2
    torch.testing.assert_close(out, expected, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize(("bits", "group", "fp8", "message"), [
    (1, 32, False, "KV bits 1: allowed 16, 8, 6, 4, 2"),
    (4, 6, True, "float8 e4m3 rows are an 8-bit format, not 4-bit"),
    (8, 0, False, "KV group size 0 must divide head_dim 64"),
    (6, 2, False, "KV group size 2 must divide head_dim 64 and be a multiple of 4 for 6-bit codes"),
])
def test_the_ops_refuse_a_bad_layout_by_name(ops, bits, group, fp8, message):
    """The registered ops check quant.check_layout's rules themselves (a caller of
    torch.ops.adaspkv_kv may skip KVFormat): a clear error, not a division by zero."""
    cache = torch.zeros(2, 1, 4, 128, dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=message):
        ops.load().attend_decode(torch.zeros(1, 1, 64), cache, torch.zeros(1, 1, dtype=torch.int32),
                                 torch.ones(1, dtype=torch.int32), 0.125, bits, group, fp8)
    with pytest.raises(RuntimeError, match=message):
        ops.load().write_cache(cache, torch.zeros(1, 1, 2, 64), torch.zeros(1, dtype=torch.int64), bits, group, fp8)


def test_fp8_write_rounds_as_torch_for_every_kind_of_value(ops):
    """The kernel's branch-free float -> e4m3 rounding against torch's .to(float8_e4m3fn) (through
    paged.write): every e4m3 value, every midpoint between neighbours (ties to even) and the floats
    just either side of it, subnormals, both signs, beyond +-448, NaN."""
    every = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    values = every[every.isfinite()].unique()  # sorted, -448 .. 448
    mids = (values[1:] + values[:-1]) / 2
    x = torch.cat([values, mids, mids.nextafter(torch.tensor(1e9)), mids.nextafter(torch.tensor(-1e9)),
                   torch.tensor([500.0, -1e4, 448.1, 1e-10, -1e-10, 2.0**-10, -0.0, float("nan"), -float("nan")]),
                   torch.randn(1024, generator=torch.Generator().manual_seed(0)) * 60])
    x = torch.cat([x, x.new_zeros(-len(x) % 64)]).view(-1, 1, 64)  # [T, 1 head, 64]
    fmt = KVFormat(8, 64, fp8=True)
    cache = torch.zeros(len(x), 1, 1, fmt.token_head_bytes, dtype=torch.uint8)
    expected = cache.clone()
    slots = torch.arange(len(x))
    paged.write(expected, x, -x, slots, fmt)
    ops.write(cache, x, -x, slots, fmt)
    assert torch.equal(cache, expected), f"{int((cache != expected).sum())} of {cache.numel()} bytes differ"
