"""Non-finite embeddings in the training-side toolkit: the triplet loss reads only the rows its triplets
use; the miners, the neighbour sampler, MoCHi and the negative queue never choose a row holding NaN or
inf; the cluster sampler refuses such rows with a clear error and copes with very large finite ones."""

from __future__ import annotations

import math

import pytest
import torch

from hnsample import (
    ClusterBatchSampler,
    NegativeQueue,
    NeighbourBatchSampler,
    Triplets,
    batch_hard,
    mix_hard_negatives,
    semi_hard,
    triplet_margin_loss,
)

REDUCTIONS = ["mean", "mean_nonzero", "sum", "none"]
METRICS = ["cosine", "dot", "euclidean"]


def _batch(b=12, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=torch.float64), torch.arange(b) // 3


def _poisoned(e, rows, value):
    bad = e.clone()
    bad[rows, 1] = value
    return bad


# ----------------------------------------------------------------------------------------------------
# triplet_margin_loss


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_ignores_non_finite_rows_no_triplet_uses(value, metric, reduction):
    e, _ = _batch()
    t = Triplets(torch.tensor([0, 3, 6]), torch.tensor([1, 4, 7]), torch.tensor([2, 5, 8]))
    clean = e.clone().requires_grad_()
    dirty = _poisoned(e, [9, 11], value).requires_grad_()
    want = triplet_margin_loss(clean, t, 0.5, metric=metric, reduction=reduction)
    got = triplet_margin_loss(dirty, t, 0.5, metric=metric, reduction=reduction)
    assert torch.equal(got, want)
    got.sum().backward()
    want.sum().backward()
    assert torch.equal(dirty.grad, clean.grad)
    assert torch.count_nonzero(dirty.grad[9:]) == 0


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_loss_without_triplets_is_a_connected_zero_despite_nan_rows(reduction):
    e, _ = _batch()
    e = _poisoned(e, [0, 5], math.nan).requires_grad_()
    empty = torch.zeros(0, dtype=torch.int64)
    loss = triplet_margin_loss(e, Triplets(empty, empty, empty), 0.2, reduction=reduction)
    if reduction == "none":
        assert loss.shape == (0,)
        return
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert e.grad is not None and torch.equal(e.grad, torch.zeros_like(e))


def test_mean_nonzero_without_positive_losses_is_a_connected_zero():
    e, _ = _batch()
    e = _poisoned(e, [10], math.inf).requires_grad_()
    # Anchor 0 with itself as positive and a far negative: l = max(0, s_an - 1 + margin) = 0.
    far = torch.tensor([[1.0, 0, 0, 0, 0], [-1.0, 0, 0, 0, 0]], dtype=torch.float64)
    with torch.no_grad():
        e[:2] = far
    t = Triplets(torch.tensor([0]), torch.tensor([0]), torch.tensor([1]))
    loss = triplet_margin_loss(e, t, 0.1, reduction="mean_nonzero")
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(e.grad, torch.zeros_like(e))


@pytest.mark.parametrize("reduction", ["mean", "mean_nonzero", "sum"])
def test_a_nan_row_a_triplet_uses_makes_the_loss_nan(reduction):
    e, _ = _batch()
    t = Triplets(torch.tensor([0, 3]), torch.tensor([1, 4]), torch.tensor([2, 5]))
    loss = triplet_margin_loss(_poisoned(e, [5], math.nan), t, 0.2, reduction=reduction)
    assert math.isnan(loss.item())


# ----------------------------------------------------------------------------------------------------
# batch_hard / semi_hard: a non-finite row is in no triplet


def _without(e, lab, row):
    keep = torch.tensor([i for i in range(e.shape[0]) if i != row])
    return e[keep], lab[keep], keep


def _remap(t, keep):
    return sorted(zip(*(keep[x].tolist() for x in t), strict=True))


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("metric", METRICS)
def test_miners_never_use_a_non_finite_row(value, metric):
    e, lab = _batch(b=15)
    dirty = _poisoned(e, [4], value)
    sub_e, sub_lab, keep = _without(e, lab, 4)
    got = batch_hard(dirty, lab, metric=metric)
    assert sorted(zip(*(x.tolist() for x in got), strict=True)) == _remap(batch_hard(sub_e, sub_lab,
                                                                                      metric=metric), keep)
    got = semi_hard(dirty, lab, 2.0, metric=metric, negatives_per_pair=None)
    want = semi_hard(sub_e, sub_lab, 2.0, metric=metric, negatives_per_pair=None)
    assert sorted(zip(*(x.tolist() for x in got), strict=True)) == _remap(want, keep)
    # ... so the loss over the mined triplets is finite.
    assert math.isfinite(triplet_margin_loss(dirty, batch_hard(dirty, lab, metric=metric), 0.2,
                                             metric=metric).item())


