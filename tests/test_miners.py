"""In-batch miners and the triplet margin loss against the reference (hnsample._reference: the miners'
choices on canonical scores) and, when installed, pytorch-metric-learning."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hnsample import Triplets, batch_hard, semi_hard, settings, triplet_margin_loss
from hnsample import _reference as R
from hnsample.engine.intervals import (
    BatchScores,
    canonical_distance_scores,
    canonical_distance_scores_at,
    canonical_distance_scores_torch,
)
from hnsample.miners import pairwise_similarity

METRICS = ["cosine", "dot", "euclidean"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]
MARGINS = {"cosine": 0.4, "dot": 1.5, "euclidean": 0.5}


def _batch(b=24, d=6, classes=6, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, d, generator=g, dtype=dtype), torch.randint(0, classes, (b,), generator=g)


def _triples(t: Triplets):
    return list(zip(t.anchors.tolist(), t.positives.tolist(), t.negatives.tolist(), strict=True))


def hostile_batch(rng: np.random.Generator, b: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch holding what breaks approximate scores: exact duplicates (of one label and of others), rows
    one ulp apart, norms from 1e-30 to 1e30, cancelling terms, zero vectors, NaN and inf rows."""
    e = rng.standard_normal((b, d)).astype(np.float32)
    e[1:5] = e[0]  # exact duplicates
    e[5] = e[0]
    e[5, 0] = np.nextafter(e[0, 0], np.float32(np.inf))  # one ulp apart
    e[6] = e[0]
    e[6, d - 1] = np.nextafter(e[0, d - 1], np.float32(-np.inf))
    e[7] = -e[0]
    e[8:14] *= (np.float32(10.0) ** rng.integers(-30, 31, 6).astype(np.float32))[:, None]
    e[14, : d // 2], e[14, d // 2:] = 1e6, -1e6  # huge terms, small dot products
    e[14, 0] += 1.0
    e[15] = e[16] = 0  # zero vectors
    e[17, 2] = np.nan
    e[18, 0] = np.inf
    e[19:23] = e[23]  # a second group of duplicates
    labels = rng.integers(0, 4, b)
    labels[[0, 1, 2]] = [0, 0, 1]  # duplicates that are positives and negatives of each other
    return torch.from_numpy(e).to(dtype), torch.from_numpy(labels)


def tied_batch(m: int, d: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Groups of six rows whose scores tie exactly while their float32 sums differ: an anchor x symmetric
    in its two halves (x_t = x_{t+h}); a close positive; a far positive f (about -x) and f' = f with its
    halves swapped; negatives g (near x) and g' = g swapped (another label). x.f = x.f' and x.g = x.g' exactly (the same
    products in another order), so their canonical scores tie as well (float64 sums of the same
    products), while a float32 GEMM, adding in another order, rounds them apart about half the time.
    Returns (embeddings, labels, m); group i's rows are i, m + i, ..., 5m + i."""
    rng = np.random.default_rng(3)
    h = d // 2
    x = rng.standard_normal((m, d)).astype(np.float32)
    x[:, h:2 * h] = x[:, :h]

    def swapped(y):
        z = y.copy()
        z[:, :h], z[:, h:2 * h] = y[:, h:2 * h], y[:, :h]
        return z

    close = x + np.float32(0.02) * rng.standard_normal((m, d)).astype(np.float32)
    far = -x + rng.standard_normal((m, d)).astype(np.float32)
    neg = x + np.float32(0.1) * rng.standard_normal((m, d)).astype(np.float32)
    e = np.concatenate([x, close, far, swapped(far), neg, swapped(neg)])
    labels = np.concatenate([np.arange(m)] * 4 + [m + np.arange(m)] * 2)
    return torch.from_numpy(e), torch.from_numpy(labels), m


# (screening product, block size, threads): every one must give the reference's triplets.
SETUPS = (("fp32", None, 1), ("fp32", 997, 2), ("fp32", 4001, 1), ("bf16", None, 2), ("bf16", 997, 1))


def assert_miners_equal_reference(e, lab, metric, setups=SETUPS):
    """batch_hard and semi_hard (1, 3 and all negatives per pair) equal the reference triplet for triplet,
    for every screening product, block size and thread count given."""
    margin = MARGINS[metric]
    want = {"hard": R.batch_hard(e, lab, metric)}
    for k in (1, 3, None):
        want[k] = R.semi_hard(e, lab, margin, metric, k)
    for product, block, threads in setups:
        with settings.override(block_size=block or settings.current().block_size, cpu_threads=threads,
                               screen_product=product):
            assert _triples(batch_hard(e, lab, metric=metric)) == want["hard"], (product, block, threads)
            for k in (1, 3, None):
                got = _triples(semi_hard(e, lab, margin, metric=metric, negatives_per_pair=k))
                assert got == want[k], (product, block, threads, k)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_batch_hard_matches_definition(metric, dtype):
    e, lab = _batch(dtype=dtype)
    assert _triples(batch_hard(e, lab, metric=metric)) == R.batch_hard(e, lab, metric)


def test_batch_hard_ties_nan_and_lonely_anchors():
    e = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [float("nan"), 0.0], [0.5, 0.5]])
    lab = torch.tensor([0, 0, 1, 1, 1, 7])
    t = batch_hard(e, lab, metric="dot")
    # Anchor 0: only positive 1; negatives 2 (s=1), 3 (s=0), 4 (NaN, never chosen), 5 (0.5) -> 2.
    # Anchor 2: positives 3 (s=0), 4 (NaN) -> 3. Anchor 5 has no positive and is dropped.
    # Anchor 4's scores are all NaN: no positive, no negative.
    assert _triples(t) == [(0, 1, 2), (1, 0, 2), (2, 3, 0), (3, 2, 5)]


