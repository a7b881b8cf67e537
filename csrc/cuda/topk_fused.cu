// Fused path: one tensor-core kernel computes 128 x 128 tiles of s = q c^T (bf16/fp16 inputs,
// mma.sync m16n8k16, fp32 accumulation) and filters them in its epilogue against per-row float bounds
// taken from the selection state before the launch; survivors are appended to per-row candidate
// lists, so the score matrix never reaches global memory. CTA = 128 query rows x 128 candidates,
// 8 warps of 64 x 32, K in steps of 32 through a two-stage cp.async pipeline. blockIdx.x walks the
// query tiles, so consecutive CTAs share a candidate tile and the queries stay in L2: candidates are
// read from memory once per launch. Also here: the row-bounds and candidate-list kernels around it.
#include <cuda_runtime.h>

#include "../topk_select.h"
#include "cuda_common.cuh"

namespace hnsample {
namespace {

constexpr int kBM = 128, kBN = 128, kBK = 32;
constexpr int kFusedThreads = 256;
constexpr int kLds = kBK + 8;  // halves per shared row: 80-byte rows make ldmatrix conflict-free
constexpr int kRowThreads = 128;

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: zero-fill (rows past the edge of the problem)
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
__device__ __forceinline__ void cp_async_wait_one() { asm volatile("cp.async.wait_group 1;\n" ::); }

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

template <bool kBf16>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (kBf16) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

template <bool kBf16>
__global__ void __launch_bounds__(kFusedThreads, 2) fused_scores_kernel(FusedBlock f) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  __shared__ __align__(16) uint16_t sA[2][kBM][kLds];
  __shared__ __align__(16) uint16_t sB[2][kBN][kLds];
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int warp_m = warp / 4, warp_n = warp % 4;  // 2 x 4 warps of 64 x 32
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kBM;
  const int64_t n0 = static_cast<int64_t>(blockIdx.y) * kBN;
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

  float acc[4][4][4];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[mi][ni][e] = 0.f;

  const int ksteps = static_cast<int>(f.dim / kBK);
  load_stage(0, 0);
  cp_async_commit();
  for (int ks = 0; ks < ksteps; ++ks) {
    const int stage = ks & 1;
    if (ks + 1 < ksteps) load_stage(stage ^ 1, static_cast<int64_t>(ks + 1) * kBK);
    cp_async_commit();
    cp_async_wait_one();  // this stage's group is complete; the next one may still be in flight
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kBK; kk += 16) {
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

  // Epilogue: accumulator e of tile (mi, ni) is row g + 8 (e / 2), column 2 t + e % 2 of that tile.
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = m0 + warp_m * 64 + mi * 16 + g + 8 * h;
      if (row >= f.rows) continue;
      const float lo = f.row_lo[row], hi = f.row_hi[row];
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float s = acc[mi][ni][2 * h + e];
          const int64_t col = n0 + warp_n * 32 + ni * 8 + 2 * t + e;
          if (s >= lo && s <= hi && col < f.cols) {
            const int pos = atomicAdd(&f.cand_count[row], 1);
            if (pos < f.cand_cap) {
              f.cand_score[row * f.cand_cap + pos] = s;
              f.cand_col[row * f.cand_cap + pos] = static_cast<int32_t>(col);
            }
          }
        }
      }
    }
  }
#endif
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
  HN_CHECK(f.dim > 0 && f.dim % kBK == 0, "fused: dim must be a positive multiple of 32");
  HN_CHECK(f.q_stride % 8 == 0 && f.c_stride % 8 == 0, "fused: row strides must be multiples of 8");
  HN_CHECK(reinterpret_cast<uintptr_t>(f.queries) % 16 == 0 && reinterpret_cast<uintptr_t>(f.candidates) % 16 == 0,
           "fused: inputs must be 16-byte aligned");
  HN_CHECK(f.cols <= int64_t{65535} * kBN && f.cols < (int64_t{1} << 31), "fused: too many candidates");
  HN_CHECK(f.cand_cap > 0 && f.rows * f.cand_cap < (int64_t{1} << 40), "fused: bad candidate capacity");
  const auto dt = static_cast<DType>(f.dtype);
  HN_CHECK(dt == DType::BFloat16 || dt == DType::Float16, "fused: inputs must be bf16 or fp16");
  const dim3 grid(static_cast<unsigned>(ceil_div(f.rows, kBM)), static_cast<unsigned>(ceil_div(f.cols, kBN)));
  HN_CHECK(ceil_div(f.rows, kBM) < (int64_t{1} << 31), "fused: too many rows");
  auto s = static_cast<cudaStream_t>(stream);
  HN_BOOL_SWITCH(dt == DType::BFloat16, kBf16, [&] { fused_scores_kernel<kBf16><<<grid, kFusedThreads, 0, s>>>(f); });
  HN_CUDA_CHECK(cudaGetLastError());
}

void topk_row_bounds_cuda(const TopkParams& p, float* lo, float* hi, void* stream) {
  if (p.num_rows == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  row_bounds_kernel<<<static_cast<unsigned>(ceil_div(p.num_rows, kRowThreads)), kRowThreads, 0, s>>>(p, lo, hi);
  HN_CUDA_CHECK(cudaGetLastError());
}

void topk_offer_candidates_cuda(const TopkParams& p, const float* scores, const int32_t* cols,
                                const int32_t* counts, int64_t cap, int64_t col_offset, void* stream) {
  if (p.num_rows == 0 || p.k == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  offer_candidates_kernel<<<static_cast<unsigned>(ceil_div(p.num_rows, kRowThreads)), kRowThreads, 0, s>>>(
      p, scores, cols, counts, cap, col_offset);
  HN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hnsample
