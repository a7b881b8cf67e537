// CUDA selection over a block of scores (the two-pass path's second pass), finalize and merge.
// Decomposition: one warp per (query row, column segment). Lanes read the row with 16-byte vector
// loads (strided blocks: coalesced scalar loads) and test each score against the row's bulk interval
// [lo, hi] (lo = max(running threshold, min_score), hi = min(max_score, margin bound)); one ballot per
// 512 scores skips tiles without survivors. The rare survivors pass the stream gate and the id/label
// masks in parallel lanes and go to a per-warp shared-memory queue that lane 0 flushes into the row's
// state with the shared heap code of topk_select.h, so the state equals the CPU kernel's. With cosine
// scales, each score is scaled before any test (s = (x * row_scale[r]) * col_scale[c]).
// Memory: reads the score block once (evict-first) and the column scales (cached), updates segment s of
// a [segments, B, capacity] state.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "../params_check.h"
#include "../topk_select.h"
#include "cuda_common.cuh"

namespace hnsample {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kSelectWarps = 8;
constexpr int kSelectThreads = kSelectWarps * 32;
constexpr int kLaneElems = 16;              // scores per lane per tile
constexpr int kTile = 32 * kLaneElems;      // scores per warp per tile
constexpr int kQueue = 128;                 // survivors a warp buffers before lane 0 flushes them
constexpr int64_t kMaxChunkCols = int64_t{1} << 30;  // queue columns are int32 offsets
constexpr int kThreads = 128;               // finalize / merge: one thread per row

// Scores of half/bf16/float blocks are compared in float, double blocks in double.
template <typename T>
struct CompareType {
  using type = float;
};
template <>
struct CompareType<double> {
  using type = double;
};

// Directed roundings make the float compare exactly the float64 rule: for a float s,
// (s >= lo) == (s >= round_up(lo)) and (s <= hi) == (s <= round_down(hi)).
__device__ __forceinline__ void set_bounds(double lo, double hi, float& flo, float& fhi) {
  flo = __double2float_ru(lo);
  fhi = __double2float_rd(hi);
}
__device__ __forceinline__ void set_bounds(double lo, double hi, double& dlo, double& dhi) {
  dlo = lo;
  dhi = hi;
}

__device__ __forceinline__ float load_score(const float* p) { return __ldcs(p); }
__device__ __forceinline__ double load_score(const double* p) { return __ldcs(p); }
// Both half conversions are exact; the hardware one avoids common.h's subnormal loop in device code.
__device__ __forceinline__ float half_to_float(uint16_t x) { return __half2float(__ushort_as_half(x)); }
__device__ __forceinline__ float narrow_to_float(half_bits, uint16_t x) { return half_to_float(x); }
__device__ __forceinline__ float narrow_to_float(bf16_bits, uint16_t x) { return to_float(bf16_bits{x}); }

__device__ __forceinline__ float load_score(const half_bits* p) {
  return half_to_float(__ldcs(reinterpret_cast<const unsigned short*>(p)));
}
__device__ __forceinline__ float load_score(const bf16_bits* p) {
  return to_float(bf16_bits{__ldcs(reinterpret_cast<const unsigned short*>(p))});
}

// One 16-byte load: 4 floats, 2 doubles or 8 halves; evict-first since each score is read once.
__device__ __forceinline__ void load_vector(const float* p, float* out) {
  const float4 v = __ldcs(reinterpret_cast<const float4*>(p));
  out[0] = v.x;
  out[1] = v.y;
  out[2] = v.z;
  out[3] = v.w;
}
__device__ __forceinline__ void load_vector(const double* p, double* out) {
  const double2 v = __ldcs(reinterpret_cast<const double2*>(p));
  out[0] = v.x;
  out[1] = v.y;
}
template <typename H>
__device__ __forceinline__ void load_vector(const H* p, float* out) {
  const uint4 v = __ldcs(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = narrow_to_float(H{}, static_cast<uint16_t>(w[i] & 0xffffu));
    out[2 * i + 1] = narrow_to_float(H{}, static_cast<uint16_t>(w[i] >> 16));
  }
}

// kN consecutive float32 column scales (kN = 2, 4 or 8, the scores of one vector load) with 8- or
// 16-byte loads: the caller checked that p is aligned to min(4 kN, 16) bytes.
template <int kN, typename C>
__device__ __forceinline__ void load_scales(const float* p, C* out) {
  if constexpr (kN == 2) {
    const float2 v = __ldg(reinterpret_cast<const float2*>(p));
    out[0] = static_cast<C>(v.x);
    out[1] = static_cast<C>(v.y);
  } else {
#pragma unroll
    for (int i = 0; i < kN; i += 4) {
      const float4 v = __ldg(reinterpret_cast<const float4*>(p + i));
      out[i] = static_cast<C>(v.x);
      out[i + 1] = static_cast<C>(v.y);
      out[i + 2] = static_cast<C>(v.z);
      out[i + 3] = static_cast<C>(v.w);
    }
  }
}

// Window mode fits 64 registers on sm_90 (4 blocks, 32 warps per SM); sm_80 code spilled at 64 and
// 80 registers and needs ~100 (2 blocks). The stream path's Philox and log would spill at 64 too (as
// would 16 doubles per lane), so those trade occupancy for registers. Scaled window kernels hold a
// tile's column scales beside its scores: at 64 registers they spilled 84-92 bytes on sm_90a, at 80
// (3 blocks, 24 warps per SM) nothing.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define HN_SELECT_WINDOW_BLOCKS 2
#define HN_SELECT_SCALED_BLOCKS 2
#else
#define HN_SELECT_WINDOW_BLOCKS 4
#define HN_SELECT_SCALED_BLOCKS 3
#endif
// kScaled: the block holds raw products and b.row_scale / b.col_scale the cosine scales; every score is
// s = (x * row_scale[r]) * col_scale[c] in the compare type (float for float and 16-bit blocks: on a
// float block exactly what torch's fp32 x.mul_(row).mul_(col) writes; double for double blocks), computed
// before the bounds test and again, identically, for the survivors that reach the queue.
template <typename T, bool kStream, bool kScaled>
__global__ void __launch_bounds__(kSelectThreads, kStream || sizeof(T) == 8 ? 2
                                                  : kScaled ? HN_SELECT_SCALED_BLOCKS : HN_SELECT_WINDOW_BLOCKS)
    select_block_kernel(TopkParams p, ScoreBlock b, int64_t seg_cols) {
  using C = typename CompareType<T>::type;
  constexpr int kVec = 16 / static_cast<int>(sizeof(T));
  constexpr uintptr_t kScaleAlign = 4 * kVec < 16 ? 4 * kVec : 16;  // bytes of load_scales' loads
  __shared__ C q_score[kSelectWarps][kQueue];
  __shared__ int q_col[kSelectWarps][kQueue];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kSelectWarps + warp;
  if (r >= b.rows) return;  // whole warps leave; nothing below synchronizes the block
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * seg_cols;
  const int64_t c_end = c_begin + seg_cols < b.cols ? c_begin + seg_cols : b.cols;
  if (c_begin >= c_end) return;

  point_at_state_copy(p, blockIdx.y);  // segment s feeds the state copy s * B rows further on

  const int64_t row = b.row_offset + r;
  const RowState st = row_state(p, row);
  const T* data = static_cast<const T*>(b.data) + r * b.row_stride;
  const unsigned lanes_below = (1u << lane) - 1u;
  C* qs = q_score[warp];
  int* qc = q_col[warp];
  C row_scale = 1;
  if constexpr (kScaled) row_scale = static_cast<C>(__ldg(b.row_scale + r));
  // The score of column c from its stored value x.
  auto scaled = [&](C x, int64_t c) -> C {
    if constexpr (kScaled) return (x * row_scale) * static_cast<C>(__ldg(b.col_scale + c));
    return x;
  };

  C lo, hi;
  const double hi_d = row_upper(p, row);
  StreamGate gate{};
  // Every lane reads the state (a broadcast load) after the __syncwarp that follows lane 0's writes.
  auto refresh = [&] {
    if constexpr (kStream) {
      gate = stream_gate(p, st);
      set_bounds(p.min_score, hi_d, lo, hi);
    } else {
      set_bounds(fmax(row_entry_threshold(p, st), p.min_score), hi_d, lo, hi);
    }
  };
  refresh();

  int count = 0;  // warp-uniform queue length
  auto flush = [&] {
    __syncwarp();
    if (lane == 0) {
      // heap_offer re-tests every entry against the current roots: entries admitted under an older
      // (looser) bound or gate are dropped there, so the state is exactly the CPU kernel's. (Stream
      // mode computes an admitted entry's key again here; after the heaps fill, few are admitted.)
      for (int i = 0; i < count; ++i) offer_candidate(p, st, row, static_cast<double>(qs[i]), b.col_offset + qc[i]);
    }
    count = 0;
    __syncwarp();
    refresh();
  };

  // Rare path: the lanes' passing elements (bits of `pass`), one per lane per round. Scores are read
  // again from memory (L1/L2) instead of indexing the tile's register array at run time.
  auto survivors = [&](uint32_t pass, int64_t base, bool vector_layout) {
    while (__any_sync(kFull, pass != 0)) {
      bool want = pass != 0;
      int64_t c = 0;
      C s = 0;
      if (want) {
        const int e = __ffs(pass) - 1;
        pass &= pass - 1;
        c = vector_layout ? base + ((e / kVec) * 32 + lane) * kVec + (e % kVec) : base + e * 32 + lane;
        s = scaled(load_score(data + c * b.col_stride), c);
        const double sd = static_cast<double>(s);
        const int64_t j = b.col_offset + c;
        if constexpr (kStream) want = stream_gate_admits(gate, sd, j, row_sample_key(p, row, sd, j));
        want = want && !id_banned(p, row, j) && label_allowed(p, row, j);
      }
      const unsigned ballot = __ballot_sync(kFull, want);
      if (ballot == 0) continue;
      if (count + __popc(ballot) > kQueue) flush();
      if (want) {
        const int pos = count + __popc(ballot & lanes_below);
        qs[pos] = s;
        qc[pos] = static_cast<int>(c);
      }
      count += __popc(ballot);
    }
  };

  auto test_tile = [&](const C (&v)[kLaneElems], int64_t base, bool vector_layout) {
    uint32_t pass = 0;
#pragma unroll
    for (int e = 0; e < kLaneElems; ++e) pass |= (v[e] >= lo && v[e] <= hi) ? (1u << e) : 0u;
    if (__any_sync(kFull, pass != 0)) survivors(pass, base, vector_layout);
  };

  // Scalar tile: lane handles columns base + e * 32 + lane (coalesced for contiguous rows); columns
  // past `end` read as NaN, which no bound admits.
  auto scalar_tile = [&](int64_t base, int64_t end) {
    C v[kLaneElems];
#pragma unroll
    for (int e = 0; e < kLaneElems; ++e) {
      const int64_t c = base + e * 32 + lane;
      v[e] = c < end ? scaled(load_score(data + c * b.col_stride), c) : static_cast<C>(NAN);
    }
    test_tile(v, base, false);
  };

  int64_t c = c_begin;
  const uintptr_t addr = reinterpret_cast<uintptr_t>(data + c_begin);
  const int64_t head = static_cast<int64_t>(((16 - addr % 16) % 16) / sizeof(T));
  // Vector loads need the scores 16-byte aligned past the head and, when scaled, the column scales of
  // the same columns aligned for load_scales; otherwise the row takes scalar tiles throughout.
  const bool scales_aligned =
      !kScaled || reinterpret_cast<uintptr_t>(b.col_scale + c_begin + head) % kScaleAlign == 0;
  if (b.col_stride == 1 && addr % sizeof(T) == 0 && scales_aligned) {
    if (head > 0) {
      const int64_t end = c + head < c_end ? c + head : c_end;
      scalar_tile(c, end);
      c = end;
    }
    for (; c + kTile <= c_end; c += kTile) {
      C v[kLaneElems];
#pragma unroll
      for (int u = 0; u < kLaneElems / kVec; ++u) {
        const int64_t col = c + (u * 32 + lane) * kVec;
        load_vector(data + col, v + u * kVec);
        if constexpr (kScaled) {
          C cs[kVec];
          load_scales<kVec>(b.col_scale + col, cs);
#pragma unroll
          for (int e = 0; e < kVec; ++e) v[u * kVec + e] = (v[u * kVec + e] * row_scale) * cs[e];
        }
      }
      test_tile(v, c, true);
    }
  }
  for (; c < c_end; c += kTile) scalar_tile(c, c_end);
  if (count > 0) flush();
}

// One thread per row: the statistics are a diagnostic, read once per score block.
template <typename T>
__global__ void filter_counts_kernel(TopkParams p, ScoreBlock b, int64_t* counts) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= b.rows) return;
  const int64_t row = b.row_offset + r;
  count_filters_row(p, static_cast<const T*>(b.data) + r * b.row_stride, b.cols, b.col_stride, row, b.col_offset,
                    counts + row * kScoreFilters);
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

