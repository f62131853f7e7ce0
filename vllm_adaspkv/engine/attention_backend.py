"""vLLM attention backend for a layer whose paged KV cache is quantized to its own bit width.

One backend class per `KVFormat` (made by `backend_for`), because vLLM asks the backend *class*
for the layer's cache spec (`customize_spec`): it turns the layer's `FullAttentionSpec` into uint8
pages of `token_head_bytes` per token and KV head. vLLM then puts all decoder layers in one
`UniformTypeKVCacheSpecs` group whose page is the sum of the layers' pages, so a layer at 4 bits
really takes a quarter of a 16-bit layer's memory. The math is `vllm_adaspkv.kv.paged` (PyTorch, batched); it
runs as the C++ kernels of `vllm_adaspkv.kv.cpu_kernels` on CPU and the Triton kernels of
`vllm_adaspkv.kv.triton_kernels` on CUDA (same signatures, same bytes).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, replace
from types import ModuleType

import torch
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
)
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout

from vllm_adaspkv.kv import paged
from vllm_adaspkv.kv.paged import KVFormat

logger = logging.getLogger("vllm.adaspkv")

# Page layouts this backend reads: [blocks, heads, tokens, bytes] or [blocks, tokens, heads, bytes].
HEADS_FIRST = KVCacheLayout.LBHNC
TOKENS_FIRST = KVCacheLayout.LBNHC


@dataclass
class AdaspkvAttentionMetadata:
    num_actual_tokens: int  # tokens of this step, padding excluded
    max_query_len: int
    max_seq_len: int
    query_start_loc: torch.Tensor  # [R + 1]
    seq_lens: torch.Tensor  # [R], cached + new tokens
    block_table: torch.Tensor  # [R, max blocks]
    slot_mapping: torch.Tensor  # [T]
    heads_first: bool  # the page layout vLLM resolved for this run


@functools.cache
def kv_ops(cuda: bool) -> ModuleType:
    """The module whose write/attend serve the cache: the Triton kernels for CUDA tensors, the
    C++ kernels on CPU (Triton's interpreter is far too slow to serve). Decided per call from the
    tensors' device (a cheap attribute read; the impl is built before it knows its device) and
    logged once per choice. Where the C++ kernels cannot be built, the CPU path is kv.paged (the
    same bytes and attention, several times slower), with a warning that says why."""
    if cuda:
        from vllm_adaspkv.kv import triton_kernels

        logger.info("adaspkv: quantized KV cache on CUDA: Triton kernels (vllm_adaspkv.kv.triton_kernels)")
        return triton_kernels
    from vllm_adaspkv.kv import cpu_kernels

    try:
        cpu_kernels.load()
    except Exception as e:  # no C++ compiler, or headers missing: a slower path, said loudly
        logger.warning("adaspkv: the C++ CPU KV kernels could not be built (%s: %s); the quantized KV "
                       "cache runs on the PyTorch path (vllm_adaspkv.kv.paged), several times slower",
                       type(e).__name__, str(e).splitlines()[0] if str(e) else "")
        return paged
    logger.info("adaspkv: quantized KV cache on CPU: C++ kernels (vllm_adaspkv.kv.cpu_kernels)")
    return cpu_kernels


class AdaspkvMetadataBuilder(AttentionMetadataBuilder[AdaspkvAttentionMetadata]):
    def __init__(self, kv_cache_spec, layer_names, vllm_config, device):
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        layout = vllm_config.cache_config.kv_cache_layout
        self.heads_first = layout is None or layout == HEADS_FIRST.name

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata,
              fast_build: bool = False) -> AdaspkvAttentionMetadata:
        m = common_attn_metadata
        if not (m.causal is True):
            raise NotImplementedError("adaspkv: the quantized KV cache serves causal decoder attention only")
        return AdaspkvAttentionMetadata(
            num_actual_tokens=m.num_actual_tokens, max_query_len=m.max_query_len,
            max_seq_len=m.max_seq_len, query_start_loc=m.query_start_loc, seq_lens=m.seq_lens,
            block_table=m.block_table_tensor, slot_mapping=m.slot_mapping, heads_first=self.heads_first)


class AdaspkvAttentionImpl(AttentionImpl[AdaspkvAttentionMetadata]):
    kv_format: KVFormat  # set on the per-format subclass made by `backend_for`

    def __init__(self, num_heads: int, head_size: int, scale: float, num_kv_heads: int | None = None,
                 alibi_slopes: list[float] | None = None, sliding_window: int | None = None,
                 kv_cache_dtype: str = "auto", logits_soft_cap: float | None = None,
                 attn_type: str = AttentionType.DECODER, kv_sharing_target_layer_name: str | None = None,
                 **unsupported) -> None:
        # Everything below changes the attention math that paged.attend does not implement.
        refused = {"alibi_slopes": alibi_slopes, "sliding_window": sliding_window,
                   "logits_soft_cap": logits_soft_cap or None, "kv_sharing_target_layer_name":
                   kv_sharing_target_layer_name, **{k: v for k, v in unsupported.items() if v is not None}}
        refused = {k: v for k, v in refused.items() if v is not None}
        if refused or attn_type != AttentionType.DECODER:
            raise ValueError(f"adaspkv: a quantized KV-cache layer cannot serve attention with "
                             f"{sorted(refused) or attn_type}; only plain causal decoder attention")
        if head_size != self.kv_format.head_dim:
            raise ValueError(f"adaspkv: layer head_size {head_size} != KV format head_dim {self.kv_format.head_dim}")
        self.num_heads = num_heads
        self.head_size = head_size
        self.scale = float(scale)
        self.num_kv_heads = num_kv_heads or num_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        if current_platform.is_cpu():  # build (or load) the C++ kernels now, not in the first step
            kv_ops(cuda=False)
        elif self.kv_format.fp8:
            raise ValueError("adaspkv: the fp8 KV tier (kv_quant.eight_bit fp8_e4m3) has C++ CPU kernels only; "
                             "the GPU (Triton) kernels store 8 bits as int8 codes: re-export with "
                             "--kv-eight-bit int8 to serve on a GPU")

    def _pages(self, kv_cache: torch.Tensor, heads_first: bool) -> torch.Tensor:
        """This layer's cache as [blocks, kv heads, block_size, token_head_bytes]."""
        return kv_cache if heads_first else kv_cache.transpose(1, 2)

    def do_kv_cache_update(self, layer, key: torch.Tensor, value: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor) -> None:
        from vllm.forward_context import get_forward_context

        metadata = get_forward_context().attn_metadata
        if isinstance(metadata, dict):
            metadata = metadata.get(layer.layer_name)
        heads_first = metadata.heads_first if metadata is not None else True
        kv_ops(key.is_cuda).write(self._pages(kv_cache, heads_first), key, value, slot_mapping, self.kv_format)

    def forward(self, layer, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                kv_cache: torch.Tensor, attn_metadata: AdaspkvAttentionMetadata | None, output: torch.Tensor,
                output_scale: torch.Tensor | None = None,
                output_block_scale: torch.Tensor | None = None) -> torch.Tensor:
        if output_scale is not None or output_block_scale is not None:
            raise NotImplementedError("adaspkv: fused output quantization is not supported")
        if attn_metadata is None:  # profiling and warm-up runs
            return output
        m = attn_metadata
        n = m.num_actual_tokens
        output[:n] = kv_ops(query.is_cuda).attend(
            query[:n], self._pages(kv_cache, m.heads_first), m.block_table, m.seq_lens,
            m.query_start_loc, m.max_query_len, m.max_seq_len, self.scale, self.kv_format)
        return output


class AdaspkvAttentionBackend(AttentionBackend):
    kv_format: KVFormat  # set on the per-format subclass made by `backend_for`
    forward_includes_kv_cache_update = False  # vLLM calls do_kv_cache_update, then forward
    supported_dtypes = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes = ["auto"]

    @staticmethod
    def get_name() -> str:
        return "CUSTOM"

    @classmethod
    def get_impl_cls(cls) -> type[AdaspkvAttentionImpl]:
        return _impl_for(cls.kv_format)

    @staticmethod
    def get_builder_cls() -> type[AdaspkvMetadataBuilder]:
        return AdaspkvMetadataBuilder

    @classmethod
    def supported_kv_cache_layouts(cls) -> tuple[KVCacheLayout, ...]:
        return (HEADS_FIRST, TOKENS_FIRST)

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        """uint8 pages holding `token_head_bytes` per token and KV head (K and V rows)."""
        if spec.head_size != cls.kv_format.head_dim or spec.head_size_v != cls.kv_format.head_dim:
            raise ValueError(f"adaspkv: KV format for head_dim {cls.kv_format.head_dim}, layer has "
                             f"{spec.head_size}/{spec.head_size_v}")
        return replace(spec, dtype=torch.uint8, state_content_bytes=cls.kv_format.token_head_bytes)


def _name(fmt: KVFormat) -> str:
    stored = "fp8" if fmt.fp8 else f"{fmt.bits}bit_g{fmt.group}"
    return f"{stored}_d{fmt.head_dim}{'_hadamard' if fmt.rotate_keys else ''}"


@functools.cache
def _impl_for(fmt: KVFormat) -> type[AdaspkvAttentionImpl]:
    name = f"AdaspkvAttentionImpl_{_name(fmt)}"
    return type(name, (AdaspkvAttentionImpl,), {"kv_format": fmt, "__qualname__": name})


@functools.cache
def backend_for(fmt: KVFormat) -> type[AdaspkvAttentionBackend]:
    """The backend class of one KV format (one per format, so vLLM's dedup by class name groups
    layers of equal format and keeps others apart)."""
    name = f"AdaspkvAttentionBackend_{_name(fmt)}"
    return type(name, (AdaspkvAttentionBackend,), {"kv_format": fmt, "__qualname__": name})
