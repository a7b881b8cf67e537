// Memory-flat InfoNCE shared by every backend: the params struct Python fills, the per-element rule
// that classifies a (query, doc) pair as positive, negative or masked and forms its logit, and the
// online log-sum-exp update. Everything here is __host__ __device__ so the CPU tests exercise the
// exact code the GPU runs. The loss built on these statistics is spelled out in
// hnsample/ops/info_nce.py and literally in hnsample/_reference.py.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace hnsample {

enum PairKind : int { kMasked = 0, kNegative = 1, kPositive = 2 };

struct InfoNceParams {
  int64_t num_rows = 0;  // B: queries
  int64_t num_cols = 0;  // M: docs
  const int64_t* positive_ids = nullptr;  // [B, P] doc ids, -1 = padding
  int64_t positive_stride = 0;
  int64_t positive_cols = 0;               // P
  const int64_t* positive_doc_ids = nullptr;  // [B, P] doc_ids of each positive (same stride), or null
  const int64_t* doc_ids = nullptr;           // [M] or null
  const int64_t* query_labels = nullptr;      // [B] or null
  const int64_t* doc_labels = nullptr;        // [M] or null
  const double* upper = nullptr;              // [B] negative masked when s_ij > upper_i, or null
  const double* guide_upper = nullptr;        // [B] negative masked when g_ij > guide_upper_i, or null
  double inv_temperature = 1.0;               // 1 / tau
  double hardness_alpha = 0.0;                // l_ij += alpha * s_ij for negatives (no gradient)
  double hcl_beta = 0.0;                      // row statistics of (1 + beta) l and beta l
  double positive_margin = 0.0;               // l_ip = (s_ip - margin) / tau
  bool symmetric = false;                     // also keep column statistics over every valid pair
  bool float_exp = false;                     // per-pair exp in float32 (nce_exp); the CUDA driver sets it
  // Forward statistics (float64, allocated by torch, updated in place block by block).
  double* row_stats = nullptr;  // [B, 5]: running max / sum of exp((1+beta) l), of exp(beta l), count
  double* col_stats = nullptr;  // [M, 2]: running max / sum of exp(l) over valid pairs (symmetric only)
  // Backward inputs (float64, read only).
  const double* row_coef = nullptr;  // [B, 4]: dL/dS1, S1, dL/dS0, S0
  const double* col_coef = nullptr;  // [M, 2]: dL/dC, C (symmetric only)
  double* tau_acc = nullptr;         // [B]: accumulates sum_j c_ij * u_ij per row
};

// A block of scores s (and optionally guide scores g, same shape): rows map to queries
// [row_offset, row_offset + rows), columns to docs [col_offset, col_offset + cols).
struct PairBlock {
  void* data = nullptr;  // scores; the backward pass overwrites them with dL/ds
  const void* guide = nullptr;
  int dtype = 0;
  int64_t rows = 0, cols = 0;
  int64_t row_stride = 0, col_stride = 1;
  int64_t guide_row_stride = 0, guide_col_stride = 1;
  int64_t row_offset = 0, col_offset = 0;
};

// Classifies doc `col` for query `row`. A listed positive is never masked. A negative is masked when
// it shares a doc id with one of the row's positives, shares the query's label, scores above the
// row's false-negative bound, or its guide score is above the row's guide bound.
HN_HD int pair_kind(const InfoNceParams& p, int64_t row, int64_t col, double s, double g) {
  // Id and label arrays are the caller's tensors, possibly at unaligned addresses: read via load_at.
  const int64_t* pos = p.positive_ids + row * p.positive_stride;
  for (int64_t t = 0; t < p.positive_cols; ++t)
    if (load_at<int64_t>(pos, t) == col) return kPositive;
  if (p.doc_ids != nullptr && p.positive_doc_ids != nullptr) {
    const int64_t id = load_at<int64_t>(p.doc_ids, col);
    const int64_t* pid = p.positive_doc_ids + row * p.positive_stride;
    for (int64_t t = 0; t < p.positive_cols; ++t)
      if (load_at<int64_t>(pos, t) >= 0 && load_at<int64_t>(pid, t) == id) return kMasked;
  }
  if (p.query_labels != nullptr && p.doc_labels != nullptr &&
      load_at<int64_t>(p.query_labels, row) == load_at<int64_t>(p.doc_labels, col))
    return kMasked;
  if (p.upper != nullptr && s > p.upper[row]) return kMasked;
  if (p.guide_upper != nullptr && g > p.guide_upper[row]) return kMasked;
  return kNegative;
}

