// CUDA certified screening (csrc/topk_screen.h): the CPU's csrc/cpu/topk_screen.cpp on the device.
// Decomposition: one warp per block row. Lanes read the row's approximate scores S^ (coalesced, 8 per
// lane per tile) and test them against the row's interval widened by its largest error bound
// (screen_bulk_bounds over the block's column maxima); one vote per tile skips tiles without
// survivors. A survivor gets its exact bound w (screen_width): it is dropped when [S^ - w, S^ + w]
// certainly misses the score filters, certainly stays below the state's threshold (window mode), or,
// with the sampling key taken at the upper bound, cannot pass the stream gate; ids and labels are
// exact. The rest go to a per-warp queue; at a flush the lanes rescore the queued candidates
// canonically in parallel (screen_rescore: the very function the CPU's reference path uses, so the
// scores are the same bits) and lane 0 offers them to the row's state with the shared heap code.
// The state only ever takes exact canonical scores, and its result does not depend on the order of
// the offers, so it equals the CPU kernel's. (The CPU also pre-selects within a block on lower
// bounds; that only saves rescorings, and the count of rescorings is the one thing that differs.)
// Memory: reads the block once, the raw rows of the survivors, and updates the state in place (or, with
// segments, column range s of the block updates state copy s).
#include <cuda_runtime.h>

#include "../params_check.h"
#include "../topk_screen.h"
#include "cuda_common.cuh"

namespace hnsample {
namespace {

constexpr unsigned kFull = 0xffffffffu;
constexpr int kScreenWarps = 8;
constexpr int kScreenThreads = kScreenWarps * 32;
constexpr int kLaneElems = 8;              // approximate scores per lane per tile
constexpr int kTile = 32 * kLaneElems;     // per warp per tile
constexpr int kQueue = 64;                 // candidates a warp rescores together at a flush
constexpr int kThreads = 128;              // one thread per row / per pair

__device__ __forceinline__ float approx_at(const float* p) { return __ldcs(p); }
__device__ __forceinline__ float approx_at(const bf16_bits* p) {
  return to_float(bf16_bits{__ldcs(reinterpret_cast<const unsigned short*>(p))});
}

// Columns [blockIdx.y seg_cols, ...) of the block feed state copy blockIdx.y (a [segments, B, capacity]
// state, merged by the caller), so that few rows still fill the GPU.
template <typename A, typename T>
__global__ void __launch_bounds__(kScreenThreads, 3) screen_block_kernel(TopkParams p, ScreenBlock s, int64_t seg_cols) {
  __shared__ float q_score[kScreenWarps][kQueue];
  __shared__ int q_col[kScreenWarps][kQueue];

  const ScoreBlock& b = s.approx;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kScreenWarps + warp;
  if (r >= b.rows) return;  // whole warps leave; nothing below synchronizes the block
  const int64_t c_begin = static_cast<int64_t>(blockIdx.y) * seg_cols;
  const int64_t c_end = c_begin + seg_cols < b.cols ? c_begin + seg_cols : b.cols;
  if (c_begin >= c_end) return;
  point_at_state_copy(p, blockIdx.y);
  const int64_t row = b.row_offset + r;
  const RowState st = row_state(p, row);
  const double hi = row_upper(p, row);
  const double width = screen_row_width(s, s.col_max[0], s.col_max[1], s.col_max[2], r);
  const bool stream = p.mode == SelectMode::Stream;
  const A* approx = static_cast<const A*>(b.data) + r * b.row_stride;
  const unsigned lanes_below = (1u << lane) - 1u;
  float* qs = q_score[warp];
  int* qc = q_col[warp];

  // lo: the lowest score the row can still take (window: its entry threshold; min_score); low / high:
  // the bulk bounds on S^ for it. Every lane reads the state after the __syncwarp that follows lane
  // 0's writes.
  double lo = 0;
  float low = 0, high = 0;
  StreamGate gate{};
  auto refresh = [&] {
    const double t = row_entry_threshold(p, st);
    lo = t < p.min_score ? p.min_score : t;  // std::max(t, min_score), as the CPU
    screen_bulk_bounds(lo, hi, width, s.rel, low, high);
    if (stream) gate = stream_gate(p, st);
  };
  refresh();
  if (!(lo <= hi)) return;  // an empty interval (or a NaN bound): nothing can be taken

  int count = 0;  // warp-uniform queue length
  auto flush = [&] {
    __syncwarp();
    for (int i = lane; i < count; i += 32) qs[i] = screen_rescore<T>(s, r, qc[i]);
    __syncwarp();
    if (lane == 0) {
      // Segments of one row count into the same slot.
      if (s.rescored != nullptr)
        atomicAdd(reinterpret_cast<unsigned long long*>(s.rescored + row), static_cast<unsigned long long>(count));
      for (int i = 0; i < count; ++i) {
        const double score = static_cast<double>(qs[i]);
        if (score >= p.min_score && score <= hi) offer_candidate(p, st, row, score, b.col_offset + qc[i]);
      }
    }
    count = 0;
    __syncwarp();
    refresh();
  };

  for (int64_t base = c_begin; base < c_end; base += kTile) {
    uint32_t pass = 0;
#pragma unroll
    for (int e = 0; e < kLaneElems; ++e) {
      const int64_t c = base + e * 32 + lane;
      if (c < c_end) {
        const float a = approx_at(approx + c * b.col_stride);
        if ((a >= low && a <= high) || !screen_finite(a)) pass |= 1u << e;
      }
    }
    // The rare survivors, one per lane per round: exact bound, masks, then the queue.
    while (__any_sync(kFull, pass != 0)) {
      bool want = pass != 0;
      int64_t c = 0;
      if (want) {
        const int e = __ffs(pass) - 1;
        pass &= pass - 1;
        c = base + e * 32 + lane;
        const int64_t j = b.col_offset + c;
        want = !id_banned(p, row, j) && label_allowed(p, row, j);
        if (want) {
          const float a = approx_at(approx + c * b.col_stride);
          const double w = screen_finite(a) ? screen_width(s, r, c, a) : INFINITY;
          const bool known = screen_finite(w);
          const double lower = known ? a - w : -INFINITY, upper = known ? a + w : INFINITY;
          want = !(upper < p.min_score || lower > hi || (!stream && upper < lo));
          // The sampling key can only be as high as the score's upper bound makes it.
          if (want && stream) want = stream_gate_admits(gate, upper, j, row_sample_key(p, row, upper, j));
        }
      }
      const unsigned ballot = __ballot_sync(kFull, want);
      if (ballot == 0) continue;
      if (count + __popc(ballot) > kQueue) flush();
      if (want) qc[count + __popc(ballot & lanes_below)] = static_cast<int>(c);
      count += __popc(ballot);
    }
  }
  if (count > 0) flush();
}

// One thread per row: the statistics are a diagnostic, counted once per block.
template <typename A, typename T>
__global__ void screen_counts_kernel(TopkParams p, ScreenBlock s, int64_t* counts) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= s.approx.rows) return;
  screen_count_row<A>(p, s, r, counts + (s.approx.row_offset + r) * kScoreFilters,
                      [&](int64_t c) { return screen_rescore<T>(s, r, c); });
}

