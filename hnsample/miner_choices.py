"""The choices of the in-batch miners (hnsample.miners), made on the scores the module docstring there
defines: canonical for float32 / 16-bit CPU inputs (and CUDA inputs with settings.cuda_certified for "dot"
and "cosine"), the GEMM's otherwise.

Two ways, with the same results:

* "dot" / "cosine" on float32 / 16-bit rows the engine certifies (engine.blocks.certified: CPU rows, and
  CUDA rows with settings.cuda_certified): the engine's certified selection (``topk_similarity``,
  screened GEMM + canonical rescoring in C++) over the rows without NaN or inf (a subset in the same order,
  so ties still go to the lower index), and canonical scores of the few positive pairs of each anchor
  (its label's other rows).
* "euclidean", and inputs the certificate does not cover (float64, GPU without cuda_certified, GPU
  "euclidean"): :class:`engine.intervals.
  BatchScores` blocks of anchor rows (certified intervals for "euclidean", exact scores otherwise),
  rescoring the pairs the intervals cannot decide. batch_hard "euclidean", and semi_hard "euclidean" with
  fewer negatives per pair than rows, filter each block first with
  :class:`engine.distance_screen.DistanceScreen` (float32 keys) and rescore only what they keep.

Every function takes detached embeddings e (B, d) and int64 labels (B,) on e's device.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from . import settings as _settings
from .engine.blocks import certified
from .engine.certify import canonical_pair_scores
from .engine.distance_screen import (
    DistanceScreen,
    ScoreScreen,
    above_cut,
    below_cut,
    key_columns,
    kth_key,
    score_cuts,
    score_rank_cut,
)
from .engine.intervals import BatchScores, IntervalBlock, canonical_distance_scores_at, hardest_candidates, overlapping
from .ops.topk import topk_from_scores, topk_similarity

Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def by_engine(e: torch.Tensor, metric: str) -> bool:
    """Whether the choices go through the engine's certified selection (canonical dot / cosine)."""
    return metric in ("dot", "cosine") and certified(e) and e.shape[1] > 0


