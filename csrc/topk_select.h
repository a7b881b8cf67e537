// The fused top-k selection shared by every backend: the params struct Python fills, the counter-based
// sampling noise, the per-row eligibility rules and the per-row selection state (binary heaps on
// parallel arrays). Everything here is __host__ __device__ so the CPU tests exercise the exact code the
// GPU runs. Semantics are spelled out in hnsample/ops/topk.py and hnsample/_reference.py.
#pragma once

#include <cmath>
#include <cstdint>

#include "common.h"

namespace hnsample {

// How a row's state is organised (state_layout picks it from k, skip_top, pool and the sampling).
enum class SelectMode : int {
  // Keep the best `capacity` eligible candidates by score; the window and any sampling are applied at
  // finalize time. Used for sampling="top" and for every bounded pool.
  Window = 0,
  // sampling over an unbounded pool: a score heap of `skip` slots holds the candidates that are ranked
  // above the window; everything pushed out of it streams into a key heap of `k` slots.
  Stream = 1,
};

enum class Sampling : int { Top = 0, Uniform = 1, Softmax = 2 };

struct TopkParams {
  int64_t num_rows = 0;      // B: rows of the selection state
  int64_t k = 0;             // results per row
  int64_t skip = 0;          // skip_top
  int64_t pool = -1;         // window length after skip; -1 = unbounded
  int64_t capacity = 0;      // derived: state slots per row (state_layout)
  SelectMode mode = SelectMode::Window;  // derived: state_layout(k, skip, pool, sampling)
  Sampling sampling = Sampling::Top;
  double inv_temperature = 1.0;
  uint64_t seed = 0;
  int64_t noise_row_offset = 0;  // noise row = noise_row_offset + state row (global query id)
  double min_score = -INFINITY;  // eligible iff s >= min_score
  double max_score = INFINITY;   // eligible iff s <= max_score
  const double* upper = nullptr;              // [B] margin bound per row (s <= upper), or null
  const int64_t* banned = nullptr;            // [B, banned_cols] ids, sorted ascending per row, -1 = pad
  int64_t banned_stride = 0;
  int64_t banned_cols = 0;
  const int64_t* query_labels = nullptr;      // [B] or null (indexed by state row)
  const int64_t* candidate_labels = nullptr;  // [N] or null (indexed by global candidate id)
  // selection state, allocated by torch
  double* st_score = nullptr;   // [B, capacity]
  int64_t* st_index = nullptr;  // [B, capacity]
  double* st_key = nullptr;     // [B, capacity] (sampling modes only)
  int64_t* st_count = nullptr;  // [B, 2]: filled slots of heap 0 (window / skip) and heap 1 (key)
};

// A block of scores: rows map to state rows [row_offset, row_offset + rows), columns to global
// candidate ids [col_offset, col_offset + cols).
struct ScoreBlock {
  const void* data = nullptr;
  int dtype = 0;
  int64_t rows = 0, cols = 0;
  int64_t row_stride = 0, col_stride = 1;
  int64_t row_offset = 0, col_offset = 0;
  // Cosine scales, both or neither (CUDA select launcher only; every other launcher refuses them): the
  // block holds raw products x and the score of (r, c) is s = (x * row_scale[r]) * col_scale[c], in
  // that order, in float (float and 16-bit blocks) or double (double blocks), before any test.
  const float* row_scale = nullptr;  // [rows] or null, indexed by block row
  const float* col_scale = nullptr;  // [cols] or null, indexed by block column
  int scale_dtype = 0;               // dtype code of both scales: must be float32
};

// The per-row state a selection needs: the mode and the slots per row. sampling="top" keeps the best
// skip + min(k, pool) candidates; sampling over a bounded pool keeps the whole window (skip + pool) and
// draws at finalize; sampling over an unbounded pool streams (skip heap + a key heap of k).
struct StateLayout {
  SelectMode mode;
  int64_t capacity;
};

HN_HD StateLayout state_layout(int64_t k, int64_t skip, int64_t pool, Sampling sampling) {
  if (sampling == Sampling::Top) return {SelectMode::Window, skip + (pool < 0 || k < pool ? k : pool)};
  if (pool < 0) return {SelectMode::Stream, skip + k};
  return {SelectMode::Window, skip + pool};
}

// ---------------------------------------------------------------------------------------------------
// Counter-based noise: Philox-4x32-10 keyed by the seed, counter = (candidate id, query row). A pure
// function of (seed, row, candidate), so samples do not depend on blocking, threads or devices.
HN_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  hi = static_cast<uint32_t>(p >> 32);
  lo = static_cast<uint32_t>(p);
}

