"""Certified intervals of a batch's canonical scores against itself, block by block of anchor rows, for
choices made by comparing scores (the in-batch miners with "euclidean", hnsample.miner_choices; "dot" and
"cosine" go through the engine's selection there).

A block holds, for anchor rows [i0, i1) and every column of the batch, float64 ``lower`` <= s <= ``upper``
around the canonical score s, and ``values``: s itself where the pair was rescored, else the screening
GEMM's estimate, which lies in the interval. A caller marks the pairs whose comparisons the interval
cannot decide and :meth:`BatchScores.settle` rescores exactly those canonically; a choice that only
compares values whose order (or whose side of a bound) is certain, or exact, then equals the choice on
the canonical scores (docs/certified.md, "In-batch miners"). Memory: one block of rows x B, never B x B.

Scores by dtype and metric (float32 / float16 / bfloat16 on the CPU; everything else keeps the GEMM's
scores in the compute dtype, and its intervals are the values themselves):

* "dot", "cosine": the canonical score (csrc/canonical.h), screened by engine.certify's products.
* "euclidean": s = -float32(sqrt(D2)), the canonical squared distance D2 = the eight-lane float64 sum (the
  order of the canonical dot) of x_t = fl64(fl64(a_t - b_t)^2); screened through the dot product's GEMM,
  |a - b|^2 = |a|^2 + |b|^2 - 2 a.b (bound in :func:`euclidean_intervals`).

A row holding NaN or inf has NaN scores (values, lower and upper) with every row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import torch

from .. import _C
from .. import settings as _settings
from .._ext import dtype_code
from .blocks import screen_product
from .certify import SAFETY, SCREENED_DTYPES, canonical_norms, canonical_scores_at
from .selection import kernels_for

U64 = 2.0**-53  # unit roundoff of float64
LANES = 8  # lanes of the canonical sum (csrc/canonical.h)
DISTANCE_PAIRS = 1 << 12  # pairs per canonical distance computation (temporaries of this many rows)


@dataclasses.dataclass
class IntervalBlock:
    """Scores of anchor rows [i0, i1) with every column of the batch, (rows, B) float64 each: ``values``
    (canonical where settled, else an estimate inside the interval), ``lower`` <= s <= ``upper``.
    ``exact``: every value is the score itself (lower = upper = values)."""

    i0: int
    i1: int
    values: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    exact: bool


def canonical_distance_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(n,) float32 s_t = -float32(sqrt(D2(a_t, b_t))) for rows a, b (n, d) of a float32 / 16-bit dtype:
    x_t = fl64(fl64(a_t - b_t)^2), lanes P_r = ((0 + x_r) + x_{r+8}) + ..., t ascending,
    D2 = ((P_0 + P_4) + (P_2 + P_6)) + ((P_1 + P_5) + (P_3 + P_7)). Every step is one IEEE float64
    operation in a fixed order (never fused), so the bits are the same on every machine. CPU rows go to
    the compiled kernel (csrc/cpu/distance.cpp), others through :func:`canonical_distance_scores_torch`."""
    if a.device.type != "cpu":
        return canonical_distance_scores_torch(a, b)
    ids = torch.arange(a.shape[0])
    return canonical_distance_scores_at(a, ids, b, ids)


