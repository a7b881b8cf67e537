// Fused path: one tensor-core kernel computes 128 x 128 tiles of s = q c^T and filters them in its
// epilogue (fused_common.cuh) against per-row float bounds taken from the selection state before the
// launch; survivors are appended to per-row candidate lists, so the score matrix never reaches global
// memory. CTA = 128 query rows x 128 candidates, 8 warps of 64 x 32, a two-stage cp.async pipeline.
// bf16/fp16: mma.sync m16n8k16 (exact products, fp32 accumulation), K in steps of 32. fp32: mma.sync
// m16n8k8 on tf32 (inputs rounded to nearest tf32 in registers), K in steps of 16, with the error
// slack of tf32_dot_error_factor in the filter and an exact rescoring of the survivors afterwards
// (rescore_kernel). blockIdx.x walks the query tiles, so consecutive CTAs share a candidate tile and
// the queries stay in L2: candidates are read from memory once per launch. Also here: the row-bounds
// and candidate-list kernels around it.
#include <cuda_runtime.h>

#include "../topk_fused_sm90.h"
#include "../topk_select.h"
#include "cuda_common.cuh"
#include "fused_common.cuh"

namespace hnsample {
namespace {

constexpr int kBM = 128, kBN = 128;
constexpr int kFusedThreads = 256;
constexpr int kRowThreads = 128;
constexpr int kRescoreWarps = 8;

// 16-bit operands: 32 halves of K per stage; 80-byte shared rows make ldmatrix conflict-free.
constexpr int kBK16 = 32, kLds16 = kBK16 + 8;
// fp32 operands: 16 floats of K per stage; 80-byte rows put the 32 lanes' fragment loads (rows
// g = lane / 4, columns t = lane % 4) on 32 distinct banks, (20 g + t) mod 32.
constexpr int kBK32 = 16, kLds32 = kBK32 + 4;

// The tensor-core instructions (ptx.cuh): ldmatrix_x4, mma_16816, mma_1688_tf32, to_tf32.
using namespace ptx;

using Acc = float[4][4][4];  // [m16 tile][n8 tile][fragment element] of one warp's 64 x 32

// The main loop for 16-bit operands: acc = q[m0:m0+128] c[n0:n0+128]^T restricted to this warp.
template <bool kBf16>
__device__ __forceinline__ void mainloop_16bit(const FusedBlock& f, int64_t m0, int64_t n0, Acc& acc) {
  __shared__ __align__(16) uint16_t sA[2][kBM][kLds16];
  __shared__ __align__(16) uint16_t sB[2][kBN][kLds16];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_m = warp / 4, warp_n = warp % 4;
  const uint16_t* q = static_cast<const uint16_t*>(f.queries);
  const uint16_t* c = static_cast<const uint16_t*>(f.candidates);

  // A stage is 128 rows x 32 halves per operand = 512 chunks of 16 bytes: two per thread each.
  auto load_stage = [&](int stage, int64_t k0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int chunk = tid + i * kFusedThreads;
      const int r = chunk / 4, kc = (chunk % 4) * 8;
      const bool qv = m0 + r < f.rows, cv = n0 + r < f.cols;
      cp_async_16(&sA[stage][r][kc], qv ? q + (m0 + r) * f.q_stride + k0 + kc : q, qv);
      cp_async_16(&sB[stage][r][kc], cv ? c + (n0 + r) * f.c_stride + k0 + kc : c, cv);
    }
  };