template <typename T>
__global__ void canonical_norms_kernel(const T* x, int64_t rows, int64_t dim, int64_t stride, double* out) {
  const int64_t r = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (r >= rows) return;
  out[r] = canonical_norm(x + r * stride, 1, dim);
}

template <typename T>
__global__ void canonical_pairs_kernel(const T* q, int64_t q_stride, const T* c, int64_t c_stride, int64_t dim,
                                       const int64_t* ids, int64_t rows, int64_t cols, const double* q_norms,
                                       const double* c_norms, float* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= rows * cols) return;
  const int64_t r = i / cols, j = ids[i];
  if (j < 0) {
    out[i] = NAN;
    return;
  }
  const double dot = canonical_dot(q + r * q_stride, 1, c + j * c_stride, 1, dim);
  const bool cosine = q_norms != nullptr;
  out[i] = canonical_score(dot, cosine, cosine ? q_norms[r] : 0.0, cosine ? c_norms[j] : 0.0);
}

// Calls f.template run<A, T>() for the approximate scores' type A and the raw rows' type T.
template <typename F>
void dispatch_screen(const ScreenBlock& s, const F& f) {
  const bool bf16 = static_cast<DType>(s.approx.dtype) == DType::BFloat16;
  switch (static_cast<DType>(s.dtype)) {
    case DType::Float32:
      return bf16 ? f.template run<bf16_bits, float>() : f.template run<float, float>();
    case DType::BFloat16:
      return bf16 ? f.template run<bf16_bits, bf16_bits>() : f.template run<float, bf16_bits>();
    default:
      return bf16 ? f.template run<bf16_bits, half_bits>() : f.template run<float, half_bits>();
  }
}

struct BlockLaunch {
  const TopkParams& p;
  const ScreenBlock& s;
  int64_t segments;
  cudaStream_t stream;
  template <typename A, typename T>
  void run() const {
    const int64_t seg_cols = ceil_div(s.approx.cols, segments);
    const dim3 grid(static_cast<unsigned>(ceil_div(s.approx.rows, kScreenWarps)), static_cast<unsigned>(segments));
    HN_LAUNCH(grid, kScreenThreads, 0, stream, screen_block_kernel<A, T>)(p, s, seg_cols);
    HN_CUDA_CHECK(cudaGetLastError());
  }
};

