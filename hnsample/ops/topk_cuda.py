"""The CUDA driver of the fused top-k selection (the two-pass path).

``run_similarity_selection`` hands CUDA inputs to :func:`run_cuda_selection`, which streams the score
matrix in blocks: cuBLAS computes a block of scores (bf16/fp16 inputs through ``torch.mm(...,
out_dtype=torch.float32)``, so the tensor cores accumulate in fp32 and the scores are never rounded to
16 bits), then the select kernel (csrc/cuda/topk_select.cu) merges it into the per-row state. Blocks
are sized to stay in the L2 cache, so the scores go from the GEMM to the select kernel without a round
trip through device memory. When a block has too few rows to fill the GPU with one warp per row, the
columns are split into segments, each feeding its own copy of the state; the copies are merged exactly
at the end (disjoint candidates).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import torch

from .. import _C
from .._ext import dtype_code, ptr, stream_of

# Select-kernel facts (csrc/cuda/topk_select.cu): scores per warp per tile, resident warps per SM in
# window mode (64 registers, 8 warps per block, 4 blocks per SM).
KERNEL_TILE = 512
WARPS_PER_SM = 32
# A segment narrower than this spends more on its share of the state than on scanning.
MIN_SEGMENT_COLS = 2048
# Extra state copies may take at most this many bytes.
MAX_SEGMENT_STATE_BYTES = 1 << 30
# Share of the L2 cache one fp32 score block may fill; the GEMM's operand tiles use the rest.
L2_SHARE = 0.5
# Run the select kernel of block t on a side stream while the GEMM of block t + 1 runs (two score
# buffers of half the size each). Off by default until measured on a device: cuBLAS fills every SM, so
# the gain is limited to GEMM tails, and halving the blocks doubles the launches.
OVERLAP = False

# Path choice. "auto" picks the fused path for shapes it supports when FUSED_AUTO is set, else the
# two-pass path; "two_pass" and "fused" force a path (fused falls back to two-pass for inputs it does
# not support: it is never run on them). FUSED_AUTO stays off until the device check has shown the
# fused kernel correct and faster on a GPU.
PATH = "auto"
FUSED_AUTO = False
# Which fused kernel (FusedBlock.kernel): "mma" (mma.sync, sm_80+), "wgmma" (sm_90a, 128 x 128 tiles,
# two CTAs per SM), "wgmma_256x128" / "wgmma_128x256" (one CTA per SM), or "auto": wgmma where the
# device (compute capability 9.0), the build (sm_90a code) and the inputs allow it, else mma.sync. A
# wgmma choice raises where wgmma is unavailable. "mma" stays the default until the device check has
# shown the wgmma kernels correct.
FUSED_KERNEL = "mma"
_FUSED_KERNEL_CODES = {"auto": 0, "mma": 1, "wgmma": 2, "wgmma_256x128": 3, "wgmma_128x256": 4}
# Pipeline depth of the mma.sync kernel: 0 picks by the device (4 stages of 20 KiB where two CTAs of
# 80 KiB fit an SM, else 2), or 2 / 4 (FusedBlock.stages).
FUSED_STAGES = 0
# Fused path: columns scored by the two-pass path first to give every row a threshold, and the
# smallest N worth fusing. Chunks then double (each about the size of all columns before it), so a
# row expects about `capacity` survivors per chunk against a candidate list of 4 capacity + 64.
FUSED_SEED_COLS = 8192
FUSED_MIN_COLS = 4 * FUSED_SEED_COLS
FUSED_MAX_CAPACITY = 2048
FUSED_MAX_LIST_BYTES = 1 << 30
# Rows per norm computation (float64 temporaries of this many rows).
NORM_ROWS = 1 << 13

_STATE_FIELDS = (
    "num_rows", "k", "skip", "pool", "capacity", "mode", "sampling", "inv_temperature", "seed",
    "noise_row_offset", "min_score", "max_score", "banned_stride", "banned_cols", "upper", "banned",
    "query_labels", "candidate_labels",
)


@dataclass(frozen=True)
class CudaPlan:
    """How the (B, N) score matrix is cut: row and column extent of a block, segments per block."""

    block_rows: int
    block_cols: int
    segments: int


@cache
def _device_facts(index: int) -> tuple[int, int]:
    """(multiprocessors, L2 bytes) of a CUDA device."""
    props = torch.cuda.get_device_properties(index)
    l2 = int(getattr(props, "L2_cache_size", 0) or 0) or (40 << 20)
    return int(props.multi_processor_count), l2


def plan_blocks(
    rows: int, cols: int, block_size: int, sms: int, l2_bytes: int, state_row_bytes: int, score_bytes: int = 4
) -> CudaPlan:
    """Block shape and segment count for B = rows queries and N = cols candidates.

    The score block holds at most min(block_size, L2_SHARE * L2 / score_bytes) elements (by default half
    the L2 in bytes, so the GEMM's operands keep the other half; a quarter each for two buffers when
    OVERLAP). Within that budget the block is near square, which minimizes the operand traffic
    B N d (1 / block_cols + 1 / block_rows) of re-reading queries and candidates per block.
    Segments: enough column ranges that rows x segments warps fill the GPU, each at least
    MIN_SEGMENT_COLS wide and a whole number of kernel tiles, within MAX_SEGMENT_STATE_BYTES.
    """
    share = L2_SHARE / 2 if OVERLAP else L2_SHARE  # two buffers live at once when overlapping
    budget = max(1, min(block_size, int(l2_bytes * share) // score_bytes))
    side = max(1, math.isqrt(budget))
    row_blocks = max(1, math.ceil(rows / side))
    br = min(rows, budget, _round_up(math.ceil(rows / row_blocks), 64))
    bc = max(1, min(cols, budget // br))
    if bc > 128:
        bc = bc // 128 * 128  # 16-byte aligned fp32 rows and whole GEMM tiles
    want = math.ceil(sms * WARPS_PER_SM / br)
    by_width = max(1, bc // MIN_SEGMENT_COLS)
    by_memory = max(1, MAX_SEGMENT_STATE_BYTES // max(1, rows * state_row_bytes))
    segments = max(1, min(want, by_width, by_memory, 65535))
    if segments > 1 and bc > KERNEL_TILE * segments:
        bc = bc // (KERNEL_TILE * segments) * (KERNEL_TILE * segments)
    return CudaPlan(br, bc, segments)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


@cache
def _mm_out_dtype_supported(index: int, dtype: torch.dtype) -> bool:
    """Whether torch.mm(x, y, out_dtype=float32, out=...) runs for this 16-bit dtype on this device
    (torch >= 2.8)."""
    try:
        a = torch.ones((2, 16), dtype=dtype, device=torch.device("cuda", index))
        out = torch.empty((2, 2), dtype=torch.float32, device=a.device)
        torch.mm(a, a.T, out_dtype=torch.float32, out=out)
        return bool(torch.all(out == 16.0))
    except (RuntimeError, TypeError):
        return False


class ScoreGemm:
    """Computes fp32 (fp64 for fp64 inputs) score blocks s = q c^T on the GPU.

    bf16/fp16 with torch.mm(out_dtype=float32): tensor cores, fp32 accumulation, fp32 output. Without
    it (torch < 2.8) both operands are converted to fp32 per block (exact, slower). Cosine for 16-bit
    inputs scales the raw product by 1 / (|q_i| |c_j|) (norms in fp32; zero vectors score 0), which
    equals the CPU's product of normalized fp32 rows up to fp32 rounding; other dtypes normalize the
    rows first, as the CPU does.
    """

    def __init__(self, queries: torch.Tensor, metric: str):
        self.metric = metric
        self.half = queries.dtype in (torch.float16, torch.bfloat16)
        self.native = self.half and _mm_out_dtype_supported(queries.device.index or 0, queries.dtype)
        self.out_dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
        self.q, self.q_scale = self.operand(queries)

    def operand(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rows ready for the GEMM, per-row cosine scale or None)."""
        if self.native:
            scale = None
            if self.metric == "cosine":
                scale = cosine_scale(x)
            return x.contiguous(), scale
        x = x.to(self.out_dtype)
        if self.metric == "cosine":
            norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
            x = x / torch.where(norm > 0, norm, torch.ones_like(norm))
        return x, None

    def scores(
        self, i0: int, i1: int, c: torch.Tensor, c_scale: torch.Tensor | None, out: torch.Tensor
    ) -> None:
        q = self.q[i0:i1]
        if self.native:
            torch.mm(q, c.T, out_dtype=torch.float32, out=out)
            if c_scale is not None:
                out.mul_(self.q_scale[i0:i1, None]).mul_(c_scale[None, :])
        else:
            torch.mm(q, c.T, out=out)


