"""topk_from_candidates: the selection over per-row candidate lists, against the reference
(hnsample._reference.select_from_candidates) over random inputs and every filter, against
topk_from_scores when the lists hold every id, literal cases, errors, the C++ parameter checks, the
engine's injected backend, opcheck, gradcheck and torch.compile."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import DEVICES, DTYPE_IDS, FLOAT_DTYPES
from hostile_inputs import misaligned

import hnsample
from hnsample import _C
from hnsample import _reference as R
from hnsample.engine import CpuBackend, CpuKernels, SelectionState, registry
from hnsample.ops.candidates import count_candidate_filters, listed_positions, offer_candidate_lists

B, N, C = 9, 40, 15


def _lists(seed: int, b: int = B, n: int = N, c: int = C, dtype=torch.float32, pad: float = 0.2,
           device: str = "cpu"):
    """(ids (b, c) distinct per row with ~pad of them -1, scores (b, c)) on a small grid of values so
    that ties occur; positives (b, 2) drawn from each row's listed ids (sometimes padding)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(n, generator=g)[:c] for _ in range(b)])
    ids[torch.rand(b, c, generator=g) < pad] = -1
    scores = (torch.randint(-8, 9, (b, c), generator=g).to(torch.float64) / 8).to(dtype)
    pos = torch.full((b, 2), -1, dtype=torch.int64)
    for i in range(b):
        listed = ids[i][ids[i] >= 0]
        take = int(torch.randint(0, 3, (1,), generator=g))
        pos[i, :min(take, listed.numel())] = listed[:take]
    return ids.to(device), scores.to(device), pos.to(device)


CASES = {
    "plain": {},
    "positives": dict(use_positives=True),
    "exclude": dict(exclude=True),
    "labels": dict(labels=True),
    "absolute_margin": dict(use_positives=True, absolute_margin=0.25),
    "relative_margin": dict(use_positives=True, relative_margin=0.1),
    "positive_scores": dict(use_positives=True, positive_scores=True, absolute_margin=0.0),
    "score_bounds": dict(min_score=-0.5, max_score=0.625),
    "skip_pool": dict(use_positives=True, skip_top=2, pool=4),
    "uniform": dict(sampling="uniform", seed=7, pool=6, skip_top=1),
    "uniform_unbounded": dict(sampling="uniform", seed=8, skip_top=2),
    "softmax": dict(sampling="softmax", temperature=0.3, seed=9, use_positives=True, relative_margin=0.05),
    "everything": dict(use_positives=True, exclude=True, labels=True, absolute_margin=0.125, relative_margin=0.05,
                       min_score=-0.75, max_score=0.875, skip_top=1, pool=5, sampling="softmax", temperature=0.5,
                       seed=11),
}


def _arguments(case: dict, ids, scores, pos, seed: int):
    g = torch.Generator().manual_seed(seed + 100)
    kw = {key: v for key, v in case.items() if key not in ("use_positives", "exclude", "labels", "positive_scores")}
    if case.get("use_positives"):
        kw["positives"] = pos
    if case.get("exclude"):
        kw["exclude"] = torch.randint(-1, N, (B, 3), generator=g).to(ids.device)
    if case.get("labels"):
        kw["query_labels"] = torch.randint(0, 3, (B,), generator=g).to(ids.device)
        kw["candidate_labels"] = torch.randint(0, 3, (N,), generator=g).to(ids.device)
    if case.get("positive_scores"):
        kw["positive_scores"] = (torch.randint(-8, 9, (B,), generator=g).to(torch.float64) / 8).to(ids.device)
    return kw


def _reference(ids, scores, k, kw):
    ref_kw = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
    if ref_kw.get("sampling", "top") != "top":
        ref_kw["seed"] = kw["seed"]
    return R.select_from_candidates(ids.cpu(), scores.cpu(), k, **ref_kw)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=DTYPE_IDS.get)
