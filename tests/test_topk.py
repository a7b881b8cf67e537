"""topk_similarity / topk_from_scores against the executable spec in hnsample._reference.

Exact comparisons (indices and scores bit for bit) are made wherever the data makes them meaningful:
topk_from_scores does no arithmetic on the scores, and integer-valued embeddings give integer dot
products that every summation order computes exactly. Random real-valued embeddings are checked for
being *a* correct answer within a dtype-keyed tolerance, because the op's blocked torch.matmul rounds
differently from the reference's full matrix product.
"""

from __future__ import annotations

import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hnsample
from hnsample import _reference as R
from hnsample.engine import SelectionState, run_selection

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "f64", "bf16", "f16"]
# Absolute score tolerance for real-valued unit-scale data with d <= 64: the op and the reference both
# accumulate in float32 (float64 for float64 inputs) and differ only in summation order.
SCORE_TOL = {torch.float32: 2e-5, torch.float64: 1e-12, torch.bfloat16: 2e-5, torch.float16: 2e-5}
FILTER_KEYS = (
    "positives",
    "exclude",
    "query_labels",
    "candidate_labels",
    "positive_scores",
    "absolute_margin",
    "relative_margin",
    "min_score",
    "max_score",
    "skip_top",
    "pool",
    "sampling",
    "temperature",
    "seed",
)