def test_batch_hard_non_contiguous_and_empty():
    e, lab = _batch()
    wide = torch.stack([e, 2 * e], dim=2)[..., 0]
    assert not wide.is_contiguous()
    assert _triples(batch_hard(wide, lab)) == R.batch_hard(e, lab, "cosine")
    empty = batch_hard(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))
    assert all(t.numel() == 0 for t in empty)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("per_pair", [1, 3, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_semi_hard_matches_definition(metric, per_pair, dtype):
    e, lab = _batch(seed=1, dtype=dtype)
    margin = 0.4 if metric != "dot" else 1.5
    got = _triples(semi_hard(e, lab, margin, metric=metric, negatives_per_pair=per_pair))
    assert got == R.semi_hard(e, lab, margin, metric, per_pair)
    assert got


def test_semi_hard_window_is_half_open():
    # s_ap = 0.5; negatives at 0.5 (not farther: excluded), 0.3 (inside), 0.2 (on the margin: included),
    # 0.1 (outside).
    e = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.5, 2.0], [0.3, 0.0], [0.2, 0.0], [0.1, 0.0]],
                     dtype=torch.float64)
    lab = torch.tensor([0, 0, 1, 2, 3, 4])
    t = semi_hard(e, lab, 0.3, metric="dot", negatives_per_pair=None)
    assert [x for x in _triples(t) if x[:2] == (0, 1)] == [(0, 1, 3), (0, 1, 4)]


def test_semi_hard_window_edges_on_canonical_scores():
    """float32 scores exactly on both edges: s_ap = 0.5, negatives at 0.5 (not farther), 0.25 (inside),
    0.125 = s_ap - margin (on the closed edge: inside), 0.0625 (outside). Every product here is exact."""
    e = torch.tensor([[1.0, 0.0], [0.5, 1.0], [0.5, 2.0], [0.25, 0.0], [0.125, 0.0], [0.0625, 0.0]])
    lab = torch.tensor([0, 0, 1, 2, 3, 4])
    for dtype in DTYPES:
        t = semi_hard(e.to(dtype), lab, 0.375, metric="dot", negatives_per_pair=None)
        assert [x for x in _triples(t) if x[:2] == (0, 1)] == [(0, 1, 3), (0, 1, 4)]


