// C++ kernels for the quantized paged KV cache on CPU: the same bytes as paged_kv.write and the
// same attention as paged_kv.attend's decode rows (one new token per request), without the ~50
// PyTorch ops per layer and step that dominate the PyTorch path on a small batch.
//
// Row layout (kv_quant): [codes: head_dim * bits / 8 bytes][per group: scale fp16, zero fp16];
// a token's entry for one KV head is [K row | V row]. 16 bits stores fp16 values, no scales; the
// fp8 tier stores float8 e4m3 values (one byte each, clamped to +-448), no scales.
// Cache [blocks, kv heads, block_size, 2 * row_bytes], any strides with a row's bytes contiguous.
// Built by torch.utils.cpp_extension (vllm_adaspkv/kv/cpu_kernels/__init__.py); compiled with
// -ffp-contract=off so that quantization rounds exactly as the PyTorch reference does.

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

namespace {

constexpr int kFp8 = 1;  // the template argument BITS of the float8 e4m3 rows (no integer format has 1 bit)

struct RowFormat {
  int64_t bits, head_dim, group, row_bytes, code_bytes;
  bool fp8;
  RowFormat(int64_t bits, int64_t head_dim, int64_t group, bool fp8)
      : bits(bits), head_dim(head_dim), group(bits == 16 || fp8 ? head_dim : group),
        row_bytes(bits == 16 ? 2 * head_dim : fp8 ? head_dim : head_dim * bits / 8 + head_dim / group * 4),
        code_bytes(bits == 16 ? 0 : head_dim * bits / 8), fp8(fp8) {
    TORCH_CHECK(!fp8 || bits == 8, "float8 e4m3 rows are an 8-bit format, not ", bits, "-bit");
  }
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

// Codes sharing a byte (6 bits: a 3-byte word), and the channel order rows are decoded in.
// Within each group, code k of unit j lands at k * (group / per) + j, not at per * j + k: every
// loop below then runs over consecutive units and consecutive outputs, which the compiler
// vectorizes (an interleaved store does not). Dot products do not care about the order as long
// as the query is permuted alike, and the attention output is permuted back once per head.
constexpr int codes_per_unit(int bits) { return bits == 6 || bits == 2 ? 4 : bits == 4 ? 2 : 1; }

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
// exponent bias changes from 7 to 127; a subnormal (exponent 0) is mantissa x 2^-9. NaN bytes
// never reach a cache (values are clamped to +-448 before they are stored).
inline float fp8_to_float(uint8_t byte) {
  const uint32_t magnitude = byte & 0x7Fu, sign = static_cast<uint32_t>(byte & 0x80u) << 24;
  const uint32_t normal = (magnitude << 20) + (120u << 23);
  const uint32_t subnormal = std::bit_cast<uint32_t>(static_cast<float>(magnitude) * 0x1p-9f);
  const uint32_t is_normal = 0u - (magnitude >> 3 != 0);  // all ones or zero: a select without a branch
  return std::bit_cast<float>((normal & is_normal) | (subnormal & ~is_normal) | sign);
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

// exp(x) for x <= 0 (softmax after the max is subtracted), relative error ~1e-7: Cephes' expf
// polynomial in plain arithmetic, so a loop of it vectorizes (std::exp does not without
// -ffast-math, which the quantizer's exact rounding rules out).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);  // exp(-87) is still a normal float, and so is 2^n below
  const float n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round to nearest (1.5 * 2^23)
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln 2 in two steps (Cody-Waite)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  return p * std::bit_cast<float>(static_cast<uint32_t>(static_cast<int32_t>(n) + 127) << 23);
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
    for (int64_t d = 0; d < f.head_dim; ++d) row[d] = c10::Float8_e4m3fn(std::clamp(x[d], -kFp8Max, kFp8Max)).x;
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

void check_cache(const torch::Tensor& cache, const RowFormat& f) {
  TORCH_CHECK(cache.dim() == 4 && cache.scalar_type() == torch::kUInt8 && cache.size(3) == 2 * f.row_bytes &&
                  cache.stride(3) == 1,
              "cache must be uint8 [blocks, kv heads, block_size, ", 2 * f.row_bytes,
              "] with contiguous rows, got ", cache.sizes(), " strides ", cache.strides());
}

}  // namespace

// kv [T, H, 2, D] float32 (K and V of T tokens) into their slots of cache; negative slots skipped.
void write_cache(torch::Tensor cache, torch::Tensor kv, torch::Tensor slots, int64_t bits, int64_t group,
                 bool fp8) {
  const RowFormat f(bits, kv.size(3), group, fp8);
  check_cache(cache, f);
  TORCH_CHECK(kv.dim() == 4 && kv.size(2) == 2 && kv.scalar_type() == torch::kFloat32 && kv.is_contiguous(),
              "kv must be contiguous float32 [tokens, kv heads, 2, head_dim]");
  TORCH_CHECK(slots.scalar_type() == torch::kInt64 && slots.dim() == 1 && slots.size(0) == kv.size(0),
              "slots must be int64 [tokens]");
  TORCH_CHECK(kv.size(1) == cache.size(1), "kv has ", kv.size(1), " KV heads, the cache ", cache.size(1));
  const int64_t heads = kv.size(1), block_size = cache.size(2), slot_count = cache.size(0) * block_size;
  const int64_t sb = cache.stride(0), sh = cache.stride(1), sn = cache.stride(2);
  const float* x = kv.data_ptr<float>();
  const int64_t* slot = slots.data_ptr<int64_t>();
  uint8_t* base = cache.data_ptr<uint8_t>();
  for (int64_t t = 0; t < slots.size(0); ++t)  // a slot past the cache would write someone else's memory
    TORCH_CHECK(slot[t] < slot_count, "slot ", slot[t], " of token ", t, " is outside the cache of ", cache.size(0),
                " blocks x ", block_size, " slots");
  at::parallel_for(0, kv.size(0) * heads, 16, [&](int64_t begin, int64_t end) {
    std::vector<uint8_t> codes(f.head_dim);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t t = i / heads, h = i % heads, s = slot[t];
      if (s < 0) continue;  // vLLM's padding
      uint8_t* dest = base + (s / block_size) * sb + h * sh + (s % block_size) * sn;
      encode_row(x + i * 2 * f.head_dim, f, dest, codes.data());
      encode_row(x + (i * 2 + 1) * f.head_dim, f, dest + f.row_bytes, codes.data());
    }
  });
}

using AttendFn = void (*)(const float*, const uint8_t*, const int32_t*, int64_t, const int32_t*, float*,
                          const RowFormat&, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, int64_t, float);

// Per request and KV head, page by page: decode the page's K rows into a tile, score them
// against this KV head's query heads; softmax over the whole context; then decode the V rows
// the same way and accumulate. Each K and V row is decoded once for all rep query heads.
template <int BITS, int DT, int GT>
void attend_decode_impl(const float* q, const uint8_t* base, const int32_t* table, int64_t table_stride,
                        const int32_t* lens, float* o, const RowFormat& f, int64_t num_reqs, int64_t q_heads,
                        int64_t kv_heads, int64_t block_size, int64_t sb, int64_t sh, int64_t sn, float sm_scale) {
  const int64_t head_dim = DT ? DT : f.head_dim, rep = q_heads / kv_heads;
  const std::vector<int64_t> channel = decode_order(f);
  at::parallel_for(0, num_reqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> tile_buffer(block_size * head_dim), scores, qh(rep * head_dim), oh(rep * head_dim);
    float* __restrict tile = tile_buffer.data();  // [block_size, head_dim] decoded rows of one page
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / kv_heads, h = i % kv_heads, len = lens[r];
      if (len <= 0) continue;
      // This KV head's query heads [rep, D], in decode order; their output accumulates in it too.
      const float* q_in = q + (r * q_heads + h * rep) * head_dim;
      for (int64_t j = 0; j < rep; ++j)
        for (int64_t d = 0; d < head_dim; ++d) qh[j * head_dim + d] = q_in[j * head_dim + channel[d]];
      std::fill(oh.begin(), oh.end(), 0.f);
      scores.resize(rep * len);  // [rep, len]
      // visit(start, n, rows): each page's first position, token count and first row
      auto for_each_page = [&](auto&& visit) {
        for (int64_t start = 0; start < len; start += block_size) {
          const int64_t page = table[r * table_stride + start / block_size];
          visit(start, std::min(block_size, len - start), base + page * sb + h * sh);
        }
      };
      for_each_page([&](int64_t start, int64_t n, const uint8_t* rows) {  // pass 1: scores
        for (int64_t t = 0; t < n; ++t) decode_row<BITS, DT, GT>(rows + t * sn, f, tile + t * head_dim);
        for (int64_t j = 0; j < rep; ++j) {
          const float* __restrict qj = qh.data() + j * head_dim;
          float* sj = scores.data() + j * len + start;
          for (int64_t t = 0; t < n; ++t) {
            const float* __restrict k = tile + t * head_dim;
            float dot = 0.f;
#pragma omp simd reduction(+ : dot)
            for (int64_t d = 0; d < head_dim; ++d) dot += qj[d] * k[d];
            sj[t] = dot * sm_scale;
          }
        }
      });
      for (int64_t j = 0; j < rep; ++j) {  // softmax of each query head's scores
        float* __restrict sj = scores.data() + j * len;
        float m = sj[0];
        for (int64_t s = 1; s < len; ++s) m = std::max(m, sj[s]);
        float sum = 0.f;
#pragma omp simd reduction(+ : sum)
        for (int64_t s = 0; s < len; ++s) {
          sj[s] = exp_nonpositive(sj[s] - m);
          sum += sj[s];
        }
        const float inverse = 1.f / sum;
#pragma omp simd
        for (int64_t s = 0; s < len; ++s) sj[s] *= inverse;
      }
      for_each_page([&](int64_t start, int64_t n, const uint8_t* rows) {  // pass 2: probabilities x values
        for (int64_t t = 0; t < n; ++t)
          decode_row<BITS, DT, GT>(rows + t * sn + f.row_bytes, f, tile + t * head_dim);
        for (int64_t j = 0; j < rep; ++j) {
          float* __restrict oj = oh.data() + j * head_dim;
          const float* pj = scores.data() + j * len + start;
          for (int64_t t = 0; t < n; ++t) {
            const float p = pj[t];
            const float* __restrict v = tile + t * head_dim;
#pragma omp simd
            for (int64_t d = 0; d < head_dim; ++d) oj[d] += p * v[d];
          }
        }
      });
      float* o_out = o + (r * q_heads + h * rep) * head_dim;
      for (int64_t j = 0; j < rep; ++j)
        for (int64_t d = 0; d < head_dim; ++d) o_out[j * head_dim + channel[d]] = oh[j * head_dim + d];
    }
  });
}

