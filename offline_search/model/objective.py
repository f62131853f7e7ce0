"""The search objective: quality of the model as it is in memory right now (masks applied).

Measured on held-out data, never on the test sets that the final tables report: the last windows of
WikiText-2 validation (calibration reads the first ones) and ShapesVQA validation questions.

`kl` scores the compressed model against the uncompressed one (EvoPress's fitness): the mean KL
divergence of the next-token distributions, token by token. Perplexity compares each model with the
text, and on 64 windows its noise hides differences between KV plans that the test set resolves
(shapes-llava: mean-6-bit plans differ by 0.01% in perplexity); KL measures only the distortion.
"""

from __future__ import annotations

import logging
import math
from typing import Annotated, Literal, get_args

import torch
from pydantic import Field

from offline_search.core.perplexity import perplexity, window_nll, windows
from offline_search.data import shapes_vqa
from offline_search.data.calibration_data import text_tokens
from offline_search.data.vqa_batches import IGNORE_INDEX, answer_batch
from offline_search.model.llava import model_geometry
from vllm_adaspkv.format import StrictModel

logger = logging.getLogger(__name__)

ObjectiveKind = Literal["wikitext2", "kl", "shapesvqa", "mix"]
OBJECTIVES: tuple[str, ...] = get_args(ObjectiveKind)


class ObjectiveConfig(StrictModel):
    kind: ObjectiveKind = "wikitext2"  # perplexity | KL to the uncompressed model | ShapesVQA answer loss | mix
    text: str = "wikitext2"  # "wikitext2" (validation split) or a text file
    windows: Annotated[int, Field(ge=1)] = 64  # the paper's 64 windows
    seq_len: Annotated[int, Field(ge=2)] | None = None
    vqa_samples: Annotated[int, Field(ge=1)] = 64
    mix_weight: Annotated[float, Field(ge=0.0, le=1.0)] = 0.5  # mix: (1 - w) * text NLL + w * answer NLL, in nats
    batch_size: Annotated[int, Field(ge=1)] = 8

    def describe(self) -> str:
        text = f"WikiText-2 validation perplexity ({self.windows} windows)"
        kl = f"KL(uncompressed || compressed) per token, WikiText-2 validation ({self.windows} windows)"
        vqa = f"ShapesVQA validation answer NLL ({self.vqa_samples} questions)"
        return {"wikitext2": text, "kl": kl, "shapesvqa": vqa,
                "mix": f"{1 - self.mix_weight:g} x text NLL + {self.mix_weight:g} x answer NLL"}[self.kind]


class Objective:
    """Callable: the objective value of the model's current weights (lower is better)."""

    def __init__(self, model, processor, config: ObjectiveConfig):
        self.model, self.config = model, config
        self.text_batches: list[torch.Tensor] = []
        self.vqa_batches: list[dict] = []
        if config.kind in ("wikitext2", "kl", "mix"):
            seq_len = config.seq_len or model_geometry(model).max_position_embeddings
            stream = text_tokens(config.text, processor.tokenizer)
            chunks = windows(stream, seq_len)[-config.windows:]  # [windows, seq_len], the stream's end
            self.text_batches = [batch.to(model.device) for batch in chunks.split(config.batch_size)]
        if config.kind in ("shapesvqa", "mix"):
            size = processor.image_processor.crop_size["height"]
            questions = shapes_vqa.samples("validation", config.vqa_samples, size)
            batches = [answer_batch(processor, questions[i:i + config.batch_size])
                       for i in range(0, len(questions), config.batch_size)]
            self.vqa_batches = [{k: v.to(model.device) for k, v in batch.items()} for batch in batches]
        # kl: the uncompressed model's log-probabilities, taken now, before any mask or KV plan, in
        # fp32 so that the uncompressed model scores exactly 0. Host memory: windows x seq_len x
        # vocab x 4 bytes (shapes-llava, 64 x 256 x 2048: 134 MB); --objective-windows bounds it.
        self.reference = [self._logprobs(batch).cpu() for batch in self.text_batches] if config.kind == "kl" else []
        if self.reference:
            megabytes = sum(r.numel() for r in self.reference) * 4 / 2**20
            logger.info("kl objective: %.0f MB of reference log-probabilities", megabytes)

    @torch.no_grad()
    def __call__(self) -> float:
        kind, weight = self.config.kind, self.config.mix_weight
        if kind == "wikitext2":
            return perplexity(self._window_nll, self.text_batches)
        if kind == "kl":
            return self.kl()
        if kind == "shapesvqa":
            return self.answer_nll()
        return (1 - weight) * self.text_nll() + weight * self.answer_nll()

    def text_nll(self) -> float:
        return math.log(perplexity(self._window_nll, self.text_batches))

    def kl(self) -> float:
        total, count = 0.0, 0
        for batch, reference in zip(self.text_batches, self.reference):
            logprobs = self._logprobs(batch)  # [B, L, V]
            total += float(kl_divergence(reference.to(logprobs.device), logprobs).sum())
            count += batch.numel()
        return total / count

    @torch.no_grad()
    def _logprobs(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.log_softmax(self.model(input_ids=batch).logits.float(), dim=-1)

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


def kl_divergence(reference_logprobs: torch.Tensor, logprobs: torch.Tensor) -> torch.Tensor:
    """KL(P || Q) per position, summed over the vocabulary: [..., V] log-probabilities -> [...]."""
    return (reference_logprobs.exp() * (reference_logprobs - logprobs)).sum(dim=-1)
