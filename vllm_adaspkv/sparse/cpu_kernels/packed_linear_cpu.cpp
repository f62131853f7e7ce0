// y = x W^T straight from a bit-packed sparse weight, on CPU: decode reads only the kept values and one
// bit a weight, so at sparsity s a bf16 weight costs (1 - s) * 16 + 1 bits of memory traffic.
//
// Packed weight (vllm_adaspkv/sparse/packing.py, the one definition):
//   bitmask     uint8 [rows, ceil(cols / 8)]: bit j (least significant first) of byte b of row r is set
//               iff W[r, 8 b + j] is kept;
//   values      [nnz] (bfloat16, float16 or float32): the kept values, row after row, left to right;
//   row_offsets int64 [rows + 1]: row r's values are values[row_offsets[r] : row_offsets[r + 1]].
// The AVX-512 path reads the mask 32 columns at a time and expands the next popcount values into the
// lanes of the set bits (vpexpandw, AVX512-VBMI2; vexpandps for float32), then FMAs them with 32 columns
// of x in float32. The portable path walks the set bits one by one. Both accumulate in float32, per
// output row over 32-column chunks, so they agree with a float32 dense matmul to float32 rounding.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI2__)
#include <immintrin.h>
#define ADASPKV_AVX512 1
#endif

#include <cstring>
#include <string>
#include <type_traits>

namespace {

constexpr int64_t kChunk = 32;  // columns per mask word

inline uint32_t mask_word(const uint8_t* row_bits, int64_t chunk, int64_t row_bytes) {
  // bytes 4 chunk .. 4 chunk + 3 of the row; the last word of a row may be short (cols % 32 != 0)
  uint32_t word = 0;
  const int64_t start = 4 * chunk;
  std::memcpy(&word, row_bits + start, std::min<int64_t>(4, row_bytes - start));
  return word;  // little-endian: byte 0 holds columns 0..7 of the chunk
}

template <typename V>
inline float to_float(V v) { return static_cast<float>(v); }

// One output row for TB rows of x: y[b] = sum over kept columns c of W[r, c] * x[b, c].
// x is float32 [*, padded] with zero padding past cols; vals points at the row's first kept value.
template <int TB, typename V>
void row_portable(const uint8_t* bits, int64_t row_bytes, const V* vals, const float* x, int64_t x_stride,
                  int64_t chunks, float* y, int64_t y_stride) {
  float acc[TB] = {};
  for (int64_t c = 0; c < chunks; ++c) {
    uint32_t m = mask_word(bits, c, row_bytes);
    const float* xc = x + c * kChunk;
    while (m) {
      const int j = __builtin_ctz(m);
      const float w = to_float(*vals++);
      for (int b = 0; b < TB; ++b) acc[b] += w * xc[b * x_stride + j];
      m &= m - 1;
    }
  }
  for (int b = 0; b < TB; ++b) y[b * y_stride] = acc[b];
}

#ifdef ADASPKV_AVX512
// The 32 weights of a chunk as two float32 vectors (columns 0-15, 16-31), zeros where pruned: the next
// popcount(m) values are loaded with a masked load (no read past the values) and expanded into the lanes
// of the set bits in registers (vpexpandw / vexpandps; their memory forms are microcoded on AMD Zen 4).
inline __mmask32 first_lanes(int n) { return n >= 32 ? ~0u : (1u << n) - 1; }

template <typename V>
inline void expand(uint32_t m, const V* vals, __m512& lo, __m512& hi);

template <>
inline void expand<c10::BFloat16>(uint32_t m, const c10::BFloat16* vals, __m512& lo, __m512& hi) {
  const __m512i packed = _mm512_maskz_loadu_epi16(first_lanes(__builtin_popcount(m)), vals);
  const __m512i w = _mm512_maskz_expand_epi16(m, packed);  // bf16 = the high half of a float32
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(w)), 16));
  hi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(w, 1)), 16));
}

template <>
inline void expand<c10::Half>(uint32_t m, const c10::Half* vals, __m512& lo, __m512& hi) {
  const __m512i packed = _mm512_maskz_loadu_epi16(first_lanes(__builtin_popcount(m)), vals);
  const __m512i w = _mm512_maskz_expand_epi16(m, packed);
  lo = _mm512_cvtph_ps(_mm512_castsi512_si256(w));
  hi = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(w, 1));
}

