"""Fused top-k similarity with hard-negative filters and sampling.

Registered as ``hnsample::topk_similarity`` and ``hnsample::topk_from_scores`` (torch.library custom
ops with fake and autograd implementations), exposed as :func:`topk_similarity` and
:func:`topk_from_scores`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from .. import _C
from .._ext import (
    as_tensor,
    check_finite,
    check_float_matrix,
    check_ids,
    check_int,
    check_labels,
    dtype_code,
    num_threads,
    ptr,
    stream_of,
)

SAMPLING_CODES = {"top": 0, "uniform": 1, "softmax": 2}
METRICS = ("dot", "cosine")
MODE_WINDOW, MODE_STREAM = 0, 1
DEFAULT_BLOCK_SIZE = 1 << 22  # score elements per block: 16 MB of float32 workspace (stays in cache)


class TopK(NamedTuple):
    """Result of a top-k selection: ``scores`` float32 (B, k) (float64 for float64 inputs), sorted
    descending, padded with -inf; ``indices`` int64 (B, k) candidate ids, padded with -1."""

    scores: Any
    indices: Any


@dataclass
class Selection:
    """Validated selection arguments, in the form the kernels take."""

    k: int
    banned: torch.Tensor | None  # (B, E) int64, sorted ascending per row
    query_labels: torch.Tensor | None
    candidate_labels: torch.Tensor | None
    upper: torch.Tensor | None  # (B,) float64
    min_score: float
    max_score: float
    skip_top: int
    pool: int  # -1: unbounded
    sampling: int
    temperature: float
    seed: int


# ----------------------------------------------------------------------------------------------------
# Kernel driver: state allocation, blocks, finalize. Shared by both ops and by the mining pipeline.


def state_layout(k: int, skip_top: int, pool: int, sampling: int) -> tuple[int, int]:
    """(mode, capacity) of the per-row selection state."""
    if sampling == SAMPLING_CODES["top"]:
        window = k if pool < 0 else min(k, pool)
        return MODE_WINDOW, skip_top + window
    if pool < 0:
        return MODE_STREAM, skip_top + k
    return MODE_WINDOW, skip_top + pool


class SelectionState:
    """Running per-row top-k state on one device; ``offer`` score blocks, then ``finalize``.

    Memory: (B, capacity) float64 scores and int64 ids (plus float64 keys when sampling), where
    capacity = skip_top + k, or skip_top + pool for sampling from a bounded pool.
    """

    def __init__(self, sel: Selection, rows: int, device: torch.device, noise_row_offset: int = 0):
        self.sel = sel
        self.device = device
        mode, capacity = state_layout(sel.k, sel.skip_top, sel.pool, sel.sampling)
        self.st_score = torch.empty((rows, capacity), dtype=torch.float64, device=device)
        self.st_index = torch.empty((rows, capacity), dtype=torch.int64, device=device)
        self.st_key = torch.empty(
            (rows, capacity) if sel.sampling != 0 else (0,), dtype=torch.float64, device=device
        )
        self.st_count = torch.zeros((rows, 2), dtype=torch.int64, device=device)
        p = _C.TopkParams()
        p.num_rows, p.k, p.skip, p.pool, p.capacity, p.mode = rows, sel.k, sel.skip_top, sel.pool, capacity, mode
        p.sampling, p.inv_temperature, p.seed = sel.sampling, 1.0 / sel.temperature, sel.seed
        p.noise_row_offset = noise_row_offset
        p.min_score, p.max_score = sel.min_score, sel.max_score
        p.upper = ptr(sel.upper)
        if sel.banned is not None and sel.banned.shape[1] > 0:
            p.banned, p.banned_stride, p.banned_cols = ptr(sel.banned), sel.banned.stride(0), sel.banned.shape[1]
        if sel.query_labels is not None and sel.candidate_labels is not None:
            p.query_labels, p.candidate_labels = ptr(sel.query_labels), ptr(sel.candidate_labels)
        p.st_score, p.st_index, p.st_key, p.st_count = (
            ptr(self.st_score), ptr(self.st_index), ptr(self.st_key), ptr(self.st_count))
        self.params = p
        self.cuda = device.type == "cuda"

    def offer(self, block: torch.Tensor, row_offset: int, col_offset: int) -> None:
        """Merges a (rows, cols) block of scores for state rows [row_offset, ...) and global candidate
        ids [col_offset, ...) into the state. Any float dtype and strides."""
        if block.numel() == 0:
            return
        _C.topk_select_block(
            self.params, block.data_ptr(), dtype_code(block), block.shape[0], block.shape[1],
            block.stride(0), block.stride(1), row_offset, col_offset, self.cuda, stream_of(block),
            num_threads(),
        )

    def merge(self, other: SelectionState) -> None:
        """Folds another state built over a disjoint set of candidates into this one (exact)."""
        _C.topk_merge(self.params, other.params, self.cuda, stream_of(self.st_count), num_threads())

    def finalize(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(scores float64 (B, k), indices int64 (B, k)); consumes the state."""
        rows = self.st_count.shape[0]
        out_s = torch.empty((rows, self.sel.k), dtype=torch.float64, device=self.device)
        out_j = torch.empty((rows, self.sel.k), dtype=torch.int64, device=self.device)
        if rows and self.sel.k:
            _C.topk_finalize(self.params, ptr(out_s), ptr(out_j), self.cuda, stream_of(out_s), num_threads())
        return out_s, out_j


