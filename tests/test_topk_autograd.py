"""Autograd and torch integration of the top-k ops: float64 gradcheck, where gradients flow,
torch.library.opcheck on the registered ops, and torch.compile(fullgraph=True)."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

import hnsample
from hnsample import _reference as R


def _separated(rows: int, cols: int, seed: int) -> torch.Tensor:
    """float64 (rows, cols) with well separated entries, so an eps-perturbation never reorders them."""
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((rows, cols)))


def _similarity_inputs(seed: int = 0):
    q = _separated(4, 5, seed).requires_grad_()
    c = _separated(12, 5, seed + 1)
    c[7] = 0.0  # a zero vector (excluded, so its cosine never has to be differentiated)
    return q, c.requires_grad_()


EXCLUDE = torch.tensor([[7, 1], [7, -1], [7, 3], [7, 7]])


@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(skip_top=2, pool=5),
        dict(sampling="softmax", seed=3, pool=8),
        dict(positives=torch.tensor([[0], [2], [4], [6]]), relative_margin=-0.5),
    ],
    ids=["top", "window", "softmax", "margin"],
)
def test_gradcheck_similarity(metric, kw):
    q, c = _similarity_inputs()
    k = 3

    def f(q, c):
        return hnsample.topk_similarity(q, c, k, metric=metric, exclude=EXCLUDE, **kw).scores

    out = f(q, c)
    assert out.dtype == torch.float64 and torch.isfinite(out).all(), "pick k so that nothing is padded"
    assert torch.autograd.gradcheck(f, (q, c), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(exclude=torch.tensor([[0], [5], [9]]), skip_top=1),
        dict(sampling="uniform", seed=5, pool=6),
    ],
    ids=["top", "window", "uniform"],
)
def test_gradcheck_from_scores(kw):
    s = _separated(3, 10, 2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: hnsample.topk_from_scores(s, 4, **kw).scores, (s,), eps=1e-6, atol=1e-7
    )


def test_gradients_flow_only_through_selected_entries():
    s = _separated(3, 10, 3).requires_grad_()
    out = hnsample.topk_from_scores(s, 3, exclude=torch.tensor([[0], [1], [2]]))
    w = torch.arange(1.0, 10.0, dtype=torch.float64).reshape(3, 3)
    (out.scores * w).sum().backward()
    expected = torch.zeros_like(s)
    expected.scatter_(1, out.indices, w)
    assert torch.equal(s.grad, expected)

    q, c = _similarity_inputs(4)
    out = hnsample.topk_similarity(q, c, 2, exclude=EXCLUDE)
    (out.scores * torch.tensor([[1.0, -2.0]], dtype=torch.float64)).sum().backward()
    chosen = set(out.indices.reshape(-1).tolist())
    for j in range(c.shape[0]):
        assert bool(c.grad[j].abs().sum() > 0) == (j in chosen), j
    # dot: ds_ij/dq_i = c_j and ds_ij/dc_j = q_i
    want_q = c.detach()[out.indices[:, 0]] - 2 * c.detach()[out.indices[:, 1]]
    torch.testing.assert_close(q.grad, want_q, rtol=0, atol=1e-12)
    assert out.indices.grad_fn is None and not out.indices.requires_grad


def test_padded_entries_get_no_gradient():
    s = torch.tensor([[3.0, 1.0, 2.0], [math.nan, 0.5, math.nan]], dtype=torch.float64, requires_grad=True)
    out = hnsample.topk_from_scores(s, 4, exclude=torch.tensor([[1], [-1]]))
    assert out.indices.tolist() == [[0, 2, -1, -1], [1, -1, -1, -1]]
    out.scores.backward(torch.full_like(out.scores, 5.0))  # the -inf padding receives an upstream gradient
    assert s.grad.tolist() == [[5.0, 0.0, 5.0], [0.0, 5.0, 0.0]]

    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    c = torch.tensor([[1.0, 1.0], [2.0, 0.0]], requires_grad=True)
    out = hnsample.topk_similarity(q, c, 4, metric="cosine", exclude=torch.tensor([[1], [-1]]))
    out.scores.backward(torch.ones_like(out.scores))
    assert torch.isfinite(q.grad).all() and torch.isfinite(c.grad).all()
    assert (out.indices[:, 2:] == -1).all()


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_unselected_non_finite_rows_leave_gradients_finite(metric):
    """Padding used to gather candidate 0 and multiply it by a zero gradient: with "dot", a NaN query row
    (all padding) made candidate 0's gradient NaN, and a NaN candidate 0 that was never selected made
    the gradient of every query with padding NaN. Neither row is selected, so neither may reach a
    gradient."""
    q = torch.tensor([[math.nan, 0.25], [1.0, 0.0], [0.5, 0.5]], requires_grad=True)
    c = torch.tensor([[0.5, 0.0], [0.25, 0.5]], requires_grad=True)
    out = hnsample.topk_similarity(q, c, 3, metric=metric)
    assert out.indices.tolist() == [[-1, -1, -1], [0, 1, -1], [1, 0, -1]]
    out.scores.backward(torch.ones_like(out.scores))
    assert torch.isfinite(c.grad).all() and torch.isfinite(q.grad[1:]).all() and (q.grad[0] == 0).all()

    q = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    c = torch.tensor([[math.nan, 0.0], [0.5, 0.5]], requires_grad=True)
    out = hnsample.topk_similarity(q, c, 2, metric=metric)
    assert out.indices.tolist() == [[1, -1], [1, -1]]
    out.scores.backward(torch.ones_like(out.scores))
    assert torch.isfinite(q.grad).all()


@pytest.mark.parametrize("op", ["topk_similarity", "topk_from_scores", "topk_from_candidates"])
def test_no_candidates_gives_zero_gradients(op):
    """N = 0 with k > 0: all padding, zero gradients (the backward used to index the empty candidates)."""
    x = torch.ones(3, 2, requires_grad=True)
    if op == "topk_similarity":
        leaves = [x, torch.ones(0, 2, requires_grad=True)]
        out = hnsample.topk_similarity(*leaves, 2)
    elif op == "topk_from_scores":
        leaves = [torch.ones(3, 0, requires_grad=True)]
        out = hnsample.topk_from_scores(leaves[0], 2)
    else:
        leaves = [torch.ones(3, 0, requires_grad=True)]
        out = hnsample.topk_from_candidates(torch.zeros(3, 0, dtype=torch.int64), leaves[0], 2, num_candidates=0)
    assert (out.indices == -1).all()
    grads = torch.autograd.grad(out.scores.where(out.indices >= 0, 0).sum(), leaves)
    assert all(g.shape == t.shape and not g.any() for g, t in zip(grads, leaves, strict=True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_gradients_match_autograd_through_the_reference(dtype):
    """The op's analytic backward equals autograd through the plain-torch score formula."""
    rng = np.random.default_rng(8)
    q = torch.from_numpy(rng.standard_normal((5, 6))).to(dtype).requires_grad_()
    c = torch.from_numpy(rng.standard_normal((20, 6))).to(dtype)
    c[3] = 0
    c.requires_grad_()
    w = torch.from_numpy(rng.standard_normal((5, 4))).float()
    for metric in ("dot", "cosine"):
        out = hnsample.topk_similarity(q, c, 4, metric=metric)
        gq, gc = torch.autograd.grad((out.scores * w).sum(), (q, c))
        assert gq.dtype == dtype and gc.dtype == dtype
        qr, cr = q.detach().float().requires_grad_(), c.detach().float().requires_grad_()
        s = R.differentiable_similarity(qr, cr, metric)
        rq, rc = torch.autograd.grad((torch.gather(s, 1, out.indices) * w).sum(), (qr, cr))
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(gq.float(), rq, rtol=tol, atol=tol)
        torch.testing.assert_close(gc.float(), rc, rtol=tol, atol=tol)


