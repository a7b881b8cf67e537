// CPU InfoNCE block passes. Forward: one read of a [rows, cols] score block (from torch.matmul)
// classifies every pair, forms its logit and folds it into the row's online log-sum-exp statistics
// (and, for the symmetric loss, into per-thread column statistics merged at the end). Backward: the
// same classification on the recomputed block turns each score into dL/ds in place, ready for the
// two gradient matmuls, and accumulates sum_j c_ij u_ij per row for the temperature gradient.
// Rows are split over the worker pool; memory touched: the block (read and written at any byte
// address), [B, 5] and [M, 2] float64 statistics.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../info_nce.h"
#include "../params_check.h"

namespace hnsample {
namespace {

template <typename T>
double guide_at(const PairBlock& b, int64_t r, int64_t c) {
  if (b.guide == nullptr) return 0.0;
  return static_cast<double>(to_float(load_at<T>(b.guide, r * b.guide_row_stride + c * b.guide_col_stride)));
}

constexpr int64_t kChunk = 256;

// Exact per-pair forward for columns [c0, c0 + n) of block row r: folds the row's negatives into
// st = row_stats[row] (chunk-wise rescaling of the log-sum-exp).
template <typename T>
void forward_chunk_exact(const InfoNceParams& p, const PairBlock& b, int64_t r, int64_t c0, int64_t n, double* st) {
  const int64_t row = b.row_offset + r;
  const double b1 = 1.0 + p.hcl_beta;
  double logit[kChunk];
  bool negative[kChunk];
  double chunk_max = -INFINITY;
  int64_t negatives = 0;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t c = c0 + t;
    const double s = static_cast<double>(to_float(load_at<T>(b.data, r * b.row_stride + c * b.col_stride)));
    const int k = pair_kind(p, row, b.col_offset + c, s, guide_at<T>(b, r, c));
    const double l = pair_logit(p, k, s).l;
    negative[t] = k == kNegative;
    logit[t] = l;
    if (negative[t]) {
      ++negatives;
      chunk_max = (l > chunk_max || l != l) ? l : chunk_max;
    }
  }
  if (negatives == 0) return;
  st[4] += static_cast<double>(negatives);
  const double cm1 = b1 * chunk_max;
  if (std::isfinite(cm1)) {
    double cz1 = 0.0;
    for (int64_t t = 0; t < n; ++t)
      if (negative[t]) cz1 += nce_exp(p.float_exp, b1 * logit[t] - cm1);
    lse_merge(st[0], st[1], cm1, cz1);
  } else {
    for (int64_t t = 0; t < n; ++t)
      if (negative[t]) lse_add(st[0], st[1], b1 * logit[t], p.float_exp);
  }
  if (p.hcl_beta != 0.0)
    for (int64_t t = 0; t < n; ++t)
      if (negative[t]) lse_add(st[2], st[3], p.hcl_beta * logit[t], p.float_exp);
}

template <typename T>
void forward_rows_exact(const InfoNceParams& p, const PairBlock& b, int64_t r0, int64_t r1) {
  for (int64_t r = r0; r < r1; ++r)
    for (int64_t c0 = 0; c0 < b.cols; c0 += kChunk)
      forward_chunk_exact<T>(p, b, r, c0, std::min(kChunk, b.cols - c0), p.row_stats + 5 * (b.row_offset + r));
}

// Symmetric loss: folds every valid pair of rows [r0, r1) into per-thread column statistics.
template <typename T>
void fold_columns(const InfoNceParams& p, const PairBlock& b, int64_t r0, int64_t r1, double* col_part) {
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row = b.row_offset + r;
    for (int64_t c = 0; c < b.cols; ++c) {
      const double s = static_cast<double>(to_float(load_at<T>(b.data, r * b.row_stride + c * b.col_stride)));
      const int k = pair_kind(p, row, b.col_offset + c, s, guide_at<T>(b, r, c));
      if (k != kMasked) lse_add(col_part[2 * c], col_part[2 * c + 1], pair_logit(p, k, s).l, p.float_exp);
    }
  }
}

// ---------------------------------------------------------------------------------------------------
// float32 fast path. The per-pair rule of info_nce.h is evaluated chunk-wise with branch-free loops
// the compiler vectorizes (positives are patched in from the row's short id list instead of being
// searched per pair), and exp runs in float through exp_approx. Chunks holding NaN or +-inf logits
// fall back to the exact per-pair code above, so non-finite inputs keep their semantics.

