"""The CUDA path of the fused top-k op.

GPU tests (marker ``gpu``) compare the CUDA results with the CPU kernel's: exactly for
``topk_from_scores`` (the same score matrix) and for ``topk_similarity`` on integer-valued inputs (every
dot product is exact in fp32 whatever the accumulation order, so both devices see the same scores and
ties). The CPU tests cover the logic the GPU shares or the driver adds: the stream gate inside the
shared selection code, segmented states merged exactly, and the block/segment planner.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Iterator

import pytest
import torch
from fused_support import ExactGemm, HostKernels, HostMixedPrecisionProduct, exact_fused_scores, host_view

import hnsample
from hnsample import _C, settings
from hnsample import _reference as ref
from hnsample.engine import (
    CudaBackend,
    DeviceFacts,
    MixedPrecisionProduct,
    SelectionState,
    build_selection,
    product_for,
    registry,
    score_blocks,
)
from hnsample.engine.blocks import cosine_scale
from hnsample.engine.cuda import KERNEL_TILE, WARPS_PER_SM, CudaDriver, list_capacity, plan_blocks

DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "f64", "bf16", "f16"]

FILTERS = {
    "plain": {},
    "positives_margin": {"positives": "pos", "relative_margin": 0.05},
    "exclude_abs_margin": {"exclude": "exc", "positives": "pos", "absolute_margin": 0.5},
    "labels": {"labels": True},
    "bounds": {"min_score": -1.0, "max_score": 2.0},
    "window": {"skip_top": 3, "pool": 40},
    "all": {"positives": "pos", "exclude": "exc", "labels": True, "relative_margin": 0.02, "min_score": -3.0,
            "skip_top": 2},
}
SAMPLING = [
    ("top", {}),
    ("uniform_stream", {"sampling": "uniform", "seed": 11}),
    ("softmax_stream_skip", {"sampling": "softmax", "seed": 5, "skip_top": 4, "temperature": 0.5}),
    ("uniform_pool", {"sampling": "uniform", "seed": 3, "skip_top": 1, "pool": 30}),
]


def make_filters(spec: dict, b: int, n: int, gen: torch.Generator) -> dict:
    kw = {}
    for key, value in spec.items():
        if value == "pos":
            kw["positives"] = torch.randint(-1, n, (b, 2), generator=gen)
            kw["positives"][:, 0] = torch.randint(0, n, (b,), generator=gen)
        elif value == "exc":
            kw["exclude"] = torch.randint(-1, n, (b, 5), generator=gen)
        elif key == "labels":
            kw["query_labels"] = torch.randint(0, 4, (b,), generator=gen)
            kw["candidate_labels"] = torch.randint(0, 4, (n,), generator=gen)
        else:
            kw[key] = value
    return kw


def to_device(kw: dict, device: str) -> dict:
    return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}


def int_matrix(rows: int, cols: int, gen: torch.Generator, lo: int = -3, hi: int = 4) -> torch.Tensor:
    """Small integers: exact in every dtype, dot products exact in fp32, many ties."""
    return torch.randint(lo, hi, (rows, cols), generator=gen).to(torch.float32)


def assert_same(a: hnsample.TopK, b: hnsample.TopK) -> None:
    assert torch.equal(a.indices.cpu(), b.indices.cpu())
    assert torch.equal(a.scores.cpu(), b.scores.cpu())


# ----------------------------------------------------------------------------------------------------
# CPU: the shared logic the CUDA kernel relies on


@pytest.mark.parametrize("skip_top", [0, 1, 7])
@pytest.mark.parametrize("sampling", ["uniform", "softmax"])
def test_stream_gate_keeps_every_candidate_that_matters(skip_top, sampling):
    # Stream mode runs every eligible candidate through stream_gate_admits before the heap code; any
    # wrongly rejected candidate changes the sample, which the reference would catch.
    gen = torch.Generator().manual_seed(skip_top * 10 + len(sampling))
    scores = torch.randn(9, 400, generator=gen)
    scores[:, 50:60] = scores[:, 40:50]  # ties across candidates
    kw = {"sampling": sampling, "seed": 123, "skip_top": skip_top, "temperature": 0.7,
          "exclude": torch.randint(-1, 400, (9, 3), generator=gen)}
    got = hnsample.topk_from_scores(scores, 25, **kw)
    want_s, want_j = ref.select_from_scores(scores, 25, **kw)
    assert torch.equal(got.indices, want_j)
    assert torch.equal(got.scores.double(), want_s)


def _cpu_state(scores: torch.Tensor, k: int, kw: dict) -> SelectionState:
    b, n = scores.shape
    sel = build_selection(
        b, n, scores.device, k, positives=kw.get("positives"), exclude=kw.get("exclude"),
        query_labels=None, candidate_labels=None, positive_scores=None, absolute_margin=None,
        relative_margin=None, min_score=None, max_score=None, skip_top=kw.get("skip_top", 0),
        pool=kw.get("pool"), sampling=kw.get("sampling", "top"), temperature=kw.get("temperature", 1.0),
        generator=None, seed=kw.get("seed"), positive_values=lambda pos: torch.gather(scores, 1, pos),
    )
    return SelectionState(sel, b, scores.device)


@pytest.mark.parametrize("name,kw", SAMPLING, ids=[s[0] for s in SAMPLING])
def test_segment_copies_merge_exactly(name, kw):
    # The driver's segment layout: copy s of the state holds rows [s*B, (s+1)*B) of one buffer and sees
    # only its own column range; merging the copies gives the whole matrix's selection. Run here with
    # the CPU kernel on the same params objects the CUDA driver builds.
    gen = torch.Generator().manual_seed(7)
    b, n, k, segments = 6, 500, 12, 4
    scores = torch.randn(b, n, generator=gen)
    kw = dict(kw, exclude=torch.randint(-1, n, (b, 4), generator=gen))
    state = _cpu_state(scores, k, kw)
    copies = SelectionState(state.sel, b, scores.device, copies=segments)
    width = math.ceil(n / segments)
    for s in range(segments):
        p = copies.copy_params(s)
        block = scores[:, s * width: (s + 1) * width]
        _C.topk_select_block(p, block.data_ptr(), 0, block.shape[0], block.shape[1], block.stride(0),
                             block.stride(1), 0, s * width, False, 0, 1)
    for s in range(segments):
        _C.topk_merge(state.params, copies.copy_params(s), False, 0, 1)
    got_s, got_j = state.finalize()
    want_s, want_j = ref.select_from_scores(scores, k, **kw)
    assert torch.equal(got_j, want_j)
    assert torch.equal(got_s, want_s)


def _distinct_field_values(p) -> dict:
    """A distinct, non-default value for every field of a TopkParams (pointers as 4096-byte multiples)."""
    values = {}
    for i, name in enumerate(sorted(n for n, v in vars(type(p)).items() if isinstance(v, property)), start=1):
        current = getattr(p, name)
        if isinstance(current, float):
            values[name] = i + 0.25
        elif isinstance(current, int):
            values[name] = i << 12
        else:  # a bound enum: another member than the default
            values[name] = next(m for m in type(current).__members__.values() if m != current)
    return values


def test_copy_params_copies_every_selection_field():
    p = _C.TopkParams()
    values = _distinct_field_values(p)
    assert {"k", "skip", "pool", "mode", "sampling", "seed", "upper", "banned", "st_score", "st_count"} <= set(values)
    for name, v in values.items():
        setattr(p, name, v)
    q = p.copy()
    for name, v in values.items():
        assert getattr(q, name) == v, name
    q.k, q.st_score = 1, 0  # a copy, not a view of p
    assert p.k == values["k"] and p.st_score == values["st_score"]
    # a stacked state's copy s: every selection field of params, the state pointers at row s * B
    sel = _cpu_state(torch.zeros(3, 40), 4, {"sampling": "softmax", "seed": 99, "skip_top": 1}).sel
    state = SelectionState(sel, 3, torch.device("cpu"), noise_row_offset=17, copies=4)
    state.params.min_score, state.params.max_score = -2.0, 5.0
    state.params.upper, state.params.banned, state.params.banned_cols = 4096, 8192, 5
    state_fields = ("st_score", "st_index", "st_key", "st_count")
    for s in range(4):
        c = state.copy_params(s)
        for name in values:
            if name not in state_fields:
                assert getattr(c, name) == getattr(state.params, name), name
        assert c.st_score == state.st_score[3 * s].data_ptr() and c.st_count == state.st_count[3 * s].data_ptr()
        assert c.st_index == state.st_index[3 * s].data_ptr() and c.st_key == state.st_key[3 * s].data_ptr()
    assert state.copy_params(0).st_score == state.params.st_score


@pytest.mark.parametrize("rows,cols,block", [(8192, 1_000_000, 1 << 24), (16, 1_000_000, 1 << 24),
                                             (3, 100, 1 << 24), (100_000, 50, 1 << 20), (5, 7, 1)])
def test_plan_blocks_respects_budget_and_fills_the_gpu(rows, cols, block):
    l2, sms = 60 << 20, 132
    plan = plan_blocks(rows, cols, block, sms, l2, state_row_bytes=64 * 16 + 16)
    assert 1 <= plan.block_rows <= rows and 1 <= plan.block_cols <= cols
    assert plan.block_rows * plan.block_cols <= block
    assert plan.block_rows * plan.block_cols * 4 <= l2 // 2
    assert 1 <= plan.segments <= 65535
    if plan.segments > 1:
        # segments exist only to fill the GPU, each a whole number of kernel tiles wide
        assert plan.block_rows * (plan.segments - 1) < sms * WARPS_PER_SM
        assert plan.block_cols % (KERNEL_TILE * plan.segments) == 0
        assert plan.block_cols // plan.segments >= settings.current().cuda_min_segment_cols
    if rows >= sms * WARPS_PER_SM and plan.block_rows >= sms * WARPS_PER_SM:
        assert plan.segments == 1


def test_plan_blocks_splits_few_rows_into_segments():
    plan = plan_blocks(16, 1_000_000, 1 << 24, 132, 60 << 20, state_row_bytes=1040)
    assert plan.segments > 1
    assert plan.block_rows == 16


def test_row_bounds_round_outward_to_float():
    # min_score = max_score = 0.1 (not a float): float32(0.1) > 0.1, so it passes min_score and fails
    # max_score; the float interval must say the same: lo = float32(0.1), hi = the float below it.
    scores = torch.zeros(3, 10)
    state = _cpu_state(scores, 2, {})
    state.params.min_score, state.params.max_score = 0.1, 0.1
    lo, hi = torch.empty(3), torch.empty(3)
    _C.topk_row_bounds(state.params, lo.data_ptr(), hi.data_ptr(), False, 0, 1)
    f = torch.tensor(0.1, dtype=torch.float32)
    assert torch.all(lo == f)
    assert torch.all(hi == torch.nextafter(f, torch.tensor(-math.inf)))


def _offer_lists(state: SelectionState, block: torch.Tensor, col_offset: int, gen: torch.Generator) -> bool:
    """What the fused kernel does for one chunk, in torch: survivors of each row's float bounds, in a
    random order, into (B, cap) lists; then offers them. False (nothing offered) on overflow."""
    b = block.shape[0]
    lo, hi = torch.empty(b), torch.empty(b)
    _C.topk_row_bounds(state.params, lo.data_ptr(), hi.data_ptr(), False, 0, 1)
    keep = (block >= lo[:, None]) & (block <= hi[:, None])
    cap = list_capacity(state.capacity)
    counts = keep.sum(1).to(torch.int32)
    if int(counts.max()) > cap:
        return False
    scores = torch.full((b, cap), math.nan)
    cols = torch.full((b, cap), -7, dtype=torch.int32)
    for i in range(b):
        idx = keep[i].nonzero().flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        scores[i, : len(idx)] = block[i, idx]
        cols[i, : len(idx)] = idx.to(torch.int32)
    _C.topk_offer_candidates(state.params, scores.data_ptr(), cols.data_ptr(), counts.data_ptr(), cap,
                             col_offset, False, 0, 1)
    return True


@pytest.mark.parametrize("name,kw", SAMPLING, ids=[s[0] for s in SAMPLING])
def test_candidate_lists_merge_exactly(name, kw):
    # The fused path's bookkeeping on the CPU: a seed block, then chunks of doubling width whose
    # survivors arrive as unordered per-row lists; the state must end exactly as the reference says.
    gen = torch.Generator().manual_seed(12)
    b, n, k = 8, 6000, 10
    scores = torch.randn(b, n, generator=gen)
    scores[:, 3000:3100] = scores[:, 1000:1100]  # ties across chunks
    kw = dict(kw, exclude=torch.randint(-1, n, (b, 4), generator=gen), positives=torch.randint(0, n, (b, 1)))
    state = _cpu_state(scores, k, kw)
    done = 300
    seed = scores[:, :done]
    _C.topk_select_block(state.params, seed.data_ptr(), 0, b, done, seed.stride(0), 1, 0, 0, False, 0, 1)
    offered = 0
    while done < n:
        width = min(n - done, done)
        block = scores[:, done: done + width]
        if _offer_lists(state, block, done, gen):
            offered += 1
        else:
            _C.topk_select_block(state.params, block.data_ptr(), 0, b, width, block.stride(0), 1, 0, done,
                                 False, 0, 1)
        done += width
    got_s, got_j = state.finalize()
    want_s, want_j = ref.select_from_scores(scores, k, **kw)
    # window mode filters, so lists stay short; in stream mode every eligible candidate matters (the
    # bounds are the score bounds alone) and every chunk overflows to the dense path
    window = kw.get("sampling", "top") == "top" or kw.get("pool") is not None
    assert (offered > 0) == window
    assert torch.equal(got_j, want_j)
    assert torch.equal(got_s, want_s)


_TORCH_DTYPES = {0: torch.float32, 1: torch.float64, 2: torch.float16, 3: torch.bfloat16}


class _HostLaunchers:
    """hnsample._C's CUDA launchers emulated with its CPU kernels (the launcher module of HostKernels).
    topk_select_block_segments does what topk_select_block_segments_cuda does: column range s of the
    block feeds state copy s, which starts s * num_rows rows past the params' state pointers; with
    scales, the kernel's scores (x * row_scale[r]) * col_scale[c] (float32, float64 for float64 blocks)
    are selected on. With `record`, each launch's block, row scales and column scales (None without)
    are copied to `launches` as (row_offset, col_offset, block, row_scale, col_scale). The fused score
    kernel is `fused` (a Python emulation), when given."""

    def __init__(self, fused=None, record: bool = False):
        self.fused, self.record = fused, record
        self.calls: list[tuple[int, int, int]] = []
        self.launches: list[tuple] = []

    def topk_select_block_segments(self, p, data, dtype, rows, cols, row_stride, col_stride, row_offset,
                                   col_offset, segments, stream, row_scale=0, col_scale=0, scale_dtype=0):
        self.calls.append((rows, cols, segments))
        block = host_view(data, _TORCH_DTYPES[dtype], rows, cols, row_stride, col_stride)
        rs = host_view(row_scale, torch.float32, 1, rows, rows)[0] if row_scale else None
        cs = host_view(col_scale, torch.float32, 1, cols, cols)[0] if col_scale else None
        if self.record:
            self.launches.append((row_offset, col_offset, block.clone(), None if rs is None else rs.clone(),
                                  None if cs is None else cs.clone()))
        if rs is not None:
            ct = torch.float64 if dtype == 1 else torch.float32
            block = (block.to(ct) * rs.to(ct)[:, None]) * cs.to(ct)[None, :]
            data, dtype, row_stride, col_stride = block.data_ptr(), 1 if dtype == 1 else 0, cols, 1
        itemsize = block.element_size()
        width = math.ceil(cols / segments)
        for s in range(segments):
            c0, c1 = s * width, min(cols, (s + 1) * width)
            if c0 >= c1:
                continue
            q = p.copy()
            shift = s * p.num_rows * p.capacity * 8
            q.st_score, q.st_index = p.st_score + shift, p.st_index + shift
            q.st_key = p.st_key + shift if p.st_key else 0
            q.st_count = p.st_count + s * p.num_rows * 16
            _C.topk_select_block(q, data + c0 * col_stride * itemsize, dtype, rows, c1 - c0, row_stride,
                                 col_stride, row_offset, col_offset + c0, False, 0, 1)

    @staticmethod
    def topk_merge(p, other, cuda, stream, threads):
        _C.topk_merge(p, other, False, 0, 1)

    @staticmethod
    def topk_finalize(p, out_scores, out_indices, cuda, stream, threads):
        _C.topk_finalize(p, out_scores, out_indices, False, 0, 1)

    @staticmethod
    def topk_row_bounds(p, lo, hi, cuda, stream, threads):
        _C.topk_row_bounds(p, lo, hi, False, 0, 1)

    @staticmethod
    def topk_offer_candidates(p, scores, cols, counts, cap, col_offset, cuda, stream, threads):
        _C.topk_offer_candidates(p, scores, cols, counts, cap, col_offset, False, 0, 1)

    @staticmethod
    def topk_rescore_candidates(block, cuda, stream, threads):
        _C.topk_rescore_candidates(block, False, 0, 1)

    def topk_fused_scores(self, block, stream):
        if self.fused is None:
            raise AssertionError("no fused kernel was expected here")
        self.fused(block)

    @staticmethod
    def topk_fused_supported(device):
        return True


@pytest.mark.parametrize("rows,l2", [(300, 1 << 16), (5, 1 << 20)], ids=["row_blocks", "segments"])
@pytest.mark.parametrize("name,kw", SAMPLING, ids=[s[0] for s in SAMPLING])
def test_cuda_driver_loop_on_emulated_kernels(rows, l2, name, kw):
    # The driver's blocking, views, segment copies and merges, run on the CPU: only the launchers are
    # emulated, so a bookkeeping error in CudaDriver.select shows up against the reference here.
    emulated = _HostLaunchers()
    driver = CudaDriver(kernels=HostKernels(emulated, DeviceFacts(4, l2)))
    gen = torch.Generator().manual_seed(rows)
    n = 20_000
    q, c = int_matrix(rows, 12, gen), int_matrix(n, 12, gen)
    kw = dict(kw, exclude=torch.randint(-1, n, (rows, 3), generator=gen))
    sel = _cpu_state(torch.zeros(rows, n), 21, kw).sel
    state = driver.select(q, c, SelectionState(sel, rows, q.device, kernels=driver.kernels), "dot", 1 << 24)
    got_s, got_j = state.finalize()
    # the CPU op (itself tested against the reference) over the same exact integer scores
    want = hnsample.topk_similarity(q, c, 21, **kw)
    assert torch.equal(got_j, want.indices)
    assert torch.equal(got_s.float(), want.scores)
    plan = plan_blocks(rows, n, 1 << 24, 4, l2, 1)
    assert len(emulated.calls) == math.ceil(rows / plan.block_rows) * math.ceil(n / plan.block_cols)
    assert max(s for _, _, s in emulated.calls) == plan.segments
    assert (plan.segments > 1) == (rows == 5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("rows,l2", [(300, 1 << 16), (5, 1 << 20)], ids=["row_blocks", "segments"])
@pytest.mark.parametrize("name,kw", [SAMPLING[0], SAMPLING[2]], ids=["top", "softmax_stream_skip"])
def test_two_pass_cosine_16bit_selects_on_the_raw_product(dtype, rows, l2, name, kw):
    # 16-bit cosine on the two-pass path: the product leaves its scales to the select launcher, so the
    # block the launcher gets is the raw product (no elementwise multiply went over it) and the scales
    # come with it; the result is bit for bit the one of the product's own multiplications (as before)
    # and the selection over the scores (acc * 1/|q_i|) * 1/|c_j|.
    gen = torch.Generator().manual_seed(rows + 7)
    n = 20_000
    q, c = int_matrix(rows, 12, gen).to(dtype), int_matrix(n, 12, gen).to(dtype)
    q[2] = 0  # a zero-norm query scores 0 with everything
    c[9] = 0
    kw = dict(kw, exclude=torch.randint(-1, n, (rows, 3), generator=gen))
    raw = q.double() @ c.double().T  # exact: small integers
    rs, cs = cosine_scale(q), cosine_scale(c)
    want = hnsample.topk_from_scores(exact_fused_scores(q, c, "cosine"), 21, **kw)
    for in_select in (True, False):
        launchers = _HostLaunchers(record=True)
        driver = CudaDriver(kernels=HostKernels(launchers, DeviceFacts(4, l2)),
                            product=lambda queries, metric, s=in_select: HostMixedPrecisionProduct(metric, s))
        sel = _cpu_state(torch.zeros(rows, n), 21, kw).sel
        state = driver.run_two_pass(q, c, SelectionState(sel, rows, q.device, kernels=driver.kernels), "cosine",
                                    1 << 24, 0)
        got_s, got_j = state.finalize()
        assert torch.equal(got_j, want.indices) and torch.equal(got_s.float(), want.scores), in_select
        assert len(launchers.launches) == len(launchers.calls) > 1
        for i0, j0, block, brs, bcs in launchers.launches:
            i1, j1 = i0 + block.shape[0], j0 + block.shape[1]
            if in_select:
                assert torch.equal(block, raw[i0:i1, j0:j1].float())
                assert torch.equal(brs, rs[i0:i1]) and torch.equal(bcs, cs[j0:j1])
            else:
                assert torch.equal(block, exact_fused_scores(q[i0:i1], c[j0:j1], "cosine"))
                assert brs is None and bcs is None
    assert (rows == 5) == (max(segments for _, _, segments in launchers.calls) > 1)


@pytest.mark.parametrize("metric", ["dot", "cosine"])
def test_mixed_precision_product_scales_unless_asked_not_to(metric):
    # Every user of the product but the two-pass select gets the scaled scores, as before; with
    # scales_in_select the blocks are the raw products and the operands carry the scales.
    gen = torch.Generator().manual_seed(8)
    q, c = int_matrix(70, 16, gen).to(torch.bfloat16), int_matrix(90, 16, gen).to(torch.bfloat16)
    raw = (q.double() @ c.double().T).float()
    for in_select in (False, True):
        product = HostMixedPrecisionProduct(metric, scales_in_select=in_select)
        for blk in score_blocks(q, c, product, 32, 40):
            i1, j1 = blk.i0 + blk.scores.shape[0], blk.j0 + blk.scores.shape[1]
            if metric == "dot":
                assert blk.queries.scale is None and blk.candidates.scale is None
                assert torch.equal(blk.scores, raw[blk.i0:i1, blk.j0:j1])
            elif in_select:
                assert torch.equal(blk.scores, raw[blk.i0:i1, blk.j0:j1])
                assert torch.equal(blk.queries.scale, cosine_scale(q)[blk.i0:i1])
                assert torch.equal(blk.candidates.scale, cosine_scale(c)[blk.j0:j1])
            else:
                assert torch.equal(blk.scores, exact_fused_scores(q, c, "cosine")[blk.i0:i1, blk.j0:j1])


# ----------------------------------------------------------------------------------------------------
# CPU: the fused path's tf32 error bound, rescoring and driver, on emulated kernels


def to_tf32(x: torch.Tensor) -> torch.Tensor:
    """fp32 -> nearest tf32 (10 stored mantissa bits), ties away from zero: cvt.rna.tf32.f32."""
    return ((x.contiguous().view(torch.int32) + 0x1000) & -8192).view(torch.float32)


def truncating_fp32_dot(q: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Row-wise sum of the exact products q_k c_k (q, c float64 holding tf32 values), accumulated in
    fp32 with every addition rounded toward zero: the worst adder the bound allows for."""
    acc = torch.zeros(q.shape[0], dtype=torch.float64)
    for k in range(q.shape[1]):
        exact = acc + q[:, k] * c[:, k]  # both terms fit in 48 bits: exact in float64
        rounded = exact.float().double()
        too_far = rounded.abs() > exact.abs()
        rounded[too_far] = torch.nextafter(rounded[too_far].float(), torch.zeros(1)).double()
        acc = rounded
    return acc


