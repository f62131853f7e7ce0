"""Language-model linears served packed (bitmask + kept values, `vllm_adaspkv.sparse`) on CPU.

vLLM fuses q/k/v into one `qkv_proj` and gate/up into one `gate_up_proj`, whose weights are the
members' weights stacked row-wise. A fused module is packed when the plan says `weight_format:
"packed"` and every member's sparsity is at least `PACK_MIN_SPARSITY`; each member's Hugging Face
tensor is packed as it streams in and never reaches vLLM's dense parameter (allocated by torch.empty
and never written, so it takes no resident memory; it is then dropped), and the module's linear
method becomes `PackedLinearMethod`. Modules below the threshold, or any module when the plan
cannot be packed here (a GPU, tensor parallelism), are served masked-dense and the log says so.
"""

from __future__ import annotations

import logging

import torch
from vllm.model_executor.layers.linear import LinearMethodBase

from vllm_adaspkv.format import LINEARS, Plan, mask_key
from vllm_adaspkv.sparse import cpu_kernels
from vllm_adaspkv.sparse.packing import PackedWeight, stack_rows

logger = logging.getLogger("vllm.adaspkv")
# vLLM's module of each linear, members in the row order of its fused weight
FUSED = {"self_attn.qkv_proj": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
         "self_attn.o_proj": ("self_attn.o_proj",), "mlp.gate_up_proj": ("mlp.gate_proj", "mlp.up_proj"),
         "mlp.down_proj": ("mlp.down_proj",)}
assert sorted(m for members in FUSED.values() for m in members) == sorted(LINEARS)
# Measured (results/packed-linear-cpu, 4096x4096 bf16): at batch 1 the kernel beats torch's dense matmul at
# any sparsity (1.6x at 0 %, 2.2x at 30 %); at batch 4 it breaks even near 50 % (0.82x at 30 %). From 30 %
# a packed weight also takes <= 0.76x the memory; below it the gain is too thin to give up the dense GEMM.
PACK_MIN_SPARSITY = 0.3


class PackedLinearMethod(LinearMethodBase):
    """y = x W^T + b from the layer's packed buffers (`packed_bitmask`, `packed_values`,
    `packed_row_offsets`); the layer's dense weight was never filled."""

    def create_weights(self, *args, **kwargs):
        raise NotImplementedError("PackedLinearMethod replaces the method of a built layer; it creates no weights")

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        pass  # packed when loaded

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        packed = PackedWeight(layer.packed_bitmask, layer.packed_values, layer.packed_row_offsets,
                              layer.packed_in_features)
        return cpu_kernels.linear(x, packed, bias)


def packed_modules(plan: Plan, device: str, tensor_parallel: int, pipeline_parallel: int = 1
                   ) -> dict[str, tuple[str, ...]]:
    """vLLM module name (language_model.model.layers.N.<fused>) -> the mask keys of its members, in row
    order, for every module served packed. Logs why none is when the plan asks for packed weights."""
    if plan.weight_format != "packed":
        return {}
    if device != "cpu" or tensor_parallel != 1 or pipeline_parallel != 1:
        logger.warning("adaspkv: the plan asks for packed weights, but they are served on CPU with "
                       "tensor_parallel_size 1 and pipeline_parallel_size 1 only (here: %s, %d, %d): serving "
                       "MASKED DENSE weights instead", device, tensor_parallel, pipeline_parallel)
        return {}
    modules = {}
    for i, layer in enumerate(plan.layers):
        for fused, members in FUSED.items():
            if all(layer.sparsity.get(m, 0.0) >= PACK_MIN_SPARSITY for m in members):
                modules[f"language_model.model.layers.{i}.{fused}"] = tuple(mask_key(i, m) for m in members)
    return modules


def install_packed_linears(model: torch.nn.Module, modules: dict[str, tuple[str, ...]],
                           parts: dict[str, PackedWeight]) -> set[str]:
    """Gives each module of `modules` its members' packed weights and the packed linear method, drops its
    dense weight, logs the resident bytes per layer; returns the weight names thus loaded."""
    by_name = dict(model.named_modules())
    loaded, table = set(), {}
    for name, keys in modules.items():
        missing = [key for key in keys if key not in parts]
        if missing or name not in by_name:
            raise RuntimeError(f"adaspkv: cannot pack {name}: weights {missing} did not stream in"
                               if missing else f"adaspkv: the model has no module {name} to pack")
        module = by_name[name]
        if isinstance(module.quant_method, PackedLinearMethod):
            raise RuntimeError(f"adaspkv: {name} is packed already; reloading the weights of a packed model is "
                               "not supported: start the server again")
        packed = stack_rows([parts.pop(key) for key in keys])
        if packed.values.dtype != module.weight.dtype:  # the checkpoint's dtype, not the served one
            packed = PackedWeight(packed.bitmask, packed.values.to(module.weight.dtype), packed.row_offsets,
                                  packed.cols)
        dense_bytes = module.weight.numel() * module.weight.element_size()
        if tuple(module.weight.shape) != packed.shape:
            raise RuntimeError(f"adaspkv: {name} has weight {tuple(module.weight.shape)}; its packed members "
                               f"stack to {packed.shape}")
        for field in ("bitmask", "values", "row_offsets"):
            module.register_buffer(f"packed_{field}", getattr(packed, field), persistent=False)
        module.packed_in_features = packed.cols
        module.weight = torch.nn.Parameter(module.weight.new_empty(0, packed.cols), requires_grad=False)
        module.quant_method = PackedLinearMethod()
        loaded.add(f"{name}.weight")
        layer = int(name.split(".layers.")[1].split(".")[0])
        row = table.setdefault(layer, [[], 0, 0])
        row[0].append(name.rsplit(".", 1)[1])
        row[1] += packed.nbytes
        row[2] += dense_bytes
    if table:
        lines = [f"  layer {i:>3}: {', '.join(names)}: {packed / 2**20:.1f} MiB resident, dense "
                 f"{dense / 2**20:.1f} MiB ({packed / dense:.2f}x)"
                 for i, (names, packed, dense) in sorted(table.items())]
        total_packed, total_dense = sum(r[1] for r in table.values()), sum(r[2] for r in table.values())
        # measured (results/packed-linear-cpu): faster than dense up to 4 rows of x a step, slower from 8
        logger.info("adaspkv: packed sparse linears (C++ kernel %s), %.1f MiB instead of %.1f MiB dense; faster "
                    "than dense for decode batches up to 4, slower from 8:\n%s",
                    cpu_kernels.isa(), total_packed / 2**20, total_dense / 2**20, "\n".join(lines))
    return loaded