# ----------------------------------------------------------------------------------------------------
# Canonical scores: the same triplets whatever the GEMM, thread count and block size


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_random_batches_equal_the_canonical_reference(metric, dtype):
    e, lab = _batch(b=40, d=19, classes=5, seed=7)
    assert_miners_equal_reference(e.to(dtype), lab, metric)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_hostile_batches_equal_the_canonical_reference(metric, dtype):
    e, lab = hostile_batch(np.random.default_rng(5), 40, 20, dtype)
    assert_miners_equal_reference(e, lab, metric)


@pytest.mark.parametrize("metric", METRICS)
def test_near_ties_go_to_the_lower_index_whatever_the_gemm(metric):
    """Scores that tie exactly (the same products summed in another order) resolve to the lower index.
    The float32 GEMM the miners used to rank rounds about half of these ties apart, so its choices
    differed from these (and between BLAS builds)."""
    e, lab, m = tied_batch(32, 37)
    s = R.batch_scores(e, metric)
    group = torch.arange(m)
    far_tie = s[group, 2 * m + group] == s[group, 3 * m + group]
    neg_tie = s[group, 4 * m + group] == s[group, 5 * m + group]
    assert far_tie.sum() >= m // 2 and neg_tie.sum() >= m // 2  # the construction makes ties
    t = batch_hard(e, lab, metric=metric)
    assert t.anchors[:m].tolist() == list(range(m))
    # Wherever the least similar positive is f or f' (they tie), it is f; the same for the most similar
    # negative and g, g' (by construction most anchors have them as their hardest).
    pos, neg = t.positives[:m], t.negatives[:m]
    far = far_tie & ((pos == 2 * m + group) | (pos == 3 * m + group))
    near = neg_tie & ((neg == 4 * m + group) | (neg == 5 * m + group))
    assert far.sum() >= m // 4 and near.sum() >= m // 4
    assert (pos[far] == (2 * m + group)[far]).all() and (neg[near] == (4 * m + group)[near]).all()
    # semi-hard (x, close): where g or g' is the hardest semi-hard negative, it is g.
    one = _triples(semi_hard(e, lab, 1e3, metric=metric))
    hardest = [n for a, p, n in one if a < m and p == m + a and n in (4 * m + a, 5 * m + a) and neg_tie[a]]
    assert len(hardest) >= m // 8 and all(n < 5 * m for n in hardest)
    assert_miners_equal_reference(e, lab, metric, setups=(("fp32", None, 2), ("fp32", 40_001, 1)))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_many_exact_duplicates_tie_by_index_in_every_block(metric):
    """300 identical rows of two labels and five other rows: for a duplicate, every other duplicate scores
    the same (the most similar rows), so its hardest negative is the first duplicate of the other label
    and its hardest positive (its positives all tie) the first other duplicate of its label."""
    rng = np.random.default_rng(2)
    e = np.concatenate([np.repeat(rng.standard_normal((1, 24)).astype(np.float32), 300, axis=0),
                        rng.standard_normal((5, 24)).astype(np.float32)])
    lab = torch.cat([torch.arange(300) % 2, torch.full((5,), 2)])
    e = torch.from_numpy(e)
    for block in (None, 3001, 700):
        with settings.override(block_size=block or settings.current().block_size):
            t = batch_hard(e, lab, metric=metric)
        first = {0: 0, 1: 1}
        for a, p, n in _triples(t)[:300]:
            y = a % 2
            assert n == first[1 - y]
            assert p == (first[y] if a != first[y] else first[y] + 2)


# ----------------------------------------------------------------------------------------------------
# The certificate itself


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("product", ["fp32", "bf16"])
def test_intervals_hold_the_canonical_scores(metric, dtype, product):
    """lower <= s <= upper and the estimate inside, for every pair of random and hostile batches; a pair
    rescored holds s itself."""
    for e, _ in (_batch(b=30, d=19, seed=3, dtype=dtype), hostile_batch(np.random.default_rng(1), 30, 20, dtype)):
        s = R.batch_scores(e, metric)
        with settings.override(screen_product=product, block_size=400):
            scores = BatchScores(e, metric, lambda x, y: pairwise_similarity(x, y, metric))
            for blk in scores.blocks():
                want = s[blk.i0:blk.i1]
                known = want.isfinite()
                assert (blk.lower.isnan() == want.isnan()).all()
                assert (blk.lower[known] <= want[known]).all() and (want[known] <= blk.upper[known]).all()
                bounded = known & blk.lower.isfinite() & blk.upper.isfinite()
                assert (blk.lower[bounded] <= blk.values[bounded]).all()
                assert (blk.values[bounded] <= blk.upper[bounded]).all()
                every = torch.ones_like(known)
                scores.settle(blk, every)
                assert torch.equal(blk.values[~want.isnan()], want[~want.isnan()])