// Hot float loops are compiled for AVX-512, AVX2 and the baseline on x86-64; the loader picks one at
// run time. Elsewhere they are compiled once, for the target's baseline.
#if defined(__x86_64__)
#define HN_CPU_CLONES __attribute__((target_clones("avx512f", "arch=haswell", "default")))
#else
#define HN_CPU_CLONES
#endif

// exp(x) for float, about 2 ulp: x = n ln2 + r with |r| <= ln2 / 2, a degree-6 polynomial for e^r and
// 2^n through the exponent bits. Flushes to 0 below -87 so that exp(-inf) = 0.
inline float exp_approx(float x) {
  const float lo = -87.0f;
  const float xc = x < lo ? lo : (x > 88.0f ? 88.0f : x);
  // Round to nearest by the 1.5 * 2^23 trick: plain adds, so the loop vectorizes without SSE4.1.
  const float n = (xc * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return x < lo ? 0.0f : p * scale;
}

// Largest float f with f <= v, so (float s > v) == (s > round_down(v)) for every float s.
inline float round_down(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) > v) f = std::nextafter(f, -INFINITY);
  return f;
}

// float32 scores of a block row and int64 id / label arrays, read at any byte address.
using Scores = UnalignedSpan<float>;
using Ids = UnalignedSpan<int64_t>;

struct RowRule {
  int64_t row;
  Ids pos;      // [P]
  Ids pos_doc;  // [P] or null
  int64_t query_label;
  bool labels;
  float upper, guide_upper;
  bool has_upper, has_guide;
  RowRule(const InfoNceParams& p, int64_t r) : row(r) {
    pos = Ids{p.positive_ids + r * p.positive_stride};
    pos_doc = Ids{p.positive_doc_ids != nullptr ? p.positive_doc_ids + r * p.positive_stride : nullptr};
    labels = p.query_labels != nullptr && p.doc_labels != nullptr;
    query_label = labels ? load_at<int64_t>(p.query_labels, r) : 0;
    has_upper = p.upper != nullptr;
    upper = has_upper ? round_down(p.upper[r]) : 0.0f;
    has_guide = p.guide_upper != nullptr;
    guide_upper = has_guide ? round_down(p.guide_upper[r]) : 0.0f;
  }
};

// Fills neg[t] (1 for an unmasked negative, else 0) and is_pos[t] for columns [c0, c0 + n) of one
// row: the same decisions as pair_kind.
inline void chunk_kinds(const InfoNceParams& p, const RowRule& rr, Scores s, Scores g, int64_t col0, int64_t n,
                        float* neg, float* is_pos) {
  for (int64_t t = 0; t < n; ++t) {
    neg[t] = 1.0f;
    is_pos[t] = 0.0f;
  }
  if (rr.labels) {
    const Ids dl{p.doc_labels + col0};
    for (int64_t t = 0; t < n; ++t) neg[t] = dl[t] == rr.query_label ? 0.0f : neg[t];
  }
  if (rr.has_upper)
    for (int64_t t = 0; t < n; ++t) neg[t] = s[t] > rr.upper ? 0.0f : neg[t];
  if (rr.has_guide)
    for (int64_t t = 0; t < n; ++t) neg[t] = g[t] > rr.guide_upper ? 0.0f : neg[t];
  for (int64_t k = 0; k < p.positive_cols; ++k) {
    const int64_t j = rr.pos[k];
    if (j < 0) continue;
    if (rr.pos_doc.bytes != nullptr && p.doc_ids != nullptr) {
      const int64_t id = rr.pos_doc[k];
      const Ids di{p.doc_ids + col0};
      for (int64_t t = 0; t < n; ++t) neg[t] = di[t] == id ? 0.0f : neg[t];
    }
  }
  for (int64_t k = 0; k < p.positive_cols; ++k) {
    const int64_t t = rr.pos[k] - col0;
    if (t >= 0 && t < n) {
      neg[t] = 0.0f;
      is_pos[t] = 1.0f;
    }
  }
}

// The n scores of row r from column c on, as a contiguous run: the block itself when its columns are
// contiguous, else gathered into dst.
inline Scores chunk_scores(const void* base, int64_t row_stride, int64_t col_stride, int64_t r, int64_t c, int64_t n,
                           float* dst) {
  const int64_t first = r * row_stride + c * col_stride;
  if (col_stride == 1) return Scores{static_cast<const unsigned char*>(base) + 4 * first};
  for (int64_t t = 0; t < n; ++t) dst[t] = load_at<float>(base, first + t * col_stride);
  return Scores{dst};
}

