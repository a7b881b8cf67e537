"""The code-search example's building blocks: data extraction, the loss (InfoNCE and HCL written out),
mining with hnsample and the retrieval metrics."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import hnsample

_PATH = Path(__file__).resolve().parents[1] / "examples" / "train_code_search.py"


@pytest.fixture(scope="module")
def ex():
    spec = importlib.util.spec_from_file_location("train_code_search", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_first_sentence(ex):
    assert ex.first_sentence("Return the sum.  More text.\n\nDetails.") == "Return the sum."
    assert ex.first_sentence("  Split the\n  path name here?  Then more") == "Split the path name here?"


def test_source_without_docstring(ex):
    src = '    def f(a):\n        """Doc.\n\n        More."""\n        return a + 1\n'
    assert ex.source_without_docstring(src) == "def f(a):\n    return a + 1"
    assert ex.source_without_docstring('def g():\n    """Only a docstring."""\n') is None
    assert ex.source_without_docstring("def h():\n    return 1\n") is None  # nothing to use as a query


def test_collect_and_split(ex):
    pairs = ex.collect_pairs(max_modules=6)
    assert len(pairs) > 20
    assert all(p.query and "\"\"\"" not in p.document[:20] for p in pairs)
    assert len({p.document for p in pairs}) == len(pairs)
    train, test = ex.split_by_module(pairs, 0.5, 0)
    assert len(train) + len(test) == len(pairs)
    assert not {p.module for p in train} & {p.module for p in test}


def test_word_pieces_split_identifiers(ex):
    pieces = ex.word_pieces("getAttr my_name2")
    assert {"get", "attr", "my", "name", "2", "<ge"} <= set(pieces)


def _hcl_literal(s: torch.Tensor, t: float, beta: float, tau_plus: float) -> torch.Tensor:
    losses = []
    for i in range(s.shape[0]):
        neg = [j for j in range(s.shape[1]) if j != i]
        n = len(neg)
        e = [math.exp(s[i, j].item() / t) for j in neg]
        imp = [math.exp(beta * s[i, j].item() / t) for j in neg]
        w = [x / (sum(imp) / n) for x in imp]
        pos = math.exp(s[i, i].item() / t)
        ng = max((-tau_plus * n * pos + sum(a * b for a, b in zip(w, e, strict=True))) / (1 - tau_plus),
                 n * math.exp(-1 / t))
        losses.append(-math.log(pos / (pos + ng)))
    return torch.tensor(sum(losses) / len(losses))


def test_loss_is_infonce_and_hcl(ex):
    g = torch.Generator().manual_seed(0)
    q = F.normalize(torch.randn(5, 8, generator=g, dtype=torch.float64), dim=1)
    d = F.normalize(torch.randn(9, 8, generator=g, dtype=torch.float64), dim=1)
    ids = torch.arange(9)
    t = 0.2
    plain = ex.contrastive_loss(q, d, ids, t)
    torch.testing.assert_close(plain, F.cross_entropy(q @ d.T / t, torch.arange(5)))
    hcl = ex.contrastive_loss(q, d, ids, t, hcl_beta=0.5, tau_plus=0.1)
    torch.testing.assert_close(hcl, _hcl_literal(q @ d.T, t, 0.5, 0.1).to(hcl.dtype))
    # The HCL branch with no re-weighting and no debiasing is InfoNCE.
    torch.testing.assert_close(ex.contrastive_loss(q, d, ids, t, hcl_beta=1e-12, tau_plus=1e-12), plain)


def test_loss_masks_a_second_copy_of_the_positive(ex):
    g = torch.Generator().manual_seed(1)
    q = F.normalize(torch.randn(2, 4, generator=g), dim=1)
    d = F.normalize(torch.randn(5, 4, generator=g), dim=1)
    ids = torch.arange(5)
    # Query 1's document again at the end (as if mined for query 0): masked for query 1 only.
    dup_d, dup_ids = torch.cat([d, d[1:2]]), torch.cat([ids, ids[1:2]])
    for kw in ({}, {"hcl_beta": 0.5, "tau_plus": 0.05}):
        with_dup = [ex.contrastive_loss(q[i:i + 1], dup_d[[i] + [j for j in range(6) if j != i]],
                                        dup_ids[[i] + [j for j in range(6) if j != i]], 0.1, **kw)
                    for i in range(2)]
        expect0 = ex.contrastive_loss(q[:1], dup_d, dup_ids, 0.1, **kw)  # the copy is a real negative
        expect1 = ex.contrastive_loss(q[1:], d[[1, 0, 2, 3, 4]], ids[[1, 0, 2, 3, 4]], 0.1, **kw)
        torch.testing.assert_close(with_dup[0], expect0)
        torch.testing.assert_close(with_dup[1], expect1)
        torch.testing.assert_close(ex.contrastive_loss(q, dup_d, dup_ids, 0.1, **kw), (expect0 + expect1) / 2)


def test_mine_and_evaluate(ex):
    g = torch.Generator().manual_seed(2)
    docs = F.normalize(torch.randn(30, 6, generator=g), dim=1)

    def tower(ids):
        return docs[ids]

    mined = ex.mine(tower, tower, 30, 3, None)
    assert mined.shape == (30, 3)
    assert not bool((mined == torch.arange(30).unsqueeze(1)).any())
    # p_i = 1 (a query is its own document), so relative_margin 2 bans every score above -1: nothing.
    assert bool((ex.mine(tower, tower, 30, 3, 2.0) == -1).all())
    metrics = ex.evaluate(tower, tower, 30)
    assert metrics == {"MRR@10": pytest.approx(1.0), "Recall@10": pytest.approx(1.0)}


@pytest.mark.skipif(not hasattr(hnsample, "info_nce"), reason="this build has no hnsample.info_nce")
@pytest.mark.parametrize("beta, tau_plus", [(0.0, 0.0), (0.5, 0.0), (0.5, 0.02)])
def test_training_loss_is_hnsample_info_nce(ex, beta, tau_plus):
    g = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(6, 8, generator=g, dtype=torch.float64), dim=1)
    d = F.normalize(torch.randn(10, 8, generator=g, dtype=torch.float64), dim=1)
    ids = torch.tensor([0, 1, 2, 3, 4, 5, 7, 2, 9, 0])  # two mined copies of batch positives
    torch.testing.assert_close(ex.batch_loss(q, d, ids, 0.1, beta, tau_plus),
                               ex.contrastive_loss(q, d, ids, 0.1, beta, tau_plus))