HN_HD uint64_t philox_bits(uint64_t seed, uint64_t row, uint64_t col) {
  uint32_t c0 = static_cast<uint32_t>(col), c1 = static_cast<uint32_t>(col >> 32);
  uint32_t c2 = static_cast<uint32_t>(row), c3 = static_cast<uint32_t>(row >> 32);
  uint32_t k0 = static_cast<uint32_t>(seed), k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(0xD2511F53u, c0, hi0, lo0);
    mulhilo32(0xCD9E8D57u, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0, n1 = lo1, n2 = hi0 ^ c3 ^ k1, n3 = lo0;
    c0 = n0;
    c1 = n1;
    c2 = n2;
    c3 = n3;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return (static_cast<uint64_t>(c0) << 32) | c1;
}

// Uniform in the open interval (0, 1): (m + 0.5) / 2^52 for the top 52 bits m. With 52 bits m + 0.5 is
// exact in a double, so u never rounds to 1 (with 53 bits, m = 2^53 - 1 gave exactly 1.0, and the
// softmax key -log(-log(u)) became +inf).
HN_HD double uniform_noise(uint64_t seed, uint64_t row, uint64_t col) {
  const uint64_t m = philox_bits(seed, row, col) >> 12;
  return (static_cast<double>(m) + 0.5) * (1.0 / 4503599627370496.0);
}

// Sampling key: larger keys are chosen first. Uniform: u. Softmax: s / T + Gumbel(u) (Gumbel-top-k
// draws k without replacement with probability proportional to exp(s / T)).
HN_HD double sample_key(Sampling sampling, double score, double inv_temperature, uint64_t seed, int64_t row,
                        int64_t col) {
  const double u = uniform_noise(seed, static_cast<uint64_t>(row), static_cast<uint64_t>(col));
  if (sampling == Sampling::Softmax) return score * inv_temperature - log(-log(u));
  return u;
}

// ---------------------------------------------------------------------------------------------------
// Points p's state at stacked copy `copy` of it (copy * B rows further on: the CUDA column segments).
HN_HD void point_at_state_copy(TopkParams& p, int64_t copy) {
  const int64_t rows = copy * p.num_rows;
  p.st_score += rows * p.capacity;
  p.st_index += rows * p.capacity;
  if (p.st_key != nullptr) p.st_key += rows * p.capacity;
  p.st_count += rows * 2;
}

// Eligibility of candidate `col` for state row `row`, beyond the score bounds (which the scans test
// first, in bulk): not a banned id (binary search in the sorted row) and not of the query's label.
HN_HD bool id_banned(const TopkParams& p, int64_t row, int64_t col) {
  if (p.banned_cols == 0) return false;
  const int64_t* ids = p.banned + row * p.banned_stride;
  int64_t lo = 0, hi = p.banned_cols;
  while (lo < hi) {
    const int64_t mid = (lo + hi) >> 1;
    if (ids[mid] < col)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo < p.banned_cols && ids[lo] == col;
}

HN_HD bool label_allowed(const TopkParams& p, int64_t row, int64_t col) {
  return p.query_labels == nullptr || p.candidate_labels == nullptr ||
         load_at<int64_t>(p.query_labels, row) != load_at<int64_t>(p.candidate_labels, col);
}

// The per-row closed score interval [lo, hi] that eligible scores must lie in.
HN_HD double row_upper(const TopkParams& p, int64_t row) {
  double hi = p.max_score;
  if (p.upper != nullptr) {
    const double u = p.upper[row];
    hi = (u < hi || u != u) ? u : hi;  // NaN bound: nothing is eligible
  }
  return hi;
}

// The eligibility rule, one filter at a time, in the order the filter statistics attribute a candidate
// (to the first filter it fails): a banned id (positives and exclude, told apart by the caller from
// the id lists), the query's label, a NaN score, min_score, max_score, the margin bound. A candidate is
// eligible iff it fails none. The scans apply the same rule in bulk (the score interval
// [min_score, row_upper] first, then the ids); the statistics use this form.
enum class Filter : int { None = -1, Banned = 0, Labels = 1, Nan = 2, MinScore = 3, MaxScore = 4, Margin = 5 };
constexpr int kScoreFilters = 5;  // Labels .. Margin: the ones a score block can be counted for

HN_HD Filter first_failed_filter(const TopkParams& p, int64_t row, int64_t col, double s) {
  if (id_banned(p, row, col)) return Filter::Banned;
  if (!label_allowed(p, row, col)) return Filter::Labels;
  if (s != s) return Filter::Nan;
  if (!(s >= p.min_score)) return Filter::MinScore;
  if (!(s <= p.max_score)) return Filter::MaxScore;
  if (p.upper != nullptr && !(s <= p.upper[row])) return Filter::Margin;
  return Filter::None;
}

// Adds, for each row of a score block, the candidates each score filter removes to counts[row, f - 1]
// (f = Labels .. Margin, int64 [num_rows, kScoreFilters]); banned ids are skipped (counted from the ids).
template <typename T>
HN_HD void count_filters_row(const TopkParams& p, const T* data, int64_t cols, int64_t col_stride, int64_t row,
                             int64_t col_offset, int64_t* counts) {
  for (int64_t c = 0; c < cols; ++c) {
    const double s = to_float(load_at<T>(data, c * col_stride));  // a block may start at any byte address
    const int f = static_cast<int>(first_failed_filter(p, row, col_offset + c, s));
    if (f > 0) ++counts[f - 1];
  }
}

// ---------------------------------------------------------------------------------------------------
// Binary heaps on parallel arrays with the *worst* element at the root, so the root is the running
// threshold. Score order: higher score is better, ties go to the lower candidate id.
struct Slot {
  double* s;
  int64_t* j;
  double* key;  // may be null for score heaps
};

HN_HD bool worse_by_score(double s1, int64_t j1, double s2, int64_t j2) {
  return s1 < s2 || (s1 == s2 && j1 > j2);
}
HN_HD bool worse_by_key(double k1, int64_t j1, double k2, int64_t j2) {
  return k1 < k2 || (k1 == k2 && j1 > j2);
}

// Item of a heap, moved as a unit. Keys travel only in key heaps (score heaps never read them).
struct Item {
  double s;
  int64_t j;
  double key;
};

template <bool kByKey>
HN_HD bool item_worse(const Item& a, const Item& b) {
  return kByKey ? worse_by_key(a.key, a.j, b.key, b.j) : worse_by_score(a.s, a.j, b.s, b.j);
}

template <bool kByKey>
HN_HD Item load(const Slot& h, int64_t i) {
  return Item{h.s[i], h.j[i], kByKey ? h.key[i] : 0.0};
}

template <bool kByKey>
HN_HD void store(const Slot& h, int64_t i, const Item& it) {
  h.s[i] = it.s;
  h.j[i] = it.j;
  if (kByKey) h.key[i] = it.key;
}

// Places `it` into the hole at i of a heap of n items, moving worse children up ("hole" sifting: one
// store per level instead of a swap).
template <bool kByKey>
HN_HD void sift_down(const Slot& h, int64_t n, int64_t i, const Item& it) {
  for (;;) {
    int64_t c = 2 * i + 1;
    if (c >= n) break;
    Item child = load<kByKey>(h, c);
    if (c + 1 < n) {
      const Item right = load<kByKey>(h, c + 1);
      if (item_worse<kByKey>(right, child)) {
        child = right;
        ++c;
      }
    }
    if (!item_worse<kByKey>(child, it)) break;
    store<kByKey>(h, i, child);
    i = c;
  }
  store<kByKey>(h, i, it);
}

template <bool kByKey>
HN_HD void sift_up(const Slot& h, int64_t i, const Item& it) {
  while (i > 0) {
    const int64_t parent = (i - 1) >> 1;
    const Item up = load<kByKey>(h, parent);
    if (!item_worse<kByKey>(it, up)) break;
    store<kByKey>(h, i, up);
    i = parent;
  }
  store<kByKey>(h, i, it);
}

template <bool kByKey>
HN_HD void heapify(const Slot& h, int64_t n) {
  for (int64_t i = n / 2 - 1; i >= 0; --i) sift_down<kByKey>(h, n, i, load<kByKey>(h, i));
}

// In-place heap sort of a worst-at-root heap: afterwards [0, n) is ordered best first.
template <bool kByKey>
HN_HD void sort_heap_best_first(const Slot& h, int64_t n) {
  for (int64_t end = n - 1; end > 0; --end) {
    const Item last = load<kByKey>(h, end);
    store<kByKey>(h, end, load<kByKey>(h, 0));
    sift_down<kByKey>(h, end, 0, last);
  }
}

// Offers `it` to a heap of capacity `cap` holding `count` items. Returns true when an item leaves (the
// offered one if it did not get in, else the previous root); it is written to `out`.
template <bool kByKey>
HN_HD bool heap_offer(const Slot& h, int64_t cap, int64_t& count, const Item& it, Item& out) {
  if (count < cap) {
    sift_up<kByKey>(h, count, it);
    ++count;
    return false;
  }
  if (cap == 0 || !item_worse<kByKey>(load<kByKey>(h, 0), it)) {
    out = it;
    return true;
  }
  out = load<kByKey>(h, 0);
  sift_down<kByKey>(h, cap, 0, it);
  return true;
}

// The state of one row.
struct RowState {
  Slot skip_or_window;  // score heap: the window heap (mode window) or the skip heap (mode stream)
  Slot keyed;           // key heap (mode stream)
  int64_t* count;       // [2]
};

HN_HD RowState row_state(const TopkParams& p, int64_t row) {
  RowState r;
  const int64_t base = row * p.capacity;
  r.skip_or_window = Slot{p.st_score + base, p.st_index + base, nullptr};
  if (p.mode == SelectMode::Stream) {
    r.keyed = Slot{p.st_score + base + p.skip, p.st_index + base + p.skip, p.st_key + base + p.skip};
  } else {
    r.keyed = Slot{nullptr, nullptr, nullptr};
  }
  r.count = p.st_count + 2 * row;
  return r;
}

// Items pushed out of the skip heap (or never entering it) in stream mode go to the key heap.
HN_HD void offer_to_keyed(const TopkParams& p, const RowState& st, int64_t row, double s, int64_t j) {
  const double key = sample_key(p.sampling, s, p.inv_temperature, p.seed, p.noise_row_offset + row, j);
  Item out;
  heap_offer<true>(st.keyed, p.k, st.count[1], Item{s, j, key}, out);
}

// Offers an eligible candidate to the row's state.
HN_HD void offer_candidate(const TopkParams& p, const RowState& st, int64_t row, double s, int64_t j) {
  Item out;
  if (p.mode == SelectMode::Window) {
    heap_offer<false>(st.skip_or_window, p.capacity, st.count[0], Item{s, j, 0.0}, out);
    return;
  }
  if (p.skip > 0) {
    if (!heap_offer<false>(st.skip_or_window, p.skip, st.count[0], Item{s, j, 0.0}, out)) return;
    s = out.s;
    j = out.j;
  }
  offer_to_keyed(p, st, row, s, j);
}

// The sampling key of candidate j for state row `row` (the noise row is the global query id).
HN_HD double row_sample_key(const TopkParams& p, int64_t row, double s, int64_t j) {
  return sample_key(p.sampling, s, p.inv_temperature, p.seed, p.noise_row_offset + row, j);
}

// A snapshot of the two heap roots of a stream-mode row. A candidate the gate rejects cannot change
// the state: it would neither enter the skip heap (full, root better) nor the key heap (full, root key
// better). Heap roots only ever get better, so a stale snapshot admits a superset of what the current
// state would accept; that is what lets the GPU filter candidates in parallel lanes against a snapshot
// and leave the exact decision to offer_candidate.
struct StreamGate {
  bool skip_room;  // the skip heap has a free slot
  double skip_s;   // skip heap root (valid when skip > 0 and the heap is full)
  int64_t skip_j;
  bool key_room;   // the key heap has a free slot
  double key_k;    // key heap root (valid when k > 0 and the heap is full)
  int64_t key_j;
};

HN_HD StreamGate stream_gate(const TopkParams& p, const RowState& st) {
  StreamGate g;
  g.skip_room = st.count[0] < p.skip;
  const bool skip_full = p.skip > 0 && !g.skip_room;
  g.skip_s = skip_full ? st.skip_or_window.s[0] : INFINITY;
  g.skip_j = skip_full ? st.skip_or_window.j[0] : -1;
  g.key_room = st.count[1] < p.k;
  const bool key_full = p.k > 0 && !g.key_room;
  g.key_k = key_full ? st.keyed.key[0] : INFINITY;
  g.key_j = key_full ? st.keyed.j[0] : -1;
  return g;
}

HN_HD bool stream_gate_admits(const StreamGate& g, double s, int64_t j, double key) {
  if (g.skip_room || worse_by_score(g.skip_s, g.skip_j, s, j)) return true;
  return g.key_room || worse_by_key(g.key_k, g.key_j, key, j);
}

// Lowest score that can still enter the row's state (a superset test: ties are resolved exactly by
// offer_candidate). -inf while the heap has room, and always in stream mode, where every eligible
// candidate can matter to the sample.
HN_HD double row_entry_threshold(const TopkParams& p, const RowState& st) {
  if (p.mode == SelectMode::Window && p.capacity > 0 && st.count[0] >= p.capacity) return st.skip_or_window.s[0];
  if (p.mode == SelectMode::Window && p.capacity == 0) return INFINITY;
  return -INFINITY;
}

// Writes the row's k results (score descending, ties to the lower id), padding with (-inf, -1).
// Destroys the state of the row.
HN_HD void finalize_row(const TopkParams& p, int64_t row, double* out_s, int64_t* out_j) {
  const RowState st = row_state(p, row);
  int64_t first = 0, n = 0;  // the chosen items, best first, live at slots [first, first + n)
  Slot out_slot = st.skip_or_window;
  if (p.mode == SelectMode::Window) {
    const int64_t count = st.count[0];
    sort_heap_best_first<false>(st.skip_or_window, count);
    const int64_t begin = p.skip < count ? p.skip : count;
    int64_t end = count;
    if (p.pool >= 0 && begin + p.pool < end) end = begin + p.pool;
    first = begin;
    if (p.sampling == Sampling::Top) {
      n = (end - begin) < p.k ? (end - begin) : p.k;
    } else {
      // Choose the k largest keys of the window in place: slots [begin, begin + k) become a key heap
      // fed by the rest of the window, then that heap is sorted by score.
      Slot w{st.skip_or_window.s + begin, st.skip_or_window.j + begin, p.st_key + row * p.capacity + begin};
      const int64_t len = end - begin;
      for (int64_t t = 0; t < len; ++t)
        w.key[t] = sample_key(p.sampling, w.s[t], p.inv_temperature, p.seed, p.noise_row_offset + row, w.j[t]);
      n = len < p.k ? len : p.k;
      heapify<true>(w, n);
      for (int64_t t = n; t < len; ++t) {
        const Item it = load<true>(w, t);
        if (item_worse<true>(load<true>(w, 0), it)) sift_down<true>(w, n, 0, it);
      }
      heapify<false>(w, n);
      sort_heap_best_first<false>(w, n);
    }
  } else {
    out_slot = st.keyed;
    n = st.count[1];
    heapify<false>(st.keyed, n);
    sort_heap_best_first<false>(st.keyed, n);
  }
  for (int64_t t = 0; t < p.k; ++t) {
    if (t < n) {
      out_s[t] = out_slot.s[first + t];
      out_j[t] = out_slot.j[first + t];
    } else {
      out_s[t] = -INFINITY;
      out_j[t] = -1;
    }
  }
}

// Folds row `row` of another state (same params shape, disjoint candidate ids) into this one, so that
// states built over different candidate shards merge into exactly the state of the whole.
HN_HD void merge_row(const TopkParams& p, const TopkParams& other, int64_t row) {
  const RowState st = row_state(p, row);
  const RowState ot = row_state(other, row);
  for (int64_t t = 0; t < ot.count[0]; ++t)
    offer_candidate(p, st, row, ot.skip_or_window.s[t], ot.skip_or_window.j[t]);
  if (p.mode == SelectMode::Stream) {
    // These were outranked by `skip` items of their own shard, so they are below the global skip set.
    for (int64_t t = 0; t < ot.count[1]; ++t) offer_to_keyed(p, st, row, ot.keyed.s[t], ot.keyed.j[t]);
  }
}

// ---------------------------------------------------------------------------------------------------
// The fused path (csrc/cuda/topk_fused.cu): a tensor-core kernel filters each score tile against
// per-row float bounds taken from the state before the launch, and appends survivors to per-row
// candidate lists; those lists are then offered to the state here, exactly.

// Directed float roundings: for a float s, (s >= v) == (s >= float_round_up(v)) and
// (s <= v) == (s <= float_round_down(v)); NaN stays NaN (nothing passes).
HN_HD float float_round_up(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) < v) f = nextafterf(f, INFINITY);
  return f;
}
HN_HD float float_round_down(double v) {
  float f = static_cast<float>(v);
  if (static_cast<double>(f) > v) f = nextafterf(f, -INFINITY);
  return f;
}

