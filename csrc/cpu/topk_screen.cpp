// CPU certified screening (csrc/topk_screen.h): one pass over a block of approximate scores per row.
// A bulk compare against the row's interval widened by the block's largest error bound drops almost
// every score; the few left get their exact bound, candidates whose interval cannot reach the state or
// pass the filters are dropped, and (window mode) a block-local pre-selection drops those that at
// least `capacity` certainly better candidates outrank. The survivors are rescored canonically from
// the raw rows and offered exactly. Rows are split over threads; a row touches its approximate scores,
// its state and the raw rows of its survivors.
//
// Deferred rescoring (window mode, when the caller gives the lists): a row's survivors wait as (id,
// upper bound) across the blocks of a pass and are rescored once at its end (topk_screen_flush_cpu).
// Rescored in their block, most of the ~capacity * ln(N / block) candidates that enter a running top-k
// would be evicted by a later block; waiting, they are dropped for free when `capacity` certainly
// better ones are known (Deferred::lambda).
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../params_check.h"
#include "../topk_screen.h"

namespace hnsample {

#if defined(__x86_64__)
bool screen_has_avx2();  // screen_x86.cpp
int64_t screen_keep_f32_avx2(const float* row, int64_t cols, float low, float high, int32_t* out);
double canonical_dot_f32_avx2(const float* q, const float* c, int64_t d);
void canonical_dot2_f32_avx2(const float* q, const float* c1, const float* c2, int64_t d, double* out1,
                             double* out2);
#endif

namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// The columns of a row of S^ to look at: those in [low, high] and those not finite (NaN, +-inf), whose
// canonical score the bound says nothing about. Returns how many were written to `out`.
template <typename A>
int64_t keep_columns(const A* row, int64_t cols, int64_t stride, float low, float high, int32_t* out) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<A, float>) {
    if (stride == 1 && screen_has_avx2()) return screen_keep_f32_avx2(row, cols, low, high, out);
  }
#endif
  int64_t n = 0;
  for (int64_t c = 0; c < cols; ++c) {
    const float a = to_float(row[c * stride]);
    if ((a >= low && a <= high) || !std::isfinite(a)) out[n++] = static_cast<int32_t>(c);
  }
  return n;
}

// The canonical D of two contiguous rows, by the vector unit where there is one for the type (the same
// bits as canonical_dot: the lanes and their order are fixed).
template <typename T>
double fast_dot(const T* q, const T* c, int64_t d) {
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (screen_has_avx2()) return canonical_dot_f32_avx2(q, c, d);
  }
#endif
  return canonical_dot(q, 1, c, 1, d);
}

// The canonical score of block row r and column c.
template <typename T>
float rescore(const ScreenBlock& s, int64_t r, int64_t c) {
  const T* q = static_cast<const T*>(s.queries) + r * s.q_stride;
  const T* x = static_cast<const T*>(s.candidates) + c * s.c_stride;
  const bool cosine = s.q_norms != nullptr;
  return canonical_score(fast_dot(q, x, s.dim), cosine, cosine ? s.q_norms[r] : 0.0, cosine ? s.c_norms[c] : 0.0);
}

struct ColumnMaxima {
  double b = 0, f = 0, h = 0;
};

ColumnMaxima column_maxima(const ScreenBlock& s) {
  ColumnMaxima m;
  for (int64_t c = 0; c < s.approx.cols; ++c) {
    m.b = std::max(m.b, s.col_b[c]);
    if (s.col_f != nullptr) m.f = std::max(m.f, s.col_f[c]);
    if (s.col_h != nullptr) m.h = std::max(m.h, s.col_h[c]);
  }
  return m;
}

// Per-thread scratch space of the screen.
struct Scratch {
  std::vector<int32_t> cols;
  std::vector<double> bounds, norms, scores;
  std::vector<const void*> rows;
  std::vector<int64_t> ids;
  std::vector<std::pair<float, int64_t>> order;

  // Room for n listed candidates (rows, norms, scores, ids).
  void reserve_list(int64_t n) {
    const auto m = static_cast<size_t>(n);
    if (rows.size() < m) {
      rows.resize(m);
      norms.resize(m);
      scores.resize(m);
      ids.resize(m);
    }
  }
};

