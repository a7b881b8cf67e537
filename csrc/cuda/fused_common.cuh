// Pieces every fused score kernel shares (the mma.sync kernels in topk_fused.cu and the sm_90a wgmma
// kernel): asynchronous global->shared copies, and the epilogue that turns one accumulator into a
// scaled score, filters it against its row's bounds (widened by the tf32 slack when the products are
// inexact) and appends the survivor to the row's candidate list. Semantics: FusedBlock in
// ../topk_select.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../topk_select.h"
#include "ptx.cuh"

namespace hnsample {

// The asynchronous copies every fused kernel's main loop uses (wrappers in ptx.cuh).
using ptx::cp_async_16;
using ptx::cp_async_commit;
using ptx::cp_async_wait;

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

// Accumulator `acc` of (row, col), row < f.rows already checked. Scaling keeps the two-pass path's
// order (acc * row scale, then * column scale), so 16-bit scores equal its own up to summation order.
// NaN scores fail both comparisons and are never kept (as in every other path).
__device__ __forceinline__ void fused_keep(const FusedBlock& f, const FusedRow& r, int64_t row, int64_t col,
                                           float acc) {
  if (!f.row_scale && !f.col_scale && !f.row_slack) {
    // dot on exact products (the common case): the score is the accumulator; test it first, so the
    // almost always rejected scores cost a compare and no loads
    if (!(acc >= r.lo && acc <= r.hi) || col >= f.cols) return;
  } else if (col >= f.cols) {
    return;
  }
  float s = f.row_scale ? acc * r.scale : acc;
  if (f.col_scale) s *= f.col_scale[col];
  const float w = f.row_slack ? r.slack * f.col_slack[col] : 0.0f;
  if (s + w >= r.lo && s - w <= r.hi) {
    // A row already past its cap is redone on the two-pass path: further appends are wasted atomics.
    if (*static_cast<volatile const int32_t*>(&f.cand_count[row]) > f.cand_cap) return;
    const int pos = atomicAdd(&f.cand_count[row], 1);
    if (pos < f.cand_cap) {
      f.cand_score[row * f.cand_cap + pos] = s;
      f.cand_col[row * f.cand_cap + pos] = static_cast<int32_t>(col);
    }
  }
}

}  // namespace hnsample
