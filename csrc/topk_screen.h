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
  // [3]: the largest col_b, col_f and col_h of the block (0 for absent factors; NaN or inf make the
  // bulk test keep everything). The CUDA launcher needs it; the CPU computes its own when null.
  const double* col_max = nullptr;
  // Deferred rescoring (CPU, window mode; topk_screen_flush_cpu), by state row; defer_slots == 0: every
  // survivor is rescored in its block. Survivors wait as (id, upper bound) across the blocks of a pass
  // and are rescored once at its end, beside a min-heap of the `capacity` largest lower bounds known to be
  // reached by distinct eligible candidates (certainly eligible waiting ones, exact scores offered).
  int64_t defer_slots = 0;
  int64_t* defer_ids = nullptr;          // [rows, defer_slots] global candidate ids
  float* defer_upper = nullptr;          // [rows, defer_slots] their upper bounds, rounded up
  int64_t* defer_count = nullptr;        // [rows]
  double* defer_lower = nullptr;         // [rows, capacity] the heap of lower bounds
  int64_t* defer_lower_count = nullptr;  // [rows]
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

HN_HD bool screen_finite(double x) { return x - x == 0; }  // false for NaN and +-inf

// The row's largest error bound over the block, without the relative term, from the column maxima.
HN_HD double screen_row_width(const ScreenBlock& s, double max_b, double max_f, double max_h, int64_t r) {
  double w = s.row_a[r] * max_b;
  if (s.row_e != nullptr) w += s.row_e[r] * max_f;
  if (s.row_g != nullptr) w += s.row_g[r];
  return w + max_h;
}

// Bulk bounds on S^: a score below `low` has S^ + w < lo, one above `high` has S^ - w > hi, for every
// w <= width + rel |S^|; rounded outward (two float64 steps, then to float). A width that is not
// finite keeps everything.
HN_HD void screen_bulk_bounds(double lo, double hi, double width, double rel, float& low, float& high) {
  if (!screen_finite(width)) {
    low = -INFINITY;
    high = INFINITY;
    return;
  }
  double y = lo - width;
  y = y > 0 ? y / (1 + rel) : y / (1 - rel);
  y = nextafter(nextafter(y, -INFINITY), -INFINITY);
  double z = hi + width;
  z = z < 0 ? z / (1 + rel) : z / (1 - rel);
  z = nextafter(nextafter(z, INFINITY), INFINITY);
  low = float_round_down(y);
  high = float_round_up(z);
}

// How a score known to lie in [lower, upper] fares against the closed bound s <= bound.
enum class Side { Pass, Fail, Unknown };

HN_HD Side screen_at_most(double lower, double upper, double bound) {
  if (bound != bound || lower > bound) return Side::Fail;  // NaN bound: nothing passes
  return upper <= bound ? Side::Pass : Side::Unknown;
}

// Counts block row r's candidates by their canonical scores, in first_failed_filter's order, into
// counts[f - 1] (the row's kScoreFilters counters). A filter is decided by the interval when it lies
// wholly on one side of its bound (a finite S^ comes from finite inputs, so the canonical score is not
// NaN); the first undecided one sends the candidate to rescore(c) (its canonical score) and the exact
// rule. Every backend counts with this function, so the statistics agree bit for bit.
template <typename A, typename Rescore>
HN_HD void screen_count_row(const TopkParams& p, const ScreenBlock& s, int64_t r, int64_t* counts,
                            const Rescore& rescore) {
  const ScoreBlock& b = s.approx;
  const int64_t row = b.row_offset + r;
  const A* approx = static_cast<const A*>(b.data) + r * b.row_stride;
  const double margin = p.upper != nullptr ? p.upper[row] : INFINITY;
  for (int64_t c = 0; c < b.cols; ++c) {
    const int64_t j = b.col_offset + c;
    if (id_banned(p, row, j)) continue;
    if (!label_allowed(p, row, j)) {
      ++counts[static_cast<int>(Filter::Labels) - 1];
      continue;
    }
    const float a = to_float(approx[c * b.col_stride]);
    const double w = screen_finite(a) ? screen_width(s, r, c, a) : INFINITY;
    Filter failed = Filter::None;
    bool known = screen_finite(w);
    if (known) {
      const double lower = a - w, upper = a + w;
      // min_score: s >= min  <=>  -s <= -min.
      const Side sides[3] = {screen_at_most(-upper, -lower, -p.min_score), screen_at_most(lower, upper, p.max_score),
                             screen_at_most(lower, upper, margin)};
      const Filter names[3] = {Filter::MinScore, Filter::MaxScore, Filter::Margin};
      for (int t = 0; t < 3 && known && failed == Filter::None; ++t) {
        if (sides[t] == Side::Unknown) known = false;
        if (sides[t] == Side::Fail) failed = names[t];
      }
    }
    if (!known) failed = first_failed_filter(p, row, j, static_cast<double>(rescore(c)));
    if (failed != Filter::None) ++counts[static_cast<int>(failed) - 1];
  }
}