  const int ksteps = static_cast<int>(f.dim / kBK16);
  load_stage(0, 0);
  cp_async_commit();
  for (int ks = 0; ks < ksteps; ++ks) {
    const int stage = ks & 1;
    if (ks + 1 < ksteps) load_stage(stage ^ 1, static_cast<int64_t>(ks + 1) * kBK16);
    cp_async_commit();
    cp_async_wait<1>();  // this stage's group is complete; the next one may still be in flight
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK16; kk += 16) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
        ldmatrix_x4(a[mi], &sA[stage][warp_m * 64 + mi * 16 + (lane % 16)][kk + (lane / 16) * 8]);
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
        uint32_t t[4];
        ldmatrix_x4(t, &sB[stage][warp_n * 32 + nj * 16 + (lane % 8) + (lane / 16) * 8][kk + ((lane / 8) % 2) * 8]);
        b[2 * nj][0] = t[0];
        b[2 * nj][1] = t[1];
        b[2 * nj + 1][0] = t[2];
        b[2 * nj + 1][1] = t[3];
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_16816<kBf16>(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
    __syncthreads();  // the next iteration's loads overwrite the stage just read
  }
}

// The main loop for fp32 operands on tf32 tensor cores. Fragments of m16n8k8.tf32 (g = lane / 4,
// t = lane % 4): A a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4); B b0 (k t, n g),
// b1 (k t + 4, n g); B is stored n-major (sB[n][k]), so b0 = sB[g][t], b1 = sB[g][t + 4].
__device__ __forceinline__ void mainloop_tf32(const FusedBlock& f, int64_t m0, int64_t n0, Acc& acc) {
  __shared__ __align__(16) float sA[2][kBM][kLds32];
  __shared__ __align__(16) float sB[2][kBN][kLds32];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_m = warp / 4, warp_n = warp % 4;
  const int g = lane / 4, t = lane % 4;
  const float* q = static_cast<const float*>(f.queries);
  const float* c = static_cast<const float*>(f.candidates);

  // A stage is 128 rows x 16 floats per operand = 512 chunks of 16 bytes: two per thread each.
  auto load_stage = [&](int stage, int64_t k0) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int chunk = tid + i * kFusedThreads;
      const int r = chunk / 4, kc = (chunk % 4) * 4;
      const bool qv = m0 + r < f.rows, cv = n0 + r < f.cols;
      cp_async_16(&sA[stage][r][kc], qv ? q + (m0 + r) * f.q_stride + k0 + kc : q, qv);
      cp_async_16(&sB[stage][r][kc], cv ? c + (n0 + r) * f.c_stride + k0 + kc : c, cv);
    }
  };

  const int ksteps = static_cast<int>(f.dim / kBK32);
  load_stage(0, 0);
  cp_async_commit();
  for (int ks = 0; ks < ksteps; ++ks) {
    const int stage = ks & 1;
    if (ks + 1 < ksteps) load_stage(stage ^ 1, static_cast<int64_t>(ks + 1) * kBK32);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK32; kk += 8) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const float* r0 = &sA[stage][warp_m * 64 + mi * 16 + g][kk + t];
        const float* r8 = r0 + 8 * kLds32;
        a[mi][0] = to_tf32(r0[0]);
        a[mi][1] = to_tf32(r8[0]);
        a[mi][2] = to_tf32(r0[4]);
        a[mi][3] = to_tf32(r8[4]);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const float* rb = &sB[stage][warp_n * 32 + ni * 8 + g][kk + t];
        b[ni][0] = to_tf32(rb[0]);
        b[ni][1] = to_tf32(rb[4]);
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_1688_tf32(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
    __syncthreads();
  }
}

// kKind: 0 fp16, 1 bf16, 2 fp32 via tf32.
template <int kKind>
__global__ void __launch_bounds__(kFusedThreads, 2) fused_scores_kernel(FusedBlock f) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(HNSAMPLE_CUDA_EMU)
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / 4, warp_n = warp % 4;
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
  Acc acc;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;
  if constexpr (kKind == 2) {
    mainloop_tf32(f, m0, n0, acc);
  } else {
    mainloop_16bit<kKind == 1>(f, m0, n0, acc);
  }

  // Epilogue: accumulator e of tile (mi, ni) is row g + 8 (e / 2), column 2 t + e % 2 of that tile
  // (the same C fragment for both instruction shapes).
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m0 + warp_m * 64 + mi * 16 + g + 8 * h;
      if (row >= f.rows) continue;
      const FusedRow r = fused_row(f, row);
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int e = 0; e < 2; ++e)
          fused_keep(f, r, row, n0 + warp_n * 32 + ni * 8 + 2 * t + e, acc[mi][ni][2 * h + e]);
    }
  }
#endif
}

// One warp per row: every listed candidate's score becomes rescore_dot's value, with the double
// sum split over the lanes and reduced by shuffles (same products, another summation order).
__global__ void rescore_kernel(FusedBlock f) {
  const int lane = threadIdx.x % 32;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRescoreWarps + threadIdx.x / 32;
  if (row >= f.rows) return;
  const int64_t n = f.cand_count[row] < f.cand_cap ? f.cand_count[row] : f.cand_cap;
  const float* q = static_cast<const float*>(f.queries) + row * f.q_stride;
  const float rs = f.row_scale ? f.row_scale[row] : 1.0f;
  for (int64_t i = 0; i < n; ++i) {
    const int64_t j = f.cand_col[row * f.cand_cap + i];
    const float* c = static_cast<const float*>(f.candidates) + j * f.c_stride;
    double acc = 0.0;
    for (int64_t k = lane; k < f.dim; k += 32) acc += static_cast<double>(q[k]) * static_cast<double>(c[k]);
#pragma unroll
    for (int off = 16; off > 0; off /= 2) acc += __shfl_xor_sync(0xffffffffu, acc, off);
    if (lane == 0) {
      const float cs = f.col_scale ? f.col_scale[j] : 1.0f;
      f.cand_score[row * f.cand_cap + i] =
          static_cast<float>(acc * static_cast<double>(rs) * static_cast<double>(cs));
    }
  }
}

__global__ void row_bounds_kernel(TopkParams p, float* lo, float* hi) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= p.num_rows) return;
  row_float_bounds(p, row, lo[row], hi[row]);
}

