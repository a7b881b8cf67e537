"""The CUDA selection driver: how CUDA inputs are cut into launches.

Two paths give the same result. **Two-pass**: the GEMM computes a block of scores (16-bit inputs through
``torch.mm(..., out_dtype=torch.float32)``: tensor cores accumulating in fp32), then the select kernel
(csrc/cuda/topk_select.cu) merges it into the per-row state. Blocks are sized to stay in the L2 cache, so
the scores go from the GEMM to the select kernel without a round trip through device memory (16-bit
cosine: the raw products, which the select kernel scales as it reads them); when a block has too few
rows to fill the GPU with one warp per row, its columns are split into segments, each feeding its own
copy of the state, merged exactly at the end (disjoint candidates). **Fused**: a
tensor-core kernel scores and filters in one pass against per-row bounds taken from the state and
appends only the survivors to per-row candidate lists (csrc/cuda/topk_fused*.cu). "auto" takes the fused
path for states of at most ``cuda_fused_auto_max_capacity`` slots and N >= 4 seed widths, where the H200
device check measured it faster (settings ``cuda_path`` / ``cuda_fused_auto``).

Everything the driver launches goes through its :class:`~hnsample.engine.selection.CudaKernels`; a
test drives it on the CPU by giving it kernels of its own (the emulator's) and a product of its own.
"""

from __future__ import annotations

import dataclasses
import math
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch

from .. import _C
from .. import settings as _settings
from .._ext import dtype_code, ptr
from .blocks import cosine_scale, product_for, score_blocks, screen_product
from .selection import CUDA_KERNELS, CudaKernels, Selection, SelectionState

# Select-kernel facts (csrc/cuda/topk_select.cu): scores per warp per tile, resident warps per SM in
# window mode (64 registers, 8 warps per block, 4 blocks per SM).
KERNEL_TILE = 512
WARPS_PER_SM = 32
# Rows per norm computation (float64 temporaries of this many rows).
NORM_ROWS = 1 << 13
# Rows per tile redone on the two-pass path when a fused launch overflows some row's candidate list.
REDO_TILE = 128


@dataclasses.dataclass(frozen=True)
class CudaPlan:
    """How the (B, N) score matrix is cut: row and column extent of a block, segments per block."""

    block_rows: int
    block_cols: int
    segments: int