def test_canonical_distance_matches_the_reference_bit_for_bit():
    e, _ = hostile_batch(np.random.default_rng(4), 30, 21, torch.float32)
    e = e[e.isfinite().all(dim=1)]
    a, b = e.repeat_interleave(e.shape[0], 0), e.repeat(e.shape[0], 1)
    got = canonical_distance_scores(a, b).reshape(e.shape[0], e.shape[0])
    want = -R.canonical_squared_distances(e, e).sqrt().float()
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))
    assert (got.diagonal() == 0).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("d", [0, 1, 7, 8, 9, 21, 384])
def test_compiled_canonical_distances_equal_the_tensor_formula(dtype, d):
    """The C++ kernel (AVX2 for float32 rows, portable otherwise) gives the tensor formula's and the
    reference's bits on hostile rows (duplicates, one ulp apart, norms 1e-30..1e30, subnormals, zeros), with
    rows read in place through ids and a row stride above the width."""
    rng = np.random.default_rng(d)
    if d >= 20:
        e, _ = hostile_batch(rng, 30, d, dtype)
        e = e[e.isfinite().all(dim=1)]
    else:
        e = torch.from_numpy(rng.standard_normal((12, d)).astype(np.float32)).to(dtype)
        if d:
            e[3] = e[2]
            e[4, 0] = 1e-41 if dtype == torch.float32 else 0  # a subnormal term
    padded = torch.zeros((e.shape[0], d + 5), dtype=dtype)
    padded[:, :d] = e
    view = padded[:, :d]  # row stride d + 5
    n = e.shape[0]
    a, b = torch.arange(n).repeat_interleave(n), torch.arange(n).repeat(n)
    got = canonical_distance_scores_at(view, a, view, b)
    torch_formula = canonical_distance_scores_torch(e[a], e[b])
    want = -R.canonical_squared_distances(e, e).sqrt().float().reshape(-1)
    assert torch.equal(got.view(torch.int32), torch_formula.view(torch.int32))
    assert torch.equal(got.view(torch.int32), want.view(torch.int32))


def test_compiled_canonical_distances_refuse_bad_pairs():
    from hnsample import _C
    from hnsample._ext import dtype_code

    x = torch.randn(4, 3)
    out = torch.empty(1)
    for ids in ([4], [-1]):
        i = torch.tensor(ids)
        with pytest.raises(ValueError, match="outside"):
            canonical_distance_scores_at(x, i, x, torch.tensor([0]))
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        canonical_distance_scores_at(x.double(), torch.tensor([0]), x.double(), torch.tensor([1]))
    with pytest.raises(ValueError, match="strides"):
        _C.canonical_distances(x.data_ptr(), 2, 4, x.data_ptr(), 3, 4, dtype_code(x), 3,
                               torch.zeros(1, dtype=torch.int64).data_ptr(), torch.zeros(1, dtype=torch.int64).data_ptr(),
                               1, out.data_ptr(), 1)


