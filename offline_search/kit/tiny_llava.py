"""The test kit: a tiny random LLaVA, complete enough for vLLM and transformers to load and serve.

CLIP-style vision tower, MLP projector, Llama language model with grouped-query attention, a small
byte-level BPE tokenizer trained on the spot, a CLIP image processor and a LLaVA-1.5 chat template.
Every size is a field of `TinyLlavaSpec`. The weights are random (seeded): good for plumbing and
exactness tests, meaningless for quality (shapes-llava is the trained one).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field, model_validator

from vllm_adaspkv.format import StrictModel

Positive = Annotated[int, Field(ge=1)]
IMAGE_TOKEN = "<image>"
SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)

# LLaVA-1.5's conversation format ("USER: <image>\n... ASSISTANT: ..."). Accepts plain-string
# content as well as OpenAI-style content parts. The template writes the BOS token itself: chat front
# ends (vLLM's included) tokenize its output without adding special tokens.
_IMAGE_PARTS = "{%- for part in message['content'] if part['type'] == 'image' -%}{{ '<image>\n' }}{%- endfor -%}"
_TEXT_PARTS = "{%- for part in message['content'] if part['type'] == 'text' -%}{{ part['text'] }}{%- endfor -%}"
# The question-first variant ("USER: {question}\n<image> ASSISTANT:") lets the image tokens, which
# come later, attend to the question: shapes-llava learns its lookups with it (see its model card).
_QUESTION_FIRST_PARTS = (_TEXT_PARTS + "{%- if message['content'] | selectattr('type', 'equalto', 'image')"
                         " | list -%}{{ '\n<image>' }}{%- endif -%}")


def _chat_template(content_parts: str) -> str:
    return (
        "{{- bos_token -}}"
        "{%- for message in messages -%}"
        "{%- if message['role'] == 'system' -%}"
        "{{ message['content'] if message['content'] is string else message['content'][0]['text'] }}{{ '\n' }}"
        "{%- else -%}"
        "{{ message['role'].upper() + ': ' }}"
        "{%- if message['content'] is string -%}{{ message['content'] }}"
        "{%- else -%}" + content_parts +
        "{%- endif -%}"
        "{%- if message['role'] == 'assistant' -%}{{ '</s>' }}{%- endif -%}{{ ' ' }}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ 'ASSISTANT:' }}{%- endif -%}"
    )


CHAT_TEMPLATE = _chat_template(_IMAGE_PARTS + _TEXT_PARTS)
QUESTION_FIRST_CHAT_TEMPLATE = _chat_template(_QUESTION_FIRST_PARTS)

DEFAULT_CORPUS = (
    "USER: ASSISTANT: What is in the image? What colour is the shape? How many shapes are there?",
    "A red circle, a blue square and a green triangle on a white background.",
    "The yellow star is left of the purple square. There are three shapes.",
    "The quick brown fox jumps over the lazy dog. 0 1 2 3 4 5 6 7 8 9 yes no",
)


class TinyLlavaSpec(StrictModel):
    """Sizes of the tiny LLaVA. vLLM's CPU attention needs head_dim in {32, 64, 80, ...}."""

    num_layers: Positive = 2
    hidden_size: Positive = 64
    intermediate_size: Positive = 128
    num_heads: Positive = 4
    num_kv_heads: Positive = 2
    head_dim: Positive = 32
    vision_layers: Annotated[int, Field(ge=2)] = 2
    vision_hidden_size: Positive = 32
    vision_heads: Positive = 2
    image_size: Positive = 32
    patch_size: Positive = 8
    # upper bound: BPE stops early on a small corpus; 256 byte symbols plus special tokens and merges
    vocab_size: Annotated[int, Field(ge=300)] = 512
    max_position_embeddings: Positive = 512
    seed: int = 0
    # Which vision layer's output feeds the projector: LLaVA-1.5 uses -2 (the second-to-last);
    # shapes-llava uses -1, so that no trained layer goes unused.
    vision_feature_layer: int = -2
    # Chat template: the image before the question (LLaVA-1.5) or after it.
    question_first: bool = False

    @model_validator(mode="after")
    def _divisible(self) -> TinyLlavaSpec:
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"TinyLlavaSpec.num_heads={self.num_heads} must be a multiple of "
                             f"num_kv_heads={self.num_kv_heads} (grouped-query attention)")
        if self.vision_hidden_size % self.vision_heads:
            raise ValueError(f"TinyLlavaSpec.vision_hidden_size={self.vision_hidden_size} must be a multiple "
                             f"of vision_heads={self.vision_heads}")
        if self.image_size % self.patch_size:
            raise ValueError(f"TinyLlavaSpec.image_size={self.image_size} must be a multiple of "
                             f"patch_size={self.patch_size}")
        if not -self.vision_layers <= self.vision_feature_layer <= -1:
            raise ValueError(f"TinyLlavaSpec.vision_feature_layer={self.vision_feature_layer} must be "
                             f"in [-{self.vision_layers}, -1]")
        return self

    @property
    def num_image_tokens(self) -> int:
        return (self.image_size // self.patch_size) ** 2


def build_tokenizer(corpus: Sequence[str], vocab_size: int, chat_template: str = CHAT_TEMPLATE):
    """A byte-level BPE tokenizer (any text encodes) that prepends `<s>`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer)
    bos_id = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        chat_template=chat_template,
    )


def build_processor(spec: TinyLlavaSpec, corpus: Sequence[str] = DEFAULT_CORPUS):
    from transformers import CLIPImageProcessor, LlavaProcessor

    chat_template = QUESTION_FIRST_CHAT_TEMPLATE if spec.question_first else CHAT_TEMPLATE
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": spec.image_size},
        crop_size={"height": spec.image_size, "width": spec.image_size},
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=build_tokenizer(corpus, spec.vocab_size, chat_template),
        patch_size=spec.patch_size,
        vision_feature_select_strategy="default",
        chat_template=chat_template,
        num_additional_image_tokens=1,  # CLIP's class token, dropped by the "default" strategy
    )


def build_llava_config(spec: TinyLlavaSpec, tokenizer):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=spec.vision_hidden_size,
        intermediate_size=4 * spec.vision_hidden_size,
        num_hidden_layers=spec.vision_layers,
        num_attention_heads=spec.vision_heads,
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        projection_dim=spec.vision_hidden_size,
    )
    text = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        vision_feature_select_strategy="default",
        vision_feature_layer=spec.vision_feature_layer,
        projector_hidden_act="gelu",
        image_seq_length=spec.num_image_tokens,
        tie_word_embeddings=False,
    )


def build_tiny_llava(spec: TinyLlavaSpec = TinyLlavaSpec(), corpus: Sequence[str] = DEFAULT_CORPUS):
    """(model, processor) in memory; the weights are random but seeded by `spec.seed`."""
    from transformers import LlavaForConditionalGeneration

    processor = build_processor(spec, corpus)
    config = build_llava_config(spec, processor.tokenizer)
    torch.manual_seed(spec.seed)
    model = LlavaForConditionalGeneration(config).eval()
    set_generation_tokens(model, processor.tokenizer)
    return model, processor


def set_generation_tokens(model, tokenizer) -> None:
    """The tokenizer's BOS, EOS and pad ids in the model's generation config (saved beside it)."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))


def make_tiny_llava(out_dir: str | Path, spec: TinyLlavaSpec = TinyLlavaSpec(),
                    corpus: Sequence[str] = DEFAULT_CORPUS) -> Path:
    """Builds the tiny LLaVA and saves it in the llava-hf layout; returns the directory."""
    from offline_search.data.checkpoint import save_llava_checkpoint

    model, processor = build_tiny_llava(spec, corpus)
    return save_llava_checkpoint(model, processor, out_dir)