@pytest.mark.parametrize("case", ["gaussian", "cancel", "ties_up", "wide_range"])
@pytest.mark.parametrize("d", [16, 64, 768])
def test_tf32_error_bound_holds(case, d):
    # |s_tc - s| <= e(d) |q| |c| for the emulated tensor core (rna inputs, exact products, truncating
    # fp32 accumulation), on inputs built to hurt: all errors of one sign, cancellation, wide range.
    gen = torch.Generator().manual_seed(d)
    m = 2000 if d < 768 else 200
    q, c = torch.randn(m, d, generator=gen), torch.randn(m, d, generator=gen)
    if case == "cancel":  # c_k ~ -q_k on half the entries: large terms, tiny sum
        c[:, : d // 2] = -q[:, : d // 2] * (1 + 2.0**-12)
        c[:, d // 2:] = q[:, d // 2:]
    elif case == "ties_up":  # every input exactly halfway between two tf32 values: rounds up
        q = torch.full((m, d), 1 + 2.0**-11) * torch.randint(1, 5, (m, 1), generator=gen)
        c = torch.full((m, d), 1 + 2.0**-11)
    elif case == "wide_range":
        q = q * torch.exp2(torch.randint(-20, 20, (m, d), generator=gen).float())
    exact = (q.double() * c.double()).sum(1)
    got = truncating_fp32_dot(to_tf32(q).double(), to_tf32(c).double())
    bound = _C.tf32_dot_error_factor(d) * torch.linalg.vector_norm(q.double(), dim=1) * \
        torch.linalg.vector_norm(c.double(), dim=1)
    err = (got - exact).abs()
    assert torch.all(err <= bound)
    if case == "ties_up":  # the bound is not loose where the error is systematic
        assert float((err / bound).max()) > 0.3


def test_tf32_error_factor_values():
    # e(d) = ((2u + u^2) + 2 (d + 2) 2^-23 (1 + 2u + u^2) + 4 2^-23) (1 + 2^-20), u = 2^-11
    u = 2.0**-11
    for d in (1, 16, 768, 4096):
        want = ((2 * u + u * u) + 2 * (d + 2) * 2.0**-23 * (1 + 2 * u + u * u) + 4 * 2.0**-23) * (1 + 2.0**-20)
        assert _C.tf32_dot_error_factor(d) == pytest.approx(want, rel=1e-15)


def test_rescore_candidates_cpu_is_the_exact_score():
    gen = torch.Generator().manual_seed(5)
    b, n, d, cap = 7, 50, 48, 16
    q, c = torch.randn(b, d, generator=gen), torch.randn(n, d, generator=gen)
    rs, cs = torch.rand(b, generator=gen) + 0.5, torch.rand(n, generator=gen) + 0.5
    cols = torch.randint(0, n, (b, cap), generator=gen, dtype=torch.int32)
    counts = torch.randint(0, cap + 5, (b,), generator=gen, dtype=torch.int32)  # some rows overflow
    scores = torch.full((b, cap), math.nan)
    f = _C.FusedBlock()
    f.queries, f.q_stride, f.candidates, f.c_stride = q.data_ptr(), d, c.data_ptr(), d
    f.dtype, f.rows, f.cols, f.dim = 0, b, n, d
    f.row_scale, f.col_scale = rs.data_ptr(), cs.data_ptr()
    lo, hi = torch.full((b,), -math.inf), torch.full((b,), math.inf)  # the launch's bounds (rescoring ignores them)
    f.row_lo, f.row_hi = lo.data_ptr(), hi.data_ptr()
    f.cand_score, f.cand_col, f.cand_count, f.cand_cap = scores.data_ptr(), cols.data_ptr(), counts.data_ptr(), cap
    _C.topk_rescore_candidates(f, False, 0, 1)
    exact = ((q.double() @ c.double().T) * rs.double()[:, None] * cs.double()[None, :]).float()
    for i in range(b):
        m = min(int(counts[i]), cap)
        assert torch.equal(scores[i, :m], exact[i, cols[i, :m].long()])
        assert torch.all(torch.isnan(scores[i, m:]))
    f.dtype = 3  # bf16: rescoring reads fp32 only
    with pytest.raises(ValueError, match="float32"):
        _C.topk_rescore_candidates(f, False, 0, 1)


class _EmulatedFused:
    """The fused kernel in torch, reading and writing through the FusedBlock's pointers: scores of
    tf32-rounded inputs (fp32) or exact products (16-bit), each pushed by `push` times the bound's
    accumulation share in a random direction (fp32 only), then the epilogue's scale, slack, filter
    and unordered lists with overflow counting."""

    def __init__(self, gen: torch.Generator, push: float):
        self.gen, self.push, self.launches = gen, push, 0

    def __call__(self, f) -> None:
        self.launches += 1
        dtype = {0: torch.float32, 2: torch.float16, 3: torch.bfloat16}[f.dtype]
        q = host_view(f.queries, dtype, f.rows, f.dim, f.q_stride).float()
        c = host_view(f.candidates, dtype, f.cols, f.dim, f.c_stride).float()
        vec = lambda ptr, n, dt=torch.float32: host_view(ptr, dt, 1, n, n)[0] if ptr else None  # noqa: E731
        if f.dtype == 0:
            s = (to_tf32(q).double() @ to_tf32(c).double().T)
            acc_share = 2 * (f.dim + 2) * 2.0**-23
            size = torch.linalg.vector_norm(q.double(), dim=1)[:, None] * torch.linalg.vector_norm(c.double(), dim=1)
            sign = torch.randint(0, 2, s.shape, generator=self.gen).double() * 2 - 1
            s = (s + sign * self.push * acc_share * size).float()
        else:
            s = (q.double() @ c.double().T).float()  # exact products; fp32 sum here exact for small ints
        rs, cs = vec(f.row_scale, f.rows), vec(f.col_scale, f.cols)
        if rs is not None:
            s = s * rs[:, None]
        if cs is not None:
            s = s * cs[None, :]
        w = torch.zeros_like(s)
        if f.row_slack:
            w = vec(f.row_slack, f.rows)[:, None] * vec(f.col_slack, f.cols)[None, :]
        lo, hi = vec(f.row_lo, f.rows), vec(f.row_hi, f.rows)
        keep = (s + w >= lo[:, None]) & (s - w <= hi[:, None])
        scores = host_view(f.cand_score, torch.float32, f.rows, f.cand_cap, f.cand_cap)
        cols = host_view(f.cand_col, torch.int32, f.rows, f.cand_cap, f.cand_cap)
        counts = vec(f.cand_count, f.rows, torch.int32)
        for i in range(f.rows):
            idx = keep[i].nonzero().flatten()
            idx = idx[torch.randperm(len(idx), generator=self.gen)][: f.cand_cap]
            scores[i, : len(idx)] = s[i, idx]
            cols[i, : len(idx)] = idx.to(torch.int32)
            counts[i] = int(keep[i].sum())


class _CountingDriver(CudaDriver):
    """The CUDA driver, recording the width of every two-pass call (the fused path's seed and the chunks
    it redoes)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.dense_calls: list[int] = []

    def run_two_pass(self, queries, candidates, *args, **kwargs):
        self.dense_calls.append(candidates.shape[0])
        return super().run_two_pass(queries, candidates, *args, **kwargs)


class _EmulatedFusedDriver(_CountingDriver):
    """The fused driver on the CPU: launchers emulated (the fused kernel by _EmulatedFused), bounds,
    offers, merges and rescoring run by the CPU kernels, score blocks from ExactGemm, the tf32 error
    factor scaled by `slack` (0 shows what the slack is for)."""

    def __init__(self, fused: _EmulatedFused, slack: float = 1.0):
        super().__init__(kernels=HostKernels(_HostLaunchers(fused)), product=ExactGemm)
        self.slack = slack

    def error_factor(self, dim: int) -> float:
        return self.slack * super().error_factor(dim)


def _run_emulated_fused(q, c, metric, k, kw, slack=1.0, push=0.9, seed=0):
    launch = _EmulatedFused(torch.Generator().manual_seed(seed), push)
    driver = _EmulatedFusedDriver(launch, slack)
    exact = exact_fused_scores(q, c, metric)
    b, n = exact.shape
    sel = build_selection(
        b, n, q.device, k, positives=kw.get("positives"), exclude=kw.get("exclude"), query_labels=None,
        candidate_labels=None, positive_scores=None, absolute_margin=None,
        relative_margin=kw.get("relative_margin"), min_score=None, max_score=None,
        skip_top=kw.get("skip_top", 0), pool=kw.get("pool"), sampling=kw.get("sampling", "top"),
        temperature=1.0, generator=None, seed=kw.get("seed"),
        positive_values=lambda pos: torch.gather(exact, 1, pos),
    )
    with settings.override(cuda_fused_seed_cols=1000):
        state = driver.run_fused(q, c, SelectionState(sel, b, q.device, kernels=driver.kernels), metric, 1 << 20, 0)
    got = state.finalize()
    return got, hnsample.topk_from_scores(exact, k, **kw), (launch.launches, driver.dense_calls)


FUSED_EMULATED = [
    ("tf32_dot", torch.float32, "dot"),
    ("tf32_cosine", torch.float32, "cosine"),
    ("bf16_cosine", torch.bfloat16, "cosine"),
    ("f16_dot", torch.float16, "dot"),
]


@pytest.mark.parametrize("name,dtype,metric", FUSED_EMULATED, ids=[x[0] for x in FUSED_EMULATED])
@pytest.mark.parametrize("fname", ["plain", "margin", "window"])
def test_fused_driver_on_emulated_kernels(name, dtype, metric, fname):
    # The fused driver end to end on the CPU: seed, doubling chunks, bounds, the emulated kernel with
    # tf32 errors near the bound, exact rescoring, offers. The result must equal the selection over
    # the exact scores, bit for bit.
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{fname}".encode()))
    b, n, d, k = 64, 9000, 32, 10
    if dtype == torch.float32:
        q, c = torch.randn(b, d, generator=gen), torch.randn(n, d, generator=gen)
    else:  # small integers: exact in 16 bits, every fp32 sum exact
        q, c = int_matrix(b, d, gen, -8, 8).to(dtype), int_matrix(n, d, gen, -8, 8).to(dtype)
    kw = {}
    if fname == "margin":
        kw = {"positives": torch.randint(0, n, (b, 1), generator=gen), "relative_margin": 0.05,
              "exclude": torch.randint(-1, n, (b, 4), generator=gen)}
    elif fname == "window":
        kw = {"skip_top": 2, "pool": 15, "sampling": "uniform", "seed": 9}
    (got_s, got_j), want, (launches, dense_calls) = _run_emulated_fused(q, c, metric, k, kw)
    assert launches == 4  # after the seed of 1000 columns: chunks of 1000, 2000, 4000 and 1000
    assert dense_calls == [1000]  # the seed only: no chunk overflowed
    assert torch.equal(got_j, want.indices)
    assert torch.equal(got_s.float(), want.scores)


def test_fused_driver_needs_the_tf32_slack():
    # Without the slack (factor 0) the same emulated errors lose candidates near each row's threshold:
    # the comparison above can fail, and the slack is what makes it pass.
    # Candidates that differ by a little noise around one vector: their exact scores lie closer
    # together than the tf32 errors, so near each row's threshold the tf32 order is not the exact one.
    gen = torch.Generator().manual_seed(77)
    b, n, d, k = 64, 9000, 32, 10
    q = torch.randn(b, d, generator=gen)
    c = torch.randn(d, generator=gen) + 0.01 * torch.randn(n, d, generator=gen)
    (_, got_j), want, _ = _run_emulated_fused(q, c, "dot", k, {}, slack=0.0)
    assert not torch.equal(got_j, want.indices)
    (_, got_j), want, _ = _run_emulated_fused(q, c, "dot", k, {}, slack=1.0)
    assert torch.equal(got_j, want.indices)


PATH_CASES = [  # (case, path under cuda_path="fused"): the first takes the fused kernels, the rest never do
    ("bf16", "fused"), ("fp64", "two_pass"), ("stream", "two_pass"), ("odd_dim", "two_pass"),
    ("odd_dim_fp32", "two_pass"), ("no_fused_kernels", "two_pass"),
]


@pytest.mark.parametrize("case,fused", PATH_CASES, ids=[x[0] for x in PATH_CASES])
def test_path_choice_follows_settings(case, fused):
    # CudaDriver.choose_path on the emulated launchers: settings.cuda_path forces a path only where the
    # fused kernels take the inputs; "auto" takes them with cuda_fused_auto on, N >= 4 seed widths and a
    # state of at most cuda_fused_auto_max_capacity slots.
    dtype = {"fp64": torch.float64, "odd_dim_fp32": torch.float32}.get(case, torch.bfloat16)
    d = 40 if case.startswith("odd_dim") else 32
    q, c = torch.randn(50, d).to(dtype), torch.randn(40_000, d).to(dtype)
    sel_kw = {"sampling": "uniform", "seed": 1} if case == "stream" else {}
    sel = _cpu_state(torch.zeros(50, 40_000), 8, sel_kw).sel
    launchers = _HostLaunchers()
    if case == "no_fused_kernels":  # a device (or build) without the fused kernels
        launchers.topk_fused_supported = lambda device: False
    driver = CudaDriver(kernels=HostKernels(launchers))
    state = SelectionState(sel, 50, q.device, kernels=driver.kernels)
    auto = fused if fused == "fused" else "two_pass"
    for overrides, want in [
        ({"cuda_path": "fused"}, fused),
        ({"cuda_path": "two_pass"}, "two_pass"),
        ({"cuda_path": "auto", "cuda_fused_auto": False}, "two_pass"),
        ({"cuda_path": "auto", "cuda_fused_auto": True, "cuda_fused_seed_cols": 10_000}, auto),
        ({"cuda_path": "auto", "cuda_fused_auto": True, "cuda_fused_seed_cols": 10_001}, "two_pass"),
        ({"cuda_path": "auto", "cuda_fused_auto": True, "cuda_fused_seed_cols": 10_000,
          "cuda_fused_auto_max_capacity": state.capacity}, auto),
        ({"cuda_path": "auto", "cuda_fused_auto": True, "cuda_fused_seed_cols": 10_000,
          "cuda_fused_auto_max_capacity": state.capacity - 1}, "two_pass"),
        ({"cuda_path": "fused", "cuda_fused_auto_max_capacity": state.capacity - 1}, fused),
    ]:
        with settings.override(**overrides):
            assert driver.choose_path(q, c, "dot", state) == want, overrides


# ----------------------------------------------------------------------------------------------------
# GPU: CUDA == CPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("fname", list(FILTERS))
@pytest.mark.parametrize("sname,skw", SAMPLING, ids=[s[0] for s in SAMPLING])
def test_from_scores_cuda_equals_cpu(dtype, fname, sname, skw):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{fname}/{sname}".encode()))
    b, n = 37, 3001
    scores = (torch.randn(b, n, generator=gen) * 2).to(dtype)
    scores[:, 100:140] = scores[:, 200:240]  # ties
    scores[0, 5] = float("nan")
    scores[1, 6] = float("inf")
    kw = dict(make_filters(FILTERS[fname], b, n, gen), **skw)
    cpu = hnsample.topk_from_scores(scores, 50, **kw)
    gpu = hnsample.topk_from_scores(scores.cuda(), 50, **to_device(kw, "cuda"))
    assert_same(cpu, gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["transposed", "offset", "column_stride"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_from_scores_cuda_any_strides(layout, dtype):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(600, 700, generator=gen).to(dtype)
    if layout == "transposed":
        scores = base.T
    elif layout == "offset":
        scores = base[3:, 1:]  # rows not 16-byte aligned: the kernel peels a head before vector loads
    else:
        scores = base[:, ::3]
    cpu = hnsample.topk_from_scores(scores, 17, sampling="softmax", seed=2)
    views = {"transposed": lambda t: t.T, "offset": lambda t: t[3:, 1:], "column_stride": lambda t: t[:, ::3]}
    g = views[layout](base.cuda())
    assert_same(cpu, hnsample.topk_from_scores(g, 17, sampling="softmax", seed=2))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sname,skw", SAMPLING, ids=[s[0] for s in SAMPLING])
@pytest.mark.parametrize("shape", [(300, 5000), (5, 70_000)], ids=["wide_rows", "segmented"])
def test_similarity_cuda_equals_cpu_on_exact_scores(dtype, sname, skw, shape):
    gen = torch.Generator().manual_seed(3)
    b, n = shape
    q, c = int_matrix(b, 24, gen).to(dtype), int_matrix(n, 24, gen).to(dtype)
    kw = dict(make_filters(FILTERS["all"], b, n, gen), **skw)
    cpu = hnsample.topk_similarity(q, c, 40, **kw)
    gpu = hnsample.topk_similarity(q.cuda(), c.cuda(), 40, **to_device(kw, "cuda"))
    assert_same(cpu, gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
def test_similarity_cosine_cuda_matches_reference(dtype):
    gen = torch.Generator().manual_seed(4)
    q, c = torch.randn(64, 32, generator=gen).to(dtype), torch.randn(4000, 32, generator=gen).to(dtype)
    c[7] = 0  # a zero vector has cosine 0 with everything
    got = hnsample.topk_similarity(q.cuda(), c.cuda(), 20, metric="cosine")
    full = ref.similarity(q, c, "cosine")
    picked = torch.gather(full, 1, got.indices.cpu())
    torch.testing.assert_close(got.scores.cpu(), picked, atol=1e-5, rtol=1e-5)
    # the k-th best by the reference is not clearly better than what the GPU returned last
    kth = full.topk(20, dim=1).values[:, -1]
    assert torch.all(got.scores.cpu()[:, -1] >= kth - 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("block_size", [256, 997, 1 << 16, 1 << 24])
def test_similarity_cuda_block_size_independent(block_size):
    gen = torch.Generator().manual_seed(5)
    q, c = int_matrix(130, 16, gen).cuda(), int_matrix(9000, 16, gen).cuda()
    kw = {"sampling": "softmax", "seed": 9, "skip_top": 2, "temperature": 2.0}
    want = hnsample.topk_similarity(q.cpu(), c.cpu(), 33, **kw)
    assert_same(want, hnsample.topk_similarity(q, c, 33, block_size=block_size, **kw))


@pytest.mark.gpu
@pytest.mark.parametrize("k", [64, 2048, 2500])
def test_similarity_cuda_large_k(k):
    gen = torch.Generator().manual_seed(6)
    q, c = int_matrix(20, 8, gen), int_matrix(12_000, 8, gen)
    kw = {"exclude": torch.randint(-1, 12_000, (20, 10), generator=gen)}
    cpu = hnsample.topk_similarity(q, c, k, **kw)
    gpu = hnsample.topk_similarity(q.cuda(), c.cuda(), k, **to_device(kw, "cuda"))
    assert_same(cpu, gpu)


@pytest.mark.gpu
@pytest.mark.parametrize("b,n,k", [(0, 10, 3), (4, 0, 3), (4, 10, 0), (3, 5, 9)])
def test_similarity_cuda_empty_and_k_above_n(b, n, k):
    q, c = torch.randn(b, 8, device="cuda"), torch.randn(n, 8, device="cuda")
    got = hnsample.topk_similarity(q, c, k)
    assert got.scores.shape == (b, k) and got.indices.shape == (b, k)
    assert got.scores.device.type == "cuda"
    if b and k > n:
        assert torch.all(got.indices[:, n:] == -1)
        assert torch.all(torch.isinf(got.scores[:, n:]))


@pytest.mark.gpu
def test_similarity_cuda_autograd_matches_cpu():
    gen = torch.Generator().manual_seed(8)
    q, c = int_matrix(12, 10, gen).double(), int_matrix(300, 10, gen).double()
    grads = []
    for device in ("cpu", "cuda"):
        qd = q.detach().to(device).requires_grad_()  # a leaf on each device (q.to("cpu") is q itself)
        cd = c.detach().to(device).requires_grad_()
        out = hnsample.topk_similarity(qd, cd, 7, metric="cosine")
        (out.scores * torch.arange(7, device=device)).sum().backward()
        grads.append((qd.grad.cpu(), cd.grad.cpu()))
    torch.testing.assert_close(grads[0], grads[1])
    qd = torch.randn(5, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    cd = torch.randn(40, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: hnsample.topk_similarity(a, b, 3).scores, (qd, cd))


@pytest.mark.gpu
def test_similarity_cuda_under_torch_compile():
    gen = torch.Generator().manual_seed(10)
    q, c = int_matrix(50, 16, gen).cuda(), int_matrix(3000, 16, gen).cuda()

    def f(a, b):
        out = hnsample.topk_similarity(a, b, 9, sampling="uniform", seed=4)
        return out.scores * 2, out.indices

    compiled = torch.compile(f, fullgraph=True)
    s1, j1 = compiled(q, c)
    s0, j0 = f(q, c)
    assert torch.equal(j0, j1) and torch.equal(s0, s1)


@pytest.mark.gpu
def test_cuda_kernel_opcheck():
    q, c = torch.randn(6, 8, device="cuda"), torch.randn(50, 8, device="cuda")
    torch.library.opcheck(
        torch.ops.hnsample.topk_similarity.default, (q, c, None, None, None, None),
        {"k": 4, "min_score": -math.inf, "max_score": math.inf, "skip_top": 0, "pool": -1, "sampling": "top",
         "temperature": 1.0, "seed": 0, "metric": "dot", "block_size": 1 << 24},
    )


@contextlib.contextmanager
def _fused_path(**driver_kwargs) -> Iterator[_CountingDriver]:
    """CUDA inputs go to a _CountingDriver(**driver_kwargs) on the fused path (settings.cuda_path) for
    the duration of the block."""
    driver = _CountingDriver(**driver_kwargs)
    with settings.override(cuda_path="fused"), registry.use("cuda", CudaBackend(driver)):
        yield driver


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("fname", ["plain", "all", "window", "bounds"])
@pytest.mark.parametrize("sname,skw", [SAMPLING[0], SAMPLING[3]], ids=["top", "uniform_pool"])
def test_fused_path_equals_cpu(dtype, fname, sname, skw):
    gen = torch.Generator().manual_seed(zlib.crc32(f"fused/{fname}/{sname}".encode()))
    b, n = 300, 50_000  # seed 8192 columns, then fused chunks of 8192, 16384 and the rest
    # integers in [-50, 50): exact in bf16/fp16, dot products exact in fp32, few ties at the thresholds
    q, c = int_matrix(b, 64, gen, -50, 50).to(dtype), int_matrix(n, 64, gen, -50, 50).to(dtype)
    kw = dict(make_filters(FILTERS[fname], b, n, gen), **skw)
    if "min_score" in kw:
        kw["min_score"], kw["max_score"] = -2000.0, 9000.0
    qd, cd = q.cuda(), c.cuda()
    sel_kw = {key: kw[key] for key in ("sampling", "pool", "skip_top", "seed") if key in kw}
    cpu = hnsample.topk_similarity(q, c, 40, **kw)
    with _fused_path() as driver:
        state = SelectionState(_cpu_state(torch.zeros(b, n), 40, sel_kw).sel, b, qd.device, kernels=driver.kernels)
        assert driver.choose_path(qd, cd, "dot", state) == "fused"
        assert_same(cpu, hnsample.topk_similarity(qd, cd, 40, **to_device(kw, "cuda")))
    assert driver.dense_calls[0] == 8192
    if fname != "all":
        # the seed only: every fused chunk's lists fit (with "all", a row whose positive score is far
        # below the rest can keep a non-full state and send a chunk back to the two-pass path)
        assert driver.dense_calls == [8192]


@pytest.mark.gpu
def test_fused_path_redoes_overflowing_chunks():
    # Scores that grow with the candidate id: every chunk beats every threshold, all lists overflow,
    # and each chunk is redone on the two-pass path; the result must still be exact.
    b, n = 130, 40_000
    q = torch.ones(b, 32, dtype=torch.bfloat16)
    c = (torch.arange(n) // 64).float()[:, None].expand(n, 32).to(torch.bfloat16).contiguous()
    cpu = hnsample.topk_similarity(q, c, 16)
    with _fused_path() as driver:
        assert_same(cpu, hnsample.topk_similarity(q.cuda(), c.cuda(), 16))
    assert driver.dense_calls == [8192, 8192, 16384, 40_000 - 32768]  # the seed, then every chunk redone


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["fp64", "stream", "odd_dim", "odd_dim_fp32"])
def test_fused_path_never_runs_on_unsupported_inputs(case):
    dtype = {"fp64": torch.float64, "odd_dim_fp32": torch.float32}.get(case, torch.bfloat16)
    d = 40 if case.startswith("odd_dim") else 32
    q, c = torch.randn(50, d, device="cuda").to(dtype), torch.randn(40_000, d, device="cuda").to(dtype)
    sel_kw = {"sampling": "uniform", "seed": 1} if case == "stream" else {}
    sel = _cpu_state(torch.zeros(50, 40_000), 8, sel_kw).sel
    with _fused_path() as driver:
        assert driver.choose_path(q, c, "dot", SelectionState(sel, 50, q.device, kernels=driver.kernels)) == "two_pass"


@pytest.mark.gpu
@pytest.mark.parametrize("metric", ["dot", "cosine"])
@pytest.mark.parametrize("fname", ["plain", "labels", "bounds", "window"])
def test_fused_tf32_path_equals_selection_over_exact_scores(metric, fname):
    # fp32 inputs on the tf32 kernel: survivors are rescored exactly (and the seed goes through the
    # same exact GEMM), so the result is the selection over the exact scores rounded once; a
    # candidate lost to a tf32 error outside the slack would show here.
    gen = torch.Generator().manual_seed(zlib.crc32(f"tf32/{metric}/{fname}".encode()))
    b, n, d = 300, 50_000, 64
    q, c = torch.randn(b, d, generator=gen).cuda(), torch.randn(n, d, generator=gen).cuda()
    kw = make_filters(FILTERS[fname], b, n, gen)
    if fname == "bounds" and metric == "cosine":
        kw["min_score"], kw["max_score"] = -0.2, 0.3
    want = hnsample.topk_from_scores(exact_fused_scores(q, c, metric).cpu(), 40, **kw)
    with _fused_path(product=ExactGemm) as driver:
        got = hnsample.topk_similarity(q, c, 40, metric=metric, **to_device(kw, "cuda"))
    assert_same(want, got)
    assert driver.dense_calls[0] == 8192
    if fname != "bounds":  # a max_score cuts where scores are dense: a chunk may overflow, legitimately
        assert driver.dense_calls == [8192]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_fused_cosine_16bit_equals_two_pass(dtype):
    # Both paths scale the same exact fp32 sums of small integers by the same 1 / |x| in fp32.
    gen = torch.Generator().manual_seed(31)
    b, n = 200, 40_000
    q = int_matrix(b, 64, gen, -50, 50).to(dtype).cuda()
    c = int_matrix(n, 64, gen, -50, 50).to(dtype).cuda()
    with settings.override(cuda_path="two_pass"):
        want = hnsample.topk_similarity(q, c, 30, metric="cosine", skip_top=1)
    with _fused_path() as driver:
        assert_same(want, hnsample.topk_similarity(q, c, 30, metric="cosine", skip_top=1))
    assert driver.dense_calls == [8192]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_two_pass_cosine_scales_in_select_equal_the_products_multiplications(dtype):
    # On the device: the select kernel's (acc * 1/|q_i|) * 1/|c_j| in fp32 is bit for bit the block
    # torch's two mul_s wrote, so the two-pass result is unchanged on random (inexact) scores too.
    gen = torch.Generator().manual_seed(32)
    q = torch.randn(300, 64, generator=gen).to(dtype).cuda()
    c = torch.randn(30_000, 64, generator=gen).to(dtype).cuda()
    c[5] = 0
    default = CudaDriver().product(q, "cosine")
    if not isinstance(default, MixedPrecisionProduct):
        pytest.skip("this torch has no torch.mm(..., out_dtype=float32) for 16-bit inputs")
    assert default.scales_in_select
    kw = {"skip_top": 1, "sampling": "softmax", "seed": 3, "relative_margin": 0.01,
          "positives": torch.randint(0, 30_000, (300, 1), generator=gen).cuda()}
    results = []
    for in_select in (True, False):
        driver = CudaDriver(product=lambda queries, metric, s=in_select: product_for(queries, metric,
                                                                                   scales_in_select=s))
        with settings.override(cuda_path="two_pass"), registry.use("cuda", CudaBackend(driver)):
            results.append(hnsample.topk_similarity(q, c, 40, metric="cosine", **kw))
    assert_same(*results)


@pytest.mark.gpu
def test_select_block_scales_must_be_on_the_blocks_device():
    scores = torch.zeros(4, 10, device="cuda")
    state = SelectionState(_cpu_state(torch.zeros(4, 10), 3, {}).sel.on(scores.device), 4, scores.device)
    kernels = state.kernels
    with pytest.raises(ValueError, match="row_scale must be on the block's device"):
        kernels.select_block(state.params, scores, 0, 0, row_scale=torch.ones(4), col_scale=torch.ones(10).cuda())
    kernels.select_block(state.params, scores, 0, 0, row_scale=torch.ones(4).cuda(), col_scale=torch.ones(10).cuda())
