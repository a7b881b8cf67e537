// Canonical "euclidean" scores of listed pairs of rows (the in-batch miners' metric, hnsample/miners.py):
//
//   terms     x_t = fl64(fl64(a_t - b_t)^2)        a_t, b_t the float32 / float16 / bfloat16 elements as float64;
//   lanes     P_r = (((0 + x_r) + x_{r+8}) + x_{r+16}) + ...   for r = 0..7, t ascending;
//   D2        = ((P_0 + P_4) + (P_2 + P_6)) + ((P_1 + P_5) + (P_3 + P_7));
//   score     s = -float32(sqrt(D2)),
//
// the order of the canonical dot product (csrc/canonical.h) over the squared differences, literally
// engine.intervals.canonical_distance_scores and _reference.canonical_squared_distances. Unlike the dot
// product's, the squares are rounded, so a fused multiply-add of a square and a lane would change bits:
// this file is compiled with -ffp-contract=off (CMakeLists.txt), and the AVX2 path is built without FMA.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "../params_check.h"
#include "../topk_screen.h"

namespace hnsample {
#if defined(__x86_64__)
bool screen_has_avx2();  // screen_x86.cpp
#endif

namespace {

template <typename T>
double squared_distance(const T* a, const T* b, int64_t d) {
  double p[kCanonicalLanes] = {0, 0, 0, 0, 0, 0, 0, 0};
  for (int64_t t = 0; t < d; ++t) {
    const double diff = static_cast<double>(to_float(a[t])) - static_cast<double>(to_float(b[t]));
    const double sq = diff * diff;
    p[t % kCanonicalLanes] += sq;
  }
  return ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]));
}

#if defined(__x86_64__)
// One step of eight float32 elements: differences and squares in float64, added to lanes 0-3 and 4-7.
__attribute__((target("avx2"))) inline void distance_step(const float* a, const float* b, __m256d& lo, __m256d& hi) {
  const __m256 av = _mm256_loadu_ps(a), bv = _mm256_loadu_ps(b);
  const __m256d dlo = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_castps256_ps128(av)),
                                    _mm256_cvtps_pd(_mm256_castps256_ps128(bv)));
  const __m256d dhi = _mm256_sub_pd(_mm256_cvtps_pd(_mm256_extractf128_ps(av, 1)),
                                    _mm256_cvtps_pd(_mm256_extractf128_ps(bv, 1)));
  lo = _mm256_add_pd(lo, _mm256_mul_pd(dlo, dlo));
  hi = _mm256_add_pd(hi, _mm256_mul_pd(dhi, dhi));
}

// squared_distance<float> by the vector unit, bit for bit: the same lanes in the same order. The last
// d % 8 elements are zero-padded in both rows: a padded term is (0 - 0)^2 = +0.0, and a lane (which
// starts at +0.0 and only adds terms >= +0.0) is never -0.0, so adding it changes nothing.
__attribute__((target("avx2"))) double squared_distance_f32_avx2(const float* a, const float* b, int64_t d) {
  __m256d lo = _mm256_setzero_pd(), hi = _mm256_setzero_pd();
  int64_t t = 0;
  for (; t + 8 <= d; t += 8) distance_step(a + t, b + t, lo, hi);
  if (t < d) {
    float at[8] = {0, 0, 0, 0, 0, 0, 0, 0}, bt[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    std::memcpy(at, a + t, static_cast<size_t>(d - t) * sizeof(float));
    std::memcpy(bt, b + t, static_cast<size_t>(d - t) * sizeof(float));
    distance_step(at, bt, lo, hi);
  }
  alignas(32) double l[4], h[4];
  _mm256_store_pd(l, lo);
  _mm256_store_pd(h, hi);
  return ((l[0] + h[0]) + (l[2] + h[2])) + ((l[1] + h[1]) + (l[3] + h[3]));
}
#endif

template <typename T>
double fast_squared_distance(const T* a, const T* b, int64_t d) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (screen_has_avx2()) return squared_distance_f32_avx2(a, b, d);
  }
#endif
  return squared_distance(a, b, d);
}

}  // namespace

void canonical_distances_cpu(const void* a, int64_t a_stride, int64_t a_rows, const void* b, int64_t b_stride,
                             int64_t b_rows, int dtype, int64_t dim, const int64_t* a_ids, const int64_t* b_ids,
                             int64_t n, float* out, int threads) {
  HN_CHECK_PARAM(valid_float_dtype(dtype) && static_cast<DType>(dtype) != DType::Float64,
                 "canonical distances take float32, float16 or bfloat16 rows, got dtype code " +
                     std::to_string(dtype));
  HN_CHECK_PARAM(n >= 0 && dim >= 0 && a_rows >= 0 && b_rows >= 0, "pair counts and sizes must be >= 0");
  HN_CHECK_PARAM(a_stride >= dim && b_stride >= dim, "row strides must be >= dim");
  HN_CHECK_PARAM(n == 0 || (a_ids != nullptr && b_ids != nullptr && out != nullptr), "pair inputs are null");
  HN_CHECK_PARAM(n == 0 || dim == 0 || (a != nullptr && b != nullptr), "rows are null");
  for (int64_t t = 0; t < n; ++t) {
    HN_CHECK_PARAM(a_ids[t] >= 0 && a_ids[t] < a_rows && b_ids[t] >= 0 && b_ids[t] < b_rows,
                   "pair " + std::to_string(t) + " names row (" + std::to_string(a_ids[t]) + ", " +
                       std::to_string(b_ids[t]) + ") outside (" + std::to_string(a_rows) + ", " +
                       std::to_string(b_rows) + ") rows");
  }
  HN_DISPATCH_FLOAT(dtype, T, [&] {
    const T* x = static_cast<const T*>(a);
    const T* y = static_cast<const T*>(b);
    parallel_rows(n, threads, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const double d2 = fast_squared_distance(x + a_ids[t] * a_stride, y + b_ids[t] * b_stride, dim);
        out[t] = -static_cast<float>(std::sqrt(d2));
      }
    });
  });
}

}  // namespace hnsample