def plan_blocks(
    rows: int, cols: int, block_size: int, sms: int, l2_bytes: int, state_row_bytes: int, score_bytes: int = 4
) -> CudaPlan:
    """Block shape and segment count for B = rows queries and N = cols candidates.

    The score block holds at most min(block_size, cuda_l2_share * L2 / score_bytes) elements (by default
    half the L2 in bytes, so the GEMM's operands keep the other half). Within that budget the block is
    near square, which minimizes the operand traffic B N d (1 / block_cols + 1 / block_rows) of
    re-reading queries and candidates per block. Segments: enough column ranges that rows x segments
    warps fill the GPU, each at least cuda_min_segment_cols wide and a whole number of kernel tiles,
    within cuda_max_segment_state_bytes.
    """
    cfg = _settings.current()
    budget = max(1, min(block_size, int(l2_bytes * cfg.cuda_l2_share) // score_bytes))
    side = max(1, math.isqrt(budget))
    row_blocks = max(1, math.ceil(rows / side))
    br = min(rows, budget, _round_up(math.ceil(rows / row_blocks), 64))
    bc = max(1, min(cols, budget // br))
    if bc > 128:
        bc = bc // 128 * 128  # 16-byte aligned fp32 rows and whole GEMM tiles
    want = math.ceil(sms * WARPS_PER_SM / br)
    by_width = max(1, bc // cfg.cuda_min_segment_cols)
    by_memory = max(1, cfg.cuda_max_segment_state_bytes // max(1, rows * state_row_bytes))
    segments = max(1, min(want, by_width, by_memory, 65535))
    if segments > 1 and bc > KERNEL_TILE * segments:
        bc = bc // (KERNEL_TILE * segments) * (KERNEL_TILE * segments)
    return CudaPlan(br, bc, segments)


def _round_up(x: int, m: int) -> int:
    return (x + m - 1) // m * m


def list_capacity(capacity: int) -> int:
    """Slots of a row's fused candidate list for a state of `capacity` slots."""
    return _round_up(4 * capacity + 64, 32)


def row_norms(x: torch.Tensor) -> torch.Tensor:
    """Euclidean norms of the rows of x, summed in float64 (NORM_ROWS rows at a time), as float64."""
    out = torch.empty(x.shape[0], dtype=torch.float64, device=x.device)
    for i in range(0, x.shape[0], NORM_ROWS):
        out[i:i + NORM_ROWS] = torch.linalg.vector_norm(x[i:i + NORM_ROWS].double(), dim=1)
    return out


def tf32_flush_floor(dim: int) -> float:
    """a of the tf32 slack (FusedOperands): tensor cores flush subnormal inputs, products and partial
    sums to zero, errors a purely relative bound misses for tiny norms. Flushing an input element x_k
    (|x_k| < 2^-126) changes its product by at most 2^-126 |y_k|, all of them together by at most
    2^-126 sqrt(d) (|q| + |c|); each of the d products and d additions loses at most 2^-126 more: 2d 2^-126.
    With a = sqrt(2d) 2^-63: a^2 = 2d 2^-126, a |c| >= 2^-126 sqrt(d) |c|, and a e(d) |q| >= 2^-126
    sqrt(d) |q| since e(d) >= 2^-11 > 2^-63. A few 2^-63-sized terms next to e(d) |q| |c| ~ 2^-10 |q| |c|:
    no extra survivors at ordinary norms."""
    return math.sqrt(2 * max(1, dim)) * 2.0**-63


def _float_up(x: torch.Tensor) -> torch.Tensor:
    """float32 values >= the float64 values x (x * (1 + 2^-20), then rounded to nearest)."""
    return (x * (1 + 2.0**-20)).float()


@dataclasses.dataclass
class FusedOperands:
    """The per-row and per-column epilogue inputs of the fused kernel for one (queries, candidates)
    pair: cosine scales 1/|x| (0 for zero rows: they score 0, as on the two-pass path) and, for fp32
    inputs, the tf32 slack factors w_ij = row_slack_i col_slack_j with row_slack = e(d) |q_i| s_i + a and
    col_slack = |c_j| s_j + a, a = tf32_flush_floor(d): w_ij >= e(d) |q_i| |c_j| s_i s_j (the relative
    bound of tf32_dot_error_factor on the scaled score) + a |c_j| s_j + a e(d) |q_i| s_i + a^2, whose
    extra terms cover what flushing subnormals to zero adds. None where not needed."""

    row_scale: torch.Tensor | None
    col_scale: torch.Tensor | None
    row_slack: torch.Tensor | None
    col_slack: torch.Tensor | None

    @classmethod
    def build(cls, q: torch.Tensor, c: torch.Tensor, metric: str, error_factor: float) -> FusedOperands:
        """error_factor: e(d) of the tf32 bound (used for fp32 inputs only)."""
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
            floor = tf32_flush_floor(q.shape[1])
            row_slack = _float_up(error_factor * qn + floor)
            col_slack = _float_up(cn + floor)
        return cls(row_scale, col_scale, row_slack, col_slack)


def fused_block(
    q: torch.Tensor, c: torch.Tensor, ops: FusedOperands, c0: int, c1: int, lo: torch.Tensor,
    hi: torch.Tensor, lists: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> Any:
    """The FusedBlock of one launch over candidates [c0, c1) of c (contiguous rows), with the kernel
    and pipeline depth of the settings."""
    cfg = _settings.current()
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
    f.kernel = _C.FusedKernel.__members__[cfg.cuda_fused_kernel]
    f.stages = cfg.cuda_fused_stages
    return f


class CudaDriver:
    """Runs a selection on CUDA inputs: :meth:`select` picks the path and streams the blocks.

    kernels: the launchers (``hnsample._C``'s CUDA ones by default). product: a factory (queries,
    metric) -> product for the two-pass path's score blocks (default: :func:`product_for`).
    """

    def __init__(self, kernels: CudaKernels | None = None,
                 product: Callable[[torch.Tensor, str], Any] | None = None):
        self.kernels = kernels if kernels is not None else CUDA_KERNELS
        self._product = product
        self.max_fused_cols = int(_C.fused_max_cols)  # candidates per fused launch (the kernels' grid limit)
        self._fused_off: set[int] = set()  # devices where a wgmma launch stalled: fused is off there
        self._lock = threading.Lock()

    def fused_off(self, device: torch.device) -> bool:
        """Whether a stall turned the fused path off on this device for the life of this driver (the
        process, for the default CUDA backend)."""
        with self._lock:
            return (device.index or 0) in self._fused_off

    def _after_stall(self, device: torch.device) -> None:
        """A wgmma launch stalled on `device` (its copies never arrived within the kernel's 1 s watchdog:
        a debugger, a sanitizer, preemption). Warns once, turns the fused path off there and clears the
        device flag, so later launches are not all overflowed and redone in silence."""
        index = device.index or 0
        with self._lock:
            first = index not in self._fused_off
            self._fused_off.add(index)
        self.kernels.clear_fused_stall(device)
        if first:
            warnings.warn(f"hnsample: the fused wgmma kernel stalled on cuda:{index} (no copy arrived within "
                          "its 1 s watchdog); results stay exact, but the fused path is now off on that "
                          "device for this process", RuntimeWarning, stacklevel=4)

    def product(self, queries: torch.Tensor, metric: str) -> Any:
        """The two-pass path's product: the factory's, or :func:`product_for`'s with the cosine scales
        left to the select kernel (``scales_in_select``)."""
        if self._product is not None:
            return self._product(queries, metric)
        return product_for(queries, metric, self.kernels, scales_in_select=True)

    def error_factor(self, dim: int) -> float:
        """e(d) of the tf32 score bound |s_tc - s| <= e(d) |q| |c| (csrc/topk_select.h)."""
        return _C.tf32_dot_error_factor(dim)

    # -- path choice -----------------------------------------------------------------------------------

    def fused_supported(self, queries: torch.Tensor, candidates: torch.Tensor, metric: str, sel: Selection,
                        capacity: int) -> bool:
        """Whether the fused kernels handle these inputs: a CUDA device of compute capability >= 8.0,
        bf16/fp16 inputs with d a multiple of 32 or fp32 inputs (tf32 tensor cores plus exact rescoring)
        with d a multiple of 16, metric "dot" or "cosine", a window-mode state (sampling "top", or
        sampling from a bounded pool) of at most cuda_fused_max_capacity slots whose candidate lists fit
        cuda_fused_max_list_bytes. Stream-mode sampling gains nothing: every eligible candidate matters."""
        cfg = _settings.current()
        if queries.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            return False
        d = queries.shape[1]
        step = 16 if queries.dtype == torch.float32 else 32
        window = sel.sampling == "top" or sel.pool >= 0
        return (
            metric in ("dot", "cosine") and d > 0 and d % step == 0 and window
            and 0 < capacity <= cfg.cuda_fused_max_capacity
            and queries.shape[0] * list_capacity(capacity) * 8 <= cfg.cuda_fused_max_list_bytes
            and candidates.shape[0] < (1 << 31) and self.kernels.fused_supported(queries.device)
        )

    def choose_path(self, queries: torch.Tensor, candidates: torch.Tensor, metric: str, state: SelectionState
                    ) -> str:
        """"fused" or "two_pass" for these inputs, following settings.cuda_path, cuda_fused_auto and
        cuda_fused_auto_max_capacity."""
        cfg = _settings.current()
        if cfg.cuda_path == "two_pass" or self.fused_off(queries.device) or not self.fused_supported(
                queries, candidates, metric, state.sel, state.capacity):
            return "two_pass"
        if cfg.cuda_path == "fused":
            return "fused"
        min_cols = 4 * cfg.cuda_fused_seed_cols
        auto = (cfg.cuda_fused_auto and candidates.shape[0] >= min_cols
                and state.capacity <= cfg.cuda_fused_auto_max_capacity)
        return "fused" if auto else "two_pass"

    def select(self, queries: torch.Tensor, candidates: torch.Tensor, state: SelectionState, metric: str,
               block_size: int, col_offset: int = 0) -> SelectionState:
        """Offers queries x candidates (global ids col_offset + j) to the state on the chosen path."""
        if queries.shape[0] == 0 or candidates.shape[0] == 0 or state.sel.k == 0:
            return state
        if self.choose_path(queries, candidates, metric, state) == "fused":
            return self.run_fused(queries, candidates, state, metric, block_size, col_offset)
        return self.run_two_pass(queries, candidates, state, metric, block_size, col_offset)

    # -- the two paths ---------------------------------------------------------------------------------

    def run_two_pass(self, queries: torch.Tensor, candidates: torch.Tensor, state: SelectionState, metric: str,
                     block_size: int, col_offset: int, row_offset: int = 0) -> SelectionState:
        """Two-pass path: score blocks from the product, each offered to the state (or, when the plan
        splits columns into S > 1 segments, to S stacked copies of it, merged at the end). A product with
        ``scales_in_select`` (16-bit cosine by default) writes raw products and the select kernel applies
        the operands' scales, (acc * 1/|q_i|) * 1/|c_j| in fp32. Extra memory: one score block, one
        prepared candidate block and the S copies of the (B, capacity) state. ``row_offset``: the queries
        are state rows row_offset.. (a part of the state: no segments)."""
        b, n = queries.shape[0], candidates.shape[0]
        facts = self.kernels.device_facts(queries.device)
        row_bytes = state.capacity * (24 if state.sel.sampling != "top" else 16) + 16
        product = self.product(queries, metric)
        plan = plan_blocks(b, n, block_size, facts.multiprocessors, facts.l2_bytes, row_bytes,
                           product.out_dtype.itemsize)
        plan, target = self._segmented(state, plan, whole=not row_offset and b == state.rows)
        # A product with scales_in_select leaves the cosine scales on its operands: the select kernel
        # applies them in its compare, (acc * row scale) * column scale, as the product would have.
        scaled = getattr(product, "scales_in_select", False)
        stream = self.kernels.stream(queries)
        select, params, segments = self.kernels.select_block, target.params, plan.segments
        for blk in score_blocks(queries, candidates, product, plan.block_rows, plan.block_cols, packed=True):
            rs, cs = (blk.queries.scale, blk.candidates.scale) if scaled else (None, None)
            select(params, blk.scores, row_offset + blk.i0, col_offset + blk.j0, segments, rs, cs, stream)
        return self._merge_segments(state, target)

    def _segmented(self, state: SelectionState, plan: CudaPlan, whole: bool) -> tuple[CudaPlan, SelectionState]:
        """(plan, the state blocks are offered to): with plan.segments > 1, a new state of that many stacked
        copies (one per column range), which _merge_segments folds into `state`; one segment when the
        blocks cover only part of the state's rows (``whole`` false)."""
        if not whole:
            plan = dataclasses.replace(plan, segments=1)
        if plan.segments == 1:
            return plan, state
        target = SelectionState(state.sel, state.rows, state.device, state.params.noise_row_offset, self.kernels,
                                copies=plan.segments)
        target.rescored = state.rescored
        return plan, target

    def _merge_segments(self, state: SelectionState, target: SelectionState) -> SelectionState:
        """Folds the segment copies of `target` into `state` (exact: their candidates are disjoint)."""
        if target is not state:
            for s in range(target.st_score.shape[0] // target.rows):
                self.kernels.merge(state.params, target.copy_params(s), state.st_count)
        return state

    def run_certified(self, queries: torch.Tensor, candidates: torch.Tensor, state: SelectionState, metric: str,
                      block_size: int, col_offset: int = 0) -> SelectionState:
        """Certified path (settings.cuda_certified, docs/certified.md): blocks of the screening product
        (``screen_product``: the float32 GEMM, or the 16-bit tensor-core GEMM for 16-bit inputs), shaped
        and segmented as the two-pass path's, each merged by the CUDA screen kernel, which rescores
        canonically what the product's bound cannot rule out. Same results as the CPU, bit for bit. Extra
        memory: one score block, one prepared candidate block (with its canonical norms and bound
        factors) and the segment copies of the state."""
        b, n = queries.shape[0], candidates.shape[0]
        if b == 0 or n == 0 or state.sel.k == 0:
            return state
        facts = self.kernels.device_facts(queries.device)
        row_bytes = state.capacity * (24 if state.sel.sampling != "top" else 16) + 16
        product = screen_product(queries.dtype, metric, queries.shape[1], queries.device, self.kernels)
        plan = plan_blocks(b, n, block_size, facts.multiprocessors, facts.l2_bytes, row_bytes,
                           product.out_dtype.itemsize)
        plan, target = self._segmented(state, plan, whole=b == state.rows)
        for blk in score_blocks(queries, candidates, product, plan.block_rows, plan.block_cols, packed=True):
            target.offer_screened(blk, col_offset + blk.j0, plan.segments)
        return self._merge_segments(state, target)

    def launch_fused(self, f: Any, like: torch.Tensor) -> None:
        """The fused score kernel over one FusedBlock."""
        self.kernels.fused_scores(f, like)

    def rescore_fused(self, f: Any, like: torch.Tensor) -> None:
        """Exact rescoring of one launch's fp32 candidate lists."""
        self.kernels.rescore_candidates(f, like)

    @staticmethod
    def _overflowed_runs(counts: torch.Tensor, cap: int) -> list[tuple[int, int]]:
        """Row ranges to redo on the two-pass path after a fused launch: the REDO_TILE-row tiles holding a
        row whose list overflowed (count > cap), merged into maximal runs. Every row of those tiles gets
        count cap + 1 (in place), so the offer of the lists skips them. One host sync."""
        b = counts.shape[0]
        over = counts > cap
        tiles = math.ceil(b / REDO_TILE)
        padded = torch.zeros(tiles * REDO_TILE, dtype=torch.bool, device=counts.device)
        padded[:b] = over
        tile_over = padded.view(tiles, REDO_TILE).any(dim=1)
        hit = tile_over.nonzero().flatten().tolist()
        if not hit:
            return []
        counts.masked_fill_(tile_over.repeat_interleave(REDO_TILE)[:b], cap + 1)
        runs: list[tuple[int, int]] = []
        for t in hit:
            if runs and runs[-1][1] == t * REDO_TILE:
                runs[-1] = (runs[-1][0], min(b, (t + 1) * REDO_TILE))
            else:
                runs.append((t * REDO_TILE, min(b, (t + 1) * REDO_TILE)))
        return runs

    def run_fused(self, queries: torch.Tensor, candidates: torch.Tensor, state: SelectionState, metric: str,
                  block_size: int, col_offset: int) -> SelectionState:
        """Fused path: the first cuda_fused_seed_cols candidates through the two-pass path (thresholds),
        then chunks of doubling width (at most max_fused_cols) through the fused kernel, whose per-row
        candidate lists are offered to the state. Where some row's list overflowed, the REDO_TILE-row tiles
        holding such rows take that chunk on the two-pass path instead and every other row's list is
        offered (one host sync per chunk decides), so the state is always exact; after
        a wgmma stall the rest goes two-pass and the fused path stays off on the device. 16-bit inputs: scores are fp32
        accumulations of exact products, equal to the two-pass path's up to summation order. fp32
        inputs: the kernel keeps every candidate whose tf32 score is within the proven error slack of
        the row's bounds, and the survivors are rescored exactly (double sums) before they are offered,
        so no candidate the exact scores would take is lost. Extra memory: (B, 4 capacity + 64)
        candidate lists, O(B + N) norms and scales, and the two-pass path's block for the seed."""
        b, n = queries.shape[0], candidates.shape[0]
        q, c = queries.contiguous(), candidates.contiguous()
        done = min(n, max(_settings.current().cuda_fused_seed_cols, 4 * state.capacity))
        self.run_two_pass(q, c[:done], state, metric, block_size, col_offset)
        if done == n:
            return state
        ops = FusedOperands.build(q, c, metric, self.error_factor(q.shape[1]))
        cap = list_capacity(state.capacity)
        dev = q.device
        lo, hi = torch.empty(b, dtype=torch.float32, device=dev), torch.empty(b, dtype=torch.float32, device=dev)
        lists = (
            torch.empty((b, cap), dtype=torch.float32, device=dev),
            torch.empty((b, cap), dtype=torch.int32, device=dev),
            torch.empty(b, dtype=torch.int32, device=dev),
        )
        while done < n:
            width = min(n - done, done, self.max_fused_cols)
            self.kernels.row_bounds(state.params, lo, hi)
            lists[2].zero_()
            f = fused_block(q, c, ops, done, done + width, lo, hi, lists)
            self.launch_fused(f, q)
            runs = self._overflowed_runs(lists[2], cap)
            if runs == [(0, b)] and self.kernels.fused_stalled(dev):
                # A stalled wgmma launch reports every row overflowed; only then is the flag read.
                self._after_stall(dev)
                self.run_two_pass(q, c[done:], state, metric, block_size, col_offset + done)
                return state
            # Rows of the tiles redone below are marked overflowed too, so their lists are not offered.
            if ops.row_slack is not None:
                self.rescore_fused(f, q)
            self.kernels.offer_candidates(state.params, lists[0], lists[1], lists[2], col_offset + done)
            for r0, r1 in runs:
                self.run_two_pass(q[r0:r1], c[done:done + width], state, metric, block_size, col_offset + done,
                                  row_offset=r0)
            done += width
        return state
