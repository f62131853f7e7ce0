"""The artifact format: the contract between the offline search and the vLLM plugin.

An artifact directory holds `adaspkv.json` (the plan: base model and its hash, per decoder layer the
sparsity of each pruned linear and the KV bit width, metric, structure, KV quantization scheme,
provenance, evaluation) and `masks.safetensors`: one keep mask per pruned weight, 1 bit per weight
(numpy.packbits, big bit order, over the row-major flattened mask), keyed by the llava-hf parameter
name; the mask shapes are in the safetensors metadata. It may also hold a full pruned checkpoint.

This module owns reading, writing and validating that format. Pure Python, torch and safetensors:
no vLLM or Optuna import, so the plugin and the search share it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
PLAN_FILE = "adaspkv.json"
MASK_FILE = "masks.safetensors"
KV_BITS = (16, 8, 6, 4, 2)
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PLAN_METRICS = ("magnitude", "wanda", "lognorm", "sparsegpt", "none")
SCALE_DTYPES = ("float16", "float32", "bfloat16")
KEY_ROTATIONS = ("none", "hadamard")
_MASK_KEY = re.compile(r"language_model\.model\.layers\.(\d+)\.(.+)\.weight")


class ArtifactError(ValueError):
    """A malformed or mismatched artifact; the message names the file and the field."""


def mask_key(layer: int, linear: str) -> str:
    return f"language_model.model.layers.{layer}.{linear}.weight"


@dataclass(frozen=True)
class LayerPlan:
    sparsity: dict[str, float]  # linear name (LINEARS) -> share of zeroed weights
    kv_bits: int = 16

    def __post_init__(self):
        for name, value in self.sparsity.items():
            if name not in LINEARS:
                raise ArtifactError(f"sparsity: unknown linear {name!r}; allowed {', '.join(LINEARS)}")
            if not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
                raise ArtifactError(f"sparsity.{name} = {value}: must be in [0, 1)")
        if self.kv_bits not in KV_BITS:
            raise ArtifactError(f"kv_bits = {self.kv_bits}: allowed {', '.join(map(str, KV_BITS))}")


@dataclass(frozen=True)
class KVQuantScheme:
    group_size: int = 32
    symmetric: bool = False
    scale_dtype: str = "float16"
    key_rotation: str = "none"  # or "hadamard": keys quantized in the Hadamard basis

    def __post_init__(self):
        if not isinstance(self.group_size, int) or self.group_size <= 0:
            raise ArtifactError(f"kv_quant.group_size = {self.group_size}: must be a positive integer")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ArtifactError(f"kv_quant.scale_dtype = {self.scale_dtype!r}: allowed {', '.join(SCALE_DTYPES)}")
        if self.key_rotation not in KEY_ROTATIONS:
            raise ArtifactError(f"kv_quant.key_rotation = {self.key_rotation!r}: allowed {', '.join(KEY_ROTATIONS)}")


@dataclass(frozen=True)
class BaseModel:
    path: str
    sha256: str

    def __post_init__(self):
        if not re.fullmatch(r"[0-9a-f]{64}", str(self.sha256)):
            raise ArtifactError(f"base_model.sha256 = {self.sha256!r}: must be 64 lowercase hex digits")


@dataclass(frozen=True)
class Plan:
    base_model: BaseModel
    layers: tuple[LayerPlan, ...]
    metric: str
    structure: str = "unstructured"  # or "N:M", N of every M weights pruned
    allocation: str = "uniform"
    kv_quant: KVQuantScheme = field(default_factory=KVQuantScheme)
    full_checkpoint: bool = False
    provenance: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if self.format_version != FORMAT_VERSION:
            raise ArtifactError(f"format_version = {self.format_version}: this release reads {FORMAT_VERSION}")
        if not self.layers:
            raise ArtifactError("layers: empty; one entry per decoder layer is required")
        if self.metric not in PLAN_METRICS:
            raise ArtifactError(f"metric = {self.metric!r}: allowed {', '.join(PLAN_METRICS)}")
        nm = re.fullmatch(r"(\d+):(\d+)", self.structure)
        if self.structure != "unstructured" and not (nm and 0 < int(nm[1]) < int(nm[2])):
            raise ArtifactError(f"structure = {self.structure!r}: allowed 'unstructured' or 'N:M' with 0 < N < M")

    def num_layers(self) -> int:
        return len(self.layers)

    def mean_kv_bits(self) -> float:
        return sum(layer.kv_bits for layer in self.layers) / len(self.layers)

    def mean_sparsity(self, params_per_linear: dict[str, int]) -> float:
        """Parameter-weighted over every pruned linear of every layer."""
        zeroed = sum(layer.sparsity.get(n, 0.0) * params_per_linear[n] for layer in self.layers for n in LINEARS)
        return zeroed / (len(self.layers) * sum(params_per_linear[n] for n in LINEARS))

    def to_json(self) -> dict:
        data = asdict(self)
        data["layers"] = [asdict(layer) for layer in self.layers]
        return {"format_version": data.pop("format_version"), **data}

    @classmethod
    def from_json(cls, data: dict, source: str) -> Plan:
        try:
            if not isinstance(data, dict):
                raise ArtifactError("the top level must be a JSON object")
            layers = data.get("layers")
            if not isinstance(layers, list):
                raise ArtifactError("layers: missing or not a list")
            parsed = []
            for i, layer in enumerate(layers):
                try:
                    parsed.append(LayerPlan(sparsity=dict(layer["sparsity"]), kv_bits=layer.get("kv_bits", 16)))
                except (KeyError, TypeError):
                    raise ArtifactError(f"layers[{i}]: needs a 'sparsity' object") from None
                except ArtifactError as exc:
                    raise ArtifactError(f"layers[{i}].{exc}") from None
            for name in ("base_model", "metric", "format_version"):
                if name not in data:
                    raise ArtifactError(f"{name}: missing")
            return cls(base_model=BaseModel(**data["base_model"]), layers=tuple(parsed), metric=data["metric"],
                       structure=data.get("structure", "unstructured"),
                       allocation=data.get("allocation", "uniform"),
                       kv_quant=KVQuantScheme(**data.get("kv_quant", {})),
                       full_checkpoint=bool(data.get("full_checkpoint", False)),
                       provenance=data.get("provenance", {}), evaluation=data.get("evaluation", {}),
                       format_version=data["format_version"])
        except ArtifactError as exc:
            raise ArtifactError(f"{source}: {exc}") from None
        except TypeError as exc:  # unknown or missing keys in a nested object
            raise ArtifactError(f"{source}: {exc}") from None


def model_sha256(model_dir: str | Path) -> str:
    """Content hash of a checkpoint: config.json and every *.safetensors file, in name order."""
    digest = hashlib.sha256()
    model_dir = Path(model_dir)
    for path in [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]:
        if path.name == MASK_FILE:
            continue
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [...] -> uint8 [ceil(n / 8)], 1 bit per weight."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy().astype(np.uint8)))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    count = math.prod(shape)
    bits = np.unpackbits(packed.cpu().numpy(), count=count)
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def write_artifact(out_dir: str | Path, plan: Plan, masks: dict[str, torch.Tensor] | None = None) -> Path:
    """Writes the plan (and masks); each file is written under a temporary name and then renamed,
    so that a crash leaves either the old file or the new one, never half of one."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if masks is not None:
        shapes = {key: list(mask.shape) for key, mask in masks.items()}
        tmp = out / f".{MASK_FILE}.{os.getpid()}.tmp"
        save_file({k: pack_mask(m) for k, m in masks.items()}, str(tmp), metadata={"shapes": json.dumps(shapes)})
        os.replace(tmp, out / MASK_FILE)
    tmp = out / f".{PLAN_FILE}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(plan.to_json(), indent=2))
    os.replace(tmp, out / PLAN_FILE)
    return out


