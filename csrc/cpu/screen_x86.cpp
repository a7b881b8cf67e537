// x86 SIMD parts of the certified screening (csrc/cpu/topk_screen.cpp): the bulk compare that keeps
// the columns of a float32 row whose value lies in [low, high] or is not finite (NaN, +-inf: those are
// always rescored), and the canonical dot products (csrc/canonical.h) of float32 rows. Picked at run
// time (cpu::detect_isa); elsewhere, without AVX2 or capped to scalar, the portable code of topk_screen.cpp runs.
#if defined(__x86_64__)
#include <immintrin.h>

#include <cstdint>
#include <cstring>

#include "row_scan.h"

namespace hnsample {

// The screening's vector code needs AVX2; it follows the scans' choice (cpu::detect_isa, which
// HNSAMPLE_CPU_ISA=scalar caps to the portable code for tests).
bool screen_has_avx2() {
  static const bool avx2 = cpu::detect_isa() != cpu::Isa::Scalar;
  return avx2;
}

// Appends to `out` the columns c in [0, cols) of a contiguous float32 row to keep; returns how many.
__attribute__((target("avx2"))) int64_t screen_keep_f32_avx2(const float* row, int64_t cols, float low,
                                                              float high, int32_t* out) {
  const __m256 vlo = _mm256_set1_ps(low), vhi = _mm256_set1_ps(high);
  const __m256i exp_mask = _mm256_set1_epi32(0x7f800000);
  int64_t n = 0, c = 0;
  for (; c + 8 <= cols; c += 8) {
    const __m256 v = _mm256_loadu_ps(row + c);  // unaligned loads: any float32 row works
    const __m256 inside = _mm256_and_ps(_mm256_cmp_ps(v, vlo, _CMP_GE_OQ), _mm256_cmp_ps(v, vhi, _CMP_LE_OQ));
    const __m256i special = _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_castps_si256(v), exp_mask), exp_mask);
    unsigned m = static_cast<unsigned>(_mm256_movemask_ps(_mm256_or_ps(inside, _mm256_castsi256_ps(special))));
    while (m) {
      out[n++] = static_cast<int32_t>(c + __builtin_ctz(m));
      m &= m - 1;
    }
  }
  for (; c < cols; ++c) {
    float a;
    std::memcpy(&a, row + c, sizeof(a));
    uint32_t bits;
    std::memcpy(&bits, &a, sizeof(bits));
    if ((a >= low && a <= high) || (bits & 0x7f800000u) == 0x7f800000u) out[n++] = static_cast<int32_t>(c);
  }
  return n;
}

namespace {

// One step of eight elements: the query's float64 lanes times a candidate's (exact products), added
// to its two accumulators (lanes 0-3 and 4-7). An add after an exact multiply is what a fused
// multiply-add computes too, so the choice cannot change a bit.
__attribute__((target("avx2"))) inline void lanes_step(__m256d qlo, __m256d qhi, const float* c, __m256d& lo,
                                                       __m256d& hi) {
  const __m256 v = _mm256_loadu_ps(c);
  lo = _mm256_add_pd(lo, _mm256_mul_pd(qlo, _mm256_cvtps_pd(_mm256_castps256_ps128(v))));
  hi = _mm256_add_pd(hi, _mm256_mul_pd(qhi, _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1))));
}

// ((P0 + P4) + (P2 + P6)) + ((P1 + P5) + (P3 + P7)) from the lanes (P0..P3) and (P4..P7).
__attribute__((target("avx2"))) inline double lanes_fold(__m256d lo, __m256d hi) {
  const __m256d x = _mm256_add_pd(lo, hi);                                                // (04, 15, 26, 37)
  const __m128d u = _mm_add_pd(_mm256_castpd256_pd128(x), _mm256_extractf128_pd(x, 1));  // (04 + 26, 15 + 37)
  return _mm_cvtsd_f64(_mm_add_sd(u, _mm_unpackhi_pd(u, u)));
}

// The last d % 8 elements, zero-padded: the missing lanes add +0.0, and a lane is never -0.0 (it starts
// at +0.0 and a round-to-nearest sum is -0.0 only when both terms are), so they change nothing.
inline void tail(const float* x, int64_t n, float* padded) {
  std::memset(padded, 0, 8 * sizeof(float));
  std::memcpy(padded, x, static_cast<size_t>(n) * sizeof(float));
}

}  // namespace

// The canonical D of two contiguous float32 rows; bit-identical to canonical_dot.
__attribute__((target("avx2"))) double canonical_dot_f32_avx2(const float* q, const float* c, int64_t d) {
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd();
  int64_t t = 0;
  float qt[8], ct[8];
  for (; t + 8 <= d; t += 8) {
    const __m256 qv = _mm256_loadu_ps(q + t);
    lanes_step(_mm256_cvtps_pd(_mm256_castps256_ps128(qv)), _mm256_cvtps_pd(_mm256_extractf128_ps(qv, 1)), c + t,
               a0, a1);
  }
  if (t < d) {
    tail(q + t, d - t, qt);
    tail(c + t, d - t, ct);
    const __m256 qv = _mm256_loadu_ps(qt);
    lanes_step(_mm256_cvtps_pd(_mm256_castps256_ps128(qv)), _mm256_cvtps_pd(_mm256_extractf128_ps(qv, 1)), ct,
               a0, a1);
  }
  return lanes_fold(a0, a1);
}

// canonical_dot_f32_avx2 of one query row against two candidate rows at once: the two sums are
// independent chains, so the adds of one fill the other's latency (and the query is loaded once).
__attribute__((target("avx2"))) void canonical_dot2_f32_avx2(const float* q, const float* c1, const float* c2,
                                                             int64_t d, double* out1, double* out2) {
  __m256d a0 = _mm256_setzero_pd(), a1 = _mm256_setzero_pd(), b0 = _mm256_setzero_pd(), b1 = _mm256_setzero_pd();
  int64_t t = 0;
  for (; t + 8 <= d; t += 8) {
    const __m256 qv = _mm256_loadu_ps(q + t);
    const __m256d qlo = _mm256_cvtps_pd(_mm256_castps256_ps128(qv)), qhi = _mm256_cvtps_pd(_mm256_extractf128_ps(qv, 1));
    lanes_step(qlo, qhi, c1 + t, a0, a1);
    lanes_step(qlo, qhi, c2 + t, b0, b1);
  }
  if (t < d) {
    float qt[8], t1[8], t2[8];
    tail(q + t, d - t, qt);
    tail(c1 + t, d - t, t1);
    tail(c2 + t, d - t, t2);
    const __m256 qv = _mm256_loadu_ps(qt);
    const __m256d qlo = _mm256_cvtps_pd(_mm256_castps256_ps128(qv)), qhi = _mm256_cvtps_pd(_mm256_extractf128_ps(qv, 1));
    lanes_step(qlo, qhi, t1, a0, a1);
    lanes_step(qlo, qhi, t2, b0, b1);
  }
  *out1 = lanes_fold(a0, a1);
  *out2 = lanes_fold(b0, b1);
}

}  // namespace hnsample
#endif
