"""A LLaVA checkpoint of a given config.json with seeded random weights: a published model's shapes (the
verbatim config.json of llava-hf/llava-1.5-7b-hf: 7.06B parameters), none of its weights.

For what depends on size only: memory, time, the plugin's geometry, vLLM loading 14 GB. Random weights
say nothing about quality. Written as published checkpoints are: the config.json as given, sharded
safetensors with an index (tensor by tensor: the model is never held in memory), a byte-level BPE
tokenizer of the same vocabulary (32000 tokens, then <image> and <pad> at the ids the config names),
the LLaVA-1.5 chat template, and a CLIP image processor of the vision tower's size.
"""

from __future__ import annotations

import shutil
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from offline_search.data.checkpoint import to_llava_hf_name
from offline_search.data.sharded_safetensors import write_sharded
from offline_search.kit.tiny_llava import CHAT_TEMPLATE, IMAGE_TOKEN
from vllm_adaspkv.format.safetensors_stream import TensorSpec

PAD_TOKEN = "<pad>"
BASE_SPECIALS = ("<unk>", "<s>", "</s>")  # Llama's ids 0, 1, 2
INIT_STD = 0.02  # LlamaConfig's and CLIPVisionConfig's initializer_range


def llava_tensor_specs(config, dtype: torch.dtype) -> list[TensorSpec]:
    """Every tensor of the checkpoint under its llava-hf name, from a model built on the meta device."""
    from transformers import LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(config)
    return [TensorSpec(to_llava_hf_name(name), tuple(t.shape), dtype) for name, t in model.state_dict().items()]


def random_tensor(spec: TensorSpec, seed: int) -> torch.Tensor:
    """Seeded by the checkpoint's seed and the tensor's name (the same tensor whatever the order):
    norm weights 1, biases 0, everything else normal(0, 0.02) as the models initialise."""
    if spec.name.endswith(".bias"):
        return torch.zeros(spec.shape, dtype=spec.dtype)
    if len(spec.shape) == 1 and ("norm" in spec.name.split(".")[-2]):  # layernorm, post_layernorm, norm, ...
        return torch.ones(spec.shape, dtype=spec.dtype)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(spec.name.encode()))
    return (torch.randn(spec.shape, generator=generator) * INIT_STD).to(spec.dtype)


def llava_tokenizer(corpus: Sequence[str], vocab: int, image_id: int, pad_id: int, chat_template: str):
    """A byte-level BPE of `vocab` tokens (padded with <unusedN> where the corpus runs out of merges),
    then <image> and <pad>, which must land on the ids the model's config names."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(list(corpus), trainers.BpeTrainer(
        vocab_size=vocab, special_tokens=list(BASE_SPECIALS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tok.add_tokens([f"<unused{i}>" for i in range(vocab - tok.get_vocab_size())])
    tok.add_special_tokens([IMAGE_TOKEN, PAD_TOKEN])
    ids = (tok.token_to_id(IMAGE_TOKEN), tok.token_to_id(PAD_TOKEN))
    if ids != (image_id, pad_id):
        raise ValueError(f"<image> and <pad> got ids {ids}; the config names {(image_id, pad_id)}")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token=PAD_TOKEN, extra_special_tokens={"image_token": IMAGE_TOKEN},
                                   chat_template=chat_template)


def llava_processor(config, tokenizer, chat_template: str = CHAT_TEMPLATE):
    from transformers import CLIPImageProcessor, LlavaProcessor

    size = config.vision_config.image_size
    return LlavaProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size}),
        tokenizer=tokenizer, patch_size=config.vision_config.patch_size, chat_template=chat_template,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        num_additional_image_tokens=1)  # CLIP's class token, dropped by the "default" strategy


def write_shaped_llava(out_dir: str | Path, config_file: str | Path, corpus: Sequence[str], seed: int = 0,
                       dtype: torch.dtype = torch.bfloat16, shard_bytes: int = 5 << 30,
                       progress: Callable[[TensorSpec], None] | None = None) -> Path:
    """Writes the checkpoint into `out_dir`; returns it."""
    from transformers import AutoConfig, GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(config_file, out / "config.json")  # verbatim: the defaults it leaves out stay out
    config = AutoConfig.from_pretrained(str(out))
    tokenizer = llava_tokenizer(corpus, 32000, config.image_token_index, config.pad_token_id, CHAT_TEMPLATE)
    llava_processor(config, tokenizer).save_pretrained(out)
    GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=config.pad_token_id).save_pretrained(out)
    write_sharded(out, llava_tensor_specs(config, dtype), lambda spec: random_tensor(spec, seed), shard_bytes,
                  progress)
    return out
