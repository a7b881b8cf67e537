// The in-batch miners' "euclidean" kernels (hnsample/miner_choices.py): canonical scores of listed pairs
// of rows, and the per-pair passes of semi_hard's float32 key filter.
//
// Canonical "euclidean" scores (the miners' metric, hnsample/miners.py):
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
#include <limits>
#include <queue>
#include <string>
#include <type_traits>
#include <vector>

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

namespace {

// The smallest key >= f among columns [j0, cols) of a row (+inf when none; NaN never counts: it fails
// the compare), and the columns in [j0, cols) with a < key < b, counted (out = nullptr) or written with
// their pair p: the loops of pair_kth_key_cpu (k = 1) and pair_key_columns_cpu, by the vector unit where
// there is one. Minimum and compares are exact, so the order of the lanes changes nothing.
float min_at_least_scalar(const float* row, int64_t j0, int64_t cols, float f) {
  float best = std::numeric_limits<float>::infinity();
  for (int64_t j = j0; j < cols; ++j)
    if (row[j] >= f && row[j] < best) best = row[j];
  return best;
}

int64_t columns_between_scalar(const float* row, int64_t j0, int64_t cols, float a, float b, int64_t p,
                               int64_t* out_pairs, int64_t* out_cols) {
  int64_t n = 0;
  for (int64_t j = j0; j < cols; ++j) {
    if (row[j] > a && row[j] < b) {
      if (out_cols != nullptr) {
        out_pairs[n] = p;
        out_cols[n] = j;
      }
      ++n;
    }
  }
  return n;
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) float min_at_least_avx2(const float* row, int64_t cols, float f) {
  const __m256 inf = _mm256_set1_ps(std::numeric_limits<float>::infinity()), fv = _mm256_set1_ps(f);
  __m256 best = inf;
  int64_t j = 0;
  for (; j + 8 <= cols; j += 8) {
    const __m256 v = _mm256_loadu_ps(row + j);
    best = _mm256_min_ps(best, _mm256_blendv_ps(inf, v, _mm256_cmp_ps(v, fv, _CMP_GE_OQ)));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, best);
  float out = min_at_least_scalar(row, j, cols, f);
  for (float x : lanes) out = x < out ? x : out;
  return out;
}

// (Every CPU with AVX2 has POPCNT and BMI1, which the bit counting below uses.)
__attribute__((target("avx2,popcnt,bmi"))) int64_t columns_between_avx2(const float* row, int64_t cols, float a,
                                                                       float b, int64_t p, int64_t* out_pairs,
                                                                       int64_t* out_cols) {
  const __m256 av = _mm256_set1_ps(a), bv = _mm256_set1_ps(b);
  int64_t n = 0, j = 0;
  for (; j + 8 <= cols; j += 8) {
    const __m256 v = _mm256_loadu_ps(row + j);
    unsigned mask = static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_and_ps(_mm256_cmp_ps(v, av, _CMP_GT_OQ), _mm256_cmp_ps(v, bv, _CMP_LT_OQ))));
    if (out_cols == nullptr) {
      n += __builtin_popcount(mask);
      continue;
    }
    for (; mask != 0; mask &= mask - 1) {
      out_pairs[n] = p;
      out_cols[n++] = j + __builtin_ctz(mask);
    }
  }
  const bool write = out_cols != nullptr;
  return n + columns_between_scalar(row, j, cols, a, b, p, write ? out_pairs + n : nullptr,
                                    write ? out_cols + n : nullptr);
}
#endif

float min_at_least(const float* row, int64_t cols, float f) {
#if defined(__x86_64__)
  if (screen_has_avx2()) return min_at_least_avx2(row, cols, f);
#endif
  return min_at_least_scalar(row, 0, cols, f);
}