def _block_budget() -> int:
    """Elements a temporary block may hold (settings.block_size / 4: float64 blocks, a few at a time)."""
    return max(1, _settings.current().block_size // 4)


class LabelGroups:
    """Rows grouped by label: row i's positives are the other rows of its label, ascending."""

    def __init__(self, labels: torch.Tensor):
        b = labels.shape[0]
        self.order = torch.argsort(labels, stable=True)  # ascending index within a label
        ordered = labels[self.order]
        starts = torch.ones(b, dtype=torch.bool, device=labels.device)
        starts[1:] = ordered[1:] != ordered[:-1]
        group = torch.cumsum(starts.to(torch.int64), 0) - 1
        first = starts.nonzero()[:, 0]
        size = torch.diff(first, append=first.new_tensor([b]))
        of_row = torch.empty_like(group)
        of_row[self.order] = group
        self.start, self.size = first[of_row], size[of_row]
        self.width = int(size.max()) if b else 0

    def positives(self, rows: torch.Tensor) -> torch.Tensor:
        """(len(rows), width) ids of each row's positives, ascending, -1 for none (its own slot and the
        padding)."""
        slot = torch.arange(self.width, device=rows.device)
        at = (self.start[rows, None] + slot).clamp_max(self.order.shape[0] - 1)
        ids = torch.where(slot < self.size[rows, None], self.order[at], -1)
        return torch.where(ids == rows[:, None], -1, ids)


def _pair_scores(x: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, metric: str) -> torch.Tensor:
    """(R, W) float64 canonical scores of x[rows[r]] with x[ids[r, w]], NaN where ids is -1."""
    s = canonical_pair_scores(x[rows], lambda j: x[j], ids.clamp_min(0), metric).to(torch.float64)
    return torch.where(ids >= 0, s, math.nan)


def _mapped(keep: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Ids into the kept rows turned into ids into the batch (-1 stays -1)."""
    return torch.where(ids >= 0, keep[ids.clamp_min(0)], -1)


def _finite_rows(e: torch.Tensor) -> torch.Tensor:
    return e.isfinite().all(dim=1).nonzero()[:, 0]


def hardest_pairs(e: torch.Tensor, labels: torch.Tensor, metric: str, exact: Scorer) -> tuple[torch.Tensor, ...]:
    """(positive, negative) per row: the least similar other row of its label and the most similar row
    of another label (ties to the lower index, NaN and rows with NaN or inf never chosen), -1 for none.
    exact(a, b): the scores of inputs the certificate does not cover."""
    if not by_engine(e, metric):
        return _hardest_pairs_blocks(e, labels, metric, exact)
    b = e.shape[0]
    pos = torch.full((b,), -1, dtype=torch.int64)
    neg = pos.clone()
    keep = _finite_rows(e)
    if keep.numel() == 0:
        return pos, neg
    x, y = e[keep], labels[keep]
    top = topk_similarity(x, x, 1, metric=metric, query_labels=y, candidate_labels=y)
    neg[keep] = _mapped(keep, top.indices[:, 0])
    groups = LabelGroups(y)
    step = max(1, _block_budget() // max(1, groups.width))
    for i0 in range(0, x.shape[0], step):
        rows = torch.arange(i0, min(x.shape[0], i0 + step))
        ids = groups.positives(rows)
        pick = topk_from_scores(-_pair_scores(x, rows, ids, metric), 1).indices[:, 0]  # the largest -s
        chosen = torch.where(pick >= 0, ids.gather(1, pick.clamp_min(0)[:, None])[:, 0], -1)
        pos[keep[rows]] = _mapped(keep, chosen)
    return pos, neg


def semi_hard_triplets(e: torch.Tensor, labels: torch.Tensor, margin: float, metric: str, k: int,
                       exact: Scorer) -> list[tuple[torch.Tensor, ...]]:
    """(anchors, positives, negatives) parts, in order, of the semi-hard triplets: pairs (a, p) of one
    label (a ascending, then p), negatives n of another label with -margin <= fl64(s_an - s_ap) < 0, the
    k with the highest s_an (ties to the lower index), in that order."""
    if not by_engine(e, metric) or (e.device.type == "cpu" and k < e.shape[0]):
        # The CPU's blocks share each anchor's GEMM row among its pairs (the float32 key filter, with the
        # intervals' way where it cannot decide); the engine below takes one query row per pair.
        return _semi_hard_blocks(e, labels, margin, metric, k, exact)
    keep = _finite_rows(e)
    if keep.numel() == 0:
        return []
    x, y = e[keep], labels[keep]
    n = x.shape[0]
    groups = LabelGroups(y)
    found = []
    # Pairs per selection call: its state holds k slots per pair, its queries d elements per pair.
    pairs_per_call = max(1, _block_budget() // max(k, x.shape[1]))
    step = max(1, _block_budget() // max(1, groups.width))
    for i0 in range(0, n, step):
        rows = torch.arange(i0, min(n, i0 + step))
        ids = groups.positives(rows)
        s_pair = _pair_scores(x, rows, ids, metric)
        r, w = (ids >= 0).nonzero(as_tuple=True)
        a, p, s_ap = rows[r], ids[r, w], s_pair[r, w]
        for c0 in range(0, a.numel(), pairs_per_call):
            ac, pc, sc = a[c0:c0 + pairs_per_call], p[c0:c0 + pairs_per_call], s_ap[c0:c0 + pairs_per_call]
            # s_an < s_ap for float32 scores is s_an <= the float32 below s_ap: the engine's margin
            # bound with positive_scores = that and margin 0. Its k best below s_ap, by s_an, are the
            # window's k best once those below the lower edge (a suffix: x grows with s_an) are cut.
            below = torch.nextafter(sc.float(), torch.tensor(-math.inf)).double()
            top = topk_similarity(x[ac], x, min(k, n), metric=metric, query_labels=y[ac], candidate_labels=y,
                                  positive_scores=below, absolute_margin=0.0)
            inside = (top.indices >= 0) & ((top.scores.double() - sc[:, None]) >= -margin)
            which = inside.nonzero(as_tuple=True)[0]
            found.append((keep[ac[which]], keep[pc[which]], keep[top.indices[inside]]))
    return found


def _hardest_pairs_blocks(e: torch.Tensor, labels: torch.Tensor, metric: str,
                          exact: Scorer) -> tuple[torch.Tensor, ...]:
    b = e.shape[0]
    pos = torch.full((b,), -1, dtype=torch.int64, device=e.device)
    neg = pos.clone()
    scores = BatchScores(e, metric, exact)
    screened = scores.certified and metric == "euclidean"
    groups = LabelGroups(labels) if screened else None
    for i0 in range(0, b, scores.rows):
        i1 = min(b, i0 + scores.rows)
        rows = torch.arange(i0, i1, device=e.device)
        if screened and _screened_extremes(scores, labels, groups, rows, pos, neg):
            continue
        blk = scores.block(i0, i1)
        ok = blk.lower.isnan().logical_not()
        same = labels[rows, None] == labels[None, :]
        positive = same & ok & (rows[:, None] != torch.arange(b, device=e.device)[None, :])
        negative = ok & ~same
        if not blk.exact:
            # The least similar positive is the largest -s: its interval is [-upper, -lower].
            scores.settle(blk, hardest_candidates(negative, blk.lower, blk.upper)
                          | hardest_candidates(positive, -blk.upper, -blk.lower))
        nan = torch.full_like(blk.values, math.nan)
        pos[rows] = topk_from_scores(torch.where(positive, -blk.values, nan), 1).indices[:, 0]
        neg[rows] = topk_from_scores(torch.where(negative, blk.values, nan), 1).indices[:, 0]
    return pos, neg


RESCORE_ALL_POSITIVES = 64  # label groups up to this size: every positive pair is rescored, no filter


def _screened_extremes(scores: BatchScores, labels: torch.Tensor, groups: LabelGroups, rows: torch.Tensor,
                       pos: torch.Tensor, neg: torch.Tensor) -> bool:
    """batch_hard's choices for anchor rows ``rows`` of a certified "euclidean" batch through the float32
    filter (engine.distance_screen): the canonical scores of the columns it keeps, the extreme of each row
    among them (ties to the lower index). With label groups of at most RESCORE_ALL_POSITIVES rows (P x K
    batches) every positive pair is rescored instead of filtered. False, with nothing written, when an
    eligible key is not finite or the filter keeps more than a quarter of the block's pairs (hostile
    inputs): the caller then takes the intervals' way."""
    b = scores.n
    i0, i1 = int(rows[0]), int(rows[-1]) + 1
    screen = DistanceScreen(scores, i0, i1)
    ok = scores.finite[i0:i1, None] & scores.finite[None, :]
    same = labels[rows, None] == labels[None, :]
    capacity = (i1 - i0) * b // 4
    kept_neg = screen.extreme_candidates(ok & ~same, True, capacity)
    if kept_neg is None:
        return False
    if groups.width <= RESCORE_ALL_POSITIVES:
        ids = groups.positives(rows)
        r, w = (ids >= 0).nonzero(as_tuple=True)
        j = ids[r, w]  # rows ascending, then positives ascending
        fin = scores.finite[i0 + r] & scores.finite[j]
        kept_pos = (r[fin], j[fin])
    else:
        positive = same & ok & (rows[:, None] != torch.arange(b)[None, :])
        kept_pos = screen.extreme_candidates(positive, False, capacity - kept_neg[0].numel())
        if kept_pos is None:
            return False
    neg[rows] = _extreme_of_kept(scores.raw, i0, i1 - i0, *kept_neg, largest=True)
    pos[rows] = _extreme_of_kept(scores.raw, i0, i1 - i0, *kept_pos, largest=False)
    return True


def _extreme_of_kept(raw: torch.Tensor, i0: int, rows: int, r: torch.Tensor, j: torch.Tensor,
                     largest: bool) -> torch.Tensor:
    """Per block row (``rows`` of them), the kept column with the largest (or smallest) canonical distance
    score, ties to the lower index, -1 for none; the kept pairs (r, j) with r ascending and j ascending
    within a row, gathered in a padded block."""
    if r.numel() == 0:
        return torch.full((rows,), -1, dtype=torch.int64)
    s = canonical_distance_scores_at(raw, i0 + r, raw, j).double()
    return _best_listed(r, j, s if largest else -s, rows, 1)[:, 0]


def _best_listed(r: torch.Tensor, j: torch.Tensor, values: torch.Tensor, rows: int, k: int) -> torch.Tensor:
    """(rows, min(k, the most pairs of a row)) int64: per row, the columns j of its listed pairs (r
    ascending, j ascending within a row; at least one pair) with the k largest float64 values (NaN
    never), ties to the lower column, -1 where there are fewer; the pairs gathered in a padded block."""
    counts = torch.bincount(r, minlength=rows)
    slot = torch.arange(r.numel()) - (torch.cumsum(counts, 0) - counts)[r]
    block = torch.full((rows, int(counts.max())), math.nan, dtype=torch.float64)
    block[r, slot] = values
    ids = torch.full_like(block, -1, dtype=torch.int64)
    ids[r, slot] = j
    best = topk_from_scores(block, min(k, block.shape[1])).indices
    return torch.where(best >= 0, ids.gather(1, best.clamp_min(0)), -1)


def _semi_hard_needs(blk: IntervalBlock, a: torch.Tensor, p: torch.Tensor, negative: torch.Tensor,
                     margin: float, k: int, need: torch.Tensor, members: torch.Tensor) -> None:
    """Marks in ``need`` (int32, > 0: marked) the scores the semi-hard choice of the pairs (a, p) (block
    rows a) cannot decide from the intervals, and in ``members`` (int32 counts) the negatives that may be
    among a pair's k hardest semi-hard ones.

    With x = fl64(s_an - s_ap) (rounding is monotone, so bounds of s give bounds of x): n is certainly
    outside the window if fl64(U_an - L_ap) < -margin or L_an >= U_ap, certainly inside if
    fl64(L_an - U_ap) >= -margin and U_an < L_ap. lambda = the k-th largest L_an of the certainly inside;
    a negative with U_an < lambda ranks below k of them. Of the others (the members), one whose side of
    the window is uncertain needs s_an and s_ap; members whose intervals meet need theirs
    (engine.intervals.overlapping, applied by the caller over each anchor's members of all its pairs).
    """
    lower, upper = blk.lower, blk.upper
    lo_p, hi_p = lower[a, p][:, None], upper[a, p][:, None]
    lo_n, hi_n = lower[a], upper[a]
    candidate = negative[a]
    outside = ((hi_n - lo_p) < -margin) | (lo_n >= hi_p)
    inside = candidate & ((lo_n - hi_p) >= -margin) & (hi_n < lo_p)
    possible = candidate & ~outside
    if k < negative.shape[1]:
        lam = torch.where(inside, lo_n, -math.inf).topk(k, dim=1).values[:, -1:]
        possible &= hi_n >= lam
    uncertain = possible & ~inside
    members.index_add_(0, a, possible.to(torch.int32))
    need.index_add_(0, a, uncertain.to(torch.int32))
    pairs = uncertain.any(dim=1)
    need[a[pairs], p[pairs]] = 1


def _semi_hard_blocks(e: torch.Tensor, labels: torch.Tensor, margin: float, metric: str, k: int,
                      exact: Scorer) -> list[tuple[torch.Tensor, ...]]:
    b = e.shape[0]
    found: list[tuple[torch.Tensor, ...]] = []
    scores = BatchScores(e, metric, exact)
    chunk = max(1, _block_budget() // max(1, b))
    screened = scores.certified and k < b
    groups = LabelGroups(labels) if screened else None
    for i0 in range(0, b, scores.rows):
        i1 = min(b, i0 + scores.rows)
        rows = torch.arange(i0, i1, device=e.device)
        if screened and _screened_semi_hard(scores, labels, groups, rows, margin, k, found):
            continue
        blk = scores.block(i0, i1)
        ok = blk.lower.isnan().logical_not()
        same = labels[rows, None] == labels[None, :]
        negative = ok & ~same
        a, p = (same & ok & (rows[:, None] != torch.arange(b, device=e.device)[None, :])).nonzero(as_tuple=True)
        if not blk.exact:
            need = torch.zeros(negative.shape, dtype=torch.int32)
            members = torch.zeros_like(need)
            for c0 in range(0, a.numel(), chunk):
                _semi_hard_needs(blk, a[c0:c0 + chunk], p[c0:c0 + chunk], negative, margin, k, need, members)
            scores.settle(blk, (need > 0) | overlapping(members > 0, blk.lower, blk.upper))
        for c0 in range(0, a.numel(), chunk):
            ac, pc = a[c0:c0 + chunk], p[c0:c0 + chunk]
            s_an = blk.values[ac]
            x = s_an - blk.values[ac, pc].unsqueeze(1)
            window = negative[ac] & (x >= -margin) & (x < 0)
            top = topk_from_scores(torch.where(window, s_an, torch.full_like(s_an, math.nan)), k).indices
            valid = top >= 0
            which = valid.nonzero(as_tuple=True)[0]
            found.append((rows[ac[which]], pc[which], top[valid]))
    return found


def _screened_semi_hard(scores: BatchScores, labels: torch.Tensor, groups: LabelGroups, rows: torch.Tensor,
                        margin: float, k: int, found: list) -> bool:
    """semi_hard's triplets for anchor rows ``rows`` of a certified batch (k < B negatives per pair)
    through float32 keys that ascend as scores descend, appended to ``found``: squared distances
    (:class:`engine.distance_screen.DistanceScreen`) for "euclidean", -S^ (:class:`ScoreScreen`) for
    "dot" and "cosine". False, with nothing appended, where a key of an eligible pair or a row's bound is
    not finite or the filter keeps more than a quarter of the block's pairs: the caller then takes the
    intervals' way.

    The positive pairs are scored canonically (v = s_ap exactly); the window is s_an < v and
    fl64(s_an - v) >= -margin, and a pair's k best are its k highest s_an below v (ties to the lower
    index) less those past the margin (a suffix). For each pair a negative is kept when its key t lies
    strictly between two cuts:

    * t <= the lower cut: s_an >= v, never in the window;
    * t >= the margin cut: fl64(s_an - v) <= r, r the float64 below -margin: past the window (and so are
      all larger keys);
    * t >= the rank cut, from the pair's k-th smallest key among the negatives certainly below v: s_an is
      strictly below k negatives below v, so it is not among the k best.

    Euclidean (in distances u = -s, u_ap = -v): the cuts are engine.distance_screen.below_cut(-v),
    above_cut(-v - r) and above_cut(root bound of the k-th key), the certainly-below keys those >=
    above_cut(-v). Dot / cosine, with the row's bound W: engine.distance_screen.score_cuts and
    score_rank_cut. The kept pairs (about 3.4 per positive pair for k = 1 on random unit rows, B = 4096,
    d = 384, "euclidean") are rescored canonically and the window's k best taken among them: everything
    dropped is outside the window or strictly behind k candidates of the window, so these are the k best
    of the whole window (docs/certified.md, "In-batch miners"). The per-pair passes over the keys run in
    C++ (engine.distance_screen.kth_key, key_columns)."""
    b = scores.n
    i0, i1 = int(rows[0]), int(rows[-1]) + 1
    ids = groups.positives(rows)
    r, w = (ids >= 0).nonzero(as_tuple=True)
    a, p = r, ids[r, w]  # anchors (block rows) ascending, then positives ascending
    fin = scores.finite[i0 + a] & scores.finite[p]
    a, p = a[fin], p[fin]
    if a.numel() == 0:
        return True
    euclidean = scores.metric == "euclidean"
    screen = DistanceScreen(scores, i0, i1) if euclidean else ScoreScreen(scores, i0, i1)
    negative = (labels[rows, None] != labels[None, :]) & scores.finite[i0:i1, None] & scores.finite[None, :]
    if screen.nonfinite_key(negative):
        return False
    t = torch.where(negative, screen.t, math.nan)  # NaN keys never count: only negatives are kept
    s_ap = scores.canonical_at(i0 + a, p)
    v = s_ap.double()
    if euclidean:
        sq, g, rho = screen.sq_q[a], screen.g[a], screen.rho
        lo = below_cut(sq, g, rho, -v)
        past = -math.nextafter(-margin, -math.inf)  # -r
        hi = above_cut(sq, g, rho, (-v + past) * (1 + 2.0**-50))
        kth = kth_key(t, a, above_cut(sq, g, rho, -v), k).double()
        top = torch.minimum(hi, above_cut(sq, g, rho, screen.root_bound(kth, sq, g)))
    else:
        w = screen.w[a]
        if not bool(w.isfinite().all()):
            return False
        lo, hi, inside = score_cuts(w, v, margin)
        top = torch.minimum(hi, score_rank_cut(w, kth_key(t, a, inside, k).double()))
    kept = key_columns(t, a, lo, top, (i1 - i0) * b // 4)
    if kept is None:
        return False
    pair, col = kept
    # Pairs ascending, so their anchors too; a column kept for several pairs of one anchor is rescored
    # once per pair (a few per pair: cheaper than a pass over the block to share them).
    s_an = scores.canonical_at(i0 + a[pair], col).double()
    x = s_an - v[pair]
    win = (x >= -margin) & (x < 0)
    pair, col, s_an = pair[win], col[win], s_an[win]
    # The window's members of each pair, columns ascending, in a padded block of pairs; a chunk of pairs at
    # a time keeps the block within the budget.
    chunk = max(1, _block_budget() // b)
    edges = list(range(0, a.numel(), chunk)) + [a.numel()]
    starts = torch.searchsorted(pair, torch.tensor(edges)).tolist()
    for c0, s0, s1 in zip(edges, starts[:-1], starts[1:], strict=False):
        if s0 == s1:
            continue
        local = pair[s0:s1] - c0
        best = _best_listed(local, col[s0:s1], s_an[s0:s1], int(local[-1]) + 1, k)
        valid = best >= 0
        which = valid.nonzero(as_tuple=True)[0]
        found.append((rows[a[c0 + which]], p[c0 + which], best[valid]))
    return True
