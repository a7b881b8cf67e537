// Pieces every fused score kernel shares (the mma.sync kernels in topk_fused.cu and the sm_90a wgmma
// kernel): asynchronous global->shared copies, the tile's column factors staged in shared memory, and
// the epilogue that turns a row's accumulators into scaled scores, filters them against the row's
// bounds (widened by the tf32 slack when the products are inexact) and appends the survivors to the
// row's candidate list with one atomic per (warp, row). Semantics: FusedBlock in ../topk_select.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "../topk_select.h"
#include "ptx.cuh"

namespace hnsample {

// The asynchronous copies every fused kernel's main loop uses (wrappers in ptx.cuh).
using ptx::cp_async;
using ptx::cp_async_commit;
using ptx::cp_async_wait;

constexpr unsigned kFullWarp = 0xffffffffu;

// What the epilogue needs of one row, loaded once per row and thread.
struct FusedRow {
  float lo, hi, scale, slack;
};

__device__ __forceinline__ FusedRow fused_row(const FusedBlock& f, int64_t row) {
  FusedRow r;
  r.lo = f.row_lo[row];
  r.hi = f.row_hi[row];
  r.scale = f.row_scale ? f.row_scale[row] : 1.0f;
  r.slack = f.row_slack ? f.row_slack[row] : 0.0f;
  return r;
}

// Column factors of one candidate tile [n0, n0 + tile columns), as the epilogue reads them: from shared
// memory, staged once per tile by the kernel (fused_stage_col), so a survivor costs a shared load
// instead of a dependent global one.
struct FusedCols {
  const float* scale;  // [tile columns] shared: f.col_scale[n0 + c]; read only when f.col_scale is set
  const float* slack;  // [tile columns] shared: f.col_slack[n0 + c]; read only when f.row_slack is set
  int64_t n0;          // the tile's first column
  int64_t limit;       // f.cols - n0: tile columns c >= limit lie past the block and are never kept
};

__device__ __forceinline__ FusedCols fused_cols(const FusedBlock& f, int64_t n0, const float* scale,
                                                const float* slack) {
  return FusedCols{scale, slack, n0, f.cols - n0};
}

// Issues the asynchronous copy of factors[col] (f.col_scale or f.col_slack) to `dst` in shared memory,
// 0 past f.cols (where the epilogue never reads it). The caller commits it into a cp.async group and
// waits for that group before a barrier that orders it before the epilogue's reads: the copy keeps
// no register live and the load's latency overlaps the main loop.
__device__ __forceinline__ void fused_stage_col(const float* factors, const FusedBlock& f, int64_t col, float* dst) {
  const bool valid = col < f.cols;
  cp_async<4>(dst, valid ? factors + col : factors, valid);
}

// Whether accumulator `v` of tile column c (c < cols.limit already checked) survives its row's
// bounds; `v` becomes its score. Scaling keeps the two-pass path's order (acc * row scale, then * column
// scale), so 16-bit scores equal its own up to summation order; the slack is row_slack * col_slack.
// NaN scores fail both comparisons and are never kept (as in every other path).
__device__ __forceinline__ bool fused_survives(const FusedBlock& f, const FusedRow& r, const FusedCols& cols, int c,
                                               float& v) {
  float s = f.row_scale ? v * r.scale : v;
  if (f.col_scale) s *= cols.scale[c];
  const float w = f.row_slack ? r.slack * cols.slack[c] : 0.0f;
  v = s;
  return s + w >= r.lo && s - w <= r.hi;
}

// Warp-collective (all 32 lanes, converged): the lanes of each quad 4g .. 4g + 3 append n entries each
// (n = 0 allowed) to the quad's one row, which must be the same row for the four lanes and differ
// between quads (true of both accumulator fragments: the row is a function of lane / 4). One atomicAdd
// per quad with a nonzero total, by the quad's first lane, reserves the quad's slots; the quad's
// inclusive prefix sum (two shuffles up) orders them by lane. Returns the lane's first slot. Slots at
// or past f.cand_cap are counted but not written: a count past the cap is the overflow signal (the
// row's 128-row tile is redone on the two-pass path). A row already past its cap takes no more appends
// (the reads of the count are volatile, as the other CTAs add to it): every lane then gets
// f.cand_cap, so it writes nothing, and the count stays put.
__device__ __forceinline__ int64_t fused_reserve(const FusedBlock& f, int64_t row, int n, int lane) {
  const int q = lane % 4;
  int upto = n;  // entries of lanes q' <= q of the quad
  int below = __shfl_up_sync(kFullWarp, upto, 1, 4);
  if (q >= 1) upto += below;
  below = __shfl_up_sync(kFullWarp, upto, 2, 4);
  if (q >= 2) upto += below;
  const int total = __shfl_sync(kFullWarp, upto, 3, 4);
  int base = -1;  // -1: the row is closed (or nothing to append)
  if (q == 0 && total > 0 && *static_cast<volatile const int32_t*>(&f.cand_count[row]) <= f.cand_cap)
    base = atomicAdd(&f.cand_count[row], total);
  base = __shfl_sync(kFullWarp, base, 0, 4);
  return base < 0 ? f.cand_cap : static_cast<int64_t>(base) + (upto - n);
}

// Warp-collective (all 32 lanes, converged) epilogue of one row per quad (see fused_reserve): each lane
// holds kN accumulators of its quad's row `row` (row >= f.rows: a row past the block, nothing kept),
// acc(j) the j-th (a reference: a survivor's accumulator is replaced by its score), in tile column
// col(j). Keeps every accumulator whose score lies in the row's bounds (fused_survives), in a column
// before cols.limit; the survivors of a quad share one atomic.
template <int kN, class AccAt, class ColAt>
__device__ __forceinline__ void fused_keep_row(const FusedBlock& f, const FusedCols& cols, int64_t row, int lane,
                                               AccAt&& acc, ColAt&& col) {
  static_assert(kN >= 1 && kN <= 64, "one bit per accumulator of the row");
  using Mask = std::conditional_t<(kN > 32), unsigned long long, unsigned>;
  Mask keep = 0;
  if (row < f.rows) {
    const FusedRow r = fused_row(f, row);
    if (!f.row_scale && !f.col_scale && !f.row_slack) {
      // dot on exact products (the common case): the score is the accumulator; test it first, so the
      // almost always rejected scores cost two compares
#pragma unroll
      for (int j = 0; j < kN; ++j) {
        const float v = acc(j);
        if (v >= r.lo && v <= r.hi && col(j) < cols.limit) keep |= Mask{1} << j;
      }
    } else {
#pragma unroll
      for (int j = 0; j < kN; ++j)
        if (col(j) < cols.limit && fused_survives(f, r, cols, col(j), acc(j))) keep |= Mask{1} << j;
    }
  }
  if (!__any_sync(kFullWarp, keep != 0)) return;  // uniform: no lane of the warp keeps anything
  int n;
  if constexpr (kN > 32) {
    n = __popcll(keep);
  } else {
    n = __popc(keep);
  }
  int64_t pos = fused_reserve(f, row, n, lane);
  if (keep == 0) return;
#pragma unroll
  for (int j = 0; j < kN; ++j) {
    if (!((keep >> j) & 1u)) continue;
    if (pos < f.cand_cap) {
      f.cand_score[row * f.cand_cap + pos] = acc(j);
      f.cand_col[row * f.cand_cap + pos] = static_cast<int32_t>(cols.n0 + col(j));
    }
    ++pos;
  }
}

}  // namespace hnsample
