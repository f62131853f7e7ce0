"""The packed form of a pruned weight (vllm_adaspkv.sparse.packing), checked by hand and round trip."""

from __future__ import annotations

import pytest
import torch

from vllm_adaspkv.sparse import packing


def test_a_1x8_weight_packs_to_the_bits_values_and_offsets_worked_out_by_hand():
    weight = torch.arange(1.0, 9.0).reshape(1, 8)
    keep = torch.tensor([[True, False, True, True, False, False, False, True]])
    packed = packing.pack(weight, keep)
    assert packed.bitmask.tolist() == [[1 + 4 + 8 + 128]]  # columns 0, 2, 3, 7: bits 0, 2, 3, 7
    assert packed.values.tolist() == [1.0, 3.0, 4.0, 8.0]
    assert packed.row_offsets.tolist() == [0, 4]
    assert packed.shape == (1, 8) and packed.sparsity == 0.5
    assert packed.nbytes == 1 + 4 * 4 + 2 * 8


def test_odd_widths_all_zero_rows_and_full_rows_round_trip():
    weight = torch.randn(4, 13).bfloat16()
    keep = torch.rand(4, 13) > 0.5
    keep[1] = False  # a row with nothing kept
    keep[2] = True  # a row with no zeros
    packed = packing.pack(weight, keep)
    assert packed.bitmask.shape == (4, 2)  # 13 columns: 2 bytes a row, 3 bits of padding
    assert packed.row_offsets[2] == packed.row_offsets[1]
    assert torch.equal(packing.keep_mask(packed), keep)
    assert torch.equal(packing.unpack(packed), torch.where(keep, weight, torch.zeros((), dtype=weight.dtype)))


def test_stacked_rows_are_the_packed_form_of_the_stacked_weights():
    parts = [(torch.randn(rows, 40), torch.rand(rows, 40) > 0.3) for rows in (3, 5, 2)]
    stacked = packing.stack_rows([packing.pack(w, m) for w, m in parts])
    whole = packing.pack(torch.cat([w for w, _ in parts]), torch.cat([m for _, m in parts]))
    for name in ("bitmask", "values", "row_offsets"):
        assert torch.equal(getattr(stacked, name), getattr(whole, name)), name


def test_a_row_range_is_the_packed_form_of_those_rows():
    weight, keep = torch.randn(6, 20), torch.rand(6, 20) > 0.4
    packed = packing.pack(weight, keep)
    for start, stop in ((0, 6), (2, 5), (4, 4), (5, 6)):
        part, whole = packing.row_range(packed, start, stop), packing.pack(weight[start:stop], keep[start:stop])
        for name in ("bitmask", "values", "row_offsets"):
            assert torch.equal(getattr(part, name), getattr(whole, name)), (start, stop, name)


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match=r"a 2-D weight and a bool mask of its shape are needed, not weight \(2, 3\) "
                                         r"and mask \(2, 3\) of torch.float32"):
        packing.pack(torch.ones(2, 3), torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"parts have different input widths \[3, 4\]"):
        packing.stack_rows([packing.pack(torch.ones(1, 3), torch.ones(1, 3, dtype=torch.bool)),
                            packing.pack(torch.ones(1, 4), torch.ones(1, 4, dtype=torch.bool))])
    with pytest.raises(ValueError, match=r"rows \[3, 7\) are not within the weight's 6 rows"):
        packing.row_range(packing.pack(torch.ones(6, 3), torch.ones(6, 3, dtype=torch.bool)), 3, 7)