// Canonical scores of query row q (canonical norm q_norm: cosine) against n listed candidate rows
// (norms[t]: their canonical norms), two at a time where the vector unit can, every cache line of the
// next pair requested while this pair is summed (a listed row is usually out of the near caches).
template <typename T>
void rescore_rows(const T* q, double q_norm, bool cosine, const void* const* rows, const double* norms, int64_t n,
                  int64_t dim, double* out) {
  auto row = [&](int64_t t) { return static_cast<const T*>(rows[t]); };
  int64_t t = 0;
#if defined(__x86_64__)
  if constexpr (std::is_same_v<T, float>) {
    if (screen_has_avx2()) {
      constexpr int64_t kAhead = 2;
      auto prefetch = [&](int64_t u) {
        const char* bytes = static_cast<const char*>(rows[u]);
        for (int64_t off = 0; off < dim * 4; off += 64) __builtin_prefetch(bytes + off);
      };
      for (int64_t u = 0; u < std::min<int64_t>(n, kAhead); ++u) prefetch(u);
      for (; t + 2 <= n; t += 2) {
        if (t + kAhead < n) prefetch(t + kAhead);
        if (t + kAhead + 1 < n) prefetch(t + kAhead + 1);
        double d1, d2;
        canonical_dot2_f32_avx2(q, row(t), row(t + 1), dim, &d1, &d2);
        out[t] = canonical_score(d1, cosine, q_norm, cosine ? norms[t] : 0.0);
        out[t + 1] = canonical_score(d2, cosine, q_norm, cosine ? norms[t + 1] : 0.0);
      }
    }
  }
#endif
  for (; t < n; ++t) out[t] = canonical_score(fast_dot(q, row(t), dim), cosine, q_norm, cosine ? norms[t] : 0.0);
}

// Canonical scores of block row r against the listed block columns, into sc.scores.
template <typename T>
void rescore_into(const ScreenBlock& s, int64_t r, const int32_t* cols, int64_t n, Scratch& sc) {
  sc.reserve_list(n);
  const bool cosine = s.q_norms != nullptr;
  const T* base = static_cast<const T*>(s.candidates);
  for (int64_t t = 0; t < n; ++t) {
    sc.rows[t] = base + cols[t] * s.c_stride;
    sc.norms[t] = cosine ? s.c_norms[cols[t]] : 0.0;
  }
  rescore_rows<T>(static_cast<const T*>(s.queries) + r * s.q_stride, cosine ? s.q_norms[r] : 0.0, cosine,
                  sc.rows.data(), sc.norms.data(), n, s.dim, sc.scores.data());
}

// A state row's deferred survivors (ScreenBlock::defer_*; inactive when slots == 0).
struct Deferred {
  int64_t* ids = nullptr;
  float* upper = nullptr;
  int64_t* count = nullptr;
  double* lower = nullptr;  // min-heap of the cap largest lower bounds recorded by reach()
  int64_t* lower_count = nullptr;
  int64_t slots = 0, cap = 0;

  // lambda: `cap` distinct eligible candidates certainly score at least this (-inf until cap are known).
  // A candidate whose upper bound is below it can never be taken (the window keeps `cap`).
  double lambda() const { return cap > 0 && *lower_count == cap ? lower[0] : -kInf; }

  // Records that an eligible candidate, waiting here (never one in the state: the heap and the state
  // must count distinct candidates), certainly scores at least v.
  void reach(double v) const {
    if (cap == 0) return;
    int64_t i = *lower_count;
    if (i < cap) {
      lower[i] = v;
      *lower_count = i + 1;
      while (i > 0 && lower[i] < lower[(i - 1) / 2]) {
        std::swap(lower[i], lower[(i - 1) / 2]);
        i = (i - 1) / 2;
      }
      return;
    }
    if (!(v > lower[0])) return;
    lower[0] = v;
    for (i = 0;;) {
      int64_t m = 2 * i + 1;
      if (m >= cap) break;
      if (m + 1 < cap && lower[m + 1] < lower[m]) ++m;
      if (!(lower[m] < lower[i])) break;
      std::swap(lower[i], lower[m]);
      i = m;
    }
  }

  // Drops the waiting candidates whose upper bound is below t.
  void prune(double t) const {
    int64_t n = 0;
    for (int64_t i = 0; i < *count; ++i) {
      if (static_cast<double>(upper[i]) < t) continue;
      ids[n] = ids[i];
      upper[n++] = upper[i];
    }
    *count = n;
  }