@pytest.mark.parametrize("k", [1, 4, 20])
@pytest.mark.parametrize("name", list(CASES))
def test_matches_reference(name, k, dtype, device):
    for seed in range(3):
        ids, scores, pos = _lists(seed, dtype=dtype, device=device)
        kw = _arguments(CASES[name], ids, scores, pos, seed)
        got = hnsample.topk_from_candidates(ids, scores, k, num_candidates=N, **kw)
        want_s, want_j = _reference(ids, scores, k, kw)
        assert torch.equal(got.indices.cpu(), want_j), (name, seed)
        assert torch.equal(got.scores.cpu().to(torch.float64), want_s), (name, seed)
        assert got.scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)


@pytest.mark.parametrize("sampling", ["top", "uniform", "softmax"])
def test_lists_of_every_id_select_what_the_score_matrix_selects(sampling):
    """Ids replace column positions everywhere, the sampling noise included: a permuted list of all N
    ids is the (B, N) matrix."""
    g = torch.Generator().manual_seed(5)
    matrix = torch.randn(B, N, generator=g)
    pos = torch.randint(0, N, (B, 2), generator=g)
    perm = torch.stack([torch.randperm(N, generator=g) for _ in range(B)])
    kw = dict(positives=pos, relative_margin=0.05, skip_top=1, pool=12, sampling=sampling, temperature=0.2, seed=3)
    want = hnsample.topk_from_scores(matrix, 5, **kw)
    got = hnsample.topk_from_candidates(perm, matrix.gather(1, perm), 5, **kw)
    assert torch.equal(got.indices, want.indices)
    assert torch.equal(got.scores, want.scores)


# Literal cases: (ids, scores, k, arguments, expected ids). One row each, read as data.
TABLE = [
    ([5, 2, 9], [0.1, 0.9, 0.5], 2, {}, [2, 9]),
    ([5, 2, 9], [0.1, 0.9, 0.5], 5, {}, [2, 9, 5, -1, -1]),
    ([5, -1, 9], [0.1, 99.0, 0.5], 3, {}, [9, 5, -1]),                        # padding's score is never read
    ([5, 2, 9], [0.5, 0.5, 0.5], 2, {}, [2, 5]),                              # ties: lower id first
    ([5, 2, 9], [0.1, 0.9, 0.5], 2, {"positives": [[2]]}, [9, 5]),
    ([5, 2, 9], [0.1, 0.9, 0.5], 2, {"exclude": [[9, -1]]}, [2, 5]),
    # dyadic scores and margins: the float64 comparisons are exact
    ([5, 2, 9, 7], [0.125, 0.875, 0.5, 0.4375], 3, {"positives": [[2]], "absolute_margin": 0.375}, [9, 7, 5]),
    ([5, 2, 9, 7], [0.125, 0.875, 0.5, 0.4375], 3, {"positives": [[2]], "absolute_margin": 0.390625}, [7, 5, -1]),
    ([5, 2, 9, 7], [0.125, 0.75, 0.5, 0.6875], 3, {"positives": [[2]], "relative_margin": 0.125}, [9, 5, -1]),
    ([5, 2, 9, 7], [0.1, 0.9, 0.5, 0.45], 3, {"positive_scores": [0.5], "absolute_margin": 0.0}, [9, 7, 5]),
    ([5, 2, 9, 7], [0.1, 0.9, float("nan"), 0.45], 4, {}, [2, 7, 5, -1]),    # NaN is never eligible
    ([5, 2, 9, 7], [0.1, 0.9, 0.5, 0.45], 2, {"min_score": 0.2, "max_score": 0.8}, [9, 7]),
    ([5, 2, 9, 7], [0.1, 0.9, 0.5, 0.45], 2, {"skip_top": 1}, [9, 7]),
    ([5, 2, 9, 7], [0.1, 0.9, 0.5, 0.45], 3, {"skip_top": 1, "pool": 2}, [9, 7, -1]),
    ([5, 2, 9, 7], [0.1, 0.9, 0.5, 0.45], 3,
     {"query_labels": [1], "candidate_labels": [0, 0, 1, 0, 0, 0, 0, 1, 0, 0]}, [9, 5, -1]),
    ([], [], 2, {}, [-1, -1]),
]


