"""What serving an artifact means, checked before any engine starts (no vLLM import).

`open_artifact` runs in the front end (`vllm serve`, `LLM(...)`) and rejects, with one message
naming the file and field, every artifact the plugin cannot serve: a missing or malformed file, a
base model that is gone or another one, a layer count or mask shape that does not fit the model, an
architecture other than LLaVA, a KV scheme the quantizer does not implement. The engine's worker
then builds the layers' KV formats (`kv_formats`), logs `startup_table`, and counts the zeros of the
weights it loads (`vllm_adaspkv.format.ZeroCount`) against the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vllm_adaspkv.format import (
    MASK_FILE,
    PLAN_FILE,
    ArtifactError,
    ModelGeometry,
    PackedMasks,
    PackedWeights,
    Plan,
    base_model_dir,
    check_base_model,
    check_checkpoint,
    check_mask_shapes,
    check_num_layers,
    checkpoint_shapes,
    read_geometry,
    read_plan,
)
from vllm_adaspkv.kv.paged import KVFormat

ARCHITECTURE = "LlavaForConditionalGeneration"
# Where the base model is when it is not where the artifact says (another machine, another folder).
BASE_MODEL_ENV = "ADASPKV_BASE_MODEL"
PLUGIN_ARCHITECTURE = "AdaspkvLlavaForConditionalGeneration"


@dataclass(frozen=True)
class ServedArtifact:
    artifact_dir: Path
    model_dir: Path  # the checkpoint vLLM loads: the artifact itself if it is a full checkpoint
    plan: Plan
    geometry: ModelGeometry

    @property
    def has_masks(self) -> bool:
        """Whether the weights must be masked at load (a full checkpoint carries its zeros itself, packed
        weights replace the pruned ones)."""
        return not (self.plan.full_checkpoint or self.plan.packed_weights) and any(
            any(layer.sparsity.values()) for layer in self.plan.layers)


def open_artifact(art_dir: str | Path, base_model: str | Path | None = None) -> ServedArtifact:
    """Everything about an artifact that can be checked without loading the model (the front end).
    `base_model` overrides where the base model is looked for (routing passes $ADASPKV_BASE_MODEL)."""
    served = describe_artifact(art_dir, base_model)
    source = str(served.artifact_dir / PLAN_FILE)
    if served.plan.full_checkpoint:
        check_checkpoint(served.plan, served.model_dir, source)
    else:
        check_base_model(served.plan, served.model_dir, source)
    if served.has_masks:
        # from the masks file's header: no mask is unpacked here (each worker unpacks one at a time)
        check_mask_shapes(PackedMasks(served.artifact_dir, served.plan).shapes, checkpoint_shapes(served.model_dir),
                          str(served.artifact_dir / MASK_FILE))
    if served.plan.packed_weights:  # from the file's header too: each worker reads one weight at a time
        packed = PackedWeights(served.artifact_dir, served.plan)
        check_mask_shapes(packed.shapes, checkpoint_shapes(served.model_dir), str(packed.path), what="packed weight")
    return served


def describe_artifact(art_dir: str | Path, base_model: str | Path | None = None) -> ServedArtifact:
    """The plan and the model it is served over, with the cheap checks (no hashing, no masks read):
    what the worker needs after the front end has run `open_artifact`."""
    art_dir = Path(art_dir).resolve()
    plan = read_plan(art_dir)
    source = str(art_dir / PLAN_FILE)
    if plan.full_checkpoint:
        model_dir = art_dir
        if not (model_dir / "config.json").is_file():
            raise ArtifactError(f"{source}: full_checkpoint = true, but {art_dir} has no config.json")
    else:
        model_dir = Path(base_model).resolve() if base_model else base_model_dir(plan, art_dir).resolve()
        if not (model_dir / "config.json").is_file():
            given = f"{BASE_MODEL_ENV} = {str(base_model)!r}" if base_model else \
                f"base_model.path = {plan.base_model.path!r}"
            raise ArtifactError(f"{source}: the base model (sha256 {plan.base_model.sha256[:12]}...) is not at "
                                f"{model_dir} ({given}, no config.json there); put it there, set {BASE_MODEL_ENV} "
                                "to its directory, or export with --full-checkpoint")
    geometry = read_geometry(model_dir)
    if list(geometry.architectures) != [ARCHITECTURE]:
        raise ArtifactError(f"{model_dir / 'config.json'}: architectures = {list(geometry.architectures)}; the "
                            f"adaspkv plugin serves {ARCHITECTURE} only")
    check_num_layers(plan, geometry.num_layers, source)
    scheme = plan.kv_quant
    if scheme.symmetric or scheme.scale_dtype != "float16":
        raise ArtifactError(f"{source}: kv_quant symmetric={scheme.symmetric}, scale_dtype="
                            f"{scheme.scale_dtype!r}: the serving quantizer stores asymmetric codes with "
                            "float16 scales only")
    served = ServedArtifact(art_dir, model_dir, plan, geometry)
    try:
        kv_formats(served)
    except ValueError as exc:
        raise ArtifactError(f"{source}: kv_quant/kv_bits cannot be served for head_dim {geometry.head_dim}: "
                            f"{exc}") from None
    return served


def kv_formats(served: ServedArtifact) -> list[KVFormat | None]:
    """Per decoder layer its quantized KV format, or None for a 16-bit layer (vLLM's own cache)."""
    scheme = served.plan.kv_quant
    return [None if layer.kv_bits == 16 else
            KVFormat(layer.kv_bits, served.geometry.head_dim, scheme.group_size, scheme.key_rotation == "hadamard",
                     scheme.fp8(layer.kv_bits))
            for layer in served.plan.layers]


def startup_table(served: ServedArtifact, dense_element_bytes: int, budget_bytes: int | None,
                  block_size: int, tensor_parallel: int = 1) -> str:
    """Per layer bits, KV bytes per token (this rank's KV heads, K and V, scales included) and
    sparsity; then the cache's capacity against a 16-bit cache of the same budget. Under tensor
    parallelism each rank holds its share of the KV heads (at least one: vLLM replicates them when
    there are fewer heads than ranks), and the budget is per rank."""
    plan, geometry = served.plan, served.geometry
    scheme, group = plan.kv_quant, plan.kv_quant.group_size
    heads = max(1, geometry.num_kv_heads // tensor_parallel)

    def token_bytes(layers: range) -> int:
        return plan.kv_bytes_per_token(heads, geometry.head_dim, layers, dense_element_bytes)

    ranks = f", {heads} of {geometry.num_kv_heads} KV heads on each of {tensor_parallel} ranks" if tensor_parallel > 1 else ""
    rotation = ", keys Hadamard-rotated" if scheme.key_rotation == "hadamard" else ""
    rotation += "; 8 bits (fp8) as float8 e4m3 values, no scales" if scheme.fp8(8) else ""
    lines = [f"adaspkv: serving {served.artifact_dir} (model {served.model_dir}{ranks})",
             f"KV quantization below 16 bits: integer codes with one fp16 scale + zero per {group} of "
             f"{geometry.head_dim} values of a head{rotation}",
             f"{'layer':>5} {'kv bits':>7} {'bytes/token':>11} {'sparsity':>8}"]
    sparsity = plan.layer_sparsity(geometry.linear_sizes())
    for i, layer in enumerate(plan.layers):
        bits = "fp8" if scheme.fp8(layer.kv_bits) else layer.kv_bits
        lines.append(f"{i:>5} {bits:>7} {token_bytes(range(i, i + 1)):>11} {sparsity[i]:>8.3f}")
    total = token_bytes(range(plan.num_layers()))
    sixteen_bit = scheme.bytes_per_token([16] * plan.num_layers(), heads, geometry.head_dim)
    lines.append(f"KV bytes per token: {total} (16-bit cache: {sixteen_bit}); the same memory holds "
                 f"{sixteen_bit / total:.2f}x the tokens of a 16-bit cache")
    if budget_bytes:
        tokens = budget_bytes // (block_size * total) * block_size
        dense_tokens = budget_bytes // (block_size * sixteen_bit) * block_size
        lines.append(f"KV budget {budget_bytes} bytes: {tokens} tokens (16-bit cache: {dense_tokens})")
    return "\n".join(lines)
