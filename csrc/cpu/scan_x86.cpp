// x86-64 row scans of the CPU top-k selection: 64 (AVX-512) or 32 (AVX2) contiguous float32 scores per
// step are compared against the row's interval [lo, hi] at once, and only the survivors (a bit mask)
// go through RowScan::handle. Each function carries its own target attribute, so this file builds
// with the baseline flags and the loader-time check (detect_isa) decides what runs. Other
// architectures compile this file to nothing and use the portable scan of topk_select.cpp.
#if defined(__x86_64__)

#include <immintrin.h>

#include <cstdlib>
#include <string>

#include "row_scan.h"

namespace hnsample {
namespace cpu {

// Scores are read with unaligned vector loads and load_at (memcpy) for single elements, so `row` may
// sit at any byte address; the float pointers below only ever reach the unaligned-load intrinsics.
namespace {
inline const float* floats_at(const void* row, int64_t c) {
  return reinterpret_cast<const float*>(static_cast<const unsigned char*>(row) + 4 * c);
}
}  // namespace

__attribute__((target("avx512f"))) void scan_row_f32_avx512(RowScan<float>& rs, const void* row, int64_t cols) {
  int64_t c = 0;
  const __m512 vhi = _mm512_set1_ps(rs.hi);
  for (; c + 64 <= cols; c += 64) {
    const __m512 vlo = _mm512_set1_ps(rs.lo);
    const __m512 v0 = _mm512_loadu_ps(floats_at(row, c)), v1 = _mm512_loadu_ps(floats_at(row, c + 16));
    const __m512 v2 = _mm512_loadu_ps(floats_at(row, c + 32)), v3 = _mm512_loadu_ps(floats_at(row, c + 48));
    const uint64_t m0 = _mm512_cmp_ps_mask(v0, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v0, vhi, _CMP_LE_OQ);
    const uint64_t m1 = _mm512_cmp_ps_mask(v1, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v1, vhi, _CMP_LE_OQ);
    const uint64_t m2 = _mm512_cmp_ps_mask(v2, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v2, vhi, _CMP_LE_OQ);
    const uint64_t m3 = _mm512_cmp_ps_mask(v3, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v3, vhi, _CMP_LE_OQ);
    handle_mask(rs, row, c, m0 | (m1 << 16) | (m2 << 32) | (m3 << 48));
  }
  scan_columns<float>(rs, row, c, cols, 1);
}

__attribute__((target("avx2"))) void scan_row_f32_avx2(RowScan<float>& rs, const void* row, int64_t cols) {
  int64_t c = 0;
  const __m256 vhi = _mm256_set1_ps(rs.hi);
  for (; c + 32 <= cols; c += 32) {
    const __m256 vlo = _mm256_set1_ps(rs.lo);
    uint64_t m = 0;
    for (int q = 0; q < 4; ++q) {
      const __m256 v = _mm256_loadu_ps(floats_at(row, c + 8 * q));
      const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(v, vlo, _CMP_GE_OQ), _mm256_cmp_ps(v, vhi, _CMP_LE_OQ));
      m |= static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_ps(ok))) << (8 * q);
    }
    handle_mask(rs, row, c, m);
  }
  scan_columns<float>(rs, row, c, cols, 1);
}

Isa detect_isa() {
  static const Isa isa = [] {
    __builtin_cpu_init();
    const char* cap = std::getenv("HNSAMPLE_CPU_ISA");
    const std::string want = cap != nullptr ? cap : "";
    if (want != "scalar" && want != "avx2" && __builtin_cpu_supports("avx512f")) return Isa::Avx512;
    if (want != "scalar" && __builtin_cpu_supports("avx2")) return Isa::Avx2;
    return Isa::Scalar;
  }();
  return isa;
}

}  // namespace cpu
}  // namespace hnsample

#endif  // defined(__x86_64__)
