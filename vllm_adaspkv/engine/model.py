"""The LLaVA that serves an artifact: vLLM's LLaVA with masked language-model weights and a
quantized paged KV cache in every decoder layer whose plan asks for fewer than 16 bits.

Built in the worker process from `VllmConfig.additional_config["adaspkv"]["artifact"]`, which the
front end (`routing`) set after checking the artifact; nothing reaches here through module state.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.llava import LlavaForConditionalGeneration

from vllm_adaspkv.engine.attention_backend import backend_for
from vllm_adaspkv.engine.packed_linears import install_packed_linears, packed_modules
from vllm_adaspkv.engine.serving_plan import ServedArtifact, describe_artifact, kv_formats, startup_table
from vllm_adaspkv.engine.settings import ADDITIONAL_CONFIG_KEY, served_artifact_path, served_model_dir
from vllm_adaspkv.engine.weight_stream import ArtifactWeights
from vllm_adaspkv.format import ArtifactError

logger = logging.getLogger("vllm.adaspkv")


def served_artifact(vllm_config) -> ServedArtifact:
    artifact = served_artifact_path(vllm_config.additional_config)
    if artifact is None:
        raise ArtifactError(f"{type(vllm_config).__name__}.additional_config[{ADDITIONAL_CONFIG_KEY!r}] names no "
                            "artifact: serve an artifact directory (one with adaspkv.json) with the plugin installed")
    # the front end already ran the full open_artifact and found the checkpoint to load
    return describe_artifact(artifact, served_model_dir(vllm_config.additional_config))


def decoder_attention_layers(model: torch.nn.Module) -> dict[int, Attention]:
    """Decoder layer index -> its Attention module (layers on this pipeline rank only)."""
    layers = {}
    for module in model.modules():
        if isinstance(module, Attention) and ".layers." in module.layer_name:
            index = module.layer_name.split(".layers.")[1].split(".")[0]
            layers[int(index)] = module
    return layers


def install_kv_formats(model: torch.nn.Module, served: ServedArtifact) -> None:
    """Swaps each quantized layer's backend and impl for the adaspkv one of its format (routing has
    refused a global --kv-cache-dtype next to a per-layer plan)."""
    formats = kv_formats(served)
    for index, attn in decoder_attention_layers(model).items():
        fmt = formats[index]
        if fmt is None:
            continue  # 16 bits: vLLM's own backend and cache, untouched
        backend = backend_for(fmt)
        # The impl refuses alibi, sliding windows, soft caps and KV sharing with a message.
        attn.impl = backend.get_impl_cls()(
            attn.num_heads, attn.head_size, attn.impl.scale, attn.num_kv_heads,
            getattr(attn.impl, "alibi_slopes", None), attn.sliding_window, attn.kv_cache_dtype,
            getattr(attn.impl, "logits_soft_cap", None) or None, attn.attn_type,
            attn.kv_sharing_target_layer_name)
        attn.attn_backend = backend


class AdaspkvLlavaForConditionalGeneration(LlavaForConditionalGeneration):
    def __init__(self, *, vllm_config, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.served = served_artifact(vllm_config)
        install_kv_formats(self, self.served)
        parallel = vllm_config.parallel_config
        self.packed_modules = packed_modules(self.served.plan, vllm_config.device_config.device_type,
                                             parallel.tensor_parallel_size, parallel.pipeline_parallel_size)
        cache = vllm_config.cache_config
        logger.info("%s", startup_table(self.served, vllm_config.model_config.dtype.itemsize,
                                        cache.kv_cache_memory_bytes, cache.block_size,
                                        vllm_config.parallel_config.tensor_parallel_size))

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Masks the Hugging Face weight stream before vLLM fuses q/k/v and gate/up and slices for
        tensor parallelism (or replaces its pruned weights by the artifact's packed ones), and checks
        every linear's zeros against the plan (`ArtifactWeights`). The weights of modules served packed
        are kept from vLLM's dense parameters and installed packed."""
        artifact = ArtifactWeights(self.served, {key for keys in self.packed_modules.values() for key in keys})
        loaded = super().load_weights(artifact.stream(weights))
        artifact.check()
        return loaded | install_packed_linears(self, self.packed_modules, artifact.packed)
