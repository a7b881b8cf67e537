// CPU fused selection: one pass over a block of scores (from torch.matmul) merges it into each row's
// running top-k. Rows are split over std::threads; each row is scanned with the widest SIMD compare
// the CPU offers (picked at run time), which tests the whole block against the row's interval
// [max(threshold, min_score), upper] so that almost every score costs one compare. Only survivors pay
// for the id/label checks and the heap update. Touches the block once and the [B, capacity] state.
#include <immintrin.h>

#include <algorithm>
#include <cstdlib>
#include <string>
#include <cmath>
#include <limits>

#include "../params_check.h"
#include "../topk_select.h"

namespace hnsample {
namespace {

// Directed conversions: for a float s, (s >= lo) == (s >= round_up(lo)) and (s <= hi) ==
// (s <= round_down(hi)), so the bulk compare in float is exactly the float64 rule.
template <typename C>
C round_up(double v) {
  if constexpr (std::is_same_v<C, double>) {
    return v;
  } else {
    float f = static_cast<float>(v);
    if (static_cast<double>(f) < v) f = std::nextafter(f, std::numeric_limits<float>::infinity());
    return f;
  }
}
template <typename C>
C round_down(double v) {
  if constexpr (std::is_same_v<C, double>) {
    return v;
  } else {
    float f = static_cast<float>(v);
    if (static_cast<double>(f) > v) f = std::nextafter(f, -std::numeric_limits<float>::infinity());
    return f;
  }
}

template <typename C>
struct RowScan {
  const TopkParams& p;
  RowState st;
  int64_t row;
  int64_t col_offset;
  double hi_d;
  C lo, hi;

  RowScan(const TopkParams& params, int64_t r, int64_t col_off)
      : p(params), st(row_state(params, r)), row(r), col_offset(col_off) {
    hi_d = row_upper(p, row);
    hi = round_down<C>(hi_d);
    refresh();
  }
  void refresh() { lo = round_up<C>(std::max(row_entry_threshold(p, st), p.min_score)); }
  // Full test and offer for a score that passed the bulk compare (with a possibly older lo).
  void handle(C s, int64_t c) {
    if (!(s >= lo && s <= hi)) return;
    const int64_t j = col_offset + c;
    if (id_banned(p, row, j) || !label_allowed(p, row, j)) return;
    if (p.mode == SelectMode::Stream) {
      // The GPU kernel filters against a stale StreamGate snapshot; here it is always fresh, so the
      // CPU results (tested against the reference) prove the gate never drops a candidate that matters.
      const double key = row_sample_key(p, row, static_cast<double>(s), j);
      if (!stream_gate_admits(stream_gate(p, st), static_cast<double>(s), j, key)) return;
    }
    offer_candidate(p, st, row, static_cast<double>(s), j);
    refresh();
  }
};

template <typename T>
void scan_row_generic(RowScan<std::conditional_t<std::is_same_v<T, double>, double, float>>& rs,
                      const T* data, int64_t cols, int64_t col_stride) {
  for (int64_t c = 0; c < cols; ++c) {
    const auto s = to_float(data[c * col_stride]);
    if (s >= rs.lo && s <= rs.hi) rs.handle(s, c);
  }
}

__attribute__((target("avx512f"))) void scan_row_f32_avx512(RowScan<float>& rs, const float* data,
                                                             int64_t cols) {
  int64_t c = 0;
  const __m512 vhi = _mm512_set1_ps(rs.hi);
  for (; c + 64 <= cols; c += 64) {
    const __m512 vlo = _mm512_set1_ps(rs.lo);
    __m512 v0 = _mm512_loadu_ps(data + c), v1 = _mm512_loadu_ps(data + c + 16);
    __m512 v2 = _mm512_loadu_ps(data + c + 32), v3 = _mm512_loadu_ps(data + c + 48);
    const uint64_t m0 = _mm512_cmp_ps_mask(v0, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v0, vhi, _CMP_LE_OQ);
    const uint64_t m1 = _mm512_cmp_ps_mask(v1, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v1, vhi, _CMP_LE_OQ);
    const uint64_t m2 = _mm512_cmp_ps_mask(v2, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v2, vhi, _CMP_LE_OQ);
    const uint64_t m3 = _mm512_cmp_ps_mask(v3, vlo, _CMP_GE_OQ) & _mm512_cmp_ps_mask(v3, vhi, _CMP_LE_OQ);
    uint64_t m = m0 | (m1 << 16) | (m2 << 32) | (m3 << 48);
    while (m) {
      const int t = __builtin_ctzll(m);
      m &= m - 1;
      rs.handle(data[c + t], c + t);
    }
  }
  for (; c < cols; ++c)
    if (data[c] >= rs.lo && data[c] <= rs.hi) rs.handle(data[c], c);
}

__attribute__((target("avx2"))) void scan_row_f32_avx2(RowScan<float>& rs, const float* data, int64_t cols) {
  int64_t c = 0;
  const __m256 vhi = _mm256_set1_ps(rs.hi);
  for (; c + 32 <= cols; c += 32) {
    const __m256 vlo = _mm256_set1_ps(rs.lo);
    uint64_t m = 0;
    for (int q = 0; q < 4; ++q) {
      const __m256 v = _mm256_loadu_ps(data + c + 8 * q);
      const __m256 ok = _mm256_and_ps(_mm256_cmp_ps(v, vlo, _CMP_GE_OQ), _mm256_cmp_ps(v, vhi, _CMP_LE_OQ));
      m |= static_cast<uint64_t>(static_cast<uint32_t>(_mm256_movemask_ps(ok))) << (8 * q);
    }
    while (m) {
      const int t = __builtin_ctzll(m);
      m &= m - 1;
      rs.handle(data[c + t], c + t);
    }
  }
  for (; c < cols; ++c)
    if (data[c] >= rs.lo && data[c] <= rs.hi) rs.handle(data[c], c);
}

enum class Isa { Scalar, Avx2, Avx512 };

Isa detect_isa() {
  // HNSAMPLE_CPU_ISA=scalar|avx2 caps the choice (to test the narrower paths on a wider CPU).
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

template <typename T>
void select_block(const TopkParams& p, const ScoreBlock& b, int threads) {
  using C = std::conditional_t<std::is_same_v<T, double>, double, float>;
  const T* base = static_cast<const T*>(b.data);
  const Isa isa = detect_isa();
  parallel_rows(b.rows, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      RowScan<C> rs(p, b.row_offset + r, b.col_offset);
      const T* data = base + r * b.row_stride;
      if constexpr (std::is_same_v<T, float>) {
        if (b.col_stride == 1 && isa == Isa::Avx512) {
          scan_row_f32_avx512(rs, data, b.cols);
          continue;
        }
        if (b.col_stride == 1 && isa == Isa::Avx2) {
          scan_row_f32_avx2(rs, data, b.cols);
          continue;
        }
      }
      scan_row_generic<T>(rs, data, b.cols, b.col_stride);
    }
  });
}

}  // namespace

