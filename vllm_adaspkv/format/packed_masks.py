"""masks.safetensors: one bit-packed keep mask per pruned weight, read one mask at a time.

Each mask is numpy.packbits in *big* bit order over the row-major flattened bool mask (the first weight
is the highest bit of byte 0), keyed by the weight's llava-hf name (`mask_key`); the shapes are JSON
{key: shape} under the file's metadata "shapes". `PackedMasks` opens the file and checks its keys and
shapes from the header alone; a mask is unpacked (one byte a weight) only when asked for, so a server
streaming a 7B checkpoint holds one weight's mask at a time, never all of them.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from vllm_adaspkv.format.schema import LINEARS, ArtifactError, Plan, mask_key, parse_mask_key, sparsity_differs

MASK_FILE = "masks.safetensors"
PLAN_FILE = "adaspkv.json"


def _allowed(values) -> str:
    return ", ".join(map(str, values))


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
    return torch.from_numpy(bits.view(bool)).reshape(shape)


def mask_weight(weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """weight with the pruned positions zeroed, on weight's device (a loader may yield GPU tensors while
    masks are read on the CPU)."""
    return torch.where(mask.to(weight.device), weight, torch.zeros((), dtype=weight.dtype, device=weight.device))


def open_with_shapes(path: Path) -> tuple[object, list[str], dict]:
    """An artifact's safetensors file opened lazily: (handle, tensor names, its metadata "shapes" as a dict)."""
    try:
        handle = safe_open(str(path), framework="pt")
        metadata = handle.metadata() or {}
        names = list(handle.keys())
    except Exception as exc:  # safetensors raises its own error types for a truncated or foreign file
        raise ArtifactError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        shapes = json.loads(metadata["shapes"])
        if not isinstance(shapes, dict):
            raise TypeError
    except (KeyError, json.JSONDecodeError, TypeError):
        raise ArtifactError(f"{path}: metadata 'shapes' missing or not a JSON object; the shapes are "
                            "unknown") from None
    return handle, names, shapes


class PackedMasks:
    """The masks of an artifact, opened lazily. With `plan`, every mask must be for a linear of one of
    its layers, every linear the plan prunes must have a mask (both checked on opening), and each mask's
    sparsity (and N:M structure) must match the plan (checked when it is unpacked)."""

    def __init__(self, art_dir: str | Path, plan: Plan | None = None):
        self.path = Path(art_dir) / MASK_FILE
        self.plan = plan
        if not self.path.is_file():
            raise ArtifactError(f"{art_dir}: no {MASK_FILE}")
        self._file, keys, shapes = open_with_shapes(self.path)
        for key in keys:
            if key not in shapes:
                raise ArtifactError(f"{self.path}: {key}: no shape in the metadata 'shapes'")
        self.shapes = {key: tuple(shapes[key]) for key in keys}
        check_mask_keys(self.shapes, plan, str(self.path))

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def keys(self):
        return self.shapes.keys()

    def get(self, key: str) -> torch.Tensor:
        """The bool keep mask of `key`, unpacked and checked against the plan."""
        try:
            mask = unpack_mask(self._file.get_tensor(key), self.shapes[key])
        except (ValueError, TypeError) as exc:
            raise ArtifactError(f"{self.path}: {key}: {exc}") from None
        check_mask(key, mask, self.plan, str(self.path))
        return mask


class PackedMaskMap(Mapping):
    """Bool keep masks held bit-packed in memory (1 bit a weight), unpacked one at a time when read:
    the masks of a pruned 7B model are 6.5 GB as bool tensors, 0.8 GB packed. A read-only mapping of
    key -> bool mask once filled with `add`."""

    def __init__(self):
        self._packed: dict[str, tuple[torch.Tensor, tuple[int, ...]]] = {}

    def add(self, key: str, mask: torch.Tensor) -> None:
        self._packed[key] = (pack_mask(mask), tuple(mask.shape))

    def __getitem__(self, key: str) -> torch.Tensor:
        packed, shape = self._packed[key]
        return unpack_mask(packed, shape)

    def __iter__(self):
        return iter(self._packed)

    def __len__(self) -> int:
        return len(self._packed)