void topk_select_block_segments_cuda(const TopkParams& p, const ScoreBlock& block, int64_t segments,
                                     void* stream) {
  check_params(p);
  check_block(p, block, /*scales_allowed=*/true);
  HN_CHECK_PARAM(segments >= 1 && segments <= 65535, "segments must be in [1, 65535]");
  if (block.rows == 0 || block.cols == 0 || p.k == 0) return;
  HN_CHECK(ceil_div(block.rows, kSelectWarps) < (int64_t{1} << 31), "too many rows in one block");
  auto s = static_cast<cudaStream_t>(stream);
  HN_DISPATCH_FLOAT(block.dtype, T, [&] {
    // Chunks of < 2^31 columns keep the queue's column offsets in int32; each chunk is split into
    // `segments` column ranges, one per grid row, each feeding its own copy of the state.
    for (int64_t c0 = 0; c0 < block.cols; c0 += kMaxChunkCols) {
      ScoreBlock chunk = block;
      chunk.cols = block.cols - c0 < kMaxChunkCols ? block.cols - c0 : kMaxChunkCols;
      chunk.data = static_cast<const T*>(block.data) + c0 * block.col_stride;
      chunk.col_offset = block.col_offset + c0;
      if (block.col_scale != nullptr) chunk.col_scale = block.col_scale + c0;
      const int64_t seg_cols = ceil_div(chunk.cols, segments);
      const dim3 grid(static_cast<unsigned>(ceil_div(block.rows, kSelectWarps)), static_cast<unsigned>(segments));
      HN_BOOL_SWITCH(p.mode == SelectMode::Stream, kStream, [&] {
        HN_BOOL_SWITCH(block.row_scale != nullptr, kScaled, [&] {
          HN_LAUNCH(grid, kSelectThreads, 0, s, select_block_kernel<T, kStream, kScaled>)(p, chunk, seg_cols);
        });
      });
      HN_CUDA_CHECK(cudaGetLastError());
    }
  });
}