@pytest.mark.parametrize("ids,scores,k,kw,want", TABLE)
def test_literal_cases(ids, scores, k, kw, want):
    args = {key: (torch.tensor(v) if isinstance(v, list) else v) for key, v in kw.items()}
    t_ids = torch.tensor([ids], dtype=torch.int64).reshape(1, -1)
    t_scores = torch.tensor([scores], dtype=torch.float32).reshape(1, -1)
    got = hnsample.topk_from_candidates(t_ids, t_scores, k, num_candidates=10, **args)
    assert got.indices[0].tolist() == want


def test_non_contiguous_inputs_and_int32_ids():
    ids, scores, pos = _lists(1)
    wide_s = torch.zeros(C, 2 * B)
    wide_s[:, ::2] = scores.T
    wide_i = torch.full((C, 3 * B), -7, dtype=torch.int32)
    wide_i[:, ::3] = ids.T.to(torch.int32)
    got = hnsample.topk_from_candidates(wide_i[:, ::3].T, wide_s[:, ::2].T, 4, num_candidates=N, positives=pos,
                                        absolute_margin=0.1)
    want = hnsample.topk_from_candidates(ids, scores, 4, num_candidates=N, positives=pos, absolute_margin=0.1)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores)


def test_numpy_in_numpy_out_and_default_num_candidates():
    ids, scores, _ = _lists(2)
    got = hnsample.topk_from_candidates(ids.numpy(), scores.numpy(), 3)
    assert isinstance(got.indices, np.ndarray) and isinstance(got.scores, np.ndarray)
    want = hnsample.topk_from_candidates(ids, scores, 3, num_candidates=N)
    assert np.array_equal(got.indices, want.indices.numpy())


@pytest.mark.parametrize("b,c,k", [(0, 5, 3), (4, 0, 3), (4, 5, 0), (0, 0, 0)])
def test_degenerate_sizes(b, c, k):
    got = hnsample.topk_from_candidates(torch.full((b, c), -1), torch.zeros(b, c), k, num_candidates=1)
    assert got.indices.shape == (b, k) and (got.indices == -1).all() and (got.scores == -math.inf).all()


def test_infinite_scores_are_eligible_and_nan_is_not():
    ids = torch.tensor([[0, 1, 2, 3]])
    scores = torch.tensor([[math.inf, -math.inf, math.nan, 0.0]])
    got = hnsample.topk_from_candidates(ids, scores, 4)
    assert got.indices[0].tolist() == [0, 3, 1, -1]


@pytest.mark.parametrize("kw,error,match", [
    (dict(candidate_ids=torch.zeros(2, 3)), TypeError, "candidate_ids must be an integer"),
    (dict(candidate_ids=torch.zeros(2, 4, dtype=torch.int64)), ValueError, r"shape of scores \(2, 3\)"),
    (dict(candidate_ids=torch.tensor([[0, 1, 0], [0, 1, 2]])), ValueError, r"twice in a row: rows \[0\]"),
    (dict(candidate_ids=torch.tensor([[0, 1, 5], [0, 1, 2]]), num_candidates=5), ValueError, r"in \[0, 5\)"),
    (dict(candidate_ids=torch.tensor([[0, 1, -2], [0, 1, 2]])), ValueError, "or -1 for padding"),
    (dict(scores=torch.zeros(2, 3, dtype=torch.int64)), TypeError, "scores must be float32"),
    (dict(relative_margin=0.1), ValueError, "relative_margin needs a positive score"),
    (dict(absolute_margin=0.1, positives=torch.zeros(2, 0, dtype=torch.int64)), ValueError,
     "absolute_margin needs a positive score"),
    (dict(absolute_margin=0.1, positives=torch.tensor([[1], [4]]), num_candidates=5), ValueError,
     r"positives are not in candidate_ids \(rows \[1\]"),
    (dict(positives=torch.tensor([[1], [9]]), num_candidates=5), ValueError, "positives must hold candidate ids"),
    (dict(num_candidates=-1), ValueError, "num_candidates must be >= 0"),
    (dict(sampling="gumbel"), ValueError, "sampling must be one of"),
    (dict(temperature=0.0, sampling="softmax"), ValueError, "temperature"),
])
def test_bad_inputs(kw, error, match):
    args = dict(candidate_ids=torch.tensor([[0, 1, 2], [0, 1, 2]]), scores=torch.zeros(2, 3))
    args.update(kw)
    with pytest.raises(error, match=match):
        hnsample.topk_from_candidates(args.pop("candidate_ids"), args.pop("scores"), 2, **args)


