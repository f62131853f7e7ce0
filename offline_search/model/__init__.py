"""Adapters over a transformers LLaVA: what the search does to a model in memory.

`llava`: the model's prunable linears by mask key. `calibration`: forward hooks gathering per-linear
input statistics. `pruner`: masks at any sparsity without reloading. `kv_simulation`: the serving KV
quantizer inside the model's attention. `objective`: the search's quality measure.
"""