def read_masks(art_dir: str | Path, plan: Plan | None = None) -> dict[str, torch.Tensor]:
    """Every bool keep mask, unpacked (offline use: the server reads them one at a time)."""
    masks = PackedMasks(art_dir, plan)
    return {key: masks.get(key) for key in masks.keys()}


def check_masks(masks: dict[str, torch.Tensor], plan: Plan | None, source: str) -> None:
    """What PackedMasks checks, for masks in memory (before they are written)."""
    check_mask_keys({key: tuple(mask.shape) for key, mask in masks.items()}, plan, source)
    for key, mask in masks.items():
        check_mask(key, mask, plan, source)


def check_mask_keys(shapes: dict[str, tuple[int, ...]], plan: Plan | None, source: str, what: str = "mask") -> None:
    """Every key a language-model linear of one of the plan's layers; every linear the plan prunes there.
    `what` names the entries in messages (a mask, a packed weight)."""
    for key in shapes:
        parsed = parse_mask_key(key)
        if parsed is None:
            raise ArtifactError(f"{source}: {key!r} is not a language-model linear weight "
                                f"(language_model.model.layers.N.LINEAR.weight, LINEAR one of {_allowed(LINEARS)})")
        if plan is not None and parsed[0] >= plan.num_layers():
            raise ArtifactError(f"{source}: {key} is for layer {parsed[0]}; the plan has {plan.num_layers()} layers")
    if plan is not None:
        for i, layer in enumerate(plan.layers):
            for linear, value in layer.sparsity.items():
                if sparsity_differs(value, 0.0) and mask_key(i, linear) not in shapes:
                    raise ArtifactError(f"{source}: no {what} for {mask_key(i, linear)}; {PLAN_FILE} says "
                                        f"layers[{i}].sparsity.{linear} = {value:.4f}")


def check_mask(key: str, mask: torch.Tensor, plan: Plan | None, source: str) -> None:
    if mask.dtype != torch.bool:
        raise ArtifactError(f"{source}: {key}: a mask must be bool, not {mask.dtype}")
    if plan is None:
        return
    # counted, not averaged: exact, and no float copy of a mask with hundreds of millions of weights
    check_kept_count(key, int(mask.sum()), mask.numel(), plan, source)
    if plan.n_of_m() is not None:
        _check_n_of_m(mask, *plan.n_of_m(), f"{source}: {key}")


def check_kept_count(key: str, kept: int, total: int, plan: Plan, source: str) -> None:
    """A weight keeping `kept` of `total` values must have the sparsity the plan gives its linear."""
    layer, linear = parse_mask_key(key)
    expected = plan.layers[layer].sparsity.get(linear, 0.0)
    measured = 1.0 - kept / total if total else 0.0
    if sparsity_differs(measured, expected):
        raise ArtifactError(f"{source}: {key} has sparsity {measured:.4f}; {PLAN_FILE} says "
                            f"layers[{layer}].sparsity.{linear} = {expected:.4f}")


def _check_n_of_m(mask: torch.Tensor, n: int, m: int, where: str) -> None:
    """structure N:M: in every row, each group of M consecutive inputs has at least N pruned weights."""
    if mask.dim() != 2 or mask.shape[1] % m:
        raise ArtifactError(f"{where}: a {n}:{m} mask needs rows divisible into groups of {m}, not shape "
                            f"{tuple(mask.shape)}")
    pruned = (~mask).reshape(mask.shape[0], -1, m).sum(-1)  # [rows, groups]
    if bool((pruned < n).any()):
        row, group = (pruned < n).nonzero()[0].tolist()
        kept = m - int(pruned[row, group])
        raise ArtifactError(f"{where}: row {row}, inputs {group * m}..{group * m + m - 1} keep {kept} "
                            f"of {m}; structure {n}:{m} allows {m - n}")


def check_mask_shapes(mask_shapes: dict[str, tuple[int, ...]], shapes: dict[str, tuple[int, ...]], source: str,
                      what: str = "mask") -> None:
    """Every mask (its shape, from PackedMasks.shapes; or packed weight) must cover a weight of the model,
    element for element."""
    for key, mask_shape in mask_shapes.items():
        if key not in shapes or tuple(mask_shape) != tuple(shapes[key]):
            weight = f"the weight {tuple(shapes[key])}" if key in shapes else "but the model has no such weight"
            raise ArtifactError(f"{source}: {what} {key} has shape {tuple(mask_shape)}, {weight}")