def test_cosine_zero_vectors_get_zero_gradient():
    q = torch.tensor([[0.0, 0.0], [1.0, 2.0]], dtype=torch.float64, requires_grad=True)
    c = torch.tensor([[0.0, 0.0], [3.0, -1.0], [1.0, 1.0]], dtype=torch.float64, requires_grad=True)
    out = hnsample.topk_similarity(q, c, 3, metric="cosine")
    assert 0 in out.indices[1].tolist()  # the zero candidate is selected (score 0) for the second query
    out.scores.sum().backward()
    assert (q.grad[0] == 0).all() and (c.grad[0] == 0).all()
    assert torch.isfinite(q.grad).all() and torch.isfinite(c.grad).all()


# ----------------------------------------------------------------------------------------------------
# torch.library


def _op_args(requires_grad: bool):
    rng = np.random.default_rng(9)
    q = torch.from_numpy(rng.standard_normal((6, 8))).float().requires_grad_(requires_grad)
    c = torch.from_numpy(rng.standard_normal((50, 8))).float().requires_grad_(requires_grad)
    banned = torch.sort(torch.from_numpy(rng.integers(-1, 50, (6, 3))), dim=1).values
    ql, cl = torch.from_numpy(rng.integers(0, 4, 6)), torch.from_numpy(rng.integers(0, 4, 50))
    upper = torch.from_numpy(rng.uniform(0.5, 3.0, 6))
    return q, c, banned, ql, cl, upper


