"""Trains shapes-llava from scratch: ShapesVQA conversations plus WikiText-2 validation text.

Every step draws fresh ShapesVQA training samples (the generator is unbounded and deterministic)
and random windows of WikiText-2 validation text, and optimises the sum of both next-token losses
(answer tokens only for the conversations), plus the grounding losses of `grounding.py`. As in
LLaVA's first stage, a batch of caption requests ("Describe the image." -> "red circle top left,
...") names every shape. The first `vqa_only_steps` steps leave the text out. Measured here: without
the grounding losses the language model never read the kind of a shape from the image tokens
(accuracy plateaued at 0.73-0.78); with them and the question before the image, the lookups are
learned after ~1500 steps. The run saves a resumable state every `checkpoint_every` steps, so a
killed run continues where it stopped.
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Annotated

import torch
from pydantic import Field, model_validator
from tqdm import tqdm

from offline_search.data import shapes_vqa
from offline_search.data.checkpoint import save_llava_checkpoint
from offline_search.data.text_data import joined_text, read_lines, wikitext_path
from offline_search.data.vqa_batches import answer_batch, random_windows
from offline_search.evaluation.harness import OfflineModel, eval_shapesvqa
from offline_search.kit import grounding
from offline_search.kit.tiny_llava import TinyLlavaSpec, build_llava_config, build_processor, set_generation_tokens
from offline_search.model.llava import model_linears
from vllm_adaspkv.format import StrictModel
from vllm_adaspkv.format.strict import LaxPath

# 1.70M parameters (language model 0.50M); head_dim 32 is one that vLLM's CPU attention supports.
# 32-pixel patches on 64-pixel images: one image token per quadrant, i.e. per shape.
SHAPES_LLAVA_SPEC = TinyLlavaSpec(
    num_layers=4, hidden_size=64, intermediate_size=176, num_heads=4, num_kv_heads=2,
    head_dim=32, vision_layers=4, vision_hidden_size=128, vision_heads=4, image_size=64,
    patch_size=32, vocab_size=2048, max_position_embeddings=256, seed=0, vision_feature_layer=-1,
    question_first=True,
)


Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0.0)]


class TrainConfig(StrictModel):
    out_dir: LaxPath
    steps: Positive = 3000
    vqa_only_steps: Annotated[int, Field(ge=0)] = 1800
    vqa_batch: Positive = 48
    # Caption requests per step, in a batch of their own with their own mean loss: mixed into the
    # question batch, their ~25 tokens each outweighed the one-word answers.
    caption_batch: Annotated[int, Field(ge=0)] = 8
    text_batch: Positive = 4
    text_window: Positive = 256  # the model's context: perplexity is measured on windows of it
    text_loss_weight: NonNegative = 1.0
    probe_loss_weight: NonNegative = 1.0  # grounding.PatchProbe
    align_loss_weight: NonNegative = 1.0  # grounding.alignment_loss
    norm_loss_weight: NonNegative = 0.01  # grounding.norm_penalty, towards a norm of 1
    lr: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-3
    warmup_steps: Annotated[int, Field(ge=0)] = 100
    weight_decay: NonNegative = 0.05
    # On the decoder's linear weights, the ones pruning removes. Measured on the wider v2 model
    # (hidden 256): 1.0 instead of 0.05 lowered test perplexity (139.9 vs 172.3) but made 50%
    # magnitude pruning even cheaper (+0.8% vs +1.8%), so the default keeps 0.05.
    decoder_weight_decay: NonNegative = 0.05
    checkpoint_every: Positive = 100
    validate_every: Positive = 500  # greedy accuracy on 140 ShapesVQA validation questions
    seed: int = 0
    spec: TinyLlavaSpec = SHAPES_LLAVA_SPEC
    text_file: LaxPath = wikitext_path("validation")

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if self.caption_batch > self.vqa_batch:
            raise ValueError(f"TrainConfig.caption_batch={self.caption_batch} must be in [0, vqa_batch={self.vqa_batch}]")
        if self.text_window > self.spec.max_position_embeddings:
            raise ValueError(f"TrainConfig.text_window={self.text_window} must not exceed the model's "
                             f"max_position_embeddings={self.spec.max_position_embeddings}")
        return self


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


def as_captions(batch: list[shapes_vqa.Sample]) -> list[shapes_vqa.Sample]:
    """The same images, asked for a caption instead."""
    return [dataclasses.replace(s, question=CAPTION_QUESTION, answer=shapes_vqa.caption(s.shapes),
                                question_type="caption") for s in batch]


class Grounding:
    """The grounding losses of one step, from the scenes of its batch (see grounding.py)."""

    def __init__(self, config: TrainConfig, tokenizer):
        self.config = config
        self.grid = config.spec.image_size // config.spec.patch_size
        self.probe = grounding.PatchProbe(config.spec.vision_hidden_size, len(shapes_vqa.KINDS),
                                          len(shapes_vqa.COLOURS))
        self.word_id = {w: tokenizer(" " + w, add_special_tokens=False)["input_ids"][0]
                        for w in [*shapes_vqa.COLOURS, *shapes_vqa.KINDS, "left", "right", "top", "bottom"]}

    def loss(self, batch, features: torch.Tensor, projected: torch.Tensor, embeddings: torch.Tensor):
        """features: [batch, patches, vision width] (projector input); projected: [batch, patches,
        hidden] (projector output); embeddings: [vocab, hidden], the targets (no gradient)."""
        cells = [shapes_vqa.patch_shapes(s.shapes, self.grid) for s in batch]
        present = torch.tensor([[c is not None for c in row] for row in cells])  # [batch, patches]
        labels = torch.tensor([shapes_vqa.patch_labels(s.shapes, self.grid) for s in batch])  # [batch, patches, 2]
        word_ids = torch.tensor([[[self.word_id[w] for w in shapes_vqa.naming_words(c)] if c else [0] * 4  # empty: masked out
                                  for c in row] for row in cells])  # [batch, patches, 4]
        targets = grounding.word_targets(embeddings.detach(), word_ids, present)
        c = self.config
        return (c.probe_loss_weight * self.probe.loss(features, labels)
                + c.align_loss_weight * grounding.alignment_loss(projected, targets, present)
                + c.norm_loss_weight * grounding.norm_penalty(projected, 1.0))


def validation_accuracy(model, processor, image_size: int, count: int = 140) -> float:
    """Greedy ShapesVQA accuracy on the first `count` validation questions, as `adaspkv eval` scores."""
    model.eval()
    questions = shapes_vqa.samples("validation", count, image_size)
    backend = OfflineModel(model, processor, batch_size=count, show_progress=False)
    accuracy = eval_shapesvqa(backend, questions)["shapesvqa_accuracy"]
    model.train()
    return accuracy


def parameter_groups(config: TrainConfig, model, probe: torch.nn.Module) -> list[dict]:
    """AdamW groups: the decoder's linear weights (what pruning removes) with their own decay."""
    decoder_weights = [linear.weight for linear in model_linears(model).values()]
    decoder_ids = {id(weight) for weight in decoder_weights}
    others = [p for p in [*model.parameters(), *probe.parameters()] if id(p) not in decoder_ids]
    return [{"params": decoder_weights, "weight_decay": config.decoder_weight_decay},
            {"params": others, "weight_decay": config.weight_decay}]


