"""Fuzzing every public op against the executable spec, hnsample._reference.

Hypothesis draws the structure of a case (shapes, dtype, memory layout, the kind of each row, filters,
sampling, block sizes) and a numpy seed fills in the values; tests/hostile_inputs.py makes the hostile
rows (NaN, +-inf, zeros, duplicates, rows one ulp apart, norms from 1e-30 to 1e30, subnormals) and
layouts (column-major, strided views among decoys, stride-0 broadcasts, misaligned data, big-endian and
negative-stride numpy arrays).

The CPU selection is certified (docs/certified.md): selections are compared exactly, indices and the
bits of every score. Losses are compared within a few float64 (or float32) roundings.

Examples per test are fixed and derandomized, so every run checks the same cases.
HNSAMPLE_TEST_FUZZ_SCALE multiplies the number of examples (.ci/sanitizer_lane, several times slower,
sets it below 1).
"""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
from hostile_inputs import (
    FINITE_ROW_KINDS,
    LAYOUTS,
    ROW_KINDS,
    finite_or_nan,
    hostile_matrix,
    lay_out,
    values_of,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import hnsample
from hnsample import _reference as R
from hnsample.miners import pairwise_similarity

SCALE = float(os.environ.get("HNSAMPLE_TEST_FUZZ_SCALE", "1"))
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
ID_DTYPES = (torch.int64, torch.int32, torch.int16)


# float64 scores are the float64 GEMM's, whose last bit depends on the blocking: exact comparisons with
# float64 inputs use integer-valued rows (exact dot products in any order; the scales are powers of two).
EXACT64 = dict(kinds=tuple(k for k in ROW_KINDS if k != "ulp"), bases=("ints",))


def fuzz(examples: int):
    return settings(max_examples=max(2, round(examples * SCALE)), deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


# ----------------------------------------------------------------------------------------------------
# Drawing cases


def draw_matrix(data, rows: int, d: int, dtype: torch.dtype, kinds=ROW_KINDS, bases=("ints", "normal"),
                layouts=LAYOUTS):
    """(hostile input, its values as a contiguous tensor)."""
    row_kinds = data.draw(st.lists(st.one_of(st.none(), st.sampled_from(kinds)), min_size=rows, max_size=rows))
    base = data.draw(st.sampled_from(bases))
    layout = data.draw(st.sampled_from(layouts))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = lay_out(hostile_matrix(rng, row_kinds, d, dtype, base), layout, rng)
    return x, values_of(x)


INT_LAYOUTS = ("contiguous", "column_major", "strided", "misaligned", "numpy_big_endian")


def draw_layout(data, t: torch.Tensor, layouts=INT_LAYOUTS) -> torch.Tensor | np.ndarray:
    """An integer tensor (ids, labels; 1-D or 2-D) in a hostile layout of the same values."""
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    layout = data.draw(st.sampled_from(layouts))
    if t.ndim == 1:
        return lay_out(t.unsqueeze(1), layout, rng)[:, 0]
    return lay_out(t, layout, rng)


def draw_ids(data, rows: int, n: int, max_width: int = 3) -> torch.Tensor | np.ndarray:
    """(rows, P) ids in [-1, n) (repeats allowed) of an integer dtype, in a hostile layout."""
    width = data.draw(st.integers(0, max_width))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    ids = rng.integers(0, max(n, 1), size=(rows, width))
    ids[(rng.random((rows, width)) < 0.3) | (n == 0)] = -1
    return draw_layout(data, torch.from_numpy(ids).to(data.draw(st.sampled_from(ID_DTYPES))))


def draw_threshold(data, scores: torch.Tensor) -> float:
    """A finite threshold on a score scale: often exactly one of the scores (ties at the bound)."""
    finite = scores[scores.isfinite()].to(torch.float64)
    picks = st.sampled_from(sorted(set(finite.tolist()))) if finite.numel() else st.just(0.0)
    return data.draw(picks) + data.draw(st.sampled_from((0.0, 0.0, 0.5, -0.25)))


def draw_selection(data, b: int, n: int, scores: torch.Tensor) -> dict:
    """Keyword arguments of a selection over (b, n) scores: every filter and sampling option, each present
    or not. Ids and labels come in assorted integer dtypes and hostile layouts (torch or numpy);
    thresholds are often exactly one of the scores; seeds span [0, 2**64), whose keys are themselves."""
    sel = {}
    if data.draw(st.booleans()):
        sel["positives"] = draw_ids(data, b, n)
    if data.draw(st.booleans()):
        sel["exclude"] = draw_ids(data, b, n)
    if data.draw(st.booleans()):
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        sel["query_labels"] = draw_layout(data, torch.from_numpy(rng.integers(0, 3, size=b)))
        sel["candidate_labels"] = draw_layout(data, torch.from_numpy(rng.integers(0, 3, size=n)).to(
            data.draw(st.sampled_from(ID_DTYPES))))
    if data.draw(st.booleans()):
        sel["absolute_margin"] = data.draw(st.sampled_from((0.0, 0.5, -1.0, 1e-30)))
    if data.draw(st.booleans()):
        sel["relative_margin"] = data.draw(st.sampled_from((0.0, 0.1, -0.2, 1.0)))
    if data.draw(st.booleans()):
        choices = [draw_threshold(data, scores) for _ in range(b)] + [math.nan, math.inf, -math.inf]
        sel["positive_scores"] = torch.tensor([data.draw(st.sampled_from(choices)) for _ in range(b)],
                                              dtype=torch.float64)
    if data.draw(st.booleans()):
        sel["min_score"] = draw_threshold(data, scores)
    if data.draw(st.booleans()):
        sel["max_score"] = draw_threshold(data, scores)
    sel["skip_top"] = data.draw(st.integers(0, 4))
    sel["pool"] = data.draw(st.one_of(st.none(), st.integers(1, 6)))
    sel["sampling"] = data.draw(st.sampled_from(("top", "top", "uniform", "softmax")))
    if sel["sampling"] != "top":
        sel["temperature"] = data.draw(st.sampled_from((0.05, 0.5, 1.0, 3.0)))
        sel["seed"] = data.draw(st.one_of(st.integers(0, 2**64 - 1), st.sampled_from((0, 2**63, 2**64 - 1))))
    return sel


def reference_selection(sel: dict) -> dict:
    """The reference's form of the selection arguments: int64 torch ids and labels."""
    def plain(v):
        if isinstance(v, np.ndarray):
            v = values_of(v)
        return v.to(torch.int64) if isinstance(v, torch.Tensor) and not v.is_floating_point() else v

    return {key: plain(v) for key, v in sel.items()}


def assert_same_selection(got, ref_scores: torch.Tensor, ref_indices: torch.Tensor, out_dtype: torch.dtype) -> None:
    """Indices equal and every score equal to the bit (NaN never returned; -inf with -1 padding)."""
    got_s, got_j = torch.as_tensor(got.scores), torch.as_tensor(got.indices)
    assert got_s.dtype == out_dtype and got_j.dtype == torch.int64
    assert torch.equal(got_j, ref_indices), f"indices\n{got_j}\nreference\n{ref_indices}"
    assert torch.equal(got_s.to(torch.float64), ref_scores), f"scores\n{got_s}\nreference\n{ref_scores}"
    assert not bool(got_s.isnan().any())


def out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# The selections


@fuzz(110)
@given(data=st.data())
def test_topk_similarity_matches_reference(data):
    """float32 / float16 / bfloat16: the certified scores, so exact. float64 scores are the float64
    GEMM's, whose rounding depends on the blocking: exact for integer-valued data ("dot"); for "cosine"
    see test_topk_similarity_float64_cosine."""
    dtype = data.draw(st.sampled_from(DTYPES))
    b, n, d = data.draw(st.integers(0, 6)), data.draw(st.integers(0, 12)), data.draw(st.integers(1, 20))
    exact = EXACT64 if dtype == torch.float64 else {}
    metric = "dot" if dtype == torch.float64 else data.draw(st.sampled_from(("dot", "cosine")))
    queries, q = draw_matrix(data, b, d, dtype, **exact)
    candidates, c = draw_matrix(data, n, d, dtype, **exact)
    if isinstance(queries, np.ndarray) != isinstance(candidates, np.ndarray):
        candidates = c  # numpy or torch on both sides
    scores = R.similarity(q, c, metric)
    sel = draw_selection(data, b, n, scores)
    k = data.draw(st.integers(0, n + 3))
    block_size = data.draw(st.sampled_from((None, 1, 7, 64)))
    got = hnsample.topk_similarity(queries, candidates, k, metric=metric, block_size=block_size, **sel)
    assert isinstance(got.indices, np.ndarray) == isinstance(queries, np.ndarray)
    ref_s, ref_j = R.select_from_scores(scores, k, **reference_selection(sel))
    assert_same_selection(got, ref_s, ref_j, out_dtype(dtype))


@fuzz(50)
@given(data=st.data())
def test_topk_similarity_float64_cosine(data):
    """float64 cosine scores are within a few ulps of the reference's, and the selection over them is the
    reference's selection over the op's own scores (read back with k = N and no filter). Margins are
    measured from positive_scores here: p_i from positives is a separately rounded product."""
    b, n, d = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 12)), data.draw(st.integers(1, 20))
    queries, q = draw_matrix(data, b, d, torch.float64)
    candidates, c = draw_matrix(data, n, d, torch.float64, layouts=("contiguous", "column_major", "strided"))
    if isinstance(queries, np.ndarray):
        queries = q
    block_size = data.draw(st.sampled_from((None, 1, 7, 64)))
    full = hnsample.topk_similarity(queries, candidates, n, metric="cosine", block_size=block_size)
    own = torch.full((b, n), math.nan, dtype=torch.float64)
    for i in range(b):
        listed = full.indices[i] >= 0
        own[i, full.indices[i][listed]] = full.scores[i][listed]
    ref = R.similarity(q, c, "cosine")
    torch.testing.assert_close(own, ref, rtol=1e-14, atol=1e-15, equal_nan=True)
    sel = draw_selection(data, b, n, own)
    if "positive_scores" not in sel:
        sel.pop("absolute_margin", None)
        sel.pop("relative_margin", None)
    k = data.draw(st.integers(0, n + 3))
    got = hnsample.topk_similarity(queries, candidates, k, metric="cosine", block_size=block_size, **sel)
    ref_s, ref_j = R.select_from_scores(own, k, **reference_selection(sel))
    assert_same_selection(got, ref_s, ref_j, torch.float64)


