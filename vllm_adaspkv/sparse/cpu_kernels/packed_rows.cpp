// y = x W^T straight from a bit-packed sparse weight, on CPU: decode reads only the kept values and one
// bit a weight, so at sparsity s a bf16 weight costs (1 - s) * 16 + 1 bits of memory traffic. The layout
// is in packed_rows.h.
// The AVX-512 path reads the mask 32 columns at a time and expands the next popcount values into the
// lanes of the set bits (vpexpandw, AVX512-VBMI2; vexpandps for float32), then FMAs them with 32 columns
// of x in float32. The portable path walks the set bits one by one. Both accumulate in float32, per
// output row over 32-column chunks, so they agree with a float32 dense matmul to float32 rounding.

#include "packed_rows.h"

#include <c10/util/Half.h>

#ifdef ADASPKV_AVX512
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <type_traits>

namespace adaspkv {
namespace {

// Unrolls the small loops over accumulators completely, early: GCC otherwise keeps an array of vector
// accumulators in memory and stores every one of them on each step of the chunk loop (seen in the
// assembly; the blocked kernel ran about 1.5x slower for it at 8 rows of x).
#define ADASPKV_UNROLL _Pragma("GCC unroll 16")

inline uint32_t mask_word(const uint8_t* row_bits, int64_t chunk, int64_t row_bytes) {
  // bytes 4 chunk .. 4 chunk + 3 of the row; the last word of a row may be short (cols % 32 != 0).
  // The kernels read whole words themselves (`c < full`) and call this for the short one only: with that
  // branch folded in here, the memcpy of variable size sits inside their loops and GCC spills the
  // accumulators around it (tried: 69-166 stack moves in rows_avx512_bf16, against none).
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
  ADASPKV_UNROLL
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
    ADASPKV_UNROLL
    for (int b = 0; b < TB; ++b) {
      acc[b][0] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xc + b * x_stride), acc[b][0]);
      acc[b][1] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(xc + b * x_stride + 16), acc[b][1]);
    }
  }
  ADASPKV_UNROLL
  for (int b = 0; b < TB; ++b) y[b * y_stride] = _mm512_reduce_add_ps(_mm512_add_ps(acc[b][0], acc[b][1]));
}

#ifdef ADASPKV_AVX512_BF16
// bf16 weights and bf16 x (what vLLM serves on CPU): one vdpbf16ps does a chunk's 32 multiply-adds, bf16
// products exact in float32 and summed in float32.

// One row of x (a decode step of one sequence): the bytes of the weight bound it; two accumulators per
// output row hide the dot product's latency (measured: faster than 1 or 4, and than blocking rows).
void row_avx512_bf16(const uint8_t* bits, int64_t row_bytes, const c10::BFloat16* vals, const c10::BFloat16* x,
                     int64_t chunks, float* y) {
  constexpr int U = 2;
  __m512 acc[U] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
  const int64_t full = row_bytes / 4;  // whole 4-byte mask words; a short last word goes through mask_word
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
      acc[u] = _mm512_dpbf16_ps(acc[u], (__m512bh)w, (__m512bh)_mm512_loadu_si512(x + c * kChunk));
    }
  }
  *y = _mm512_reduce_add_ps(_mm512_add_ps(acc[0], acc[1]));
}

// R output rows [r, r + R) for TB rows of x: per 32-column chunk, R expansions of the weight and TB loads
// of x feed R x TB dot products. From a few rows of x on, the loads and expansions, not the bytes, bound
// the kernel; blocking both sides, as a dense GEMM does, divides them by TB and R.
template <int TB, int R>
void rows_avx512_bf16(const uint8_t* bits, int64_t row_bytes, const c10::BFloat16* values, const int64_t* offsets,
                      int64_t r, const c10::BFloat16* x, int64_t x_stride, int64_t chunks, float* y, int64_t y_stride) {
  __m512 acc[R][TB];
  const c10::BFloat16* vals[R];
  ADASPKV_UNROLL
  for (int i = 0; i < R; ++i) {
    vals[i] = values + offsets[r + i];
    ADASPKV_UNROLL
    for (int b = 0; b < TB; ++b) acc[i][b] = _mm512_setzero_ps();
  }
  const int64_t full = row_bytes / 4;
  for (int64_t c = 0; c < chunks; ++c) {
    __m512i w[R];
    ADASPKV_UNROLL
    for (int i = 0; i < R; ++i) {
      const uint8_t* row_bits = bits + (r + i) * row_bytes;
      uint32_t m;
      if (c < full) std::memcpy(&m, row_bits + 4 * c, 4);
      else m = mask_word(row_bits, c, row_bytes);
      const int n = __builtin_popcount(m);
      w[i] = _mm512_maskz_expand_epi16(m, _mm512_maskz_loadu_epi16(first_lanes(n), vals[i]));
      vals[i] += n;
    }
    const c10::BFloat16* xc = x + c * kChunk;
    ADASPKV_UNROLL
    for (int b = 0; b < TB; ++b) {
      const __m512bh xv = (__m512bh)_mm512_loadu_si512(xc + b * x_stride);
      ADASPKV_UNROLL
      for (int i = 0; i < R; ++i) acc[i][b] = _mm512_dpbf16_ps(acc[i][b], (__m512bh)w[i], xv);
    }
  }
  ADASPKV_UNROLL
  for (int i = 0; i < R; ++i)
    ADASPKV_UNROLL
    for (int b = 0; b < TB; ++b) y[b * y_stride + r + i] = _mm512_reduce_add_ps(acc[i][b]);
}

