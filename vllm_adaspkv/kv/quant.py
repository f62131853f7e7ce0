"""The KV-cache quantizer: one implementation for the search's simulation, the CPU serving backend
and the reference of the GPU kernels (pure torch, no vLLM import).

A token's K (or V) vector of one head, x [head_dim], is stored as one uint8 row:
    [codes: head_dim * bits / 8 bytes][per group of `group` values: scale fp16, zero fp16]
Codes are asymmetric integers q = round((x - zero) / scale) in [0, 2^bits - 1] with
zero = min(group) and scale = (max - min) / (2^bits - 1); x ~ q * scale + zero. Packing is
little-endian within a byte: 8 bits one code per byte, 4 bits two per byte (first code in the low
nibble), 2 bits four per byte, 6 bits four codes in three bytes (24 bits, first code lowest).
16 bits stores the values themselves as fp16, two bytes each, with no scales.

The 8-bit tier has a second format (`fp8=True`): each value one float8 e4m3 byte (vLLM's fp8 cache with
its default scale of 1: no scales stored, values clipped to +-448), head_dim bytes a row against
head_dim + 4 * head_dim / group for 8-bit codes.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

from vllm_adaspkv.errors import ConfigError

KV_BITS = (16, 8, 6, 4, 2)
SCALE_BYTES = 4  # fp16 scale + fp16 zero point per group
# fp16's largest finite value. Real models' keys and values reach it (SmolLM2's residual stream exceeds
# 20,000, and a group's range can be several times that): scales, zero points and 16-bit values are
# clamped to it before they are stored, so no group turns into inf or NaN; values beyond it clip.
FP16_MAX = 65504.0
FP8_MAX = 448.0  # float8 e4m3's largest finite value: larger keys and values clip to it


def check_layout(bits: int, head_dim: int, group: int, fp8: bool = False) -> None:
    if bits not in KV_BITS:
        raise ConfigError(f"KV bits {bits}: allowed {', '.join(map(str, KV_BITS))}")
    if fp8 and bits != 8:
        raise ConfigError(f"float8 e4m3 is a format of the 8-bit tier, not of {bits}-bit layers")
    if bits == 16 or fp8:
        return
    if group < 1 or head_dim % group:
        raise ConfigError(f"KV group size {group} must divide head_dim {head_dim}")
    per = {8: 1, 6: 4, 4: 2, 2: 4}[bits]  # codes that share whole bytes
    if group % per:
        raise ConfigError(f"{bits}-bit codes pack {per} at a time: the group size {group} must be a multiple of {per}")


def bytes_per_token_head(bits: int, head_dim: int, group: int, fp8: bool = False) -> int:
    """Bytes of one token's K (or V) for one KV head, scales included."""
    check_layout(bits, head_dim, group, fp8)
    if bits == 16:
        return 2 * head_dim
    if fp8:
        return head_dim
    return head_dim * bits // 8 + (head_dim // group) * SCALE_BYTES


def bytes_per_token(bits_per_layer: Sequence[int], num_kv_heads: int, head_dim: int, group: int,
                    dense_element_bytes: int = 2, fp8: bool = False) -> int:
    """KV-cache bytes of one token over the given layers: K and V of every KV head, scales included.
    A 16-bit layer stays in vLLM's own cache, `dense_element_bytes` per value (2: bf16 or fp16);
    with `fp8`, 8-bit layers store float8 e4m3."""
    return sum(2 * num_kv_heads * (dense_element_bytes * head_dim if bits == 16 else
                                   bytes_per_token_head(bits, head_dim, group, fp8 and bits == 8))
               for bits in bits_per_layer)


