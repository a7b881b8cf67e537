// sm_90a fused score kernel: the FusedBlock contract of fused_scores_kernel (topk_fused.cu) for 16-bit
// inputs on Hopper's asynchronous warpgroup tensor cores. CTA = 128 query rows x 128 candidates: one
// producer warp streams K steps of 64 elements of both operand tiles into a 3-stage ring with the bulk
// tensor copy engine (128-byte swizzle, edges zero-filled), two consumer warpgroups of 64 rows each run
// wgmma m64n128k16 from shared memory into fp32 registers, then filter their accumulators through the
// shared epilogue (fused_common.cuh). About 99 KiB of shared memory, so two CTAs share an SM and one's
// epilogue overlaps the other's main loop. FusedKernel::Wgmma256x128 and Wgmma128x256 select a 256 x 128 and a 128 x 256
// CTA (one per SM, 4 stages) to measure against it (../topk_fused_sm90.h says why each). CTAs are
// persistent (as many as fit the device, each walking tiles in steps of the grid), and the producer runs
// ahead into the next tile while the consumers filter the current one. Tiles go query tiles fastest (as
// topk_fused.cu's grid does), so a candidate tile is read from memory about once.
//
// Why the tensor copy engine rather than cp.async: one thread moves a whole 16 KiB tile, writes the
// swizzle wgmma expects and zero-fills ragged rows and the K tail in hardware, so the 256 consumer
// threads do no address arithmetic and d needs no padding. Its tensor map comes from the driver's
// cuTensorMapEncodeTiled, fetched through the runtime's entry-point query: libcuda is never linked.
//
// Failure containment: every barrier wait is bounded (kWaitLimitNs). A wait that runs out sets a
// device flag; from then on every CTA of this and later launches marks its rows as overflowed instead of
// scoring, which the fused driver answers by redoing the chunk on the two-pass path. A broken pipeline
// therefore costs one time limit, never a hang, and never a wrong result through the driver.
#include <cuda.h>  // CUtensorMap and its enums only: the encoder is reached through the runtime
#include <cuda_runtime.h>

#include <algorithm>
#include <climits>
#include <mutex>
#include <string>
#include <vector>

#include "../topk_fused_sm90.h"
#include "../topk_select.h"
#include "cuda_common.cuh"
#include "fused_common.cuh"
#include "ptx_sm90.cuh"