// The row's bulk interval in float: [max(entry threshold, min_score), min(max_score, margin bound)].
// Every candidate the state could still take lies inside it (window mode; in stream mode only the
// score bounds apply, since every eligible candidate can matter to the sample).
HN_HD void row_float_bounds(const TopkParams& p, int64_t row, float& lo, float& hi) {
  const RowState st = row_state(p, row);
  const double t = row_entry_threshold(p, st);
  lo = float_round_up(t > p.min_score ? t : p.min_score);
  hi = float_round_down(row_upper(p, row));
}

// How many entries of a fused candidate list to offer: all `count` of them, or none when the list
// overflowed (count > cap): the driver redoes such a row's chunk on the two-pass path, so offering the
// part that fit would count those candidates twice.
HN_HD int64_t listed_entries(int32_t count, int64_t cap) { return count < 0 || count > cap ? 0 : count; }

// Offers a row's candidate list (float scores, int32 column offsets from col_offset, any order) to
// its state: the bounds, then the masks, then the heap. The result does not depend on the list's
// order, since the state keeps the best items under the total order (score desc, id asc).
HN_HD void offer_candidate_list(const TopkParams& p, int64_t row, const float* scores, const int32_t* cols,
                                int64_t n, int64_t col_offset) {
  const RowState st = row_state(p, row);
  float lo, hi;
  row_float_bounds(p, row, lo, hi);
  for (int64_t t = 0; t < n; ++t) {
    const float s = scores[t];
    if (!(s >= lo && s <= hi)) continue;
    const int64_t j = col_offset + cols[t];
    if (id_banned(p, row, j) || !label_allowed(p, row, j)) continue;
    offer_candidate(p, st, row, static_cast<double>(s), j);
    row_float_bounds(p, row, lo, hi);
  }
}