def read_plan(art_dir: str | Path) -> Plan:
    path = Path(art_dir) / PLAN_FILE
    if not path.is_file():
        raise ArtifactError(f"{art_dir}: not an adaspkv artifact (no {PLAN_FILE})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: invalid JSON ({exc})") from None
    return Plan.from_json(data, str(path))


def read_masks(art_dir: str | Path, plan: Plan | None = None) -> dict[str, torch.Tensor]:
    """The keep masks; with `plan`, each mask's sparsity must match the plan's for its linear."""
    path = Path(art_dir) / MASK_FILE
    if not path.is_file():
        raise ArtifactError(f"{art_dir}: no {MASK_FILE}")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        shapes = json.loads((f.metadata() or {}).get("shapes", "{}"))
    masks = {}
    for key, packed in load_file(str(path)).items():
        match = _MASK_KEY.fullmatch(key)
        if key not in shapes or not match or match[2] not in LINEARS:
            raise ArtifactError(f"{path}: {key!r} is not a language-model linear weight with a recorded shape")
        mask = unpack_mask(packed, tuple(shapes[key]))
        if plan is not None:
            layer, linear = int(match[1]), match[2]
            if layer >= plan.num_layers():
                raise ArtifactError(f"{path}: {key} is for layer {layer}; the plan has {plan.num_layers()} layers")
            expected = plan.layers[layer].sparsity.get(linear, 0.0)
            measured = 1.0 - float(mask.float().mean())
            if abs(measured - expected) > 1e-3:
                raise ArtifactError(f"{path}: {key} has sparsity {measured:.4f}; {PLAN_FILE} says "
                                    f"layers[{layer}].sparsity.{linear} = {expected:.4f}")
        masks[key] = mask
    return masks


def check_base_model(plan: Plan, model_dir: str | Path, source: str) -> None:
    actual = model_sha256(model_dir)
    if actual != plan.base_model.sha256:
        raise ArtifactError(f"{source}: base_model.sha256 {plan.base_model.sha256[:12]}... does not match "
                            f"{model_dir} ({actual[:12]}...): this artifact was made from another model")


def check_num_layers(plan: Plan, num_layers: int, source: str) -> None:
    if plan.num_layers() != num_layers:
        raise ArtifactError(f"{source}: layers has {plan.num_layers()} entries; the model has {num_layers} "
                            "decoder layers")


def check_mask_shapes(masks: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    for key, mask in masks.items():
        if tuple(mask.shape) != tuple(shapes.get(key, ())):
            raise ArtifactError(f"{source}: mask {key} has shape {tuple(mask.shape)}, the weight "
                                f"{tuple(shapes.get(key, ()))}")
