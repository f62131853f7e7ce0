"""Trains shapes-llava from scratch: ShapesVQA conversations plus WikiText-2 validation text.

Every step draws fresh ShapesVQA training samples (the generator is unbounded and deterministic)
and random windows of WikiText-2 validation text, and optimises the sum of both next-token losses
(answer tokens only for the conversations). As in LLaVA's first stage, a share of the conversations
asks for a caption ("Describe the image." -> "red circle top left, ..."), which names every shape
and so teaches the binding of colour, kind and place that the one-word questions need. The first
`vqa_only_steps` steps leave the text out. Both measured here: without captions, ShapesVQA
validation accuracy stayed near 0.6 after 3500 steps; with text from the start at lr 2e-3, the
language model learned to ignore the image tokens and never recovered. The run saves a resumable
state every `checkpoint_every` steps, so a killed run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from offline_search import shapes_vqa
from offline_search.checkpoint import save_llava_checkpoint
from offline_search.text_data import joined_text, read_lines, wikitext_path
from offline_search.evaluate import OfflineModel, eval_shapesvqa
from offline_search.tiny_llava import TinyLlavaSpec, build_llava_config, build_processor, set_generation_tokens
from offline_search.vqa_batches import answer_batch, random_windows

# 4.9M parameters; head_dim 64 is one that vLLM's CPU attention supports.
SHAPES_LLAVA_SPEC = TinyLlavaSpec(
    num_layers=4, hidden_size=256, intermediate_size=688, num_heads=4, num_kv_heads=2,
    head_dim=64, vision_layers=4, vision_hidden_size=128, vision_heads=4, image_size=64,
    patch_size=16, vocab_size=2048, max_position_embeddings=256, seed=0, vision_feature_layer=-1,
)


@dataclass(frozen=True)
class TrainConfig:
    out_dir: Path
    steps: int = 4500
    vqa_only_steps: int = 1500
    vqa_batch: int = 32
    caption_every: int = 4  # every 4th conversation of a batch is a caption request (0: none)
    text_batch: int = 2
    text_window: int = 256  # the model's context: perplexity is measured on windows of it
    text_loss_weight: float = 1.0
    lr: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.05
    checkpoint_every: int = 100
    validate_every: int = 500  # greedy accuracy on 140 ShapesVQA validation questions
    seed: int = 0
    spec: TinyLlavaSpec = field(default_factory=lambda: SHAPES_LLAVA_SPEC)
    text_file: Path = field(default_factory=lambda: wikitext_path("validation"))

    def __post_init__(self):
        for name in ("steps", "vqa_batch", "text_batch", "text_window", "checkpoint_every", "validate_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"TrainConfig.{name}={getattr(self, name)} must be >= 1")
        if not 0 < self.lr < 1:
            raise ValueError(f"TrainConfig.lr={self.lr} must be in (0, 1)")
        if self.text_window > self.spec.max_position_embeddings:
            raise ValueError(f"TrainConfig.text_window={self.text_window} must not exceed the model's "
                             f"max_position_embeddings={self.spec.max_position_embeddings}")


def tokenizer_corpus(text_file: Path) -> list[str]:
    """WikiText lines plus every word the ShapesVQA questions and answers use."""
    vocabulary = " ".join([*shapes_vqa.COLOURS, *shapes_vqa.KINDS, *shapes_vqa.NUMBERS,
                           "left right top bottom yes no"])
    questions = [s.question + " " + s.answer for s in shapes_vqa.samples("train", 500)]
    return [*read_lines(text_file), vocabulary, *questions, "USER: ASSISTANT:"]


def learning_rate(config: TrainConfig, step: int) -> float:
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


CAPTION_QUESTION = "Describe the image."


def with_captions(batch: list[shapes_vqa.Sample], every: int) -> list[shapes_vqa.Sample]:
    """Turns every `every`-th sample into a caption request about the same image."""
    if not every:
        return batch
    return [dataclasses.replace(s, question=CAPTION_QUESTION, answer=shapes_vqa.caption(s.shapes),
                                question_type="caption") if i % every == 0 else s
            for i, s in enumerate(batch)]


def validation_accuracy(model, processor, image_size: int, count: int = 140) -> float:
    """Greedy ShapesVQA accuracy on the first `count` validation questions, as `adaspkv eval` scores."""
    model.eval()
    questions = shapes_vqa.samples("validation", count, image_size)
    backend = OfflineModel(model, processor, batch_size=count, show_progress=False)
    accuracy = eval_shapesvqa(backend, questions)["shapesvqa_accuracy"]
    model.train()
    return accuracy


def train(config: TrainConfig) -> Path:
    """Trains (or resumes) and writes the checkpoint to `config.out_dir`; returns it."""
    from transformers import LlavaForConditionalGeneration

    processor = build_processor(config.spec, tokenizer_corpus(config.text_file))
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration(build_llava_config(config.spec, processor.tokenizer))
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, betas=(0.9, 0.98),
                                  weight_decay=config.weight_decay)
    text_tokens = torch.tensor(processor.tokenizer(joined_text(config.text_file),
                                                   add_special_tokens=False)["input_ids"])
    state_file = config.out_dir / "train_state.pt"
    step = 0
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"Resuming from step {step} ({state_file})")

    model.train()
    progress = tqdm(total=config.steps, initial=step, desc="train shapes-llava", unit="step")
    started = time.monotonic()
    while step < config.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        vqa = answer_batch(processor, with_captions(shapes_vqa.samples(
            "train", config.vqa_batch, config.spec.image_size, start=step * config.vqa_batch),
            config.caption_every))
        loss = vqa_loss = model(**vqa).loss
        text_loss = torch.tensor(float("nan"))
        if step >= config.vqa_only_steps:
            # The data of a step depends on (seed, step) alone: a resumed run equals an unbroken one.
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            windows = random_windows(text_tokens, config.text_batch, config.text_window, generator)
            text_loss = model(input_ids=windows, labels=windows).loss
            loss = vqa_loss + config.text_loss_weight * text_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        progress.update(1)
        progress.set_postfix(vqa=f"{vqa_loss.item():.3f}", text=f"{text_loss.item():.3f}",
                             min=f"{(time.monotonic() - started) / 60:.1f}")
        if step % config.validate_every == 0:
            progress.write(f"step {step}: ShapesVQA validation accuracy "
                           f"{validation_accuracy(model, processor, config.spec.image_size):.3f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            config.out_dir.mkdir(parents=True, exist_ok=True)
            tmp = state_file.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step}, tmp)
            tmp.replace(state_file)  # atomic: a kill never leaves half a state
    progress.close()

    model.eval()
    set_generation_tokens(model, processor.tokenizer)
    save_llava_checkpoint(model, processor, config.out_dir)
    state_file.unlink()
    return config.out_dir
