"""packed_weights.safetensors: the pruned linears themselves, packed (a plan with `packed_weights: true`).

For each pruned language-model linear W [rows, cols], keyed by its llava-hf name (`mask_key`), three
tensors in the layout of `vllm_adaspkv.sparse.packing` (compressed-tensors' former `sparse-bitmask`):
- `<key>.bitmask` uint8 [rows, ceil(cols / 8)]: bit j (least significant first) of byte b of row r is
  set iff W[r, 8 b + j] is kept; the padding bits of a row's last byte are 0;
- `<key>.values` [nnz] in the checkpoint's dtype: the kept values, row after row, left to right;
- `<key>.row_offsets` int64 [rows + 1]: row r's values are values[row_offsets[r]:row_offsets[r + 1]].
The file's metadata "shapes" is JSON {key: [rows, cols]}. The bitmask is the keep mask, so such an
artifact has no masks.safetensors; the values replace the base model's weights (SparseGPT's updated
ones too), so it needs no full checkpoint. At sparsity s a bf16 linear takes (1 - s) * 16 + 1 bits a
weight on disk and in a CPU server's memory: 0.56x of dense at 50 %.

Written one tensor at a time (a 7B model's packed linears are gigabytes), read one weight at a time,
each checked (layout, and sparsity and N:M structure against the plan) when it is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path

import torch

from vllm_adaspkv.format.packed_masks import check_kept_count, check_mask, check_mask_keys, open_with_shapes
from vllm_adaspkv.format.safetensors_stream import TensorSpec, write_streamed
from vllm_adaspkv.format.schema import ArtifactError, Plan
from vllm_adaspkv.sparse.packing import PackedWeight, keep_mask, pack

PACKED_FILE = "packed_weights.safetensors"
PARTS = ("bitmask", "values", "row_offsets")
VALUE_DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_POPCOUNT = torch.tensor([bin(i).count("1") for i in range(256)], dtype=torch.int64)


def packed_specs(key: str, shape: tuple[int, int], kept: int, dtype: torch.dtype) -> list[TensorSpec]:
    """The three tensors of a weight of `shape` that keeps `kept` values of `dtype`."""
    rows, cols = shape
    return [TensorSpec(f"{key}.bitmask", (rows, -(-cols // 8)), torch.uint8),
            TensorSpec(f"{key}.values", (kept,), dtype), TensorSpec(f"{key}.row_offsets", (rows + 1,), torch.int64)]


def write_packed_weights(path: Path, masks: Mapping[str, torch.Tensor], weight: Callable[[str], torch.Tensor],
                         dtype: torch.dtype) -> Path:
    """Packs weight(key) (2-D, `dtype`) under each (key, bool keep mask) of `masks` into one file at `path`.
    Two passes over the masks (the header needs every kept count first); weights are read in the second
    only, one packed in memory at a time."""
    if dtype not in VALUE_DTYPES:
        raise ValueError(f"packed weights are stored as {', '.join(map(str, VALUE_DTYPES))}, not {dtype}")
    specs, shapes = [], {}
    for key, mask in masks.items():
        if mask.dim() != 2:
            raise ValueError(f"{key}: a packed weight is 2-D, not of shape {tuple(mask.shape)}")
        specs += packed_specs(key, tuple(mask.shape), int(mask.sum()), dtype)
        shapes[key] = list(mask.shape)
    current: dict[str, PackedWeight] = {}

    def make(spec: TensorSpec) -> torch.Tensor:
        key, part = spec.name.rsplit(".", 1)
        if key not in current:
            current.clear()  # one weight at a time
            w = weight(key)
            if tuple(w.shape) != tuple(masks[key].shape) or w.dtype != dtype:
                raise ValueError(f"{key}: weight {tuple(w.shape)} {w.dtype}, mask {tuple(masks[key].shape)}, "
                                 f"{dtype} planned")
            current[key] = pack(w, masks[key])
        return getattr(current[key], part)

    return write_streamed(path, specs, make, metadata={"shapes": json.dumps(shapes)})


class PackedWeights:
    """The packed linears of an artifact, opened lazily. With `plan`, every packed weight must be a linear
    of one of its layers and every linear the plan prunes must be there (checked on opening); each weight's
    layout, sparsity and N:M structure are checked when it is read."""

    def __init__(self, art_dir: str | Path, plan: Plan | None = None):
        self.path = Path(art_dir) / PACKED_FILE
        self.plan = plan
        if not self.path.is_file():
            raise ArtifactError(f"{art_dir}: no {PACKED_FILE}" + (", but the plan says packed_weights = true"
                                                                  if plan is not None else ""))
        self._file, names, shapes = open_with_shapes(self.path)
        names = set(names)
        for key, shape in shapes.items():
            if not isinstance(shape, list) or len(shape) != 2 or not all(type(n) is int and n >= 0 for n in shape):
                raise ArtifactError(f"{self.path}: metadata 'shapes': {key} has shape {shape}; a packed "
                                    "weight has [rows, cols]")
        self.shapes = {key: tuple(shape) for key, shape in shapes.items()}
        expected = {f"{key}.{part}" for key in self.shapes for part in PARTS}
        if names != expected:
            odd = sorted(names ^ expected)[:3]
            raise ArtifactError(f"{self.path}: tensors {odd} do not match the metadata 'shapes': each packed weight "
                                f"has exactly {', '.join(f'<key>.{p}' for p in PARTS)}")
        check_mask_keys(self.shapes, plan, str(self.path), what="packed weight")

    def __contains__(self, key: str) -> bool:
        return key in self.shapes

    def keys(self):
        return self.shapes.keys()

    def get(self, key: str) -> PackedWeight:
        """The packed weight of `key`, its layout checked, and its sparsity (and structure) against the plan."""
        rows, cols = self.shapes[key]
        bitmask, values, offsets = (self._file.get_tensor(f"{key}.{part}") for part in PARTS)
        where = f"{self.path}: {key}"
        if bitmask.dtype != torch.uint8 or tuple(bitmask.shape) != (rows, -(-cols // 8)):
            raise ArtifactError(f"{where}.bitmask is {bitmask.dtype} {tuple(bitmask.shape)}; a [{rows}, {cols}] "
                                f"weight needs uint8 ({rows}, {-(-cols // 8)})")
        if offsets.dtype != torch.int64 or tuple(offsets.shape) != (rows + 1,):
            raise ArtifactError(f"{where}.row_offsets is {offsets.dtype} {tuple(offsets.shape)}; int64 ({rows + 1},) "
                                "needed")
        kept_per_row = _POPCOUNT[bitmask.long()].sum(dim=1)  # [rows]
        if cols % 8 and bool((bitmask[:, -1] >> (cols % 8)).any()):
            raise ArtifactError(f"{where}.bitmask sets bits past column {cols - 1}")
        if int(offsets[0]) != 0 or not torch.equal(offsets[1:].diff(prepend=offsets[:1]), kept_per_row):
            raise ArtifactError(f"{where}.row_offsets do not count the bits of each bitmask row")
        if values.dtype not in VALUE_DTYPES:
            raise ArtifactError(f"{where}.values is {values.dtype}; allowed {', '.join(map(str, VALUE_DTYPES))}")
        if values.dim() != 1 or values.numel() != int(offsets[-1]):
            raise ArtifactError(f"{where}.values has {values.numel()} values; the bitmask keeps {int(offsets[-1])}")
        packed = PackedWeight(bitmask, values, offsets, cols)
        if self.plan is not None:  # sparsity (and N:M structure) against the plan, as for a mask
            # the kept count is the values' length: a mask is unpacked only for an N:M structure
            check_kept_count(key, values.numel(), rows * cols, self.plan, str(self.path))
            if self.plan.n_of_m() is not None:
                check_mask(key, keep_mask(packed), self.plan, str(self.path))
        return packed