  // Queues candidate j with upper bound `up`; false when the list is full even after pruning it by t.
  bool wait(int64_t j, double up, double t) const {
    if (*count == slots) prune(t);
    if (*count == slots) return false;
    ids[*count] = j;
    upper[*count] = float_round_up(up);
    ++*count;
    return true;
  }
};

Deferred deferred(const TopkParams& p, const ScreenBlock& s, int64_t row) {
  Deferred d;
  if (s.defer_slots == 0) return d;
  d.slots = s.defer_slots;
  d.cap = p.capacity;
  d.ids = s.defer_ids + row * s.defer_slots;
  d.upper = s.defer_upper + row * s.defer_slots;
  d.count = s.defer_count + row;
  d.lower = s.defer_lower + row * p.capacity;
  d.lower_count = s.defer_lower_count + row;
  return d;
}

// Offers a rescored candidate: its canonical score against the exact bounds, then the exact state.
void offer_scored(const TopkParams& p, const RowState& st, int64_t row, double hi, int64_t j, double score,
                  int64_t* rescored) {
  if (rescored != nullptr) ++rescored[row];
  if (score >= p.min_score && score <= hi) offer_candidate(p, st, row, score, j);
}

// The lower bound S^ - width - rel |S^| of a score whose approximation is `a` (increasing in a).
double lower_bound(double a, double width, double rel) { return a - width - rel * std::fabs(a); }

// The approximations that make a candidate certainly pass [min_score, hi]: lower bound >= min_score and
// upper bound <= hi (rounded inward, so a value inside the float range certainly passes).
void certain_range(double lo, double hi, double width, double rel, float& low, float& high) {
  double y = lo + width;
  y = y >= 0 ? y / (1 - rel) : y / (1 + rel);
  double z = hi - width;
  z = z >= 0 ? z / (1 + rel) : z / (1 - rel);
  low = float_round_up(std::nextafter(std::nextafter(y, kInf), kInf));
  high = float_round_down(std::nextafter(std::nextafter(z, -kInf), -kInf));
}