void topk_select_block_cuda(const TopkParams& p, const ScoreBlock& block, void* stream) {
  topk_select_block_segments_cuda(p, block, 1, stream);
}

void topk_filter_counts_cuda(const TopkParams& p, const ScoreBlock& block, int64_t* counts, void* stream) {
  check_params(p);
  check_block(p, block);
  if (block.rows == 0 || block.cols == 0) return;
  HN_CHECK_PARAM(counts != nullptr, "filter counts are null");
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(ceil_div(block.rows, kThreads));
  HN_DISPATCH_FLOAT(block.dtype, T, [&] {
    HN_LAUNCH(grid, kThreads, 0, s, filter_counts_kernel<T>)(p, block, counts);
    HN_CUDA_CHECK(cudaGetLastError());
  });
}

void topk_finalize_cuda(const TopkParams& p, double* out_scores, int64_t* out_indices, void* stream) {
  check_params(p);
  if (p.num_rows == 0 || p.k == 0) return;
  HN_CHECK_PARAM(out_scores != nullptr && out_indices != nullptr, "finalize outputs are null");
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(ceil_div(p.num_rows, kThreads));
  HN_LAUNCH(grid, kThreads, 0, s, finalize_kernel)(p, out_scores, out_indices);
  HN_CUDA_CHECK(cudaGetLastError());
}

void topk_merge_cuda(const TopkParams& p, const TopkParams& other, void* stream) {
  check_params(p);
  check_params(other);
  check_same_layout(p, other);
  if (p.num_rows == 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(ceil_div(p.num_rows, kThreads));
  HN_LAUNCH(grid, kThreads, 0, s, merge_kernel)(p, other);
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