namespace hnsample {
namespace sm90 {
namespace {

constexpr int kProbeWords = 97;  // the probe's shared array (only its sm_90a build has one)

__device__ int g_stalled = 0;

#if HN_SM90A_CODE
using namespace ptx90;  // the instruction wrappers (ptx_sm90.cuh)

constexpr unsigned long long kWaitLimitNs = 1000000000ull;  // 1 s: a healthy wait takes microseconds

// Whether a wait that started at global time t0 should give up: it ran past kWaitLimitNs, or another
// CTA has already stalled (the flag is read only while waiting). Giving up sets the flag.
__device__ __forceinline__ bool wait_gives_up(uint64_t t0) {
  // Signed: a %globaltimer that steps backwards reads as no time passed, not as an instant timeout.
  const auto waited = static_cast<long long>(global_ns() - t0);
  if (*static_cast<volatile int*>(&g_stalled) == 0 && waited <= static_cast<long long>(kWaitLimitNs)) return false;
  atomicExch(&g_stalled, 1);
  return true;
}

// One thread waits until the barrier's phase of the given parity has completed (the producer). False
// when it did not within kWaitLimitNs, or another CTA has stalled.
__device__ __forceinline__ bool mbar_wait(uint32_t bar, uint32_t parity) {
  if (mbar_try_wait(bar, parity)) return true;
  const uint64_t t0 = global_ns();
  for (;;) {
    if (mbar_try_wait(bar, parity)) return true;
    if (wait_gives_up(t0)) return false;
  }
}

// A whole warp (all 32 lanes, converged: the call sites branch on warp-uniform values only) waits until
// the barrier's phase of the given parity has completed. True when every lane has seen it; false when
// lane 0 gave up (wait_gives_up), in every lane.
//
// Memory ordering: what makes a stage's bulk copy visible to a lane is that lane's own successful
// mbarrier.try_wait (an acquire of the phase the copy's complete_tx finished). So every lane polls
// try_wait itself until it succeeds and keeps that success (the phase cannot complete again before this
// warp releases the stage), and the warp returns true only once all 32 lanes have succeeded: the votes
// and the shuffle agree on control flow and order no memory. Only the decision to give up is lane 0's
// alone: it alone reads %globaltimer and the global stall flag (one load per failed round instead of 32),
// and the others learn the verdict by a shuffle. Giving up can only return false, never let a lane read
// a stage it has not seen land: the warp then treats the stage as garbage, releases no stage, and its
// warpgroup drops the tile.
__device__ __forceinline__ bool warp_mbar_wait(uint32_t bar, uint32_t parity, int lane) {
  bool seen = mbar_try_wait(bar, parity);
  if (__all_sync(kFullWarp, seen)) return true;
  uint64_t t0 = 0;
  if (lane == 0) t0 = global_ns();
  for (;;) {
    if (!seen) seen = mbar_try_wait(bar, parity);
    if (__all_sync(kFullWarp, seen)) return true;
    bool give_up = false;
    if (lane == 0) give_up = wait_gives_up(t0);
    if (__shfl_sync(kFullWarp, static_cast<int>(give_up), 0)) return false;
  }
}

// The AND of `pred` over the 128 threads of consumer warpgroup `group`, at its own named barrier
// 1 + group.
template <int kGroups>
__device__ __forceinline__ bool warpgroup_all(int group, bool pred) {
  static_assert(kGroups == 2 || kGroups == 4, "the tile shapes' consumer warpgroups");
  if (group == 0) return barrier_all<1, 128>(pred);
  if constexpr (kGroups == 2) {
    return barrier_all<2, 128>(pred);
  } else {
    if (group == 1) return barrier_all<2, 128>(pred);
    if (group == 2) return barrier_all<3, 128>(pred);
    return barrier_all<4, 128>(pred);
  }
}

// Rows whose state must not take this chunk: overflowing their count makes the driver redo it.
__device__ __forceinline__ void mark_overflow(const FusedBlock& f, int64_t row) {
  const int over = f.cand_cap < INT_MAX ? static_cast<int>(f.cand_cap) + 1 : INT_MAX;
  atomicMax(&f.cand_count[row], over);
}
#endif

// The ring position of a pipeline: stage index and the parity of its current round. Producer and
// consumers walk the same sequence (one step per K step of every tile of this CTA), so a stage's n-th
// fill and n-th use meet at the same parity.
struct Ring {
  int stage = 0;
  uint32_t phase = 0;
  template <int kStages>
  __device__ __forceinline__ void advance() {
    if (++stage == kStages) {
      stage = 0;
      phase ^= 1;
    }
  }
};

// This CTA's tiles t = blockIdx.x, blockIdx.x + gridDim.x, ... as (query tile mi, candidate tile ni),
// t = ni * mtiles + mi. 32-bit throughout (wgmma_inputs_suit bounds rows below 2^31 and candidates below
// 65535 x 128, so both tile counts fit), so the two divisions are inline and happen once; each step adds.
struct TileWalk {
  uint32_t mtiles, ntiles, mi, ni, step_m, step_n;
  __device__ __forceinline__ TileWalk(uint32_t m_tiles, uint32_t n_tiles) : mtiles(m_tiles), ntiles(n_tiles) {
    mi = blockIdx.x % mtiles;
    ni = blockIdx.x / mtiles;
    step_m = gridDim.x % mtiles;
    step_n = gridDim.x / mtiles;
  }
  __device__ __forceinline__ bool valid() const { return ni < ntiles; }
  __device__ __forceinline__ void next() {
    mi += step_m;
    ni += step_n;
    if (mi >= mtiles) {
      mi -= mtiles;
      ++ni;
    }
  }
};

// A persistent CTA: tiles t = blockIdx.x, blockIdx.x + gridDim.x, ... of the (query tile, candidate
// tile) grid, query tiles fastest, so the CTAs running at one time share a few candidate tiles and the
// queries stay in L2. The producer runs ahead across tile boundaries: the next tile's stages fill while
// the consumers run the epilogue of the current one.
template <bool kBf16, class T>
__global__ void __launch_bounds__(T::kThreads, T::kCtasPerSm)
    wgmma_scores_kernel(const __grid_constant__ CUtensorMap tq, const __grid_constant__ CUtensorMap tc,
                        const FusedBlock f) {
#if HN_SM90A_CODE
  constexpr int kStages = T::kStages, kStageBytes = T::kStageBytes, kConsumerGroups = T::kConsumerGroups;
  constexpr int kAcc = T::kAcc;
  HN_DYNAMIC_SHARED(unsigned char, smem_raw);  // 16-byte aligned; the stages are aligned to 1024 below
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t base = (raw + kSwizzleAtomBytes - 1) & ~static_cast<uint32_t>(kSwizzleAtomBytes - 1);
  const uint32_t bars = base + kStages * kStageBytes;  // full[kStages], empty[kStages], then the flag
  int* cta_flag = reinterpret_cast<int*>(smem_raw + (bars - raw) + 2 * kStages * 8);
  // Then the column scales: [kConsumerGroups][2][kBN] floats (Tile::kColScaleBytes).
  float* const col_scales = reinterpret_cast<float*>(smem_raw + (bars - raw) + T::kControlBytes);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int ksteps = static_cast<int>((f.dim + kBK - 1) / kBK);
  const auto mtiles = static_cast<uint32_t>((f.rows + T::kBM - 1) / T::kBM);
  const auto ntiles = static_cast<uint32_t>((f.cols + T::kBN - 1) / T::kBN);

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(bars + 8 * s, 1);                                     // the producer's expect_tx arrival
      mbar_init(bars + 8 * (kStages + s), kConsumerGroups * 4);       // one arrival per consumer warp
    }
    mbar_init_fence();
    *cta_flag = *static_cast<volatile int*>(&g_stalled);
  }
  __syncthreads();  // the last CTA-wide barrier: from here on the roles never meet at one again
  const bool stalled = *cta_flag != 0;