template <typename A, typename T>
void screen_row(const TopkParams& p, const ScreenBlock& s, const ColumnMaxima& cm, int64_t r,
                Scratch& sc) {
  std::vector<int32_t>& cols = sc.cols;
  std::vector<double>& bounds = sc.bounds;
  const ScoreBlock& b = s.approx;
  const int64_t row = b.row_offset + r;
  const RowState st = row_state(p, row);
  const double hi = row_upper(p, row);
  const double width = screen_row_width(s, cm.b, cm.f, cm.h, r);
  const bool stream = p.mode == SelectMode::Stream;
  const A* approx = static_cast<const A*>(b.data) + r * b.row_stride;
  auto value = [&](int64_t c) { return to_float(approx[c * b.col_stride]); };
  auto eligible_id = [&](int64_t c) {
    const int64_t j = b.col_offset + c;
    return !id_banned(p, row, j) && label_allowed(p, row, j);
  };

  const Deferred def = stream ? Deferred{} : deferred(p, s, row);
  double lo = std::max({row_entry_threshold(p, st), p.min_score, def.lambda()});
  if (!(lo <= hi)) return;  // an empty interval (or a NaN bound): nothing can be taken
  float low, high;
  screen_bulk_bounds(lo, hi, width, s.rel, low, high);
  cols.resize(static_cast<size_t>(b.cols));
  int64_t kept = keep_columns(approx, b.cols, b.col_stride, low, high, cols.data());

  // Window mode: the capacity-th largest of the state's exact scores and of the lower bounds of any set
  // of this block's certainly eligible candidates is a score that `capacity` candidates certainly
  // reach, so anything whose upper bound stays below it can never be taken. With many candidates (a
  // row's first blocks) the set is a sample (every stride-th) and the round repeats on what survives,
  // so each round sorts a few hundred values instead of the whole block.
  if (!stream && p.capacity > 0 && std::isfinite(width) && kept >= 16) {
    float cert_low, cert_high;
    certain_range(p.min_score, hi, width, s.rel, cert_low, cert_high);
    for (int round = 0; round < 3 && kept >= 16; ++round) {
      const int64_t stride = std::max<int64_t>(1, kept / (8 * p.capacity + 256));
      bounds.clear();
      for (int64_t t = 0; t < kept; t += stride) {
        const float a = value(cols[t]);
        if (a >= cert_low && a <= cert_high && eligible_id(cols[t])) bounds.push_back(lower_bound(a, width, s.rel));
      }
      // The state and the deferred heap hold distinct candidates (a waiting one enters the state only
      // when the heap is emptied), and this block's are in neither.
      for (int64_t t = 0; t < st.count[0]; ++t) bounds.push_back(st.skip_or_window.s[t]);
      if (def.slots > 0) bounds.insert(bounds.end(), def.lower, def.lower + *def.lower_count);
      if (static_cast<int64_t>(bounds.size()) < p.capacity) break;
      const auto nth = bounds.end() - p.capacity;
      std::nth_element(bounds.begin(), nth, bounds.end());
      if (!(*nth > lo)) break;
      lo = *nth;
      screen_bulk_bounds(lo, hi, width, s.rel, low, high);
      int64_t n = 0;
      if (stride > 1) {  // most of the row goes: the vector scan of the whole row is cheaper than the list
        n = keep_columns(approx, b.cols, b.col_stride, low, high, cols.data());
      } else {
        for (int64_t t = 0; t < kept; ++t) {
          const float a = value(cols[t]);
          if ((a >= low && a <= high) || !std::isfinite(a)) cols[n++] = cols[t];
        }
      }
      if (n == kept) break;
      kept = n;
    }
  }

  // Candidates the bounds cannot rule out against the state as it is now (a superset of what it will
  // take: its threshold only rises): deferred (window mode with a deferred list that has room), or
  // rescored two at a time and offered exactly in column order.
  int64_t n = 0;
  const double now = stream ? lo : std::max(lo, row_entry_threshold(p, st));
  for (int64_t t = 0; t < kept; ++t) {
    const int64_t c = cols[t];
    if (!eligible_id(c)) continue;
    const float a = value(c);
    const double w = std::isfinite(a) ? screen_width(s, r, c, a) : kInf;
    const bool known = std::isfinite(w);
    const double lower = known ? a - w : -kInf, upper = known ? a + w : kInf;
    if (upper < p.min_score || lower > hi || (!stream && upper < now)) continue;
    if (stream) {
      // The sampling key can only be as high as the score's upper bound makes it.
      const int64_t j = b.col_offset + c;
      if (!stream_gate_admits(stream_gate(p, st), upper, j, row_sample_key(p, row, upper, j))) continue;
      offer_scored(p, st, row, hi, j, static_cast<double>(rescore<T>(s, r, c)), s.rescored);
      continue;
    }
    if (def.slots > 0 && def.wait(b.col_offset + c, upper, std::max(now, def.lambda()))) {
      if (known && lower >= p.min_score && upper <= hi) def.reach(lower);  // certainly eligible
      continue;
    }
    cols[n++] = static_cast<int32_t>(c);
  }
  if (stream || n == 0) return;
  rescore_into<T>(s, r, cols.data(), n, sc);
  for (int64_t t = 0; t < n; ++t) offer_scored(p, st, row, hi, b.col_offset + cols[t], sc.scores[t], s.rescored);
}

template <typename A, typename T>
void screen_block(const TopkParams& p, const ScreenBlock& s, int threads) {
  const ColumnMaxima cm = column_maxima(s);
  parallel_rows(s.approx.rows, threads, [&](int64_t r0, int64_t r1) {
    Scratch sc;
    for (int64_t r = r0; r < r1; ++r) screen_row<A, T>(p, s, cm, r, sc);
  });
}

// The flush table's row for the block holding candidate id j (kTableCols columns: first id, rows,
// rows address, row stride, norms address; ascending first ids).
constexpr int64_t kTableCols = 5;
const int64_t* table_block(const int64_t* table, int64_t blocks, int64_t j) {
  int64_t lo = 0, hi = blocks;  // the last block whose first id is <= j
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    (table[mid * kTableCols] <= j ? lo : hi) = mid;
  }
  const int64_t* blk = table + lo * kTableCols;
  HN_CHECK_PARAM(blocks > 0 && blk[0] <= j && j - blk[0] < blk[1],
                 "deferred candidate " + std::to_string(j) + " is in no block of the flush table");
  return blk;
}

