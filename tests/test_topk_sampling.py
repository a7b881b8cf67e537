"""The sampling modes: determinism, independence of blocking, the window they draw from, and
goodness-of-fit of the drawn subsets to their exact distributions.

The noise is a pure function of (seed, query row, candidate id), so B identical query rows in one call
are B independent draws; the distribution tests use that (with a stride-0 expanded score row) instead
of thousands of calls. Seeds are fixed, so every test is deterministic.
"""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from scipy import stats

import hnsample
from hnsample import _reference as R
from hnsample.engine import SelectionState, run_selection

DRAWS = 12000  # rows per distribution test: expected counts >= ~60 per cell below
P_MIN = 1e-4  # fixed seeds: a correct sampler passes with probability 1 - P_MIN per test

# One row of distinct scores with a few excluded ids; the eligible ranking is by score descending.
ROW = torch.tensor([0.3, 1.9, -0.4, 1.2, 0.8, 2.4, -1.1, 0.1, 1.5, 0.6, -0.2, 1.0])
EXCLUDED = [5, 9]


def eligible_ranking() -> list[int]:
    ids = [j for j in range(len(ROW)) if j not in EXCLUDED]
    return sorted(ids, key=lambda j: (-float(ROW[j]), j))


def draw_rows(k: int, draws: int = DRAWS, seed: int = 2024, **kw) -> torch.Tensor:
    """(draws, k) sampled ids for `draws` copies of ROW (one call, stride-0 rows)."""
    scores = ROW.unsqueeze(0).expand(draws, -1)
    exclude = torch.tensor([EXCLUDED]).expand(draws, -1)
    out = hnsample.topk_from_scores(scores, k, exclude=exclude, seed=seed, **kw)
    return out.indices


def subset_counts(indices: torch.Tensor) -> Counter:
    return Counter(tuple(sorted(r)) for r in indices.tolist())


def chi_square_pvalue(counts: Counter, probs: dict) -> float:
    assert set(counts) <= set(probs), f"drew subsets of probability 0: {set(counts) - set(probs)}"
    keys = sorted(probs)
    observed = np.array([counts.get(key, 0) for key in keys], dtype=np.float64)
    expected = np.array([probs[key] for key in keys]) * observed.sum()
    return float(stats.chisquare(observed, expected).pvalue)


def softmax_subset_probs(window: list[int], k: int, temperature: float) -> dict:
    """P(subset) when k items are drawn one after another without replacement, each with probability
    proportional to exp(s / T) among those left (what Gumbel-top-k realizes)."""
    w = {j: math.exp(float(ROW[j]) / temperature) for j in window}
    probs: dict = {}
    for order in itertools.permutations(window, k):
        left, p = sum(w.values()), 1.0
        for j in order:
            p *= w[j] / left
            left -= w[j]
        key = tuple(sorted(order))
        probs[key] = probs.get(key, 0.0) + p
    return probs


def uniform_subset_probs(window: list[int], k: int) -> dict:
    subsets = list(itertools.combinations(sorted(window), k))
    return {s: 1.0 / len(subsets) for s in subsets}


# ----------------------------------------------------------------------------------------------------
# Distributions


@pytest.mark.parametrize("skip_top,pool", [(0, None), (2, 6), (3, None)], ids=["all", "window", "stream"])
@pytest.mark.parametrize("temperature", [0.7, 2.0])
def test_softmax_single_draw_is_the_softmax_over_the_window(skip_top, pool, temperature):
    ranking = eligible_ranking()
    window = ranking[skip_top:] if pool is None else ranking[skip_top : skip_top + pool]
    got = draw_rows(1, skip_top=skip_top, pool=pool, sampling="softmax", temperature=temperature)
    probs = softmax_subset_probs(window, 1, temperature)
    assert chi_square_pvalue(subset_counts(got), probs) > P_MIN
    # and the sampler does prefer high scores: the best window item is drawn most often
    counts = Counter(got[:, 0].tolist())
    assert counts.most_common(1)[0][0] == window[0]


@pytest.mark.parametrize(
    "skip_top,pool,k", [(1, 5, 2), (0, 4, 3), (4, None, 2)], ids=["window", "k3", "stream"]
)
def test_softmax_subsets_without_replacement(skip_top, pool, k):
    ranking = eligible_ranking()
    window = ranking[skip_top:] if pool is None else ranking[skip_top : skip_top + pool]
    got = draw_rows(k, skip_top=skip_top, pool=pool, sampling="softmax", temperature=1.0, seed=77)
    assert chi_square_pvalue(subset_counts(got), softmax_subset_probs(window, k, 1.0)) > P_MIN


