// CUDA selection over a block of scores (the two-pass path's second pass), finalize and merge.
// Decomposition: one thread per query row walks the row's columns in order and runs the same
// __host__ __device__ filters and heap code as the CPU (topk_select.h), so results are identical.
// Memory: reads the [rows, cols] score block once, updates the [B, capacity] state in place.
#include <cuda_runtime.h>

#include "../topk_select.h"
#include "cuda_common.cuh"

namespace hnsample {
namespace {

constexpr int kThreads = 128;

template <typename T>
__global__ void select_block_kernel(TopkParams p, ScoreBlock b) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= b.rows) return;
  const int64_t row = b.row_offset + r;
  const RowState st = row_state(p, row);
  const T* data = static_cast<const T*>(b.data) + r * b.row_stride;
  const double hi = row_upper(p, row);
  double lo = fmax(row_entry_threshold(p, st), p.min_score);
  for (int64_t c = 0; c < b.cols; ++c) {
    const double s = static_cast<double>(to_float(data[c * b.col_stride]));
    if (!(s >= lo && s <= hi)) continue;
    const int64_t j = b.col_offset + c;
    if (id_banned(p, row, j) || !label_allowed(p, row, j)) continue;
    offer_candidate(p, st, row, s, j);
    lo = fmax(row_entry_threshold(p, st), p.min_score);
  }
}

__global__ void finalize_kernel(TopkParams p, double* out_scores, int64_t* out_indices) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= p.num_rows) return;
  finalize_row(p, row, out_scores + row * p.k, out_indices + row * p.k);
}

__global__ void merge_kernel(TopkParams p, TopkParams other) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= p.num_rows) return;
  merge_row(p, other, row);
}

}  // namespace

void topk_select_block_cuda(const TopkParams& p, const ScoreBlock& block, void* stream) {
  if (block.rows == 0 || block.cols == 0 || p.k == 0) return;
  HN_CHECK(block.row_offset >= 0 && block.row_offset + block.rows <= p.num_rows, "block rows out of range");
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(ceil_div(block.rows, kThreads));
  HN_DISPATCH_FLOAT(block.dtype, T, [&] { select_block_kernel<T><<<grid, kThreads, 0, s>>>(p, block); });
  HN_CUDA_CHECK(cudaGetLastError());
}

void topk_finalize_cuda(const TopkParams& p, double* out_scores, int64_t* out_indices, void* stream) {
  if (p.num_rows == 0 || p.k == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  finalize_kernel<<<static_cast<unsigned>(ceil_div(p.num_rows, kThreads)), kThreads, 0, s>>>(p, out_scores,
                                                                                             out_indices);
  HN_CUDA_CHECK(cudaGetLastError());
}

void topk_merge_cuda(const TopkParams& p, const TopkParams& other, void* stream) {
  if (p.num_rows == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  merge_kernel<<<static_cast<unsigned>(ceil_div(p.num_rows, kThreads)), kThreads, 0, s>>>(p, other);
  HN_CUDA_CHECK(cudaGetLastError());
}

bool cuda_device_usable() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();  // clear the sticky "no driver" error
    return false;
  }
  return n > 0;
}

}  // namespace hnsample
