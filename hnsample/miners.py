"""In-batch triplet miners (pytorch-metric-learning vocabulary) and the triplet margin loss.

Both miners score the batch against itself, s_ab = similarity(e_a, e_b), block by block of anchor rows,
and make every choice with the fused selection :func:`hnsample.topk_from_scores` (label masks, score
windows), so ties and NaN follow one rule everywhere: ties go to the lower index and NaN scores are never
chosen. A row of the batch holding NaN or inf takes part in no triplet (its scores are treated as NaN,
whatever the metric would make of them), and :func:`triplet_margin_loss` reads only the rows its
triplets use.

The choices rank **canonical scores** for float32 / float16 / bfloat16 inputs on the CPU, as every
selection of hnsample does (docs/certified.md): the same triplets on every machine, thread count and
block size, exact duplicates tying by index. A GEMM screens the batch with a proven error bound and only
the pairs it cannot decide are rescored canonically: for "dot" / "cosine" through the engine's certified
selection, for "euclidean" through certified intervals of the batch (hnsample.miner_choices).

Metrics (a, b: two rows of the batch):

* "cosine": s = float32(D_ab / (N_a N_b)), 0 for a zero vector; "dot": s = float32(D_ab), where D_ab is
  the canonical float64 dot product (exact products, eight lanes summed in a fixed order) and
  N_x = sqrt(D_xx) (csrc/canonical.h);
* "euclidean": s = -float32(sqrt(D2_ab)), D2_ab the canonical squared distance: the same eight-lane
  float64 sum of x_t = fl64(fl64(a_t - b_t)^2) (engine.intervals.canonical_distance_scores). Summing
  squared differences has no cancellation (D2 is within (ceil(d/8) + 6) 2^-53 of |a - b|^2 relative),
  where |a|^2 + |b|^2 - 2 a.b loses every digit for near duplicates.

float64 inputs (and inputs on a GPU) keep the GEMM's scores in their compute dtype: s = e_a . e_b of the
rows (unit rows for cosine), -|e_a - e_b| by torch.cdist for "euclidean". :func:`pairwise_similarity`
and :func:`triplet_margin_loss` use these real-valued formulas in the compute dtype, differentiably:
the canonical scores are their values rounded.

The default metric here is "cosine", as in ``mine_hard_negatives`` and the samplers; the ops
(``topk_similarity``, ``DynamicNegativeMiner``, ``NegativeQueue.mine``) default to "dot".
Distances are d = -s, so "hard" means high similarity for negatives and low similarity for positives.
pytorch-metric-learning's default distance (L2 on normalized embeddings, d = sqrt(2 - 2 cos)) ranks
pairs like "cosine" (up to its float32 rounding where two scores nearly tie); its margins are distances,
so equal margins only match with "euclidean" on normalized embeddings.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ._ext import as_tensor, check_finite, to_int64
from .miner_choices import hardest_pairs, semi_hard_triplets

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


def batch_hard(embeddings: Any, labels: Any, *, metric: str = "cosine") -> Triplets:
    """Batch-hard mining: for every anchor a, its hardest positive and its hardest negative.

    p(a) = argmin_{b != a, y_b = y_a} s_ab  (the least similar positive),
    n(a) = argmax_{b: y_b != y_a} s_ab      (the most similar negative),
    ties to the lower index, NaN scores (and rows holding NaN or inf) never chosen; anchors with no
    positive or no negative are dropped. One triplet per remaining anchor, in anchor order. s is the
    canonical score for float32 / 16-bit CPU inputs (see the module docstring), so the triplets are the
    same on every machine, thread count and block size.

    This is pytorch-metric-learning's ``BatchHardMiner`` (pos_strategy = neg_strategy = "hard"):
    with its default distance (L2 of normalized embeddings) it picks the same triplets as
    ``metric="cosine"`` here (up to its own float32 rounding where two scores nearly tie).

    Memory: never B x B. "dot" / "cosine" (float32 / 16-bit, CPU): the engine's score blocks
    (settings.block_size) and the scores of each anchor's positives; otherwise blocks of
    settings.block_size / 4 float64 scores.
    """
    e, lab = _check_batch(embeddings, labels, metric)
    with torch.no_grad():
        pos, neg = hardest_pairs(e.detach(), lab, metric, _exact_scorer(metric))
        keep = (pos >= 0) & (neg >= 0)
        self_id = torch.arange(e.shape[0], device=e.device)
    return Triplets(self_id[keep], pos[keep].to(e.device), neg[keep].to(e.device))


def _exact_scorer(metric: str):
    """The scores of inputs the certificate does not cover (float64, GPU): this module's formulas."""
    return lambda a, b: pairwise_similarity(a, b, metric)


def semi_hard(embeddings: Any, labels: Any, margin: float, *, metric: str = "cosine",
              negatives_per_pair: int | None = 1) -> Triplets:
    """Semi-hard mining: for every positive pair (a, p), negatives that are farther than p but within
    the margin,

        0 < d_an - d_ap <= margin,   i.e.   -margin <= fl64(s_an - s_ap) < 0

    (the difference of the two scores taken in float64), keeping the ``negatives_per_pair`` hardest of
    them (highest s_an; ties to the lower index), or all of them for ``negatives_per_pair=None``. Pairs
    are enumerated anchor-major (a ascending, then p), and a pair's triplets are in descending s_an. With
    ``negatives_per_pair=1`` this is FaceNet's choice of the hardest semi-hard negative (a pair without
    one is dropped). Rows holding NaN or inf are in no triplet. s is the canonical score for float32 /
    16-bit CPU inputs (s_ap included; see the module docstring), so the triplets are the same on every
    machine, thread count and block size.

    With ``negatives_per_pair=None`` the set of triplets is exactly pytorch-metric-learning's
    ``TripletMarginMiner(margin, type_of_triplets="semihard")`` (which keeps every triplet with
    0 < d_an - d_ap <= margin), for the matching distance (up to its float32 rounding at the edges).

    Memory: never B x B. float32 / 16-bit rows on the CPU with fewer negatives per pair than rows: blocks of
    anchor rows x B within settings.block_size / 4 (float32 keys, per-pair cuts, canonical rescoring of
    what they keep; float64 intervals for a block they cannot decide). "dot" / "cosine" with every
    negative (None), and on a GPU with certified scores: the engine's selection for chunks of positive
    pairs (queries and k slots per pair within settings.block_size / 4). Otherwise blocks of
    settings.block_size / 4 float64 scores (anchor rows x B, or positive pairs x B).
    """
    e, lab = _check_batch(embeddings, labels, metric)
    margin = check_finite("margin", margin)
    if margin is None or margin <= 0:
        raise ValueError(f"margin must be a finite float > 0, got {margin}")
    b = e.shape[0]
    k = negatives_per_pair
    if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
        raise ValueError(f"negatives_per_pair must be an int >= 1 or None, got {negatives_per_pair!r}")
    k = b if k is None else min(k, b)  # None: every semi-hard negative (an empty batch has none)
    with torch.no_grad():
        found = semi_hard_triplets(e.detach(), lab, margin, metric, k, _exact_scorer(metric))
    if not found:
        empty = torch.empty(0, dtype=torch.int64, device=e.device)
        return Triplets(empty, empty, empty)
    return Triplets(*(torch.cat(parts).to(e.device) for parts in zip(*found, strict=True)))


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