// Folds exp(scale * l) over the chunk's negatives into (m, z). Returns false (nothing folded) when a
// logit is not finite, so the caller can take the exact per-pair path.
inline bool fold_chunk(const float* l, const float* neg, int64_t n, float scale, double& m, double& z) {
  float mx = -INFINITY;
  float finite = 1.0f;
  for (int64_t t = 0; t < n; ++t) {
    const float x = scale * l[t];
    finite = (x - x == 0.0f) ? finite : 0.0f;  // NaN or inf
    const float xm = neg[t] != 0.0f ? x : -INFINITY;
    mx = xm > mx ? xm : mx;
  }
  if (finite == 0.0f) return false;
  if (mx == -INFINITY) return true;
  float sum = 0.0f;
  for (int64_t t = 0; t < n; ++t) sum += neg[t] * exp_approx(scale * l[t] - mx);
  lse_merge(m, z, static_cast<double>(mx), static_cast<double>(sum));
  return true;
}

HN_CPU_CLONES void forward_rows_f32(const InfoNceParams& p, const PairBlock& b, int64_t r0, int64_t r1) {
  const float b1 = static_cast<float>(1.0 + p.hcl_beta), b0 = static_cast<float>(p.hcl_beta);
  const float inv_t = static_cast<float>(p.inv_temperature);
  const float alpha = static_cast<float>(p.hardness_alpha);
  alignas(64) float sbuf[kChunk], gbuf[kChunk], neg[kChunk], is_pos[kChunk], l[kChunk];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row = b.row_offset + r;
    const RowRule rr(p, row);
    double* st = p.row_stats + 5 * row;
    for (int64_t c0 = 0; c0 < b.cols; c0 += kChunk) {
      const int64_t n = std::min(kChunk, b.cols - c0);
      const Scores s = chunk_scores(b.data, b.row_stride, b.col_stride, r, c0, n, sbuf);
      const Scores g = b.guide != nullptr
                           ? chunk_scores(b.guide, b.guide_row_stride, b.guide_col_stride, r, c0, n, gbuf)
                           : Scores{nullptr};
      chunk_kinds(p, rr, s, g, b.col_offset + c0, n, neg, is_pos);
      float count = 0.0f;
      for (int64_t t = 0; t < n; ++t) {
        l[t] = s[t] * inv_t + alpha * s[t];
        count += neg[t];
      }
      if (count == 0.0f) continue;
      bool ok = fold_chunk(l, neg, n, b1, st[0], st[1]);
      if (ok && b0 != 0.0f) ok = fold_chunk(l, neg, n, b0, st[2], st[3]);
      if (!ok) {
        // Non-finite logits: nothing was folded (beta l overflows only if (1 + beta) l does), so the
        // exact per-pair code takes the whole chunk.
        forward_chunk_exact<float>(p, b, r, c0, n, st);
        continue;
      }
      st[4] += static_cast<double>(count);
    }
  }
}

// Symmetric loss, float32: the column statistics of rows [r0, r1) in two vectorized sweeps (column
// maxima, then sums of exp(l - max)). Returns false without touching col_part when a logit is not
// finite, so the caller can take the exact per-pair path.
HN_CPU_CLONES bool fold_columns_f32(const InfoNceParams& p, const PairBlock& b, int64_t r0, int64_t r1,
                                    double* col_part) {
  const float inv_t = static_cast<float>(p.inv_temperature);
  const float alpha = static_cast<float>(p.hardness_alpha);
  const float margin = static_cast<float>(p.positive_margin);
  std::vector<float> cmax(b.cols, -INFINITY), csum(b.cols, 0.0f);
  alignas(64) float sbuf[kChunk], gbuf[kChunk], neg[kChunk], is_pos[kChunk];
  for (int sweep = 0; sweep < 2; ++sweep) {
    float finite = 1.0f;
    for (int64_t r = r0; r < r1; ++r) {
      const RowRule rr(p, b.row_offset + r);
      for (int64_t c0 = 0; c0 < b.cols; c0 += kChunk) {
        const int64_t n = std::min(kChunk, b.cols - c0);
        const Scores s = chunk_scores(b.data, b.row_stride, b.col_stride, r, c0, n, sbuf);
        const Scores g = b.guide != nullptr
                             ? chunk_scores(b.guide, b.guide_row_stride, b.guide_col_stride, r, c0, n, gbuf)
                             : Scores{nullptr};
        chunk_kinds(p, rr, s, g, b.col_offset + c0, n, neg, is_pos);
        float* mx = cmax.data() + c0;
        float* sm = csum.data() + c0;
        for (int64_t t = 0; t < n; ++t) {
          const float l = is_pos[t] != 0.0f ? (s[t] - margin) * inv_t : s[t] * inv_t + alpha * s[t];
          const float v = neg[t] + is_pos[t];
          if (sweep == 0) {
            finite = (l - l == 0.0f) ? finite : 0.0f;
            const float x = v != 0.0f ? l : -INFINITY;
            mx[t] = x > mx[t] ? x : mx[t];
          } else {
            sm[t] += v * exp_approx(l - mx[t]);
          }
        }
      }
    }
    if (sweep == 0 && finite == 0.0f) return false;
  }
  for (int64_t c = 0; c < b.cols; ++c)
    if (csum[c] > 0.0f) lse_merge(col_part[2 * c], col_part[2 * c + 1], cmax[c], csum[c]);
  return true;
}

