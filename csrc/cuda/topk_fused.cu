// Fused path: one tensor-core kernel computes 128 x 128 tiles of s = q c^T and filters them in its
// epilogue (fused_common.cuh) against per-row float bounds taken from the selection state before the
// launch; survivors are appended to per-row candidate lists, so the score matrix never reaches global
// memory. CTA = 128 query rows x 128 candidates, 8 warps of 64 x 32, a 4-stage cp.async pipeline in
// dynamic shared memory (2 stages on GPUs with 100 KiB of shared memory per SM), then 1 KiB of the
// tile's column scales and slacks for the epilogue.
// bf16/fp16: mma.sync m16n8k16 (exact products, fp32 accumulation), K in steps of 32. fp32: mma.sync
// m16n8k8 on tf32 (inputs rounded to nearest tf32 in registers), K in steps of 16, with the error
// slack of tf32_dot_error_factor in the filter and an exact rescoring of the survivors afterwards
// (rescore_kernel). blockIdx.x walks the query tiles, so consecutive CTAs share a candidate tile and
// the queries stay in L2: candidates are read from memory once per launch. Also here: the row-bounds
// and candidate-list kernels around it.
#include <cuda_runtime.h>

#include <mutex>
#include <vector>

#include "../params_check.h"
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
static_assert(kBK16 == 4 * 8 && kBK32 == 4 * 4, "load_kstep copies 4 chunks of 16 bytes per row and k-step");

// The tensor-core instructions (ptx.cuh): ldmatrix_x4, mma_16816, mma_1688_tf32, to_tf32.
using namespace ptx;

using Acc = float[4][4][4];  // [m16 tile][n8 tile][fragment element] of one warp's 64 x 32

// One pipeline stage holds k-step slices of the CTA's 128 query rows (rows 0-127) and 128 candidate
// rows (rows 128-255): 256 rows x 80 bytes = 20 KiB for either operand type.
constexpr int kStageRows = kBM + kBN;
constexpr int kStageBytes = kStageRows * kLds16 * 2;
static_assert(kStageBytes == kStageRows * kLds32 * 4, "both operand types use the same stage size");
// Past the stages: the tile's kBN column scales, then its kBN column slacks (FusedCols), one per thread.
constexpr int kColFactorBytes = 2 * kBN * static_cast<int>(sizeof(float));
static_assert(kFusedThreads == 2 * kBN, "each thread stages one column factor");

// The multistage cp.async pipeline both main loops run: k-step i is copied into slot i % kStages,
// kStages - 1 k-steps ahead of the one being computed. Group accounting: one commit per k-step slot
// (empty groups past the end keep the count aligned), so after the commits of iteration ks, waiting
// until at most kStages - 2 groups are pending means k-step ks has landed. The __syncthreads then
// also proves every warp finished computing k-step ks - 1, whose slot the next copy refills. Copies
// issued before the call join the first group, so they too have landed, for every thread, once the
// first iteration has passed its __syncthreads (ksteps >= 1).
template <int kStages, typename Load, typename Compute>
__device__ __forceinline__ void pipelined(int ksteps, Load&& load, Compute&& compute) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < ksteps) load(s, s);
    cp_async_commit();
  }
  for (int ks = 0; ks < ksteps; ++ks) {
    cp_async_wait<kStages - 2>();
    __syncthreads();
    const int next = ks + kStages - 1;
    if (next < ksteps) load(next % kStages, next);
    cp_async_commit();
    compute(ks % kStages);
  }
}

// Copies k-step ks of the CTA's 128 query rows (stage rows 0-127) and 128 candidate rows (128-255)
// into one stage: 4 chunks of 16 bytes per row and operand (32 halves or 16 floats of K), 512 per
// operand, two of each per thread; rows past the edge of the problem are zero-filled.
template <typename T, int kLds>
__device__ __forceinline__ void load_kstep(const FusedBlock& f, int64_t m0, int64_t n0, T (*stage)[kLds], int ks) {
  constexpr int kPer16 = 16 / static_cast<int>(sizeof(T));
  const T* q = static_cast<const T*>(f.queries);
  const T* c = static_cast<const T*>(f.candidates);
  const int64_t k0 = static_cast<int64_t>(ks) * 4 * kPer16;
#pragma unroll
  for (int i = 0; i < 2; ++i) {
    const int chunk = static_cast<int>(threadIdx.x) + i * kFusedThreads;
    const int r = chunk / 4, kc = (chunk % 4) * kPer16;
    const bool qv = m0 + r < f.rows, cv = n0 + r < f.cols;
    cp_async<16>(&stage[r][kc], qv ? q + (m0 + r) * f.q_stride + k0 + kc : q, qv);
    cp_async<16>(&stage[kBM + r][kc], cv ? c + (n0 + r) * f.c_stride + k0 + kc : c, cv);
  }
}