// One fused launch: s_ij = (q_i . c_j) * row_scale_i * col_scale_j (scales 1 when null; cosine passes
// inverse norms) for rows [0, rows) of `queries` and candidate rows [0, cols) of `candidates` (global
// ids col_offset + j), fp32 accumulation. 16-bit inputs: products exact, so s_ij is the two-pass
// path's score up to summation order. fp32 inputs: tf32 tensor cores (inputs rounded to nearest tf32),
// so s_ij may be off by up to w_ij = row_slack_i * col_slack_j (see tf32_dot_error_factor); the
// kernel then keeps every candidate whose interval [s - w, s + w] meets [row_lo_i, row_hi_i], and the
// survivors are rescored exactly (topk_rescore_candidates_*) before they are offered. Survivors are
// appended to row i's list; cand_count[i] counts them, past cand_cap too (those are dropped: the caller
// sees count > cand_cap and redoes the row's chunk), though appends stop once the count has passed the cap.
// Which kernel a fused launch runs. Auto: the sm_90a wgmma kernel where the device, the build and the
// inputs allow it, else mma.sync. The wgmma codes force that kernel and tile shape (csrc/topk_fused_sm90.h)
// and throw where it cannot run.
enum class FusedKernel : int { Auto = 0, Mma = 1, Wgmma = 2, Wgmma256x128 = 3, Wgmma128x256 = 4 };

