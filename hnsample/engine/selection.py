"""What a selection is and the running state it is computed in.

:func:`build_selection` turns the public filter and sampling arguments (``topk_similarity``,
``topk_from_scores``, mining, the miners) into a validated :class:`Selection`; :class:`SelectionState`
holds the per-row state the kernels merge score blocks into, on one device, through that device's
kernels (:class:`CpuKernels`, :class:`CudaKernels`). The state's layout (mode, slots per row) is derived
in C++ (``_C.TopkParams.configure``) and every launcher checks the parameters it gets.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Callable
from functools import cache
from typing import Any

import torch

from .. import _C
from .. import settings as _settings
from .._ext import DTYPE_CODES, as_tensor, check_finite, check_ids, check_int, check_labels, dtype_code, ptr
from . import registry

METRICS = ("dot", "cosine")
SAMPLINGS = tuple(_C.Sampling.__members__)  # ("top", "uniform", "softmax")
SEED_LIMIT = 1 << 64
FLOAT32_CODE = DTYPE_CODES[torch.float32]  # the dtype code of the select launcher's scales (Python checks them)


# ----------------------------------------------------------------------------------------------------
# Kernels of one device type. The CUDA ones take a module with the compiled launchers (hnsample._C, or
# the test emulator's module) and know the device's facts; a test injects its own by passing them.


class CpuKernels:
    """The CPU launchers of ``hnsample._C`` (threads: settings.cpu_threads or torch's count)."""

    cuda = False

    def __init__(self, module: Any = _C):
        self.module = module

    def threads(self) -> int:
        return _settings.current().cpu_threads or max(1, torch.get_num_threads())

    def stream(self, t: torch.Tensor) -> int:
        return 0

    def select_block(self, params: Any, block: torch.Tensor, row_offset: int, col_offset: int) -> None:
        """Merges a (rows, cols) score block (any float dtype and strides) into the state: rows are state
        rows [row_offset, ...), columns candidate ids [col_offset, ...)."""
        self.module.topk_select_block(
            params, block.data_ptr(), dtype_code(block), block.shape[0], block.shape[1], block.stride(0),
            block.stride(1), row_offset, col_offset, self.cuda, self.stream(block), self.threads())

    def filter_counts(self, params: Any, block: torch.Tensor, row_offset: int, col_offset: int,
                      counts: torch.Tensor) -> None:
        """Adds to counts (int64 (B, 5)) the candidates of a score block each score filter removes."""
        self.module.topk_filter_counts(
            params, block.data_ptr(), dtype_code(block), block.shape[0], block.shape[1], block.stride(0),
            block.stride(1), row_offset, col_offset, ptr(counts), self.cuda, self.stream(block), self.threads())

    def screen_block(self, params: Any, screen: Any, like: torch.Tensor, segments: int = 1) -> None:
        """Merges a ScreenBlock (engine.certify) into the state, on the stream of `like` (the approximate
        scores). segments > 1 (CUDA): as select_block's, column range s feeding state copy s."""
        if segments > 1:
            self.module.topk_screen_block_segments(params, screen, segments, self.stream(like))
        else:
            self.module.topk_screen_block(params, screen, self.cuda, self.stream(like), self.threads())

    def screen_filter_counts(self, params: Any, screen: Any, counts: torch.Tensor) -> None:
        self.module.topk_screen_filter_counts(params, screen, ptr(counts), self.threads(), self.cuda,
                                              self.stream(counts))

    @staticmethod
    def matmul_f32(q: torch.Tensor, c: torch.Tensor, out: torch.Tensor) -> None:
        """out = q c^T with float32 accumulation and output for 16-bit q, c (engine.certify's "mixed"
        product): here torch's float32 GEMM of the exactly converted rows."""
        torch.matmul(q.float(), c.float().T, out=out)

    def finalize(self, params: Any, out_scores: torch.Tensor, out_indices: torch.Tensor) -> None:
        self.module.topk_finalize(params, ptr(out_scores), ptr(out_indices), self.cuda, self.stream(out_scores),
                                  self.threads())

    def merge(self, params: Any, other: Any, like: torch.Tensor) -> None:
        self.module.topk_merge(params, other, self.cuda, self.stream(like), self.threads())

    def row_bounds(self, params: Any, lo: torch.Tensor, hi: torch.Tensor) -> None:
        self.module.topk_row_bounds(params, ptr(lo), ptr(hi), self.cuda, self.stream(lo), self.threads())

    def offer_candidates(self, params: Any, scores: torch.Tensor, cols: torch.Tensor, counts: torch.Tensor,
                         col_offset: int) -> None:
        """Offers per-row candidate lists ((B, cap) float32 scores and int32 columns, (B,) int32 counts)."""
        self.module.topk_offer_candidates(params, ptr(scores), ptr(cols), ptr(counts), scores.shape[1], col_offset,
                                          self.cuda, self.stream(scores), self.threads())

    def rescore_candidates(self, block: Any, like: torch.Tensor) -> None:
        self.module.topk_rescore_candidates(block, self.cuda, self.stream(like), self.threads())

    def info_nce_block(self, params: Any, backward: bool, out: torch.Tensor, guide: torch.Tensor | None,
                       row_offset: int, col_offset: int) -> None:
        """Forward: folds a score block into the InfoNCE statistics. Backward: turns it into dL/ds."""
        if guide is not None and guide.dtype != out.dtype:
            # PairBlock carries one dtype code: the kernels read the guide block in the scores' dtype.
            raise TypeError(f"info_nce_block: guide block dtype {guide.dtype} differs from the scores' {out.dtype}")
        self.module.info_nce_block(
            params, backward, out.data_ptr(), ptr(guide), dtype_code(out), out.shape[0], out.shape[1],
            out.stride(0), out.stride(1), guide.stride(0) if guide is not None else 0,
            guide.stride(1) if guide is not None else 0, row_offset, col_offset, self.cuda, self.stream(out),
            self.threads())


@dataclasses.dataclass(frozen=True)
class DeviceFacts:
    """What the CUDA driver plans with: multiprocessors and L2 bytes of a device."""

    multiprocessors: int
    l2_bytes: int


class CudaKernels(CpuKernels):
    """The CUDA launchers (of ``hnsample._C`` unless another module is given), on the current stream of
    the tensors' device."""

    cuda = True

    def threads(self) -> int:
        return 1

    def stream(self, t: torch.Tensor) -> int:
        return torch.cuda.current_stream(t.device).cuda_stream

    def select_block(self, params: Any, block: torch.Tensor, row_offset: int, col_offset: int,
                     segments: int = 1, row_scale: torch.Tensor | None = None,
                     col_scale: torch.Tensor | None = None, stream: int | None = None) -> None:
        """As on the CPU; with segments > 1 the columns are split into that many ranges, range s feeding
        the state copy s * B rows past params' state (a [segments, B, capacity] state).

        row_scale (rows,) and col_scale (cols,): float32 cosine scales on the block's device, both or
        neither. With them the block holds raw products and the kernel selects on
        s = (block[r, c] * row_scale[r]) * col_scale[c], computed in float32 in that order (float64 for a
        float64 block): bit for bit the scores of ``block.mul_(row_scale[:, None]).mul_(col_scale[None, :])``
        on a float32 block, without the two passes over it. stream: the CUDA stream handle to launch on
        (default: the current stream of the block's device; a block loop looks it up once)."""
        rows, cols = block.shape
        if rows == 0 or cols == 0:
            return
        # One block's host time matters here (about a thousand blocks per call): attribute reads are
        # batched (shape, stride()) and the scale checks use the cheapest tensor queries.
        row_stride, col_stride = block.stride()
        device = (block.is_cuda, block.get_device())
        self.module.topk_select_block_segments(
            params, block.data_ptr(), DTYPE_CODES[block.dtype], rows, cols, row_stride, col_stride, row_offset,
            col_offset, segments, self.stream(block) if stream is None else stream,
            _scale_ptr("row_scale", row_scale, rows, device), _scale_ptr("col_scale", col_scale, cols, device),
            FLOAT32_CODE)

    def fused_scores(self, block: Any, like: torch.Tensor) -> None:
        self.module.topk_fused_scores(block, self.stream(like))

    def fused_supported(self, device: torch.device) -> bool:
        return bool(self.module.topk_fused_supported(device.index or 0))

    def fused_stalled(self, device: torch.device) -> bool:
        """Whether a wgmma launch on the device gave up waiting for its copies (the sticky device flag of
        csrc/cuda/topk_fused_sm90.cu): from then on every wgmma launch there reports all rows overflowed."""
        return bool(self.module.topk_fused_wgmma_stalled(device.index or 0))

    def clear_fused_stall(self, device: torch.device) -> None:
        self.module.topk_fused_wgmma_clear_stall(device.index or 0)

    def device_facts(self, device: torch.device) -> DeviceFacts:
        return _device_facts(device.index or 0)

    def mm_out_dtype_supported(self, device: torch.device, dtype: torch.dtype) -> bool:
        return _mm_out_dtype_supported(device.index or 0, dtype)

    @staticmethod
    def matmul_f32(q: torch.Tensor, c: torch.Tensor, out: torch.Tensor) -> None:
        """out = q c^T of 16-bit rows on the tensor cores, float32 accumulation and output."""
        torch.mm(q, c.T, out_dtype=torch.float32, out=out)


def _scale_ptr(name: str, scale: torch.Tensor | None, n: int, device: tuple[bool, int]) -> int:
    """The data pointer of a block's per-row or per-column scales (0 for None) after the checks the
    launcher cannot make: a contiguous 1-D float32 tensor of n elements on the block's device, given as
    (is_cuda, get_device()). (The launcher checks the pair and the alignment.)"""
    if scale is None:
        return 0
    if scale.ndim != 1 or scale.numel() != n or not scale.is_contiguous():
        raise ValueError(f"{name} must be a 1-D tensor of {n} elements with unit stride, got shape "
                         f"{tuple(scale.shape)}, strides {scale.stride()}")
    if scale.dtype is not torch.float32:
        raise TypeError(f"{name} must be float32, got {scale.dtype}")
    if (scale.is_cuda, scale.get_device()) != device:
        raise ValueError(f"{name} must be on the block's device, got {scale.device}")
    return scale.data_ptr()


@cache
def _device_facts(index: int) -> DeviceFacts:
    props = torch.cuda.get_device_properties(index)
    l2 = int(getattr(props, "L2_cache_size", 0) or 0) or (40 << 20)
    return DeviceFacts(int(props.multi_processor_count), l2)


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


CPU_KERNELS = CpuKernels()
CUDA_KERNELS = CudaKernels()


def kernels_for(device: torch.device) -> CpuKernels:
    """The kernels of the backend serving this device type (see hnsample.engine.registry)."""
    return registry.get(device.type).kernels


# ----------------------------------------------------------------------------------------------------
# The selection


@dataclasses.dataclass
class Selection:
    """Validated selection arguments, in the form the kernels take (see :func:`build_selection`)."""

    k: int
    banned: torch.Tensor | None  # (B, E) int64, sorted ascending per row (positives and exclude)
    query_labels: torch.Tensor | None  # (B,) int64
    candidate_labels: torch.Tensor | None  # (N,) int64
    upper: torch.Tensor | None  # (B,) float64: eligible iff s <= upper (the margins)
    min_score: float
    max_score: float
    skip_top: int
    pool: int  # -1: unbounded
    sampling: str
    temperature: float
    seed: int

    def on(self, device: torch.device) -> Selection:
        """This selection with its tensors on `device`."""
        def move(t):
            return None if t is None else t.to(device)

        return dataclasses.replace(self, banned=move(self.banned), query_labels=move(self.query_labels),
                                   candidate_labels=move(self.candidate_labels), upper=move(self.upper))


def draw_seed(seed: Any, generator: torch.Generator | None) -> int:
    """The 64-bit key of the sampling noise. ``seed`` if given: an int in [0, 2**64) is the key itself;
    any other int (negative, or 2**64 and beyond) is mapped to one by the first 8 bytes of the SHA-256 of
    its decimal digits, so distinct seeds give distinct samples (up to 2**-64 odds of a collision). Without
    a seed, one is drawn from ``generator`` (torch's default generator when None) in [0, 2**62)."""
    if seed is not None:
        s = check_int("seed", seed)
        if 0 <= s < SEED_LIMIT:
            return s
        return int.from_bytes(hashlib.sha256(str(s).encode()).digest()[:8], "little")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 1 << 62, (1,), generator=generator, device=device).item())