// The main loop for 16-bit operands: acc = q[m0:m0+128] c[n0:n0+128]^T restricted to this warp.
template <bool kBf16, int kStages>
__device__ __forceinline__ void mainloop_16bit(const FusedBlock& f, int64_t m0, int64_t n0, Acc& acc,
                                               unsigned char* smem) {
  auto* st = reinterpret_cast<uint16_t(*)[kStageRows][kLds16]>(smem);  // [kStages][256][40]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / 4, warp_n = warp % 4;
  auto load = [&](int slot, int ks) { load_kstep(f, m0, n0, st[slot], ks); };
  auto compute = [&](int slot) {
#pragma unroll
    for (int kk = 0; kk < kBK16; kk += 16) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
        ldmatrix_x4(a[mi], &st[slot][warp_m * 64 + mi * 16 + (lane % 16)][kk + (lane / 16) * 8]);
#pragma unroll
      for (int nj = 0; nj < 2; ++nj) {
        // matrices: (n 0-7, k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15)
        uint32_t t[4];
        ldmatrix_x4(t, &st[slot][kBM + warp_n * 32 + nj * 16 + (lane % 8) + (lane / 16) * 8]
                          [kk + ((lane / 8) % 2) * 8]);
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
  };
  pipelined<kStages>(static_cast<int>(f.dim / kBK16), load, compute);
}

// The main loop for fp32 operands on tf32 tensor cores. Fragments of m16n8k8.tf32 (g = lane / 4,
// t = lane % 4): A a0 (g, t), a1 (g + 8, t), a2 (g, t + 4), a3 (g + 8, t + 4); B b0 (k t, n g),
// b1 (k t + 4, n g); B is stored n-major (row n of the stage's candidate half, k along the row), so
// b0 = B[g][t], b1 = B[g][t + 4].
template <int kStages>
__device__ __forceinline__ void mainloop_tf32(const FusedBlock& f, int64_t m0, int64_t n0, Acc& acc,
                                              unsigned char* smem) {
  auto* st = reinterpret_cast<float(*)[kStageRows][kLds32]>(smem);  // [kStages][256][20]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_m = warp / 4, warp_n = warp % 4;
  const int g = lane / 4, t = lane % 4;
  auto load = [&](int slot, int ks) { load_kstep(f, m0, n0, st[slot], ks); };
  auto compute = [&](int slot) {
#pragma unroll
    for (int kk = 0; kk < kBK32; kk += 8) {
      uint32_t a[4][4], b[4][2];
#pragma unroll
      for (int mi = 0; mi < 4; ++mi) {
        const float* r0 = &st[slot][warp_m * 64 + mi * 16 + g][kk + t];
        const float* r8 = r0 + 8 * kLds32;
        a[mi][0] = to_tf32(r0[0]);
        a[mi][1] = to_tf32(r8[0]);
        a[mi][2] = to_tf32(r0[4]);
        a[mi][3] = to_tf32(r8[4]);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const float* rb = &st[slot][kBM + warp_n * 32 + ni * 8 + g][kk + t];
        b[ni][0] = to_tf32(rb[0]);
        b[ni][1] = to_tf32(rb[4]);
      }
#pragma unroll
      for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_1688_tf32(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
    }
  };
  pipelined<kStages>(static_cast<int>(f.dim / kBK32), load, compute);
}

// kKind: 0 fp16, 1 bf16, 2 fp32 via tf32. Dynamic shared memory: kStages * kStageBytes + kColFactorBytes.
template <int kKind, int kStages>
__global__ void __launch_bounds__(kFusedThreads, 2) fused_scores_kernel(FusedBlock f) {
#if (defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800) || defined(HNSAMPLE_CUDA_EMU)
  HN_DYNAMIC_SHARED(unsigned char, smem);
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
  // The tile's column factors (FusedCols): scales copied by threads 0-127, slacks by 128-255. The
  // copies join the pipeline's first group (pipelined), so the main loop's first wait and __syncthreads
  // order them before every read in the epilogue; nothing else writes this memory (one tile per CTA).
  float* const col_factors = reinterpret_cast<float*>(smem + kStages * kStageBytes);  // [2][kBN]
  {
    const int i = static_cast<int>(threadIdx.x) % kBN;
    if (threadIdx.x < kBN) {
      if (f.col_scale) fused_stage_col(f.col_scale, f, n0 + i, &col_factors[i]);
    } else if (f.row_slack) {
      fused_stage_col(f.col_slack, f, n0 + i, &col_factors[kBN + i]);
    }
  }
  if constexpr (kKind == 2) {
    mainloop_tf32<kStages>(f, m0, n0, acc, smem);
  } else {
    mainloop_16bit<kKind == 1, kStages>(f, m0, n0, acc, smem);
  }

  // Epilogue: accumulator e of tile (mi, ni) is row g + 8 (e / 2), column 2 t + e % 2 of that tile
  // (the same C fragment for both instruction shapes), so the quad g holds row g + 8 h of m16 tile mi,
  // 8 accumulators per lane: j = 2 ni + e.
  const FusedCols cols = fused_cols(f, n0, col_factors, col_factors + kBN);
  const int g = lane / 4, t = lane % 4;
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h)
      fused_keep_row<8>(
          f, cols, m0 + warp_m * 64 + mi * 16 + g + 8 * h, lane,
          [&](int j) -> float& { return acc[mi][j / 2][2 * h + j % 2]; },
          [&](int j) { return warp_n * 32 + (j / 2) * 8 + 2 * t + j % 2; });
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
  offer_candidate_list(p, row, scores + row * cap, cols + row * cap, listed_entries(counts[row], cap),
                       col_offset);
}

}  // namespace