@fuzz(250)
@given(data=st.data())
def test_topk_from_scores_matches_reference(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    b, n = data.draw(st.integers(0, 9)), data.draw(st.integers(0, 14))
    scores, s = draw_matrix(data, b, n, dtype) if n else (torch.empty((b, 0), dtype=dtype),) * 2
    sel = draw_selection(data, b, n, s)
    k = data.draw(st.integers(0, n + 3))
    got = hnsample.topk_from_scores(scores, k, **sel)
    ref_s, ref_j = R.select_from_scores(s, k, **reference_selection(sel))
    assert_same_selection(got, ref_s, ref_j, out_dtype(dtype))


@fuzz(200)
@given(data=st.data())
def test_topk_from_candidates_matches_reference(data):
    dtype = data.draw(st.sampled_from(DTYPES))
    b, cols = data.draw(st.integers(0, 6)), data.draw(st.integers(0, 8))
    n = data.draw(st.integers(cols, cols + 6))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    listed = np.full((b, cols), -1, dtype=np.int64)
    for i in range(b):
        listed[i] = rng.permutation(n)[:cols]
    listed[rng.random((b, cols)) < 0.2] = -1
    ids = draw_layout(data, torch.from_numpy(listed).to(data.draw(st.sampled_from(ID_DTYPES))))
    scores, s = draw_matrix(data, b, cols, dtype) if cols else (torch.empty((b, 0), dtype=dtype),) * 2
    dense = torch.full((b, n), math.nan, dtype=torch.float64)
    for i in range(b):
        for j, v in zip(values_of(ids)[i].tolist(), s[i].to(torch.float64).tolist(), strict=True):
            if j >= 0:
                dense[i, j] = v
    sel = draw_selection(data, b, n, dense)
    if data.draw(st.booleans()):
        sel["num_candidates"] = n  # else N is derived, by the op as by the reference
    k = data.draw(st.integers(0, cols + 3))
    margins = "absolute_margin" in sel or "relative_margin" in sel
    positives = sel.get("positives")
    if margins and "positive_scores" not in sel and (positives is None or positives.shape[1] == 0):
        with pytest.raises(ValueError, match="margin"):
            hnsample.topk_from_candidates(ids, scores, k, **sel)
        return
    try:
        ref_s, ref_j = R.select_from_candidates(values_of(ids).to(torch.int64), s, k, **reference_selection(sel))
    except KeyError:  # a margin needs the score of a positive that is not listed
        with pytest.raises(ValueError, match="positives are not in candidate_ids"):
            hnsample.topk_from_candidates(ids, scores, k, **sel)
        return
    got = hnsample.topk_from_candidates(ids, scores, k, **sel)
    assert_same_selection(got, ref_s, ref_j, out_dtype(dtype))


@fuzz(40)
@given(data=st.data())
def test_seeded_sampling_is_deterministic_and_independent_of_blocks(data):
    """The same seed gives the same sample whatever the layout and block size; the reference defines it."""
    dtype = data.draw(st.sampled_from(DTYPES))
    b, n, d = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 16)), data.draw(st.integers(1, 9))
    exact = EXACT64 if dtype == torch.float64 else {}
    queries, q = draw_matrix(data, b, d, dtype, **exact)
    candidates, c = draw_matrix(data, n, d, dtype, layouts=("contiguous", "column_major", "strided"), **exact)
    if isinstance(queries, np.ndarray):
        queries = q
    sampling = data.draw(st.sampled_from(("uniform", "softmax")))
    seed = data.draw(st.integers(0, 2**64 - 1))
    k = data.draw(st.integers(1, n + 1))
    kw = dict(sampling=sampling, seed=seed, temperature=0.5, pool=data.draw(st.one_of(st.none(), st.integers(1, n))))
    first = hnsample.topk_similarity(queries, candidates, k, block_size=1, **kw)
    second = hnsample.topk_similarity(q, c, k, **kw)
    assert torch.equal(first.indices, second.indices) and torch.equal(first.scores, second.scores)
    ref_s, ref_j = R.select_from_scores(R.similarity(q, c), k, **kw)
    assert_same_selection(first, ref_s, ref_j, out_dtype(dtype))


