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
    """The model's tensors under llava-hf names, contiguous and unshared (safetensors needs both)."""
    return {to_llava_hf_name(k): v.detach().contiguous().clone() for k, v in model.state_dict().items()}


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


def load_llava(model_dir: str | Path, dtype: torch.dtype = torch.float32):
    """(model, processor) from a checkpoint directory, through transformers."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype)
    processor = AutoProcessor.from_pretrained(str(model_dir))
    return model.eval(), processor