// The most candidates one fused launch takes: the mma.sync grid puts 128-column tiles on grid.y, which
// holds at most 65535 (the wgmma kernels keep the same limit, so every kernel takes the same blocks). The
// driver clamps its chunk width to it (hnsample/engine/cuda.py).
constexpr int64_t kFusedMaxCols = int64_t{65535} * 128;

struct FusedBlock {
  const void* queries = nullptr;     // [rows, dim] bf16/fp16/fp32, rows 16-byte aligned
  int64_t q_stride = 0;
  const void* candidates = nullptr;  // [cols, dim]
  int64_t c_stride = 0;
  int dtype = 0;
  int64_t rows = 0, cols = 0, dim = 0;
  const float* row_lo = nullptr;     // [rows]
  const float* row_hi = nullptr;     // [rows]
  const float* row_scale = nullptr;  // [rows] or null
  const float* col_scale = nullptr;  // [cols] or null
  const float* row_slack = nullptr;  // [rows] or null (exact products: no slack)
  const float* col_slack = nullptr;  // [cols], read only when row_slack is set
  float* cand_score = nullptr;       // [rows, cand_cap]
  int32_t* cand_col = nullptr;       // [rows, cand_cap]
  int32_t* cand_count = nullptr;     // [rows]
  int64_t cand_cap = 0;
  FusedKernel kernel = FusedKernel::Auto;
  int stages = 0;  // mma.sync pipeline depth: 0 by the device's shared memory, or 2 or 4
};

