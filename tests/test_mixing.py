"""MoCHi hard negative mixing: the recipe is followed exactly, the draws have the stated distributions,
seeding is deterministic, outputs are detached, bad inputs raise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from hnsample import MoCHi, mix_hard_negatives


def _data(b=6, k=30, d=8, seed=0, per_query=False):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, d, generator=g)
    neg = torch.randn((b, k, d) if per_query else (k, d), generator=g)
    return q, neg


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("per_query", [False, True], ids=["shared", "per_query"])
@pytest.mark.parametrize("metric", ["cosine", "dot"])
def test_recipe_is_followed_exactly(per_query, metric):
    q, neg = _data(per_query=per_query)
    n_hard, n_mix, n_qmix = 5, 7, 4
    out = mix_hard_negatives(q, neg, n_hard, n_mix, n_qmix, metric=metric, seed=3)
    b = q.shape[0]
    assert out.embeddings.shape == (b, n_mix + n_qmix, q.shape[1])
    negs = neg if per_query else neg.expand(b, *neg.shape)
    s = torch.einsum("bd,bkd->bk", _unit(q) if metric == "cosine" else q,
                     _unit(negs) if metric == "cosine" else negs)
    hard = s.topk(n_hard, dim=1).indices
    for i in range(b):
        hs = set(hard[i].tolist())
        assert set(out.first[i, :n_mix].tolist()) <= hs
        assert set(out.second[i].tolist()) <= hs
        assert (out.first[i, n_mix:] == -1).all()
        assert (out.first[i, :n_mix] != out.second[i, :n_mix]).all()
        for m in range(n_mix + n_qmix):
            a = _unit(q[i]) if m >= n_mix else _unit(negs[i, out.first[i, m]])
            w = out.weight[i, m]
            expected = _unit(w * a + (1 - w) * _unit(negs[i, out.second[i, m]]))
            torch.testing.assert_close(out.embeddings[i, m], expected)
    torch.testing.assert_close(out.embeddings.norm(dim=-1), torch.ones(b, n_mix + n_qmix))


def test_coefficients_and_choices_have_the_stated_distributions():
    q, neg = _data(b=400, k=20, d=4, seed=1)
    n_hard = 8
    out = mix_hard_negatives(q, neg, n_hard, 25, 25, seed=7)
    alpha = out.weight[:, :25].flatten().numpy()
    beta = out.weight[:, 25:].flatten().numpy()
    assert alpha.min() > 0 and alpha.max() < 1 and beta.min() > 0 and beta.max() < 0.5
    bins = np.linspace(0, 1, 11)
    assert stats.chisquare(np.histogram(alpha, bins)[0]).pvalue > 1e-3
    assert stats.chisquare(np.histogram(2 * beta, bins)[0]).pvalue > 1e-3
    # The mixed pair is uniform over ordered pairs of distinct hard negatives: the rank of the first
    # member within the row's hard set is uniform on 0..n_hard-1.
    hard = mix_hard_negatives(q, neg, n_hard, 0, 0, seed=0)
    assert hard.embeddings.shape[1] == 0
    ranks = torch.cdist(_unit(q), _unit(neg))  # ascending distance == descending cosine
    order = ranks.argsort(dim=1)[:, :n_hard]
    pos_first = (order.unsqueeze(1) == out.first[:, :25].unsqueeze(2)).float().argmax(2)
    assert stats.chisquare(np.bincount(pos_first.flatten().numpy(), minlength=n_hard)).pvalue > 1e-3
    pos_q = (order.unsqueeze(1) == out.second[:, 25:].unsqueeze(2)).float().argmax(2)
    assert stats.chisquare(np.bincount(pos_q.flatten().numpy(), minlength=n_hard)).pvalue > 1e-3


def test_seeding_and_generator():
    q, neg = _data()
    a = mix_hard_negatives(q, neg, 5, 4, 2, seed=1)
    b = mix_hard_negatives(q, neg, 5, 4, 2, seed=1)
    c = mix_hard_negatives(q, neg, 5, 4, 2, seed=2)
    assert torch.equal(a.embeddings, b.embeddings) and not torch.equal(a.weight, c.weight)
    g1, g2 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert torch.equal(mix_hard_negatives(q, neg, 5, 4, 2, generator=g1).embeddings,
                       mix_hard_negatives(q, neg, 5, 4, 2, generator=g2).embeddings)


def test_single_hard_negative_and_float64():
    q, neg = _data()
    out = mix_hard_negatives(q.double(), neg.double(), 1, 3, 1, seed=0)
    assert out.embeddings.dtype == torch.float64
    assert (out.first[:, :3] == out.second[:, :3]).all()


def test_outputs_are_detached():
    q, neg = _data()
    q.requires_grad_(True)
    out = mix_hard_negatives(q, neg, 5, 3, 3, seed=0)
    assert not out.embeddings.requires_grad


def test_mochi_is_reproducible_and_resumable():
    q, neg = _data()
    m1, m2 = MoCHi(5, 4, 2, seed=3), MoCHi(5, 4, 2, seed=3)
    first = m1(q, neg)
    assert torch.equal(first.embeddings, m2(q, neg).embeddings)
    state = m1.state_dict()
    second = m1(q, neg)
    assert not torch.equal(first.weight, second.weight)
    m1.load_state_dict(state)
    assert torch.equal(m1(q, neg).embeddings, second.embeddings)


def test_mochi_logits():
    q, neg = _data(b=4, k=10)
    pos = torch.randn_like(q)
    q.requires_grad_(True)
    m = MoCHi(3, 2, 1, seed=0)
    logits = m.logits(q, pos, neg, temperature=0.5)
    assert logits.shape == (4, 1 + 10 + 3)
    mixed = MoCHi(3, 2, 1, seed=0)(q, neg).embeddings
    qn = _unit(q.detach())
    torch.testing.assert_close(logits[:, 0], (qn * _unit(pos)).sum(1) / 0.5)
    torch.testing.assert_close(logits[:, 1:11], qn @ _unit(neg).T / 0.5)
    torch.testing.assert_close(logits[:, 11:], torch.einsum("bd,bmd->bm", qn, mixed) / 0.5)
    torch.nn.functional.cross_entropy(logits, torch.zeros(4, dtype=torch.int64)).backward()
    assert q.grad is not None and torch.isfinite(q.grad).all()
    with pytest.raises(ValueError, match="temperature"):
        m.logits(q, pos, neg, temperature=0)
    with pytest.raises(ValueError, match="positive"):
        m.logits(q, pos[:2], neg)


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"n_hard": 31}, ValueError, "n_hard"),
    ({"n_hard": 0}, ValueError, "n_hard"),
    ({"n_mix": -1}, ValueError, "n_mix"),
    ({"n_query_mix": 1.5}, TypeError, "n_query_mix"),
    ({"metric": "euclidean"}, ValueError, "metric"),
    ({"query": torch.randn(6)}, ValueError, "query"),
    ({"negatives": torch.randn(30, 7)}, ValueError, "negatives"),
    ({"negatives": torch.randn(5, 30, 8)}, ValueError, "negatives"),
    ({"negatives": torch.ones(30, 8, dtype=torch.int64)}, ValueError, "negatives"),
    ({"generator": 3}, TypeError, "generator"),
    ({"seed": "x"}, TypeError, "seed"),
])
def test_bad_inputs(kwargs, exc, match):
    q, neg = _data()
    args = {"query": q, "negatives": neg, "n_hard": 5, "n_mix": 2, "n_query_mix": 1}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        mix_hard_negatives(**args)
    with pytest.raises(ValueError, match="n_hard"):
        MoCHi(0, 1)