def copy_params(p: _C.TopkParams, row0: int, state: tuple[torch.Tensor, ...]) -> _C.TopkParams:
    """A TopkParams with p's selection fields whose state starts at row `row0` of the given
    (st_score, st_index, st_key, st_count) tensors."""
    out = _C.TopkParams()
    for name in _STATE_FIELDS:
        setattr(out, name, getattr(p, name))
    st_score, st_index, st_key, st_count = state
    out.st_score = st_score[row0].data_ptr() if st_score.numel() else 0
    out.st_index = st_index[row0].data_ptr() if st_index.numel() else 0
    out.st_key = st_key[row0].data_ptr() if st_key.numel() else 0
    out.st_count = st_count[row0].data_ptr()
    return out


def offer_block(
    params: _C.TopkParams, block: torch.Tensor, row_offset: int, col_offset: int, segments: int,
    stream: int | None = None,
) -> None:
    """Merges a CUDA score block (any float dtype, any strides) into `segments` state copies, on
    `stream` (default: the current stream of the block's device)."""
    if block.numel() == 0:
        return
    _C.topk_select_block_segments(
        params, block.data_ptr(), dtype_code(block), block.shape[0], block.shape[1], block.stride(0),
        block.stride(1), row_offset, col_offset, segments, stream_of(block) if stream is None else stream,
    )


