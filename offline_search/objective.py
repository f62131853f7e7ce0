"""The search objective: quality of the model as it is in memory right now (masks applied).

Measured on held-out data, never on the test sets that the final tables report: the last windows of
WikiText-2 validation (calibration reads the first ones) and ShapesVQA validation questions.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from offline_search import shapes_vqa
from offline_search.calibration_data import text_tokens
from offline_search.perplexity import perplexity, window_nll, windows
from offline_search.vqa_batches import IGNORE_INDEX, answer_batch

OBJECTIVES = ("wikitext2", "shapesvqa", "mix")


@dataclass(frozen=True)
class ObjectiveConfig:
    kind: str = "wikitext2"  # perplexity | ShapesVQA answer loss | weighted mix
    text: str = "wikitext2"  # "wikitext2" (validation split) or a text file
    windows: int = 64  # the paper's 64 windows
    seq_len: int | None = None
    vqa_samples: int = 64
    mix_weight: float = 0.5  # mix: (1 - w) * text NLL + w * answer NLL, in nats
    batch_size: int = 8

    def __post_init__(self):
        if self.kind not in OBJECTIVES:
            raise ValueError(f"--objective {self.kind!r}: choose from {', '.join(OBJECTIVES)}")
        if self.windows < 1 or self.vqa_samples < 1 or self.batch_size < 1:
            raise ValueError("objective windows, samples and batch size must be >= 1")
        if not 0.0 <= self.mix_weight <= 1.0:
            raise ValueError(f"--objective-weight {self.mix_weight}: must be in [0, 1]")

    def describe(self) -> str:
        text = f"WikiText-2 validation perplexity ({self.windows} windows)"
        vqa = f"ShapesVQA validation answer NLL ({self.vqa_samples} questions)"
        return {"wikitext2": text, "shapesvqa": vqa,
                "mix": f"{1 - self.mix_weight:g} x text NLL + {self.mix_weight:g} x answer NLL"}[self.kind]


class Objective:
    """Callable: the objective value of the model's current weights (lower is better)."""

    def __init__(self, model, processor, config: ObjectiveConfig):
        self.model, self.config = model, config
        self.text_batches: list[torch.Tensor] = []
        self.vqa_batches: list[dict] = []
        if config.kind in ("wikitext2", "mix"):
            seq_len = config.seq_len or model.config.text_config.max_position_embeddings
            stream = text_tokens(config.text, processor.tokenizer)
            chunks = windows(stream, seq_len)[-config.windows:]  # [windows, seq_len], the stream's end
            self.text_batches = list(chunks.split(config.batch_size))
        if config.kind in ("shapesvqa", "mix"):
            size = processor.image_processor.crop_size["height"]
            questions = shapes_vqa.samples("validation", config.vqa_samples, size)
            self.vqa_batches = [answer_batch(processor, questions[i:i + config.batch_size])
                                for i in range(0, len(questions), config.batch_size)]

    @torch.no_grad()
    def __call__(self) -> float:
        kind, weight = self.config.kind, self.config.mix_weight
        if kind == "wikitext2":
            return perplexity(self._window_nll, self.text_batches)
        if kind == "shapesvqa":
            return self.answer_nll()
        return (1 - weight) * self.text_nll() + weight * self.answer_nll()

    def text_nll(self) -> float:
        return math.log(perplexity(self._window_nll, self.text_batches))

    def _window_nll(self, batch: torch.Tensor) -> torch.Tensor:
        return window_nll(self.model(input_ids=batch).logits, batch)

    def answer_nll(self) -> float:
        total, count = 0.0, 0
        for batch in self.vqa_batches:
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                pixel_values=batch["pixel_values"]).logits  # [B, T, V]
            labels = batch["labels"][:, 1:]  # [B, T-1]: position t predicts token t+1
            nll = torch.nn.functional.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX,
                reduction="sum")
            total += float(nll)
            count += int((labels != IGNORE_INDEX).sum())
        return total / count