KEY_KERNEL_CHECK = """
import math, torch
from hnsample.engine.distance_screen import key_columns, kth_key
g = torch.Generator().manual_seed(5)
for cols in (1, 8, 37, 200):
    t = torch.randn(7, cols + 3, generator=g)[:, :cols]  # row stride above the width
    t[t > 1.5] = math.nan
    t[0, :: 5] = math.inf
    t[1, :: 4] = -math.inf
    t[2] = torch.round(t[2] * 2) / 2  # ties
    a = torch.randint(0, 7, (20,), generator=g)
    floor = torch.randn(20, generator=g)
    floor[3] = -math.inf
    floor[4] = t[a[4], cols // 2]  # a floor equal to a key: that key counts
    for k in sorted({1, min(2, cols), min(5, cols), cols}):
        want = []
        for p in range(20):
            row = t[a[p]]
            v = row[row >= floor[p]].sort().values
            want.append(float(v[k - 1]) if v.numel() >= k else math.inf)
        assert kth_key(t, a, floor, k).tolist() == want, (cols, k)
    lo, hi = torch.randn(20, generator=g) - 0.5, torch.randn(20, generator=g) + 0.5
    hi[0] = math.inf
    lo[1], hi[2] = t[a[1], cols - 1], t[a[2], 0]  # bounds equal to keys: those keys are left out
    lo[5], hi[5] = -math.inf, math.inf
    inside = (t[a] > lo[:, None]) & (t[a] < hi[:, None])
    pr, col = inside.nonzero(as_tuple=True)
    got = key_columns(t, a, lo, hi, pr.numel())
    assert torch.equal(got[0], pr) and torch.equal(got[1], col), cols
    assert key_columns(t, a, lo, hi, pr.numel() - 1) is None or pr.numel() == 0
print("keys ok")
"""


def test_key_filter_kernels_equal_their_definition():
    """kth_key / key_columns (C++, AVX2 where the CPU has it) against the same selections in tensor
    operations: NaN keys never count, +-inf keys do, ties, rows of every tail length, a row stride above
    the width, a capacity one short."""
    exec(KEY_KERNEL_CHECK, {})


def test_key_filter_kernels_portable_path():
    import os
    import subprocess
    import sys

    env = dict(os.environ, HNSAMPLE_CPU_ISA="scalar")
    proc = subprocess.run([sys.executable, "-c", KEY_KERNEL_CHECK], capture_output=True, text=True, env=env, cwd="/")
    assert proc.returncode == 0 and "keys ok" in proc.stdout, proc.stderr


def test_key_filter_kernels_refuse_bad_arguments():
    from hnsample.engine.distance_screen import key_columns, kth_key

    t = torch.zeros(3, 4)
    with pytest.raises(ValueError, match="outside 3 rows"):
        kth_key(t, torch.tensor([3]), torch.zeros(1), 1)
    with pytest.raises(ValueError, match=r"k must lie in \[1, cols\]"):
        kth_key(t, torch.tensor([0]), torch.zeros(1), 5)
    with pytest.raises(ValueError, match="outside 3 rows"):
        key_columns(t, torch.tensor([-1]), torch.zeros(1), torch.ones(1), 4)
    with pytest.raises(TypeError, match="float32 CPU tensor"):
        kth_key(t.double(), torch.tensor([0]), torch.zeros(1), 1)


def _spy_on_the_key_filter(monkeypatch, name: str = "_screened_semi_hard") -> list[bool]:
    """The list that will hold, call by call, whether a miner's float32 key filter (semi_hard's, or
    batch_hard's "_screened_extremes") decided a block."""
    import hnsample.miner_choices as mc

    taken: list[bool] = []
    original = getattr(mc, name)

    def spy(*args):
        taken.append(original(*args))
        return taken[-1]

    monkeypatch.setattr(mc, name, spy)
    return taken


@pytest.mark.parametrize("metric, huge", [("euclidean", 1e19), ("dot", 1e20), ("cosine", 1e38)])
def test_screened_semi_hard_runs_and_falls_back(monkeypatch, metric, huge):
    """The float32 filter of semi_hard decides ordinary blocks (and rescores a few pairs per positive
    pair); blocks it cannot bound take the intervals' way: non-finite keys (|a - b|^2 or a . b overflow
    float32) or an infinite bound (cosine rows whose norm passes 2^126). Both give the reference's
    triplets."""
    taken = _spy_on_the_key_filter(monkeypatch)
    g = torch.Generator().manual_seed(11)
    e = torch.nn.functional.normalize(torch.randn(300, 32, generator=g), dim=1)
    lab = torch.randint(0, 40, (300,), generator=g)
    for k in (1, 3):
        with settings.override(block_size=300 * 4 * 64):
            taken.clear()
            got = _triples(semi_hard(e, lab, 0.3, metric=metric, negatives_per_pair=k))
        assert got == R.semi_hard(e, lab, 0.3, metric, k)
        assert len(taken) == 5 and all(taken)
    big = e.clone()
    big[::7] *= huge
    with settings.override(block_size=300 * 4 * 64):
        taken.clear()
        got = _triples(semi_hard(big, lab, 0.3, metric=metric))
    assert got == R.semi_hard(big, lab, 0.3, metric, 1)
    assert False in taken


