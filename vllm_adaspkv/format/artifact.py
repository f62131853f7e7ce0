"""The files of an artifact directory: the contract between the offline search and the vLLM plugin.

An artifact directory holds `adaspkv.json` (the plan, `vllm_adaspkv.format.schema.Plan`: base model and
content hash, per decoder layer the sparsity of each pruned linear and the KV bit width, metric,
structure, KV quantization scheme, provenance, evaluation); when weights are pruned, either
`masks.safetensors` (one bit-packed keep mask per pruned weight over the base model's weights; its layout
and reading: `packed_masks`) or, with `packed_weights`, `packed_weights.safetensors` (the pruned linears
themselves as bitmask + kept values: `packed_weights`); optionally a full pruned checkpoint, announced by
`full_checkpoint`.

This module owns reading, writing and checking those files, so that a search and a server that never see
each other agree on them. It imports only torch, safetensors, numpy and pydantic (no vLLM, no Optuna), so
the search, the plugin and the demo all use it. Every error is an ArtifactError whose message names the
file and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from vllm_adaspkv.errors import ConfigError
from vllm_adaspkv.format.packed_masks import MASK_FILE, PLAN_FILE, check_masks, pack_mask
from vllm_adaspkv.format.packed_weights import PACKED_FILE, write_packed_weights
from vllm_adaspkv.format.schema import ArtifactError, Plan, parse_mask_key, sparsity_differs
from vllm_adaspkv.sparse.packing import PackedWeight

# llava-hf checkpoints written by transformers >= 4.52 nest the language model the other way round
_NEW_LAYOUT = re.compile(r"^model\.language_model\.")


def is_artifact(model: str | Path) -> bool:
    return (Path(model) / PLAN_FILE).is_file()


def canonical_key(name: str) -> str:
    """A llava-hf weight name in the artifact's key space (language_model.model.layers...)."""
    return _NEW_LAYOUT.sub("language_model.model.", name)


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    """A checkpoint's *.safetensors weight files in sorted name order, without an artifact's own files
    (masks, packed weights), so that an artifact holding a full checkpoint reads and hashes as that checkpoint."""
    return [path for path in sorted(Path(model_dir).glob("*.safetensors")) if path.name not in (MASK_FILE, PACKED_FILE)]


def checkpoint_shapes(model_dir: Path) -> dict[str, tuple[int, ...]]:
    """Weight shapes from the safetensors headers (no tensor is read), under canonical keys."""
    shapes = {}
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                shapes[canonical_key(key)] = tuple(f.get_slice(key).get_shape())
    return shapes


def model_sha256(model_dir: str | Path) -> str:
    """Content hash of a checkpoint: config.json, then every weight file (`checkpoint_files`: each file's name,
    then its bytes). Files are streamed: checkpoints can be tens of GB."""
    digest = hashlib.sha256()
    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ConfigError(f"{model_dir}: no config.json; not a checkpoint directory")
    for path in [model_dir / "config.json", *checkpoint_files(model_dir)]:
        digest.update(path.name.encode())
        with open(path, "rb") as f:
            while chunk := f.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


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


