// CPU selection from per-row candidate lists (topk_from_candidates): each row's C (id, score) pairs are
// tested against the row's score interval and masks and offered to its running state, with the heap
// code shared with every other selection (csrc/topk_select.h). Rows are split over std::threads; a row
// touches its C scores and ids once and its [capacity] state.
#include "../params_check.h"
#include "../topk_select.h"

namespace hnsample {

void topk_candidates_select_cpu(const TopkParams& p, const CandidateBlock& block, int threads) {
  check_params(p);
  check_candidate_block(p, block, /*on_device=*/false);
  if (block.rows == 0 || block.cols == 0 || p.k == 0) return;
  HN_DISPATCH_FLOAT(block.dtype, T, [&] {
    parallel_rows(block.rows, threads, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) offer_listed_row<T>(p, block, r);
    });
  });
}

void topk_candidates_filter_counts_cpu(const TopkParams& p, const CandidateBlock& block, int64_t* counts,
                                       int threads) {
  check_params(p);
  check_candidate_block(p, block, /*on_device=*/false);
  if (block.rows == 0 || block.cols == 0) return;
  HN_CHECK_PARAM(counts != nullptr, "filter counts are null");
  HN_DISPATCH_FLOAT(block.dtype, T, [&] {
    parallel_rows(block.rows, threads, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r)
        count_listed_filters_row<T>(p, block, r, counts + (block.row_offset + r) * kCandidateFilters);
    });
  });
}

}  // namespace hnsample