// The factor e(d) of the tf32 score error bound |s_tc - s| <= e(d) |q| |c| (Euclidean norms), where s
// is the exact real dot product of two fp32 vectors of length d and s_tc what the tf32 tensor cores
// return for it (either before or after scaling both sides by the same nonnegative float factors):
//   * each input rounded to nearest tf32 has relative error <= u = 2^-11, so each product
//     q~_k c~_k = q_k c_k (1 + t_k) with |t_k| <= 2u + u^2, and sum_k |q_k c_k| <= |q| |c|
//     (Cauchy-Schwarz): at most (2u + u^2) |q| |c| in all;
//   * fp32 accumulation of d exact products, allowing truncation instead of rounding in every adder
//     (unit 2^-23 per step) and a factor 2 for alignment losses inside the tensor core's adder tree:
//     at most 2 (d + 2) 2^-23 sum_k |q~_k c~_k| <= 2 (d + 2) 2^-23 (1 + 2u + u^2) |q| |c|;
//   * the epilogue's scaling by two floats and the comparisons s +- w: 8 more units of 2^-24, relative
//     to |s| <= |q| |c|.
// The sum is rounded up by a further factor (1 + 2^-20) for the float rounding of the slack itself.
HN_HD double tf32_dot_error_factor(int64_t dim) {
  const double u = 1.0 / 2048.0, ulp = 1.0 / 8388608.0;
  const double product = 2 * u + u * u;
  const double accumulate = 2.0 * static_cast<double>(dim + 2) * ulp * (1 + product);
  return (product + accumulate + 8 * ulp / 2) * (1 + 1.0 / 1048576.0);
}

