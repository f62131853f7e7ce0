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


def _question_message(question: str) -> dict:
    return {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}


def question_prompt(processor, question: str) -> str:
    return processor.apply_chat_template([_question_message(question)], add_generation_prompt=True)


def answer_text(processor, question: str, answer: str) -> str:
    """What the chat template writes after the generation prompt for this answer, up to and with the
    end token: " red</s>" for the LLaVA-1.5 template, "red<|im_end|>" for ChatML."""
    prompt = question_prompt(processor, question)
    conversation = processor.apply_chat_template(
        [_question_message(question), {"role": "assistant", "content": answer}])
    eos = processor.tokenizer.eos_token
    if not conversation.startswith(prompt) or eos not in conversation[len(prompt):]:
        raise ConfigError("the chat template's conversation does not extend its generation prompt with "
                          f"the answer and {eos!r}: the model cannot be trained on answers with it")
    reply = conversation[len(prompt):]
    return reply[:reply.index(eos) + len(eos)]


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
    """Prompt + answer + end token (as the chat template writes them), right-padded; labels only on the answer and the end token."""
    tokenizer = processor.tokenizer
    prompts = processor(
        images=[s.image for s in batch],
        text=[question_prompt(processor, s.question) for s in batch],
        add_special_tokens=False,
    )
    answers = tokenizer([answer_text(processor, s.question, s.answer) for s in batch], add_special_tokens=False)
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
