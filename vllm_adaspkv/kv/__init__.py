"""The quantized KV cache as tensor math: no vLLM, no files.

`quant`: the one KV quantizer (codes, scales, bytes per token), used by the search's simulation, the
serving backend and the kernels' tests alike. `paged`: a paged cache of quantized rows and the
attention that reads it, in batched PyTorch: the reference of the kernels and the fallback path.
`cpu_kernels/`: the same write and attention in C++ (built on first use), the CPU serving path.
`triton_kernels/`: the same in Triton, the CUDA serving path.
"""