def fused_supported(queries: torch.Tensor, candidates: torch.Tensor, metric: str, sel) -> bool:
    """Whether the fused kernels handle these inputs: a CUDA device of compute capability >= 8.0,
    bf16/fp16 inputs with d a multiple of 32 or fp32 inputs (tf32 tensor cores plus exact rescoring)
    with d a multiple of 16, metric "dot" or "cosine", a window-mode state (sampling "top", or sampling
    from a bounded pool) of at most FUSED_MAX_CAPACITY slots whose candidate lists fit
    FUSED_MAX_LIST_BYTES. Stream-mode sampling gains nothing: every eligible candidate matters."""
    from .topk import MODE_WINDOW, state_layout

    if queries.device.type != "cuda" or queries.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return False
    d = queries.shape[1]
    step = 16 if queries.dtype == torch.float32 else 32
    mode, capacity = state_layout(sel.k, sel.skip_top, sel.pool, sel.sampling)
    return (
        metric in ("dot", "cosine") and d > 0 and d % step == 0 and mode == MODE_WINDOW
        and 0 < capacity <= FUSED_MAX_CAPACITY
        and queries.shape[0] * _list_cap(capacity) * 8 <= FUSED_MAX_LIST_BYTES
        and candidates.shape[0] < (1 << 31) and bool(_C.topk_fused_supported(queries.device.index or 0))
    )


def choose_path(queries: torch.Tensor, candidates: torch.Tensor, metric: str, sel) -> str:
    """"fused" or "two_pass" for these inputs, following PATH and FUSED_AUTO (see above)."""
    if PATH == "two_pass" or not fused_supported(queries, candidates, metric, sel):
        return "two_pass"
    if PATH == "fused":
        return "fused"
    return "fused" if FUSED_AUTO and candidates.shape[0] >= FUSED_MIN_COLS else "two_pass"


def _list_cap(capacity: int) -> int:
    return _round_up(4 * capacity + 64, 32)


def run_cuda_selection(
    queries: torch.Tensor, candidates: torch.Tensor, sel, metric: str, block_size: int, state=None,
    col_offset: int = 0,
):
    """The CUDA body of :func:`hnsample.ops.topk.run_similarity_selection` (same contract), on the
    path :func:`choose_path` picks."""
    from .topk import SelectionState

    b, n = queries.shape[0], candidates.shape[0]
    if state is None:
        state = SelectionState(sel, b, queries.device)
    if b == 0 or n == 0 or sel.k == 0:
        return state
    if choose_path(queries, candidates, metric, sel) == "fused":
        return _run_fused(queries, candidates, sel, metric, block_size, state, col_offset)
    return _run_two_pass(queries, candidates, sel, metric, block_size, state, col_offset)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norms of the rows of x, summed in float64 (NORM_ROWS rows at a time), as float64."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], NORM_ROWS):
        out[i:i + NORM_ROWS] = torch.linalg.vector_norm(x[i:i + NORM_ROWS].double(), dim=1)
    return out


def cosine_scale(x: torch.Tensor) -> torch.Tensor:
    """1 / |x_i| per row with the norm taken in fp32 (NORM_ROWS rows at a time), 0 for zero rows."""
    out = torch.empty(x.shape[0], dtype=torch.float32, device=x.device)
    for i in range(0, x.shape[0], NORM_ROWS):
        norm = torch.linalg.vector_norm(x[i:i + NORM_ROWS].float(), dim=1)
        out[i:i + NORM_ROWS] = torch.where(norm > 0, 1.0 / norm, torch.zeros_like(norm))
    return out


def _float_up(x: torch.Tensor) -> torch.Tensor:
    """float32 values >= the float64 values x (x * (1 + 2^-20), then rounded to nearest)."""
    return (x * (1 + 2.0**-20)).float()