def positive_score(values: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, has_p): p_i = the minimum of values[i] over the row's valid positives in float64 (NaN if one
    of them is NaN, +inf for a row without any), has_p_i = the row has a valid positive."""
    vals = values.to(torch.float64)
    p = torch.where(valid, vals, torch.full_like(vals, math.inf)).amin(dim=1)
    p = torch.where((vals.isnan() & valid).any(dim=1), torch.full_like(p, math.nan), p)
    return p, valid.any(dim=1)


def margin_bound(p: torch.Tensor, has_p: torch.Tensor, absolute_margin: float | None,
                 relative_margin: float | None) -> torch.Tensor:
    """The per-row score bound of the margin filters: min(p - absolute_margin, p - |p| relative_margin)
    over the margins given, +inf for rows without a positive score (float64, (B,))."""
    upper = torch.full_like(p, math.inf)
    if absolute_margin is not None:
        upper = torch.minimum(upper, p - absolute_margin)
    if relative_margin is not None:
        upper = torch.minimum(upper, p - p.abs() * relative_margin)
    return torch.where(has_p, upper, torch.full_like(upper, math.inf)).contiguous()


def build_selection(
    rows: int, n: int, device: torch.device, k: Any, *, positives: Any = None, exclude: Any = None,
    query_labels: Any = None, candidate_labels: Any = None, positive_scores: Any = None,
    absolute_margin: Any = None, relative_margin: Any = None, min_score: Any = None, max_score: Any = None,
    skip_top: Any = 0, pool: Any = None, sampling: Any = "top", temperature: Any = 1.0,
    generator: torch.Generator | None = None, seed: Any = None,
    positive_values: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Selection:
    """Validates every filter and sampling argument (ValueError / TypeError naming it) and builds the
    kernels' Selection for `rows` queries over `n` candidates on `device`.

    positive_values(pos) -> (B, P) float scores s_{i, pos[i, p]} for the given (B, P) ids (clamped to
    valid ids); it is called only when a margin filter needs p_i and positive_scores is not given.
    """
    compiling = torch.compiler.is_compiling()
    k = check_int("k", k, 0)
    skip_top = check_int("skip_top", skip_top, 0)
    pool = -1 if pool is None else check_int("pool", pool, 1)
    if not isinstance(sampling, str) or sampling not in SAMPLINGS:
        raise ValueError(f"sampling must be one of {sorted(SAMPLINGS)}, got {sampling!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    # The kernels scale by 1 / temperature: a subnormal temperature makes that inf and 0 * inf = NaN keys.
    if not (math.isfinite(temperature) and temperature > 0 and math.isfinite(1.0 / temperature)):
        raise ValueError(
            f"temperature must be finite and > 0 (and 1 / temperature finite), got {temperature}")
    absolute_margin = check_finite("absolute_margin", absolute_margin)
    relative_margin = check_finite("relative_margin", relative_margin)
    lo = check_finite("min_score", min_score)
    hi = check_finite("max_score", max_score)

    def ids(name, x):
        if x is None:
            return None
        if compiling:
            return as_tensor(name, x).reshape(rows, -1).to(torch.int64)
        return check_ids(name, x, rows, device, n)

    positives = ids("positives", positives)
    exclude = ids("exclude", exclude)
    if (query_labels is None) != (candidate_labels is None):
        raise ValueError("query_labels and candidate_labels must be given together")
    if query_labels is not None:
        query_labels = check_labels("query_labels", query_labels, rows, device)
        candidate_labels = check_labels("candidate_labels", candidate_labels, n, device)

    banned_parts = [t for t in (positives, exclude) if t is not None and t.shape[1] > 0]
    banned = torch.sort(torch.cat(banned_parts, dim=1), dim=1).values.contiguous() if banned_parts else None

    upper = None
    if absolute_margin is not None or relative_margin is not None:
        if positive_scores is not None:
            ps = as_tensor("positive_scores", positive_scores)
            if ps.ndim != 1 or ps.shape[0] != rows:
                raise ValueError(f"positive_scores must have shape ({rows},), got {tuple(ps.shape)}")
            if not ps.is_floating_point():
                raise TypeError(f"positive_scores must be a float tensor, got {ps.dtype}")
            if ps.device != device:
                raise ValueError(f"positive_scores must be on {device}, got {ps.device}")
            p, has_p = ps.to(torch.float64), torch.ones(rows, dtype=torch.bool, device=device)
        elif positives is not None and positives.shape[1] > 0 and n > 0:
            # With n == 0 every id is padding and there is no score to gather.
            p, has_p = positive_score(positive_values(positives.clamp_min(0)), positives >= 0)
        else:
            p = torch.zeros(rows, dtype=torch.float64, device=device)
            has_p = torch.zeros(rows, dtype=torch.bool, device=device)
        upper = margin_bound(p, has_p, absolute_margin, relative_margin)
    elif positive_scores is not None:
        as_tensor("positive_scores", positive_scores)  # type check only: no margin uses it

    seed_value = 0 if sampling == "top" else draw_seed(seed, generator)
    lo = -math.inf if lo is None else lo
    hi = math.inf if hi is None else hi
    # The state holds skip_top + k slots per row (skip_top + pool when sampling from a bounded pool), so
    # it must not be sized by what n candidates can never fill. A window reaching past the last of n
    # candidates selects exactly what the unbounded window does, and with skip_top >= n nothing is
    # ever selected, which an empty score interval expresses with a state of k slots.
    if pool >= 0 and skip_top + pool >= n:
        pool = -1
    if skip_top >= n:
        skip_top, lo, hi = 0, math.inf, -math.inf
    return Selection(k, banned, query_labels, candidate_labels, upper, lo, hi, skip_top, pool, sampling,
                     float(temperature), seed_value)


# ----------------------------------------------------------------------------------------------------
# The running state


def screen_block(block: Any, col_offset: int) -> Any:
    """The kernels' ScreenBlock of an engine.blocks.Block of screening operands (the tensors it points
    into are the block's, alive as long as it is)."""
    q, c, approx = block.queries, block.candidates, block.scores
    s = _C.ScreenBlock()
    s.set_approx(approx.data_ptr(), dtype_code(approx), approx.shape[0], approx.shape[1], approx.stride(0),
                 approx.stride(1), block.i0, col_offset)
    s.row_a, s.row_e, s.row_g = ptr(q.first), ptr(q.second), ptr(q.floor)
    s.col_b, s.col_f, s.col_h = ptr(c.first), ptr(c.second), ptr(c.floor)
    s.rel = block.rel
    s.queries, s.q_stride, s.candidates, s.c_stride = ptr(q.raw), q.raw.stride(0), ptr(c.raw), c.raw.stride(0)
    s.dtype, s.dim = dtype_code(q.raw), q.raw.shape[1]
    s.q_norms, s.c_norms = ptr(q.norms), ptr(c.norms)
    return s


