// Certified screening: a block of approximate scores S^ (from any GEMM: fp32, bf16, TF32, ...) whose
// distance to the canonical scores s (csrc/canonical.h) is bounded per pair by
//     w_ij = a_i b_j + e_i f_j + g_i + h_j + rel |S^_ij|
// (the product's proven error bound, docs/certified.md). A candidate is discarded only when its interval
// [S^ - w, S^ + w] cannot reach the row's state or pass its score filters; every other candidate is
// rescored canonically from the raw rows and offered exactly, so the selection is the one the
// canonical scores define, whatever GEMM produced S^.
#pragma once

#include <cstdint>

#include "canonical.h"
#include "topk_select.h"

namespace hnsample {

struct ScreenBlock {
  ScoreBlock approx;                // S^: float32 or bfloat16; rows are state rows row_offset + r
  // Error factors (float64), by block row r and block column c.
  const double* row_a = nullptr;    // [rows]
  const double* row_e = nullptr;    // [rows] or null (0)
  const double* row_g = nullptr;    // [rows] or null (0)
  const double* col_b = nullptr;    // [cols]
  const double* col_f = nullptr;    // [cols] or null (0)
  const double* col_h = nullptr;    // [cols] or null (0)
  double rel = 0.0;                 // relative error of S^'s own rounding (bf16 output: 2^-8)
  // Raw rows for the canonical rescoring: query of block row r at queries + r * q_stride, candidate of
  // block column c at candidates + c * c_stride (elements); `dtype` float32, float16 or bfloat16.
  const void* queries = nullptr;
  int64_t q_stride = 0;
  const void* candidates = nullptr;
  int64_t c_stride = 0;
  int dtype = 0;
  int64_t dim = 0;
  const double* q_norms = nullptr;  // [rows] canonical norms: cosine; null: dot
  const double* c_norms = nullptr;  // [cols]
  int64_t* rescored = nullptr;      // [state rows]: counts canonical rescorings (statistics), or null
};

// The error bound of one pair (float64, rounded outward by the caller's factors).
HN_HD double screen_width(const ScreenBlock& s, int64_t r, int64_t c, double approx) {
  double w = s.row_a[r] * s.col_b[c];
  if (s.row_e != nullptr && s.col_f != nullptr) w += s.row_e[r] * s.col_f[c];
  if (s.row_g != nullptr) w += s.row_g[r];
  if (s.col_h != nullptr) w += s.col_h[c];
  return w + s.rel * (approx < 0 ? -approx : approx);
}

// The canonical score of block row r and block column c.
template <typename T>
HN_HD float screen_rescore(const ScreenBlock& s, int64_t r, int64_t c) {
  const T* q = static_cast<const T*>(s.queries) + r * s.q_stride;
  const T* x = static_cast<const T*>(s.candidates) + c * s.c_stride;
  const double dot = canonical_dot(q, 1, x, 1, s.dim);
  const bool cosine = s.q_norms != nullptr;
  return canonical_score(dot, cosine, cosine ? s.q_norms[r] : 0.0, cosine ? s.c_norms[c] : 0.0);
}

// Launchers (csrc/cpu/topk_screen.cpp, csrc/cuda/topk_screen.cu).
void topk_screen_block_cpu(const TopkParams& p, const ScreenBlock& s, int threads);
// Adds the per-filter counts of the block's candidates by their canonical scores (see
// topk_filter_counts_cpu), rescoring only those whose interval straddles a filter bound.
void topk_screen_filter_counts_cpu(const TopkParams& p, const ScreenBlock& s, int64_t* counts, int threads);
// Canonical norms of `rows` rows ([rows] float64) and canonical scores of listed pairs.
void canonical_norms_cpu(const void* x, int dtype, int64_t rows, int64_t dim, int64_t stride, double* out,
                         int threads);
// out[i, p] = canonical score of query i and candidate ids[i, p] (ids >= 0; -1 gives NaN), float32 [B, P].
void canonical_pairs_cpu(const void* q, int64_t q_stride, const void* c, int64_t c_stride, int dtype, int64_t dim,
                         const int64_t* ids, int64_t rows, int64_t cols, const double* q_norms,
                         const double* c_norms, float* out, int threads);
#if defined(HNSAMPLE_WITH_CUDA)
void topk_screen_block_cuda(const TopkParams& p, const ScreenBlock& s, void* stream);
#endif

}  // namespace hnsample