@dataclass
class FusedOperands:
    """The per-row and per-column epilogue inputs of the fused kernel for one (queries, candidates)
    pair: cosine scales 1/|x| (0 for zero rows: they score 0, as on the two-pass path) and, for fp32
    inputs, the tf32 slack factors: w_ij = row_slack_i col_slack_j >= e(d) |q_i| |c_j| s_i s_j, the
    error bound of tf32_dot_error_factor on the scaled score. None where not needed."""

    row_scale: torch.Tensor | None
    col_scale: torch.Tensor | None
    row_slack: torch.Tensor | None
    col_slack: torch.Tensor | None

    @classmethod
    def build(cls, q: torch.Tensor, c: torch.Tensor, metric: str) -> FusedOperands:
        tf32 = q.dtype == torch.float32
        if metric != "cosine" and not tf32:
            return cls(None, None, None, None)
        row_scale = col_scale = row_slack = col_slack = None
        if metric == "cosine":  # the two-pass path's scales
            row_scale, col_scale = cosine_scale(q), cosine_scale(c)
        if tf32:
            qn, cn = row_norms(q), row_norms(c)
            if row_scale is not None:
                qn, cn = qn * row_scale.double(), cn * col_scale.double()
            row_slack = _float_up(_C.tf32_dot_error_factor(q.shape[1]) * qn)
            col_slack = _float_up(cn)
        return cls(row_scale, col_scale, row_slack, col_slack)


