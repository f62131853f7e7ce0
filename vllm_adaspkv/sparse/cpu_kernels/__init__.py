"""C++ kernels for packed sparse weights on CPU: y = x W^T read straight from the packed form.

Decode on a CPU is bound by the bytes of weights read per token; the packed form (`sparse.packing`)
reads (1 - s) x 16 + 1 bits a bf16 weight. `linear` runs the kernel for a few rows of x (decode) and,
for many rows (prefill), expands the weight into a dense scratch and calls torch's GEMM, whose compute
the kernel does not beat there. The extension is compiled by torch.utils.cpp_extension on first use
(about a minute on 2 cores) and cached under ~/.cache/torch_extensions, as the KV kernels are.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F

from vllm_adaspkv.cpp_build import OPENMP_FLAGS
from vllm_adaspkv.sparse.packing import PackedWeight

logger = logging.getLogger("vllm.adaspkv")
SOURCE = Path(__file__).with_name("packed_linear_cpu.cpp")
# Rows of x above which `linear` expands the weight for the call and runs torch's GEMM instead of the
# kernel: measured on 2 threads (results/packed-linear-cpu, 4096x4096): kernel 20.0 ms against 22.8 at
# 64 rows, 38.1 against 27.2 at 128. (Against a dense weight kept in memory the kernel stops paying from
# about 8 rows.) Not re-tuned for one thread, which is what vLLM's CPU worker gets on a 2-core machine (it
# reserves the other core): there the earlier one-thread measurement put the crossover at 16-32 rows.
MAX_KERNEL_ROWS = 64


@functools.cache
def load() -> ModuleType:
    """The compiled extension (built once per machine and source version, then loaded from cache)."""
    from torch.utils.cpp_extension import load as build

    logger.info("adaspkv: loading the C++ packed sparse linear kernels (compiled on first use, about a minute)")
    return build(name=f"adaspkv_packed_linear_cpu_{_cpu_tag()}", sources=[str(SOURCE)],
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
        return F.linear(x, unpack_dense(packed).to(x.dtype), bias)
    out = matmul(x, packed)  # float32: the bias is added before the one rounding to x's dtype
    return (out if bias is None else out + bias.float()).to(x.dtype)


@_packed_linear.register_fake
def _(x, bitmask, values, row_offsets, cols, bias):
    return x.new_empty((x.shape[0], bitmask.shape[0]))


def linear(x: torch.Tensor, packed: PackedWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, W, bias) for x [..., cols] in x's dtype: the kernel for up to MAX_KERNEL_ROWS rows,
    otherwise a dense GEMM over the weight expanded for this call only."""
    rows = x.reshape(-1, x.shape[-1])
    out = _packed_linear(rows, packed.bitmask, packed.values, packed.row_offsets, packed.cols, bias)
    return out.reshape(*x.shape[:-1], packed.shape[0])
