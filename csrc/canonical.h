// Canonical scores: the one definition of a similarity that every backend computes to the same bits.
//
// For float32 / bfloat16 / float16 inputs q, c of dimension d:
//   products  x_t = double(q_t) * double(c_t)      exact: 24 + 24 significant bits fit float64's 53;
//   lanes     P_r = (((0 + x_r) + x_{r+8}) + x_{r+16}) + ...   for r = 0..7, t ascending, in float64;
//   dot       D   = ((P_0 + P_4) + (P_2 + P_6)) + ((P_1 + P_5) + (P_3 + P_7))          in float64;
//   score     s   = float32(D)                                       (dot)
//             s   = float32(D / (N_q * N_c)), N_x = sqrt(D(x, x)), 0 if a norm is 0   (cosine).
// Every operation is an IEEE float64 add, multiply, divide or square root in a fixed order, and the
// products are exact, so fused multiply-adds cannot change a bit: the same scores on every CPU, with
// any SIMD width, and on every GPU. (Eight interleaved lanes make the sum as fast as a vector unit
// allows while keeping one fixed order.) float64 inputs keep their own definition (csrc/topk_select.h).
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace hnsample {

constexpr int kCanonicalLanes = 8;

// D of two rows (elements `step` apart), as defined above.
template <typename T>
HN_HD double canonical_dot(const T* q, int64_t q_step, const T* c, int64_t c_step, int64_t d) {
  double p[kCanonicalLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t t = 0;
  for (; t + kCanonicalLanes <= d; t += kCanonicalLanes) {
#if defined(__CUDACC__)
#pragma unroll
#endif
    for (int r = 0; r < kCanonicalLanes; ++r)
      p[r] += static_cast<double>(to_float(q[(t + r) * q_step])) * static_cast<double>(to_float(c[(t + r) * c_step]));
  }
  // The tail: lane r takes element t + r if there is one (constant indices keep p in registers on a GPU).
#if defined(__CUDACC__)
#pragma unroll
#endif
  for (int r = 0; r < kCanonicalLanes; ++r) {
    if (t + r < d)
      p[r] += static_cast<double>(to_float(q[(t + r) * q_step])) * static_cast<double>(to_float(c[(t + r) * c_step]));
  }
  return ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
}

// N of a row: sqrt(D(x, x)).
template <typename T>
HN_HD double canonical_norm(const T* x, int64_t step, int64_t d) {
  return sqrt(canonical_dot(x, step, x, step, d));
}

// The score from D and, for cosine, the two norms (a zero norm gives 0; NaN stays NaN).
HN_HD float canonical_score(double dot, bool cosine, double q_norm, double c_norm) {
  if (!cosine) return static_cast<float>(dot);
  if (q_norm == 0.0 || c_norm == 0.0) return 0.0f;
  return static_cast<float>(dot / (q_norm * c_norm));
}

// A bound on |D - S| + |s - D| (dot) where S is the exact real dot product: the float64 lane sums add
// at most ceil(d / 8) + 3 roundings of 2^-53 relative to sum |x_t| <= |q| |c|, and float32(D) one of
// 2^-24 relative plus 2^-150 absolute (subnormals). Returned as (relative to |q| |c|, absolute).
HN_HD double canonical_rounding_factor(int64_t d) {
  const double lanes_depth = static_cast<double>((d + kCanonicalLanes - 1) / kCanonicalLanes + 3);
  return (1.0 / 16777216.0 + lanes_depth * 1.1102230246251565e-16) * (1.0 + 1.0 / 1048576.0);
}

}  // namespace hnsample
