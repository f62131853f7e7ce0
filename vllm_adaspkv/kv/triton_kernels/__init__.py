"""Triton kernels for the quantized paged KV cache: the CUDA path of the attention backend.

`write` and `attend` take the arguments of `paged.write` / `paged.attend` (the PyTorch
reference they are tested against) and produce the same cache bytes and the same attention. No
vLLM import here: the attention backend decides when to call them (CUDA tensors).

Each kernel module is self-contained (its @triton.jit helpers live beside its kernel), so a test
can load a fresh copy of it under TRITON_INTERPRET=1 and run it on CPU.
"""

from vllm_adaspkv.kv.triton_kernels.cache_write import write
from vllm_adaspkv.kv.triton_kernels.paged_attention import attend

__all__ = ["attend", "write"]
