"""The CUDA kernels' own source, run on the CPU by the emulator of tests/cuda_emu, against the CPU
kernels (themselves tested against the reference).

Every kernel of csrc/cuda/topk_select.cu, topk_fused.cu and info_nce.cu is compiled with g++ for the
emulator (one fiber per CUDA thread, warp collectives and barriers as scheduling points, cp.async,
ldmatrix and mma.sync written from the PTX ISA). A launch that breaks the execution model (a
collective some lane of its mask never reaches, a deadlock, a misaligned vector load or copy) raises
``_cuda_emu.KernelFault``. Skips when g++ or the kernel sources are missing.
"""

from __future__ import annotations

import collections
import importlib.util
import itertools
import math
import threading
import zlib
from pathlib import Path

import pytest
import torch
from fused_support import CountingModule, ExactGemm, HostKernels, HostMixedPrecisionProduct, exact_fused_scores

import hnsample
from hnsample import _C, settings
from hnsample.engine import CpuBackend, DeviceFacts, SelectionState, build_selection, registry
from hnsample.engine.cuda import CudaDriver, FusedOperands

_BUILD = Path(__file__).resolve().parent / "cuda_emu" / "build.py"
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
DTYPE_IDS = ["f32", "f64", "bf16", "f16"]
CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
SAMPLING = [
    ("top", {}),
    ("uniform_stream", {"sampling": "uniform", "seed": 11}),
    ("softmax_stream_skip", {"sampling": "softmax", "seed": 5, "skip_top": 4, "temperature": 0.5}),
    ("uniform_pool", {"sampling": "uniform", "seed": 3, "skip_top": 1, "pool": 30}),
]


@pytest.fixture(scope="session")
def emu():
    """The _cuda_emu module (built once per source tree, cached in the temp directory)."""
    if not _BUILD.is_file():
        pytest.skip("tests/cuda_emu is not here")
    spec = importlib.util.spec_from_file_location("hnsample_cuda_emu_build", _BUILD)
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    try:
        module = build.load()
    except build.Unavailable as e:
        pytest.skip(f"CUDA emulator unavailable: {e}")
    try:  # takes hnsample._C's TopkParams: needs the same pybind11 internals as the installed _C
        module.topk_row_bounds(_C.TopkParams(), 0, 0, True, 0, 1)
    except TypeError as e:
        pytest.skip(f"_cuda_emu cannot take hnsample._C's types (pybind11 versions differ?): {e}")
    return module


def selection(scores: torch.Tensor, k: int, kw: dict):
    b, n = scores.shape
    return build_selection(
        b, n, scores.device, k, positives=kw.get("positives"), exclude=kw.get("exclude"),
        query_labels=kw.get("query_labels"), candidate_labels=kw.get("candidate_labels"), positive_scores=None,
        absolute_margin=kw.get("absolute_margin"), relative_margin=kw.get("relative_margin"),
        min_score=kw.get("min_score"), max_score=kw.get("max_score"), skip_top=kw.get("skip_top", 0),
        pool=kw.get("pool"), sampling=kw.get("sampling", "top"), temperature=kw.get("temperature", 1.0),
        generator=None, seed=kw.get("seed"),
        positive_values=lambda pos: torch.gather(scores.double(), 1, pos),
    )


