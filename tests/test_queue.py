"""NegativeQueue: FIFO semantics against a deque, mining against the reference selection with the
queue's own ids/labels excluded, state, bad inputs. The cross-rank gather is in
test_toolkit_distributed.py."""

from __future__ import annotations

import collections

import pytest
import torch

from hnsample import NegativeQueue, topk_similarity
from hnsample import _reference as ref


def test_fifo_matches_a_deque():
    g = torch.Generator().manual_seed(0)
    q = NegativeQueue(10, 3, with_labels=True)
    model = collections.deque(maxlen=10)
    next_id = 0
    for n in [3, 4, 0, 5, 12, 1, 9]:
        e = torch.randn(n, 3, generator=g)
        ids = torch.arange(next_id, next_id + n)
        labels = ids % 4
        next_id += n
        q.enqueue(e, ids=ids, labels=labels)
        model.extend(zip(e, ids.tolist(), labels.tolist(), strict=True))
        emb, stored_ids, stored_labels = q.contents()
        assert len(q) == len(model) == emb.shape[0]
        got = sorted(zip(stored_ids.tolist(), stored_labels.tolist(), emb.tolist(), strict=True))
        want = sorted((i, lab, v.tolist()) for v, i, lab in model)
        assert got == want
    # The slot after the pointer holds the oldest entry once the queue is full.
    assert int(q.ids[int(q.pointer)]) == model[0][1]


def test_enqueue_detaches_and_converts():
    q = NegativeQueue(4, 2, dtype=torch.float64)
    x = torch.randn(3, 2, requires_grad=True)
    q.enqueue(x)
    assert q.queue.dtype == torch.float64 and not q.queue.requires_grad
    assert (q.contents()[1] == -1).all()


def _filled_queue(seed=0, capacity=40, n=55):
    g = torch.Generator().manual_seed(seed)
    q = NegativeQueue(capacity, 5, with_labels=True)
    ids = torch.randint(0, 20, (n,), generator=g)  # repeated ids: the same document queued twice
    q.enqueue(torch.randn(n, 5, generator=g), ids=ids, labels=ids % 3)
    return q, g


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_mine_matches_reference_with_own_ids_and_labels_excluded(metric):
    q, g = _filled_queue()
    queries = torch.randn(6, 5, generator=g)
    query_ids = torch.randint(0, 20, (6, 2), generator=g)
    query_ids[0, 1] = -1
    query_labels = torch.randint(0, 3, (6,), generator=g)
    out = q.mine(queries, 7, query_ids=query_ids, query_labels=query_labels, metric=metric)
    emb, ids, labels = q.contents()
    exclude = [[s for s in range(len(q)) if int(ids[s]) in set(query_ids[i].tolist())] for i in range(6)]
    width = max(1, max(map(len, exclude)))
    exclude = torch.tensor([row + [-1] * (width - len(row)) for row in exclude])
    want_s, want_j = ref.topk_similarity(queries, emb, 7, metric=metric, exclude=exclude,
                                         query_labels=query_labels, candidate_labels=labels)
    assert torch.equal(out.slots, want_j)
    torch.testing.assert_close(out.scores, want_s.float())
    valid = want_j >= 0
    assert torch.equal(out.valid, valid)
    assert torch.equal(out.ids[valid], ids[want_j[valid]])
    assert (out.ids[~valid] == -1).all()
    assert torch.equal(out.embeddings[valid], emb[want_j[valid]])
    assert (out.embeddings[~valid] == 0).all()
    for i in range(6):
        kept = out.ids[i][out.valid[i]].tolist()
        assert not set(kept) & set(query_ids[i].tolist())
        assert (out.labels[i][out.valid[i]] != query_labels[i]).all()


def test_mine_forwards_filters_and_keeps_gradient():
    q, g = _filled_queue(seed=1)
    queries = torch.randn(4, 5, generator=g, requires_grad=True)
    out = q.mine(queries, 3, min_score=-0.5, max_score=0.5, metric="cosine")
    assert ((out.scores[out.valid] >= -0.5) & (out.scores[out.valid] <= 0.5)).all()
    direct = topk_similarity(queries, q.contents()[0], 3, metric="cosine", min_score=-0.5, max_score=0.5)
    assert torch.equal(out.slots, direct.indices)
    out.scores[out.valid].sum().backward()
    assert queries.grad is not None and queries.grad.abs().sum() > 0
    sampled = q.mine(queries, 3, sampling="uniform", seed=4)
    assert torch.equal(sampled.slots, q.mine(queries, 3, sampling="uniform", seed=4).slots)
    excl = q.mine(queries, 3, exclude=out.slots)
    assert not (excl.slots.unsqueeze(2) == out.slots.unsqueeze(1)).any()


def test_mine_on_empty_queue_pads():
    q = NegativeQueue(8, 4)
    out = q.mine(torch.randn(2, 4), 3, query_ids=torch.tensor([1, 2]))
    assert out.embeddings.shape == (2, 3, 4) and not out.valid.any() and (out.ids == -1).all()


def test_state_dict_round_trip():
    q, _ = _filled_queue()
    fresh = NegativeQueue(40, 5, with_labels=True)
    fresh.load_state_dict(q.state_dict())
    assert len(fresh) == len(q) and int(fresh.pointer) == int(q.pointer)
    assert torch.equal(fresh.contents()[0], q.contents()[0])


@pytest.mark.parametrize("call, exc, match", [
    (lambda q: q.enqueue(torch.randn(2, 4), labels=torch.zeros(2, dtype=torch.int64)), ValueError, "labels"),
    (lambda q: q.enqueue(torch.randn(2, 3)), ValueError, "embeddings"),
    (lambda q: q.enqueue(torch.ones(2, 4, dtype=torch.int64)), TypeError, "embeddings"),
    (lambda q: q.enqueue(torch.randn(2, 4), ids=torch.zeros(3, dtype=torch.int64)), ValueError, "ids"),
    (lambda q: q.enqueue(torch.randn(2, 4), ids=torch.zeros(2)), TypeError, "ids"),
    (lambda q: q.mine(torch.randn(2, 3), 1), ValueError, "queries"),
    (lambda q: q.mine(torch.randn(2, 4), 1, query_labels=torch.zeros(2, dtype=torch.int64)), ValueError,
     "with_labels"),
    (lambda q: q.mine(torch.randn(2, 4), 1, query_ids=torch.zeros(3, dtype=torch.int64)), ValueError,
     "query_ids"),
    (lambda q: q.mine(torch.randn(2, 4), 1, query_ids=torch.zeros(2)), TypeError, "query_ids"),
    (lambda q: q.mine(torch.randn(2, 4), 1, positives=torch.zeros(2, dtype=torch.int64)), TypeError,
     "positives"),
    (lambda q: q.mine(torch.randn(2, 4), -1), ValueError, "k"),
])
def test_bad_inputs(call, exc, match):
    q = NegativeQueue(8, 4)
    q.enqueue(torch.randn(3, 4))
    with pytest.raises(exc, match=match):
        call(q)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"capacity": 0, "dim": 4}, ValueError, "capacity"),
    ({"capacity": 4, "dim": 0}, ValueError, "dim"),
    ({"capacity": 4, "dim": 2, "dtype": torch.int64}, TypeError, "dtype"),
])
def test_constructor_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        NegativeQueue(**kwargs)