template <typename T>
void flush_rows(const TopkParams& p, const ScreenBlock& s, const int64_t* table, int64_t blocks, int threads) {
  const bool cosine = s.q_norms != nullptr;
  parallel_rows(s.approx.rows, threads, [&](int64_t r0, int64_t r1) {
    Scratch sc;
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t row = s.approx.row_offset + r;
      const Deferred def = deferred(p, s, row);
      const RowState st = row_state(p, row);
      const double hi = row_upper(p, row);
      // Highest upper bound first, a few at a time: once the state holds `capacity` exact scores, a
      // candidate whose upper bound is below its entry threshold cannot enter, nor can any after it.
      double lambda = std::max(def.lambda(), row_entry_threshold(p, st));
      std::vector<std::pair<float, int64_t>>& order = sc.order;
      order.clear();
      for (int64_t i = 0; i < *def.count; ++i) {
        if (!(static_cast<double>(def.upper[i]) < lambda)) order.emplace_back(def.upper[i], def.ids[i]);
      }
      std::sort(order.begin(), order.end(), [](const auto& x, const auto& y) { return x.first > y.first; });
      constexpr int64_t kChunk = 16;
      sc.reserve_list(kChunk);
      for (size_t at = 0; at < order.size() && !(static_cast<double>(order[at].first) < lambda);) {
        int64_t n = 0;
        for (; at < order.size() && n < kChunk && !(static_cast<double>(order[at].first) < lambda); ++at) {
          const int64_t j = order[at].second;
          const int64_t* blk = table_block(table, blocks, j);
          const int64_t off = j - blk[0];
          sc.rows[n] = reinterpret_cast<const T*>(static_cast<uintptr_t>(blk[2])) + off * blk[3];
          sc.norms[n] = cosine ? reinterpret_cast<const double*>(static_cast<uintptr_t>(blk[4]))[off] : 0.0;
          sc.ids[n++] = j;
        }
        rescore_rows<T>(static_cast<const T*>(s.queries) + r * s.q_stride, cosine ? s.q_norms[r] : 0.0, cosine,
                        sc.rows.data(), sc.norms.data(), n, s.dim, sc.scores.data());
        for (int64_t t = 0; t < n; ++t) offer_scored(p, st, row, hi, sc.ids[t], sc.scores[t], s.rescored);
        lambda = std::max(lambda, row_entry_threshold(p, st));
      }
      *def.count = 0;
      *def.lower_count = 0;
    }
  });
}

template <typename A, typename T>
void count_row(const TopkParams& p, const ScreenBlock& s, int64_t r, int64_t* counts) {
  screen_count_row<A>(p, s, r, counts, [&](int64_t c) { return rescore<T>(s, r, c); });
}

}  // namespace

void topk_screen_block_cpu(const TopkParams& p, const ScreenBlock& s, int threads) {
  check_params(p);
  check_screen(p, s);
  if (s.approx.rows == 0 || s.approx.cols == 0 || p.k == 0) return;
  const bool bf16 = static_cast<DType>(s.approx.dtype) == DType::BFloat16;
  switch (static_cast<DType>(s.dtype)) {
    case DType::Float32:
      return bf16 ? screen_block<bf16_bits, float>(p, s, threads) : screen_block<float, float>(p, s, threads);
    case DType::BFloat16:
      return bf16 ? screen_block<bf16_bits, bf16_bits>(p, s, threads) : screen_block<float, bf16_bits>(p, s, threads);
    default:
      return bf16 ? screen_block<bf16_bits, half_bits>(p, s, threads) : screen_block<float, half_bits>(p, s, threads);
  }
}