// The exact rescoring of a candidate list: s = (sum_k q_k c_k in double) * row_scale * col_scale,
// rounded once to float. The double sum of fp32 products has error <= d 2^-53 sum |q_k c_k|, far
// below one float rounding, so s is the correctly rounded fp32 score but for rare double ties.
HN_HD float rescore_dot(const float* q, const float* c, int64_t dim, float row_scale, float col_scale) {
  double acc = 0.0;
  for (int64_t k = 0; k < dim; ++k) acc += static_cast<double>(q[k]) * static_cast<double>(c[k]);
  return static_cast<float>(acc * static_cast<double>(row_scale) * static_cast<double>(col_scale));
}

// ---------------------------------------------------------------------------------------------------
// Launchers.
void topk_select_block_cpu(const TopkParams& p, const ScoreBlock& block, int threads);
void topk_finalize_cpu(const TopkParams& p, double* out_scores,  // [B, k]
                       int64_t* out_indices,                      // [B, k]
                       int threads);
void topk_merge_cpu(const TopkParams& p, const TopkParams& other, int threads);
void topk_row_bounds_cpu(const TopkParams& p, float* lo, float* hi, int threads);  // [B], [B]
// counts: int64 [num_rows, kScoreFilters], added to (see count_filters_row).
void topk_filter_counts_cpu(const TopkParams& p, const ScoreBlock& block, int64_t* counts, int threads);
// Replaces every listed candidate's score in f.cand_score by its exact rescoring (rescore_dot) from
// f's fp32 queries and candidates and scales.
void topk_rescore_candidates_cpu(const FusedBlock& f, int threads);
// Rows whose count exceeds cap (overflowed lists) are skipped: see listed_entries.
void topk_offer_candidates_cpu(const TopkParams& p, const float* scores,  // [B, cap]
                               const int32_t* cols,                      // [B, cap]
                               const int32_t* counts,                    // [B]
                               int64_t cap, int64_t col_offset, int threads);

#if defined(HNSAMPLE_WITH_CUDA)
void topk_select_block_cuda(const TopkParams& p, const ScoreBlock& block, void* stream);
// Splits the block's columns into `segments` ranges; range s feeds state copy s, which lives s * B rows
// past p's state pointers (a [segments, B, capacity] state, merged into the result with topk_merge).
void topk_select_block_segments_cuda(const TopkParams& p, const ScoreBlock& block, int64_t segments,
                                     void* stream);
void topk_finalize_cuda(const TopkParams& p, double* out_scores, int64_t* out_indices, void* stream);
void topk_merge_cuda(const TopkParams& p, const TopkParams& other, void* stream);
void topk_row_bounds_cuda(const TopkParams& p, float* lo, float* hi, void* stream);
void topk_filter_counts_cuda(const TopkParams& p, const ScoreBlock& block, int64_t* counts, void* stream);
void topk_offer_candidates_cuda(const TopkParams& p, const float* scores, const int32_t* cols,
                                const int32_t* counts, int64_t cap, int64_t col_offset, void* stream);