def train(config: TrainConfig) -> Path:
    """Trains (or resumes) and writes the checkpoint to `config.out_dir`; returns it."""
    from transformers import LlavaForConditionalGeneration

    processor = build_processor(config.spec, tokenizer_corpus(config.text_file))
    torch.manual_seed(config.seed)
    model = LlavaForConditionalGeneration(build_llava_config(config.spec, processor.tokenizer))
    ground = Grounding(config, processor.tokenizer)
    optimizer = torch.optim.AdamW(parameter_groups(config, model, ground.probe), lr=config.lr, betas=(0.9, 0.98))
    # The projector's input and output for the question batch of a step, for the grounding losses.
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    model.model.multi_modal_projector.register_forward_hook(lambda m, args, out: seen.append((args[0], out)))
    text_tokens = torch.tensor(processor.tokenizer(joined_text(config.text_file),
                                                   add_special_tokens=False)["input_ids"])
    state_file = config.out_dir / "train_state.pt"
    step = 0
    if state_file.exists():
        state = torch.load(state_file, weights_only=False)
        model.load_state_dict(state["model"])
        ground.probe.load_state_dict(state["probe"])
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
        print(f"Resuming from step {step} ({state_file})")

    model.train()
    progress = tqdm(total=config.steps, initial=step, desc="train shapes-llava", unit="step")
    started = time.monotonic()
    while step < config.steps:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        batch = shapes_vqa.samples("train", config.vqa_batch, config.spec.image_size,
                                   start=step * config.vqa_batch)
        seen.clear()
        loss = vqa_loss = model(**answer_batch(processor, batch)).loss
        features, projected = seen[0]
        if config.caption_batch:
            loss = loss + model(**answer_batch(processor, as_captions(batch[:config.caption_batch]))).loss
        loss = loss + (ground_loss := ground.loss(batch, features, projected, model.get_input_embeddings().weight))
        text_loss = torch.tensor(float("nan"))
        if step >= config.vqa_only_steps:
            # The data of a step depends on (seed, step) alone: a resumed run equals an unbroken one.
            generator = torch.Generator().manual_seed(config.seed * 1_000_003 + step)
            windows = random_windows(text_tokens, config.text_batch, config.text_window, generator)
            text_loss = model(input_ids=windows, labels=windows).loss
            loss = loss + config.text_loss_weight * text_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        progress.update(1)
        progress.set_postfix(vqa=f"{vqa_loss.item():.3f}", ground=f"{ground_loss.item():.3f}",
                             text=f"{text_loss.item():.3f}",
                             min=f"{(time.monotonic() - started) / 60:.1f}")
        if step % config.validate_every == 0:
            progress.write(f"step {step}: ShapesVQA validation accuracy "
                           f"{validation_accuracy(model, processor, config.spec.image_size):.3f}")
        if step % config.checkpoint_every == 0 or step == config.steps:
            config.out_dir.mkdir(parents=True, exist_ok=True)
            tmp = state_file.with_suffix(".tmp")
            torch.save({"model": model.state_dict(), "probe": ground.probe.state_dict(),
                        "optimizer": optimizer.state_dict(), "step": step}, tmp)
            tmp.replace(state_file)  # atomic: a kill never leaves half a state
    progress.close()

    model.eval()
    set_generation_tokens(model, processor.tokenizer)
    save_llava_checkpoint(model, processor, config.out_dir)
    state_file.unlink()
    return config.out_dir