// The base logit u (what the temperature divides; its tau-derivative is -u / tau) and the logit l.
struct PairLogit {
  double u, l;
};

HN_HD PairLogit pair_logit(const InfoNceParams& p, int kind, double s) {
  PairLogit r;
  if (kind == kPositive) {
    r.u = (s - p.positive_margin) * p.inv_temperature;
    r.l = r.u;
  } else {
    r.u = s * p.inv_temperature;
    r.l = r.u + p.hardness_alpha * s;
  }
  return r;
}

// exp(x) of one pair's term, x <= 0 up to rounding: float64 exp, or with float_exp float32 expf of
// x rounded to float (CUDA's expf is within 2 ulp: relative error <= 2^-22; rounding x adds <= 2^-24 |x|),
// for GPUs whose float64 rate is a small fraction of float32's. A log-sum-exp over n such terms, each
// taken relative to a running maximum that only grows (rescalings stay float64), then moves by at most
// 2^-24 ln n + 2^-22 (to first order; docs/losses.md derives it), about 1.1e-6 at n = 10^6.
HN_HD double nce_exp(bool float_exp, double x) {
  return float_exp ? static_cast<double>(expf(static_cast<float>(x))) : exp(x);
}

// Online log-sum-exp: (m, z) represents m + log z. Adding x, or merging another (m2, z2).
// float_exp: the per-term exp through nce_exp (the rescalings when the maximum grows stay float64).
HN_HD void lse_add(double& m, double& z, double x, bool float_exp = false) {
  if (x == -INFINITY) return;
  if (x <= m) {
    z += nce_exp(float_exp, x - m);
  } else if (x == INFINITY || x != x) {
    // inf / NaN logits poison the statistic on purpose: the loss becomes non-finite.
    z = (m == -INFINITY) ? 1.0 : z + exp(m - x);
    m = x;
  } else {
    z = z * exp(m - x) + 1.0;
    m = x;
  }
}

HN_HD void lse_merge(double& m, double& z, double m2, double z2) {
  if (z2 == 0.0) return;
  if (z == 0.0) {
    m = m2;
    z = z2;
    return;
  }
  if (m2 <= m) {
    z += z2 * exp(m2 - m);
  } else {
    z = z * exp(m - m2) + z2;
    m = m2;
  }
}

// dL/dl_ij (the coefficient c_ij) of one pair, given the final statistics.
HN_HD double pair_coefficient(const InfoNceParams& p, int kind, double l, int64_t row, int64_t col) {
  double c = 0.0;
  if (kind == kNegative) {
    const double* rc = p.row_coef + 4 * row;
    const double b1 = 1.0 + p.hcl_beta;
    if (rc[0] != 0.0) c += rc[0] * b1 * nce_exp(p.float_exp, b1 * l - rc[1]);
    if (rc[2] != 0.0 && p.hcl_beta != 0.0) c += rc[2] * p.hcl_beta * nce_exp(p.float_exp, p.hcl_beta * l - rc[3]);
  }
  if (p.symmetric && kind != kMasked) {
    const double* cc = p.col_coef + 2 * col;
    if (cc[0] != 0.0) c += cc[0] * nce_exp(p.float_exp, l - cc[1]);
  }
  return c;
}

// The backward of one pair with score s: returns dL/ds (= c_ij / tau) and adds c_ij * dl_ij/du to
// `tau_acc` (the temperature-gradient term). Shared by the CPU and CUDA backward passes.
HN_HD double pair_backward(const InfoNceParams& p, int64_t row, int64_t col, double s, double guide,
                           double& tau_acc) {
  const int k = pair_kind(p, row, col, s, guide);
  if (k == kMasked) return 0.0;
  const PairLogit lg = pair_logit(p, k, s);
  const double coef = pair_coefficient(p, k, lg.l, row, col);
  if (coef != 0.0) tau_acc += coef * lg.u;
  return coef * p.inv_temperature;
}

// ---------------------------------------------------------------------------------------------------
// Launchers.
void info_nce_forward_block_cpu(const InfoNceParams& p, const PairBlock& block, int threads);
void info_nce_backward_block_cpu(const InfoNceParams& p, const PairBlock& block, int threads);

#if defined(HNSAMPLE_WITH_CUDA)
void info_nce_forward_block_cuda(const InfoNceParams& p, const PairBlock& block, void* stream);
void info_nce_backward_block_cuda(const InfoNceParams& p, const PairBlock& block, void* stream);
#endif

}  // namespace hnsample
