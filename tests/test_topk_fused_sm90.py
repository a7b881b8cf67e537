"""The sm_90a wgmma fused score kernel (csrc/cuda/topk_fused_sm90.cu).

CPU: the layout facts the kernel is built on (csrc/topk_fused_sm90.h) against values derived by hand from
the PTX ISA: the shared-memory matrix descriptor, the 128-byte swizzle the tensor copy writes and wgmma
reads, the accumulator fragment of m64nNk16, the shared-memory budget, which inputs the kernel takes, and
the launcher's kernel-field checks. GPU (marker ``gpu``): a direct launch lists exactly the scores
torch.mm computes (integer-valued inputs, so every accumulation order gives the same fp32 numbers), and
topk_similarity on the fused path with the wgmma kernel equals the CPU result.
"""

from __future__ import annotations

import math
import zlib

import pytest
import torch

import hnsample
from hnsample import _C, settings
from hnsample.engine import CudaBackend, registry
from hnsample.engine.cuda import CudaDriver

sm90 = _C.sm90
FusedKernel = _C.FusedKernel

BF16, F16, F32 = (int(_C.DType.__members__[name]) for name in ("bfloat16", "float16", "float32"))  # FusedBlock.dtype
# FusedBlock.kernel of the wgmma kernels: 128 x 128, 256 x 128 and 128 x 256 tiles
WGMMA_KERNELS = [FusedKernel.wgmma, FusedKernel.wgmma_256x128, FusedKernel.wgmma_128x256]
WGMMA_IDS = ["128x128", "256x128", "128x256"]


# ----------------------------------------------------------------------------------------------------
# CPU: the layout facts


def test_descriptor_fields_follow_the_ptx_format():
    # start 0x400 >> 4 = 0x40 in bits 0-13; leading offset 16 >> 4 = 1 in bits 16-29; stride offset
    # 1024 >> 4 = 0x40 in bits 32-45; base offset in bits 49-51; swizzle mode in bits 62-63 (1 = 128 B).
    assert sm90.smem_descriptor(0x400, 16, 1024, 0, 1) == 0x4000_0040_0001_0040
    assert sm90.smem_descriptor(0, 0, 0, 5, 0) == 5 << 49
    assert sm90.smem_descriptor(0, 0, 0, 0, 3) == 3 << 62
    assert sm90.smem_descriptor(0x3FFF0, 0x3FFF0, 0x3FFF0, 7, 2) == (
        0x3FFF | 0x3FFF << 16 | 0x3FFF << 32 | 7 << 49 | 2 << 62
    )
    # the address fields hold bits 4-17 of a byte address: 2^18 wraps, the low 4 bits are dropped
    assert sm90.smem_descriptor(1 << 18, 0, 0, 0, 0) == 0
    assert sm90.smem_descriptor(0x40F, 0, 0, 0, 0) == 0x40


def test_operand_descriptor_steps_k_by_32_bytes():
    # K-major tiles with 128-byte swizzle: groups of 8 rows 1024 bytes apart; instruction step k16 reads
    # elements 16 k16 .. 16 k16 + 15, which start 32 k16 bytes into each 128-byte row.
    base = 0x6000
    for k16 in range(4):
        want = sm90.smem_descriptor(base + 32 * k16, 16, 1024, 0, 1)
        assert sm90.operand_descriptor(base, k16) == want
    assert sm90.operand_descriptor(0x6000, 1) - sm90.operand_descriptor(0x6000, 0) == 2


def test_swizzle128_xors_the_chunk_with_the_row():
    # byte 5 of 16-byte chunk 2 in row 3 of a 1024-byte atom: chunk 2 ^ 3 = 1
    assert sm90.swizzle128(3 * 128 + 2 * 16 + 5) == 3 * 128 + 1 * 16 + 5
    assert sm90.swizzle128(1024 + 7 * 128 + 7 * 16) == 1024 + 7 * 128
    for addr in range(0, 4096, 16):
        assert sm90.swizzle128(sm90.swizzle128(addr)) == addr  # an involution: a permutation of chunks