def test_launcher_checks_its_parameters():
    """The C++ launcher refuses a candidate block that would read outside its buffers (ValueError), never
    touches memory for it."""
    sel = hnsample.engine.build_selection(2, 5, torch.device("cpu"), 2)
    state = SelectionState(sel, 2, torch.device("cpu"))
    ids, scores = torch.zeros(2, 3, dtype=torch.int64), torch.zeros(2, 3)
    base = dict(params=state.params, scores=scores.data_ptr(), dtype=0, rows=2, cols=3, score_row_stride=3,
                score_col_stride=1, ids=ids.data_ptr(), id_row_stride=3, id_col_stride=1, row_offset=0, num_ids=5,
                cuda=False, stream=0, threads=1)
    for bad, match in ((dict(ids=0), "scores or ids are null"), (dict(row_offset=1), r"rows \[1, 3\) are outside"),
                       (dict(dtype=4), "is not a float"), (dict(num_ids=-1), "num_ids must be >= 0"),
                       (dict(rows=-1), "extents")):
        with pytest.raises(ValueError, match=match):
            _C.topk_candidates_select(**{**base, **bad})
    broken = state.params.copy()
    broken.capacity = 1
    with pytest.raises(ValueError, match="do not match the layout"):
        _C.topk_candidates_select(**{**base, "params": broken})


@pytest.mark.parametrize("offset", [1, 4, 7])
def test_misaligned_candidate_ids_are_read_in_place(offset):
    """int64 ids at an address that is not 8-byte aligned (a numpy view of bytes, torch.frombuffer with
    an offset) select what aligned ids select: the CPU kernel reads them with alignment-safe loads, as it
    does scores and labels. (It used to refuse them: "candidate ids must be an int64 buffer".)"""
    ids, scores, positives = _lists(3)
    labels = torch.arange(N) % 3
    kw = dict(positives=positives, query_labels=torch.arange(B) % 3, candidate_labels=labels, absolute_margin=0.0)
    want = hnsample.topk_from_candidates(ids, scores, 6, **kw)
    odd = misaligned(ids, offset)
    assert odd.data_ptr() % 8 != 0
    got = hnsample.topk_from_candidates(odd, scores, 6, **kw)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores)
    strided = misaligned(torch.stack([ids, ids], dim=2).reshape(B, 2 * C), offset)[:, ::2]
    got = hnsample.topk_from_candidates(strided, scores, 6, **kw)
    assert torch.equal(got.indices, want.indices) and torch.equal(got.scores, want.scores)


def test_ids_outside_the_id_space_are_padding_in_the_kernel():
    """Python refuses them; the kernel itself never reads candidate_labels past N for one."""
    sel = hnsample.engine.build_selection(1, 3, torch.device("cpu"), 3, query_labels=torch.tensor([0]),
                                          candidate_labels=torch.tensor([1, 1, 1]))
    state = SelectionState(sel, 1, torch.device("cpu"))
    offer_candidate_lists(state, torch.tensor([[2, 7, -5]]), torch.tensor([[0.5, 0.9, 0.7]]), 0, 3)
    s, j = state.finalize()
    assert j[0].tolist() == [2, -1, -1]


class _Recording(CpuKernels):
    """The CPU kernels, counting the candidate-list launches that go through the backend's module."""

    def __init__(self):
        self.calls = []
        outer = self

        class Module:
            def __getattr__(self, name):
                fn = getattr(_C, name)

                def call(*a, **kw):
                    outer.calls.append(name)
                    return fn(*a, **kw)
                return call
        super().__init__(Module())


