"""Fused top-k similarity with hard-negative filters and sampling.

The ops ``hnsample::topk_similarity`` and ``hnsample::topk_from_scores`` (torch.library: one kernel per
backend, a fake for tracing, autograd through the selected scores) and their public functions
:func:`topk_similarity` and :func:`topk_from_scores`. The selection itself is the engine's
(:mod:`hnsample.engine`): arguments are validated into a Selection, score blocks are offered to a
SelectionState by the backend of the inputs' device.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from .. import settings as _settings
from .._ext import as_tensor, check_float_matrix, check_int, device_guard
from ..engine import (
    METRICS,
    Selection,
    SelectionState,
    build_selection,
    compute_dtype,
    registry,
    selection_pair_scores,
)

SEED_SIGN = 1 << 63


class TopK(NamedTuple):
    """Result of a top-k selection: ``scores`` float32 (B, k) (float64 for float64 inputs), sorted
    descending, padded with -inf; ``indices`` int64 (B, k) candidate ids, padded with -1."""

    scores: Any
    indices: Any


# ----------------------------------------------------------------------------------------------------
# Ops. Tensors are positional (autograd registration needs them so); every other argument is keyword-
# only. The seed travels as a signed int64 (the schema's int) and is read back as its 64 bits.

FILTER_SCHEMA = "Tensor? banned, Tensor? query_labels, Tensor? candidate_labels, Tensor? upper"
SELECTION_SCHEMA = ("int k, float min_score, float max_score, int skip_top, int pool, str sampling, "
                    "float temperature, int seed")
torch.library.define(
    "hnsample::topk_similarity",
    f"(Tensor queries, Tensor candidates, {FILTER_SCHEMA}, *, {SELECTION_SCHEMA}, str metric, int block_size) "
    "-> (Tensor, Tensor)")
torch.library.define(
    "hnsample::topk_from_scores", f"(Tensor scores, {FILTER_SCHEMA}, *, {SELECTION_SCHEMA}) -> (Tensor, Tensor)")
# The scores a selection ranks for listed (query, candidate) pairs: p_i's positives.
torch.library.define("hnsample::pair_scores", "(Tensor queries, Tensor candidates, Tensor ids, *, str metric) -> Tensor")


@torch.library.impl("hnsample::pair_scores", "CompositeExplicitAutograd")
def _pair_scores(queries, candidates, ids, *, metric):
    with torch.no_grad():
        return selection_pair_scores(queries, candidates.__getitem__, ids, metric)


@torch.library.register_fake("hnsample::pair_scores")
def _(queries, candidates, ids, *, metric):
    dtype = torch.float64 if queries.dtype == torch.float64 else torch.float32
    return queries.new_empty(ids.shape, dtype=dtype)


def selection_from_op(banned, query_labels, candidate_labels, upper, *, k, min_score, max_score, skip_top, pool,
               sampling, temperature, seed) -> Selection:
    return Selection(k, banned, query_labels, candidate_labels, upper, min_score, max_score, skip_top, pool,
                     sampling, temperature, seed % (1 << 64))


def op_seed(seed: int) -> int:
    """The 64-bit seed as the schema's signed int64."""
    return seed - (1 << 64) if seed >= SEED_SIGN else seed


def _similarity_kernel(device_type: str):
    def kernel(queries, candidates, banned, query_labels, candidate_labels, upper, *, metric, block_size, **sel):
        backend = registry.get(device_type)
        selection = selection_from_op(banned, query_labels, candidate_labels, upper, **sel)
        with torch.no_grad(), device_guard(queries):
            state = SelectionState(selection, queries.shape[0], queries.device, kernels=backend.kernels)
            backend.select(queries, candidates, state, metric, block_size)
            scores, indices = state.finalize()
        return scores.to(compute_dtype(queries.dtype)), indices
    return kernel


def _from_scores_kernel(device_type: str):
    def kernel(scores, banned, query_labels, candidate_labels, upper, **sel):
        backend = registry.get(device_type)
        selection = selection_from_op(banned, query_labels, candidate_labels, upper, **sel)
        with torch.no_grad(), device_guard(scores):
            state = SelectionState(selection, scores.shape[0], scores.device, kernels=backend.kernels)
            for r0, r1 in interruptible_rows(scores, backend.kernels):
                state.offer(scores[r0:r1], r0, 0)
            out_s, out_j = state.finalize()
        return out_s.to(compute_dtype(scores.dtype)), out_j
    return kernel


