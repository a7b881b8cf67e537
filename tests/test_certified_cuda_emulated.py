"""The certified CUDA path (csrc/cuda/topk_screen.cu and the "fp32" / "mixed" screening products with a
GPU GEMM's bound) run on the CPU emulator of tests/cuda_emu: every selection equals, index for index and
bit for bit, the selection over the canonical scores of the whole matrix (hnsample._reference) and the
CPU's own certified selection, for both products, every dtype, metric, sampling mode and filter, several
block shapes, adversarial inputs and a GEMM whose error sits anywhere inside its proven bound."""

from __future__ import annotations

import numpy as np
import pytest
import test_cuda_emulated
import torch
from fused_support import HostKernels
from noisy_product import NoisyProduct
from test_certified import SAMPLINGS, adversarial

import hnsample
from hnsample import _reference as R
from hnsample import settings
from hnsample.engine import SelectionState, build_selection
from hnsample.engine.blocks import block_shape, score_blocks, screen_product, select_blocks
from hnsample.engine.certify import canonical_norms, canonical_pair_scores, canonical_scores_at, raw_rows
from hnsample.engine.selection import screen_block

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "bf16", "f16"]


emu = test_cuda_emulated.emu  # the fixture: the _cuda_emu module, built once per source tree


class EmuKernels(HostKernels):
    """The emulated CUDA kernels; the "mixed" product's 16-bit GEMM is torch's float32 GEMM of the exactly
    converted rows (within the GPU bound, which assumes a coarser accumulation)."""

    @staticmethod
    def matmul_f32(q: torch.Tensor, c: torch.Tensor, out: torch.Tensor) -> None:
        torch.matmul(q.float(), c.float().T, out=out)


def run(kernels, q, c, k, metric, product_name="auto", block_size=None, product=None, **kw):
    """(scores float32, indices) of the engine's certified selection on `kernels` (the emulated CUDA
    ones, or CPU kernels), as topk_similarity returns them."""
    b, n = q.shape[0], c.shape[0]

    def positive_values(pos):
        return canonical_pair_scores(q, c.__getitem__, pos, metric, kernels=kernels).double()

    sel = build_selection(
        b, n, q.device, k, positives=kw.get("positives"), exclude=kw.get("exclude"),
        query_labels=kw.get("query_labels"), candidate_labels=kw.get("candidate_labels"), positive_scores=None,
        absolute_margin=kw.get("absolute_margin"), relative_margin=kw.get("relative_margin"),
        min_score=kw.get("min_score"), max_score=kw.get("max_score"), skip_top=kw.get("skip_top", 0),
        pool=kw.get("pool"), sampling=kw.get("sampling", "top"), temperature=kw.get("temperature", 1.0),
        generator=None, seed=kw.get("seed"), positive_values=positive_values,
    )
    state = SelectionState(sel, b, q.device, kernels=kernels)
    with settings.override(screen_product=product_name):
        if product is None:
            product = screen_product(q.dtype, metric, q.shape[1], q.device, kernels)
        select_blocks(q, c, state, metric, block_size or (1 << 16), product=product)
    out_s = torch.empty((b, k), dtype=torch.float64)
    out_j = torch.empty((b, k), dtype=torch.int64)
    kernels.finalize(state.params, out_s, out_j)
    return out_s.float(), out_j


def assert_bits(got, want) -> None:
    got_s, got_j = got
    want_s, want_j = want
    assert torch.equal(got_j, want_j), (got_j, want_j)
    assert torch.equal(got_s.view(torch.int32), want_s.float().view(torch.int32))


def random_rows(rng, b, n, d, dtype):
    q = torch.from_numpy(rng.standard_normal((b, d)).astype(np.float32)).to(dtype)
    c = torch.from_numpy(rng.standard_normal((n, d)).astype(np.float32)).to(dtype)
    return q, c


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_canonical_norms_and_pairs_are_the_cpus_bits(emu, dtype):
    rng = np.random.default_rng(1)
    q, c = adversarial(rng, 9, 120, 37, dtype)
    q, c = raw_rows(q), raw_rows(c)
    kernels = EmuKernels(emu)
    cpu_n, emu_n = canonical_norms(c), canonical_norms(c, kernels)
    assert torch.equal(cpu_n.view(torch.int64), emu_n.view(torch.int64))
    ids = torch.from_numpy(rng.integers(-1, 120, (9, 11)))
    for metric in ("dot", "cosine"):
        want = canonical_scores_at(q, c, ids, metric)
        got = canonical_scores_at(q, c, ids, metric, kernels=kernels)
        assert torch.equal(want.view(torch.int32), got.view(torch.int32))
        ref = R.similarity(q, c, metric)
        sel = torch.gather(ref, 1, ids.clamp_min(0)).float()
        assert torch.equal(got[ids >= 0].view(torch.int32), sel[ids >= 0].view(torch.int32))
        assert got[ids < 0].isnan().all()