def retract_artifact(out_dir: str | Path) -> Path:
    """Removes adaspkv.json from `out_dir` (created if missing): until a new plan is written the folder is
    no artifact, so a crash while its other files are rewritten leaves none, never a stale plan over new
    files. Files an artifact holds besides the plan are written after this, the plan last."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / PLAN_FILE).unlink(missing_ok=True)
    return out


def write_artifact(out_dir: str | Path, plan: Plan, masks: Mapping[str, torch.Tensor] | None = None,
                   weight: Callable[[str], torch.Tensor] | None = None, dtype: torch.dtype | None = None) -> Path:
    """Writes the pruned weights' file when masks are given (checked against the plan first, so that a
    written artifact always reads back), then adaspkv.json. With `plan.packed_weights` that file is
    packed_weights.safetensors, made from weight(key) (the pruned weight, of `dtype`) and each mask; otherwise
    masks.safetensors. A file of the other kind (or of either when masks=None: no weight is pruned)
    left by an earlier write to the same folder is removed, or it would be read against the new plan."""
    if plan.packed_weights and (not masks or weight is None or dtype is None):
        raise ValueError("write_artifact: a plan with packed_weights needs masks and the pruned weights "
                         "(weight=, dtype=)")
    out = retract_artifact(out_dir)
    written = None
    if plan.packed_weights:
        check_masks(masks, plan, str(out / PACKED_FILE))
        _replace_atomically(out / PACKED_FILE, lambda tmp: write_packed_weights(tmp, masks, weight, dtype))
        written = PACKED_FILE
    elif masks is not None:
        check_masks(masks, plan, str(out / MASK_FILE))
        shapes = json.dumps({key: list(mask.shape) for key, mask in masks.items()})
        _replace_atomically(out / MASK_FILE, lambda tmp: save_file(
            {key: pack_mask(mask) for key, mask in masks.items()}, str(tmp), metadata={"shapes": shapes}))
        written = MASK_FILE
    for name in (MASK_FILE, PACKED_FILE):
        if name != written:
            (out / name).unlink(missing_ok=True)
    _write_plan(out, plan)  # the plan last: it is what makes the folder an artifact
    return out


def _write_plan(art_dir: Path, plan: Plan) -> None:
    text = json.dumps(plan.to_json(), indent=2) + "\n"
    _replace_atomically(art_dir / PLAN_FILE, lambda tmp: tmp.write_text(text))


def read_plan(art_dir: str | Path) -> Plan:
    path = Path(art_dir) / PLAN_FILE
    if not path.is_file():
        raise ArtifactError(f"{art_dir}: not an adaspkv artifact (no {PLAN_FILE})")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{path}: invalid JSON ({exc})") from None
    return Plan.from_json(data, str(path))


def base_model_dir(plan: Plan, art_dir: str | Path) -> Path:
    """Where the artifact's base model is: base_model.path, relative to the artifact directory unless
    absolute (artifacts written before relative paths hold absolute ones)."""
    path = Path(plan.base_model.path)
    return path if path.is_absolute() else Path(art_dir) / path


def relocate_base_model(art_dir: str | Path, model_dir: str | Path) -> Plan:
    """Points the artifact at its base model's new place (the same content hash, checked), relative to
    the artifact; only adaspkv.json is rewritten, in one atomic step."""
    art_dir = Path(art_dir)
    plan = read_plan(art_dir)
    check_base_model(plan, model_dir, str(art_dir / PLAN_FILE))
    path = os.path.relpath(Path(model_dir).resolve(), art_dir.resolve())
    moved = plan.replace(base_model=plan.base_model.replace(path=path))
    _write_plan(art_dir, moved)
    return moved


def check_base_model(plan: Plan, model_dir: str | Path, source: str) -> None:
    actual = model_sha256(model_dir)
    if actual != plan.base_model.sha256:
        raise ArtifactError(f"{source}: base_model.sha256 {plan.base_model.sha256[:12]}... does not match "
                            f"{model_dir} (hash {actual[:12]}...): this artifact was made from another model")


def check_checkpoint(plan: Plan, art_dir: str | Path, source: str) -> None:
    """A full-checkpoint artifact's own weights must be the ones it was exported with."""
    actual = model_sha256(art_dir)
    if actual != plan.checkpoint_sha256:
        raise ArtifactError(f"{source}: checkpoint_sha256 {plan.checkpoint_sha256[:12]}... does not match the "
                            f"checkpoint in {art_dir} (hash {actual[:12]}...): its files were changed after export")


def check_num_layers(plan: Plan, num_layers: int, source: str) -> None:
    if plan.num_layers() != num_layers:
        raise ArtifactError(f"{source}: layers has {plan.num_layers()} entries; the model has {num_layers} "
                            "decoder layers")


class ZeroCount:
    """Counts the zeros of each language-model linear weight it is shown, then compares every one with
    the plan: the check of a pruned checkpoint (offline) and of the weights a server loads. The server
    counts the whole Hugging Face tensor before tensor-parallel slicing, so every rank checks the same
    numbers."""

    def __init__(self, plan: Plan):
        self.plan = plan
        self.measured: dict[tuple[int, str], float] = {}

    def observe(self, key: str, weight: torch.Tensor) -> None:
        parsed = parse_mask_key(key)
        if parsed is not None:  # counted, not averaged: exact, and no float copy of the weight
            self.measured[parsed] = int((weight == 0).sum()) / weight.numel()

    def observe_packed(self, key: str, packed: PackedWeight) -> None:
        """The zeros of a packed weight: those it drops and any kept value that is 0."""
        parsed = parse_mask_key(key)
        if parsed is not None:
            rows, cols = packed.shape
            zeros = rows * cols - packed.values.numel() + int((packed.values == 0).sum())
            self.measured[parsed] = zeros / (rows * cols)

    def check(self, source: str) -> None:
        """Raises ArtifactError on the first linear whose share of zeros differs from the plan.
        Layers not seen (another pipeline rank's) are not checked."""
        for (layer, linear), measured in sorted(self.measured.items()):
            expected = self.plan.layers[layer].sparsity.get(linear, 0.0)
            if sparsity_differs(measured, expected):
                raise ArtifactError(f"{source}: layer {layer} {linear} was loaded with sparsity "
                                    f"{measured:.4f}; {PLAN_FILE} says {expected:.4f}")