// The instantiation for a format: head_dim 64 or 128 with their usual groups at compile time,
// any other shape with both read at run time.
template <int BITS>
AttendFn attend_for_shape(int64_t head_dim, int64_t group) {
  if constexpr (BITS == 16 || BITS == kFp8) {  // no groups
    if (head_dim == 64) return attend_decode_impl<BITS, 64, 64>;
    if (head_dim == 128) return attend_decode_impl<BITS, 128, 128>;
  } else {
    if (head_dim == 64 && group == 32) return attend_decode_impl<BITS, 64, 32>;
    if (head_dim == 64 && group == 64) return attend_decode_impl<BITS, 64, 64>;
    if (head_dim == 128 && group == 32) return attend_decode_impl<BITS, 128, 32>;
    if (head_dim == 128 && group == 64) return attend_decode_impl<BITS, 128, 64>;
    if (head_dim == 128 && group == 128) return attend_decode_impl<BITS, 128, 128>;
  }
  return attend_decode_impl<BITS, 0, 0>;
}

// One new token per request: query [R, Hq, D] float32 over each request's seq_lens[r] cached
// tokens (its own included). Returns [R, Hq, D] float32. Softmax in two passes over the context
// (scores, then values), so each K and V row is decoded once for all query heads of its KV head.
torch::Tensor attend_decode(torch::Tensor query, torch::Tensor cache, torch::Tensor block_table,
                            torch::Tensor seq_lens, double scale, int64_t bits, int64_t group, bool fp8) {
  const RowFormat f(bits, query.size(2), group, fp8);
  check_cache(cache, f);
  TORCH_CHECK(query.dim() == 3 && query.scalar_type() == torch::kFloat32 && query.is_contiguous(),
              "query must be contiguous float32 [requests, heads, head_dim]");
  TORCH_CHECK(block_table.scalar_type() == torch::kInt32 && block_table.dim() == 2 && block_table.stride(1) == 1,
              "block_table must be int32 [requests, blocks] with contiguous rows");
  TORCH_CHECK(seq_lens.scalar_type() == torch::kInt32 && seq_lens.is_contiguous(), "seq_lens must be int32");
  const int64_t q_heads = query.size(1), kv_heads = cache.size(1);
  TORCH_CHECK(q_heads % kv_heads == 0, "query heads ", q_heads, " not a multiple of kv heads ", kv_heads);
  TORCH_CHECK(seq_lens.size(0) == query.size(0) && block_table.size(0) >= query.size(0),
              "seq_lens and block_table need a row per request");
  const int32_t* lens = seq_lens.data_ptr<int32_t>();
  const int32_t* table = block_table.data_ptr<int32_t>();
  for (int64_t r = 0; r < query.size(0); ++r) {  // a block past the cache would read someone else's memory
    const int64_t used = (static_cast<int64_t>(lens[r]) + cache.size(2) - 1) / cache.size(2);
    TORCH_CHECK(used <= block_table.size(1), "request ", r, " has ", lens[r], " tokens, more than its block table holds");
    for (int64_t b = 0; b < used; ++b)
      TORCH_CHECK(table[r * block_table.stride(0) + b] >= 0 && table[r * block_table.stride(0) + b] < cache.size(0),
                  "request ", r, " block ", b, " is ", table[r * block_table.stride(0) + b], ", outside the cache of ",
                  cache.size(0), " blocks");
  }
  auto out = torch::zeros_like(query);  // requests without context (length 0) stay 0
  AttendFn impl;
  switch (fp8 ? kFp8 : bits) {
    case kFp8: impl = attend_for_shape<kFp8>(f.head_dim, f.group); break;
    case 16: impl = attend_for_shape<16>(f.head_dim, f.group); break;
    case 8: impl = attend_for_shape<8>(f.head_dim, f.group); break;
    case 6: impl = attend_for_shape<6>(f.head_dim, f.group); break;
    case 4: impl = attend_for_shape<4>(f.head_dim, f.group); break;
    case 2: impl = attend_for_shape<2>(f.head_dim, f.group); break;
    default: TORCH_CHECK(false, "KV bits ", bits, ": allowed 16, 8, 6, 4, 2");
  }
  impl(query.data_ptr<float>(), cache.data_ptr<uint8_t>(), block_table.data_ptr<int32_t>(), block_table.stride(0),
       seq_lens.data_ptr<int32_t>(), out.data_ptr<float>(), f, query.size(0), q_heads, kv_heads, cache.size(2),
       cache.stride(0), cache.stride(1), cache.stride(2), static_cast<float>(scale));
  return out;
}

// Registered with the dispatcher (not pybind): the ops are torch.ops.adaspkv_kv.*, so they show by
// name in torch.profiler tables (vLLM's --profile) and stay opaque, schema-checked calls.
TORCH_LIBRARY(adaspkv_kv, m) {
  m.def("write_cache(Tensor(a!) cache, Tensor kv, Tensor slots, int bits, int group, bool fp8) -> ()");
  m.def("attend_decode(Tensor query, Tensor cache, Tensor block_table, Tensor seq_lens, float scale, int bits, "
        "int group, bool fp8) -> Tensor");
}

TORCH_LIBRARY_IMPL(adaspkv_kv, CPU, m) {
  m.impl("write_cache", &write_cache);
  m.impl("attend_decode", &attend_decode);
}
