"""Trains smol-llava's vision tower and projector on ShapesVQA; SmolLM2, its language model, stays frozen.

Three stages, each drawing fresh training samples (deterministic given the stage and step):
1. `probe_steps`: the vision tower alone, with a linear probe of each patch's shape and colour on the
   output of vision layer `probe_layer` (`grounding.PatchProbe`): cheap, dense supervision.
2. `align_steps`: vision tower and projector, so that the 16 image tokens read as the 16 words of
   `shapes_vqa.caption_slots` ("red circle top left no shape top right ..."), each token one word
   embedding of SmolLM2 (`grounding.token_alignment_loss`); the probe stays on. No language model runs.
3. `answer_steps`: the answer loss through the frozen language model (ShapesVQA questions and caption
   requests, answer tokens only), with both losses of stage 2 kept on.

Measured while choosing this recipe (140 validation questions, 2 CPU cores): with sums of words as targets
(shapes-llava's grounding) the frozen language model answered 0.65-0.69 after 400-500 answer steps, and
could not tell left from right (chance); with one word a token, 0.82 after 300. The language model runs in
bfloat16 with eager attention during training (2.3x faster than float32 here; torch's bfloat16 SDPA
backward is slow on CPU); the committed model is evaluated and served in float32. A killed run resumes
from its last state (every `checkpoint_every` steps) with the same command.
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
from offline_search.data.smol_llava import SmolLlavaSpec, build_smol_llava, save_vision
from offline_search.data.vqa_batches import IGNORE_INDEX, answer_batch
from offline_search.kit import grounding
from offline_search.kit.train_shapes_llava import CAPTION_QUESTION, validation_accuracy
from vllm_adaspkv.format import StrictModel
from vllm_adaspkv.format.strict import LaxPath

Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[int, Field(ge=0)]
STAGES = ("probe", "align", "answer")


class SmolTrainConfig(StrictModel):
    out_dir: LaxPath
    spec: SmolLlavaSpec = SmolLlavaSpec()
    probe_steps: NonNegative = 1500
    align_steps: NonNegative = 800
    answer_steps: NonNegative = 900
    image_batch: Positive = 64  # stages 1 and 2
    vqa_batch: Positive = 32  # stage 3
    caption_batch: NonNegative = 8  # stage 3, in a batch of their own
    lr: Annotated[float, Field(gt=0.0, lt=1.0)] = 1e-3  # stages 1 and 2; the projector in stage 3
    vision_lr: Annotated[float, Field(gt=0.0, lt=1.0)] = 3e-4  # the vision tower and probe in stage 3
    warmup_steps: NonNegative = 50  # per stage
    weight_decay: Annotated[float, Field(ge=0.0)] = 0.05
    probe_layer: Positive = 2  # hidden_states index: the probe reads the output of vision layer 2
    checkpoint_every: Positive = 50
    validate_every: Positive = 300  # stage 3: greedy accuracy on 140 validation questions
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self) -> SmolTrainConfig:
        words = len(shapes_vqa.caption_slots(()))
        if self.spec.num_image_tokens != words:
            raise ValueError(f"SmolTrainConfig.spec makes {self.spec.num_image_tokens} image tokens; the caption "
                             f"slots are {words} words (image_size / patch_size must be 4)")
        if self.probe_layer > self.spec.vision_layers:
            raise ValueError(f"SmolTrainConfig.probe_layer={self.probe_layer} must be at most the vision tower's "
                             f"{self.spec.vision_layers} layers")
        if self.caption_batch > self.vqa_batch:
            raise ValueError(f"SmolTrainConfig.caption_batch={self.caption_batch} must be in [0, vqa_batch={self.vqa_batch}]")
        return self

    def steps(self, stage: str) -> int:
        return {"probe": self.probe_steps, "align": self.align_steps, "answer": self.answer_steps}[stage]


def cosine_lr(base: float, step: int, steps: int, warmup: int) -> float:
    return base * min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))


class SmolTrainer:
    """The model, the probe and the targets of one run; `run` goes through the stages."""

    def __init__(self, config: SmolTrainConfig):
        self.config = config
        self.model, self.processor = build_smol_llava(config.spec, config.seed)
        language_model = self.model.model.language_model
        for p in language_model.parameters():
            p.requires_grad_(False)
        language_model.to(torch.bfloat16)
        language_model.set_attn_implementation("eager")
        self.embeddings = language_model.embed_tokens.weight.detach().float()  # [vocab, hidden]
        self.vision, self.projector = self.model.model.vision_tower, self.model.model.multi_modal_projector
        self.probe = grounding.PatchProbe(config.spec.vision_hidden_size, len(shapes_vqa.KINDS), len(shapes_vqa.COLOURS))
        tokenizer = self.processor.tokenizer
        words = (*shapes_vqa.COLOURS, *shapes_vqa.KINDS, *shapes_vqa.EMPTY_QUADRANT, "top", "bottom", "left", "right")
        self.word_id = {w: tokenizer(" " + w, add_special_tokens=False)["input_ids"][0] for w in words}
        # The vision tower's hidden states and the projector's output of each forward pass of the step
        # (the LLaVA model runs both inside its forward).
        self.seen_vision: list[tuple[torch.Tensor, ...]] = []
        self.seen_projected: list[torch.Tensor] = []
        self.vision.register_forward_hook(lambda m, args, out: self.seen_vision.append(out.hidden_states))
        self.projector.register_forward_hook(lambda m, args, out: self.seen_projected.append(out))

    def images(self, batch) -> torch.Tensor:
        pixels = self.processor.image_processor([s.image for s in batch], return_tensors="pt")["pixel_values"]
        return torch.as_tensor(pixels)  # [batch, 3, H, W]

    def probe_loss(self, batch, hidden_states) -> torch.Tensor:
        grid = self.config.spec.image_size // self.config.spec.patch_size
        labels = torch.tensor([shapes_vqa.patch_labels(s.shapes, grid) for s in batch])  # [batch, patches, 2]
        return self.probe.loss(hidden_states[self.config.probe_layer][:, 1:], labels)

    def alignment_loss(self, batch, projected: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor([[self.word_id[w] for w in shapes_vqa.caption_slots(s.shapes)] for s in batch])
        return grounding.token_alignment_loss(projected, self.embeddings[ids])  # [batch, 16, hidden] each

    def answer_loss(self, inputs: dict) -> torch.Tensor:
        """Cross-entropy of the answer tokens; the output head runs on those positions only."""
        labels = inputs.pop("labels")[:, 1:]  # position t predicts token t+1
        hidden = self.model.model(**inputs).last_hidden_state[:, :-1]  # [batch, T-1, hidden]
        chosen = labels != IGNORE_INDEX
        logits = torch.nn.functional.linear(hidden[chosen].float(), self.embeddings)  # tied output head
        return torch.nn.functional.cross_entropy(logits, labels[chosen])

    def loss(self, stage: str, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        c = self.config
        size = c.image_batch if stage != "answer" else c.vqa_batch
        start = sum(c.steps(s) * c.image_batch for s in STAGES[:STAGES.index(stage)]) + step * size
        batch = shapes_vqa.samples("train", size, c.spec.image_size, start=start)
        self.seen_vision.clear()
        self.seen_projected.clear()
        if stage == "answer":
            answer = self.answer_loss(answer_batch(self.processor, batch))
        else:
            answer = None
            hidden_states = self.vision(pixel_values=self.images(batch), output_hidden_states=True).hidden_states
            if stage == "align":
                self.projector(hidden_states[-1][:, 1:])
        probe = self.probe_loss(batch, self.seen_vision[0])
        if stage == "probe":
            return probe, {"probe": probe.item()}
        align = self.alignment_loss(batch, self.seen_projected[0])
        if answer is None:
            return probe + align, {"probe": probe.item(), "align": align.item()}
        loss = answer + probe + align
        if c.caption_batch:
            captions = [dataclasses.replace(s, question=CAPTION_QUESTION, answer=shapes_vqa.caption(s.shapes))
                        for s in batch[:c.caption_batch]]
            loss = loss + self.answer_loss(answer_batch(self.processor, captions))
        return loss, {"answer": answer.item(), "probe": probe.item(), "align": align.item()}

    def optimizer(self, stage: str) -> torch.optim.AdamW:
        c = self.config
        vision = [*self.vision.parameters(), *self.probe.parameters()]
        if stage == "probe":
            groups = [{"params": vision, "base_lr": c.lr}]
        elif stage == "align":
            groups = [{"params": [*vision, *self.projector.parameters()], "base_lr": c.lr}]
        else:
            groups = [{"params": list(self.projector.parameters()), "base_lr": c.lr},
                      {"params": vision, "base_lr": c.vision_lr}]
        return torch.optim.AdamW(groups, lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.98))

    def state(self, stage: str, step: int, optimizer) -> dict:
        return {"stage": stage, "step": step, "vision": self.vision.state_dict(), "projector": self.projector.state_dict(),
                "probe": self.probe.state_dict(), "optimizer": optimizer.state_dict()}

    def run(self) -> Path:
        c = self.config
        state_file = c.out_dir / "train_state.pt"
        state = torch.load(state_file, weights_only=False) if state_file.exists() else None
        if state:
            for part in ("vision", "projector", "probe"):
                getattr(self, part).load_state_dict(state[part])
            print(f"Resuming at stage {state['stage']}, step {state['step']} ({state_file})")
        started = time.monotonic()
        for stage in STAGES:
            if state and STAGES.index(stage) < STAGES.index(state["stage"]):
                continue
            optimizer = self.optimizer(stage)
            step = 0
            if state and stage == state["stage"]:
                optimizer.load_state_dict(state["optimizer"])
                step = state["step"]
            self.model.train()
            params = [p for group in optimizer.param_groups for p in group["params"]]
            progress = tqdm(total=c.steps(stage), initial=step, desc=f"train smol-llava: {stage}", unit="step")
            while step < c.steps(stage):
                for group in optimizer.param_groups:
                    group["lr"] = cosine_lr(group["base_lr"], step, c.steps(stage), c.warmup_steps)
                loss, parts = self.loss(stage, step)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(params, 1.0)
                optimizer.step()
                step += 1
                progress.update(1)
                progress.set_postfix({**{k: f"{v:.3f}" for k, v in parts.items()},
                                      "min": f"{(time.monotonic() - started) / 60:.1f}"})
                if stage == "answer" and step % c.validate_every == 0:
                    progress.write(f"step {step}: ShapesVQA validation accuracy (bfloat16 language model) "
                                   f"{validation_accuracy(self.model, self.processor, c.spec.image_size):.3f}")
                if step % c.checkpoint_every == 0 or step == c.steps(stage):
                    c.out_dir.mkdir(parents=True, exist_ok=True)
                    tmp = state_file.with_suffix(".tmp")
                    torch.save(self.state(stage, step, optimizer), tmp)
                    tmp.replace(state_file)  # atomic: a kill never leaves half a state
            progress.close()
            state = None
        self.model.eval()
        path = save_vision(self.model, c.spec, c.out_dir / "vision.safetensors")
        state_file.unlink(missing_ok=True)
        return path


def train(config: SmolTrainConfig) -> Path:
    """Trains (or resumes); writes OUT/vision.safetensors (the vision tower and projector) and returns it."""
    return SmolTrainer(config).run()
