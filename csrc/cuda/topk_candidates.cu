// CUDA selection from per-row candidate lists (topk_from_candidates). Decomposition: one thread per
// row, which walks the row's C (id, score) pairs and offers the eligible ones to its state with the
// heap code shared with the CPU (csrc/topk_select.h), so both backends build the same state. Lists are
// short (a reranker scores tens to a few thousand candidates per query), so a row per thread keeps the
// state updates sequential without any synchronisation. Memory: the [B, C] scores and ids once, the
// [B, capacity] state.
#include <cuda_runtime.h>

#include "../params_check.h"
#include "../topk_select.h"
#include "cuda_common.cuh"

namespace hnsample {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void candidates_select_kernel(TopkParams p, CandidateBlock b) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= b.rows) return;
  offer_listed_row<T>(p, b, r);
}

template <typename T>
__global__ void candidates_filter_counts_kernel(TopkParams p, CandidateBlock b, int64_t* counts) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= b.rows) return;
  count_listed_filters_row<T>(p, b, r, counts + (b.row_offset + r) * kCandidateFilters);
}

}  // namespace

void topk_candidates_select_cuda(const TopkParams& p, const CandidateBlock& block, void* stream) {
  check_params(p);
  check_candidate_block(p, block, /*on_device=*/true);
  if (block.rows == 0 || block.cols == 0 || p.k == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(ceil_div(block.rows, kThreads));
  HN_DISPATCH_FLOAT(block.dtype, T, [&] {
    HN_LAUNCH(grid, kThreads, 0, s, candidates_select_kernel<T>)(p, block);
    HN_CUDA_CHECK(cudaGetLastError());
  });
}

void topk_candidates_filter_counts_cuda(const TopkParams& p, const CandidateBlock& block, int64_t* counts,
                                        void* stream) {
  check_params(p);
  check_candidate_block(p, block, /*on_device=*/true);
  if (block.rows == 0 || block.cols == 0) return;
  HN_CHECK_PARAM(counts != nullptr, "filter counts are null");
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(ceil_div(block.rows, kThreads));
  HN_DISPATCH_FLOAT(block.dtype, T, [&] {
    HN_LAUNCH(grid, kThreads, 0, s, candidates_filter_counts_kernel<T>)(p, block, counts);
    HN_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace hnsample