@pytest.mark.parametrize(
    "skip_top,pool,k",
    [(1, 6, 2), (2, 8, 3), (3, None, 2), (0, None, 1)],
    ids=["window", "k3", "stream", "all"],
)
def test_uniform_subsets_and_inclusion_frequencies(skip_top, pool, k):
    ranking = eligible_ranking()
    window = ranking[skip_top:] if pool is None else ranking[skip_top : skip_top + pool]
    got = draw_rows(k, skip_top=skip_top, pool=pool, sampling="uniform", seed=5)
    assert chi_square_pvalue(subset_counts(got), uniform_subset_probs(window, k)) > P_MIN
    # marginal inclusion: each window item with probability k / |window|
    inclusion = Counter(got.reshape(-1).tolist())
    assert set(inclusion) == set(window)
    observed = np.array([inclusion[j] for j in window], dtype=np.float64)
    expected = np.full(len(window), DRAWS * k / len(window))
    # inclusion counts are negatively correlated across items, which only makes this conservative
    assert stats.chisquare(observed, expected).pvalue > P_MIN


def test_uniform_ignores_scores_and_softmax_temperature_limits():
    ranking = eligible_ranking()
    window = ranking[1:7]
    # a very high temperature flattens the softmax to uniform
    got = draw_rows(2, skip_top=1, pool=6, sampling="softmax", temperature=1e6, seed=3)
    assert chi_square_pvalue(subset_counts(got), uniform_subset_probs(window, 2)) > P_MIN
    # a very low temperature makes it the top of the window (score gaps / T >> Gumbel noise)
    got = draw_rows(3, draws=500, skip_top=1, pool=6, sampling="softmax", temperature=1e-4, seed=3)
    assert (got == torch.tensor(sorted(window[:3], key=lambda j: -float(ROW[j])))).all()


@pytest.mark.parametrize("sampling", ["uniform", "softmax"])
def test_sampling_over_many_seeds(sampling):
    """Across seeds (one row each, two draws) the subsets follow the same law as across rows of one call."""
    window = eligible_ranking()[2:7]
    scores, exclude = ROW.unsqueeze(0), torch.tensor([EXCLUDED])
    draws = [
        hnsample.topk_from_scores(scores, 2, exclude=exclude, skip_top=2, pool=5, sampling=sampling, seed=s)
        .indices[0]
        .tolist()
        for s in range(2000)
    ]
    probs = softmax_subset_probs(window, 2, 1.0) if sampling == "softmax" else uniform_subset_probs(window, 2)
    assert chi_square_pvalue(subset_counts(torch.tensor(draws)), probs) > P_MIN


# ----------------------------------------------------------------------------------------------------
# The window and the shape of the result


@pytest.mark.parametrize("sampling", ["uniform", "softmax"])
@pytest.mark.parametrize("skip_top,pool", [(0, 3), (5, 10), (7, None), (0, None), (40, 5), (38, None)])
def test_samples_come_from_the_window_and_are_sorted(sampling, skip_top, pool):
    rng = np.random.default_rng(21)
    b, n, k = 64, 50, 4
    scores = torch.from_numpy(rng.standard_normal((b, n))).to(torch.float32)
    exclude = torch.from_numpy(rng.integers(0, n, (b, 6)))
    out = hnsample.topk_from_scores(
        scores, k, exclude=exclude, skip_top=skip_top, pool=pool, sampling=sampling, seed=9
    )
    for i in range(b):
        ranked = [
            j
            for j in torch.argsort(-scores[i].double(), stable=True).tolist()
            if j not in exclude[i].tolist()
        ]
        window = ranked[skip_top:] if pool is None else ranked[skip_top : skip_top + pool]
        chosen = [j for j in out.indices[i].tolist() if j >= 0]
        assert len(chosen) == min(k, len(window))
        assert set(chosen) <= set(window)
        assert len(set(chosen)) == len(chosen)
        assert (out.scores[i, : len(chosen)].diff() <= 0).all()
        assert torch.equal(out.scores[i, : len(chosen)], scores[i, chosen])
        assert (out.scores[i, len(chosen) :] == -math.inf).all() and (
            out.indices[i, len(chosen) :] == -1
        ).all()
    assert_same = R.select_from_scores(
        scores, k, exclude=exclude, skip_top=skip_top, pool=pool, sampling=sampling, seed=9
    )
    assert torch.equal(out.indices, assert_same[1])


@pytest.mark.parametrize("sampling", ["uniform", "softmax"])
def test_window_no_larger_than_k_is_taken_whole(sampling):
    scores = torch.from_numpy(np.random.default_rng(22).standard_normal((20, 30))).to(torch.float32)
    top = hnsample.topk_from_scores(scores, 5, skip_top=3, pool=4)
    for seed in range(5):
        out = hnsample.topk_from_scores(scores, 5, skip_top=3, pool=4, sampling=sampling, seed=seed)
        assert torch.equal(out.indices, top.indices) and torch.equal(out.scores, top.scores)


# ----------------------------------------------------------------------------------------------------
# Determinism and independence of blocking


def _problem():
    rng = np.random.default_rng(23)
    q = torch.from_numpy(rng.integers(-3, 4, (12, 4)).astype(np.float32))
    c = torch.from_numpy(rng.integers(-3, 4, (45, 4)).astype(np.float32))
    return q, c, torch.from_numpy(rng.integers(-1, 45, (12, 2)))


