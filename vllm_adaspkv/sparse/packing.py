"""The packed form of a pruned weight (bitmask + kept values + row offsets) as tensor math: no files, no vLLM.

Layout (compressed-tensors' former `sparse-bitmask`, per row, least significant bit first), for a weight
W [rows, cols] and its keep mask:
- `bitmask` uint8 [rows, ceil(cols / 8)]: bit j of byte b of row r is set iff W[r, 8 b + j] is kept;
- `values` [nnz] in W's dtype: the kept values, row after row, left to right;
- `row_offsets` int64 [rows + 1]: row r's values are values[row_offsets[r]:row_offsets[r + 1]].
At sparsity s a bf16 weight takes (1 - s) * 16 + 1 bits (+ 64 bits a row): 0.56x of dense at 50%.
The C++ kernels (`cpu_kernels/packed_rows.cpp`) read exactly this.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class PackedWeight:
    bitmask: torch.Tensor  # uint8 [rows, ceil(cols / 8)]
    values: torch.Tensor  # [nnz], the weight's dtype
    row_offsets: torch.Tensor  # int64 [rows + 1]
    cols: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.bitmask.shape[0], self.cols

    @property
    def nbytes(self) -> int:
        """Resident bytes of the packed weight."""
        return sum(t.numel() * t.element_size() for t in (self.bitmask, self.values, self.row_offsets))

    @property
    def sparsity(self) -> float:
        rows, cols = self.shape
        return 1.0 - self.values.numel() / (rows * cols) if rows * cols else 0.0


def pack(weight: torch.Tensor, mask: torch.Tensor) -> PackedWeight:
    """weight [rows, cols], bool keep mask [rows, cols] -> its packed form (CPU tensors)."""
    if weight.dim() != 2 or mask.shape != weight.shape or mask.dtype != torch.bool:
        raise ValueError(f"pack: a 2-D weight and a bool mask of its shape are needed, not weight "
                         f"{tuple(weight.shape)} and mask {tuple(mask.shape)} of {mask.dtype}")
    weight, mask = weight.cpu(), mask.cpu()
    bitmask = torch.from_numpy(np.packbits(mask.numpy(), axis=1, bitorder="little"))
    kept = mask.sum(dim=1)  # [rows]
    row_offsets = torch.zeros(weight.shape[0] + 1, dtype=torch.int64)
    torch.cumsum(kept, dim=0, out=row_offsets[1:])
    return PackedWeight(bitmask, weight[mask].contiguous(), row_offsets, weight.shape[1])


def keep_mask(packed: PackedWeight) -> torch.Tensor:
    """bool [rows, cols]: which weights the packed form keeps."""
    bits = np.unpackbits(packed.bitmask.numpy(), axis=1, count=packed.cols, bitorder="little")
    return torch.from_numpy(bits.view(bool))


def unpack(packed: PackedWeight) -> torch.Tensor:
    """The dense weight [rows, cols], zeros where pruned (the reference of the kernels)."""
    dense = torch.zeros(packed.shape, dtype=packed.values.dtype)
    dense[keep_mask(packed)] = packed.values
    return dense


def stack_rows(parts: list[PackedWeight]) -> PackedWeight:
    """The packed form of torch.cat of the parts' dense weights along rows (vLLM's fused q/k/v and
    gate/up projections are their weights stacked row-wise)."""
    cols = {p.cols for p in parts}
    if len(cols) != 1:
        raise ValueError(f"stack_rows: parts have different input widths {sorted(cols)}")
    offsets, base = [parts[0].row_offsets[:1]], 0
    for p in parts:
        offsets.append(p.row_offsets[1:] + base)
        base += p.values.numel()
    return PackedWeight(torch.cat([p.bitmask for p in parts]), torch.cat([p.values for p in parts]),
                        torch.cat(offsets), cols.pop())


def row_range(packed: PackedWeight, start: int, stop: int) -> PackedWeight:
    """Rows [start, stop) of a packed weight: views of its bitmask and values, offsets rebased to 0."""
    rows = packed.shape[0]
    if not 0 <= start <= stop <= rows:
        raise ValueError(f"row_range: rows [{start}, {stop}) are not within the weight's {rows} rows")
    first, last = int(packed.row_offsets[start]), int(packed.row_offsets[stop])
    return PackedWeight(packed.bitmask[start:stop], packed.values[first:last],
                        packed.row_offsets[start:stop + 1] - first, packed.cols)


def dense_nbytes(shape: tuple[int, int], dtype: torch.dtype) -> int:
    return shape[0] * shape[1] * dtype.itemsize
