"""A cheap first filter for choices of the largest or smallest "euclidean" score of each anchor row (the
hardest negative / positive of batch_hard): one float32 pass over the screening GEMM's block, no float64
pass over the pairs. It keeps, per row, every eligible column whose canonical score s = -float32(sqrt(D2))
may be the row's extreme (ties included); the caller rescores the kept pairs canonically and chooses among
them, which equals the choice over all pairs (docs/certified.md, "In-batch miners").

Proof (every constant below is rounded up by SAFETY = 1 + 2^-20, which covers the few float64 roundings
of computing it). With S^ the GEMM's block, sq = fl64(N^2) of the canonical norms and E = |a - b|^2:

1. t = float32(float32(sq_c) - 2 S^) (one rounding after an exact product by 2; fused or not) satisfies
   |t - (sq_c - 2 S^)| <= T = 2^-24 (3 sq_c + 2 |S^|) + 2^-148 (the rounding of sq_c to float32 and of the
   difference, 2^-150 absolute each where subnormal).
2. |sq_q + sq_c - 2 S^ - E| <= W2 (engine.intervals.distance_error: its first step, before Delta is rounded
   to float64). W2 grows with w, N_c^2, |q| |c| and |S^|, so its value at a row's maxima over the finite
   columns bounds every pair of the row: w_max = the product's factors at their column maxima; |S^| <=
   |S| + w <= |q| |c| + w0 + rel |S^|, so |S^| <= mag = (|q| |c|_max + w0) / (1 - rel).
   Hence E in [sq_q + t - G, sq_q + t + G], G = W2_max + T_max, and D2 = E (1 + phi), |phi| <= rho.
3. Strict order of s: for x, y >= 0 with y <= 2^126 and x >= y (1 + 2^-21) + 2^-147, float32(fl64(sqrt))
   of x^2 exceeds that of y^2: fl64(sqrt) moves each by at most 2^-53 relatively, float32 rounding by
   2^-24 relatively plus 2^-150 absolute (x may overflow to inf: still larger), and
   (1 + 2^-21)(1 - 2^-53)(1 - 2^-24) > (1 + 2^-53)(1 + 2^-24). So -float32(sqrt) is strictly smaller.
4. Largest s (smallest D2): m = the row's least finite eligible t, attained by j*; D2_j* <= H =
   (sq_q + m + G)(1 + rho) =: y^2. A column with (sq_q + t - G)(1 - rho) >= (y (1 + 2^-21) + 2^-147)^2
   scores strictly below j* (3.), so it is never the row's choice, nor tied with it: dropped when
   t >= theta = that bound solved for t, if y <= 2^126.
   Smallest s (largest D2): M = the largest finite eligible t, attained by j*; D2_j* >= (sq_q + M - G)
   (1 - rho) =: x^2. A column with y_j^2 = (sq_q + t + G)(1 + rho), y_j <= Y = min((x - 2^-147) /
   (1 + 2^-21), 2^126), scores strictly above j*: dropped when t <= phi = Y^2 / (1 + rho) - G - sq_q.
   theta is computed rounded up and phi rounded down (each sum carries 2^-49 of its terms' magnitudes,
   more than its float64 roundings), then rounded to float32 outward. A column with a non-finite t is
   always kept; a row with a non-finite bound keeps all its eligible columns.
"""

from __future__ import annotations

import math

import torch

from .. import _C
from .certify import SAFETY
from .intervals import BatchScores, distance_error, distance_rho
from .selection import kernels_for

U32 = 2.0**-24
SLACK = 2.0**-49  # per sum: more than its float64 roundings
STEP = 1 + 2.0**-21
TINY = 2.0**-147
LARGEST_Y = 2.0**126


