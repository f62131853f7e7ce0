"""The schema of `adaspkv.json`, the plan of an artifact: pydantic models, the one definition of its fields.

The committed JSON Schema (`adaspkv.schema.json` beside this module) is generated from `Plan`
(`scripts/write_artifact_schema.py`); a test keeps the two equal. Reading and writing the artifact's
files is `vllm_adaspkv.format.artifact`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal, get_args

from pydantic import Field, field_validator, model_validator

from vllm_adaspkv.format.strict import AdaspkvError, AsTuple, PathText, StrictModel, int_choice
from vllm_adaspkv.kv.quant import KV_BITS, bytes_per_token

FORMAT_VERSION = 1
Linear = Literal["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
LINEARS: tuple[str, ...] = get_args(Linear)  # the prunable linears of a decoder layer, canonical order
PlanMetric = Literal["magnitude", "wanda", "lognorm", "sparsegpt", "none"]
PLAN_METRICS: tuple[str, ...] = get_args(PlanMetric)
ScaleDtype = Literal["float16", "float32", "bfloat16"]
KeyRotation = Literal["none", "hadamard"]
WeightFormat = Literal["masked", "packed"]
KEY_ROTATIONS: tuple[str, ...] = get_args(KeyRotation)
EightBitFormat = Literal["int8", "fp8_e4m3"]
EIGHT_BIT_FORMATS: tuple[str, ...] = get_args(EightBitFormat)
# Export records each mask's measured sparsity, so plan and masks agree up to float rounding; 1e-3 still
# catches a mask paired with the wrong plan (sparsity grids are much coarser than that). Every zero count
# (masks, pruned checkpoints, served weights) is compared with the plan at this tolerance.
SPARSITY_TOLERANCE = 1e-3
_MASK_KEY = re.compile(r"language_model\.model\.layers\.(\d+)\.(.+)\.weight")


class ArtifactError(AdaspkvError):
    """A malformed or mismatched artifact; the message names the file and the field."""


def mask_key(layer: int, linear: str) -> str:
    """The llava-hf parameter name of a decoder layer's linear weight: the key of its mask."""
    return f"language_model.model.layers.{layer}.{linear}.weight"


def parse_mask_key(key: str) -> tuple[int, str] | None:
    """(layer, linear) of a language-model linear weight's name, or None for any other name."""
    match = _MASK_KEY.fullmatch(key)
    return (int(match[1]), match[2]) if match and match[2] in LINEARS else None


def sparsity_differs(measured: float, expected: float) -> bool:
    return abs(measured - expected) > SPARSITY_TOLERANCE


class LayerPlan(StrictModel):
    error = ArtifactError
    sparsity: dict[Linear, Annotated[float, Field(ge=0.0, lt=1.0)]] = Field(
        description="share of zeroed weights of each pruned linear, in [0, 1); a linear left out is dense")
    kv_bits: int_choice(KV_BITS) = Field(16, description="bits per K/V value in this layer's cache")

    @field_validator("sparsity")
    @classmethod
    def _canonical_order(cls, value: dict) -> dict:
        return {name: value[name] for name in LINEARS if name in value}  # files diff cleanly


class KVQuantScheme(StrictModel):
    error = ArtifactError
    group_size: Annotated[int, Field(gt=0)] = Field(32, description="values per scale along the head dimension")
    symmetric: bool = False
    scale_dtype: ScaleDtype = "float16"
    key_rotation: KeyRotation = Field("none", description="'hadamard': keys are quantized in the Hadamard basis")
    eight_bit: EightBitFormat = Field(
        "int8", description="how 8-bit layers store K/V: 'int8' codes with a scale pair per group, or 'fp8_e4m3' "
                            "(vLLM's fp8 cache: one float8 e4m3 byte a value, no scales, clipped to +-448; CPU only)")

    def fp8(self, kv_bits: int) -> bool:
        """Whether a layer of `kv_bits` stores float8 e4m3 values."""
        return kv_bits == 8 and self.eight_bit == "fp8_e4m3"

    def bytes_per_token(self, bits_per_layer: list[int], num_kv_heads: int, head_dim: int,
                        dense_element_bytes: int = 2) -> int:
        """KV-cache bytes of one token over layers of these bits stored by this scheme (K and V, scales
        included); 16-bit layers at `dense_element_bytes` a value."""
        return bytes_per_token(bits_per_layer, num_kv_heads, head_dim, self.group_size, dense_element_bytes,
                               self.fp8(8))


Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class BaseCheckpoint(StrictModel):
    error = ArtifactError
    path: PathText = Field(description="the checkpoint the masks were computed on: relative to the artifact "
                                  "directory (so that both can move together), or absolute")
    sha256: Sha256 = Field(description="model_sha256 of that checkpoint: its identity wherever it is found")


class Evaluation(StrictModel):
    """What export measured: the search objective of the dense and the compressed model."""

    error = ArtifactError
    objective: str
    dense: float
    pruned: float
    mean_sparsity: Annotated[float, Field(ge=0.0, lt=1.0)] = Field(
        description="share of zeroed weights over all pruned linears, counted on the masks")


class Provenance(StrictModel):
    """How the artifact was made (informational, but checked like every other field)."""

    error = ArtifactError
    calibration: dict[str, Any] | None = None  # the CalibrationConfig and its cache file
    objective: str | None = None
    seed: int | None = None
    study_name: str | None = None
    storage: str | None = None  # the Optuna storage URL, password removed
    trial: Annotated[int, Field(ge=0)] | None = None
    objective_values: list[float] | None = None
    trials_completed: Annotated[int, Field(ge=0)] | None = None
    timing: dict[str, float] | None = None