# ----------------------------------------------------------------------------------------------------
# InfoNCE: the value and the gradients of queries, docs and a learnable temperature


def draw_info_nce_options(data, b: int, m: int, default_positives: bool) -> dict:
    opts = {}
    if not default_positives:
        rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
        width = data.draw(st.integers(1, min(3, m)))
        ids = np.stack([rng.permutation(m)[:width] for _ in range(b)]) if b else np.zeros((0, width), np.int64)
        ids[rng.random(ids.shape) < 0.3] = -1  # a row may be left without positives
        opts["positive_ids"] = draw_layout(data, torch.from_numpy(ids).to(data.draw(st.sampled_from(ID_DTYPES))))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    if data.draw(st.booleans()):
        opts["doc_ids"] = draw_layout(data, torch.from_numpy(rng.integers(0, max(1, m // 2 + 1), size=m)))
    if data.draw(st.booleans()):
        opts["query_labels"] = torch.from_numpy(rng.integers(0, 3, size=b))
        opts["doc_labels"] = draw_layout(data, torch.from_numpy(rng.integers(0, 3, size=m)))
    if data.draw(st.booleans()):
        opts["false_negative_margin"] = data.draw(st.sampled_from((0.0, 0.125, -0.25)))
    if data.draw(st.booleans()):
        opts["false_negative_relative_margin"] = data.draw(st.sampled_from((0.0, 0.5, -0.5)))
    if data.draw(st.booleans()):
        gd = data.draw(st.integers(1, 4))
        opts["guide_queries"] = torch.from_numpy(rng.integers(-2, 3, size=(b, gd)) / 4)
        opts["guide_docs"] = torch.from_numpy(rng.integers(-2, 3, size=(m, gd)) / 4)
        opts["guide_margin"] = data.draw(st.sampled_from((0.0, 0.25, -0.25)))
    opts["hcl_beta"] = data.draw(st.sampled_from((0.0, 0.0, 0.5, 2.0)))
    opts["tau_plus"] = data.draw(st.sampled_from((0.0, 0.0, 0.1, 0.5)))
    opts["hardness_alpha"] = data.draw(st.sampled_from((0.0, 0.0, 1.0, -0.5)))
    opts["positive_margin"] = data.draw(st.sampled_from((0.0, 0.0, 0.1)))
    opts["symmetric"] = data.draw(st.booleans())
    opts["reduction"] = data.draw(st.sampled_from(("mean", "sum", "none")))
    return opts


@fuzz(120)
@given(data=st.data())
def test_info_nce_matches_reference(data):
    """Eighths-valued embeddings make every score exact in any summation order, so each mask decision
    (margins at ties with the weakest positive, duplicate docs) is the reference's; the loss and its
    gradients then differ from the float64 reference only by the rounding of exp/log."""
    dtype = data.draw(st.sampled_from((torch.float64, torch.float32, torch.bfloat16)))
    b, m, d = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 7)), data.draw(st.integers(1, 6))
    kinds = ("zero", "duplicate")
    queries, q = draw_matrix(data, b, d, dtype, kinds=kinds, bases=("eighths",))
    docs, dc = draw_matrix(data, m, d, dtype, kinds=kinds, bases=("eighths",),
                           layouts=tuple(x for x in LAYOUTS if not x.startswith("numpy")))
    if isinstance(queries, np.ndarray):
        queries = q
    opts = draw_info_nce_options(data, b, m, default_positives=m >= b and data.draw(st.booleans()))
    learn_tau = data.draw(st.booleans())
    tau_value = data.draw(st.sampled_from((0.05, 0.1, 0.5, 1.0)))
    temperature = torch.tensor(tau_value, dtype=torch.float64, requires_grad=True) if learn_tau else tau_value
    block_size = data.draw(st.sampled_from((None, 1, 5, 64)))

    qg = torch.as_tensor(queries).detach().requires_grad_(True)  # the hostile layout, as a leaf
    dg = docs.detach().requires_grad_(True)
    got = hnsample.info_nce(qg, dg, temperature=temperature, block_size=block_size, **opts)
    qr, dr = q.double().requires_grad_(True), dc.double().requires_grad_(True)
    tr = temperature.detach().clone().requires_grad_(True) if learn_tau else tau_value
    want = R.info_nce(qr, dr, temperature=tr, **reference_selection(opts))
    assert got.dtype == out_dtype(dtype)
    tol = dict(rtol=1e-9, atol=1e-9) if dtype == torch.float64 else dict(rtol=2e-4, atol=2e-4)
    torch.testing.assert_close(got.detach().double(), want.detach(), **tol)
    weights = torch.from_numpy(np.random.default_rng(b * 31 + m).standard_normal(tuple(got.shape)))
    leaves = [qg, dg] + ([temperature] if learn_tau else [])
    ref_leaves = [qr, dr] + ([tr] if learn_tau else [])
    for g, r in zip(gradients((got.double() * weights).sum(), leaves),
                    gradients((want * weights).sum(), ref_leaves), strict=True):
        # The gradients come back in the input dtype: a bfloat16 one is rounded to 8 bits.
        scale = 1.0 if g.dtype != torch.bfloat16 else 2.0**-8 / 2e-4 * max(1.0, float(r.abs().max()))
        torch.testing.assert_close(g.double(), r, rtol=tol["rtol"] * scale, atol=tol["atol"] * scale)


def gradients(out: torch.Tensor, leaves: list[torch.Tensor]) -> list[torch.Tensor]:
    """d out / d leaf for each leaf (zeros where out does not depend on it)."""
    if not out.requires_grad:
        return [torch.zeros_like(x) for x in leaves]
    grads = torch.autograd.grad(out, leaves, allow_unused=True)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, leaves, strict=True)]