template <>
inline void expand<float>(uint32_t m, const float* vals, __m512& lo, __m512& hi) {
  const __mmask16 m_lo = static_cast<__mmask16>(m), m_hi = static_cast<__mmask16>(m >> 16);
  const int n_lo = __builtin_popcount(m_lo);
  lo = _mm512_maskz_expand_ps(m_lo, _mm512_maskz_loadu_ps(static_cast<__mmask16>(first_lanes(n_lo)), vals));
  hi = _mm512_maskz_expand_ps(
      m_hi, _mm512_maskz_loadu_ps(static_cast<__mmask16>(first_lanes(__builtin_popcount(m_hi))), vals + n_lo));
}

template <int TB, typename V>
void row_avx512(const uint8_t* bits, int64_t row_bytes, const V* vals, const float* x, int64_t x_stride,
                int64_t chunks, float* y, int64_t y_stride) {
  __m512 acc[TB][2];
  for (int b = 0; b < TB; ++b) acc[b][0] = acc[b][1] = _mm512_setzero_ps();
  const int64_t full = row_bytes / 4;  // whole 4-byte mask words; a short last word goes through mask_word
  for (int64_t c = 0; c < chunks; ++c) {
    uint32_t m;
    if (c < full) std::memcpy(&m, bits + 4 * c, 4);
    else m = mask_word(bits, c, row_bytes);
    if (!m) continue;
    __m512 lo, hi;
    expand<V>(m, vals, lo, hi);
    vals += __builtin_popcount(m);
    const float* xc = x + c * kChunk;
    for (int b = 0; b < TB; ++b) {
      acc[b][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xc + b * x_stride), acc[b][0]);
      acc[b][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xc + b * x_stride + 16), acc[b][1]);
    }
  }
  for (int b = 0; b < TB; ++b) y[b * y_stride] = _mm512_reduce_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]));
}

#ifdef __AVX512BF16__
#define ADASPKV_AVX512_BF16 1
// bf16 weights and bf16 x (what vLLM serves on CPU): one vdpbf16ps does the chunk's 32 multiply-adds,
// bf16 products exact in float32 and summed in float32. U accumulators per row of x hide its latency.
template <int TB>
void row_avx512_bf16(const uint8_t* bits, int64_t row_bytes, const c10::BFloat16* vals, const c10::BFloat16* x,
                     int64_t x_stride, int64_t chunks, float* y, int64_t y_stride) {
  constexpr int U = TB >= 2 ? 1 : 2;  // measured: 2 accumulators for one row of x beat 1 and 4 (codegen)
  __m512 acc[TB][U];
  for (int b = 0; b < TB; ++b)
    for (int u = 0; u < U; ++u) acc[b][u] = _mm512_setzero_ps();
  const int64_t full = row_bytes / 4;
  for (int64_t c0 = 0; c0 < chunks; c0 += U) {
    for (int u = 0; u < U; ++u) {
      const int64_t c = c0 + u;
      if (c >= chunks) break;
      uint32_t m;
      if (c < full) std::memcpy(&m, bits + 4 * c, 4);
      else m = mask_word(bits, c, row_bytes);
      const int n = __builtin_popcount(m);
      const __m512i w = _mm512_maskz_expand_epi16(m, _mm512_maskz_loadu_epi16(first_lanes(n), vals));
      vals += n;
      const c10::BFloat16* xc = x + c * kChunk;
      for (int b = 0; b < TB; ++b)
        acc[b][u] = _mm512_dpbf16_ps(acc[b][u], (__m512bh)w, (__m512bh)_mm512_loadu_si512(xc + b * x_stride));
    }
  }
  for (int b = 0; b < TB; ++b) {
    __m512 sum = acc[b][0];
    for (int u = 1; u < U; ++u) sum = _mm512_add_ps(sum, acc[b][u]);
    y[b * y_stride] = _mm512_reduce_add_ps(sum);
  }
}
#endif
#endif