__global__ void offer_candidates_kernel(TopkParams p, const float* scores, const int32_t* cols,
                                        const int32_t* counts, int64_t cap, int64_t col_offset) {
  const int64_t row = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (row >= p.num_rows) return;
  const int64_t n = counts[row] < cap ? counts[row] : cap;
  offer_candidate_list(p, row, scores + row * cap, cols + row * cap, n, col_offset);
}

}  // namespace

bool topk_fused_supported(int device) {
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return prop.major >= 8;
}

void topk_fused_scores_cuda(const FusedBlock& f, void* stream) {
  if (f.rows == 0 || f.cols == 0) return;
  const auto dt = static_cast<DType>(f.dtype);
  HN_CHECK(dt == DType::BFloat16 || dt == DType::Float16 || dt == DType::Float32,
           "fused: inputs must be bf16, fp16 or fp32");
  const bool tf32 = dt == DType::Float32;
  HN_CHECK(f.cols <= int64_t{65535} * kBN && f.cols < (int64_t{1} << 31), "fused: too many candidates");
  HN_CHECK(f.cand_cap > 0 && f.rows * f.cand_cap < (int64_t{1} << 40), "fused: bad candidate capacity");
  HN_CHECK(!tf32 || (f.row_slack && f.col_slack), "fused: fp32 inputs need the tf32 error slack");
  HN_CHECK(!f.row_slack || f.col_slack, "fused: row_slack needs col_slack");
  HN_CHECK(ceil_div(f.rows, kBM) < (int64_t{1} << 31), "fused: too many rows");
  HN_CHECK(f.kernel >= 0 && f.kernel <= 4,
           "fused: kernel must be 0 (auto), 1 (mma.sync), 2 (wgmma), 3 (wgmma 256 x 128) or 4 (wgmma 128 x 256)");
  // kernels 2 to 4 always go to wgmma (which throws when the device, the build or the inputs rule it
  // out); auto takes it whenever all three allow.
  if (f.kernel >= 2) return topk_fused_scores_sm90(f, stream);
  if (f.kernel == 0 && sm90::wgmma_inputs_suit(f)) {
    int device = 0;
    HN_CUDA_CHECK(cudaGetDevice(&device));
    if (topk_fused_wgmma_available(device)) return topk_fused_scores_sm90(f, stream);
  }
  const int64_t bk = tf32 ? kBK32 : kBK16, per16 = tf32 ? 4 : 8;  // K per stage; elements per 16 bytes
  HN_CHECK(f.dim > 0 && f.dim % bk == 0, tf32 ? "fused: dim must be a positive multiple of 16 for fp32"
                                              : "fused: dim must be a positive multiple of 32");
  HN_CHECK(f.q_stride % per16 == 0 && f.c_stride % per16 == 0, "fused: row strides must span whole 16 bytes");
  HN_CHECK(reinterpret_cast<uintptr_t>(f.queries) % 16 == 0 && reinterpret_cast<uintptr_t>(f.candidates) % 16 == 0,
           "fused: inputs must be 16-byte aligned");
  const dim3 grid(static_cast<unsigned>(ceil_div(f.rows, kBM)), static_cast<unsigned>(ceil_div(f.cols, kBN)));
  auto s = static_cast<cudaStream_t>(stream);
  if (tf32) {
    HN_LAUNCH(grid, kFusedThreads, 0, s, fused_scores_kernel<2>)(f);
  } else if (dt == DType::BFloat16) {
    HN_LAUNCH(grid, kFusedThreads, 0, s, fused_scores_kernel<1>)(f);
  } else {
    HN_LAUNCH(grid, kFusedThreads, 0, s, fused_scores_kernel<0>)(f);
  }
  HN_CUDA_CHECK(cudaGetLastError());
}

void topk_rescore_candidates_cuda(const FusedBlock& f, void* stream) {
  if (f.rows == 0 || f.dim == 0) return;
  HN_CHECK(static_cast<DType>(f.dtype) == DType::Float32, "rescore: inputs must be float32");
  HN_CHECK(f.cand_cap > 0, "rescore: bad candidate capacity");
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(ceil_div(f.rows, kRescoreWarps));
  HN_LAUNCH(grid, kRescoreWarps * 32, 0, s, rescore_kernel)(f);
  HN_CUDA_CHECK(cudaGetLastError());
}

void topk_row_bounds_cuda(const TopkParams& p, float* lo, float* hi, void* stream) {
  if (p.num_rows == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(ceil_div(p.num_rows, kRowThreads));
  HN_LAUNCH(grid, kRowThreads, 0, s, row_bounds_kernel)(p, lo, hi);
  HN_CUDA_CHECK(cudaGetLastError());
}

void topk_offer_candidates_cuda(const TopkParams& p, const float* scores, const int32_t* cols,
                                const int32_t* counts, int64_t cap, int64_t col_offset, void* stream) {
  if (p.num_rows == 0 || p.k == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(ceil_div(p.num_rows, kRowThreads));
  HN_LAUNCH(grid, kRowThreads, 0, s, offer_candidates_kernel)(p, scores, cols, counts, cap, col_offset);
  HN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hnsample