# ----------------------------------------------------------------------------------------------------
# Miners and the triplet loss. The rule is the docstrings', applied here by brute force to the scores
# the miners rank (hnsample._reference.batch_scores: canonical for float32 / 16-bit, rows holding NaN or
# inf scored NaN), so the choices are checked exactly.


def batch_scores(e: torch.Tensor, metric: str) -> list[list[float]]:
    return R.batch_scores(e.detach(), metric).tolist()


def draw_batch(data, dtype=None):
    dtype = dtype or data.draw(st.sampled_from(DTYPES))
    b, d = data.draw(st.integers(0, 9)), data.draw(st.integers(1, 6))
    e, _ = draw_matrix(data, b, d, dtype, layouts=tuple(x for x in LAYOUTS if not x.startswith("numpy")))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    labels = draw_layout(data, torch.from_numpy(rng.integers(0, data.draw(st.integers(1, 4)), size=b)))
    return e, labels, data.draw(st.sampled_from(("cosine", "dot", "euclidean")))


@fuzz(120)
@given(data=st.data())
def test_batch_hard_matches_its_rule(data):
    e, labels, metric = draw_batch(data)
    s, y = batch_scores(e, metric), values_of(labels).tolist()
    want = []
    for a in range(len(y)):
        pos = [(s[a][j], j) for j in range(len(y)) if j != a and y[j] == y[a] and not math.isnan(s[a][j])]
        neg = [(-s[a][j], j) for j in range(len(y)) if y[j] != y[a] and not math.isnan(s[a][j])]
        if pos and neg:
            want.append((a, min(pos)[1], min(neg)[1]))  # least similar positive, most similar negative
    got = hnsample.batch_hard(e, labels, metric=metric)
    assert list(zip(*(t.tolist() for t in got), strict=True)) == want


@fuzz(120)
@given(data=st.data())
def test_semi_hard_matches_its_rule(data):
    e, labels, metric = draw_batch(data)
    margin = data.draw(st.sampled_from((0.125, 0.5, 1.0, 3.0)))
    per_pair = data.draw(st.sampled_from((1, 2, None)))
    s, y = batch_scores(e, metric), values_of(labels).tolist()
    want = []
    for a in range(len(y)):
        for p in range(len(y)):
            if p == a or y[p] != y[a]:
                continue
            # 0 < d_an - d_ap <= margin with x = s_an - s_ap in float64: -margin <= x < 0; the hardest
            # (highest s_an) first.
            window = sorted((-s[a][n], n) for n in range(len(y))
                            if y[n] != y[a] and -margin <= s[a][n] - s[a][p] < 0)
            want += [(a, p, n) for _, n in window[:per_pair]]
    got = hnsample.semi_hard(e, labels, margin, metric=metric, negatives_per_pair=per_pair)
    assert list(zip(*(t.tolist() for t in got), strict=True)) == want


@fuzz(80)
@given(data=st.data())
def test_triplet_margin_loss_matches_its_formula(data):
    """l_t = max(0, s_an - s_ap + margin) over the rows the triplets use; rows no triplet uses may hold
    NaN or inf and change neither the loss nor its gradient (theirs is zero)."""
    dtype = data.draw(st.sampled_from(DTYPES))
    b, d = data.draw(st.integers(1, 8)), data.draw(st.integers(1, 6))
    e, x = draw_matrix(data, b, d, dtype, kinds=("zero", "duplicate", "ulp"), bases=("eighths", "normal"),
                       layouts=tuple(x for x in LAYOUTS if not x.startswith("numpy")))
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    t = data.draw(st.integers(0, 6))
    used = rng.integers(0, b, size=(3, t))
    unused = sorted(set(range(b)) - set(used.reshape(-1).tolist()))
    poison = [i for i in unused if data.draw(st.booleans())]
    if poison:  # NaN / inf in rows no triplet reads
        e = e.clone()
        e[poison, 0] = torch.tensor([math.nan, math.inf, -math.inf])[rng.integers(0, 3, size=len(poison))].to(dtype)
    metric = data.draw(st.sampled_from(("cosine", "dot", "euclidean")))
    reduction = data.draw(st.sampled_from(("mean", "mean_nonzero", "sum", "none")))
    margin = data.draw(st.sampled_from((0.0, 0.2, 1.0, -0.5)))
    idx = [draw_layout(data, torch.from_numpy(row), INT_LAYOUTS[:-1]) for row in used]  # tensors only
    leaf = e.detach().requires_grad_(True)
    got = hnsample.triplet_margin_loss(leaf, tuple(idx), margin, metric=metric, reduction=reduction)
    x64 = x.double()
    a, p, n = (torch.from_numpy(row) for row in used)
    sim = pairwise_similarity(x64, x64, metric)
    losses = torch.relu(sim[a, n] - sim[a, p] + margin)
    if reduction == "none":
        want = losses
    elif reduction == "sum":
        want = losses.sum()
    elif reduction == "mean_nonzero":
        want = losses.sum() / max(1, int((losses > 0).sum()))
    else:
        want = losses.mean() if t else losses.sum()
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(got.detach().double(), want, **tol)
    (grad,) = gradients(got.sum(), [leaf])
    assert bool(grad.isfinite().all())
    assert bool((grad[unused] == 0).all())


