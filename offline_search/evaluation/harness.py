"""The evaluation harness behind `adaspkv eval`: WikiText-2 perplexity and ShapesVQA accuracy,
measured offline through transformers or through a running OpenAI-compatible server, the same way."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Annotated, Literal, get_args

import torch
from pydantic import Field, model_validator
from tqdm import tqdm

from offline_search.core.perplexity import (perplexity_standard_error, unigram_perplexity, window_mean_nll,
                                            window_nll, windows)
from offline_search.data import shapes_vqa
from offline_search.data.calibration_data import text_tokens
from offline_search.data.text_data import wikitext_path
from offline_search.data.vqa_batches import prompt_inputs
from offline_search.model.llava import model_geometry, model_linears
from vllm_adaspkv.format import StrictModel, read_geometry
from vllm_adaspkv.format.strict import AsTuple, PathText, ServerUrl

Task = Literal["wikitext2", "shapesvqa"]
TASKS: tuple[str, ...] = get_args(Task)
SHAPES_TEST_SIZE = 1000  # the test split: samples 0..999 of the test seed
ANSWER_TOKENS = 4


class EvalConfig(StrictModel):
    model: PathText  # bundled name or checkpoint directory
    artifact: PathText | None = None  # an adaspkv artifact over `model`: its masks are applied
    tasks: Annotated[tuple[Task, ...], AsTuple, Field(min_length=1)] = TASKS
    limit: Annotated[int, Field(ge=1)] | None = None  # at most this many WikiText windows / ShapesVQA questions
    questions: Annotated[int, Field(ge=1, le=SHAPES_TEST_SIZE)] | None = None  # ShapesVQA questions (default: limit or all)
    server: ServerUrl | None = None  # an OpenAI-compatible server's base URL
    served_model: str | None = None  # the server's model name (default: its first model)
    seq_len: Annotated[int, Field(ge=2)] | None = None  # default: the model's max_position_embeddings
    batch_size: Annotated[int, Field(ge=1)] = 16
    concurrency: Annotated[int, Field(ge=1)] = 8  # parallel requests to a server

    @model_validator(mode="after")
    def _offline_or_served(self) -> EvalConfig:
        if self.artifact is not None and self.server is not None:
            raise ValueError("--artifact applies an artifact offline; to evaluate a served artifact, "
                             "serve it (vllm serve ART_DIR --plugin adaspkv) and pass only --server")
        return self


def evaluate(config: EvalConfig, model_dir: Path) -> dict:
    """Runs the configured tasks on the checkpoint in `model_dir` (or on the server serving it)."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(model_dir))
    seq_len = config.seq_len or read_geometry(model_dir).max_position_embeddings
    if config.server:
        backend = ServedModel(config.server, config.served_model, config.concurrency)
    else:
        backend = OfflineModel(load_model(model_dir, config.artifact), processor, config.batch_size)
    results: dict = {"model": str(model_dir), "backend": backend.describe()}
    if config.artifact:
        results["artifact"] = str(config.artifact)
    if "wikitext2" in config.tasks:
        results |= eval_wikitext2(backend, processor.tokenizer, seq_len, config.limit)
    if "shapesvqa" in config.tasks:
        limit = config.questions or min(config.limit or SHAPES_TEST_SIZE, SHAPES_TEST_SIZE)
        image_size = processor.image_processor.crop_size["height"]
        results |= eval_shapesvqa(backend, shapes_vqa.samples("test", limit, image_size))
    return results


def load_model(model_dir: Path, artifact: str | None):
    """The transformers LLaVA, with the artifact's masks (or its packed linears, or its pruned checkpoint)
    when given."""
    import vllm_adaspkv.format as art
    from vllm_adaspkv.sparse.packing import unpack
    from offline_search.data.checkpoint import load_llava

    if artifact is None:
        return load_llava(model_dir)[0]
    plan = art.read_plan(artifact)
    source = str(Path(artifact) / art.PLAN_FILE)
    art.check_base_model(plan, model_dir, source)
    model = load_llava(artifact if plan.full_checkpoint else model_dir)[0]
    art.check_num_layers(plan, model_geometry(model).num_layers, source)
    if any(layer.kv_bits != 16 for layer in plan.layers):  # the KV plan, simulated with the serving quantizer
        from offline_search.model.kv_simulation import apply_kv_plan

        apply_kv_plan(model, [layer.kv_bits for layer in plan.layers], plan.kv_quant)
    linears = model_linears(model)
    if plan.full_checkpoint:  # the pruned weights themselves: their zeros must match the plan
        zeros = art.ZeroCount(plan)
        for key, linear in linears.items():
            zeros.observe(key, linear.weight)
        zeros.check(source)
        return model
    if plan.packed_weights:  # the pruned linears themselves, stored packed
        weights = art.PackedWeights(artifact, plan)
        art.check_mask_shapes(weights.shapes, {key: tuple(m.weight.shape) for key, m in linears.items()},
                              str(weights.path), what="packed weight")
        with torch.no_grad():
            for key in weights.keys():
                linears[key].weight.copy_(unpack(weights.get(key)))
        return model
    if not (Path(artifact) / art.MASK_FILE).is_file() and not any(
            s for layer in plan.layers for s in layer.sparsity.values()):
        return model  # a KV-only plan: no weight is pruned
    masks = art.read_masks(artifact, plan)
    art.check_mask_shapes({k: tuple(m.shape) for k, m in masks.items()}, {key: tuple(m.weight.shape) for key, m in linears.items()}, source)
    with torch.no_grad():
        for key, mask in masks.items():
            linears[key].weight.mul_(mask.to(linears[key].weight.dtype))
    return model