class _KeyBlock:
    """What both screens share: the float32 keys t of anchor rows [i0, i1) of a certified
    :class:`BatchScores` (from the screening product's block), the row part of the product's bound at the
    candidate side's maxima, and the block's non-finite keys, looked for once."""

    t: torch.Tensor
    _nonfinite: torch.Tensor | bool | None = None  # the block's non-finite keys (False: none), once found

    @staticmethod
    def _approx(scores: BatchScores, i0: int, i1: int) -> torch.Tensor:
        approx = torch.empty((i1 - i0, scores.n), dtype=scores.product.out_dtype)
        scores.product.scores(scores.q[i0:i1], scores.c, approx)
        return approx.float()

    @staticmethod
    def _row_bound(scores: BatchScores, i0: int, i1: int) -> torch.Tensor:
        """a_i max b + e_i max f + g_i + max h (float64), the maxima over the finite columns."""
        q = scores.q[i0:i1]
        _, first_max, floor_max, second_max = _column_maxima(scores)
        w = q.first * first_max + floor_max
        if q.second is not None:
            w = w + q.second * second_max
        if q.floor is not None:
            w = w + q.floor
        return w

    def nonfinite_key(self, eligible: torch.Tensor) -> bool:
        """Whether a key is not finite where ``eligible`` ((rows, B) bool) holds."""
        if self._nonfinite is None:
            found = ~self.t.isfinite()
            self._nonfinite = found if bool(found.any()) else False
        return self._nonfinite is not False and bool((eligible & self._nonfinite).any())


