// C++ kernels for the quantized paged KV cache on CPU: the same bytes as paged_kv.write and the
// same attention as paged_kv.attend's decode rows (one new token per request), without the ~50
// PyTorch ops per layer and step that dominate the PyTorch path on a small batch.
//
// Row layout (kv_quant): [codes: head_dim * bits / 8 bytes][per group: scale fp16, zero fp16];
// a token's entry for one KV head is [K row | V row]. 16 bits stores fp16 values, no scales; the
// fp8 tier stores float8 e4m3 values (one byte each, clamped to +-448), no scales.
// Cache [blocks, kv heads, block_size, 2 * row_bytes], any strides with a row's bytes contiguous.
// Built by torch.utils.cpp_extension (vllm_adaspkv/cpu_kernels/__init__.py); compiled with
// -ffp-contract=off so that quantization rounds exactly as the PyTorch reference does.

#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

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

// The 256 float8 e4m3 values, indexed by their byte: decoding a row is one lookup per value.
const float* fp8_values() {
  static const std::vector<float> table = [] {
    std::vector<float> t(256);
    for (int b = 0; b < 256; ++b) t[b] = static_cast<float>(c10::Float8_e4m3fn(static_cast<uint8_t>(b),
                                                                                c10::Float8_e4m3fn::from_bits()));
    return t;
  }();
  return table.data();
}

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

// One K or V row -> head_dim floats in decode order: code * scale + zero (two roundings, as the
// reference; codes little-endian within a byte, 6 bits: 4 codes in 3 bytes, the first lowest).
template <int BITS>
void decode_row(const uint8_t* row, const RowFormat& f, float* out) {
  if constexpr (BITS == 16) {
    for (int64_t d = 0; d < f.head_dim; ++d) out[d] = load_half(row + 2 * d);
  } else if constexpr (BITS == kFp8) {
    const float* values = fp8_values();
    for (int64_t d = 0; d < f.head_dim; ++d) out[d] = values[row[d]];
  } else {
    constexpr int per = codes_per_unit(BITS);
    const int64_t units = f.group / per;
    const uint8_t* scales = row + f.code_bytes;
    for (int64_t g = 0; g < f.head_dim / f.group; ++g) {
      const float scale = load_half(scales + 4 * g), zero = load_half(scales + 4 * g + 2);
      const uint8_t* c = row + g * f.group * BITS / 8;  // this group's codes
      float* o = out + g * f.group;
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

template <int BITS>
void attend_decode_impl(const float* q, const uint8_t* base, const int32_t* table, int64_t table_stride,
                        const int32_t* lens, float* o, const RowFormat& f, int64_t num_reqs, int64_t q_heads,
                        int64_t kv_heads, int64_t block_size, int64_t sb, int64_t sh, int64_t sn, float sm_scale) {
  const int64_t head_dim = f.head_dim, rep = q_heads / kv_heads;
  const std::vector<int64_t> channel = decode_order(f);
  at::parallel_for(0, num_reqs * kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> row(head_dim), scores, max_score(rep), total(rep), qh(rep * head_dim), oh(rep * head_dim);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t r = i / kv_heads, h = i % kv_heads, len = lens[r];
      if (len <= 0) continue;
      // This KV head's query heads [rep, D], in decode order; their output accumulates in it too.
      const float* q_in = q + (r * q_heads + h * rep) * head_dim;
      for (int64_t j = 0; j < rep; ++j)
        for (int64_t d = 0; d < head_dim; ++d) qh[j * head_dim + d] = q_in[j * head_dim + channel[d]];
      std::fill(oh.begin(), oh.end(), 0.f);
      auto for_each_row = [&](auto&& visit) {  // visit(s, row) for s in [0, len), page by page
        for (int64_t start = 0; start < len; start += block_size) {
          const uint8_t* row = base + static_cast<int64_t>(table[r * table_stride + start / block_size]) * sb + h * sh;
          for (int64_t s = start; s < std::min(start + block_size, len); ++s, row += sn) visit(s, row);
        }
      };
      scores.resize(rep * len);  // [rep, len]
      std::fill(max_score.begin(), max_score.end(), -std::numeric_limits<float>::infinity());
      std::fill(total.begin(), total.end(), 0.f);
      float* k = row.data();
      for_each_row([&](int64_t s, const uint8_t* kv_row) {  // pass 1: scores, each K row decoded once
        decode_row<BITS>(kv_row, f, k);
        for (int64_t j = 0; j < rep; ++j) {
          const float* qj = qh.data() + j * head_dim;
          float dot = 0.f;
#pragma omp simd reduction(+ : dot)
          for (int64_t d = 0; d < head_dim; ++d) dot += qj[d] * k[d];
          scores[j * len + s] = dot * sm_scale;
          max_score[j] = std::max(max_score[j], dot * sm_scale);
        }
      });
      for (int64_t j = 0; j < rep; ++j) {
        float* sj = scores.data() + j * len;
        const float m = max_score[j];
        float sum = 0.f;
        for (int64_t s = 0; s < len; ++s) {
          sj[s] = std::exp(sj[s] - m);
          sum += sj[s];
        }
        total[j] = sum;
      }
      float* v = row.data();
      for_each_row([&](int64_t s, const uint8_t* kv_row) {  // pass 2: probabilities times values
        decode_row<BITS>(kv_row + f.row_bytes, f, v);
        for (int64_t j = 0; j < rep; ++j) {
          const float p = scores[j * len + s] / total[j];
          float* oj = oh.data() + j * head_dim;
#pragma omp simd
          for (int64_t d = 0; d < head_dim; ++d) oj[d] += p * v[d];
        }
      });
      float* o_out = o + (r * q_heads + h * rep) * head_dim;
      for (int64_t j = 0; j < rep; ++j)
        for (int64_t d = 0; d < head_dim; ++d) o_out[j * head_dim + channel[d]] = oh[j * head_dim + d];
    }
  });
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
  const auto run = [&](auto impl) {
    impl(query.data_ptr<float>(), cache.data_ptr<uint8_t>(), block_table.data_ptr<int32_t>(), block_table.stride(0),
         seq_lens.data_ptr<int32_t>(), out.data_ptr<float>(), f, query.size(0), q_heads, kv_heads, cache.size(2),
         cache.stride(0), cache.stride(1), cache.stride(2), static_cast<float>(scale));
  };
  switch (fp8 ? kFp8 : bits) {
    case kFp8: run(attend_decode_impl<kFp8>); break;
    case 16: run(attend_decode_impl<16>); break;
    case 8: run(attend_decode_impl<8>); break;
    case 6: run(attend_decode_impl<6>); break;
    case 4: run(attend_decode_impl<4>); break;
    case 2: run(attend_decode_impl<2>); break;
    default: TORCH_CHECK(false, "KV bits ", bits, ": allowed 16, 8, 6, 4, 2");
  }
  return out;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("write_cache", &write_cache, "quantize K/V rows into their cache slots");
  m.def("attend_decode", &attend_decode, "decode attention over the quantized paged cache");
}