def _tile_starts():
    """Every operand tile either CTA shape describes: stage s, the A rows of each consumer warpgroup, and
    the B tile, from a 1024-byte aligned base."""
    base = 3 * 1024
    for tile in sm90.TILES.values():
        for s in range(tile["STAGES"]):
            stage = base + s * tile["STAGE_BYTES"]
            for group in range(tile["BM"] // 64):
                yield stage + group * 64 * 128, 64
            yield stage + tile["TILE_A_BYTES"], tile["BN"]


def test_wgmma_reads_each_element_where_the_tensor_copy_wrote_it():
    for start, rows in _tile_starts():
        for k16 in range(sm90.BK // 16):
            desc = sm90.operand_descriptor(start, k16)
            for r in range(rows):
                for k in range(16):
                    assert sm90.wgmma_element_address(desc, r, k) == sm90.tma_element_address(start, r, 16 * k16 + k)


def test_tensor_copy_fills_each_tile_once():
    for start, rows in _tile_starts():
        got = sorted(sm90.tma_element_address(start, r, k) for r in range(rows) for k in range(sm90.BK))
        assert got == list(range(start, start + rows * 128, 2))


def test_wgmma_core_matrix_reads_are_bank_conflict_free():
    # One core matrix (8 rows x 16 bytes) is read in one go: its 8 chunks must sit in 8 different groups
    # of 4 banks, which the swizzle achieves and plain 128-byte rows would not (all in one group).
    start = 5 * 1024
    for k16 in range(4):
        desc = sm90.operand_descriptor(start, k16)
        for r0 in range(0, 64, 8):
            for half in range(2):
                groups = {(sm90.wgmma_element_address(desc, r0 + i, 8 * half) >> 4) % 8 for i in range(8)}
                assert len(groups) == 8


@pytest.mark.parametrize("n", [128, 256])
def test_accumulator_fragment_covers_the_warpgroup_tile_once(n):
    seen = {}
    for warp in range(4):
        for lane in range(32):
            for reg in range(n // 2):
                seen.setdefault(sm90.acc_coord(warp, lane, reg), []).append((warp, lane, reg))
    assert sorted(seen) == [(r, c) for r in range(64) for c in range(n)]
    assert all(len(v) == 1 for v in seen.values())
    # the first 8 columns of warp w are the mma.sync m16n8 C fragment of rows 16 w .. 16 w + 15:
    # c0, c1 at (g, 2 t + {0, 1}); c2, c3 at (g + 8, 2 t + {0, 1}), g = lane / 4, t = lane % 4
    for lane in range(32):
        g, t = lane // 4, lane % 4
        assert [sm90.acc_coord(2, lane, reg) for reg in range(4)] == [
            (32 + g, 2 * t), (32 + g, 2 * t + 1), (40 + g, 2 * t), (40 + g, 2 * t + 1)]
        assert sm90.acc_coord(0, lane, 4 * 9 + 3) == (g + 8, 72 + 2 * t + 1)


@pytest.mark.parametrize("kernel,shape,ctas", list(zip(WGMMA_KERNELS, [(128, 128), (256, 128), (128, 256)], [2, 1, 1],
                                                           strict=True)), ids=WGMMA_IDS)
def test_shared_memory_budget_fits_the_planned_ctas_per_sm(kernel, shape, ctas):
    # Hopper: 228 KiB of shared memory per SM, at most 227 KiB per CTA, 1 KiB reserved per CTA.
    tile = sm90.TILES[kernel]
    assert (tile["BM"], tile["BN"]) == shape and tile["ACC"] == tile["BN"] // 2
    assert tile["STAGE_BYTES"] == (tile["BM"] + tile["BN"]) * sm90.BK * 2
    assert tile["SMEM_BYTES"] >= tile["STAGES"] * tile["STAGE_BYTES"] + 1024
    assert tile["SMEM_BYTES"] <= 227 * 1024
    assert tile["CTAS_PER_SM"] == ctas
    assert ctas * (tile["SMEM_BYTES"] + 1024) <= 228 * 1024 < (ctas + 1) * (tile["SMEM_BYTES"] + 1024)
    assert tile["THREADS"] == (tile["BM"] // 64 * 4 + 1) * 32  # consumer warpgroups and one producer warp


def _block(dtype=BF16, rows=100, cols=1000, dim=96, q_stride=None, c_stride=None, q=1 << 20, c=1 << 24,
           kernel=FusedKernel.auto, cap=64) -> _C.FusedBlock:
    """A FusedBlock with fake (never dereferenced) pointers, for host-side checks."""
    f = _C.FusedBlock()
    f.queries, f.candidates = q, c
    f.q_stride = dim if q_stride is None else q_stride
    f.c_stride = dim if c_stride is None else c_stride
    f.dtype, f.rows, f.cols, f.dim = dtype, rows, cols, dim
    f.row_lo, f.row_hi = 4096, 8192
    f.cand_score, f.cand_col, f.cand_count, f.cand_cap = 12288, 16384, 20480, cap
    f.kernel = kernel
    return f


@pytest.mark.parametrize(
    "change,suits",
    [
        ({}, True),
        ({"dtype": F16}, True),
        ({"dim": 40}, True),  # any d: the copy zero-fills the last K step
        ({"dim": 8, "rows": 1, "cols": 1}, True),
        ({"dim": 1000, "q_stride": 1008}, True),  # padded rows
        ({"cols": 65535 * 128}, True),
        ({"dtype": F32}, False),  # fp32 stays on the tf32 mma.sync kernel
        ({"dim": 36}, False),  # a 72-byte row stride is not a whole number of 16 bytes
        ({"q_stride": 100}, False),
        ({"c_stride": 80}, False),  # rows would overlap: stride < dim
        ({"q": (1 << 20) + 8}, False),  # base not 16-byte aligned
        ({"c": (1 << 24) + 2}, False),
        ({"cols": 65535 * 128 + 1}, False),  # blockIdx.y limit
        ({"rows": 0}, False),
        ({"cap": 0}, False),
    ],
)
def test_wgmma_suits(change, suits):
    assert _C.topk_fused_wgmma_suits(_block(**change)) is suits


def test_wgmma_suits_rejects_tf32_slack():
    f = _block()
    f.row_slack, f.col_slack = 1 << 16, 1 << 17
    assert _C.topk_fused_wgmma_suits(f) is False


@pytest.mark.skipif(hnsample.has_cuda(), reason="checks the answer without a usable CUDA device")
def test_wgmma_unavailable_without_a_device():
    for device in (-1, 0, 7):
        assert _C.topk_fused_wgmma_available(device) is False


@pytest.mark.skipif(not _C.built_with_cuda, reason="the CUDA launcher's host-side checks")
def test_launcher_checks_the_kernel_field():
    # These checks run on the host before any CUDA call, so they hold with or without a device.
    for code in (-1, 5):
        with pytest.raises(_C.ParamError, match=f"fused kernel code {code} is unknown"):
            _C.topk_fused_scores(_block(kernel=FusedKernel(code)), 0)
    for kernel in WGMMA_KERNELS:
        with pytest.raises(RuntimeError, match="needs bf16/fp16 inputs"):
            _C.topk_fused_scores(_block(kernel=kernel, dim=36), 0)


@pytest.mark.skipif(not _C.built_with_cuda or hnsample.has_cuda(), reason="needs a CUDA build without a device")
@pytest.mark.parametrize("kernel", WGMMA_KERNELS)
def test_forced_wgmma_fails_without_a_device(kernel):
    with pytest.raises(RuntimeError):
        _C.topk_fused_scores(_block(kernel=kernel), 0)


# ----------------------------------------------------------------------------------------------------
# GPU


def _device_index() -> int:
    return torch.cuda.current_device()


def _is_sm90() -> bool:
    return torch.cuda.get_device_capability(_device_index()) == (9, 0)


def _needs_wgmma():
    if not _C.topk_fused_wgmma_available(_device_index()):
        pytest.skip("the device or this build has no sm_90a wgmma kernel")


def _launch(q: torch.Tensor, c: torch.Tensor, kernel: FusedKernel, lo: torch.Tensor, hi: torch.Tensor, cap: int,
            row_scale: torch.Tensor | None = None, col_scale: torch.Tensor | None = None):
    """One fused launch over all of q x c; returns (counts [rows], scores [rows, cap], cols [rows, cap])."""
    rows, cols = q.shape[0], c.shape[0]
    cand_score = torch.full((rows, cap), math.nan, device=q.device)
    cand_col = torch.full((rows, cap), -1, dtype=torch.int32, device=q.device)
    count = torch.zeros(rows, dtype=torch.int32, device=q.device)
    f = _C.FusedBlock()
    f.queries, f.q_stride, f.candidates, f.c_stride = q.data_ptr(), q.stride(0), c.data_ptr(), c.stride(0)
    f.dtype = BF16 if q.dtype == torch.bfloat16 else F16
    f.rows, f.cols, f.dim = rows, cols, q.shape[1]
    f.row_lo, f.row_hi = lo.data_ptr(), hi.data_ptr()
    f.row_scale = row_scale.data_ptr() if row_scale is not None else 0
    f.col_scale = col_scale.data_ptr() if col_scale is not None else 0
    f.cand_score, f.cand_col, f.cand_count, f.cand_cap = cand_score.data_ptr(), cand_col.data_ptr(), count.data_ptr(), cap
    f.kernel = kernel
    _C.topk_fused_scores(f, torch.cuda.current_stream(q.device).cuda_stream)
    torch.cuda.synchronize(q.device)
    return count.cpu(), cand_score.cpu(), cand_col.cpu()


def _lists(count, scores, cols) -> list[dict[int, float]]:
    out = []
    for i in range(count.shape[0]):
        n = int(count[i])
        assert n <= scores.shape[1], f"row {i} overflowed ({n} survivors)"
        got = dict(zip(cols[i, :n].tolist(), scores[i, :n].tolist(), strict=True))
        assert len(got) == n, f"row {i} lists a column twice"
        out.append(got)
    return out


def _int_operands(rows, cols, d, dtype, gen, pad=0):
    """Integers in [-8, 8): exact in bf16/fp16, dot products exact in fp32 for d <= 2^18 / 64. `pad`
    extra columns make row strides longer than d (a view of a wider tensor)."""
    q = torch.randint(-8, 8, (rows, d + pad), generator=gen).to(dtype).cuda()[:, :d]
    c = torch.randint(-8, 8, (cols, d + pad), generator=gen).to(dtype).cuda()[:, :d]
    return q, c


SHAPES = [  # (rows, cols, d, pad): edges off the 128 x 128 tile, d from one partial K step to 16
    (1, 1, 8, 0),
    (128, 128, 64, 0),
    (130, 300, 40, 0),
    (257, 1000, 96, 8),
    (77, 515, 200, 0),
    (300, 2050, 1024, 0),
    (513, 129, 32, 16),
    (1000, 5000, 64, 0),  # more tiles than CTAs fit an H200 at once: persistent CTAs walk several
]


@pytest.mark.gpu
@pytest.mark.parametrize("kernel", WGMMA_KERNELS, ids=WGMMA_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("rows,cols,d,pad", SHAPES)
def test_wgmma_launch_lists_every_score_of_mm(kernel, dtype, rows, cols, d, pad):
    _needs_wgmma()
    gen = torch.Generator().manual_seed(zlib.crc32(f"{rows}/{cols}/{d}/{dtype}".encode()))
    q, c = _int_operands(rows, cols, d, dtype, gen, pad)
    want = torch.mm(q.float(), c.float().T).cpu()
    inf = torch.full((rows,), math.inf, device="cuda")
    count, scores, cols_ = _launch(q, c, kernel, -inf, inf, cols)
    assert not _C.topk_fused_wgmma_stalled(_device_index())
    assert torch.equal(count, torch.full((rows,), cols, dtype=torch.int32))
    # every column once per row, with its exact score (lists come in any order)
    order = cols_.argsort(dim=1)
    assert torch.equal(cols_.gather(1, order), torch.arange(cols, dtype=torch.int32).expand(rows, cols))
    assert torch.equal(scores.gather(1, order), want)


@pytest.mark.gpu
@pytest.mark.parametrize("scaled", [False, True], ids=["unscaled", "scaled"])
@pytest.mark.parametrize("kernel", WGMMA_KERNELS, ids=WGMMA_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
def test_wgmma_launch_filters_and_scales_like_the_epilogue(kernel, dtype, scaled):
    # Per-row bounds (and cosine-style scales): the survivors of row i are exactly the j with
    # lo_i <= (acc_ij * row_scale_i) * col_scale_j <= hi_i, scaled in that order in fp32. The bounds are
    # scores that occur in the row, so candidates equal to a bound must be kept (closed interval), both
    # through the epilogue's unscaled test and through its scaled one (fused_keep_row).
    _needs_wgmma()
    gen = torch.Generator().manual_seed(3)
    rows, cols, d = 200, 3000, 160
    q, c = _int_operands(rows, cols, d, dtype, gen)
    rs = (torch.rand(rows, generator=gen) + 0.5).cuda() if scaled else None
    cs = (torch.rand(cols, generator=gen) + 0.5).cuda() if scaled else None
    s = torch.mm(q.float(), c.float().T)
    if scaled:
        s = (s * rs[:, None]) * cs[None, :]
    lo = s.kthvalue(int(0.97 * cols), dim=1).values.contiguous()
    hi = s.kthvalue(int(0.995 * cols), dim=1).values.contiguous()
    hi[0] = -math.inf  # an empty interval
    lo[1] = hi[1] = s[1, 7]  # a single value
    count, scores, cols_ = _launch(q, c, kernel, lo, hi, 256, rs, cs)
    s, lo, hi = s.cpu(), lo.cpu(), hi.cpu()
    for i, got in enumerate(_lists(count, scores, cols_)):
        keep = ((s[i] >= lo[i]) & (s[i] <= hi[i])).nonzero().flatten().tolist()
        assert got == {j: s[i, j].item() for j in keep}
    assert count[0] == 0 and count[1] >= 1


@pytest.mark.gpu
def test_auto_and_forced_kernels_agree_with_mma_sync():
    gen = torch.Generator().manual_seed(5)
    rows, cols, d = 150, 700, 64
    q, c = _int_operands(rows, cols, d, torch.bfloat16, gen)
    inf = torch.full((rows,), math.inf, device="cuda")
    lists = {k: _lists(*_launch(q, c, k, -inf, inf, cols)) for k in (FusedKernel.auto, FusedKernel.mma)}
    assert lists[FusedKernel.auto] == lists[FusedKernel.mma]
    if _C.topk_fused_wgmma_available(_device_index()):
        for kernel in WGMMA_KERNELS:
            assert _lists(*_launch(q, c, kernel, -inf, inf, cols)) == lists[FusedKernel.mma]


@pytest.mark.gpu
def test_wgmma_availability_follows_the_device():
    # gpu_check.sh builds for sm_90a, so on compute capability 9.0 the kernel must be there, with the
    # occupancy each shape is built for (two 128 x 128 CTAs per SM, one of the others).
    dev = _device_index()
    assert _C.topk_fused_wgmma_available(dev) is _is_sm90()
    assert _C.topk_fused_wgmma_available(torch.cuda.device_count()) is False
    want = dict(zip(WGMMA_KERNELS, [2, 1, 1] if _is_sm90() else [0, 0, 0], strict=True))
    assert {k: _C.topk_fused_wgmma_ctas_per_sm(dev, k) for k in WGMMA_KERNELS} == want


@pytest.mark.gpu
def test_forced_wgmma_raises_where_unavailable():
    if _C.topk_fused_wgmma_available(_device_index()):
        pytest.skip("the device runs the wgmma kernel")
    q = torch.ones(4, 64, dtype=torch.bfloat16, device="cuda")
    inf = torch.full((4,), math.inf, device="cuda")
    for kernel in WGMMA_KERNELS:
        with pytest.raises(RuntimeError, match="cannot run it"):
            _launch(q, q, kernel, -inf, inf, 8)


class _KernelRecordingDriver(CudaDriver):
    """The CUDA driver, recording the FusedBlock.kernel of every fused launch."""

    def __init__(self):
        super().__init__()
        self.kernels_launched: list[FusedKernel] = []

    def launch_fused(self, f, like):
        self.kernels_launched.append(f.kernel)
        super().launch_fused(f, like)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "f16"])
@pytest.mark.parametrize("b,d", [(1, 32), (130, 96), (300, 1024)])
@pytest.mark.parametrize("kw", [{}, {"exclude": True, "skip_top": 2}, {"sampling": "uniform", "seed": 4, "pool": 30}],
                         ids=["top", "exclude_skip", "uniform_pool"])
def test_topk_similarity_on_wgmma_equals_cpu(dtype, b, d, kw):
    _needs_wgmma()
    gen = torch.Generator().manual_seed(zlib.crc32(f"sim/{b}/{d}/{kw}".encode()))
    n = 40_003  # a seed block, then fused chunks; the last one ragged
    hi = 50 if d <= 96 else 12  # integer scores exact in fp32 for every d here
    q = torch.randint(-hi, hi, (b, d), generator=gen).to(dtype)
    c = torch.randint(-hi, hi, (n, d), generator=gen).to(dtype)
    kw = dict(kw)
    if kw.pop("exclude", False):
        kw["exclude"] = torch.randint(-1, n, (b, 6), generator=gen)
    cpu = hnsample.topk_similarity(q, c, 40, **kw)
    driver = _KernelRecordingDriver()
    with settings.override(cuda_path="fused", cuda_fused_kernel="wgmma"), registry.use("cuda", CudaBackend(driver)):
        gpu = hnsample.topk_similarity(q.cuda(), c.cuda(), 40, **{k: v.cuda() if isinstance(v, torch.Tensor) else v
                                                                  for k, v in kw.items()})
    assert torch.equal(cpu.indices, gpu.indices.cpu())
    assert torch.equal(cpu.scores, gpu.scores.cpu())
    assert driver.kernels_launched and set(driver.kernels_launched) == {FusedKernel.wgmma}
    assert not _C.topk_fused_wgmma_stalled(_device_index())
