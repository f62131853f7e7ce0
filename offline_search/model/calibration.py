"""Calibration: per-linear input statistics of a LLaVA's language model, gathered layer by layer.

The calibration samples (text windows, and ShapesVQA image + question + answer conversations) run
through the model once up to the first decoder layer, whose inputs are kept; then each decoder layer
in turn runs over all of them with forward hooks on its linears, and its outputs become the next
layer's inputs (as the SparseGPT and Wanda codes do). Per linear:
- `in_sq` [d_in]: mean over tokens of x_j^2 (Wanda's and lognorm's activation term);
- `hessian` [d_in, d_in]: the mean of 2 x x^T (SparseGPT), when asked for; handed to `save_hessians`
  one layer at a time and not kept (a 7B model's are 22 GB);
- `diversity`: TAMP's token diversity of the layer's outputs, averaged over image samples (DAS);
- `amia_in_sq` [d_in]: like `in_sq`, but over the tokens TAMP's AMIA selects (image samples).
Layer i+1 sees layer i's *dense* outputs (the reference Wanda and SparseGPT feed it the pruned ones):
statistics of the dense model, which is what lets one cached calibration serve every trial of a search
and every later run. Memory: the model, one layer's statistics and the hidden states of the samples.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Annotated

import torch
from pydantic import Field, model_validator
from tqdm import tqdm

from offline_search.core import tamp
from offline_search.core.perplexity import windows
from offline_search.core.sparsegpt import accumulate_hessian
from offline_search.data.calibration_data import image_samples, text_tokens
from offline_search.data.vqa_batches import answer_batch
from offline_search.model.llava import decoder_layers, model_geometry
from vllm_adaspkv.format import LINEARS, StrictModel, mask_key

# Linears that read the same input tensor share its statistics (computed once, stored once).
# Bump when the statistics computed here (or by tamp / sparsegpt) change: old cache entries are then
# no longer found, instead of silently feeding new code with old numbers.
STATISTICS_VERSION = 3
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}


class CalibrationConfig(StrictModel):
    text: str | None = "wikitext2"  # "wikitext2" (bundled validation split), a text file, dataset:..., or None
    text_windows: Annotated[int, Field(ge=1)] = 32  # windows of seq_len tokens
    seq_len: Annotated[int, Field(ge=2)] | None = None  # default: the model's max_position_embeddings
    images: str | None = "shapesvqa"  # ShapesVQA train-split conversations, a folder, or None
    image_samples: Annotated[int, Field(ge=1)] = 32
    hessian: bool = False  # SparseGPT
    diversity: bool = False  # TAMP DAS
    amia: bool = False  # TAMP AMIA token selection

    @model_validator(mode="after")
    def _inputs(self) -> CalibrationConfig:
        if self.text is None and self.images is None:
            raise ValueError("calibration needs text or images (both are off)")
        if (self.diversity or self.amia) and self.images is None:
            raise ValueError("TAMP's DAS and AMIA measure visual against text tokens: they need image "
                             "calibration samples (--calibration-images shapesvqa)")
        return self

    def cache_key(self, model_sha256: str) -> str:
        settings = json.dumps({"model": model_sha256, "version": STATISTICS_VERSION, **self.model_dump()},
                              sort_keys=True)
        return hashlib.sha256(settings.encode()).hexdigest()[:24]


class _Collector:
    """Forward hooks on every language-model linear; accumulates the statistics of one pass."""

    def __init__(self, linears: dict[str, torch.nn.Module], config: CalibrationConfig):
        self.config = config
        self.stats: dict[str, dict] = {key: {"tokens": 0} for key in linears}
        self.sample_io: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # AMIA / DAS: this sample
        self.keep_sample_io = False
        self.handles = [m.register_forward_hook(self._hook(key)) for key, m in linears.items()]

    def _hook(self, key: str):
        reads_shared = any(key.endswith(f".{name}.weight") for name in SHARED_INPUT)

        def hook(module, inputs, output):
            x = inputs[0].detach().float().reshape(-1, inputs[0].shape[-1])  # [tokens, d_in]
            if self.keep_sample_io:
                self.sample_io[key] = (x, output.detach().float().reshape(-1, output.shape[-1]))
            if reads_shared:
                return  # statistics of this input are gathered by the linear that shares it
            s = self.stats[key]
            n = s["tokens"]
            s["in_sq"] = _running_mean(s.get("in_sq"), n, x.pow(2).mean(0), x.shape[0])
            if self.config.hessian:
                s["hessian"], _ = accumulate_hessian(s.get("hessian"), n, x)
            s["tokens"] = n + x.shape[0]
        return hook

    def close(self):
        for handle in self.handles:
            handle.remove()


def _running_mean(mean: torch.Tensor | None, count: int, batch_mean: torch.Tensor, batch_count: int):
    if mean is None:
        return batch_mean
    return mean * (count / (count + batch_count)) + batch_mean * (batch_count / (count + batch_count))


class _Captured(Exception):
    """Stops a forward pass at the first decoder layer once its inputs are kept."""


@dataclass
class _Sample:
    hidden: torch.Tensor  # [batch, tokens, hidden]: the next layer's input
    kwargs: dict  # position embeddings, attention mask, ...: the same for every layer
    is_visual: torch.Tensor | None  # [tokens] for an image sample, None for text


@torch.no_grad()
def calibrate(model, processor, config: CalibrationConfig, show_progress: bool = True,
              save_hessians: Callable[[int, dict[str, torch.Tensor]], None] | None = None) -> dict[str, dict]:
    """Mask key -> {"in_sq", "diversity"?, "amia_in_sq"?, "tokens"} for every linear; with
    config.hessian, each layer's {mask key: Hessian} goes to `save_hessians(layer, hessians)` (kept in
    the statistics under "hessian" when it is None: small models)."""
    text, images = _layer_inputs(model, processor, config, show_progress)
    stats: dict[str, dict] = {}
    layers = decoder_layers(model)
    for i, layer in enumerate(tqdm(layers, desc="calibration", unit="layer", disable=not show_progress)):
        linears = {mask_key(i, name): layer.get_submodule(name) for name in LINEARS}
        collector = _Collector(linears, config)
        try:
            for sample in text:
                sample.hidden = layer(sample.hidden, **sample.kwargs)
            if images:
                _image_layer(model, layer, images, collector, config)
        finally:
            collector.close()
        layer_stats = _shared_inputs(collector.stats)
        if config.hessian and save_hessians is not None:
            save_hessians(i, {key: s.pop("hessian") for key, s in layer_stats.items()})
        stats |= {key: {k: v.cpu() if torch.is_tensor(v) else v for k, v in s.items()}
                  for key, s in layer_stats.items()}
    return stats


def _shared_inputs(stats: dict[str, dict]) -> dict[str, dict]:
    """Linears reading a shared input point at the same tensors."""
    for key in stats:
        for name, source in SHARED_INPUT.items():
            if key.endswith(f".{name}.weight"):
                shared = stats[key.replace(name, source)]
                stats[key] |= {k: shared[k] for k in ("in_sq", "hessian", "tokens") if k in shared}
    return stats


def _layer_inputs(model, processor, config: CalibrationConfig, show_progress: bool):
    """(text samples, image samples): each calibration forward pass stopped at the first decoder layer."""
    first = decoder_layers(model)[0]
    kept: list[tuple[torch.Tensor, dict]] = []

    def keep(module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kept.append((hidden, {k: v for k, v in kwargs.items() if k != "past_key_values"}))
        raise _Captured

    def run(**inputs):
        try:
            model(**{k: v.to(model.device) for k, v in inputs.items()}, use_cache=False)
        except _Captured:
            return kept.pop()
        raise RuntimeError("the model's forward pass never reached its first decoder layer")

    handle = first.register_forward_pre_hook(keep, with_kwargs=True)
    text, images = [], []
    try:
        if config.text is not None:
            seq_len = config.seq_len or model_geometry(model).max_position_embeddings
            chunks = windows(text_tokens(config.text, processor.tokenizer), seq_len, config.text_windows)
            for batch in tqdm(chunks.split(8), desc="calibration text", unit="batch", disable=not show_progress):
                text.append(_Sample(*run(input_ids=batch), None))
        if config.images is not None:
            image_size = processor.image_processor.crop_size["height"]
            with _attention_for(model, config):
                samples = image_samples(config.images, config.image_samples, image_size)
                for sample in tqdm(samples, desc="calibration images", unit="sample", disable=not show_progress):
                    # One conversation per forward pass: no padding tokens in the statistics.
                    batch = answer_batch(processor, [sample])
                    hidden, kwargs = run(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
                    images.append(_Sample(hidden, kwargs, batch["input_ids"][0] == model.config.image_token_id))
    finally:
        handle.remove()
    return text, images


@contextmanager
def _attention_for(model, config: CalibrationConfig):
    """AMIA reads attention weights, which only the eager implementation returns; its masks are built
    for it, so image samples are captured and run with it."""
    previous = model.config._attn_implementation
    if config.amia:
        model.set_attn_implementation("eager")
    try:
        yield
    finally:
        if config.amia:
            model.set_attn_implementation(previous)


def _image_layer(model, layer, images: list[_Sample], collector: _Collector, config: CalibrationConfig):
    need_tokens = config.diversity or config.amia
    collector.keep_sample_io = need_tokens
    weights: list[torch.Tensor] = []
    handle = layer.self_attn.register_forward_hook(lambda m, args, out: weights.append(out[1])) \
        if config.amia else None
    try:
        with _attention_for(model, config):
            for sample in images:
                sample.hidden = layer(sample.hidden, **sample.kwargs)
                if need_tokens:
                    _token_statistics(collector, sample.is_visual, weights.pop() if config.amia else None, config)
    finally:
        collector.keep_sample_io = False
        if handle is not None:
            handle.remove()


def _token_statistics(collector: _Collector, is_visual: torch.Tensor, attention: torch.Tensor | None,
                      config: CalibrationConfig):
    """attention [1, heads, tokens, tokens]: this layer's weights for this sample (AMIA)."""
    for key, (x, y) in collector.sample_io.items():
        s = collector.stats[key]
        c_v, c_l, c_vl = tamp.cosine_stats(y, is_visual)
        if config.diversity:
            s["diversity_sum"] = s.get("diversity_sum", 0.0) + tamp.token_diversity(y, is_visual)
            s["diversity_samples"] = s.get("diversity_samples", 0) + 1
            s["diversity"] = s["diversity_sum"] / s["diversity_samples"]
        if config.amia:  # per linear: the selection follows this linear's own outputs
            last_row = attention[0, :, -1, :].float().mean(0)  # [tokens], head-averaged
            rho = min(max((c_v + c_l + c_vl) / 3, 0.0), 1.0)
            chosen = tamp.amia_select(y, last_row, rho)  # [tokens] bool
            n = s.get("amia_tokens", 0)
            s["amia_in_sq"] = _running_mean(s.get("amia_in_sq"), n, x[chosen].pow(2).mean(0), int(chosen.sum()))
            s["amia_tokens"] = n + int(chosen.sum())
    collector.sample_io.clear()
