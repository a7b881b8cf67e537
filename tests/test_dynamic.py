"""DynamicNegativeMiner: hard negatives equal the reference selection for every storage (tensor,
numpy, memory-mapped .npy, chunked), random negatives are uniform over the eligible documents and never
collide, seeding is deterministic, bad inputs raise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from hnsample import DynamicNegativeMiner
from hnsample import _reference as ref


def _index(n=300, d=8, b=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    docs = torch.randn(n, d, generator=g)
    queries = torch.randn(b, d, generator=g)
    positives = torch.randint(0, n, (b, 2), generator=g)
    positives[0, 1] = -1
    return docs, queries, positives


@pytest.fixture(params=["tensor", "numpy", "npy", "npy_chunked"])
def storage(request, tmp_path):
    def make(docs, **kwargs):
        if request.param == "tensor":
            return DynamicNegativeMiner(docs, **kwargs)
        if request.param == "numpy":
            return DynamicNegativeMiner(docs.numpy(), **kwargs)
        path = tmp_path / "docs.npy"
        np.save(path, docs.numpy())
        chunk = 37 if request.param == "npy_chunked" else 1 << 16
        return DynamicNegativeMiner(str(path), chunk_rows=chunk, **kwargs)
    return make


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_hard_negatives_match_reference(storage, metric):
    docs, queries, positives = _index()
    miner = storage(docs, metric=metric)
    out = miner.mine(queries, positives, 6, random=4, seed=0)
    want_s, want_j = ref.topk_similarity(queries, docs, 6, metric=metric, positives=positives)
    assert torch.equal(out.ids[:, :6], want_j)
    torch.testing.assert_close(out.scores[:, :6], want_s.float())
    assert torch.equal(out.embeddings, docs[out.ids])
    rand = out.ids[:, 6:]
    assert (rand >= 0).all()
    s = ref.similarity(queries, docs, metric)
    torch.testing.assert_close(out.scores[:, 6:], torch.gather(s, 1, rand))


def test_filters_and_labels(storage):
    docs, queries, positives = _index(seed=1)
    labels = torch.arange(docs.shape[0]) % 7
    qlab = torch.tensor([0, 1, 2, 3, 4])
    miner = storage(docs, document_labels=labels)
    out = miner.mine(queries, positives, 5, random=8, query_labels=qlab, absolute_margin=0.5, seed=2,
                     exclude=torch.arange(5).unsqueeze(1))
    want_s, want_j = ref.topk_similarity(queries, docs, 5, positives=positives, absolute_margin=0.5,
                                         exclude=torch.arange(5).unsqueeze(1), query_labels=qlab,
                                         candidate_labels=labels)
    assert torch.equal(out.ids[:, :5], want_j)
    rand = out.ids[:, 5:]
    assert (labels[rand] != qlab.unsqueeze(1)).all()
    assert not (rand == torch.arange(5).unsqueeze(1)).any()


def test_random_negatives_never_collide_and_are_seeded():
    docs, queries, positives = _index(n=60, b=40, seed=2)
    queries = queries.repeat(1, 1)
    miner = DynamicNegativeMiner(docs)
    pos = torch.randint(0, 60, (40, 3), generator=torch.Generator().manual_seed(5))
    out = miner.mine(queries, pos, 10, random=20, seed=11)
    for i in range(40):
        row = out.ids[i].tolist()
        assert len(set(row)) == 30 and min(row) >= 0
        assert not set(row) & set(pos[i].tolist())
    again = miner.mine(queries, pos, 10, random=20, seed=11)
    other = miner.mine(queries, pos, 10, random=20, seed=12)
    assert torch.equal(out.ids, again.ids) and not torch.equal(out.ids, other.ids)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(miner.mine(queries, pos, 2, random=5, generator=g1).ids,
                       miner.mine(queries, pos, 2, random=5, generator=g2).ids)


def test_random_negatives_are_uniform_over_eligible_documents():
    # 20 documents; positive 0 and the 3 hard ones are ineligible, leaving 16: each draw of 4 hits a
    # given eligible document with probability 4/16, so the counts are uniform over the 16.
    g = torch.Generator().manual_seed(0)
    docs = torch.randn(20, 4, generator=g)
    q = torch.randn(1, 4, generator=g).repeat(2000, 1)
    miner = DynamicNegativeMiner(docs)
    out = miner.mine(q, torch.zeros(2000, 1, dtype=torch.int64), 3, random=4, seed=1)
    hard = set(out.ids[0, :3].tolist())
    counts = torch.bincount(out.ids[:, 3:].flatten(), minlength=20).numpy()
    ineligible = sorted(hard | {0})
    assert counts[ineligible].sum() == 0
    eligible = np.delete(counts, ineligible)
    assert eligible.sum() == 8000
    assert stats.chisquare(eligible).pvalue > 1e-3


def test_too_few_eligible_documents_pads():
    docs, queries, _ = _index(n=10, b=3, seed=3)
    miner = DynamicNegativeMiner(docs)
    pos = torch.tensor([[0, 1], [2, -1], [3, 4]])
    out = miner.mine(queries, pos, 3, random=10, seed=0)
    for i in range(3):
        row = out.ids[i]
        chosen = row[row >= 0].tolist()
        assert sorted(chosen) == sorted(set(range(10)) - set(pos[i].tolist()))
        assert (out.embeddings[i][row < 0] == 0).all()
        assert torch.isinf(out.scores[i][row < 0]).all()


def test_half_precision_memory_map_and_float64_queries(tmp_path):
    docs, queries, positives = _index(seed=4)
    path = tmp_path / "docs16.npy"
    np.save(path, docs.half().numpy())
    miner = DynamicNegativeMiner(path, chunk_rows=50)
    out = miner.mine(queries, positives, 4, seed=0)
    want_s, want_j = ref.topk_similarity(queries, docs.half().float(), 4, positives=positives)
    assert torch.equal(out.ids, want_j)
    assert out.embeddings.dtype == torch.float32
    out64 = DynamicNegativeMiner(docs).mine(queries.double(), positives, 4)
    want_s, want_j = ref.topk_similarity(queries.double(), docs.double(), 4, positives=positives)
    assert torch.equal(out64.ids, want_j) and out64.scores.dtype == torch.float64


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_half_precision_document_tensor(dtype, metric):
    """A 16-bit document tensor already on the scoring device is scored against the float32 queries as
    the reference scores it. (It used to be handed to the kernels unconverted, next to float32 queries,
    and read as if it were float32: garbage scores, read past its end.)"""
    docs, queries, positives = _index(seed=5)
    docs16, queries16 = docs.to(dtype), queries.to(dtype)
    miner = DynamicNegativeMiner(docs16, metric=metric)
    for q in (queries16, queries):
        out = miner.mine(q, positives, 5, random=2, seed=0)
        want_s, want_j = ref.topk_similarity(q.float(), docs16.float(), 5, metric=metric, positives=positives)
        assert torch.equal(out.ids[:, :5], want_j)
        assert torch.equal(out.scores[:, :5].double(), want_s)


def test_zero_k_and_zero_random():
    docs, queries, positives = _index()
    out = DynamicNegativeMiner(docs).mine(queries, positives, 0)
    assert out.ids.shape == (5, 0) and out.embeddings.shape == (5, 0, 8)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"documents": torch.randn(10)}, ValueError, "documents"),
    ({"documents": torch.ones(10, 2, dtype=torch.int64)}, TypeError, "documents"),
    ({"documents": [[1.0]]}, TypeError, "documents"),
    ({"documents": np.ones((4, 2), dtype=np.int32)}, TypeError, "documents"),
    ({"documents": torch.randn(10, 2), "metric": "l2"}, ValueError, "metric"),
    ({"documents": torch.randn(10, 2), "chunk_rows": 0}, ValueError, "chunk_rows"),
    ({"documents": torch.randn(10, 2), "document_labels": torch.zeros(9, dtype=torch.int64)}, ValueError,
     "document_labels"),
])
def test_constructor_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        DynamicNegativeMiner(**kwargs)


@pytest.mark.parametrize("call, exc, match", [
    (lambda m, q, p: m.mine(q[:, :3], p, 2), ValueError, "query_embeddings"),
    (lambda m, q, p: m.mine(q.long(), p, 2), TypeError, "query_embeddings"),
    (lambda m, q, p: m.mine(q, p, 2, random=-1), ValueError, "random"),
    (lambda m, q, p: m.mine(q, p, 2, bogus=1), TypeError, "bogus"),
    (lambda m, q, p: m.mine(q, p + 1000, 2), ValueError, "positives"),
    (lambda m, q, p: m.mine(q, p, 2, query_labels=torch.zeros(5, dtype=torch.int64)), ValueError,
     "document_labels"),
    (lambda m, q, p: m.mine(q, p, 2, sampling="best"), ValueError, "sampling"),
    (lambda m, q, p: m.mine(q, p, 2, generator=5), TypeError, "generator"),
])
def test_mine_bad_inputs(call, exc, match):
    docs, queries, positives = _index()
    with pytest.raises(exc, match=match):
        call(DynamicNegativeMiner(docs), queries, positives)
