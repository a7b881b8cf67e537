"""Selection from per-row candidate lists.

The op ``hnsample::topk_from_candidates`` (torch.library: a kernel per backend, a fake for tracing,
autograd through the selected scores) and its public function :func:`topk_from_candidates`: the
selection of :func:`hnsample.topk_from_scores` over C (candidate id, score) pairs per row instead of a
(B, N) score matrix. This is how scores that exist only for a shortlist are used: a cross-encoder's (or
any reranker's) scores of a bi-encoder's top C. Every filter and sampling mode works on the listed
*ids*: positives and exclude are corpus ids, candidate_labels is indexed by corpus id, and the sampling
noise is u(seed, row, id), so listing every id 0..N-1 selects exactly what ``topk_from_scores`` selects
on the full matrix.
"""

from __future__ import annotations

from typing import Any

import torch

from .._ext import as_tensor, check_float_matrix, check_ids, check_int, device_guard, dtype_code, rows_text, to_int64
from ..engine import SelectionState, build_selection, compute_dtype, registry
from .topk import (
    FILTER_SCHEMA,
    SELECTION_SCHEMA,
    TopK,
    interruptible_rows,
    op_args,
    selection_from_op,
    to_output,
)

torch.library.define(
    "hnsample::topk_from_candidates",
    f"(Tensor candidate_ids, Tensor scores, {FILTER_SCHEMA}, *, {SELECTION_SCHEMA}, int num_ids) -> (Tensor, Tensor)")


def _launch(name: str, state: SelectionState, candidate_ids: torch.Tensor, scores: torch.Tensor, row_offset: int,
            num_ids: int, *extra: int) -> None:
    """Calls launcher `name` of the state's kernels on a (b, C) block of lists."""
    if scores.numel() == 0:
        return
    k = state.kernels
    getattr(k.module, name)(
        state.params, scores.data_ptr(), dtype_code(scores), scores.shape[0], scores.shape[1], scores.stride(0),
        scores.stride(1), candidate_ids.data_ptr(), candidate_ids.stride(0), candidate_ids.stride(1), row_offset,
        num_ids, *extra, k.cuda, k.stream(scores), k.threads())


def offer_candidate_lists(state: SelectionState, candidate_ids: torch.Tensor, scores: torch.Tensor, row_offset: int,
                          num_ids: int) -> None:
    """Offers rows [row_offset, ...) of the state the lists (candidate_ids int64 (b, C), scores any float
    dtype (b, C), any strides) through the state's kernels; ids outside [0, num_ids) are padding."""
    _launch("topk_candidates_select", state, candidate_ids, scores, row_offset, num_ids)


def count_candidate_filters(state: SelectionState, candidate_ids: torch.Tensor, scores: torch.Tensor,
                            row_offset: int, num_ids: int, counts: torch.Tensor) -> None:
    """Adds to counts (int64 (B, 6)) what each filter removes from the listed candidates: banned ids
    (positives and exclude), labels, NaN, min_score, max_score, margin, each candidate under the first
    it fails (the kernels' own eligibility rule); padding is not counted."""
    _launch("topk_candidates_filter_counts", state, candidate_ids, scores, row_offset, num_ids, counts.data_ptr())


def _candidates_kernel(device_type: str):
    def kernel(candidate_ids, scores, banned, query_labels, candidate_labels, upper, *, num_ids, **sel):
        backend = registry.get(device_type)
        selection = selection_from_op(banned, query_labels, candidate_labels, upper, **sel)
        with torch.no_grad(), device_guard(scores):
            state = SelectionState(selection, scores.shape[0], scores.device, kernels=backend.kernels)
            if selection.k:
                for r0, r1 in interruptible_rows(scores, backend.kernels):
                    offer_candidate_lists(state, candidate_ids[r0:r1], scores[r0:r1], r0, num_ids)
            out_s, out_j = state.finalize()
        return out_s.to(compute_dtype(scores.dtype)), out_j
    return kernel


for _device_type in ("cpu", "cuda"):
    torch.library.register_kernel("hnsample::topk_from_candidates", _device_type, _candidates_kernel(_device_type))


@torch.library.register_fake("hnsample::topk_from_candidates")
def _(candidate_ids, scores, banned, query_labels, candidate_labels, upper, *, k, **_):
    b = scores.shape[0]
    return (scores.new_empty((b, k), dtype=compute_dtype(scores.dtype)),
            scores.new_empty((b, k), dtype=torch.int64))


