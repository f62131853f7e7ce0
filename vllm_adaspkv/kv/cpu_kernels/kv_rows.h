// One K or V row of the quantized paged KV cache, as bytes <-> floats: the row format of
// vllm_adaspkv.kv.quant (the reference) in C++, shared by the write and attention kernels of
// paged_kv_cpu.cpp. Header-only and in an anonymous namespace: the row loops are templates that
// each kernel instantiates for its shapes.
//
// Row layout: [codes: head_dim * bits / 8 bytes][per group: scale fp16, zero fp16]. 16 bits
// stores fp16 values, no scales; the fp8 tier float8 e4m3 values (one byte each, clamped to
// +-448), no scales.

#pragma once

#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int kFp8 = 1;  // the template argument BITS of the float8 e4m3 rows (no integer format has 1 bit)

// Codes sharing a byte (6 bits: a 3-byte word), and the channel order rows are decoded in.
// Within each group, code k of unit j lands at k * (group / per) + j, not at per * j + k: every
// loop below then runs over consecutive units and consecutive outputs, which the compiler
// vectorizes (an interleaved store does not). Dot products do not care about the order as long
// as the query is permuted alike, and the attention output is permuted back once per head.
constexpr int codes_per_unit(int bits) { return bits == 6 || bits == 2 ? 4 : bits == 4 ? 2 : 1; }

// quant.check_layout's rules, checked before any size is computed from them: a bad call to the
// ops raises instead of dividing by zero. Returns the row's group (head_dim where there are no scales).
inline int64_t checked_group(int64_t bits, int64_t head_dim, int64_t group, bool fp8) {
  TORCH_CHECK(bits == 16 || bits == 8 || bits == 6 || bits == 4 || bits == 2, "KV bits ", bits,
              ": allowed 16, 8, 6, 4, 2");
  TORCH_CHECK(!fp8 || bits == 8, "float8 e4m3 rows are an 8-bit format, not ", bits, "-bit");
  TORCH_CHECK(head_dim >= 1, "head_dim ", head_dim, " must be >= 1");
  if (bits == 16 || fp8) return head_dim;
  const int per = codes_per_unit(static_cast<int>(bits));
  TORCH_CHECK(group >= 1 && head_dim % group == 0 && group % per == 0, "KV group size ", group,
              " must divide head_dim ", head_dim, " and be a multiple of ", per, " for ", bits, "-bit codes");
  return group;
}

struct RowFormat {
  int64_t bits, head_dim, group, row_bytes, code_bytes;  // group first checked, then the sizes
  bool fp8;
  RowFormat(int64_t bits, int64_t head_dim, int64_t group, bool fp8)
      : bits(bits), head_dim(head_dim), group(checked_group(bits, head_dim, group, fp8)),
        row_bytes(bits == 16 ? 2 * head_dim : fp8 ? head_dim : head_dim * bits / 8 + head_dim / this->group * 4),
        code_bytes(bits == 16 ? 0 : head_dim * bits / 8), fp8(fp8) {}
};

constexpr float kFp8Max = 448.f;  // quant.FP8_MAX: e4m3fn has no infinity, so values are clamped first

inline float load_half(const uint8_t* p) {
  uint16_t bits;
  std::memcpy(&bits, p, 2);
  return static_cast<float>(c10::Half(bits, c10::Half::from_bits()));
}

constexpr float kHalfMax = 65504.f;  // quant.FP16_MAX: stored values are clamped to fp16's range

inline void store_half(uint8_t* p, float x) {
  uint16_t bits = c10::Half(std::clamp(x, -kHalfMax, kHalfMax)).x;  // nearest even, as torch's .to(float16)
  std::memcpy(p, &bits, 2);
}

std::vector<int64_t> decode_order(const RowFormat& f) {  // permuted position -> channel
  const int per = codes_per_unit(f.bits);
  std::vector<int64_t> channel(f.head_dim);
  const int64_t units = f.group / per;
  for (int64_t g = 0; g < f.head_dim / f.group; ++g)
    for (int k = 0; k < per; ++k)
      for (int64_t j = 0; j < units; ++j) channel[g * f.group + k * units + j] = g * f.group + per * j + k;
  return channel;
}

