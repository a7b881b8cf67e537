"""Certified scores: every selection over float32 / 16-bit inputs equals, index for index and bit for
bit, the selection over the canonical scores of the whole matrix (hnsample._reference.similarity), for
every screening product, block size, thread count, sampling mode and metric, on random and adversarial
inputs; exact duplicates tie by id whatever the blocking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import hnsample
from hnsample import _reference as R
from hnsample import settings

PRODUCTS = ["fp32", "bf16"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]


def assert_bits(got: hnsample.TopK, want: tuple[torch.Tensor, torch.Tensor]) -> None:
    want_s, want_j = want
    assert torch.equal(got.indices, want_j), (got.indices, want_j)
    assert torch.equal(got.scores.view(torch.int32), want_s.float().view(torch.int32))


def adversarial(rng: np.random.Generator, b: int, n: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Queries and candidates holding what breaks approximate scores: exact duplicates, candidates one
    ulp apart, cancelling terms, norms from 1e-38 to 1e38, subnormals, NaN / inf rows, zero vectors."""
    q = rng.standard_normal((b, d)).astype(np.float32)
    c = rng.standard_normal((n, d)).astype(np.float32)
    c[1:6] = c[0]  # exact duplicates of candidate 0
    c[6] = c[0]
    c[6, 0] = np.nextafter(c[0, 0], np.float32(np.inf))  # one ulp apart
    c[7] = c[0]
    c[7, d - 1] = np.nextafter(c[0, d - 1], np.float32(-np.inf))
    c[8, : d // 2], c[8, d // 2:] = 1e6, -1e6  # cancellation: huge terms, small score
    c[8, 0] += 1.0
    scales = np.float32(10.0) ** rng.integers(-30, 31, n).astype(np.float32)
    c[9:20] *= scales[9:20, None]  # norms from 1e-30 to 1e30
    c[20, :] = np.float32(1e-41)  # subnormal entries
    c[21] = 0  # zero vector
    c[22, 3] = np.nan
    c[23, 1] = np.inf
    c[24] *= np.float32(3e37)  # norm above 2^126: float32(1 / N) would be subnormal
    c[25] *= np.float32(1e-38)  # norm below 2^-126
    q[1] = 0
    q[2] *= np.float32(1e-25)
    q[3, 0] = np.nan
    if d > 4:
        q[4] = c[0]  # a query equal to the duplicated candidate
    qt, ct = torch.from_numpy(q).to(dtype), torch.from_numpy(c).to(dtype)
    return qt, ct


SAMPLINGS = [
    ("top", {}),
    ("top_window", {"skip_top": 3, "pool": 9}),
    ("uniform_pool", {"sampling": "uniform", "seed": 4, "skip_top": 1, "pool": 12}),
    ("softmax_stream", {"sampling": "softmax", "seed": 9, "temperature": 0.3, "skip_top": 2}),
    ("uniform_stream", {"sampling": "uniform", "seed": 3}),
]


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("name,kw", SAMPLINGS, ids=[s[0] for s in SAMPLINGS])
def test_random_inputs_equal_the_canonical_reference(product, dtype, metric, name, kw):
    rng = np.random.default_rng(abs(hash((product, str(dtype), metric, name))) % 2**32)
    b, n, d = 13, 700, 37
    q = torch.from_numpy(rng.standard_normal((b, d)).astype(np.float32)).to(dtype)
    c = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32)).to(dtype)
    pos = torch.from_numpy(rng.integers(-1, n, (b, 2)))
    filters = dict(kw, positives=pos, relative_margin=0.05)
    want = R.topk_similarity(q, c, 6, metric=metric, **filters)
    for block in (None, 997, 53):
        with settings.override(screen_product=product):
            assert_bits(hnsample.topk_similarity(q, c, 6, metric=metric, block_size=block, **filters), want)