void topk_screen_flush_cpu(const TopkParams& p, const ScreenBlock& s, const int64_t* table, int64_t blocks,
                           int threads) {
  check_params(p);
  check_deferred(p, s);
  HN_CHECK_PARAM(s.defer_slots > 0, "nothing to flush: defer_slots is 0");
  HN_CHECK_PARAM(s.approx.rows >= 0 && s.approx.row_offset >= 0 && s.approx.row_offset + s.approx.rows <= p.num_rows,
                 "flushed rows are outside the state's " + std::to_string(p.num_rows) + " rows");
  const auto raw = static_cast<DType>(s.dtype);
  HN_CHECK_PARAM(raw == DType::Float32 || raw == DType::Float16 || raw == DType::BFloat16,
                 "rescored rows must be float32, float16 or bfloat16");
  HN_CHECK_PARAM(s.dim >= 0 && (s.approx.rows <= 1 || s.q_stride >= s.dim), "q_stride must be >= dim");
  HN_CHECK_PARAM(blocks >= 0 && (blocks == 0 || table != nullptr), "the flush table is null");
  for (int64_t b = 0; b < blocks; ++b) {
    const int64_t* t = table + b * kTableCols;
    HN_CHECK_PARAM(t[0] >= 0 && t[1] >= 1 && (t[2] != 0 || s.dim == 0) && (t[1] == 1 || t[3] >= s.dim),
                   "flush table row " + std::to_string(b) +
                       " has a negative first id, no rows, a null address or a stride below dim");
    HN_CHECK_PARAM(b == 0 || t[0] >= t[-kTableCols] + t[1 - kTableCols],
                   "flush table blocks must ascend without overlap");
    HN_CHECK_PARAM((t[4] != 0) == (s.q_norms != nullptr), "cosine needs the blocks' norms");
  }
  HN_CHECK_PARAM(s.approx.rows == 0 || s.dim == 0 || s.queries != nullptr, "the queries' rows are null");
  switch (static_cast<DType>(s.dtype)) {
    case DType::Float32:
      return flush_rows<float>(p, s, table, blocks, threads);
    case DType::BFloat16:
      return flush_rows<bf16_bits>(p, s, table, blocks, threads);
    default:
      return flush_rows<half_bits>(p, s, table, blocks, threads);
  }
}

void topk_screen_filter_counts_cpu(const TopkParams& p, const ScreenBlock& s, int64_t* counts, int threads) {
  check_params(p);
  check_screen(p, s);
  HN_CHECK_PARAM(s.approx.rows == 0 || counts != nullptr, "filter counts are null");
  const bool bf16 = static_cast<DType>(s.approx.dtype) == DType::BFloat16;
  HN_DISPATCH_FLOAT(s.dtype, T, [&] {
    parallel_rows(s.approx.rows, threads, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        int64_t* row_counts = counts + (s.approx.row_offset + r) * kScoreFilters;
        bf16 ? count_row<bf16_bits, T>(p, s, r, row_counts) : count_row<float, T>(p, s, r, row_counts);
      }
    });
  });
}

void canonical_norms_cpu(const void* x, int dtype, int64_t rows, int64_t dim, int64_t stride, double* out,
                         int threads) {
  HN_CHECK_PARAM(rows >= 0 && dim >= 0, "rows and dim must be >= 0");
  HN_CHECK_PARAM(rows == 0 || (out != nullptr && (dim == 0 || x != nullptr)), "norm inputs are null");
  HN_DISPATCH_FLOAT(dtype, T, [&] {
    parallel_rows(rows, threads, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* row = static_cast<const T*>(x) + r * stride;
        out[r] = std::sqrt(fast_dot(row, row, dim));
      }
    });
  });
}

void canonical_pairs_cpu(const void* q, int64_t q_stride, const void* c, int64_t c_stride, int dtype, int64_t dim,
                         const int64_t* ids, int64_t rows, int64_t cols, const double* q_norms,
                         const double* c_norms, float* out, int threads) {
  HN_CHECK_PARAM(rows >= 0 && cols >= 0 && dim >= 0, "bad pair arguments");
  HN_CHECK_PARAM(rows * cols == 0 || (ids != nullptr && out != nullptr && (dim == 0 || (q && c))),
                 "pair inputs are null");
  HN_CHECK_PARAM((q_norms == nullptr) == (c_norms == nullptr), "cosine needs both norms");
  HN_DISPATCH_FLOAT(dtype, T, [&] {
    parallel_rows(rows, threads, [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const T* qr = static_cast<const T*>(q) + r * q_stride;
        for (int64_t t = 0; t < cols; ++t) {
          const int64_t j = ids[r * cols + t];
          if (j < 0) {
            out[r * cols + t] = std::numeric_limits<float>::quiet_NaN();
            continue;
          }
          const double dot = fast_dot(qr, static_cast<const T*>(c) + j * c_stride, dim);
          out[r * cols + t] = canonical_score(dot, q_norms != nullptr, q_norms ? q_norms[r] : 0.0,
                                              c_norms ? c_norms[j] : 0.0);
        }
      }
    });
  });
}

}  // namespace hnsample