# ----------------------------------------------------------------------------------------------------
# ClusterBatchSampler


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_cluster_sampler_rejects_non_finite_rows_naming_them(value):
    x = torch.randn(40, 6, generator=torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=r"embeddings must be finite.*rows \[3, 17\] \(2 of 40\)"):
        ClusterBatchSampler(_poisoned(x, [3, 17], value), 8, seed=0)
    s = ClusterBatchSampler(x, 8, seed=0)
    before = s.global_batches()
    with pytest.raises(ValueError, match=r"rows \[5\] \(1 of 40\)"):
        s.recluster(_poisoned(x, [5], value))
    assert s.global_batches() == before  # a refused recluster changes nothing


@pytest.mark.parametrize("metric", ["euclidean", "cosine"])
def test_cluster_sampler_is_scale_free_for_huge_finite_embeddings(metric):
    # 2**70 * N(0, 1) in float32: |c|^2 and the norms overflow unless the inputs are rescaled; the
    # power-of-two scale changes no rounding, so the clustering is the unscaled one, bit for bit.
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(2))
    small = ClusterBatchSampler(x, 6, metric=metric, seed=3)
    huge = ClusterBatchSampler(x * 2.0**70, 6, metric=metric, seed=3)
    assert torch.equal(huge.assignments, small.assignments)
    assert huge.global_batches() == small.global_batches()
    assert torch.bincount(small.assignments).min() > 0  # no empty cluster keeps a raw initial item
    assert torch.equal(huge.centroids, small.centroids * (2.0**70 if metric == "euclidean" else 1.0))


# ----------------------------------------------------------------------------------------------------
# NeighbourBatchSampler


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_neighbour_mining_skips_non_finite_rows(value, metric):
    x = torch.randn(30, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    bad = [2, 19]
    nb = NeighbourBatchSampler.mine_neighbours(_poisoned(x, bad, value), 4, metric=metric)
    assert nb[bad].eq(-1).all()
    xs = x / x.norm(dim=1, keepdim=True) if metric == "cosine" else x
    s = xs @ xs.T
    s[:, bad] = -math.inf
    s.fill_diagonal_(-math.inf)
    good = [i for i in range(30) if i not in bad]
    assert torch.equal(nb[good], s[good].topk(4, dim=1).indices)
    sampler = NeighbourBatchSampler(nb, 6, seed=0)
    assert sorted(i for b in sampler.global_batches() for i in b) == list(range(30))


# ----------------------------------------------------------------------------------------------------
# MoCHi and the negative queue


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_mix_hard_negatives_rejects_non_finite_query_rows(value):
    q, neg = torch.randn(4, 3), torch.randn(10, 3)
    with pytest.raises(ValueError, match=r"query must be finite: rows \[1\] \(1 of 4\)"):
        mix_hard_negatives(_poisoned(q, [1], value), neg, 3, 2, 1, seed=0)


@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_mix_hard_negatives_never_mixes_a_non_finite_negative(shared, metric):
    g = torch.Generator().manual_seed(5)
    q = torch.randn(4, 3, generator=g, dtype=torch.float64)
    neg = torch.randn(9, 3, generator=g, dtype=torch.float64) if shared else torch.randn(4, 9, 3, generator=g,
                                                                                        dtype=torch.float64)
    dirty = neg.clone()
    dirty[..., 0, 1] = math.inf  # negative 0 (of every query) holds inf: with "dot" it would score +-inf
    keep = torch.arange(1, 9)
    got = mix_hard_negatives(q, dirty, 3, 4, 2, metric=metric, seed=7)
    want = mix_hard_negatives(q, neg[..., 1:, :], 3, 4, 2, metric=metric, seed=7)
    assert torch.equal(got.embeddings, want.embeddings)
    assert torch.equal(got.second, keep[want.second])
    assert bool(got.embeddings.isfinite().all())
    with pytest.raises(ValueError, match=r"n_hard=9 finite negatives.*query rows \[0, 1, 2, 3\]"):
        mix_hard_negatives(q, dirty, 9, 1, metric=metric, seed=7)


@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_queue_never_returns_non_finite_entries_and_pads_non_finite_queries(metric):
    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, 4, generator=g)
    queue = NegativeQueue(16, 4)
    dirty = x.clone()
    dirty[3, 0], dirty[8, 2] = math.inf, math.nan
    queue.enqueue(dirty, ids=torch.arange(16))
    q = torch.randn(5, 4, generator=g)
    q[2, 1] = -math.inf
    got = queue.mine(q, 4, metric=metric)
    assert not torch.isin(got.slots, torch.tensor([3, 8])).any()
    assert got.valid[2].sum() == 0 and got.valid[[0, 1, 3, 4]].all()
    assert bool(got.embeddings.isfinite().all())