def _selection_kwargs(k, min_score, max_score, skip_top, pool, sampling, temperature, seed):
    return dict(k=k, min_score=min_score, max_score=max_score, skip_top=skip_top, pool=pool, sampling=sampling,
                temperature=temperature, seed=seed)


@pytest.mark.parametrize("sampling", ["top", "softmax"])
def test_opcheck_topk_similarity(sampling):
    q, c, banned, ql, cl, upper = _op_args(True)
    op = torch.ops.hnsample.topk_similarity.default
    kw = dict(_selection_kwargs(5, -2.0, 2.5, 1, -1, sampling, 0.5, 17), metric="dot", block_size=64)
    torch.library.opcheck(op, (q, c, banned, ql, cl, upper), kw)
    kw = dict(_selection_kwargs(3, -math.inf, math.inf, 0, 4, "top", 1.0, 0), metric="cosine", block_size=1 << 24)
    torch.library.opcheck(op, (q, c, None, None, None, None), kw)


@pytest.mark.parametrize("sampling", ["top", "uniform"])
def test_opcheck_topk_from_scores(sampling):
    q, c, banned, ql, cl, upper = _op_args(False)
    s = (q @ c.T).requires_grad_()
    op = torch.ops.hnsample.topk_from_scores.default
    torch.library.opcheck(op, (s, banned, ql, cl, upper),
                          _selection_kwargs(5, -math.inf, math.inf, 2, 10, sampling, 1.0, 3))
    torch.library.opcheck(op, (s.detach().T, None, None, None, None),
                          _selection_kwargs(0, 0.0, 1.0, 0, -1, "top", 1.0, 0))


def _training_step(q, c, pos):
    out = hnsample.topk_similarity(
        q, c, 4, positives=pos, absolute_margin=0.0, relative_margin=0.05, metric="cosine"
    )
    valid = out.indices >= 0
    return torch.where(valid, out.scores, torch.zeros_like(out.scores)).square().sum(), out.indices


def _compiled_matches_eager(backend: str) -> None:
    torch._dynamo.reset()
    rng = np.random.default_rng(10)
    q = torch.from_numpy(rng.standard_normal((6, 8))).float().requires_grad_()
    c = torch.from_numpy(rng.standard_normal((40, 8))).float().requires_grad_()
    pos = torch.from_numpy(rng.integers(0, 40, (6, 2)))
    compiled = torch.compile(_training_step, fullgraph=True, backend=backend)
    loss, idx = compiled(q, c, pos)
    loss.backward()
    gq, gc = q.grad.clone(), c.grad.clone()
    q.grad = c.grad = None
    want, want_idx = _training_step(q, c, pos)
    want.backward()
    assert torch.equal(idx, want_idx) and (idx >= 0).any()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(gq, q.grad)
    torch.testing.assert_close(gc, c.grad)
    assert gc.abs().sum() > 0


def test_torch_compile_fullgraph():
    # aot_eager runs Dynamo, fake tensors and AOTAutograd through the registered fake/autograd
    # implementations (everything the op itself must support) without the minute of C++ codegen
    _compiled_matches_eager("aot_eager")


@pytest.mark.skipif(
    os.environ.get("HNSAMPLE_SLOW_TESTS") != "1",
    reason="inductor codegen takes ~1 min here; set HNSAMPLE_SLOW_TESTS=1",
)
@pytest.mark.slow
def test_torch_compile_fullgraph_inductor():
    _compiled_matches_eager("inductor")