template <typename T>
void forward_block(const InfoNceParams& p, const PairBlock& b, int threads) {
  if (threads > b.rows) threads = static_cast<int>(std::max<int64_t>(1, b.rows));
  // Per-thread column statistics for the block's columns (symmetric only), merged below so that
  // the result does not depend on the thread count beyond float64 rounding.
  const int64_t chunk = (b.rows + threads - 1) / threads;
  const int parts = static_cast<int>((b.rows + chunk - 1) / chunk);
  std::vector<double> col_part;
  if (p.symmetric) {
    col_part.resize(static_cast<size_t>(parts) * 2 * b.cols);
    for (size_t t = 0; t < col_part.size(); t += 2) {
      col_part[t] = -INFINITY;
      col_part[t + 1] = 0.0;
    }
  }
  parallel_rows(b.rows, threads, [&](int64_t r0, int64_t r1) {
    if constexpr (std::is_same_v<T, float>) {
      forward_rows_f32(p, b, r0, r1);
    } else {
      forward_rows_exact<T>(p, b, r0, r1);
    }
    if (p.symmetric) {
      double* part = col_part.data() + (r0 / chunk) * 2 * b.cols;
      if constexpr (std::is_same_v<T, float>) {
        if (fold_columns_f32(p, b, r0, r1, part)) return;
      }
      fold_columns<T>(p, b, r0, r1, part);
    }
  });
  if (!p.symmetric) return;
  for (int part = 0; part < parts; ++part) {
    const double* src = col_part.data() + static_cast<size_t>(part) * 2 * b.cols;
    for (int64_t c = 0; c < b.cols; ++c) {
      double* cs = p.col_stats + 2 * (b.col_offset + c);
      lse_merge(cs[0], cs[1], src[2 * c], src[2 * c + 1]);
    }
  }
}

// Exact per-pair backward for columns [c0, c0 + n) of block row r: rewrites the scores as dL/ds and
// returns sum_t c_t u_t.
template <typename T>
double backward_chunk_exact(const InfoNceParams& p, const PairBlock& b, int64_t r, int64_t c0, int64_t n) {
  const int64_t row = b.row_offset + r;
  double acc = 0.0;
  for (int64_t c = c0; c < c0 + n; ++c) {
    const int64_t cell = r * b.row_stride + c * b.col_stride;
    const double s = static_cast<double>(to_float(load_at<T>(b.data, cell)));
    const double g = pair_backward(p, row, b.col_offset + c, s, guide_at<T>(b, r, c), acc);
    store_at<T>(b.data, cell, static_cast<T>(g));
  }
  return acc;
}