def listed_positions(candidate_ids: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(columns, found): for each id of ids (B, m), the column of candidate_ids (B, C) listing it in the
    same row (0 where it is not listed) and whether it is listed. Ids must not repeat within a row."""
    b, c = candidate_ids.shape
    if c == 0:
        z = torch.zeros(ids.shape, dtype=torch.int64, device=ids.device)
        return z, torch.zeros(ids.shape, dtype=torch.bool, device=ids.device)
    ordered, perm = torch.sort(candidate_ids, dim=1)
    at = torch.searchsorted(ordered.contiguous(), ids.contiguous()).clamp_max(c - 1)
    found = (ordered.gather(1, at) == ids) & (ids >= 0)
    return torch.where(found, perm.gather(1, at), torch.zeros_like(at)), found


def _setup(ctx, inputs, keyword_only_inputs, output):
    ctx.shape, ctx.dtype = inputs[1].shape, inputs[1].dtype
    ctx.save_for_backward(inputs[0], output[1])


def _backward(ctx, grad_scores, _grad_indices):
    candidate_ids, indices = ctx.saved_tensors
    cols, found = listed_positions(candidate_ids, indices)
    g = torch.where(found, grad_scores, torch.zeros((), dtype=grad_scores.dtype, device=grad_scores.device))
    grad = torch.zeros(ctx.shape, dtype=grad_scores.dtype, device=grad_scores.device)
    if grad.numel():
        grad.scatter_add_(1, cols, g)
    return None, grad.to(ctx.dtype), None, None, None, None


torch.library.register_autograd("hnsample::topk_from_candidates", _backward, setup_context=_setup)


def check_margin_source(absolute_margin: Any, relative_margin: Any, positives: Any, positive_scores: Any) -> None:
    """ValueError when a margin filter is asked for but nothing gives a positive score p_i to measure it
    from (no positive_scores and no positives, or positives with no column): the margin would otherwise
    be silently ignored. (topk_similarity and topk_from_scores keep their documented rule: no margin
    filter for such rows.)"""
    if (absolute_margin is None and relative_margin is None) or positive_scores is not None:
        return
    width = None if positives is None else getattr(positives, "shape", (None, None))
    if positives is None or (width is not None and len(width) == 2 and width[1] == 0):
        given = " and ".join(n for n, v in (("absolute_margin", absolute_margin), ("relative_margin", relative_margin))
                             if v is not None)
        raise ValueError(f"{given} needs a positive score to measure from: give positives (whose lowest score "
                         "is p_i) or positive_scores")


def _check_candidate_ids(candidate_ids: Any, scores: torch.Tensor, compiling: bool) -> torch.Tensor:
    ids = as_tensor("candidate_ids", candidate_ids)
    if ids.dtype.is_floating_point or ids.dtype == torch.bool or ids.is_complex():
        raise TypeError(f"candidate_ids must be an integer tensor, got {ids.dtype}")
    if tuple(ids.shape) != tuple(scores.shape):
        raise ValueError(f"candidate_ids must have the shape of scores {tuple(scores.shape)}, got {tuple(ids.shape)}")
    if ids.device != scores.device:
        raise ValueError(f"candidate_ids must be on {scores.device}, got {ids.device}")
    return ids.to(torch.int64) if compiling else to_int64("candidate_ids", ids)


def topk_from_candidates(
    candidate_ids: Any, scores: Any, k: int, *, num_candidates: int | None = None, positives: Any = None,
    exclude: Any = None, query_labels: Any = None, candidate_labels: Any = None, positive_scores: Any = None,
    absolute_margin: float | None = None, relative_margin: float | None = None, min_score: float | None = None,
    max_score: float | None = None, skip_top: int = 0, pool: int | None = None, sampling: str = "top",
    temperature: float = 1.0, generator: torch.Generator | None = None, seed: int | None = None,
) -> TopK:
    """The fused selection of :func:`hnsample.topk_from_scores` over per-row candidate lists: row i lists
    C candidates by id, ``candidate_ids[i, c]``, with their scores ``scores[i, c]`` (a reranker's scores
    of a first-stage shortlist, say). Returns the selected *ids*.

    Args:
        candidate_ids: (B, C) integer ids in [0, N), -1 = padding (its score is never read); an id must
            not appear twice in a row.
        scores: (B, C) float32/float64/float16/bfloat16, any strides (no copy).
        k: results per row (may exceed C).
        num_candidates: N, the size of the id space (ids, positives and exclude lie in [0, N);
            ``candidate_labels`` has N entries). Default: len(candidate_labels) if given, else one more
            than the largest id in candidate_ids, positives and exclude. Pass it under torch.compile.
        positives, exclude: (B, P) / (B, E) ids (-1 = padding), never returned; positives define p_i.
        query_labels, candidate_labels: (B,), (N,) int64; a candidate sharing its query's label is masked.
        positive_scores: (B,) float; p_i. Without it p_i is the minimum of the *listed* scores of the
            row's valid positives; a valid positive that is not listed has no score, so a margin filter
            then raises ValueError naming the rows (list the positives, or pass positive_scores).
        absolute_margin, relative_margin, min_score, max_score, skip_top, pool, sampling, temperature,
        generator, seed: as in :func:`hnsample.topk_from_scores`, over the listed candidates only.
            ``temperature`` defaults to 1.0, the scale of reranker logits; for cosine-like scores in
            [-1, 1] use about 0.05.

    Returns:
        TopK(scores (B, k) float32 [float64 for float64 scores], indices (B, k) int64 candidate *ids*),
        sorted by score descending (ties: lower id), padded with (-inf, -1). Gradients flow to the
        selected entries of ``scores``.

    Semantics (``hnsample._reference.select_from_candidates`` implements them literally): candidate
    j = candidate_ids[i, c] (not -1) with score s = scores[i, c] is eligible for row i iff j is not in
    positives[i] or exclude[i]; query_labels[i] != candidate_labels[j]; s is not NaN; min_score <= s <=
    max_score; s <= p_i - absolute_margin; s <= p_i - |p_i| relative_margin (comparisons in float64).
    Eligible candidates are ranked by (s desc, j asc); skip_top / pool / sampling then act exactly as in
    ``topk_from_scores``, with the sampling noise u(seed, i, j) keyed by the id, so a list holding every
    id 0..N-1 gives what ``topk_from_scores`` gives on the (B, N) matrix. numpy inputs give numpy
    outputs.
    """
    numpy_in = not isinstance(scores, torch.Tensor)
    scores = as_tensor("scores", scores)
    check_float_matrix("scores", scores)
    compiling = torch.compiler.is_compiling()
    ids = _check_candidate_ids(candidate_ids, scores, compiling)
    b, device = scores.shape[0], scores.device
    if num_candidates is not None:
        n = check_int("num_candidates", num_candidates, 0)
    elif candidate_labels is not None:
        n = as_tensor("candidate_labels", candidate_labels).shape[0]
    else:
        extents = [int(t.max()) + 1 for t in (ids, *(_raw_ids(x) for x in (positives, exclude)))
                   if t is not None and t.numel()]
        n = max(extents, default=0)
    if not compiling:
        if ids.numel() and (int(ids.min()) < -1 or int(ids.max()) >= n):
            raise ValueError(f"candidate_ids must hold ids in [0, {n}) or -1 for padding (num_candidates {n})")
        if ids.shape[1] > 1:
            ordered = torch.sort(ids, dim=1).values
            twice = torch.nonzero(((ordered[:, 1:] == ordered[:, :-1]) & (ordered[:, 1:] >= 0)).any(dim=1))
            if twice.numel():
                raise ValueError(f"candidate_ids must not list an id twice in a row: "
                                 f"{rows_text(twice.reshape(-1).cpu(), b)} do")
        if positives is not None:
            positives = check_ids("positives", positives, b, device, n)
    check_margin_source(absolute_margin, relative_margin, positives, positive_scores)
    valid_positives = None if positives is None or compiling else positives >= 0

    def positive_values(pos: torch.Tensor) -> torch.Tensor:
        cols, found = listed_positions(ids, pos)
        if valid_positives is not None:
            missing = torch.nonzero((valid_positives & ~found).any(dim=1)).reshape(-1)
            if missing.numel():
                raise ValueError(
                    "a margin filter needs p_i, the lowest listed score of the row's positives, but some "
                    f"positives are not in candidate_ids ({rows_text(missing.cpu(), b)}); list them with "
                    "their scores or pass positive_scores")
        return scores.detach().gather(1, cols)

    sel = build_selection(
        b, n, device, k, positives=positives, exclude=exclude, query_labels=query_labels,
        candidate_labels=candidate_labels, positive_scores=positive_scores, absolute_margin=absolute_margin,
        relative_margin=relative_margin, min_score=min_score, max_score=max_score, skip_top=skip_top, pool=pool,
        sampling=sampling, temperature=temperature, generator=generator, seed=seed,
        positive_values=positive_values,
    )
    tensors, kw = op_args(sel)
    out_s, out_j = torch.ops.hnsample.topk_from_candidates(ids, scores, *tensors, num_ids=n, **kw)
    return to_output(out_s, out_j, numpy_in)


def _raw_ids(x: Any) -> torch.Tensor | None:
    """An id argument as a tensor for the default N (None when absent or not a tensor/array)."""
    if x is None:
        return None
    t = as_tensor("ids", x)
    return None if t.dtype.is_floating_point or t.dtype == torch.bool else t