int64_t columns_between(const float* row, int64_t cols, float a, float b, int64_t p, int64_t* out_pairs,
                        int64_t* out_cols) {
#if defined(__x86_64__)
  if (screen_has_avx2()) return columns_between_avx2(row, cols, a, b, p, out_pairs, out_cols);
#endif
  return columns_between_scalar(row, 0, cols, a, b, p, out_pairs, out_cols);
}

void check_pair_keys(const float* t, int64_t rows, int64_t cols, int64_t stride, const int64_t* pair_rows,
                     int64_t pairs) {
  HN_CHECK_PARAM(rows >= 0 && cols >= 0 && pairs >= 0, "key block sizes must be >= 0");
  HN_CHECK_PARAM(rows <= 1 || stride >= cols, "the key block's row stride must be >= its columns");
  HN_CHECK_PARAM(pairs == 0 || (pair_rows != nullptr && (cols == 0 || t != nullptr)), "key inputs are null");
  for (int64_t p = 0; p < pairs; ++p)
    HN_CHECK_PARAM(pair_rows[p] >= 0 && pair_rows[p] < rows,
                   "pair " + std::to_string(p) + " names key row " + std::to_string(pair_rows[p]) + " outside " +
                       std::to_string(rows) + " rows");
}

}  // namespace

void pair_kth_key_cpu(const float* t, int64_t rows, int64_t cols, int64_t stride, const int64_t* pair_rows,
                      const float* floor, int64_t pairs, int64_t k, float* out, int threads) {
  check_pair_keys(t, rows, cols, stride, pair_rows, pairs);
  HN_CHECK_PARAM(k >= 1 && k <= cols, "k must lie in [1, cols], got " + std::to_string(k));
  HN_CHECK_PARAM(pairs == 0 || (floor != nullptr && out != nullptr), "key outputs are null");
  parallel_rows(pairs, threads, [&](int64_t p0, int64_t p1) {
    std::priority_queue<float> heap;  // the k smallest so far, largest on top
    for (int64_t p = p0; p < p1; ++p) {
      const float* row = t + pair_rows[p] * stride;
      const float f = floor[p];
      float best = std::numeric_limits<float>::infinity();
      if (k == 1) {
        best = min_at_least(row, cols, f);
      } else {
        heap = {};
        for (int64_t j = 0; j < cols; ++j) {
          const float v = row[j];
          if (!(v >= f)) continue;  // below the floor, or NaN
          if (static_cast<int64_t>(heap.size()) < k) {
            heap.push(v);
          } else if (v < heap.top()) {
            heap.pop();
            heap.push(v);
          }
        }
        if (static_cast<int64_t>(heap.size()) == k) best = heap.top();
      }
      out[p] = best;
    }
  });
}

int64_t pair_key_columns_cpu(const float* t, int64_t rows, int64_t cols, int64_t stride, const int64_t* pair_rows,
                             const float* lo, const float* hi, int64_t pairs, int64_t capacity, int64_t* out_pairs,
                             int64_t* out_cols, int threads) {
  check_pair_keys(t, rows, cols, stride, pair_rows, pairs);
  HN_CHECK_PARAM(capacity >= 0, "capacity must be >= 0");
  HN_CHECK_PARAM(pairs == 0 || (lo != nullptr && hi != nullptr), "key bounds are null");
  HN_CHECK_PARAM(capacity == 0 || (out_pairs != nullptr && out_cols != nullptr), "column outputs are null");
  std::vector<int64_t> start(static_cast<size_t>(pairs) + 1, 0);
  parallel_rows(pairs, threads, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      start[p + 1] = columns_between(t + pair_rows[p] * stride, cols, lo[p], hi[p], p, nullptr, nullptr);
    }
  });
  for (int64_t p = 0; p < pairs; ++p) start[p + 1] += start[p];
  const int64_t total = start[pairs];
  if (total > capacity) return total;
  parallel_rows(pairs, threads, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      columns_between(t + pair_rows[p] * stride, cols, lo[p], hi[p], p, out_pairs + start[p], out_cols + start[p]);
    }
  });
  return total;
}

}  // namespace hnsample