  if (warp == kConsumerGroups * 4) {
    // Producer: a stage is refilled once all consumer warps released its previous use.
    if (lane == 0 && !stalled) {
      Ring ring;
      bool ok = true;
      int fills = 0;
      for (TileWalk w(mtiles, ntiles); ok && w.valid(); w.next()) {
        const auto m0 = static_cast<int32_t>(w.mi * T::kBM), n0 = static_cast<int32_t>(w.ni * T::kBN);
        for (int ks = 0; ks < ksteps; ++ks) {
          // parity ^ 1: the first round of every stage passes on its fresh barrier
          ok = mbar_wait(bars + 8 * (kStages + ring.stage), ring.phase ^ 1);
          if (!ok) break;
          const uint32_t full = bars + 8 * ring.stage;
          const uint32_t tile = base + ring.stage * kStageBytes;
          mbar_arrive_expect_tx(full, kStageBytes);
          tma_load_2d(tile, &tq, ks * kBK, m0, full);
          tma_load_2d(tile + T::kTileABytes, &tc, ks * kBK, n0, full);
          ring.advance<kStages>();
          ++fills;
        }
      }
      // The CTA must not exit while copies still write its shared memory: after a stall the consumers
      // leave without waiting, and a copy landing later would write into whatever CTA the SM runs
      // next. So the last fill of each stage must have landed before this thread leaves (healthy
      // runs: long since). Bounded, deaf to the stall flag: a merely slow copy engine finishes here.
      const uint64_t t0 = global_ns();
      for (int i = 1; i <= kStages && i <= fills; ++i) {
        const int back = ring.stage - i;  // the i-th last fill: this round's stages, then the last round's
        const uint32_t bar = bars + 8 * (back < 0 ? back + kStages : back), parity = back < 0 ? ring.phase ^ 1 : ring.phase;
        while (!mbar_try_wait(bar, parity) && global_ns() - t0 <= 2 * kWaitLimitNs) {
        }
      }
    }
    return;
  }