// Calls tile(std::integral_constant<int, TB>, t) on tiles of TB = 8, 4, 2, 1 rows of x starting at row t:
// each tile reads the weight once and keeps TB accumulators per output row in registers.
template <typename Tile>
void for_tiles(int64_t tokens, Tile&& tile) {
  int64_t t = 0;
  for (; t + 8 <= tokens; t += 8) tile(std::integral_constant<int, 8>{}, t);
  if (t + 4 <= tokens) tile(std::integral_constant<int, 4>{}, t), t += 4;
  if (t + 2 <= tokens) tile(std::integral_constant<int, 2>{}, t), t += 2;
  if (t < tokens) tile(std::integral_constant<int, 1>{}, t);
}

// Output rows [r0, r1) for every row of x (float32 [tokens, padded]).
template <typename V>
void packed_rows(bool portable, const uint8_t* bitmask, int64_t row_bytes, const V* values, const int64_t* offsets,
                 const float* x, int64_t tokens, int64_t padded, float* y, int64_t rows, int64_t r0, int64_t r1) {
  const int64_t chunks = padded / kChunk;
  for_tiles(tokens, [&](auto tb, int64_t t) {
    constexpr int TB = decltype(tb)::value;
    for (int64_t r = r0; r < r1; ++r) {
      const uint8_t* bits = bitmask + r * row_bytes;
      const V* vals = values + offsets[r];
      float* out = y + t * rows + r;
#ifdef ADASPKV_AVX512
      if constexpr (!std::is_same_v<V, double>) {  // float64 weights: the portable path only
        if (!portable) {
          row_avx512<TB, V>(bits, row_bytes, vals, x + t * padded, padded, chunks, out, rows);
          continue;
        }
      }
#endif
      row_portable<TB, V>(bits, row_bytes, vals, x + t * padded, padded, chunks, out, rows);
    }
  });
}

void check_packed(const torch::Tensor& bitmask, const torch::Tensor& values, const torch::Tensor& row_offsets,
                  int64_t cols) {
  TORCH_CHECK(bitmask.is_cpu() && values.is_cpu() && row_offsets.is_cpu(),
              "packed_linear: the packed weight must be on the CPU");
  TORCH_CHECK(bitmask.dim() == 2 && bitmask.scalar_type() == torch::kUInt8 && bitmask.is_contiguous(),
              "packed_linear: bitmask must be contiguous uint8 [rows, ceil(cols / 8)]");
  TORCH_CHECK(bitmask.size(1) == (cols + 7) / 8, "packed_linear: bitmask rows have ", bitmask.size(1),
              " bytes; ", cols, " input columns need ", (cols + 7) / 8);
  TORCH_CHECK(row_offsets.dim() == 1 && row_offsets.scalar_type() == torch::kInt64 &&
                  row_offsets.size(0) == bitmask.size(0) + 1 && row_offsets.is_contiguous(),
              "packed_linear: row_offsets must be contiguous int64 [rows + 1]");
  TORCH_CHECK(values.dim() == 1 && values.is_contiguous(), "packed_linear: values must be contiguous and 1-D");
  TORCH_CHECK(row_offsets[-1].item<int64_t>() == values.size(0), "packed_linear: row_offsets end at ",
              row_offsets[-1].item<int64_t>(), " but there are ", values.size(0), " values");
}

}  // namespace

