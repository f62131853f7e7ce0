"""Fused quantize + pack + store of new K/V rows into the paged cache (one Triton kernel).

Grid (tokens, kv heads): one program quantizes one token's K and V row of one head and stores
them at its slot. The layout (bits, head_dim, group, block_size) is tl.constexpr, so each KV
format compiles its own kernel. The arithmetic follows quant.quantize step by step (fp16
scale and zero, then codes against the rounded values; IEEE division; ties to even like
torch.round), so the stored bytes equal paged.write's. Negative slots (vLLM's padding) are
masked inside the kernel: no host sync, no boolean indexing, CUDA-graph safe.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from vllm_adaspkv.kv.paged import KVFormat
from vllm_adaspkv.kv.quant import hadamard_on
from vllm_adaspkv.kv.triton_kernels._host import check_cache, layout_constants, rows_contiguous


@triton.jit
def _round_half_even(y):
    """torch.round's rule: ties go to the even integer (floor(y + 0.5) would send them up)."""
    f = tl.floor(y)
    frac = y - f  # exact for |y| < 2^23
    odd = tl.floor(f * 0.5) * 2.0 != f
    return tl.where((frac > 0.5) | ((frac == 0.5) & odd), f + 1.0, f)


@triton.jit
def _store_f16(ptr, x, mask):
    """fp32 -> fp16 (round to nearest even, as torch's .to) stored as two little-endian bytes."""
    bits = tl.minimum(tl.maximum(x, -65504.0), 65504.0).to(tl.float16).to(tl.uint16, bitcast=True).to(tl.int32)
    tl.store(ptr, (bits & 0xFF).to(tl.uint8), mask=mask)
    tl.store(ptr + 1, (bits >> 8).to(tl.uint8), mask=mask)


@triton.jit
def _quantize_store(x_ptr, row_ptr, valid, BITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                    GROUP: tl.constexpr, PER: tl.constexpr, CODE_BYTES: tl.constexpr,
                    D_P: tl.constexpr, NG_P: tl.constexpr, W_P: tl.constexpr):
    """One vector x [HEAD_DIM] (any float dtype) -> one packed row at row_ptr (if valid)."""
    if BITS == 16:  # raw fp16 values
        d = tl.arange(0, D_P)
        ok = (d < HEAD_DIM) & valid
        _store_f16(row_ptr + 2 * d, tl.load(x_ptr + d, mask=ok, other=0.0).to(tl.float32), ok)
    else:
        LEVELS: tl.constexpr = (1 << BITS) - 1
        NG: tl.constexpr = HEAD_DIM // GROUP
        W: tl.constexpr = GROUP // PER  # words per group; a word = PER codes sharing whole bytes
        WORD_BYTES: tl.constexpr = PER * BITS // 8
        # element (g, w, p) is x[g * GROUP + w * PER + p]: groups along axis 0, words along 1,
        # the codes of one word along 2, so packing is a reduction over axis 2
        g = tl.arange(0, NG_P)
        w = tl.arange(0, W_P)
        p = tl.arange(0, PER)
        real_gw = (g[:, None] < NG) & (w[None, :] < W)  # [NG_P, W_P]: not power-of-two padding
        real = real_gw[:, :, None]
        offs = g[:, None, None] * GROUP + w[None, :, None] * PER + p[None, None, :]
        x = tl.load(x_ptr + offs, mask=real & valid, other=0.0).to(tl.float32)  # [NG_P, W_P, PER]
        low = tl.min(tl.min(tl.where(real, x, float("inf")), axis=2), axis=1)  # [NG_P]
        high = tl.max(tl.max(tl.where(real, x, float("-inf")), axis=2), axis=1)
        g_real = g < NG
        low = tl.where(g_real, low, 0.0)  # padding groups: finite, never stored
        high = tl.where(g_real, high, 0.0)
        # fp16 first, then codes against the stored (rounded) values, as quant.quantize;
        # div_rn: IEEE division like torch's (Triton's `/` is an approximate division on CUDA)
        # clamped to fp16's range (quant.FP16_MAX), so that no group of huge values turns into inf
        scale = tl.minimum(tl.math.div_rn(high - low, tl.full([NG_P], LEVELS, tl.float32)), 65504.0)
        scale = scale.to(tl.float16).to(tl.float32)
        zero = tl.minimum(tl.maximum(low, -65504.0), 65504.0).to(tl.float16).to(tl.float32)
        safe = tl.where(scale > 0, scale, 1.0)
        y = tl.math.div_rn(x - zero[:, None, None], tl.broadcast_to(safe[:, None, None], (NG_P, W_P, PER)))
        q = tl.minimum(tl.maximum(_round_half_even(y), 0.0), LEVELS).to(tl.int32)  # [NG_P, W_P, PER]
        word = tl.sum(q << (p[None, None, :] * BITS), axis=2)  # [NG_P, W_P], first code lowest
        word_idx = g[:, None] * W + w[None, :]
        for j in tl.static_range(WORD_BYTES):  # little-endian bytes of the word
            tl.store(row_ptr + word_idx * WORD_BYTES + j, ((word >> (8 * j)) & 0xFF).to(tl.uint8),
                     mask=real_gw & valid)
        # then per group: scale fp16, zero fp16
        _store_f16(row_ptr + CODE_BYTES + 4 * g, scale, g_real & valid)
        _store_f16(row_ptr + CODE_BYTES + 4 * g + 2, zero, g_real & valid)