@pytest.mark.parametrize("product", PRODUCTS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_adversarial_inputs_equal_the_canonical_reference(product, dtype, metric):
    rng = np.random.default_rng(7)
    q, c = adversarial(rng, 9, 400, 24, dtype)
    s = R.similarity(q, c, metric)
    for kw in ({}, {"skip_top": 2}, {"min_score": -1.0, "max_score": 1.0},
               {"positives": torch.arange(9)[:, None] * 3, "absolute_margin": 0.0}):
        want = R.select_from_scores(s, 8, **kw)
        for block in (None, 61):
            with settings.override(screen_product=product):
                assert_bits(hnsample.topk_similarity(q, c, 8, metric=metric, block_size=block, **kw), want)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_thread_count_does_not_change_a_bit(threads):
    rng = np.random.default_rng(11)
    q, c = torch.from_numpy(rng.standard_normal((40, 64), dtype=np.float32)), \
        torch.from_numpy(rng.standard_normal((3000, 64), dtype=np.float32))
    want = R.topk_similarity(q, c, 10, metric="cosine")
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_bits(hnsample.topk_similarity(q, c, 10, metric="cosine"), want)
    finally:
        torch.set_num_threads(old)


@pytest.mark.parametrize("product", PRODUCTS)
def test_exact_duplicates_tie_by_id_whatever_the_blocking(product):
    # 4097 identical candidates: every score is the same canonical value, so every row is [0, 1]; with
    # a skip_top window the ids are the window's, in every block shape.
    rng = np.random.default_rng(0)
    q = torch.from_numpy(rng.standard_normal((1024, 32), dtype=np.float32))
    c = torch.from_numpy(np.repeat(rng.standard_normal((1, 32), dtype=np.float32), 4097, axis=0))
    with settings.override(screen_product=product):
        out = hnsample.topk_similarity(q, c, 2)
        assert (out.indices == torch.tensor([0, 1])).all()
        win = hnsample.topk_similarity(q[:37], c, 3, block_size=999, skip_top=500)
        assert (win.indices == torch.tensor([500, 501, 502])).all()
    mined = hnsample.mine_hard_negatives(q[:64], c, num_negatives=2, metric="dot", query_batch_size=17,
                                         corpus_shard_size=1000, device="cpu", progress=False, verbose=False)
    assert (mined.indices == torch.tensor([0, 1])).all()


def test_mining_statistics_count_canonical_scores():
    rng = np.random.default_rng(5)
    q = torch.from_numpy(rng.standard_normal((30, 16), dtype=np.float32))
    c = torch.from_numpy(rng.standard_normal((500, 16), dtype=np.float32))
    c[10:20] = c[0]  # scores equal to the bounds below, exactly
    s = R.similarity(q, c, "cosine").double()
    lo, hi = float(s[0, 0]), float(s[1, 0])
    got = hnsample.mine_hard_negatives(q, c, num_negatives=3, min_score=min(lo, hi), max_score=max(lo, hi),
                                       filter_statistics=True, device="cpu", progress=False, verbose=False,
                                       block_size=4000)
    below = int((s < min(lo, hi)).sum())
    above = int((s > max(lo, hi)).sum())
    assert got.filter_counts["min_score"] == below
    assert got.filter_counts["max_score"] == above
    assert got.filter_counts["eligible"] == s.numel() - below - above


def test_positive_scores_are_canonical():
    rng = np.random.default_rng(2)
    q = torch.from_numpy(rng.standard_normal((20, 50), dtype=np.float32))
    c = torch.from_numpy(rng.standard_normal((300, 50), dtype=np.float32))
    pos = torch.from_numpy(rng.integers(0, 300, (20, 3)))
    s = R.similarity(q, c, "cosine")
    p = torch.gather(s, 1, pos).double().amin(dim=1)
    mined = hnsample.mine_hard_negatives(q, c, pos, num_negatives=2, device="cpu", progress=False, verbose=False)
    assert torch.equal(mined.positive_scores.view(torch.int32), p.float().view(torch.int32))
    # A margin of 0 against p_i: the candidate scoring exactly p_i (the weakest positive's duplicate) is kept.
    c2 = torch.cat([c, c[pos[:, 0]]])
    want = R.topk_similarity(q, c2, 5, metric="cosine", positives=pos, absolute_margin=0.0)
    assert_bits(hnsample.topk_similarity(q, c2, 5, metric="cosine", positives=pos, absolute_margin=0.0), want)


def test_reduced_precision_matmul_settings_keep_the_results():
    # torch may be told that float32 GEMMs can use a reduced format; the screening bound accounts for it.
    rng = np.random.default_rng(4)
    q = torch.from_numpy(rng.standard_normal((16, 96), dtype=np.float32))
    c = torch.from_numpy(rng.standard_normal((900, 96), dtype=np.float32))
    want = R.topk_similarity(q, c, 7)
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("medium")
    try:
        assert_bits(hnsample.topk_similarity(q, c, 7), want)
    finally:
        torch.set_float32_matmul_precision(old)


def test_product_choice_is_a_known_product():
    from hnsample.engine.blocks import probe_fastest, probe_times
    from hnsample.engine.certify import PRODUCTS

    times = dict(probe_times(torch.float32, rows=32, cols=128, dim=32))
    assert set(times) == set(PRODUCTS) - {"mixed"} and all(t > 0 and math.isfinite(t) for t in times.values())
    assert probe_fastest("cpu", torch.float32) in PRODUCTS
