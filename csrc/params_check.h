// The checks every launcher runs on what Python hands over, before any kernel reads or writes: the
// state layout must be the one state_layout() derives, every buffer a mode needs must be there (and
// none it must not have), sizes and strides must be sane. (Optional pairs such as query and candidate
// labels are read only when both are set, so one of them null is not an error: an empty tensor has a
// null pointer.) A mismatch throws ParamError (a Python
// ValueError naming the field), so a wrong capacity or a missing buffer is an exception, never an
// out-of-bounds write. Host code only: launchers call these once per launch.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "info_nce.h"
#include "topk_screen.h"
#include "topk_select.h"

namespace hnsample {

#define HN_CHECK_PARAM(cond, msg)                                                              \
  do {                                                                                         \
    if (!(cond)) throw ::hnsample::ParamError(std::string("hnsample: invalid kernel parameters: ") + (msg)); \
  } while (0)

inline bool valid_float_dtype(int code) { return code >= 0 && code <= static_cast<int>(DType::BFloat16); }

inline bool aligned_to(const void* ptr, uintptr_t bytes) { return reinterpret_cast<uintptr_t>(ptr) % bytes == 0; }

inline void check_params(const TopkParams& p) {
  HN_CHECK_PARAM(p.num_rows >= 0 && p.k >= 0 && p.skip >= 0 && p.pool >= -1,
                 "num_rows, k and skip must be >= 0 and pool >= -1");
  const int sampling = static_cast<int>(p.sampling);
  HN_CHECK_PARAM(sampling >= 0 && sampling <= 2, "sampling code " + std::to_string(sampling) + " is unknown");
  const StateLayout layout = state_layout(p.k, p.skip, p.pool, p.sampling);
  HN_CHECK_PARAM(p.mode == layout.mode && p.capacity == layout.capacity,
                 "capacity " + std::to_string(p.capacity) + " / mode " + std::to_string(static_cast<int>(p.mode)) +
                     " do not match the layout of k=" + std::to_string(p.k) + ", skip=" + std::to_string(p.skip) +
                     ", pool=" + std::to_string(p.pool) + " (capacity " + std::to_string(layout.capacity) +
                     ", mode " + std::to_string(static_cast<int>(layout.mode)) + ")");
  if (p.num_rows > 0) {
    HN_CHECK_PARAM(p.st_count != nullptr && aligned_to(p.st_count, 8), "st_count must be an int64 buffer");
    if (p.capacity > 0) {
      HN_CHECK_PARAM(p.st_score != nullptr && p.st_index != nullptr && aligned_to(p.st_score, 8) &&
                         aligned_to(p.st_index, 8),
                     "st_score and st_index must be [num_rows, capacity] buffers");
      HN_CHECK_PARAM((p.st_key != nullptr) == (p.sampling != Sampling::Top),
                     p.sampling == Sampling::Top ? "st_key must be null when sampling is top"
                                                 : "st_key must be a [num_rows, capacity] buffer when sampling");
      HN_CHECK_PARAM(p.st_key == nullptr || aligned_to(p.st_key, 8), "st_key must be a float64 buffer");
    }
  }
  HN_CHECK_PARAM(p.banned_cols >= 0, "banned_cols must be >= 0");
  if (p.banned_cols > 0 && p.num_rows > 0) {
    HN_CHECK_PARAM(p.banned != nullptr && aligned_to(p.banned, 8), "banned must be a [num_rows, banned_cols] buffer");
    HN_CHECK_PARAM(p.num_rows == 1 || p.banned_stride >= p.banned_cols, "banned_stride must be >= banned_cols");
  }
  HN_CHECK_PARAM(!std::isnan(p.min_score) && !std::isnan(p.max_score), "min_score and max_score must not be NaN");
  HN_CHECK_PARAM(p.sampling != Sampling::Softmax || (std::isfinite(p.inv_temperature) && p.inv_temperature > 0),
                 "inv_temperature must be finite and > 0 for softmax sampling");
  HN_CHECK_PARAM(p.noise_row_offset >= 0, "noise_row_offset must be >= 0");
}

// scales_allowed: the launcher applies the block's cosine scales (the CUDA select launcher); the others
// refuse a block that has them rather than select on unscaled products.
inline void check_block(const TopkParams& p, const ScoreBlock& b, bool scales_allowed = false) {
  HN_CHECK_PARAM(valid_float_dtype(b.dtype), "score block dtype code " + std::to_string(b.dtype) + " is not a float");
  if (b.row_scale != nullptr || b.col_scale != nullptr) {
    HN_CHECK_PARAM(scales_allowed, "this launcher does not apply score block scales (row_scale, col_scale)");
    HN_CHECK_PARAM(b.row_scale != nullptr && b.col_scale != nullptr, "row_scale and col_scale go together");
    HN_CHECK_PARAM(static_cast<DType>(b.scale_dtype) == DType::Float32,
                   "row_scale and col_scale must be float32, got dtype code " + std::to_string(b.scale_dtype));
    HN_CHECK_PARAM(aligned_to(b.row_scale, 4) && aligned_to(b.col_scale, 4),
                   "row_scale and col_scale must be 4-byte aligned float32 buffers");
  }
  HN_CHECK_PARAM(b.rows >= 0 && b.cols >= 0, "score block extents must be >= 0");
  HN_CHECK_PARAM(b.rows == 0 || b.cols == 0 || b.data != nullptr, "score block data is null");
  HN_CHECK_PARAM(b.row_offset >= 0 && b.row_offset + b.rows <= p.num_rows,
                 "score block rows [" + std::to_string(b.row_offset) + ", " + std::to_string(b.row_offset + b.rows) +
                     ") are outside the state's " + std::to_string(p.num_rows) + " rows");
  HN_CHECK_PARAM(b.col_offset >= 0, "score block col_offset must be >= 0");
}

inline void check_same_layout(const TopkParams& p, const TopkParams& other) {
  HN_CHECK_PARAM(p.num_rows == other.num_rows && p.capacity == other.capacity && p.mode == other.mode &&
                     p.k == other.k && p.skip == other.skip && p.sampling == other.sampling,
                 "merged states differ in shape");
}

inline void check_candidate_lists(const TopkParams& p, const void* scores, const void* cols, const void* counts,
                                  int64_t cap) {
  HN_CHECK_PARAM(cap >= 0, "candidate list capacity must be >= 0");
  HN_CHECK_PARAM(p.num_rows == 0 || counts != nullptr, "candidate counts are null");
  HN_CHECK_PARAM(p.num_rows == 0 || cap == 0 || (scores != nullptr && cols != nullptr), "candidate lists are null");
}

inline void check_fused(const FusedBlock& f) {
  HN_CHECK_PARAM(valid_float_dtype(f.dtype) && static_cast<DType>(f.dtype) != DType::Float64,
                 "fused block dtype must be float32, float16 or bfloat16");
  HN_CHECK_PARAM(f.rows >= 0 && f.cols >= 0 && f.dim >= 0 && f.cand_cap >= 0, "fused block extents must be >= 0");
  HN_CHECK_PARAM(f.rows == 0 || f.cols == 0 || (f.queries != nullptr && f.candidates != nullptr),
                 "fused block inputs are null");
  HN_CHECK_PARAM(f.q_stride >= f.dim && f.c_stride >= f.dim, "fused block row strides must be >= dim");
  HN_CHECK_PARAM(f.rows == 0 || (f.cand_count != nullptr && (f.cand_cap == 0 || (f.cand_score && f.cand_col))),
                 "fused block candidate lists are null");
  HN_CHECK_PARAM(f.rows == 0 || (f.row_lo != nullptr && f.row_hi != nullptr), "fused block bounds are null");
  HN_CHECK_PARAM((f.row_scale == nullptr) == (f.col_scale == nullptr), "row_scale and col_scale go together");
  HN_CHECK_PARAM(f.row_slack == nullptr || f.col_slack != nullptr, "row_slack needs col_slack");
  const int kernel = static_cast<int>(f.kernel);
  HN_CHECK_PARAM(kernel >= 0 && kernel <= static_cast<int>(FusedKernel::Wgmma128x256),
                 "fused kernel code " + std::to_string(kernel) + " is unknown");
}

inline void check_params(const InfoNceParams& p) {
  HN_CHECK_PARAM(p.num_rows >= 0 && p.num_cols >= 0 && p.positive_cols >= 0, "extents must be >= 0");
  HN_CHECK_PARAM(p.num_rows == 0 || p.positive_cols == 0 || p.positive_ids != nullptr, "positive_ids is null");
  HN_CHECK_PARAM(p.num_rows <= 1 || p.positive_stride >= p.positive_cols, "positive_stride must be >= positive_cols");
  HN_CHECK_PARAM(std::isfinite(p.inv_temperature) && p.inv_temperature > 0, "inv_temperature must be finite and > 0");
  HN_CHECK_PARAM(p.num_rows == 0 || p.row_stats != nullptr || p.row_coef != nullptr, "row statistics are null");
  HN_CHECK_PARAM(!p.symmetric || p.num_cols == 0 || p.col_stats != nullptr || p.col_coef != nullptr,
                 "symmetric needs column statistics");
}

inline void check_pair_block(const InfoNceParams& p, const PairBlock& b) {
  HN_CHECK_PARAM(static_cast<DType>(b.dtype) == DType::Float32 || static_cast<DType>(b.dtype) == DType::Float64,
                 "pair blocks must be float32 or float64, got dtype code " + std::to_string(b.dtype));
  HN_CHECK_PARAM(b.rows >= 0 && b.cols >= 0, "pair block extents must be >= 0");
  HN_CHECK_PARAM(b.rows == 0 || b.cols == 0 || b.data != nullptr, "pair block data is null");
  HN_CHECK_PARAM(b.row_offset >= 0 && b.row_offset + b.rows <= p.num_rows && b.col_offset >= 0 &&
                     b.col_offset + b.cols <= p.num_cols,
                 "pair block lies outside the [num_rows, num_cols] grid");
  HN_CHECK_PARAM((b.guide != nullptr) == (p.guide_upper != nullptr), "a guide block goes with guide_upper");
}

// A screen's deferred rescoring lists (ScreenBlock::defer_*): all present when defer_slots > 0, for a
// window selection only.
inline void check_deferred(const TopkParams& p, const ScreenBlock& s) {
  HN_CHECK_PARAM(s.defer_slots >= 0, "defer_slots must be >= 0");
  if (s.defer_slots == 0) return;
  HN_CHECK_PARAM(p.mode == SelectMode::Window,
                 "deferred rescoring needs a window selection (sampling 'top' or from a bounded pool)");
  HN_CHECK_PARAM(s.defer_ids != nullptr && s.defer_upper != nullptr && s.defer_count != nullptr &&
                     (p.capacity == 0 || s.defer_lower != nullptr) && s.defer_lower_count != nullptr,
                 "deferred rescoring lists are null");
}

inline void check_screen(const TopkParams& p, const ScreenBlock& s) {
  check_block(p, s.approx);
  const auto approx = static_cast<DType>(s.approx.dtype);
  HN_CHECK_PARAM(approx == DType::Float32 || approx == DType::BFloat16,
                 "approximate scores must be float32 or bfloat16");
  const auto raw = static_cast<DType>(s.dtype);
  HN_CHECK_PARAM(raw == DType::Float32 || raw == DType::Float16 || raw == DType::BFloat16,
                 "rescored rows must be float32, float16 or bfloat16");
  const bool work = s.approx.rows > 0 && s.approx.cols > 0;
  HN_CHECK_PARAM(!work || (s.row_a != nullptr && s.col_b != nullptr), "error factors row_a and col_b are null");
  HN_CHECK_PARAM((s.row_e == nullptr) == (s.col_f == nullptr), "error factors row_e and col_f go together");
  HN_CHECK_PARAM(std::isfinite(s.rel) && s.rel >= 0 && s.rel < 1, "rel must be in [0, 1)");
  HN_CHECK_PARAM(s.dim >= 0 && (!work || s.dim == 0 || (s.queries != nullptr && s.candidates != nullptr)),
                 "raw rows are null");
  HN_CHECK_PARAM(s.approx.rows <= 1 || s.q_stride >= s.dim, "q_stride must be >= dim");
  HN_CHECK_PARAM(s.approx.cols <= 1 || s.c_stride >= s.dim, "c_stride must be >= dim");
  HN_CHECK_PARAM((s.q_norms == nullptr) == (s.c_norms == nullptr), "cosine needs both q_norms and c_norms");
  const uintptr_t item = raw == DType::Float32 ? 4 : 2;
  HN_CHECK_PARAM(!work || (aligned_to(s.queries, item) && aligned_to(s.candidates, item)),
                 "raw rows must be aligned to their element size");
  check_deferred(p, s);
}

// A block of candidate lists: scores and ids of the same [rows, cols] extent, both present when the
// block holds anything, rows inside the state, a known float dtype, N >= 0. The CPU reads ids at any
// byte address (load_at: numpy views of bytes, torch.frombuffer); device code loads them directly, so
// on the device they must be 8-byte aligned (the CUDA allocator's always are).
inline void check_candidate_block(const TopkParams& p, const CandidateBlock& b, bool on_device) {
  HN_CHECK_PARAM(valid_float_dtype(b.dtype),
                 "candidate score dtype code " + std::to_string(b.dtype) + " is not a float");
  HN_CHECK_PARAM(b.rows >= 0 && b.cols >= 0, "candidate block extents must be >= 0");
  HN_CHECK_PARAM(b.num_ids >= 0, "candidate block num_ids must be >= 0");
  HN_CHECK_PARAM(b.rows == 0 || b.cols == 0 || (b.scores != nullptr && b.ids != nullptr),
                 "candidate block scores or ids are null");
  HN_CHECK_PARAM(!on_device || b.ids == nullptr || aligned_to(b.ids, 8),
                 "device candidate ids must be an 8-byte aligned int64 buffer");
  HN_CHECK_PARAM(b.row_offset >= 0 && b.row_offset + b.rows <= p.num_rows,
                 "candidate block rows [" + std::to_string(b.row_offset) + ", " +
                     std::to_string(b.row_offset + b.rows) + ") are outside the state's " +
                     std::to_string(p.num_rows) + " rows");
}

}  // namespace hnsample
