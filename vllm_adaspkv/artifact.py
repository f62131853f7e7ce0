"""The artifact format: the contract between the offline search and the vLLM plugin.

An artifact directory holds `adaspkv.json` (the plan: base model and content hash, per decoder layer the
sparsity of each pruned linear and the KV bit width, metric, structure, KV quantization scheme, provenance,
evaluation); `masks.safetensors` when weights are pruned: one keep mask per pruned weight, keyed by its
llava-hf parameter name (`mask_key`), 1 bit per weight as numpy.packbits in *big* bit order over the
row-major flattened mask (the first weight is the highest bit of byte 0), the shapes as JSON {key: shape}
under the file's metadata "shapes"; optionally a full pruned checkpoint, written by someone else and
announced by `full_checkpoint`.

This module owns reading, writing and validating that format, so that a search and a server that never see
each other agree on it. It imports only torch, safetensors and numpy (no vLLM, no Optuna) so both sides can
use it. Every error is an ArtifactError whose message names the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_adaspkv.kv_quant import KV_BITS

FORMAT_VERSION = 1
PLAN_FILE = "adaspkv.json"
MASK_FILE = "masks.safetensors"
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
PLAN_METRICS = ("magnitude", "wanda", "lognorm", "sparsegpt", "none")
SCALE_DTYPES = ("float16", "float32", "bfloat16")
KEY_ROTATIONS = ("none", "hadamard")
# Export records each mask's measured sparsity, so plan and masks agree up to float rounding; 1e-3 still
# catches a mask paired with the wrong plan (sparsity grids are much coarser than that).
SPARSITY_TOLERANCE = 1e-3
_MASK_KEY = re.compile(r"language_model\.model\.layers\.(\d+)\.(.+)\.weight")


class ArtifactError(ValueError):
    """A malformed or mismatched artifact; the message names the file and the field."""


def mask_key(layer: int, linear: str) -> str:
    return f"language_model.model.layers.{layer}.{linear}.weight"


def _allowed(values) -> str:
    return ", ".join(map(str, values))


@dataclass(frozen=True)
class LayerPlan:
    sparsity: dict[str, float]  # linear name (LINEARS) -> share of zeroed weights, in [0, 1)
    kv_bits: int = 16

    def __post_init__(self):
        if not isinstance(self.sparsity, dict):
            raise ArtifactError(f"sparsity = {self.sparsity!r}: must be an object {{linear: sparsity}}")
        for name, value in self.sparsity.items():
            if name not in LINEARS:
                raise ArtifactError(f"sparsity: unknown linear {name!r}; allowed {_allowed(LINEARS)}")
            # bool is an int subclass: `true` in the JSON is a typo, not a sparsity
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ArtifactError(f"sparsity.{name} = {value!r}: must be in [0, 1)")
        if type(self.kv_bits) is not int or self.kv_bits not in KV_BITS:  # not 8.0, not True
            raise ArtifactError(f"kv_bits = {self.kv_bits!r}: allowed {_allowed(KV_BITS)}")


@dataclass(frozen=True)
class KVQuantScheme:
    group_size: int = 32
    symmetric: bool = False
    scale_dtype: str = "float16"
    key_rotation: str = "none"  # or "hadamard": keys quantized in the Hadamard basis

    def __post_init__(self):
        if type(self.group_size) is not int or self.group_size <= 0:
            raise ArtifactError(f"kv_quant.group_size = {self.group_size!r}: must be a positive integer")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ArtifactError(f"kv_quant.scale_dtype = {self.scale_dtype!r}: allowed {_allowed(SCALE_DTYPES)}")
        if self.key_rotation not in KEY_ROTATIONS:
            raise ArtifactError(f"kv_quant.key_rotation = {self.key_rotation!r}: allowed {_allowed(KEY_ROTATIONS)}")


@dataclass(frozen=True)
class BaseModel:
    path: str
    sha256: str  # model_sha256 of the checkpoint the masks were computed on

    def __post_init__(self):
        if not isinstance(self.sha256, str) or not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ArtifactError(f"base_model.sha256 = {self.sha256!r}: must be 64 lowercase hex digits")


@dataclass(frozen=True)
class Plan:
    base_model: BaseModel
    layers: tuple[LayerPlan, ...]  # one per decoder layer, in layer order
    metric: str
    structure: str = "unstructured"  # or "N:M": in every group of M consecutive inputs, N are pruned
    allocation: str = "uniform"
    kv_quant: KVQuantScheme = field(default_factory=KVQuantScheme)
    full_checkpoint: bool = False
    provenance: dict = field(default_factory=dict)
    evaluation: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        if type(self.format_version) is not int or self.format_version != FORMAT_VERSION:
            raise ArtifactError(f"format_version = {self.format_version!r}: this release reads {FORMAT_VERSION}")
        # a list would compare unequal to the tuple that a round trip gives back
        object.__setattr__(self, "layers", tuple(self.layers))
        if not self.layers:
            raise ArtifactError("layers: empty; one entry per decoder layer is required")
        if self.metric not in PLAN_METRICS:
            raise ArtifactError(f"metric = {self.metric!r}: allowed {_allowed(PLAN_METRICS)}")
        nm = re.fullmatch(r"(\d+):(\d+)", self.structure) if isinstance(self.structure, str) else None
        if self.structure != "unstructured" and not (nm and 1 <= int(nm[1]) < int(nm[2])):
            raise ArtifactError(f"structure = {self.structure!r}: allowed 'unstructured' or 'N:M' with 1 <= N < M")
        if not isinstance(self.full_checkpoint, bool):
            raise ArtifactError(f"full_checkpoint = {self.full_checkpoint!r}: allowed true, false")
        for name in ("provenance", "evaluation"):
            if not isinstance(getattr(self, name), dict):
                raise ArtifactError(f"{name} = {getattr(self, name)!r}: must be an object")

    def num_layers(self) -> int:
        return len(self.layers)

    def mean_kv_bits(self) -> float:
        return sum(layer.kv_bits for layer in self.layers) / len(self.layers)

    def mean_sparsity(self, params_per_linear: dict[str, int]) -> float:
        """Share of zeroed weights over all layers; params_per_linear: linear -> weights in one layer.
        A linear the plan prunes must be counted, or the mean would silently leave it out."""
        for layer in self.layers:
            for name, value in layer.sparsity.items():
                if value and name not in params_per_linear:
                    raise ValueError(f"mean_sparsity: the plan prunes {name} but params_per_linear has no size for it")
        zeroed = sum(layer.sparsity.get(name, 0.0) * size
                     for layer in self.layers for name, size in params_per_linear.items())
        return zeroed / (len(self.layers) * sum(params_per_linear.values()))

    def to_json(self) -> dict:
        data = asdict(self)
        # linears in their canonical order so that files diff cleanly
        data["layers"] = [{"sparsity": {n: layer.sparsity[n] for n in LINEARS if n in layer.sparsity},
                           "kv_bits": layer.kv_bits} for layer in self.layers]
        return {"format_version": data.pop("format_version"), **data}

    @classmethod
    def from_json(cls, data: dict, source: str) -> Plan:
        try:
            return cls._parse(data)
        except ArtifactError as exc:
            raise ArtifactError(f"{source}: {exc}") from None

    @classmethod
    def _parse(cls, data) -> Plan:
        if not isinstance(data, dict):
            raise ArtifactError("the top level must be a JSON object")
        # the version first: another version may lay out every other field differently
        if data.get("format_version") != FORMAT_VERSION:
            raise ArtifactError(f"format_version = {data.get('format_version', 'missing')!r}: this release reads "
                                f"{FORMAT_VERSION}")
        _fields(data, cls, "")
        if not isinstance(data["layers"], list):
            raise ArtifactError(f"layers = {data['layers']!r}: must be a list, one entry per decoder layer")
        layers = []
        for i, layer in enumerate(data["layers"]):
            _fields(layer, LayerPlan, f"layers[{i}]")
            try:
                layers.append(LayerPlan(**layer))
            except ArtifactError as exc:  # LayerPlan names its fields without the index
                raise ArtifactError(f"layers[{i}].{exc}") from None
        return cls(**{**data, "layers": tuple(layers),
                      "base_model": BaseModel(**_fields(data["base_model"], BaseModel, "base_model")),
                      "kv_quant": KVQuantScheme(**_fields(data.get("kv_quant", {}), KVQuantScheme, "kv_quant"))})


def _fields(data, cls, name: str) -> dict:
    """`data` as keyword arguments of dataclass `cls`: an unknown key is a typo to report, not to ignore."""
    if not isinstance(data, dict):
        raise ArtifactError(f"{name} = {data!r}: must be an object")
    allowed = [f.name for f in fields(cls)]
    for key in data:
        if key not in allowed:
            raise ArtifactError(f"{name}.{key}: unknown field; allowed {_allowed(allowed)}".lstrip("."))
    for f in fields(cls):
        if f.default is MISSING and f.default_factory is MISSING and f.name not in data:
            raise ArtifactError(f"{name}.{f.name}: missing".lstrip("."))
    return data


def model_sha256(model_dir: str | Path) -> str:
    """Content hash of a checkpoint: config.json, then every *.safetensors file in sorted name order (each
    file's name, then its bytes). masks.safetensors is skipped, so an artifact that holds a full checkpoint
    hashes the same with or without masks. Files are streamed: checkpoints can be tens of GB."""
    digest = hashlib.sha256()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(f"{model_dir}: no config.json; not a checkpoint directory")
    for path in [model_dir / "config.json", *sorted(model_dir.glob("*.safetensors"))]:
        if path.name == MASK_FILE:
            continue
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """bool [...] -> uint8 [ceil(n / 8)], 1 bit per weight, big bit order, row-major."""
    if mask.dtype != torch.bool:
        raise TypeError(f"pack_mask: the mask must be bool, not {mask.dtype}")
    return torch.from_numpy(np.packbits(mask.reshape(-1).cpu().numpy()))


def unpack_mask(packed: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Inverse of pack_mask: uint8 [ceil(n / 8)] -> bool of `shape`."""
    count = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != -(-count // 8):
        raise ValueError(f"unpack_mask: {packed.numel()} {packed.dtype} values cannot hold a mask of shape "
                         f"{tuple(shape)} ({-(-count // 8)} uint8 needed)")
    bits = np.unpackbits(packed.cpu().numpy(), count=count)
    return torch.from_numpy(bits.astype(bool)).reshape(shape)


def _replace_atomically(target: Path, write) -> None:
    """write(tmp) then rename over `target`: a crash leaves the old file or the new one, never half of one.
    fsync before the rename, or a power loss could leave the new name pointing at unwritten blocks."""
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def write_artifact(out_dir: str | Path, plan: Plan, masks: dict[str, torch.Tensor] | None = None) -> Path:
    """Writes adaspkv.json and, when given, masks.safetensors (checked against the plan first, so that a
    written artifact always reads back). masks=None means the artifact has no masks: a masks file left by
    an earlier write to the same folder is removed, or it would be read against the new plan."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if masks is not None:
        _check_masks(masks, plan, str(out / MASK_FILE))
        shapes = json.dumps({key: list(mask.shape) for key, mask in masks.items()})
        _replace_atomically(out / MASK_FILE, lambda tmp: save_file(
            {key: pack_mask(mask) for key, mask in masks.items()}, str(tmp), metadata={"shapes": shapes}))
    else:
        (out / MASK_FILE).unlink(missing_ok=True)
    # the plan last: it is what makes the folder an artifact
    text = json.dumps(plan.to_json(), indent=2) + "\n"
    _replace_atomically(out / PLAN_FILE, lambda tmp: tmp.write_text(text))
    return out


def read_plan(art_dir: str | Path) -> Plan:
    path = Path(art_dir) / PLAN_FILE
    if not path.is_file():
        raise ArtifactError(f"{art_dir}: not an adaspkv artifact (no {PLAN_FILE})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: invalid JSON ({exc})") from None
    return Plan.from_json(data, str(path))


def read_masks(art_dir: str | Path, plan: Plan | None = None) -> dict[str, torch.Tensor]:
    """The bool keep masks. With `plan`, every mask must be for a linear of one of its layers with the
    plan's sparsity, and every linear the plan prunes must have a mask."""
    path = Path(art_dir) / MASK_FILE
    if not path.is_file():
        raise ArtifactError(f"{art_dir}: no {MASK_FILE}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            packed = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
        raise ArtifactError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        shapes = json.loads(metadata["shapes"])
    except (KeyError, json.JSONDecodeError):
        raise ArtifactError(f"{path}: metadata 'shapes' missing or not JSON; the mask shapes are unknown") from None
    masks = {}
    for key, bits in packed.items():
        if key not in shapes:
            raise ArtifactError(f"{path}: {key}: no shape in the metadata 'shapes'")
        try:
            masks[key] = unpack_mask(bits, tuple(shapes[key]))
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"{path}: {key}: {exc}") from None
    _check_masks(masks, plan, str(path))
    return masks


def _check_masks(masks: dict[str, torch.Tensor], plan: Plan | None, source: str) -> None:
    for key, mask in masks.items():
        match = _MASK_KEY.fullmatch(key)
        if not match or match[2] not in LINEARS:
            raise ArtifactError(f"{source}: {key!r} is not a language-model linear weight "
                                f"(language_model.model.layers.N.LINEAR.weight, LINEAR one of {_allowed(LINEARS)})")
        if mask.dtype != torch.bool:
            raise ArtifactError(f"{source}: {key}: a mask must be bool, not {mask.dtype}")
        if plan is None:
            continue
        layer, linear = int(match[1]), match[2]
        if layer >= plan.num_layers():
            raise ArtifactError(f"{source}: {key} is for layer {layer}; the plan has {plan.num_layers()} layers")
        expected = plan.layers[layer].sparsity.get(linear, 0.0)
        # counted, not averaged: exact, and no float copy of a mask with hundreds of millions of weights
        measured = 1.0 - int(mask.sum()) / mask.numel() if mask.numel() else 0.0
        if abs(measured - expected) > SPARSITY_TOLERANCE:
            raise ArtifactError(f"{source}: {key} has sparsity {measured:.4f}; {PLAN_FILE} says "
                                f"layers[{layer}].sparsity.{linear} = {expected:.4f}")
    if plan is not None:
        for i, layer in enumerate(plan.layers):
            for linear, value in layer.sparsity.items():
                if value > SPARSITY_TOLERANCE and mask_key(i, linear) not in masks:
                    raise ArtifactError(f"{source}: no mask for {mask_key(i, linear)}; {PLAN_FILE} says "
                                        f"layers[{i}].sparsity.{linear} = {value:.4f}")


def check_base_model(plan: Plan, model_dir: str | Path, source: str) -> None:
    actual = model_sha256(model_dir)
    if actual != plan.base_model.sha256:
        raise ArtifactError(f"{source}: base_model.sha256 {plan.base_model.sha256[:12]}... does not match "
                            f"{model_dir} (hash {actual[:12]}...): this artifact was made from another model")


def check_num_layers(plan: Plan, num_layers: int, source: str) -> None:
    if plan.num_layers() != num_layers:
        raise ArtifactError(f"{source}: layers has {plan.num_layers()} entries; the model has {num_layers} "
                            "decoder layers")


def check_mask_shapes(masks: dict[str, torch.Tensor], shapes: dict[str, tuple[int, ...]], source: str) -> None:
    """Every mask must cover a weight of the model, element for element."""
    for key, mask in masks.items():
        if key not in shapes or tuple(mask.shape) != tuple(shapes[key]):
            weight = f"the weight {tuple(shapes[key])}" if key in shapes else "but the model has no such weight"
            raise ArtifactError(f"{source}: mask {key} has shape {tuple(mask.shape)}, {weight}")
