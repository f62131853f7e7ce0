"""C++ kernels for packed sparse weights on CPU: y = x W^T read straight from the packed form.

Decode on a CPU is bound by the bytes of weights read per token; the packed form (`sparse.packing`)
reads (1 - s) x 16 + 1 bits a bf16 weight. `linear` runs the kernel for a few rows of x (decode) and,
for many rows (prefill), expands the weight a tile of rows at a time into a dense scratch and calls
torch's GEMM on each tile, whose compute the kernel does not beat there. The extension is compiled by
torch.utils.cpp_extension on first use (about a minute on 2 cores) and cached under
~/.cache/torch_extensions, as the KV kernels are.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from vllm_adaspkv.cpp_build import OPENMP_FLAGS
from vllm_adaspkv.sparse import packing
from vllm_adaspkv.sparse.packing import PackedWeight

logger = logging.getLogger("vllm.adaspkv")
# the torch operators and the kernels they call (packed_rows.h declares them)
SOURCES = [Path(__file__).with_name(name) for name in ("packed_linear_cpu.cpp", "packed_rows.cpp")]
# Rows of x above which `linear` runs torch's GEMM over the weight expanded a tile at a time instead of
# the kernel. Measured at 4096x4096, sparsity 0.5 (results/packed-linear-cpu, the crossover tables): at
# 48 rows the kernel is level on one thread (vLLM's CPU worker on a 2-core machine) and ahead on two;
# at 64 the tiled GEMM is ahead on both (15.3 against 20.3 ms, 7.6 against 8.6).
MAX_KERNEL_ROWS = 48
# Bytes of one tile of expanded weight rows: the scratch that `expanded_linear` fills and multiplies, one
# tile after another. Expanding a whole weight at once into a fresh buffer costs its page faults (a
# 4096x4096 bf16 weight: 34 ms against 12 for the GEMM at 64 rows of x, one thread, fresh process); a tile
# this small comes back from the allocator's free list. 2-16 MiB measured: 4 MiB is level with 2 at 64
# rows and close to 8 at 256 (benchmarks/packed_linear_cpu.py's crossover table).
EXPAND_TILE_BYTES = 4 * 2**20


@functools.cache
def load() -> ModuleType:
    """The compiled extension (built once per machine and source version, then loaded from cache)."""
    from torch.utils.cpp_extension import load as build

    logger.info("adaspkv: loading the C++ packed sparse linear kernels (compiled on first use, about a minute)")
    return build(name=f"adaspkv_packed_linear_cpu_{_cpu_tag()}", sources=[str(source) for source in SOURCES],
                 extra_cflags=["-O3", "-march=native", *OPENMP_FLAGS], extra_ldflags=OPENMP_FLAGS, verbose=False)


def _cpu_tag() -> str:
    """The build is -march=native: its cache name carries the vector extensions it may use, so that a cache
    directory shared with another kind of CPU (AVX-512 without VBMI2 or BF16, say) builds its own copy."""
    flags = set()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        line = next((ln for ln in cpuinfo.read_text().splitlines() if ln.startswith("flags")), "")
        flags = set(line.split(":", 1)[-1].split())
    extensions = "_".join(f for f in ("avx512_vbmi2", "avx512_bf16") if f in flags)
    return "_".join(filter(None, [torch.backends.cpu.get_cpu_capability().lower(), extensions]))


def isa() -> str:
    """The fast paths of this machine's build: "avx512-vbmi2+bf16", "avx512-vbmi2" or "portable"."""
    return load().isa()


def matmul(x: torch.Tensor, packed: PackedWeight, portable: bool = False) -> torch.Tensor:
    """x [T, cols] -> x W^T [T, rows] in float32, from the packed form, by the kernel (any T)."""
    return load().packed_linear(x, packed.bitmask, packed.values, packed.row_offsets, packed.cols, portable)


def unpack_dense(packed: PackedWeight) -> torch.Tensor:
    """The dense weight [rows, cols] in the values' dtype (zeros where pruned), in C++."""
    return load().unpack_dense(packed.bitmask, packed.values, packed.row_offsets, packed.cols)


@torch.library.custom_op("adaspkv::packed_linear", mutates_args=())
def _packed_linear(x: torch.Tensor, bitmask: torch.Tensor, values: torch.Tensor, row_offsets: torch.Tensor,
                   cols: int, bias: torch.Tensor | None) -> torch.Tensor:
    """x [T, cols] -> [T, rows] in x's dtype. An opaque op for torch.compile (vLLM compiles the model's
    forward): the kernel and the row-count branch run eagerly inside it."""
    packed = PackedWeight(bitmask, values, row_offsets, cols)
    if x.shape[0] > MAX_KERNEL_ROWS:
        return expanded_linear(x, packed, bias, expand_tile_rows(packed))
    out = matmul(x, packed)  # float32: the bias is added before the one rounding to x's dtype
    return (out if bias is None else out + bias.float()).to(x.dtype)


def expand_tile_rows(packed: PackedWeight) -> int:
    """Output rows per tile of `expanded_linear`: EXPAND_TILE_BYTES of dense weight, a multiple of 16."""
    return max(16, EXPAND_TILE_BYTES // (packed.cols * packed.values.element_size()) // 16 * 16)


def expanded_linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None,
                    tile_rows: int) -> torch.Tensor:
    """F.linear(x, W, bias) for x [T, cols] in x's dtype, by torch's GEMM over W expanded `tile_rows`
    output rows at a time into a scratch (prefill: many rows of x, where the kernel loses to a GEMM)."""
    rows = packed.shape[0]
    out = x.new_empty((x.shape[0], rows))  # [T, rows]
    for start in range(0, rows, tile_rows):
        stop = min(rows, start + tile_rows)
        weight = unpack_dense(packing.row_range(packed, start, stop)).to(x.dtype)  # [stop - start, cols]
        out[:, start:stop] = F.linear(x, weight, None if bias is None else bias[start:stop])
    return out


@_packed_linear.register_fake
def _(x, bitmask, values, row_offsets, cols, bias):
    return x.new_empty((x.shape[0], bitmask.shape[0]))


def linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, W, bias) for x [..., cols] in x's dtype: the kernel for up to MAX_KERNEL_ROWS rows,
    otherwise torch's GEMM over the weight expanded a tile at a time, for this call only."""
    rows = x.reshape(-1, x.shape[-1])
    out = _packed_linear(rows, packed.bitmask, packed.values, packed.row_offsets, packed.cols, bias)
    return out.reshape(*x.shape[:-1], packed.shape[0])