@pytest.mark.parametrize("sampling", ["uniform", "softmax"])
@pytest.mark.parametrize(
    "window", [dict(), dict(skip_top=3), dict(skip_top=2, pool=10)], ids=["all", "stream", "pool"]
)
def test_determinism_and_block_size_independence(sampling, window):
    q, c, pos = _problem()
    kw = dict(window, sampling=sampling, positives=pos, absolute_margin=0.0)
    first = hnsample.topk_similarity(q, c, 5, seed=1234, **kw)
    assert torch.equal(first.indices, hnsample.topk_similarity(q, c, 5, seed=1234, **kw).indices)
    for block_size in (1, 7, 64):
        again = hnsample.topk_similarity(q, c, 5, seed=1234, block_size=block_size, **kw)
        assert torch.equal(again.indices, first.indices) and torch.equal(again.scores, first.scores)
    # the similarity path and the score-matrix path draw the same noise for the same (row, id)
    s = R.similarity(q, c)
    from_scores = hnsample.topk_from_scores(s, 5, seed=1234, **kw)
    assert torch.equal(from_scores.indices, first.indices)
    assert torch.equal(first.indices, R.topk_similarity(q, c, 5, seed=1234, **kw)[1])
    # other seeds give other samples
    others = [hnsample.topk_similarity(q, c, 5, seed=s, **kw).indices for s in (1235, 2**40, 2**63 - 1)]
    assert all(not torch.equal(o, first.indices) for o in others)


@pytest.mark.parametrize("sampling", ["uniform", "softmax"])
def test_generator_state_determines_the_sample(sampling):
    q, c, pos = _problem()
    kw = dict(sampling=sampling, positives=pos, skip_top=1)
    g1, g2 = torch.Generator().manual_seed(42), torch.Generator().manual_seed(42)
    a = hnsample.topk_similarity(q, c, 4, generator=g1, **kw)
    b = hnsample.topk_similarity(q, c, 4, generator=g2, **kw)
    assert torch.equal(a.indices, b.indices)
    # the generator advances: the next call draws a new sample, again reproducibly
    a2 = hnsample.topk_similarity(q, c, 4, generator=g1, **kw)
    assert not torch.equal(a2.indices, a.indices)
    assert torch.equal(a2.indices, hnsample.topk_similarity(q, c, 4, generator=g2, **kw).indices)
    # different generator seeds differ
    g3 = torch.Generator().manual_seed(43)
    assert not torch.equal(hnsample.topk_similarity(q, c, 4, generator=g3, **kw).indices, a.indices)
    # the default generator follows torch.manual_seed
    torch.manual_seed(7)
    d1 = hnsample.topk_similarity(q, c, 4, **kw)
    torch.manual_seed(7)
    d2 = hnsample.topk_similarity(q, c, 4, **kw)
    assert torch.equal(d1.indices, d2.indices)
    # "top" does not consume randomness
    state = g1.get_state()
    hnsample.topk_similarity(q, c, 4, generator=g1)
    assert torch.equal(state, g1.get_state())


def test_sampling_rows_are_independent_of_batch_composition():
    """The noise row is the query's row index: a row's sample does not depend on the other rows."""
    q, c, pos = _problem()
    full = hnsample.topk_similarity(q, c, 3, sampling="softmax", seed=11, positives=pos)
    head = hnsample.topk_similarity(q[:5], c, 3, sampling="softmax", seed=11, positives=pos[:5])
    assert torch.equal(full.indices[:5], head.indices)


@pytest.mark.parametrize("sampling", ["top", "uniform", "softmax"])
@pytest.mark.parametrize("window", [dict(skip_top=2), dict(skip_top=1, pool=6)], ids=["stream", "pool"])
def test_row_shards_with_noise_row_offset_equal_the_whole(sampling, window, make_selection):
    """A state over query rows [r0, r1) with noise_row_offset=r0, fed candidate chunks one after the
    other, reproduces rows r0..r1 of the whole selection (the mining pipeline's decomposition)."""
    q, c, pos = _problem()
    whole = hnsample.topk_similarity(q, c, 4, positives=pos, sampling=sampling, seed=21, **window)
    for r0, r1 in ((0, 5), (5, 12)):
        sel = make_selection(
            r1 - r0, c.shape[0], 4, positives=pos[r0:r1], sampling=sampling, seed=21, **window
        )
        state = SelectionState(sel, r1 - r0, q.device, noise_row_offset=r0)
        for j0 in range(0, c.shape[0], 13):
            run_selection(q[r0:r1], c[j0 : j0 + 13], sel, "dot", 50, state=state, col_offset=j0)
        s, j = state.finalize()
        assert torch.equal(j, whole.indices[r0:r1]) and torch.equal(s.float(), whole.scores[r0:r1])