class Plan(StrictModel):
    """adaspkv.json: per decoder layer the sparsity of each pruned linear and the KV bit width."""

    error = ArtifactError
    format_version: int_choice((FORMAT_VERSION,)) = FORMAT_VERSION  # first: it says how to read the rest
    base_model: BaseCheckpoint
    layers: Annotated[tuple[LayerPlan, ...], AsTuple] = Field(
        description="one entry per decoder layer, in layer order", json_schema_extra={"minItems": 1})
    metric: PlanMetric
    structure: str = Field("unstructured", description="'unstructured', or 'N:M': N of every M consecutive "
                                                       "inputs of a row are pruned")
    allocation: str = "uniform"
    kv_quant: KVQuantScheme = KVQuantScheme()
    full_checkpoint: bool = Field(False, description="the artifact holds the pruned checkpoint itself")
    weight_format: WeightFormat = Field("masked", description="how a CPU server keeps the pruned linears: "
                                        "'masked' dense weights with zeros, or 'packed' (bitmask + kept values)")
    packed_weights: bool = Field(False, description="the artifact stores its pruned linears packed (bitmask + kept "
                                 "values + row offsets) in packed_weights.safetensors, in place of masks over the "
                                 "base model's weights; needs weight_format 'packed'")
    checkpoint_sha256: Sha256 | None = Field(None, description="with full_checkpoint: model_sha256 of the "
                                                               "artifact's own checkpoint")
    provenance: Provenance = Provenance()
    evaluation: Evaluation | None = None

    @field_validator("layers")
    @classmethod
    def _not_empty(cls, value: tuple) -> tuple:
        if not value:
            raise ValueError("must have one entry per decoder layer")
        return value

    @field_validator("structure")
    @classmethod
    def _n_of_m(cls, value: str) -> str:
        nm = re.fullmatch(r"(\d+):(\d+)", value)
        if value != "unstructured" and not (nm and 1 <= int(nm[1]) < int(nm[2])):
            raise ValueError("allowed 'unstructured' or 'N:M' with 1 <= N < M")
        return value

    @model_validator(mode="after")
    def _checkpoint_hash(self) -> Plan:
        if self.full_checkpoint and self.checkpoint_sha256 is None:
            raise ValueError("full_checkpoint = true needs checkpoint_sha256, the hash of the pruned checkpoint "
                             "(re-export the artifact)")
        if not self.full_checkpoint and self.checkpoint_sha256 is not None:
            raise ValueError("checkpoint_sha256 is set but full_checkpoint is false")
        if self.packed_weights and (self.full_checkpoint or self.weight_format != "packed"):
            raise ValueError(f"packed_weights = true needs full_checkpoint = false and weight_format = 'packed', not "
                             f"{str(self.full_checkpoint).lower()} and {self.weight_format!r}")
        return self

    @classmethod
    def from_json(cls, data: Any, source: str) -> Plan:
        """The plan of parsed JSON; errors start with `source` (the file)."""
        # the version first: another version may lay out every other field differently
        version = data.get("format_version", "missing") if isinstance(data, dict) else None
        try:
            if not isinstance(data, dict):
                raise ArtifactError("the top level must be a JSON object")
            if version != FORMAT_VERSION or type(version) is not int:
                raise ArtifactError(f"format_version = {version!r}: this release reads {FORMAT_VERSION}")
            return cls.parse(data)
        except ArtifactError as exc:
            raise ArtifactError(f"{source}: {exc}") from None

    def n_of_m(self) -> tuple[int, int] | None:
        """(N, M) of an N:M structure, None for unstructured."""
        if self.structure == "unstructured":
            return None
        n, m = self.structure.split(":")
        return int(n), int(m)

    def to_json(self) -> dict:
        return self.model_dump(mode="json")

    def num_layers(self) -> int:
        return len(self.layers)

    def mean_kv_bits(self) -> float:
        return sum(layer.kv_bits for layer in self.layers) / len(self.layers)

    def kv_bytes_per_token(self, num_kv_heads: int, head_dim: int, layers: range | None = None,
                           dense_element_bytes: int = 2) -> int:
        """KV-cache bytes of one token (K and V of `num_kv_heads` heads in each of `layers`, default all;
        scales included) as this plan stores them; 16-bit layers at `dense_element_bytes` a value."""
        bits = [self.layers[i].kv_bits for i in (layers if layers is not None else range(len(self.layers)))]
        return self.kv_quant.bytes_per_token(bits, num_kv_heads, head_dim, dense_element_bytes)

    def layer_sparsity(self, params_per_linear: Mapping[str, int]) -> list[float]:
        """Per decoder layer, the share of its linear weights that are zero: what "a layer's sparsity"
        means everywhere (report, start-up table, demo). params_per_linear: linear -> weights in one
        layer (`ModelGeometry.linear_sizes()`); a linear the plan prunes must have a size."""
        for layer in self.layers:
            for name, value in layer.sparsity.items():
                if value and name not in params_per_linear:
                    raise ValueError(f"layer sparsity: the plan prunes {name} but params_per_linear has no size for it")
        total = sum(params_per_linear.values())
        return [sum(layer.sparsity.get(name, 0.0) * size for name, size in params_per_linear.items()) / total
                for layer in self.layers]

    def mean_sparsity(self, params_per_linear: Mapping[str, int]) -> float:
        """Share of zeroed weights over all layers (decoder layers have equal sizes)."""
        values = self.layer_sparsity(params_per_linear)
        return sum(values) / len(values)
