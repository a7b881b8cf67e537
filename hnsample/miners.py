"""In-batch triplet miners (pytorch-metric-learning vocabulary) and the triplet margin loss.

Both miners score the batch against itself once, s_ab = similarity(e_a, e_b), and make every choice
with the fused selection :func:`hnsample.topk_from_scores` (label masks, exclusions, score windows), so
ties and NaN follow one rule everywhere: ties go to the lower index and NaN scores are never chosen.
A row of the batch holding NaN or inf takes part in no triplet (its scores are treated as NaN, whatever
the metric would make of them), and :func:`triplet_margin_loss` reads only the rows its triplets use.

Metrics: "cosine" s = e_a . e_b / (|e_a| |e_b|), "dot" s = e_a . e_b, "euclidean" s = -|e_a - e_b|.
The default here is "cosine", as in ``mine_hard_negatives`` and the samplers; the ops
(``topk_similarity``, ``DynamicNegativeMiner``, ``NegativeQueue.mine``) default to "dot".
Distances are d = -s, so "hard" means high similarity for negatives and low similarity for positives.
pytorch-metric-learning's default distance (L2 on normalized embeddings, d = sqrt(2 - 2 cos)) ranks
pairs exactly like "cosine"; its margins are distances, so equal margins only match with "euclidean" on
normalized embeddings.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch

from ._ext import as_tensor, check_finite, to_int64
from .ops.topk import topk_from_scores

__all__ = ["Triplets", "batch_hard", "pairwise_similarity", "semi_hard", "triplet_margin_loss"]

METRICS = ("cosine", "dot", "euclidean")


class Triplets(NamedTuple):
    """Index tuples into the batch: ``anchors``, ``positives``, ``negatives``, each int64 (T,)."""

    anchors: torch.Tensor
    positives: torch.Tensor
    negatives: torch.Tensor


def _check_batch(embeddings: Any, labels: Any, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    e = as_tensor("embeddings", embeddings)
    if e.ndim != 2:
        raise ValueError(f"embeddings must have shape (B, d), got {tuple(e.shape)}")
    if not e.is_floating_point():
        raise TypeError(f"embeddings must be a float tensor, got {e.dtype}")
    lab = as_tensor("labels", labels)
    if lab.dtype.is_floating_point or lab.is_complex() or lab.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {lab.dtype}")
    if lab.ndim != 1 or lab.shape[0] != e.shape[0]:
        raise ValueError(f"labels must have shape ({e.shape[0]},), got {tuple(lab.shape)}")
    if lab.device != e.device:
        raise ValueError(f"labels must be on {e.device}, got {lab.device}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    return e, to_int64("labels", lab)


def _unit_rows(x: torch.Tensor) -> torch.Tensor:
    """x / |x| per row, a zero row staying zero with a zero gradient (through x / tiny it would get a
    gradient of 1 / tiny: about 1e38 in float32, inf once cast to a 16-bit input's dtype). A row holding
    NaN stays NaN."""
    norm = x.norm(dim=1, keepdim=True)
    return torch.where(norm == 0, 0, x / norm.clamp_min(torch.finfo(x.dtype).tiny))


def pairwise_similarity(a: torch.Tensor, b: torch.Tensor, metric: str = "cosine") -> torch.Tensor:
    """(A, B) similarities s_ij in float32 (float64 for float64 inputs); differentiable.

    cosine: a_i . b_j / (|a_i| |b_j|) (0, with a zero gradient, for a zero vector); dot: a_i . b_j;
    euclidean: -|a_i - b_j|.
    """
    ct = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b = a.to(ct), b.to(ct)
    if metric == "euclidean":
        return -torch.cdist(a, b)
    if metric == "cosine":
        a, b = _unit_rows(a), _unit_rows(b)
    return a @ b.T


def _paired_similarity(a: torch.Tensor, b: torch.Tensor, metric: str) -> torch.Tensor:
    """Row-wise s(a_t, b_t) for (T, d) inputs, the same formulas as :func:`pairwise_similarity`."""
    ct = torch.float64 if a.dtype == torch.float64 else torch.float32
    a, b = a.to(ct), b.to(ct)
    if metric == "euclidean":
        return -torch.linalg.vector_norm(a - b, dim=1)
    if metric == "cosine":
        a, b = _unit_rows(a), _unit_rows(b)
    return (a * b).sum(dim=1)


def _batch_scores(e: torch.Tensor, metric: str) -> torch.Tensor:
    """(B, B) detached similarities, NaN wherever either row holds a NaN or inf (with "dot" or
    "euclidean" such a row would otherwise score +-inf and be the hardest choice)."""
    e = e.detach()
    s = pairwise_similarity(e, e, metric)
    finite = e.isfinite().all(dim=1)
    return torch.where(finite[:, None] & finite[None, :], s, torch.full_like(s, math.nan))


def batch_hard(embeddings: Any, labels: Any, *, metric: str = "cosine") -> Triplets:
    """Batch-hard mining: for every anchor a, its hardest positive and its hardest negative.

    p(a) = argmin_{b != a, y_b = y_a} s_ab  (the least similar positive),
    n(a) = argmax_{b: y_b != y_a} s_ab      (the most similar negative),
    ties to the lower index, NaN scores (and rows holding NaN or inf) never chosen; anchors with no
    positive or no negative are dropped. One triplet per remaining anchor, in anchor order.

    This is pytorch-metric-learning's ``BatchHardMiner`` (pos_strategy = neg_strategy = "hard"):
    with its default distance (L2 of normalized embeddings) it picks the same triplets as
    ``metric="cosine"`` here.
    """
    e, lab = _check_batch(embeddings, labels, metric)
    b = e.shape[0]
    with torch.no_grad():
        s = _batch_scores(e, metric)
        same = lab.unsqueeze(0) == lab.unsqueeze(1)
        nan = torch.full((), math.nan, dtype=s.dtype, device=s.device)
        self_id = torch.arange(b, device=e.device)
        # Lowest positive similarity = highest of -s over same-label columns; NaN hides the others.
        pos = topk_from_scores(torch.where(same, -s, nan), 1, exclude=self_id).indices[:, 0]
        neg = topk_from_scores(s, 1, query_labels=lab, candidate_labels=lab).indices[:, 0]
        keep = (pos >= 0) & (neg >= 0)
    return Triplets(self_id[keep], pos[keep], neg[keep])


def semi_hard(embeddings: Any, labels: Any, margin: float, *, metric: str = "cosine",
              negatives_per_pair: int | None = 1) -> Triplets:
    """Semi-hard mining: for every positive pair (a, p), negatives that are farther than p but within
    the margin,

        0 < d_an - d_ap <= margin,   i.e.   s_ap - margin <= s_an < s_ap,

    keeping the ``negatives_per_pair`` hardest of them (highest s_an; ties to the lower index), or all of
    them for ``negatives_per_pair=None``. Pairs are enumerated anchor-major (a ascending, then p), and a
    pair's triplets are in descending s_an. With ``negatives_per_pair=1`` this is FaceNet's choice of the
    hardest semi-hard negative (a pair without one is dropped). Rows holding NaN or inf are in no triplet.

    With ``negatives_per_pair=None`` the set of triplets is exactly pytorch-metric-learning's
    ``TripletMarginMiner(margin, type_of_triplets="semihard")`` (which keeps every triplet with
    0 < d_an - d_ap <= margin), for the matching distance.

    Memory: one (P, B) score block for the P positive pairs of the batch.
    """
    e, lab = _check_batch(embeddings, labels, metric)
    margin = check_finite("margin", margin)
    if margin is None or margin <= 0:
        raise ValueError(f"margin must be a finite float > 0, got {margin}")
    b = e.shape[0]
    k = negatives_per_pair
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"negatives_per_pair must be an int >= 1 or None, got {negatives_per_pair!r}")
    k = b if k is None else k  # None: every semi-hard negative (an empty batch has none)
    empty = torch.empty(0, dtype=torch.int64, device=e.device)
    with torch.no_grad():
        s = _batch_scores(e, metric).to(torch.float64)
        same = lab.unsqueeze(0) == lab.unsqueeze(1)
        same.fill_diagonal_(False)
        a, p = same.nonzero(as_tuple=True)
        if a.numel() == 0:
            return Triplets(empty, empty, empty)
        # Scores relative to the pair's positive make the per-pair window a fixed one: x = s_an - s_ap
        # in [-margin, 0). The largest float64 below zero turns the closed bound into a strict one.
        rel = s[a] - s[a, p].unsqueeze(1)
        top = topk_from_scores(rel, min(k, b), query_labels=lab[a], candidate_labels=lab,
                               min_score=-margin, max_score=-math.ulp(0.0))
        valid = top.indices >= 0
        rows = valid.nonzero(as_tuple=True)[0]
    return Triplets(a[rows], p[rows], top.indices[valid])


def triplet_margin_loss(embeddings: torch.Tensor, triplets: Triplets | tuple, margin: float, *,
                        metric: str = "cosine", reduction: str = "mean") -> torch.Tensor:
    """Triplet margin loss over mined index tuples:

        l_t = max(0, d_{a_t p_t} - d_{a_t n_t} + margin) = max(0, s_{a_t n_t} - s_{a_t p_t} + margin),

    with d = -s for "cosine"/"dot" and d = |e_a - e_b| for "euclidean". Reductions: "mean" (over all
    triplets), "mean_nonzero" (over triplets with l_t > 0, pytorch-metric-learning's default
    ``AvgNonZeroReducer``; a NaN l_t counts as nonzero), "sum", "none" ((T,) losses).

    The loss reads only the rows the triplets use: NaN or inf in any other row of ``embeddings`` changes
    neither the loss nor its gradient (rows no triplet uses get a zero gradient), while a row that a
    triplet uses enters the formula as it is (a NaN row makes the loss NaN). No triplets (or, for
    "mean_nonzero", none with l_t > 0 or NaN) gives a zero still connected to ``embeddings`` for
    autograd, whose gradient is all zeros.
    """
    e = as_tensor("embeddings", embeddings)
    if e.ndim != 2 or not e.is_floating_point():
        raise ValueError(f"embeddings must be a float tensor of shape (B, d), got {e.dtype} {tuple(e.shape)}")
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if reduction not in ("mean", "mean_nonzero", "sum", "none"):
        raise ValueError(f"reduction must be 'mean', 'mean_nonzero', 'sum' or 'none', got {reduction!r}")
    margin = check_finite("margin", margin)
    if margin is None:
        raise TypeError("margin must be a float, got None")
    if not isinstance(triplets, tuple) or len(triplets) != 3:
        raise TypeError("triplets must be an (anchors, positives, negatives) tuple")
    idx = []
    for name, t in zip(("anchors", "positives", "negatives"), triplets, strict=True):
        if (not isinstance(t, torch.Tensor) or t.ndim != 1 or t.dtype.is_floating_point
                or t.dtype == torch.bool or t.is_complex()):
            raise TypeError(f"triplets.{name} must be a 1-D integer tensor")
        t = to_int64(f"triplets.{name}", t)
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= e.shape[0]):
            raise ValueError(f"triplets.{name} must hold indices in [0, {e.shape[0]})")
        idx.append(t.to(e.device))
    if not idx[0].shape == idx[1].shape == idx[2].shape:
        raise ValueError("triplets must hold three index tensors of the same length")
    a, p, n = idx
    s_an = _paired_similarity(e[a], e[n], metric)
    s_ap = _paired_similarity(e[a], e[p], metric)
    losses = torch.relu(s_an - s_ap + margin)
    if reduction == "none":
        return losses
    # The sum over an empty slice: a zero that reads no value of `embeddings` (so a NaN or inf in a row
    # no triplet uses cannot reach it) and still backpropagates, as zeros, to all of them.
    zero = e[:0].sum().to(losses.dtype)
    if reduction == "sum":
        return losses.sum() if losses.numel() else zero
    if reduction == "mean_nonzero":
        # A NaN loss counts as nonzero, so that a non-finite row a triplet uses shows in the result.
        count = int(((losses > 0) | losses.isnan()).sum())
        return losses.sum() / count if count else zero
    return losses.mean() if losses.numel() else zero