  // Consumers: warpgroup `group` computes rows m0 + 64 group .. + 63 against all T::kBN candidates.
  // 16-bit inputs carry no slack (wgmma_inputs_suit), so the epilogue's only column factor is the scale.
  const int group = warp / 4, group_warp = warp % 4;
  const int group_thread = static_cast<int>(threadIdx.x) % 128;
  constexpr int kScalesPerThread = T::kBN / 128;
  float* const group_scales = col_scales + group * 2 * T::kBN;  // [2][kBN]: this warpgroup's buffers
  int buffer = 0;                                               // the current tile's: tiles alternate
  Ring ring;
  bool ok = !stalled;
  TileWalk w(mtiles, ntiles);
  for (; ok && w.valid(); w.next()) {
    const int64_t m0 = static_cast<int64_t>(w.mi) * T::kBM, n0 = static_cast<int64_t>(w.ni) * T::kBN;
    // The tile's column scales into this tile's buffer (each thread columns group_thread + 128 i):
    // asynchronous copies, waited for after the K loop, so their latency hides behind it. Why no thread
    // reads them too early or overwrites them under a reader: at the named barrier below.
    float* const tile_scales = group_scales + buffer * T::kBN;
    if (f.col_scale) {
#pragma unroll
      for (int i = 0; i < kScalesPerThread; ++i)
        fused_stage_col(f.col_scale, f, n0 + group_thread + 128 * i, &tile_scales[group_thread + 128 * i]);
      cp_async_commit();
    }
    float acc[kAcc];
#pragma unroll
    for (int i = 0; i < kAcc; ++i) acc[i] = 0.f;
    int previous = 0;
    for (int ks = 0; ks < ksteps; ++ks) {
      // A failed wait does not leave the loop: the four warps of the warpgroup decide apart (a copy
      // may land between one warp's time-out and another's look), yet must all issue the same
      // warpgroup-collective wgmma sequence. Past a failure a stage's contents are garbage, which the
      // agreement after the tile throws away.
      if (ok) ok = warp_mbar_wait(bars + 8 * ring.stage, ring.phase, lane);
      const uint32_t tile_a = base + ring.stage * kStageBytes + group * 64 * kRowBytes;
      const uint32_t tile_b = base + ring.stage * kStageBytes + T::kTileABytes;
      acc_fence(acc);  // every earlier write of the accumulators lands before the fence
      wgmma_fence();
#pragma unroll
      for (int k16 = 0; k16 < kBK / 16; ++k16)
        wgmma_m64nNk16<kBf16, T::kBN>(acc, operand_descriptor(tile_a, k16), operand_descriptor(tile_b, k16));
      wgmma_commit();
      wgmma_wait<1>();  // the previous step's group is done reading its stage
      acc_fence(acc);
      // Only a warp whose waits all succeeded releases a stage: one that gave up never saw the stage's
      // copy land, and releasing it could let the producer refill the stage under that copy.
      if (ok && ks > 0 && lane == 0) mbar_arrive(bars + 8 * (kStages + previous));
      previous = ring.stage;
      ring.advance<kStages>();
    }
    wgmma_wait<0>();
    acc_fence(acc);
    // The column scales: each thread waits for its own copies (they are then its writes), and the
    // warpgroup's named barrier below orders them before every read of the buffer in this tile's
    // epilogue (bar.red, like bar.sync, makes the shared-memory accesses of its participants before it
    // visible to them all after it). The buffer's previous use was the epilogue two tiles back, which
    // every thread of the warpgroup finished before it reached the previous tile's barrier, itself passed
    // by any thread copying here: so no copy lands under a read. Only this warpgroup's threads touch its
    // buffers (the producer and the other warpgroups never meet these barriers).
    if (f.col_scale) cp_async_wait<0>();
    ok = warpgroup_all<kConsumerGroups>(group, ok);  // one warp's failed wait fails the tile for its warpgroup
    if (!ok) break;
    if (lane == 0) mbar_arrive(bars + 8 * (kStages + previous));  // the tile's last stage, before the epilogue

    // The quad of lanes 4g .. 4g + 3 holds row acc_row(group_warp, lane, 2 h) with T::kBN / 4
    // accumulators per lane: j = 2 i + e is register 4 i + 2 h + e, column acc_col of it.
    const FusedCols cols = fused_cols(f, n0, tile_scales, nullptr);
#pragma unroll
    for (int h = 0; h < 2; ++h)
      fused_keep_row<T::kBN / 4>(
          f, cols, m0 + group * 64 + acc_row(group_warp, lane, 2 * h), lane,
          [&](int j) -> float& { return acc[4 * (j / 2) + 2 * h + j % 2]; },
          [&](int j) { return acc_col(lane, 4 * (j / 2) + 2 * h + j % 2); });
    buffer ^= 1;
  }
  // After a stall: this tile and every later one of this CTA report overflow in all their rows.
  for (; w.valid(); w.next()) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t row = static_cast<int64_t>(w.mi) * T::kBM + group * 64 + acc_row(group_warp, lane, 2 * h);
      if (row < f.rows) mark_overflow(f, row);
    }
  }
#endif
}

// Never launched: its static shared size says which code the runtime loads for the current device. Only
// the sm_90a build (the feature macro) declares the marker array; every other build has no shared
// memory at all.
__global__ void sm90a_probe_kernel(int* out) {
#if HN_SM90A_CODE
  __shared__ int mark[kProbeWords];
  mark[threadIdx.x % kProbeWords] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = mark[(threadIdx.x + 1) % kProbeWords];
#else
  out[threadIdx.x] = 0;
#endif
}