# ----------------------------------------------------------------------------------------------------
# Pipelines and samplers built on the selection


@fuzz(60)
@given(data=st.data())
def test_neighbour_sampler_mines_the_reference_neighbours(data):
    """mine_neighbours is the reference selection with self (and same-key items) excluded and rows
    holding NaN or inf turned into NaN rows; an epoch of the sampler holds every item exactly once."""
    dtype = data.draw(st.sampled_from(DTYPES))
    n, d = data.draw(st.integers(1, 12)), data.draw(st.integers(1, 8))
    metric = "dot" if dtype == torch.float64 else data.draw(st.sampled_from(("dot", "cosine")))
    x, v = draw_matrix(data, n, d, dtype, **(EXACT64 if dtype == torch.float64 else {}))
    width = data.draw(st.integers(0, n + 1))
    keys = None
    if data.draw(st.booleans()):
        keys = torch.from_numpy(np.random.default_rng(n).integers(0, 3, size=n))
    got = hnsample.NeighbourBatchSampler.mine_neighbours(x, width, keys=keys, metric=metric)
    clean = finite_or_nan(v)
    labels = dict(query_labels=keys, candidate_labels=keys) if keys is not None else {}
    _, want = R.select_from_scores(R.similarity(clean, clean, metric), width,
                                   exclude=torch.arange(n).unsqueeze(1), **labels)
    assert torch.equal(got, want)
    batch_size = data.draw(st.integers(1, 5))
    sampler = hnsample.NeighbourBatchSampler(got, batch_size, keys=keys, seed=data.draw(st.integers(0, 2**40)))
    epoch = list(sampler)
    assert sorted(i for batch in epoch for i in batch) == list(range(n))
    assert all(1 <= len(batch) <= batch_size for batch in epoch)
    assert epoch == list(sampler)  # the same epoch again: seeded
    if keys is not None:
        assert all(len({int(keys[i]) for i in batch}) == len(batch) for batch in epoch)


@fuzz(30)
@given(data=st.data())
def test_cluster_sampler_partitions_every_epoch(data):
    """Hostile but finite embeddings (huge and subnormal norms, zeros, duplicates) are clustered into
    epochs that hold every item once, in full batches but at most one; a NaN or inf row is a ValueError
    naming the rows."""
    dtype = data.draw(st.sampled_from(DTYPES))
    n, d = data.draw(st.integers(1, 16)), data.draw(st.integers(1, 6))
    x, _ = draw_matrix(data, n, d, dtype, kinds=FINITE_ROW_KINDS)
    if bool(values_of(x).isinf().any()):  # 2**100 overflows float16
        with pytest.raises(ValueError, match=r"embeddings must be finite.*rows \["):
            hnsample.ClusterBatchSampler(x, 3)
        return
    batch_size = data.draw(st.integers(1, 5))
    n_clusters = data.draw(st.one_of(st.none(), st.integers(1, n)))
    metric = data.draw(st.sampled_from(("cosine", "euclidean")))
    seed = data.draw(st.integers(0, 2**40))
    sampler = hnsample.ClusterBatchSampler(x, batch_size, n_clusters=n_clusters, metric=metric, seed=seed,
                                           iterations=3)
    epoch = list(sampler)
    assert sorted(i for batch in epoch for i in batch) == list(range(n))
    assert sum(len(batch) < batch_size for batch in epoch) <= 1
    again = hnsample.ClusterBatchSampler(x, batch_size, n_clusters=n_clusters, metric=metric, seed=seed,
                                         iterations=3)
    assert list(again) == epoch
    bad = values_of(x).clone()
    bad[data.draw(st.integers(0, n - 1)), 0] = data.draw(st.sampled_from((math.nan, math.inf, -math.inf)))
    with pytest.raises(ValueError, match=r"embeddings must be finite.*rows \["):
        sampler.recluster(bad)
    assert list(sampler) == epoch  # a refused recluster leaves the sampler as it was


@pytest.mark.filterwarnings("ignore:.*have no positive, so no margin can filter")
@fuzz(50)
@given(data=st.data())
def test_mine_hard_negatives_matches_reference(data):
    """Streamed over query batches and corpus shards, mining selects what the reference selects."""
    dtype = data.draw(st.sampled_from((torch.float32, torch.float16)))
    b, n, d = data.draw(st.integers(1, 5)), data.draw(st.integers(1, 12)), data.draw(st.integers(1, 8))
    kinds = FINITE_ROW_KINDS
    queries, q = draw_matrix(data, b, d, dtype, kinds=kinds, layouts=("contiguous", "strided", "numpy_big_endian",
                                                                      "numpy_negative_strides", "misaligned"))
    corpus, c = draw_matrix(data, n, d, dtype, kinds=kinds, layouts=("contiguous", "column_major", "strided"))
    if not (bool(q.isfinite().all()) and bool(c.isfinite().all())):
        return  # float16 overflowed: mining refuses non-finite rows (tests/test_reliability_inputs.py)
    metric = data.draw(st.sampled_from(("dot", "cosine")))
    scores = R.similarity(q, c, metric)
    sel = draw_selection(data, b, n, scores)
    sel["temperature"] = sel.get("temperature", 1.0)
    sel.setdefault("seed", 0)
    k = data.draw(st.integers(1, n + 2))
    positives = sel.pop("positives", None)
    mine = dict(num_negatives=k, metric=metric, device="cpu", progress=False, verbose=False,
                query_batch_size=data.draw(st.sampled_from((None, 1, 2))),
                corpus_shard_size=data.draw(st.sampled_from((None, 1, 5))), **sel)
    no_positives = positives is None or positives.shape[1] == 0
    if "positive_scores" not in sel and no_positives and ("absolute_margin" in sel or "relative_margin" in sel):
        with pytest.raises(ValueError, match="needs a positive score"):
            hnsample.mine_hard_negatives(queries, corpus, positives, **mine)
        return
    got = hnsample.mine_hard_negatives(queries, corpus, positives, **mine)
    ref_sel = reference_selection({**sel, "positives": got.positives})
    ref_s, ref_j = R.select_from_scores(scores, k, **ref_sel)
    assert_same_selection(got, ref_s, ref_j, torch.float32)


