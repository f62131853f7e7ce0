"""Paged attention over the quantized cache, dequantizing inside the kernel (one Triton kernel).

Grid (query tokens, kv heads): one program takes one new token and the Hq / Hkv query heads that
share a KV head (GQA: the K/V pages are read once for all of them), finds its request by binary
search in query_start_loc, and walks that request's pages through the block table with an online
softmax. The token at absolute position pos = seq_len - q_len + i sees keys 0..pos, so prefill,
decode, chunked prefill and prefix hits are one case, and nothing at or past seq_len is read:
unwritten blocks (garbage, NaN once decoded) never reach the arithmetic. The row layout and the
block size are tl.constexpr. Simple first: scores are broadcast products, not tl.dot, which suits
decode (a GEMV per KV head) more than long prefills.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from vllm_adaspkv.kv.paged import KVFormat
from vllm_adaspkv.kv.quant import hadamard_on
from vllm_adaspkv.kv.triton_kernels._host import check_cache, layout_constants, rows_contiguous


@triton.jit
def _load_f16(ptr, mask):
    """Two little-endian bytes -> the fp16 they hold, as fp32 (0 where masked)."""
    lo = tl.load(ptr, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _dequant(rows, mask, d, BITS: tl.constexpr, GROUP: tl.constexpr, CODE_BYTES: tl.constexpr):
    """rows [N, 1] byte pointers to packed rows, d [1, D_P] -> values [N, D_P] fp32, 0 where masked."""
    if BITS == 16:
        x = _load_f16(rows + 2 * d, mask)
    else:
        bit = d * BITS  # codes are little-endian bit fields, first code lowest
        shift = bit % 8
        c = tl.load(rows + bit // 8, mask=mask, other=0).to(tl.int32)
        if BITS == 6:  # a 6-bit code at bit offset 4 or 6 straddles into the next byte (same row)
            c = c | (tl.load(rows + bit // 8 + 1, mask=mask & (shift > 2), other=0).to(tl.int32) << 8)
        code = (c >> shift) & ((1 << BITS) - 1)
        scales = rows + CODE_BYTES + (d // GROUP) * 4  # per group: scale fp16, zero fp16
        x = code.to(tl.float32) * _load_f16(scales, mask) + _load_f16(scales + 2, mask)
    return x


@triton.jit
def _attend_kernel(out_ptr, q_ptr, cache_ptr, block_table_ptr, seq_lens_ptr, qsl_ptr, num_reqs, qk_scale,
                   stride_ot, stride_oh, stride_qt, stride_qh, stride_cb, stride_ch, stride_cn, stride_bt,
                   BLOCK_SIZE: tl.constexpr, BITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                   GROUP: tl.constexpr, ROW_BYTES: tl.constexpr, CODE_BYTES: tl.constexpr,
                   D_P: tl.constexpr, QPK: tl.constexpr, QPK_P: tl.constexpr):
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    # The request of token t: the last r with query_start_loc[r] <= t (this skips empty requests).
    lo = tl.full([], 0, tl.int32)
    hi = tl.full([], 0, tl.int32) + num_reqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        before = tl.load(qsl_ptr + mid) <= t
        lo = tl.where(before, mid, lo)
        hi = tl.where(before, hi, mid - 1)
    q_start = tl.load(qsl_ptr + lo)
    q_len = tl.load(qsl_ptr + lo + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + lo)
    # Causal: the token at position seq_len - q_len + (t - q_start) sees keys up to it. The minimum
    # keeps a stray row past the request's tokens from reading beyond seq_len.
    kv_len = tl.minimum(seq_len - q_len + (t - q_start) + 1, seq_len)

    i = tl.arange(0, QPK_P)  # query heads of this KV head (padded to a power of two)
    d = tl.arange(0, D_P)
    heads = kvh * QPK + i
    q_mask = (i[:, None] < QPK) & (d[None, :] < HEAD_DIM)
    q_rows = q_ptr + t.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + d[None, :]
    # softmax scale and log2(e) folded into the query once: exp2 below
    q = tl.load(q_rows, mask=q_mask, other=0.0).to(tl.float32) * qk_scale  # [QPK_P, D_P]

    m = tl.full([QPK_P], float("-inf"), tl.float32)  # running max of the scores
    l = tl.zeros([QPK_P], tl.float32)  # running sum of exp2(score - m)
    acc = tl.zeros([QPK_P, D_P], tl.float32)
    n = tl.arange(0, BLOCK_SIZE)
    d_ok = d[None, :] < HEAD_DIM
    head_pages = cache_ptr + kvh.to(tl.int64) * stride_ch
    table = block_table_ptr + lo.to(tl.int64) * stride_bt
    for j in range(0, tl.cdiv(kv_len, BLOCK_SIZE)):
        block = tl.load(table + j).to(tl.int64)  # int64: a cache can exceed 2^31 bytes
        seen = j * BLOCK_SIZE + n < kv_len  # [N]
        rows = head_pages + block * stride_cb + n[:, None] * stride_cn  # [N, 1], each [K row | V row]
        mask = seen[:, None] & d_ok  # unseen rows are not even loaded: they may be garbage
        k = _dequant(rows, mask, d[None, :], BITS, GROUP, CODE_BYTES)  # [N, D_P]
        v = _dequant(rows + ROW_BYTES, mask, d[None, :], BITS, GROUP, CODE_BYTES)
        s = tl.sum(q[:, None, :] * k[None, :, :], axis=2)  # [QPK_P, N]
        s = tl.where(seen[None, :], s, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))  # finite: key 0 is seen in the first block
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.sum(p[:, :, None] * v[None, :, :], axis=1)
        m = m_new
    out = acc / tl.where(l > 0, l, 1.0)[:, None]  # l == 0 only for a row with no keys: output 0
    out_rows = out_ptr + t.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(out_rows, out.to(out_ptr.dtype.element_ty), mask=q_mask)


def attend(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
           query_start_loc: torch.Tensor, max_query_len: int, max_seq_len: int, scale: float,
           fmt: KVFormat) -> torch.Tensor:
    """paged.attend on the GPU: query [T, Hq, D] (request r's new tokens at rows
    query_start_loc[r]:[r+1]), cache [B, Hkv, N, C] (any strides, rows contiguous), block_table
    [R, >= blocks], seq_lens [R] -> [T, Hq, D] in query's dtype. max_query_len and max_seq_len are
    accepted for the same signature; the kernel reads the lengths on the device (no host sync)."""
    check_cache(cache, fmt)
    num_tokens, num_heads, head_dim = query.shape
    num_kv_heads = cache.shape[1]
    if head_dim != fmt.head_dim or num_heads % num_kv_heads:
        raise ValueError(f"query {tuple(query.shape)}: head_dim {fmt.head_dim} and a multiple of "
                         f"{num_kv_heads} KV heads expected")
    out = torch.empty(num_tokens, num_heads, head_dim, dtype=query.dtype, device=query.device)
    if num_tokens == 0:
        return out
    q = query.float() @ hadamard_on(head_dim, query.device) if fmt.rotate_keys else query
    q, block_table = rows_contiguous(q), rows_contiguous(block_table)
    consts = layout_constants(fmt)
    qpk = num_heads // num_kv_heads
    _attend_kernel[(num_tokens, num_kv_heads)](
        out, q, cache, block_table, seq_lens, query_start_loc, seq_lens.shape[0], scale * math.log2(math.e),
        out.stride(0), out.stride(1), q.stride(0), q.stride(1), cache.stride(0), cache.stride(1),
        cache.stride(2), block_table.stride(0),
        BLOCK_SIZE=cache.shape[2], BITS=fmt.bits, HEAD_DIM=head_dim, GROUP=consts["GROUP"],
        ROW_BYTES=fmt.row_bytes, CODE_BYTES=consts["CODE_BYTES"], D_P=consts["D_P"],
        QPK=qpk, QPK_P=triton.next_power_of_2(qpk))
    return out
