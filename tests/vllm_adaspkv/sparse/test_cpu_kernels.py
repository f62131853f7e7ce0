"""The packed sparse linear kernels (vllm_adaspkv.sparse.cpu_kernels) against the masked dense matmul:
hand-checkable cases, odd widths, empty and full rows, random shapes, every weight dtype, both the
AVX-512 and the portable path. The first test builds the extension (about half a minute; cached)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vllm_adaspkv.sparse import cpu_kernels, packing

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@pytest.fixture(scope="module", autouse=True)
def built():
    cpu_kernels.load()


def relative_error(y: torch.Tensor, x: torch.Tensor, packed: packing.PackedWeight) -> float:
    """Largest |y - x W^T| over |x| |W|^T: float32 summation error is ~1e-7 of it."""
    w = packing.unpack(packed).double()
    exact = x.double() @ w.T
    scale = x.double().abs() @ w.abs().T
    return ((y.double() - exact).abs() / scale.clamp_min(1e-30)).max().item()


@pytest.mark.parametrize("portable", [False, True])
def test_a_1x8_weight_by_hand(portable):
    packed = packing.pack(torch.arange(1.0, 9.0).reshape(1, 8),
                          torch.tensor([[True, False, True, True, False, False, False, True]]))
    x = torch.arange(1.0, 9.0).reshape(1, 8)
    assert cpu_kernels.matmul(x, packed, portable).tolist() == [[1 * 1 + 3 * 3 + 4 * 4 + 8 * 8]]


@pytest.mark.parametrize("portable", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("x_dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows,cols,tokens", [(1, 8, 1), (5, 31, 3), (7, 33, 2), (3, 40, 5), (2, 70, 7),
                                              (64, 100, 9), (4, 64, 13), (37, 4096, 16), (3, 16, 0),
                                              # every tile of x (1-8 rows) against blocks of 4, 2 and 1 weight rows
                                              (9, 96, 4), (19, 130, 6), (33, 64, 12), (18, 50, 11)])
def test_equals_the_masked_dense_matmul(portable, dtype, x_dtype, rows, cols, tokens):
    generator = torch.Generator().manual_seed(rows * cols + tokens)
    weight = torch.randn(rows, cols, generator=generator).to(dtype)
    keep = torch.rand(rows, cols, generator=generator) > 0.5
    keep[0] = False  # a row with nothing kept
    if rows > 1:
        keep[-1] = True  # a row with no zeros
    packed = packing.pack(weight, keep)
    x = torch.randn(tokens, cols, generator=generator).to(x_dtype)
    y = cpu_kernels.matmul(x, packed, portable)
    assert y.dtype == torch.float32 and y.shape == (tokens, rows)
    assert (y[:, 0] == 0).all()
    if tokens:
        assert relative_error(y, x, packed) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_unpack_dense_equals_the_reference(dtype):
    weight = torch.randn(9, 70).to(dtype)
    packed = packing.pack(weight, torch.rand(9, 70) > 0.6)
    assert torch.equal(cpu_kernels.unpack_dense(packed), packing.unpack(packed))


def test_linear_gives_the_same_on_either_side_of_the_kernel_row_limit():
    weight = torch.randn(48, 96).bfloat16()
    packed = packing.pack(weight, torch.rand(48, 96) > 0.5)
    bias = torch.randn(48).bfloat16()
    x = torch.randn(2, cpu_kernels.MAX_KERNEL_ROWS + 1, 96).bfloat16()  # [..., cols]: reshaped like a vLLM batch
    dense = packing.unpack(packed)
    many = cpu_kernels.linear(x, packed, bias)  # expanded weight + dense GEMM
    few = cpu_kernels.linear(x[:, :3], packed, bias)  # the kernel
    assert many.shape == (2, cpu_kernels.MAX_KERNEL_ROWS + 1, 48) and many.dtype == torch.bfloat16
    torch.testing.assert_close(many, F.linear(x, dense, bias))
    torch.testing.assert_close(few, F.linear(x[:, :3].float(), dense.float(), bias.float()).bfloat16())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_the_weight_expanded_tile_by_tile_gives_the_masked_dense_linear(dtype):
    weight = torch.randn(37, 70).to(dtype)  # tiles of 16 rows: 16, 16 and 5
    packed = packing.pack(weight, torch.rand(37, 70) > 0.5)
    x, bias = torch.randn(5, 70).bfloat16(), torch.randn(37).bfloat16()
    y = cpu_kernels.expanded_linear(x, packed, bias, tile_rows=16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, F.linear(x, packing.unpack(packed).bfloat16(), bias))
    torch.testing.assert_close(cpu_kernels.expanded_linear(x, packed, None, tile_rows=16),
                               F.linear(x, packing.unpack(packed).bfloat16()))


def test_this_machine_builds_its_fast_path():
    """Where /proc/cpuinfo lists AVX-512 VBMI2 and BF16 (this project's machines), the build must have the
    paths that use them: otherwise the tests with portable=False would test the portable path twice."""
    cpuinfo = Path("/proc/cpuinfo").read_text() if torch.backends.cpu.get_cpu_capability() == "AVX512" else ""
    if "avx512_vbmi2" not in cpuinfo or "avx512_bf16" not in cpuinfo:
        pytest.skip("this CPU has no AVX-512 VBMI2 + BF16")
    assert cpu_kernels.isa() == "avx512-vbmi2+bf16"


def test_malformed_packed_weights_are_refused_with_the_reason():
    packed = packing.pack(torch.randn(4, 16), torch.rand(4, 16) > 0.5)
    with pytest.raises(RuntimeError, match=r"x has 15 columns; the weight has 16 input columns"):
        cpu_kernels.matmul(torch.randn(1, 15), packed)
    wider = packing.PackedWeight(packed.bitmask, packed.values, packed.row_offsets, 24)
    with pytest.raises(RuntimeError, match=r"bitmask rows have 2 bytes; 24 input columns need 3"):
        cpu_kernels.matmul(torch.randn(1, 24), wider)
    short = packing.PackedWeight(packed.bitmask, packed.values[:-1], packed.row_offsets, 16)
    with pytest.raises(RuntimeError, match=r"row_offsets end at \d+ but there are \d+ values"):
        cpu_kernels.matmul(torch.randn(1, 16), short)
    with pytest.raises(RuntimeError, match=r"x must be a CPU tensor \[tokens, in_features\]"):
        cpu_kernels.matmul(torch.randn(16), packed)