@fuzz(50)
@given(data=st.data())
def test_negative_queue_mines_like_the_reference(data):
    """NegativeQueue.mine is the reference selection over the filled slots, without the slots holding
    the row's own ids, slots holding NaN or inf, and with NaN for a query row holding NaN or inf."""
    dtype = data.draw(st.sampled_from((torch.float32, torch.bfloat16, torch.float16)))
    d, capacity = data.draw(st.integers(1, 6)), data.draw(st.integers(1, 8))
    queue = hnsample.NegativeQueue(capacity, d, dtype=dtype)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    for _ in range(data.draw(st.integers(1, 3))):
        rows = data.draw(st.integers(0, capacity + 2))
        e, _ = draw_matrix(data, rows, d, dtype)
        queue.enqueue(e, ids=torch.from_numpy(rng.integers(0, 5, size=rows)))
    cand, stored_ids, _ = queue.contents()
    b = data.draw(st.integers(0, 4))
    queries, q = draw_matrix(data, b, d, dtype, layouts=tuple(x for x in LAYOUTS if not x.startswith("numpy")))
    query_ids = torch.from_numpy(rng.integers(-1, 5, size=(b, data.draw(st.integers(1, 2)))))
    k = data.draw(st.integers(0, capacity + 1))
    metric = data.draw(st.sampled_from(("dot", "cosine")))
    got = queue.mine(queries, k, query_ids=query_ids, metric=metric)
    n = cand.shape[0]
    own = [[j for j in range(n) if int(stored_ids[j]) in query_ids[i].tolist() or not bool(cand[j].isfinite().all())]
           for i in range(b)]
    exclude = torch.full((b, max([len(o) for o in own], default=0)), -1, dtype=torch.int64)
    for i, o in enumerate(own):
        exclude[i, : len(o)] = torch.tensor(o, dtype=torch.int64)
    ref_s, ref_j = R.select_from_scores(R.similarity(finite_or_nan(q), cand, metric), k, exclude=exclude)
    assert_same_selection(hnsample.TopK(got.scores, got.slots), ref_s, ref_j, torch.float32)


@fuzz(50)
@given(data=st.data())
def test_dynamic_miner_hard_and_random_negatives(data):
    """The hard negatives are the reference selection; the random ones are distinct, never a positive,
    excluded, a hard negative or of the query's label, and the same for the same seed."""
    dtype = data.draw(st.sampled_from((torch.float32, torch.float16)))
    b, n, d = data.draw(st.integers(0, 4)), data.draw(st.integers(1, 12)), data.draw(st.integers(1, 6))
    docs, c = draw_matrix(data, n, d, dtype)
    queries, q = draw_matrix(data, b, d, dtype)
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    doc_labels = torch.from_numpy(rng.integers(0, 3, size=n))
    if isinstance(docs, np.ndarray) and not docs.dtype.isnative:  # a documented limit (docs/reliability.md)
        with pytest.raises(TypeError, match="documents must be float16, float32 or float64"):
            hnsample.DynamicNegativeMiner(docs)
        return
    miner = hnsample.DynamicNegativeMiner(docs, metric=data.draw(st.sampled_from(("dot", "cosine"))),
                                          document_labels=doc_labels, chunk_rows=data.draw(st.integers(1, 8)))
    positives = torch.from_numpy(rng.integers(-1, n, size=(b, 2)))
    labels = torch.from_numpy(rng.integers(0, 3, size=b)) if data.draw(st.booleans()) else None
    k, r, seed = data.draw(st.integers(0, 4)), data.draw(st.integers(0, 4)), data.draw(st.integers(0, 2**40))
    got = miner.mine(queries, positives, k, random=r, query_labels=labels, seed=seed)
    # float32 queries against a 16-bit index: the same scores (16-bit values are exact in float32).
    again = miner.mine(q.float() if dtype != torch.float32 else q, positives, k, random=r, query_labels=labels, seed=seed)
    assert torch.equal(got.ids, again.ids)
    torch.testing.assert_close(got.scores, again.scores, rtol=0, atol=0, equal_nan=True)  # NaN: a NaN query
    label_kw = dict(query_labels=labels, candidate_labels=doc_labels) if labels is not None else {}
    ref_s, ref_j = R.select_from_scores(R.similarity(q, c, miner.metric), k, positives=positives, **label_kw)
    assert torch.equal(got.ids[:, :k], ref_j)
    assert torch.equal(got.scores[:, :k].double(), ref_s)
    for i in range(b):
        drawn = [j for j in got.ids[i, k:].tolist() if j >= 0]
        banned = set(positives[i].tolist()) | set(ref_j[i].tolist())
        assert len(set(drawn)) == len(drawn) and not banned & set(drawn)
        if labels is not None:
            assert all(int(doc_labels[j]) != int(labels[i]) for j in drawn)