def test_the_op_runs_on_the_injected_backend():
    ids, scores, pos = _lists(3)
    kernels = _Recording()
    with registry.use("cpu", CpuBackend(kernels)):
        got = hnsample.topk_from_candidates(ids, scores, 3, num_candidates=N, positives=pos)
    assert "topk_candidates_select" in kernels.calls and "topk_finalize" in kernels.calls
    want = hnsample.topk_from_candidates(ids, scores, 3, num_candidates=N, positives=pos)
    assert torch.equal(got.indices, want.indices)


def test_filter_counts_by_the_kernels_rule():
    ids, scores, pos = _lists(4)
    scores[0, 0] = math.nan
    kw = dict(positives=pos, absolute_margin=0.125, min_score=-0.5, max_score=0.75)
    sel = hnsample.engine.build_selection(
        B, N, torch.device("cpu"), 3, positive_values=lambda p: scores.gather(1, listed_positions(ids, p)[0]), **kw)
    state = SelectionState(sel, B, torch.device("cpu"))
    counts = torch.zeros(B, _C.CANDIDATE_FILTERS, dtype=torch.int64)
    count_candidate_filters(state, ids, scores, 0, N, counts)
    p = torch.tensor([min((float(scores[i][ids[i] == j]) for j in pos[i] if j >= 0), default=math.inf)
                      for i in range(B)], dtype=torch.float64)
    for i in range(B):
        want = [0] * 6
        for j, s in zip(ids[i].tolist(), scores[i].double().tolist(), strict=True):
            if j < 0:
                continue
            if j in pos[i].tolist():
                want[0] += 1
            elif math.isnan(s):
                want[2] += 1
            elif s < -0.5:
                want[3] += 1
            elif s > 0.75:
                want[4] += 1
            elif s > p[i] - 0.125:
                want[5] += 1
        assert counts[i].tolist() == want, i


def test_gradcheck_float64():
    ids, scores, pos = _lists(6, dtype=torch.float64)
    scores = scores + 1e-3 * torch.arange(B * C, dtype=torch.float64).reshape(B, C)  # no ties under eps
    scores.requires_grad_(True)

    def f(s):
        return hnsample.topk_from_candidates(ids, s, 4, num_candidates=N, positives=pos, skip_top=1).scores.clamp_min(-9)

    assert torch.autograd.gradcheck(f, (scores,), eps=1e-6, atol=1e-7)


def test_gradient_reaches_the_selected_entries_only():
    ids = torch.tensor([[4, 1, 7, -1]])
    scores = torch.tensor([[0.2, 0.9, 0.5, 3.0]], requires_grad=True)
    out = hnsample.topk_from_candidates(ids, scores, 3)
    out.scores[:, :2].sum().backward()
    assert scores.grad.tolist() == [[0.0, 1.0, 1.0, 0.0]]


@pytest.mark.parametrize("sampling", ["top", "softmax"])
def test_opcheck(sampling):
    ids, scores, pos = _lists(7)
    banned = torch.sort(pos, dim=1).values
    kw = dict(k=4, min_score=-math.inf, max_score=math.inf, skip_top=1, pool=-1, sampling=sampling,
              temperature=0.5, seed=3, num_ids=N)
    torch.library.opcheck(torch.ops.hnsample.topk_from_candidates,
                          (ids, scores.requires_grad_(True), banned, None, None, None), kw)


def test_torch_compile():
    ids, scores, pos = _lists(8)

    def f(s):
        r = hnsample.topk_from_candidates(ids, s, 3, num_candidates=N, positives=pos, sampling="softmax",
                                          temperature=0.5, seed=1)
        return r.scores.clamp_min(-5).sum(), r.indices

    compiled = torch.compile(f, backend="aot_eager")
    got_loss, got_idx = compiled(scores)
    want_loss, want_idx = f(scores)
    assert torch.equal(got_idx, want_idx) and torch.equal(got_loss, want_loss)
