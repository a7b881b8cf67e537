// CPU fused selection: one pass over a block of scores (from torch.matmul) merges it into each row's
// running top-k. Rows are split over the worker pool; each row is scanned with the widest compare the
// CPU offers (picked at run time: the x86 SIMD scans of scan_x86.cpp, else row_scan.h's portable scan),
// which tests the whole block against the row's interval [max(threshold, min_score), upper] so that
// almost every score costs one compare. Only survivors pay for the id/label checks and the heap
// update. Touches the block once (read at any byte address) and the [B, capacity] state.
#include "../params_check.h"
#include "row_scan.h"

namespace hnsample {
namespace cpu {

#if !defined(__x86_64__)
// Only x86-64 has SIMD scans (scan_x86.cpp); elsewhere the portable scan is the whole story.
Isa detect_isa() { return Isa::Scalar; }
#endif

}  // namespace cpu

namespace {

using cpu::compare_t;
using cpu::Isa;
using cpu::RowScan;

template <typename T>
void select_block(const TopkParams& p, const ScoreBlock& b, int threads) {
  [[maybe_unused]] const Isa isa = cpu::detect_isa();
  parallel_rows(b.rows, threads, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      RowScan<compare_t<T>> rs(p, b.row_offset + r, b.col_offset);
      const void* row = static_cast<const unsigned char*>(b.data) + r * b.row_stride * int64_t{sizeof(T)};
#if defined(__x86_64__)
      if constexpr (std::is_same_v<T, float>) {
        if (b.col_stride == 1 && isa == Isa::Avx512) {
          cpu::scan_row_f32_avx512(rs, row, b.cols);
          continue;
        }
        if (b.col_stride == 1 && isa == Isa::Avx2) {
          cpu::scan_row_f32_avx2(rs, row, b.cols);
          continue;
        }
      }
#endif
      cpu::scan_columns<T>(rs, row, 0, b.cols, b.col_stride);
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
      offer_candidate_list(p, r, scores + r * cap, cols + r * cap, listed_entries(counts[r], cap), col_offset);
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
  switch (cpu::detect_isa()) {
    case Isa::Avx512:
      return "avx512";
    case Isa::Avx2:
      return "avx2";
    default:
      return "scalar";
  }
}

}  // namespace hnsample