@fuzz(50)
@given(data=st.data())
def test_mix_hard_negatives_mixes_the_reference_hardest(data):
    """The mixed vectors are unit vectors made from the reference's n_hard hardest negatives (a negative
    holding NaN or inf is never one of them), and the same for the same seed."""
    dtype = data.draw(st.sampled_from((torch.float32, torch.float64)))
    b, kneg, d = data.draw(st.integers(1, 4)), data.draw(st.integers(1, 10)), data.draw(st.integers(1, 6))
    query, qv = draw_matrix(data, b, d, dtype, kinds=FINITE_ROW_KINDS, bases=("ints",),
                            layouts=tuple(x for x in LAYOUTS if not x.startswith("numpy")))
    negs, nv = draw_matrix(data, kneg, d, dtype, bases=("ints",),
                           layouts=tuple(x for x in LAYOUTS if not x.startswith("numpy")))
    metric = data.draw(st.sampled_from(("dot", "cosine")))
    n_hard, n_mix, n_query = data.draw(st.integers(1, kneg)), data.draw(st.integers(0, 3)), data.draw(st.integers(0, 2))
    _, hard = R.select_from_scores(R.similarity(qv, finite_or_nan(nv), metric), n_hard)
    if bool((hard < 0).any()):
        with pytest.raises(ValueError, match="n_hard"):
            hnsample.mix_hard_negatives(query, negs, n_hard, n_mix, n_query, metric=metric, seed=5)
        return
    got = hnsample.mix_hard_negatives(query, negs, n_hard, n_mix, n_query, metric=metric, seed=5)
    again = hnsample.mix_hard_negatives(qv, nv, n_hard, n_mix, n_query, metric=metric, seed=5)
    assert torch.equal(got.embeddings, again.embeddings)
    for i in range(b):
        members = set(hard[i].tolist())
        assert set(got.second[i].tolist()) <= members
        assert set(got.first[i, :n_mix].tolist()) <= members and (got.first[i, n_mix:] == -1).all()
    norms = got.embeddings.double().norm(dim=-1)  # 0 only where the mixed vectors cancel (or are zero rows)
    assert bool((((norms - 1).abs() < 1e-5) | (norms == 0)).all())


# ----------------------------------------------------------------------------------------------------
# Gradients of the selections: through the selected entries only


@fuzz(80)
@given(data=st.data())
def test_selection_gradients_flow_to_the_selected_entries(data):
    """d sum_t w_t s_t: for topk_similarity the reference formula's gradient gathered at the selected
    pairs; for topk_from_scores and topk_from_candidates w_t at the selected entries, zero elsewhere."""
    dtype = data.draw(st.sampled_from((torch.float32, torch.float64)))
    b, n, d = data.draw(st.integers(0, 5)), data.draw(st.integers(0, 10)), data.draw(st.integers(1, 8))
    metric = data.draw(st.sampled_from(("dot", "cosine")))
    _, q = draw_matrix(data, b, d, dtype, kinds=("zero", "duplicate", "nan"), bases=("eighths",))
    _, c = draw_matrix(data, n, d, dtype, kinds=("zero", "duplicate", "nan"), bases=("eighths",))
    k = data.draw(st.integers(0, n + 2))
    sel = dict(skip_top=data.draw(st.integers(0, 2)), exclude=draw_ids(data, b, n))
    qg, cg = q.clone().requires_grad_(True), c.clone().requires_grad_(True)
    got = hnsample.topk_similarity(qg, cg, k, metric=metric, **sel)
    w = torch.from_numpy(np.random.default_rng(k).standard_normal((b, k))).to(dtype)
    valid = got.indices >= 0
    gq, gc = gradients((got.scores * w).where(valid, 0).sum(), [qg, cg])
    # The reference formula over the rows that can be selected (a row holding NaN never is).
    qr, cr = q.clone().requires_grad_(True), c.clone().requires_grad_(True)
    full = R.differentiable_similarity(finite_or_nan(qr).nan_to_num(0.0), finite_or_nan(cr).nan_to_num(0.0), metric)
    picked = full.gather(1, got.indices.clamp_min(0)) if n else full.new_zeros((b, k))
    rq, rc = gradients((picked * w).where(valid, 0).sum(), [qr, cr])
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gq, rq, **tol)
    torch.testing.assert_close(gc, rc, **tol)

    scores, s = draw_matrix(data, b, n, dtype) if n else (torch.empty((b, 0), dtype=dtype),) * 2
    leaf = s.clone().requires_grad_(True)
    top = hnsample.topk_from_scores(leaf, k, **sel)
    (g,) = gradients((top.scores * w).where(top.indices >= 0, 0).sum(), [leaf])
    want = torch.zeros((b, n), dtype=dtype)
    for i, t in zip(*(top.indices >= 0).nonzero(as_tuple=True), strict=True):
        want[i, top.indices[i, t]] += w[i, t]
    assert torch.equal(g, want)
    ids = torch.arange(n).expand(b, n).flip(1)  # every id listed, in reverse
    leaf = s.flip(1).clone().requires_grad_(True)
    top = hnsample.topk_from_candidates(ids, leaf, k, num_candidates=n, **sel)
    (g,) = gradients((top.scores * w).where(top.indices >= 0, 0).sum(), [leaf])
    assert torch.equal(g, want.flip(1))


# ----------------------------------------------------------------------------------------------------
# Bad input: ValueError or TypeError naming the argument, whatever the layout of the good ones


def _topk(**bad):
    def call(q, c):
        kw = {"queries": q, "candidates": c, "k": 2, **bad}
        return hnsample.topk_similarity(kw.pop("queries"), kw.pop("candidates"), kw.pop("k"), **kw)
    return call


def _from_scores(**bad):
    def call(q, c):
        kw = {"scores": q, "k": 2, **bad}
        return hnsample.topk_from_scores(kw.pop("scores"), kw.pop("k"), **kw)
    return call


def _candidates(ids_of, **bad):
    return lambda q, c: hnsample.topk_from_candidates(ids_of(q), q, 2, **bad)


def _info_nce(**bad):
    def call(q, c):
        kw = {"docs": q, **bad}
        return hnsample.info_nce(q, kw.pop("docs"), **kw)
    return call


def _labels_of(q):
    return torch.arange(q.shape[0]) % 2