@pytest.mark.parametrize("product", ["fp32", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("name,kw", SAMPLINGS, ids=[s[0] for s in SAMPLINGS])
def test_random_inputs_equal_the_reference_and_the_cpu(emu, product, dtype, metric, name, kw):
    rng = np.random.default_rng(abs(hash((product, str(dtype), metric, name))) % 2**32)
    b, n, d = 11, 600, 37
    q, c = random_rows(rng, b, n, d, dtype)
    pos = torch.from_numpy(rng.integers(-1, n, (b, 2)))
    filters = dict(kw, positives=pos, relative_margin=0.05)
    want = R.topk_similarity(q, c, 6, metric=metric, **filters)
    cpu = hnsample.topk_similarity(q, c, 6, metric=metric, **filters)
    assert_bits((cpu.scores, cpu.indices), want)
    kernels = EmuKernels(emu)
    for block in (None, 997, 53):
        assert_bits(run(kernels, q, c, 6, metric, product, block, **filters), want)


@pytest.mark.parametrize("product", ["fp32", "mixed"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_adversarial_inputs_equal_the_reference(emu, product, dtype, metric):
    rng = np.random.default_rng(7)
    q, c = adversarial(rng, 9, 400, 24, dtype)
    s = R.similarity(q, c, metric)
    kernels = EmuKernels(emu)
    labels_q, labels_c = torch.arange(9) % 3, torch.arange(400) % 5
    for kw in ({}, {"skip_top": 2}, {"min_score": -1.0, "max_score": 1.0},
               {"positives": torch.arange(9)[:, None] * 3, "absolute_margin": 0.0},
               {"exclude": torch.arange(9)[:, None] + 1, "query_labels": labels_q, "candidate_labels": labels_c}):
        want = R.select_from_scores(s, 8, **kw)
        for block in (None, 61 * 400):
            assert_bits(run(kernels, q, c, 8, metric, product, block, **kw), want)


def test_exact_duplicates_tie_by_id_whatever_the_blocking(emu):
    rng = np.random.default_rng(0)
    q = torch.from_numpy(rng.standard_normal((48, 32), dtype=np.float32))
    c = torch.from_numpy(np.repeat(rng.standard_normal((1, 32), dtype=np.float32), 1025, axis=0))
    kernels = EmuKernels(emu)
    for block in (None, 999, 48 * 7):
        _, j = run(kernels, q, c, 2, "dot", "fp32", block)
        assert (j == torch.tensor([0, 1])).all()
        _, j = run(kernels, q[:9], c, 3, "dot", "fp32", block, skip_top=500)
        assert (j == torch.tensor([500, 501, 502])).all()


NOISY_SAMPLINGS = [s for s in SAMPLINGS if s[0] != "top_window"]


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("name,kw", NOISY_SAMPLINGS, ids=[s[0] for s in NOISY_SAMPLINGS])
def test_a_gemm_error_anywhere_inside_the_bound_keeps_every_bit(emu, dtype, metric, name, kw):
    rng = np.random.default_rng(3)
    b, n, d = 7, 500, 48
    q, c = random_rows(rng, b, n, d, dtype)
    c[100:140] = c[7]  # ties the noise must not reorder
    c[150:450] = (c[9].float() + 2e-5 * torch.randn(300, d, generator=torch.Generator().manual_seed(1))).to(dtype)
    q[1] = c[9]  # a query whose top candidates are those near ties
    pos = torch.from_numpy(rng.integers(0, n, (b, 1)))
    pos[1, 0] = 9  # row 1's margin bound lies inside its cluster of near ties
    filters = dict(kw, positives=pos, absolute_margin=0.0)
    want = R.topk_similarity(q, c, 9, metric=metric, **filters)
    kernels = EmuKernels(emu)
    with settings.override(screen_product="mixed"):  # "fp32" for float32 rows
        base = screen_product(dtype, metric, d, q.device, kernels)
    assert base.name == ("fp32" if dtype == torch.float32 else "mixed")
    for seed in range(2):
        got = run(kernels, q, c, 9, metric, block_size=b * 64, product=NoisyProduct(base, metric, 1.0, seed),
                  **filters)
        assert_bits(got, want)


def test_the_noise_control_breaks_without_the_bound(emu):
    # The same noise with the kernels shown a quarter of the bound changes selections: the test above can
    # fail.
    rng = np.random.default_rng(3)
    q, c = random_rows(rng, 16, 800, 64, torch.float32)
    c[:300] = c[0] + 1e-4 * torch.randn(300, 64, generator=torch.Generator().manual_seed(2))
    q[:] = c[0]  # every row's top candidates: 300 near ties, far closer than the bound
    want = R.topk_similarity(q, c, 9, metric="dot")
    kernels = EmuKernels(emu)
    base = screen_product(torch.float32, "dot", 64, q.device, kernels)
    broken = 0
    for seed in range(3):
        got = run(kernels, q, c, 9, "dot", block_size=16 * 200, product=NoisyProduct(base, "dot", 1.0, seed, 0.25))
        broken += not (torch.equal(got[1], want[1]) and torch.equal(got[0].view(torch.int32),
                                                                   want[0].float().view(torch.int32)))
    assert broken > 0


@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("product", ["fp32", "mixed"])
def test_filter_counts_equal_the_cpus(emu, metric, product):
    rng = np.random.default_rng(9)
    q, c = adversarial(rng, 10, 300, 20, torch.bfloat16)
    s = R.similarity(q, c, metric).double()
    lo, hi = float(s[0, 0]), float(s[5, 0])
    sel = build_selection(10, 300, q.device, 4, positives=None, exclude=torch.arange(10)[:, None],
                          query_labels=torch.arange(10) % 2, candidate_labels=torch.arange(300) % 3,
                          positive_scores=None, absolute_margin=None, relative_margin=None,
                          min_score=min(lo, hi), max_score=max(lo, hi), skip_top=0, pool=None, sampling="top",
                          temperature=1.0, generator=None, seed=None, positive_values=None)
    kernels = EmuKernels(emu)
    counts = {}
    for name, k in (("cpu", None), ("emu", kernels)):
        state = SelectionState(sel, 10, q.device, kernels=k)
        kk = state.kernels
        with settings.override(screen_product=product if name == "emu" else "fp32"):
            prod = screen_product(q.dtype, metric, 20, q.device, kk)
        out = torch.zeros((10, 5), dtype=torch.int64)
        br, bc = block_shape(10, 300, 7 * 64)
        for blk in score_blocks(q, c, prod, br, bc):
            state.count_filters(blk, blk.j0, out)
        counts[name] = out
    assert torch.equal(counts["cpu"], counts["emu"])
    assert int(counts["emu"][:, 2].sum()) > 0 and int(counts["emu"][:, 3].sum()) > 0


def test_the_launcher_checks_col_max(emu):
    rng = np.random.default_rng(2)
    q, c = random_rows(rng, 4, 50, 8, torch.float32)
    kernels = EmuKernels(emu)
    sel = build_selection(4, 50, q.device, 3, positives=None, exclude=None, query_labels=None,
                          candidate_labels=None, positive_scores=None, absolute_margin=None, relative_margin=None,
                          min_score=None, max_score=None, skip_top=0, pool=None, sampling="top", temperature=1.0,
                          generator=None, seed=None, positive_values=None)
    state = SelectionState(sel, 4, q.device, kernels=kernels)
    prod = screen_product(q.dtype, "dot", 8, q.device, kernels)
    for blk in score_blocks(q, c, prod, 4, 50):
        with pytest.raises(ValueError, match="col_max"):
            kernels.screen_block(state.params, screen_block(blk, 0), blk.scores)


def test_cuda_product_choice(emu):
    kernels = EmuKernels(emu)
    cpu = torch.device("cpu")
    assert screen_product(torch.bfloat16, "dot", 8, cpu, kernels).name == "fp32"  # no 16-bit GEMM here
    assert screen_product(torch.bfloat16, "dot", 8, cpu, HostKernels(emu, mm_out_dtype=True)).name == "mixed"
    assert screen_product(torch.float32, "cosine", 8, cpu, HostKernels(emu, mm_out_dtype=True)).name == "fp32"
    with settings.override(screen_product="mixed"):
        assert screen_product(torch.float32, "dot", 8, cpu, kernels).name == "fp32"
    with settings.override(screen_product="bf16"), pytest.raises(ValueError, match="CPU product"):
        screen_product(torch.float16, "dot", 8, cpu, kernels)
    # the GPU accumulation model: a wider bound than the CPU's IEEE float32 GEMM
    on_gpu = screen_product(torch.float32, "dot", 64, cpu, kernels)
    on_cpu = screen_product(torch.float32, "dot", 64, cpu)
    assert on_gpu.gamma == pytest.approx(4 * on_cpu.gamma, rel=1e-3)


@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("name,kw", SAMPLINGS, ids=[s[0] for s in SAMPLINGS])
def test_the_driver_path_with_column_segments(emu, metric, name, kw):
    # Few rows: the driver splits each block's columns over state copies (one warp per row and segment)
    # and merges them; the result is still the canonical reference's, bit for bit.
    rng = np.random.default_rng(12)
    q, c = adversarial(rng, 5, 3000, 24, torch.bfloat16)
    c[2000:2100] = c[0]  # duplicates in another segment
    pos = torch.from_numpy(rng.integers(-1, 3000, (5, 2)))
    filters = dict(kw, positives=pos, relative_margin=0.05)
    want = R.topk_similarity(q, c, 7, metric=metric, **filters)
    driver, calls = test_cuda_emulated.emulated_driver(emu)
    kernels = driver.kernels

    def positive_values(p):
        return canonical_pair_scores(q, c.__getitem__, p, metric, kernels=kernels).double()

    sel = build_selection(5, 3000, q.device, 7, positives=pos, exclude=None, query_labels=None,
                          candidate_labels=None, positive_scores=None, absolute_margin=None, relative_margin=0.05,
                          min_score=None, max_score=None, skip_top=kw.get("skip_top", 0), pool=kw.get("pool"),
                          sampling=kw.get("sampling", "top"), temperature=kw.get("temperature", 1.0),
                          generator=None, seed=kw.get("seed"), positive_values=positive_values)
    state = SelectionState(sel, 5, q.device, kernels=kernels)
    state.rescored = torch.zeros(5, dtype=torch.int64)
    with settings.override(cuda_min_segment_cols=256):
        driver.run_certified(q, c, state, metric, 5 * 1024)
    out_s = torch.empty((5, 7), dtype=torch.float64)
    out_j = torch.empty((5, 7), dtype=torch.int64)
    kernels.finalize(state.params, out_s, out_j)
    assert calls["topk_screen_block_segments"] > 0 and calls["topk_merge"] > 0
    assert_bits((out_s.float(), out_j), want)
    assert int(state.rescored.sum()) > 0  # counted across segments (row 3 has a NaN: nothing to rescore)


# ----------------------------------------------------------------------------------------------------
# On a device (skipped elsewhere): the real kernels, cuBLAS as the screening GEMM, the CPU's bits.


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("name,kw", SAMPLINGS, ids=[s[0] for s in SAMPLINGS])
def test_device_results_are_the_cpus_bits(dtype, metric, name, kw):
    rng = np.random.default_rng(5)
    q, c = adversarial(rng, 70, 5000, 96, dtype)
    c[3000:3400] = c[0]  # duplicates far apart in id
    pos = torch.from_numpy(rng.integers(-1, 5000, (70, 2)))
    filters = dict(kw, positives=pos, relative_margin=0.05)
    want = hnsample.topk_similarity(q, c, 16, metric=metric, **filters)
    with settings.override(cuda_certified=True):
        for block in (None, 70 * 1000):
            got = hnsample.topk_similarity(q.cuda(), c.cuda(), 16, metric=metric, block_size=block,
                                           positives=pos.cuda(), **{k: v for k, v in filters.items()
                                                                    if k != "positives"})
            assert_bits((got.scores.cpu(), got.indices.cpu()), (want.scores, want.indices))


@pytest.mark.gpu
def test_device_duplicates_tie_by_id_and_tf32_keeps_the_bits():
    rng = np.random.default_rng(0)
    q = torch.from_numpy(rng.standard_normal((1024, 384), dtype=np.float32)).cuda()
    c = torch.from_numpy(np.repeat(rng.standard_normal((1, 384), dtype=np.float32), 4097, axis=0)).cuda()
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        with settings.override(cuda_certified=True):
            for tf32 in (False, True):
                torch.backends.cuda.matmul.allow_tf32 = tf32
                assert (hnsample.topk_similarity(q, c, 2).indices.cpu() == torch.tensor([0, 1])).all()
                win = hnsample.topk_similarity(q[:37], c, 3, block_size=999, skip_top=500)
                assert (win.indices.cpu() == torch.tensor([500, 501, 502])).all()
                c2 = torch.randn(20000, 384, device="cuda")
                want = hnsample.topk_similarity(q[:64].cpu(), c2.cpu(), 32)
                got = hnsample.topk_similarity(q[:64], c2, 32)
                assert_bits((got.scores.cpu(), got.indices.cpu()), (want.scores, want.indices))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
def test_device_mining_and_its_statistics_are_the_cpus():
    rng = np.random.default_rng(8)
    q, c = adversarial(rng, 200, 6000, 64, torch.bfloat16)
    pos = torch.from_numpy(rng.integers(0, 6000, (200, 1)))
    kw = dict(num_negatives=5, relative_margin=0.05, filter_statistics=True, progress=False, verbose=False,
              query_batch_size=64, corpus_shard_size=2500)
    want = hnsample.mine_hard_negatives(q, c, pos, device="cpu", **kw)
    with settings.override(cuda_certified=True):
        got = hnsample.mine_hard_negatives(q.cuda(), c.cuda(), pos.cuda(), device="cuda", **kw)
    assert torch.equal(got.indices.cpu(), want.indices)
    assert torch.equal(got.scores.cpu().view(torch.int32), want.scores.view(torch.int32))
    assert got.filter_counts == want.filter_counts