def assert_same_topk(got: hnsample.TopK, ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Bit-exact equality of a TopK with the reference's (float64 scores, indices)."""
    ref_s, ref_j = ref
    got_s = torch.as_tensor(got.scores).to(torch.float64)
    got_j = torch.as_tensor(got.indices)
    assert got_j.dtype == torch.int64
    assert got_j.shape == ref_j.shape, (got_j.shape, ref_j.shape)
    assert torch.equal(got_j, ref_j), f"indices differ:\n{got_j}\nvs reference\n{ref_j}"
    assert torch.equal(got_s, ref_s), f"scores differ:\n{got_s}\nvs reference\n{ref_s}"


def int_matrix(
    rng: np.random.Generator,
    rows: int,
    cols: int,
    lo: int = -2,
    hi: int = 2,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Integer-valued matrix: every dot product is an exact small integer in any dtype and order."""
    return torch.from_numpy(rng.integers(lo, hi + 1, size=(rows, cols)).astype(np.float64)).to(dtype)


def ids_matrix(rng: np.random.Generator, rows: int, cols: int, n: int, pad: float = 0.3) -> torch.Tensor:
    """(rows, cols) candidate ids with duplicates and -1 padding (every id -1 when n == 0)."""
    ids = rng.integers(0, max(n, 1), size=(rows, cols))
    ids[(rng.random((rows, cols)) < pad) | (n == 0)] = -1
    return torch.from_numpy(ids).to(torch.int64)


# ----------------------------------------------------------------------------------------------------
# Randomized filter combinations (hypothesis draws the structure, numpy fills the values)


SPECIALS = np.array([math.nan, math.inf, -math.inf])


@st.composite
def selection_cases(draw, max_rows: int = 6, max_cols: int = 24, min_cols: int = 0):
    """(rng, B, N, k, filters) with every filter independently present or absent."""
    b = draw(st.integers(0, max_rows))
    n = draw(st.integers(min_cols, max_cols))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    kw: dict = {}
    if draw(st.booleans()):
        kw["positives"] = ids_matrix(rng, b, draw(st.integers(0, 3)), n)
    if draw(st.booleans()):
        kw["exclude"] = ids_matrix(rng, b, draw(st.integers(0, 3)), n)
    if draw(st.booleans()):
        kw["query_labels"] = torch.from_numpy(rng.integers(0, 3, b))
        kw["candidate_labels"] = torch.from_numpy(rng.integers(0, 3, n))
    if draw(st.booleans()):
        ps = rng.integers(-3, 4, b).astype(np.float64) / 2
        ps[rng.random(b) < 0.15] = math.nan
        kw["positive_scores"] = torch.from_numpy(ps).to(torch.float32)
    # margins: zero, negative and sub-ulp values; p_i may be negative (relative margin widens then)
    kw["absolute_margin"] = draw(st.sampled_from([None, None, 0.0, 0.5, 1.0, -0.5, 1e-9]))
    kw["relative_margin"] = draw(st.sampled_from([None, None, 0.0, 0.1, 0.5, -0.25]))
    # bounds that sit on, just above and just below representable scores
    bound = st.sampled_from([None, None, -1.0, 0.0, 0.5, 1.0, 1.0 + 1e-12, 1.0 - 1e-12, 0.1, -2.5])
    kw["min_score"] = draw(bound)
    kw["max_score"] = draw(bound)
    # small windows and k are the common case; anything up to past N is valid
    kw["skip_top"] = draw(st.one_of(st.integers(0, 4), st.integers(0, n + 2)))
    kw["pool"] = draw(st.one_of(st.none(), st.integers(1, 6), st.integers(1, n + 2)))
    kw["sampling"] = draw(st.sampled_from(["top", "top", "uniform", "softmax"]))
    if kw["sampling"] != "top":
        kw["temperature"] = draw(st.sampled_from([0.25, 1.0, 3.0]))
        kw["seed"] = draw(st.integers(0, 2**63 - 1))
    k = draw(st.one_of(st.integers(0, 8), st.integers(0, n + 3)))
    return rng, b, n, k, {key: v for key, v in kw.items() if v is not None}


def _score_values(rng: np.random.Generator, shape: tuple[int, int], style: str, specials: bool) -> np.ndarray:
    if style == "int":
        s = rng.integers(-3, 4, size=shape).astype(np.float64)
    elif style == "halves":
        s = rng.integers(-6, 7, size=shape).astype(np.float64) / 2
    else:
        s = rng.standard_normal(shape)
    if specials:
        mask = rng.random(shape) < 0.12
        s[mask] = rng.choice(SPECIALS, size=int(mask.sum()))
    return s


@settings(max_examples=250, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=selection_cases(),
    dtype=st.sampled_from(DTYPES),
    style=st.sampled_from(["int", "halves", "normal"]),
    specials=st.booleans(),
    layout=st.sampled_from(["contiguous", "transposed", "strided"]),
)
def test_from_scores_matches_reference(case, dtype, style, specials, layout):
    rng, b, n, k, kw = case
    scores = torch.from_numpy(_score_values(rng, (b, n), style, specials)).to(dtype)
    if layout == "transposed":
        scores = scores.T.contiguous().T
    elif layout == "strided":
        scores = torch.repeat_interleave(torch.repeat_interleave(scores, 2, 0), 3, 1)[::2, ::3]
    got = hnsample.topk_from_scores(scores, k, **kw)
    assert got.scores.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_same_topk(got, R.select_from_scores(scores, k, **kw))


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=selection_cases(max_rows=4, max_cols=260, min_cols=64),
    dtype=st.sampled_from([torch.float32, torch.float32, torch.bfloat16]),
    style=st.sampled_from(["int", "halves", "normal"]),
    specials=st.booleans(),
    offset=st.integers(0, 3),
)
def test_wide_rows_match_reference(case, dtype, style, specials, offset):
    """Rows long enough for the vectorized scan (chunks of 64 plus a tail), at unaligned offsets."""
    rng, b, n, k, kw = case
    wide = torch.from_numpy(_score_values(rng, (b, n + offset), style, specials)).to(dtype)
    scores = wide[:, offset:]
    got = hnsample.topk_from_scores(scores, k, **kw)
    assert_same_topk(got, R.select_from_scores(scores, k, **kw))


@settings(max_examples=120, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(
    case=selection_cases(max_rows=5, max_cols=20),
    dtype=st.sampled_from(DTYPES),
    d=st.integers(0, 5),
    block_size=st.sampled_from([None, 1, 3, 7, 64]),
)
def test_similarity_matches_reference_on_integer_embeddings(case, dtype, d, block_size):
    rng, b, n, k, kw = case
    q, c = int_matrix(rng, b, d, dtype=dtype), int_matrix(rng, n, d, dtype=dtype)
    got = hnsample.topk_similarity(q, c, k, block_size=block_size, **kw)
    assert_same_topk(got, R.topk_similarity(q, c, k, **kw))


# ----------------------------------------------------------------------------------------------------
# Each filter alone and all of them together, on a fixed integer-valued problem


def _filter_problem(dtype: torch.dtype = torch.float32):
    rng = np.random.default_rng(7)
    b, n, d = 6, 40, 4
    q, c = int_matrix(rng, b, d, dtype=dtype), int_matrix(rng, n, d, dtype=dtype)
    positives = ids_matrix(rng, b, 3, n)
    positives[0] = -1  # a row with only padding: no margin filter there
    positives[1, :2] = positives[1, 2]  # duplicates
    return (
        q,
        c,
        {
            "positives": positives,
            "exclude": ids_matrix(rng, b, 5, n),
            "query_labels": torch.from_numpy(rng.integers(0, 3, b)),
            "candidate_labels": torch.from_numpy(rng.integers(0, 3, n)),
            "positive_scores": torch.tensor([2.0, -1.5, math.nan, 0.0, 3.0, -4.0]),
        },
    )


SINGLE_FILTERS = {
    "positives": ["positives"],
    "exclude": ["exclude"],
    "labels": ["query_labels", "candidate_labels"],
    "absolute_margin": ["positives", ("absolute_margin", 1.0)],
    "negative_absolute_margin": ["positives", ("absolute_margin", -2.0)],
    "relative_margin": ["positives", ("relative_margin", 0.5)],
    "override_absolute": ["positive_scores", ("absolute_margin", 0.5)],
    "override_relative": ["positive_scores", ("relative_margin", 0.25)],
    "override_with_positives": ["positives", "positive_scores", ("absolute_margin", 0.0)],
    "min_score": [("min_score", 1.0)],
    "max_score": [("max_score", 0.0)],
    "empty_interval": [("min_score", 1.0), ("max_score", 0.5)],
    "skip_top": [("skip_top", 3)],
    "pool": [("pool", 2)],
    "window": [("skip_top", 2), ("pool", 3)],
    "skip_beyond_eligible": [("skip_top", 45)],
    "pool_beyond_eligible": [("skip_top", 30), ("pool", 100)],
    "all": [
        "positives",
        "exclude",
        "query_labels",
        "candidate_labels",
        ("absolute_margin", 0.5),
        ("relative_margin", 0.1),
        ("min_score", -3.0),
        ("max_score", 4.0),
        ("skip_top", 1),
        ("pool", 6),
    ],
    "all_with_override": [
        "positives",
        "exclude",
        "query_labels",
        "candidate_labels",
        "positive_scores",
        ("absolute_margin", 0.0),
        ("relative_margin", -0.5),
        ("skip_top", 2),
    ],
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("name", list(SINGLE_FILTERS))
@pytest.mark.parametrize("k", [1, 4, 50])
def test_each_filter_alone_and_combined(name, dtype, k):
    q, c, pool_of_args = _filter_problem(dtype)
    kw = {}
    for item in SINGLE_FILTERS[name]:
        if isinstance(item, tuple):
            kw[item[0]] = item[1]
        else:
            kw[item] = pool_of_args[item]
    got = hnsample.topk_similarity(q, c, k, **kw)
    ref = R.topk_similarity(q, c, k, **kw)
    assert_same_topk(got, ref)
    # the same selection from the materialized score matrix
    assert_same_topk(hnsample.topk_from_scores(R.similarity(q, c).to(torch.float32), k, **kw), ref)


def test_filters_remove_what_they_say():
    """Spot checks of the rules themselves, independent of the reference."""
    q, c, args = _filter_problem()
    s = R.similarity(q, c)
    n = c.shape[0]
    everything = hnsample.topk_similarity(q, c, n).indices
    assert (everything >= 0).all()  # no filter: every candidate comes back, best first
    for i in range(q.shape[0]):
        assert sorted(everything[i].tolist()) == list(range(n))
        assert (s[i, everything[i]].diff() <= 0).all()
    out = hnsample.topk_similarity(
        q,
        c,
        n,
        positives=args["positives"],
        exclude=args["exclude"],
        query_labels=args["query_labels"],
        candidate_labels=args["candidate_labels"],
    )
    for i in range(q.shape[0]):
        chosen = set(out.indices[i][out.indices[i] >= 0].tolist())
        banned = set(args["positives"][i].tolist()) | set(args["exclude"][i].tolist())
        same_label = {j for j in range(n) if args["candidate_labels"][j] == args["query_labels"][i]}
        assert chosen == set(range(n)) - banned - same_label
    # margin against the minimum positive score of the row
    out = hnsample.topk_similarity(q, c, n, positives=args["positives"], absolute_margin=0.5)
    for i in range(1, q.shape[0]):
        valid = [j for j in args["positives"][i].tolist() if j >= 0]
        p = min(float(s[i, j]) for j in valid)
        chosen = out.indices[i][out.indices[i] >= 0]
        assert (out.scores[i][: len(chosen)] <= p - 0.5).all()
        expected = {j for j in range(n) if j not in valid and float(s[i, j]) <= p - 0.5}
        assert set(chosen.tolist()) == expected


def test_relative_margin_with_negative_positive_score():
    # p = -2: the bound is p - |p| * m = -2 - 2 * 0.5 = -3 (a relative margin always moves away from p)
    scores = torch.tensor([[-2.0, -2.5, -3.0, -3.5, 1.0]])
    out = hnsample.topk_from_scores(scores, 5, positives=torch.tensor([[0]]), relative_margin=0.5)
    assert out.indices.tolist() == [[2, 3, -1, -1, -1]]
    assert out.scores[0, :2].tolist() == [-3.0, -3.5]
    out = hnsample.topk_from_scores(scores, 5, positive_scores=torch.tensor([2.0]), relative_margin=0.5)
    assert out.indices.tolist() == [[4, 0, 1, 2, 3]]  # bound 1.0 is inclusive
    out = hnsample.topk_from_scores(scores, 5, positive_scores=torch.tensor([-2.0]), relative_margin=-0.25)
    assert out.indices.tolist() == [[0, 1, 2, 3, -1]]  # a negative margin moves the bound up to -1.5


def test_positive_score_is_the_minimum_over_valid_positives():
    scores = torch.tensor([[5.0, 1.0, 3.0, 2.0, 0.5, 4.0]])
    # positives 0 (5.0) and 2 (3.0), padding and a duplicate: p = 3.0, bound p - 1 = 2.0
    pos = torch.tensor([[0, -1, 2, 2]])
    out = hnsample.topk_from_scores(scores, 6, positives=pos, absolute_margin=1.0)
    assert out.indices.tolist() == [[3, 1, 4, -1, -1, -1]]
    # a row whose positives are all padding has no margin filter
    out = hnsample.topk_from_scores(scores, 3, positives=torch.tensor([[-1, -1]]), absolute_margin=1.0)
    assert out.indices.tolist() == [[0, 5, 2]]


def test_nan_positive_score_removes_everything_under_a_margin():
    scores = torch.tensor([[1.0, math.nan, 0.5, -1.0], [1.0, math.nan, 0.5, -1.0]])
    pos = torch.tensor([[1], [0]])
    out = hnsample.topk_from_scores(scores, 3, positives=pos, absolute_margin=0.0)
    assert out.indices.tolist() == [[-1, -1, -1], [2, 3, -1]]
    out = hnsample.topk_from_scores(
        scores, 3, positive_scores=torch.tensor([math.nan, 2.0]), relative_margin=0.1
    )
    assert out.indices.tolist() == [[-1, -1, -1], [0, 2, 3]]
    # without a margin p_i plays no role
    out = hnsample.topk_from_scores(scores, 3, positive_scores=torch.tensor([math.nan, math.nan]))
    assert out.indices.tolist() == [[0, 2, 3], [0, 2, 3]]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_score_bounds_are_exact_float64_comparisons(dtype):
    """min/max/margin bounds that fall between two representable scores are applied exactly."""
    v = torch.tensor([0.1, 0.2, 0.3], dtype=dtype)
    scores = v.repeat(1, 2)  # [0.1, 0.2, 0.3, 0.1, 0.2, 0.3] rounded to dtype
    x = float(v[1])  # the dtype's value nearest 0.2, as a float64
    ulp = math.ulp(x)
    cases = [
        (dict(min_score=x), [2, 5, 1, 4]),
        (dict(min_score=x + ulp), [2, 5]),
        (dict(min_score=x - ulp), [2, 5, 1, 4]),
        (dict(max_score=x), [1, 4, 0, 3]),
        (dict(max_score=x - ulp), [0, 3]),
        (dict(max_score=x + ulp), [1, 4, 0, 3]),
        (dict(positive_scores=torch.tensor([x], dtype=torch.float64), absolute_margin=0.0), [1, 4, 0, 3]),
        (dict(positive_scores=torch.tensor([x], dtype=torch.float64), absolute_margin=ulp), [0, 3]),
        (dict(positive_scores=torch.tensor([x], dtype=torch.float64), absolute_margin=-ulp), [1, 4, 0, 3]),
        (dict(positives=torch.tensor([[1]]), absolute_margin=0.0), [4, 0, 3]),
        (dict(positives=torch.tensor([[2]]), relative_margin=1e-15), [1, 4, 0, 3]),
    ]
    for kw, expected in cases:
        got = hnsample.topk_from_scores(scores, 6, **kw)
        assert got.indices[0][got.indices[0] >= 0].tolist() == expected, kw
        assert_same_topk(got, R.select_from_scores(scores, 6, **kw))


# ----------------------------------------------------------------------------------------------------
# Ties, duplicates, NaN and infinities


@pytest.mark.parametrize("block_size", [None, 1, 5])
def test_ties_go_to_the_lower_index(block_size):
    # candidates 0, 3 and 5 are the same vector; 1 and 4 tie with each other at a lower score
    c = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [1.0, 1.0], [0.0, 1.0], [1.0, 1.0]])
    q = torch.tensor([[1.0, 1.0], [2.0, 2.0]])
    out = hnsample.topk_similarity(q, c, 5, block_size=block_size)
    assert out.indices.tolist() == [[0, 3, 5, 1, 4], [0, 3, 5, 1, 4]]
    assert out.scores.tolist() == [[2.0, 2.0, 2.0, 1.0, 1.0], [4.0, 4.0, 4.0, 2.0, 2.0]]
    # the window cuts through a tie: the lower index is ranked first
    out = hnsample.topk_similarity(q, c, 2, skip_top=2, block_size=block_size)
    assert out.indices.tolist() == [[5, 1], [5, 1]]
    out = hnsample.topk_similarity(q, c, 2, exclude=torch.tensor([[3], [0]]), block_size=block_size)
    assert out.indices.tolist() == [[0, 5], [3, 5]]


def test_all_scores_tied_in_a_large_row():
    # a constant row longer than a SIMD chunk: the result is the k lowest eligible ids, in order
    scores = torch.zeros(3, 300)
    out = hnsample.topk_from_scores(scores, 70, exclude=torch.tensor([[0], [5], [299]]))
    assert out.indices[0].tolist() == list(range(1, 71))
    assert out.indices[1].tolist() == [j for j in range(71) if j != 5]
    assert out.indices[2].tolist() == list(range(70))
    assert (out.scores == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_nan_and_infinite_scores(dtype):
    nan, inf = math.nan, math.inf
    scores = torch.tensor(
        [
            [nan, 1.0, inf, -inf, 0.0, nan, inf],
            [nan, nan, nan, nan, nan, nan, nan],
            [-inf, -inf, 2.0, nan, -inf, 1.0, 3.0],
        ],
        dtype=dtype,
    )
    out = hnsample.topk_from_scores(scores, 7)
    # NaN is never selected; +inf ranks first (ties to the lower id), -inf is an eligible score
    assert out.indices.tolist() == [[2, 6, 1, 4, 3, -1, -1], [-1] * 7, [6, 2, 5, 0, 1, 4, -1]]
    assert out.scores[0, :5].tolist() == [inf, inf, 1.0, 0.0, -inf]
    assert_same_topk(out, R.select_from_scores(scores, 7))
    # bounds exclude infinities; min_score = max_score keeps exactly the equal scores
    assert hnsample.topk_from_scores(scores, 3, max_score=5.0).indices.tolist() == [
        [1, 4, 3],
        [-1] * 3,
        [6, 2, 5],
    ]
    assert hnsample.topk_from_scores(scores, 3, min_score=-5.0).indices[2].tolist() == [6, 2, 5]
    assert hnsample.topk_from_scores(scores, 3, min_score=1.0, max_score=1.0).indices.tolist() == [
        [1, -1, -1],
        [-1] * 3,
        [5, -1, -1],
    ]
    # an infinite positive score: p - |p| * m is NaN for +inf, so nothing passes the relative margin
    out = hnsample.topk_from_scores(
        scores, 7, positive_scores=torch.tensor([inf, -inf, inf]), relative_margin=0.1
    )
    assert_same_topk(
        out,
        R.select_from_scores(scores, 7, positive_scores=torch.tensor([inf, -inf, inf]), relative_margin=0.1),
    )
    out = hnsample.topk_from_scores(
        scores, 7, positive_scores=torch.tensor([inf, -inf, inf]), absolute_margin=1.0
    )
    assert out.indices[0].tolist() == [2, 6, 1, 4, 3, -1, -1]  # bound +inf keeps +inf
    assert out.indices[2].tolist() == [6, 2, 5, 0, 1, 4, -1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_every_half_precision_value_is_read_exactly(dtype):
    """All 65536 bit patterns of the half formats (subnormals, signed zeros, max, inf, NaN) in one row:
    the selection must rank them exactly as torch converts them, NaN excluded."""
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    row = bits.view(dtype).unsqueeze(0)
    values = row.float()[0]
    out = hnsample.topk_from_scores(row, 2**16)
    finite_or_inf = (~values.isnan()).nonzero().squeeze(1)
    order = sorted(finite_or_inf.tolist(), key=lambda j: (-float(values[j]), j))
    n = len(order)
    assert out.indices[0, :n].tolist() == order
    assert (out.indices[0, n:] == -1).all()
    got = out.scores[0, :n]
    assert torch.equal(got.view(torch.int32), values[order].view(torch.int32))  # signed zeros too
    # a bound at the smallest positive subnormal keeps exactly the positive values
    tiny = float(values[values > 0].min())
    kept = hnsample.topk_from_scores(row, 2**16, min_score=tiny).indices[0]
    assert set(kept[kept >= 0].tolist()) == set((values > 0).nonzero().squeeze(1).tolist())


def test_signed_zeros_tie():
    scores = torch.tensor([[0.0, -0.0, 0.0, -1.0]])
    out = hnsample.topk_from_scores(scores, 4, max_score=-0.0)
    assert out.indices.tolist() == [[0, 1, 2, 3]]
    assert torch.signbit(out.scores).tolist() == [[False, True, False, True]]


def test_nan_and_infinite_embeddings():
    # queries have no zero entry, so every product with a non-finite entry is non-finite in any BLAS path
    q = torch.tensor([[1.0, 2.0, -1.0], [-1.0, 1.0, 3.0]])
    c = torch.tensor(
        [
            [1.0, 0.0, 0.0],
            [math.nan, 0.0, 0.0],
            [math.inf, 0.0, 0.0],
            [0.0, 1.0, 0.0],
            [0.0, 0.0, -math.inf],
            [math.inf, math.inf, 0.0],
            [math.inf, -math.inf, 0.0],  # inf - inf: NaN for every query
        ]
    )
    for block_size in (None, 1, 4):
        out = hnsample.topk_similarity(q, c, 7, block_size=block_size)
        assert out.indices.tolist() == [[2, 4, 5, 3, 0, -1, -1], [3, 0, 2, 4, 6, -1, -1]]
        assert out.scores.tolist() == [
            [math.inf, math.inf, math.inf, 2.0, 1.0, -math.inf, -math.inf],
            [1.0, -1.0, -math.inf, -math.inf, -math.inf, -math.inf, -math.inf],
        ]
        assert_same_topk(out, R.topk_similarity(q, c, 7))
    # cosine: a row with inf has NaN norm-scaled entries, so it is never selected
    out = hnsample.topk_similarity(q, c, 7, metric="cosine")
    assert set(out.indices[0].tolist()) == {0, 3, -1}


# ----------------------------------------------------------------------------------------------------
# Sizes: k > N, k = 0, B = 0, N = 0, B = 1, d = 1, d = 0


@pytest.mark.parametrize(
    "b,n,d,k",
    [
        (3, 5, 4, 9),  # k > N
        (3, 5, 4, 0),  # k = 0
        (0, 5, 4, 3),  # B = 0
        (3, 0, 4, 3),  # N = 0
        (0, 0, 4, 2),
        (1, 7, 3, 2),  # B = 1
        (4, 6, 1, 3),  # d = 1
        (2, 3, 0, 2),  # d = 0: every score is 0
        (1, 1, 1, 1),
    ],
)
@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_degenerate_sizes(b, n, d, k, metric):
    rng = np.random.default_rng(b * 100 + n * 10 + d)
    q, c = int_matrix(rng, b, d), int_matrix(rng, n, d)
    out = hnsample.topk_similarity(q, c, k, metric=metric)
    assert out.scores.shape == (b, k) and out.indices.shape == (b, k)
    assert out.scores.dtype == torch.float32 and out.indices.dtype == torch.int64
    if metric == "dot":
        assert_same_topk(out, R.topk_similarity(q, c, k))
    else:
        assert_valid_topk(out, R.similarity(q, c, metric).to(torch.float64), k, 1e-6, False)
    assert (out.indices[:, n:] == -1).all() and (out.scores[:, n:] == -math.inf).all()
    for kw in (dict(skip_top=2), dict(pool=1, sampling="uniform", seed=3), dict(sampling="softmax", seed=1)):
        assert_same_topk(hnsample.topk_similarity(q, c, k, **kw), R.topk_similarity(q, c, k, **kw))
    s = R.similarity(q, c).to(torch.float32)
    assert_same_topk(hnsample.topk_from_scores(s, k), R.select_from_scores(s, k))


@pytest.mark.parametrize("op", ["similarity", "from_scores"])
def test_empty_candidates_with_filters(op):
    """N = 0 with (necessarily all-padding) positives, margins, labels and a window."""
    b = 3
    kw = dict(
        positives=torch.full((b, 2), -1),
        exclude=torch.full((b, 1), -1),
        absolute_margin=0.1,
        relative_margin=0.1,
        query_labels=torch.zeros(b, dtype=torch.int64),
        candidate_labels=torch.zeros(0, dtype=torch.int64),
        skip_top=1,
        pool=2,
    )
    if op == "similarity":
        out = hnsample.topk_similarity(torch.ones(b, 4), torch.ones(0, 4), 2, **kw)
    else:
        out = hnsample.topk_from_scores(torch.ones(b, 0), 2, **kw)
    assert out.indices.tolist() == [[-1, -1]] * b
    assert out.scores.tolist() == [[-math.inf, -math.inf]] * b


def test_huge_window_arguments_cost_no_memory():
    """skip_top / pool far beyond N are valid (they select nothing / everything) and must not size
    the state by their value."""
    scores = torch.tensor([[3.0, 1.0, 2.0]])
    assert hnsample.topk_from_scores(scores, 2, skip_top=10**15).indices.tolist() == [[-1, -1]]
    assert hnsample.topk_from_scores(scores, 2, skip_top=1, pool=10**15).indices.tolist() == [[2, 1]]
    for sampling in ("uniform", "softmax"):
        out = hnsample.topk_from_scores(scores, 3, pool=10**15, sampling=sampling, seed=1)
        assert out.indices.tolist() == [[0, 2, 1]]
        out = hnsample.topk_from_scores(scores, 3, skip_top=10**15, sampling=sampling, seed=1)
        assert out.indices.tolist() == [[-1, -1, -1]]
    q = torch.ones(2, 3)
    assert hnsample.topk_similarity(q, q, 1, skip_top=10**15, pool=10**15).indices.tolist() == [[-1], [-1]]


# Peak resident memory of one call in a fresh process, against the size of the full score matrix.
MEMORY_SCRIPT = """
import resource, sys, torch, hnsample
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
torch.manual_seed(0)
b, n = 256, 20_000
q, c = torch.randn(b, 8), torch.randn(n, 8)
pos = torch.randint(0, n, (b, 2))
hnsample.topk_similarity(q[:2], c[:50], 2, positives=pos[:2] % 50, relative_margin=0.1)  # lazy imports
hnsample.topk_from_scores(torch.randn(2, 50), 2, sampling="softmax", seed=0)
cases = [
    dict(positives=pos, relative_margin=0.05),
    dict(skip_top=10**12, pool=10**12, sampling="softmax", seed=1),
    dict(skip_top=5, pool=n, sampling="uniform", seed=1),
    dict(skip_top=20, sampling="softmax", seed=2),
]
for kw in cases:
    before = peak_mb()
    hnsample.topk_similarity(q, c, 16, block_size=1 << 18, **kw)
    print(peak_mb() - before)
"""


def test_state_memory_does_not_grow_with_the_score_matrix(tmp_path):
    """The per-row state is sized by skip_top + k (or the pool), never by B x N: even a window that
    covers every candidate, or huge window arguments, keep a call's peak memory far below the 20 MB
    score matrix (a window state over all candidates would take 123 MB)."""
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    deltas = [float(x) for x in proc.stdout.split()]
    assert len(deltas) == 4
    assert max(deltas) < 8, deltas  # MB: one 1 MB score block, converted inputs and a small state


# ----------------------------------------------------------------------------------------------------
# Layouts and input types


def test_non_contiguous_similarity_inputs():
    rng = np.random.default_rng(3)
    qf, cf = int_matrix(rng, 10, 12), int_matrix(rng, 30, 6)
    pos = ids_matrix(rng, 5, 2, 30)
    kw = dict(positives=pos, absolute_margin=0.0, exclude=ids_matrix(rng, 5, 3, 30))
    variants = {
        "strided_queries": (qf[::2, ::2], cf),
        "column_major": (qf[:5, :6].T.contiguous().T, cf.T.contiguous().T),
        "offset_views": (qf[5:, 6:], cf),
        "expanded_query": (qf[:1, :6].expand(5, 6), cf[::1, :]),
        "expanded_candidates": (qf[:5, :6], cf[:1].expand(30, 6)),
    }
    for name, (q, c) in variants.items():
        assert not (q.is_contiguous() and c.is_contiguous()) or name == "offset_views", name
        for block_size in (None, 7):
            got = hnsample.topk_similarity(q, c, 6, block_size=block_size, **kw)
            assert_same_topk(got, R.topk_similarity(q.contiguous(), c.contiguous(), 6, **kw))


def test_non_contiguous_scores_and_ids():
    rng = np.random.default_rng(4)
    base = torch.from_numpy(rng.integers(-4, 5, size=(24, 48)).astype(np.float32))
    pos = ids_matrix(rng, 6, 4, 20)
    kw = dict(
        positives=pos[:, ::2],
        exclude=pos.T.contiguous().T,
        relative_margin=0.1,
        query_labels=(torch.arange(12) % 3)[::2],
        candidate_labels=(torch.arange(40) % 3)[::2],
    )
    ref_kw = {key: v.contiguous() if isinstance(v, torch.Tensor) else v for key, v in kw.items()}
    variants = {
        "strided": base[:12:2, :40:2],
        "transposed": base[:20, :6].T,
        "column_major": base[:6, :20].T.contiguous().T,
        "row_broadcast": base[:1, :20].expand(6, 20),
        "column_broadcast": base[:6, :1].expand(6, 20),
        "offset": base[6:12, 20:40],
        "simd_tail": base[:6, 1:21],
    }
    for name, s in variants.items():
        assert s.shape == (6, 20), name
        got = hnsample.topk_from_scores(s, 5, **kw)
        assert_same_topk(got, R.select_from_scores(s.contiguous(), 5, **ref_kw))
    # scores.T of a (N, B) matrix is read in place, no copy needed
    s = base[:20, :6]
    assert_same_topk(hnsample.topk_from_scores(s.T, 4), R.select_from_scores(s.T.contiguous(), 4))


def test_numpy_in_numpy_out():
    rng = np.random.default_rng(5)
    q, c = rng.integers(-2, 3, (4, 3)).astype(np.float32), rng.integers(-2, 3, (9, 3)).astype(np.float32)
    pos = rng.integers(0, 9, (4, 2))
    out = hnsample.topk_similarity(
        q,
        c,
        3,
        positives=pos,
        absolute_margin=0.0,
        query_labels=np.arange(4),
        candidate_labels=np.arange(9) % 4,
    )
    assert isinstance(out.scores, np.ndarray) and isinstance(out.indices, np.ndarray)
    assert out.scores.dtype == np.float32 and out.indices.dtype == np.int64
    ref = R.topk_similarity(
        torch.from_numpy(q),
        torch.from_numpy(c),
        3,
        positives=torch.from_numpy(pos),
        absolute_margin=0.0,
        query_labels=torch.arange(4),
        candidate_labels=torch.arange(9) % 4,
    )
    assert_same_topk(out, ref)
    s = q @ c.T
    got = hnsample.topk_from_scores(s.astype(np.float64), 3, exclude=pos)
    assert isinstance(got.scores, np.ndarray) and got.scores.dtype == np.float64
    assert_same_topk(got, R.select_from_scores(torch.from_numpy(s), 3, exclude=torch.from_numpy(pos)))
    # non-contiguous numpy views
    got = hnsample.topk_from_scores(np.asfortranarray(s)[:, ::2], 2)
    assert_same_topk(got, R.select_from_scores(torch.from_numpy(np.ascontiguousarray(s[:, ::2])), 2))


@pytest.mark.parametrize("layout", ["negative_strides", "big_endian"])
def test_numpy_layouts_torch_cannot_view(layout):
    s = np.arange(12, dtype=np.float32).reshape(3, 4)
    s = s[:, ::-1] if layout == "negative_strides" else s[:, ::-1].astype(">f4")
    got = hnsample.topk_from_scores(s, 2)
    assert got.indices.tolist() == [[0, 1]] * 3


@pytest.mark.parametrize("id_dtype", [torch.int64, torch.int32, torch.int16, torch.uint8])
def test_integer_id_and_label_dtypes(id_dtype):
    rng = np.random.default_rng(6)
    q, c = int_matrix(rng, 4, 3), int_matrix(rng, 20, 3)
    pos, exc = ids_matrix(rng, 4, 2, 20, pad=0.0), ids_matrix(rng, 4, 3, 20, pad=0.0)
    ql, cl = torch.from_numpy(rng.integers(0, 3, 4)), torch.from_numpy(rng.integers(0, 3, 20))
    ref = R.topk_similarity(
        q, c, 5, positives=pos, exclude=exc, query_labels=ql, candidate_labels=cl, absolute_margin=0.0
    )
    got = hnsample.topk_similarity(
        q,
        c,
        5,
        positives=pos.to(id_dtype),
        exclude=exc.to(id_dtype),
        query_labels=ql.to(id_dtype),
        candidate_labels=cl.to(id_dtype),
        absolute_margin=0.0,
    )
    assert_same_topk(got, ref)


def test_one_dimensional_ids_are_one_per_row():
    scores = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]])
    out = hnsample.topk_from_scores(scores, 2, positives=torch.tensor([0, 2]), absolute_margin=0.0)
    assert out.indices.tolist() == [[1, 2], [1, 0]]
    out = hnsample.topk_from_scores(scores, 2, exclude=torch.tensor([1, -1]))
    assert out.indices.tolist() == [[0, 2], [2, 1]]


def test_large_ids_near_n():
    n = 5000
    scores = torch.zeros(2, n)
    scores[:, n - 1] = 1.0
    scores[:, n - 2] = 0.5
    out = hnsample.topk_from_scores(scores, 2, exclude=torch.tensor([[n - 1], [-1]]))
    assert out.indices.tolist() == [[n - 2, 0], [n - 1, n - 2]]


# ----------------------------------------------------------------------------------------------------
# Real-valued data in every dtype: a valid answer within tolerance


def assert_valid_topk(
    got: hnsample.TopK, scores: torch.Tensor, k: int, tol: float, exact_indices: bool, **filters
) -> None:
    """`got` is a correct answer for the float64 score matrix `scores` up to `tol`: same padding, the
    t-th score matches the reference's t-th score, every returned id is distinct, eligible and carries
    its own score."""
    ref_s, ref_j = R.select_from_scores(scores, k, **filters)
    gs, gj = got.scores.to(torch.float64), got.indices
    assert torch.equal(gj < 0, ref_j < 0), "different numbers of results"
    torch.testing.assert_close(gs, ref_s, atol=tol, rtol=0)
    if exact_indices:
        assert torch.equal(gj, ref_j)
    p, has_p = R.positive_reference_scores(scores, filters.get("positives"), filters.get("positive_scores"))
    upper = R.upper_bounds(p, has_p, filters.get("absolute_margin"), filters.get("relative_margin"))
    for i in range(scores.shape[0]):
        ids = gj[i][gj[i] >= 0]
        assert len(set(ids.tolist())) == len(ids)
        torch.testing.assert_close(gs[i, : len(ids)], scores[i, ids], atol=tol, rtol=0)
        assert (gs[i, : len(ids)].diff() <= 0).all()
        assert (scores[i, ids] <= upper[i] + tol).all()
        for key in ("positives", "exclude"):
            if key in filters:
                assert not set(ids.tolist()) & set(filters[key][i].tolist())
        if "query_labels" in filters:
            assert (filters["candidate_labels"][ids] != filters["query_labels"][i]).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_real_valued_embeddings(dtype, metric):
    rng = np.random.default_rng(11)
    b, n, d = 16, 200, 32
    q = torch.from_numpy(rng.standard_normal((b, d)) / math.sqrt(d)).to(dtype)
    c = torch.from_numpy(rng.standard_normal((n, d)) / math.sqrt(d)).to(dtype)
    c[17] = 0  # a zero vector: cosine 0 with everything
    kw = dict(
        positives=ids_matrix(rng, b, 2, n, pad=0.2),
        exclude=ids_matrix(rng, b, 4, n),
        query_labels=torch.from_numpy(rng.integers(0, 5, b)),
        candidate_labels=torch.from_numpy(rng.integers(0, 5, n)),
    )
    s = R.similarity(q, c, metric).to(torch.float64)
    tol = SCORE_TOL[dtype]
    exact = dtype == torch.float64
    for extra in (
        dict(),
        dict(relative_margin=0.05),
        dict(absolute_margin=0.02, skip_top=3, pool=20),
        dict(min_score=-0.1, max_score=0.3),
    ):
        for block_size in (None, 1000):
            got = hnsample.topk_similarity(q, c, 10, metric=metric, block_size=block_size, **kw, **extra)
            assert got.scores.dtype == (torch.float64 if exact else torch.float32)
            assert_valid_topk(got, s, 10, tol, exact, **kw, **extra)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_cosine_zero_vectors(dtype):
    q = torch.tensor([[0.0, 0.0], [3.0, 4.0]], dtype=dtype)
    c = torch.tensor([[0.0, 0.0], [-3.0, -4.0], [6.0, 8.0], [0.0, 1.0]], dtype=dtype)
    out = hnsample.topk_similarity(q, c, 4, metric="cosine")
    # the zero query ties everything at 0: id order
    assert out.indices.tolist() == [[0, 1, 2, 3], [2, 3, 0, 1]]
    expected = torch.tensor([[0.0, 0.0, 0.0, 0.0], [1.0, 0.8, 0.0, -1.0]], dtype=out.scores.dtype)
    torch.testing.assert_close(out.scores, expected, atol=1e-6, rtol=0)


# ----------------------------------------------------------------------------------------------------
# Blocking and sharding never change the answer


@pytest.mark.parametrize("sampling", ["top", "uniform", "softmax"])
@pytest.mark.parametrize("window", [dict(), dict(skip_top=3), dict(skip_top=2, pool=9), dict(pool=4)])
def test_block_size_independence(sampling, window):
    rng = np.random.default_rng(12)
    q, c = int_matrix(rng, 9, 4, -3, 3), int_matrix(rng, 33, 4, -3, 3)
    kw = dict(
        window,
        sampling=sampling,
        positives=ids_matrix(rng, 9, 2, 33),
        relative_margin=0.2,
        exclude=ids_matrix(rng, 9, 2, 33),
    )
    if sampling != "top":
        kw["seed"] = 99
    default = hnsample.topk_similarity(q, c, 5, **kw)
    assert_same_topk(default, R.topk_similarity(q, c, 5, **kw))
    for block_size in (1, 7, 64, 10**9):
        again = hnsample.topk_similarity(q, c, 5, block_size=block_size, **kw)
        assert torch.equal(again.indices, default.indices), block_size
        assert torch.equal(again.scores, default.scores), block_size


@pytest.mark.parametrize("sampling", ["top", "uniform", "softmax"])
@pytest.mark.parametrize("window", [dict(), dict(skip_top=4), dict(skip_top=1, pool=7)])
@pytest.mark.parametrize("shards", [2, 3])
def test_merge_of_column_shards_equals_one_pass(sampling, window, shards, make_selection):
    rng = np.random.default_rng(13)
    b, n = 7, 40
    q, c = int_matrix(rng, b, 3, -3, 3), int_matrix(rng, n, 3, -3, 3)
    labels = dict(
        query_labels=torch.from_numpy(rng.integers(0, 3, b)),
        candidate_labels=torch.from_numpy(rng.integers(0, 3, n)),
    )
    filters = dict(
        positives=ids_matrix(rng, b, 2, n),
        exclude=ids_matrix(rng, b, 3, n),
        absolute_margin=0.0,
        sampling=sampling,
        temperature=0.7,
        seed=5,
        **window,
        **labels,
    )

    def selection():
        return make_selection(
            b, n, 6, positive_values=lambda pos: torch.gather(R.similarity(q, c), 1, pos), **filters
        )

    whole = run_selection(q, c, selection(), "dot", 1 << 20).finalize()
    cuts = np.linspace(0, n, shards + 1).astype(int)
    states = []
    for j0, j1 in zip(cuts[:-1], cuts[1:], strict=True):
        states.append(run_selection(q, c[j0:j1], selection(), "dot", 11, col_offset=int(j0)))
    merged: SelectionState = states[0]
    for other in states[1:]:
        merged.merge(other)
    got_s, got_j = merged.finalize()
    assert torch.equal(got_j, whole[1]) and torch.equal(got_s, whole[0])
    assert_same_topk(hnsample.TopK(got_s, got_j), R.topk_similarity(q, c, 6, **filters))


# ----------------------------------------------------------------------------------------------------
# GPU: identical results to the CPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sampling", ["top", "uniform", "softmax"])
def test_cuda_equals_cpu(dtype, sampling):
    rng = np.random.default_rng(14)
    q, c = int_matrix(rng, 16, 5, dtype=dtype), int_matrix(rng, 200, 5, dtype=dtype)
    kw = dict(
        positives=ids_matrix(rng, 16, 2, 200),
        exclude=ids_matrix(rng, 16, 3, 200),
        relative_margin=0.1,
        query_labels=torch.from_numpy(rng.integers(0, 3, 16)),
        candidate_labels=torch.from_numpy(rng.integers(0, 3, 200)),
        skip_top=2,
        sampling=sampling,
        seed=8,
    )
    cpu = hnsample.topk_similarity(q, c, 7, **kw)
    dev = {key: (v.cuda() if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
    gpu = hnsample.topk_similarity(q.cuda(), c.cuda(), 7, **dev)
    assert gpu.indices.device.type == "cuda"
    assert torch.equal(gpu.indices.cpu(), cpu.indices) and torch.equal(gpu.scores.cpu(), cpu.scores)
    s = R.similarity(q, c)
    nan_s = s.clone()
    nan_s[::3, ::5] = math.nan
    for pool in (None, 30):
        want = hnsample.topk_from_scores(nan_s.to(dtype), 7, pool=pool, **kw)
        have = hnsample.topk_from_scores(nan_s.to(dtype).cuda(), 7, pool=pool, **dev)
        assert torch.equal(have.indices.cpu(), want.indices) and torch.equal(have.scores.cpu(), want.scores)


@pytest.mark.gpu
def test_cuda_state_merge_and_half_values(make_selection):
    rng = np.random.default_rng(15)
    q, c = int_matrix(rng, 8, 3, -3, 3).cuda(), int_matrix(rng, 40, 3, -3, 3).cuda()
    for sampling, pool in (("top", None), ("uniform", 7), ("softmax", None)):
        sel = make_selection(8, 40, 5, q.device, skip_top=2, pool=pool, sampling=sampling, seed=3)
        whole = run_selection(q, c, sel, "dot", 1 << 20).finalize()
        first = run_selection(q, c[:17], sel, "dot", 64)
        first.merge(run_selection(q, c[17:], sel, "dot", 64, col_offset=17))
        merged = first.finalize()
        assert torch.equal(merged[1], whole[1]) and torch.equal(merged[0], whole[0])
        cpu = hnsample.topk_similarity(q.cpu(), c.cpu(), 5, skip_top=2, pool=pool, sampling=sampling, seed=3)
        assert torch.equal(whole[1].cpu(), cpu.indices)
    bits = torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)
    for dtype in (torch.float16, torch.bfloat16):
        row = bits.view(dtype).unsqueeze(0)
        want = hnsample.topk_from_scores(row, 2**16)
        have = hnsample.topk_from_scores(row.cuda(), 2**16)
        assert torch.equal(have.indices.cpu(), want.indices)
        assert torch.equal(have.scores.cpu().view(torch.int32), want.scores.view(torch.int32))