@triton.jit
def _write_kernel(cache_ptr, key_ptr, value_ptr, slot_ptr,
                  stride_cb, stride_ch, stride_cn, stride_kt, stride_kh, stride_vt, stride_vh,
                  BLOCK_SIZE: tl.constexpr, BITS: tl.constexpr, HEAD_DIM: tl.constexpr,
                  GROUP: tl.constexpr, PER: tl.constexpr, ROW_BYTES: tl.constexpr,
                  CODE_BYTES: tl.constexpr, D_P: tl.constexpr, NG_P: tl.constexpr, W_P: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)  # int64 offsets: a cache can exceed 2^31 bytes
    h = tl.program_id(1).to(tl.int64)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    valid = slot >= 0
    slot = tl.maximum(slot, 0)  # keeps the (masked) addresses of a padding token inside the cache
    row = cache_ptr + (slot // BLOCK_SIZE) * stride_cb + h * stride_ch + (slot % BLOCK_SIZE) * stride_cn
    _quantize_store(key_ptr + t * stride_kt + h * stride_kh, row, valid,
                    BITS, HEAD_DIM, GROUP, PER, CODE_BYTES, D_P, NG_P, W_P)
    _quantize_store(value_ptr + t * stride_vt + h * stride_vh, row + ROW_BYTES, valid,
                    BITS, HEAD_DIM, GROUP, PER, CODE_BYTES, D_P, NG_P, W_P)


def write(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
          fmt: KVFormat) -> None:
    """Quantize key, value [T', H, D] (T' >= T: rows past the slot mapping are padding) into their
    slots of cache [B, H, N, C]; slot_mapping [T], slot s is block s // N, position s % N; negative
    slots are skipped. Same bytes as paged.write."""
    check_cache(cache, fmt)
    num_tokens, num_heads = slot_mapping.shape[0], cache.shape[1]
    if num_tokens == 0:
        return
    if fmt.rotate_keys:  # Hadamard basis, exactly as paged.encode: fp32 matmul before the kernel
        key = key[:num_tokens].float() @ hadamard_on(fmt.head_dim, key.device)
    key, value = rows_contiguous(key), rows_contiguous(value)
    _write_kernel[(num_tokens, num_heads)](
        cache, key, value, slot_mapping, cache.stride(0), cache.stride(1), cache.stride(2),
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        BLOCK_SIZE=cache.shape[2], **layout_constants(fmt))