// float32 backward of one block row range (not symmetric): the vectorized form of
// backward_chunk_exact, which still takes rows with non-finite statistics and chunks with
// non-finite scores.
HN_CPU_CLONES void backward_rows_f32(const InfoNceParams& p, const PairBlock& b, int64_t r0, int64_t r1) {
  const float b1 = static_cast<float>(1.0 + p.hcl_beta), b0 = static_cast<float>(p.hcl_beta);
  const float inv_t = static_cast<float>(p.inv_temperature);
  const float alpha = static_cast<float>(p.hardness_alpha);
  const float margin = static_cast<float>(p.positive_margin);
  alignas(64) float sbuf[kChunk], gbuf[kChunk], neg[kChunk], is_pos[kChunk], out[kChunk];
  alignas(64) float col_grad[kChunk], col_lse[kChunk];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row = b.row_offset + r;
    const double* rc = p.row_coef + 4 * row;
    double acc = 0.0;
    const bool finite_stats = std::isfinite(rc[1]) && (b0 == 0.0f || std::isfinite(rc[3]));
    if (!finite_stats || (!p.symmetric && rc[0] == 0.0 && rc[2] == 0.0)) {
      for (int64_t c0 = 0; c0 < b.cols; c0 += kChunk)
        acc += backward_chunk_exact<float>(p, b, r, c0, std::min(kChunk, b.cols - c0));
      p.tau_acc[row] += acc;
      continue;
    }
    const RowRule rr(p, row);
    const float g1 = static_cast<float>(rc[0] * (1.0 + p.hcl_beta)), s1 = static_cast<float>(rc[1]);
    const float g0 = static_cast<float>(rc[2] * p.hcl_beta), s0 = b0 != 0.0f ? static_cast<float>(rc[3]) : 0.0f;
    for (int64_t c0 = 0; c0 < b.cols; c0 += kChunk) {
      const int64_t n = std::min(kChunk, b.cols - c0);
      const Scores s = chunk_scores(b.data, b.row_stride, b.col_stride, r, c0, n, sbuf);
      float finite = 1.0f;
      for (int64_t t = 0; t < n; ++t) finite = (s[t] - s[t] == 0.0f) ? finite : 0.0f;
      if (finite == 0.0f) {
        acc += backward_chunk_exact<float>(p, b, r, c0, n);
        continue;
      }
      const Scores g = b.guide != nullptr
                           ? chunk_scores(b.guide, b.guide_row_stride, b.guide_col_stride, r, c0, n, gbuf)
                           : Scores{nullptr};
      chunk_kinds(p, rr, s, g, b.col_offset + c0, n, neg, is_pos);
      if (p.symmetric) {
        const double* cc = p.col_coef + 2 * (b.col_offset + c0);
        for (int64_t t = 0; t < n; ++t) {
          col_grad[t] = static_cast<float>(cc[2 * t]);
          col_lse[t] = static_cast<float>(cc[2 * t + 1]);
        }
      }
      float chunk_acc = 0.0f;
      for (int64_t t = 0; t < n; ++t) {
        // Positives get no row coefficient (their row terms are handled outside the kernel), only
        // the symmetric loss's column one.
        const float u = is_pos[t] != 0.0f ? (s[t] - margin) * inv_t : s[t] * inv_t;
        const float l = is_pos[t] != 0.0f ? u : u + alpha * s[t];
        float coef = g1 * exp_approx(b1 * l - s1);
        if (b0 != 0.0f) coef += g0 * exp_approx(b0 * l - s0);
        coef *= neg[t];
        if (p.symmetric) coef += (neg[t] + is_pos[t]) * col_grad[t] * exp_approx(l - col_lse[t]);
        chunk_acc += coef * u;
        out[t] = coef * inv_t;
      }
      acc += static_cast<double>(chunk_acc);
      const int64_t first = r * b.row_stride + c0 * b.col_stride;
      for (int64_t t = 0; t < n; ++t) store_at<float>(b.data, first + t * b.col_stride, out[t]);
    }
    p.tau_acc[row] += acc;
  }
}

template <typename T>
void backward_block(const InfoNceParams& p, const PairBlock& b, int threads) {
  parallel_rows(b.rows, threads, [&](int64_t r0, int64_t r1) {
    if constexpr (std::is_same_v<T, float>) {
      return backward_rows_f32(p, b, r0, r1);
    }
    for (int64_t r = r0; r < r1; ++r) {
      double acc = 0.0;
      for (int64_t c0 = 0; c0 < b.cols; c0 += kChunk)
        acc += backward_chunk_exact<T>(p, b, r, c0, std::min(kChunk, b.cols - c0));
      p.tau_acc[b.row_offset + r] += acc;
    }
  });
}

}  // namespace

void info_nce_forward_block_cpu(const InfoNceParams& p, const PairBlock& block, int threads) {
  check_params(p);
  check_pair_block(p, block);
  if (block.rows == 0 || block.cols == 0) return;
  if (static_cast<DType>(block.dtype) == DType::Float32) return forward_block<float>(p, block, threads);
  forward_block<double>(p, block, threads);
}

void info_nce_backward_block_cpu(const InfoNceParams& p, const PairBlock& block, int threads) {
  check_params(p);
  check_pair_block(p, block);
  if (block.rows == 0 || block.cols == 0) return;
  if (static_cast<DType>(block.dtype) == DType::Float32) return backward_block<float>(p, block, threads);
  backward_block<double>(p, block, threads);
}

}  // namespace hnsample
