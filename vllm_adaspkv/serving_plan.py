"""What serving an artifact means, checked before any engine starts (no vLLM import).

`open_artifact` runs in the front end (`vllm serve`, `LLM(...)`) and rejects, with one message
naming the file and field, every artifact the plugin cannot serve: a missing or malformed file, a
base model that is gone or another one, a layer count or mask shape that does not fit the model, an
architecture other than LLaVA, a KV scheme the quantizer does not implement. The engine's worker
then builds the layers' KV formats (`kv_formats`), logs `startup_table`, and counts the zeros of the
weights it loads (`ZeroCount`) against the plan.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from vllm_adaspkv.artifact import (
    LINEARS, MASK_FILE, PLAN_FILE, SPARSITY_TOLERANCE, ArtifactError, Plan, check_base_model,
    check_mask_shapes, check_num_layers, read_masks, read_plan,
)
from vllm_adaspkv.paged_kv import KVFormat

ARCHITECTURE = "LlavaForConditionalGeneration"
PLUGIN_ARCHITECTURE = "AdaspkvLlavaForConditionalGeneration"
# llava-hf checkpoints written by transformers >= 4.52 nest the language model the other way round
_NEW_LAYOUT = re.compile(r"^model\.language_model\.")
_LINEAR_KEY = re.compile(r"language_model\.model\.layers\.(\d+)\.(.+)\.weight")


def is_artifact(model: str | Path) -> bool:
    return (Path(model) / PLAN_FILE).is_file()


@dataclass(frozen=True)
class ServedArtifact:
    artifact_dir: Path
    model_dir: Path  # the checkpoint vLLM loads: the artifact itself if it is a full checkpoint
    plan: Plan
    head_dim: int
    num_kv_heads: int

    @property
    def has_masks(self) -> bool:
        """Whether the weights must be masked at load (a full checkpoint carries its zeros itself)."""
        return not self.plan.full_checkpoint and any(any(layer.sparsity.values()) for layer in self.plan.layers)


def canonical_key(name: str) -> str:
    """A llava-hf weight name in the artifact's key space (language_model.model.layers...)."""
    return _NEW_LAYOUT.sub("language_model.model.", name)


def checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Weight shapes from the safetensors headers (no tensor is read)."""
    shapes = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        if path.name == MASK_FILE:
            continue
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shapes[canonical_key(key)] = tuple(f.get_slice(key).get_shape())
    return shapes


def open_artifact(art_dir: str | Path) -> ServedArtifact:
    """Everything about an artifact that can be checked without loading the model (the front end)."""
    served = describe_artifact(art_dir)
    if not served.plan.full_checkpoint:
        check_base_model(served.plan, served.model_dir, str(served.artifact_dir / PLAN_FILE))
    if served.has_masks:
        check_mask_shapes(read_masks(served.artifact_dir, served.plan), checkpoint_shapes(served.model_dir),
                          str(served.artifact_dir / MASK_FILE))
    return served


def describe_artifact(art_dir: str | Path) -> ServedArtifact:
    """The plan and the model it is served over, with the cheap checks (no hashing, no masks read):
    what the worker needs after the front end has run `open_artifact`."""
    art_dir = Path(art_dir).resolve()
    plan = read_plan(art_dir)
    source = str(art_dir / PLAN_FILE)
    model_dir = art_dir if plan.full_checkpoint else Path(plan.base_model.path)
    if not (model_dir / "config.json").is_file():
        where = "the artifact holds no full checkpoint and" if not plan.full_checkpoint else "the artifact"
        raise ArtifactError(f"{source}: {where} {model_dir} has no config.json (base_model.path = "
                            f"{plan.base_model.path!r}); put the base model there or export with "
                            "--full-checkpoint")
    config = json.loads((model_dir / "config.json").read_text())
    architectures = config.get("architectures") or []
    if architectures != [ARCHITECTURE]:
        raise ArtifactError(f"{model_dir / 'config.json'}: architectures = {architectures}; the adaspkv "
                            f"plugin serves {ARCHITECTURE} only")
    text = config.get("text_config") or {}
    check_num_layers(plan, int(text.get("num_hidden_layers", -1)), source)
    num_heads = int(text["num_attention_heads"])
    head_dim = int(text.get("head_dim") or text["hidden_size"] // num_heads)
    scheme = plan.kv_quant
    if scheme.symmetric or scheme.scale_dtype != "float16":
        raise ArtifactError(f"{source}: kv_quant symmetric={scheme.symmetric}, scale_dtype="
                            f"{scheme.scale_dtype!r}: the serving quantizer stores asymmetric codes with "
                            "float16 scales only")
    served = ServedArtifact(art_dir, model_dir, plan, head_dim, int(text.get("num_key_value_heads", num_heads)))
    try:
        kv_formats(served)
    except ValueError as exc:
        raise ArtifactError(f"{source}: kv_quant/kv_bits cannot be served for head_dim {head_dim}: {exc}") from None
    return served


def kv_formats(served: ServedArtifact) -> list[KVFormat | None]:
    """Per decoder layer its quantized KV format, or None for a 16-bit layer (vLLM's own cache)."""
    scheme = served.plan.kv_quant
    return [None if layer.kv_bits == 16 else
            KVFormat(layer.kv_bits, served.head_dim, scheme.group_size, scheme.key_rotation == "hadamard")
            for layer in served.plan.layers]


def startup_table(served: ServedArtifact, dense_element_bytes: int, budget_bytes: int | None,
                  block_size: int) -> str:
    """Per layer bits, KV bytes per token (all KV heads, K and V, scales included) and sparsity; then
    the cache's capacity against a 16-bit cache of the same budget."""
    dense = 2 * served.head_dim * dense_element_bytes * served.num_kv_heads
    lines = [f"adaspkv: serving {served.artifact_dir} (model {served.model_dir})",
             f"{'layer':>5} {'kv bits':>7} {'bytes/token':>11} {'sparsity':>8}"]
    total = 0
    for i, (layer, fmt) in enumerate(zip(served.plan.layers, kv_formats(served))):
        per_token = dense if fmt is None else fmt.token_head_bytes * served.num_kv_heads
        total += per_token
        mean = sum(layer.sparsity.values()) / len(LINEARS)  # unweighted: the table is a glance
        lines.append(f"{i:>5} {layer.kv_bits:>7} {per_token:>11} {mean:>8.3f}")
    sixteen_bit = 2 * served.head_dim * 2 * served.num_kv_heads * len(served.plan.layers)
    lines.append(f"KV bytes per token: {total} (16-bit cache: {sixteen_bit}); the same memory holds "
                 f"{sixteen_bit / total:.2f}x the tokens of a 16-bit cache")
    if budget_bytes:
        tokens = budget_bytes // (block_size * total) * block_size
        dense_tokens = budget_bytes // (block_size * sixteen_bit) * block_size
        lines.append(f"KV budget {budget_bytes} bytes: {tokens} tokens (16-bit cache: {dense_tokens})")
    return "\n".join(lines)


class ZeroCount:
    """Counts the zeros of each pruned-or-prunable linear as its weight is loaded, then compares
    every layer with the plan. Counted on the whole Hugging Face tensor before tensor-parallel
    slicing, so every rank checks the same numbers."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.measured: dict[tuple[int, str], float] = {}

    def observe(self, key: str, weight: torch.Tensor) -> None:
        match = _LINEAR_KEY.fullmatch(key)
        if match and match[2] in LINEARS:
            self.measured[int(match[1]), match[2]] = int((weight == 0).sum()) / weight.numel()

    def check(self, source: str) -> None:
        """Raises ArtifactError on the first linear whose share of zeros differs from the plan.
        Layers not on this rank (pipeline parallelism) are not seen and not checked."""
        for (layer, linear), measured in sorted(self.measured.items()):
            expected = self.plan.layers[layer].sparsity.get(linear, 0.0)
            if abs(measured - expected) > SPARSITY_TOLERANCE:
                raise ArtifactError(f"{source}: layer {layer} {linear} was loaded with sparsity "
                                    f"{measured:.4f}; {PLAN_FILE} says {expected:.4f}")