def _near_tied_batch(seed: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """80 random anchors and 80 negatives (40 labels x 4), 8 of them one vector plus noise of 1e-6: their
    scores against any anchor lie within the GEMM's bound of each other, so only exact scores order them
    (few enough that the key filter keeps them all and decides every block)."""
    g = torch.Generator().manual_seed(seed)
    anchors = torch.randn(80, 24, generator=g)
    tied = torch.randn(1, 24, generator=g) + 1e-6 * torch.randn(8, 24, generator=g)
    return torch.cat([anchors, tied, torch.randn(72, 24, generator=g)]), torch.arange(160) // 4


def _wrong_under_noise(monkeypatch, taken: list[bool], want: list, seeds: int, run) -> int:
    """Runs ``run`` (in blocks of 32 anchor rows of the 160-row batch) with a GEMM whose error sits
    anywhere inside its bound (engine.intervals' screening product replaced by tests/noisy_product.py,
    ``seeds`` draws): each gives ``want`` with the key filter deciding every block. Returns how many draws
    of the control (the filter shown a quarter of the bound) got something else."""
    from noisy_product import NoisyProduct

    import hnsample.engine.intervals as iv

    real = iv.screen_product
    wrong = 0
    for seed in range(seeds):
        for shrink in (1.0, 0.25):
            monkeypatch.setattr(iv, "screen_product", lambda dtype, m, dim, device, shrink=shrink, seed=seed:
                                NoisyProduct(real(dtype, m, dim, device), m, 1.0, seed, shrink))
            taken.clear()
            with settings.override(block_size=160 * 4 * 32):
                got = run()
            if shrink == 1.0:
                assert got == want
                assert taken and all(taken)
            else:
                wrong += got != want
    monkeypatch.setattr(iv, "screen_product", real)
    return wrong


@pytest.mark.parametrize("metric", ["euclidean", "dot", "cosine"])
def test_screened_semi_hard_with_a_gemm_error_anywhere_inside_the_bound(monkeypatch, metric):
    """The key filter's cuts hold for any GEMM within its certificate: a product whose S^ sits anywhere
    inside its bound (half of the pairs at its edges) on near-tied negatives, ranked among themselves and
    cut by the window's lower edge, gives the reference's triplets; shown a bound a quarter of the true
    one (the control), the same filter gets some wrong."""

    taken = _spy_on_the_key_filter(monkeypatch)
    e, lab = _near_tied_batch()
    # Anchor 0's positive (row 1) just closer to it than the near-tied negatives (rows 80-87), and a margin
    # that puts the window's lower edge on one of them: the edge cuts through the ties.
    e[1] = e[80] + 0.01 * (e[0] - e[80])
    s = R.batch_scores(e, metric)
    ties = s[0, 80:88].sort().values
    edge_margin = float(s[0, 1] - ties[4])
    wrong = 0
    for k, margin in ((1, 2.0), (3, 2.0), (8, edge_margin)):
        want = R.semi_hard(e, lab, margin, metric, k)
        assert k < 8 or sum(1 for t in want if t[:2] == (0, 1) and 80 <= t[2] < 88) == 4
        wrong += _wrong_under_noise(monkeypatch, taken, want, 3, lambda k=k, margin=margin: _triples(
            semi_hard(e, lab, margin, metric=metric, negatives_per_pair=k)))
    assert wrong > 0


@pytest.mark.parametrize("rescore_all", [64, 0], ids=["positives_rescored", "positives_filtered"])
def test_screened_batch_hard_euclidean_runs_falls_back_and_holds_inside_the_bound(monkeypatch, rescore_all):
    """batch_hard "euclidean" decides ordinary blocks through the float32 filter and leaves blocks with
    overflowing keys to the intervals; with a GEMM whose error sits anywhere inside its bound, on
    near-tied negatives and positives (rows 80-87: two labels of one vector plus noise of 1e-6), the
    filter still gives the reference's choices (and, shown a quarter of the bound, it does not: the
    control). Label groups up to RESCORE_ALL_POSITIVES rows have every positive rescored; 0 makes the
    positives go through the filter too (as larger groups do)."""
    import hnsample.miner_choices as mc

    monkeypatch.setattr(mc, "RESCORE_ALL_POSITIVES", rescore_all)
    taken = _spy_on_the_key_filter(monkeypatch, "_screened_extremes")
    e, lab = _near_tied_batch()
    with settings.override(block_size=160 * 4 * 32):
        assert _triples(batch_hard(e, lab, metric="euclidean")) == R.batch_hard(e, lab, "euclidean")
        assert len(taken) == 5 and all(taken)
        big = e.clone()
        big[::9] *= 1e19
        taken.clear()
        assert _triples(batch_hard(big, lab, metric="euclidean")) == R.batch_hard(big, lab, "euclidean")
        assert False in taken
    want = R.batch_hard(e, lab, "euclidean")
    assert _wrong_under_noise(monkeypatch, taken, want, 4, lambda: _triples(batch_hard(e, lab, metric="euclidean")))


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"margin": 0.0}, ValueError, "margin"),
    ({"margin": float("inf")}, ValueError, "margin"),
    ({"margin": 0.1, "negatives_per_pair": 0}, ValueError, "negatives_per_pair"),
    ({"margin": 0.1, "metric": "l1"}, ValueError, "metric"),
])
def test_semi_hard_bad_inputs(kwargs, exc, match):
    e, lab = _batch()
    with pytest.raises(exc, match=match):
        semi_hard(e, lab, **kwargs)


