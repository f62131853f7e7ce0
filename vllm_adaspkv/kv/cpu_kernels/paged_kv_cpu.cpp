// C++ kernels for the quantized paged KV cache on CPU: the same bytes as paged_kv.write and the
// same attention as paged_kv.attend's decode rows (one new token per request), without the ~50
// PyTorch ops per layer and step that dominate the PyTorch path on a small batch.
//
// A token's entry for one KV head is [K row | V row], each row as kv_rows.h encodes it.
// Cache [blocks, kv heads, block_size, 2 * row_bytes], any strides with a row's bytes contiguous.
// Built by torch.utils.cpp_extension (vllm_adaspkv/kv/cpu_kernels/__init__.py); compiled with
// -ffp-contract=off so that quantization rounds exactly as the PyTorch reference does.

#include <torch/extension.h>
#include <torch/library.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <bit>
#include <cstdint>
#include <vector>

#include "kv_rows.h"

namespace {

// exp(x) for x <= 0 (softmax after the max is subtracted), relative error ~1e-7: Cephes' expf
// polynomial in plain arithmetic, so a loop of it vectorizes (std::exp does not without
// -ffast-math, which the quantizer's exact rounding rules out).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);  // exp(-87) is still a normal float, and so is 2^n below
  // n = x / ln 2 rounded to nearest by adding 1.5 * 2^23; t's low mantissa bits then hold n itself
  const float t = x * 1.44269504088896341f + 12582912.f, n = t - 12582912.f;
  const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // x - n ln 2 in two steps (Cody-Waite)
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  // 2^n from t's bits (no float -> int conversion, which a NaN score would make undefined)
  return p * std::bit_cast<float>((std::bit_cast<uint32_t>(t) - 0x4B400000u + 127u) << 23);
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
  // In parallel over (token, head): vLLM never maps two tokens of a step to one slot (were it to,
  // the row left would be either's, as with the reference's index_put).
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
    default: TORCH_INTERNAL_ASSERT(false, "RowFormat let KV bits ", bits, " through");  // it refuses them by name
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