namespace {

// What the fused path needs to know of a device, read once per device: mining drives several devices
// from threads, and the op asks on every call.
struct FusedDeviceFacts {
  bool known = false, usable = false;  // usable: the properties could be read
  int major = 0, stages = 2;
};

// Pipeline depth for a device: 4 stages (81 KiB per CTA with the column factors) where two such CTAs
// fit an SM's shared memory (sm_80, sm_90, sm_100: 164 KiB and more; sm_80's 164 KiB exactly, with its
// 1 KiB reserved per CTA), else 2 stages (41 KiB; sm_86, sm_89, sm_120 with 100 KiB keep two CTAs per
// SM, which covers latency better than one deeper CTA).
FusedDeviceFacts fused_device_facts(int device) {
  static std::mutex mu;
  static std::vector<FusedDeviceFacts> cache;
  if (device < 0) return {};
  std::lock_guard<std::mutex> lock(mu);
  if (cache.size() <= static_cast<size_t>(device)) cache.resize(static_cast<size_t>(device) + 1);
  FusedDeviceFacts& facts = cache[static_cast<size_t>(device)];
  if (!facts.known) {
    cudaDeviceProp prop;
    if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) {
      cudaGetLastError();  // no sticky error for the caller's next check; asked again next time
      return {};
    }
    const size_t per_cta_deep = 4 * static_cast<size_t>(kStageBytes) + kColFactorBytes + prop.reservedSharedMemPerBlock;
    facts.major = prop.major;
    facts.stages = prop.sharedMemPerMultiprocessor >= 2 * per_cta_deep ? 4 : 2;
    facts.known = facts.usable = true;
  }
  return facts;
}

int fused_pipeline_stages(int device) {
  const FusedDeviceFacts facts = fused_device_facts(device);
  HN_CHECK(facts.usable, "fused: cannot read the device's properties");
  return facts.stages;
}