def quantize(x: torch.Tensor, bits: int, group: int, fp8: bool = False) -> torch.Tensor:
    """x [..., head_dim] (any float dtype) -> uint8 [..., bytes_per_token_head(bits, head_dim, group, fp8)]."""
    head_dim = x.shape[-1]
    check_layout(bits, head_dim, group, fp8)
    if fp8:  # nearest e4m3 value, ties to even; clamped first since e4m3fn has no infinity (overflow is NaN)
        return x.float().clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8)
    if bits == 16:
        return x.float().clamp(-FP16_MAX, FP16_MAX).to(torch.float16).view(torch.uint8).reshape(*x.shape[:-1], 2 * head_dim)
    g = x.float().reshape(*x.shape[:-1], head_dim // group, group)  # [..., groups, group]
    low, high = torch.aminmax(g, dim=-1, keepdim=True)
    levels = 2**bits - 1
    # fp16 first, then quantize against the stored (rounded) values: what dequantize will read
    scale = ((high - low) / levels).clamp_(max=FP16_MAX).to(torch.float16)
    zero = low.clamp(-FP16_MAX, FP16_MAX).to(torch.float16)
    safe = scale.float().masked_fill_(scale == 0, 1.0)  # a constant group: codes 0
    q = torch.round((g - zero.float()) / safe).clamp_(0, levels).to(torch.uint8)  # [..., groups, group]
    codes = _pack(q.reshape(*x.shape[:-1], head_dim), bits)  # [..., head_dim * bits / 8]
    scales = torch.cat([scale, zero], -1).reshape(*x.shape[:-1], -1)  # [..., groups * 2] fp16
    return torch.cat([codes, scales.view(torch.uint8)], -1)


def dequantize(packed: torch.Tensor, bits: int, head_dim: int, group: int,
               dtype: torch.dtype = torch.float32, valid: torch.Tensor | None = None, fp8: bool = False) -> torch.Tensor:
    """uint8 [..., bytes] -> [..., head_dim] in `dtype`. Rows where `valid` (bool, broadcast to
    [...]) is False decode to 0 whatever their bytes hold (a paged cache's unwritten rows may hold
    NaN patterns): the mask is applied to the per-group scales, 1/8 to 1/32 of the values' size."""
    nbytes = bytes_per_token_head(bits, head_dim, group, fp8)
    if packed.shape[-1] != nbytes:
        raise ValueError(f"packed rows have {packed.shape[-1]} bytes; {'fp8' if fp8 else f'{bits}-bit'}, "
                         f"head_dim {head_dim}, group {group} needs {nbytes}")
    lead = packed.shape[:-1]
    if bits == 16 or fp8:
        element = torch.float8_e4m3fn if fp8 else torch.float16
        values = packed.contiguous().view(element).reshape(*lead, head_dim).to(dtype)
        return values if valid is None else torch.where(valid[..., None], values, 0)
    code_bytes = head_dim * bits // 8
    q = _unpack(packed[..., :code_bytes], bits, head_dim).float()  # [..., head_dim]
    scales = packed[..., code_bytes:].contiguous().view(torch.float16).float()
    scales = scales.reshape(*lead, head_dim // group, 2)  # [..., groups, (scale, zero)]
    if valid is not None:
        scales = torch.where(valid[..., None, None], scales, 0)
    g = q.reshape(*lead, head_dim // group, group)
    return g.mul_(scales[..., :1]).add_(scales[..., 1:]).reshape(*lead, head_dim).to(dtype)  # in place: q is ours


def fake_quantize(x: torch.Tensor, bits: int, group: int, fp8: bool = False) -> torch.Tensor:
    """dequantize(quantize(x)): what attention reads back from the cache, in x's dtype."""
    if bits == 16:
        return x.float().clamp(-FP16_MAX, FP16_MAX).to(torch.float16).to(x.dtype)
    return dequantize(quantize(x, bits, group, fp8), bits, x.shape[-1], group, x.dtype, fp8=fp8)


def hadamard(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal Sylvester-Hadamard matrix [n, n] (n a power of two); symmetric, its own inverse.
    Rotating keys by it spreads outlier channels over the whole head before quantization; since
    q . k = (q H) . (k H), attention can read rotated keys with a rotated query."""
    if n < 1 or n & (n - 1):
        raise ConfigError(f"a Hadamard rotation needs a power-of-two head_dim, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return (h / n**0.5).to(dtype)


@functools.lru_cache(maxsize=None)
def hadamard_on(n: int, device: torch.device) -> torch.Tensor:
    """hadamard(n) [n, n] fp32, built once per device: the serving paths rotate on every step, and a
    cached matrix also leaves nothing to copy from the host inside a CUDA graph. Read-only."""
    return hadamard(n, torch.float32).to(device)


def fake_quantize_rotated(x: torch.Tensor, bits: int, group: int, fp8: bool = False) -> torch.Tensor:
    """Keys quantized in the Hadamard basis and rotated back: (Q(x H)) H. x [..., head_dim]."""
    h = hadamard(x.shape[-1], torch.float32)
    rotated = x.float() @ h
    return (fake_quantize(rotated, bits, group, fp8).float() @ h).to(x.dtype)


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """uint8 codes [..., n] -> [..., n * bits / 8]."""
    if bits == 8:
        return q
    if bits in (4, 2):
        # Whole uint8 ops (codes fit their bits, so no shift overflows): on the serving path this
        # runs per layer per step on a handful of tokens, where each tensor op's overhead dominates.
        parts = q.reshape(*q.shape[:-1], -1, 8 // bits)  # [..., n / per, per]
        out = parts[..., 0]
        for i in range(1, 8 // bits):
            out = out | (parts[..., i] << (i * bits))
        return out
    word = q.reshape(*q.shape[:-1], -1, 4).to(torch.int32)  # 6 bits: [..., n / 4, 4] -> 24-bit words
    word = (word << torch.arange(0, 24, 6, dtype=torch.int32, device=q.device)).sum(-1)  # [..., n / 4]
    out = torch.stack([(word >> s) & 0xFF for s in (0, 8, 16)], -1)  # [..., n / 4, 3]
    return out.reshape(*q.shape[:-1], -1).to(torch.uint8)


def _unpack(codes: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """[..., n * bits / 8] -> uint8 codes [..., n], contiguous.

    Each byte (6 bits: each 3 bytes) is widened to an integer as wide as the codes it holds, the
    codes are shifted into one byte each, and the result is read back as bytes (little-endian, as
    the packing is): a few whole-tensor integer ops, all on contiguous memory. Per-position shifts
    of uint8 and an interleaving stack are 3-4x slower on CPU, where decoding the paged context of
    every request is most of what the plugin's attention costs."""
    if bits == 8:
        return codes.contiguous()
    if bits == 4:  # byte b -> int16 holding (b & 15) in its low byte, (b >> 4) in its high byte
        w = codes.to(torch.int16)
        out = (w & 0xF) | ((w << 4) & 0xF00)
    elif bits == 2:  # byte b -> int32 holding its four 2-bit codes, one per byte
        w = codes.to(torch.int32)
        out = (w & 0x3) | ((w << 6) & 0x300) | ((w << 12) & 0x30000) | ((w << 18) & 0x3000000)
    else:  # 6 bits: 3 bytes (one 24-bit word, padded to 32) -> int32 holding 4 codes, one per byte
        triples = codes.contiguous().reshape(*codes.shape[:-1], -1, 3)  # [..., n / 4, 3] (padding a strided view is 1.4x slower)
        w = torch.nn.functional.pad(triples, (0, 1)).view(torch.int32)  # [..., n / 4, 1]
        out = (w & 0x3F) | ((w << 2) & 0x3F00) | ((w << 4) & 0x3F0000) | ((w << 6) & 0x3F000000)
    return out.contiguous().view(torch.uint8).reshape(*codes.shape[:-1], n)
