import pytest
import torch

from vllm_adaspkv.kv.quant import (
    _pack,
    _unpack,
    bytes_per_token,
    bytes_per_token_head,
    dequantize,
    fake_quantize,
    quantize,
)


def test_bytes_formula_by_hand():
    assert bytes_per_token_head(16, 64, 32) == 128
    assert bytes_per_token_head(8, 64, 32) == 64 + 2 * 4  # codes + two groups of (scale, zero)
    assert bytes_per_token_head(6, 64, 32) == 48 + 8  # four codes in three bytes
    assert bytes_per_token_head(4, 64, 32) == 32 + 8
    assert bytes_per_token_head(2, 128, 64) == 32 + 8


def test_six_bit_packing_by_hand():
    codes = torch.tensor([[1, 2, 3, 63]], dtype=torch.uint8)
    # 24-bit word: 1 | 2 << 6 | 3 << 12 | 63 << 18 = 0xFC3081 -> bytes 0x81, 0x30, 0xFC
    assert _pack(codes, 6).tolist() == [[0x81, 0x30, 0xFC]]
    assert _pack(torch.tensor([[1, 15]], dtype=torch.uint8), 4).tolist() == [[0xF1]]
    assert _pack(torch.tensor([[1, 2, 3, 0]], dtype=torch.uint8), 2).tolist() == [[0b00111001]]
    # and back, from bytes written by hand
    assert _unpack(torch.tensor([[0x81, 0x30, 0xFC]], dtype=torch.uint8), 6, 4).tolist() == [[1, 2, 3, 63]]
    assert _unpack(torch.tensor([[0xF1]], dtype=torch.uint8), 4, 2).tolist() == [[1, 15]]
    assert _unpack(torch.tensor([[0b00111001]], dtype=torch.uint8), 2, 4).tolist() == [[1, 2, 3, 0]]


@pytest.mark.parametrize("bits", [8, 6, 4, 2])
def test_code_round_trip(bits):
    codes = torch.randint(0, 2**bits, (3, 5, 64), dtype=torch.uint8)
    assert torch.equal(_unpack(_pack(codes, bits), bits, 64), codes)
    # codes sliced out of wider rows (the cache's rows end with scales): not contiguous
    rows = torch.cat([_pack(codes, bits), torch.randint(0, 256, (3, 5, 8), dtype=torch.uint8)], -1)
    assert torch.equal(_unpack(rows[..., :-8], bits, 64), codes)


@pytest.mark.parametrize("bits", [16, 8, 6, 4, 2])
@pytest.mark.parametrize(("shape", "group"), [((7, 64), 32), ((2, 3, 4, 128), 64), ((1, 32), 32), ((5, 80), 16)])
def test_round_trip_size_and_error_bound(bits, shape, group):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(bits)) * 3
    packed = quantize(x, bits, group)
    assert packed.dtype == torch.uint8 and packed.shape == (*shape[:-1], bytes_per_token_head(bits, shape[-1], group))
    y = dequantize(packed, bits, shape[-1], group)
    g = x.reshape(*shape[:-1], -1, group)
    if bits == 16:
        assert torch.allclose(y, x, rtol=1e-3, atol=1e-3)
        return
    # asymmetric rounding: at most half a step (range / (2^bits - 1) / 2), plus fp16 scale rounding
    step = (g.amax(-1, keepdim=True) - g.amin(-1, keepdim=True)) / (2**bits - 1)
    err = (y.reshape(g.shape) - g).abs()
    assert (err <= step * 0.5 + 3e-3 * g.abs().amax(-1, keepdim=True) + 1e-4).all()
    assert torch.equal(fake_quantize(x, bits, group), y)


def test_constant_group_and_more_bits_less_error():
    x = torch.full((2, 64), 1.5)
    assert torch.equal(fake_quantize(x, 4, 32), x)  # zero range: exact
    x = torch.randn(64, 128)
    errors = [float((fake_quantize(x, b, 32) - x).pow(2).mean()) for b in (8, 6, 4, 2)]
    assert errors == sorted(errors)


@pytest.mark.parametrize(("args", "message"), [
    ((5, 64, 32), "KV bits 5: allowed 16, 8, 6, 4, 2"),
    ((8, 64, 48), "KV group size 48 must divide head_dim 64"),
    ((6, 12, 6), "6-bit codes pack 4 at a time: the group size 6 must be a multiple of 4"),
])
def test_layout_errors(args, message):
    with pytest.raises(ValueError, match=message):
        bytes_per_token_head(*args)


def test_dequantize_checks_the_row_size():
    with pytest.raises(ValueError, match="packed rows have 10 bytes; 8-bit, head_dim 64, group 32 needs 72"):
        dequantize(torch.zeros(3, 10, dtype=torch.uint8), 8, 64, 32)


