// CUDA InfoNCE block passes with the CPU semantics (same __host__ __device__ rules from info_nce.h).
// Forward: one warp per query row strides over the block's columns, keeps per-lane online
// log-sum-exp statistics and merges them with shuffles; for the symmetric loss a second kernel runs
// one thread per column over the block's rows (coalesced across the warp). Backward: one warp per row
// rewrites the recomputed scores as dL/ds in place and reduces sum_j c_ij u_ij for the temperature.
// Memory: reads/writes the [rows, cols] block once per kernel, [B, 5] / [M, 2] float64 statistics.
#include <cuda_runtime.h>

#include "../info_nce.h"
#include "../params_check.h"
#include "cuda_common.cuh"

namespace hnsample {
namespace {

constexpr int kThreads = 128;
constexpr int kWarp = 32;
constexpr int kRowsPerBlock = kThreads / kWarp;

template <typename T>
__device__ __forceinline__ double load(const T* base, int64_t r, int64_t c, int64_t rs, int64_t cs) {
  return static_cast<double>(to_float(base[r * rs + c * cs]));
}

template <typename T>
__device__ __forceinline__ double guide_at(const PairBlock& b, int64_t r, int64_t c) {
  if (b.guide == nullptr) return 0.0;
  return load(static_cast<const T*>(b.guide), r, c, b.guide_row_stride, b.guide_col_stride);
}

template <typename T>
__device__ __forceinline__ void store(T* cell, double g) {
  *cell = static_cast<T>(g);
}

__device__ __forceinline__ void warp_lse_merge(double& m, double& z) {
  for (int off = kWarp / 2; off > 0; off >>= 1) {
    const double m2 = __shfl_down_sync(0xffffffffu, m, off);
    const double z2 = __shfl_down_sync(0xffffffffu, z, off);
    lse_merge(m, z, m2, z2);
  }
}

template <typename T>
__global__ void forward_rows_kernel(InfoNceParams p, PairBlock b) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / kWarp;
  if (r >= b.rows) return;  // whole warps exit together: rows are warp-uniform
  const int64_t row = b.row_offset + r;
  const T* data = static_cast<const T*>(b.data);
  const double b1 = 1.0 + p.hcl_beta;
  double m1 = -INFINITY, z1 = 0.0, m0 = -INFINITY, z0 = 0.0, count = 0.0;
  for (int64_t c = lane; c < b.cols; c += kWarp) {
    const double s = load(data, r, c, b.row_stride, b.col_stride);
    const int k = pair_kind(p, row, b.col_offset + c, s, guide_at<T>(b, r, c));
    if (k != kNegative) continue;
    const double l = pair_logit(p, k, s).l;
    count += 1.0;
    lse_add(m1, z1, b1 * l, p.float_exp);
    if (p.hcl_beta != 0.0) lse_add(m0, z0, p.hcl_beta * l, p.float_exp);
  }
  warp_lse_merge(m1, z1);
  warp_lse_merge(m0, z0);
  for (int off = kWarp / 2; off > 0; off >>= 1) count += __shfl_down_sync(0xffffffffu, count, off);
  if (lane == 0) {
    double* st = p.row_stats + 5 * row;
    lse_merge(st[0], st[1], m1, z1);
    lse_merge(st[2], st[3], m0, z0);
    st[4] += count;
  }
}

template <typename T>
__global__ void forward_cols_kernel(InfoNceParams p, PairBlock b) {
  const int64_t c = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (c >= b.cols) return;
  const int64_t col = b.col_offset + c;
  const T* data = static_cast<const T*>(b.data);
  double m = -INFINITY, z = 0.0;
  for (int64_t r = 0; r < b.rows; ++r) {
    const double s = load(data, r, c, b.row_stride, b.col_stride);
    const int k = pair_kind(p, b.row_offset + r, col, s, guide_at<T>(b, r, c));
    if (k != kMasked) lse_add(m, z, pair_logit(p, k, s).l, p.float_exp);
  }
  double* cs = p.col_stats + 2 * col;
  lse_merge(cs[0], cs[1], m, z);
}

template <typename T>
__global__ void backward_kernel(InfoNceParams p, PairBlock b) {
  const int lane = threadIdx.x % kWarp;
  const int64_t r = blockIdx.x * static_cast<int64_t>(kRowsPerBlock) + threadIdx.x / kWarp;
  if (r >= b.rows) return;
  const int64_t row = b.row_offset + r;
  T* data = static_cast<T*>(b.data);
  double acc = 0.0;
  for (int64_t c = lane; c < b.cols; c += kWarp) {
    T* cell = data + r * b.row_stride + c * b.col_stride;
    const double s = static_cast<double>(to_float(*cell));
    const double g = pair_backward(p, row, b.col_offset + c, s, guide_at<T>(b, r, c), acc);
    store(cell, g);
  }
  for (int off = kWarp / 2; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
  if (lane == 0) p.tau_acc[row] += acc;
}

}  // namespace

void info_nce_forward_block_cuda(const InfoNceParams& p, const PairBlock& block, void* stream) {
  check_params(p);
  check_pair_block(p, block);
  if (block.rows == 0 || block.cols == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned row_grid = static_cast<unsigned>(ceil_div(block.rows, kRowsPerBlock));
  const unsigned col_grid = static_cast<unsigned>(ceil_div(block.cols, kThreads));
  if (static_cast<DType>(block.dtype) == DType::Float32) {
    HN_LAUNCH(row_grid, kThreads, 0, s, forward_rows_kernel<float>)(p, block);
    if (p.symmetric) HN_LAUNCH(col_grid, kThreads, 0, s, forward_cols_kernel<float>)(p, block);
  } else {
    HN_LAUNCH(row_grid, kThreads, 0, s, forward_rows_kernel<double>)(p, block);
    if (p.symmetric) HN_LAUNCH(col_grid, kThreads, 0, s, forward_cols_kernel<double>)(p, block);
  }
  HN_CUDA_CHECK(cudaGetLastError());
}

void info_nce_backward_block_cuda(const InfoNceParams& p, const PairBlock& block, void* stream) {
  check_params(p);
  check_pair_block(p, block);
  if (block.rows == 0 || block.cols == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(ceil_div(block.rows, kRowsPerBlock));
  if (static_cast<DType>(block.dtype) == DType::Float32) {
    HN_LAUNCH(grid, kThreads, 0, s, backward_kernel<float>)(p, block);
  } else {
    HN_LAUNCH(grid, kThreads, 0, s, backward_kernel<double>)(p, block);
  }
  HN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hnsample