def finalize(state: SelectionState, emu=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The state's results from the emulated finalize kernel (emu given) or the CPU one."""
    if emu is None:
        return state.finalize()
    rows = state.rows
    out_s = torch.full((rows, state.sel.k), 7.0, dtype=torch.float64)
    out_j = torch.full((rows, state.sel.k), 7, dtype=torch.int64)
    emu.topk_finalize(state.params, out_s.data_ptr(), out_j.data_ptr(), True, 0, 1)
    return out_s, out_j


def offer(state: SelectionState, block: torch.Tensor, row_offset: int, col_offset: int, emu=None,
          segments: int = 1) -> None:
    args = (state.params, block.data_ptr(), CODES[block.dtype], block.shape[0], block.shape[1], block.stride(0),
            block.stride(1), row_offset, col_offset)
    if emu is None:
        _C.topk_select_block(*args, False, 0, 1)
    else:
        emu.topk_select_block_segments(*args, segments, 0)


def assert_same(got, want) -> None:
    assert torch.equal(got[1], want[1])
    assert torch.equal(got[0], want[0])


def filters(name: str, b: int, n: int, gen: torch.Generator) -> dict:
    if name == "plain":
        return {}
    if name == "masks_margin":
        pos = torch.randint(-1, n, (b, 2), generator=gen)
        pos[:, 0] = torch.randint(0, n, (b,), generator=gen)
        return {"positives": pos, "exclude": torch.randint(-1, n, (b, 5), generator=gen),
                "query_labels": torch.randint(0, 4, (b,), generator=gen),
                "candidate_labels": torch.randint(0, 4, (n,), generator=gen), "relative_margin": 0.05}
    return {"min_score": -1.0, "max_score": 1.5}


# ----------------------------------------------------------------------------------------------------
# The emulator itself (tests/cuda_emu/emu_selftest.cu)


def test_emulator_shuffles_and_votes(emu):
    out = torch.zeros(64, 6, dtype=torch.int32)
    emu.selftest_shuffles(out.data_ptr())
    t = torch.arange(64)
    lane, base = t % 32, t - t % 32
    v = 100 * t
    assert torch.equal(out[:, 0], v[base + 31 - lane].int())
    assert torch.equal(out[:, 1], v[base + (lane ^ 5)].int())
    assert torch.equal(out[:, 2], torch.where(lane + 3 < 32, v[(t + 3).clamp(max=63)], v).int())
    assert torch.equal(out[:, 3], torch.where(lane >= 2, v[(t - 2).clamp(min=0)], v).int())
    assert torch.equal(out[:, 4], v[t - t % 8 + 1].int())
    assert torch.all(out[:, 5].view(torch.int32) == 0xAAAAAAAA - (1 << 32))


@pytest.mark.parametrize("mode,message", [(0, "exited"), (1, "deadlock"), (2, "while lanes")],
                         ids=["exited_lane", "deadlock", "mismatched"])
def test_emulator_faults_instead_of_hanging(emu, mode, message):
    out = torch.zeros(64, dtype=torch.int32)
    with pytest.raises(emu.KernelFault, match=message):
        emu.selftest_faults(mode, out.data_ptr())


def test_emulator_divergent_halves_complete(emu):
    out = torch.zeros(64, dtype=torch.int32)
    emu.selftest_faults(3, out.data_ptr())
    lane = torch.arange(64) % 32
    assert torch.equal(out, torch.where(lane < 16, 0xFFFF, 16).int())


def test_emulator_mma_fragments_compose(emu):
    # ldmatrix (A) and mma.sync (A, B, C tables), composed as the ISA documents, compute A B.
    gen = torch.Generator().manual_seed(1)
    a = torch.randint(-8, 9, (16, 16), generator=gen).to(torch.bfloat16)
    bt = torch.randint(-8, 9, (8, 16), generator=gen).to(torch.bfloat16)
    d = torch.full((16, 8), math.nan)
    emu.selftest_mma_bf16(a.view(torch.int16).data_ptr(), bt.view(torch.int16).data_ptr(), d.data_ptr())
    assert torch.equal(d, a.float() @ bt.float().T)


# ----------------------------------------------------------------------------------------------------
# The select kernel (two-pass path), finalize and merge


def score_matrix(b: int, n: int, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    s = (torch.randn(b, n, generator=gen) * 2).to(dtype)
    s[:, 100:140] = s[:, 200:240]  # ties
    s[0, 5] = math.nan
    s[1, 6] = math.inf
    s[2, 7] = -math.inf
    return s


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("fname", ["plain", "masks_margin", "bounds"])
@pytest.mark.parametrize("sname,skw", SAMPLING, ids=[s[0] for s in SAMPLING])
def test_select_block_equals_cpu(emu, dtype, fname, sname, skw):
    gen = torch.Generator().manual_seed(zlib.crc32(f"{dtype}/{fname}/{sname}".encode()))
    b, n, k = 19, 1300, 20
    scores = score_matrix(b, n, dtype, gen)
    kw = dict(filters(fname, b, n, gen), **skw)
    states = [SelectionState(selection(scores, k, kw), b, scores.device) for _ in range(2)]
    # two column blocks, the second with a row offset and a column offset
    for state, mod in zip(states, (None, emu), strict=True):
        offer(state, scores[:, :700], 0, 0, mod)
        offer(state, scores[5:, 700:], 5, 700, mod)
        offer(state, scores[:5, 700:], 0, 700, mod)
    assert_same(finalize(states[1], emu), finalize(states[0]))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["transposed", "offset", "column_stride"])
def test_select_block_any_strides(emu, dtype, layout):
    # Unaligned rows make the kernel peel a head before its 16-byte loads; strided columns take the
    # scalar path. The emulator faults on any misaligned vector load.
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(300, 1100, generator=gen).to(dtype)
    scores = {"transposed": base.T[:, :290], "offset": base[3:40, 1:], "column_stride": base[:30, ::3]}[layout]
    b, n = scores.shape
    states = [SelectionState(selection(scores, 15, {}), b, scores.device) for _ in range(2)]
    offer(states[0], scores, 0, 0)
    offer(states[1], scores, 0, 0, emu)
    assert_same(finalize(states[1], emu), finalize(states[0]))


@pytest.mark.parametrize("n,segments", [(3000, 3), (5, 4), (1100, 7)], ids=["wide", "empty_segment", "ragged"])
@pytest.mark.parametrize("sname,skw", SAMPLING, ids=[s[0] for s in SAMPLING])
def test_segments_and_merge_kernel(emu, sname, skw, n, segments):
    # The segmented launch (column range s into state copy s) merged by the merge kernel equals one
    # CPU state over the whole block (also when the last segments are empty: 5 columns in 4 segments).
    gen = torch.Generator().manual_seed(9)
    b, k = 10, 12
    scores = torch.randn(b, n, generator=gen) if n < 300 else score_matrix(b, n, torch.float32, gen)
    kw = dict(skw, exclude=torch.randint(-1, n, (b, 4), generator=gen))
    sel = selection(scores, k, kw)
    want = SelectionState(sel, b, scores.device)
    offer(want, scores, 0, 0)
    state = SelectionState(sel, b, scores.device)
    copies = SelectionState(sel, b, scores.device, copies=segments)
    args = (scores.data_ptr(), 0, b, n, scores.stride(0), 1, 0, 0)
    emu.topk_select_block_segments(copies.params, *args, segments, 0)
    for s in range(segments):
        emu.topk_merge(state.params, copies.copy_params(s), True, 0, 1)
    assert_same(finalize(state, emu), finalize(want))


def test_select_large_k(emu):
    # k beyond 2048: queues flush many times into a large heap.
    gen = torch.Generator().manual_seed(4)
    b, n, k = 3, 6000, 2100
    scores = score_matrix(b, n, torch.float32, gen)
    states = [SelectionState(selection(scores, k, {"skip_top": 5}), b, scores.device) for _ in range(2)]
    offer(states[0], scores, 0, 0)
    offer(states[1], scores, 0, 0, emu)
    got = finalize(states[1], emu)
    assert_same(got, finalize(states[0]))
    assert int((got[1] >= 0).sum()) == b * k


def test_select_block_single_segment_launcher(emu):
    # topk_select_block_cuda: the one-segment entry point behind _C.topk_select_block(cuda=True).
    gen = torch.Generator().manual_seed(14)
    scores = score_matrix(9, 800, torch.float16, gen)
    states = [SelectionState(selection(scores, 7, {}), 9, scores.device) for _ in range(2)]
    offer(states[0], scores, 0, 0)
    emu.topk_select_block(states[1].params, scores.data_ptr(), CODES[scores.dtype], 9, 800, scores.stride(0), 1, 0, 0,
                          True, 0, 1)
    assert_same(finalize(states[1], emu), finalize(states[0]))


def test_select_launcher_checks(emu):
    scores = torch.zeros(4, 10)
    state = SelectionState(selection(scores, 3, {}), 4, scores.device)
    with pytest.raises(_C.ParamError, match="segments must be in"):
        emu.topk_select_block_segments(state.params, scores.data_ptr(), 0, 4, 10, 10, 1, 0, 0, 0, 0)
    with pytest.raises(ValueError, match="cuda"):
        emu.topk_finalize(state.params, 0, 0, False, 0, 1)


# ----------------------------------------------------------------------------------------------------
# The select kernel with cosine scales: the block holds raw products, the kernel scales each score


def prescaled(block: torch.Tensor, rs: torch.Tensor, cs: torch.Tensor) -> torch.Tensor:
    """The block the product's mul_s would have written: (x * rs[r]) * cs[c] in float32 (float64 for a
    float64 block), in that order."""
    ct = torch.float64 if block.dtype == torch.float64 else torch.float32
    return (block.to(ct) * rs.to(ct)[:, None]) * cs.to(ct)[None, :]


def block_scales(b: int, n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales whose two multiplication orders round differently, with zeros (zero-norm rows and columns
    score 0; an inf times 0 is NaN)."""
    rs, cs = torch.rand(b, generator=gen) + 0.5, torch.rand(n, generator=gen) * 3 + 0.1
    rs[1] = 0.0  # row 1 holds an inf (score_matrix): NaN
    rs[3] = 0.0
    cs[11] = 0.0
    cs[n // 2] = 0.0
    return rs, cs


def offer_scaled(emu, state: SelectionState, block: torch.Tensor, rs: torch.Tensor, cs: torch.Tensor,
                 row_offset: int, col_offset: int, segments: int = 1) -> None:
    emu.topk_select_block_segments(state.params, block.data_ptr(), CODES[block.dtype], block.shape[0], block.shape[1],
                                   block.stride(0), block.stride(1), row_offset, col_offset, segments, 0,
                                   rs.data_ptr(), cs.data_ptr(), CODES[torch.float32])


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sname,skw", SAMPLING, ids=[s[0] for s in SAMPLING])
def test_select_block_scaled_equals_prescaled(emu, dtype, sname, skw):
    # The kernel with row and column scales selects, bit for bit, what the CPU kernel selects on the
    # block multiplied out first; with the filters, NaN and infinities of score_matrix, zero scales,
    # a row and column offset, and a segmented launch.
    gen = torch.Generator().manual_seed(zlib.crc32(f"scaled/{dtype}/{sname}".encode()))
    b, n, k = 19, 1300, 20
    raw = score_matrix(b, n, dtype, gen)
    rs, cs = block_scales(b, n, gen)
    want_scores = prescaled(raw, rs, cs)
    kw = dict(filters("masks_margin", b, n, gen), min_score=-2.5, max_score=4.0, **skw)
    sel = selection(want_scores, k, kw)
    want = SelectionState(sel, b, raw.device)
    offer(want, want_scores, 0, 0)
    state = SelectionState(sel, b, raw.device)
    copies = SelectionState(sel, b, raw.device, copies=3)
    offer_scaled(emu, state, raw[:, :700], rs, cs[:700], 0, 0)
    offer_scaled(emu, copies, raw[5:, 700:], rs[5:], cs[700:], 5, 700, segments=3)
    offer_scaled(emu, state, raw[:5, 700:], rs[:5], cs[700:], 0, 700)
    for s in range(3):
        emu.topk_merge(state.params, copies.copy_params(s), True, 0, 1)
    assert_same(finalize(state, emu), finalize(want))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("sname,skw", [SAMPLING[0], SAMPLING[2]], ids=["top", "softmax_stream_skip"])
def test_select_block_scale_order_at_the_bound(emu, dtype, sname, skw):
    # Each row's margin bound is exactly a score (x * rs) * cs that the other order, x * (rs cs), rounds
    # above: that candidate is the row's best eligible one, and a kernel that scaled in the other order
    # (in its vector tiles or for the survivors) would drop it or store another score.
    gen = torch.Generator().manual_seed(zlib.crc32(f"scale_order/{dtype}/{sname}".encode()))
    b, n = 12, 1024  # aligned rows of whole tiles: every score goes through the vector loads
    raw = (torch.randn(b, n, generator=gen, dtype=torch.float64) * 2).to(dtype)  # float64: all 53 bits
    rs, cs = block_scales(b, n, gen)
    rs[1] = rs[3] = 0.7
    want_scores = prescaled(raw, rs, cs)
    other = raw.to(want_scores.dtype) * (rs.to(want_scores.dtype)[:, None] * cs.to(want_scores.dtype)[None, :])
    hits = other > want_scores
    assert bool(hits.any(dim=1).all())
    bound = torch.where(hits, want_scores, torch.full_like(want_scores, -math.inf)).amax(dim=1)
    sel = build_selection(b, n, raw.device, 6, positive_scores=bound, absolute_margin=0.0, seed=skw.get("seed"),
                          **{key: v for key, v in skw.items() if key != "seed"})
    states = [SelectionState(sel, b, raw.device) for _ in range(2)]
    offer(states[0], want_scores, 0, 0)
    offer_scaled(emu, states[1], raw, rs, cs, 0, 0)
    got, want = finalize(states[1], emu), finalize(states[0])
    assert_same(got, want)
    if sname == "top":
        assert torch.equal(got[0][:, 0], bound.double())


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("layout", ["offset", "column_stride", "transposed", "scale_offset", "packed_ragged"])
def test_select_block_scaled_any_layout(emu, dtype, layout):
    # Rows that start off 16 bytes (a scalar head, then vector loads of scores and scales), strided
    # columns (scalar loads), column scales not aligned for vector loads (the row takes scalar tiles: a
    # misaligned vector load would fault in the emulator), and a packed block whose width is no multiple of 4.
    gen = torch.Generator().manual_seed(zlib.crc32(f"scaled_layout/{dtype}/{layout}".encode()))
    base = score_matrix(300, 1100, dtype, gen)
    raw = {"offset": base[3:40, 1:], "column_stride": base[:30, ::3], "transposed": base.T[:, :290],
           "scale_offset": base[:25], "packed_ragged": base[:21, :1037].contiguous()}[layout]
    b, n = raw.shape
    rs, cs = block_scales(b, n, gen)
    if layout == "scale_offset":
        cs = torch.cat([torch.ones(1), cs])[1:]  # 4 bytes past a 16-byte boundary
    want_scores = prescaled(raw, rs, cs)
    sel = selection(want_scores, 15, {"sampling": "softmax", "seed": 4, "skip_top": 2, "max_score": 3.0})
    states = [SelectionState(sel, b, raw.device) for _ in range(2)]
    offer(states[0], want_scores, 0, 0)
    offer_scaled(emu, states[1], raw, rs, cs, 0, 0)
    assert_same(finalize(states[1], emu), finalize(states[0]))


def test_select_scales_checks(emu):
    # The launcher refuses scales it cannot use, naming them; CudaKernels.select_block checks what the
    # launcher cannot see (extent, stride, dtype; the device: tests/test_topk_cuda.py on a GPU).
    scores = torch.zeros(4, 10)
    state = SelectionState(selection(scores, 3, {}), 4, scores.device)
    rs, cs = torch.ones(4), torch.ones(10)
    args = (state.params, scores.data_ptr(), 0, 4, 10, 10, 1, 0, 0, 1, 0)
    with pytest.raises(_C.ParamError, match="row_scale and col_scale go together"):
        emu.topk_select_block_segments(*args, rs.data_ptr(), 0, 0)
    with pytest.raises(_C.ParamError, match="row_scale and col_scale go together"):
        emu.topk_select_block_segments(*args, 0, cs.data_ptr(), 0)
    with pytest.raises(_C.ParamError, match="must be float32, got dtype code 1"):
        emu.topk_select_block_segments(*args, rs.data_ptr(), cs.data_ptr(), CODES[torch.float64])
    with pytest.raises(_C.ParamError, match="4-byte aligned"):
        emu.topk_select_block_segments(*args, rs.data_ptr(), cs.data_ptr() + 2, 0)
    emu.topk_select_block_segments(*args, rs.data_ptr(), cs.data_ptr(), 0)  # valid: runs
    kernels = HostKernels(emu)
    for bad, err, message in [
        ({"row_scale": torch.ones(5)}, ValueError, r"row_scale must be a 1-D tensor of 4 elements"),
        ({"col_scale": torch.ones(20)[::2]}, ValueError, r"col_scale must be a 1-D tensor of 10 elements with unit"),
        ({"col_scale": torch.ones(1, 10)}, ValueError, r"col_scale must be a 1-D tensor"),
        ({"row_scale": torch.ones(4, dtype=torch.float64)}, TypeError, "row_scale must be float32"),
        ({"row_scale": rs}, ValueError, "row_scale and col_scale go together"),
    ]:
        with pytest.raises(err, match=message):
            kernels.select_block(state.params, scores, 0, 0, **bad)


# ----------------------------------------------------------------------------------------------------
# The fused score kernels, row bounds, offers and rescoring


def int_matrix(rows: int, cols: int, gen: torch.Generator, lo: int = -4, hi: int = 5) -> torch.Tensor:
    """Small integers: exact in every dtype, every fp32 sum of their products exact."""
    return torch.randint(lo, hi, (rows, cols), generator=gen).to(torch.float32)


def fused_launch(emu, q, c, lo, hi, cap, *, row_scale=None, col_scale=None, row_slack=None, col_slack=None,
                 kernel=None, lists=True, stages=0):
    """One emulated fused launch (FusedBlock.kernel = kernel when given); returns (per-row dict col ->
    score, counts, the block, the raw lists), the dicts None without `lists`."""
    b, n = q.shape[0], c.shape[0]
    scores = torch.full((b, cap), math.nan)
    cols = torch.full((b, cap), -1, dtype=torch.int32)
    counts = torch.zeros(b, dtype=torch.int32)
    f = _C.FusedBlock()
    f.queries, f.q_stride, f.candidates, f.c_stride = q.data_ptr(), q.stride(0), c.data_ptr(), c.stride(0)
    f.dtype, f.rows, f.cols, f.dim = CODES[q.dtype], b, n, q.shape[1]
    f.row_lo, f.row_hi = lo.data_ptr(), hi.data_ptr()
    for name, t in (("row_scale", row_scale), ("col_scale", col_scale), ("row_slack", row_slack),
                    ("col_slack", col_slack)):
        setattr(f, name, 0 if t is None else t.data_ptr())
    f.cand_score, f.cand_col, f.cand_count, f.cand_cap = scores.data_ptr(), cols.data_ptr(), counts.data_ptr(), cap
    if kernel is not None:
        f.kernel = kernel
    f.stages = stages
    emu.topk_fused_scores(f, 0)
    if not lists:
        return None, counts, f, (scores, cols, counts)
    kept = []
    for i in range(b):
        m = min(int(counts[i]), cap)
        row = dict(zip(cols[i, :m].tolist(), scores[i, :m].tolist(), strict=True))
        assert len(row) == m  # no candidate listed twice
        kept.append(row)
    return kept, counts, f, (scores, cols, counts)


def fused_operands(q: torch.Tensor, c: torch.Tensor, metric: str) -> FusedOperands:
    """The fused driver's epilogue inputs for q x c (scales and the tf32 slack of its error factor)."""
    return FusedOperands.build(q, c, metric, CudaDriver().error_factor(q.shape[1]))


def row_bounds_between(s: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row bounds that cut the row's scores somewhere inside (some rows keep everything or nothing)."""
    qs = torch.quantile(s.double(), torch.tensor([0.7, 0.95], dtype=torch.float64), dim=1).float()
    lo, hi = qs[0].clone(), qs[1].clone()
    lo[0], hi[0] = -math.inf, math.inf
    lo[1], hi[1] = math.inf, math.inf
    lo[2] = math.nan
    return lo.contiguous(), hi.contiguous()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("shape", [(200, 300, 64), (128, 128, 32), (37, 515, 96), (3, 5, 32)],
                         ids=["ragged", "one_tile", "tall_k", "tiny"])
@pytest.mark.parametrize("scaled", [False, True], ids=["dot", "scaled"])
def test_fused_16bit_keeps_exactly_the_scores_in_bounds(emu, dtype, shape, scaled):
    # Small integers: every product exact and every fp32 sum exact, so the kept (row, col, score) set
    # is exactly {(i, j, s_ij): lo_i <= s_ij <= hi_i}, whatever the fragment order.
    b, n, d = shape
    gen = torch.Generator().manual_seed(b * n + d)
    q, c = int_matrix(b, d, gen).to(dtype), int_matrix(n, d, gen).to(dtype)
    s = q.double() @ c.double().T
    rs = cs = None
    if scaled:  # cosine-style scales: acc * row scale, then * column scale, in fp32
        rs, cs = torch.rand(b, generator=gen) + 0.5, torch.rand(n, generator=gen) + 0.5
        s = (s.float() * rs[:, None]) * cs[None, :]
    s = s.float()
    lo, hi = row_bounds_between(s, gen)
    kept, counts, _, _ = fused_launch(emu, q, c, lo, hi, n, row_scale=rs, col_scale=cs)
    for i in range(b):
        want = ((s[i] >= lo[i]) & (s[i] <= hi[i])).nonzero().flatten().tolist()
        assert sorted(kept[i]) == want, f"row {i}"
        assert all(kept[i][j] == float(s[i, j]) for j in want)
        assert int(counts[i]) == len(want)
    assert int(counts[0]) == n and int(counts[1]) == 0 and int(counts[2]) == 0


def test_fused_single_pair(emu):
    q, c = torch.ones(1, 32, dtype=torch.float16), torch.full((1, 32), 2.0, dtype=torch.float16)
    kept, counts, _, _ = fused_launch(emu, q, c, torch.tensor([64.0]), torch.tensor([64.0]), 1)
    assert kept == [{0: 64.0}] and counts.tolist() == [1]


SCHEDULES = [("warps_ascending", True), ("warps_descending", True), ("warps_ascending", False),
             ("round_robin", True)]


@pytest.fixture(params=SCHEDULES, ids=[f"{s}-{'immediate' if i else 'deferred'}" for s, i in SCHEDULES])
def schedule(request, emu):
    """Runs the test with the emulator's threads taking turns in another order (one warp running as
    far ahead as the barriers allow) and cp.async copies landing when issued or when waited for."""
    emu.configure(*request.param)
    yield request.param
    emu.configure()


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "tf32"])
def test_fused_kernel_under_other_schedules(emu, schedule, dtype, stages):
    # A missing __syncthreads or cp.async wait in the pipelined main loop changes the result under
    # one of these orders; the lists must be the round-robin ones, exactly.
    gen = torch.Generator().manual_seed(8)
    b, n, d = 140, 150, 128
    q, c = int_matrix(b, d, gen).to(dtype), int_matrix(n, d, gen).to(dtype)
    s = (q.double() @ c.double().T).float()
    lo, hi = row_bounds_between(s, gen)
    slack, w = {}, torch.zeros(b, n)
    if dtype == torch.float32:  # small integers are exact in tf32 too; the epilogue widens by w in fp32
        ops = fused_operands(q, c, "dot")
        slack = {"row_slack": ops.row_slack, "col_slack": ops.col_slack}
        w = ops.row_slack[:, None] * ops.col_slack[None, :]
    kept, _, _, _ = fused_launch(emu, q, c, lo, hi, n, stages=stages, **slack)
    for i in range(b):
        want = ((s[i] + w[i] >= lo[i]) & (s[i] - w[i] <= hi[i])).nonzero().flatten().tolist()
        assert sorted(kept[i]) == want and all(kept[i][j] == float(s[i, j]) for j in want), f"row {i}"


def test_select_kernel_under_other_schedules(emu, schedule):
    gen = torch.Generator().manual_seed(12)
    b, n, k = 17, 2500, 40
    scores = score_matrix(b, n, torch.bfloat16, gen)
    kw = filters("masks_margin", b, n, gen)
    states = [SelectionState(selection(scores, k, kw), b, scores.device) for _ in range(2)]
    offer(states[0], scores, 0, 0)
    offer(states[1], scores, 0, 0, emu)
    assert_same(finalize(states[1], emu), finalize(states[0]))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "tf32"])
