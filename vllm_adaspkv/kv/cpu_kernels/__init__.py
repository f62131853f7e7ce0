"""C++ kernels for the quantized paged KV cache: the CPU path of the attention backend.

`write` and `attend` take the arguments of `paged.write` / `paged.attend` (the PyTorch
reference they are tested against) and produce the same cache bytes and the same attention. The
PyTorch path costs ~50 tensor ops per layer and step; on a CPU serving a small batch their
overhead, not the arithmetic, is most of the step, and vLLM's stock cache runs one fused C++ op.
These do the work in one pass: `write` quantizes and packs each K/V row straight into its slot;
`attend` decodes each cached row once inside the attention loop, for the decode requests of a
step (one new token each). Requests with several new tokens (prefill, chunked prefill) go to
kv.paged's batched PyTorch attention: they are a small share of a serving step's requests.

The extension (paged_kv_cpu.cpp, the row format in kv_rows.h) is compiled by
torch.utils.cpp_extension on first use (about a minute on 2 cores, with the C++ compiler that
torch.compile on CPU needs too) and cached under ~/.cache/torch_extensions; `load` builds it up
front, the attention backend calls it when it is constructed on CPU. Its ops are registered
with PyTorch's dispatcher as torch.ops.adaspkv_kv.* (so profilers name them) and run on torch's
intra-op threads.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

from vllm_adaspkv.cpp_build import OPENMP_FLAGS
from vllm_adaspkv.kv import paged
from vllm_adaspkv.kv.paged import KVFormat
from vllm_adaspkv.kv.quant import hadamard_on

logger = logging.getLogger("vllm.adaspkv")
SOURCE = Path(__file__).with_name("paged_kv_cpu.cpp")


@functools.cache
def load():
    """The extension's ops, torch.ops.adaspkv_kv (built once per machine and source version, then
    loaded from cache)."""
    from torch.utils.cpp_extension import load as build

    logger.info("adaspkv: loading the C++ CPU KV kernels (compiled on first use, about a minute)")
    # -march=native: the build is this machine's; the name carries the CPU's vector ISA, so a cache
    # directory shared with another kind of CPU builds its own copy instead of loading this one.
    isa = torch.backends.cpu.get_cpu_capability().lower()
    # is_python_module=False: the library registers torch.ops.adaspkv_kv.* (named in profiles)
    build(name=f"adaspkv_paged_kv_cpu_{isa}", sources=[str(SOURCE)], is_python_module=False,
          extra_cflags=["-O3", "-march=native", *OPENMP_FLAGS, "-ffp-contract=off"], extra_ldflags=OPENMP_FLAGS,
          verbose=False)
    return torch.ops.adaspkv_kv


def write(cache: torch.Tensor, key: torch.Tensor, value: torch.Tensor, slot_mapping: torch.Tensor,
          fmt: KVFormat) -> None:
    """paged.write: key, value [T, H, D] into their slots of cache [B, H, N, C]; negative slots
    (vLLM's padding) are skipped, rows past the slot mapping ignored."""
    n = slot_mapping.shape[0]
    kv = paged.kv_to_store(key[:n], value[:n], fmt)  # [T, H, 2, D]
    load().write_cache(cache, kv, slot_mapping.long(), fmt.bits, fmt.group, fmt.fp8)


def attend(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, seq_lens: torch.Tensor,
           query_start_loc: torch.Tensor, max_query_len: int, max_seq_len: int, scale: float,
           fmt: KVFormat) -> torch.Tensor:
    """paged.attend, its decode requests in C++."""
    return paged.attend_with_decode(_attend_decode, query, cache, block_table, seq_lens, query_start_loc,
                                    max_query_len, max_seq_len, scale, fmt)


def _attend_decode(query: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor,
                   seq_lens: torch.Tensor, max_seq_len: int, scale: float, fmt: KVFormat) -> torch.Tensor:
    """One new token per request, query [R, Hq, D] -> [R, Hq, D] in query's dtype."""
    q = query.float()
    if fmt.rotate_keys:  # keys are stored in the Hadamard basis: rotate the query instead
        q = q @ hadamard_on(fmt.head_dim, q.device)
    out = load().attend_decode(q.contiguous(), cache, block_table.int(), seq_lens.int().contiguous(), scale,
                               fmt.bits, fmt.group, fmt.fp8)
    return out.to(query.dtype)
