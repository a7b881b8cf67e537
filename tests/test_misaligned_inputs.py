"""Inputs at addresses that are not aligned for their dtype (numpy views of byte buffers,
torch.frombuffer with an offset) reach the CPU kernels without a copy. The kernels read them with
alignment-safe loads: the results equal those of aligned copies exactly, and the sanitizer build
(.ci/run) reports no misaligned load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import DTYPE_IDS, FLOAT_DTYPES
from hostile_inputs import misaligned

import hnsample


def offsets(dtype: torch.dtype) -> list[int]:
    size = torch.empty((), dtype=dtype).element_size()
    return sorted({off for off in (1, size // 2 + 1, size - 1) if off % size})


CASES = [(dt, off) for dt in FLOAT_DTYPES for off in offsets(dt)]
CASE_IDS = [f"{DTYPE_IDS[dt]}-offset{off}" for dt, off in CASES]

B, N = 37, 203  # 203 columns: six 32-wide SIMD steps and an 11-element tail per row


def _scores(dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Small integers: many ties, so the tie order (lower id first) is exercised too.
    return torch.randint(-6, 7, (B, N), generator=g).to(dtype) / 4


def _labels(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (B,), generator=g), torch.randint(0, 5, (N,), generator=g)


SELECTIONS = {
    "top": dict(),
    "margin-labels": dict(absolute_margin=0.25, positives="pos", labels=True),
    "skip-min": dict(skip_top=3, min_score=-1.0),
    "softmax": dict(sampling="softmax", seed=7, temperature=0.5),
    "uniform-pool": dict(sampling="uniform", seed=3, pool=40, labels=True),
}


def _select(scores, k, spec: dict, offset: int | None):
    kw = {key: v for key, v in spec.items() if key not in ("positives", "labels")}
    place = (lambda t: misaligned(t, offset)) if offset else (lambda t: t)
    if spec.get("positives"):
        kw["positives"] = place(torch.arange(B).remainder(N).unsqueeze(1) * 5 % N)
    if spec.get("labels"):
        ql, cl = _labels(11)
        kw["query_labels"], kw["candidate_labels"] = place(ql), place(cl)
    return hnsample.topk_from_scores(scores, k, **kw)


def _assert_same(got, want):
    assert torch.equal(torch.as_tensor(got.indices), want.indices)
    assert torch.equal(torch.as_tensor(got.scores), want.scores)


@pytest.mark.parametrize("name", list(SELECTIONS))
@pytest.mark.parametrize("dtype,offset", CASES, ids=CASE_IDS)
def test_topk_from_scores_misaligned_equals_aligned(dtype, offset, name):
    spec = SELECTIONS[name]
    scores = _scores(dtype)
    want = _select(scores, 9, spec, None)
    assert (want.indices >= 0).any()
    moved = misaligned(scores, offset)
    assert moved.data_ptr() % moved.element_size() != 0
    _assert_same(_select(moved, 9, spec, offset), want)


@pytest.mark.parametrize("dtype,offset", CASES, ids=CASE_IDS)
def test_topk_from_scores_misaligned_strided_equals_aligned(dtype, offset):
    """Column stride != 1 (a transposed buffer) takes the portable scan."""
    scores = _scores(dtype, seed=1)
    buffer = misaligned(scores.T.contiguous(), offset)
    view = buffer.T
    assert view.stride() == (1, B) and torch.equal(view, scores)
    _assert_same(hnsample.topk_from_scores(view, 6, skip_top=1), hnsample.topk_from_scores(scores, 6, skip_top=1))


@pytest.mark.parametrize("offset", [1, 2, 3])
def test_topk_from_scores_frombuffer_and_numpy(offset):
    """The two ways users meet such buffers: torch.frombuffer(..., offset) and a numpy view of bytes."""
    scores = _scores(torch.float32, seed=2)
    raw = bytearray(offset) + bytearray(scores.numpy().tobytes())
    via_torch = torch.frombuffer(raw, dtype=torch.float32, offset=offset).view(B, N)
    via_numpy = np.frombuffer(bytearray(raw), dtype=np.float32, offset=offset).reshape(B, N)
    assert not via_numpy.flags.aligned
    want = hnsample.topk_from_scores(scores, 8)
    _assert_same(hnsample.topk_from_scores(via_torch, 8), want)
    _assert_same(hnsample.topk_from_scores(via_numpy, 8), want)


@pytest.mark.parametrize("dtype,offset", CASES, ids=CASE_IDS)
def test_topk_from_candidates_misaligned_equals_aligned(dtype, offset):
    """Listed scores and ids at any byte address, read in place: the kernel used to read the scores
    through a typed pointer (undefined behaviour, reported by UBSan) and refuse unaligned ids."""
    scores = _scores(dtype, seed=7)
    g = torch.Generator().manual_seed(8)
    ids = torch.stack([torch.randperm(2 * N, generator=g)[:N] for _ in range(B)])
    ids[torch.rand(B, N, generator=g) < 0.2] = -1
    ql, cl = torch.randint(0, 5, (B,), generator=g), torch.randint(0, 5, (2 * N,), generator=g)
    for kw in (dict(), dict(query_labels=ql, candidate_labels=cl, skip_top=2, sampling="softmax", seed=3)):
        want = hnsample.topk_from_candidates(ids, scores, 9, num_candidates=2 * N, **kw)
        assert (want.indices >= 0).any()
        got = hnsample.topk_from_candidates(misaligned(ids, offset), misaligned(scores, offset), 9,
                                            num_candidates=2 * N, **kw)
        _assert_same(got, want)
        strided = misaligned(scores.T.contiguous(), offset).T  # column stride != 1
        _assert_same(hnsample.topk_from_candidates(ids, strided, 9, num_candidates=2 * N, **kw), want)


@pytest.mark.parametrize("dtype,offset", CASES, ids=CASE_IDS)
def test_topk_similarity_misaligned_equals_aligned(dtype, offset):
    g = torch.Generator().manual_seed(4)
    q = torch.randint(-3, 4, (B, 16), generator=g).to(dtype)
    c = torch.randint(-3, 4, (N, 16), generator=g).to(dtype)
    ql, cl = _labels(5)
    pos = torch.randint(0, N, (B, 2), generator=g)
    kw = dict(relative_margin=0.1, block_size=1000)
    want = hnsample.topk_similarity(q, c, 7, positives=pos, query_labels=ql, candidate_labels=cl, **kw)
    got = hnsample.topk_similarity(
        misaligned(q, offset), misaligned(c, offset), 7, positives=misaligned(pos, offset),
        query_labels=misaligned(ql, offset), candidate_labels=misaligned(cl, offset), **kw,
    )
    _assert_same(got, want)


@pytest.mark.parametrize("symmetric", [False, True], ids=["rows", "symmetric"])
@pytest.mark.parametrize("dtype,offset", CASES, ids=CASE_IDS)
def test_info_nce_misaligned_equals_aligned(dtype, offset, symmetric):
    """Forward and backward, with misaligned embeddings, positive ids, doc ids and labels."""
    g = torch.Generator().manual_seed(6)
    b, m, d = 24, 70, 8
    q = torch.randint(-3, 4, (b, d), generator=g).to(dtype) / 4
    docs = torch.randint(-3, 4, (m, d), generator=g).to(dtype) / 4
    pos = torch.stack([torch.arange(b), (torch.arange(b) * 7 + 3) % m], dim=1)
    doc_ids = torch.randint(0, 50, (m,), generator=g)
    ql, dl = torch.randint(0, 4, (b,), generator=g), torch.randint(0, 4, (m,), generator=g)

    def run(q, docs, pos, doc_ids, ql, dl):
        q = q.detach().requires_grad_(True)
        docs = docs.detach().requires_grad_(True)
        loss = hnsample.info_nce(
            q, docs, positive_ids=pos, doc_ids=doc_ids, query_labels=ql, doc_labels=dl, temperature=0.1,
            symmetric=symmetric, false_negative_margin=0.5, hcl_beta=0.5, block_size=256,
        )
        loss.backward()
        return loss.detach(), q.grad, docs.grad

    want = run(q, docs, pos, doc_ids, ql, dl)
    got = run(*(misaligned(t, offset) for t in (q, docs, pos, doc_ids, ql, dl)))
    assert torch.isfinite(want[0])
    for a, w in zip(got, want, strict=True):
        assert torch.equal(a, w)
