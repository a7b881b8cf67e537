// The launch arguments both Python modules build from plain integers (hnsample._C in bindings.cpp and
// the test-only CPU emulator's _cuda_emu): pointers arrive as ints, blocks as their fields.
#pragma once

#include <cstdint>

#include "info_nce.h"
#include "topk_select.h"

namespace hnsample {

template <typename T>
T* as_ptr(uintptr_t v) {
  return reinterpret_cast<T*>(v);
}

inline ScoreBlock make_block(uintptr_t data, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                             int64_t col_stride, int64_t row_offset, int64_t col_offset) {
  ScoreBlock b;
  b.data = as_ptr<const void>(data);
  b.dtype = dtype;
  b.rows = rows;
  b.cols = cols;
  b.row_stride = row_stride;
  b.col_stride = col_stride;
  b.row_offset = row_offset;
  b.col_offset = col_offset;
  return b;
}

// A score block whose scores the select kernel scales (ScoreBlock::row_scale, col_scale; 0 = none).
inline ScoreBlock make_scaled_block(uintptr_t data, int dtype, int64_t rows, int64_t cols, int64_t row_stride,
                                    int64_t col_stride, int64_t row_offset, int64_t col_offset, uintptr_t row_scale,
                                    uintptr_t col_scale, int scale_dtype) {
  ScoreBlock b = make_block(data, dtype, rows, cols, row_stride, col_stride, row_offset, col_offset);
  b.row_scale = as_ptr<const float>(row_scale);
  b.col_scale = as_ptr<const float>(col_scale);
  b.scale_dtype = scale_dtype;
  return b;
}

inline PairBlock make_pair_block(uintptr_t data, uintptr_t guide, int dtype, int64_t rows, int64_t cols,
                                 int64_t row_stride, int64_t col_stride, int64_t guide_row_stride,
                                 int64_t guide_col_stride, int64_t row_offset, int64_t col_offset) {
  PairBlock b;
  b.data = as_ptr<void>(data);
  b.guide = as_ptr<const void>(guide);
  b.dtype = dtype;
  b.rows = rows;
  b.cols = cols;
  b.row_stride = row_stride;
  b.col_stride = col_stride;
  b.guide_row_stride = guide_row_stride;
  b.guide_col_stride = guide_col_stride;
  b.row_offset = row_offset;
  b.col_offset = col_offset;
  return b;
}

}  // namespace hnsample