@pytest.mark.parametrize("args, exc, match", [
    ((torch.randn(4), torch.arange(4)), ValueError, "embeddings"),
    ((torch.ones(4, 2, dtype=torch.int64), torch.arange(4)), TypeError, "embeddings"),
    ((torch.randn(4, 2), torch.arange(3)), ValueError, "labels"),
    ((torch.randn(4, 2), torch.arange(4).float()), TypeError, "labels"),
    (([[1.0]], torch.arange(1)), TypeError, "embeddings"),
])
def test_batch_hard_bad_inputs(args, exc, match):
    with pytest.raises(exc, match=match):
        batch_hard(*args)


@pytest.mark.parametrize("metric", METRICS)
def test_triplet_margin_loss_formula_and_gradient(metric):
    e, lab = _batch(seed=2, dtype=torch.float64)
    e.requires_grad_(True)
    t = batch_hard(e, lab, metric=metric)
    s = pairwise_similarity(e, e, metric)
    expected = torch.relu(s[t.anchors, t.negatives] - s[t.anchors, t.positives] + 0.2)
    torch.testing.assert_close(triplet_margin_loss(e, t, 0.2, metric=metric, reduction="none"), expected)
    torch.testing.assert_close(triplet_margin_loss(e, t, 0.2, metric=metric), expected.mean())
    torch.testing.assert_close(triplet_margin_loss(e, t, 0.2, metric=metric, reduction="sum"), expected.sum())
    nz = expected[expected > 0]
    nonzero_mean = triplet_margin_loss(e, t, 0.2, metric=metric, reduction="mean_nonzero")
    torch.testing.assert_close(nonzero_mean, nz.mean())
    assert torch.autograd.gradcheck(
        lambda x: triplet_margin_loss(x, t, 0.2, metric=metric), (e.detach().clone().requires_grad_(),))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triplet_margin_loss_zero_embedding_has_finite_gradient(dtype):
    """A used row that is exactly zero has cosine 0 with everything and a zero gradient. (Its gradient
    used to be about 1 / tiny = 8.5e37 in float32, -inf once cast back to a 16-bit dtype.)"""
    e = torch.tensor([[0.5, 0.25], [0.0, 0.0], [0.25, -0.5]], dtype=dtype, requires_grad=True)
    t = (torch.tensor([0, 1]), torch.tensor([1, 0]), torch.tensor([2, 2]))
    loss = triplet_margin_loss(e, t, 1.0, metric="cosine", reduction="none")
    assert loss.tolist() == [1.0, 1.0]  # every cosine here is 0: e0 . e2 = 0, and e1 is zero
    loss.sum().backward()
    assert torch.isfinite(e.grad).all() and (e.grad[1] == 0).all()