template <int kKind, int kStages>
void launch_fused(dim3 grid, cudaStream_t s, const FusedBlock& f) {
  constexpr int bytes = kStages * kStageBytes + kColFactorBytes;
  // above the 48 KiB default the kernel must opt in; the carveout asks for the shared memory two
  // CTAs per SM need
  HN_CUDA_CHECK(cudaFuncSetAttribute(fused_scores_kernel<kKind, kStages>,
                                     cudaFuncAttributeMaxDynamicSharedMemorySize, bytes));
  HN_CUDA_CHECK(cudaFuncSetAttribute(fused_scores_kernel<kKind, kStages>,
                                     cudaFuncAttributePreferredSharedMemoryCarveout, cudaSharedmemCarveoutMaxShared));
  HN_LAUNCH(grid, kFusedThreads, bytes, s, fused_scores_kernel<kKind, kStages>)(f);
  HN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

bool topk_fused_supported(int device) {
  const FusedDeviceFacts facts = fused_device_facts(device);
  return facts.usable && facts.major >= 8;
}

void topk_fused_scores_cuda(const FusedBlock& f, void* stream) {
  check_fused(f);
  if (f.rows == 0 || f.cols == 0) return;
  const auto dt = static_cast<DType>(f.dtype);
  HN_CHECK(dt == DType::BFloat16 || dt == DType::Float16 || dt == DType::Float32,
           "fused: inputs must be bf16, fp16 or fp32");
  const bool tf32 = dt == DType::Float32;
  static_assert(kFusedMaxCols == int64_t{65535} * kBN, "kFusedMaxCols is the grid.y limit of this kernel's tiles");
  HN_CHECK(f.cols <= kFusedMaxCols, "fused: too many candidates in one launch (at most kFusedMaxCols)");
  HN_CHECK(f.cand_cap > 0 && f.rows * f.cand_cap < (int64_t{1} << 40), "fused: bad candidate capacity");
  HN_CHECK(!tf32 || (f.row_slack && f.col_slack), "fused: fp32 inputs need the tf32 error slack");
  HN_CHECK(!f.row_slack || f.col_slack, "fused: row_slack needs col_slack");
  HN_CHECK(ceil_div(f.rows, kBM) < (int64_t{1} << 31), "fused: too many rows");
  // The wgmma codes always go to wgmma (which throws when the device, the build or the inputs rule it
  // out); auto takes it whenever all three allow, with the 256 x 128 tile once there are 256 rows to fill
  // it (the fastest tile on the H200 device check, benchmarks/results/gpu_check.json) and 128 x 128 below.
  if (f.kernel != FusedKernel::Auto && f.kernel != FusedKernel::Mma) return topk_fused_scores_sm90(f, stream);
  if (f.kernel == FusedKernel::Auto && sm90::wgmma_inputs_suit(f)) {
    int device = 0;
    HN_CUDA_CHECK(cudaGetDevice(&device));
    if (topk_fused_wgmma_available(device)) {
      FusedBlock tiled = f;
      tiled.kernel = f.rows >= 256 ? FusedKernel::Wgmma256x128 : FusedKernel::Wgmma;
      return topk_fused_scores_sm90(tiled, stream);
    }
  }
  const int64_t bk = tf32 ? kBK32 : kBK16, per16 = tf32 ? 4 : 8;  // K per stage; elements per 16 bytes
  HN_CHECK(f.dim > 0 && f.dim % bk == 0, tf32 ? "fused: dim must be a positive multiple of 16 for fp32"
                                              : "fused: dim must be a positive multiple of 32");
  HN_CHECK(f.q_stride % per16 == 0 && f.c_stride % per16 == 0, "fused: row strides must span whole 16 bytes");
  HN_CHECK(reinterpret_cast<uintptr_t>(f.queries) % 16 == 0 && reinterpret_cast<uintptr_t>(f.candidates) % 16 == 0,
           "fused: inputs must be 16-byte aligned");
  const dim3 grid(static_cast<unsigned>(ceil_div(f.rows, kBM)), static_cast<unsigned>(ceil_div(f.cols, kBN)));
  auto s = static_cast<cudaStream_t>(stream);
  HN_CHECK(f.stages == 0 || f.stages == 2 || f.stages == 4, "fused: stages must be 0 (by device), 2 or 4");
  int device = 0;
  HN_CUDA_CHECK(cudaGetDevice(&device));
  const bool deep = (f.stages ? f.stages : fused_pipeline_stages(device)) == 4;
  if (tf32) {
    deep ? launch_fused<2, 4>(grid, s, f) : launch_fused<2, 2>(grid, s, f);
  } else if (dt == DType::BFloat16) {
    deep ? launch_fused<1, 4>(grid, s, f) : launch_fused<1, 2>(grid, s, f);
  } else {
    deep ? launch_fused<0, 4>(grid, s, f) : launch_fused<0, 2>(grid, s, f);
  }
}

void topk_rescore_candidates_cuda(const FusedBlock& f, void* stream) {
  check_fused(f);
  if (f.rows == 0 || f.dim == 0) return;
  HN_CHECK(static_cast<DType>(f.dtype) == DType::Float32, "rescore: inputs must be float32");
  HN_CHECK(f.cand_cap > 0, "rescore: bad candidate capacity");
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(ceil_div(f.rows, kRescoreWarps));
  HN_LAUNCH(grid, kRescoreWarps * 32, 0, s, rescore_kernel)(f);
  HN_CUDA_CHECK(cudaGetLastError());
}

void topk_row_bounds_cuda(const TopkParams& p, float* lo, float* hi, void* stream) {
  check_params(p);
  if (p.num_rows == 0) return;
  HN_CHECK_PARAM(lo != nullptr && hi != nullptr, "row bound outputs are null");
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(ceil_div(p.num_rows, kRowThreads));
  HN_LAUNCH(grid, kRowThreads, 0, s, row_bounds_kernel)(p, lo, hi);
  HN_CUDA_CHECK(cudaGetLastError());
}

void topk_offer_candidates_cuda(const TopkParams& p, const float* scores, const int32_t* cols,
                                const int32_t* counts, int64_t cap, int64_t col_offset, void* stream) {
  check_params(p);
  check_candidate_lists(p, scores, cols, counts, cap);
  if (p.num_rows == 0 || p.k == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(ceil_div(p.num_rows, kRowThreads));
  HN_LAUNCH(grid, kRowThreads, 0, s, offer_candidates_kernel)(p, scores, cols, counts, cap, col_offset);
  HN_CUDA_CHECK(cudaGetLastError());
}

}  // namespace hnsample