// x [T, cols] (any float dtype) -> y [T, rows] float32. float64 weights are summed in float32 too.
torch::Tensor packed_linear(torch::Tensor x, torch::Tensor bitmask, torch::Tensor values, torch::Tensor row_offsets,
                            int64_t cols, bool portable) {
  TORCH_CHECK(x.dim() == 2 && x.is_cpu(), "packed_linear: x must be a CPU tensor [tokens, in_features]");
  TORCH_CHECK(x.size(1) == cols, "packed_linear: x has ", x.size(1), " columns; the weight has ", cols,
              " input columns");
  const int64_t tokens = x.size(0), rows = bitmask.size(0);
  check_packed(bitmask, values, row_offsets, cols);
  const int64_t chunks = (cols + kChunk - 1) / kChunk, padded = chunks * kChunk;
  auto y = torch::empty({tokens, rows}, x.options().dtype(torch::kFloat32));
  const uint8_t* bits = bitmask.data_ptr<uint8_t>();
  const int64_t* offsets = row_offsets.data_ptr<int64_t>();
  const int64_t row_bytes = bitmask.size(1);
  float* yp = y.data_ptr<float>();
  // x is copied once, zero-padded to whole 32-column chunks; each task takes a few rows of the weight
#ifdef ADASPKV_AVX512_BF16
  if (!portable && x.scalar_type() == at::kBFloat16 && values.scalar_type() == at::kBFloat16) {
    auto xb = torch::zeros({tokens, padded}, x.options());
    xb.narrow(1, 0, cols).copy_(x);
    const auto* xp = reinterpret_cast<const c10::BFloat16*>(xb.data_ptr<at::BFloat16>());
    const auto* vals = reinterpret_cast<const c10::BFloat16*>(values.data_ptr<at::BFloat16>());
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for_tiles(tokens, [&](auto tb, int64_t t) {
        for (int64_t r = r0; r < r1; ++r)
          row_avx512_bf16<decltype(tb)::value>(bits + r * row_bytes, row_bytes, vals + offsets[r], xp + t * padded,
                                               padded, chunks, yp + t * rows + r, rows);
      });
    });
    return y;
  }
#endif
  auto xf = torch::zeros({tokens, padded}, x.options().dtype(torch::kFloat32));
  xf.narrow(1, 0, cols).copy_(x);
  const float* xp = xf.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "packed_linear", [&] {
    const scalar_t* vals = values.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      packed_rows<scalar_t>(portable, bits, row_bytes, vals, offsets, xp, tokens, padded, yp, rows, r0, r1);
    });
  });
  return y;
}

// The dense weight [rows, cols] of a packed one, in values' dtype (prefill expands, then runs a GEMM).
torch::Tensor unpack_dense(torch::Tensor bitmask, torch::Tensor values, torch::Tensor row_offsets, int64_t cols) {
  check_packed(bitmask, values, row_offsets, cols);
  const int64_t rows = bitmask.size(0), row_bytes = bitmask.size(1);
  auto dense = torch::zeros({rows, cols}, values.options());
  const uint8_t* bits = bitmask.data_ptr<uint8_t>();
  const int64_t* offsets = row_offsets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "unpack_dense", [&] {
    const scalar_t* vals = values.data_ptr<scalar_t>();
    scalar_t* out = dense.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* v = vals + offsets[r];
#ifdef ADASPKV_AVX512
        if constexpr (sizeof(scalar_t) == 2) {  // 32 columns a step: expand the next values, store them
          const int64_t chunks = (cols + kChunk - 1) / kChunk;
          for (int64_t c = 0; c < chunks; ++c) {
            const uint32_t m = mask_word(bits + r * row_bytes, c, row_bytes);
            const int n = __builtin_popcount(m);
            const __m512i w = _mm512_maskz_expand_epi16(m, _mm512_maskz_loadu_epi16(first_lanes(n), v));
            v += n;
            _mm512_mask_storeu_epi16(out + r * cols + c * kChunk, first_lanes(std::min<int64_t>(kChunk, cols - c * kChunk)), w);
          }
          continue;
        }
#endif
        for (int64_t c = 0; c < cols; ++c)
          if (bits[r * row_bytes + c / 8] >> (c % 8) & 1) out[r * cols + c] = *v++;
      }
    });
  });
  return dense;
}

std::string isa() {  // which fast paths this build has
#if defined(ADASPKV_AVX512_BF16)
  return "avx512-vbmi2+bf16";
#elif defined(ADASPKV_AVX512)
  return "avx512-vbmi2";
#else
  return "portable";
#endif
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("packed_linear", &packed_linear, "y = x W^T from a bit-packed sparse weight (float32 out)");
  m.def("unpack_dense", &unpack_dense, "the dense weight of a bit-packed sparse weight");
  m.def("isa", &isa, "the fast paths compiled in: avx512-vbmi2+bf16, avx512-vbmi2 or portable");
}