using EncodeTiled = CUresult (*)(CUtensorMap*, CUtensorMapDataType, cuuint32_t, void*, const cuuint64_t*,
                                 const cuuint64_t*, const cuuint32_t*, const cuuint32_t*, CUtensorMapInterleave,
                                 CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// The driver's tensor-map encoder (its CUDA 12.0 ABI), or null when the driver does not export it.
EncodeTiled tensor_map_encoder() {
  static const EncodeTiled fn = [] {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &p, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return static_cast<EncodeTiled>(nullptr);
    }
    return reinterpret_cast<EncodeTiled>(p);
  }();
  return fn;
}

// Row-major [rows, dim] 16-bit matrix with a row stride of `stride` elements, read in boxes of 64
// elements x box_rows rows with the 128-byte swizzle; everything outside [0, dim) x [0, rows) reads 0.
CUtensorMap operand_map(const void* data, int64_t rows, int64_t dim, int64_t stride, bool bf16, int box_rows) {
  CUtensorMap map;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(dim), static_cast<cuuint64_t>(rows)};
  const cuuint64_t strides[1] = {static_cast<cuuint64_t>(stride) * kElemBytes};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(kBK), static_cast<cuuint32_t>(box_rows)};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUresult r = tensor_map_encoder()(
      &map, bf16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16, 2, const_cast<void*>(data),
      dims, strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B,
      CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  HN_CHECK(r == CUDA_SUCCESS, "fused wgmma: cuTensorMapEncodeTiled failed with code " + std::to_string(r));
  return map;
}

template <bool kBf16, class T>
void set_kernel_attributes() {
  HN_CUDA_CHECK(cudaFuncSetAttribute(wgmma_scores_kernel<kBf16, T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     T::kSmemBytes));
  // All of the unified L1 / shared storage as shared memory, so kCtasPerSm CTAs fit.
  HN_CUDA_CHECK(cudaFuncSetAttribute(wgmma_scores_kernel<kBf16, T>, cudaFuncAttributePreferredSharedMemoryCarveout,
                                     static_cast<int>(cudaSharedmemCarveoutMaxShared)));
}

// CTAs of the kernel that fit one SM of the current device (after its attributes are set).
template <bool kBf16, class T>
int ctas_per_sm() {
  set_kernel_attributes<kBf16, T>();
  int per_sm = 0;
  HN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, wgmma_scores_kernel<kBf16, T>, T::kThreads,
                                                              T::kSmemBytes));
  return per_sm;
}

// As many CTAs as fit the device at once (persistent: each walks its share of the tiles), never more
// than there are tiles.
template <bool kBf16, class T>
void launch_persistent(const FusedBlock& f, const CUtensorMap& tq, const CUtensorMap& tc, cudaStream_t stream) {
  int device = 0, sms = 0;
  HN_CUDA_CHECK(cudaGetDevice(&device));
  HN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int per_sm = ctas_per_sm<kBf16, T>();
  HN_CHECK(per_sm >= 1, "fused wgmma: the kernel does not fit an SM");
  const int64_t tiles = ceil_div(f.rows, T::kBM) * ceil_div(f.cols, T::kBN);
  const int64_t ctas = std::min<int64_t>(tiles, static_cast<int64_t>(sms) * per_sm);
  HN_LAUNCH(static_cast<unsigned>(ctas), T::kThreads, T::kSmemBytes, stream, wgmma_scores_kernel<kBf16, T>)(tq, tc, f);
  HN_CUDA_CHECK(cudaGetLastError());
}

template <class T>
void launch(const FusedBlock& f, bool bf16, cudaStream_t stream) {
  const CUtensorMap tq = operand_map(f.queries, f.rows, f.dim, f.q_stride, bf16, T::kBM);
  const CUtensorMap tc = operand_map(f.candidates, f.cols, f.dim, f.c_stride, bf16, T::kBN);
  if (bf16) {
    launch_persistent<true, T>(f, tq, tc, stream);
  } else {
    launch_persistent<false, T>(f, tq, tc, stream);
  }
}