for _device_type in ("cpu", "cuda"):
    torch.library.register_kernel("hnsample::topk_similarity", _device_type, _similarity_kernel(_device_type))
    torch.library.register_kernel("hnsample::topk_from_scores", _device_type, _from_scores_kernel(_device_type))


def interruptible_rows(scores: torch.Tensor, kernels: Any) -> list[tuple[int, int]]:
    """Row ranges of a score matrix, each one kernel call of about settings.interrupt_seconds of work at
    a conservative 2e7 scores per second per thread (sampling over an unbounded pool offers every
    eligible score to a heap: the slowest mode), so that Ctrl-C, which Python acts on between calls,
    stops a large call within about that long. One range on the GPU, where launches are asynchronous.
    Rows are independent, so the result does not depend on the split."""
    b, n = scores.shape
    if kernels.cuda or b == 0:
        return [(0, b)]
    threads = kernels.threads()
    per_call = max(threads, int(_settings.current().interrupt_seconds * 2e7 * threads) // max(1, n))
    return [(r0, min(b, r0 + per_call)) for r0 in range(0, b, per_call)]


@torch.library.register_fake("hnsample::topk_similarity")
def _(queries, candidates, banned, query_labels, candidate_labels, upper, *, k, **_):
    b = queries.shape[0]
    return (queries.new_empty((b, k), dtype=compute_dtype(queries.dtype)),
            queries.new_empty((b, k), dtype=torch.int64))


@torch.library.register_fake("hnsample::topk_from_scores")
def _(scores, banned, query_labels, candidate_labels, upper, *, k, **_):
    b = scores.shape[0]
    return (scores.new_empty((b, k), dtype=compute_dtype(scores.dtype)),
            scores.new_empty((b, k), dtype=torch.int64))


def _similarity_setup(ctx, inputs, keyword_only_inputs, output):
    queries, candidates = inputs[:2]
    ctx.metric = keyword_only_inputs["metric"]
    ctx.save_for_backward(queries, candidates, output[1])


def _similarity_backward(ctx, grad_scores, _grad_indices):
    queries, candidates, indices = ctx.saved_tensors
    gq, gc = similarity_grads(queries, candidates, indices, grad_scores, ctx.metric)
    return gq, gc, None, None, None, None


def similarity_grads(queries: torch.Tensor, candidates: torch.Tensor, indices: torch.Tensor,
                     grad_scores: torch.Tensor, metric: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients of the selected scores s_{i,idx[i,t]} with respect to queries and candidates.

    dot:    ds/dq = c,  ds/dc = q.
    cosine: ds/dq = (c^ - s q^) / |q|,  ds/dc = (q^ - s c^) / |c|   (zero for a zero vector).
    Padded entries (index -1) contribute nothing, not even 0 * NaN: a query row holding NaN (whose
    entries are all padding) or a candidate holding NaN or inf that was never selected leaves every
    other gradient finite. Memory: (B, k, d), never (B, N).
    """
    if candidates.shape[0] == 0:  # every entry is padding
        return torch.zeros_like(queries), torch.zeros_like(candidates)
    ct = compute_dtype(queries.dtype)
    valid = indices >= 0
    g = torch.where(valid, grad_scores.to(ct), torch.zeros((), dtype=ct, device=grad_scores.device))
    idx = indices.clamp_min(0)
    q = queries.to(ct)
    # Padding gathers candidate 0 (any row would do): zero it, so that its values never reach a gradient.
    c = torch.where(valid.unsqueeze(-1), candidates.to(ct)[idx], 0)  # (B, k, d)
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
    contrib = torch.where(valid.unsqueeze(-1), contrib, 0)  # a NaN query row's padding adds no 0 * NaN
    gc = torch.zeros(candidates.shape, dtype=ct, device=candidates.device)
    gc.index_add_(0, idx.reshape(-1), contrib.reshape(-1, contrib.shape[-1]))
    return gq.to(queries.dtype), gc.to(candidates.dtype)


def _from_scores_setup(ctx, inputs, keyword_only_inputs, output):
    ctx.shape, ctx.dtype = inputs[0].shape, inputs[0].dtype
    ctx.save_for_backward(output[1])


def _from_scores_backward(ctx, grad_scores, _grad_indices):
    (indices,) = ctx.saved_tensors
    g = torch.where(indices >= 0, grad_scores, torch.zeros((), dtype=grad_scores.dtype, device=grad_scores.device))
    grad = torch.zeros(ctx.shape, dtype=grad_scores.dtype, device=grad_scores.device)
    if grad.numel():  # N = 0: every entry is padding, and there is no column 0 to add its zero to
        grad.scatter_add_(1, indices.clamp_min(0), g)
    return grad.to(ctx.dtype), None, None, None, None


torch.library.register_autograd("hnsample::topk_similarity", _similarity_backward, setup_context=_similarity_setup)
torch.library.register_autograd("hnsample::topk_from_scores", _from_scores_backward, setup_context=_from_scores_setup)


def op_args(sel: Selection) -> tuple[tuple, dict[str, Any]]:
    """(positional tensors, keyword-only arguments) of a Selection for the ops."""
    tensors = (sel.banned, sel.query_labels, sel.candidate_labels, sel.upper)
    kw = dict(k=sel.k, min_score=sel.min_score, max_score=sel.max_score, skip_top=sel.skip_top, pool=sel.pool,
              sampling=sel.sampling, temperature=sel.temperature, seed=op_seed(sel.seed))
    return tensors, kw


def to_output(scores: torch.Tensor, indices: torch.Tensor, numpy_in: bool) -> TopK:
    if numpy_in:
        return TopK(scores.detach().cpu().numpy(), indices.cpu().numpy())
    return TopK(scores, indices)


_DOC_SEMANTICS = """
    Semantics (the reference in ``hnsample._reference`` implements them literally):

    * Scores: s_ij = q_i . c_j (``metric="dot"``) or q_i . c_j / (|q_i| |c_j|) (``"cosine"``; a zero
      vector has cosine 0 with everything). float32 / float16 / bfloat16 inputs on the CPU: the
      canonical score, float64 products summed in a fixed order of eight lanes and rounded once to
      float32 (docs/certified.md): the same bits on every machine, whatever the blocking or threads;
      a fast GEMM only screens candidates under a proven error bound. float64 inputs: the float64
      GEMM's scores. CUDA inputs: the same canonical scores with ``settings.cuda_certified``; without it
      (the default until a device check has timed it) the GPU GEMM's float32 scores.
      ``topk_from_scores`` ranks the scores it is given.
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
        metric: "dot" (the default here and in the other ops) or "cosine". Note: the mining pipeline
            (``mine_hard_negatives``), the miners and the samplers default to "cosine".
        positives: (B, P) int64 candidate ids (-1 = padding); excluded, and they define p_i.
        exclude: (B, E) int64 candidate ids (-1 = padding) that are never returned.
        query_labels, candidate_labels: (B,), (N,) int64; a candidate sharing the query's label is masked.
        positive_scores: (B,) float; overrides the computed p_i.
        absolute_margin, relative_margin: false-negative margins against p_i.
        min_score, max_score: closed score bounds.
        skip_top, pool: the window of the ranking to choose from.
        sampling: "top" | "uniform" | "softmax"; temperature for "softmax".
        generator, seed: source of the sampling seed.
        block_size: maximum score elements per block (workspace = 4 * block_size bytes); default
            ``hnsample.settings`` ``block_size`` (2**22, 16 MB: a block small enough to be scanned from
            cache) on the CPU, ``cuda_block_size`` (2**24, further capped by the L2 share) on CUDA.

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
    block = (_settings.current().block_size_for(queries.device.type) if block_size is None
             else check_int("block_size", block_size, 1))
    b, n = queries.shape[0], candidates.shape[0]

    def positive_values(pos: torch.Tensor) -> torch.Tensor:
        return torch.ops.hnsample.pair_scores(queries.detach(), candidates.detach(), pos, metric=metric)

    sel = build_selection(
        b, n, queries.device, k, positives=positives, exclude=exclude, query_labels=query_labels,
        candidate_labels=candidate_labels, positive_scores=positive_scores, absolute_margin=absolute_margin,
        relative_margin=relative_margin, min_score=min_score, max_score=max_score, skip_top=skip_top, pool=pool,
        sampling=sampling, temperature=temperature, generator=generator, seed=seed,
        positive_values=positive_values,
    )
    tensors, kw = op_args(sel)
    scores, indices = torch.ops.hnsample.topk_similarity(queries, candidates, *tensors, metric=metric,
                                                         block_size=block, **kw)
    return to_output(scores, indices, numpy_in)


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
    tensors, kw = op_args(sel)
    out_s, out_j = torch.ops.hnsample.topk_from_scores(scores, *tensors, **kw)
    return to_output(out_s, out_j, numpy_in)


topk_similarity.__doc__ += _DOC_SEMANTICS
topk_from_scores.__doc__ += _DOC_SEMANTICS
