"""In-batch miners and the triplet margin loss against brute-force definitions and, when installed,
pytorch-metric-learning."""

from __future__ import annotations

import math

import pytest
import torch

from hnsample import Triplets, batch_hard, semi_hard, triplet_margin_loss
from hnsample.miners import pairwise_similarity

METRICS = ["cosine", "dot", "euclidean"]


def _batch(b=24, d=6, classes=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=dtype), torch.randint(0, classes, (b,), generator=g)


def _brute_batch_hard(e, lab, metric):
    s = pairwise_similarity(e, e, metric).double()
    out = []
    for a in range(len(lab)):
        pos = [(s[a, j].item(), j) for j in range(len(lab)) if j != a and lab[j] == lab[a]]
        neg = [(s[a, j].item(), j) for j in range(len(lab)) if lab[j] != lab[a]]
        pos = [t for t in pos if not math.isnan(t[0])]
        neg = [t for t in neg if not math.isnan(t[0])]
        if pos and neg:
            out.append((a, min(pos, key=lambda t: (t[0], t[1]))[1], min(neg, key=lambda t: (-t[0], t[1]))[1]))
    return out


def _brute_semi_hard(e, lab, margin, metric, per_pair):
    s = pairwise_similarity(e, e, metric).double()
    out = []
    for a in range(len(lab)):
        for p in range(len(lab)):
            if p == a or lab[p] != lab[a]:
                continue
            cands = [(s[a, n].item(), n) for n in range(len(lab))
                     if lab[n] != lab[a] and s[a, p] - margin <= s[a, n] < s[a, p]]
            cands.sort(key=lambda t: (-t[0], t[1]))
            out.extend((a, p, n) for _, n in (cands if per_pair is None else cands[:per_pair]))
    return out


def _triples(t: Triplets):
    return list(zip(t.anchors.tolist(), t.positives.tolist(), t.negatives.tolist(), strict=True))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_batch_hard_matches_definition(metric, dtype):
    e, lab = _batch(dtype=dtype)
    assert _triples(batch_hard(e, lab, metric=metric)) == _brute_batch_hard(e, lab, metric)


def test_batch_hard_ties_nan_and_lonely_anchors():
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [float("nan"), 0.0], [0.5, 0.5]])
    lab = torch.tensor([0, 0, 1, 1, 1, 7])
    t = batch_hard(e, lab, metric="dot")
    # Anchor 0: only positive 1; negatives 2 (s=1), 3 (s=0), 4 (NaN, never chosen), 5 (0.5) -> 2.
    # Anchor 2: positives 3 (s=0), 4 (NaN) -> 3. Anchor 5 has no positive and is dropped.
    # Anchor 4's scores are all NaN: no positive, no negative.
    assert _triples(t) == [(0, 1, 2), (1, 0, 2), (2, 3, 0), (3, 2, 5)]


def test_batch_hard_non_contiguous_and_empty():
    e, lab = _batch()
    wide = torch.stack([e, 2 * e], dim=2)[..., 0]
    assert not wide.is_contiguous()
    assert _triples(batch_hard(wide, lab)) == _brute_batch_hard(e, lab, "cosine")
    empty = batch_hard(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))
    assert all(t.numel() == 0 for t in empty)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("per_pair", [1, 3, None])
def test_semi_hard_matches_definition(metric, per_pair):
    e, lab = _batch(seed=1)
    margin = 0.4 if metric != "dot" else 1.5
    got = _triples(semi_hard(e, lab, margin, metric=metric, negatives_per_pair=per_pair))
    assert got == _brute_semi_hard(e, lab, margin, metric, per_pair)
    assert got


def test_semi_hard_window_is_half_open():
    # s_ap = 0.5; negatives at 0.5 (not farther: excluded), 0.3 (inside), 0.2 (on the margin: included),
    # 0.1 (outside).
    e = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.5, 2.0], [0.3, 0.0], [0.2, 0.0], [0.1, 0.0]],
                     dtype=torch.float64)
    lab = torch.tensor([0, 0, 1, 2, 3, 4])
    t = semi_hard(e, lab, 0.3, metric="dot", negatives_per_pair=None)
    assert [x for x in _triples(t) if x[:2] == (0, 1)] == [(0, 1, 3), (0, 1, 4)]


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"margin": 0.0}, ValueError, "margin"),
    ({"margin": float("inf")}, ValueError, "margin"),
    ({"margin": 0.1, "negatives_per_pair": 0}, ValueError, "negatives_per_pair"),
    ({"margin": 0.1, "metric": "l1"}, ValueError, "metric"),
])
def test_semi_hard_bad_inputs(kwargs, exc, match):
    e, lab = _batch()
    with pytest.raises(exc, match=match):
        semi_hard(e, lab, **kwargs)


@pytest.mark.parametrize("args, exc, match", [
    ((torch.randn(4), torch.arange(4)), ValueError, "embeddings"),
    ((torch.ones(4, 2, dtype=torch.int64), torch.arange(4)), TypeError, "embeddings"),
    ((torch.randn(4, 2), torch.arange(3)), ValueError, "labels"),
    ((torch.randn(4, 2), torch.arange(4).float()), TypeError, "labels"),
    (([[1.0]], torch.arange(1)), TypeError, "embeddings"),
])
def test_batch_hard_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        batch_hard(*args)