// False when the device cannot run the fused kernel (compute capability < 8.0).
bool topk_fused_supported(int device);
void topk_fused_scores_cuda(const FusedBlock& f, void* stream);
void topk_rescore_candidates_cuda(const FusedBlock& f, void* stream);
#endif

// ---------------------------------------------------------------------------------------------------
// Candidate lists (topk_from_candidates): per row, C (candidate id, score) pairs from an earlier
// retrieval (a reranker's scores of a bi-encoder's top C, say). Ids replace column positions: the
// masks, labels and sampling noise see the listed id, so a list holding every id 0..N-1 selects exactly
// what the (B, N) score matrix does.
struct CandidateBlock {
  const void* scores = nullptr;  // [rows, cols] float32/float64/float16/bfloat16
  int dtype = 0;
  int64_t rows = 0, cols = 0;
  int64_t score_row_stride = 0, score_col_stride = 1;
  const void* ids = nullptr;     // [rows, cols] int64 candidate ids, -1 = padding; any byte address (load_at)
  int64_t id_row_stride = 0, id_col_stride = 1;
  int64_t row_offset = 0;        // block row r is state row row_offset + r
  int64_t num_ids = 0;           // N: an id outside [0, N) is padding (never read past candidate_labels)
};

// The listed id at (r, c), or -1 for padding and for ids outside [0, num_ids).
HN_HD int64_t listed_id(const CandidateBlock& b, int64_t r, int64_t c) {
  const int64_t j = load_at<int64_t>(b.ids, r * b.id_row_stride + c * b.id_col_stride);
  return (j >= 0 && j < b.num_ids) ? j : -1;
}

// The listed score at (r, c). Scores, like ids, may start at any byte address on the CPU (numpy views of
// bytes, torch.frombuffer with an offset): read through load_at.
template <typename T>
HN_HD T listed_score(const CandidateBlock& b, int64_t r, int64_t c) {
  return load_at<T>(b.scores, r * b.score_row_stride + c * b.score_col_stride);
}

// Offers block row r's listed candidates to its state row: the score interval [min_score, row_upper]
// compared in float64, then the id and label masks, then the heap (offer_candidate). Order-free: the
// state keeps the best items under the total order (score desc, id asc).
template <typename T>
HN_HD void offer_listed_row(const TopkParams& p, const CandidateBlock& b, int64_t r) {
  const int64_t row = b.row_offset + r;
  const RowState st = row_state(p, row);
  const double hi = row_upper(p, row);
  for (int64_t c = 0; c < b.cols; ++c) {
    const int64_t j = listed_id(b, r, c);
    if (j < 0) continue;
    const double s = static_cast<double>(to_float(listed_score<T>(b, r, c)));
    if (!(s >= p.min_score && s <= hi)) continue;  // NaN fails both
    if (id_banned(p, row, j) || !label_allowed(p, row, j)) continue;
    offer_candidate(p, st, row, s, j);
  }
}

// Filter statistics of a row's list: counts[f] += 1 for the first filter f (Banned .. Margin) each listed
// candidate fails (int64 [kCandidateFilters]); padding is not counted.
constexpr int kCandidateFilters = 6;  // Banned, Labels, Nan, MinScore, MaxScore, Margin

template <typename T>
HN_HD void count_listed_filters_row(const TopkParams& p, const CandidateBlock& b, int64_t r, int64_t* counts) {
  const int64_t row = b.row_offset + r;
  for (int64_t c = 0; c < b.cols; ++c) {
    const int64_t j = listed_id(b, r, c);
    if (j < 0) continue;
    const int f = static_cast<int>(first_failed_filter(p, row, j, to_float(listed_score<T>(b, r, c))));
    if (f >= 0) ++counts[f];
  }
}

void topk_candidates_select_cpu(const TopkParams& p, const CandidateBlock& block, int threads);
// counts: int64 [num_rows, kCandidateFilters], added to (see count_listed_filters_row).
void topk_candidates_filter_counts_cpu(const TopkParams& p, const CandidateBlock& block, int64_t* counts,
                                       int threads);
#if defined(HNSAMPLE_WITH_CUDA)
void topk_candidates_select_cuda(const TopkParams& p, const CandidateBlock& block, void* stream);
void topk_candidates_filter_counts_cuda(const TopkParams& p, const CandidateBlock& block, int64_t* counts,
                                        void* stream);
#endif

}  // namespace hnsample
