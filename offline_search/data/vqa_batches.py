"""Token batches for LLaVA training and evaluation: ShapesVQA conversations and text windows.

The prompt of a question is exactly what a chat client gets from the model's chat template
("<s>USER: <image>\\n{question} ASSISTANT:", or the question first for shapes-llava), so a model
trained on these batches answers the same way through transformers and through vLLM's OpenAI server.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from offline_search.data.shapes_vqa import Sample
from vllm_adaspkv.errors import ConfigError

IGNORE_INDEX = -100


def question_prompt(processor, question: str) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True)


def prompt_inputs(processor, batch: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Left-padded prompts (for batched generation) and pixel values."""
    tokenizer = processor.tokenizer
    tokenizer.padding_side = "left"
    return processor(
        images=[s.image for s in batch],
        text=[question_prompt(processor, s.question) for s in batch],
        add_special_tokens=False,
        padding=True,
        return_tensors="pt",
    )


def answer_batch(processor, batch: Sequence[Sample]) -> dict[str, torch.Tensor]:
    """Prompt + " answer</s>", right-padded; labels only on the answer and the end token."""
    tokenizer = processor.tokenizer
    prompts = processor(
        images=[s.image for s in batch],
        text=[question_prompt(processor, s.question) for s in batch],
        add_special_tokens=False,
    )
    answers = tokenizer([f" {s.answer}{tokenizer.eos_token}" for s in batch], add_special_tokens=False)
    rows = [p + a for p, a in zip(prompts["input_ids"], answers["input_ids"])]
    width = max(map(len, rows))
    input_ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (p, a) in enumerate(zip(prompts["input_ids"], answers["input_ids"])):
        n = len(p) + len(a)
        input_ids[i, :n] = torch.tensor(p + a)
        labels[i, len(p):n] = torch.tensor(a)
        attention_mask[i, :n] = 1
    return {
        "input_ids": input_ids,  # [batch, width]
        "attention_mask": attention_mask,
        "labels": labels,
        "pixel_values": torch.stack([torch.as_tensor(p) for p in prompts["pixel_values"]]),  # [batch, 3, H, W]
    }


def random_windows(tokens: torch.Tensor, batch: int, window: int, generator: torch.Generator) -> torch.Tensor:
    """`batch` random windows of `window` tokens from a 1-D token stream: [batch, window]."""
    if tokens.numel() <= window:
        raise ConfigError(f"text of {tokens.numel()} tokens is too short for windows of {window}")
    starts = torch.randint(0, tokens.numel() - window, (batch,), generator=generator)
    return torch.stack([tokens[s:s + window] for s in starts.tolist()])