def fused_block(
    q: torch.Tensor, c: torch.Tensor, ops: FusedOperands, c0: int, c1: int, lo: torch.Tensor,
    hi: torch.Tensor, lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> _C.FusedBlock:
    """The FusedBlock of one launch over candidates [c0, c1) of c (contiguous rows)."""
    f = _C.FusedBlock()
    f.queries, f.q_stride = q.data_ptr(), q.stride(0)
    f.candidates, f.c_stride = c[c0].data_ptr(), c.stride(0)
    f.dtype, f.rows, f.cols, f.dim = dtype_code(q), q.shape[0], c1 - c0, q.shape[1]
    f.row_lo, f.row_hi = lo.data_ptr(), hi.data_ptr()
    f.row_scale, f.row_slack = ptr(ops.row_scale), ptr(ops.row_slack)
    f.col_scale = ptr(None if ops.col_scale is None else ops.col_scale[c0:])
    f.col_slack = ptr(None if ops.col_slack is None else ops.col_slack[c0:])
    f.cand_score, f.cand_col, f.cand_count = (x.data_ptr() for x in lists)
    f.cand_cap = lists[0].shape[1]
    f.kernel = _FUSED_KERNEL_CODES[FUSED_KERNEL]
    f.stages = FUSED_STAGES
    return f


def launch_fused(f: _C.FusedBlock, stream: int) -> None:
    """The fused score kernel over one FusedBlock (tests replace this with a CPU emulation)."""
    _C.topk_fused_scores(f, stream)


def rescore_fused(f: _C.FusedBlock, stream: int) -> None:
    """Exact rescoring of one launch's fp32 candidate lists (tests replace this too)."""
    _C.topk_rescore_candidates(f, True, stream, 1)


def _run_fused(
    queries: torch.Tensor, candidates: torch.Tensor, sel, metric: str, block_size: int, state, col_offset: int
):
    """Fused path: the first FUSED_SEED_COLS candidates through the two-pass path (thresholds), then
    chunks of doubling width through the fused kernel, whose per-row candidate lists are offered to
    the state. A chunk where some row's list overflowed is redone on the two-pass path instead (one
    host sync per chunk decides), so the state is always exact. 16-bit inputs: scores are fp32
    accumulations of exact products, equal to the two-pass path's up to summation order. fp32 inputs:
    the kernel keeps every candidate whose tf32 score is within the proven error slack of the row's
    bounds, and the survivors are rescored exactly (double sums) before they are offered, so no
    candidate the exact scores would take is lost. Extra memory: (B, 4 capacity + 64) candidate lists,
    O(B + N) norms and scales, and the two-pass path's block for the seed."""
    b, n = queries.shape[0], candidates.shape[0]
    q, c = queries.contiguous(), candidates.contiguous()
    capacity = state.st_score.shape[1]
    done = min(n, max(FUSED_SEED_COLS, 4 * capacity))
    _run_two_pass(q, c[:done], sel, metric, block_size, state, col_offset)
    if done == n:
        return state
    ops = FusedOperands.build(q, c, metric)
    cap = _list_cap(capacity)
    dev = q.device
    lo, hi = torch.empty(b, dtype=torch.float32, device=dev), torch.empty(b, dtype=torch.float32, device=dev)
    lists = (
        torch.empty((b, cap), dtype=torch.float32, device=dev),
        torch.empty((b, cap), dtype=torch.int32, device=dev),
        torch.empty(b, dtype=torch.int32, device=dev),
    )
    stream = torch.cuda.current_stream(dev).cuda_stream
    p = state.params
    while done < n:
        width = min(n - done, done)
        _C.topk_row_bounds(p, lo.data_ptr(), hi.data_ptr(), True, stream, 1)
        lists[2].zero_()
        f = fused_block(q, c, ops, done, done + width, lo, hi, lists)
        launch_fused(f, stream)
        if bool((lists[2] > cap).any()):
            _run_two_pass(q, c[done:done + width], sel, metric, block_size, state, col_offset + done)
        else:
            if ops.row_slack is not None:
                rescore_fused(f, stream)
            _C.topk_offer_candidates(p, lists[0].data_ptr(), lists[1].data_ptr(), lists[2].data_ptr(),
                                     cap, col_offset + done, True, stream, 1)
        done += width
    return state


def _run_two_pass(
    queries: torch.Tensor, candidates: torch.Tensor, sel, metric: str, block_size: int, state, col_offset: int
):
    """Two-pass path: streams candidates in column blocks (outer loop) and queries in row blocks
    (inner), offering each score block to the state. Extra memory: one score block, one converted
    candidate block and, when the plan splits columns into S > 1 segments, S copies of the
    (B, capacity) state."""
    b, n = queries.shape[0], candidates.shape[0]
    sms, l2 = _device_facts(queries.device.index or 0)
    capacity = state.st_score.shape[1]
    row_bytes = capacity * (24 if sel.sampling != 0 else 16) + 16
    gemm = ScoreGemm(queries, metric)
    plan = plan_blocks(b, n, block_size, sms, l2, row_bytes, gemm.out_dtype.itemsize)

    target = state.params
    copies = None
    if plan.segments > 1:
        s = plan.segments
        copies = (
            torch.empty((s * b, capacity), dtype=torch.float64, device=queries.device),
            torch.empty((s * b, capacity), dtype=torch.int64, device=queries.device),
            torch.empty((s * b, capacity) if sel.sampling != 0 else (0,), dtype=torch.float64,
                        device=queries.device),
            torch.zeros((s * b, 2), dtype=torch.int64, device=queries.device),
        )
        target = copy_params(state.params, 0, copies)

    br, bc = plan.block_rows, plan.block_cols
    # Python work per block is a GEMM call and a kernel launch: ~1000 blocks for 8192 x 1M, so views,
    # slices and the stream are prepared once (a fresh view or slice costs microseconds each).
    row_blocks = [(i0, min(b, i0 + br)) for i0 in range(0, b, br)]
    buffers = [torch.empty(br * bc, dtype=gemm.out_dtype, device=queries.device)
               for _ in range(2 if OVERLAP else 1)]
    main = torch.cuda.current_stream(queries.device)
    side = torch.cuda.Stream(queries.device) if OVERLAP else main
    side_handle = side.cuda_stream
    if OVERLAP:
        side.wait_stream(main)  # the state was zeroed on the main stream
    selected = [None] * len(buffers)  # event: the select kernel is done with buffer t
    full_views = [[buf[: (i1 - i0) * bc].view(i1 - i0, bc) for i0, i1 in row_blocks] for buf in buffers]
    t = 0
    for j0 in range(0, n, bc):
        j1 = min(n, j0 + bc)
        c, c_scale = gemm.operand(candidates[j0:j1])
        for r, (i0, i1) in enumerate(row_blocks):
            slot = t % len(buffers)
            if j1 - j0 == bc:
                out = full_views[slot][r]
            else:
                out = buffers[slot][: (i1 - i0) * (j1 - j0)].view(i1 - i0, j1 - j0)
            if OVERLAP and selected[slot] is not None:
                main.wait_event(selected[slot])
            gemm.scores(i0, i1, c, c_scale, out)
            if OVERLAP:
                side.wait_stream(main)
                offer_block(target, out, i0, col_offset + j0, plan.segments, side_handle)
                selected[slot] = side.record_event()
            else:
                offer_block(target, out, i0, col_offset + j0, plan.segments, side_handle)
            t += 1
    if OVERLAP:
        main.wait_stream(side)

    if copies is not None:
        for s in range(plan.segments):
            _C.topk_merge(state.params, copy_params(state.params, s * b, copies), True,
                          stream_of(state.st_count), 1)
    return state
