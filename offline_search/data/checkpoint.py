"""Reading and writing LLaVA checkpoints in the llava-hf layout that vLLM 0.32 loads.

transformers 5.x names the parameters of `LlavaForConditionalGeneration` `model.vision_tower.*`,
`model.language_model.*`, `model.multi_modal_projector.*` and `lm_head.*`, and its CLIP vision tower
no longer nests a `vision_model`. vLLM 0.32 maps `model.vision_tower.` to its `vision_tower.`, whose
CLIP encoder still lives under `vision_model.`, so a checkpoint saved by transformers 5 does not load
(`There is no module or parameter named 'vision_tower.embeddings'`). The llava-hf layout of the
published LLaVA-1.5 checkpoints loads in both libraries; this module writes that one.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from vllm_adaspkv.errors import ConfigError
from vllm_adaspkv.format import canonical_key, checkpoint_files, parse_mask_key
from vllm_adaspkv.format.safetensors_stream import StoredTensor, read_header

# transformers 5 prefix -> llava-hf prefix, first match wins.
_TO_LLAVA_HF = (
    ("model.vision_tower.", "vision_tower.vision_model."),
    ("model.language_model.", "language_model.model."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("lm_head.", "language_model.lm_head."),
)


def to_llava_hf_name(name: str) -> str:
    """`model.language_model.layers.0.mlp.up_proj.weight` -> `language_model.model.layers.0...`."""
    for old, new in _TO_LLAVA_HF:
        if name.startswith(old):
            return new + name[len(old):]
    raise ValueError(f"parameter {name!r} is not part of a LlavaForConditionalGeneration")


def llava_hf_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's tensors under llava-hf names, contiguous and unshared (safetensors needs both). A
    tied output head is the embedding: left out, as published checkpoints of tied models leave it."""
    tied = model.config.get_text_config().tie_word_embeddings
    return {to_llava_hf_name(k): v.detach().contiguous().clone() for k, v in model.state_dict().items()
            if not (tied and k == "lm_head.weight")}


def save_llava_checkpoint(model, processor, out_dir: str | Path) -> Path:
    """Writes config, weights (llava-hf names), tokenizer, processor and chat template."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # vLLM picks its model class from `architectures`; without it a LLaVA loads as a pooling model.
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(out)
    model.generation_config.save_pretrained(out)
    save_file(llava_hf_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})
    processor.save_pretrained(out)
    return out


def load_llava(model_dir: str | Path, dtype: torch.dtype | None = None, device: str = "cpu"):
    """(model, processor) from a checkpoint directory, through transformers, in the dtype its language
    model's weights are stored in unless `dtype` says otherwise (a bf16 7B model takes 13 GiB, 26 in fp32)."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    dtype = dtype or CheckpointWeights(model_dir).dtype
    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype).to(device)
    processor = AutoProcessor.from_pretrained(str(model_dir))
    return model.eval(), processor


_SAFETENSORS_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}


class CheckpointWeights:
    """The weights of a safetensors checkpoint (one file or shards), read one tensor at a time: how the
    search gets a linear's dense weight back without a second copy of the model in memory. Read with
    plain reads, not a memory map: a mapped checkpoint's pages count in the process's RSS as they are
    touched (13 GB more for a 7B model, reclaimable but reported), read ones only while in use. Keys are
    the artifact's (`canonical_key`)."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        self._where: dict[str, tuple[Path, StoredTensor]] = {}  # canonical key -> (file, tensor)
        for path in checkpoint_files(self.model_dir):
            for name, stored in read_header(path).items():
                self._where[canonical_key(name)] = (path, stored)
        if not self._where:
            raise ConfigError(f"{self.model_dir}: no *.safetensors weights (adaspkv reads safetensors checkpoints; "
                              "convert a pytorch_model.bin with transformers' save_pretrained)")

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the language model's linear weights (norms and the vision tower may differ)."""
        key = next((k for k in self._where if parse_mask_key(k) is not None), next(iter(self._where)))
        return self._dtype(key)

    def _dtype(self, key: str) -> torch.dtype:
        path, stored = self._where[key]
        if stored.dtype not in _SAFETENSORS_DTYPES:
            raise ConfigError(f"{path}: {key} is stored as {stored.dtype}; adaspkv loads "
                              f"{', '.join(_SAFETENSORS_DTYPES)}")
        return _SAFETENSORS_DTYPES[stored.dtype]

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def get(self, key: str) -> torch.Tensor:
        path, stored = self._where[key]
        buffer = bytearray(stored.end - stored.start)
        with open(path, "rb") as f:
            f.seek(stored.start)
            if f.readinto(buffer) != len(buffer):
                raise ConfigError(f"{path}: truncated; {key} needs bytes {stored.start}..{stored.end}")
        return torch.frombuffer(buffer, dtype=self._dtype(key)).reshape(stored.shape)
