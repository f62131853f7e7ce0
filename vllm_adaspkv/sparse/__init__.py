"""Pruned weights kept packed for serving: tensor math and kernels, no vLLM, no files.

`packing`: the packed form of a pruned weight (bitmask + kept values + row offsets), pack and unpack.
`cpu_kernels/`: y = x W^T from the packed form in C++ (AVX-512 and portable paths, built on first
use), the CPU serving path of packed linears.
"""
