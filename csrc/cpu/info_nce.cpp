// CPU InfoNCE block passes. Forward: one read of a [rows, cols] score block (from torch.matmul)
// classifies every pair, forms its logit and folds it into the row's online log-sum-exp statistics
// (and, for the symmetric loss, into per-thread column statistics merged at the end). Backward: the
// same classification on the recomputed block turns each score into dL/ds in place, ready for the
// two gradient matmuls, and accumulates sum_j c_ij u_ij per row for the temperature gradient.
// Rows are split over std::threads; memory touched: the block, [B, 5] and [M, 2] float64 statistics.
#include <algorithm>
#include <cmath>
#include <vector>

#include "../info_nce.h"

namespace hnsample {
namespace {

template <typename T>
double guide_at(const PairBlock& b, int64_t r, int64_t c) {
  if (b.guide == nullptr) return 0.0;
  return static_cast<double>(to_float(static_cast<const T*>(b.guide)[r * b.guide_row_stride + c * b.guide_col_stride]));
}

// Columns are processed in chunks so that the log-sum-exp is rescaled once per chunk, not per pair.
constexpr int64_t kChunk = 256;

template <typename T>
void forward_rows(const InfoNceParams& p, const PairBlock& b, int64_t r0, int64_t r1, double* col_part) {
  const T* data = static_cast<const T*>(b.data);
  const bool track_s0 = p.hcl_beta != 0.0;
  const double b1 = 1.0 + p.hcl_beta;
  double logit[kChunk];
  int kind[kChunk];
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t row = b.row_offset + r;
    double* st = p.row_stats + 5 * row;
    double m1 = st[0], z1 = st[1], m0 = st[2], z0 = st[3], count = st[4];
    for (int64_t c0 = 0; c0 < b.cols; c0 += kChunk) {
      const int64_t n = std::min(kChunk, b.cols - c0);
      double chunk_max = -INFINITY;
      int64_t negatives = 0;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t c = c0 + t;
        const double s = static_cast<double>(to_float(data[r * b.row_stride + c * b.col_stride]));
        const int k = pair_kind(p, row, b.col_offset + c, s, guide_at<T>(b, r, c));
        const PairLogit lg = pair_logit(p, k, s);
        kind[t] = k;
        logit[t] = lg.l;
        if (k == kNegative) {
          ++negatives;
          chunk_max = (lg.l > chunk_max || lg.l != lg.l) ? lg.l : chunk_max;
        }
        if (p.symmetric && k != kMasked) {
          double* cs = col_part + 2 * c;
          lse_add(cs[0], cs[1], lg.l);
        }
      }
      if (negatives == 0) continue;
      count += static_cast<double>(negatives);
      // Sum of exp((1+beta) l - (1+beta) max) over the chunk, then one merge into the row.
      const double cm1 = b1 * chunk_max;
      double cz1 = 0.0;
      if (std::isfinite(cm1)) {
        for (int64_t t = 0; t < n; ++t)
          if (kind[t] == kNegative) cz1 += std::exp(b1 * logit[t] - cm1);
        lse_merge(m1, z1, cm1, cz1);
      } else {
        for (int64_t t = 0; t < n; ++t)
          if (kind[t] == kNegative) lse_add(m1, z1, b1 * logit[t]);
      }
      if (track_s0)
        for (int64_t t = 0; t < n; ++t)
          if (kind[t] == kNegative) lse_add(m0, z0, p.hcl_beta * logit[t]);
    }
    st[0] = m1;
    st[1] = z1;
    st[2] = m0;
    st[3] = z0;
    st[4] = count;
  }
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
    double* part = p.symmetric ? col_part.data() + (r0 / chunk) * 2 * b.cols : nullptr;
    forward_rows<T>(p, b, r0, r1, part);
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

template <typename T>
void backward_block(const InfoNceParams& p, const PairBlock& b, int threads) {
  T* data = static_cast<T*>(b.data);
  parallel_rows(b.rows, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t row = b.row_offset + r;
      double acc = 0.0;
      for (int64_t c = 0; c < b.cols; ++c) {
        T& cell = data[r * b.row_stride + c * b.col_stride];
        const double s = static_cast<double>(to_float(cell));
        const int k = pair_kind(p, row, b.col_offset + c, s, guide_at<T>(b, r, c));
        double g = 0.0;
        if (k != kMasked) {
          const PairLogit lg = pair_logit(p, k, s);
          const double coef = pair_coefficient(p, k, lg.l, row, b.col_offset + c);
          if (coef != 0.0) acc += coef * lg.u;
          g = coef * p.inv_temperature;
        }
        cell = static_cast<T>(g);
      }
      p.tau_acc[row] += acc;
    }
  });
}

}  // namespace

void info_nce_forward_block_cpu(const InfoNceParams& p, const PairBlock& block, int threads) {
  if (block.rows == 0 || block.cols == 0) return;
  HN_CHECK(block.row_offset >= 0 && block.row_offset + block.rows <= p.num_rows, "block rows out of range");
  HN_CHECK(block.col_offset >= 0 && block.col_offset + block.cols <= p.num_cols, "block cols out of range");
  const auto code = static_cast<DType>(block.dtype);
  HN_CHECK(code == DType::Float32 || code == DType::Float64, "score blocks must be float32 or float64");
  if (code == DType::Float32) return forward_block<float>(p, block, threads);
  forward_block<double>(p, block, threads);
}

void info_nce_backward_block_cpu(const InfoNceParams& p, const PairBlock& block, int threads) {
  if (block.rows == 0 || block.cols == 0) return;
  HN_CHECK(block.row_offset >= 0 && block.row_offset + block.rows <= p.num_rows, "block rows out of range");
  HN_CHECK(block.col_offset >= 0 && block.col_offset + block.cols <= p.num_cols, "block cols out of range");
  const auto code = static_cast<DType>(block.dtype);
  HN_CHECK(code == DType::Float32 || code == DType::Float64, "score blocks must be float32 or float64");
  if (code == DType::Float32) return backward_block<float>(p, block, threads);
  backward_block<double>(p, block, threads);
}

}  // namespace hnsample
