// The packed sparse linear kernels as plain functions of pointers (no tensors, no threads): the torch
// operators in packed_linear_cpu.cpp check their inputs and split the output rows across threads.
// Packed weight (vllm_adaspkv/sparse/packing.py, the one definition):
//   bitmask     uint8 [rows, ceil(cols / 8)]: bit j (least significant first) of byte b of row r is set
//               iff W[r, 8 b + j] is kept;
//   values      [nnz] (bfloat16, float16, float32 or float64): the kept values, row after row, left to right;
//   row_offsets int64 [rows + 1]: row r's values are values[row_offsets[r] : row_offsets[r + 1]].
#pragma once

#include <cstdint>

#include <c10/util/BFloat16.h>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VBMI2__)
#define ADASPKV_AVX512 1
#if defined(__AVX512BF16__)
#define ADASPKV_AVX512_BF16 1
#endif
#endif

namespace adaspkv {

constexpr int64_t kChunk = 32;  // columns per mask word; x is zero-padded to whole chunks

// y[t, r] = sum over kept c of W[r, c] x[t, c] for output rows [r0, r1) and every row t of x
// (float32 [tokens, padded]); y float32 [tokens, rows]. V: float, double, c10::BFloat16 or c10::Half.
template <typename V>
void packed_rows(bool portable, const uint8_t* bitmask, int64_t row_bytes, const V* values, const int64_t* offsets,
                 const float* x, int64_t tokens, int64_t padded, float* y, int64_t rows, int64_t r0, int64_t r1);

#ifdef ADASPKV_AVX512_BF16
// The same for bf16 weights and bf16 x [tokens, padded] (what vLLM serves on CPU).
void packed_rows_bf16(const uint8_t* bitmask, int64_t row_bytes, const c10::BFloat16* values, const int64_t* offsets,
                      const c10::BFloat16* x, int64_t tokens, int64_t padded, float* y, int64_t rows, int64_t r0,
                      int64_t r1);
#endif

// Rows [r0, r1) of the dense weight (out: [rows, cols], zeros where pruned). Stores the zeros too, so
// `out` may start uninitialised, exactly when unpack_writes_every_element(sizeof(V)).
template <typename V>
void unpack_rows(const uint8_t* bitmask, int64_t row_bytes, const V* values, const int64_t* offsets, int64_t cols,
                 V* out, int64_t r0, int64_t r1);
bool unpack_writes_every_element(int64_t element_size);

}  // namespace adaspkv
