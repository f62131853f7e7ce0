"""Compiler flags the plugin's C++ extensions (kv.cpu_kernels, sparse.cpu_kernels) share."""

from __future__ import annotations

import sys

# at::parallel_for is inline OpenMP: compiled without -fopenmp it runs on one thread. With it, an
# extension links libgomp.so.1 and, loaded after torch, shares torch's copy (same soname) and its
# thread count. GCC on Linux, where vLLM's CPU backend runs; Apple's clang has no -fopenmp (one
# thread there).
OPENMP_FLAGS = ["-fopenmp"] if sys.platform == "linux" else []