def block_shape(rows: int, cols: int, block_size: int) -> tuple[int, int]:
    """Row and column extent of a score block holding at most block_size elements."""
    br = max(1, min(rows, 1024, block_size))
    bc = max(1, min(cols, block_size // br))
    return br, bc


def prepare_rows(x: torch.Tensor, metric: str) -> torch.Tensor:
    """Rows in the compute dtype (float32, float64 for float64 input), unit-normalized for cosine."""
    ct = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = x.to(ct)
    if metric == "cosine":
        norm = torch.linalg.vector_norm(x, dim=1, keepdim=True)
        x = x / torch.where(norm > 0, norm, torch.ones_like(norm))
    return x


def run_similarity_selection(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    sel: Selection,
    metric: str,
    block_size: int,
    state: SelectionState | None = None,
    col_offset: int = 0,
    on_block: Callable[[torch.Tensor, int, int], None] | None = None,
) -> SelectionState:
    """Streams candidates in column blocks (outer loop, so each candidate block is read and converted
    once) and query row blocks (inner), offering each score block to the state. Extra memory: one
    score block and one converted candidate block.

    on_block(block, row_offset, global_col_offset), when given, sees every score block right after it
    is offered (the mining pipeline counts per-filter statistics there without a second matmul); CUDA
    inputs then take this generic block loop instead of the tuned CUDA driver."""
    if queries.device.type == "cuda" and on_block is None:
        from .topk_cuda import run_cuda_selection  # imports this module: resolved at call time

        return run_cuda_selection(queries, candidates, sel, metric, block_size, state, col_offset)
    b, n = queries.shape[0], candidates.shape[0]
    if state is None:
        state = SelectionState(sel, b, queries.device)
    if b == 0 or n == 0 or sel.k == 0:
        return state
    q = prepare_rows(queries, metric)
    br, bc = block_shape(b, n, block_size)
    buf = torch.empty((br, bc), dtype=q.dtype, device=q.device)
    for j0 in range(0, n, bc):
        j1 = min(n, j0 + bc)
        c = prepare_rows(candidates[j0:j1], metric)
        for i0 in range(0, b, br):
            i1 = min(b, i0 + br)
            out = buf[: i1 - i0, : j1 - j0]
            torch.matmul(q[i0:i1], c.T, out=out)
            state.offer(out, i0, col_offset + j0)
            if on_block is not None:
                on_block(out, i0, col_offset + j0)
    return state


# ----------------------------------------------------------------------------------------------------
# Custom ops


def _out_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _selection(k, banned, query_labels, candidate_labels, upper, min_score, max_score, skip_top, pool,
               sampling, temperature, seed) -> Selection:
    return Selection(k, banned, query_labels, candidate_labels, upper, min_score, max_score, skip_top, pool,
                     sampling, temperature, seed)


@torch.library.custom_op("hnsample::topk_similarity", mutates_args=())
def _topk_similarity_op(
    queries: torch.Tensor, candidates: torch.Tensor, k: int, metric: str,
    banned: torch.Tensor | None, query_labels: torch.Tensor | None, candidate_labels: torch.Tensor | None,
    upper: torch.Tensor | None, min_score: float, max_score: float, skip_top: int, pool: int,
    sampling: int, temperature: float, seed: int, block_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    sel = _selection(k, banned, query_labels, candidate_labels, upper, min_score, max_score, skip_top, pool,
                     sampling, temperature, seed)
    with torch.no_grad(), _device_guard(queries):
        state = run_similarity_selection(queries, candidates, sel, metric, block_size)
        scores, indices = state.finalize()
    return scores.to(_out_dtype(queries.dtype)), indices


@_topk_similarity_op.register_fake
def _(queries, candidates, k, metric, banned, query_labels, candidate_labels, upper, min_score, max_score,
      skip_top, pool, sampling, temperature, seed, block_size):
    b = queries.shape[0]
    return (queries.new_empty((b, k), dtype=_out_dtype(queries.dtype)),
            queries.new_empty((b, k), dtype=torch.int64))


def _similarity_setup(ctx, inputs, output):
    queries, candidates, _k, metric = inputs[:4]
    ctx.metric = metric
    ctx.save_for_backward(queries, candidates, output[1])


def _similarity_backward(ctx, grad_scores, _grad_indices):
    queries, candidates, indices = ctx.saved_tensors
    gq, gc = similarity_grads(queries, candidates, indices, grad_scores, ctx.metric)
    return (gq, gc) + (None,) * 14


def similarity_grads(queries: torch.Tensor, candidates: torch.Tensor, indices: torch.Tensor,
                     grad_scores: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the selected scores s_{i,idx[i,t]} with respect to queries and candidates.

    dot:    ds/dq = c,  ds/dc = q.
    cosine: ds/dq = (c^ - s q^) / |q|,  ds/dc = (q^ - s c^) / |c|   (zero for a zero vector).
    Padded entries (index -1) contribute nothing. Memory: (B, k, d), never (B, N).
    """
    ct = torch.float64 if queries.dtype == torch.float64 else torch.float32
    valid = indices >= 0
    g = torch.where(valid, grad_scores.to(ct), torch.zeros((), dtype=ct, device=grad_scores.device))
    idx = indices.clamp_min(0)
    q = queries.to(ct)
    c = candidates.to(ct)[idx]  # (B, k, d)
    if metric == "dot":
        gq = torch.einsum("bk,bkd->bd", g, c)
        contrib = g.unsqueeze(-1) * q.unsqueeze(1)
    else:
        qn = torch.linalg.vector_norm(q, dim=1, keepdim=True)  # (B, 1)
        cn = torch.linalg.vector_norm(c, dim=2, keepdim=True)  # (B, k, 1)
        qh = torch.where(qn > 0, q / torch.where(qn > 0, qn, 1), 0)
        ch = torch.where(cn > 0, c / torch.where(cn > 0, cn, 1), 0)
        s = torch.einsum("bd,bkd->bk", qh, ch).unsqueeze(-1)
        inv_qn = torch.where(qn > 0, 1 / torch.where(qn > 0, qn, 1), 0)
        inv_cn = torch.where(cn > 0, 1 / torch.where(cn > 0, cn, 1), 0)
        gq = torch.einsum("bk,bkd->bd", g, ch - s * qh.unsqueeze(1)) * inv_qn
        contrib = g.unsqueeze(-1) * (qh.unsqueeze(1) - s * ch) * inv_cn
    gc = torch.zeros(candidates.shape, dtype=ct, device=candidates.device)
    gc.index_add_(0, idx.reshape(-1), contrib.reshape(-1, contrib.shape[-1]))
    return gq.to(queries.dtype), gc.to(candidates.dtype)


_topk_similarity_op.register_autograd(_similarity_backward, setup_context=_similarity_setup)


@torch.library.custom_op("hnsample::topk_from_scores", mutates_args=())
def _topk_from_scores_op(
    scores: torch.Tensor, k: int, banned: torch.Tensor | None, query_labels: torch.Tensor | None,
    candidate_labels: torch.Tensor | None, upper: torch.Tensor | None, min_score: float, max_score: float,
    skip_top: int, pool: int, sampling: int, temperature: float, seed: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    sel = _selection(k, banned, query_labels, candidate_labels, upper, min_score, max_score, skip_top, pool,
                     sampling, temperature, seed)
    with torch.no_grad(), _device_guard(scores):
        state = SelectionState(sel, scores.shape[0], scores.device)
        if k > 0:
            state.offer(scores, 0, 0)
        out_s, out_j = state.finalize()
    return out_s.to(_out_dtype(scores.dtype)), out_j


@_topk_from_scores_op.register_fake
def _(scores, k, banned, query_labels, candidate_labels, upper, min_score, max_score, skip_top, pool,
      sampling, temperature, seed):
    b = scores.shape[0]
    return scores.new_empty((b, k), dtype=_out_dtype(scores.dtype)), scores.new_empty((b, k), dtype=torch.int64)


def _from_scores_setup(ctx, inputs, output):
    ctx.shape, ctx.dtype = inputs[0].shape, inputs[0].dtype
    ctx.save_for_backward(output[1])


def _from_scores_backward(ctx, grad_scores, _grad_indices):
    (indices,) = ctx.saved_tensors
    g = torch.where(indices >= 0, grad_scores, torch.zeros((), dtype=grad_scores.dtype, device=grad_scores.device))
    grad = torch.zeros(ctx.shape, dtype=grad_scores.dtype, device=grad_scores.device)
    grad.scatter_add_(1, indices.clamp_min(0), g)
    return (grad.to(ctx.dtype),) + (None,) * 12


_topk_from_scores_op.register_autograd(_from_scores_backward, setup_context=_from_scores_setup)


class _device_guard:
    """Runs CUDA work under the tensor's device (a no-op on the CPU)."""

    def __init__(self, t: torch.Tensor):
        self.ctx = torch.cuda.device_of(t) if t.device.type == "cuda" else None

    def __enter__(self):
        if self.ctx is not None:
            self.ctx.__enter__()

    def __exit__(self, *exc):
        if self.ctx is not None:
            return self.ctx.__exit__(*exc)
        return False


# ----------------------------------------------------------------------------------------------------
# Validation shared by both public functions


def _seed_from(generator: torch.Generator | None, seed: int | None) -> int:
    if seed is not None:
        return check_int("seed", seed) & ((1 << 63) - 1)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 1 << 62, (1,), generator=generator, device=device).item())


def build_selection(
    rows: int, n: int, device: torch.device, k: Any, *, positives, exclude, query_labels, candidate_labels,
    positive_scores, absolute_margin, relative_margin, min_score, max_score, skip_top, pool, sampling,
    temperature, generator, seed, positive_values,
) -> Selection:
    """Validates every filter/sampling argument and builds the kernel's Selection.

    positive_values(pos) -> (B, P) float scores s_{i, pos[i, p]} for the given (B, P) ids (clamped to
    valid ids); it is called only when a margin filter needs p_i and positive_scores is not given.
    """
    compiling = torch.compiler.is_compiling()
    k = check_int("k", k, 0)
    skip_top = check_int("skip_top", skip_top, 0)
    pool = -1 if pool is None else check_int("pool", pool, 1)
    if not isinstance(sampling, str) or sampling not in SAMPLING_CODES:
        raise ValueError(f"sampling must be one of {sorted(SAMPLING_CODES)}, got {sampling!r}")
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
            p = ps.to(torch.float64)
            has_p = torch.ones(rows, dtype=torch.bool, device=device)
        elif positives is not None and positives.shape[1] > 0 and n > 0:
            # With n == 0 every id is padding and there is no score to gather.
            valid = positives >= 0
            vals = positive_values(positives.clamp_min(0)).to(torch.float64)
            p = torch.where(valid, vals, torch.full_like(vals, math.inf)).amin(dim=1)
            # NaN among a row's valid positive scores makes p_i NaN (nothing passes the margin test).
            p = torch.where((vals.isnan() & valid).any(dim=1), torch.full_like(p, math.nan), p)
            has_p = valid.any(dim=1)
        else:
            p = torch.zeros(rows, dtype=torch.float64, device=device)
            has_p = torch.zeros(rows, dtype=torch.bool, device=device)
        upper = torch.full_like(p, math.inf)
        if absolute_margin is not None:
            upper = torch.minimum(upper, p - absolute_margin)
        if relative_margin is not None:
            upper = torch.minimum(upper, p - p.abs() * relative_margin)
        upper = torch.where(has_p, upper, torch.full_like(upper, math.inf)).contiguous()
    elif positive_scores is not None:
        as_tensor("positive_scores", positive_scores)  # type check only: no margin uses it

    code = SAMPLING_CODES[sampling]
    seed_value = 0 if code == 0 else _seed_from(generator, seed)
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
    return Selection(
        k, banned, query_labels, candidate_labels, upper, lo, hi,
        skip_top, pool, code, float(temperature), seed_value,
    )


def _to_output(scores: torch.Tensor, indices: torch.Tensor, numpy_in: bool) -> TopK:
    if numpy_in:
        return TopK(scores.detach().cpu().numpy(), indices.cpu().numpy())
    return TopK(scores, indices)


_DOC_SEMANTICS = """
    Semantics (the reference in ``hnsample._reference`` implements them literally):

    * Scores: s_ij = q_i . c_j (``metric="dot"``) or q_i . c_j / (|q_i| |c_j|) (``"cosine"``; a zero
      vector has cosine 0 with everything), accumulated in float32 (float64 for float64 inputs).
    * Positive score: p_i = positive_scores[i] if given, else the minimum of s_ij over the row's valid
      positives (ids != -1); a NaN among them makes p_i NaN. A row with neither has no margin filter.
    * Candidate j is eligible for query i iff all hold (comparisons in float64):
      j not in positives[i] or exclude[i]; query_labels[i] != candidate_labels[j] (when labels are
      given); s_ij >= min_score; s_ij <= max_score; s_ij <= p_i - absolute_margin;
      s_ij <= p_i - |p_i| * relative_margin; s_ij is not NaN.
    * Eligible candidates are ranked by score descending, ties to the lower candidate index. The first
      ``skip_top`` are dropped; the window is the next ``pool`` (``None``: all the rest).
      sentence-transformers' ``range_min=a, range_max=b`` is ``skip_top=a, pool=b-a``.
    * ``sampling="top"``: the window's first k. ``"uniform"``: k drawn uniformly without replacement
      from the window. ``"softmax"``: k drawn without replacement with probability proportional to
      exp(s_ij / temperature) (Gumbel-top-k: the k largest s_ij / T - log(-log u_ij)).
      u_ij = u(seed, i, j) is Philox-4x32-10 noise, a pure function of (seed, query row, candidate
      id), so the sample does not depend on block size, threads or device. The seed is ``seed`` if
      given, else drawn from ``generator`` (torch's default generator when None).
    * Results are sorted by score descending (ties: lower index); fewer than k eligible in the window
      pads indices with -1 and scores with -inf. k may exceed N; B = 0 and N = 0 are valid.
    * Returned scores are differentiable (gradients flow through the selected entries only); indices
      carry no gradient.
    * numpy inputs give numpy outputs; torch inputs give torch outputs on the input's device.
    * Under ``torch.compile`` the data-dependent id range checks are skipped (ids out of range never
      match anything); pass ``seed=`` rather than ``generator=`` for sampling inside a compiled graph.
"""


def topk_similarity(
    queries: Any, candidates: Any, k: int, *, metric: str = "dot", positives: Any = None, exclude: Any = None,
    query_labels: Any = None, candidate_labels: Any = None, positive_scores: Any = None,
    absolute_margin: float | None = None, relative_margin: float | None = None,
    min_score: float | None = None, max_score: float | None = None, skip_top: int = 0, pool: int | None = None,
    sampling: str = "top", temperature: float = 1.0, generator: torch.Generator | None = None,
    seed: int | None = None, block_size: int | None = None,
) -> TopK:
    """For each query, the k best hard negatives among ``candidates`` after masks and filters, without
    materializing the (B, N) score matrix.

    Args:
        queries: (B, d) float32/float64/float16/bfloat16 tensor or numpy array.
        candidates: (N, d), same dtype and device as queries.
        k: results per query (may exceed N).
        metric: "dot" or "cosine".
        positives: (B, P) int64 candidate ids (-1 = padding); excluded, and they define p_i.
        exclude: (B, E) int64 candidate ids (-1 = padding) that are never returned.
        query_labels, candidate_labels: (B,), (N,) int64; a candidate sharing the query's label is masked.
        positive_scores: (B,) float; overrides the computed p_i.
        absolute_margin, relative_margin: false-negative margins against p_i.
        min_score, max_score: closed score bounds.
        skip_top, pool: the window of the ranking to choose from.
        sampling: "top" | "uniform" | "softmax"; temperature for "softmax".
        generator, seed: source of the sampling seed.
        block_size: maximum score elements per block (workspace = 4 * block_size bytes);
            default 2**22 (16 MB: a block small enough to be scanned from cache).

    Returns:
        TopK(scores (B, k) float32 [float64 for float64 inputs], indices (B, k) int64).
    """
    numpy_in = not isinstance(queries, torch.Tensor)
    queries = as_tensor("queries", queries)
    candidates = as_tensor("candidates", candidates)
    check_float_matrix("queries", queries)
    check_float_matrix("candidates", candidates)
    if queries.shape[1] != candidates.shape[1]:
        raise ValueError(
            f"queries and candidates must have the same dimension d, got {queries.shape[1]} and {candidates.shape[1]}")
    if queries.dtype != candidates.dtype:
        raise TypeError(f"queries and candidates must have the same dtype, got {queries.dtype} and {candidates.dtype}")
    if queries.device != candidates.device:
        raise ValueError(f"queries and candidates must be on the same device, got {queries.device} and {candidates.device}")
    if not isinstance(metric, str) or metric not in METRICS:
        raise ValueError(f"metric must be 'dot' or 'cosine', got {metric!r}")
    block = DEFAULT_BLOCK_SIZE if block_size is None else check_int("block_size", block_size, 1)
    b, n = queries.shape[0], candidates.shape[0]

    def positive_values(pos: torch.Tensor) -> torch.Tensor:
        q = prepare_rows(queries.detach(), metric)
        # An explicit d: with B = 0 or d = 0 the gathered rows are empty and -1 would be ambiguous.
        d = candidates.shape[1]
        c = prepare_rows(candidates.detach()[pos.reshape(-1)], metric).reshape(pos.shape[0], pos.shape[1], d)
        return torch.einsum("bd,bpd->bp", q, c)

    sel = build_selection(
        b, n, queries.device, k, positives=positives, exclude=exclude, query_labels=query_labels,
        candidate_labels=candidate_labels, positive_scores=positive_scores, absolute_margin=absolute_margin,
        relative_margin=relative_margin, min_score=min_score, max_score=max_score, skip_top=skip_top, pool=pool,
        sampling=sampling, temperature=temperature, generator=generator, seed=seed,
        positive_values=positive_values,
    )
    scores, indices = _topk_similarity_op(
        queries, candidates, sel.k, metric, sel.banned, sel.query_labels, sel.candidate_labels, sel.upper,
        sel.min_score, sel.max_score, sel.skip_top, sel.pool, sel.sampling, sel.temperature, sel.seed, block,
    )
    return _to_output(scores, indices, numpy_in)


def topk_from_scores(
    scores: Any, k: int, *, positives: Any = None, exclude: Any = None, query_labels: Any = None,
    candidate_labels: Any = None, positive_scores: Any = None, absolute_margin: float | None = None,
    relative_margin: float | None = None, min_score: float | None = None, max_score: float | None = None,
    skip_top: int = 0, pool: int | None = None, sampling: str = "top", temperature: float = 1.0,
    generator: torch.Generator | None = None, seed: int | None = None,
) -> TopK:
    """The fused selection of :func:`topk_similarity` applied to a (B, N) score matrix the caller
    already has (cross-encoder scores, an in-batch similarity matrix). p_i is read from the matrix
    (the minimum over the row's valid positives) unless ``positive_scores`` is given. Any float dtype
    and any strides (no copy is made). Gradients flow to the selected entries of ``scores``.
    """
    numpy_in = not isinstance(scores, torch.Tensor)
    scores = as_tensor("scores", scores)
    check_float_matrix("scores", scores)
    b, n = scores.shape

    def positive_values(pos: torch.Tensor) -> torch.Tensor:
        return torch.gather(scores.detach(), 1, pos)

    sel = build_selection(
        b, n, scores.device, k, positives=positives, exclude=exclude, query_labels=query_labels,
        candidate_labels=candidate_labels, positive_scores=positive_scores, absolute_margin=absolute_margin,
        relative_margin=relative_margin, min_score=min_score, max_score=max_score, skip_top=skip_top, pool=pool,
        sampling=sampling, temperature=temperature, generator=generator, seed=seed,
        positive_values=positive_values,
    )
    out_s, out_j = _topk_from_scores_op(
        scores, sel.k, sel.banned, sel.query_labels, sel.candidate_labels, sel.upper, sel.min_score,
        sel.max_score, sel.skip_top, sel.pool, sel.sampling, sel.temperature, sel.seed,
    )
    return _to_output(out_s, out_j, numpy_in)


topk_similarity.__doc__ += _DOC_SEMANTICS
topk_from_scores.__doc__ += _DOC_SEMANTICS