// Launchers (csrc/cpu/topk_screen.cpp, csrc/cuda/topk_screen.cu).
void topk_screen_block_cpu(const TopkParams& p, const ScreenBlock& s, int threads);
// Rescores and offers the waiting survivors of state rows [s.approx.row_offset, + s.approx.rows) (their
// queries at s.queries, q_norms) and empties their deferred lists. table: int64 [blocks, 5] rows (first
// global id, rows, raw rows address, row stride in elements, canonical norms address or 0), ascending
// and not overlapping: the candidate blocks the ids came from, whose rows must still be alive.
void topk_screen_flush_cpu(const TopkParams& p, const ScreenBlock& s, const int64_t* table, int64_t blocks,
                           int threads);
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
// out[t] = -float32(sqrt(D2(a row a_ids[t], b row b_ids[t]))), the canonical "euclidean" score of n listed
// pairs (csrc/cpu/distance.cpp); float32 / float16 / bfloat16 rows; ids outside the rows are refused.
void canonical_distances_cpu(const void* a, int64_t a_stride, int64_t a_rows, const void* b, int64_t b_stride,
                             int64_t b_rows, int dtype, int64_t dim, const int64_t* a_ids, const int64_t* b_ids,
                             int64_t n, float* out, int threads);
// semi_hard's float32 key filter (hnsample/miner_choices.py), over a key block t (rows x cols, row stride
// `stride`; NaN keys never count) and pairs naming a row each:
// out[p] = the k-th smallest key >= floor[p] of row pair_rows[p] (+inf when fewer than k), 1 <= k <= cols;
void pair_kth_key_cpu(const float* t, int64_t rows, int64_t cols, int64_t stride, const int64_t* pair_rows,
                      const float* floor, int64_t pairs, int64_t k, float* out, int threads);
// the (pair, column) of every key with lo[p] < t < hi[p], pairs ascending and columns ascending within
// one, written to out_pairs / out_cols when there are at most `capacity` of them; returns how many.
int64_t pair_key_columns_cpu(const float* t, int64_t rows, int64_t cols, int64_t stride, const int64_t* pair_rows,
                             const float* lo, const float* hi, int64_t pairs, int64_t capacity, int64_t* out_pairs,
                             int64_t* out_cols, int threads);
#if defined(HNSAMPLE_WITH_CUDA)
// The same on the device (one warp per row; s.col_max required), with the same results bit for bit.
void topk_screen_block_cuda(const TopkParams& p, const ScreenBlock& s, void* stream);
// The block's columns split into `segments` ranges, range s feeding the state copy s * B rows past p's
// state (a [segments, B, capacity] state the caller merges), as topk_select_block_segments_cuda.
void topk_screen_block_segments_cuda(const TopkParams& p, const ScreenBlock& s, int64_t segments, void* stream);
void topk_screen_filter_counts_cuda(const TopkParams& p, const ScreenBlock& s, int64_t* counts, void* stream);
void canonical_norms_cuda(const void* x, int dtype, int64_t rows, int64_t dim, int64_t stride, double* out,
                          void* stream);
void canonical_pairs_cuda(const void* q, int64_t q_stride, const void* c, int64_t c_stride, int dtype, int64_t dim,
                          const int64_t* ids, int64_t rows, int64_t cols, const double* q_norms,
                          const double* c_norms, float* out, void* stream);
#endif

}  // namespace hnsample