// Output rows [ra, rz) for TB rows of x starting at x (y: their first output row). R x TB <= 16
// accumulators of the 32 registers (measured at 4096x4096, one thread: R = 4 for 2-4 rows of x, 2 for 5-8;
// more spills).
template <int TB>
void tile_avx512_bf16(const uint8_t* bits, int64_t row_bytes, const c10::BFloat16* values, const int64_t* offsets,
                      int64_t ra, int64_t rz, const c10::BFloat16* x, int64_t padded, int64_t chunks, float* y,
                      int64_t rows) {
  if constexpr (TB == 1) {
    for (int64_t r = ra; r < rz; ++r)
      row_avx512_bf16(bits + r * row_bytes, row_bytes, values + offsets[r], x, chunks, y + r);
  } else {
    constexpr int R = TB <= 4 ? 4 : 2;
    int64_t r = ra;
    for (; r + R <= rz; r += R) rows_avx512_bf16<TB, R>(bits, row_bytes, values, offsets, r, x, padded, chunks, y, rows);
    for (; r < rz; ++r) rows_avx512_bf16<TB, 1>(bits, row_bytes, values, offsets, r, x, padded, chunks, y, rows);
  }
}

#endif  // ADASPKV_AVX512_BF16
#endif  // ADASPKV_AVX512

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

}  // namespace

#ifdef ADASPKV_AVX512_BF16
// Output rows [r0, r1) for every row of x (bf16 [tokens, padded]), in blocks of 16 weight rows: a block
// is read from memory once and stays in cache while each tile of up to 8 rows of x passes over it.
void packed_rows_bf16(const uint8_t* bits, int64_t row_bytes, const c10::BFloat16* values, const int64_t* offsets,
                      const c10::BFloat16* x, int64_t tokens, int64_t padded, float* y, int64_t rows, int64_t r0,
                      int64_t r1) {
  const int64_t chunks = padded / kChunk;
  for (int64_t ra = r0; ra < r1; ra += 16) {
    const int64_t rz = std::min(r1, ra + 16);
    for (int64_t t = 0; t < tokens;) {
      const int64_t tb = std::min<int64_t>(8, tokens - t);
      const c10::BFloat16* xt = x + t * padded;
      float* yt = y + t * rows;
      switch (tb) {
#define ADASPKV_TILE(n) \
  case n: tile_avx512_bf16<n>(bits, row_bytes, values, offsets, ra, rz, xt, padded, chunks, yt, rows); break;
        ADASPKV_TILE(1) ADASPKV_TILE(2) ADASPKV_TILE(3) ADASPKV_TILE(4)
        ADASPKV_TILE(5) ADASPKV_TILE(6) ADASPKV_TILE(7) ADASPKV_TILE(8)
#undef ADASPKV_TILE
      }
      t += tb;
    }
  }
}
#endif

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

template <typename V>
void unpack_rows(const uint8_t* bits, int64_t row_bytes, const V* vals, const int64_t* offsets, int64_t cols, V* out,
                 int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    const V* v = vals + offsets[r];
#ifdef ADASPKV_AVX512
    if constexpr (sizeof(V) == 2) {  // 32 columns a step: expand the next values, store them
      const int64_t chunks = (cols + kChunk - 1) / kChunk, full = row_bytes / 4;
      for (int64_t c = 0; c < chunks; ++c) {
        uint32_t m;
        if (c < full) std::memcpy(&m, bits + r * row_bytes + 4 * c, 4);
        else m = mask_word(bits + r * row_bytes, c, row_bytes);
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
}

bool unpack_writes_every_element(int64_t element_size) {
#ifdef ADASPKV_AVX512
  return element_size == 2;  // the vector path stores the zeros too
#else
  return false;
#endif
}

#define ADASPKV_INSTANTIATE(V)                                                                                \
  template void packed_rows<V>(bool, const uint8_t*, int64_t, const V*, const int64_t*, const float*, int64_t, \
                               int64_t, float*, int64_t, int64_t, int64_t);                                    \
  template void unpack_rows<V>(const uint8_t*, int64_t, const V*, const int64_t*, int64_t, V*, int64_t, int64_t);
ADASPKV_INSTANTIATE(float)
ADASPKV_INSTANTIATE(double)
ADASPKV_INSTANTIATE(c10::BFloat16)
ADASPKV_INSTANTIATE(c10::Half)
#undef ADASPKV_INSTANTIATE

}  // namespace adaspkv