class DistanceScreen(_KeyBlock):
    """The float32 keys t (rows, B) of anchor rows [i0, i1) of a certified "euclidean" :class:`BatchScores`
    and each row's error bound G (float64): E = |a - b|^2 lies in [sq_q + t - G, sq_q + t + G] wherever t
    is finite (module docstring, 1. and 2.)."""

    def __init__(self, scores: BatchScores, i0: int, i1: int):
        self.t = torch.add(scores.sq.float()[None, :], self._approx(scores, i0, i1), alpha=-2)
        self.sq_q = scores.sq[i0:i1]
        sq_max = _column_maxima(scores)[0]
        w0 = self._row_bound(scores, i0, i1) + 2.0**-150
        norms = (self.sq_q.sqrt() * SAFETY) * (math.sqrt(sq_max) * SAFETY)
        rel = scores.product.rel
        mag = (norms + w0) / (1 - rel) * SAFETY
        w_max = (w0 + rel * mag) * SAFETY
        self.rho = distance_rho(scores.e.shape[1])
        w2 = distance_error(w_max, self.sq_q + sq_max, norms, mag, self.rho, scores.rounding)
        self.g = (w2 + (U32 * (3 * sq_max + 2 * mag) + 2.0**-148) * SAFETY) * SAFETY

    def extreme_candidates(self, eligible: torch.Tensor, largest_score: bool,
                           capacity: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(rows, columns), int64, rows ascending and columns ascending within one: the eligible columns
        ((rows, B) bool) that may hold the row's largest score (largest_score) or its smallest, ties
        included (module docstring, 4.), found by the C++ passes over the keys (kth_key for the row's
        least / greatest key, key_columns for the cut). None where an eligible key is not finite or more
        than ``capacity`` are kept: the caller takes its slower way."""
        t, sq, g, rho = self.t, self.sq_q, self.g, self.rho
        if self.nonfinite_key(eligible):
            return None
        keys = torch.where(eligible, t if largest_score else -t, math.nan)  # NaN keys never count
        rows = torch.arange(t.shape[0])
        least = kth_key(keys, rows, torch.full((t.shape[0],), -math.inf), 1).double()  # +inf: no column
        if largest_score:  # drop t >= cut: keep t < cut
            hi = above_cut(sq, g, rho, self.root_bound(least, sq, g))
        else:  # drop t <= cut: keep -t < -cut
            m = -least
            low = (sq + m - g - SLACK * (sq + m.abs() + g)) * (1 - rho) / SAFETY
            hi = -below_cut(sq, g, rho, low.clamp_min(0).sqrt() / SAFETY)
        return key_columns(keys, rows, torch.full((t.shape[0],), -math.inf), hi, capacity)

    def root_bound(self, m: torch.Tensor, sq: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """y >= sqrt(D2) for a column of key m (float64) in rows of sq = fl64(N_a^2), bound g: D2 <=
        (sq + m + g)(1 + rho), computed rounded up (inf for m = inf)."""
        h = (sq + m + g + SLACK * (sq + m.abs() + g)).clamp_min(0) * (1 + self.rho) * SAFETY
        return h.sqrt() * SAFETY


class ScoreScreen(_KeyBlock):
    """The float32 keys t = -S^ (rows, B) of anchor rows [i0, i1) of a certified "dot" / "cosine"
    :class:`BatchScores` and each row's bound W (float64): the canonical score s_ij lies in
    [-t_ij - W_i, -t_ij + W_i] wherever t_ij is finite (keys ascend as scores descend, as distances do).

    W_i = a_i max b + e_i max f + g_i + max h + rel max_j |S^_ij| over the finite columns: every term of
    w_ij (engine.certify) is non-negative and at most its row's maximum, so w_ij <= W_i. A row whose W is
    not finite (an operand with an infinite bound: huge norms) has no usable cuts."""

    def __init__(self, scores: BatchScores, i0: int, i1: int):
        self.t = self._approx(scores, i0, i1).neg_()
        w = self._row_bound(scores, i0, i1)
        rel = scores.product.rel
        if rel:
            mag = torch.where(scores.finite[None, :], self.t.abs(), 0.0).amax(dim=1).double()
            w = w + rel * mag
        self.w = w * SAFETY


def score_cuts(w: torch.Tensor, v: torch.Tensor, margin: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cuts on the keys t = -S^ of a :class:`ScoreScreen` row (bound w, float64) for a positive pair of
    exact score v (float64 of a float32 canonical score), float32 each, computed outward (each sum carries
    SLACK of its terms' magnitudes, more than its float64 roundings):

    * ``lo``: t <= lo gives s >= -t - w >= v: the negative is never below v;
    * ``past``: t >= past gives s <= -t + w <= v + r, r the float64 below -margin, so fl64(s - v) <= r
      (fl64 is monotone): past the margin;
    * ``below``: t >= below gives s <= -t + w < v: certainly below v (strictly: one float32 step past
      the rounded-up bound)."""
    r = math.nextafter(-margin, -math.inf)
    lo = -v - w - SLACK * (v.abs() + w)
    past = w - v - r + SLACK * (w + v.abs() + abs(r))
    below = w - v + SLACK * (w + v.abs())
    up = _float32_outward(below, up=True)
    return (_float32_outward(lo, up=False), _float32_outward(past, up=True),
            torch.nextafter(up, torch.tensor(math.inf)))


def score_rank_cut(w: torch.Tensor, kth: torch.Tensor) -> torch.Tensor:
    """float32: a key t >= the cut has s <= -t + w < -kth - w, below the score of every column whose key is
    at most kth (s >= -kth - w there): strictly behind each of them (inf for kth = inf)."""
    up = _float32_outward(kth + 2 * w + SLACK * (kth.abs() + 2 * w), up=True)
    return torch.nextafter(up, torch.tensor(math.inf))


def _column_maxima(scores: BatchScores) -> tuple[float, float, float, float]:
    """The maxima over the finite columns of sq, and of the candidate operand's first, floor and second
    bound terms (0 for a missing term or no finite column); once per batch (kept in ``scores.derived``)."""
    cached = scores.derived.get("distance_maxima")
    if cached is None:
        fin, c = scores.finite, scores.c
        any_finite = bool(fin.any())

        def col_max(v):
            return 0.0 if v is None or not any_finite else float(v[fin].max())

        cached = (col_max(scores.sq), col_max(c.first), col_max(c.floor), col_max(c.second))
        scores.derived["distance_maxima"] = cached
    return cached


def above_cut(sq: torch.Tensor, g: torch.Tensor, rho: float, y: torch.Tensor) -> torch.Tensor:
    """float32 cuts, elementwise for rows of sq = fl64(N_a^2) and bound g: a column of key t >= cut has
    float32(fl64(sqrt(D2))) > y(1 + 2^-22), so its score is strictly below that of any pair whose
    sqrt(D2) <= y (module docstring, 3. and 4.), and its distance strictly above y when y >= 0 is any
    float64 (float32 rounding moves by less than 2^-24 relative + 2^-150).
    (N_a^2 + t - G)(1 - rho) >= (y(1 + 2^-21) + 2^-147)^2 solved for t, rounded up; +inf (no key is
    past it) for y > 2^126 or a non-finite bound."""
    lam = (y * STEP * SAFETY + TINY) ** 2 * SAFETY
    p = lam * SAFETY / (1 - rho)
    bound = p + g - sq + SLACK * (p + g + sq)
    usable = bound.isfinite() & (y <= LARGEST_Y)
    return torch.where(usable, _float32_outward(bound, up=True), math.inf)


def below_cut(sq: torch.Tensor, g: torch.Tensor, rho: float, x: torch.Tensor) -> torch.Tensor:
    """float32 cuts as :func:`above_cut`, the other way: a column of key t <= cut has sqrt(D2) <=
    (x - 2^-147) / (1 + 2^-21), so its score is strictly above that of any pair whose sqrt(D2) >= x, and
    its distance float32(fl64(sqrt(D2))) <= x for a float32 x. -inf (no key is below it) for
    x <= 2^-147 or a non-finite bound."""
    y = torch.clamp_max((x - TINY) / STEP / SAFETY, LARGEST_Y)
    p = y * y / SAFETY / (1 + rho) / SAFETY
    bound = p - g - sq - SLACK * (p + g + sq)
    usable = bound.isfinite() & (y > 0)
    return torch.where(usable, _float32_outward(bound, up=False), -math.inf)


def _float32_outward(v: torch.Tensor, up: bool) -> torch.Tensor:
    """float32 values >= v (up) or <= v, elementwise (NaN stays NaN)."""
    f = v.float()
    if up:
        return torch.where(f.double() < v, torch.nextafter(f, torch.tensor(math.inf)), f)
    return torch.where(f.double() > v, torch.nextafter(f, torch.tensor(-math.inf)), f)


def kth_key(t: torch.Tensor, pair_rows: torch.Tensor, floor: torch.Tensor, k: int) -> torch.Tensor:
    """(P,) float32: per pair p, the k-th smallest key >= floor[p] in row pair_rows[p] of the CPU float32
    key block t (rows, cols) (NaN keys never count), +inf when there are fewer than k (csrc/cpu/distance.cpp)."""
    t, pair_rows, floor = _keys(t), pair_rows.contiguous(), floor.float().contiguous()
    out = torch.empty(pair_rows.shape[0], dtype=torch.float32)
    if out.numel():
        _C.pair_kth_key(t.data_ptr(), t.shape[0], t.shape[1], t.stride(0), pair_rows.data_ptr(), floor.data_ptr(),
                        out.numel(), k, out.data_ptr(), kernels_for(t.device).threads())
    return out


def key_columns(t: torch.Tensor, pair_rows: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                capacity: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(pairs, columns), int64: every key of row pair_rows[p] of t with lo[p] < key < hi[p], pairs ascending
    and columns ascending within one; None when there are more than ``capacity``."""
    t, pair_rows = _keys(t), pair_rows.contiguous()
    lo, hi = lo.float().contiguous(), hi.float().contiguous()
    pairs = torch.empty(capacity, dtype=torch.int64)
    cols = torch.empty(capacity, dtype=torch.int64)
    n = 0
    if pair_rows.numel():
        n = _C.pair_key_columns(t.data_ptr(), t.shape[0], t.shape[1], t.stride(0), pair_rows.data_ptr(),
                                lo.data_ptr(), hi.data_ptr(), pair_rows.numel(), capacity, pairs.data_ptr(),
                                cols.data_ptr(), kernels_for(t.device).threads())
    return None if n > capacity else (pairs[:n], cols[:n])


def _keys(t: torch.Tensor) -> torch.Tensor:
    if t.dtype != torch.float32 or t.device.type != "cpu":
        raise TypeError(f"keys must be a float32 CPU tensor, got {t.dtype} on {t.device}")
    return t if t.stride(1) == 1 else t.contiguous()
