// The torch operators of the packed sparse linear kernels (packed_rows.cpp): input checks, the padded
// copy of x, the output tensors and the split of output rows across threads (at::parallel_for).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <string>

#include "packed_rows.h"

namespace {

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
  const int64_t chunks = (cols + adaspkv::kChunk - 1) / adaspkv::kChunk, padded = chunks * adaspkv::kChunk;
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
      adaspkv::packed_rows_bf16(bits, row_bytes, vals, offsets, xp, tokens, padded, yp, rows, r0, r1);
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
      adaspkv::packed_rows<scalar_t>(portable, bits, row_bytes, vals, offsets, xp, tokens, padded, yp, rows, r0, r1);
    });
  });
  return y;
}

// The dense weight [rows, cols] of a packed one, in values' dtype (prefill expands, then runs a GEMM).
torch::Tensor unpack_dense(torch::Tensor bitmask, torch::Tensor values, torch::Tensor row_offsets, int64_t cols) {
  check_packed(bitmask, values, row_offsets, cols);
  const int64_t rows = bitmask.size(0), row_bytes = bitmask.size(1);
  const bool writes_every_element = adaspkv::unpack_writes_every_element(values.element_size());
  auto dense = writes_every_element ? torch::empty({rows, cols}, values.options())
                                    : torch::zeros({rows, cols}, values.options());
  const uint8_t* bits = bitmask.data_ptr<uint8_t>();
  const int64_t* offsets = row_offsets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, values.scalar_type(), "unpack_dense", [&] {
    const scalar_t* vals = values.data_ptr<scalar_t>();
    scalar_t* out = dense.data_ptr<scalar_t>();
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
      adaspkv::unpack_rows(bits, row_bytes, vals, offsets, cols, out, r0, r1);
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