def test_fused_strided_rows(emu, dtype):
    # Row strides wider than d (views into wider matrices), whole 16 bytes apart as the launcher requires.
    gen = torch.Generator().manual_seed(13)
    b, n, d = 70, 200, 32
    qw, cw = int_matrix(b, d + 16, gen).to(dtype), int_matrix(n, d + 32, gen).to(dtype)
    q, c = qw[:, 8:8 + d], cw[:, 16:16 + d]
    s = (q.double() @ c.double().T).float()
    lo, hi = row_bounds_between(s, gen)
    slack = {}
    if dtype == torch.float32:  # no slack: the products of small integers are exact in tf32
        slack = {"row_slack": torch.zeros(b), "col_slack": torch.zeros(n)}
    kept, _, _, _ = fused_launch(emu, q, c, lo, hi, n, **slack)
    for i in range(b):
        want = ((s[i] >= lo[i]) & (s[i] <= hi[i])).nonzero().flatten().tolist()
        assert sorted(kept[i]) == want and all(kept[i][j] == float(s[i, j]) for j in want), f"row {i}"


def test_fused_list_overflow_is_counted(emu):
    check_list_overflow(emu)


def warp_spans_kept(kept: list[dict], span: int) -> list[int]:
    """Per row, how many of its column spans of `span` candidates (the columns one warp holds of a row
    in one tile) list a survivor: one atomicAdd each, for a kernel that aggregates its appends."""
    return [len({j // span for j in row}) for row in kept]


def check_one_atomic_per_warp_and_row(emu, kernel, span: int, dtype, shape) -> None:
    """A launch whose lists are exact and whose appends take one atomicAdd per (warp, row) holding
    survivors, counted by the emulator per address: `span` is the warp's columns of a row per tile."""
    b, n, d = shape
    gen = torch.Generator().manual_seed(zlib.crc32(f"atomics/{shape}/{span}".encode()))
    q, c = int_matrix(b, d, gen).to(dtype), int_matrix(n, d, gen).to(dtype)
    s = (q.double() @ c.double().T).float()
    lo, hi = row_bounds_between(s, gen)  # row 0 keeps everything, rows 1 and 2 nothing
    slack = {}
    if dtype == torch.float32:  # exact in tf32 too; zero slack keeps the float test exact
        slack = {"row_slack": torch.zeros(b), "col_slack": torch.zeros(n)}
    emu.reset_counters()
    kept, counts, _, _ = fused_launch(emu, q, c, lo, hi, n, kernel=kernel, **slack)
    for i in range(b):
        want = ((s[i] >= lo[i]) & (s[i] <= hi[i])).nonzero().flatten().tolist()
        assert sorted(kept[i]) == want and all(kept[i][j] == float(s[i, j]) for j in want), f"row {i}"
    atomics = [emu.atomic_adds(counts.data_ptr() + 4 * i) for i in range(b)]
    assert atomics == warp_spans_kept(kept, span)
    assert atomics[0] == math.ceil(n / span) and len(kept[0]) == n  # one per warp, not one per survivor
    assert atomics[1] == atomics[2] == 0


def check_closed_rows_take_no_appends(emu, kernel, span: int) -> None:
    """Every candidate survives and the lists hold 8: a row's first reservation (a whole span of `span`
    columns, the first tile's) passes the cap, and no warp appends to the row after that. Exact in the
    emulator, where no thread runs between a leader's read of the count and its atomicAdd; on a GPU
    warps racing past the read may add a few more."""
    gen = torch.Generator().manual_seed(span)
    b, n, d, cap = 60, 300, 32, 8
    q, c = int_matrix(b, d, gen).to(torch.bfloat16), int_matrix(n, d, gen).to(torch.bfloat16)
    s = (q.double() @ c.double().T).float()
    lo, hi = torch.full((b,), -math.inf), torch.full((b,), math.inf)
    emu.reset_counters()
    kept, counts, _, _ = fused_launch(emu, q, c, lo, hi, cap, kernel=kernel)
    assert counts.tolist() == [span] * b
    assert [emu.atomic_adds(counts.data_ptr() + 4 * i) for i in range(b)] == [1] * b
    assert all(len(row) == cap and all(s[i, j] == v for j, v in row.items()) for i, row in enumerate(kept))


def test_fused_closed_rows_take_no_appends(emu):
    check_closed_rows_take_no_appends(emu, _C.FusedKernel.mma, 32)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "tf32"])
@pytest.mark.parametrize("shape", [(150, 300, 32), (37, 515, 64)], ids=["ragged", "wide"])
def test_fused_appends_one_atomic_per_warp_and_row(emu, dtype, shape):
    # mma.sync: a warp holds 32 columns of each of its rows per tile (warp_n), the four lanes of a quad
    # 8 each; their survivors share one atomicAdd on the row's count, so a row costs as many atomics as
    # it has 32-column spans with a survivor (one per survivor before: 300 for row 0, not 10).
    check_one_atomic_per_warp_and_row(emu, _C.FusedKernel.mma, 32, dtype, shape)


@pytest.mark.parametrize("stages", [2, 4])
@pytest.mark.parametrize("shape", [(200, 300, 48), (37, 515, 16), (130, 129, 32)],
                         ids=["ragged", "one_row_tile", "one_column_past"])
def test_fused_tf32_column_factors_are_exact_on_ragged_tiles(emu, shape, stages):
    # Small integers are exact in tf32, so every accumulator is the exact dot product and the epilogue's
    # fp32 arithmetic alone decides: s = (acc * row scale) * column scale, kept when s + w >= lo and
    # s - w <= hi with w = row slack * column slack, listed as s. Scales and slacks differ per column
    # (slacks large enough to decide many candidates), so a column factor staged for the wrong column,
    # or one read past the ragged last tile, changes the lists or their scores.
    b, n, d = shape
    gen = torch.Generator().manual_seed(zlib.crc32(f"factors/{shape}".encode()))
    q, c = int_matrix(b, d, gen), int_matrix(n, d, gen)
    rs, cs = torch.rand(b, generator=gen) + 0.5, torch.rand(n, generator=gen) + 0.5
    rw, cw = torch.rand(b, generator=gen), 4 * torch.rand(n, generator=gen)
    s = ((q.double() @ c.double().T).float() * rs[:, None]) * cs[None, :]
    w = rw[:, None] * cw[None, :]
    lo, hi = row_bounds_between(s, gen)
    kept, counts, _, _ = fused_launch(emu, q, c, lo, hi, n, row_scale=rs, col_scale=cs, row_slack=rw, col_slack=cw,
                                      stages=stages)
    widened = 0
    for i in range(b):
        want = ((s[i] + w[i] >= lo[i]) & (s[i] - w[i] <= hi[i])).nonzero().flatten().tolist()
        assert sorted(kept[i]) == want, f"row {i}"
        assert all(kept[i][j] == float(s[i, j]) for j in want), f"row {i}"
        assert int(counts[i]) == len(want)
        widened += len(want) - int(((s[i] >= lo[i]) & (s[i] <= hi[i])).sum())
    assert widened > b  # the slack decides many candidates


def check_list_overflow(emu, kernel=None) -> None:
    """Lists of 16 for rows where most candidates survive: a row whose survivors fit has them all, listed
    and counted; a row with more keeps 16 and a count past 16 (no more than its survivors: appends stop
    once the count passes the cap, the row is redone anyway)."""
    gen = torch.Generator().manual_seed(2)
    b, n, d, cap = 20, 260, 32, 16
    q, c = int_matrix(b, d, gen).to(torch.bfloat16), int_matrix(n, d, gen).to(torch.bfloat16)
    s = (q.double() @ c.double().T).float()
    lo, hi = torch.full((b,), -math.inf), torch.full((b,), math.inf)
    lo[::2] = 0.0
    lo[::4] = torch.topk(s[::4], 8).values[:, -1]  # these rows' survivors fit (ties permitting)
    kept, counts, _, _ = fused_launch(emu, q, c, lo, hi, cap, kernel=kernel)
    overflowed = 0
    for i in range(b):
        survivors = int((s[i] >= lo[i]).sum())
        if survivors <= cap:
            assert int(counts[i]) == survivors
        else:
            overflowed += 1
            assert cap < int(counts[i]) <= survivors
        assert len(kept[i]) == min(cap, survivors)
        assert all(s[i, j] == v and v >= lo[i] for j, v in kept[i].items())
    assert 0 < overflowed < b


@pytest.fixture(params=[False, True], ids=["rounding_mma", "truncating_mma"])
def mma_truncate(request, emu):
    """Emulated mma.sync rounding each output once, or truncating after every addition (the worst
    accumulation the tf32 error bound allows for)."""
    emu.configure(mma_truncate=request.param)
    yield request.param
    emu.configure()


@pytest.mark.parametrize("case", ["gaussian", "near_ties"])
@pytest.mark.parametrize("d", [16, 48, 256])
def test_fused_tf32_keeps_every_candidate_in_bounds(emu, mma_truncate, case, d):
    # tf32 products are inexact: the kernel must keep every candidate whose exact score lies in the
    # bounds (it widens them by the slack w_ij), keep nothing farther than 2 w_ij outside them (the
    # tf32 score is within w_ij of the exact one, and passes when within w_ij of the bounds), and list
    # scores within w_ij of the exact ones. The slack is the driver's (FusedOperands).
    gen = torch.Generator().manual_seed(d)
    b, n = 150, 260
    q = torch.randn(b, d, generator=gen)
    if case == "gaussian":
        c = torch.randn(n, d, generator=gen)
    else:  # candidates close to one vector: exact scores closer together than the tf32 errors
        c = torch.randn(d, generator=gen) + 1e-3 * torch.randn(n, d, generator=gen)
    ops = fused_operands(q, c, "dot")
    exact = q.double() @ c.double().T
    w = ops.row_slack.double()[:, None] * ops.col_slack.double()[None, :]
    lo, hi = row_bounds_between(exact.float(), gen)
    _, _, _, (scores, cols, counts) = fused_launch(emu, q, c, lo, hi, n, row_slack=ops.row_slack,
                                                    col_slack=ops.col_slack)
    got = torch.full((b, n), math.nan, dtype=torch.float64)  # listed score of (i, j), NaN if not listed
    listed = torch.arange(n)[None, :] < counts[:, None]
    got[torch.arange(b)[:, None].expand(b, n)[listed], cols.long()[listed]] = scores[listed].double()
    kept = ~got.isnan()
    rows = slice(3, b)  # rows 0-2 have the special bounds of row_bounds_between
    inside = (exact >= lo.double()[:, None]) & (exact <= hi.double()[:, None])
    assert not torch.any(inside[rows] & ~kept[rows]), "a candidate inside the bounds was lost"
    near = (exact + 2 * w >= lo.double()[:, None]) & (exact - 2 * w <= hi.double()[:, None])
    assert not torch.any(kept[rows] & ~near[rows])
    assert torch.all((got - exact).abs()[kept] <= w[kept])
    # the kernel used tf32, not fp32: some score differs from the fp32-rounded exact one
    assert torch.any(got[kept] != exact.float().double()[kept])


@pytest.mark.parametrize("d", [16, 32])
def test_fused_tf32_rounds_inputs_to_nearest_ties_away(emu, d):
    # cvt.rna: 1 + 2^-11 lies halfway between the tf32 values 1 and 1 + 2^-10 and rounds away from zero
    # (to 1 + 2^-10; round-to-even or truncation give 1); 1 + 3 2^-12 rounds up. Every product and sum
    # is then exact, so each score is d rna(x) rna(y), for every fragment slot of A and B.
    b, n = 20, 24
    q = torch.full((b, d), 1 + 2.0**-11)
    q[1::2] = 1 + 3 * 2.0**-12
    c = torch.full((n, d), -(1 + 2.0**-11))
    ops = fused_operands(q, c, "dot")
    inf = torch.full((b,), math.inf)
    kept, counts, _, _ = fused_launch(emu, q, c, -inf, inf, n, row_slack=ops.row_slack, col_slack=ops.col_slack)
    want = -d * (1 + 2.0**-10) ** 2
    assert all(sorted(row) == list(range(n)) and set(row.values()) == {want} for row in kept)


def test_fused_rescore_equals_cpu(emu):
    # Rescoring of the lists of a cosine tf32 launch, rows with overflowing lists included (only the
    # first cand_cap entries exist).
    gen = torch.Generator().manual_seed(6)
    b, n, d, cap = 40, 200, 80, 24
    q, c = torch.randn(b, d, generator=gen), torch.randn(n, d, generator=gen)
    ops = fused_operands(q, c, "cosine")
    exact = q.double() @ c.double().T
    lo, hi = row_bounds_between(exact.float(), gen)
    lo[3::4] = -math.inf  # these rows overflow
    kept, counts, f, lists = fused_launch(emu, q, c, lo, hi, cap, row_scale=ops.row_scale, col_scale=ops.col_scale,
                                          row_slack=ops.row_slack, col_slack=ops.col_slack)
    assert int((counts > cap).sum()) >= 5
    listed = lists[0].clone()
    emu.topk_rescore_candidates(f, True, 0, 1)
    emu_scores = lists[0].clone()
    lists[0].copy_(listed)
    _C.topk_rescore_candidates(f, False, 0, 1)
    cpu_scores = lists[0]
    m = torch.arange(cap)[None, :] < counts.clamp(max=cap)[:, None]
    assert torch.all(torch.isnan(emu_scores[~m]))  # nothing written past a list's end
    # same products, another double summation order: the float results agree to one rounding
    diff = (emu_scores[m] - cpu_scores[m]).abs()
    assert torch.all(diff <= torch.nextafter(cpu_scores[m].abs(), torch.tensor(math.inf)) - cpu_scores[m].abs())
    assert int(m.sum()) > 0


@pytest.mark.parametrize("sname,skw", SAMPLING, ids=[s[0] for s in SAMPLING])
def test_row_bounds_and_offers_equal_cpu(emu, sname, skw):
    gen = torch.Generator().manual_seed(10)
    b, n, k = 30, 2000, 9
    scores = score_matrix(b, n, torch.float32, gen)
    kw = dict(skw, **filters("masks_margin", b, n, gen))
    sel = selection(scores, k, kw)
    states = [SelectionState(sel, b, scores.device) for _ in range(2)]
    for st in states:
        offer(st, scores[:, :500], 0, 0)
    bounds = []
    for st, mod in zip(states, (_C, emu), strict=True):
        lo, hi = torch.empty(b), torch.empty(b)
        mod.topk_row_bounds(st.params, lo.data_ptr(), hi.data_ptr(), mod is emu, 0, 1)
        bounds.append((lo, hi))
    assert torch.equal(bounds[0][0], bounds[1][0]) and torch.equal(bounds[0][1], bounds[1][1])
    # candidate lists of the remaining columns, unordered, some rows overflowing the capacity
    cap = 700
    rest = scores[:, 500:]
    perm = torch.stack([torch.randperm(n - 500, generator=gen) for _ in range(b)])[:, :cap]
    cols = perm.to(torch.int32).contiguous()
    vals = torch.gather(rest, 1, perm).contiguous()
    counts = torch.randint(0, cap + 50, (b,), generator=gen, dtype=torch.int32)
    for st, mod in zip(states, (_C, emu), strict=True):
        mod.topk_offer_candidates(st.params, vals.data_ptr(), cols.data_ptr(), counts.data_ptr(), cap, 500,
                                  mod is emu, 0, 1)
    assert_same(finalize(states[1], emu), finalize(states[0]))


def test_fused_launcher_checks(emu):
    q = torch.zeros(4, 40, dtype=torch.bfloat16)
    lo, hi = torch.zeros(4), torch.zeros(4)
    with pytest.raises(RuntimeError, match="multiple of 32"):
        fused_launch(emu, q, q, lo, hi, 4)
    with pytest.raises(RuntimeError, match="stages must be"):
        fused_launch(emu, q[:, :32].contiguous(), q[:, :32].contiguous(), lo, hi, 4, stages=3)
    assert emu.topk_fused_supported(0)


# ----------------------------------------------------------------------------------------------------
# info_nce block passes


NCE = [
    ("plain", {}),
    ("symmetric", {"symmetric": True}),
    ("masks_margins", {"positive_ids": "pos", "doc_ids": True, "query_labels": True, "false_negative_margin": 0.1,
                       "hcl_beta": 0.5, "hardness_alpha": 0.3, "positive_margin": 0.2}),
    ("guided_symmetric", {"symmetric": True, "guide": True, "guide_margin": 0.05, "tau_plus": 0.1,
                          "false_negative_relative_margin": 0.05, "temperature": "tensor"}),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name,spec", NCE, ids=[x[0] for x in NCE])
def test_info_nce_blocks_equal_cpu(emu, name, spec, dtype):
    # Forward (row and column statistics) and backward block kernels through the op: loss and
    # gradients equal the CPU kernels' up to summation order (float64 statistics either way).
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    b, m, d = 37, 45, 16
    q = torch.randn(b, d, generator=gen, dtype=torch.float64).to(dtype)
    docs = torch.randn(m, d, generator=gen, dtype=torch.float64).to(dtype)
    kw = {"temperature": 0.1}
    for key, value in spec.items():
        if value == "pos":
            kw["positive_ids"] = torch.randint(-1, m, (b, 2), generator=gen)
            kw["positive_ids"][:, 0] = torch.arange(b) % m
        elif key == "doc_ids":
            kw["doc_ids"] = torch.randint(0, 30, (m,), generator=gen)
        elif key == "query_labels":
            kw["query_labels"] = torch.randint(0, 3, (b,), generator=gen)
            kw["doc_labels"] = torch.randint(0, 3, (m,), generator=gen)
        elif key == "guide":
            kw["guide_queries"] = q + 0.1 * torch.randn(b, d, generator=gen, dtype=torch.float64).to(dtype)
            kw["guide_docs"] = docs + 0.1 * torch.randn(m, d, generator=gen, dtype=torch.float64).to(dtype)
        elif value == "tensor":
            kw["temperature"] = torch.tensor([0.1], dtype=dtype, requires_grad=True)
        else:
            kw[key] = value
    leaves = [q.requires_grad_(True), docs.requires_grad_(True)]
    if isinstance(kw["temperature"], torch.Tensor):
        leaves.append(kw["temperature"])
    loss = hnsample.info_nce(q, docs, **kw)
    want = torch.autograd.grad(loss, leaves)
    # the CPU backend's kernels are the emulated CUDA ones for the forward and the backward call
    launchers = CountingModule(emu)
    with registry.use("cpu", CpuBackend(HostKernels(launchers))):
        got_loss = hnsample.info_nce(q, docs, **kw)
        got = torch.autograd.grad(got_loss, leaves)
    assert launchers.calls["info_nce_block"] >= 2  # a forward and a backward pass at least
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(got_loss, loss, rtol=tol, atol=tol)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=tol, atol=tol)


@pytest.mark.parametrize("symmetric", [False, True], ids=["rows", "rows_and_columns"])
def test_info_nce_float_exp_stays_within_its_bound(emu, symmetric):
    # The emulated CUDA forward kernels on one fp32 score block with float32 exp (InfoNceParams.float_exp,
    # what the CUDA driver sets) against float64 exp: every row's (and column's) log-sum-exp over n
    # pairs moves by at most 2^-24 ln n + 2^-22 (csrc/info_nce.h, nce_exp). Logits 20 apart (tau 0.05).
    gen = torch.Generator().manual_seed(31)
    b, m = 40, 3000
    scores = (2 * torch.rand(b, m, generator=gen) - 1).contiguous()
    pos = torch.arange(b, dtype=torch.int64)[:, None].contiguous()
    stats = {}
    for on in (False, True):
        p = _C.InfoNceParams()
        p.num_rows, p.num_cols, p.inv_temperature, p.symmetric, p.float_exp = b, m, 20.0, symmetric, on
        p.positive_ids, p.positive_stride, p.positive_cols = pos.data_ptr(), 1, 1
        rows = torch.zeros(b, 5, dtype=torch.float64)
        rows[:, 0] = rows[:, 2] = -math.inf
        cols = torch.zeros(m, 2, dtype=torch.float64)
        cols[:, 0] = -math.inf
        p.row_stats, p.col_stats = rows.data_ptr(), cols.data_ptr()
        HostKernels(emu).info_nce_block(p, False, scores, None, 0, 0)
        lse_rows = rows[:, 0] + rows[:, 1].log()
        lse_cols = cols[:, 0] + cols[:, 1].log()
        stats[on] = (lse_rows, lse_cols)
    row_err = float((stats[True][0] - stats[False][0]).abs().max())
    assert 0 < row_err <= 2.0**-24 * math.log(m) + 2.0**-22
    # the float64 path is the plain formula
    want = torch.logsumexp(20.0 * scores.double().masked_fill(torch.eye(b, m, dtype=torch.bool), -math.inf), dim=1)
    torch.testing.assert_close(stats[False][0], want, rtol=0, atol=1e-12)
    if symmetric:
        col_err = float((stats[True][1] - stats[False][1]).abs().max())
        assert 0 < col_err <= 2.0**-24 * math.log(b) + 2.0**-22
        return
    # Backward: dL/ds_ij = 20 exp(20 s_ij - S_i) for the negatives (dL/dS = 1); each coefficient within
    # (|20 s_ij - S_i| 2^-24 + 2^-22) of its float64 value, relative (then rounded to the fp32 block).
    lse = stats[False][0]
    coef = torch.zeros(b, 4, dtype=torch.float64)
    coef[:, 0], coef[:, 1] = 1.0, lse
    grads = {}
    for on in (False, True):
        p = _C.InfoNceParams()
        p.num_rows, p.num_cols, p.inv_temperature, p.float_exp = b, m, 20.0, on
        p.positive_ids, p.positive_stride, p.positive_cols = pos.data_ptr(), 1, 1
        tau_acc = torch.zeros(b, dtype=torch.float64)
        p.row_coef, p.tau_acc = coef.data_ptr(), tau_acc.data_ptr()
        out = scores.clone()
        HostKernels(emu).info_nce_block(p, True, out, None, 0, 0)
        grads[on] = out.double()
    arg = (20.0 * scores.double() - lse[:, None]).abs()
    allowed = (arg * 2.0**-24 + 2.0**-22) * grads[False].abs() + 2.0**-23 * grads[False].abs()
    assert bool(((grads[True] - grads[False]).abs() <= allowed).all())
    assert not torch.equal(grads[True], grads[False])


# ----------------------------------------------------------------------------------------------------
# The CUDA driver (hnsample/engine/cuda.py) end to end on emulated kernels


def emulated_driver(emu, **driver_kwargs) -> tuple[CudaDriver, collections.Counter]:
    """A CudaDriver whose kernels are the emulator's launchers on CPU tensors (a device of 4 SMs and
    256 KiB of L2, no torch.mm out_dtype), and the count of its launcher calls by name."""
    launchers = CountingModule(emu)
    kernels = HostKernels(launchers, DeviceFacts(4, 1 << 18), mm_out_dtype=False)
    return CudaDriver(kernels=kernels, **driver_kwargs), launchers.calls


DRIVER = [
    ("top", {}),
    ("margin_exclude", {"relative_margin": 0.1, "positives": "pos", "exclude": "exc"}),
    ("window_pool", {"skip_top": 2, "pool": 15, "sampling": "uniform", "seed": 9}),
    ("softmax_stream", {"sampling": "softmax", "seed": 1, "temperature": 2.0}),
]


def _driver_kwargs(spec: dict, b: int, n: int, gen: torch.Generator) -> dict:
    kw = dict(spec)
    if "positives" in kw:
        kw["positives"] = torch.randint(0, n, (b, 1), generator=gen)
    if "exclude" in kw:
        kw["exclude"] = torch.randint(-1, n, (b, 4), generator=gen)
    return kw


def scales_in_select(queries: torch.Tensor, metric: str) -> HostMixedPrecisionProduct:
    """The driver's 16-bit product factory on the CPU: the select kernel applies the cosine scales."""
    return HostMixedPrecisionProduct(metric, scales_in_select=True)


TWO_PASS = [("f32", torch.float32, "dot", None), ("bf16", torch.bfloat16, "dot", None),
            ("bf16_cosine", torch.bfloat16, "cosine", scales_in_select),
            ("f16_cosine", torch.float16, "cosine", scales_in_select)]


@pytest.mark.parametrize("name,spec", DRIVER, ids=[x[0] for x in DRIVER])
@pytest.mark.parametrize("case,dtype,metric,product", TWO_PASS, ids=[x[0] for x in TWO_PASS])
def test_two_pass_driver_on_emulated_kernels(emu, name, spec, case, dtype, metric, product):
    # 16-bit cosine: the mixed-precision product's raw blocks, scaled by the emulated select kernel, give
    # the selection over (acc * 1/|q_i|) * 1/|c_j| (small integers: acc exact), zero rows included.
    gen = torch.Generator().manual_seed(zlib.crc32(f"{name}/{dtype}".encode() + metric.encode()))
    b, n, d, k = 70, 5000, 32, 12
    q, c = int_matrix(b, d, gen).to(dtype), int_matrix(n, d, gen).to(dtype)
    q[4], c[17] = 0, 0
    kw = _driver_kwargs(spec, b, n, gen)
    exact = exact_fused_scores(q, c, metric)
    want = hnsample.topk_from_scores(exact, k, **kw)
    driver, calls = emulated_driver(emu, product=product)
    with settings.override(cuda_path="two_pass"):
        state = driver.select(q, c, SelectionState(selection(exact, k, kw), b, q.device, kernels=driver.kernels),
                              metric, 1 << 16)
    got_s, got_j = finalize(state, emu)
    assert calls["topk_select_block_segments"] > 1
    assert torch.equal(got_j, want.indices)
    assert torch.equal(got_s.float(), want.scores)


FUSED = [("bf16", torch.bfloat16, "dot"), ("f16_cosine", torch.float16, "cosine"), ("tf32", torch.float32, "dot"),
         ("tf32_cosine", torch.float32, "cosine")]


@pytest.mark.parametrize("name,spec", DRIVER[:3], ids=[x[0] for x in DRIVER[:3]])
@pytest.mark.parametrize("fname,dtype,metric", FUSED, ids=[x[0] for x in FUSED])
def test_fused_driver_on_emulated_kernels(emu, name, spec, fname, dtype, metric):
    # Seed through the emulated select kernel, then doubling chunks through the emulated fused kernel
    # (+ rescoring for fp32), bounds and offers. Small integers: every path's scores are exact, so the
    # result equals the CPU op's over the same score matrix bit for bit (cosine: the scaled scores of
    # ExactGemm, which the fused epilogue and the rescoring reproduce).
    calls = run_fused_driver(emu, f"{name}/{fname}", spec, dtype, metric, 64)
    assert calls["topk_rescore_candidates"] == (4 if dtype == torch.float32 else 0)


def run_fused_driver(emu, seed: str, spec: dict, dtype, metric: str, d: int, product=ExactGemm,
                     **overrides) -> collections.Counter:
    """CudaDriver.run_fused over 40 queries x 2600 small-integer candidates (seed of 300 columns, then 4
    chunks) on the emulated kernels with `product`'s score blocks (a factory; default ExactGemm's), under
    settings.override(**overrides); asserts the result equals the CPU op's over the exact scores and
    returns the launcher calls."""
    gen = torch.Generator().manual_seed(zlib.crc32(seed.encode()))
    b, n, k = 40, 2600, 10
    q, c = int_matrix(b, d, gen).to(dtype), int_matrix(n, d, gen).to(dtype)
    kw = _driver_kwargs(spec, b, n, gen)
    want = hnsample.topk_from_scores(exact_fused_scores(q, c, metric), k, **kw)
    driver, calls = emulated_driver(emu, product=product)
    sel = selection(exact_fused_scores(q, c, metric), k, kw)
    with settings.override(cuda_fused_seed_cols=300, **overrides):
        state = driver.run_fused(q, c, SelectionState(sel, b, q.device, kernels=driver.kernels), metric, 1 << 16, 0)
    got_s, got_j = finalize(state, emu)
    assert calls["topk_fused_scores"] == 4  # chunks of 300, 600, 1200 and 200 after the seed of 300
    assert torch.equal(got_j, want.indices)
    assert torch.equal(got_s.float(), want.scores)
    return calls


@pytest.mark.parametrize("name,spec", DRIVER[:3], ids=[x[0] for x in DRIVER[:3]])
def test_fused_driver_cosine_seed_with_scales_in_select(emu, name, spec):
    # The fused path's seed goes through the two-pass path, whose select kernel now applies the scales;
    # the fused chunks' epilogue applies the same ones.
    run_fused_driver(emu, f"{name}/scales_in_select", spec, torch.bfloat16, "cosine", 64, product=scales_in_select)


def test_fused_driver_cosine_redo_with_scales_in_select(emu):
    # Rows 140..150 see candidates that get better chunk after chunk (their cosines approach 1), so their
    # lists overflow and their 128-row tile redoes each chunk on the two-pass path, whose queries start at
    # row 128: the row scales are indexed by the block's row, the state rows by row_offset + row.
    gen = torch.Generator().manual_seed(23)
    b, n, d, k = 300, 2600, 32, 10
    q, c = int_matrix(b, d, gen, 0, 4), int_matrix(n, d, gen, 0, 4)
    q[:, 0] = 0
    q[140:151, 0] = 64
    c[:, 0] = 64 * (torch.arange(n) // 300)
    q[200] = 0  # a zero-norm query: every score 0 (ties at its threshold: its list overflows too)
    q, c = q.to(torch.bfloat16), c.to(torch.bfloat16)
    exact = exact_fused_scores(q, c, "cosine")
    want = hnsample.topk_from_scores(exact, k)
    driver, calls = emulated_driver(emu, product=scales_in_select)
    two_pass = []
    plain = driver.run_two_pass

    def recording(queries, candidates, state, metric, block_size, col_offset, row_offset=0):
        two_pass.append((row_offset, queries.shape[0]))
        return plain(queries, candidates, state, metric, block_size, col_offset, row_offset=row_offset)

    driver.run_two_pass = recording
    with settings.override(cuda_fused_seed_cols=300):
        state = driver.run_fused(q, c, SelectionState(selection(exact, k, {}), b, q.device, kernels=driver.kernels),
                                 "cosine", 1 << 16, 0)
    got_s, got_j = finalize(state, emu)
    assert two_pass == [(0, 300)] + [(128, 128)] * 4  # the seed, then tile 1 redoes every chunk
    assert torch.equal(got_j, want.indices)
    assert torch.equal(got_s.float(), want.scores)


def test_fused_driver_redoes_overflowing_chunks(emu):
    # Candidates get better chunk after chunk, so every row's list overflows and each chunk is redone
    # on the two-pass path (emulated select kernel); the result is still exact.
    gen = torch.Generator().manual_seed(21)
    b, n, d, k = 24, 2600, 32, 10
    q = int_matrix(b, d, gen, 0, 4).to(torch.bfloat16)
    c = (int_matrix(n, d, gen, 0, 4) * (1 + torch.arange(n) // 300)[:, None]).to(torch.bfloat16)
    want = hnsample.topk_from_scores(exact_fused_scores(q, c, "dot"), k)
    driver, calls = emulated_driver(emu)
    sel = selection(exact_fused_scores(q, c, "dot"), k, {})
    with settings.override(cuda_fused_seed_cols=300):
        state = driver.run_fused(q, c, SelectionState(sel, b, q.device, kernels=driver.kernels), "dot", 1 << 16, 0)
    got_s, got_j = finalize(state, emu)
    # Lists are offered after every launch (the kernel skips the overflowed rows, here all of them).
    assert calls["topk_fused_scores"] == 4 and calls["topk_offer_candidates"] == 4
    assert torch.equal(got_j, want.indices)
    assert torch.equal(got_s.float(), want.scores)


def test_fused_driver_redoes_only_the_overflowing_row_tiles(emu):
    # Rows 140..150 see candidates that get better chunk after chunk, so their lists overflow; no other
    # row's does. Only the REDO_TILE-row tile holding them (rows 128..255) takes each chunk on the
    # two-pass path, every other row's list is offered; the result is exact.
    from hnsample.engine.cuda import REDO_TILE

    gen = torch.Generator().manual_seed(22)
    b, n, d, k = 300, 2600, 32, 10
    q = int_matrix(b, d, gen, 0, 4)
    c = int_matrix(n, d, gen, 0, 4)
    q[:, 0] = 0
    q[140:151, 0] = 4
    c[:, 0] = 64 * (torch.arange(n) // 300)
    q, c = q.to(torch.bfloat16), c.to(torch.bfloat16)
    want = hnsample.topk_from_scores(exact_fused_scores(q, c, "dot"), k)
    driver, calls = emulated_driver(emu)
    two_pass = []
    plain = driver.run_two_pass

    def recording(queries, candidates, state, metric, block_size, col_offset, row_offset=0):
        two_pass.append((row_offset, queries.shape[0], col_offset, candidates.shape[0]))
        return plain(queries, candidates, state, metric, block_size, col_offset, row_offset=row_offset)

    driver.run_two_pass = recording
    sel = selection(exact_fused_scores(q, c, "dot"), k, {})
    with settings.override(cuda_fused_seed_cols=300):
        state = driver.run_fused(q, c, SelectionState(sel, b, q.device, kernels=driver.kernels), "dot", 1 << 16, 0)
    got_s, got_j = finalize(state, emu)
    assert REDO_TILE == 128
    assert two_pass == [(0, 300, 0, 300), (128, 128, 300, 300), (128, 128, 600, 600), (128, 128, 1200, 1200),
                        (128, 128, 2400, 200)]
    assert calls["topk_fused_scores"] == 4 and calls["topk_offer_candidates"] == 4
    assert torch.equal(got_j, want.indices)
    assert torch.equal(got_s.float(), want.scores)


def test_fused_chunks_never_exceed_the_launch_limit(emu):
    # Chunks double in width; past 2 * fused_max_cols candidates the doubling would ask one launch for more
    # columns than the kernels' grid holds (a RuntimeError from the launcher, not a fallback). Launches are
    # recorded, not run: N just above the old breaking point with d = 1 keeps the candidates at 33 MB.
    limit = _C.fused_max_cols
    n = 2 * limit + 129  # the old doubling: a last chunk of limit + 129 columns
    q, c = torch.ones(2, 1, dtype=torch.float16), torch.zeros(n, 1, dtype=torch.float16)
    driver, _ = emulated_driver(emu)
    assert driver.max_fused_cols == limit
    sel = selection(torch.zeros(2, 1), 3, {})
    state = SelectionState(sel, 2, q.device, kernels=driver.kernels)
    launched, two_pass = [], []
    driver.launch_fused = lambda f, like: launched.append((f.cols, f.candidates))
    driver.run_two_pass = lambda q_, c_, st, metric, bs, offset: two_pass.append((offset, c_.shape[0]))
    with settings.override(cuda_fused_seed_cols=8192):
        driver.run_fused(q, c, state, "dot", 1 << 16, 0)
    assert two_pass == [(0, 8192)]  # the seed only: no chunk overflowed
    assert max(cols for cols, _ in launched) <= limit
    assert 8192 + sum(cols for cols, _ in launched) == n
    starts = [(ptr - c.data_ptr()) // c.element_size() for _, ptr in launched]
    assert starts == list(itertools.accumulate([8192] + [cols for cols, _ in launched[:-1]]))


def test_device_properties_are_read_once_per_device_across_threads(emu):
    # The op asks whether the fused kernels run on every call, mining from several threads at once: the
    # properties are read once per device under a lock, not on every call.
    for device in (0, 1):
        emu.topk_fused_supported(device)  # whatever earlier tests cached
    before = emu.property_queries()
    results = []

    def ask() -> None:
        results.extend(emu.topk_fused_supported(i % 2) for i in range(200))

    threads = [threading.Thread(target=ask) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert emu.property_queries() == before
    assert results.count(True) == len(results) == 1600  # both emulated devices are 8.0 or newer


def test_tf32_slack_has_an_absolute_floor():
    # Tensor cores flush subnormal inputs, products and sums to zero: a bound proportional to |q| |c| is
    # zero for zero or tiny rows, yet a flushed score can be off by about 2 d 2^-126. The slack factors
    # keep w_ij = row_slack_i col_slack_j above that floor and above the relative bound.
    d = 64
    q = torch.tensor([[0.0] * d, [1e-39] * d, [1e-20] * d, [1.0] * d])
    c = torch.tensor([[0.0] * d, [3e-39] * d, [2.0] * d])
    factor = _C.tf32_dot_error_factor(d)
    ops = FusedOperands.build(q, c, "dot", factor)
    w = ops.row_slack.double()[:, None] * ops.col_slack.double()[None, :]
    qn, cn = q.double().norm(dim=1), c.double().norm(dim=1)
    flush = 2 * d * 2.0**-126 + 2.0**-126 * math.sqrt(d) * (qn[:, None] + cn[None, :])
    assert torch.all(w >= flush)
    assert torch.all(w >= factor * qn[:, None] * cn[None, :])
    assert float(w[3, 2]) <= factor * 8.0 * 16.0 * (1 + 1e-5)  # ordinary norms: the relative bound, no more