# Deferred rescoring (ScreenedPass): a row's list holds DEFER_SLOTS_PER_CAPACITY capacity +
# DEFER_EXTRA_SLOTS waiting survivors (a full list is pruned; survivors that still find no room are
# rescored in their block); states whose lists would take more than DEFER_MAX_BYTES rescore every survivor
# in its block instead.
DEFER_SLOTS_PER_CAPACITY = 4
DEFER_EXTRA_SLOTS = 64
DEFER_MAX_BYTES = 256 << 20


class SelectionState:
    """Running per-row top-k state on one device: ``offer`` score blocks, ``merge`` states over other
    candidates, then ``finalize``.

    Memory: (B, capacity) float64 scores and int64 ids (plus float64 keys when sampling), where capacity
    = skip_top + k, or skip_top + pool for sampling from a bounded pool (``_C.state_layout``).
    noise_row_offset: the global query id of state row 0 (the sampling noise is keyed by it).
    """

    def __init__(self, sel: Selection, rows: int, device: torch.device, noise_row_offset: int = 0,
                 kernels: CpuKernels | None = None, copies: int = 1):
        self.sel, self.device, self.rows = sel, torch.device(device), rows
        self.kernels = kernels if kernels is not None else kernels_for(self.device)
        p = _C.TopkParams()
        p.configure(rows, sel.k, sel.skip_top, sel.pool, _C.Sampling.__members__[sel.sampling])
        p.inv_temperature, p.seed, p.noise_row_offset = 1.0 / sel.temperature, sel.seed, noise_row_offset
        p.min_score, p.max_score = sel.min_score, sel.max_score
        p.upper = ptr(sel.upper)
        if sel.banned is not None and sel.banned.shape[1] > 0:
            p.banned, p.banned_stride, p.banned_cols = ptr(sel.banned), sel.banned.stride(0), sel.banned.shape[1]
        if sel.query_labels is not None and sel.candidate_labels is not None:
            p.query_labels, p.candidate_labels = ptr(sel.query_labels), ptr(sel.candidate_labels)
        # `copies` stacked states of `rows` rows each (the CUDA driver's column segments); params points
        # at the first, state_copy(s) at the others.
        shape = (copies * rows, p.capacity)
        self.st_score = torch.empty(shape, dtype=torch.float64, device=self.device)
        self.st_index = torch.empty(shape, dtype=torch.int64, device=self.device)
        keyed = sel.sampling != "top"
        self.st_key = torch.empty(shape if keyed else (0,), dtype=torch.float64, device=self.device)
        self.st_count = torch.zeros((copies * rows, 2), dtype=torch.int64, device=self.device)
        self.params = self._params_at(p, 0)
        # (B,) int64: canonical rescorings per row of screened blocks, when a caller wants the statistic.
        self.rescored: torch.Tensor | None = None
        self._deferred: tuple[torch.Tensor, ...] | None = None  # ScreenedPass's lists, made on first use

    def _params_at(self, p: Any, row0: int) -> Any:
        """p with its state pointers at row `row0` of the stacked state tensors."""
        out = p.copy()
        at = slice(row0, row0 + self.rows)
        out.st_score, out.st_index = ptr(self.st_score[at]), ptr(self.st_index[at])
        out.st_key, out.st_count = ptr(self.st_key[at]), ptr(self.st_count[at])
        return out

    def copy_params(self, copy: int) -> Any:
        """The params of stacked state copy `copy` (0 is ``params``)."""
        return self._params_at(self.params, copy * self.rows)

    @property
    def capacity(self) -> int:
        return int(self.params.capacity)

    def tensors(self) -> list[torch.Tensor]:
        """The state's tensors (scores, ids, keys, counts), e.g. to send them to another device or rank."""
        return [self.st_score, self.st_index, self.st_key, self.st_count]

    def load(self, tensors: list[torch.Tensor]) -> SelectionState:
        """Overwrites this state with another's tensors (same selection and rows); returns self."""
        for dst, src in zip(self.tensors(), tensors, strict=True):
            dst.copy_(src)
        return self

    def offer(self, block: torch.Tensor, row_offset: int, col_offset: int) -> None:
        """Merges a (rows, cols) block of scores for state rows [row_offset, ...) and global candidate
        ids [col_offset, ...) into the state. Any float dtype and strides."""
        if block.numel() == 0:
            return
        self.kernels.select_block(self.params, block, row_offset, col_offset)

    def offer_screened(self, block: Any, col_offset: int, segments: int = 1, defer: bool = False) -> None:
        """Merges a block of a screening product (engine.certify): only candidates its error bound cannot
        rule out are rescored canonically and offered. block: an engine.blocks.Block of ScreenOperands.
        segments > 1 (CUDA, a state of that many copies): column range s of the block feeds copy s.
        defer: survivors wait in the deferred lists (``deferred_lists``) for ``flush_deferred``."""
        if block.scores.numel():
            screen = screen_block(block, col_offset)
            screen.rescored = ptr(self.rescored)
            if self.kernels.cuda:
                screen.col_max = ptr(block.candidates.maxima())
            if defer:
                self._point_at_deferred(screen)
            self.kernels.screen_block(self.params, screen, block.scores, segments)

    def deferred_lists(self) -> tuple[torch.Tensor, ...] | None:
        """The per-row lists of deferred rescoring (csrc/cpu/topk_screen.cpp), made on first use: ids
        (B, S) int64, upper bounds (B, S) float32, counts (B,) int64, the heap of lower bounds
        (B, capacity) float64 and its counts (B,) int64, with S = DEFER_SLOTS_PER_CAPACITY capacity +
        DEFER_EXTRA_SLOTS (at least 1). None where deferral does not apply: the CUDA kernels, stream
        sampling, capacity 0, or lists that would take more than DEFER_MAX_BYTES."""
        if self._deferred is None:
            cap, rows = self.capacity, self.rows
            slots = max(1, DEFER_SLOTS_PER_CAPACITY * cap + DEFER_EXTRA_SLOTS)
            fits = rows * (slots * 12 + cap * 8 + 16) <= DEFER_MAX_BYTES
            if self.kernels.cuda or self.params.mode != _C.SelectMode.window or cap == 0 or not fits:
                self._deferred = ()
            else:
                self._deferred = (
                    torch.empty((rows, slots), dtype=torch.int64), torch.empty((rows, slots), dtype=torch.float32),
                    torch.zeros(rows, dtype=torch.int64), torch.empty((rows, cap), dtype=torch.float64),
                    torch.zeros(rows, dtype=torch.int64))
        return self._deferred or None

    def _point_at_deferred(self, screen: Any) -> None:
        ids, upper, count, lower, lower_count = self.deferred_lists()
        screen.defer_slots = ids.shape[1]
        screen.defer_ids, screen.defer_upper, screen.defer_count = ptr(ids), ptr(upper), ptr(count)
        screen.defer_lower, screen.defer_lower_count = ptr(lower), ptr(lower_count)

    def flush_deferred(self, queries: Any, row_offset: int, table: torch.Tensor) -> None:
        """Rescores and offers the deferred survivors of state rows [row_offset, + len(queries.raw)) and
        empties their lists. queries: the rows' ScreenOperand; table: int64 (blocks, 5) rows (first id,
        rows, rows address, row stride, norms address or 0) of the candidate blocks the survivors came
        from (ScreenedPass.finish)."""
        s = _C.ScreenBlock()
        s.set_approx(0, DTYPE_CODES[torch.float32], queries.raw.shape[0], 0, 0, 1, row_offset, 0)
        s.queries, s.q_stride = ptr(queries.raw), queries.raw.stride(0)
        s.dtype, s.dim, s.q_norms = dtype_code(queries.raw), queries.raw.shape[1], ptr(queries.norms)
        s.rescored = ptr(self.rescored)
        self._point_at_deferred(s)
        self.kernels.module.topk_screen_flush(self.params, s, ptr(table), table.shape[0], self.kernels.threads())

    def clear_deferred(self) -> None:
        """Drops every deferred survivor unrescored (a pass that did not finish)."""
        lists = self.deferred_lists()
        if lists is not None:
            _, _, count, _, lower_count = lists
            count.zero_()
            lower_count.zero_()

    def count_filters(self, block: Any, col_offset: int, counts: torch.Tensor) -> None:
        """Adds to counts (int64 (B, 5)) what each score filter of this selection removes from a block
        (an engine.blocks.Block, exact or screened): labels, NaN,
        min_score, max_score, margin, each candidate under the first it fails (banned ids are skipped: the
        caller counts them from the id lists), by the kernels' own eligibility rule."""
        if not block.scores.numel():
            return
        if block.rel is None:
            self.kernels.filter_counts(self.params, block.scores, block.i0, col_offset, counts)
        else:
            self.kernels.screen_filter_counts(self.params, screen_block(block, col_offset), counts)

    def merge(self, other: SelectionState) -> None:
        """Folds another state built over a disjoint set of candidates into this one (exact)."""
        self.kernels.merge(self.params, other.params, self.st_count)

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores float64 (B, k), indices int64 (B, k)), best first; consumes the state."""
        out_s = torch.empty((self.rows, self.sel.k), dtype=torch.float64, device=self.device)
        out_j = torch.empty((self.rows, self.sel.k), dtype=torch.int64, device=self.device)
        if self.rows and self.sel.k:
            self.kernels.finalize(self.params, out_s, out_j)
        return out_s, out_j


class ScreenedPass:
    """One pass of screened blocks (engine.certify) over a set of candidates into a SelectionState.
    On the CPU, for window selections, a row's survivors wait across the pass and are rescored once at its
    end (csrc/cpu/topk_screen.cpp): most candidates that would enter a running top-k only to be evicted by
    a later block are never rescored. The result is the same either way (every selection is exact).

    ``offer`` each block, then ``finish`` while the candidates are alive; the pass keeps the blocks' raw
    rows and norms (views of the inputs, or their copies) until then. As a context manager it finishes
    on success and drops the waiting survivors on an exception (the state is then incomplete anyway)::

        with ScreenedPass(state) as screened:
            for blk in score_blocks(...):
                screened.offer(blk, col_offset + blk.j0)
    """

    def __init__(self, state: SelectionState):
        self.state = state
        self.active = state.deferred_lists() is not None
        self._cols: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}  # first global id -> (raw, norms)
        self._rows: dict[int, Any] = {}  # first state row -> the rows' query operand

    def offer(self, block: Any, col_offset: int) -> None:
        """Offers a Block of ScreenOperands whose first candidate has global id col_offset."""
        self.state.offer_screened(block, col_offset, defer=self.active)
        if self.active and block.scores.numel():
            c = block.candidates
            self._cols.setdefault(col_offset, (c.raw, c.norms))
            self._rows.setdefault(block.i0, block.queries)

    def finish(self) -> None:
        """Rescores and offers every waiting survivor; the state is then complete for this pass."""
        if self._cols:
            # A one-row block's stride is never used (it may be anything, e.g. 0 for an expanded row).
            table = torch.tensor([[j0, raw.shape[0], ptr(raw), raw.stride(0) if raw.shape[0] > 1 else raw.shape[1],
                                   ptr(norms)] for j0, (raw, norms) in sorted(self._cols.items())], dtype=torch.int64)
            for i0, queries in self._rows.items():
                self.state.flush_deferred(queries, i0, table)
        self._cols.clear()
        self._rows.clear()

    def __enter__(self) -> ScreenedPass:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        if exc_type is None:
            self.finish()
            return
        if self.active:
            self.state.clear_deferred()
        self._cols.clear()
        self._rows.clear()