def test_semi_hard_all_negatives_of_an_empty_batch():
    """negatives_per_pair=None on an empty batch: no triplets (it used to be refused as if None were 0)."""
    empty = semi_hard(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64), 0.5, negatives_per_pair=None)
    assert all(t.numel() == 0 for t in empty)


def test_triplet_margin_loss_empty_is_connected_zero():
    e = torch.randn(4, 3, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.int64)
    loss = triplet_margin_loss(e, (empty, empty, empty), 0.1)
    assert loss.item() == 0.0
    loss.backward()
    assert e.grad is not None and torch.count_nonzero(e.grad) == 0


@pytest.mark.parametrize("kwargs, exc, match", [
    ({"triplets": (torch.tensor([0]), torch.tensor([1]))}, TypeError, "triplets"),
    ({"triplets": (torch.tensor([0]), torch.tensor([1]), torch.tensor([4]))}, ValueError, "negatives"),
    ({"triplets": (torch.tensor([0.0]), torch.tensor([1]), torch.tensor([2]))}, TypeError, "anchors"),
    ({"triplets": (torch.tensor([0, 1]), torch.tensor([1]), torch.tensor([2]))}, ValueError, "same length"),
    ({"margin": None}, TypeError, "margin"),
    ({"reduction": "max"}, ValueError, "reduction"),
    ({"metric": "l1"}, ValueError, "metric"),
])
def test_triplet_margin_loss_bad_inputs(kwargs, exc, match):
    triplets = (torch.tensor([0]), torch.tensor([1]), torch.tensor([2]))
    args = {"embeddings": torch.randn(4, 3), "triplets": triplets, "margin": 0.1}
    args.update(kwargs)
    with pytest.raises(exc, match=match):
        triplet_margin_loss(args.pop("embeddings"), args.pop("triplets"), args.pop("margin"), **args)


# ----------------------------------------------------------------------------------------------------
# pytorch-metric-learning (skipped when it is not installed)


def _pml_distance(distances, metric):
    if metric == "cosine":
        return distances.CosineSimilarity()
    return distances.LpDistance(normalize_embeddings=False)


def _pml():
    return pytest.importorskip("pytorch_metric_learning")


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_batch_hard_equals_pytorch_metric_learning(metric):
    _pml()
    from pytorch_metric_learning import distances, miners

    dist = _pml_distance(distances, metric)
    for seed in range(3):
        e, lab = _batch(seed=seed)
        ref = miners.BatchHardMiner(distance=dist)(e, lab)
        assert _triples(batch_hard(e, lab, metric=metric)) == _triples(Triplets(*ref))
    # Its default distance (L2 of normalized embeddings) ranks exactly like cosine.
    e, lab = _batch(seed=5)
    assert _triples(batch_hard(e, lab)) == _triples(Triplets(*miners.BatchHardMiner()(e, lab)))


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_semi_hard_set_equals_pytorch_metric_learning(metric):
    _pml()
    from pytorch_metric_learning import distances, miners

    dist = _pml_distance(distances, metric)
    e, lab = _batch(b=32, seed=4)
    ref = miners.TripletMarginMiner(margin=0.3, type_of_triplets="semihard", distance=dist)(e, lab)
    got = semi_hard(e, lab, 0.3, metric=metric, negatives_per_pair=None)
    assert set(_triples(got)) == set(_triples(Triplets(*ref)))
    assert len(_triples(got)) == len(set(_triples(got)))


def test_triplet_margin_loss_equals_pytorch_metric_learning():
    _pml()
    from pytorch_metric_learning import distances, losses

    e, lab = _batch(seed=6)
    t = batch_hard(e, lab)
    ref = losses.TripletMarginLoss(margin=0.2, distance=distances.CosineSimilarity())(e, lab, tuple(t))
    torch.testing.assert_close(triplet_margin_loss(e, t, 0.2, reduction="mean_nonzero"), ref)