def eval_wikitext2(backend, tokenizer, seq_len: int, limit: int | None) -> dict:
    test = text_tokens(str(wikitext_path("test")), tokenizer)
    train = text_tokens("wikitext2", tokenizer)  # the validation split
    chunks = windows(test, seq_len, limit)
    batches = list(chunks.split(backend.batch_size))
    means = window_mean_nll(backend.window_nll, tqdm(batches, desc="wikitext2", unit="batch"))
    return {
        "wikitext2_ppl": math.exp(float(means.mean())),
        "wikitext2_ppl_se": perplexity_standard_error(means),
        "wikitext2_window_nll": means.tolist(),  # per window: paired comparisons between runs
        "wikitext2_windows": chunks.shape[0],
        "wikitext2_seq_len": seq_len,
        "unigram_ppl": unigram_perplexity(train, test, len(tokenizer)),
    }


def eval_shapesvqa(backend, questions: Sequence[shapes_vqa.Sample]) -> dict:
    predictions = backend.answers(questions)
    correct = [shapes_vqa.is_correct(p, q.answer) for p, q in zip(predictions, questions)]
    by_type_total = Counter(q.question_type for q in questions)
    by_type_correct = Counter(q.question_type for q, ok in zip(questions, correct) if ok)
    return {
        "shapesvqa_accuracy": sum(correct) / len(questions),
        "shapesvqa_questions": len(questions),
        "shapesvqa_by_type": {t: by_type_correct[t] / n for t, n in sorted(by_type_total.items())},
        "shapesvqa_predictions": predictions,
    }


class OfflineModel:
    """A transformers LLaVA: batched teacher-forced scoring and greedy answers."""

    def __init__(self, model, processor, batch_size: int, show_progress: bool = True):
        self.model, self.processor, self.batch_size = model, processor, batch_size
        self.show_progress = show_progress

    def describe(self) -> str:
        return "transformers"

    @torch.no_grad()
    def window_nll(self, batch: torch.Tensor) -> torch.Tensor:
        return window_nll(self.model(input_ids=batch).logits, batch)

    @torch.no_grad()
    def answers(self, questions: Sequence[shapes_vqa.Sample]) -> list[str]:
        out = []
        starts = range(0, len(questions), self.batch_size)
        for start in tqdm(starts, desc="shapesvqa", unit="batch", disable=not self.show_progress):
            inputs = prompt_inputs(self.processor, questions[start:start + self.batch_size])
            generated = self.model.generate(**inputs, max_new_tokens=ANSWER_TOKENS, do_sample=False)
            new = generated[:, inputs["input_ids"].shape[1]:]
            out += self.processor.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [text.strip() for text in out]


class ServedModel:
    """An OpenAI-compatible server (vLLM): chat requests for answers, prompt log-probs for NLL."""

    def __init__(self, base_url: str, model: str | None, concurrency: int):
        from openai import OpenAI

        self.client = OpenAI(base_url=base_url.rstrip("/") + "/v1", api_key="EMPTY", max_retries=0)
        self.model = model or self.client.models.list().data[0].id
        self.base_url, self.concurrency, self.batch_size = base_url, concurrency, concurrency

    def describe(self) -> str:
        return f"server {self.base_url} model {self.model}"

    def window_nll(self, batch: torch.Tensor) -> torch.Tensor:
        with ThreadPoolExecutor(self.concurrency) as pool:
            return torch.tensor(list(pool.map(self._one_window_nll, batch.tolist())), dtype=torch.float64)

    def _one_window_nll(self, ids: list[int]) -> float:
        from openai import BadRequestError

        # vLLM's extension: prompt_logprobs=0 returns the log-prob of each prompt token. A request
        # must also generate one token, so the server's max_model_len must exceed the window.
        try:
            response = self.client.completions.create(
                model=self.model, prompt=ids, max_tokens=1, temperature=0.0,
                extra_body={"prompt_logprobs": 0, "add_special_tokens": False})
        except BadRequestError as exc:
            raise RuntimeError(
                f"the server refused a perplexity window of {len(ids)} tokens ({exc.message}); "
                f"its max_model_len must be at least {len(ids) + 1}: start vLLM with --max-model-len "
                f"{len(ids) + 1} (and VLLM_ALLOW_LONG_MAX_MODEL_LEN=1 if that exceeds the model's "
                "limit), or evaluate shorter windows with --seq-len") from None
        entries = response.choices[0].model_extra["prompt_logprobs"]  # [None, {id: {...}}, ...]
        return -sum(entries[i][str(ids[i])]["logprob"] for i in range(1, len(ids)))

    def answers(self, questions: Sequence[shapes_vqa.Sample]) -> list[str]:
        from offline_search.evaluation.openai_chat import ask, image_message, pil_data_url

        def one(q: shapes_vqa.Sample) -> str:
            return ask(self.client, self.model, [image_message(q.question, pil_data_url(q.image))],
                       ANSWER_TOKENS).strip()

        with ThreadPoolExecutor(self.concurrency) as pool:
            return list(tqdm(pool.map(one, questions), total=len(questions), desc="shapesvqa", unit="q"))