// The probe proper, on the current device.
bool probe_current_device(int device) {
  cudaDeviceProp prop;
  if (cudaGetDeviceProperties(&prop, device) != cudaSuccess) return false;
  if (prop.major != 9 || prop.minor != 0) return false;
  if (prop.sharedMemPerBlockOptin < static_cast<size_t>(TileTall::kSmemBytes) ||
      prop.sharedMemPerBlockOptin < static_cast<size_t>(TileLong::kSmemBytes))
    return false;
  if (tensor_map_encoder() == nullptr) return false;
  cudaFuncAttributes attr;
  if (cudaFuncGetAttributes(&attr, sm90a_probe_kernel) != cudaSuccess) return false;
  return attr.sharedSizeBytes >= sizeof(int) * kProbeWords;
}

}  // namespace
}  // namespace sm90

bool topk_fused_wgmma_available(int device) {
  static std::mutex mu;
  static std::vector<signed char> known;  // per device: -1 unknown, 0 no, 1 yes
  std::lock_guard<std::mutex> lock(mu);
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || device < 0 || device >= count) {
    cudaGetLastError();
    return false;
  }
  if (known.size() < static_cast<size_t>(count)) known.resize(count, -1);
  if (known[device] < 0) {
    int previous = 0;
    bool yes = false;
    if (cudaGetDevice(&previous) == cudaSuccess && cudaSetDevice(device) == cudaSuccess) {
      yes = sm90::probe_current_device(device);
      cudaSetDevice(previous);
    }
    cudaGetLastError();  // a failed query leaves no sticky error behind for the caller's next check
    known[device] = yes ? 1 : 0;
  }
  return known[device] == 1;
}

void topk_fused_scores_sm90(const FusedBlock& f, void* stream) {
  using namespace sm90;
  if (f.rows == 0 || f.cols == 0) return;
  HN_CHECK(wgmma_inputs_suit(f),
           "fused wgmma: needs bf16/fp16 inputs without slack, 16-byte aligned rows with strides >= dim, at most "
           "65535 * 128 candidates");
  int device = 0;
  HN_CUDA_CHECK(cudaGetDevice(&device));
  HN_CHECK(topk_fused_wgmma_available(device),
           "fused wgmma: this device or build cannot run it (needs compute capability 9.0 and sm_90a code)");
  const bool bf16 = static_cast<DType>(f.dtype) == DType::BFloat16;
  auto s = static_cast<cudaStream_t>(stream);
  if (f.kernel == FusedKernel::Wgmma256x128) {
    launch<TileTall>(f, bf16, s);
  } else if (f.kernel == FusedKernel::Wgmma128x256) {
    launch<TileLong>(f, bf16, s);
  } else {
    launch<TileWide>(f, bf16, s);
  }
}

int topk_fused_wgmma_ctas_per_sm(int device, FusedKernel kernel) {
  using namespace sm90;
  HN_CHECK(kernel == FusedKernel::Wgmma || kernel == FusedKernel::Wgmma256x128 || kernel == FusedKernel::Wgmma128x256,
           "fused wgmma: kernel must be one of the wgmma kernels");
  if (!topk_fused_wgmma_available(device)) return 0;
  int previous = 0;
  HN_CUDA_CHECK(cudaGetDevice(&previous));
  HN_CUDA_CHECK(cudaSetDevice(device));
  const int n = kernel == FusedKernel::Wgmma256x128   ? ctas_per_sm<true, TileTall>()
                : kernel == FusedKernel::Wgmma128x256 ? ctas_per_sm<true, TileLong>()
                                                      : ctas_per_sm<true, TileWide>();
  HN_CUDA_CHECK(cudaSetDevice(previous));
  return n;
}

bool topk_fused_wgmma_stalled(int device) {
  int previous = 0;
  HN_CUDA_CHECK(cudaGetDevice(&previous));
  HN_CUDA_CHECK(cudaSetDevice(device));
  int flag = 0;
  const cudaError_t err = cudaMemcpyFromSymbol(&flag, sm90::g_stalled, sizeof(flag));
  cudaSetDevice(previous);
  HN_CUDA_CHECK(err);
  return flag != 0;
}

void topk_fused_wgmma_clear_stall(int device) {
  int previous = 0;
  HN_CUDA_CHECK(cudaGetDevice(&previous));
  HN_CUDA_CHECK(cudaSetDevice(device));
  const int zero = 0;
  const cudaError_t err = cudaMemcpyToSymbol(sm90::g_stalled, &zero, sizeof(zero));
  cudaSetDevice(previous);
  HN_CUDA_CHECK(err);
}

}  // namespace hnsample