// fp16 values -> floats (F16C where the CPU has it: 8 a time; the compiler does not vectorize
// c10::Half's bit arithmetic).
inline void halves_to_floats(const uint8_t* __restrict p, int64_t n, float* __restrict out) {
  int64_t d = 0;
#if defined(__F16C__)
  for (; d + 8 <= n; d += 8)
    _mm256_storeu_ps(out + d, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 2 * d))));
#endif
  for (; d < n; ++d) out[d] = load_half(p + 2 * d);
}

// One float8 e4m3 byte -> its value, exactly, in integer arithmetic that vectorizes (a table
// lookup does not): a normal number's exponent and mantissa move into float32's fields and the
// exponent bias changes from 7 to 127; a subnormal (exponent 0) is mantissa x 2^-9; the NaN bytes
// (0x7F, 0xFF: what a NaN K/V value is stored as, clamping lets NaN through) stay NaN.
inline float fp8_to_float(uint8_t byte) {
  const uint32_t magnitude = byte & 0x7Fu, sign = static_cast<uint32_t>(byte & 0x80u) << 24;
  const uint32_t normal = (magnitude << 20) + (120u << 23);
  const uint32_t subnormal = std::bit_cast<uint32_t>(static_cast<float>(magnitude) * 0x1p-9f);
  const uint32_t is_normal = 0u - (magnitude >> 3 != 0);  // all ones or zero: a select without a branch
  const uint32_t is_nan = 0u - (magnitude == 0x7Fu);
  return std::bit_cast<float>((normal & is_normal) | (subnormal & ~is_normal) | (is_nan & 0x7FC00000u) | sign);
}

// A float within +-448 (or NaN) -> its float8 e4m3 byte, rounded to nearest, ties to even: the steps
// of c10::Float8_e4m3fn's conversion (which the compiler does not vectorize) as branch-free selects.
// Normal results: float32's exponent rebased from 127 to 7 and its mantissa rounded to 3 bits in
// integer arithmetic; below 2^-6, adding 2^14 in float rounds to a multiple of 2^-9 (the e4m3
// subnormal step) and leaves the code in the low bits.
inline uint8_t float_to_fp8(float x) {
  const uint32_t bits = std::bit_cast<uint32_t>(x), sign = (bits >> 24) & 0x80u, magnitude = bits & 0x7FFFFFFFu;
  const uint32_t normal = (magnitude - (120u << 23) + 0x7FFFFu + ((magnitude >> 20) & 1u)) >> 20;
  const uint32_t subnormal = std::bit_cast<uint32_t>(std::bit_cast<float>(magnitude) + 16384.f) - (141u << 23);
  const uint32_t is_subnormal = 0u - (magnitude < (121u << 23)), is_nan = 0u - (magnitude > 0x7F800000u);
  const uint32_t code = (normal & ~is_subnormal) | (subnormal & is_subnormal);
  return static_cast<uint8_t>(((code & ~is_nan) | (0x7Fu & is_nan)) | sign);
}