def test_hadamard_by_hand_and_rotation_round_trip():
    from vllm_adaspkv.kv.quant import fake_quantize_rotated, hadamard

    assert torch.allclose(hadamard(2), torch.tensor([[1.0, 1.0], [1.0, -1.0]]) / 2**0.5)
    h = hadamard(64)
    assert torch.allclose(h @ h, torch.eye(64), atol=1e-6)  # symmetric and orthonormal: its own inverse
    with pytest.raises(ValueError, match="power-of-two head_dim, got 80"):
        hadamard(80)
    x = torch.randn(8, 64)
    assert torch.allclose(fake_quantize_rotated(x, 16, 32), x, atol=1e-2)
    # one outlier channel: in the Hadamard basis it no longer stretches its group's range
    x[:, 3] = 40.0
    plain = (fake_quantize(x, 4, 32) - x).pow(2).mean()
    rotated = (fake_quantize_rotated(x, 4, 32) - x).pow(2).mean()
    assert rotated < plain


@pytest.mark.parametrize("bits", [16, 8, 6, 4, 2])
def test_values_beyond_fp16_range_give_finite_codes_scales_and_values(bits):
    """Keys of real models reach tens of thousands; a group spanning +-1e5 used to store inf scales."""
    x = torch.tensor([[-1.0e5, -2.0, 0.0, 3.0, 7.0e4, 1.0e5, 5.0, -6.0]])  # [1, 8], one group of 8
    back = dequantize(quantize(x, bits, 8), bits, 8, 8)
    assert torch.isfinite(back).all()
    if bits == 16:  # clamped to fp16's range
        assert back[0, 0] == -65504 and back[0, 5] == 65504 and back[0, 1] == -2
    else:  # the zero point clamps to -65504, the scale to at most 65504: the extremes clip, no inf
        assert back.min() >= -65504 and back.max() <= 65504 * 2 ** bits
        assert back[0, 0] == -65504
    # a group within fp16's range is stored as it was before the clamp
    y = torch.randn(4, 64) * 100
    assert torch.equal(quantize(y, bits, 32)[..., :], quantize(y.clamp(-65504, 65504), bits, 32))


def test_fp8_rows_by_hand():
    """The fp8 tier: one float8 e4m3 byte a value, no scales; e4m3 keeps 3 mantissa bits and clips at 448.
    1.0 = 0 0111 000 (0x38); 0.3 -> 1.25 x 2^-2 = 0.3125 = 0 0101 010 (0x2A); -2.5 = 1 1000 010 (0xC2);
    1000 -> 448 = 0 1111 110 (0x7E); 0.0 = 0x00."""
    x = torch.tensor([[1.0, 0.3, -2.5, 1000.0, -1000.0, 0.0, 1.0e-9, 7.0]])  # [1, 8]
    rows = quantize(x, 8, 8, fp8=True)
    assert rows.tolist() == [[0x38, 0x2A, 0xC2, 0x7E, 0xFE, 0x00, 0x00, 0x4E]]
    assert bytes_per_token_head(8, 64, 32, fp8=True) == 64  # int8 codes at group 32: 64 + 2 x 4 = 72
    assert bytes_per_token([8, 16], 2, 64, 32, fp8=True) == 2 * 2 * 64 + 2 * 2 * 128
    back = dequantize(rows, 8, 8, 8, fp8=True)
    assert back.tolist() == [[1.0, 0.3125, -2.5, 448.0, -448.0, 0.0, 0.0, 7.0]]
    assert torch.equal(fake_quantize(x, 8, 8, fp8=True), back)
    # unwritten rows (any bytes, 0x7F and 0xFF are e4m3's NaN) decode to 0 where not valid
    garbage = torch.tensor([[0x7F, 0xFF, 0x38, 0x00]], dtype=torch.uint8).repeat(2, 1)
    decoded = dequantize(garbage, 8, 4, 4, valid=torch.tensor([False, True]), fp8=True)
    assert decoded[0].tolist() == [0.0] * 4 and decoded[1, 2] == 1.0


def test_fp8_is_an_eight_bit_format_only():
    with pytest.raises(ValueError, match=r"^float8 e4m3 is a format of the 8-bit tier, not of 4-bit layers$"):
        quantize(torch.zeros(2, 64), 4, 32, fp8=True)
    with pytest.raises(ValueError, match=r"^packed rows have 72 bytes; fp8, head_dim 64, group 32 needs 64$"):
        dequantize(torch.zeros(1, 72, dtype=torch.uint8), 8, 64, 32, fp8=True)


def test_fp8_error_is_relative_and_int8_error_absolute():
    """What each 8-bit format is good at: e4m3 keeps ~2^-4 relative precision over a head of mixed
    magnitudes, where int8's 255 levels over a group spanning +-100 lose the small values."""
    x = torch.tensor([[100.0, -100.0] + [0.01 * (i + 1) for i in range(62)]])  # [1, 64]
    small = slice(2, None)
    fp8_error = (fake_quantize(x, 8, 64, fp8=True) - x)[0, small].abs() / x[0, small].abs()
    int8_error = (fake_quantize(x, 8, 64) - x)[0, small].abs() / x[0, small].abs()
    assert fp8_error.max() <= 2**-4 and int8_error.max() > 0.1