void topk_select_block_cpu(const TopkParams& p, const ScoreBlock& block, int threads) {
  check_params(p);
  check_block(p, block);
  if (block.rows == 0 || block.cols == 0 || p.k == 0) return;
  HN_DISPATCH_FLOAT(block.dtype, T, [&] { select_block<T>(p, block, threads); });
}

void topk_finalize_cpu(const TopkParams& p, double* out_scores, int64_t* out_indices, int threads) {
  check_params(p);
  HN_CHECK_PARAM(p.num_rows == 0 || p.k == 0 || (out_scores != nullptr && out_indices != nullptr),
                 "finalize outputs are null");
  parallel_rows(p.num_rows, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) finalize_row(p, r, out_scores + r * p.k, out_indices + r * p.k);
  });
}

void topk_merge_cpu(const TopkParams& p, const TopkParams& other, int threads) {
  check_params(p);
  check_params(other);
  check_same_layout(p, other);
  parallel_rows(p.num_rows, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) merge_row(p, other, r);
  });
}

void topk_filter_counts_cpu(const TopkParams& p, const ScoreBlock& block, int64_t* counts, int threads) {
  check_params(p);
  check_block(p, block);
  HN_CHECK_PARAM(block.rows == 0 || counts != nullptr, "filter counts are null");
  HN_DISPATCH_FLOAT(block.dtype, T, [&] {
    const T* base = static_cast<const T*>(block.data);
    parallel_rows(block.rows, threads, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t row = block.row_offset + r;
        count_filters_row(p, base + r * block.row_stride, block.cols, block.col_stride, row, block.col_offset,
                          counts + row * kScoreFilters);
      }
    });
  });
}

void topk_row_bounds_cpu(const TopkParams& p, float* lo, float* hi, int threads) {
  check_params(p);
  HN_CHECK_PARAM(p.num_rows == 0 || (lo != nullptr && hi != nullptr), "row bound outputs are null");
  parallel_rows(p.num_rows, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) row_float_bounds(p, r, lo[r], hi[r]);
  });
}

void topk_offer_candidates_cpu(const TopkParams& p, const float* scores, const int32_t* cols,
                               const int32_t* counts, int64_t cap, int64_t col_offset, int threads) {
  check_params(p);
  check_candidate_lists(p, scores, cols, counts, cap);
  parallel_rows(p.num_rows, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = counts[r] < cap ? counts[r] : cap;
      offer_candidate_list(p, r, scores + r * cap, cols + r * cap, n, col_offset);
    }
  });
}

void topk_rescore_candidates_cpu(const FusedBlock& f, int threads) {
  check_fused(f);
  HN_CHECK_PARAM(static_cast<DType>(f.dtype) == DType::Float32, "rescore: inputs must be float32");
  const auto* q = static_cast<const float*>(f.queries);
  const auto* c = static_cast<const float*>(f.candidates);
  parallel_rows(f.rows, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t n = f.cand_count[r] < f.cand_cap ? f.cand_count[r] : f.cand_cap;
      const float rs = f.row_scale ? f.row_scale[r] : 1.0f;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t j = f.cand_col[r * f.cand_cap + t];
        HN_CHECK(j >= 0 && j < f.cols, "rescore: candidate column out of range");
        const float cs = f.col_scale ? f.col_scale[j] : 1.0f;
        f.cand_score[r * f.cand_cap + t] = rescore_dot(q + r * f.q_stride, c + j * f.c_stride, f.dim, rs, cs);
      }
    }
  });
}

const char* cpu_isa_name() {
  switch (detect_isa()) {
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

}  // namespace hnsample