def canonical_distance_scores_at(x: torch.Tensor, x_ids: torch.Tensor, y: torch.Tensor,
                                 y_ids: torch.Tensor) -> torch.Tensor:
    """(n,) float32 canonical distance scores (:func:`canonical_distance_scores`) of the CPU rows
    x[x_ids[t]] and y[y_ids[t]], without gathering them; x and y of one dtype and width."""
    out = torch.empty(x_ids.shape[0], dtype=torch.float32)
    if out.numel() == 0:
        return out
    x, y = _rows(x), _rows(y)
    x_ids, y_ids = x_ids.to(torch.int64).contiguous(), y_ids.to(torch.int64).contiguous()
    _C.canonical_distances(x.data_ptr(), x.stride(0), x.shape[0], y.data_ptr(), y.stride(0), y.shape[0],
                           dtype_code(x), x.shape[1], x_ids.data_ptr(), y_ids.data_ptr(), out.numel(),
                           out.data_ptr(), kernels_for(x.device).threads())
    return out


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x with unit column stride and a row stride the kernel accepts (at least one row's width)."""
    return x if x.stride(1) == 1 and x.stride(0) >= x.shape[1] else x.contiguous()


def canonical_distance_scores_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """:func:`canonical_distance_scores` in tensor operations (each step its own operation: no fused
    multiply-add), on any device."""
    n, d = a.shape
    out = torch.empty(n, dtype=torch.float32, device=a.device)
    width = math.ceil(d / LANES) * LANES
    for s0 in range(0, n, DISTANCE_PAIRS):
        diff = a[s0:s0 + DISTANCE_PAIRS].double() - b[s0:s0 + DISTANCE_PAIRS].double()
        sq = torch.nn.functional.pad(diff * diff, (0, width - d))  # + 0.0 leaves a lane (>= 0) unchanged
        lanes = torch.zeros((sq.shape[0], LANES), dtype=torch.float64, device=a.device)
        for t in range(0, width, LANES):
            lanes += sq[:, t:t + LANES]
        p = lanes.unbind(1)
        d2 = ((p[0] + p[4]) + (p[2] + p[6])) + ((p[1] + p[5]) + (p[3] + p[7]))
        out[s0:s0 + DISTANCE_PAIRS] = -d2.sqrt().float()
    return out


def distance_rho(dim: int) -> float:
    """rho = (ceil(d/8) + 6) 2^-53, rounded up: |fl64(N^2) - |x|^2| <= rho |x|^2 and |D2 - |a - b|^2| <=
    rho |a - b|^2 (:func:`euclidean_intervals`)."""
    return (math.ceil(dim / LANES) + 6) * U64 * SAFETY


def distance_error(width, sq, norms, mag, rho: float, rounding: float):
    """W2 of :func:`euclidean_intervals`: a bound on |Delta - |a - b|^2|, Delta = N_q^2 + N_c^2 - 2 S^
    (exact, or rounded to float64), from the screening bound ``width`` (|S^ - s_dot| <= w), ``sq`` =
    fl64(N_q^2) + fl64(N_c^2), ``norms`` >= |q| |c|, ``mag`` >= |S^|. Every term is non-decreasing in each
    argument, so upper bounds of them (tensors or floats, broadcast) give an upper bound of W2."""
    return (2 * (width + rounding * norms + 2.0**-150) + (rho + 16 * U64) * (sq + 2 * mag)) * SAFETY


def euclidean_intervals(approx: torch.Tensor, width: torch.Tensor, sq_q: torch.Tensor, sq_c: torch.Tensor,
                        dim: int, rounding: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(estimate, lower, upper) of s = -float32(sqrt(D2)) from the dot product's screening block.

    approx: the GEMM's dot products S^ (rows, cols); width: their screening bound w (|S^ - s_dot| <= w);
    sq_q, sq_c: fl64(N^2) of the canonical norms; rounding: r of the canonical dot. With S the exact dot
    product, |S^ - S| <= w' = w + r |q| |c| + 2^-150. fl64(N^2) = |x|^2 (1 + eta), |eta| <= rho =
    (ceil(d/8) + 6) 2^-53 (the norm's lane sum, its square root and the square), and the canonical D2 =
    |a - b|^2 (1 + phi), |phi| <= rho (each term rounded twice, then ceil(d/8) + 3 additions of
    non-negative terms). So with Delta^ = fl64(N_q^2 + N_c^2 - 2 S^):

        |Delta^ - |a - b|^2| <= W2 = (2 w' + (rho + 16 2^-53) (N_q^2 + N_c^2 + 2 |S^|)) (1 + 2^-20),

    (the 16 2^-53 cover the float64 roundings of Delta^ and of Delta^ -+ W2), hence
    D2 in [lo, hi] = [max(Delta^ - W2, 0) (1 - 2 rho), (Delta^ + W2) (1 + 2 rho)], and since the square
    root and the rounding to float32 are monotone, -float32(sqrt(hi)) <= s <= -float32(sqrt(lo)). The
    estimate is -float32(sqrt(max(Delta^, 0))), inside that interval. A non-finite S^ or w gives
    (NaN, -inf, inf)."""
    rho = distance_rho(dim)
    sq = sq_q[:, None] + sq_c[None, :]
    w2 = distance_error(width, sq, (sq_q.sqrt() * SAFETY)[:, None] * (sq_c.sqrt() * SAFETY)[None, :],
                        approx.abs(), rho, rounding)
    delta = sq - 2 * approx
    lo = (delta - w2).clamp_min(0) * (1 - 2 * rho)
    hi = ((delta + w2) * (1 + 2 * rho)).clamp_min(0)
    known = approx.isfinite() & width.isfinite()
    inf = torch.full_like(delta, math.inf)
    estimate = torch.where(known, -delta.clamp_min(0).sqrt().float().double(), torch.full_like(delta, math.nan))
    lower = torch.where(known, -hi.sqrt().float().double(), -inf)
    upper = torch.where(known, -lo.sqrt().float().double(), inf)
    return estimate, lower, upper


class BatchScores:
    """The scores of a batch e (B, d) against itself, metric "dot", "cosine" or "euclidean", as
    :class:`IntervalBlock` s of ``rows`` anchor rows: rows x B <= settings.block_size / 4 pairs (a float32
    GEMM block and three float64 ones). ``exact(a, b)``: the (A, B) scores of rows a with rows b for inputs
    the certificate does not cover (float64, CUDA), taken as they are."""

    def __init__(self, e: torch.Tensor, metric: str, exact: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                 block_size: int | None = None):
        self.e, self.metric, self.exact = e, metric, exact
        self.n = e.shape[0]
        self.finite = e.isfinite().all(dim=1)
        size = block_size or _settings.current().block_size
        self.rows = max(1, min(self.n, size // max(1, 4 * self.n)))
        self.certified = e.dtype in SCREENED_DTYPES and e.device.type == "cpu" and e.shape[1] > 0
        if self.certified:
            dim = e.shape[1]
            self.product = screen_product(e.dtype, "dot" if metric == "euclidean" else metric, dim, e.device)
            self.q = self.product.operand(e, True)
            self.c = self.product.operand(e, False)
            self.raw = self.q.raw
            self.norms = self.q.norms if self.q.norms is not None else canonical_norms(self.raw)
            self.sq = self.norms * self.norms
            self.rounding = self.product.rounding
        self.rescored = 0
        self.derived: dict[str, object] = {}  # per-batch values the screens derive once (engine.distance_screen)

    def blocks(self) -> Iterator[IntervalBlock]:
        """The blocks, anchor rows ascending."""
        for i0 in range(0, self.n, self.rows):
            yield self.block(i0, min(self.n, i0 + self.rows))

    def block(self, i0: int, i1: int) -> IntervalBlock:
        ok = self.finite[i0:i1, None] & self.finite[None, :]
        if not self.certified:
            s = self.exact(self.e[i0:i1], self.e).to(torch.float64)
            s = torch.where(ok, s, torch.full_like(s, math.nan))
            return IntervalBlock(i0, i1, s, s, s, True)
        q = self.q[i0:i1]
        approx32 = torch.empty((i1 - i0, self.n), dtype=self.product.out_dtype)
        self.product.scores(q, self.c, approx32)
        approx = approx32.double()
        width = self.width(q, approx)
        if self.metric == "euclidean":
            values, lower, upper = euclidean_intervals(approx, width, self.sq[i0:i1], self.sq, self.e.shape[1],
                                                       self.rounding)
        else:
            known = approx.isfinite() & width.isfinite()
            values = approx
            lower = torch.where(known, approx - width, -math.inf)
            upper = torch.where(known, approx + width, math.inf)
        nan = torch.full_like(values, math.nan)
        return IntervalBlock(i0, i1, torch.where(ok, values, nan), torch.where(ok, lower, nan),
                             torch.where(ok, upper, nan), False)

    def width(self, q: object, approx: torch.Tensor) -> torch.Tensor:
        """w_ij = a_i b_j + e_i f_j + g_i + h_j + rel |S^_ij| (engine.certify, csrc/topk_screen.h)."""
        c = self.c
        w = q.first[:, None] * c.first[None, :]
        if q.second is not None and c.second is not None:
            w = w + q.second[:, None] * c.second[None, :]
        if q.floor is not None:
            w = w + q.floor[:, None]
        if c.floor is not None:
            w = w + c.floor[None, :]
        if self.product.rel:
            w = w + self.product.rel * approx.abs()
        return w

    def canonical_at(self, r: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        """float32 canonical scores, in the batch's metric, of the listed pairs: batch rows r (ascending)
        with columns j (certified batches)."""
        if self.metric == "euclidean":
            return canonical_distance_scores_at(self.raw, r, self.raw, j)
        if r.numel() == 0:
            return torch.empty(0, dtype=torch.float32)
        rows, inv, counts = torch.unique_consecutive(r, return_inverse=True, return_counts=True)
        slot = torch.arange(r.numel()) - (torch.cumsum(counts, 0) - counts)[inv]
        ids = torch.full((rows.numel(), int(counts.max())), -1, dtype=torch.int64)
        ids[inv, slot] = j
        cosine = self.metric == "cosine"
        return canonical_scores_at(self.raw[rows], self.raw, ids, self.metric,
                                   self.norms[rows] if cosine else None, self.norms if cosine else None)[inv, slot]

    def settle(self, blk: IntervalBlock, need: torch.Tensor) -> None:
        """Rescores the marked pairs (rows, B) bool of a block canonically: their value, lower and upper
        become the canonical score. Pairs with a NaN or inf row are left alone."""
        if blk.exact:
            return
        need = need & blk.lower.isnan().logical_not()
        r, j = need.nonzero(as_tuple=True)
        if r.numel() == 0:
            return
        self.rescored += r.numel()
        s = self.canonical_at(blk.i0 + r, j).double()
        blk.values[r, j] = s
        blk.lower[r, j] = s
        blk.upper[r, j] = s


def overlapping(members: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """(rows, B) bool: the members (a (rows, B) mask) whose interval [lower, upper] meets that of another
    member of the same row, or is unbounded. Members of a row sorted by lower bound: member i meets an
    earlier one iff the largest upper bound before it is >= its lower bound, a later one iff its upper
    bound is >= the next lower bound."""
    out = torch.zeros_like(members)
    r, j = members.nonzero(as_tuple=True)
    if r.numel() == 0:
        return out
    counts = members.sum(dim=1)
    slot = torch.arange(r.numel()) - (torch.cumsum(counts, 0) - counts)[r]
    width = int(counts.max())
    lo = torch.full((members.shape[0], width), math.inf, dtype=torch.float64)
    hi = torch.full_like(lo, math.inf)
    lo[r, slot], hi[r, slot] = lower[r, j], upper[r, j]
    lo_sorted, order = lo.sort(dim=1, stable=True)
    hi_sorted = hi.gather(1, order)
    before = torch.cat([torch.full_like(hi[:, :1], -math.inf), hi_sorted.cummax(dim=1).values[:, :-1]], dim=1)
    after = torch.cat([lo_sorted[:, 1:], torch.full_like(lo[:, :1], math.inf)], dim=1)
    meets = (before >= lo_sorted) | (hi_sorted >= after)
    back = torch.empty_like(meets).scatter_(1, order, meets)
    unbounded = lower[r, j].isinf() | upper[r, j].isinf()
    out[r, j] = back[r, slot] | unbounded
    return out


def hardest_candidates(eligible: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor) -> torch.Tensor:
    """The pairs whose canonical score the choice of each row's largest eligible score needs: with
    lambda = the row's largest lower bound, a pair whose upper bound is below lambda scores below another
    pair and is never chosen; among the rest, those whose intervals meet (:func:`overlapping`). For the
    smallest score pass (-upper, -lower)."""
    lam = torch.where(eligible, lower, -math.inf).amax(dim=1, keepdim=True)
    return overlapping(eligible & (upper >= lam), lower, upper)