@pytest.mark.parametrize("metric", METRICS)
def test_triplet_margin_loss_formula_and_gradient(metric):
    e, lab = _batch(seed=2, dtype=torch.float64)
    e.requires_grad_(True)
    t = batch_hard(e, lab, metric=metric)
    s = pairwise_similarity(e, e, metric)
    expected = torch.relu(s[t.anchors, t.negatives] - s[t.anchors, t.positives] + 0.2)
    torch.testing.assert_close(triplet_margin_loss(e, t, 0.2, metric=metric, reduction="none"), expected)
    torch.testing.assert_close(triplet_margin_loss(e, t, 0.2, metric=metric), expected.mean())
    torch.testing.assert_close(triplet_margin_loss(e, t, 0.2, metric=metric, reduction="sum"), expected.sum())
    nz = expected[expected > 0]
    nonzero_mean = triplet_margin_loss(e, t, 0.2, metric=metric, reduction="mean_nonzero")
    torch.testing.assert_close(nonzero_mean, nz.mean())
    assert torch.autograd.gradcheck(
        lambda x: triplet_margin_loss(x, t, 0.2, metric=metric), (e.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triplet_margin_loss_zero_embedding_has_finite_gradient(dtype):
    """A used row that is exactly zero has cosine 0 with everything and a zero gradient. (Its gradient
    used to be about 1 / tiny = 8.5e37 in float32, -inf once cast back to a 16-bit dtype.)"""
    e = torch.tensor([[0.5, 0.25], [0.0, 0.0], [0.25, -0.5]], dtype=dtype, requires_grad=True)
    t = (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2, 2]))
    loss = triplet_margin_loss(e, t, 1.0, metric="cosine", reduction="none")
    assert loss.tolist() == [1.0, 1.0]  # every cosine here is 0: e0 . e2 = 0, and e1 is zero
    loss.sum().backward()
    assert torch.isfinite(e.grad).all() and (e.grad[1] == 0).all()


def test_semi_hard_all_negatives_of_an_empty_batch():
    """negatives_per_pair=None on an empty batch: no triplets (it used to be refused as if None were 0)."""
    empty = semi_hard(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), 0.5, negatives_per_pair=None)
    assert all(t.numel() == 0 for t in empty)


def test_triplet_margin_loss_empty_is_connected_zero():
    e = torch.randn(4, 3, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.int64)
    loss = triplet_margin_loss(e, (empty, empty, empty), 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert e.grad is not None and torch.count_nonzero(e.grad) == 0


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"triplets": (torch.tensor([0]), torch.tensor([1]))}, TypeError, "triplets"),
    ({"triplets": (torch.tensor([0]), torch.tensor([1]), torch.tensor([4]))}, ValueError, "negatives"),
    ({"triplets": (torch.tensor([0.0]), torch.tensor([1]), torch.tensor([2]))}, TypeError, "anchors"),
    ({"triplets": (torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2]))}, ValueError, "same length"),
    ({"margin": None}, TypeError, "margin"),
    ({"reduction": "max"}, ValueError, "reduction"),
    ({"metric": "l1"}, ValueError, "metric"),
])
def test_triplet_margin_loss_bad_inputs(kwargs, exc, match):
    triplets = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    args = {"embeddings": torch.randn(4, 3), "triplets": triplets, "margin": 0.1}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        triplet_margin_loss(args.pop("embeddings"), args.pop("triplets"), args.pop("margin"), **args)


# ----------------------------------------------------------------------------------------------------
# pytorch-metric-learning (skipped when it is not installed)


def _pml_distance(distances, metric):
    if metric == "cosine":
        return distances.CosineSimilarity()
    return distances.LpDistance(normalize_embeddings=False)


def _pml():
    return pytest.importorskip("pytorch_metric_learning")


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_batch_hard_equals_pytorch_metric_learning(metric):
    _pml()
    from pytorch_metric_learning import distances, miners

    dist = _pml_distance(distances, metric)
    for seed in range(3):
        e, lab = _batch(seed=seed)
        ref = miners.BatchHardMiner(distance=dist)(e, lab)
        assert _triples(batch_hard(e, lab, metric=metric)) == _triples(Triplets(*ref))
    # Its default distance (L2 of normalized embeddings) ranks exactly like cosine.
    e, lab = _batch(seed=5)
    assert _triples(batch_hard(e, lab)) == _triples(Triplets(*miners.BatchHardMiner()(e, lab)))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_semi_hard_set_equals_pytorch_metric_learning(metric):
    _pml()
    from pytorch_metric_learning import distances, miners

    dist = _pml_distance(distances, metric)
    e, lab = _batch(b=32, seed=4)
    ref = miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard", distance=dist)(e, lab)
    got = semi_hard(e, lab, 0.3, metric=metric, negatives_per_pair=None)
    assert set(_triples(got)) == set(_triples(Triplets(*ref)))
    assert len(_triples(got)) == len(set(_triples(got)))


def test_triplet_margin_loss_equals_pytorch_metric_learning():
    _pml()
    from pytorch_metric_learning import distances, losses

    e, lab = _batch(seed=6)
    t = batch_hard(e, lab)
    ref = losses.TripletMarginLoss(margin=0.2, distance=distances.CosineSimilarity())(e, lab, tuple(t))
    torch.testing.assert_close(triplet_margin_loss(e, t, 0.2, reduction="mean_nonzero"), ref)