struct CountsLaunch {
  const TopkParams& p;
  const ScreenBlock& s;
  int64_t* counts;
  cudaStream_t stream;
  template <typename A, typename T>
  void run() const {
    const unsigned grid = static_cast<unsigned>(ceil_div(s.approx.rows, kThreads));
    HN_LAUNCH(grid, kThreads, 0, stream, screen_counts_kernel<A, T>)(p, s, counts);
    HN_CUDA_CHECK(cudaGetLastError());
  }
};

void check_device_screen(const TopkParams& p, const ScreenBlock& s) {
  check_params(p);
  check_screen(p, s);
  HN_CHECK_PARAM(s.approx.rows == 0 || s.approx.cols == 0 || s.col_max != nullptr,
                 "col_max (the block's largest col_b, col_f, col_h) is required on CUDA");
  HN_CHECK_PARAM(s.approx.cols < (int64_t{1} << 31), "a screened block has at most 2^31 - 1 columns");
  HN_CHECK_PARAM(s.defer_slots == 0, "deferred rescoring (defer_slots) is a CPU feature");
}

}  // namespace

void topk_screen_block_segments_cuda(const TopkParams& p, const ScreenBlock& s, int64_t segments, void* stream) {
  check_device_screen(p, s);
  HN_CHECK_PARAM(segments >= 1 && segments <= 65535, "segments must be in [1, 65535]");
  if (s.approx.rows == 0 || s.approx.cols == 0 || p.k == 0) return;
  HN_CHECK(ceil_div(s.approx.rows, kScreenWarps) < (int64_t{1} << 31), "too many rows in one block");
  dispatch_screen(s, BlockLaunch{p, s, segments, static_cast<cudaStream_t>(stream)});
}

void topk_screen_block_cuda(const TopkParams& p, const ScreenBlock& s, void* stream) {
  topk_screen_block_segments_cuda(p, s, 1, stream);
}

void topk_screen_filter_counts_cuda(const TopkParams& p, const ScreenBlock& s, int64_t* counts, void* stream) {
  check_params(p);
  check_screen(p, s);
  if (s.approx.rows == 0 || s.approx.cols == 0) return;
  HN_CHECK_PARAM(counts != nullptr, "filter counts are null");
  dispatch_screen(s, CountsLaunch{p, s, counts, static_cast<cudaStream_t>(stream)});
}

void canonical_norms_cuda(const void* x, int dtype, int64_t rows, int64_t dim, int64_t stride, double* out,
                          void* stream) {
  HN_CHECK_PARAM(rows >= 0 && dim >= 0 && (rows <= 1 || stride >= dim), "bad norm arguments");
  HN_CHECK_PARAM(rows == 0 || (out != nullptr && (dim == 0 || x != nullptr)), "norm inputs are null");
  if (rows == 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(ceil_div(rows, kThreads));
  HN_DISPATCH_FLOAT(dtype, T, [&] {
    HN_LAUNCH(grid, kThreads, 0, st, canonical_norms_kernel<T>)(static_cast<const T*>(x), rows, dim, stride, out);
    HN_CUDA_CHECK(cudaGetLastError());
  });
}

void canonical_pairs_cuda(const void* q, int64_t q_stride, const void* c, int64_t c_stride, int dtype, int64_t dim,
                          const int64_t* ids, int64_t rows, int64_t cols, const double* q_norms,
                          const double* c_norms, float* out, void* stream) {
  HN_CHECK_PARAM(rows >= 0 && cols >= 0 && dim >= 0, "bad pair arguments");
  HN_CHECK_PARAM(rows * cols == 0 || (ids != nullptr && out != nullptr && (dim == 0 || (q && c))),
                 "pair inputs are null");
  HN_CHECK_PARAM((q_norms == nullptr) == (c_norms == nullptr), "cosine needs both norms");
  if (rows * cols == 0) return;
  auto st = static_cast<cudaStream_t>(stream);
  const unsigned grid = static_cast<unsigned>(ceil_div(rows * cols, kThreads));
  HN_DISPATCH_FLOAT(dtype, T, [&] {
    HN_LAUNCH(grid, kThreads, 0, st, canonical_pairs_kernel<T>)(static_cast<const T*>(q), q_stride,
                                                                static_cast<const T*>(c), c_stride, dim, ids, rows,
                                                                cols, q_norms, c_norms, out);
    HN_CUDA_CHECK(cudaGetLastError());
  });
}

}  // namespace hnsample