// One K or V row -> head_dim floats in decode order: code * scale + zero (two roundings, as the
// reference; codes little-endian within a byte, 6 bits: 4 codes in 3 bytes, the first lowest).
// DT, GT: head_dim and group known at compile time (0: read from f), so that the common shapes'
// loops are unrolled and vectorized.
template <int BITS, int DT, int GT>
inline void decode_row(const uint8_t* __restrict row, const RowFormat& f, float* __restrict out) {
  const int64_t head_dim = DT ? DT : f.head_dim;
  if constexpr (BITS == 16) {
    halves_to_floats(row, head_dim, out);
  } else if constexpr (BITS == kFp8) {
#pragma omp simd
    for (int64_t d = 0; d < head_dim; ++d) out[d] = fp8_to_float(row[d]);
  } else {
    const int64_t group = GT ? GT : f.group;
    constexpr int per = codes_per_unit(BITS);
    const int64_t units = group / per;
    const uint8_t* scales = row + head_dim * BITS / 8;
    for (int64_t g = 0; g < head_dim / group; ++g) {
      const float scale = load_half(scales + 4 * g), zero = load_half(scales + 4 * g + 2);
      const uint8_t* c = row + g * group * BITS / 8;  // this group's codes
      float* o = out + g * group;
      for (int k = 0; k < per; ++k) {
        float* ok = o + k * units;
        for (int64_t j = 0; j < units; ++j) {
          int code;
          if constexpr (BITS == 8) code = c[j];
          else if constexpr (BITS == 4) code = (c[j] >> (4 * k)) & 0xF;
          else if constexpr (BITS == 2) code = (c[j] >> (2 * k)) & 0x3;
          else code = ((c[3 * j] | (c[3 * j + 1] << 8) | (c[3 * j + 2] << 16)) >> (6 * k)) & 0x3F;
          ok[j] = static_cast<float>(code) * scale + zero;
        }
      }
    }
  }
}

// head_dim floats -> one row, step for step as kv_quant.quantize: fp16 scale and zero first,
// codes against the stored (rounded) values, IEEE division, ties to even, clamp. q: head_dim
// bytes of scratch for the codes before packing.
void encode_row(const float* x, const RowFormat& f, uint8_t* row, uint8_t* q) {
  if (f.bits == 16) {
    for (int64_t d = 0; d < f.head_dim; ++d) store_half(row + 2 * d, x[d]);
    return;
  }
  if (f.fp8) {  // nearest e4m3 value, ties to even, as torch's .to(float8_e4m3fn)
#pragma omp simd
    for (int64_t d = 0; d < f.head_dim; ++d) row[d] = float_to_fp8(std::clamp(x[d], -kFp8Max, kFp8Max));
    return;
  }
  const int levels = (1 << f.bits) - 1;
  for (int64_t g = 0; g < f.head_dim / f.group; ++g) {
    const float* xg = x + g * f.group;
    float low = xg[0], high = xg[0];
    for (int64_t i = 1; i < f.group; ++i) {
      low = std::min(low, xg[i]);
      high = std::max(high, xg[i]);
    }
    const c10::Half scale16(std::min((high - low) / static_cast<float>(levels), kHalfMax)),
        zero16(std::clamp(low, -kHalfMax, kHalfMax));
    const float scale = static_cast<float>(scale16), zero = static_cast<float>(zero16);
    const float safe = scale > 0.f ? scale : 1.f;  // a constant group: codes 0
    for (int64_t i = 0; i < f.group; ++i) {
      const float c = std::nearbyint((xg[i] - zero) / safe);
      q[g * f.group + i] = static_cast<uint8_t>(std::min(std::max(c, 0.f), static_cast<float>(levels)));
    }
    std::memcpy(row + f.code_bytes + 4 * g, &scale16.x, 2);
    std::memcpy(row + f.code_bytes + 4 * g + 2, &zero16.x, 2);
  }
  switch (f.bits) {
    case 8: std::memcpy(row, q, f.head_dim); break;
    case 4: for (int64_t j = 0; j < f.head_dim / 2; ++j) row[j] = q[2 * j] | (q[2 * j + 1] << 4); break;
    case 2:
      for (int64_t j = 0; j < f.head_dim / 4; ++j)
        row[j] = q[4 * j] | (q[4 * j + 1] << 2) | (q[4 * j + 2] << 4) | (q[4 * j + 3] << 6);
      break;
    default:  // 6
      for (int64_t j = 0; j < f.head_dim / 4; ++j) {
        const uint32_t word = q[4 * j] | (q[4 * j + 1] << 6) | (q[4 * j + 2] << 12) | (q[4 * j + 3] << 18);
        row[3 * j] = word & 0xFF;
        row[3 * j + 1] = (word >> 8) & 0xFF;
        row[3 * j + 2] = (word >> 16) & 0xFF;
      }
  }
}

}  // namespace
