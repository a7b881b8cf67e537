// The row scan of the CPU top-k selection, shared by topk_select.cpp and the x86 SIMD scans
// (scan_x86.cpp, compiled only for x86-64): the per-row state a scan carries, the exact interval it
// bulk-tests scores against, the portable one-compare-per-score scan, and the run-time choice of scan.
#pragma once

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "../topk_select.h"

namespace hnsample {
namespace cpu {

// Directed conversions to the compare type: for a float s, (s >= lo) == (s >= round_up(lo)) and
// (s <= hi) == (s <= round_down(hi)), so the bulk compare in float is exactly the float64 rule.
template <typename C>
C round_up(double v) {
  if constexpr (std::is_same_v<C, double>) return v;
  else return float_round_up(v);
}
template <typename C>
C round_down(double v) {
  if constexpr (std::is_same_v<C, double>) return v;
  else return float_round_down(v);
}

// The type a score of dtype T is compared in: double for float64, float for the rest.
template <typename T>
using compare_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

// One row's scan: its state and the current bulk interval [lo, hi] (lo rises as the state fills).
template <typename C>
struct RowScan {
  const TopkParams& p;
  RowState st;
  int64_t row;
  int64_t col_offset;
  double hi_d;
  C lo, hi;

  RowScan(const TopkParams& params, int64_t r, int64_t col_off)
      : p(params), st(row_state(params, r)), row(r), col_offset(col_off) {
    hi_d = row_upper(p, row);
    hi = round_down<C>(hi_d);
    refresh();
  }
  void refresh() { lo = round_up<C>(std::max(row_entry_threshold(p, st), p.min_score)); }
  // Full test and offer for a score that passed the bulk compare (with a possibly older lo).
  void handle(C s, int64_t c) {
    if (!(s >= lo && s <= hi)) return;
    const int64_t j = col_offset + c;
    if (id_banned(p, row, j) || !label_allowed(p, row, j)) return;
    if (p.mode == SelectMode::Stream) {
      // The GPU kernel filters against a stale StreamGate snapshot; here it is always fresh, so the
      // CPU results (tested against the reference) prove the gate never drops a candidate that matters.
      const double key = row_sample_key(p, row, static_cast<double>(s), j);
      if (!stream_gate_admits(stream_gate(p, st), static_cast<double>(s), j, key)) return;
    }
    offer_candidate(p, st, row, static_cast<double>(s), j);
    refresh();
  }
};

// Offers every score of columns [c, cols) that lies in the row's interval, one compare each: the
// portable scan (from column 0, any dtype and stride) and the SIMD scans' tails. `row` may sit at any
// byte address.
template <typename T>
void scan_columns(RowScan<compare_t<T>>& rs, const void* row, int64_t c, int64_t cols, int64_t col_stride) {
  for (; c < cols; ++c) {
    const auto s = to_float(load_at<T>(row, c * col_stride));
    if (s >= rs.lo && s <= rs.hi) rs.handle(s, c);
  }
}

// Offers the float32 scores at columns c + t for the set bits t of a SIMD compare's mask, lowest first.
inline void handle_mask(RowScan<float>& rs, const void* row, int64_t c, uint64_t mask) {
  while (mask) {
    const int t = __builtin_ctzll(mask);
    mask &= mask - 1;
    rs.handle(load_at<float>(row, c + t), c + t);
  }
}

// The scans a CPU can run, widest last. HNSAMPLE_CPU_ISA=scalar|avx2 caps the choice (to test the
// narrower paths on a wider CPU); on other architectures it is always Scalar.
enum class Isa { Scalar, Avx2, Avx512 };

// The scan picked for this process (detected once).
Isa detect_isa();

#if defined(__x86_64__)
// Scans `cols` contiguous float32 scores starting at `row` (any byte address) with 512- / 256-bit
// compares; defined in scan_x86.cpp, called only when detect_isa() allows.
void scan_row_f32_avx512(RowScan<float>& rs, const void* row, int64_t cols);
void scan_row_f32_avx2(RowScan<float>& rs, const void* row, int64_t cols);
#endif

}  // namespace cpu
}  // namespace hnsample
