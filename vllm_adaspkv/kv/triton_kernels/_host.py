"""Host-side helpers shared by the kernel wrappers (plain Python and torch, no @triton.jit)."""

from __future__ import annotations

import torch
import triton

from vllm_adaspkv.kv.paged import KVFormat


def layout_constants(fmt: KVFormat) -> dict[str, int]:
    """The row layout as compile-time constants (one compiled kernel per KV format)."""
    if fmt.fp8:
        raise ValueError("the Triton KV kernels have no float8 e4m3 rows (the fp8 tier is served on CPU only)")
    per = {16: 1, 8: 1, 6: 4, 4: 2, 2: 4}[fmt.bits]  # codes that share whole bytes (a "word")
    group = fmt.head_dim if fmt.bits == 16 else fmt.group
    return dict(
        BITS=fmt.bits, HEAD_DIM=fmt.head_dim, GROUP=group, PER=per,
        ROW_BYTES=fmt.row_bytes, CODE_BYTES=fmt.head_dim * fmt.bits // 8,
        # tl.arange needs powers of two: tiles are padded and the padding lanes masked
        D_P=triton.next_power_of_2(fmt.head_dim), NG_P=triton.next_power_of_2(fmt.head_dim // group),
        W_P=triton.next_power_of_2(group // per))


def check_cache(cache: torch.Tensor, fmt: KVFormat) -> None:
    """cache [B, H, N, C] uint8, any strides but bytes of a row contiguous (vLLM's page views)."""
    if cache.dim() != 4 or cache.dtype != torch.uint8 or cache.shape[3] != fmt.token_head_bytes:
        raise ValueError(f"cache {tuple(cache.shape)} {cache.dtype}: expected uint8 [blocks, kv heads, "
                         f"block_size, {fmt.token_head_bytes}]")
    if cache.stride(3) != 1:
        raise ValueError("cache rows must be contiguous bytes (stride 1 in the last dimension)")


def rows_contiguous(x: torch.Tensor) -> torch.Tensor:
    """x with stride 1 in its last dimension (the kernels index head_dim without a stride);
    a no-op for vLLM's q/k/v views."""
    return x if x.stride(-1) == 1 else x.contiguous()