BAD_CALLS = {
    "k": [_topk(k=-1), _topk(k=1.5), _topk(k=True), _topk(k=np.float64(2))],
    "metric": [_topk(metric="euclid"), _topk(metric=None)],
    "queries": [_topk(queries=torch.ones(3)), _topk(queries=[[1.0, 2.0]]), _topk(queries=torch.ones(2, 3, 1))],
    "candidates": [_topk(candidates=torch.ones(4, 3, dtype=torch.int32))],
    "dimension": [_topk(candidates=torch.ones(4, 99))],
    "dtype": [lambda q, c: hnsample.topk_similarity(q, c.double() if q.dtype != torch.float64 else c.float(), 2)],
    "positives": [lambda q, c: hnsample.topk_similarity(q, c, 2, positives=torch.ones(q.shape[0], 1)),
                  lambda q, c: hnsample.topk_similarity(q, c, 2, positives=torch.full((q.shape[0], 1), c.shape[0])),
                  lambda q, c: hnsample.topk_similarity(q, c, 2, positives=torch.zeros(q.shape[0] + 1, 1, dtype=torch.long)),
                  lambda q, c: hnsample.topk_similarity(q, c, 2, positives=torch.full((q.shape[0], 1), -2))],
    "exclude": [lambda q, c: hnsample.topk_similarity(
        q, c, 2, exclude=torch.full((q.shape[0], 1), 2**64 - 1, dtype=torch.uint64))],
    "candidate_labels": [lambda q, c: hnsample.topk_similarity(q, c, 2, query_labels=_labels_of(q),
                                                               candidate_labels=torch.zeros(c.shape[0] + 1).long()),
                         lambda q, c: hnsample.topk_similarity(q, c, 2, query_labels=_labels_of(q),
                                                               candidate_labels=torch.zeros(c.shape[0]))],
    "query_labels and candidate_labels": [lambda q, c: hnsample.topk_similarity(q, c, 2, query_labels=_labels_of(q))],
    "min_score": [_topk(min_score=math.nan), _topk(min_score="0")],
    "max_score": [_topk(max_score=math.inf)],
    "absolute_margin": [_topk(absolute_margin=-math.inf), _topk(absolute_margin=torch.tensor(1.0))],
    "relative_margin": [_topk(relative_margin=math.nan)],
    "positive_scores": [lambda q, c: hnsample.topk_similarity(q, c, 2, absolute_margin=0.1,
                                                              positive_scores=torch.zeros(q.shape[0] + 1))],
    "skip_top": [_topk(skip_top=-1), _topk(skip_top=0.5)],
    "pool": [_topk(pool=0)],
    "sampling": [_topk(sampling="gumbel"), _topk(sampling=1)],
    "temperature": [_topk(sampling="softmax", temperature=0.0), _topk(sampling="softmax", temperature=1e-320),
                    _topk(sampling="softmax", temperature=math.nan), _topk(temperature="hot")],
    "seed": [_topk(sampling="uniform", seed=1.5)],
    "generator": [_topk(sampling="uniform", generator=3)],
    "block_size": [_topk(block_size=0)],
    "scores": [_from_scores(scores=torch.ones(2, 3, 4)), _from_scores(scores=torch.ones(2, 3, dtype=torch.int64))],
    "candidate_ids": [_candidates(lambda q: torch.zeros(q.shape)),
                      _candidates(lambda q: torch.zeros(q.shape[0], q.shape[1] + 1, dtype=torch.long)),
                      _candidates(lambda q: torch.zeros(q.shape, dtype=torch.long)),  # an id twice in a row
                      _candidates(lambda q: torch.full(q.shape, -3, dtype=torch.long))],
    "num_candidates": [_candidates(lambda q: torch.full(q.shape, -1, dtype=torch.long), num_candidates=-1)],
    "reduction": [_info_nce(reduction="avg")],
    "tau_plus": [_info_nce(tau_plus=1.0)],
    "hcl_beta": [_info_nce(hcl_beta=-1.0)],
    "temperature ": [_info_nce(temperature=0.0), _info_nce(temperature=torch.tensor([1.0, 2.0]))],
    "symmetric": [_info_nce(symmetric="yes")],
    "docs": [_info_nce(docs=torch.ones(3, 99))],
    "positive_ids": [lambda q, c: hnsample.info_nce(q, c, positive_ids=torch.zeros(q.shape[0], 2, dtype=torch.long))],
    "guide_queries and guide_docs": [_info_nce(guide_queries=torch.ones(1, 2))],
    "labels": [lambda q, c: hnsample.batch_hard(q, torch.zeros(q.shape[0])),
               lambda q, c: hnsample.semi_hard(q, torch.zeros(q.shape[0] + 1, dtype=torch.long), 0.5)],
    "margin": [lambda q, c: hnsample.semi_hard(q, _labels_of(q), 0.0),
               lambda q, c: hnsample.triplet_margin_loss(q, (torch.tensor([0]),) * 3, math.nan)],
    "negatives_per_pair": [lambda q, c: hnsample.semi_hard(q, _labels_of(q), 0.5, negatives_per_pair=0)],
    "triplets.anchors": [lambda q, c: hnsample.triplet_margin_loss(q, (torch.tensor([q.shape[0]]), torch.tensor([0]),
                                                                       torch.tensor([0])), 0.1)],
    "n_hard": [lambda q, c: hnsample.mix_hard_negatives(q, c, c.shape[0] + 1, 2)],
    "num_negatives": [lambda q, c: hnsample.mine_hard_negatives(q, c, num_negatives=-1, progress=False,
                                                                verbose=False)],
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
@fuzz(6)
@given(data=st.data())
def test_bad_input_names_the_argument(name, data):
    call = data.draw(st.sampled_from(BAD_CALLS[name]))
    dtype = data.draw(st.sampled_from(DTYPES))
    b, n = data.draw(st.integers(1, 4)), data.draw(st.integers(3, 6))
    layouts = tuple(x for x in LAYOUTS if not x.startswith("numpy"))
    q, _ = draw_matrix(data, b, 3, dtype, kinds=FINITE_ROW_KINDS, layouts=layouts)
    c, _ = draw_matrix(data, n, 3, dtype, kinds=FINITE_ROW_KINDS, layouts=layouts)
    with pytest.raises((ValueError, TypeError)) as err:
        call(q, c)
    assert name.strip() in str(err.value), (name, err.value)
    assert type(err.value) in (ValueError, TypeError)  # not a kernel ParamError or an internal error
